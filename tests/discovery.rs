//! Discovery of ImageStreams against a fake Kubernetes API at the HTTP level.

#[path = "common/fake_kube.rs"]
mod fake_kube;

use std::time::{Duration, Instant};

use fake_kube::{imagestream, FakeKube, FAKE_TOKEN};
use imagestream_archiver::discovery::{
    self, DiscoveryError, DiscoveryOptions, DiscoveryProblem, ProblemKind, RetryPolicy,
};
use imagestream_archiver::imagestream::{
    images_of, is_on_registry, parse_list, ImageStream, StreamRecord,
};

fn opts(namespaces: &[&str], page_size: u32) -> DiscoveryOptions {
    DiscoveryOptions {
        namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        selector: None,
        page_size,
        retry: RetryPolicy {
            attempts: 4,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
        },
    }
}

fn keys(streams: &[ImageStream]) -> Vec<String> {
    streams.iter().map(ImageStream::key).collect()
}

/// What discovery found, with each stream's archived object read back.
#[derive(Debug)]
struct Found {
    streams: Vec<ImageStream>,
    problems: Vec<DiscoveryProblem>,
}

/// Lists through the API as a backup does, keeping the objects, and reads
/// each record's object back into an [`ImageStream`].
async fn discover(client: &kube::Client, opts: &DiscoveryOptions) -> Result<Found, DiscoveryError> {
    let found = discovery::discover_records(client, opts, true).await?;
    let streams = found
        .streams
        .iter()
        .map(|r| serde_json::from_str(&r.object.as_ref().unwrap().json().unwrap()).unwrap())
        .collect();
    Ok(Found {
        streams,
        problems: found.problems,
    })
}

/// Seven streams over three namespaces.
fn seven_streams() -> Vec<serde_json::Value> {
    vec![
        imagestream("team-b", "worker").tag("latest", 2).build(),
        imagestream("team-a", "frontend")
            .label("app", "web")
            .tag("latest", 3)
            .tag("v1.2", 1)
            .build(),
        imagestream("team-a", "backend")
            .label("app", "api")
            .tag("latest", 1)
            .build(),
        imagestream("team-c", "batch").tag("nightly", 4).build(),
        imagestream("team-a", "db-migrate").tag("latest", 1).build(),
        imagestream("team-b", "cron")
            .label("app", "web")
            .tag("latest", 1)
            .build(),
        imagestream("team-c", "tools").tag("latest", 1).build(),
    ]
}

#[tokio::test]
async fn cluster_wide_list_follows_continue_across_three_pages() {
    let fake = FakeKube::builder().streams(seven_streams()).start().await;
    let client = fake.client().await;
    let found = discover(&client, &opts(&[], 3)).await.unwrap();
    assert_eq!(
        keys(&found.streams),
        [
            "team-a/backend",
            "team-a/db-migrate",
            "team-a/frontend",
            "team-b/cron",
            "team-b/worker",
            "team-c/batch",
            "team-c/tools"
        ]
    );
    assert!(found.problems.is_empty(), "{:?}", found.problems);

    let reqs = fake.requests_to("/imagestreams");
    assert_eq!(reqs.len(), 3, "7 items at limit=3 are 3 pages: {reqs:#?}");
    assert!(reqs
        .iter()
        .all(|r| r.path == "/apis/image.openshift.io/v1/imagestreams"));
    assert!(reqs
        .iter()
        .all(|r| r.query.get("limit").map(String::as_str) == Some("3")));
    assert!(!reqs[0].query.contains_key("continue"));
    assert!(reqs[1].query.contains_key("continue"));
    assert!(reqs[2].query.contains_key("continue"));
    assert_ne!(reqs[1].query["continue"], reqs[2].query["continue"]);
    assert!(reqs.iter().all(|r| r.bearer), "the bearer token is sent");

    // The objects are kept as served (metadata, spec, status), except the
    // server's managedFields bookkeeping, which is read and dropped.
    let fe = &found.streams[2];
    assert_eq!(
        fe.metadata.rest["uid"],
        fake_kube::uid("is/team-a/frontend")
    );
    assert!(!fe.metadata.rest.contains_key("managedFields"));
    let stored = serde_json::to_value(fe).unwrap();
    assert!(stored["metadata"].get("managedFields").is_none());
    assert!(fe.metadata.rest.contains_key("resourceVersion"));
    assert_eq!(fe.kind, "ImageStream", "kind restored on list items");
    assert_eq!(fe.api_version, "image.openshift.io/v1");
    let (images, bad) = images_of(fe);
    assert!(bad.is_empty());
    assert_eq!(images.len(), 4, "3 events of latest + 1 of v1.2");
}

