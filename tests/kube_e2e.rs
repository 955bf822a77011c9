//! The real binary against a fake Kubernetes API (through `KUBECONFIG`) and
//! a real registry: discovery through the API, PVC growth of a real tmpfs
//! (as root), and `restore --apply-imagestreams`.
//!
//! The fake API runs on its own tokio runtime while the binary runs as a
//! child process.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::fake_kube::{self, FakeKube, FakeKubeBuilder, Recorded};
use common::volume::{self, require_root, Tmpfs};
use common::{archiver_registry_flags, seed, tag_events, verify_ok, Registry, Run};
use imagestream_archiver::capacity::{fs_space, GIB};
use serde_json::{json, Value};

/// A fake API server serving from a background runtime, and a kubeconfig
/// pointing at it.
struct Api {
    fake: FakeKube,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    // Dropped after `fake`, whose server task it runs.
    _rt: tokio::runtime::Runtime,
}

impl Api {
    fn start(builder: FakeKubeBuilder) -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime for the fake API");
        let fake = rt.block_on(builder.start());
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = fake.write_kubeconfig(dir.path());
        Api {
            fake,
            kubeconfig,
            _dir: dir,
            _rt: rt,
        }
    }

    /// Runs the archiver with `KUBECONFIG` pointing at this fake.
    fn run<S: AsRef<str>>(&self, args: &[S]) -> Run {
        let out = common::bin()
            .args(args.iter().map(AsRef::as_ref))
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .output()
            .expect("running imagestream-archiver");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// [`Api::run`], panicking unless the exit code is `code`.
    fn run_code<S: AsRef<str>>(&self, code: i32, args: &[S]) -> Run {
        let r = self.run(args);
        assert_eq!(
            r.code,
            code,
            "exit code of {:?}\nstdout:\n{}\nstderr:\n{}",
            args.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
            r.stdout,
            r.stderr
        );
        r
    }

    /// The list requests for ImageStreams, cluster-wide or in namespaces.
    fn list_requests(&self) -> Vec<Recorded> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/imagestreams"))
            .collect()
    }
}

fn backup_args(archive: &Path, reg: &Registry, extra: &[&str]) -> Vec<String> {
    common::archiver_args("backup", archive, archiver_registry_flags(reg), extra)
}

fn blob_present(archive: &Path, digest: &str) -> bool {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    archive.join("blobs/sha256").join(hex).is_file()
}

/// Number of blob files in the archive (0 when it has no blob directory).
fn blob_count(archive: &Path) -> usize {
    std::fs::read_dir(archive.join("blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Blob downloads the registry served after `mark`.
fn blob_gets_since(reg: &Registry, mark: usize) -> usize {
    reg.count_since(mark, "GET", "/blobs/")
}

fn seeded_items(seeded: &common::SeedSummary) -> Vec<Value> {
    seeded.list()["items"]
        .as_array()
        .expect("seeded list has items")
        .clone()
}

// ---------------------------------------------------------------- discovery

#[test]
fn namespaces_through_the_api_one_forbidden_is_reported_the_others_archived() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let list = seeded.list();
    let api = Api::start(
        FakeKube::builder()
            .streams(seeded_items(&seeded))
            .forbid_namespace("forbidden-ns"),
    );
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    let r = api.run_code(
        1,
        &backup_args(
            &archive,
            &reg,
            &["--namespace", "team-a", "--namespace", "forbidden-ns"],
        ),
    );
    let report = r.json();
    let problems: Vec<&str> = report["problems"]
        .as_array()
        .expect("problems in the report")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(problems.len(), 1, "{report}");
    assert!(
        problems[0].contains("forbidden-ns") && problems[0].contains("403"),
        "{problems:?}"
    );
    assert_eq!(report["totals"]["images_failed"], 0, "{report}");
    let streams: Vec<&String> = report["imagestreams"].as_object().unwrap().keys().collect();
    assert_eq!(streams, ["team-a/backend", "team-a/frontend"], "{report}");

    let events = tag_events(&list);
    let (team_a, others): (Vec<_>, Vec<_>) = events.iter().partition(|e| e.0 == "team-a");
    assert!(!team_a.is_empty() && !others.is_empty());
    for e in &team_a {
        assert!(blob_present(&archive, &e.4), "team-a image {e:?} archived");
    }
    for e in &others {
        assert!(
            !blob_present(&archive, &e.4),
            "{e:?} is not in a requested namespace"
        );
    }
    verify_ok(&archive);

    // Namespace-scoped lists only, with the bearer token of the kubeconfig.
    let lists = api.list_requests();
    let paths: Vec<&str> = lists.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/apis/image.openshift.io/v1/namespaces/forbidden-ns/imagestreams",
            "/apis/image.openshift.io/v1/namespaces/team-a/imagestreams",
        ],
        "one list per namespace, no cluster-wide list, 403 not retried"
    );
    assert!(lists.iter().all(|r| r.bearer));
}

