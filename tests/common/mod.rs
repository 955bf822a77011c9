//! Shared test harness: a real registry ([`Registry`]), the seeding helper
//! ([`seed`]), and commands for the project binary and skopeo.
//!
//! Use with `mod common;` in a test file.
#![allow(dead_code)]

pub mod fake_kube;
pub mod proxy;
pub mod registry;
pub mod volume;

#[allow(unused_imports)]
pub use registry::{HttpResponse, LoggedRequest, Registry};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The project binary, `imagestream-archiver`.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imagestream-archiver"))
}

/// The seeding helper binary, `isa-seed`.
pub fn seed_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_isa-seed"))
}

/// `skopeo`; panics when it is not installed (tests never skip).
pub fn skopeo() -> Command {
    let found = ["/usr/bin/skopeo", "/usr/local/bin/skopeo"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    match found {
        Some(p) => Command::new(p),
        None => panic!("skopeo not found: apt-get install skopeo"),
    }
}

/// What [`seed`] produced.
#[derive(Debug, Clone)]
pub struct SeedSummary {
    /// The ImageStream list (`oc get is -A -o json` shape).
    pub imagestreams: PathBuf,
    /// Number of ImageStreams.
    pub streams: u64,
    /// Number of tags.
    pub tags: u64,
    /// Tag events (current + history).
    pub items: u64,
    /// Tag events beyond `items[0]`.
    pub history_items: u64,
    /// Distinct manifests pushed (images, indexes and their children).
    pub manifests: u64,
    /// Distinct blobs (layers and configs).
    pub unique_blobs: u64,
    /// Their total size.
    pub unique_blob_bytes: u64,
    /// The whole summary line printed by `isa-seed`.
    pub raw: serde_json::Value,
}

impl SeedSummary {
    /// The parsed ImageStream list.
    pub fn list(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.imagestreams)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.imagestreams.display()));
        serde_json::from_str(&text).expect("ImageStream list is JSON")
    }
}

/// The flags that point `isa-seed` at `reg` (address, TLS, credentials).
pub fn seed_registry_flags(reg: &Registry) -> Vec<String> {
    let mut flags = vec!["--registry".to_string(), reg.addr.clone()];
    match reg.credentials() {
        None => flags.push("--plain-http".into()),
        Some((u, p)) => {
            flags.push("--ca-file".into());
            flags.push(reg.ca_pem_path().display().to_string());
            flags.extend(["--username".into(), u.into(), "--password".into(), p.into()]);
        }
    }
    flags
}