#[tokio::test]
async fn per_namespace_lists_page_and_sort() {
    let fake = FakeKube::builder().streams(seven_streams()).start().await;
    let client = fake.client().await;
    // Out of order and repeated on purpose.
    let found = discover(&client, &opts(&["team-c", "team-a", "team-c"], 2))
        .await
        .unwrap();
    assert_eq!(
        keys(&found.streams),
        [
            "team-a/backend",
            "team-a/db-migrate",
            "team-a/frontend",
            "team-c/batch",
            "team-c/tools"
        ]
    );
    let paths: Vec<String> = fake
        .requests_to("/imagestreams")
        .into_iter()
        .map(|r| r.path)
        .collect();
    assert_eq!(
        paths,
        [
            "/apis/image.openshift.io/v1/namespaces/team-a/imagestreams",
            "/apis/image.openshift.io/v1/namespaces/team-a/imagestreams",
            "/apis/image.openshift.io/v1/namespaces/team-c/imagestreams",
        ],
        "team-a is 2 pages of 2, team-c one page, each namespace once"
    );
}

#[tokio::test]
async fn forbidden_namespace_is_reported_and_the_others_go_on() {
    let fake = FakeKube::builder()
        .streams(seven_streams())
        .forbid_namespace("team-b")
        .not_found_namespace("team-z")
        .start()
        .await;
    let client = fake.client().await;
    let found = discover(
        &client,
        &opts(&["team-a", "team-b", "team-c", "team-z"], 100),
    )
    .await
    .unwrap();
    assert_eq!(found.streams.len(), 5);
    assert!(found
        .streams
        .iter()
        .all(|s| s.metadata.namespace != "team-b"));
    assert_eq!(found.problems.len(), 2, "{:?}", found.problems);
    let b = &found.problems[0];
    assert_eq!(b.namespace.as_deref(), Some("team-b"));
    assert_eq!(b.kind, ProblemKind::Forbidden);
    assert!(
        b.message.contains("403") && b.message.contains("cannot list resource"),
        "{}",
        b.message
    );
    let z = &found.problems[1];
    assert_eq!(z.namespace.as_deref(), Some("team-z"));
    assert_eq!(z.kind, ProblemKind::NotFound);
    assert!(!format!("{:?}", found.problems).contains(FAKE_TOKEN));
}

#[tokio::test]
async fn cluster_wide_forbidden_is_a_clear_error() {
    let fake = FakeKube::builder()
        .streams(seven_streams())
        .forbid_cluster_list()
        .start()
        .await;
    let client = fake.client().await;
    let err = discover(&client, &opts(&[], 100)).await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::ClusterForbidden { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("--namespace"), "{msg}");
    assert!(msg.contains("registry-viewer"), "{msg}");
    assert!(
        msg.contains("at the cluster scope"),
        "server message kept: {msg}"
    );
    assert!(!msg.contains(FAKE_TOKEN));
    assert_eq!(
        fake.requests_to("/imagestreams").len(),
        1,
        "403 is not retried"
    );
}

