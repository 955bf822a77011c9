//! The registry client: oci-client with auth, TLS, request accounting and
//! bounded retries around every call.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::digest::Digest;
use crate::layout::{Layout, LayoutError};
use crate::manifest::ACCEPTED;

/// The pod's service-account directory.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Errors talking to a registry. Messages carry the repository and digest,
/// never a credential.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry refused or failed a request.
    #[error("{op} {what}: {message}")]
    Request {
        /// The operation (pull manifest, pull blob, ...).
        op: &'static str,
        /// `repo@digest` or `repo:tag`.
        what: String,
        /// The registry's answer (sanitized).
        message: String,
        /// Whether this kind of failure is permanent (auth, 403, 404).
        permanent: bool,
        /// Whether the registry said the thing does not exist.
        not_found: bool,
        /// Whether the cause is configuration: credentials refused (401,
        /// 403) or a TLS certificate that does not verify.
        config: bool,
    },
    /// Reading credentials or certificates failed.
    #[error("cannot read {what} {path}")]
    Config {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing into the archive failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The pod's token would go to a registry it is not meant for.
    #[error(
        "registry {registry}: the pod's service-account token is sent on its own only to a \
         cluster service (*.svc) over verified TLS; pass --token-file {} to send it to this \
         registry, or --anonymous",
        token.display()
    )]
    TokenNotImplied {
        /// The registry named.
        registry: String,
        /// The service-account token file.
        token: PathBuf,
    },
}

impl RegistryError {
    /// True for 404-like answers.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            RegistryError::Request {
                not_found: true,
                ..
            }
        )
    }
    /// True when credentials, permissions or TLS settings are at fault.
    pub fn is_config(&self) -> bool {
        matches!(self, RegistryError::Request { config: true, .. })
    }
    /// A copy of a registry's answer (`None` for the other kinds).
    pub fn request_copy(&self) -> Option<Self> {
        match self {
            RegistryError::Request {
                op,
                what,
                message,
                permanent,
                not_found,
                config,
            } => Some(RegistryError::Request {
                op,
                what: what.clone(),
                message: message.clone(),
                permanent: *permanent,
                not_found: *not_found,
                config: *config,
            }),
            _ => None,
        }
    }
    /// True when retrying cannot help (auth, permission, full disk).
    pub fn is_permanent(&self) -> bool {
        match self {
            RegistryError::Request { permanent, .. } => *permanent,
            RegistryError::Config { .. } | RegistryError::TokenNotImplied { .. } => true,
            RegistryError::Layout(e) => e.is_permanent(),
        }
    }
}

/// Credentials for the registry.
#[derive(Clone)]
pub enum Credentials {
    /// No credentials.
    Anonymous,
    /// A bearer token (the service-account token on OpenShift).
    Token(String),
    /// User name and password.
    Basic(String, String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Token(_) => f.write_str("Token(<redacted>)"),
            Credentials::Basic(u, _) => write!(f, "Basic({u}, <redacted>)"),
        }
    }
}

/// Validated settings of a registry connection.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// `host[:port]`.
    pub host: String,
    /// Credentials.
    pub credentials: Credentials,
    /// PEM bundle of extra CA certificates.
    pub ca_pem: Option<Vec<u8>>,
    /// Skip TLS verification (explicit user choice only).
    pub insecure_skip_tls_verify: bool,
    /// Plain HTTP.
    pub plain_http: bool,
    /// Attempts per request.
    pub attempts: u32,
}

impl RegistrySettings {
    /// Builds settings from the CLI flags, reading token, password and CA
    /// files (and defaulting to the pod's service account when present).
    pub fn from_args(args: &crate::cli::RegistryArgs) -> Result<Self, RegistryError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .map_err(|source| RegistryError::Config {
                    what,
                    path: path.to_path_buf(),
                    source,
                })
        };
        let sa_token = Path::new(SA_DIR).join("token");
        let credentials = if args.anonymous {
            Credentials::Anonymous
        } else if let (Some(user), Some(pw)) = (&args.username, &args.password_file) {
            Credentials::Basic(user.clone(), read("password file", pw)?)
        } else if let Some(path) = &args.token_file {
            Credentials::Token(read("token file", path)?)
        } else if sa_token.is_file() {
            if !implicit_token_goes_to(
                &args.registry,
                args.plain_http || args.insecure_skip_tls_verify,
            ) {
                return Err(RegistryError::TokenNotImplied {
                    registry: args.registry.clone(),
                    token: sa_token,
                });
            }
            Credentials::Token(read("service-account token", &sa_token)?)
        } else {
            Credentials::Anonymous
        };
        let sa_ca = Path::new(SA_DIR).join("service-ca.crt");
        let ca_path = args
            .ca_file
            .clone()
            .or_else(|| sa_ca.is_file().then_some(sa_ca));
        let ca_pem = ca_path
            .map(|p| {
                std::fs::read(&p).map_err(|source| RegistryError::Config {
                    what: "CA file",
                    path: p,
                    source,
                })
            })
            .transpose()?;
        Ok(RegistrySettings {
            host: args.registry.clone(),
            credentials,
            ca_pem,
            insecure_skip_tls_verify: args.insecure_skip_tls_verify,
            plain_http: args.plain_http,
            attempts: args.retries,
        })
    }
}

