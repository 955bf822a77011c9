//! `isa-seed`: generate a reproducible image workload, push it into a
//! registry, and write the ImageStream list an OpenShift cluster would show
//! for it (the JSON of `oc get is -A -o json`).
//!
//! Workload model (all content is derived from `--seed`, so the same flags
//! give the same blobs, digests and ImageStream JSON):
//! - namespaces `team-a`, `team-b`, ... (`--namespaces`);
//! - `--repos` ImageStreams PER NAMESPACE, stored in the registry as
//!   `<namespace>/<name>`;
//! - `--tags` tags per stream, each pushed `--history` times BY TAG, oldest
//!   first, so `status.tags[].items` has `--history` entries, newest first;
//! - every image has the shared base layer (`--shared-base-size` bytes, the
//!   same blob in every image), a per-namespace shared layer (half that
//!   size), and `--layers` layers of its own whose sizes vary between 50 %
//!   and 150 % of `--layer-size`. Layers are real `tar+gzip` (gzip with
//!   stored deflate blocks around a tar of random bytes), so `diff_ids` are
//!   correct and nothing compresses;
//! - every `--multiarch-every`-th tag (counted over all tags) is an image
//!   index with an amd64 and an arm64 child;
//! - every `--schema2-every`-th image (counted over all pushes) uses Docker
//!   schema2 media types (a manifest list when multi-arch), the rest OCI;
//! - every `--external-every`-th history item (not current images) is
//!   recorded with a `dockerImageReference` on `--external-registry`, while
//!   its bytes are in the local registry under `<namespace>/<name>` (as if
//!   served by pull-through).
//!
//! Logs go to stderr; stdout gets a one-line JSON summary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures::stream::{self, StreamExt, TryStreamExt};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::Serialize;
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// 2024-03-01T08:00:00Z: the creation time of the first stream.
const EPOCH: i64 = 1_709_280_000;
/// mtime of the files inside generated layers.
const LAYER_MTIME: u64 = 1_700_000_000;

const STREAM_NAMES: &[&str] = &[
    "frontend",
    "backend",
    "worker",
    "api",
    "db-migrator",
    "cache",
    "gateway",
    "scheduler",
    "reporter",
    "auth",
];
const TAG_NAMES: &[&str] = &[
    "latest", "1.0", "stable", "2.1.3", "nightly", "prod", "3.0-rc1", "dev",
];

/// Workload size presets; explicit flags override their values.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Preset {
    /// 2 namespaces x 2 streams x 2 tags x 2 pushes, ~3 MiB: a few seconds.
    Small,
    /// 3 namespaces x 10 streams x 4 tags x 3 pushes (120 tags, 360 tag
    /// events of which 240 history), ~1.4 GiB of unique blobs.
    Medium,
}

