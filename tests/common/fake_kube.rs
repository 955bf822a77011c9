//! A fake Kubernetes API server at the HTTP level, for tests.
//!
//! It listens on 127.0.0.1 (random port, plain HTTP) and speaks the real
//! API, so the real `kube::Client` (or the real binary, through
//! [`FakeKube::write_kubeconfig`]) talks to it:
//!
//! - `GET /apis/image.openshift.io/v1/imagestreams` and
//!   `GET /apis/image.openshift.io/v1/namespaces/{ns}/imagestreams` with
//!   `limit`, `continue` and `labelSelector`, answering an `ImageStreamList`
//!   whose `metadata.continue` leads to the next page;
//! - per-namespace 403 / 404, a cluster-wide 403, 410 Gone on continue
//!   tokens, 429 with `Retry-After` for the first N list requests, all with
//!   real `Status` bodies;
//! - `GET` and `PATCH` (`application/merge-patch+json` only) of
//!   `/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}`, with the
//!   API server's own refusals (shrinking: 422; StorageClass without
//!   `allowVolumeExpansion`: 403) and forced 403 / 422, and a hook run after
//!   each accepted PATCH (to grow a tmpfs, as the kubelet would);
//! - `GET /apis/storage.k8s.io/v1/storageclasses/{name}`;
//! - `GET`, `POST` (create) and `PATCH` (`application/merge-patch+json`, and
//!   `application/strategic-merge-patch+json` with `spec.tags` merged by
//!   `name`, as `ImageStreamSpec` declares) of
//!   `/apis/image.openshift.io/v1/namespaces/{ns}/imagestreams[/{name}]`,
//!   as `restore --apply-imagestreams` uses them: 409 on an existing name,
//!   `status` ignored on writes (the API server owns it), spec tag
//!   generations assigned, and a forced 403 per namespace.
//!
//! A server-side page size cap ([`FakeKubeBuilder::max_page_size`]) makes
//! lists page with `continue` whatever `limit` the client asks for.
//!
//! Every request is recorded (method, path, query, content type, body,
//! whether a bearer token came) for assertions.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// The bearer token the generated kubeconfig carries.
pub const FAKE_TOKEN: &str = "sha256~fAkE-t0ken-do-not-log-9f8e7d6c5b4a";

/// The internal registry's service name, as in `status.dockerImageRepository`.
pub const INTERNAL_REGISTRY: &str = "image-registry.openshift-image-registry.svc:5000";

/// One request the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The path, without query.
    pub path: String,
    /// The decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// The `Content-Type` header, when sent.
    pub content_type: Option<String>,
    /// The body, as text.
    pub body: String,
    /// True when `Authorization: Bearer FAKE_TOKEN` came with it.
    pub bearer: bool,
}

/// An accepted PATCH of a PVC, handed to the hook.
#[derive(Debug, Clone)]
pub struct PatchEvent {
    /// Namespace of the PVC.
    pub namespace: String,
    /// Name of the PVC.
    pub name: String,
    /// The merge patch as sent.
    pub patch: Value,
    /// `spec.resources.requests.storage` after the patch.
    pub new_storage: Option<String>,
}

/// Called after each accepted PATCH of a PVC, with a handle on the fake (to
/// update the PVC's status, say). Runs on the server's task: spawn a thread
/// for anything slow.
pub type PatchHook = Arc<dyn Fn(&PatchEvent, &FakeKube) + Send + Sync>;

#[derive(Default)]
struct State {
    /// ImageStreams, full JSON as a cluster serves them.
    streams: Vec<Value>,
    /// Keep `apiVersion`/`kind` on list items (real typed APIs drop them).
    items_keep_kind: bool,
    forbidden_ns: HashSet<String>,
    not_found_ns: HashSet<String>,
    forbid_cluster: bool,
    /// List requests carrying a continue token that still answer 410.
    expire_continue: usize,
    /// List requests that still answer 429.
    throttle: usize,
    retry_after_secs: u64,
    /// List requests that still answer 503.
    unavailable: usize,
    pvcs: HashMap<(String, String), Value>,
    storage_classes: HashMap<String, Value>,
    /// Forced status for PVC GET (e.g. 403).
    pvc_get_status: Option<u16>,
    /// Forced status for PVC PATCH (403, 422, ...).
    pvc_patch_status: Option<u16>,
    /// PVC PATCHes answer 403 as a ResourceQuota does.
    pvc_patch_over_quota: bool,
    patch_hook: Option<PatchHook>,
    /// Namespaces where ImageStream create/patch answers 403.
    stream_writes_forbidden: HashSet<String>,
    /// At most this many items per list page, whatever `limit` says.
    max_page: Option<usize>,
    requests: Vec<Recorded>,
    resource_version: u64,
}

/// Builds a [`FakeKube`].
#[derive(Default)]
pub struct FakeKubeBuilder {
    state: State,
}