#[test]
fn cluster_wide_discovery_pages_with_continue_and_passes_the_selector() {
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let list = seeded.list();
    let items = seeded_items(&seeded);
    assert_eq!(items.len(), 4);
    // The server returns one item per page, whatever limit the client asks.
    let api = Api::start(FakeKube::builder().streams(items).max_page_size(1));
    let work = tempfile::tempdir().unwrap();

    let all = work.path().join("all");
    let report = api.run_code(0, &backup_args(&all, &reg, &[])).json();
    assert_eq!(report["totals"]["imagestreams"], 4, "{report}");
    assert_eq!(report["totals"]["images_failed"], 0, "{report}");
    for e in tag_events(&list) {
        assert!(blob_present(&all, &e.4), "{e:?} archived");
    }
    verify_ok(&all);
    let lists = api.list_requests();
    assert_eq!(lists.len(), 4, "four pages: {lists:#?}");
    for (i, r) in lists.iter().enumerate() {
        assert_eq!(r.path, "/apis/image.openshift.io/v1/imagestreams");
        assert_eq!(r.query.get("limit").map(String::as_str), Some("500"));
        assert_eq!(
            r.query.contains_key("continue"),
            i > 0,
            "page {i} follows metadata.continue: {r:?}"
        );
        assert!(!r.query.contains_key("labelSelector"));
    }

    // --selector goes to the API server as labelSelector.
    let before = api.list_requests().len();
    let selected = work.path().join("selected");
    let report = api
        .run_code(
            0,
            &backup_args(&selected, &reg, &["--selector", "app=frontend"]),
        )
        .json();
    let streams: Vec<&String> = report["imagestreams"].as_object().unwrap().keys().collect();
    assert_eq!(streams, ["team-a/frontend", "team-b/frontend"], "{report}");
    let lists = api.list_requests().split_off(before);
    assert!(!lists.is_empty());
    for r in &lists {
        assert_eq!(
            r.query.get("labelSelector").map(String::as_str),
            Some("app=frontend"),
            "{r:?}"
        );
    }
    for e in tag_events(&list) {
        assert_eq!(
            blob_present(&selected, &e.4),
            e.1 == "frontend",
            "only frontend streams: {e:?}"
        );
    }
    verify_ok(&selected);
}

#[test]
fn cluster_wide_403_exits_2_and_points_at_namespace() {
    let api = Api::start(FakeKube::builder().forbid_cluster_list());
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    let r = api.run_code(
        2,
        &[
            "backup",
            "--archive",
            &archive.display().to_string(),
            "--registry",
            "127.0.0.1:9",
            "--plain-http",
            "--progress",
            "none",
        ],
    );
    assert!(r.stderr.contains("--namespace"), "{}", r.stderr);
    assert!(r.stderr.contains("forbidden"), "{}", r.stderr);
    assert!(
        !r.stderr.contains(fake_kube::FAKE_TOKEN),
        "the token never appears"
    );
    assert!(
        !archive.join("index.json").exists(),
        "nothing written on a configuration error"
    );
    assert_eq!(api.list_requests().len(), 1, "403 is not retried");
}

// ------------------------------------------------------------- PVC growth

/// The volume: 2.5 MiB. The small workload is ~3.3 MB of blobs (it cannot
/// fit), one namespace of it ~1.8 MB (it fits).
const VOLUME: &str = "2560k";
const VOLUME_BYTES: u64 = 2560 * 1024;
const PVC_NS: &str = "isa";
const PVC: &str = "archive";