/// Command line of `isa-seed`.
#[derive(Debug, Parser)]
#[command(
    name = "isa-seed",
    about = "Push a reproducible image workload into a registry and write the matching ImageStream list"
)]
struct Args {
    /// Registry to push to, HOST:PORT.
    #[arg(long)]
    registry: String,
    /// Talk plain HTTP to the registry (default: HTTPS).
    #[arg(long)]
    plain_http: bool,
    /// PEM file with an extra CA to trust for HTTPS.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// User name for HTTP basic auth.
    #[arg(long, requires = "password")]
    username: Option<String>,
    /// Password for HTTP basic auth.
    #[arg(long, requires = "username")]
    password: Option<String>,
    /// Size preset; the flags below override single values of it.
    #[arg(long, value_enum, default_value = "small")]
    preset: Preset,
    /// Number of namespaces (team-a, team-b, ...).
    #[arg(long)]
    namespaces: Option<usize>,
    /// ImageStreams per namespace.
    #[arg(long)]
    repos: Option<usize>,
    /// Tags per ImageStream.
    #[arg(long)]
    tags: Option<usize>,
    /// How many times each tag is pushed (items[1..] are the older pushes).
    #[arg(long)]
    history: Option<usize>,
    /// Layers of each image besides the two shared ones.
    #[arg(long)]
    layers: Option<usize>,
    /// Mean size of an image's own layers, bytes.
    #[arg(long)]
    layer_size: Option<usize>,
    /// Size of the base layer shared by all images, bytes; the per-namespace
    /// shared layer is half of it.
    #[arg(long)]
    shared_base_size: Option<usize>,
    /// Every Nth tag is a 2-platform image index (0: none).
    #[arg(long)]
    multiarch_every: Option<usize>,
    /// Every Nth image uses Docker schema2 media types (0: none).
    #[arg(long)]
    schema2_every: Option<usize>,
    /// Every Nth history item is recorded as an external image (0: none).
    #[arg(long)]
    external_every: Option<usize>,
    /// Host written into external dockerImageReferences.
    #[arg(long, default_value = "quay.io")]
    external_registry: String,
    /// Seed of all generated content.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tags pushed in parallel.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Write the ImageStream list (`oc get is -A -o json`) here.
    #[arg(long)]
    imagestreams_out: Option<PathBuf>,
    /// Registry host written into dockerImageRepository/dockerImageReference
    /// (default: the --registry value).
    #[arg(long)]
    registry_name: Option<String>,
    /// Generate everything and write the outputs, but push nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The resolved workload parameters.
#[derive(Debug, Clone)]
struct Settings {
    namespaces: usize,
    repos: usize,
    tags: usize,
    history: usize,
    layers: usize,
    layer_size: usize,
    shared_base_size: usize,
    multiarch_every: usize,
    schema2_every: usize,
    external_every: usize,
    seed: u64,
}

impl Settings {
    fn from_args(a: &Args) -> Result<Self> {
        let (ns, repos, tags, history, layers, layer_size, base, multi, s2) = match a.preset {
            Preset::Small => (2, 2, 2, 2, 2, 64 << 10, 256 << 10, 3, 3),
            Preset::Medium => (3, 10, 4, 3, 3, 1 << 20, 48 << 20, 4, 5),
        };
        let s = Settings {
            namespaces: a.namespaces.unwrap_or(ns),
            repos: a.repos.unwrap_or(repos),
            tags: a.tags.unwrap_or(tags),
            history: a.history.unwrap_or(history),
            layers: a.layers.unwrap_or(layers),
            layer_size: a.layer_size.unwrap_or(layer_size),
            shared_base_size: a.shared_base_size.unwrap_or(base),
            multiarch_every: a.multiarch_every.unwrap_or(multi),
            schema2_every: a.schema2_every.unwrap_or(s2),
            external_every: a.external_every.unwrap_or(0),
            seed: a.seed,
        };
        if s.namespaces == 0 || s.namespaces > 26 {
            bail!("--namespaces must be 1..=26, got {}", s.namespaces);
        }
        if s.repos == 0 || s.tags == 0 || s.history == 0 {
            bail!("--repos, --tags and --history must be at least 1");
        }
        if a.jobs == 0 {
            bail!("--jobs must be at least 1");
        }
        Ok(s)
    }
}

/// "every Nth" over a 0-based counter; N = 0 means never.
fn every(n: usize, counter: usize) -> bool {
    n > 0 && (counter + 1).is_multiple_of(n)
}

// ---------------------------------------------------------------------------
// Deterministic content
// ---------------------------------------------------------------------------

/// A small, fast PRNG (wyrand) seeded from the global seed and a label.
struct Prng(u64);

impl Prng {
    fn new(seed: u64, label: &str) -> Self {
        // FNV-1a over the label, mixed with the seed, then splitmix64.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in label.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Prng(z ^ (z >> 31))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0).wrapping_mul(u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db));
        ((t >> 64) ^ t) as u64
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

fn sha256_digest(data: &[u8]) -> String {
    imagestream_archiver::digest::Digest::of(data).to_string()
}

fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A valid gzip stream made of stored (uncompressed) deflate blocks.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 65535 * 5 + 32);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    if data.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    let mut chunks = data.chunks(65535).peekable();
    while let Some(c) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// A generated layer: the gzip blob and the digest of its tar (diff_id).
#[derive(Clone)]
struct Layer {
    digest: String,
    diff_id: String,
    data: Bytes,
}

/// A tar.gz holding one file of `size` random bytes derived from `label`.
fn make_layer(seed: u64, label: &str, size: usize) -> Result<Layer> {
    let mut rng = Prng::new(seed, label);
    let mut content = vec![0u8; size];
    rng.fill(&mut content);
    let name = format!("opt/isa-seed/{:016x}.bin", rng.next_u64());
    let mut header = tar::Header::new_ustar();
    header
        .set_path(&name)
        .with_context(|| format!("tar path {name}"))?;
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(LAYER_MTIME);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::with_capacity(size + 3072));
    builder
        .append(&header, content.as_slice())
        .with_context(|| format!("building tar of layer {label}"))?;
    let tar = builder
        .into_inner()
        .with_context(|| format!("finishing tar of layer {label}"))?;
    drop(content);
    let gz = gzip_stored(&tar);
    Ok(Layer {
        digest: sha256_digest(&gz),
        diff_id: sha256_digest(&tar),
        data: Bytes::from(gz),
    })
}

/// RFC 3339 (UTC, seconds) of a Unix time.
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn uuid(seed: u64, label: &str) -> String {
    let mut rng = Prng::new(seed, label);
    let mut b = [0u8; 16];
    rng.fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

// ---------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    size: u64,
    digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
}

#[derive(Serialize, Clone)]
struct Platform {
    architecture: &'static str,
    os: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'static str>,
}

#[derive(Serialize)]
struct ImageManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Serialize)]
struct IndexManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