impl FakeKubeBuilder {
    /// Adds ImageStream objects (full JSON, e.g. from [`IsFixture::build`]).
    pub fn streams(mut self, streams: impl IntoIterator<Item = Value>) -> Self {
        self.state.streams.extend(streams);
        self
    }
    /// Keeps `apiVersion` and `kind` on list items.
    pub fn items_keep_kind(mut self) -> Self {
        self.state.items_keep_kind = true;
        self
    }
    /// Listing in `ns` answers 403 Forbidden.
    pub fn forbid_namespace(mut self, ns: &str) -> Self {
        self.state.forbidden_ns.insert(ns.to_string());
        self
    }
    /// Listing in `ns` answers 404 Not Found.
    pub fn not_found_namespace(mut self, ns: &str) -> Self {
        self.state.not_found_ns.insert(ns.to_string());
        self
    }
    /// Listing cluster-wide answers 403 Forbidden.
    pub fn forbid_cluster_list(mut self) -> Self {
        self.state.forbid_cluster = true;
        self
    }
    /// The first `n` list requests with a continue token answer 410 Gone.
    pub fn expire_continue_tokens(mut self, n: usize) -> Self {
        self.state.expire_continue = n;
        self
    }
    /// The first `n` list requests answer 429 with `Retry-After: secs`.
    pub fn throttle_first(mut self, n: usize, retry_after_secs: u64) -> Self {
        self.state.throttle = n;
        self.state.retry_after_secs = retry_after_secs;
        self
    }
    /// The first `n` list requests answer 503 (after any 429s).
    pub fn unavailable_first(mut self, n: usize) -> Self {
        self.state.unavailable = n;
        self
    }
    /// Adds a PVC bound through `storage_class`, requesting `request`
    /// (a quantity) with `status.capacity` equal to it.
    pub fn pvc(mut self, ns: &str, name: &str, storage_class: &str, request: &str) -> Self {
        self.state.pvcs.insert(
            (ns.into(), name.into()),
            pvc_json(ns, name, storage_class, request),
        );
        self
    }
    /// Adds a StorageClass; `allow_expansion` None leaves the field out.
    pub fn storage_class(mut self, name: &str, allow_expansion: Option<bool>) -> Self {
        self.state
            .storage_classes
            .insert(name.into(), storage_class_json(name, allow_expansion));
        self
    }
    /// PVC GETs answer `code` with a Status.
    pub fn pvc_get_status(mut self, code: u16) -> Self {
        self.state.pvc_get_status = Some(code);
        self
    }
    /// PVC PATCHes answer `code` with a Status (403, 422, ...).
    pub fn pvc_patch_status(mut self, code: u16) -> Self {
        self.state.pvc_patch_status = Some(code);
        self
    }
    /// PVC PATCHes are refused by a storage ResourceQuota (403).
    pub fn pvc_patch_over_quota(mut self) -> Self {
        self.state.pvc_patch_over_quota = true;
        self
    }
    /// Runs `hook` after every accepted PVC PATCH.
    pub fn on_patch(
        mut self,
        hook: impl Fn(&PatchEvent, &FakeKube) + Send + Sync + 'static,
    ) -> Self {
        self.state.patch_hook = Some(Arc::new(hook));
        self
    }
    /// List pages hold at most `n` items whatever `limit` the client asks
    /// for (an API server may return fewer items than `limit`, with a
    /// continue token).
    pub fn max_page_size(mut self, n: usize) -> Self {
        self.state.max_page = Some(n.max(1));
        self
    }
    /// Creating or patching ImageStreams in `ns` answers 403 Forbidden.
    pub fn forbid_imagestream_writes(mut self, ns: &str) -> Self {
        self.state.stream_writes_forbidden.insert(ns.to_string());
        self
    }
    /// Starts serving on 127.0.0.1, on a free port.
    pub async fn start(mut self) -> FakeKube {
        self.state.resource_version = 4_412_000;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(self.state));
        let fake = FakeKube {
            addr,
            state: state.clone(),
            task: Arc::new(Mutex::new(None)),
        };
        let server = fake.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        *fake.task.lock().unwrap() = Some(task);
        fake
    }
}

