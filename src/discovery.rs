//! Discovery of ImageStreams through the Kubernetes API.
//!
//! ImageStreams (`image.openshift.io/v1`) are not part of `k8s-openapi`, so
//! they are listed with raw requests through [`kube::Client`]. Each page is
//! read item by item as it arrives, every item straight into the
//! [`StreamRecord`] a plan needs, with the object as the API server served
//! it when asked ([`discover_records`]): a large cluster's list is never
//! held whole as parsed JSON.
//!
//! - No namespace given: one cluster-wide paged list
//!   (`GET /apis/image.openshift.io/v1/imagestreams?limit=N`, following
//!   `metadata.continue`). A 403 there is fatal, with a message that says how
//!   to get along with namespace-scoped rights.
//! - Namespaces given: one paged list per namespace. A 403 or 404 (or any
//!   other refusal that survives the retries) in one namespace is recorded as
//!   a [`DiscoveryProblem`] and the other namespaces go on.
//! - 429 and 5xx answers are retried a bounded number of times with
//!   exponential backoff, honouring `Retry-After`; a 410 Gone on a continue
//!   token (the token expired) restarts that list once from the beginning.
//! - Every request is wrapped in an explicit timeout.
//!
//! The service-account token never appears in an error or a log line: errors
//! carry the operation, the namespace and the API server's `Status` message.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use kube::api::ListParams;
use serde_json::Value;

use crate::imagestream::{self, ImageStreamError, StreamRecord};

/// The API group and version of ImageStreams.
pub const IMAGE_API: &str = "/apis/image.openshift.io/v1";

/// What to discover and how patiently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryOptions {
    /// Only these namespaces; empty means cluster-wide.
    pub namespaces: Vec<String>,
    /// A label selector (`a=b,c!=d`), passed to the API as `labelSelector`.
    pub selector: Option<String>,
    /// Items per page (`limit`); 0 means the default (500).
    pub page_size: u32,
    /// Retries and timeouts of each request.
    pub retry: RetryPolicy,
}

impl Default for DiscoveryOptions {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            selector: None,
            page_size: DEFAULT_PAGE_SIZE,
            retry: RetryPolicy::default(),
        }
    }
}

/// The page size used when [`DiscoveryOptions::page_size`] is 0.
pub const DEFAULT_PAGE_SIZE: u32 = 500;

/// How requests to the API server are retried and bounded in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first one included (at least 1).
    pub attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// Upper bound of any delay, `Retry-After` included.
    pub max_backoff: Duration,
    /// Time limit of one attempt (connect, send, and read the whole body).
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1-based), honouring the
    /// server's `Retry-After` (in seconds) when given, capped by
    /// [`RetryPolicy::max_backoff`].
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16));
        retry_after.unwrap_or(exp).min(self.max_backoff)
    }
}

/// The ImageStreams found, and what went wrong in some namespaces.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    /// The streams, sorted by namespace then name, without duplicates.
    pub streams: Vec<StreamRecord>,
    /// Namespaces (or items) that could not be listed; the rest went on.
    pub problems: Vec<DiscoveryProblem>,
}

/// A non-fatal discovery failure: one namespace, or one unreadable item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryProblem {
    /// The namespace concerned, when there is one.
    pub namespace: Option<String>,
    /// What happened, for the report.
    pub message: String,
    /// The class of failure.
    pub kind: ProblemKind,
}

/// The class of a [`DiscoveryProblem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The API server refused (403): missing rights in that namespace.
    Forbidden,
    /// The API server answered 404.
    NotFound,
    /// Anything else (a malformed item, a 5xx after every retry, ...).
    Other,
}