#[tokio::test]
async fn throttled_then_success_honours_retry_after() {
    let fake = FakeKube::builder()
        .streams(seven_streams())
        .throttle_first(2, 1)
        .start()
        .await;
    let client = fake.client().await;
    let start = Instant::now();
    let found = discover(&client, &opts(&[], 100)).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(found.streams.len(), 7);
    assert_eq!(
        fake.requests_to("/imagestreams").len(),
        3,
        "two 429s, then the page"
    );
    assert!(
        waited >= Duration::from_secs(2),
        "Retry-After: 1 twice, waited {waited:?}"
    );
    assert!(waited < Duration::from_secs(8), "bounded: {waited:?}");
}

#[tokio::test]
async fn persistent_server_errors_give_up_after_the_bounded_attempts() {
    let fake = FakeKube::builder()
        .streams(seven_streams())
        .unavailable_first(100)
        .start()
        .await;
    let client = fake.client().await;
    let err = discover(&client, &opts(&[], 100)).await.unwrap_err();
    match &err {
        DiscoveryError::Status {
            code,
            attempts,
            scope,
            ..
        } => {
            assert_eq!((*code, *attempts), (503, 4));
            assert_eq!(scope, "all namespaces");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(fake.requests_to("/imagestreams").len(), 4);

    // Per namespace, the same failure is a problem of that namespace only.
    let fake = FakeKube::builder()
        .streams(seven_streams())
        .unavailable_first(4)
        .start()
        .await;
    let client = fake.client().await;
    let found = discover(&client, &opts(&["team-a", "team-c"], 100))
        .await
        .unwrap();
    assert_eq!(found.problems.len(), 1);
    assert_eq!(found.problems[0].kind, ProblemKind::Other);
    assert_eq!(found.problems[0].namespace.as_deref(), Some("team-a"));
    assert_eq!(keys(&found.streams), ["team-c/batch", "team-c/tools"]);
}

#[tokio::test]
async fn expired_continue_token_restarts_the_list_once() {
    let fake = FakeKube::builder()
        .streams(seven_streams())
        .expire_continue_tokens(1)
        .start()
        .await;
    let client = fake.client().await;
    let found = discover(&client, &opts(&[], 3)).await.unwrap();
    assert_eq!(found.streams.len(), 7, "no item lost or doubled");
    let reqs = fake.requests_to("/imagestreams");
    let with_continue: Vec<bool> = reqs
        .iter()
        .map(|r| r.query.contains_key("continue"))
        .collect();
    // page 1, page 2 -> 410, restart: page 1, 2, 3
    assert_eq!(with_continue, [false, true, false, true, true]);

    // Expiring again after the restart is an error, not a loop.
    let fake = FakeKube::builder()
        .streams(seven_streams())
        .expire_continue_tokens(2)
        .start()
        .await;
    let client = fake.client().await;
    let err = discover(&client, &opts(&[], 3)).await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::ContinueExpired { .. }),
        "{err:?}"
    );
    assert_eq!(fake.requests_to("/imagestreams").len(), 4);
}

#[tokio::test]
async fn empty_status_tag_without_items_and_external_images() {
    let external = imagestream("team-a", "nginx")
        .external_tag("1.25", "quay.io/nginx/nginx", 2)
        .failed_import_tag("broken", "quay.io/nginx/nginx:does-not-exist")
        .tag("local", 1);
    let fake = FakeKube::builder()
        .streams([
            imagestream("team-a", "fresh").empty_status().build(),
            imagestream("team-a", "bare").no_status().build(),
            external.build(),
        ])
        .start()
        .await;
    let client = fake.client().await;
    let found = discover(&client, &opts(&["team-a"], 100)).await.unwrap();
    assert!(found.problems.is_empty(), "{:?}", found.problems);
    assert_eq!(
        keys(&found.streams),
        ["team-a/bare", "team-a/fresh", "team-a/nginx"]
    );

    let bare = &found.streams[0];
    assert!(bare.status.tags.is_empty());
    let fresh = &found.streams[1];
    assert!(fresh.status.tags.is_empty());
    assert_eq!(
        fresh.status.docker_image_repository,
        "image-registry.openshift-image-registry.svc:5000/team-a/fresh"
    );
    assert!(images_of(fresh).0.is_empty());

    let nginx = &found.streams[2];
    let broken = nginx
        .status
        .tags
        .iter()
        .find(|t| t.tag == "broken")
        .unwrap();
    assert!(broken.items.is_empty(), "items: null is an empty history");
    assert_eq!(
        broken.rest["conditions"][0]["type"], "ImportSuccess",
        "conditions kept"
    );
    let (images, bad) = images_of(nginx);
    assert!(bad.is_empty());
    assert_eq!(images.len(), 3, "2 external events + 1 local");
    let ext: Vec<_> = images
        .iter()
        .filter(|i| {
            !is_on_registry(
                &i.docker_image_reference(),
                fake_kube::INTERNAL_REGISTRY,
                &nginx.status.docker_image_repository,
            )
        })
        .collect();
    assert_eq!(
        ext.len(),
        2,
        "external images are kept, not filtered by discovery"
    );
    assert_eq!(
        ext[0].docker_image_reference(),
        format!("quay.io/nginx/nginx@{}", external.digest("1.25", 0))
    );
    assert_eq!(ext[1].position, 1);
    // spec kept as served
    assert_eq!(nginx.spec["tags"][0]["from"]["kind"], "DockerImage");
}

