//! Re-applying archived ImageStream specs through the Kubernetes API
//! (`restore --apply-imagestreams`).
//!
//! A push recreates images, tags and their history, but not what only the
//! ImageStream's `spec` says: tags that track external images
//! (`spec.tags[].from.kind: DockerImage`), tags that follow other tags
//! (`ImageStreamTag`), import and reference policies, and the lookup policy.
//! After the push, [`apply`] puts the archived `spec` back:
//!
//! - the stream does not exist: `POST` a new ImageStream with the archived
//!   name, labels, annotations (minus `kubectl.kubernetes.io/last-applied-configuration`)
//!   and spec, in the (mapped) namespace;
//! - it exists (on OpenShift the push has usually created it): a strategic
//!   merge patch (`application/strategic-merge-patch+json`) of the spec and
//!   the archived labels and annotations, skipped when it would change
//!   nothing. `spec.tags` merges by tag name (its `patchMergeKey`), so the
//!   archived tags are put back and tags only the target has stay, as do
//!   its other labels and annotations: a restore only adds.
//!
//! `status` is never sent: the API server owns it, and the push has already
//! recreated the tag histories. `spec.tags[].generation` is left out too: the
//! server assigns generations. With `--map-namespace`, the object's namespace
//! and the `from.namespace` of `ImageStreamTag`/`ImageStreamImage` references
//! into a mapped namespace are rewritten, as are `DockerImage` references to
//! the stream's own internal registry under a mapped namespace.
//!
//! Two archived streams that `--map-namespace` puts on one target are not
//! merged, as in the push: the one already in that namespace is applied,
//! the other is reported as not applied.
//!
//! Failures are per stream: one refused stream does not stop the others.

use std::collections::BTreeMap;

use http::StatusCode;
use kube::api::{GetParams, Patch, PatchParams, PostParams};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::digest::Digest;
use crate::discovery::{send_with_retry, status_message, CallError, RetryPolicy, IMAGE_API};
use crate::imagestream::{self, ImageStream, ImageStreamError, ImageStreamStatus};
use crate::layout::{Layout, LayoutError};

/// The annotation `kubectl apply` keeps; it describes the source cluster's
/// last apply and is not carried over.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What to apply and how.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Only streams of these archived namespaces (all when empty).
    pub namespaces: Vec<String>,
    /// Only these archived streams, `ns/name` (all when empty).
    pub imagestreams: Vec<String>,
    /// Archived namespace -> target namespace.
    pub map_namespaces: BTreeMap<String, String>,
    /// Read only: report what would be created or patched.
    pub dry_run: bool,
    /// Retries and per-request timeout of the API calls.
    pub retry: RetryPolicy,
}

/// What happened to one ImageStream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// The stream did not exist and was created.
    Created,
    /// The stream existed and its spec was patched.
    Patched,
    /// The stream existed with the archived spec already.
    Unchanged,
    /// Dry run: the stream does not exist and would be created.
    WouldCreate,
    /// Dry run: the stream exists and its spec would be patched.
    WouldPatch,
    /// The API server refused or could not be reached.
    Failed,
}

/// The outcome for one ImageStream, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// The target stream, `namespace/name`.
    pub imagestream: String,
    /// The archived stream, `namespace/name`, when its namespace was mapped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// What was done.
    pub action: Action,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Applied {
    /// True when this stream could not be applied.
    pub fn failed(&self) -> bool {
        self.action == Action::Failed
    }
}

