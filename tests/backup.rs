//! Backup against a real docker-registry, read back with real skopeo.

mod common;

use common::{archiver_registry_flags, run, run_ok, seed, tag_events, Registry};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;

fn backup_args(reg: &Registry, archive: &Path, list: &Path) -> Vec<String> {
    common::backup_args(archiver_registry_flags(reg), archive, list, &[])
}

fn index(archive: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(archive.join("index.json")).unwrap()).unwrap()
}

fn blob_count(archive: &Path) -> usize {
    std::fs::read_dir(archive.join("blobs/sha256"))
        .unwrap()
        .count()
}

/// (ns, name, tag, position, digest) of every archived tag event.
fn archived_events(archive: &Path) -> HashSet<(String, String, String, usize, String)> {
    index(archive)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let a = &m["annotations"];
            let s = |k: &str| a[k].as_str().unwrap_or_default().to_string();
            (
                s("io.imagestream-archiver.namespace"),
                s("io.imagestream-archiver.imagestream"),
                s("io.imagestream-archiver.tag"),
                s("io.imagestream-archiver.history-index").parse().unwrap(),
                m["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn archives_every_tag_and_history_image_once_and_skopeo_reads_it() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");

    let r = run_ok(0, backup_args(&reg, &archive, &seeded.imagestreams));
    let report = r.json();
    assert_eq!(report["totals"]["images_failed"], 0, "{report}");
    assert_eq!(report["committed"], true);

    // Every tag event (current and history) is in the index, at its position.
    let expected: HashSet<_> = tag_events(&seeded.list()).into_iter().collect();
    assert_eq!(expected.len() as u64, seeded.items);
    assert_eq!(archived_events(&archive), expected);
    assert!(seeded.history_items > 0);

    // Blobs stored once: unique layers/configs + every manifest + the
    // ImageStream list, nothing more.
    assert_eq!(
        blob_count(&archive) as u64,
        seeded.unique_blobs + seeded.manifests + 1,
        "blobs/sha256 holds exactly one file per distinct blob"
    );
    run_ok(0, ["verify", "--archive", archive.to_str().unwrap()]);

    // Manifests are byte for byte what the registry serves, schema2 included.
    let idx = index(&archive);
    let mut kinds = HashSet::new();
    for m in idx["manifests"].as_array().unwrap() {
        let digest = m["digest"].as_str().unwrap();
        let mt = m["mediaType"].as_str().unwrap();
        kinds.insert(mt.to_string());
        let stored = std::fs::read(archive.join("blobs/sha256").join(&digest[7..])).unwrap();
        let ns = m["annotations"]["io.imagestream-archiver.namespace"]
            .as_str()
            .unwrap();
        let name = m["annotations"]["io.imagestream-archiver.imagestream"]
            .as_str()
            .unwrap();
        let served = reg
            .request(
                "GET",
                &format!("/v2/{ns}/{name}/manifests/{digest}"),
                &[("Accept", common::MANIFEST_ACCEPT)],
            )
            .unwrap();
        assert_eq!(served.status, 200);
        assert_eq!(served.body, stored, "{digest} stored byte for byte");
        assert_eq!(served.header("content-type"), Some(mt));
    }
    for k in [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ] {
        assert!(kinds.contains(k), "the workload has {k}: {kinds:?}");
    }

    // skopeo reads the archive (OCI-typed current tags) and copies with the
    // original digest.
    let oci_tag = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| {
            m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
                && m["annotations"]["org.opencontainers.image.ref.name"].is_string()
        })
        .expect("an OCI-typed current tag");
    let name = oci_tag["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap();
    let digest = oci_tag["digest"].as_str().unwrap();
    let out = common::skopeo()
        .args(["inspect", &format!("oci:{}:{name}", archive.display())])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspected: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["Digest"], digest);
    let target = reg.docker_ref("copied/image:x");
    let out = common::skopeo()
        .args([
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:{name}", archive.display()),
            &target,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = reg
        .request(
            "HEAD",
            "/v2/copied/image/manifests/x",
            &[("Accept", common::MANIFEST_ACCEPT)],
        )
        .unwrap();
    assert_eq!(head.header("docker-content-digest"), Some(digest));

    // list shows the streams and what dedup saved.
    let list_json = || {
        let archive = archive.to_str().unwrap();
        run_ok(0, ["list", "--archive", archive, "--output", "json"]).json()
    };
    let l = list_json();
    assert_eq!(l["entries"].as_u64().unwrap(), seeded.items);
    assert!(l["bytes_saved_by_dedup"].as_u64().unwrap() > 0, "{l}");
    let text = run_ok(0, ["list", "--archive", archive.to_str().unwrap()]).stdout;
    assert!(text.contains("team-a/"), "{text}");

    // An index in another order (written by another tool: streams
    // interleaved) lists the same.
    let mut idx = index(&archive);
    idx["manifests"]
        .as_array_mut()
        .unwrap()
        .sort_by_key(|m| m["digest"].as_str().unwrap().to_string());
    std::fs::write(
        archive.join("index.json"),
        serde_json::to_vec(&idx).unwrap(),
    )
    .unwrap();
    assert_eq!(list_json(), l);
}

#[test]
fn unchanged_rerun_sends_no_request_and_new_pushes_are_incremental() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    run_ok(0, backup_args(&reg, &archive, &seeded.imagestreams));
    let first_index = std::fs::read(archive.join("index.json")).unwrap();
    let identity = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec())
    };
    let first_identity = identity(&archive.join("index.json"));
    let blobs_before = blob_count(&archive);

    let mark = reg.mark();
    let report = run_ok(0, backup_args(&reg, &archive, &seeded.imagestreams)).json();
    assert_eq!(
        reg.content_reads_since(mark),
        vec![],
        "an unchanged re-run reads nothing"
    );
    assert_eq!(
        reg.requests_since(mark)
            .iter()
            .filter(|r| !r.path.contains("isa-harness"))
            .count(),
        0
    );
    assert_eq!(report["totals"]["images_new"], 0);
    assert_eq!(report["totals"]["bytes_new"], 0);
    assert_eq!(
        std::fs::read(archive.join("index.json")).unwrap(),
        first_index
    );
    // Not even rewritten (file-level backups such as restic skip it), and
    // no new ImageStream list blob.
    assert_eq!(identity(&archive.join("index.json")), first_identity);
    assert_eq!(blob_count(&archive), blobs_before);

    // Push every tag once more (other seed = new images): history grows by
    // one, only the new images are fetched, the old ones become history.
    let again = seed(&reg, &["--preset", "small", "--seed", "99"]);
    let mut merged = common::tag_events(&seeded.list());
    let newer = common::tag_events(&again.list());
    let mark = reg.mark();
    // A list where each tag has the new image on top of the old history.
    let mut list = again.list();
    for is in list["items"].as_array_mut().unwrap() {
        let ns = is["metadata"]["namespace"].as_str().unwrap().to_string();
        let name = is["metadata"]["name"].as_str().unwrap().to_string();
        let old = seeded.list();
        let old_is = old["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| {
                o["metadata"]["namespace"] == ns.as_str() && o["metadata"]["name"] == name.as_str()
            })
            .cloned();
        let Some(old_is) = old_is else { continue };
        for t in is["status"]["tags"].as_array_mut().unwrap() {
            let old_items = old_is["status"]["tags"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["tag"] == t["tag"])
                .map(|o| o["items"].as_array().unwrap().clone())
                .unwrap_or_default();
            let mut items = vec![t["items"][0].clone()];
            items.extend(old_items);
            t["items"] = Value::Array(items);
        }
    }
    let list_path = work.path().join("grown.json");
    std::fs::write(&list_path, serde_json::to_vec(&list).unwrap()).unwrap();
    let report = run_ok(0, backup_args(&reg, &archive, &list_path)).json();
    let new_currents: HashSet<&str> = newer
        .iter()
        .filter(|e| e.3 == 0)
        .map(|e| e.4.as_str())
        .collect();
    assert_eq!(
        report["totals"]["images_new"].as_u64().unwrap() as usize,
        new_currents.len(),
        "{report}"
    );
    // Old images were not fetched again.
    for r in reg.content_reads_since(mark) {
        if let Some(d) = r.path.split("/manifests/").nth(1) {
            assert!(
                !merged.iter().any(|e| e.4 == d),
                "re-fetched old manifest {d}"
            );
        }
    }
    merged.retain(|e| e.3 == 0);
    let events = archived_events(&archive);
    for (ns, name, tag, _, digest) in merged {
        assert!(
            events.contains(&(ns.clone(), name.clone(), tag.clone(), 1, digest.clone())),
            "old current {ns}/{name}:{tag} {digest} is now history item 1"
        );
    }
    run_ok(0, ["verify", "--archive", archive.to_str().unwrap()]);
}

