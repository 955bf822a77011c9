//! Tests of the test harness itself: the real registry, its access log and
//! the `isa-seed` workload, checked with skopeo and raw registry requests.

mod common;

use common::{seed, sha256, skopeo, Registry, MANIFEST_ACCEPT};
use serde_json::Value;

/// `skopeo inspect --raw` of `repo_and_ref` on `reg`.
fn skopeo_raw(reg: &Registry, repo_and_ref: &str) -> Vec<u8> {
    let out = skopeo()
        .arg("inspect")
        .args(reg.skopeo_flags(""))
        .arg("--raw")
        .arg(reg.docker_ref(repo_and_ref))
        .output()
        .expect("running skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect {repo_and_ref}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// GET a manifest by digest straight from the registry; checks its digest.
fn manifest_by_digest(reg: &Registry, repo: &str, digest: &str) -> Value {
    let r = reg
        .request(
            "GET",
            &format!("/v2/{repo}/manifests/{digest}"),
            &[("Accept", MANIFEST_ACCEPT)],
        )
        .expect("manifest request");
    assert_eq!(r.status, 200, "GET {repo}@{digest}");
    assert_eq!(sha256(&r.body), digest, "content of {repo}@{digest}");
    serde_json::from_slice(&r.body).expect("manifest JSON")
}

fn streams(list: &Value) -> &Vec<Value> {
    assert_eq!(list["kind"], "List");
    assert_eq!(list["apiVersion"], "v1");
    list["items"].as_array().expect("items array")
}

fn repo_of(is: &Value) -> String {
    format!(
        "{}/{}",
        is["metadata"]["namespace"].as_str().unwrap(),
        is["metadata"]["name"].as_str().unwrap()
    )
}

#[test]
fn small_preset_matches_registry_content() {
    let reg = Registry::start();
    let s = seed(&reg, &["--preset", "small", "--seed", "11"]);
    let list = s.list();
    let items = streams(&list);
    assert_eq!(items.len() as u64, s.streams);
    assert!(
        s.streams >= 4 && s.tags >= 8 && s.history_items >= 8,
        "{}",
        s.raw
    );

    let mut media_types = std::collections::BTreeMap::<String, usize>::new();
    let mut indexes = 0;
    let (mut tags, mut events) = (0, 0);
    for is in items {
        assert_eq!(is["kind"], "ImageStream");
        assert_eq!(is["apiVersion"], "image.openshift.io/v1");
        let repo = repo_of(is);
        assert_eq!(
            is["status"]["dockerImageRepository"],
            format!("{}/{repo}", reg.addr)
        );
        for tag in is["status"]["tags"].as_array().unwrap() {
            tags += 1;
            let name = tag["tag"].as_str().unwrap();
            let history = tag["items"].as_array().unwrap();
            events += history.len();
            // The current tag in the registry is items[0].
            let raw = skopeo_raw(&reg, &format!("{repo}:{name}"));
            assert_eq!(sha256(&raw), history[0]["image"], "{repo}:{name}");
            // items are newest first.
            let times: Vec<&str> = history
                .iter()
                .map(|i| i["created"].as_str().unwrap())
                .collect();
            assert!(times.windows(2).all(|w| w[0] > w[1]), "{times:?}");
            for item in history {
                let digest = item["image"].as_str().unwrap();
                assert_eq!(
                    item["dockerImageReference"],
                    format!("{}/{repo}@{digest}", reg.addr)
                );
                let m = manifest_by_digest(&reg, &repo, digest);
                let mt = m["mediaType"].as_str().unwrap().to_string();
                *media_types.entry(mt.clone()).or_default() += 1;
                if mt.ends_with("index.v1+json") || mt.ends_with("list.v2+json") {
                    indexes += 1;
                    let children = m["manifests"].as_array().unwrap();
                    assert_eq!(children.len(), 2, "{repo}@{digest}");
                    let archs: Vec<&str> = children
                        .iter()
                        .map(|c| c["platform"]["architecture"].as_str().unwrap())
                        .collect();
                    assert_eq!(archs, ["amd64", "arm64"]);
                    for c in children {
                        let child = manifest_by_digest(&reg, &repo, c["digest"].as_str().unwrap());
                        assert_eq!(child["mediaType"], c["mediaType"]);
                        assert!(child["layers"].as_array().unwrap().len() >= 2);
                    }
                } else {
                    // Config blob: a real-looking image config.
                    let cd = m["config"]["digest"].as_str().unwrap();
                    let r = reg
                        .request("GET", &format!("/v2/{repo}/blobs/{cd}"), &[])
                        .unwrap();
                    assert_eq!(r.status, 200);
                    assert_eq!(sha256(&r.body), cd);
                    let config: Value = serde_json::from_slice(&r.body).unwrap();
                    assert_eq!(config["os"], "linux");
                    assert_eq!(
                        config["rootfs"]["diff_ids"].as_array().unwrap().len(),
                        m["layers"].as_array().unwrap().len()
                    );
                }
            }
        }
    }
    assert_eq!(tags, s.tags);
    assert_eq!(events as u64, s.items);
    assert!(indexes >= 1, "no image index in {media_types:?}");
    for mt in [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ] {
        assert!(media_types.contains_key(mt), "no {mt} in {media_types:?}");
    }
    // Every distinct manifest was pushed exactly once, and the log saw it.
    assert_eq!(reg.count("PUT", "/manifests/") as u64, s.manifests);
}

#[test]
fn access_log_counts_requests_after_a_mark() {
    let reg = Registry::start();
    let before = reg.mark();
    let r = reg
        .request("GET", "/v2/team-x/none/manifests/latest", &[])
        .unwrap();
    assert_eq!(r.status, 404);
    let digest = format!("sha256:{}", "0".repeat(64));
    reg.request("HEAD", &format!("/v2/team-x/none/blobs/{digest}"), &[])
        .unwrap();
    let m = reg.mark();
    assert_eq!(m, before + 2);
    let after = reg.requests_since(before);
    assert_eq!(after[0].method, "GET");
    assert_eq!(after[0].path, "/v2/team-x/none/manifests/latest");
    assert_eq!(after[0].status, 404);
    assert_eq!(reg.count_since(before, "HEAD", "/blobs/"), 1);
    assert_eq!(reg.content_reads_since(before).len(), 2);
    assert!(reg.content_reads_since(m).is_empty());
}

#[test]
fn external_history_items_point_elsewhere_but_bytes_are_local() {
    let reg = Registry::start();
    let s = seed(
        &reg,
        &[
            "--preset",
            "small",
            "--external-every",
            "1",
            "--history",
            "3",
        ],
    );
    assert_eq!(s.raw["external_items"].as_u64(), Some(s.history_items));
    for is in streams(&s.list()) {
        let repo = repo_of(is);
        for tag in is["status"]["tags"].as_array().unwrap() {
            let items = tag["items"].as_array().unwrap();
            assert_eq!(items.len(), 3);
            assert!(items[0]["dockerImageReference"]
                .as_str()
                .unwrap()
                .starts_with(&reg.addr));
            for item in &items[1..] {
                let digest = item["image"].as_str().unwrap();
                assert_eq!(
                    item["dockerImageReference"],
                    format!("quay.io/{repo}@{digest}")
                );
                manifest_by_digest(&reg, &repo, digest);
            }
        }
    }
}

#[test]
fn seeding_is_deterministic_per_seed() {
    let reg = Registry::start();
    let pushed = seed(&reg, &["--preset", "small", "--seed", "5"]);
    let run = |seed: &str| {
        let out = common::seed_bin()
            .args(["--registry", &reg.addr, "--dry-run", "--preset", "small"])
            .args(["--seed", seed, "--imagestreams-out", "/dev/stdout"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let a = run("5");
    let written = std::fs::read(&pushed.imagestreams).unwrap();
    // The dry run prints the list, then the summary line.
    assert!(
        a.starts_with(&written),
        "dry run differs from the pushed run"
    );
    assert_eq!(a, run("5"));
    assert_ne!(a, run("6"));
}

#[test]
fn tls_auth_registry_accepts_seed_with_credentials() {
    let reg = Registry::start_tls_auth("alice", "s3cret-pw");
    assert!(reg.ca_pem_path().exists());
    // Without credentials the registry refuses.
    let r = reg.request_with_auth("GET", "/v2/", &[], false).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(reg.request("GET", "/v2/", &[]).unwrap().status, 200);

    let s = seed(&reg, &["--preset", "small", "--repos", "1", "--tags", "2"]);
    let list = s.list();
    let is = &streams(&list)[0];
    let repo = repo_of(is);
    let tag = &is["status"]["tags"][0];
    let raw = skopeo_raw(&reg, &format!("{repo}:{}", tag["tag"].as_str().unwrap()));
    assert_eq!(sha256(&raw), tag["items"][0]["image"]);

    // A wrong password makes the seeder fail.
    let out = common::seed_bin()
        .args(["--registry", &reg.addr, "--ca-file"])
        .arg(reg.ca_pem_path())
        .args([
            "--username",
            "alice",
            "--password",
            "wrong",
            "--preset",
            "small",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "{err}"
    );
}