/// Errors reading the archived ImageStream objects.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// `index.json` could not be read.
    #[error("reading the archive's index.json")]
    Index(#[source] LayoutError),
    /// The ImageStream list blob could not be read, or no longer matches
    /// its digest.
    #[error("reading the archived ImageStream list")]
    List(#[source] LayoutError),
    /// The ImageStream list is not a list of ImageStreams.
    #[error("parsing the archived ImageStream list")]
    Parse(#[source] ImageStreamError),
}

/// Reads the ImageStream objects the committed `index.json` references
/// (the List blob named by its `io.imagestream-archiver.imagestreams`
/// annotation), checking the blob's digest. An archive without that list
/// has no streams.
pub fn archived_streams(layout: &Layout) -> Result<Vec<ImageStream>, ApplyError> {
    let index = layout.read_index().map_err(ApplyError::Index)?;
    let Some(digest) = index.imagestreams else {
        return Ok(Vec::new());
    };
    let bytes = layout
        .read_blob_checked(&digest, crate::layout::MAX_INDEX_SIZE)
        .map_err(ApplyError::List)?;
    imagestream::parse_list(&bytes, &format!("archived ImageStream list {digest}"))
        .map_err(ApplyError::Parse)
}

/// One ImageStream to apply: where it came from and the object to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The archived stream, `namespace/name`.
    pub source: String,
    /// The target namespace.
    pub namespace: String,
    /// The stream name.
    pub name: String,
    /// The object for a `POST` (its `spec` is also the merge patch's).
    pub object: Value,
}

impl Desired {
    /// The target stream, `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The `spec` to apply.
    pub fn spec(&self) -> &Value {
        &self.object["spec"]
    }

    /// The strategic merge patch for a stream that exists (the push
    /// creates it on OpenShift): the archived spec, labels and annotations.
    /// Tags, labels and annotations the stream has beyond the archived ones
    /// stay ([`merge_spec`]).
    pub fn patch(&self) -> Value {
        let metadata: Map<String, Value> = ["labels", "annotations"]
            .into_iter()
            .filter_map(|k| Some((k.to_string(), self.object["metadata"].get(k)?.clone())))
            .collect();
        let mut patch = json!({ "spec": self.spec() });
        if !metadata.is_empty() {
            patch["metadata"] = Value::Object(metadata);
        }
        patch
    }
}

/// Selects the archived streams `opts` asks for and builds the objects to
/// apply, namespaces mapped, sorted by target namespace and name. Two
/// archived streams that `--map-namespace` puts on one target stream are
/// not merged, as in the push (`restore::claim_targets`): the one
/// already in that namespace (or the first mapped) is applied; the others come back second,
/// with the stream that took their place.
pub fn desired_objects(
    streams: &[ImageStream],
    opts: &ApplyOptions,
) -> (Vec<Desired>, Vec<(Desired, String)>) {
    let selected: Vec<&ImageStream> = streams
        .iter()
        .filter(|is| opts.namespaces.is_empty() || opts.namespaces.contains(&is.metadata.namespace))
        .filter(|is| opts.imagestreams.is_empty() || opts.imagestreams.contains(&is.key()))
        .collect();
    let (kept, left_out) = crate::restore::claim_targets(
        selected,
        &opts.map_namespaces,
        |is: &&ImageStream| -> &str { &is.metadata.namespace },
        |is: &&ImageStream| -> &str { &is.metadata.name },
    );
    let mut out: Vec<Desired> = kept
        .into_iter()
        .map(|is| desired_object(is, &opts.map_namespaces))
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let left_out = left_out
        .into_iter()
        .map(|(is, source)| {
            let winner = format!("{source}/{}", is.metadata.name);
            (desired_object(is, &opts.map_namespaces), winner)
        })
        .collect();
    (out, left_out)
}

/// Builds the object to apply for one archived stream: name, mapped
/// namespace, labels, annotations (without [`LAST_APPLIED`]) and the spec
/// (see [`desired_spec`]); never `status`.
pub fn desired_object(is: &ImageStream, map: &BTreeMap<String, String>) -> Desired {
    let source_ns = &is.metadata.namespace;
    let namespace = map
        .get(source_ns)
        .cloned()
        .unwrap_or_else(|| source_ns.clone());
    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(is.metadata.name));
    metadata.insert("namespace".into(), json!(namespace));
    if !is.metadata.labels.is_empty() {
        metadata.insert("labels".into(), json!(is.metadata.labels));
    }
    if let Some(Value::Object(annotations)) = is.metadata.rest.get("annotations") {
        let kept: Map<String, Value> = annotations
            .iter()
            .filter(|(k, v)| k.as_str() != LAST_APPLIED && !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !kept.is_empty() {
            metadata.insert("annotations".into(), Value::Object(kept));
        }
    }
    let object = json!({
        "apiVersion": "image.openshift.io/v1",
        "kind": "ImageStream",
        "metadata": metadata,
        "spec": desired_spec(&is.spec, map, &internal_hosts(&is.status)),
    });
    Desired {
        source: is.key(),
        namespace,
        name: is.metadata.name.clone(),
        object,
    }
}

/// The names of the stream's internal registry: the service's host from
/// `status.dockerImageRepository` (`NAME.NS.svc:PORT`, also reachable as
/// `NAME.NS.svc.cluster.local:PORT`) and the route's host from
/// `status.publicDockerImageRepository`.
fn internal_hosts(status: &ImageStreamStatus) -> Vec<String> {
    let host_of = |repo: &str| {
        repo.split('/')
            .next()
            .filter(|h| !h.is_empty())
            .map(str::to_string)
    };
    let mut hosts = Vec::new();
    if let Some(host) = host_of(&status.docker_image_repository) {
        let (name, port) = host.split_once(':').unwrap_or((&host, ""));
        let other = match name.strip_suffix(".cluster.local") {
            Some(short) => short.to_string(),
            None if name.ends_with(".svc") => format!("{name}.cluster.local"),
            None => String::new(),
        };
        if !other.is_empty() {
            hosts.push(match port {
                "" => other,
                port => format!("{other}:{port}"),
            });
        }
        hosts.push(host);
    }
    hosts.extend(
        status
            .public_docker_image_repository
            .as_deref()
            .and_then(host_of),
    );
    hosts
}

/// The archived `spec`, ready to apply: null members dropped, the
/// server-assigned `tags[].generation` dropped, and namespaces mapped in
/// `tags[].from`: the `namespace` of `ImageStreamTag`/`ImageStreamImage`
/// references, and the namespace part of `DockerImage` references to one
/// of `registry_hosts` (the stream's internal registry).
pub fn desired_spec(
    spec: &Value,
    map: &BTreeMap<String, String>,
    registry_hosts: &[String],
) -> Value {
    let mut spec = drop_nulls(spec.clone());
    if !spec.is_object() {
        spec = json!({});
    }
    if let Some(Value::Array(tags)) = spec.get_mut("tags") {
        for tag in tags.iter_mut() {
            let Some(tag) = tag.as_object_mut() else {
                continue;
            };
            tag.remove("generation");
            let Some(Value::Object(from)) = tag.get_mut("from") else {
                continue;
            };
            let kind = from.get("kind").and_then(Value::as_str).unwrap_or_default();
            match kind {
                "ImageStreamTag" | "ImageStreamImage" => {
                    let mapped = from
                        .get("namespace")
                        .and_then(Value::as_str)
                        .and_then(|ns| map.get(ns));
                    if let Some(new) = mapped {
                        from.insert("namespace".into(), json!(new));
                    }
                }
                "DockerImage" => {
                    let name = from.get("name").and_then(Value::as_str).unwrap_or_default();
                    let mapped = registry_hosts
                        .iter()
                        .find_map(|host| map_internal_reference(name, map, host));
                    if let Some(new) = mapped {
                        from.insert("name".into(), json!(new));
                    }
                }
                _ => {}
            }
        }
    }
    spec
}

/// `HOST/OLD/rest` -> `HOST/NEW/rest` when HOST is the internal registry and
/// OLD is mapped.
fn map_internal_reference(
    name: &str,
    map: &BTreeMap<String, String>,
    host: &str,
) -> Option<String> {
    let rest = name.strip_prefix(host)?.strip_prefix('/')?;
    let (ns, tail) = rest.split_once('/')?;
    let new = map.get(ns)?;
    Some(format!("{host}/{new}/{tail}"))
}

/// Removes object members whose value is null, recursively.
fn drop_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, drop_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(drop_nulls).collect()),
        other => other,
    }
}