/// Whether the pod's service-account token may be sent to `registry`
/// without being asked for: only over verified TLS (`unverified`: plain
/// HTTP or `--insecure-skip-tls-verify`), and only to a service of the
/// cluster (`*.svc`, `*.svc.cluster.local`, such as the internal registry).
/// The token may read every ImageStream and patch the archive's claim; a
/// mirror, a route or a plain-HTTP registry gets it only by `--token-file`.
fn implicit_token_goes_to(registry: &str, unverified: bool) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => registry,
    };
    !unverified && (host.ends_with(".svc") || host.ends_with(".svc.cluster.local"))
}

/// Counters of what the client asked the registry.
#[derive(Debug, Default)]
pub struct Stats {
    /// Manifest GET/HEAD requests.
    pub manifest_requests: AtomicU64,
    /// Blob GET requests.
    pub blob_requests: AtomicU64,
    /// Blob HEAD, mount and upload requests.
    pub push_requests: AtomicU64,
    /// Bytes received in blob bodies.
    pub bytes_in: AtomicU64,
    /// Bytes sent in blob bodies.
    pub bytes_out: AtomicU64,
    /// Retries performed.
    pub retries: AtomicU64,
}

/// A registry client.
#[derive(Clone)]
pub struct RegistryClient {
    client: Arc<Client>,
    /// A second client, used once to ask the registry whether it wants
    /// credentials at all (see [`RegistryClient::remember_auth`]).
    probe: Arc<Client>,
    prepared: Arc<tokio::sync::OnceCell<()>>,
    auth: RegistryAuth,
    host: String,
    attempts: u32,
    /// What was requested so far.
    pub stats: Arc<Stats>,
}

fn split_pem(pem: &[u8]) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(pem);
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.starts_with("-----BEGIN") {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END") {
            out.push(cur.clone().into_bytes());
        }
    }
    out
}

impl RegistryClient {
    /// Creates a client.
    pub fn new(settings: &RegistrySettings) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let auth = match &settings.credentials {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Token(t) => RegistryAuth::Bearer(t.clone()),
            Credentials::Basic(u, p) => RegistryAuth::Basic(u.clone(), p.clone()),
        };
        RegistryClient {
            client: Arc::new(Client::new(client_config(settings))),
            probe: Arc::new(Client::new(client_config(settings))),
            prepared: Arc::default(),
            auth,
            host: settings.host.clone(),
            attempts: settings.attempts.max(1),
            stats: Arc::default(),
        }
    }
}