/// Docker writes schema2 manifests with a 3-space indent; OCI ones are
/// written compact here. Either way the bytes are what gets digested.
fn encode<T: Serialize>(value: &T, docker: bool) -> Result<Vec<u8>> {
    if docker {
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"   ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        value.serialize(&mut ser).context("encoding manifest")?;
        Ok(out)
    } else {
        serde_json::to_vec(value).context("encoding manifest")
    }
}

/// A manifest ready to push.
struct Manifest {
    digest: String,
    media_type: &'static str,
    data: Bytes,
}

/// One pushed image (tag event): its blobs, child manifests and top manifest.
struct BuiltImage {
    /// Blobs of its own (layers and configs), not the shared layers.
    blobs: Vec<(String, Bytes)>,
    /// Shared blobs it references (digest, size).
    shared: Vec<(String, u64)>,
    /// Child manifests of an index, pushed by digest first.
    children: Vec<Manifest>,
    /// The manifest pushed by tag.
    top: Manifest,
}

/// What one push of a tag looks like.
#[derive(Debug, Clone)]
struct PushPlan {
    /// `ns/name:tag#k`, the seed label of everything in this image.
    label: String,
    schema2: bool,
    multiarch: bool,
    external: bool,
    /// Unix time of the push (the tag event's `created`).
    pushed_at: i64,
}

/// The layers shared between images.
struct SharedLayers {
    base: Layer,
    /// One per namespace.
    per_namespace: Vec<Layer>,
}