/// The running fake API server; clones share its state.
#[derive(Clone)]
pub struct FakeKube {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl FakeKube {
    /// A builder.
    pub fn builder() -> FakeKubeBuilder {
        FakeKubeBuilder::default()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig (server = this fake, bearer [`FAKE_TOKEN`],
    /// namespace `default`) into `dir` and returns its path, for the real
    /// binary via `KUBECONFIG`.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake-sa\n  user:\n    token: {FAKE_TOKEN}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake-sa\n    namespace: default\n\
             current-context: fake\n",
            url = self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// A `kube::Config` for this fake, read from a generated kubeconfig.
    pub async fn config(&self) -> kube::Config {
        let dir = tempfile::tempdir().unwrap();
        let path = self.write_kubeconfig(dir.path());
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
        kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("kube config from the fake's kubeconfig")
    }

    /// A real `kube::Client` for this fake, without kube's own retry layer.
    pub async fn client(&self) -> kube::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config = self.config().await;
        config.default_retry = false;
        kube::Client::try_from(config).expect("kube client")
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The requests to paths ending with `suffix` (`/imagestreams`, ...).
    pub fn requests_to(&self, suffix: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with(suffix))
            .collect()
    }

    /// The bodies of every PATCH received (accepted or not).
    pub fn patch_bodies(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .map(|r| r.body)
            .collect()
    }

    /// The stored PVC.
    pub fn pvc(&self, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .pvcs
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// The stored ImageStream `ns/name`, as the fake serves it.
    pub fn imagestream(&self, ns: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.streams
            .iter()
            .find(|is| is["metadata"]["namespace"] == ns && is["metadata"]["name"] == name)
            .cloned()
    }

    /// The POST and PATCH requests to ImageStreams.
    pub fn imagestream_writes(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| {
                (r.method == "POST" || r.method == "PATCH")
                    && r.path
                        .starts_with("/apis/image.openshift.io/v1/namespaces/")
                    && r.path.contains("/imagestreams")
            })
            .collect()
    }

    /// Replaces the `status` of a stored PVC (as the resize controller and
    /// the kubelet would).
    pub fn set_pvc_status(&self, ns: &str, name: &str, status: Value) {
        let mut st = self.state.lock().unwrap();
        st.resource_version += 1;
        let rv = st.resource_version.to_string();
        if let Some(pvc) = st.pvcs.get_mut(&(ns.to_string(), name.to_string())) {
            pvc["status"] = status;
            pvc["metadata"]["resourceVersion"] = json!(rv);
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type");
        let bearer = header("authorization").as_deref() == Some(&format!("Bearer {FAKE_TOKEN}"));
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body = String::from_utf8_lossy(&body).into_owned();
        let rec = Recorded {
            method,
            path,
            query,
            content_type,
            body,
            bearer,
        };
        self.state.lock().unwrap().requests.push(rec.clone());
        if !rec.bearer {
            return status(401, "Unauthorized", "Unauthorized", None);
        }
        let segs: Vec<&str> = rec.path.trim_matches('/').split('/').collect();
        match (rec.method.as_str(), segs.as_slice()) {
            ("GET", ["apis", "image.openshift.io", "v1", "imagestreams"]) => self.list(None, &rec),
            ("GET", ["apis", "image.openshift.io", "v1", "namespaces", ns, "imagestreams"]) => {
                self.list(Some(ns), &rec)
            }
            ("GET", ["api", "v1", "namespaces", ns, "persistentvolumeclaims", name]) => {
                self.get_pvc(ns, name)
            }
            ("PATCH", ["api", "v1", "namespaces", ns, "persistentvolumeclaims", name]) => {
                self.patch_pvc(ns, name, &rec)
            }
            (
                "GET",
                ["apis", "image.openshift.io", "v1", "namespaces", ns, "imagestreams", name],
            ) => self.get_stream(ns, name),
            ("POST", ["apis", "image.openshift.io", "v1", "namespaces", ns, "imagestreams"]) => {
                self.create_stream(ns, &rec)
            }
            (
                "PATCH",
                ["apis", "image.openshift.io", "v1", "namespaces", ns, "imagestreams", name],
            ) => self.patch_stream(ns, name, &rec),
            ("GET", ["apis", "storage.k8s.io", "v1", "storageclasses", name]) => {
                let st = self.state.lock().unwrap();
                match st.storage_classes.get(*name) {
                    Some(sc) => json_response(200, sc),
                    None => not_found("storageclasses", "storage.k8s.io", name),
                }
            }
            _ => status(
                404,
                "NotFound",
                "the server could not find the requested resource",
                None,
            ),
        }
    }

    fn list(&self, ns: Option<&str>, rec: &Recorded) -> Response<Full<Bytes>> {
        let mut st = self.state.lock().unwrap();
        if st.throttle > 0 {
            st.throttle -= 1;
            let secs = st.retry_after_secs;
            let mut r = status(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
                Some(json!({"retryAfterSeconds": secs})),
            );
            r.headers_mut()
                .insert("retry-after", secs.to_string().parse().unwrap());
            return r;
        }
        if st.unavailable > 0 {
            st.unavailable -= 1;
            return status(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
                None,
            );
        }
        match ns {
            None if st.forbid_cluster => {
                return status(
                    403,
                    "Forbidden",
                    "imagestreams.image.openshift.io is forbidden: User \"system:serviceaccount:backup:archiver\" \
                     cannot list resource \"imagestreams\" in API group \"image.openshift.io\" at the cluster scope",
                    Some(json!({"group": "image.openshift.io", "kind": "imagestreams"})),
                )
            }
            Some(ns) if st.forbidden_ns.contains(ns) => {
                return status(
                    403,
                    "Forbidden",
                    &format!(
                        "imagestreams.image.openshift.io is forbidden: User \"system:serviceaccount:backup:archiver\" \
                         cannot list resource \"imagestreams\" in API group \"image.openshift.io\" in the namespace \"{ns}\""
                    ),
                    Some(json!({"group": "image.openshift.io", "kind": "imagestreams"})),
                )
            }
            Some(ns) if st.not_found_ns.contains(ns) => {
                return not_found("imagestreams", "image.openshift.io", ns)
            }
            _ => {}
        }
        let scope = ns.unwrap_or("*").to_string();
        let selector = rec.query.get("labelSelector").cloned().unwrap_or_default();
        let offset = match rec.query.get("continue") {
            None => 0,
            Some(token) => {
                if st.expire_continue > 0 {
                    st.expire_continue -= 1;
                    return status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. \
                         You can start a new list without the continue parameter, or use the continue token \
                         in this response to retrieve the remainder of the results. Continuing with the provided \
                         token results in an inconsistent list - objects that were created, modified, or deleted \
                         between the time the first chunk was returned and now may show up in the list.",
                        None,
                    );
                }
                match decode_continue(token) {
                    Some((s, sel, off)) if s == scope && sel == selector => off,
                    _ => {
                        return status(
                            400,
                            "BadRequest",
                            "continue key is not valid: illegal base64 data",
                            None,
                        )
                    }
                }
            }
        };
        let mut items: Vec<Value> = st
            .streams
            .iter()
            .filter(|is| ns.is_none_or(|ns| is["metadata"]["namespace"] == ns))
            .filter(|is| selector_matches(&selector, &is["metadata"]["labels"]))
            .cloned()
            .collect();
        items.sort_by_key(|is| {
            (
                is["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                is["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        });
        let limit: usize = rec
            .query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX)
            .min(st.max_page.unwrap_or(usize::MAX));
        let end = offset.saturating_add(limit).min(items.len());
        let rest = items.len() - end;
        let mut page: Vec<Value> = items[offset.min(end)..end].to_vec();
        if !st.items_keep_kind {
            for item in &mut page {
                if let Some(o) = item.as_object_mut() {
                    o.remove("apiVersion");
                    o.remove("kind");
                }
            }
        }
        let mut metadata = json!({"resourceVersion": st.resource_version.to_string()});
        if rest > 0 {
            metadata["continue"] = json!(encode_continue(&scope, &selector, end));
            metadata["remainingItemCount"] = json!(rest);
        }
        json_response(
            200,
            &json!({
                "kind": "ImageStreamList",
                "apiVersion": "image.openshift.io/v1",
                "metadata": metadata,
                "items": page,
            }),
        )
    }

    fn get_stream(&self, ns: &str, name: &str) -> Response<Full<Bytes>> {
        if self.state.lock().unwrap().forbidden_ns.contains(ns) {
            return stream_forbidden(ns, "get");
        }
        match self.imagestream(ns, name) {
            Some(is) => json_response(200, &is),
            None => not_found("imagestreams", "image.openshift.io", name),
        }
    }

    fn create_stream(&self, ns: &str, rec: &Recorded) -> Response<Full<Bytes>> {
        let mut st = self.state.lock().unwrap();
        if st.stream_writes_forbidden.contains(ns) || st.forbidden_ns.contains(ns) {
            return stream_forbidden(ns, "create");
        }
        if rec.content_type.as_deref() != Some("application/json") {
            return status(
                415,
                "UnsupportedMediaType",
                "expected application/json",
                None,
            );
        }
        let Ok(mut obj) = serde_json::from_str::<Value>(&rec.body) else {
            return status(400, "BadRequest", "error decoding body: invalid JSON", None);
        };
        if obj["kind"] != "ImageStream" || obj["apiVersion"] != "image.openshift.io/v1" {
            return status(
                400,
                "BadRequest",
                &format!(
                    "ImageStream in version \"v1\" cannot be handled as a {}",
                    obj["kind"]
                ),
                None,
            );
        }
        if obj["metadata"]["namespace"]
            .as_str()
            .is_some_and(|n| n != ns)
        {
            return status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
                None,
            );
        }
        let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
            return status(
                422,
                "Invalid",
                "ImageStream.image.openshift.io \"\" is invalid: metadata.name: Required value: name or generateName is required",
                None,
            );
        };
        let exists = st
            .streams
            .iter()
            .any(|is| is["metadata"]["namespace"] == ns && is["metadata"]["name"] == name.as_str());
        if exists {
            return status(
                409,
                "AlreadyExists",
                &format!("imagestreams.image.openshift.io \"{name}\" already exists"),
                Some(json!({"name": name, "group": "image.openshift.io", "kind": "imagestreams"})),
            );
        }
        st.resource_version += 1;
        let meta = &mut obj["metadata"];
        meta["namespace"] = json!(ns);
        meta["uid"] = json!(uid(&format!("is/{ns}/{name}")));
        meta["resourceVersion"] = json!(st.resource_version.to_string());
        meta["generation"] = json!(1);
        meta["creationTimestamp"] = json!("2024-04-02T07:00:00Z");
        set_tag_generations(&mut obj, 1);
        // The API server owns status: whatever came is replaced.
        obj["status"] =
            json!({"dockerImageRepository": format!("{INTERNAL_REGISTRY}/{ns}/{name}")});
        st.streams.push(obj.clone());
        json_response(201, &obj)
    }