fn client_config(settings: &RegistrySettings) -> ClientConfig {
    let certs = settings
        .ca_pem
        .as_deref()
        .map(split_pem)
        .unwrap_or_default()
        .into_iter()
        .map(|data| Certificate {
            encoding: CertificateEncoding::Pem,
            data,
        })
        .collect();
    ClientConfig {
        protocol: if settings.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        accept_invalid_certificates: settings.insecure_skip_tls_verify,
        use_monolithic_push: true,
        extra_root_certificates: certs,
        platform_resolver: None,
        read_timeout: Some(Duration::from_secs(60)),
        connect_timeout: Some(Duration::from_secs(15)),
        user_agent: concat!("imagestream-archiver/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    }
}

impl RegistryClient {
    /// Hands the credentials to oci-client, once.
    ///
    /// Anonymous access needs care: oci-client 0.18 caches tokens only, so
    /// with "anonymous" stored it asks `/v2/` for a challenge before every
    /// single request. One probe (on a separate client) tells whether the
    /// registry wants credentials at all; when it sends no challenge, an
    /// empty static token is stored instead, which oci-client uses without
    /// probing and such a registry ignores. A registry that does challenge
    /// (anonymous token flows) keeps the normal anonymous path.
    async fn remember_auth(&self) {
        self.prepared
            .get_or_init(|| async {
                let auth = match &self.auth {
                    RegistryAuth::Anonymous => {
                        let any = Reference::with_tag(
                            self.host.clone(),
                            "v2-probe".into(),
                            "latest".into(),
                        );
                        match self
                            .probe
                            .auth(&any, &RegistryAuth::Anonymous, RegistryOperation::Pull)
                            .await
                        {
                            Ok(None) => RegistryAuth::Bearer(String::new()),
                            _ => RegistryAuth::Anonymous,
                        }
                    }
                    other => other.clone(),
                };
                self.client.store_auth_if_needed(&self.host, &auth).await;
            })
            .await;
    }

    /// The registry host.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The reference of `repo` at a digest or tag, and its name for messages.
    fn target(&self, repo: &str, digest_or_tag: &str) -> (Reference, String) {
        let sep = if digest_or_tag.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        (
            self.reference(repo, digest_or_tag),
            format!("{}/{repo}{sep}{digest_or_tag}", self.host),
        )
    }

    fn reference(&self, repo: &str, digest_or_tag: &str) -> Reference {
        if digest_or_tag.starts_with("sha256:") {
            Reference::with_digest(
                self.host.clone(),
                repo.to_string(),
                digest_or_tag.to_string(),
            )
        } else {
            Reference::with_tag(
                self.host.clone(),
                repo.to_string(),
                digest_or_tag.to_string(),
            )
        }
    }

    /// Runs `f` with bounded retries, exponential backoff with jitter, and
    /// one re-authentication on 401.
    async fn retry<T, F, Fut>(
        &self,
        op: &'static str,
        what: &str,
        reference: &Reference,
        operation: RegistryOperation,
        mut f: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        self.remember_auth().await;
        let mut reauthed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match f().await {
                Ok(v) => return Ok(v),
                Err(Attempt::Layout(e)) if e.is_permanent() => return Err(e.into()),
                Err(Attempt::Layout(e)) => classify_layout(e),
                Err(Attempt::Oci(e)) => classify(e),
            };
            if err.unauthorized && !reauthed {
                reauthed = true;
                tracing::debug!(op, what, "401: authenticating again");
                let _ = self.client.auth(reference, &self.auth, operation).await;
                continue;
            }
            if err.permanent || attempt >= self.attempts {
                return Err(RegistryError::Request {
                    op,
                    what: what.to_string(),
                    message: if attempt > 1 {
                        format!("{} (after {attempt} attempts)", err.message)
                    } else {
                        err.message
                    },
                    permanent: err.permanent,
                    not_found: err.not_found,
                    config: err.config,
                });
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            let base = 200u64 << (attempt - 1).min(6);
            let jitter = rand::random::<u64>() % (base / 2 + 1);
            let wait = Duration::from_millis((base + jitter).min(15_000));
            tracing::warn!(op, what, attempt, error = %err.message, "retrying in {wait:?}");
            tokio::time::sleep(wait).await;
        }
    }

    /// Pulls a manifest by digest, verifying the bytes against the digest.
    pub async fn pull_manifest(&self, repo: &str, digest: &Digest) -> Result<Bytes, RegistryError> {
        let (reference, what) = self.target(repo, &digest.to_string());
        self.retry(
            "pull manifest",
            &what,
            &reference,
            RegistryOperation::Pull,
            || async {
                self.stats.manifest_requests.fetch_add(1, Ordering::Relaxed);
                let mismatch = |what: String| {
                    Attempt::Oci(OciDistributionError::GenericError(Some(format!(
                        "{what}; {MANIFEST_MISMATCH}"
                    ))))
                };
                let (bytes, _) = self
                    .client
                    .pull_manifest_raw(&reference, &self.auth, ACCEPTED)
                    .await
                    .map_err(|e| match e {
                        OciDistributionError::DigestError(d) => mismatch(d.to_string()),
                        e => Attempt::Oci(e),
                    })?;
                if Digest::of(&bytes) != *digest {
                    return Err(mismatch(format!(
                        "served manifest hashes to {}",
                        Digest::of(&bytes)
                    )));
                }
                // The body can be a slice of a much larger read buffer, and
                // a plan holds every manifest it fetched until the blobs are
                // in: keep only the manifest's own bytes (a first backup of
                // 35,000 manifests peaked at 284 MiB before, 133 MiB after).
                Ok(Bytes::copy_from_slice(&bytes))
            },
        )
        .await
    }

    /// Streams a blob into the archive, hashing while streaming; nothing
    /// becomes visible unless size and digest match. Returns the bytes written.
    pub async fn pull_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: Option<u64>,
        layout: &Layout,
    ) -> Result<u64, RegistryError> {
        let (reference, what) = self.target(repo, &digest.to_string());
        let desc = oci_client::manifest::OciDescriptor {
            digest: digest.to_string(),
            size: size.unwrap_or(0) as i64,
            ..Default::default()
        };
        self.retry(
            "pull blob",
            &what,
            &reference,
            RegistryOperation::Pull,
            || async {
                if layout.has_blob(digest) {
                    return Ok(0);
                }
                self.stats.blob_requests.fetch_add(1, Ordering::Relaxed);
                // A ranged request from 0 is answered with an unverified
                // stream: the blob writer hashes it once, instead of
                // oci-client and the writer hashing it twice. A registry
                // that ignores Range answers in full (verified twice).
                let mut stream = match size {
                    Some(n) if n > 0 => match self
                        .client
                        .pull_blob_stream_partial(&reference, &desc, 0, None)
                        .await
                        .map_err(Attempt::Oci)?
                    {
                        BlobResponse::Full(s) | BlobResponse::Partial(s) => s,
                    },
                    _ => self
                        .client
                        .pull_blob_stream(&reference, &desc)
                        .await
                        .map_err(Attempt::Oci)?,
                };
                let mut writer = layout.blob_writer(digest, size).map_err(Attempt::Layout)?;
                while let Some(chunk) = stream.next().await {
                    let chunk =
                        chunk.map_err(|e| Attempt::Oci(OciDistributionError::IoError(e)))?;
                    self.stats
                        .bytes_in
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    // The file write (once per megabyte) leaves the async
                    // worker; hashing a chunk into the buffer does not.
                    if writer.buffers(chunk.len()) {
                        writer.write(&chunk)
                    } else {
                        blocking(|| writer.write(&chunk))
                    }
                    .map_err(Attempt::Layout)?;
                }
                let n = writer.written();
                // The directory is synced once after all downloads (before
                // any manifest that references these blobs is written).
                blocking(|| writer.finish_deferring_dir_sync()).map_err(Attempt::Layout)?;
                Ok(n)
            },
        )
        .await
    }

    /// True when the repository has the blob (HEAD).
    pub async fn blob_exists(&self, repo: &str, digest: &Digest) -> Result<bool, RegistryError> {
        let (reference, what) = self.target(repo, &digest.to_string());
        self.retry(
            "check blob",
            &what,
            &reference,
            RegistryOperation::Push,
            || async {
                self.stats.push_requests.fetch_add(1, Ordering::Relaxed);
                self.client
                    .blob_exists(&reference, &digest.to_string())
                    .await
                    .map_err(Attempt::Oci)
            },
        )
        .await
    }

    /// Asks the registry to mount a blob from another repository. `false`
    /// when the registry refused (the caller then uploads).
    pub async fn mount_blob(&self, repo: &str, from: &str, digest: &Digest) -> bool {
        let reference = self.reference(repo, &digest.to_string());
        let source = self.reference(from, &digest.to_string());
        self.remember_auth().await;
        self.stats.push_requests.fetch_add(1, Ordering::Relaxed);
        match self
            .client
            .mount_blob(&reference, &source, &digest.to_string())
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(%digest, repo, from, error = %sanitize(&e.to_string()), "mount refused; uploading");
                false
            }
        }
    }

    /// Uploads a blob from the archive (monolithic PUT, streamed from disk).
    /// A blob the registry refuses is re-hashed: when the archive's copy is
    /// damaged, the error says so ([`LayoutError::Damaged`]; no re-run can
    /// push it) instead of blaming the registry.
    pub async fn push_blob(
        &self,
        repo: &str,
        digest: &Digest,
        layout: &Layout,
    ) -> Result<u64, RegistryError> {
        match self.upload_file(repo, digest, layout).await {
            Err(
                e @ RegistryError::Request {
                    permanent: true,
                    config: false,
                    not_found: false,
                    ..
                },
            ) => match blocking(|| layout.check_blob(digest)) {
                Err(damaged @ LayoutError::Damaged { .. }) => Err(damaged.into()),
                _ => Err(e),
            },
            other => other,
        }
    }

    async fn upload_file(
        &self,
        repo: &str,
        digest: &Digest,
        layout: &Layout,
    ) -> Result<u64, RegistryError> {
        let (reference, what) = self.target(repo, &digest.to_string());
        let path = layout.blob_path(digest);
        self.retry(
            "push blob",
            &what,
            &reference,
            RegistryOperation::Push,
            || async {
                let file = tokio::fs::File::open(&path).await.map_err(|source| {
                    Attempt::Layout(LayoutError::Io {
                        op: "open",
                        path: path.clone(),
                        source,
                    })
                })?;
                let size = file
                    .metadata()
                    .await
                    .map_err(|e| Attempt::Oci(e.into()))?
                    .len();
                self.stats.push_requests.fetch_add(1, Ordering::Relaxed);
                let stats = self.stats.clone();
                let stream =
                    tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(move |r| {
                        if let Ok(b) = &r {
                            stats.bytes_out.fetch_add(b.len() as u64, Ordering::Relaxed);
                        }
                        r.map_err(OciDistributionError::IoError)
                    });
                self.client
                    .push_blob_stream(&reference, stream, &digest.to_string(), Some(size))
                    .await
                    .map_err(Attempt::Oci)?;
                Ok(size)
            },
        )
        .await
    }

    /// Uploads a blob held in memory (monolithic PUT, retried like every call).
    pub async fn push_blob_bytes(
        &self,
        repo: &str,
        digest: &Digest,
        data: Bytes,
    ) -> Result<u64, RegistryError> {
        let (reference, what) = self.target(repo, &digest.to_string());
        let size = data.len() as u64;
        self.retry(
            "push blob",
            &what,
            &reference,
            RegistryOperation::Push,
            || async {
                self.stats.push_requests.fetch_add(1, Ordering::Relaxed);
                let body = data.clone();
                let stream =
                    futures::stream::once(async move { Ok::<_, OciDistributionError>(body) });
                self.client
                    .push_blob_stream(&reference, stream, &digest.to_string(), Some(size))
                    .await
                    .map_err(Attempt::Oci)?;
                self.stats.bytes_out.fetch_add(size, Ordering::Relaxed);
                Ok(size)
            },
        )
        .await
    }

    /// Uploads a blob of `size` bytes from a stream of chunks (monolithic
    /// PUT). A stream cannot be replayed, so there is one attempt only; the
    /// registry checks the digest of what it received.
    pub async fn push_blob_chunks<S>(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        chunks: S,
    ) -> Result<u64, RegistryError>
    where
        S: futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let (reference, what) = self.target(repo, &digest.to_string());
        self.remember_auth().await;
        self.stats.push_requests.fetch_add(1, Ordering::Relaxed);
        let stats = self.stats.clone();
        let stream = chunks.map(move |r| {
            if let Ok(b) = &r {
                stats.bytes_out.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            r.map_err(OciDistributionError::IoError)
        });
        match self
            .client
            .push_blob_stream(&reference, stream, &digest.to_string(), Some(size))
            .await
        {
            Ok(_) => Ok(size),
            Err(e) => {
                let c = classify(e);
                Err(RegistryError::Request {
                    op: "push blob",
                    what,
                    message: c.message,
                    permanent: c.permanent,
                    not_found: c.not_found,
                    config: c.config,
                })
            }
        }
    }

    /// The digest a tag (or digest) currently resolves to, `None` if absent.
    pub async fn resolve(
        &self,
        repo: &str,
        tag_or_digest: &str,
    ) -> Result<Option<Digest>, RegistryError> {
        let (reference, what) = self.target(repo, tag_or_digest);
        let res = self
            .retry(
                "resolve",
                &what,
                &reference,
                RegistryOperation::Pull,
                || async {
                    self.stats.manifest_requests.fetch_add(1, Ordering::Relaxed);
                    self.client
                        .fetch_manifest_digest(&reference, &self.auth)
                        .await
                        .map_err(Attempt::Oci)
                },
            )
            .await;
        match res {
            Ok(d) => Ok(Digest::parse(&d).ok()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Pushes manifest bytes as they are, under a tag or by digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        tag_or_digest: &str,
        body: Bytes,
        media_type: &str,
    ) -> Result<(), RegistryError> {
        let (reference, what) = self.target(repo, tag_or_digest);
        let content_type = reqwest_header(media_type);
        self.retry(
            "push manifest",
            &what,
            &reference,
            RegistryOperation::Push,
            || async {
                self.stats.push_requests.fetch_add(1, Ordering::Relaxed);
                self.client
                    .push_manifest_raw(&reference, body.clone(), content_type.clone())
                    .await
                    .map_err(Attempt::Oci)?;
                Ok(())
            },
        )
        .await
    }
}

/// What a manifest that does not hash to its digest usually means.
const MANIFEST_MISMATCH: &str = "a schema 1 manifest (signed, its digest covers only \
    the unsigned payload: it cannot be archived by digest; rebuild or re-push the image as \
    schema 2 or OCI) or damaged registry storage";

/// Runs file I/O and hashing without stalling the other transfers on this
/// executor thread (on a multi-threaded runtime).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn reqwest_header(media_type: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(media_type)
        .unwrap_or_else(|_| http::HeaderValue::from_static("application/octet-stream"))
}