/// What the API server makes of a strategic merge patch of an
/// ImageStream's `spec`: RFC 7386 for all but `tags`, whose elements merge
/// by `name` (`patchMergeKey` of `ImageStreamSpec.Tags`): a tag the patch
/// names is merged into the stream's tag of that name or added, the
/// stream's other tags stay.
pub fn merge_spec(spec: &mut Value, patch: &Value) {
    let mut rest = patch.clone();
    let tags = rest.as_object_mut().and_then(|p| p.remove("tags"));
    json_patch::merge(spec, &rest);
    let Some(Value::Array(tags)) = tags else {
        return;
    };
    let Some(Value::Array(current)) = spec
        .as_object_mut()
        .map(|s| s.entry("tags").or_insert_with(|| json!([])))
        .map(|t| {
            if !t.is_array() {
                *t = json!([]);
            }
            t
        })
    else {
        return;
    };
    for tag in tags {
        match current
            .iter_mut()
            .find(|t| t.get("name") == tag.get("name"))
        {
            Some(t) => json_patch::merge(t, &tag),
            None => current.push(tag),
        }
    }
}

/// A spec without the server-assigned `tags[].generation`, for comparing.
fn comparable(spec: &Value) -> Value {
    let mut spec = drop_nulls(spec.clone());
    if let Some(Value::Array(tags)) = spec.get_mut("tags") {
        for tag in tags.iter_mut().filter_map(Value::as_object_mut) {
            tag.remove("generation");
        }
    }
    spec
}