/// Run `isa-seed` against `reg` with extra `args` (e.g. `["--preset",
/// "small"]`), writing the ImageStream list into the registry's temp dir.
/// Panics with the seeder's stderr when it fails.
pub fn seed(reg: &Registry, args: &[&str]) -> SeedSummary {
    static N: AtomicUsize = AtomicUsize::new(0);
    let out = reg.dir.path().join(format!(
        "imagestreams-{}.json",
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let output = seed_bin()
        .args(seed_registry_flags(reg))
        .arg("--imagestreams-out")
        .arg(&out)
        .args(args)
        .output()
        .expect("running isa-seed");
    if !output.status.success() {
        panic!(
            "isa-seed {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let raw: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "isa-seed summary is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    let n = |k: &str| {
        raw[k]
            .as_u64()
            .unwrap_or_else(|| panic!("isa-seed summary lacks {k}: {raw}"))
    };
    SeedSummary {
        imagestreams: out,
        streams: n("streams"),
        tags: n("tags"),
        items: n("items"),
        history_items: n("history_items"),
        manifests: n("manifests"),
        unique_blobs: n("unique_blobs"),
        unique_blob_bytes: n("unique_blob_bytes"),
        raw,
    }
}

/// sha256 digest string (`sha256:<hex>`) of bytes.
pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Accept header value covering every manifest type the seeder pushes.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// The flags that point `imagestream-archiver` at `reg` (address, TLS,
/// credentials through a password file).
pub fn archiver_registry_flags(reg: &Registry) -> Vec<String> {
    let mut flags = vec!["--registry".to_string(), reg.addr.clone()];
    match reg.credentials() {
        None => flags.push("--plain-http".into()),
        Some((u, p)) => {
            let pw = reg.dir.path().join("password");
            std::fs::write(&pw, p).expect("writing password file");
            flags.push("--ca-file".into());
            flags.push(reg.ca_pem_path().display().to_string());
            flags.extend([
                "--username".into(),
                u.into(),
                "--password-file".into(),
                pw.display().to_string(),
            ]);
        }
    }
    flags
}

/// Output of a finished command.
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// stdout parsed as JSON (the report).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs the archiver with `args`, returning code and output.
pub fn run<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = bin()
        .args(args)
        .output()
        .expect("running imagestream-archiver");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the archiver and panics unless it exits with `code`.
pub fn run_ok<I, S>(code: i32, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let r = run(args);
    assert_eq!(
        r.code, code,
        "exit code\nstdout:\n{}\nstderr:\n{}",
        r.stdout, r.stderr
    );
    r
}

/// `(namespace, name, tag, position, digest)` of every tag event of a list.
pub fn tag_events(list: &serde_json::Value) -> Vec<(String, String, String, usize, String)> {
    let mut out = Vec::new();
    for is in list["items"].as_array().into_iter().flatten() {
        let ns = is["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = is["metadata"]["name"].as_str().unwrap_or_default();
        for t in is["status"]["tags"].as_array().into_iter().flatten() {
            let tag = t["tag"].as_str().unwrap_or_default();
            for (i, item) in t["items"].as_array().into_iter().flatten().enumerate() {
                out.push((
                    ns.to_string(),
                    name.to_string(),
                    tag.to_string(),
                    i,
                    item["image"].as_str().unwrap_or_default().to_string(),
                ));
            }
        }
    }
    out
}

/// The digest a registry serves for `repo` at a tag or digest (HEAD), or
/// `None` when it has nothing there.
pub fn head_digest(reg: &Registry, repo: &str, reference: &str) -> Option<String> {
    let r = reg
        .request(
            "HEAD",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", MANIFEST_ACCEPT)],
        )
        .expect("HEAD manifest");
    (r.status == 200).then(|| {
        r.header("docker-content-digest")
            .expect("Docker-Content-Digest header")
            .to_string()
    })
}

/// `--registry ADDR --plain-http`, for a proxy or plain registry address.
pub fn plain_registry(addr: &str) -> Vec<String> {
    vec!["--registry".into(), addr.into(), "--plain-http".into()]
}

/// The arguments of a quiet `verb` on `archive` (`backup`, `restore`),
/// followed by the registry flags and `extra`.
pub fn archiver_args(
    verb: &str,
    archive: &Path,
    registry_flags: Vec<String>,
    extra: &[&str],
) -> Vec<String> {
    let mut a = vec![
        verb.to_string(),
        "--archive".into(),
        archive.display().to_string(),
        "--progress".into(),
        "none".into(),
    ];
    a.extend(registry_flags);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The arguments of a quiet `backup` of `list` into `archive`.
pub fn backup_args(
    registry_flags: Vec<String>,
    archive: &Path,
    list: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut a = archiver_args("backup", archive, registry_flags, extra);
    a.extend(["--imagestreams-from".into(), list.display().to_string()]);
    a
}

/// Runs `verify` on `archive` and fails the test, with its output, unless
/// the archive is sound.
pub fn verify_ok(archive: &Path) {
    let r = run(["verify", "--archive", &archive.display().to_string()]);
    assert_eq!(
        r.code,
        0,
        "verify of {}:\n{}\n{}",
        archive.display(),
        r.stdout,
        r.stderr
    );
}

/// A registry seeded with `isa-seed` and backed up into an archive.
pub struct BackedUp {
    /// The source registry (kept running).
    pub registry: Registry,
    /// The seeded ImageStream list.
    pub list: serde_json::Value,
    /// The file holding it (in the registry's directory).
    pub imagestreams: PathBuf,
    /// The archive directory.
    pub archive: PathBuf,
    /// A scratch directory that holds the archive.
    pub work: tempfile::TempDir,
}

/// Seeds a fresh registry with `seed_args` and backs it up.
pub fn backed_up(seed_args: &[&str]) -> BackedUp {
    let registry = Registry::start();
    let seeded = seed(&registry, seed_args);
    let work = tempfile::tempdir().expect("scratch dir");
    let archive = work.path().join("archive");
    run_ok(
        0,
        backup_args(
            archiver_registry_flags(&registry),
            &archive,
            &seeded.imagestreams,
            &[],
        ),
    );
    BackedUp {
        list: seeded.list(),
        imagestreams: seeded.imagestreams.clone(),
        registry,
        archive,
        work,
    }
}