/// Fatal discovery errors.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No in-cluster service account and no usable kubeconfig.
    #[error("cannot find Kubernetes credentials (in-cluster service account, KUBECONFIG or ~/.kube/config)")]
    InferConfig(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("cannot build a Kubernetes client for {cluster}")]
    Client {
        /// The API server URL.
        cluster: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// Listing cluster-wide was refused.
    #[error(
        "listing ImageStreams in all namespaces is forbidden: {message}; \
         use --namespace NS (repeatable) to back up namespaces you have rights in, \
         or grant the cluster role registry-viewer to this service account"
    )]
    ClusterForbidden {
        /// The API server's message.
        message: String,
    },
    /// The API server rejected the credentials.
    #[error("{operation} in {scope}: the API server rejected the credentials (401 Unauthorized): {message}")]
    Unauthorized {
        /// What was being done.
        operation: String,
        /// `all namespaces` or `namespace NS`.
        scope: String,
        /// The API server's message.
        message: String,
    },
    /// The API server answered with an error status (after retries).
    #[error("{operation} in {scope}: HTTP {code} after {attempts} attempt(s): {message}")]
    Status {
        /// What was being done.
        operation: String,
        /// `all namespaces` or `namespace NS`.
        scope: String,
        /// The HTTP status code.
        code: u16,
        /// The API server's message (from its `Status` object when present).
        message: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The request could not be sent or its answer not read (after retries).
    #[error("{operation} in {scope}: request failed after {attempts} attempt(s)")]
    Transport {
        /// What was being done.
        operation: String,
        /// `all namespaces` or `namespace NS`.
        scope: String,
        /// Attempts made.
        attempts: u32,
        /// The last cause.
        #[source]
        source: kube::Error,
    },
    /// Every attempt timed out.
    #[error("{operation} in {scope}: no answer within {timeout:?} ({attempts} attempt(s))")]
    Timeout {
        /// What was being done.
        operation: String,
        /// `all namespaces` or `namespace NS`.
        scope: String,
        /// The per-attempt limit.
        timeout: Duration,
        /// Attempts made.
        attempts: u32,
    },
    /// The answer was not an ImageStreamList.
    #[error("{operation} in {scope}: unexpected answer: {reason}")]
    Decode {
        /// What was being done.
        operation: String,
        /// `all namespaces` or `namespace NS`.
        scope: String,
        /// What was wrong.
        reason: String,
    },
    /// A continue token expired twice in a row.
    #[error("{operation} in {scope}: the list kept changing (continue token expired again after a restart)")]
    ContinueExpired {
        /// What was being done.
        operation: String,
        /// `all namespaces` or `namespace NS`.
        scope: String,
    },
    /// `--imagestreams-from` could not be read.
    #[error(transparent)]
    File(#[from] ImageStreamError),
}

impl DiscoveryError {
    /// True when the API server was down or failing (no answer, 5xx, 429
    /// after every attempt), as during a control-plane upgrade: the run
    /// failed (exit 3) and the next one may succeed; not a configuration
    /// error.
    pub fn is_outage(&self) -> bool {
        match self {
            // A certificate that does not verify is configuration.
            DiscoveryError::Transport { source, .. } => {
                let text = format!("{source:?}").to_lowercase();
                !(text.contains("certificate") || text.contains("tls"))
            }
            DiscoveryError::Timeout { .. } => true,
            DiscoveryError::Status { code, .. } => *code >= 500 || *code == 429,
            _ => false,
        }
    }
}

/// Builds a client from the environment: the in-cluster service account, or
/// `KUBECONFIG` / `~/.kube/config` (via [`kube::Config::infer`]).
///
/// Installs the ring rustls provider when none is installed yet, and turns
/// off kube's own retry layer so that [`discover_records`] alone decides how often
/// and how long to retry.
pub async fn client_from_env() -> Result<kube::Client, DiscoveryError> {
    let config = kube::Config::infer()
        .await
        .map_err(DiscoveryError::InferConfig)?;
    client_from_config(config)
}

/// Builds a client from a configuration, with kube's retry layer turned off
/// (see [`client_from_env`]).
pub fn client_from_config(mut config: kube::Config) -> Result<kube::Client, DiscoveryError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    config.default_retry = false;
    let cluster = config.cluster_url.to_string();
    kube::Client::try_from(config).map_err(|source| DiscoveryError::Client { cluster, source })
}