    fn patch_stream(&self, ns: &str, name: &str, rec: &Recorded) -> Response<Full<Bytes>> {
        let mut st = self.state.lock().unwrap();
        if st.stream_writes_forbidden.contains(ns) || st.forbidden_ns.contains(ns) {
            return stream_forbidden(ns, "patch");
        }
        let strategic = match rec.content_type.as_deref() {
            Some("application/merge-patch+json") => false,
            Some("application/strategic-merge-patch+json") => true,
            other => {
                return status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the body of the request was in an unknown format (got {other:?})"),
                    None,
                )
            }
        };
        let Ok(mut patch) = serde_json::from_str::<Value>(&rec.body) else {
            return status(
                400,
                "BadRequest",
                "error decoding patch: invalid JSON",
                None,
            );
        };
        let Some(current) = st
            .streams
            .iter_mut()
            .find(|is| is["metadata"]["namespace"] == ns && is["metadata"]["name"] == name)
        else {
            return not_found("imagestreams", "image.openshift.io", name);
        };
        // Status and identity are not changed through the main resource.
        if let Some(p) = patch.as_object_mut() {
            p.remove("status");
            if let Some(m) = p.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("name");
                m.remove("namespace");
            }
        }
        // Strategic: each patched tag goes onto the stream's tag of its
        // name (or is added); the stream's other tags are not touched.
        let tags = if strategic {
            patch
                .get_mut("spec")
                .and_then(Value::as_object_mut)
                .and_then(|spec| spec.remove("tags"))
        } else {
            None
        };
        let mut updated = current.clone();
        json_patch::merge(&mut updated, &patch);
        for tag in tags.and_then(|t| t.as_array().cloned()).unwrap_or_default() {
            let list = &mut updated["spec"]["tags"];
            if !list.is_array() {
                *list = json!([]);
            }
            let list = list.as_array_mut().unwrap();
            let name = tag["name"].clone();
            match list.iter_mut().position(|t| t["name"] == name) {
                Some(i) => json_patch::merge(&mut list[i], &tag),
                None => list.push(tag),
            }
        }
        if updated["spec"] != current["spec"] {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            updated["metadata"]["generation"] = json!(generation);
            set_tag_generations(&mut updated, generation);
        }
        *current = updated;
        st.resource_version += 1;
        let rv = st.resource_version.to_string();
        let current = st
            .streams
            .iter_mut()
            .find(|is| is["metadata"]["namespace"] == ns && is["metadata"]["name"] == name)
            .unwrap();
        current["metadata"]["resourceVersion"] = json!(rv);
        json_response(200, current)
    }

    fn get_pvc(&self, ns: &str, name: &str) -> Response<Full<Bytes>> {
        let st = self.state.lock().unwrap();
        if let Some(code) = st.pvc_get_status {
            return forced_pvc_status(code, ns, name, "get");
        }
        match st.pvcs.get(&(ns.to_string(), name.to_string())) {
            Some(pvc) => json_response(200, pvc),
            None => not_found("persistentvolumeclaims", "", name),
        }
    }

    fn patch_pvc(&self, ns: &str, name: &str, rec: &Recorded) -> Response<Full<Bytes>> {
        let (response, hook, event) = {
            let mut st = self.state.lock().unwrap();
            if let Some(code) = st.pvc_patch_status {
                return forced_pvc_status(code, ns, name, "patch");
            }
            if st.pvc_patch_over_quota {
                return status(
                    403,
                    "Forbidden",
                    &format!(
                        "persistentvolumeclaims \"{name}\" is forbidden: exceeded quota: storage, \
                         requested: requests.storage=9Gi, used: requests.storage=1Gi, limited: requests.storage=5Gi"
                    ),
                    Some(json!({"name": name, "kind": "persistentvolumeclaims"})),
                );
            }
            if rec.content_type.as_deref() != Some("application/merge-patch+json") {
                return status(
                    415,
                    "UnsupportedMediaType",
                    &format!(
                        "the body of the request was in an unknown format - accepted media types include: \
                         application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml \
                         (got {:?})",
                        rec.content_type
                    ),
                    None,
                );
            }
            let Ok(patch) = serde_json::from_str::<Value>(&rec.body) else {
                return status(
                    400,
                    "BadRequest",
                    "error decoding patch: invalid JSON",
                    None,
                );
            };
            let key = (ns.to_string(), name.to_string());
            let Some(current) = st.pvcs.get(&key).cloned() else {
                return not_found("persistentvolumeclaims", "", name);
            };
            let mut updated = current.clone();
            json_patch::merge(&mut updated, &patch);
            let old = current["spec"]["resources"]["requests"]["storage"]
                .as_str()
                .map(quantity_bytes);
            let new_storage = updated["spec"]["resources"]["requests"]["storage"]
                .as_str()
                .map(str::to_string);
            let new = new_storage.as_deref().map(quantity_bytes);
            if let (Some(old), Some(new)) = (old, new) {
                if new < old {
                    return status(
                        422,
                        "Invalid",
                        &format!(
                            "PersistentVolumeClaim \"{name}\" is invalid: spec.resources.requests.storage: \
                             Forbidden: field can not be less than status.capacity"
                        ),
                        None,
                    );
                }
                if new > old {
                    let sc = current["spec"]["storageClassName"]
                        .as_str()
                        .unwrap_or_default();
                    let expandable = st
                        .storage_classes
                        .get(sc)
                        .is_some_and(|sc| sc["allowVolumeExpansion"] == json!(true));
                    if !expandable {
                        return status(
                            403,
                            "Forbidden",
                            &format!(
                                "persistentvolumeclaims \"{name}\" is forbidden: only dynamically provisioned pvc \
                                 can be resized and the storageclass that provisions the pvc must support resize"
                            ),
                            None,
                        );
                    }
                }
            }
            st.resource_version += 1;
            updated["metadata"]["resourceVersion"] = json!(st.resource_version.to_string());
            st.pvcs.insert(key, updated.clone());
            let event = PatchEvent {
                namespace: ns.to_string(),
                name: name.to_string(),
                patch,
                new_storage,
            };
            (json_response(200, &updated), st.patch_hook.clone(), event)
        };
        if let Some(hook) = hook {
            hook(&event, self);
        }
        response
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        // The last handle stops the server.
        if Arc::strong_count(&self.task) == 1 {
            if let Some(task) = self.task.lock().unwrap().take() {
                task.abort();
            }
        }
    }
}