/// True when merging `desired` into `current` ([`merge_spec`]) would
/// change it (the server-assigned tag generations aside).
pub fn spec_would_change(current: &Value, desired: &Value) -> bool {
    let before = comparable(current);
    let mut after = before.clone();
    merge_spec(&mut after, desired);
    comparable(&after) != before
}

/// True when the patch [`Desired::patch`] would change the stream
/// `current`: its spec, labels or annotations.
pub fn would_change(current: &Value, patch: &Value) -> bool {
    let spec = current.get("spec").unwrap_or(&Value::Null);
    spec_would_change(spec, &patch["spec"])
        || patch.get("metadata").is_some_and(|m| {
            let before = current.get("metadata").cloned().unwrap_or(Value::Null);
            let mut after = before.clone();
            json_patch::merge(&mut after, m);
            after != before
        })
}

/// Applies the selected archived streams through the API server (see the
/// module documentation). Never fails as a whole: each stream gets an
/// [`Applied`], failures included.
pub async fn apply(
    client: &kube::Client,
    streams: &[ImageStream],
    opts: &ApplyOptions,
) -> Vec<Applied> {
    let mut out = Vec::new();
    let (desired_objects, left_out) = desired_objects(streams, opts);
    for (desired, winner) in left_out {
        let message = format!(
            "not applied: --map-namespace would put it on {}, which {winner} takes",
            desired.key()
        );
        tracing::warn!(imagestream = %desired.source, "{message}");
        out.push(Applied {
            imagestream: desired.key(),
            from: Some(desired.source),
            action: Action::Failed,
            message: Some(message),
        });
    }
    for desired in desired_objects {
        let from = (desired.source != desired.key()).then(|| desired.source.clone());
        let (action, message) = match apply_one(client, &desired, opts).await {
            Ok(action) => (action, None),
            Err(message) => (Action::Failed, Some(message)),
        };
        match action {
            Action::Failed => tracing::warn!(
                imagestream = %desired.key(),
                "cannot apply the archived ImageStream spec: {}",
                message.as_deref().unwrap_or_default()
            ),
            _ => tracing::info!(imagestream = %desired.key(), ?action, "ImageStream spec"),
        }
        out.push(Applied {
            imagestream: desired.key(),
            from,
            action,
            message,
        });
    }
    out
}

