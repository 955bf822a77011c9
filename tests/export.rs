//! Export, import and `restore --from`, with the real binary, real
//! registries and skopeo.

mod common;

use common::{archiver_registry_flags, head_digest, run, run_ok, skopeo, tag_events, Registry};
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

fn backed_up() -> common::BackedUp {
    backed_up_with(&["--preset", "small", "--history", "3"])
}

fn backed_up_with(seed_args: &[&str]) -> common::BackedUp {
    common::backed_up(seed_args)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn export_to(archive: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "export".to_string(),
        "--archive".into(),
        s(archive),
        "-o".into(),
        s(out),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    run_ok(0, &args).json()
}

fn restore_from_args(from: &str, reg: &Registry) -> Vec<String> {
    let mut a = vec![
        "restore".to_string(),
        "--from".into(),
        from.into(),
        "--progress".into(),
        "none".into(),
    ];
    a.extend(archiver_registry_flags(reg));
    a
}

/// Every tag points at its archived current image, and every history image
/// is served by digest, with the very same digests.
fn assert_restored(list: &Value, reg: &Registry) {
    let events = tag_events(list);
    assert!(events.len() > 8, "workload too small: {}", events.len());
    for (ns, name, tag, pos, digest) in events {
        let repo = format!("{ns}/{name}");
        assert_eq!(
            head_digest(reg, &repo, &digest).as_deref(),
            Some(digest.as_str()),
            "{repo}@{digest} (position {pos}) missing"
        );
        if pos == 0 {
            assert_eq!(
                head_digest(reg, &repo, &tag).as_deref(),
                Some(digest.as_str()),
                "{repo}:{tag}"
            );
        }
    }
}

fn no_tag_pushed(list: &Value, reg: &Registry) {
    for (ns, name, tag, pos, _) in tag_events(list) {
        if pos == 0 {
            assert_eq!(
                head_digest(reg, &format!("{ns}/{name}"), &tag),
                None,
                "{ns}/{name}:{tag} was pushed"
            );
        }
    }
}

#[test]
fn export_import_verify_restore_round_trip() {
    let f = backed_up();
    let stream = f.work.path().join("all.tar.zst");
    let stats = export_to(&f.archive, &stream, &[]);
    assert_eq!(
        stats["stream_bytes"].as_u64(),
        Some(std::fs::metadata(&stream).unwrap().len())
    );
    assert!(stats["compressed_blobs"].as_u64().unwrap() > 0, "{stats}");

    let imported = f.work.path().join("imported");
    let istats = run_ok(0, ["import", "-i", &s(&stream), "--archive", &s(&imported)]).json();
    assert_eq!(istats["committed"], true);
    assert_eq!(istats["blobs_new"], stats["blobs"], "{istats}");
    // A whole export carries the index unchanged.
    assert_eq!(
        std::fs::read(imported.join("index.json")).unwrap(),
        std::fs::read(f.archive.join("index.json")).unwrap()
    );
    run_ok(0, ["verify", "--archive", &s(&imported)]);
    // Importing again into the same archive: nothing new, same index.
    let again = run_ok(0, ["import", "-i", &s(&stream), "--archive", &s(&imported)]).json();
    assert_eq!(again["blobs_new"], 0, "{again}");

    // Not into the archive itself (its own volume, its snapshots).
    let inside = f.archive.join("all.tar.zst");
    let r = common::run(["export", "--archive", &s(&f.archive), "-o", &s(&inside)]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("inside the archive"), "{}", r.stderr);
    assert!(std::fs::read_dir(&f.archive).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("tar.zst")));

    let b = Registry::start();
    let mut args = vec![
        "restore".to_string(),
        "--archive".into(),
        s(&imported),
        "--progress".into(),
        "none".into(),
    ];
    args.extend(archiver_registry_flags(&b));
    let report = run_ok(0, &args).json();
    assert_eq!(report["totals"]["images_failed"], 0, "{report}");
    assert_restored(&f.list, &b);
}