fn forced_pvc_status(code: u16, ns: &str, name: &str, verb: &str) -> Response<Full<Bytes>> {
    match code {
        403 => status(
            403,
            "Forbidden",
            &format!(
                "persistentvolumeclaims \"{name}\" is forbidden: User \"system:serviceaccount:{ns}:archiver\" \
                 cannot {verb} resource \"persistentvolumeclaims\" in API group \"\" in the namespace \"{ns}\""
            ),
            Some(json!({"name": name, "kind": "persistentvolumeclaims"})),
        ),
        422 => status(
            422,
            "Invalid",
            &format!(
                "PersistentVolumeClaim \"{name}\" is invalid: spec: Forbidden: spec is immutable after creation \
                 except resources.requests and volumeAttributesClassName for bound claims"
            ),
            Some(json!({"name": name, "kind": "PersistentVolumeClaim"})),
        ),
        code => status(code, "InternalError", "forced error", None),
    }
}

/// Spec tags without a generation get `generation` (the server assigns it).
fn set_tag_generations(is: &mut Value, generation: i64) {
    if let Some(tags) = is["spec"]["tags"].as_array_mut() {
        for t in tags {
            if t.get("generation").is_none_or(Value::is_null) {
                t["generation"] = json!(generation);
            }
        }
    }
}