#[test]
fn history_gone_from_the_stream_is_kept_as_its_oldest_and_a_removed_tag_too() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    run_ok(0, backup_args(&reg, &archive, &seeded.imagestreams));
    let before = archived_events(&archive);

    // The API server dropped every tag's history, and the first stream's
    // first tag is gone altogether.
    let mut list = seeded.list();
    let first = &mut list["items"][0];
    let removed_tag = first["status"]["tags"][0]["tag"]
        .as_str()
        .unwrap()
        .to_string();
    let (ns, name) = (
        first["metadata"]["namespace"].as_str().unwrap().to_string(),
        first["metadata"]["name"].as_str().unwrap().to_string(),
    );
    first["status"]["tags"].as_array_mut().unwrap().remove(0);
    for is in list["items"].as_array_mut().unwrap() {
        for t in is["status"]["tags"].as_array_mut().unwrap() {
            t["items"] = Value::Array(vec![t["items"][0].clone()]);
        }
    }
    let path = work.path().join("current-only.json");
    std::fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
    let report = run_ok(0, backup_args(&reg, &archive, &path)).json();
    assert_eq!(report["totals"]["images_new"], 0, "{report}");
    assert!(report["pruned"].as_array().is_none_or(Vec::is_empty));

    // Nothing is lost: history keeps its positions behind the current
    // image, and the removed tag's images are all history now (its current
    // image becomes item 1).
    let after = archived_events(&archive);
    let expected: HashSet<_> = before
        .into_iter()
        .map(|(n, s, t, p, d)| {
            let p = if (n.as_str(), s.as_str(), t.as_str()) == (&*ns, &*name, &*removed_tag) {
                p + 1
            } else {
                p
            };
            (n, s, t, p, d)
        })
        .collect();
    assert_eq!(after, expected);
    run_ok(0, ["verify", "--archive", archive.to_str().unwrap()]);
}

