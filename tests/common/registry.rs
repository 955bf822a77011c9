//! A real registry for tests: Debian's `docker-registry` (CNCF distribution
//! 2.8) started on a free 127.0.0.1 port with `fixtures/registry/config.yml`,
//! filesystem storage in a temp dir, optionally TLS + htpasswd auth.
//!
//! Request counting uses the registry's own access log: distribution 2.8
//! writes one combined-log-format line per request to STDOUT (checked by
//! `tests/registry_harness.rs`), which the harness captures to
//! `access.log`; the application log (stderr) goes to `registry.log`.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

const REGISTRY_EXE: &str = "/usr/bin/docker-registry";
const SYNC_MARKER: &str = "isa-harness-sync=";

/// One request as recorded in the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    /// `GET`, `HEAD`, `PUT`, ...
    pub method: String,
    /// Request URI, with query string.
    pub path: String,
    /// HTTP status of the response.
    pub status: u16,
}

impl LoggedRequest {
    /// A GET or HEAD of a manifest or a blob: a read of image content.
    pub fn is_content_read(&self) -> bool {
        (self.method == "GET" || self.method == "HEAD")
            && (self.path.contains("/manifests/") || self.path.contains("/blobs/"))
    }
}

/// A response of [`Registry::request`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header of that (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Tls {
    ca_pem: PathBuf,
    cert_dir: PathBuf,
    ca_der: Vec<u8>,
    user: String,
    password: String,
}

/// A running `docker-registry`; killed on drop.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Holds `storage/`, the logs, certificates and seeded files.
    pub dir: TempDir,
    child: Option<Child>,
    access_log: PathBuf,
    error_log: PathBuf,
    tls: Option<Tls>,
    syncs: AtomicUsize,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port on 127.0.0.1");
    l.local_addr()
        .expect("local address of probe socket")
        .port()
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Parse one combined-log-format line:
/// `127.0.0.1 - user [date] "GET /v2/ HTTP/1.1" 200 2 "" "agent"`.
pub fn parse_access_line(line: &str) -> Option<LoggedRequest> {
    let start = line.find('"')?;
    let rest = &line[start + 1..];
    let end = rest.find('"')?;
    let mut parts = rest[..end].split(' ');
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
    Some(LoggedRequest {
        method,
        path,
        status,
    })
}

fn decode_chunked(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            break;
        };
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
    out
}

fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of HTTP headers"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad HTTP status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    let mut resp = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        body = decode_chunked(&body);
    } else if let Some(len) = resp.header("content-length").and_then(|v| v.parse().ok()) {
        body.truncate(len);
    }
    resp.body = body;
    Ok(resp)
}

