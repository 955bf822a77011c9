//! Reports: the JSON written on stdout (or `--report FILE`) and the exit
//! code derived from them.

use serde::Serialize;
use std::collections::BTreeMap;

use crate::digest::Digest;

/// Exit code: everything done.
pub const EXIT_OK: i32 = 0;
/// Exit code: some images failed, everything else committed.
pub const EXIT_PARTIAL: i32 = 1;
/// Exit code: configuration, auth or permission error; nothing done.
pub const EXIT_CONFIG: i32 = 2;
/// Exit code: the run failed as a whole (a full disk, a broken stream)
/// before committing anything; the archive keeps its last committed state.
pub const EXIT_FAILED: i32 = 3;
/// Exit code: stopped by SIGTERM/SIGINT; nothing half-written is visible.
pub const EXIT_INTERRUPTED: i32 = 130;

/// One image that could not be archived or restored.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failure {
    /// Namespace of the stream.
    pub namespace: String,
    /// Stream name.
    pub imagestream: String,
    /// Tag name (empty when the failure is not about one tag).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tag: String,
    /// Position in the tag's history (0 = current).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// The image digest, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// What went wrong.
    pub reason: String,
}

/// Per-stream figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamReport {
    /// Tags with at least one tag event.
    pub tags: usize,
    /// Tag events beyond the current one.
    pub history_items: usize,
    /// Images archived (or pushed) by this run.
    pub images_new: usize,
    /// Images already present, left alone.
    pub images_skipped: usize,
    /// External images skipped by `--skip-external`.
    #[serde(skip_serializing_if = "is_zero")]
    pub images_external_skipped: usize,
    /// Blobs transferred for this stream (a shared blob counts for the first stream).
    pub blobs_new: usize,
    /// Bytes of those blobs.
    pub bytes_new: u64,
    /// Blobs that were already present.
    pub blobs_skipped: usize,
    /// Tags left alone because they point elsewhere (restore without --overwrite).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// Failures.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<Failure>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Totals over all streams.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// ImageStreams considered.
    pub imagestreams: usize,
    /// Tags.
    pub tags: usize,
    /// Distinct images (manifest digests) referenced.
    pub images: usize,
    /// Tag events beyond the current ones.
    pub history_items: usize,
    /// Images transferred by this run.
    pub images_new: usize,
    /// Images already present.
    pub images_skipped: usize,
    /// Images that failed.
    pub images_failed: usize,
    /// Blobs transferred (or, in a dry run, to transfer).
    pub blobs_new: usize,
    /// Bytes transferred (or to transfer).
    pub bytes_new: u64,
    /// Blobs already present among those looked at.
    pub blobs_skipped: usize,
    /// Bytes already present among those looked at.
    pub bytes_skipped: u64,
}

/// Requests the run sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestCounts {
    /// Manifest GET/HEAD.
    pub manifest_requests: u64,
    /// Blob GET.
    pub blob_requests: u64,
    /// Blob HEAD/mount/upload and manifest PUT.
    pub push_requests: u64,
    /// Retries.
    pub retries: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
}

impl RequestCounts {
    /// Reads the counters of a client.
    pub fn from_stats(s: &crate::registry::Stats) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        RequestCounts {
            manifest_requests: s.manifest_requests.load(Relaxed),
            blob_requests: s.blob_requests.load(Relaxed),
            push_requests: s.push_requests.load(Relaxed),
            retries: s.retries.load(Relaxed),
            bytes_received: s.bytes_in.load(Relaxed),
            bytes_sent: s.bytes_out.load(Relaxed),
        }
    }
}

/// The report of a backup or restore.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// `backup` or `restore`.
    pub command: String,
    /// The archive directory or stream.
    pub archive: String,
    /// The registry.
    pub registry: String,
    /// Whether nothing was written.
    pub dry_run: bool,
    /// Whether `index.json` was committed.
    pub committed: bool,
    /// Wall time.
    pub seconds: f64,
    /// Totals.
    pub totals: Totals,
    /// Per `namespace/name`.
    pub imagestreams: BTreeMap<String, StreamReport>,
    /// Problems that are not about one image (a namespace that answered 403, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// History items dropped by `--prune-history`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<Failure>,
    /// ImageStream specs applied by `restore --apply-imagestreams`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<crate::apply::Applied>,
    /// Requests sent to the registry.
    pub requests: RequestCounts,
    /// The registry refused every tag for credentials, permissions or TLS:
    /// a configuration problem (exit 2), not a partial run.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

impl Report {
    /// Every failure of every stream.
    pub fn failures(&self) -> impl Iterator<Item = &Failure> {
        self.imagestreams.values().flat_map(|s| s.failures.iter())
    }

    /// 0 when everything succeeded, 1 when something failed, 2 when the
    /// registry refused everything ([`Report::refused`]).
    pub fn exit_code(&self) -> i32 {
        if self.refused {
            EXIT_CONFIG
        } else if self.failures().next().is_some() || !self.problems.is_empty() {
            EXIT_PARTIAL
        } else {
            EXIT_OK
        }
    }

    /// Writes the report as pretty JSON to `path`, or stdout when `None`.
    pub fn emit(&self, path: Option<&std::path::Path>) -> std::io::Result<()> {
        let mut json = serde_json::to_vec_pretty(self).expect("report serializes");
        json.push(b'\n');
        match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    if !dir.as_os_str().is_empty() {
                        std::fs::create_dir_all(dir)?;
                    }
                }
                let tmp = p.with_extension("tmp");
                std::fs::write(&tmp, &json)?;
                std::fs::rename(&tmp, p)
            }
            None => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                out.write_all(&json)?;
                out.flush()
            }
        }
    }
}