#[test]
fn dry_run_plans_without_writing() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    let mut args = backup_args(&reg, &archive, &seeded.imagestreams);
    args.push("--dry-run".into());
    let report = run_ok(0, &args).json();
    assert!(!archive.exists(), "a dry run creates nothing");
    assert_eq!(report["dry_run"], true);
    assert_eq!(
        report["totals"]["blobs_new"].as_u64().unwrap(),
        seeded.unique_blobs
    );
    assert!(report["totals"]["bytes_new"].as_u64().unwrap() >= seeded.unique_blob_bytes);
    assert_eq!(reg.count("GET", "/blobs/"), 0, "planning reads no blob");
}

/// A registry seeded with the small preset, a scratch directory, the
/// archive path in it, and the seeded list as `edit` leaves it, written
/// there.
fn seeded_with_list(
    edit: impl FnOnce(&mut Value),
) -> (
    Registry,
    common::SeedSummary,
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    let mut list = seeded.list();
    edit(&mut list);
    let path = work.path().join("list.json");
    std::fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
    (reg, seeded, work, archive, path)
}

#[test]
fn missing_image_fails_alone_and_everything_else_is_committed() {
    let ghost = format!("sha256:{}", "ab".repeat(32));
    let (reg, seeded, _work, archive, path) = seeded_with_list(|list| {
        list["items"][0]["status"]["tags"][0]["items"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"created":"2020-01-01T00:00:00Z","dockerImageReference":"x/y@".to_string() + &ghost,"image":ghost,"generation":1}));
    });
    let r = run(backup_args(&reg, &archive, &path));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();
    assert_eq!(report["totals"]["images_failed"], 1);
    assert_eq!(report["committed"], true);
    let text = report.to_string();
    assert!(
        text.contains(&ghost),
        "the failure names the digest: {text}"
    );
    assert_eq!(archived_events(&archive).len() as u64, seeded.items);
    run_ok(0, ["verify", "--archive", archive.to_str().unwrap()]);
}