#[test]
fn namespace_export_merges_into_an_existing_archive() {
    let f = backed_up();
    let team_a = f.work.path().join("team-a.tar.zst");
    let stats = export_to(&f.archive, &team_a, &["--namespace", "team-a"]);
    let target = f.work.path().join("merged");
    run_ok(0, ["import", "-i", &s(&team_a), "--archive", &s(&target)]);
    let list = run_ok(0, ["list", "--archive", &s(&target), "-o", "json"]).stdout;
    assert!(
        list.contains("team-a") && !list.contains("team-b"),
        "{list}"
    );
    let entries_a = stats["entries"].as_u64().unwrap();
    let all = f.work.path().join("all.tar.zst");
    export_to(&f.archive, &all, &[]);
    let merged = run_ok(0, ["import", "-i", &s(&all), "--archive", &s(&target)]).json();
    assert!(
        merged["entries_total"].as_u64().unwrap() > entries_a,
        "{merged}"
    );
    assert!(merged["blobs_present"].as_u64().unwrap() > 0, "{merged}");
    run_ok(0, ["verify", "--archive", &s(&target)]);
    assert_eq!(
        std::fs::read(target.join("index.json")).unwrap(),
        std::fs::read(f.archive.join("index.json")).unwrap(),
        "merging the parts gives back the whole archive's index"
    );
}