/// GET, then POST or PATCH one stream; the error is the report's message.
async fn apply_one(
    client: &kube::Client,
    desired: &Desired,
    opts: &ApplyOptions,
) -> Result<Action, String> {
    let collection = format!("{IMAGE_API}/namespaces/{}/imagestreams", desired.namespace);
    let current = get_stream(
        client,
        &desired.namespace,
        &desired.name,
        &opts.retry,
        WRITE_RIGHTS,
    )
    .await?;
    match current {
        None if opts.dry_run => Ok(Action::WouldCreate),
        None => match create(client, &collection, desired, opts).await? {
            Some(action) => Ok(action),
            // Created by someone else in between (409): patch it instead.
            None => patch(client, &collection, desired, opts).await,
        },
        Some(current) => {
            if !would_change(&current, &desired.patch()) {
                Ok(Action::Unchanged)
            } else if opts.dry_run {
                Ok(Action::WouldPatch)
            } else {
                patch(client, &collection, desired, opts).await
            }
        }
    }
}

/// The rights `--apply-imagestreams` needs, named when they are missing.
const WRITE_RIGHTS: &str = "get, create and patch";

/// GETs one stream; `Ok(None)` when it does not exist. The error is the
/// report's message, naming `rights` when the API refuses (403).
async fn get_stream(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    retry: &RetryPolicy,
    rights: &str,
) -> Result<Option<Value>, String> {
    let collection = format!("{IMAGE_API}/namespaces/{namespace}/imagestreams");
    let key = format!("{namespace}/{name}");
    let get = || {
        kube::core::Request::new(collection.as_str())
            .get(name, &GetParams::default())
            .map_err(|e| e.to_string())
    };
    let resp = send_with_retry(client, get, retry)
        .await
        .map_err(|e| call_message("reading", &key, e))?;
    match resp.status {
        StatusCode::OK => serde_json::from_slice::<Value>(&resp.body)
            .map(Some)
            .map_err(|e| format!("reading ImageStream {key}: the answer is not JSON: {e}")),
        StatusCode::NOT_FOUND => Ok(None),
        code => Err(status_text("reading", &key, code, &resp.body, rights)),
    }
}

/// The tag histories (`status.tags[].items[].image`, newest first) of the
/// target streams `ns/name`, read through the API server before a restore
/// pushes anything (`restore --keep-target-history`). A stream that does not
/// exist has no tags; one that cannot be read has the reason.
pub async fn tag_histories(
    client: &kube::Client,
    streams: &std::collections::BTreeSet<(String, String)>,
    retry: &RetryPolicy,
) -> TagHistories {
    use futures::StreamExt;
    // Several GETs in flight: thousands of streams would otherwise wait
    // one round trip each before the first push.
    futures::stream::iter(streams)
        .map(|(ns, name)| async move {
            let key = format!("{ns}/{name}");
            let tags = get_stream(client, ns, name, retry, "get")
                .await
                .and_then(|v| match v {
                    Some(v) => tags_of(&key, &v),
                    None => Ok(BTreeMap::new()),
                });
            if let Err(message) = &tags {
                tracing::warn!(imagestream = %key, "{message}; its tags are not pushed");
            }
            ((ns.clone(), name.clone()), tags)
        })
        .buffer_unordered(HISTORY_READS)
        .collect()
        .await
}

/// ImageStream GETs [`tag_histories`] keeps in flight.
const HISTORY_READS: usize = 16;

