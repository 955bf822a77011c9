//! Restore: a round trip between two real registries.

mod common;

use common::proxy::Proxy;
use common::{head_digest, run, run_ok, tag_events, Registry};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

fn backed_up() -> common::BackedUp {
    common::backed_up(&["--preset", "small", "--history", "3"])
}

fn restore_args(archive: &Path, registry: &str, extra: &[&str]) -> Vec<String> {
    common::archiver_args("restore", archive, common::plain_registry(registry), extra)
}

fn writes(p: &Proxy) -> Vec<common::proxy::Record> {
    p.records()
        .into_iter()
        .filter(|r| matches!(r.method.as_str(), "PUT" | "POST" | "PATCH"))
        .collect()
}

#[test]
fn round_trip_same_digests_history_in_order_and_idempotent() {
    let f = backed_up();
    let b = Registry::start();
    let proxy = Proxy::start(&b.addr);
    let report = run_ok(0, restore_args(&f.archive, &proxy.addr, &[])).json();
    assert_eq!(report["totals"]["images_failed"], 0, "{report}");

    // Every tag event is served by B with the same digest; current tags match.
    let events = tag_events(&f.list);
    assert!(events.iter().any(|e| e.3 >= 2), "history of depth 2+");
    for (ns, name, tag, pos, digest) in &events {
        let repo = format!("{ns}/{name}");
        assert_eq!(
            head_digest(&b, &repo, digest).as_deref(),
            Some(digest.as_str()),
            "{repo} {digest}"
        );
        if *pos == 0 {
            assert_eq!(
                head_digest(&b, &repo, tag).as_deref(),
                Some(digest.as_str()),
                "{repo}:{tag}"
            );
        }
    }
    // Every blob of the archive re-hashes correctly in B.
    let index: Value =
        serde_json::from_slice(&std::fs::read(f.archive.join("index.json")).unwrap()).unwrap();
    let mut checked = 0;
    for m in index["manifests"].as_array().unwrap() {
        let repo = format!(
            "{}/{}",
            m["annotations"]["io.imagestream-archiver.namespace"]
                .as_str()
                .unwrap(),
            m["annotations"]["io.imagestream-archiver.imagestream"]
                .as_str()
                .unwrap()
        );
        let body = b
            .request(
                "GET",
                &format!("/v2/{repo}/manifests/{}", m["digest"].as_str().unwrap()),
                &[("Accept", common::MANIFEST_ACCEPT)],
            )
            .unwrap()
            .body;
        let manifest: Value = serde_json::from_slice(&body).unwrap();
        let children: Vec<Value> = manifest["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut blobs: Vec<Value> = manifest["layers"].as_array().cloned().unwrap_or_default();
        blobs.extend(manifest.get("config").cloned());
        for c in &children {
            let cb = b
                .request(
                    "GET",
                    &format!("/v2/{repo}/manifests/{}", c["digest"].as_str().unwrap()),
                    &[("Accept", common::MANIFEST_ACCEPT)],
                )
                .unwrap()
                .body;
            assert_eq!(common::sha256(&cb), c["digest"].as_str().unwrap());
            let cm: Value = serde_json::from_slice(&cb).unwrap();
            blobs.extend(cm["layers"].as_array().cloned().unwrap_or_default());
            blobs.extend(cm.get("config").cloned());
        }
        for blob in blobs {
            let d = blob["digest"].as_str().unwrap();
            let got = b
                .request("GET", &format!("/v2/{repo}/blobs/{d}"), &[])
                .unwrap();
            assert_eq!(got.status, 200, "{repo} {d}");
            assert_eq!(common::sha256(&got.body), d);
            checked += 1;
        }
    }
    assert!(checked > 0);

    // Per tag, the manifest PUTs by tag came oldest first, current last.
    let mut pushed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in writes(&proxy) {
        if r.method == "PUT"
            && r.path.contains("/manifests/")
            && !r.path.contains("/manifests/sha256:")
        {
            let key = r
                .path
                .trim_start_matches("/v2/")
                .replace("/manifests/", ":");
            pushed
                .entry(key)
                .or_default()
                .push(r.body_digest.clone().unwrap());
        }
    }
    let mut expected: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for (ns, name, tag, pos, digest) in &events {
        expected
            .entry(format!("{ns}/{name}:{tag}"))
            .or_default()
            .push((*pos, digest.clone()));
    }
    assert_eq!(pushed.len(), expected.len());
    for (tag, mut evs) in expected {
        evs.sort_by_key(|e| std::cmp::Reverse(e.0));
        let want: Vec<String> = evs.into_iter().map(|e| e.1).collect();
        assert_eq!(
            pushed[&tag], want,
            "push order of {tag}: oldest first, current last"
        );
    }

    // A second run pushes nothing at all.
    let before = proxy.records().len();
    let report = run_ok(0, restore_args(&f.archive, &proxy.addr, &[])).json();
    let after: Vec<_> = proxy.records().into_iter().skip(before).collect();
    assert!(
        after
            .iter()
            .all(|r| r.method == "GET" || r.method == "HEAD"),
        "second restore sends no write: {:?}",
        after
            .iter()
            .filter(|r| r.method != "GET" && r.method != "HEAD")
            .collect::<Vec<_>>()
    );
    assert!(
        after.iter().all(|r| !r.path.contains("/blobs/")),
        "nor checks a blob"
    );
    assert_eq!(report["totals"]["images_new"], 0);
    assert_eq!(report["totals"]["blobs_new"], 0);
}

#[test]
fn map_namespace_lands_under_new_names_with_same_digests() {
    let f = backed_up();
    let c = Registry::start();
    run_ok(
        0,
        restore_args(
            &f.archive,
            &c.addr,
            &["--map-namespace", "team-a=team-z", "--namespace", "team-a"],
        ),
    );
    let mut n = 0;
    for (ns, name, tag, pos, digest) in tag_events(&f.list) {
        let mapped = format!("team-z/{name}");
        if ns == "team-a" {
            n += 1;
            assert_eq!(
                head_digest(&c, &mapped, &digest).as_deref(),
                Some(digest.as_str())
            );
            if pos == 0 {
                assert_eq!(
                    head_digest(&c, &mapped, &tag).as_deref(),
                    Some(digest.as_str())
                );
            }
        }
        assert_eq!(
            head_digest(&c, &format!("{ns}/{name}"), &tag),
            None,
            "nothing under the old names"
        );
    }
    assert!(n > 0);
}

#[test]
fn conflicting_tag_is_reported_and_left_alone_unless_overwrite() {
    let f = backed_up();
    let b = Registry::start();
    // Restore one stream, then move one of its tags to another image.
    let events = tag_events(&f.list);
    let (ns, name, tag, _, current) = events.iter().find(|e| e.3 == 0).unwrap().clone();
    let other = events
        .iter()
        .find(|e| e.0 == ns && e.1 == name && e.4 != current && e.2 != tag)
        .or_else(|| {
            events
                .iter()
                .find(|e| e.0 == ns && e.1 == name && e.4 != current)
        })
        .unwrap()
        .4
        .clone();
    run_ok(
        0,
        restore_args(
            &f.archive,
            &b.addr,
            &["--imagestream", &format!("{ns}/{name}")],
        ),
    );
    let repo = format!("{ns}/{name}");
    let body = b
        .request(
            "GET",
            &format!("/v2/{repo}/manifests/{other}"),
            &[("Accept", common::MANIFEST_ACCEPT)],
        )
        .unwrap();
    let ct = body.header("content-type").unwrap().to_string();
    let out = common::skopeo()
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &b.docker_ref(&format!("{repo}@{other}")),
            &b.docker_ref(&format!("{repo}:{tag}")),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} ({ct})",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        head_digest(&b, &repo, &tag).as_deref(),
        Some(other.as_str())
    );

    let r = run(restore_args(
        &f.archive,
        &b.addr,
        &["--imagestream", &format!("{ns}/{name}")],
    ));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();
    let conflicts = report["imagestreams"][&repo]["conflicts"].to_string();
    assert!(
        conflicts.contains(&tag) && conflicts.contains(&other),
        "{report}"
    );
    assert_eq!(
        head_digest(&b, &repo, &tag).as_deref(),
        Some(other.as_str()),
        "left alone"
    );

    run_ok(
        0,
        restore_args(
            &f.archive,
            &b.addr,
            &["--imagestream", &format!("{ns}/{name}"), "--overwrite"],
        ),
    );
    assert_eq!(
        head_digest(&b, &repo, &tag).as_deref(),
        Some(current.as_str())
    );
}