#[test]
fn export_piped_into_restore_from_stdin() {
    let f = backed_up();
    let c = Registry::start();
    let pipe = |c: &Registry| {
        let mut export = common::bin()
            .args(["export", "--archive", &s(&f.archive), "-o", "-"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let restore = common::bin()
            .args(restore_from_args("-", c))
            .stdin(export.stdout.take().unwrap())
            .output()
            .unwrap();
        let mut err = String::new();
        export
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(export.wait().unwrap().success(), "export: {err}");
        // The stats went to stderr, the stream alone to stdout.
        assert!(err.contains("\"stream_bytes\""), "{err}");
        assert!(
            restore.status.success(),
            "restore --from -: {}",
            String::from_utf8_lossy(&restore.stderr)
        );
        serde_json::from_slice::<Value>(&restore.stdout).unwrap()
    };
    let report = pipe(&c);
    assert_eq!(report["totals"]["images_failed"], 0, "{report}");
    assert!(
        report["totals"]["bytes_new"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_restored(&f.list, &c);
    // Again: every tag is already there.
    let again = pipe(&c);
    assert_eq!(again["totals"]["images_new"], 0, "{again}");
    assert_eq!(again["totals"]["images_failed"], 0, "{again}");
}

#[test]
fn exports_are_deterministic_and_skopeo_reads_them() {
    // The small preset with its default history has OCI-typed current tags,
    // which skopeo's oci: transport lists.
    let f = backed_up_with(&["--preset", "small"]);
    let one = f.work.path().join("one.tar.zst");
    let two = f.work.path().join("two.tar.zst");
    export_to(&f.archive, &one, &[]);
    export_to(&f.archive, &two, &[]);
    let to_stdout = common::bin()
        .args(["export", "--archive", &s(&f.archive), "-o", "-"])
        .output()
        .unwrap();
    assert!(to_stdout.status.success());
    let a = std::fs::read(&one).unwrap();
    assert_eq!(a, std::fs::read(&two).unwrap(), "two exports differ");
    assert!(
        a == to_stdout.stdout,
        "the export to stdout differs from the file"
    );

    // Untar with /bin/tar, then read with skopeo's oci: transport.
    let dir = f.work.path().join("untarred");
    std::fs::create_dir_all(&dir).unwrap();
    let tar = std::fs::read(&one)
        .map(|z| zstd::stream::decode_all(z.as_slice()).unwrap())
        .unwrap();
    let mut child = Command::new("tar")
        .args(["-x", "-C", &s(&dir)])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &tar).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let current: Vec<&Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"].is_string())
        .collect();
    let oci_types = [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ];
    let mut checked = 0;
    for m in current
        .iter()
        .filter(|m| oci_types.iter().any(|t| m["mediaType"] == *t))
    {
        let name = m["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap();
        let reference = format!("oci:{}:{name}", s(&dir));
        let out = skopeo()
            .args(["inspect", "--raw", &reference])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            common::sha256(&out.stdout),
            m["digest"].as_str().unwrap(),
            "{reference}"
        );
        if m["mediaType"] == oci_types[0] {
            // The whole image, config included, is readable.
            let out = skopeo().args(["inspect", &reference]).output().unwrap();
            assert!(
                out.status.success(),
                "skopeo {reference}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let inspected: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(inspected["Digest"], m["digest"], "{inspected}");
        }
        checked += 1;
    }
    assert!(checked > 0, "no OCI-typed current tag in {index}");
}

#[test]
fn truncated_or_corrupt_streams_commit_nothing() {
    let f = backed_up();
    let full = f.work.path().join("all.tar.zst");
    export_to(&f.archive, &full, &[]);
    let data = std::fs::read(&full).unwrap();
    // An existing archive whose committed index must survive every failure.
    let target = f.work.path().join("target");
    let part = f.work.path().join("team-a.tar.zst");
    export_to(&f.archive, &part, &["--namespace", "team-a"]);
    run_ok(0, ["import", "-i", &s(&part), "--archive", &s(&target)]);
    let before = std::fs::read(target.join("index.json")).unwrap();
    let d = Registry::start();

    let mut broken: Vec<(String, Vec<u8>)> = [
        13,
        data.len() / 10,
        data.len() / 2,
        data.len() - 100,
        data.len() - 1,
    ]
    .into_iter()
    .map(|cut| (format!("cut at {cut}"), data[..cut].to_vec()))
    .collect();
    for at in [data.len() / 3, data.len() * 3 / 4] {
        let mut flipped = data.clone();
        flipped[at] ^= 0x20;
        broken.push((format!("byte {at} flipped"), flipped));
    }
    for (what, bytes) in broken {
        let path = f.work.path().join("broken.tar.zst");
        std::fs::write(&path, &bytes).unwrap();
        let r = run(["import", "-i", &s(&path), "--archive", &s(&target)]);
        assert_ne!(r.code, 0, "{what}: import succeeded");
        assert!(
            ["truncated or corrupt", "does not match", "incomplete"]
                .iter()
                .any(|m| r.stderr.contains(m)),
            "{what}: unclear error: {}",
            r.stderr
        );
        assert_eq!(
            std::fs::read(target.join("index.json")).unwrap(),
            before,
            "{what}: index changed"
        );

        let r = run(restore_from_args(&s(&path), &d));
        assert_ne!(r.code, 0, "{what}: restore --from succeeded");
        assert!(
            r.stderr.contains("no tag was pushed"),
            "{what}: {}",
            r.stderr
        );
        no_tag_pushed(&f.list, &d);
    }

    // A second index.json (another archive's) after the first: which one
    // counts is not the stream's to choose.
    let mut members = untar(&full);
    let other = untar(&part)
        .into_iter()
        .find(|(p, _)| p == "index.json")
        .unwrap();
    let at = members.iter().position(|(p, _)| p == "index.json").unwrap();
    members.insert(at + 1, other);
    let doubled = f.work.path().join("doubled.tar.zst");
    retar(&members, &doubled);
    let r = run(["import", "-i", &s(&doubled), "--archive", &s(&target)]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("index.json") && r.stderr.contains("twice"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(target.join("index.json")).unwrap(), before);
    let r = run(restore_from_args(&s(&doubled), &d));
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("twice"), "{}", r.stderr);
    no_tag_pushed(&f.list, &d);
    run_ok(0, ["verify", "--archive", &s(&target)]);
}

/// The members of an export stream, in stream order.
fn untar(stream: &Path) -> Vec<(String, Vec<u8>)> {
    let tar = zstd::stream::decode_all(std::fs::read(stream).unwrap().as_slice()).unwrap();
    let mut archive = tar::Archive::new(tar.as_slice());
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_dir() {
            continue;
        }
        let path = entry.path().unwrap().display().to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.push((path, data));
    }
    out
}

/// A `.tar.zst` stream of these members, in this order.
fn retar(members: &[(String, Vec<u8>)], out: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    let tar = b.into_inner().unwrap();
    std::fs::write(out, zstd::stream::encode_all(tar.as_slice(), 3).unwrap()).unwrap();
}

/// Digest -> what it references, for every manifest or index among the
/// members (as the blob list marks them).
fn manifest_refs(members: &[(String, Vec<u8>)]) -> Vec<(String, Vec<String>)> {
    let list = &members
        .iter()
        .find(|(p, _)| p == "imagestream-archiver/blobs.json")
        .unwrap()
        .1;
    let list: Value = serde_json::from_slice(list).unwrap();
    let manifests: Vec<String> = list["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["mediaType"].is_string())
        .map(|b| b["digest"].as_str().unwrap().to_string())
        .collect();
    assert!(!manifests.is_empty());
    manifests
        .into_iter()
        .map(|d| {
            let path = format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
            let data = &members.iter().find(|(p, _)| *p == path).unwrap().1;
            let m: Value = serde_json::from_slice(data).unwrap();
            let mut refs = Vec::new();
            for key in ["layers", "manifests"] {
                for r in m[key].as_array().into_iter().flatten() {
                    refs.push(r["digest"].as_str().unwrap().to_string());
                }
            }
            if let Some(c) = m["config"]["digest"].as_str() {
                refs.push(c.to_string());
            }
            (d, refs)
        })
        .collect()
}

fn is_manifest(path: &str, manifests: &[(String, Vec<String>)]) -> bool {
    manifests
        .iter()
        .any(|(d, _)| path.ends_with(d.trim_start_matches("sha256:")))
}

#[test]
fn import_of_a_stream_with_manifests_before_their_blobs() {
    let f = backed_up();
    let full = f.work.path().join("all.tar.zst");
    export_to(&f.archive, &full, &[]);
    let members = untar(&full);
    let manifests = manifest_refs(&members);
    // Metadata, then every manifest and index (indexes first, as export
    // writes them last), then every other blob.
    let (mut blobs, head): (Vec<_>, Vec<_>) = members
        .iter()
        .cloned()
        .partition(|(p, _)| p.starts_with("blobs/"));
    let (mut first, rest): (Vec<_>, Vec<_>) = blobs
        .drain(..)
        .partition(|(p, _)| is_manifest(p, &manifests));
    first.reverse();
    let reordered: Vec<_> = head.into_iter().chain(first).chain(rest).collect();
    assert_eq!(reordered.len(), members.len());
    let stream = f.work.path().join("reordered.tar.zst");
    retar(&reordered, &stream);

    let target = f.work.path().join("target");
    let stats = run_ok(0, ["import", "-i", &s(&stream), "--archive", &s(&target)]).json();
    assert_eq!(stats["committed"], true, "{stats}");
    run_ok(0, ["verify", "--archive", &s(&target)]);
    assert_eq!(
        std::fs::read(target.join("index.json")).unwrap(),
        std::fs::read(f.archive.join("index.json")).unwrap()
    );
}

#[test]
fn import_of_a_stream_missing_a_layer_writes_no_manifest_of_the_image() {
    let f = backed_up();
    let full = f.work.path().join("all.tar.zst");
    export_to(&f.archive, &full, &[]);
    let members = untar(&full);
    let manifests = manifest_refs(&members);
    // A layer of some image manifest.
    let (_, refs) = manifests
        .iter()
        .find(|(_, refs)| {
            refs.len() > 1 && !refs.iter().any(|r| manifests.iter().any(|(d, _)| d == r))
        })
        .unwrap();
    // refs lists layers first.
    let layer = refs[0].clone();
    // Every manifest whose closure needs the layer.
    let mut incomplete: Vec<String> = vec![layer.clone()];
    loop {
        let more: Vec<String> = manifests
            .iter()
            .filter(|(d, refs)| {
                !incomplete.contains(d) && refs.iter().any(|r| incomplete.contains(r))
            })
            .map(|(d, _)| d.clone())
            .collect();
        if more.is_empty() {
            break;
        }
        incomplete.extend(more);
    }
    assert!(incomplete.len() > 1);
    let layer_path = format!("blobs/sha256/{}", layer.trim_start_matches("sha256:"));
    // Manifests first, so that they would have arrived before their layers.
    let (mut first, rest): (Vec<_>, Vec<_>) = members
        .iter()
        .filter(|(p, _)| *p != layer_path)
        .cloned()
        .partition(|(p, _)| !p.starts_with("blobs/") || is_manifest(p, &manifests));
    first.extend(rest);
    let stream = f.work.path().join("missing-layer.tar.zst");
    retar(&first, &stream);

    let target = f.work.path().join("target");
    let r = run(["import", "-i", &s(&stream), "--archive", &s(&target)]);
    assert_ne!(r.code, 0, "import succeeded: {}", r.stdout);
    assert!(
        r.stderr.contains("was not written")
            && r.stderr.contains(layer.as_str())
            && incomplete[1..]
                .iter()
                .any(|d| r.stderr.contains(d.as_str())),
        "{}",
        r.stderr
    );
    assert!(!target.join("index.json").exists(), "index committed");
    for d in &incomplete {
        let path = target
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        assert!(!path.exists(), "{d} of the incomplete image was written");
    }
}

#[test]
fn a_corrupt_blob_is_not_exported() {
    let f = backed_up();
    // Flip a byte in the largest blob (a layer).
    let blobs = f.archive.join("blobs/sha256");
    let victim = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();
    let out = f.work.path().join("corrupt.tar.zst");
    let r = run(["export", "--archive", &s(&f.archive), "-o", &s(&out)]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        r.stderr.contains(name) && r.stderr.contains("--repair"),
        "{}",
        r.stderr
    );
    assert!(!out.exists(), "no stream left behind");
}

#[test]
fn a_damaged_imagestream_list_is_neither_exported_filtered_nor_merged_over() {
    let f = backed_up();
    let team_a = f.work.path().join("team-a.tar.zst");
    export_to(&f.archive, &team_a, &["--namespace", "team-a"]);
    // The archived list, still valid JSON but no longer what its name says.
    let index = std::fs::read(f.archive.join("index.json")).unwrap();
    let list_digest = imagestream_archiver::index::ArchiveIndex::from_json(&index)
        .unwrap()
        .imagestreams
        .expect("the archive holds an ImageStream list")
        .to_string();
    let path = f
        .archive
        .join("blobs/sha256")
        .join(list_digest.strip_prefix("sha256:").unwrap());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("team-b"), "{text}");
    std::fs::write(&path, text.replace("team-b", "team-x")).unwrap();

    // A filtered export re-serializes the list: it must not hide the damage
    // behind a fresh digest.
    let out = f.work.path().join("filtered.tar.zst");
    let r = run([
        "export",
        "--archive",
        &s(&f.archive),
        "-o",
        &s(&out),
        "--namespace",
        "team-a",
    ]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains(&list_digest[7..]), "{}", r.stderr);
    assert!(!out.exists());

    // An import that would merge ImageStream lists stops, committing nothing.
    let before = std::fs::read(f.archive.join("index.json")).unwrap();
    let r = run(["import", "-i", &s(&team_a), "--archive", &s(&f.archive)]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("archived ImageStream list")
            && r.stderr.contains("nothing was committed"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(f.archive.join("index.json")).unwrap(), before);
}