/// 403 for an ImageStream verb in `ns`.
fn stream_forbidden(ns: &str, verb: &str) -> Response<Full<Bytes>> {
    status(
        403,
        "Forbidden",
        &format!(
            "imagestreams.image.openshift.io is forbidden: User \"system:serviceaccount:restore:archiver\" \
             cannot {verb} resource \"imagestreams\" in API group \"image.openshift.io\" in the namespace \"{ns}\""
        ),
        Some(json!({"group": "image.openshift.io", "kind": "imagestreams"})),
    )
}

/// A `Status` response, as the API server sends for errors.
fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response<Full<Bytes>> {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    json_response(code, &body)
}

fn not_found(resource: &str, group: &str, name: &str) -> Response<Full<Bytes>> {
    let what = if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    };
    status(
        404,
        "NotFound",
        &format!("{what} \"{name}\" not found"),
        Some(json!({"name": name, "group": group, "kind": resource})),
    )
}

fn json_response(code: u16, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .header("audit-id", "0b0f9a6e-8d50-4c2b-9a43-1f1e7c3d2a10")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap()
}

/// Continue tokens are opaque to clients; this one carries scope, selector
/// and offset in hex, like the API server's base64 blob.
fn encode_continue(scope: &str, selector: &str, offset: usize) -> String {
    hex::encode(format!("{scope}\n{selector}\n{offset}"))
}

fn decode_continue(token: &str) -> Option<(String, String, usize)> {
    let raw = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let mut it = raw.splitn(3, '\n');
    Some((
        it.next()?.into(),
        it.next()?.into(),
        it.next()?.parse().ok()?,
    ))
}

/// Equality-based label selectors (`a=b`, `a==b`, `a!=b`, `a`, `!a`).
fn selector_matches(selector: &str, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|t| {
            if let Some((k, v)) = t.split_once("!=") {
                get(k) != Some(v.trim())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                get(k) == Some(v.trim())
            } else if let Some(k) = t.strip_prefix('!') {
                get(k).is_none()
            } else {
                get(t).is_some()
            }
        })
}