/// Lists the ImageStreams `opts` asks for through the API server, each
/// item read into a [`StreamRecord`] (with its object when `keep_objects`)
/// as its page arrives: only one page of the list is in memory at a time.
///
/// Per-namespace refusals and unreadable items become
/// [`Discovered::problems`]; a cluster-wide refusal, bad credentials, an
/// unreachable server or a malformed answer are errors.
pub async fn discover_records(
    client: &kube::Client,
    opts: &DiscoveryOptions,
    keep_objects: bool,
) -> Result<Discovered, DiscoveryError> {
    let mut streams = Vec::new();
    let mut problems = Vec::new();
    let namespaces: BTreeSet<&str> = opts.namespaces.iter().map(String::as_str).collect();
    if namespaces.is_empty() {
        match list_paged(client, opts, None, keep_objects).await {
            Ok(items) => collect_items(items, None, &mut streams, &mut problems),
            Err(ListFailure::Refused {
                code: 403, message, ..
            }) => return Err(DiscoveryError::ClusterForbidden { message }),
            Err(failure) => return Err(failure.into_error(None)),
        }
    } else {
        for ns in namespaces {
            match list_paged(client, opts, Some(ns), keep_objects).await {
                Ok(items) => collect_items(items, Some(ns), &mut streams, &mut problems),
                Err(ListFailure::Refused {
                    code,
                    message,
                    attempts,
                }) if code != 401 => {
                    let kind = match code {
                        403 => ProblemKind::Forbidden,
                        404 => ProblemKind::NotFound,
                        _ => ProblemKind::Other,
                    };
                    tracing::warn!(namespace = ns, code, "cannot list ImageStreams: {message}");
                    problems.push(DiscoveryProblem {
                        namespace: Some(ns.to_string()),
                        message: format!(
                            "listing ImageStreams in namespace {ns}: HTTP {code} after {attempts} attempt(s): {message}"
                        ),
                        kind,
                    });
                }
                Err(failure) => return Err(failure.into_error(Some(ns))),
            }
        }
    }
    let streams = sort_dedup(streams, |r| (&*r.namespace, &*r.name));
    tracing::info!(
        streams = streams.len(),
        problems = problems.len(),
        "discovered ImageStreams"
    );
    Ok(Discovered { streams, problems })
}

/// What a backup reads of an ImageStream file, item by item (the file is
/// never held whole in memory): the streams `opts` selects as
/// [`StreamRecord`]s, with their objects when `keep_objects`.
pub fn records_from_file(
    path: &Path,
    opts: &DiscoveryOptions,
    keep_objects: bool,
) -> Result<Discovered, DiscoveryError> {
    let file = imagestream::open(path)?;
    let mut streams = Vec::new();
    imagestream::scan_list(file.bytes(), &path.display().to_string(), &mut |_, raw| {
        let record = StreamRecord::parse(raw, keep_objects)?;
        file.release_through(raw);
        if wanted(
            &record.namespace,
            &record.labels,
            &opts.namespaces,
            opts.selector.as_deref(),
        ) {
            streams.push(record);
        }
        Ok(())
    })?;
    Ok(Discovered {
        streams: sort_dedup(streams, |r| (&r.namespace, &r.name)),
        problems: Vec::new(),
    })
}

fn wanted(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    namespaces: &[String],
    selector: Option<&str>,
) -> bool {
    (namespaces.is_empty() || namespaces.iter().any(|n| n == namespace))
        && selector.is_none_or(|s| imagestream::matches_selector(labels, s))
}

/// Sorts by namespace then name and drops later duplicates.
fn sort_dedup<T, K: Ord + ?Sized>(mut streams: Vec<T>, key: impl Fn(&T) -> (&K, &K)) -> Vec<T> {
    streams.sort_by(|a, b| key(a).cmp(&key(b)));
    streams.dedup_by(|b, a| key(a) == key(b));
    streams
}

/// One list item, read: the stream, or the item's namespace (when it has
/// one) and why it could not be read.
type ItemResult = Result<StreamRecord, (Option<String>, String)>;