fn build_single(
    s: &Settings,
    shared: &SharedLayers,
    ns_index: usize,
    plan: &PushPlan,
    platform: &Platform,
    out_blobs: &mut Vec<(String, Bytes)>,
) -> Result<Manifest> {
    let docker = plan.schema2;
    let layer_type = if docker { DOCKER_LAYER } else { OCI_LAYER };
    let ns_layer = &shared.per_namespace[ns_index];
    let mut layers = vec![shared.base.clone(), ns_layer.clone()];
    let mut sizes = Prng::new(
        s.seed,
        &format!("sizes:{}:{}", plan.label, platform.architecture),
    );
    for i in 0..s.layers {
        let size = s.layer_size / 2 + sizes.below(s.layer_size as u64 + 1) as usize;
        let label = format!("layer:{}:{}:{i}", plan.label, platform.architecture);
        layers.push(make_layer(s.seed, &label, size)?);
    }
    let created = rfc3339(plan.pushed_at - 120);
    let history: Vec<Value> = layers
        .iter()
        .enumerate()
        .map(|(i, _)| {
            json!({
                "created": created,
                "created_by": format!("/bin/sh -c #(nop) ADD layer {i} in /"),
            })
        })
        .collect();
    let mut config = json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "created": created,
        "author": "isa-seed",
        "config": {
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                format!("ISA_SEED_IMAGE={}", plan.label),
            ],
            "Cmd": ["/usr/local/bin/app"],
            "WorkingDir": "/opt/app",
            "Labels": {
                "io.openshift.build.source-location": "https://git.example.com/isa-seed.git",
                "isa-seed.image": plan.label,
            },
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": history,
    });
    if let Some(v) = platform.variant {
        config["variant"] = json!(v);
    }
    let config_bytes = serde_json::to_vec(&config).context("encoding image config")?;
    let config_digest = sha256_digest(&config_bytes);
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: if docker {
            DOCKER_MANIFEST
        } else {
            OCI_MANIFEST
        },
        config: Descriptor {
            media_type: if docker { DOCKER_CONFIG } else { OCI_CONFIG },
            size: config_bytes.len() as u64,
            digest: config_digest.clone(),
            platform: None,
        },
        layers: layers
            .iter()
            .map(|l| Descriptor {
                media_type: layer_type,
                size: l.data.len() as u64,
                digest: l.digest.clone(),
                platform: None,
            })
            .collect(),
        annotations: (!docker).then(|| {
            BTreeMap::from([(
                "org.opencontainers.image.created".to_string(),
                created.clone(),
            )])
        }),
    };
    out_blobs.push((config_digest, Bytes::from(config_bytes)));
    for l in layers.into_iter().skip(2) {
        out_blobs.push((l.digest, l.data));
    }
    let data = encode(&manifest, docker)?;
    Ok(Manifest {
        digest: sha256_digest(&data),
        media_type: manifest.media_type,
        data: Bytes::from(data),
    })
}

fn build_image(
    s: &Settings,
    shared: &SharedLayers,
    ns_index: usize,
    plan: &PushPlan,
) -> Result<BuiltImage> {
    let amd64 = Platform {
        architecture: "amd64",
        os: "linux",
        variant: None,
    };
    let arm64 = Platform {
        architecture: "arm64",
        os: "linux",
        variant: Some("v8"),
    };
    let shared_refs = vec![
        (shared.base.digest.clone(), shared.base.data.len() as u64),
        (
            shared.per_namespace[ns_index].digest.clone(),
            shared.per_namespace[ns_index].data.len() as u64,
        ),
    ];
    let mut blobs = Vec::new();
    if !plan.multiarch {
        let top = build_single(s, shared, ns_index, plan, &amd64, &mut blobs)?;
        return Ok(BuiltImage {
            blobs,
            shared: shared_refs,
            children: Vec::new(),
            top,
        });
    }
    let mut children = Vec::new();
    let mut descriptors = Vec::new();
    for p in [amd64, arm64] {
        let child = build_single(s, shared, ns_index, plan, &p, &mut blobs)?;
        descriptors.push(Descriptor {
            media_type: child.media_type,
            size: child.data.len() as u64,
            digest: child.digest.clone(),
            platform: Some(p),
        });
        children.push(child);
    }
    let index = IndexManifest {
        schema_version: 2,
        media_type: if plan.schema2 { DOCKER_LIST } else { OCI_INDEX },
        manifests: descriptors,
    };
    let data = encode(&index, plan.schema2)?;
    Ok(BuiltImage {
        blobs,
        shared: shared_refs,
        children,
        top: Manifest {
            digest: sha256_digest(&data),
            media_type: index.media_type,
            data: Bytes::from(data),
        },
    })
}

// ---------------------------------------------------------------------------
// Plan
// ---------------------------------------------------------------------------

struct TagPlan {
    name: String,
    /// Oldest first.
    pushes: Vec<PushPlan>,
    /// External image the tag imports (a `spec.tags` entry), if any.
    spec_from: Option<String>,
}