/// Bytes of the quantities this fake deals in (`NGi`, `NMi`, `NKi`, plain).
pub fn quantity_bytes(q: &str) -> u64 {
    let (n, mul) = if let Some(n) = q.strip_suffix("Gi") {
        (n, 1u64 << 30)
    } else if let Some(n) = q.strip_suffix("Mi") {
        (n, 1 << 20)
    } else if let Some(n) = q.strip_suffix("Ki") {
        (n, 1 << 10)
    } else {
        (q, 1)
    };
    n.parse::<u64>()
        .expect("fake understands NGi/NMi/NKi/N quantities only")
        * mul
}

/// A bound PVC as `oc get pvc -o json` shows it.
pub fn pvc_json(ns: &str, name: &str, storage_class: &str, request: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": uid(&format!("pvc/{ns}/{name}")),
            "resourceVersion": "4411873",
            "creationTimestamp": "2024-02-11T08:30:12Z",
            "labels": {"app.kubernetes.io/name": "imagestream-archiver"},
            "annotations": {
                "k8up.io/backup": "true",
                "pv.kubernetes.io/bind-completed": "yes",
                "pv.kubernetes.io/bound-by-controller": "yes",
                "volume.beta.kubernetes.io/storage-provisioner": "ebs.csi.aws.com",
                "volume.kubernetes.io/storage-provisioner": "ebs.csi.aws.com"
            },
            "finalizers": ["kubernetes.io/pvc-protection"],
            "managedFields": [{
                "apiVersion": "v1",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:accessModes": {}, "f:resources": {"f:requests": {".": {}, "f:storage": {}}}}},
                "manager": "kubectl-create",
                "operation": "Update",
                "time": "2024-02-11T08:30:12Z"
            }]
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": request}},
            "storageClassName": storage_class,
            "volumeMode": "Filesystem",
            "volumeName": format!("pvc-{}", uid(&format!("pv/{ns}/{name}")))
        },
        "status": {
            "accessModes": ["ReadWriteOnce"],
            "capacity": {"storage": request},
            "phase": "Bound"
        }
    })
}

/// A StorageClass as `oc get sc -o json` shows it.
pub fn storage_class_json(name: &str, allow_expansion: Option<bool>) -> Value {
    let mut sc = json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": name,
            "uid": uid(&format!("sc/{name}")),
            "resourceVersion": "1204",
            "creationTimestamp": "2023-11-02T14:01:55Z",
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}
        },
        "provisioner": "ebs.csi.aws.com",
        "parameters": {"encrypted": "true", "type": "gp3"},
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer"
    });
    if let Some(allow) = allow_expansion {
        sc["allowVolumeExpansion"] = json!(allow);
    }
    sc
}

/// A deterministic UID.
pub fn uid(seed: &str) -> String {
    let h = hex::encode(Sha256::digest(seed.as_bytes()));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A deterministic `sha256:` digest.
pub fn fake_digest(seed: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(seed.as_bytes())))
}

/// How [`IsFixture`] writes `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusMode {
    Full,
    /// `status: {dockerImageRepository}` only: a new stream, nothing pushed.
    Empty,
    /// No `status` at all.
    Missing,
}

#[derive(Debug, Clone)]
enum TagKind {
    /// Built and pushed into the internal registry: `count` events.
    Pushed(usize),
    /// Imported from an external registry: `count` events.
    External(String, usize),
    /// Import failed: no items, an ImportSuccess=False condition.
    FailedImport(String),
}

/// Generates an ImageStream shaped like a real cluster's (`oc get is -o
/// json`): full metadata with uid, resourceVersion, generation,
/// creationTimestamp, annotations and managedFields; spec tags for imported
/// tags; `status.tags[].items` newest first; conditions on failed imports.
#[derive(Debug, Clone)]
pub struct IsFixture {
    ns: String,
    name: String,
    labels: Vec<(String, String)>,
    tags: Vec<(String, TagKind)>,
    status: StatusMode,
}

/// Starts an [`IsFixture`].
pub fn imagestream(ns: &str, name: &str) -> IsFixture {
    IsFixture {
        ns: ns.into(),
        name: name.into(),
        labels: Vec::new(),
        tags: Vec::new(),
        status: StatusMode::Full,
    }
}

impl IsFixture {
    /// Adds a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }
    /// A tag pushed `events` times to the internal registry (1 = no history).
    pub fn tag(mut self, tag: &str, events: usize) -> Self {
        self.tags.push((tag.into(), TagKind::Pushed(events)));
        self
    }
    /// A tag imported from `repo` (e.g. `quay.io/org/img`), `events` times.
    pub fn external_tag(mut self, tag: &str, repo: &str, events: usize) -> Self {
        self.tags
            .push((tag.into(), TagKind::External(repo.into(), events)));
        self
    }
    /// A tag whose import from `from` failed: no items, a condition.
    pub fn failed_import_tag(mut self, tag: &str, from: &str) -> Self {
        self.tags
            .push((tag.into(), TagKind::FailedImport(from.into())));
        self
    }
    /// `status` holds only `dockerImageRepository`.
    pub fn empty_status(mut self) -> Self {
        self.status = StatusMode::Empty;
        self
    }
    /// No `status` at all.
    pub fn no_status(mut self) -> Self {
        self.status = StatusMode::Missing;
        self
    }