/// Sorts read list items into streams and problems.
fn collect_items(
    items: Vec<ItemResult>,
    ns: Option<&str>,
    streams: &mut Vec<StreamRecord>,
    problems: &mut Vec<DiscoveryProblem>,
) {
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Ok(is) => streams.push(is),
            Err((item_ns, reason)) => {
                let namespace = item_ns.or_else(|| ns.map(str::to_string));
                tracing::warn!(?namespace, "skipping unreadable ImageStream: {reason}");
                problems.push(DiscoveryProblem {
                    namespace,
                    message: format!("ImageStream list item {i}: {reason}"),
                    kind: ProblemKind::Other,
                });
            }
        }
    }
}

/// The namespace (when readable) of an item that could not be read, and
/// `reason` with the item's name.
fn unreadable(raw: &str, reason: &str) -> (Option<String>, String) {
    let item: Value = serde_json::from_str(raw).unwrap_or_default();
    let field = |f: &str| item.pointer(f).and_then(Value::as_str).map(str::to_string);
    let name = field("/metadata/name").unwrap_or_else(|| "<no name>".into());
    (
        field("/metadata/namespace"),
        format!("ImageStream {name}: {reason}"),
    )
}

/// One list item to a [`StreamRecord`] (list items omit apiVersion and
/// kind on some servers: they are ImageStreams).
fn item_to_record(raw: &str, keep_object: bool) -> ItemResult {
    StreamRecord::parse(raw, keep_object).map_err(|reason| unreadable(raw, &reason))
}

/// The collection path for a namespace, or cluster-wide.
pub fn list_path(namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{IMAGE_API}/namespaces/{ns}/imagestreams"),
        None => format!("{IMAGE_API}/imagestreams"),
    }
}

/// `all namespaces` or `namespace NS`, for messages.
fn scope(namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("namespace {ns}"),
        None => "all namespaces".into(),
    }
}

const LIST_OP: &str = "listing ImageStreams";

/// Why a paged list failed.
#[derive(Debug)]
enum ListFailure {
    /// The server answered an error status.
    Refused {
        code: u16,
        message: String,
        attempts: u32,
    },
    /// Transport, timeout, decoding or expiry failure.
    Fatal(CallFailureOrOther),
}

#[derive(Debug)]
enum CallFailureOrOther {
    Call(CallError),
    Decode(String),
    ContinueExpired,
}

impl ListFailure {
    fn into_error(self, namespace: Option<&str>) -> DiscoveryError {
        let operation = LIST_OP.to_string();
        let scope = scope(namespace);
        match self {
            ListFailure::Refused {
                code: 401, message, ..
            } => DiscoveryError::Unauthorized {
                operation,
                scope,
                message,
            },
            ListFailure::Refused {
                code,
                message,
                attempts,
            } => DiscoveryError::Status {
                operation,
                scope,
                code,
                message,
                attempts,
            },
            ListFailure::Fatal(CallFailureOrOther::Call(CallError::Transport {
                source,
                attempts,
            })) => DiscoveryError::Transport {
                operation,
                scope,
                attempts,
                source,
            },
            ListFailure::Fatal(CallFailureOrOther::Call(CallError::Timeout {
                timeout,
                attempts,
            })) => DiscoveryError::Timeout {
                operation,
                scope,
                timeout,
                attempts,
            },
            ListFailure::Fatal(CallFailureOrOther::Call(CallError::Build(reason)))
            | ListFailure::Fatal(CallFailureOrOther::Decode(reason)) => DiscoveryError::Decode {
                operation,
                scope,
                reason,
            },
            ListFailure::Fatal(CallFailureOrOther::ContinueExpired) => {
                DiscoveryError::ContinueExpired { operation, scope }
            }
        }
    }
}

