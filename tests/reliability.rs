//! Faults: kills at any moment, a faulty registry, corruption, concurrent
//! runs, garbage collection. The archive must never lose what it committed.

mod common;

use common::proxy::{Fault, Proxy};
use common::{run, run_ok, seed, verify_ok, Registry};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn backup_args(registry: &str, archive: &Path, list: &Path, extra: &[&str]) -> Vec<String> {
    common::backup_args(common::plain_registry(registry), archive, list, extra)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn blob(archive: &Path, digest: &str) -> PathBuf {
    archive.join("blobs/sha256").join(&digest[7..])
}

/// Some layer digest of some archived image manifest.
fn some_layer(archive: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&read(&archive.join("index.json"))).unwrap();
    for m in index["manifests"].as_array().unwrap() {
        let body: serde_json::Value =
            serde_json::from_slice(&read(&blob(archive, m["digest"].as_str().unwrap()))).unwrap();
        if let Some(l) = body["layers"].as_array().and_then(|l| l.last()) {
            return l["digest"].as_str().unwrap().to_string();
        }
    }
    panic!("no image manifest with layers");
}

#[test]
fn sigkill_at_twenty_moments_never_breaks_the_archive() {
    let reg = Registry::start();
    // Big enough that a run lasts a while, small enough for CI.
    let seeded = seed(
        &reg,
        &[
            "--preset",
            "small",
            "--layer-size",
            "1500000",
            "--layers",
            "3",
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let reference = work.path().join("reference");
    let start = Instant::now();
    run_ok(
        0,
        backup_args(&reg.addr, &reference, &seeded.imagestreams, &["-j", "2"]),
    );
    let full = start.elapsed();
    let expected = read(&reference.join("index.json"));

    let mut committed_before_kill = 0;
    for i in 1..=20u32 {
        let archive = work.path().join(format!("killed-{i}"));
        let mut child = common::bin()
            .args(backup_args(
                &reg.addr,
                &archive,
                &seeded.imagestreams,
                &["-j", "2"],
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(f64::from(i) / 21.0));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            committed_before_kill += 1;
        }
        if archive.join("oci-layout").exists() {
            verify_ok(&archive);
            // No temp file is visible as a blob; leftovers are only in .ingest.
            for e in std::fs::read_dir(archive.join("blobs/sha256")).unwrap() {
                let name = e.unwrap().file_name().into_string().unwrap();
                assert_eq!(name.len(), 64, "only finished blobs under blobs/: {name}");
            }
        }
        run_ok(
            0,
            backup_args(&reg.addr, &archive, &seeded.imagestreams, &["-j", "2"]),
        );
        assert_eq!(
            read(&archive.join("index.json")),
            expected,
            "kill {i}: re-run converges"
        );
        assert_eq!(
            std::fs::read_dir(archive.join(".ingest")).unwrap().count(),
            0,
            "stale temp files swept"
        );
        verify_ok(&archive);
    }
    assert!(
        committed_before_kill < 20,
        "kills landed during the runs ({full:?})"
    );
}

#[test]
fn sigterm_stops_cleanly_with_its_own_exit_code() {
    let reg = Registry::start();
    let seeded = seed(
        &reg,
        &[
            "--preset",
            "small",
            "--layer-size",
            "3000000",
            "--layers",
            "3",
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("a");
    let proxy = Proxy::start(&reg.addr);
    // Slow the registry down with failures so the run is surely in flight.
    proxy.add_rule(Some("GET"), "/blobs/", Fault::Status(503), 6);
    let child = common::bin()
        .args(backup_args(
            &proxy.addr,
            &archive,
            &seeded.imagestreams,
            &[],
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    unsafe_sigterm(child.id());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGTERM"));
    // The report still comes out (a Job's deadline ends a run this way),
    // saying nothing was committed and why.
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report["committed"], false, "{report}");
    assert!(
        report["problems"][0].as_str().unwrap().contains("SIGTERM"),
        "{report}"
    );
    if archive.join("oci-layout").exists() {
        verify_ok(&archive);
    }
}

fn unsafe_sigterm(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn transient_faults_are_retried_and_never_stored_corrupt() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let work = tempfile::tempdir().unwrap();
    let reference = work.path().join("reference");
    run_ok(
        0,
        backup_args(&reg.addr, &reference, &seeded.imagestreams, &[]),
    );
    let expected = read(&reference.join("index.json"));

    let cases: Vec<(&str, Option<&str>, &str, Fault)> = vec![
        ("reset", Some("GET"), "/blobs/", Fault::Reset),
        ("5xx", Some("GET"), "/manifests/", Fault::Status(503)),
        ("429", Some("GET"), "/blobs/", Fault::TooMany(1)),
        ("truncated", Some("GET"), "/blobs/", Fault::Truncate),
        ("corrupted", Some("GET"), "/blobs/", Fault::Corrupt),
        (
            "corrupted manifest",
            Some("GET"),
            "/manifests/",
            Fault::Corrupt,
        ),
        ("401 midway", Some("GET"), "/blobs/", Fault::Status(401)),
    ];
    for (name, method, path, fault) in cases {
        let proxy = Proxy::start(&reg.addr);
        proxy.add_rule(method, path, fault, 2);
        let archive = work.path().join(name.replace(' ', "-"));
        let r = run(backup_args(
            &proxy.addr,
            &archive,
            &seeded.imagestreams,
            &[],
        ));
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        assert!(proxy.faults_injected() >= 1, "{name}: fault injected");
        assert_eq!(
            read(&archive.join("index.json")),
            expected,
            "{name}: same archive"
        );
        if !name.starts_with("401") {
            // (a 401 re-authenticates instead of counting as a retry)
            assert!(
                r.json()["requests"]["retries"].as_u64().unwrap() >= 1,
                "{name}: retried"
            );
        }
        verify_ok(&archive);
    }
}

#[test]
fn persistent_faults_fail_the_image_by_name_and_keep_the_rest() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let work = tempfile::tempdir().unwrap();
    let reference = work.path().join("reference");
    run_ok(
        0,
        backup_args(&reg.addr, &reference, &seeded.imagestreams, &[]),
    );
    let layer = some_layer(&reference);

    for (name, fault) in [("corrupt", Fault::Corrupt), ("5xx", Fault::Status(500))] {
        let proxy = Proxy::start(&reg.addr);
        proxy.add_rule(Some("GET"), &format!("/blobs/{layer}"), fault, usize::MAX);
        let archive = work.path().join(name);
        let r = run(backup_args(
            &proxy.addr,
            &archive,
            &seeded.imagestreams,
            &["--retries", "3"],
        ));
        assert_eq!(r.code, 1, "{name}: {}", r.stderr);
        let report = r.json();
        let failures: Vec<_> = report["imagestreams"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|s| s["failures"].as_array().cloned().unwrap_or_default())
            .collect();
        assert!(!failures.is_empty());
        for f in &failures {
            assert!(
                f["reason"].as_str().unwrap().contains(&layer),
                "{name}: names the blob: {f}"
            );
            assert!(f["digest"].is_string() && f["tag"].is_string());
        }
        assert!(!blob(&archive, &layer).exists(), "{name}: never stored");
        verify_ok(&archive);
        // The other images are committed.
        assert!(report["totals"]["images_new"].as_u64().unwrap() > 0);
    }
}

#[test]
fn a_manifest_that_never_hashes_to_its_digest_is_explained() {
    // What a schema 1 (signed) manifest looks like to a client: the served
    // bytes never hash to the digest the ImageStream records.
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let image = common::tag_events(&seeded.list())[0].4.clone();
    let proxy = Proxy::start(&reg.addr);
    proxy.add_rule(
        Some("GET"),
        &format!("/manifests/{image}"),
        Fault::Corrupt,
        usize::MAX,
    );
    let work = tempfile::tempdir().unwrap();
    let r = run(backup_args(
        &proxy.addr,
        &work.path().join("a"),
        &seeded.imagestreams,
        &["--retries", "1"],
    ));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json().to_string();
    assert!(
        report.contains(&image) && report.contains("schema 1"),
        "{report}"
    );
}

#[test]
fn failing_image_keeps_what_an_earlier_run_archived_and_repair_replaces_corrupt_blobs() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("a");
    run_ok(
        0,
        backup_args(&reg.addr, &archive, &seeded.imagestreams, &[]),
    );
    let committed = read(&archive.join("index.json"));

    // A registry that now fails everything changes nothing.
    let proxy = Proxy::start(&reg.addr);
    proxy.add_rule(None, "/v2/", Fault::Status(500), usize::MAX);
    let r = run(backup_args(
        &proxy.addr,
        &archive,
        &seeded.imagestreams,
        &["--retries", "1"],
    ));
    assert_eq!(
        r.code, 0,
        "an unchanged archive needs no request: {}",
        r.stderr
    );
    assert_eq!(read(&archive.join("index.json")), committed);

    // Flip bytes in a layer: verify names it; --repair fetches it again.
    let layer = some_layer(&archive);
    let path = blob(&archive, &layer);
    let mut bytes = read(&path);
    let i = bytes.len() / 3;
    bytes[i] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let v = run(["verify", "--archive", archive.to_str().unwrap()]);
    assert_eq!(v.code, 1);
    assert!(v.stdout.contains(&layer), "{}", v.stdout);
    let r = run_ok(
        0,
        backup_args(&reg.addr, &archive, &seeded.imagestreams, &["--repair"]),
    );
    assert!(r.json()["totals"]["blobs_new"].as_u64().unwrap() >= 1);
    verify_ok(&archive);
    assert_eq!(read(&archive.join("index.json")), committed);

    // A corrupt index.json is refused, not overwritten.
    std::fs::write(
        archive.join("index.json"),
        b"{\"schemaVersion\": 2, \"manifests\": [",
    )
    .unwrap();
    let r = run(backup_args(&reg.addr, &archive, &seeded.imagestreams, &[]));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("index.json") && r.stderr.contains("verify"),
        "{}",
        r.stderr
    );
    assert_eq!(
        read(&archive.join("index.json")),
        b"{\"schemaVersion\": 2, \"manifests\": ["
    );
}

#[test]
fn a_tag_whose_new_image_fails_keeps_naming_its_archived_image() {
    let f = common::backed_up(&["--preset", "small"]);
    let archive = &f.archive;
    // (history index, digest, ref name) of every entry of the tag.
    let tag_entries = |tag: &str| -> Vec<(String, String, String)> {
        let index: serde_json::Value =
            serde_json::from_slice(&read(&archive.join("index.json"))).unwrap();
        let mut out: Vec<(String, String, String)> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (&m["annotations"], m["digest"].as_str().unwrap()))
            .filter(|(a, _)| {
                a["io.imagestream-archiver.namespace"] == "team-a"
                    && a["io.imagestream-archiver.imagestream"] == "backend"
                    && a["io.imagestream-archiver.tag"] == tag
            })
            .map(|(a, digest)| {
                (
                    a["io.imagestream-archiver.history-index"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    digest.to_string(),
                    a["org.opencontainers.image.ref.name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        out.sort();
        out
    };
    // The stream moves its first tag on to an image the registry cannot
    // serve: the new current event fails, the old one becomes history.
    let mut list = f.list.clone();
    let is = list["items"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|is| is["metadata"]["namespace"] == "team-a" && is["metadata"]["name"] == "backend")
        .expect("team-a/backend");
    let tag = is["status"]["tags"][0]["tag"].as_str().unwrap().to_string();
    let before = tag_entries(&tag);
    assert_eq!(before[0].0, "0", "{before:?}");
    assert_eq!(before[0].2, format!("team-a/backend:{tag}"), "{before:?}");
    let items = is["status"]["tags"][0]["items"].as_array_mut().unwrap();
    let mut new = items[0].clone();
    let gone = format!("sha256:{}", "0".repeat(64));
    let reference = new["dockerImageReference"].as_str().unwrap();
    new["dockerImageReference"] =
        format!("{}@{gone}", &reference[..reference.rfind('@').unwrap()]).into();
    new["image"] = gone.clone().into();
    items.insert(0, new);
    let moved = f.work.path().join("moved.json");
    std::fs::write(&moved, serde_json::to_vec(&list).unwrap()).unwrap();

    let r = run(backup_args(
        &f.registry.addr,
        archive,
        &moved,
        &["--retries", "1"],
    ));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stdout.contains(&gone),
        "the failure is named: {}",
        r.stdout
    );
    let after = tag_entries(&tag);
    assert!(
        after.contains(&before[0]),
        "the tag still names its archived image: {before:?} -> {after:?}"
    );
    verify_ok(archive);
    // Restored, the tag is on that image again.
    let target = Registry::start();
    run_ok(
        0,
        common::archiver_args(
            "restore",
            archive,
            common::plain_registry(&target.addr),
            &[],
        ),
    );
    assert_eq!(
        common::head_digest(&target, "team-a/backend", &tag),
        Some(before[0].1.clone())
    );
}

#[test]
fn a_damaged_imagestream_list_is_reported_and_not_carried_over() {
    let f = common::backed_up(&["--preset", "small"]);
    let archive = &f.archive;
    let list_blob = || {
        let index: serde_json::Value =
            serde_json::from_slice(&read(&archive.join("index.json"))).unwrap();
        let d = index["annotations"]["io.imagestream-archiver.imagestreams"]
            .as_str()
            .expect("the list is named in index.json")
            .to_string();
        blob(archive, &d)
    };
    // Damaged on disk, still JSON: team-b's objects now say team-q.
    let path = list_blob();
    let text = String::from_utf8(read(&path)).unwrap();
    assert!(text.contains("\"team-b\""));
    std::fs::write(&path, text.replacen("\"team-b\"", "\"team-q\"", 1)).unwrap();

    // A run for team-a alone would carry team-b's objects over as archived.
    let r = run(backup_args(
        &f.registry.addr,
        archive,
        &f.imagestreams,
        &["--namespace", "team-a"],
    ));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let problems = r.json()["problems"].to_string();
    assert!(
        problems.contains("ImageStream list") && problems.contains("damaged"),
        "{problems}"
    );
    let now = String::from_utf8(read(&list_blob())).unwrap();
    assert!(!now.contains("team-q"), "nothing damaged is carried over");
    assert!(now.contains("\"team-a\""), "this run's objects are kept");

    // Gone altogether: the same, not a run that fails after downloading.
    std::fs::remove_file(list_blob()).unwrap();
    let r = run(backup_args(&f.registry.addr, archive, &f.imagestreams, &[]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();
    assert_eq!(report["committed"], true, "{report}");
    assert!(
        report["problems"].to_string().contains("missing"),
        "{report}"
    );
    assert!(String::from_utf8(read(&list_blob()))
        .unwrap()
        .contains("\"team-b\""));
}

#[test]
fn second_writer_fails_fast_naming_the_holder() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small", "--layer-size", "2000000"]);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("a");
    let proxy = Proxy::start(&reg.addr);
    // Keep the first run busy for a while.
    proxy.add_rule(Some("GET"), "/blobs/", Fault::Status(503), 3);
    let first = common::bin()
        .args(backup_args(
            &proxy.addr,
            &archive,
            &seeded.imagestreams,
            &["-j", "1"],
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !archive.join(".lock").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let second = run(backup_args(&reg.addr, &archive, &seeded.imagestreams, &[]));
    assert_eq!(second.code, 2, "{}", second.stderr);
    assert!(t.elapsed() < Duration::from_secs(5), "fails fast");
    assert!(
        second.stderr.contains(&format!("pid {}", first.id())),
        "{}",
        second.stderr
    );
    let gc = run(["gc", "--archive", archive.to_str().unwrap()]);
    assert_eq!(gc.code, 2, "gc while a backup runs: {}", gc.stderr);
    let out = first.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    verify_ok(&archive);
}

#[test]
fn gc_respects_grace_and_never_deletes_referenced_blobs() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("a");
    run_ok(
        0,
        backup_args(&reg.addr, &archive, &seeded.imagestreams, &[]),
    );
    let all_blobs = std::fs::read_dir(archive.join("blobs/sha256"))
        .unwrap()
        .count();

    // Drop the history of every tag from the list; --prune-history removes
    // it from the index, leaving its blobs unreferenced.
    let mut list = seeded.list();
    for is in list["items"].as_array_mut().unwrap() {
        for t in is["status"]["tags"].as_array_mut().unwrap() {
            let first = t["items"][0].clone();
            t["items"] = serde_json::json!([first]);
        }
    }
    let path = work.path().join("current-only.json");
    std::fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
    let r = run_ok(
        0,
        backup_args(&reg.addr, &archive, &path, &["--prune-history"]),
    );
    let pruned = r.json()["pruned"].as_array().unwrap().len();
    assert_eq!(pruned as u64, seeded.history_items, "{}", r.stdout);
    verify_ok(&archive);

    // Inside the grace period nothing goes.
    let g = run_ok(
        0,
        [
            "gc",
            "--archive",
            archive.to_str().unwrap(),
            "--grace",
            "1h",
        ],
    )
    .json();
    assert_eq!(g["deleted_blobs"].as_array().unwrap().len(), 0);
    assert!(g["kept_in_grace"].as_u64().unwrap() > 0);
    let g = run_ok(
        0,
        [
            "gc",
            "--archive",
            archive.to_str().unwrap(),
            "--grace",
            "0s",
            "--dry-run",
        ],
    )
    .json();
    let would = g["deleted_blobs"].as_array().unwrap().len();
    assert!(would > 0);
    assert_eq!(
        std::fs::read_dir(archive.join("blobs/sha256"))
            .unwrap()
            .count(),
        all_blobs + 1
    );

    // The grace period counts from when gc first saw a blob unreferenced,
    // not from its mtime: old files dropped by the last commit are kept.
    let old = std::time::SystemTime::now() - Duration::from_secs(48 * 3600);
    for e in std::fs::read_dir(archive.join("blobs/sha256")).unwrap() {
        let f = std::fs::File::options()
            .write(true)
            .open(e.unwrap().path())
            .unwrap();
        f.set_modified(old).unwrap();
    }
    let g = run_ok(0, ["gc", "--archive", archive.to_str().unwrap()]).json();
    assert_eq!(g["deleted_blobs"].as_array().unwrap().len(), 0, "{g}");
    // A day and more later (the recorded times moved back), they go.
    let state_path = archive.join(".gc-state.json");
    let mut state: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&read(&state_path)).unwrap();
    assert_eq!(state.len(), would, "every unreferenced blob is recorded");
    for v in state.values_mut() {
        *v = serde_json::json!(v.as_u64().unwrap() - 48 * 3600);
    }
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    let g = run_ok(0, ["gc", "--archive", archive.to_str().unwrap()]).json();
    assert_eq!(g["deleted_blobs"].as_array().unwrap().len(), would);
    assert!(g["bytes_freed"].as_u64().unwrap() > 0);
    verify_ok(&archive);
    // Everything still referenced is intact: a re-run fetches nothing.
    let mark = reg.mark();
    run_ok(0, backup_args(&reg.addr, &archive, &path, &[]));
    assert!(reg.content_reads_since(mark).is_empty());
}