/// tag -> image digests, newest first, of one ImageStream object.
fn tags_of(key: &str, is: &Value) -> Result<BTreeMap<String, Vec<Digest>>, String> {
    let status: ImageStreamStatus =
        serde_json::from_value(is.get("status").cloned().unwrap_or(Value::Null))
            .map_err(|e| format!("reading ImageStream {key}: its status: {e}"))?;
    Ok(status
        .tags
        .into_iter()
        .map(|t| {
            let items = t
                .items
                .iter()
                .filter_map(|i| Digest::parse(&i.image).ok())
                .collect();
            (t.tag, items)
        })
        .collect())
}

/// Target `(namespace, name)` -> tag -> image digests, newest first, or why
/// the stream could not be read.
pub type TagHistories = BTreeMap<(String, String), Result<BTreeMap<String, Vec<Digest>>, String>>;

/// POSTs the new stream; `Ok(None)` when it already exists (409).
async fn create(
    client: &kube::Client,
    collection: &str,
    desired: &Desired,
    opts: &ApplyOptions,
) -> Result<Option<Action>, String> {
    let key = desired.key();
    let body = serde_json::to_vec(&desired.object)
        .map_err(|e| format!("creating ImageStream {key}: cannot encode it: {e}"))?;
    let post = || {
        kube::core::Request::new(collection)
            .create(&PostParams::default(), body.clone())
            .map_err(|e| e.to_string())
    };
    let resp = send_with_retry(client, post, &opts.retry)
        .await
        .map_err(|e| call_message("creating", &key, e))?;
    match resp.status {
        StatusCode::OK | StatusCode::CREATED | StatusCode::ACCEPTED => Ok(Some(Action::Created)),
        StatusCode::CONFLICT => Ok(None),
        code => Err(status_text(
            "creating",
            &key,
            code,
            &resp.body,
            WRITE_RIGHTS,
        )),
    }
}

/// Patches [`Desired::patch`] onto the existing stream.
async fn patch(
    client: &kube::Client,
    collection: &str,
    desired: &Desired,
    opts: &ApplyOptions,
) -> Result<Action, String> {
    let key = desired.key();
    let body = Patch::Strategic(desired.patch());
    let req = || {
        kube::core::Request::new(collection)
            .patch(&desired.name, &PatchParams::default(), &body)
            .map_err(|e| e.to_string())
    };
    let resp = send_with_retry(client, req, &opts.retry)
        .await
        .map_err(|e| call_message("patching", &key, e))?;
    match resp.status {
        StatusCode::OK => Ok(Action::Patched),
        code => Err(status_text(
            "patching",
            &key,
            code,
            &resp.body,
            WRITE_RIGHTS,
        )),
    }
}

/// The message of an error status, with the rights needed on a 403.
fn status_text(verb: &str, key: &str, code: StatusCode, body: &[u8], rights: &str) -> String {
    let mut msg = format!(
        "{verb} ImageStream {key}: HTTP {}: {}",
        code.as_u16(),
        status_message(body)
    );
    if code == StatusCode::FORBIDDEN {
        let ns = key.split('/').next().unwrap_or_default();
        msg.push_str(&format!(
            "; the service account needs {rights} on imagestreams.image.openshift.io \
             in namespace {ns} (e.g. the cluster role registry-editor)"
        ));
    }
    msg
}