struct StreamPlan {
    namespace: String,
    ns_index: usize,
    name: String,
    /// 0-based over all streams.
    index: usize,
    tags: Vec<TagPlan>,
}

fn stream_name(i: usize) -> String {
    match STREAM_NAMES.get(i) {
        Some(n) => (*n).to_string(),
        None => format!(
            "{}-{}",
            STREAM_NAMES[i % STREAM_NAMES.len()],
            i / STREAM_NAMES.len()
        ),
    }
}

fn tag_name(i: usize) -> String {
    match TAG_NAMES.get(i) {
        Some(n) => (*n).to_string(),
        None => format!("v{i}"),
    }
}

fn plan(s: &Settings, external_registry: &str) -> Vec<StreamPlan> {
    let (mut tag_counter, mut image_counter, mut history_counter) = (0usize, 0usize, 0usize);
    let mut streams = Vec::new();
    for ns_index in 0..s.namespaces {
        let namespace = format!("team-{}", (b'a' + ns_index as u8) as char);
        for r in 0..s.repos {
            let index = streams.len();
            let name = stream_name(r);
            let mut tags = Vec::new();
            for t in 0..s.tags {
                let tag = tag_name(t);
                let multiarch = every(s.multiarch_every, tag_counter);
                tag_counter += 1;
                let mut pushes = Vec::new();
                for k in 0..s.history {
                    let schema2 = every(s.schema2_every, image_counter);
                    image_counter += 1;
                    let is_history = k + 1 < s.history;
                    let external = is_history && every(s.external_every, history_counter);
                    if is_history {
                        history_counter += 1;
                    }
                    pushes.push(PushPlan {
                        label: format!("{namespace}/{name}:{tag}#{k}"),
                        schema2,
                        multiarch,
                        external,
                        pushed_at: EPOCH
                            + 86400 * (1 + 7 * k as i64)
                            + 600 * index as i64
                            + 60 * t as i64,
                    });
                }
                // Every third stream imports its first tag from outside.
                let spec_from = (t == 0 && index % 3 == 1)
                    .then(|| format!("{external_registry}/{namespace}/{name}:{tag}"));
                tags.push(TagPlan {
                    name: tag,
                    pushes,
                    spec_from,
                });
            }
            streams.push(StreamPlan {
                namespace: namespace.clone(),
                ns_index,
                name,
                index,
                tags,
            });
        }
    }
    streams
}

// ---------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------

struct Pusher {
    client: Client,
    registry: String,
    auth: RegistryAuth,
}

impl Pusher {
    async fn new(a: &Args) -> Result<Self> {
        let mut config = ClientConfig {
            protocol: if a.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            use_monolithic_push: true,
            ..Default::default()
        };
        if let Some(ca) = &a.ca_file {
            let data =
                std::fs::read(ca).with_context(|| format!("reading CA file {}", ca.display()))?;
            config.extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let client = Client::try_from(config).context("creating the registry client")?;
        let auth = match (&a.username, &a.password) {
            (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            _ => RegistryAuth::Anonymous,
        };
        let pusher = Pusher {
            client,
            registry: a.registry.clone(),
            auth,
        };
        if !matches!(pusher.auth, RegistryAuth::Anonymous) {
            let probe = pusher.reference("isa-seed/probe", None, Some("latest"))?;
            pusher
                .client
                .auth(&probe, &pusher.auth, RegistryOperation::Push)
                .await
                .with_context(|| format!("authenticating to {}", a.registry))?;
        }
        Ok(pusher)
    }

    fn reference(&self, repo: &str, digest: Option<&str>, tag: Option<&str>) -> Result<Reference> {
        let s = match (digest, tag) {
            (Some(d), _) => format!("{}/{repo}@{d}", self.registry),
            (None, Some(t)) => format!("{}/{repo}:{t}", self.registry),
            (None, None) => format!("{}/{repo}", self.registry),
        };
        s.parse()
            .with_context(|| format!("invalid image reference {s}"))
    }

    async fn push_blob(&self, repo: &str, digest: &str, data: Bytes) -> Result<()> {
        let r = self.reference(repo, None, Some("latest"))?;
        self.client
            .push_blob(&r, data, digest)
            .await
            .with_context(|| format!("pushing blob {digest} to {}/{repo}", self.registry))?;
        Ok(())
    }

    /// Link a blob into `repo` by a cross-repository mount from `from`,
    /// uploading it when the registry refuses the mount.
    async fn mount_or_push(&self, repo: &str, from: &str, layer: &Layer) -> Result<()> {
        let target = self.reference(repo, None, Some("latest"))?;
        let source = self.reference(from, None, Some("latest"))?;
        match self
            .client
            .mount_blob(&target, &source, &layer.digest)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                eprintln!(
                    "isa-seed: mount of {} from {from} into {repo} failed ({e}); uploading",
                    layer.digest
                );
                self.push_blob(repo, &layer.digest, layer.data.clone())
                    .await
            }
        }
    }

