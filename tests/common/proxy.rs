//! A recording, fault-injecting HTTP proxy between the archiver and a real
//! registry (plain HTTP on 127.0.0.1). It records every request (method,
//! path, status, and the sha256 of request bodies, so the order of manifest
//! pushes can be checked) and can inject faults on matching requests:
//! connection resets, 5xx, 429 with Retry-After, truncated and corrupted
//! response bodies.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A fault to inject.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Close the connection without an answer.
    Reset,
    /// Answer with this status and an empty body.
    Status(u16),
    /// Answer 429 with `Retry-After: secs`.
    TooMany(u64),
    /// Forward, but cut the response body in half (then close).
    Truncate,
    /// Forward, but flip one byte of the response body.
    Corrupt,
}

/// Injects `fault` on the first `times` requests matching method and path.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Method to match (`None`: any).
    pub method: Option<String>,
    /// Substring of the path to match.
    pub path_contains: String,
    /// The fault.
    pub fault: Fault,
    /// How many matching requests get it.
    pub times: usize,
}

/// One request that went through the proxy.
#[derive(Debug, Clone)]
pub struct Record {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Status returned to the client (0 for a reset).
    pub status: u16,
    /// sha256 of the request body, when it had one.
    pub body_digest: Option<String>,
    /// Whether a fault was injected.
    pub faulted: bool,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    records: Vec<Record>,
}

/// The running proxy; stops with the test process.
pub struct Proxy {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    state: Arc<Mutex<State>>,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

impl Proxy {
    /// Starts a proxy to `upstream` (`127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> Proxy {
        let state = Arc::new(Mutex::new(State::default()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let upstream = upstream.to_string();
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let client: Client<_, Full<Bytes>> =
                    Client::builder(TokioExecutor::new()).build_http();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let client = client.clone();
                    let st = st.clone();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            handle(req, client.clone(), st.clone(), upstream.clone())
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        Proxy { addr, state }
    }

    /// Adds a fault rule.
    pub fn add_rule(&self, method: Option<&str>, path_contains: &str, fault: Fault, times: usize) {
        self.state.lock().unwrap().rules.push(Rule {
            method: method.map(str::to_string),
            path_contains: path_contains.to_string(),
            fault,
            times,
        });
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// Everything recorded so far.
    pub fn records(&self) -> Vec<Record> {
        self.state.lock().unwrap().records.clone()
    }

    /// How many faults were injected.
    pub fn faults_injected(&self) -> usize {
        self.records().iter().filter(|r| r.faulted).count()
    }
}

async fn handle(
    req: Request<Incoming>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    state: Arc<Mutex<State>>,
    upstream: String,
) -> Result<Response<Body>, std::io::Error> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let fault = {
        let mut st = state.lock().unwrap();
        let rule = st.rules.iter_mut().find(|r| {
            r.times > 0
                && r.method.as_deref().is_none_or(|m| m == method)
                && path.contains(&r.path_contains)
        });
        rule.map(|r| {
            r.times -= 1;
            r.fault.clone()
        })
    };
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let body_digest = (!body.is_empty()).then(|| {
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)))
    });
    let record = |status: u16, faulted: bool| {
        state.lock().unwrap().records.push(Record {
            method: method.clone(),
            path: path.clone(),
            status,
            body_digest: body_digest.clone(),
            faulted,
        });
    };
    match &fault {
        Some(Fault::Reset) => {
            record(0, true);
            return Err(std::io::Error::other("injected reset"));
        }
        Some(Fault::Status(code)) => {
            record(*code, true);
            return Ok(Response::builder()
                .status(*code)
                .body(full(Bytes::new()))
                .unwrap());
        }
        Some(Fault::TooMany(secs)) => {
            record(429, true);
            return Ok(Response::builder()
                .status(429)
                .header("Retry-After", secs.to_string())
                .body(full(Bytes::new()))
                .unwrap());
        }
        _ => {}
    }
    let mut up = Request::builder()
        .method(parts.method.clone())
        .uri(format!("http://{upstream}{path}"));
    // The Host header is kept, so the registry builds its Location URLs
    // with the proxy's address and uploads go through the proxy too.
    for (k, v) in parts.headers.iter() {
        up = up.header(k, v);
    }
    let resp = client
        .request(up.body(Full::new(body.clone())).unwrap())
        .await
        .map_err(std::io::Error::other)?;
    let (rparts, rbody) = resp.into_parts();
    let status = rparts.status.as_u16();
    let bytes = rbody
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    match fault {
        Some(Fault::Truncate) if bytes.len() > 1 => {
            record(status, true);
            let half = bytes.slice(..bytes.len() / 2);
            let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                Ok(Frame::data(half)),
                Err(std::io::Error::other("injected truncation")),
            ];
            let stream = futures_util::stream::iter(chunks);
            Ok(Response::from_parts(
                rparts,
                StreamBody::new(stream).boxed(),
            ))
        }
        Some(Fault::Corrupt) if !bytes.is_empty() => {
            record(status, true);
            let mut v = bytes.to_vec();
            let i = v.len() / 2;
            v[i] ^= 0xff;
            Ok(Response::from_parts(rparts, full(v)))
        }
        _ => {
            record(status, false);
            Ok(Response::from_parts(rparts, full(bytes)))
        }
    }
}