    /// The digest of event `i` (0 = current) of `tag`.
    pub fn digest(&self, tag: &str, i: usize) -> String {
        fake_digest(&format!("{}/{}:{tag}#{i}", self.ns, self.name))
    }

    /// The ImageStream JSON.
    pub fn build(&self) -> Value {
        let (ns, name) = (&self.ns, &self.name);
        let repo = format!("{INTERNAL_REGISTRY}/{ns}/{name}");
        let labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let mut metadata = json!({
            "name": name,
            "namespace": ns,
            "uid": uid(&format!("is/{ns}/{name}")),
            "resourceVersion": "4409112",
            "generation": 3,
            "creationTimestamp": "2024-01-15T09:41:07Z",
            "annotations": {
                "openshift.io/image.dockerRepositoryCheck": "2024-01-15T09:41:08Z"
            },
            "managedFields": [
                {
                    "apiVersion": "image.openshift.io/v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}, "f:spec": {"f:lookupPolicy": {".": {}, "f:local": {}}}},
                    "manager": "oc",
                    "operation": "Update",
                    "time": "2024-01-15T09:41:07Z"
                },
                {
                    "apiVersion": "image.openshift.io/v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:openshift.io/image.dockerRepositoryCheck": {}}}},
                    "manager": "openshift-apiserver",
                    "operation": "Update",
                    "time": "2024-01-15T09:41:08Z"
                }
            ]
        });
        if !labels.is_empty() {
            metadata["labels"] = Value::Object(labels);
        }
        let mut spec_tags = Vec::new();
        let mut status_tags = Vec::new();
        for (tag, kind) in &self.tags {
            match kind {
                TagKind::Pushed(n) => {
                    let items: Vec<Value> = (0..*n)
                        .map(|i| {
                            let d = self.digest(tag, i);
                            json!({
                                "created": created(i),
                                "dockerImageReference": format!("{repo}@{d}"),
                                "image": d,
                                "generation": 1
                            })
                        })
                        .collect();
                    status_tags.push(json!({"tag": tag, "items": items}));
                }
                TagKind::External(from, n) => {
                    spec_tags.push(json!({
                        "name": tag,
                        "annotations": null,
                        "from": {"kind": "DockerImage", "name": format!("{from}:{tag}")},
                        "generation": 2,
                        "importPolicy": {"importMode": "Legacy"},
                        "referencePolicy": {"type": "Source"}
                    }));
                    let items: Vec<Value> = (0..*n)
                        .map(|i| {
                            let d = self.digest(tag, i);
                            json!({
                                "created": created(i),
                                "dockerImageReference": format!("{from}@{d}"),
                                "image": d,
                                "generation": 2
                            })
                        })
                        .collect();
                    status_tags.push(json!({"tag": tag, "items": items}));
                }
                TagKind::FailedImport(from) => {
                    spec_tags.push(json!({
                        "name": tag,
                        "annotations": null,
                        "from": {"kind": "DockerImage", "name": from},
                        "generation": 3,
                        "importPolicy": {"importMode": "Legacy"},
                        "referencePolicy": {"type": "Source"}
                    }));
                    status_tags.push(json!({
                        "tag": tag,
                        "items": null,
                        "conditions": [{
                            "type": "ImportSuccess",
                            "status": "False",
                            "lastTransitionTime": "2024-03-02T11:20:31Z",
                            "reason": "NotFound",
                            "message": format!("dockerimage.image.openshift.io \"{from}\" not found"),
                            "generation": 3
                        }]
                    }));
                }
            }
        }
        let mut spec = json!({"lookupPolicy": {"local": false}});
        if !spec_tags.is_empty() {
            spec["tags"] = json!(spec_tags);
        }
        let mut is = json!({
            "apiVersion": "image.openshift.io/v1",
            "kind": "ImageStream",
            "metadata": metadata,
            "spec": spec,
        });
        match self.status {
            StatusMode::Full => {
                is["status"] = json!({
                    "dockerImageRepository": repo,
                    "publicDockerImageRepository": format!("default-route-openshift-image-registry.apps.ocp.example.com/{ns}/{name}"),
                    "tags": status_tags,
                })
            }
            StatusMode::Empty => is["status"] = json!({"dockerImageRepository": repo}),
            StatusMode::Missing => {}
        }
        is
    }
}

/// `created` of event `i` (0 newest), RFC 3339.
fn created(i: usize) -> String {
    format!("2024-03-{:02}T10:{:02}:00Z", 28 - (i % 27), (i * 7) % 60)
}