struct CertFiles {
    ca_der: Vec<u8>,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn make_certs() -> CertFiles {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("generating CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "imagestream-archiver test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-signing CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("generating server key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
        .expect("server cert params");
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let cert = params
        .signed_by(&key, &issuer)
        .expect("signing server cert");
    CertFiles {
        ca_der: ca_cert.der().to_vec(),
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

impl Registry {
    /// Start a plain-HTTP registry without auth. Panics when
    /// `docker-registry` is not installed or does not come up within 20 s.
    pub fn start() -> Registry {
        Self::launch(None)
    }

    /// Start a registry serving HTTPS with a fresh self-signed CA (see
    /// [`Registry::ca_pem_path`]) and htpasswd (bcrypt) basic auth for one user.
    pub fn start_tls_auth(user: &str, password: &str) -> Registry {
        Self::launch(Some((user.to_string(), password.to_string())))
    }

    fn launch(auth: Option<(String, String)>) -> Registry {
        if !Path::new(REGISTRY_EXE).exists() {
            panic!("docker-registry not found at {REGISTRY_EXE}: apt-get install docker-registry");
        }
        let mut dir = tempfile::Builder::new()
            .prefix("isa-registry-")
            .tempdir()
            .expect("creating the registry temp dir");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("creating registry storage dir");
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/registry/config.yml");
        let mut env: Vec<(String, String)> = vec![
            (
                "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY".into(),
                storage.display().to_string(),
            ),
            ("REGISTRY_HTTP_SECRET".into(), "isa-test-secret".into()),
        ];
        let mut tls = auth.map(|(user, password)| {
            let certs = make_certs();
            let cert_dir = dir.path().join("certs");
            std::fs::create_dir_all(&cert_dir).expect("creating cert dir");
            let ca_pem = cert_dir.join("ca.crt");
            std::fs::write(&ca_pem, &certs.ca_pem).expect("writing ca.crt");
            let server_dir = dir.path().join("server");
            std::fs::create_dir_all(&server_dir).expect("creating server cert dir");
            let cert = server_dir.join("server.crt");
            let key = server_dir.join("server.key");
            std::fs::write(&cert, &certs.cert_pem).expect("writing server.crt");
            std::fs::write(&key, &certs.key_pem).expect("writing server.key");
            let htpasswd = dir.path().join("htpasswd");
            let hash = bcrypt::hash(&password, 5).expect("bcrypt hash");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("writing htpasswd");
            for (k, v) in [
                ("REGISTRY_HTTP_TLS_CERTIFICATE", cert.display().to_string()),
                ("REGISTRY_HTTP_TLS_KEY", key.display().to_string()),
                ("REGISTRY_AUTH", "htpasswd".to_string()),
                ("REGISTRY_AUTH_HTPASSWD_REALM", "isa-test".to_string()),
                (
                    "REGISTRY_AUTH_HTPASSWD_PATH",
                    htpasswd.display().to_string(),
                ),
            ] {
                env.push((k.to_string(), v));
            }
            Tls {
                ca_pem,
                cert_dir,
                ca_der: certs.ca_der,
                user,
                password,
            }
        });

        let mut last_log = String::new();
        for attempt in 0..5 {
            let addr = format!("127.0.0.1:{}", free_port());
            let access_log = dir.path().join(format!("access-{attempt}.log"));
            let error_log = dir.path().join(format!("registry-{attempt}.log"));
            let stdout = std::fs::File::create(&access_log).expect("creating access log");
            let stderr = std::fs::File::create(&error_log).expect("creating registry log");
            let child = Command::new(REGISTRY_EXE)
                .arg("serve")
                .arg(&config)
                .env("REGISTRY_HTTP_ADDR", &addr)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {REGISTRY_EXE}: {e}"));
            let mut reg = Registry {
                addr,
                dir,
                child: Some(child),
                access_log,
                error_log,
                tls,
                syncs: AtomicUsize::new(0),
            };
            match reg.wait_ready(Duration::from_secs(20)) {
                Ok(()) => return reg,
                Err(log) => {
                    reg.stop();
                    if !log.contains("address already in use") {
                        panic!("docker-registry did not start on {}:\n{log}", reg.addr);
                    }
                    last_log = log;
                    // Reuse the temp dir and TLS material for the next port.
                    dir = std::mem::replace(&mut reg.dir, TempDir::new().expect("temp dir"));
                    tls = reg.tls.take();
                }
            }
        }
        panic!("docker-registry could not find a free port:\n{last_log}");
    }

    /// Wait until `GET /v2/` answers (200, or 401 with auth). On failure
    /// returns the registry's log.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let expected = if self.tls.is_some() { 401 } else { 200 };
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("exited with {status}\n{}", self.log_text()));
                }
            }
            if let Ok(r) = self.request_with_auth("GET", "/v2/", &[], false) {
                if r.status == expected {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no answer on {} within {timeout:?}\n{}",
                    self.addr,
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill the registry now (also done on drop). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the registry serves HTTPS with auth.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The registry's storage root.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// PEM of the CA that signed the server certificate. Panics on a
    /// plain registry.
    pub fn ca_pem_path(&self) -> &Path {
        &self
            .tls
            .as_ref()
            .expect("ca_pem_path() on a plain registry")
            .ca_pem
    }

    /// A directory holding only `ca.crt` (for `skopeo --cert-dir`).
    pub fn cert_dir(&self) -> &Path {
        &self
            .tls
            .as_ref()
            .expect("cert_dir() on a plain registry")
            .cert_dir
    }

    /// `(user, password)` of a TLS+auth registry.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.tls
            .as_ref()
            .map(|t| (t.user.as_str(), t.password.as_str()))
    }

    /// skopeo flags to reach this registry; `prefix` is `""` for
    /// `inspect`, `"src-"` / `"dest-"` for `copy`.
    pub fn skopeo_flags(&self, prefix: &str) -> Vec<String> {
        match &self.tls {
            None => vec![format!("--{prefix}tls-verify=false")],
            Some(t) => vec![
                format!("--{prefix}cert-dir={}", t.cert_dir.display()),
                format!("--{prefix}creds={}:{}", t.user, t.password),
            ],
        }
    }

    /// `docker://ADDR/<repo_and_ref>` for skopeo.
    pub fn docker_ref(&self, repo_and_ref: &str) -> String {
        format!("docker://{}/{repo_and_ref}", self.addr)
    }

    /// The registry's application log (stderr), for diagnostics.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    /// One HTTP request (no body) with the registry's credentials, if any.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<HttpResponse> {
        self.request_with_auth(method, path, headers, true)
    }

    /// One HTTP request (no body), sending credentials only if `auth`.
    pub fn request_with_auth(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        auth: bool,
    ) -> io::Result<HttpResponse> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: isa-test-harness\r\n",
            self.addr
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let (true, Some((u, p))) = (auth, self.credentials()) {
            req.push_str(&format!(
                "Authorization: Basic {}\r\n",
                base64(format!("{u}:{p}").as_bytes())
            ));
        }
        req.push_str("\r\n");
        let tcp = TcpStream::connect(&self.addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut raw = Vec::new();
        match &self.tls {
            None => {
                let mut tcp = tcp;
                tcp.write_all(req.as_bytes())?;
                tcp.read_to_end(&mut raw)?;
            }
            Some(t) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(rustls::pki_types::CertificateDer::from(t.ca_der.clone()))
                    .map_err(io::Error::other)?;
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(io::Error::other)?
                .with_root_certificates(roots)
                .with_no_client_auth();
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
                    .map_err(io::Error::other)?;
                let conn = rustls::ClientConnection::new(Arc::new(config), name)
                    .map_err(io::Error::other)?;
                let mut s = rustls::StreamOwned::new(conn, tcp);
                s.write_all(req.as_bytes())?;
                if let Err(e) = s.read_to_end(&mut raw) {
                    // A peer closing without close_notify still gave us the data.
                    if e.kind() != io::ErrorKind::UnexpectedEof || raw.is_empty() {
                        return Err(e);
                    }
                }
            }
        }
        parse_response(&raw)
    }

    fn raw_log(&self) -> Vec<LoggedRequest> {
        std::fs::read_to_string(&self.access_log)
            .expect("reading the registry access log")
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// Make sure every request that completed before this call is in the
    /// access log: send a marker request and wait for its log line.
    fn sync(&self) {
        let n = self.syncs.fetch_add(1, Ordering::SeqCst);
        let path = format!("/v2/?{SYNC_MARKER}{n}");
        self.request("GET", &path, &[])
            .unwrap_or_else(|e| panic!("sync request to {}: {e}", self.addr));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.raw_log().iter().any(|r| r.path == path) {
            if Instant::now() > deadline {
                panic!("marker request {path} never reached the access log");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Lines of requests whose last bytes raced the marker.
        std::thread::sleep(Duration::from_millis(30));
    }

    /// Every request the registry served so far (the harness's own marker
    /// requests excluded), in log order.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.sync();
        self.raw_log()
            .into_iter()
            .filter(|r| !r.path.contains(SYNC_MARKER))
            .collect()
    }

    /// The current length of [`Registry::request_log`]; pass it to the
    /// `*_since` helpers to look only at later requests.
    pub fn mark(&self) -> usize {
        self.request_log().len()
    }

    /// Requests logged after `mark`.
    pub fn requests_since(&self, mark: usize) -> Vec<LoggedRequest> {
        self.request_log().into_iter().skip(mark).collect()
    }

    /// Requests whose method starts with `method_prefix` and whose path
    /// contains `path_substring` (both may be empty).
    pub fn count(&self, method_prefix: &str, path_substring: &str) -> usize {
        self.count_since(0, method_prefix, path_substring)
    }

    /// [`Registry::count`] over the requests logged after `mark`.
    pub fn count_since(&self, mark: usize, method_prefix: &str, path_substring: &str) -> usize {
        self.requests_since(mark)
            .iter()
            .filter(|r| r.method.starts_with(method_prefix) && r.path.contains(path_substring))
            .count()
    }

    /// Manifest or blob GET/HEAD requests logged after `mark`.
    pub fn content_reads_since(&self, mark: usize) -> Vec<LoggedRequest> {
        self.requests_since(mark)
            .into_iter()
            .filter(LoggedRequest::is_content_read)
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