/// Lists every page of one collection, reading each item into a record as
/// its page arrives; restarts once on 410 Gone.
async fn list_paged(
    client: &kube::Client,
    opts: &DiscoveryOptions,
    namespace: Option<&str>,
    keep_objects: bool,
) -> Result<Vec<ItemResult>, ListFailure> {
    let path = list_path(namespace);
    let limit = if opts.page_size == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        opts.page_size
    };
    let mut restarted = false;
    'restart: loop {
        let mut items = Vec::new();
        let mut continue_token: Option<String> = None;
        let mut pages = 0u32;
        loop {
            let mut lp = ListParams::default().limit(limit);
            if let Some(sel) = &opts.selector {
                lp = lp.labels(sel);
            }
            if let Some(token) = &continue_token {
                lp = lp.continue_token(token);
            }
            let request = || {
                kube::core::Request::new(path.as_str())
                    .list(&lp)
                    .map_err(|e| e.to_string())
            };
            let resp = send_with_retry(client, request, &opts.retry)
                .await
                .map_err(|e| ListFailure::Fatal(CallFailureOrOther::Call(e)))?;
            match resp.status {
                StatusCode::OK => {}
                StatusCode::GONE if continue_token.is_some() => {
                    if restarted {
                        return Err(ListFailure::Fatal(CallFailureOrOther::ContinueExpired));
                    }
                    tracing::warn!(
                        scope = scope(namespace),
                        "continue token expired (410 Gone); restarting the list from the beginning"
                    );
                    restarted = true;
                    continue 'restart;
                }
                code => {
                    return Err(ListFailure::Refused {
                        code: code.as_u16(),
                        message: status_message(&resp.body),
                        attempts: resp.attempts,
                    })
                }
            }
            let before = items.len();
            let continue_token_of_page = read_page(&resp.body, &mut |raw| {
                items.push(item_to_record(raw, keep_objects))
            })
            .map_err(|e| ListFailure::Fatal(CallFailureOrOther::Decode(e)))?;
            pages += 1;
            tracing::debug!(
                scope = scope(namespace),
                page = pages,
                items = items.len() - before,
                "listed a page of ImageStreams"
            );
            match continue_token_of_page {
                Some(token) if !token.is_empty() => continue_token = Some(token),
                _ => return Ok(items),
            }
        }
    }
}

/// Reads one page of a list answer, calling `item` with each item's JSON
/// as the parser reaches it. Returns the page's continue token.
fn read_page(body: &[u8], item: &mut dyn FnMut(&str)) -> Result<Option<String>, String> {
    let rest = crate::jsonfile::scan_array(body, "items", &mut |_, raw| {
        item(raw.get());
        Ok(())
    })
    .map_err(|e| format!("not an ImageStream list: {e}"))?;
    let member = |name: &str| rest.get(name).map(|raw| raw.get());
    let kind: String = member("kind")
        .and_then(|k| serde_json::from_str(k).ok())
        .unwrap_or_default();
    if kind != "ImageStreamList" && kind != "List" {
        return Err(format!("kind {kind:?} is not ImageStreamList"));
    }
    #[derive(serde::Deserialize)]
    struct ListMeta {
        #[serde(rename = "continue")]
        continue_token: Option<String>,
    }
    Ok(member("metadata")
        .and_then(|m| serde_json::from_str::<ListMeta>(m).ok())
        .and_then(|m| m.continue_token))
}

/// The message of a Kubernetes `Status` body, or the start of the body.
pub(crate) fn status_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(msg) = v.get("message").and_then(Value::as_str) {
            let reason = v.get("reason").and_then(Value::as_str).unwrap_or_default();
            return if reason.is_empty() {
                msg.to_string()
            } else {
                format!("{reason}: {msg}")
            };
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".into()
    } else {
        text.chars().take(300).collect()
    }
}

/// An answer of the API server, whatever its status.
#[derive(Debug)]
pub(crate) struct ApiResponse {
    /// The final status.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
    /// Attempts made (1 when the first one was final).
    pub attempts: u32,
}

/// A request that got no final HTTP answer.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The request could not be built.
    Build(String),
    /// Every attempt failed in transport; the last cause.
    Transport { source: kube::Error, attempts: u32 },
    /// The last attempt timed out.
    Timeout { timeout: Duration, attempts: u32 },
}

