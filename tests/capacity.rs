//! PVC expansion: the Kubernetes API side against a fake API server, the
//! filesystem side for real on a tmpfs (as root).

#[path = "common/fake_kube.rs"]
mod fake_kube;
#[path = "common/volume.rs"]
mod volume;

use std::path::Path;
use std::time::{Duration, Instant};

use fake_kube::{FakeKube, FAKE_TOKEN};
use imagestream_archiver::capacity::{
    ensure_capacity, fs_space, needed_size, CapacityError, ResizeOutcome, ResizeRequest, GIB,
};
use imagestream_archiver::discovery::RetryPolicy;
use serde_json::json;
use volume::{require_root, Tmpfs};

const MIB: u64 = 1 << 20;
const NS: &str = "backup";
const PVC: &str = "archive";

fn request(
    archive: &Path,
    to_fetch: u64,
    max_size: Option<u64>,
    timeout: Duration,
) -> ResizeRequest {
    let mut r = ResizeRequest::new(PVC, NS, archive, to_fetch, 20, max_size, timeout);
    r.poll_interval = Duration::from_millis(200);
    r.retry = RetryPolicy {
        attempts: 2,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        request_timeout: Duration::from_secs(10),
    };
    r
}

/// A `to_fetch` for `dir` that needs growth and whose needed size is
/// `N.5 GiB` before rounding, so that other writers on the same disk moving
/// `used` by a few hundred MiB do not change the rounded size. Returns it
/// with the expected size in GiB.
fn fetch_needing_growth(dir: &Path) -> (u64, u64) {
    let space = fs_space(dir).unwrap();
    // At 20% headroom the needed size is (used + fetch) / usable / 0.95,
    // usable being what the headroom and the filesystem's reserve leave.
    let kept = space.total - space.used - space.free;
    let usable = 100u64
        .saturating_sub(20 + (kept * 100).div_ceil(space.total))
        .max(5);
    // Enough to fall under the headroom, then up to the middle of a GiB.
    let least = space.free.saturating_sub(space.total / 5) + GIB;
    let n = needed_size(&space, least, 20) / GIB + 1;
    let data = ((n * GIB + GIB / 2) as u128 * 95 * usable as u128 / 10_000) as u64;
    let fetch = data - space.used;
    assert!(fetch >= least);
    assert_eq!(needed_size(&space, fetch, 20), (n + 1) * GIB);
    (fetch, n + 1)
}

fn patches(fake: &FakeKube) -> Vec<fake_kube::Recorded> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect()
}

/// A 1Gi claim of an expandable class.
fn expandable() -> fake_kube::FakeKubeBuilder {
    FakeKube::builder()
        .pvc(NS, PVC, "gp3-csi", "1Gi")
        .storage_class("gp3-csi", Some(true))
}