#[tokio::test]
async fn selector_is_passed_to_the_api() {
    let fake = FakeKube::builder().streams(seven_streams()).start().await;
    let client = fake.client().await;
    let mut o = opts(&[], 1);
    o.selector = Some("app=web".into());
    let found = discover(&client, &o).await.unwrap();
    assert_eq!(keys(&found.streams), ["team-a/frontend", "team-b/cron"]);
    let reqs = fake.requests_to("/imagestreams");
    assert_eq!(reqs.len(), 2, "one page per match at limit=1");
    assert!(
        reqs.iter()
            .all(|r| r.query.get("labelSelector").map(String::as_str) == Some("app=web")),
        "{reqs:#?}"
    );
}

#[tokio::test]
async fn malformed_item_is_a_problem_not_a_failure() {
    let mut broken = imagestream("team-a", "weird").tag("latest", 1).build();
    broken["status"]["tags"] = serde_json::json!("not-a-list");
    let fake = FakeKube::builder()
        .streams([
            broken,
            imagestream("team-a", "fine").tag("latest", 1).build(),
        ])
        .items_keep_kind()
        .start()
        .await;
    let client = fake.client().await;
    let found = discover(&client, &opts(&[], 100)).await.unwrap();
    assert_eq!(keys(&found.streams), ["team-a/fine"]);
    assert_eq!(found.problems.len(), 1);
    assert_eq!(found.problems[0].namespace.as_deref(), Some("team-a"));
    assert!(
        found.problems[0].message.contains("weird"),
        "{}",
        found.problems[0].message
    );
}

#[tokio::test]
async fn unreachable_api_server_is_a_transport_error() {
    // Bind and drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let client = discovery::client_from_config(config).unwrap();
    let err = discover(&client, &opts(&["team-a"], 10)).await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::Transport { attempts: 4, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("namespace team-a"), "{err}");
}

#[test]
fn from_file_applies_namespaces_and_selector() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("is.json");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": seven_streams()});
    std::fs::write(&path, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    let mut o = opts(&["team-a", "team-b"], 0);
    o.selector = Some("app=web".into());
    let all = discovery::records_from_file(&path, &DiscoveryOptions::default(), false).unwrap();
    assert_eq!(all.streams.len(), 7);
    // The selected streams, parsed whole by the typed reader: what every
    // record is checked against.
    let typed = parse_list(&std::fs::read(&path).unwrap(), "test").unwrap();
    let found: Vec<ImageStream> = ["team-a/frontend", "team-b/cron"]
        .iter()
        .map(|k| typed.iter().find(|is| is.key() == *k).unwrap().clone())
        .collect();
    assert_eq!(keys(&found), ["team-a/frontend", "team-b/cron"]);

    // Read item by item into compact records: the selected streams, with
    // their objects only when asked.
    for keep in [false, true] {
        let records = discovery::records_from_file(&path, &o, keep).unwrap();
        let names: Vec<String> = records.streams.iter().map(|r| r.key()).collect();
        assert_eq!(names, ["team-a/frontend", "team-b/cron"]);
        assert_records_match(&records.streams, &found, keep);
    }
    assert!(discovery::records_from_file(&dir.path().join("missing.json"), &o, false).is_err());
}