/// The message of a request that got no answer.
fn call_message(verb: &str, key: &str, e: CallError) -> String {
    match e {
        CallError::Build(reason) => format!("{verb} ImageStream {key}: {reason}"),
        CallError::Transport { source, attempts } => {
            format!(
                "{verb} ImageStream {key}: request failed after {attempts} attempt(s): {source}"
            )
        }
        CallError::Timeout { timeout, attempts } => format!(
            "{verb} ImageStream {key}: no answer within {timeout:?} ({attempts} attempt(s))"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> ImageStream {
        serde_json::from_value(json!({
            "apiVersion": "image.openshift.io/v1",
            "kind": "ImageStream",
            "metadata": {
                "name": "web", "namespace": "team-a", "uid": "u-1", "resourceVersion": "7",
                "labels": {"app": "web"},
                "annotations": {
                    LAST_APPLIED: "{}",
                    "openshift.io/display-name": "Web"
                }
            },
            "spec": {
                "lookupPolicy": {"local": true},
                "tags": [
                    {"name": "ext", "annotations": null, "generation": 4,
                     "from": {"kind": "DockerImage", "name": "quay.io/org/web:1"},
                     "importPolicy": {"scheduled": true, "importMode": "PreserveOriginal"},
                     "referencePolicy": {"type": "Local"}},
                    {"name": "stable", "generation": 2,
                     "from": {"kind": "ImageStreamTag", "name": "web:latest", "namespace": "team-a"}},
                    {"name": "base", "from": {"kind": "ImageStreamTag", "name": "base:1", "namespace": "shared"}},
                    {"name": "mirror", "from": {"kind": "DockerImage",
                     "name": "image-registry.openshift-image-registry.svc:5000/team-a/web@sha256:00"}}
                ]
            },
            "status": {
                "dockerImageRepository": "image-registry.openshift-image-registry.svc:5000/team-a/web",
                "tags": [{"tag": "latest", "items": []}]
            }
        }))
        .unwrap()
    }

    fn map() -> BTreeMap<String, String> {
        [("team-a".to_string(), "team-z".to_string())].into()
    }

    #[test]
    fn object_is_mapped_without_status_generation_or_last_applied() {
        let d = desired_object(&stream(), &map());
        assert_eq!(d.key(), "team-z/web");
        assert_eq!(d.source, "team-a/web");
        let o = &d.object;
        assert!(o.get("status").is_none());
        assert_eq!(
            o["metadata"],
            json!({"name": "web", "namespace": "team-z", "labels": {"app": "web"},
                   "annotations": {"openshift.io/display-name": "Web"}})
        );
        let tags = o["spec"]["tags"].as_array().unwrap();
        assert!(tags.iter().all(|t| t.get("generation").is_none()));
        assert!(tags[0].get("annotations").is_none(), "nulls dropped");
        assert_eq!(tags[0]["from"]["name"], "quay.io/org/web:1");
        assert_eq!(tags[0]["importPolicy"]["scheduled"], true);
        assert_eq!(tags[0]["referencePolicy"]["type"], "Local");
        assert_eq!(tags[1]["from"]["namespace"], "team-z", "mapped");
        assert_eq!(tags[2]["from"]["namespace"], "shared", "not mapped");
        assert_eq!(
            tags[3]["from"]["name"],
            "image-registry.openshift-image-registry.svc:5000/team-z/web@sha256:00"
        );
        assert_eq!(o["spec"]["lookupPolicy"]["local"], true);
    }

    #[test]
    fn selection_uses_archived_names() {
        let s = [stream()];
        let opts = |ns: &[&str], is: &[&str]| ApplyOptions {
            namespaces: ns.iter().map(|s| s.to_string()).collect(),
            imagestreams: is.iter().map(|s| s.to_string()).collect(),
            map_namespaces: map(),
            ..Default::default()
        };
        assert_eq!(desired_objects(&s, &opts(&[], &[])).0.len(), 1);
        assert_eq!(desired_objects(&s, &opts(&["team-a"], &[])).0.len(), 1);
        assert_eq!(desired_objects(&s, &opts(&["team-z"], &[])).0.len(), 0);
        assert_eq!(desired_objects(&s, &opts(&[], &["team-a/web"])).0.len(), 1);
        assert_eq!(desired_objects(&s, &opts(&[], &["team-a/api"])).0.len(), 0);
    }

    #[test]
    fn streams_mapped_onto_one_are_not_merged() {
        let mut mapped_first = stream();
        mapped_first.metadata.namespace = "team-a".into();
        let mut own = stream();
        own.metadata.namespace = "team-z".into();
        let opts = ApplyOptions {
            map_namespaces: map(),
            ..Default::default()
        };
        // The stream already in team-z wins, wherever it is in the archive.
        for streams in [[mapped_first.clone(), own.clone()], [own, mapped_first]] {
            let (kept, left_out) = desired_objects(&streams, &opts);
            assert_eq!(kept.len(), 1);
            assert_eq!(kept[0].source, "team-z/web");
            assert_eq!(left_out.len(), 1);
            assert_eq!(left_out[0].0.source, "team-a/web");
            assert_eq!(left_out[0].1, "team-z/web");
        }
    }

    #[test]
    fn unchanged_spec_is_detected_despite_server_generations() {
        let d = desired_object(&stream(), &map());
        let mut served = d.spec().clone();
        for (i, t) in served["tags"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .enumerate()
        {
            t["generation"] = json!(i + 1);
        }
        assert!(!spec_would_change(&served, d.spec()));
        served["lookupPolicy"]["local"] = json!(false);
        assert!(spec_would_change(&served, d.spec()));
        assert!(spec_would_change(&Value::Null, d.spec()));
        assert!(!spec_would_change(&json!({"extra": 1}), &json!({})));
    }

    #[test]
    fn archived_tags_merge_by_name_and_the_target_keeps_its_own() {
        let mut spec = json!({"lookupPolicy": {"local": false}, "tags": [
            {"name": "latest", "generation": 3, "from": {"kind": "DockerImage", "name": "quay.io/a/b:1"}},
            {"name": "mine", "generation": 4, "from": {"kind": "DockerImage", "name": "quay.io/c/d:2"},
             "importPolicy": {"scheduled": true}}
        ]});
        let patch = json!({"lookupPolicy": {"local": true}, "tags": [
            {"name": "latest", "from": {"kind": "DockerImage", "name": "quay.io/a/b:2"}},
            {"name": "new", "from": {"kind": "ImageStreamTag", "name": "x:1"}}
        ]});
        assert!(spec_would_change(&spec, &patch));
        merge_spec(&mut spec, &patch);
        assert_eq!(
            spec,
            json!({"lookupPolicy": {"local": true}, "tags": [
                {"name": "latest", "generation": 3, "from": {"kind": "DockerImage", "name": "quay.io/a/b:2"}},
                {"name": "mine", "generation": 4, "from": {"kind": "DockerImage", "name": "quay.io/c/d:2"},
                 "importPolicy": {"scheduled": true}},
                {"name": "new", "from": {"kind": "ImageStreamTag", "name": "x:1"}}
            ]})
        );
        assert!(!spec_would_change(&spec, &patch));
        // A spec without tags leaves the target's alone.
        assert!(!spec_would_change(
            &spec,
            &json!({"lookupPolicy": {"local": true}})
        ));
    }

    #[test]
    fn references_to_every_name_of_the_internal_registry_are_mapped() {
        let mut is = stream();
        is.status.public_docker_image_repository =
            Some("default-route-openshift-image-registry.apps.example.com/team-a/web".into());
        let hosts = internal_hosts(&is.status);
        let spec = json!({"tags": [
            {"name": "a", "from": {"kind": "DockerImage",
             "name": "image-registry.openshift-image-registry.svc.cluster.local:5000/team-a/web:1"}},
            {"name": "b", "from": {"kind": "DockerImage",
             "name": "default-route-openshift-image-registry.apps.example.com/team-a/web:2"}},
            {"name": "c", "from": {"kind": "DockerImage", "name": "quay.io/team-a/web:3"}},
        ]});
        let names: Vec<Value> = desired_spec(&spec, &map(), &hosts)["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["from"]["name"].clone())
            .collect();
        assert_eq!(
            names,
            [
                "image-registry.openshift-image-registry.svc.cluster.local:5000/team-z/web:1",
                "default-route-openshift-image-registry.apps.example.com/team-z/web:2",
                "quay.io/team-a/web:3",
            ]
        );
    }

    #[test]
    fn spec_null_or_missing_becomes_empty_object() {
        assert_eq!(desired_spec(&Value::Null, &map(), &[]), json!({}));
    }
}