    async fn push_manifest(&self, repo: &str, m: &Manifest, tag: Option<&str>) -> Result<()> {
        let r = match tag {
            Some(t) => self.reference(repo, None, Some(t))?,
            None => self.reference(repo, Some(&m.digest), None)?,
        };
        let content_type = m
            .media_type
            .parse()
            .with_context(|| format!("media type {}", m.media_type))?;
        self.client
            .push_manifest_raw(&r, m.data.clone(), content_type)
            .await
            .with_context(|| format!("pushing manifest {} as {r}", m.digest))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Run
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Stats {
    blobs: BTreeMap<String, u64>,
    manifests: BTreeMap<String, &'static str>,
    manifest_bytes: u64,
}

/// Result of one push of a tag.
#[derive(Clone)]
struct Event {
    digest: String,
    pushed_at: i64,
    external: bool,
}

async fn push_tag(
    s: &Settings,
    shared: &SharedLayers,
    stream: &StreamPlan,
    tag: &TagPlan,
    pusher: Option<&Pusher>,
    stats: &Mutex<Stats>,
) -> Result<Vec<Event>> {
    let repo = format!("{}/{}", stream.namespace, stream.name);
    let mut events = Vec::new();
    for push in &tag.pushes {
        let built = tokio::task::block_in_place(|| build_image(s, shared, stream.ns_index, push))
            .with_context(|| format!("generating image {}", push.label))?;
        {
            let mut st = stats.lock().map_err(|_| anyhow!("stats lock poisoned"))?;
            for (d, data) in &built.blobs {
                st.blobs.insert(d.clone(), data.len() as u64);
            }
            for (d, size) in &built.shared {
                st.blobs.insert(d.clone(), *size);
            }
            for m in built.children.iter().chain(std::iter::once(&built.top)) {
                if st
                    .manifests
                    .insert(m.digest.clone(), m.media_type)
                    .is_none()
                {
                    st.manifest_bytes += m.data.len() as u64;
                }
            }
        }
        if let Some(p) = pusher {
            let mut seen = BTreeSet::new();
            for (d, data) in built.blobs {
                if seen.insert(d.clone()) {
                    p.push_blob(&repo, &d, data).await?;
                }
            }
            for child in &built.children {
                p.push_manifest(&repo, child, None).await?;
            }
            p.push_manifest(&repo, &built.top, Some(&tag.name))
                .await
                .with_context(|| format!("pushing {}", push.label))?;
        }
        events.push(Event {
            digest: built.top.digest.clone(),
            pushed_at: push.pushed_at,
            external: push.external,
        });
    }
    Ok(events)
}

fn imagestream_json(
    s: &Settings,
    stream: &StreamPlan,
    events: &[Vec<Event>],
    registry_name: &str,
    external_registry: &str,
) -> Value {
    let repo = format!("{registry_name}/{}/{}", stream.namespace, stream.name);
    let created = EPOCH + 600 * stream.index as i64;
    let imports = stream.tags.iter().any(|t| t.spec_from.is_some());
    let generation = if imports { 2 } else { 1 };
    let mut metadata = json!({
        "name": stream.name,
        "namespace": stream.namespace,
        "uid": uuid(s.seed, &format!("uid:{}/{}", stream.namespace, stream.name)),
        "resourceVersion": (1_000_000 + 7919 * stream.index).to_string(),
        "generation": generation,
        "creationTimestamp": rfc3339(created),
    });
    if stream.index.is_multiple_of(2) {
        metadata["labels"] = json!({
            "app": stream.name,
            "app.kubernetes.io/part-of": stream.namespace,
        });
    }
    if imports {
        metadata["annotations"] = json!({
            "openshift.io/image.dockerRepositoryCheck": rfc3339(created + 5),
        });
    }
    let spec_tags: Vec<Value> = stream
        .tags
        .iter()
        .filter_map(|t| {
            t.spec_from.as_ref().map(|from| {
                json!({
                    "name": t.name,
                    "annotations": null,
                    "from": {"kind": "DockerImage", "name": from},
                    "generation": 2,
                    "importPolicy": {"importMode": "Legacy"},
                    "referencePolicy": {"type": "Source"},
                })
            })
        })
        .collect();
    let mut spec = json!({"lookupPolicy": {"local": false}});
    if !spec_tags.is_empty() {
        spec["tags"] = Value::Array(spec_tags);
    }
    let status_tags: Vec<Value> = stream
        .tags
        .iter()
        .zip(events)
        .map(|(t, evs)| {
            let item_generation = if t.spec_from.is_some() { 2 } else { 1 };
            let items: Vec<Value> = evs
                .iter()
                .rev()
                .map(|e| {
                    let reference = if e.external {
                        format!(
                            "{external_registry}/{}/{}@{}",
                            stream.namespace, stream.name, e.digest
                        )
                    } else {
                        format!("{repo}@{}", e.digest)
                    };
                    json!({
                        "created": rfc3339(e.pushed_at),
                        "dockerImageReference": reference,
                        "image": e.digest,
                        "generation": item_generation,
                    })
                })
                .collect();
            json!({"tag": t.name, "items": items})
        })
        .collect();
    json!({
        "apiVersion": "image.openshift.io/v1",
        "kind": "ImageStream",
        "metadata": metadata,
        "spec": spec,
        "status": {
            "dockerImageRepository": repo,
            "tags": status_tags,
        },
    })
}

async fn run(a: Args) -> Result<()> {
    let s = Settings::from_args(&a)?;
    let registry_name = a
        .registry_name
        .clone()
        .unwrap_or_else(|| a.registry.clone());
    let streams = plan(&s, &a.external_registry);

    let shared = tokio::task::block_in_place(|| -> Result<SharedLayers> {
        Ok(SharedLayers {
            base: make_layer(s.seed, "shared:base", s.shared_base_size)?,
            per_namespace: (0..s.namespaces)
                .map(|i| make_layer(s.seed, &format!("shared:ns:{i}"), s.shared_base_size / 2))
                .collect::<Result<_>>()?,
        })
    })
    .context("generating shared layers")?;

    let pusher = if a.dry_run {
        None
    } else {
        Some(Pusher::new(&a).await?)
    };

    // Phase 1: link the shared layers into every repository: upload each
    // once, then mount it everywhere else.
    if let Some(p) = &pusher {
        let repo_of = |st: &StreamPlan| format!("{}/{}", st.namespace, st.name);
        let first = repo_of(&streams[0]);
        p.push_blob(&first, &shared.base.digest, shared.base.data.clone())
            .await?;
        let mut first_in_ns: BTreeMap<usize, String> = BTreeMap::new();
        for st in &streams {
            if let std::collections::btree_map::Entry::Vacant(e) = first_in_ns.entry(st.ns_index) {
                let repo = repo_of(st);
                let l = &shared.per_namespace[st.ns_index];
                p.push_blob(&repo, &l.digest, l.data.clone()).await?;
                e.insert(repo);
            }
        }
        let mut mounts = Vec::new();
        for st in &streams {
            let repo = repo_of(st);
            if repo != first {
                mounts.push((repo.clone(), first.clone(), &shared.base));
            }
            if first_in_ns[&st.ns_index] != repo {
                let from = first_in_ns[&st.ns_index].clone();
                mounts.push((repo, from, &shared.per_namespace[st.ns_index]));
            }
        }
        stream::iter(mounts)
            .map(|(repo, from, layer)| async move { p.mount_or_push(&repo, &from, layer).await })
            .buffer_unordered(a.jobs)
            .try_collect::<Vec<()>>()
            .await?;
    }

    // Phase 2: every tag, its history oldest first, tags in parallel.
    let stats = Mutex::new(Stats::default());
    let work: Vec<(usize, usize)> = streams
        .iter()
        .enumerate()
        .flat_map(|(si, st)| (0..st.tags.len()).map(move |ti| (si, ti)))
        .collect();
    let total = work.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<((usize, usize), Vec<Event>)> = stream::iter(work)
        .map(|(si, ti)| {
            let (streams, shared, stats, pusher, s, done) =
                (&streams, &shared, &stats, pusher.as_ref(), &s, &done);
            async move {
                let st = &streams[si];
                let tag = &st.tags[ti];
                let events = push_tag(s, shared, st, tag, pusher, stats)
                    .await
                    .with_context(|| format!("tag {}/{}:{}", st.namespace, st.name, tag.name))?;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n % 20 == 0 || n == total {
                    eprintln!("isa-seed: {n}/{total} tags done");
                }
                Ok::<_, anyhow::Error>(((si, ti), events))
            }
        })
        .buffer_unordered(a.jobs)
        .try_collect()
        .await?;
    results.sort_by_key(|(k, _)| *k);
    let mut per_stream: Vec<Vec<Vec<Event>>> = streams.iter().map(|_| Vec::new()).collect();
    for ((si, _), evs) in results {
        per_stream[si].push(evs);
    }

    let items: Vec<Value> = streams
        .iter()
        .zip(&per_stream)
        .map(|(st, evs)| imagestream_json(&s, st, evs, &registry_name, &a.external_registry))
        .collect();
    if let Some(path) = &a.imagestreams_out {
        let list = json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": items,
            "metadata": {"resourceVersion": ""},
        });
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        list.serialize(&mut ser)
            .context("encoding the ImageStream list")?;
        out.push(b'\n');
        std::fs::write(path, out)
            .with_context(|| format!("writing ImageStream list {}", path.display()))?;
    }