/// Each record has the key, every tag event (tag, position, digest,
/// reference, created) and, when `keep`, the object of the typed stream.
fn assert_records_match(records: &[StreamRecord], typed: &[ImageStream], keep: bool) {
    let names: Vec<String> = records.iter().map(|r| r.key()).collect();
    assert_eq!(names, keys(typed));
    for (r, is) in records.iter().zip(typed) {
        let expected: Vec<_> = is
            .status
            .tags
            .iter()
            .flat_map(|t| {
                t.items.iter().enumerate().map(move |(position, item)| {
                    (
                        t.tag.clone(),
                        position,
                        item.image.clone(),
                        item.docker_image_reference.clone(),
                        item.created.clone(),
                    )
                })
            })
            .collect();
        let got: Vec<_> = r
            .refs
            .iter()
            .map(|i| {
                (
                    i.tag.to_string(),
                    i.position,
                    i.digest.to_string(),
                    i.docker_image_reference().into_owned(),
                    i.created.to_string(),
                )
            })
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(got, expected);
        assert_eq!(r.object.is_some(), keep);
        if let Some(object) = &r.object {
            assert_eq!(object.json().unwrap(), serde_json::to_string(is).unwrap());
        }
    }
}

#[tokio::test]
async fn api_items_become_records_page_by_page_as_the_served_list() {
    // Items without kind (as some servers list them) and one unreadable item.
    let mut broken = imagestream("team-b", "weird").tag("latest", 1).build();
    broken["status"]["tags"] = serde_json::json!("not-a-list");
    let mut streams = seven_streams();
    streams.push(broken);
    let fake = FakeKube::builder().streams(streams).start().await;
    let client = fake.client().await;
    // The served streams, parsed whole by the typed parser, in order.
    let mut typed: Vec<ImageStream> = seven_streams()
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    typed.sort_by_key(ImageStream::key);
    for keep in [false, true] {
        let found = discovery::discover_records(&client, &opts(&[], 3), keep)
            .await
            .unwrap();
        assert_records_match(&found.streams, &typed, keep);
        assert_eq!(found.problems.len(), 1, "{:?}", found.problems);
        assert_eq!(found.problems[0].namespace.as_deref(), Some("team-b"));
        assert!(found.problems[0].message.contains("ImageStream weird"));
    }

    // Per namespace, across an expired continue token: nothing lost or
    // doubled by the restart.
    let fake = FakeKube::builder()
        .streams(seven_streams())
        .expire_continue_tokens(1)
        .start()
        .await;
    let client = fake.client().await;
    let found = discovery::discover_records(&client, &opts(&["team-b", "team-a"], 2), false)
        .await
        .unwrap();
    let typed: Vec<ImageStream> = typed
        .into_iter()
        .filter(|is| is.metadata.namespace != "team-c")
        .collect();
    assert_records_match(&found.streams, &typed, false);
    assert!(found.problems.is_empty(), "{:?}", found.problems);
}

#[tokio::test]
async fn rejected_credentials_are_fatal_even_per_namespace() {
    let fake = FakeKube::builder().streams(seven_streams()).start().await;
    // No token at all: the fake answers 401 like an API server.
    let config = kube::Config::new(fake.url().parse().unwrap());
    let client = discovery::client_from_config(config).unwrap();
    let err = discover(&client, &opts(&["team-a", "team-b"], 10))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DiscoveryError::Unauthorized { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("namespace team-a"), "{err}");
    assert_eq!(
        fake.requests_to("/imagestreams").len(),
        1,
        "stops at the first 401"
    );
}