/// True for statuses worth retrying: 429 and 5xx.
pub(crate) fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// `Retry-After` in seconds (the HTTP-date form is ignored).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Sends a request built by `build`, retrying 429, 5xx, transport errors and
/// timeouts as `policy` says. Returns the final answer whatever its status
/// (a retryable status is returned once the attempts are spent).
pub(crate) async fn send_with_retry<F>(
    client: &kube::Client,
    build: F,
    policy: &RetryPolicy,
) -> Result<ApiResponse, CallError>
where
    F: Fn() -> Result<http::Request<Vec<u8>>, String>,
{
    let attempts = policy.attempts.max(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let request = build().map_err(CallError::Build)?;
        let target = request.uri().path().to_string();
        let method = request.method().clone();
        let outcome = tokio::time::timeout(policy.request_timeout, async {
            let resp = client.send(request.map(kube::client::Body::from)).await?;
            let (parts, body) = resp.into_parts();
            let body = body.collect_bytes().await?;
            Ok::<_, kube::Error>((parts.status, parts.headers, body))
        })
        .await;
        let server_delay = match outcome {
            Ok(Ok((status, headers, body))) => {
                if is_retryable(status) && attempt < attempts {
                    tracing::warn!(%method, path = target, status = status.as_u16(), attempt, "API server busy or failing; retrying");
                    retry_after(&headers)
                } else {
                    return Ok(ApiResponse {
                        status,
                        body,
                        attempts: attempt,
                    });
                }
            }
            Ok(Err(source)) => {
                if attempt >= attempts {
                    return Err(CallError::Transport {
                        source,
                        attempts: attempt,
                    });
                }
                tracing::warn!(%method, path = target, attempt, "request failed: {source}; retrying");
                None
            }
            Err(_) => {
                if attempt >= attempts {
                    return Err(CallError::Timeout {
                        timeout: policy.request_timeout,
                        attempts: attempt,
                    });
                }
                tracing::warn!(%method, path = target, attempt, timeout = ?policy.request_timeout, "request timed out; retrying");
                None
            }
        };
        tokio::time::sleep(policy.delay(attempt, server_delay)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imagestream::ImageStream;
    use serde_json::json;

    fn stream(ns: &str, name: &str, labels: &[(&str, &str)]) -> ImageStream {
        serde_json::from_value(json!({
            "apiVersion": "image.openshift.io/v1",
            "kind": "ImageStream",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            },
        }))
        .unwrap()
    }

    #[test]
    fn sorts_and_dedups_by_namespace_then_name() {
        let out = sort_dedup(
            vec![
                stream("b", "x", &[]),
                stream("a", "z", &[]),
                stream("a", "y", &[]),
                stream("b", "x", &[]),
            ],
            |is| (&is.metadata.namespace, &is.metadata.name),
        );
        let keys: Vec<_> = out.iter().map(ImageStream::key).collect();
        assert_eq!(keys, ["a/y", "a/z", "b/x"]);
    }

    #[test]
    fn filter_applies_namespaces_and_selector() {
        let all = [
            stream("a", "one", &[("app", "web")]),
            stream("a", "two", &[("app", "db")]),
            stream("b", "three", &[("app", "web")]),
        ];
        let kept = |namespaces: &[String], selector: Option<&str>| {
            all.iter()
                .filter(|is| {
                    wanted(
                        &is.metadata.namespace,
                        &is.metadata.labels,
                        namespaces,
                        selector,
                    )
                })
                .map(ImageStream::key)
                .collect::<Vec<_>>()
        };
        assert_eq!(kept(&["a".into()], Some("app=web")), ["a/one"]);
        assert_eq!(kept(&[], Some("app!=web")), ["a/two"]);
        assert_eq!(kept(&[], None).len(), 3);
    }

    #[test]
    fn page_with_and_without_continue() {
        let read = |body: &[u8]| {
            let mut items = Vec::new();
            read_page(body, &mut |raw| items.push(raw.to_string())).map(|t| (t, items))
        };
        let (token, items) = read(
            br#"{"kind":"ImageStreamList","apiVersion":"image.openshift.io/v1",
                 "metadata":{"resourceVersion":"1","continue":"tok"},"items":[{"a":1}, {"b" : [2]}]}"#,
        )
        .unwrap();
        assert_eq!(token.as_deref(), Some("tok"));
        assert_eq!(items, [r#"{"a":1}"#, r#"{"b" : [2]}"#]);
        // kind after the items, no continue token, null items
        let (token, items) = read(br#"{"items":[{"c":3}],"metadata":{},"kind":"List"}"#).unwrap();
        assert_eq!((token, items.len()), (None, 1));
        let (token, items) =
            read(br#"{"kind":"ImageStreamList","metadata":{},"items":null}"#).unwrap();
        assert_eq!((token, items.len()), (None, 0));
        assert!(read(br#"{"kind":"Status"}"#)
            .unwrap_err()
            .contains("Status"));
        assert!(read(br#"{"kind":"List","items":3}"#)
            .unwrap_err()
            .contains("not an ImageStream list"));
        assert!(read(b"<html>")
            .unwrap_err()
            .contains("not an ImageStream list"));
    }

    #[test]
    fn status_message_prefers_the_status_object() {
        let body = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403,
            "message":"imagestreams.image.openshift.io is forbidden: User \"x\" cannot list"}"#;
        assert_eq!(
            status_message(body),
            "Forbidden: imagestreams.image.openshift.io is forbidden: User \"x\" cannot list"
        );
        assert_eq!(status_message(b"  upstream down \n"), "upstream down");
        assert_eq!(status_message(b""), "(empty body)");
    }

    #[test]
    fn item_without_kind_is_an_imagestream() {
        let item = |v: Value| item_to_record(&v.to_string(), true);
        let record = item(json!({"metadata": {"name": "n", "namespace": "ns"}})).unwrap();
        let is: ImageStream =
            serde_json::from_str(&record.object.unwrap().json().unwrap()).unwrap();
        assert_eq!(is.kind, "ImageStream");
        let (ns, reason) =
            item(json!({"metadata": {"name": "n", "namespace": "ns"}, "status": {"tags": 3}}))
                .unwrap_err();
        assert_eq!(ns.as_deref(), Some("ns"));
        assert!(reason.contains("ImageStream n"), "{reason}");
        assert!(item(json!({"metadata": {"name": "n"}})).is_err());
        let (ns, reason) =
            item(json!({"kind": "Pod", "metadata": {"name": "n", "namespace": "ns"}})).unwrap_err();
        assert_eq!(ns.as_deref(), Some("ns"));
        assert!(reason.contains("\"Pod\" is not ImageStream"), "{reason}");
    }

    #[test]
    fn an_api_server_outage_is_not_a_configuration_error() {
        let status = |code| DiscoveryError::Status {
            operation: "listing ImageStreams".into(),
            scope: "all namespaces".into(),
            code,
            message: String::new(),
            attempts: 5,
        };
        assert!(status(503).is_outage());
        assert!(status(429).is_outage());
        assert!(!status(404).is_outage());
        assert!(!DiscoveryError::ClusterForbidden {
            message: String::new()
        }
        .is_outage());
        let timeout = DiscoveryError::Timeout {
            operation: "listing ImageStreams".into(),
            scope: "all namespaces".into(),
            timeout: Duration::from_secs(60),
            attempts: 5,
        };
        assert!(timeout.is_outage());
    }

    #[test]
    fn backoff_doubles_and_honours_retry_after_within_the_cap() {
        let p = RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            request_timeout: Duration::from_secs(1),
        };
        assert_eq!(p.delay(1, None), Duration::from_millis(100));
        assert_eq!(p.delay(3, None), Duration::from_millis(400));
        assert_eq!(p.delay(30, None), Duration::from_secs(2));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(600))),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn retryable_statuses_and_retry_after() {
        assert!(is_retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(is_retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(is_retryable(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!is_retryable(StatusCode::FORBIDDEN));
        assert!(!is_retryable(StatusCode::GONE));
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            http::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn cluster_forbidden_message_says_what_to_do() {
        let e = DiscoveryError::ClusterForbidden {
            message: "Forbidden: nope".into(),
        };
        let s = e.to_string();
        assert!(
            s.contains("--namespace") && s.contains("registry-viewer"),
            "{s}"
        );
    }

    #[test]
    fn list_paths() {
        assert_eq!(list_path(None), "/apis/image.openshift.io/v1/imagestreams");
        assert_eq!(
            list_path(Some("team-a")),
            "/apis/image.openshift.io/v1/namespaces/team-a/imagestreams"
        );
    }
}