    let st = stats
        .into_inner()
        .map_err(|_| anyhow!("stats lock poisoned"))?;
    let events: Vec<&Event> = per_stream.iter().flatten().flatten().collect();
    let count_type = |t: &str| st.manifests.values().filter(|m| **m == t).count();
    let summary = json!({
        "streams": streams.len(),
        "tags": total,
        "items": events.len(),
        "history_items": events.len() - total,
        "external_items": events.iter().filter(|e| e.external).count(),
        "manifests": st.manifests.len(),
        "manifest_bytes": st.manifest_bytes,
        "oci_manifests": count_type(OCI_MANIFEST),
        "oci_indexes": count_type(OCI_INDEX),
        "schema2_manifests": count_type(DOCKER_MANIFEST),
        "schema2_lists": count_type(DOCKER_LIST),
        "unique_blobs": st.blobs.len(),
        "unique_blob_bytes": st.blobs.values().sum::<u64>(),
        "pushed": pusher.is_some(),
    });
    println!(
        "{}",
        serde_json::to_string(&summary).context("encoding summary")?
    );
    Ok(())
}

fn main() {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run(args)));
    if let Err(e) = result {
        eprintln!("isa-seed: error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(EPOCH), "2024-03-01T08:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn layers_are_deterministic_and_distinct() {
        let a = make_layer(7, "x", 1000).unwrap();
        let b = make_layer(7, "x", 1000).unwrap();
        let c = make_layer(8, "x", 1000).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        assert_ne!(a.digest, a.diff_id);
    }
}