#[test]
fn a_tag_name_no_registry_takes_fails_alone_and_the_archive_stays_readable() {
    // `oc tag ... app:1.2.0+build7` gives a status tag the registry would
    // refuse; the archive reads no such name back.
    let (reg, seeded, _work, archive, path) = seeded_with_list(|list| {
        let tags = list["items"][0]["status"]["tags"].as_array_mut().unwrap();
        let mut odd = tags[0].clone();
        odd["tag"] = "1.2.0+build7".into();
        tags.push(odd);
    });
    for run_no in 0..2 {
        let r = run(backup_args(&reg, &archive, &path));
        assert_eq!(r.code, 1, "run {run_no}: {}", r.stderr);
        let report = r.json();
        assert_eq!(report["committed"], true, "{report}");
        assert!(
            report.to_string().contains("1.2.0+build7"),
            "the failure names the tag: {report}"
        );
    }
    assert_eq!(archived_events(&archive).len() as u64, seeded.items);
    run_ok(0, ["verify", "--archive", archive.to_str().unwrap()]);
    run_ok(0, ["list", "--archive", archive.to_str().unwrap()]);
}

#[test]
fn a_report_file_that_cannot_be_written_goes_to_stdout_and_the_backup_stands() {
    let (reg, seeded, work, archive, list) = seeded_with_list(|_| {});
    let not_a_dir = work.path().join("file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let report_path = not_a_dir.join("last-backup.json");
    let mut args = backup_args(&reg, &archive, &list);
    args.extend(["--report".into(), report_path.display().to_string()]);
    let r = run(args);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();
    assert_eq!(report["committed"], true, "{report}");
    assert!(
        report["problems"].to_string().contains("last-backup.json"),
        "{report}"
    );
    assert_eq!(archived_events(&archive).len() as u64, seeded.items);
}

#[test]
fn bad_input_is_a_clear_configuration_error() {
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    let bad = work.path().join("bad.json");
    std::fs::write(
        &bad,
        br#"{"kind":"List","items":[{"kind":"ImageStream","metadata":{"name":"x"}}]}"#,
    )
    .unwrap();
    let r = run([
        "backup",
        "--archive",
        archive.to_str().unwrap(),
        "--imagestreams-from",
        bad.to_str().unwrap(),
        "--registry",
        "127.0.0.1:1",
        "--plain-http",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("bad.json") && r.stderr.contains("namespace"),
        "{}",
        r.stderr
    );
    let r = run([
        "backup",
        "--archive",
        archive.to_str().unwrap(),
        "--imagestreams-from",
        work.path().join("absent.json").to_str().unwrap(),
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("absent.json"), "{}", r.stderr);
    // A namespace that cannot exist is named before anything is read; the
    // report says nothing was committed.
    let r = run([
        "backup",
        "--archive",
        archive.to_str().unwrap(),
        "--imagestreams-from",
        bad.to_str().unwrap(),
        "--namespace",
        "Team A",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--namespace \"Team A\""), "{}", r.stderr);
    assert_eq!(r.json()["committed"], false, "{}", r.stdout);
    assert!(!archive.exists());
}

#[test]
fn tls_and_basic_auth_registry() {
    let reg = Registry::start_tls_auth("alice", "s3cret-pass");
    let seeded = seed(
        &reg,
        &["--preset", "small", "--namespaces", "1", "--repos", "1"],
    );
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    let r = run_ok(0, backup_args(&reg, &archive, &seeded.imagestreams));
    assert!(!r.stderr.contains("s3cret-pass") && !r.stdout.contains("s3cret-pass"));
    run_ok(0, ["verify", "--archive", archive.to_str().unwrap()]);

    // Without the CA, TLS verification fails: every image fails, named.
    let archive2 = work.path().join("archive2");
    let args: Vec<String> = backup_args(&reg, &archive2, &seeded.imagestreams)
        .into_iter()
        .collect();
    let pos = args.iter().position(|a| a == "--ca-file").unwrap();
    let mut no_ca = args.clone();
    no_ca.drain(pos..pos + 2);
    let r = run(&no_ca);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("certificate"), "{}", r.stderr);
    assert!(!archive2.join("index.json").exists());
    assert!(!r.stderr.contains("s3cret-pass") && !r.stdout.contains("s3cret-pass"));
    // Explicitly skipping verification works.
    no_ca.push("--insecure-skip-tls-verify".into());
    run_ok(0, &no_ca);
    // A wrong password is refused and never printed.
    let pw = work.path().join("wrong");
    std::fs::write(&pw, "wrong-password-123").unwrap();
    let mut wrong = backup_args(&reg, &work.path().join("archive3"), &seeded.imagestreams);
    let p = wrong.iter().position(|a| a == "--password-file").unwrap();
    wrong[p + 1] = pw.display().to_string();
    let r = run(&wrong);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.to_lowercase().contains("not authorized"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("wrong-password-123") && !r.stdout.contains("wrong-password-123"));

    // A restore refused on every tag is a configuration error too, with
    // its report.
    let mut flags = archiver_registry_flags(&reg);
    let p = flags.iter().position(|a| a == "--password-file").unwrap();
    flags[p + 1] = pw.display().to_string();
    let r = run(common::archiver_args("restore", &archive, flags, &[]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.json()["refused"], true, "{}", r.stdout);
    assert!(
        r.stderr.contains("refused every tag")
            && r.stderr.to_lowercase().contains("not authorized"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("wrong-password-123") && !r.stdout.contains("wrong-password-123"));
    // With the right password the same restore goes through.
    let r = run_ok(
        0,
        common::archiver_args("restore", &archive, archiver_registry_flags(&reg), &[]),
    );
    assert!(r.json().get("refused").is_none(), "{}", r.stdout);
}

#[test]
fn external_images_come_through_the_registry_or_are_skipped_on_request() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small", "--external-every", "2"]);
    assert!(seeded.raw["external_items"].as_u64().unwrap() > 0);
    let work = tempfile::tempdir().unwrap();
    // By default external history items are pulled through the registry.
    let all = work.path().join("all");
    run_ok(0, backup_args(&reg, &all, &seeded.imagestreams));
    assert_eq!(archived_events(&all).len() as u64, seeded.items);
    // --skip-external leaves them out and says so.
    let internal = work.path().join("internal");
    let mut args = backup_args(&reg, &internal, &seeded.imagestreams);
    args.push("--skip-external".into());
    let report = run_ok(0, &args).json();
    let skipped: u64 = report["imagestreams"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s["images_external_skipped"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(skipped, seeded.raw["external_items"].as_u64().unwrap());
    assert_eq!(
        archived_events(&internal).len() as u64,
        seeded.items - skipped
    );
    run_ok(0, ["verify", "--archive", internal.to_str().unwrap()]);
}