/// The failure of one attempt.
enum Attempt {
    Oci(OciDistributionError),
    Layout(LayoutError),
}

struct Classified {
    message: String,
    permanent: bool,
    not_found: bool,
    unauthorized: bool,
    config: bool,
}

fn classify_layout(e: LayoutError) -> Classified {
    // A digest or size mismatch is a bad body: worth another attempt.
    Classified {
        message: e.to_string(),
        permanent: false,
        not_found: false,
        unauthorized: false,
        config: false,
    }
}

fn classify(e: OciDistributionError) -> Classified {
    let message = sanitize(&error_chain(&e));
    let tls = message.contains("certificate") || message.contains("UnknownIssuer");
    let (permanent, not_found, unauthorized) = match &e {
        OciDistributionError::UnauthorizedError { .. } => (true, false, true),
        OciDistributionError::AuthenticationFailure(_) => (true, false, false),
        OciDistributionError::ImageManifestNotFoundError(_) => (true, true, false),
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let nf = codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            });
            let unauthorized = codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized));
            let transient = codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests));
            let denied = codes.iter().any(|c| matches!(c, OciErrorCode::Denied));
            (!transient, nf, unauthorized || denied)
        }
        OciDistributionError::ServerError { code, .. } => {
            let transient = *code >= 500 || *code == 429 || *code == 408;
            (!transient, *code == 404, *code == 401 || *code == 403)
        }
        OciDistributionError::RequestError(_)
        | OciDistributionError::IoError(_)
        | OciDistributionError::DigestError(_)
        | OciDistributionError::GenericError(_) => (tls, false, false),
        _ => (true, false, false),
    };
    Classified {
        message,
        permanent,
        not_found,
        unauthorized,
        config: unauthorized || tls || matches!(e, OciDistributionError::AuthenticationFailure(_)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Removes anything that looks like a credential from a message.
pub fn sanitize(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for word in msg.split_inclusive(char::is_whitespace) {
        let w = word.trim_end();
        let looks_secret = w.len() > 40
            && w.matches('.').count() >= 2
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.=".contains(c));
        if looks_secret || w.starts_with("sha256~") {
            out.push_str("<redacted>");
            out.push_str(&word[w.len()..]);
        } else {
            out.push_str(word);
        }
    }
    out.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_redacts_tokens() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJrdWJlcm5ldGVzIn0.c2lnbmF0dXJlc2lnbmF0dXJl";
        let s = sanitize(&format!("denied for {jwt} at x"));
        assert!(!s.contains(jwt), "{s}");
        assert!(sanitize("token sha256~abcdef").contains("<redacted>"));
        let d = Digest::of(b"a").to_string();
        assert!(sanitize(&format!("blob {d}")).contains(&d));
    }

    #[test]
    fn the_service_account_token_goes_only_to_cluster_services_over_tls() {
        assert!(implicit_token_goes_to(
            "image-registry.openshift-image-registry.svc:5000",
            false
        ));
        assert!(implicit_token_goes_to(
            "image-registry.openshift-image-registry.svc.cluster.local:5000",
            false
        ));
        assert!(!implicit_token_goes_to(
            "image-registry.openshift-image-registry.svc:5000",
            true
        ));
        assert!(!implicit_token_goes_to(
            "default-route-openshift-image-registry.apps.example.com",
            false
        ));
        assert!(!implicit_token_goes_to("quay.io", false));
        assert!(!implicit_token_goes_to("evil.svc.example.com:443", false));
    }

    #[test]
    fn splits_pem_bundle() {
        let pem = b"-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(split_pem(pem).len(), 2);
    }
}