fn pvc_args(archive: &Path, reg: &Registry, extra: &[&str]) -> Vec<String> {
    let mut a = backup_args(
        archive,
        reg,
        &[
            "--pvc",
            PVC,
            "--pvc-namespace",
            PVC_NS,
            "--resize-timeout",
            "60",
        ],
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn pvc_is_grown_before_the_download_and_the_backup_fits() {
    require_root();
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    assert!(
        seeded.unique_blob_bytes > VOLUME_BYTES,
        "the workload ({} bytes) must not fit on the unexpanded volume",
        seeded.unique_blob_bytes
    );
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("volume");
    let _tmpfs = Tmpfs::mount(&mnt, VOLUME);
    let archive = mnt.join("archive");

    let mount_point = mnt.clone();
    let api = Api::start(
        FakeKube::builder()
            .streams(seeded_items(&seeded))
            .pvc(PVC_NS, PVC, "gp3-csi", "2560Ki")
            .storage_class("gp3-csi", Some(true))
            .on_patch(volume::kubelet_resize(
                mount_point,
                Duration::from_millis(700),
            )),
    );
    let report = api.run_code(0, &pvc_args(&archive, &reg, &[])).json();
    assert_eq!(report["totals"]["images_failed"], 0, "{report}");
    assert_eq!(
        report["totals"]["bytes_new"].as_u64(),
        Some(seeded.unique_blob_bytes)
    );
    for e in tag_events(&seeded.list()) {
        assert!(blob_present(&archive, &e.4), "{e:?} archived");
    }
    verify_ok(&archive);

    let patches: Vec<Recorded> = api
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 1, "{patches:#?}");
    assert_eq!(
        patches[0].path,
        "/api/v1/namespaces/isa/persistentvolumeclaims/archive"
    );
    assert_eq!(
        patches[0].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        patches[0].body, r#"{"spec":{"resources":{"requests":{"storage":"1Gi"}}}}"#,
        "(used + to fetch) * 1.2, rounded up to whole GiB"
    );
    assert_eq!(fs_space(&archive).unwrap().total, GIB, "the tmpfs grew");
    assert!(
        blob_size_sum(&archive) > VOLUME_BYTES,
        "the archive is larger than the volume was"
    );
}

fn blob_size_sum(archive: &Path) -> u64 {
    std::fs::read_dir(archive.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn without_pvc_a_full_volume_fails_clearly_and_keeps_the_committed_index() {
    require_root();
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("volume");
    let _tmpfs = Tmpfs::mount(&mnt, VOLUME);
    let archive = mnt.join("archive");
    let from = seeded.imagestreams.display().to_string();

    // One namespace fits and is committed.
    let first = common::run(backup_args(
        &archive,
        &reg,
        &["--imagestreams-from", &from, "--namespace", "team-a"],
    ));
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    let committed = std::fs::read(archive.join("index.json")).unwrap();
    let blobs_before = blob_count(&archive);

    // Everything does not.
    let full = common::run(backup_args(&archive, &reg, &["--imagestreams-from", &from]));
    assert_ne!(full.code, 0, "{}\n{}", full.stdout, full.stderr);
    assert!(
        full.stderr.contains("No space left on device"),
        "a clear ENOSPC error: {}",
        full.stderr
    );
    assert!(
        full.stderr.contains(&archive.display().to_string()),
        "names the archive: {}",
        full.stderr
    );
    assert!(
        full.stderr.contains("nothing of this run was committed") && full.stderr.contains("--pvc"),
        "says what state the archive is in and what to do: {}",
        full.stderr
    );
    assert_eq!(
        std::fs::read(archive.join("index.json")).unwrap(),
        committed,
        "index.json untouched"
    );
    // No partial blob is visible: every blob file is complete and verified.
    for entry in std::fs::read_dir(archive.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let data = std::fs::read(entry.path()).unwrap();
        assert_eq!(
            common::sha256(&data),
            format!("sha256:{name}"),
            "blob file {name} is complete"
        );
    }
    assert!(blob_count(&archive) >= blobs_before);
    verify_ok(&archive);
}

#[test]
fn max_size_and_unexpandable_storage_class_refuse_before_any_download() {
    require_root();
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("volume");
    let _tmpfs = Tmpfs::mount(&mnt, VOLUME);
    let archive = mnt.join("archive");
    let api = Api::start(
        FakeKube::builder()
            .streams(seeded_items(&seeded))
            .pvc(PVC_NS, PVC, "gp3-csi", "2560Ki")
            .storage_class("gp3-csi", Some(true))
            .pvc(PVC_NS, "on-thin", "thin", "2560Ki")
            .storage_class("thin", None),
    );

    // --max-size below what the plan needs.
    let mark = reg.mark();
    let r = api.run_code(2, &pvc_args(&archive, &reg, &["--max-size", "100Mi"]));
    assert!(
        r.stderr.contains("would need 1Gi") && r.stderr.contains("--max-size"),
        "says how much is needed: {}",
        r.stderr
    );
    assert!(r.stderr.contains("isa/archive"), "{}", r.stderr);
    // The report still comes out, saying nothing was committed and why.
    let report = r.json();
    assert_eq!(report["committed"], false, "{report}");
    assert!(
        report["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("--max-size")),
        "{report}"
    );
    assert!(
        reg.count_since(mark, "GET", "/manifests/") > 0,
        "the plan was made"
    );
    assert_eq!(blob_gets_since(&reg, mark), 0, "no blob downloaded");
    assert_eq!(blob_count(&archive), 0);
    assert!(api.fake.patch_bodies().is_empty());

    // A StorageClass without allowVolumeExpansion.
    let mark = reg.mark();
    let mut args = backup_args(
        &archive,
        &reg,
        &["--pvc", "on-thin", "--pvc-namespace", PVC_NS],
    );
    args.push("--resize-timeout".into());
    args.push("5".into());
    let r = api.run_code(2, &args);
    assert!(
        r.stderr.contains("StorageClass thin") && r.stderr.contains("allowVolumeExpansion"),
        "{}",
        r.stderr
    );
    assert_eq!(blob_gets_since(&reg, mark), 0, "no blob downloaded");
    assert_eq!(blob_count(&archive), 0);
    assert!(api.fake.patch_bodies().is_empty(), "no PATCH");
    assert!(!archive.join("index.json").exists());
    assert!(fs_space(&archive).unwrap().total <= VOLUME_BYTES);
}

#[test]
fn a_volume_that_cannot_grow_still_takes_a_run_that_fits_and_says_so() {
    // The headroom asks for growth, --max-size forbids it, and tonight's
    // downloads fit anyway: the backup is made, and the run exits 1 so
    // that someone makes room before the volume fills.
    require_root();
    let reg = Registry::start();
    let seeded = seed(&reg, &["--preset", "small"]);
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("volume");
    let _tmpfs = Tmpfs::mount(&mnt, "8m");
    let archive = mnt.join("archive");
    let api = Api::start(
        FakeKube::builder()
            .streams(seeded_items(&seeded))
            .pvc(PVC_NS, PVC, "gp3-csi", "8Mi")
            .storage_class("gp3-csi", Some(true)),
    );
    let r = api.run_code(
        1,
        &pvc_args(&archive, &reg, &["--headroom", "80", "--max-size", "8Mi"]),
    );
    let report = r.json();
    assert_eq!(report["committed"], true, "{report}");
    assert_eq!(report["totals"]["images_failed"], 0, "{report}");
    let problems = report["problems"].to_string();
    assert!(
        problems.contains("--max-size") && problems.contains("went on"),
        "{problems}"
    );
    assert!(
        api.fake.patch_bodies().is_empty(),
        "no PATCH over --max-size"
    );
    verify_ok(&archive);
    // Layers, configs, manifests and the ImageStream list.
    assert_eq!(
        blob_count(&archive) as u64,
        seeded.unique_blobs + seeded.manifests + 1
    );
}

// ------------------------------------------------------ --apply-imagestreams

/// Spec of `team-a/frontend` in the archive: what a push cannot recreate.
fn rich_spec() -> Value {
    json!({
        "lookupPolicy": {"local": true},
        "tags": [
            {
                "name": "upstream",
                "annotations": null,
                "from": {"kind": "DockerImage", "name": "quay.io/example/frontend:2.4"},
                "generation": 5,
                "importPolicy": {"scheduled": true, "importMode": "PreserveOriginal"},
                "referencePolicy": {"type": "Local"}
            },
            {
                "name": "stable",
                "from": {"kind": "ImageStreamTag", "name": "frontend:latest", "namespace": "team-a"},
                "generation": 3,
                "importPolicy": {},
                "referencePolicy": {"type": "Source"}
            },
            {
                "name": "base",
                "from": {"kind": "ImageStreamTag", "name": "ubi:9", "namespace": "openshift"},
                "referencePolicy": {"type": "Source"}
            }
        ]
    })
}

/// [`rich_spec`] as it must reach team-z: no generations or nulls, the
/// team-a reference mapped, the `openshift` one not.
fn rich_spec_applied() -> Value {
    json!({
        "lookupPolicy": {"local": true},
        "tags": [
            {
                "name": "upstream",
                "from": {"kind": "DockerImage", "name": "quay.io/example/frontend:2.4"},
                "importPolicy": {"scheduled": true, "importMode": "PreserveOriginal"},
                "referencePolicy": {"type": "Local"}
            },
            {
                "name": "stable",
                "from": {"kind": "ImageStreamTag", "name": "frontend:latest", "namespace": "team-z"},
                "importPolicy": {},
                "referencePolicy": {"type": "Source"}
            },
            {
                "name": "base",
                "from": {"kind": "ImageStreamTag", "name": "ubi:9", "namespace": "openshift"},
                "referencePolicy": {"type": "Source"}
            }
        ]
    })
}

fn restore_args(archive: &Path, reg: &Registry, extra: &[&str]) -> Vec<String> {
    common::archiver_args("restore", archive, archiver_registry_flags(reg), extra)
}

fn write_paths(writes: &[Recorded]) -> Vec<String> {
    writes
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[test]
fn restore_applies_archived_specs_into_mapped_namespaces_never_status() {
    let a = Registry::start();
    let seeded = seed(&a, &["--preset", "small"]);
    let mut list = seeded.list();
    let mut backend_spec = Value::Null;
    let mut backend_labels = Value::Null;
    for is in list["items"].as_array_mut().unwrap() {
        match (
            is["metadata"]["namespace"].as_str(),
            is["metadata"]["name"].as_str(),
        ) {
            (Some("team-a"), Some("frontend")) => {
                is["spec"] = rich_spec();
                is["metadata"]["annotations"] = json!({
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"kind\":\"ImageStream\"}",
                    "openshift.io/display-name": "Frontend"
                });
            }
            (Some("team-a"), Some("backend")) => {
                backend_spec = is["spec"].clone();
                is["metadata"]["annotations"] = json!({"openshift.io/display-name": "Backend"});
                is["metadata"]["labels"] = json!({"app": "backend", "tier": "api"});
                backend_labels = is["metadata"]["labels"].clone();
            }
            _ => {}
        }
    }
    assert!(
        backend_spec["tags"][0]["from"]["kind"] == "DockerImage",
        "the seeded team-a/backend tracks an external image: {backend_spec}"
    );
    let work = tempfile::tempdir().unwrap();
    let list_file = work.path().join("imagestreams.json");
    std::fs::write(&list_file, serde_json::to_vec(&list).unwrap()).unwrap();
    let archive = work.path().join("archive");
    common::run_ok(
        0,
        backup_args(
            &archive,
            &a,
            &["--imagestreams-from", &list_file.display().to_string()],
        ),
    );

    let b = Registry::start();
    // team-z/backend exists already (with another spec): it is patched;
    // team-z/frontend does not: it is created.
    let mut existing = fake_kube::imagestream("team-z", "backend")
        .label("owner", "team-z")
        .build();
    // A tag only the target has (added after the backup): a restore only
    // adds, so it stays.
    let own_tag = json!({"name": "nightly", "generation": 1,
        "from": {"kind": "DockerImage", "name": "quay.io/team-z/backend:nightly"},
        "importPolicy": {"scheduled": true}});
    existing["spec"]["tags"] = json!([own_tag.clone()]);
    let api = Api::start(FakeKube::builder().streams([existing.clone()]));
    let flags = [
        "--apply-imagestreams",
        "--namespace",
        "team-a",
        "--map-namespace",
        "team-a=team-z",
    ];
    let report = api.run_code(0, &restore_args(&archive, &b, &flags)).json();
    assert_eq!(report["totals"]["images_failed"], 0, "{report}");
    assert_eq!(
        report["applied"],
        json!([
            {"imagestream": "team-z/backend", "from": "team-a/backend", "action": "patched"},
            {"imagestream": "team-z/frontend", "from": "team-a/frontend", "action": "created"}
        ]),
        "{report}"
    );

    let writes = api.fake.imagestream_writes();
    assert_eq!(
        write_paths(&writes),
        [
            "PATCH /apis/image.openshift.io/v1/namespaces/team-z/imagestreams/backend",
            "POST /apis/image.openshift.io/v1/namespaces/team-z/imagestreams",
        ]
    );
    for w in &writes {
        let body: Value = serde_json::from_str(&w.body).unwrap();
        assert!(body.get("status").is_none(), "never a status: {}", w.body);
        assert!(!w.body.contains("\"status\""), "{}", w.body);
        for t in body["spec"]["tags"].as_array().into_iter().flatten() {
            assert_ne!(
                t["from"]["namespace"], "team-a",
                "no ImageStreamTag reference into team-a is left: {}",
                w.body
            );
        }
    }
    let patch: Value = serde_json::from_str(&writes[0].body).unwrap();
    assert_eq!(
        writes[0].content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    let mut backend_applied = backend_spec.clone();
    for t in backend_applied["tags"].as_array_mut().unwrap() {
        let t = t.as_object_mut().unwrap();
        t.remove("generation");
        t.remove("annotations");
    }
    // On OpenShift the push creates the stream: the archived labels and
    // annotations go out with the spec.
    assert_eq!(
        patch,
        json!({
            "metadata": {
                "labels": backend_labels,
                "annotations": {"openshift.io/display-name": "Backend"}
            },
            "spec": backend_applied
        })
    );

    let post: Value = serde_json::from_str(&writes[1].body).unwrap();
    assert_eq!(writes[1].content_type.as_deref(), Some("application/json"));
    assert_eq!(post["apiVersion"], "image.openshift.io/v1");
    assert_eq!(post["kind"], "ImageStream");
    assert_eq!(
        post["metadata"],
        json!({
            "name": "frontend",
            "namespace": "team-z",
            "labels": {"app": "frontend", "app.kubernetes.io/part-of": "team-a"},
            "annotations": {"openshift.io/display-name": "Frontend"}
        })
    );
    assert_eq!(post["spec"], rich_spec_applied());

    // Nothing but team-z was read or written.
    for r in api.fake.requests() {
        assert!(r.path.contains("/namespaces/team-z/"), "{r:?}");
    }
    let created = api.fake.imagestream("team-z", "frontend").unwrap();
    assert_eq!(created["spec"]["lookupPolicy"]["local"], true);
    let patched = api.fake.imagestream("team-z", "backend").unwrap();
    let patched_tags = patched["spec"]["tags"].as_array().unwrap();
    assert_eq!(
        patched_tags[0], own_tag,
        "the target's own tag stays: {patched}"
    );
    assert_eq!(
        patched_tags[1]["from"], backend_spec["tags"][0]["from"],
        "{patched}"
    );
    assert_eq!(
        patched_tags.len(),
        1 + backend_spec["tags"].as_array().unwrap().len()
    );
    assert_eq!(
        patched["status"], existing["status"],
        "the existing status is left alone"
    );
    assert_eq!(
        patched["metadata"]["labels"]["owner"], "team-z",
        "labels of its own stay: {patched}"
    );
    for (k, v) in backend_labels.as_object().unwrap() {
        assert_eq!(&patched["metadata"]["labels"][k], v, "{patched}");
    }
    assert_eq!(
        patched["metadata"]["annotations"]["openshift.io/display-name"],
        "Backend"
    );

    // A second run changes nothing.
    let n = api.fake.requests().len();
    let report = api.run_code(0, &restore_args(&archive, &b, &flags)).json();
    let actions: Vec<&Value> = report["applied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["action"])
        .collect();
    assert_eq!(actions, ["unchanged", "unchanged"], "{report}");
    assert_eq!(api.fake.imagestream_writes().len(), 2, "no new write");
    // Per stream, one GET for its tag history before the push, one before
    // the apply.
    assert_eq!(api.fake.requests().len(), n + 4, "GETs only");
}

#[test]
fn apply_dry_run_writes_nothing_and_refusals_are_reported() {
    let a = Registry::start();
    let seeded = seed(&a, &["--preset", "small"]);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("archive");
    common::run_ok(
        0,
        backup_args(
            &archive,
            &a,
            &[
                "--imagestreams-from",
                &seeded.imagestreams.display().to_string(),
            ],
        ),
    );
    let b = Registry::start();

    // Dry run: reads only, reports what it would do.
    let api = Api::start(FakeKube::builder());
    let report = api
        .run_code(
            0,
            &restore_args(
                &archive,
                &b,
                &[
                    "--apply-imagestreams",
                    "--dry-run",
                    "--imagestream",
                    "team-b/frontend",
                ],
            ),
        )
        .json();
    assert_eq!(
        report["applied"],
        json!([{"imagestream": "team-b/frontend", "action": "would-create"}]),
        "{report}"
    );
    let methods: Vec<String> = api
        .fake
        .requests()
        .iter()
        .map(|r| r.method.clone())
        .collect();
    // The tag history before the push, the object before the apply.
    assert_eq!(methods, ["GET", "GET"], "a dry run only reads");

    // Writes refused: each stream is reported, the exit code says so.
    let api = Api::start(FakeKube::builder().forbid_imagestream_writes("team-b"));
    let r = api.run_code(
        1,
        &restore_args(
            &archive,
            &b,
            &["--apply-imagestreams", "--namespace", "team-b"],
        ),
    );
    let report = r.json();
    assert_eq!(
        report["totals"]["images_failed"], 0,
        "the push went through"
    );
    let applied = report["applied"].as_array().unwrap();
    assert_eq!(applied.len(), 2, "{report}");
    assert!(applied.iter().all(|a| a["action"] == "failed"), "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{report}");
    for p in problems {
        let p = p.as_str().unwrap();
        assert!(
            p.contains("403") && p.contains("team-b/") && p.contains("registry-editor"),
            "{p}"
        );
    }

    // No kubeconfig at all: a configuration error before anything is pushed.
    let c = Registry::start();
    let out = common::bin()
        .args(restore_args(&archive, &c, &["--apply-imagestreams"]))
        .env("KUBECONFIG", work.path().join("missing-kubeconfig"))
        .env("HOME", work.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.count("PUT", ""), 0, "nothing pushed");
}

// ------------------------------------------------ restore onto kept history

/// The manifest PUTs a registry received after `mark`, as `repo/manifests/REF`.
fn manifest_puts_since(reg: &Registry, mark: usize) -> Vec<String> {
    reg.requests_since(mark)
        .into_iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/manifests/"))
        .map(|r| r.path.trim_start_matches("/v2/").to_string())
        .collect()
}

#[test]
fn a_cluster_that_lost_only_its_registry_storage_keeps_its_tag_history() {
    let backed = common::backed_up(&["--preset", "small", "--history", "3"]);
    let archive = backed.archive.clone();
    // A stream whose tags' images are all archived, one tag with history.
    let (stream, tag) = backed.list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|is| {
            let tags = is["status"]["tags"].as_array()?;
            let all_archived = tags
                .iter()
                .flat_map(|t| t["items"].as_array().into_iter().flatten())
                .all(|i| blob_present(&archive, i["image"].as_str().unwrap_or("sha256:0")));
            let tag = tags
                .iter()
                .find(|t| t["items"].as_array().is_some_and(|i| i.len() >= 3))?;
            all_archived.then(|| (is.clone(), tag["tag"].as_str().unwrap().to_string()))
        })
        .expect("a fully archived stream with a 3-deep tag history");
    let repo = format!(
        "{}/{}",
        stream["metadata"]["namespace"].as_str().unwrap(),
        stream["metadata"]["name"].as_str().unwrap()
    );
    let history: Vec<String> = stream["status"]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tag"] == tag.as_str())
        .unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["image"].as_str().unwrap().to_string())
        .collect();
    let flags = ["--keep-target-history", "--imagestream", repo.as_str()];

    // The ImageStream survived (etcd), the registry's storage did not: every
    // image comes back by digest, and no tag gets a new event.
    let b = Registry::start();
    let api = Api::start(FakeKube::builder().streams([stream.clone()]));
    let mark = b.mark();
    let report = api.run_code(0, &restore_args(&archive, &b, &flags)).json();
    let puts = manifest_puts_since(&b, mark);
    assert!(!puts.is_empty(), "{report}");
    assert!(
        puts.iter()
            .all(|p| p.starts_with(&format!("{repo}/manifests/sha256:"))),
        "only pushes by digest: {puts:?}"
    );
    for d in &history {
        assert_eq!(
            common::head_digest(&b, &repo, d).as_deref(),
            Some(d.as_str())
        );
    }
    assert_eq!(common::head_digest(&b, &repo, &tag), None, "{puts:?}");
    // A second run finds every image served and pushes nothing.
    let mark = b.mark();
    let again = api.run_code(0, &restore_args(&archive, &b, &flags)).json();
    assert_eq!(
        manifest_puts_since(&b, mark),
        Vec::<String>::new(),
        "{again}"
    );
    assert_eq!(again["totals"]["images_new"], 0, "{again}");

    // The target's history ends one image early (its newest event was
    // lost): the older images come back by digest, the newest is pushed to
    // the tag, once.
    let mut older = stream.clone();
    for t in older["status"]["tags"].as_array_mut().unwrap() {
        if t["tag"] == tag.as_str() {
            t["items"].as_array_mut().unwrap().remove(0);
        }
    }
    let c = Registry::start();
    let api = Api::start(FakeKube::builder().streams([older]));
    let mark = c.mark();
    let report = api.run_code(0, &restore_args(&archive, &c, &flags)).json();
    let puts = manifest_puts_since(&c, mark);
    let by_tag: Vec<&String> = puts
        .iter()
        .filter(|p| !p.contains("/manifests/sha256:"))
        .collect();
    assert_eq!(by_tag, [&format!("{repo}/manifests/{tag}")], "{report}");
    assert_eq!(
        common::head_digest(&c, &repo, &tag).as_deref(),
        Some(history[0].as_str())
    );
    for d in &history[1..] {
        assert_eq!(
            common::head_digest(&c, &repo, d).as_deref(),
            Some(d.as_str())
        );
    }

    // The tag moved on after the backup (a new image, or a rollback to an
    // older one): the archived images come back by digest, the tag is left
    // where the cluster has it.
    let fake_new = format!("sha256:{}", "d".repeat(64));
    for (label, head) in [
        ("a newer image", fake_new.clone()),
        ("a rollback", history[2].clone()),
    ] {
        let mut ahead = stream.clone();
        for t in ahead["status"]["tags"].as_array_mut().unwrap() {
            if t["tag"] == tag.as_str() {
                let mut first = t["items"][0].clone();
                first["image"] = json!(head);
                first["dockerImageReference"] = json!(format!("x/{repo}@{head}"));
                t["items"].as_array_mut().unwrap().insert(0, first);
            }
        }
        let e = Registry::start();
        let api = Api::start(FakeKube::builder().streams([ahead]));
        let mark = e.mark();
        let report = api.run_code(0, &restore_args(&archive, &e, &flags)).json();
        let puts = manifest_puts_since(&e, mark);
        assert!(
            puts.iter().all(|p| p.contains("/manifests/sha256:")),
            "{label}: nothing pushed to a tag: {puts:?}"
        );
        for d in &history {
            assert_eq!(
                common::head_digest(&e, &repo, d).as_deref(),
                Some(d.as_str()),
                "{label}"
            );
        }
        assert_eq!(report["totals"]["images_failed"], 0, "{label}: {report}");
        assert!(
            !report.to_string().contains("conflict"),
            "{label}: {report}"
        );
    }

    // The stream cannot be read: its tags are not pushed (a push could
    // duplicate the history there), and the run says so.
    let f = Registry::start();
    let ns = repo.split('/').next().unwrap();
    let api = Api::start(
        FakeKube::builder()
            .streams([stream.clone()])
            .forbid_namespace(ns),
    );
    let mark = f.mark();
    let r = api.run_code(1, &restore_args(&archive, &f, &flags));
    assert_eq!(manifest_puts_since(&f, mark), Vec::<String>::new());
    assert!(r.stdout.contains("403"), "{}", r.stdout);

    // Without the flag, the same restore pushes the whole history to the
    // tag again (what a plain registry, or another cluster, needs).
    let d = Registry::start();
    let mark = d.mark();
    api.run_code(
        0,
        &restore_args(&archive, &d, &["--imagestream", repo.as_str()]),
    );
    let to_tag = manifest_puts_since(&d, mark)
        .into_iter()
        .filter(|p| p == &format!("{repo}/manifests/{tag}"))
        .count();
    assert_eq!(to_tag, history.len());
}