/// The error of a growth that `fake` refuses, the fake, and the size asked
/// for in GiB.
async fn growth_error(fake: fake_kube::FakeKubeBuilder) -> (CapacityError, FakeKube, u64) {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake.start().await;
    let client = fake.client().await;
    let (fetch, gib) = fetch_needing_growth(dir.path());
    let err = ensure_capacity(
        &client,
        &request(dir.path(), fetch, None, Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    (err, fake, gib)
}

#[tokio::test]
async fn patch_is_an_exact_merge_patch_in_whole_gib_then_waits_and_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::builder()
        .pvc(NS, PVC, "gp3-csi", "1Gi")
        .storage_class("gp3-csi", Some(true))
        .on_patch(|ev, fake| {
            // The resize controller has done its part; the kubelet has not.
            let mut status = fake.pvc(&ev.namespace, &ev.name).unwrap()["status"].clone();
            status["conditions"] = json!([{
                "type": "FileSystemResizePending", "status": "True",
                "lastProbeTime": null, "lastTransitionTime": "2024-03-28T10:00:00Z",
                "message": "Waiting for user to (re-)start a pod to finish file system resize of volume on node."
            }]);
            fake.set_pvc_status(&ev.namespace, &ev.name, status);
        })
        .start()
        .await;
    let client = fake.client().await;
    let (fetch, gib) = fetch_needing_growth(dir.path());
    let start = Instant::now();
    let err = ensure_capacity(
        &client,
        &request(dir.path(), fetch, None, Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "it waited for the filesystem"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "bounded by the timeout"
    );

    let p = patches(&fake);
    assert_eq!(p.len(), 1);
    assert_eq!(
        p[0].path,
        "/api/v1/namespaces/backup/persistentvolumeclaims/archive"
    );
    assert_eq!(
        p[0].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        p[0].body,
        format!(r#"{{"spec":{{"resources":{{"requests":{{"storage":"{gib}Gi"}}}}}}}}"#)
    );
    assert_eq!(
        fake.pvc(NS, PVC).unwrap()["spec"]["resources"]["requests"]["storage"],
        format!("{gib}Gi")
    );
    // GET pvc, GET storageclass, PATCH, then GETs of the PVC while waiting.
    let seq: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        seq[0],
        "GET /api/v1/namespaces/backup/persistentvolumeclaims/archive"
    );
    assert_eq!(seq[1], "GET /apis/storage.k8s.io/v1/storageclasses/gp3-csi");
    assert_eq!(
        seq[2],
        "PATCH /api/v1/namespaces/backup/persistentvolumeclaims/archive"
    );
    assert!(seq[3..]
        .iter()
        .all(|s| s.starts_with("GET /api/v1/namespaces/backup/persistentvolumeclaims/archive")));
    assert!(seq.len() >= 4, "{seq:?}");

    assert!(matches!(err, CapacityError::ResizeTimeout(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("backup/archive"), "{msg}");
    assert!(msg.contains(&format!("{gib}Gi")), "{msg}");
    assert!(
        msg.contains("FileSystemResizePending=True"),
        "conditions in the message: {msg}"
    );
    assert!(!msg.contains(FAKE_TOKEN));
}

#[tokio::test]
async fn enough_room_needs_no_api_call() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::builder().start().await;
    let client = fake.client().await;
    // Headroom 0: whatever this machine's disk holds, nothing to fetch fits.
    let mut req = request(dir.path(), 0, None, Duration::from_secs(1));
    req.headroom_pct = 0;
    let out = ensure_capacity(&client, &req).await.unwrap();
    assert!(matches!(out, ResizeOutcome::NotNeeded { .. }), "{out:?}");
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn never_shrinks_a_pvc_that_already_asks_for_more() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::builder()
        .pvc(NS, PVC, "gp3-csi", "900000Gi")
        .storage_class("gp3-csi", Some(true))
        .start()
        .await;
    let client = fake.client().await;
    let (fetch, _) = fetch_needing_growth(dir.path());
    let err = ensure_capacity(
        &client,
        &request(dir.path(), fetch, Some(GIB), Duration::from_millis(500)),
    )
    .await
    .unwrap_err();
    assert!(
        patches(&fake).is_empty(),
        "no PATCH when the PVC already asks for enough"
    );
    assert!(
        matches!(err, CapacityError::ResizeTimeout(_)),
        "it waits for the filesystem to follow the earlier request: {err:?}"
    );
    assert_eq!(
        fake.pvc(NS, PVC).unwrap()["spec"]["resources"]["requests"]["storage"],
        "900000Gi"
    );
}

#[tokio::test]
async fn max_size_refuses_before_any_patch_and_says_how_much_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::builder()
        .pvc(NS, PVC, "gp3-csi", "1Gi")
        .storage_class("gp3-csi", Some(true))
        .start()
        .await;
    let client = fake.client().await;
    let (fetch, gib) = fetch_needing_growth(dir.path());
    let err = ensure_capacity(
        &client,
        &request(dir.path(), fetch, Some(2 * GIB), Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CapacityError::ExceedsMax { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("would need {gib}Gi")), "{msg}");
    assert!(msg.contains("--max-size is 2Gi"), "{msg}");
    assert!(msg.contains("backup/archive"), "{msg}");
    assert!(patches(&fake).is_empty());
}

#[tokio::test]
async fn forbidden_patch_is_a_clear_error() {
    let (err, fake, _) = growth_error(expandable().pvc_patch_status(403)).await;
    assert!(matches!(err, CapacityError::Forbidden { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("backup/archive") && msg.contains("cannot patch"),
        "{msg}"
    );
    assert!(
        msg.contains("patch on persistentvolumeclaims"),
        "says which right is missing: {msg}"
    );
    assert_eq!(patches(&fake).len(), 1, "403 is not retried");
}

#[tokio::test]
async fn a_quota_refusal_is_named_as_such_not_as_missing_rights() {
    let (err, _fake, _) = growth_error(expandable().pvc_patch_over_quota()).await;
    assert!(matches!(err, CapacityError::Refused { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("exceeded quota") && msg.contains("ResourceQuota"),
        "{msg}"
    );
    assert!(!msg.contains("service account needs"), "{msg}");
}

#[tokio::test]
async fn invalid_patch_is_a_clear_error() {
    let (err, _fake, gib) = growth_error(expandable().pvc_patch_status(422)).await;
    assert!(matches!(err, CapacityError::PatchInvalid { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("backup/archive to {gib}Gi")), "{msg}");
    assert!(msg.contains("is invalid"), "server message kept: {msg}");
}

#[tokio::test]
async fn storage_class_without_expansion_is_refused_before_patching() {
    for allow in [None, Some(false)] {
        let (err, fake, gib) = growth_error(
            FakeKube::builder()
                .pvc(NS, PVC, "thin", "1Gi")
                .storage_class("thin", allow),
        )
        .await;
        assert!(
            matches!(err, CapacityError::NotExpandable { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("StorageClass thin") && msg.contains("allowVolumeExpansion"),
            "{msg}"
        );
        assert!(msg.contains(&format!("needs {gib}Gi")), "{msg}");
        assert!(patches(&fake).is_empty(), "allowVolumeExpansion={allow:?}");
    }
}

#[tokio::test]
async fn missing_or_unreadable_pvc() {
    let (err, _, _) = growth_error(FakeKube::builder()).await;
    assert!(matches!(err, CapacityError::PvcNotFound { .. }), "{err:?}");
    assert_eq!(err.to_string(), "PVC backup/archive not found");

    let (err, _, _) = growth_error(
        FakeKube::builder()
            .pvc(NS, PVC, "gp3-csi", "1Gi")
            .pvc_get_status(403),
    )
    .await;
    assert!(matches!(err, CapacityError::Forbidden { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot get"), "{err}");
}

#[tokio::test]
async fn tmpfs_grows_after_the_patch_and_the_download_then_fits() {
    require_root();
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("volume");
    std::fs::create_dir(&mnt).unwrap();
    let _tmpfs = Tmpfs::mount(&mnt, "4m");
    let archive = mnt.join("archive");
    std::fs::create_dir(&archive).unwrap();
    std::fs::write(archive.join("already-there"), vec![1u8; MIB as usize]).unwrap();

    // 6 MiB do not fit on the 4 MiB volume as it is.
    let to_fetch = 6 * MIB;
    let too_big = std::fs::write(archive.join("probe"), vec![2u8; to_fetch as usize]);
    assert!(too_big.is_err(), "the unexpanded volume must be too small");
    std::fs::remove_file(archive.join("probe")).ok();

    let mount_point = mnt.clone();
    let fake = FakeKube::builder()
        .pvc(NS, PVC, "gp3-csi", "4Mi")
        .storage_class("gp3-csi", Some(true))
        .on_patch(volume::kubelet_resize(
            mount_point,
            Duration::from_millis(1500),
        ))
        .start()
        .await;
    let client = fake.client().await;
    let start = Instant::now();
    let out = ensure_capacity(
        &client,
        &request(&archive, to_fetch, Some(10 * GIB), Duration::from_secs(20)),
    )
    .await
    .unwrap();
    let waited = start.elapsed();
    match out {
        ResizeOutcome::Grown { from, to, space } => {
            assert_eq!(from, 4 * MIB);
            assert_eq!(to, GIB, "(1 MiB + 6 MiB) * 1.2 rounds up to 1 GiB");
            assert_eq!(space.total, GIB);
            assert!(space.free >= to_fetch);
        }
        other => panic!("expected Grown, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(1500),
        "returned only after the remount: {waited:?}"
    );
    assert_eq!(
        fake.patch_bodies(),
        [r#"{"spec":{"resources":{"requests":{"storage":"1Gi"}}}}"#]
    );
    assert!(
        fake.requests_to("/persistentvolumeclaims/archive")
            .iter()
            .filter(|r| r.method == "GET")
            .count()
            >= 2,
        "the PVC's status was followed while waiting"
    );
    // The download now fits.
    std::fs::write(archive.join("downloaded"), vec![3u8; to_fetch as usize]).unwrap();
    assert_eq!(fs_space(&archive).unwrap().total, GIB);
}
