//! Export, import and `restore --from`, with the real binary, real
//! registries and skopeo.

mod common;

use common::{
    archiver_registry_flags, head_digest, run, run_ok, seed, skopeo, tag_events, Registry,
};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Fixture {
    _a: Registry,
    list: Value,
    archive: PathBuf,
    work: tempfile::TempDir,
}

fn backed_up() -> Fixture {
    backed_up_with(&["--preset", "small", "--history", "3"])
}

fn backed_up_with(seed_args: &[&str]) -> Fixture {
    let a = Registry::start();
    let seeded = seed(&a, seed_args);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    let mut args = vec![
        "backup".to_string(),
        "--archive".into(),
        archive.display().to_string(),
        "--imagestreams-from".into(),
        seeded.imagestreams.display().to_string(),
        "--progress".into(),
        "none".into(),
    ];
    args.extend(archiver_registry_flags(&a));
    run_ok(0, &args);
    Fixture {
        list: seeded.list(),
        _a: a,
        archive,
        work,
    }
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
    run_ok(0, ["verify", "--archive", &s(&target)]);
}