#[test]
fn missing_or_corrupt_blob_names_image_and_blob_and_restores_the_rest() {
    let f = backed_up();
    let index: Value =
        serde_json::from_slice(&std::fs::read(f.archive.join("index.json")).unwrap()).unwrap();
    // A plain image manifest: remove one layer, corrupt another image's layer.
    let plain: Vec<&Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            m["mediaType"]
                .as_str()
                .unwrap()
                .ends_with("manifest.v1+json")
                || m["mediaType"]
                    .as_str()
                    .unwrap()
                    .ends_with("manifest.v2+json")
        })
        .collect();
    let layer_of = |m: &Value| -> String {
        let d = m["digest"].as_str().unwrap();
        let body = std::fs::read(f.archive.join("blobs/sha256").join(&d[7..])).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["layers"].as_array().unwrap().last().unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let victim = plain[0];
    let gone = layer_of(victim);
    std::fs::remove_file(f.archive.join("blobs/sha256").join(&gone[7..])).unwrap();
    let b = Registry::start();
    let r = run(restore_args(&f.archive, &b.addr, &[]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let text = r.json().to_string();
    assert!(text.contains(&gone), "names the blob: {text}");
    assert!(
        text.contains(victim["digest"].as_str().unwrap()),
        "names the image"
    );
    let failed = r.json()["totals"]["images_failed"].as_u64().unwrap();
    assert!(failed >= 1);
    let restored = r.json()["totals"]["images_new"].as_u64().unwrap();
    assert!(restored > 0, "the rest is restored");
    // Everything else restored: count the tag events B serves.
    let events = tag_events(&f.list);
    let served = events
        .iter()
        .filter(|(ns, name, _, _, d)| {
            head_digest(&b, &format!("{ns}/{name}"), d).as_deref() == Some(d.as_str())
        })
        .count();
    assert!(
        served as u64 >= events.len() as u64 - failed,
        "{served} of {}",
        events.len()
    );

    // A corrupt blob (bytes flipped) is refused by the registry's digest
    // check and named too.
    let other = plain.iter().find(|m| layer_of(m) != gone).unwrap();
    let bad = layer_of(other);
    let path = f.archive.join("blobs/sha256").join(&bad[7..]);
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let c = Registry::start();
    let r = run(restore_args(&f.archive, &c.addr, &[]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.json().to_string().contains(&bad), "{}", r.stdout);
}

#[test]
fn damaged_archive_content_is_named_never_pushed_and_does_not_stop_the_tag() {
    let f = backed_up();
    let blob = |d: &str| f.archive.join("blobs/sha256").join(&d[7..]);
    let json = |d: &str| -> Value {
        serde_json::from_slice(&std::fs::read(blob(d)).unwrap()).unwrap_or(Value::Null)
    };
    // How many archived manifests use each layer.
    let mut users: BTreeMap<String, usize> = BTreeMap::new();
    for e in std::fs::read_dir(f.archive.join("blobs/sha256")).unwrap() {
        let v: Value = serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap())
            .unwrap_or(Value::Null);
        for l in v["layers"].as_array().into_iter().flatten() {
            *users
                .entry(l["digest"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let events = tag_events(&f.list);
    let current_of = |e: &(String, String, String, usize, String)| {
        events
            .iter()
            .find(|c| (&c.0, &c.1, &c.2) == (&e.0, &e.1, &e.2) && c.3 == 0)
            .map(|c| c.4.clone())
    };
    // An older image of a tag with a layer no other image uses, under a
    // different current image.
    let (old, layer, current) = events
        .iter()
        .filter(|e| e.3 >= 1)
        .find_map(|e| {
            let layer = json(&e.4)["layers"]
                .as_array()?
                .iter()
                .filter_map(|l| l["digest"].as_str())
                .find(|d| users[*d] == 1)?
                .to_string();
            let current = current_of(e).filter(|c| c != &e.4)?;
            Some((e.clone(), layer, current))
        })
        .expect("a history image with a layer of its own");
    let path = blob(&layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    // Another tag's current image: its manifest still parses, one size
    // differs (pushed as it is, it would land under another digest).
    let hit = events
        .iter()
        .find(|e| {
            e.3 == 0
                && (&e.0, &e.1, &e.2) != (&old.0, &old.1, &old.2)
                && json(&e.4)["layers"].is_array()
        })
        .expect("a plain current image on another tag")
        .clone();
    let text = String::from_utf8(std::fs::read(blob(&hit.4)).unwrap()).unwrap();
    let mut at = text.find("\"size\":").expect("a size field") + 7;
    at += text[at..].len() - text[at..].trim_start().len();
    let end = at + text[at..].find(|c: char| !c.is_ascii_digit()).unwrap();
    let size: u64 = text[at..end].parse().unwrap();
    let damaged = format!("{}{}{}", &text[..at], size + 1, &text[end..]);
    std::fs::write(blob(&hit.4), &damaged).unwrap();
    let damaged_digest = {
        use sha2::Digest as _;
        format!("sha256:{:x}", sha2::Sha256::digest(damaged.as_bytes()))
    };

    let b = Registry::start();
    let r = run(restore_args(&f.archive, &b.addr, &[]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let failures = r.json()["imagestreams"].to_string();
    // The damaged layer is named as the archive's fault; the tag still gets
    // its current image.
    assert!(
        failures.contains(&layer) && failures.contains("damaged"),
        "{failures}"
    );
    let repo = format!("{}/{}", old.0, old.1);
    assert_eq!(head_digest(&b, &repo, &old.2), Some(current), "{failures}");
    // The damaged manifest is named and pushed nowhere.
    assert!(failures.contains(&hit.4), "{failures}");
    let repo = format!("{}/{}", hit.0, hit.1);
    assert_ne!(head_digest(&b, &repo, &hit.2), Some(damaged_digest.clone()));
    assert_eq!(head_digest(&b, &repo, &damaged_digest), None);
}

#[test]
fn dry_run_reports_what_would_be_pushed_and_pushes_nothing() {
    let f = backed_up();
    let b = Registry::start();
    let proxy = Proxy::start(&b.addr);
    let report = run_ok(0, restore_args(&f.archive, &proxy.addr, &["--dry-run"])).json();
    assert!(writes(&proxy).is_empty(), "a dry run writes nothing");
    assert_eq!(report["dry_run"], true);
    let events = tag_events(&f.list).len() as u64;
    assert_eq!(
        report["totals"]["images_new"].as_u64().unwrap(),
        events,
        "{report}"
    );
    assert!(report["totals"]["bytes_new"].as_u64().unwrap() > 0);
    for (ns, name, tag, _, _) in tag_events(&f.list) {
        assert_eq!(head_digest(&b, &format!("{ns}/{name}"), &tag), None);
    }
}

/// An archive, an empty registry behind a proxy, the archive's tag events,
/// and one tag with two history items: `(ns, name, tag, "ns/name")`.
#[allow(clippy::type_complexity)]
fn into_empty_registry() -> (
    common::BackedUp,
    Registry,
    Proxy,
    Vec<(String, String, String, usize, String)>,
    (String, String, String, String),
) {
    let f = backed_up();
    let b = Registry::start();
    let proxy = Proxy::start(&b.addr);
    let events = tag_events(&f.list);
    let (ns, name, tag, _, _) = events.iter().find(|e| e.3 == 2).unwrap().clone();
    let repo = format!("{ns}/{name}");
    (f, b, proxy, events, (ns, name, tag, repo))
}

#[test]
fn registry_failure_stops_the_tag_and_a_rerun_resumes_in_order() {
    let (f, b, proxy, events, (ns, name, tag, repo)) = into_empty_registry();
    // The first push to this tag (its oldest history item) fails (a 500, retried and still failing).
    proxy.add_rule(
        Some("PUT"),
        &format!("/v2/{repo}/manifests/{tag}"),
        common::proxy::Fault::Status(500),
        1,
    );
    let r = run(restore_args(&f.archive, &proxy.addr, &["--retries", "1"]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let failures = r.json()["imagestreams"][&repo]["failures"].clone();
    let of_tag: Vec<_> = failures
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["tag"] == tag.as_str())
        .collect();
    let depth = events
        .iter()
        .filter(|e| e.0 == ns && e.1 == name && e.2 == tag)
        .count();
    assert_eq!(
        of_tag.len(),
        depth,
        "every event of the tag is reported: {failures}"
    );
    assert_eq!(
        head_digest(&b, &repo, &tag),
        None,
        "nothing pushed after the failure"
    );

    // A re-run pushes the whole history, oldest first.
    let before = proxy.records().len();
    run_ok(0, restore_args(&f.archive, &proxy.addr, &[]));
    let pushed: Vec<String> = proxy
        .records()
        .into_iter()
        .skip(before)
        .filter(|r| r.method == "PUT" && r.path == format!("/v2/{repo}/manifests/{tag}"))
        .map(|r| r.body_digest.unwrap())
        .collect();
    let mut want: Vec<(usize, String)> = events
        .iter()
        .filter(|e| e.0 == ns && e.1 == name && e.2 == tag)
        .map(|e| (e.3, e.4.clone()))
        .collect();
    want.sort_by_key(|e| std::cmp::Reverse(e.0));
    assert_eq!(pushed, want.into_iter().map(|e| e.1).collect::<Vec<_>>());
}

#[test]
fn a_rerun_resumes_a_history_whose_current_image_came_before() {
    // A tag rolled back to an earlier image: history a, b, a (`oc tag
    // app@sha256:a app:latest`). A restore that stops after the first `a`
    // leaves the tag at the current digest, yet `b` and the second `a`
    // are still to be pushed.
    let reg = Registry::start();
    let seeded = common::seed(&reg, &["--preset", "small", "--history", "3"]);
    let mut list = seeded.list();
    let manifest = |repo: &str, digest: &str| -> Value {
        let r = reg
            .request(
                "GET",
                &format!("/v2/{repo}/manifests/{digest}"),
                &[("Accept", common::MANIFEST_ACCEPT)],
            )
            .unwrap();
        serde_json::from_slice(&r.body).unwrap()
    };
    // A tag whose two newest images are single manifests.
    let (s, t, repo, tag) = (0..list["items"].as_array().unwrap().len())
        .flat_map(|s| {
            let is = &list["items"][s];
            let repo = format!(
                "{}/{}",
                is["metadata"]["namespace"].as_str().unwrap(),
                is["metadata"]["name"].as_str().unwrap()
            );
            (0..is["status"]["tags"].as_array().unwrap().len())
                .map(move |t| (s, t, repo.clone()))
                .collect::<Vec<_>>()
        })
        .find_map(|(s, t, repo)| {
            let tag = &list["items"][s]["status"]["tags"][t];
            let items = tag["items"].as_array()?;
            (items.len() >= 2
                && items[..2]
                    .iter()
                    .all(|i| manifest(&repo, i["image"].as_str().unwrap())["config"].is_object()))
            .then(|| (s, t, repo, tag["tag"].as_str().unwrap().to_string()))
        })
        .expect("a tag with two single-manifest images");
    let items = list["items"][s]["status"]["tags"][t]["items"]
        .as_array_mut()
        .unwrap();
    items.truncate(2);
    let newest = items[0].clone();
    items.push(newest);
    let a = items[0]["image"].as_str().unwrap().to_string();
    let b = items[1]["image"].as_str().unwrap().to_string();
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("list.json");
    std::fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
    let archive = work.path().join("archive");
    run_ok(
        0,
        common::backup_args(common::archiver_registry_flags(&reg), &archive, &path, &[]),
    );

    let target = Registry::start();
    let proxy = Proxy::start(&target.addr);
    let b_config = manifest(&repo, &b)["config"]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    proxy.add_rule(
        Some("PUT"),
        &b_config,
        common::proxy::Fault::Status(500),
        100,
    );
    let only = ["--imagestream", repo.as_str()];
    let r = run(restore_args(
        &archive,
        &proxy.addr,
        &[only[0], only[1], "--retries", "1"],
    ));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(head_digest(&target, &repo, &tag), Some(a.clone()));
    assert_eq!(head_digest(&target, &repo, &b), None);

    proxy.clear_rules();
    let tag_puts = |from: usize| -> Vec<String> {
        proxy
            .records()
            .into_iter()
            .skip(from)
            .filter(|r| r.method == "PUT" && r.path == format!("/v2/{repo}/manifests/{tag}"))
            .map(|r| r.body_digest.unwrap())
            .collect()
    };
    let before = proxy.records().len();
    run_ok(0, restore_args(&archive, &proxy.addr, &only));
    assert_eq!(
        tag_puts(before),
        vec![b.clone(), a.clone()],
        "resumed after the first {a}"
    );
    assert_eq!(head_digest(&target, &repo, &tag), Some(a));

    // Finished: a third run pushes nothing to the tag.
    let before = proxy.records().len();
    run_ok(0, restore_args(&archive, &proxy.addr, &only));
    assert!(tag_puts(before).is_empty());
}

#[test]
fn an_image_the_registry_refuses_for_good_does_not_keep_the_newer_ones_out() {
    let (f, b, proxy, events, (ns, name, tag, repo)) = into_empty_registry();
    let of_tag = |pos: usize| {
        events
            .iter()
            .find(|e| e.0 == ns && e.1 == name && e.2 == tag && e.3 == pos)
            .unwrap()
            .4
            .clone()
    };
    // The registry takes no manifest for the tag's oldest image, as a
    // LimitRange on image size or a manifest it cannot parse refuses it
    // (400: permanent, not a matter of rights).
    proxy.add_rule(
        Some("PUT"),
        &format!("/v2/{repo}/manifests/{tag}"),
        common::proxy::Fault::Status(400),
        1,
    );
    let r = run(restore_args(&f.archive, &proxy.addr, &[]));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();
    let failures: Vec<Value> = report["imagestreams"][&repo]["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["tag"] == tag.as_str())
        .cloned()
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0]["digest"], of_tag(2).as_str());
    assert_eq!(head_digest(&b, &repo, &tag), Some(of_tag(0)));
    assert_eq!(head_digest(&b, &repo, &of_tag(1)), Some(of_tag(1)));
    assert!(
        report.get("refused").is_none(),
        "not a matter of rights: {report}"
    );
}

#[test]
fn an_identity_that_may_pull_but_not_push_is_refused_with_exit_2() {
    // The restore run under the backup's service account: lookups answer,
    // every upload is denied.
    let f = backed_up();
    let b = Registry::start();
    let proxy = Proxy::start(&b.addr);
    for method in ["PUT", "POST", "PATCH"] {
        proxy.add_rule(
            Some(method),
            "/v2/",
            common::proxy::Fault::Status(403),
            100_000,
        );
    }
    let r = run(restore_args(&f.archive, &proxy.addr, &[]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.json()["refused"], true);
}

#[test]
fn a_blob_the_registry_refuses_is_not_uploaded_again_for_every_image() {
    // A quota or LimitRange refuses one shared base layer: each image of
    // the repository that needs it fails, with one attempt at the upload.
    let (f, _b, proxy, events, (_, _, _, repo)) = into_empty_registry();
    let image = events
        .iter()
        .find(|e| format!("{}/{}", e.0, e.1) == repo)
        .unwrap()
        .4
        .clone();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(
            f.archive
                .join("blobs/sha256")
                .join(image.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("a single-manifest image")
        .trim_start_matches("sha256:")
        .to_string();
    let users = events
        .iter()
        .filter(|e| format!("{}/{}", e.0, e.1) == repo)
        .count();
    proxy.add_rule(
        Some("PUT"),
        &layer,
        common::proxy::Fault::Status(403),
        100_000,
    );
    let r = run(restore_args(
        &f.archive,
        &proxy.addr,
        &["--imagestream", &repo],
    ));
    assert_ne!(r.code, 0, "{}", r.stderr);
    let failed = r.json()["imagestreams"][&repo]["failures"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(
        failed >= 2,
        "the images that need it fail: {failed} of {users}"
    );
    let uploads = proxy
        .records()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains(&layer))
        .count();
    // Tags run at once: each may try before the other's refusal is known,
    // and a 403 is tried once more with fresh credentials.
    let tags: HashSet<&str> = events
        .iter()
        .filter(|e| format!("{}/{}", e.0, e.1) == repo)
        .map(|e| e.2.as_str())
        .collect();
    assert!(
        uploads <= 2 * tags.len(),
        "{uploads} uploads of the refused layer for {} tags",
        tags.len()
    );
}
