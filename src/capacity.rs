//! Free space, the plan's needs, and PVC expansion.
//!
//! Before downloading, the backup knows how many bytes it still has to
//! fetch. [`ensure_capacity`] compares them with the free space of the
//! archive's filesystem and, when the volume would end up with less than the
//! headroom free, grows the PVC that holds it: it checks that the
//! StorageClass allows expansion, PATCHes `spec.resources.requests.storage`
//! (a JSON merge patch, whole GiB, never smaller than before), then waits,
//! with a timeout, until the filesystem itself has grown, logging the PVC's
//! `status.capacity` and its `FileSystemResizePending` condition meanwhile.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::StatusCode;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Patch, PatchParams};

use crate::discovery::{send_with_retry, status_message, CallError, RetryPolicy};

/// One GiB (2^30 bytes).
pub const GIB: u64 = 1 << 30;

/// Where a pod finds its own namespace.
pub const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The space of a filesystem, from `statvfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// Size of the filesystem, in bytes.
    pub total: u64,
    /// Bytes an unprivileged writer can still use (`f_bavail`).
    pub free: u64,
    /// Bytes in use (`total` minus every free block, reserved ones included).
    pub used: u64,
}

/// Reads the space of the filesystem holding `path`.
pub fn fs_space(path: &Path) -> io::Result<FsSpace> {
    let s = fs2::statvfs(path)?;
    Ok(FsSpace {
        total: s.total_space(),
        free: s.available_space(),
        used: s.total_space().saturating_sub(s.free_space()),
    })
}

/// Rounds `bytes` up to whole GiB, in bytes.
pub fn round_up_gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB).saturating_mul(GIB)
}

/// The PVC size a plan needs: the size at which the volume, once grown,
/// holds `used + to_fetch` bytes and still has `headroom_pct` percent of
/// itself free, as [`needs_growth`] counts it (so that the next run,
/// unchanged, does not grow it again). Blocks the filesystem keeps from
/// unprivileged writers (ext4's root reserve) are taken as the same share
/// of the grown volume as they are now, and the filesystem's own metadata
/// as up to 5% of its volume ([`grown_enough`]). Rounded up to whole GiB.
pub fn needed_size(space: &FsSpace, to_fetch: u64, headroom_pct: u8) -> u64 {
    let data = space.used as u128 + to_fetch as u128;
    let kept = space
        .total
        .saturating_sub(space.used)
        .saturating_sub(space.free) as u128;
    let kept_pct = match space.total {
        0 => 0,
        total => (kept * 100).div_ceil(total as u128),
    };
    let usable_pct = 100u128
        .saturating_sub(headroom_pct as u128 + kept_pct)
        .max(5);
    let filesystem = (data * 100).div_ceil(usable_pct);
    let volume = (filesystem * 100).div_ceil(95);
    round_up_gib(u64::try_from(volume).unwrap_or(u64::MAX))
}

/// True when downloading `to_fetch` bytes would leave less than
/// `headroom_pct` percent of the volume free (or would not fit at all).
pub fn needs_growth(space: &FsSpace, to_fetch: u64, headroom_pct: u8) -> bool {
    let reserve = (space.total as u128 * headroom_pct as u128).div_ceil(100);
    match space.free.checked_sub(to_fetch) {
        Some(free_after) => (free_after as u128) < reserve,
        None => true,
    }
}

/// True once a filesystem grown towards `target` bytes can take `to_fetch`
/// bytes: it has room for them and its size reached 95% of the target (the
/// rest is what filesystems keep for their own metadata).
pub fn grown_enough(space: &FsSpace, target: u64, to_fetch: u64) -> bool {
    space.free >= to_fetch && space.total as u128 * 100 >= target as u128 * 95
}

/// Formats a size as whole GiB, rounded up, in Kubernetes quantity form
/// (`12Gi`).
pub fn format_gib(bytes: u64) -> String {
    format!("{}Gi", bytes.div_ceil(GIB))
}

/// Parses a Kubernetes quantity (`10Gi`, `500Mi`, `1.5G`, `1e9`, `1024`,
/// `100k`, ...) into bytes, rounded up to a whole byte.
pub fn parse_quantity(s: &str) -> Result<u64, CapacityError> {
    let bad = |reason: &str| CapacityError::Quantity {
        input: s.to_string(),
        reason: reason.to_string(),
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    if number.is_empty() || number == "." {
        return Err(bad("no number"));
    }
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.contains('.') {
        return Err(bad("more than one decimal point"));
    }
    if frac.len() > 18 || int.len() > 30 {
        return Err(bad("too many digits"));
    }
    let digits = format!("{int}{frac}");
    let mantissa: u128 = digits.parse().map_err(|_| bad("not a number"))?;
    let divisor = 10u128.pow(frac.len() as u32);
    // multiplier / extra divisor of the suffix
    let (mul, div): (u128, u128) = match suffix {
        "" => (1, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        e if e.starts_with(['e', 'E']) => {
            let exp: u32 = e[1..].parse().map_err(|_| bad("bad exponent"))?;
            if exp > 19 {
                return Err(bad("too large"));
            }
            (10u128.pow(exp), 1)
        }
        _ => {
            return Err(bad(
                "unknown suffix (use Ki, Mi, Gi, Ti, k, M, G, T or none)",
            ))
        }
    };
    let bytes = mantissa
        .checked_mul(mul)
        .ok_or_else(|| bad("too large"))?
        .div_ceil(divisor * div);
    u64::try_from(bytes).map_err(|_| bad("too large"))
}

/// The namespace the pod runs in, from its service-account mount.
pub fn own_namespace() -> Option<String> {
    let ns = std::fs::read_to_string(NAMESPACE_FILE).ok()?;
    let ns = ns.trim();
    (!ns.is_empty()).then(|| ns.to_string())
}

/// What [`ensure_capacity`] should make room for.
#[derive(Debug, Clone)]
pub struct ResizeRequest {
    /// Name of the PVC that holds the archive.
    pub pvc: String,
    /// Its namespace.
    pub namespace: String,
    /// A directory on the PVC's filesystem (the archive).
    pub archive: PathBuf,
    /// Bytes the plan still has to download.
    pub to_fetch: u64,
    /// Free space to keep after the download, in percent of the volume.
    pub headroom_pct: u8,
    /// Never ask for more than this many bytes.
    pub max_size: Option<u64>,
    /// How long to wait for the filesystem to grow after the PATCH.
    pub timeout: Duration,
    /// How often to look at the filesystem while waiting.
    pub poll_interval: Duration,
    /// Retries and per-request timeout of the API calls.
    pub retry: RetryPolicy,
}

impl ResizeRequest {
    /// A request with the default poll interval (1 s) and retry policy.
    pub fn new(
        pvc: impl Into<String>,
        namespace: impl Into<String>,
        archive: impl Into<PathBuf>,
        to_fetch: u64,
        headroom_pct: u8,
        max_size: Option<u64>,
        timeout: Duration,
    ) -> Self {
        Self {
            pvc: pvc.into(),
            namespace: namespace.into(),
            archive: archive.into(),
            to_fetch,
            headroom_pct,
            max_size,
            timeout,
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy::default(),
        }
    }
}

/// What [`ensure_capacity`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResizeOutcome {
    /// There was room enough; the API server was not contacted.
    NotNeeded {
        /// The filesystem as found.
        space: FsSpace,
    },
    /// The PVC already asked for at least the needed size (an earlier run
    /// grew it); the filesystem has the room now.
    AlreadyRequested {
        /// The PVC's `spec.resources.requests.storage`, in bytes.
        requested: u64,
        /// The filesystem at the end.
        space: FsSpace,
    },
    /// The PVC was grown and the filesystem followed.
    Grown {
        /// The former request, in bytes.
        from: u64,
        /// The new request, in bytes (whole GiB).
        to: u64,
        /// The filesystem at the end.
        space: FsSpace,
    },
}

/// Errors of capacity checks and PVC expansion.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    /// statvfs failed.
    #[error("cannot read the free space of {path}")]
    Statfs {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Not a Kubernetes quantity.
    #[error("invalid quantity {input:?}: {reason}")]
    Quantity {
        /// The input.
        input: String,
        /// What was wrong.
        reason: String,
    },
    /// The PVC does not exist.
    #[error("PVC {namespace}/{pvc} not found")]
    PvcNotFound {
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
    },
    /// The StorageClass does not exist.
    #[error("StorageClass {storage_class} of PVC {namespace}/{pvc} not found")]
    StorageClassNotFound {
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
        /// The StorageClass.
        storage_class: String,
    },
    /// The API server refused an operation (403).
    #[error(
        "{operation} for PVC {namespace}/{pvc} is forbidden: {message}; the service account needs \
         get and patch on persistentvolumeclaims in {namespace} and get on storageclasses (a ClusterRole)"
    )]
    Forbidden {
        /// What was being done.
        operation: String,
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
        /// The API server's message.
        message: String,
    },
    /// The API server refused the operation (403) for another reason than
    /// missing rights: a ResourceQuota or a LimitRange of the namespace.
    #[error(
        "{operation} for PVC {namespace}/{pvc} was refused: {message}; a ResourceQuota or \
         LimitRange in {namespace} limits the claim: raise it, or keep --max-size under it"
    )]
    Refused {
        /// What was being done.
        operation: String,
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
        /// The API server's message.
        message: String,
    },
    /// The PATCH was rejected as invalid (422).
    #[error("growing PVC {namespace}/{pvc} to {size} was rejected (422 Invalid): {message}")]
    PatchInvalid {
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
        /// The size asked for.
        size: String,
        /// The API server's message.
        message: String,
    },
    /// Any other error status.
    #[error(
        "{operation} for PVC {namespace}/{pvc}: HTTP {code} after {attempts} attempt(s): {message}"
    )]
    Status {
        /// What was being done.
        operation: String,
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
        /// The HTTP status.
        code: u16,
        /// The API server's message.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
    /// No answer from the API server.
    #[error("{operation} for PVC {namespace}/{pvc}: request failed after {attempts} attempt(s)")]
    Transport {
        /// What was being done.
        operation: String,
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
        /// Attempts made.
        attempts: u32,
        /// The last cause.
        #[source]
        source: Box<kube::Error>,
    },
    /// Every attempt of a request timed out.
    #[error("{operation} for PVC {namespace}/{pvc}: no answer within {timeout:?} ({attempts} attempt(s))")]
    RequestTimeout {
        /// What was being done.
        operation: String,
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
        /// Per-attempt limit.
        timeout: Duration,
        /// Attempts made.
        attempts: u32,
    },
    /// An answer could not be decoded.
    #[error("{operation} for PVC {namespace}/{pvc}: unexpected answer: {reason}")]
    Decode {
        /// What was being done.
        operation: String,
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
        /// What was wrong.
        reason: String,
    },
    /// The PVC names no StorageClass.
    #[error("PVC {namespace}/{pvc} has no storageClassName: it cannot be expanded")]
    NoStorageClass {
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
    },
    /// The StorageClass does not allow expansion.
    #[error(
        "PVC {namespace}/{pvc} needs {needed} but cannot be expanded: its StorageClass {storage_class} \
         does not set allowVolumeExpansion: true; grow the volume by hand or use an expandable StorageClass"
    )]
    NotExpandable {
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
        /// The StorageClass.
        storage_class: String,
        /// The size needed.
        needed: String,
    },
    /// The plan needs more than `--max-size`.
    #[error(
        "PVC {namespace}/{pvc} would need {} ({} used + {} to fetch + {headroom_pct}% headroom) \
         but --max-size is {}; raise --max-size or back up fewer namespaces",
        format_gib(*.needed), human(*.used), human(*.to_fetch), format_gib(*.max)
    )]
    ExceedsMax {
        /// Namespace.
        namespace: String,
        /// PVC name.
        pvc: String,
        /// The size needed, in bytes (whole GiB).
        needed: u64,
        /// Bytes used now.
        used: u64,
        /// Bytes to fetch.
        to_fetch: u64,
        /// The headroom.
        headroom_pct: u8,
        /// The cap, in bytes.
        max: u64,
    },
    /// The filesystem did not grow in time.
    #[error(transparent)]
    ResizeTimeout(Box<ResizeTimeout>),
}

/// The filesystem did not grow in time (see [`CapacityError::ResizeTimeout`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "PVC {namespace}/{pvc}: the filesystem at {} did not grow to {} within {waited:?} \
     (filesystem size {}, free {}; PVC status.capacity {capacity}; conditions: {conditions})",
    .path.display(), format_gib(*.target), human(*.fs_total), human(*.fs_free)
)]
pub struct ResizeTimeout {
    /// Namespace.
    pub namespace: String,
    /// PVC name.
    pub pvc: String,
    /// The archive path watched.
    pub path: PathBuf,
    /// The size asked for, in bytes.
    pub target: u64,
    /// How long it waited.
    pub waited: Duration,
    /// Filesystem size at the end.
    pub fs_total: u64,
    /// Free bytes at the end.
    pub fs_free: u64,
    /// Last seen `status.capacity.storage` of the PVC.
    pub capacity: String,
    /// Last seen conditions of the PVC.
    pub conditions: String,
}

/// Bytes in a short human form (`1.5 GiB`), for messages.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Makes sure the archive's volume can take `req.to_fetch` more bytes with
/// the headroom kept, growing its PVC when needed (see the module docs).
pub async fn ensure_capacity(
    client: &kube::Client,
    req: &ResizeRequest,
) -> Result<ResizeOutcome, CapacityError> {
    let space = statfs(&req.archive)?;
    if !needs_growth(&space, req.to_fetch, req.headroom_pct) {
        tracing::info!(
            free = %human(space.free),
            to_fetch = %human(req.to_fetch),
            "enough free space on the archive volume"
        );
        return Ok(ResizeOutcome::NotNeeded { space });
    }
    let api = PvcApi { client, req };
    let target = needed_size(&space, req.to_fetch, req.headroom_pct);
    let pvc = api.get_pvc().await?;
    let requested = requested_storage(&pvc)
        .map(parse_quantity)
        .transpose()?
        .unwrap_or(0);
    tracing::info!(
        pvc = %format!("{}/{}", req.namespace, req.pvc),
        used = %human(space.used),
        free = %human(space.free),
        to_fetch = %human(req.to_fetch),
        requested = %human(requested),
        target = %format_gib(target),
        "the archive volume needs to grow"
    );
    if requested >= target {
        // An earlier run asked already; wait for the filesystem to follow.
        let space = wait_for_growth(&api, requested.min(target)).await?;
        return Ok(ResizeOutcome::AlreadyRequested { requested, space });
    }
    if let Some(max) = req.max_size {
        if target > max {
            return Err(CapacityError::ExceedsMax {
                namespace: req.namespace.clone(),
                pvc: req.pvc.clone(),
                needed: target,
                used: space.used,
                to_fetch: req.to_fetch,
                headroom_pct: req.headroom_pct,
                max,
            });
        }
    }
    let storage_class = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CapacityError::NoStorageClass {
            namespace: req.namespace.clone(),
            pvc: req.pvc.clone(),
        })?;
    let sc = api.get_storage_class(&storage_class).await?;
    if sc.allow_volume_expansion != Some(true) {
        return Err(CapacityError::NotExpandable {
            namespace: req.namespace.clone(),
            pvc: req.pvc.clone(),
            storage_class,
            needed: format_gib(target),
        });
    }
    api.patch_size(target).await?;
    tracing::info!(
        pvc = %format!("{}/{}", req.namespace, req.pvc),
        from = %human(requested),
        to = %format_gib(target),
        "PVC expansion requested; waiting for the filesystem to grow"
    );
    let space = wait_for_growth(&api, target).await?;
    Ok(ResizeOutcome::Grown {
        from: requested,
        to: target,
        space,
    })
}

fn statfs(path: &Path) -> Result<FsSpace, CapacityError> {
    fs_space(path).map_err(|source| CapacityError::Statfs {
        path: path.to_path_buf(),
        source,
    })
}

/// `spec.resources.requests.storage` of a PVC.
fn requested_storage(pvc: &PersistentVolumeClaim) -> Option<&str> {
    pvc.spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.as_str())
}

/// `status.capacity.storage` and the conditions of a PVC, for the log.
fn pvc_status_summary(pvc: &PersistentVolumeClaim) -> (String, String) {
    let status = pvc.status.as_ref();
    let capacity = status
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_else(|| "(none)".into());
    let conditions = status
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let mut s = format!("{}={}", c.type_, c.status);
                    if let Some(m) = c.message.as_deref().filter(|m| !m.is_empty()) {
                        s.push_str(&format!(" ({m})"));
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "(none)".into());
    (capacity, conditions)
}

/// Polls statvfs until the filesystem has grown towards `target`, following
/// the PVC's status in the log, bounded by the request's timeout.
async fn wait_for_growth(api: &PvcApi<'_>, target: u64) -> Result<FsSpace, CapacityError> {
    let req = api.req;
    let start = Instant::now();
    let mut last = (String::from("(unknown)"), String::from("(unknown)"));
    let mut polls = 0u64;
    loop {
        let space = statfs(&req.archive)?;
        if grown_enough(&space, target, req.to_fetch) {
            tracing::info!(
                total = %human(space.total),
                free = %human(space.free),
                waited = ?start.elapsed(),
                "the archive filesystem has grown"
            );
            return Ok(space);
        }
        if start.elapsed() >= req.timeout {
            return Err(CapacityError::ResizeTimeout(Box::new(ResizeTimeout {
                namespace: req.namespace.clone(),
                pvc: req.pvc.clone(),
                path: req.archive.clone(),
                target,
                waited: start.elapsed(),
                fs_total: space.total,
                fs_free: space.free,
                capacity: last.0,
                conditions: last.1,
            })));
        }
        // Follow the PVC's status every 5 polls; a failure here is only logged.
        if polls.is_multiple_of(5) {
            match api.get_pvc().await {
                Ok(pvc) => {
                    let now = pvc_status_summary(&pvc);
                    if now != last {
                        tracing::info!(
                            capacity = %now.0,
                            conditions = %now.1,
                            fs_total = %human(space.total),
                            "waiting for the volume to grow"
                        );
                        last = now;
                    }
                }
                Err(e) => tracing::warn!("cannot read the PVC while waiting: {e}"),
            }
        }
        polls += 1;
        let left = req.timeout.saturating_sub(start.elapsed());
        tokio::time::sleep(req.poll_interval.min(left).max(Duration::from_millis(10))).await;
    }
}

/// The API calls on one PVC.
struct PvcApi<'a> {
    client: &'a kube::Client,
    req: &'a ResizeRequest,
}

impl PvcApi<'_> {
    fn pvc_path(&self) -> String {
        format!(
            "/api/v1/namespaces/{}/persistentvolumeclaims",
            self.req.namespace
        )
    }

    fn error(&self, operation: &str, e: CallError) -> CapacityError {
        let (namespace, pvc, operation) = (
            self.req.namespace.clone(),
            self.req.pvc.clone(),
            operation.to_string(),
        );
        match e {
            CallError::Build(reason) => CapacityError::Decode {
                operation,
                namespace,
                pvc,
                reason,
            },
            CallError::Transport { source, attempts } => CapacityError::Transport {
                operation,
                namespace,
                pvc,
                attempts,
                source: Box::new(source),
            },
            CallError::Timeout { timeout, attempts } => CapacityError::RequestTimeout {
                operation,
                namespace,
                pvc,
                timeout,
                attempts,
            },
        }
    }

    fn status_error(
        &self,
        operation: &str,
        code: StatusCode,
        body: &[u8],
        attempts: u32,
    ) -> CapacityError {
        let (namespace, pvc, operation) = (
            self.req.namespace.clone(),
            self.req.pvc.clone(),
            operation.to_string(),
        );
        let message = status_message(body);
        // Quota and LimitRange admission refuse with 403 too, in their own
        // words; anything else forbidden is taken as missing rights.
        let limited = [
            "exceeded quota",
            "per PersistentVolumeClaim is",
            "LimitRange",
        ]
        .iter()
        .any(|m| message.contains(m));
        if code == StatusCode::FORBIDDEN && limited {
            CapacityError::Refused {
                operation,
                namespace,
                pvc,
                message,
            }
        } else if code == StatusCode::FORBIDDEN {
            CapacityError::Forbidden {
                operation,
                namespace,
                pvc,
                message,
            }
        } else {
            CapacityError::Status {
                operation,
                namespace,
                pvc,
                code: code.as_u16(),
                message,
                attempts,
            }
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        operation: &str,
        body: &[u8],
    ) -> Result<T, CapacityError> {
        serde_json::from_slice(body).map_err(|e| CapacityError::Decode {
            operation: operation.to_string(),
            namespace: self.req.namespace.clone(),
            pvc: self.req.pvc.clone(),
            reason: e.to_string(),
        })
    }

    async fn get_pvc(&self) -> Result<PersistentVolumeClaim, CapacityError> {
        const OP: &str = "reading the PVC";
        let path = self.pvc_path();
        let build = || {
            kube::core::Request::new(path.as_str())
                .get(&self.req.pvc, &Default::default())
                .map_err(|e| e.to_string())
        };
        let resp = send_with_retry(self.client, build, &self.req.retry)
            .await
            .map_err(|e| self.error(OP, e))?;
        match resp.status {
            StatusCode::OK => self.decode(OP, &resp.body),
            StatusCode::NOT_FOUND => Err(CapacityError::PvcNotFound {
                namespace: self.req.namespace.clone(),
                pvc: self.req.pvc.clone(),
            }),
            code => Err(self.status_error(OP, code, &resp.body, resp.attempts)),
        }
    }

    async fn get_storage_class(&self, name: &str) -> Result<StorageClass, CapacityError> {
        let op = format!("reading StorageClass {name}");
        let build = || {
            kube::core::Request::new("/apis/storage.k8s.io/v1/storageclasses")
                .get(name, &Default::default())
                .map_err(|e| e.to_string())
        };
        let resp = send_with_retry(self.client, build, &self.req.retry)
            .await
            .map_err(|e| self.error(&op, e))?;
        match resp.status {
            StatusCode::OK => self.decode(&op, &resp.body),
            StatusCode::NOT_FOUND => Err(CapacityError::StorageClassNotFound {
                namespace: self.req.namespace.clone(),
                pvc: self.req.pvc.clone(),
                storage_class: name.to_string(),
            }),
            code => Err(self.status_error(&op, code, &resp.body, resp.attempts)),
        }
    }

    async fn patch_size(&self, bytes: u64) -> Result<(), CapacityError> {
        let size = format_gib(bytes);
        let op = format!("growing the PVC to {size}");
        let patch = Patch::Merge(serde_json::json!({
            "spec": {"resources": {"requests": {"storage": size}}}
        }));
        let path = self.pvc_path();
        let build = || {
            kube::core::Request::new(path.as_str())
                .patch(&self.req.pvc, &PatchParams::default(), &patch)
                .map_err(|e| e.to_string())
        };
        let resp = send_with_retry(self.client, build, &self.req.retry)
            .await
            .map_err(|e| self.error(&op, e))?;
        match resp.status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(CapacityError::PvcNotFound {
                namespace: self.req.namespace.clone(),
                pvc: self.req.pvc.clone(),
            }),
            StatusCode::UNPROCESSABLE_ENTITY => Err(CapacityError::PatchInvalid {
                namespace: self.req.namespace.clone(),
                pvc: self.req.pvc.clone(),
                size,
                message: status_message(&resp.body),
            }),
            code => Err(self.status_error(&op, code, &resp.body, resp.attempts)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("10Gi").unwrap(), 10 * GIB);
        assert_eq!(parse_quantity("512Mi").unwrap(), 512 * MIB);
        assert_eq!(parse_quantity("1Ti").unwrap(), 1 << 40);
        assert_eq!(parse_quantity("4Ki").unwrap(), 4096);
        assert_eq!(parse_quantity("1.5Gi").unwrap(), 3 * GIB / 2);
        assert_eq!(parse_quantity("5G").unwrap(), 5_000_000_000);
        assert_eq!(parse_quantity("100M").unwrap(), 100_000_000);
        assert_eq!(parse_quantity("3k").unwrap(), 3000);
        assert_eq!(parse_quantity("1e9").unwrap(), 1_000_000_000);
        assert_eq!(parse_quantity("1024").unwrap(), 1024);
        assert_eq!(parse_quantity(" 2Gi ").unwrap(), 2 * GIB);
        assert_eq!(parse_quantity("1500m").unwrap(), 2, "milli rounds up");
        for bad in ["", "Gi", "10GB", "1.2.3Gi", "-1Gi", "20Ei", "abc"] {
            assert!(parse_quantity(bad).is_err(), "{bad:?} should not parse");
        }
        let e = parse_quantity("10GB").unwrap_err().to_string();
        assert!(e.contains("\"10GB\""), "{e}");
    }

    #[test]
    fn format_rounds_up_to_gib() {
        assert_eq!(format_gib(GIB), "1Gi");
        assert_eq!(format_gib(GIB + 1), "2Gi");
        assert_eq!(format_gib(1), "1Gi");
        assert_eq!(format_gib(0), "0Gi");
        assert_eq!(parse_quantity(&format_gib(7 * GIB)).unwrap(), 7 * GIB);
    }

    #[test]
    fn needed_size_adds_headroom_and_rounds_up() {
        let space = |total, used, free| FsSpace { total, used, free };
        // 10 GiB of data, 80% usable: 12.5 GiB of filesystem, 13.16 GiB of
        // volume -> 14 GiB.
        assert_eq!(
            needed_size(&space(10 * GIB, 8 * GIB, 2 * GIB), 2 * GIB, 20),
            14 * GIB
        );
        // 19 GiB of data, 95% usable: exactly 20 GiB, then 21.05 -> 22 GiB.
        assert_eq!(
            needed_size(&space(10 * GIB, 9 * GIB, GIB), 10 * GIB, 5),
            22 * GIB
        );
        // ext4's 5% reserve counts against the usable share: 75%.
        let ext4 = space(100 * GIB, 50 * GIB, 45 * GIB);
        assert_eq!(needed_size(&ext4, 40 * GIB, 20), 127 * GIB);
        assert_eq!(needed_size(&space(GIB, 0, GIB), 6 * MIB, 20), GIB);
        assert_eq!(needed_size(&space(0, 0, 0), 0, 0), 0);
        assert_eq!(
            needed_size(&space(u64::MAX, u64::MAX, 0), u64::MAX, 90),
            round_up_gib(u64::MAX)
        );
    }

    #[test]
    fn a_volume_grown_to_the_needed_size_needs_no_more() {
        // Before: a volume with `kept` reserved blocks. After growing to the
        // target: a filesystem 95-100% of it, the same share reserved, the
        // same bytes used; the plan's bytes must then fit with the headroom.
        for (total, used, kept, fetch, headroom) in [
            (12 * GIB, 10 * GIB, 0, GIB / 2, 20),
            (12 * GIB, 10 * GIB, 0, 0, 20),
            (100 * GIB, 90 * GIB, 5 * GIB, 30 * GIB, 20),
            (10 * GIB, 9 * GIB, GIB / 2, 500 * GIB, 50),
            (GIB, GIB / 2, 0, 3 * GIB, 90),
        ] {
            let before = FsSpace {
                total,
                used,
                free: total - used - kept,
            };
            let target = needed_size(&before, fetch, headroom);
            for fs_pct in [95u64, 100] {
                let grown = (target * fs_pct).div_ceil(100);
                let reserved = (grown as u128 * kept as u128 / total as u128) as u64;
                let after = FsSpace {
                    total: grown,
                    used,
                    free: grown - used - reserved,
                };
                assert!(grown_enough(&after, target, fetch));
                assert!(
                    !needs_growth(&after, fetch, headroom),
                    "{before:?} + {fetch} at {headroom}%: grown to {target}, {after:?}"
                );
            }
        }
    }

    #[test]
    fn growth_is_needed_when_free_after_falls_under_headroom() {
        let space = FsSpace {
            total: 100 * GIB,
            free: 50 * GIB,
            used: 50 * GIB,
        };
        assert!(!needs_growth(&space, 30 * GIB, 20), "20 GiB left = 20%");
        assert!(needs_growth(&space, 30 * GIB + 1, 20));
        assert!(needs_growth(&space, 60 * GIB, 0), "does not fit at all");
        assert!(!needs_growth(&space, 50 * GIB, 0));
        assert!(!needs_growth(&space, 0, 20));
    }

    #[test]
    fn grown_enough_tolerates_filesystem_overhead() {
        let target = 10 * GIB;
        let s = |total, free| FsSpace {
            total,
            free,
            used: total - free,
        };
        assert!(grown_enough(&s(target, 5 * GIB), target, 4 * GIB));
        assert!(grown_enough(
            &s(target / 100 * 96, 5 * GIB),
            target,
            4 * GIB
        ));
        assert!(!grown_enough(
            &s(target / 100 * 90, 5 * GIB),
            target,
            4 * GIB
        ));
        assert!(!grown_enough(&s(target, 3 * GIB), target, 4 * GIB));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(12), "12 B");
        assert_eq!(human(3 * MIB / 2), "1.5 MiB");
        assert_eq!(human(12 * GIB), "12.0 GiB");
    }

    #[test]
    fn fs_space_of_a_real_directory() {
        let s = fs_space(Path::new(".")).unwrap();
        assert!(
            s.total > 0 && s.free <= s.total && s.used <= s.total,
            "{s:?}"
        );
        assert!(fs_space(Path::new("/does/not/exist")).is_err());
    }

    #[test]
    fn pvc_status_is_summarised() {
        let pvc: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "archive"},
            "spec": {"resources": {"requests": {"storage": "2Gi"}}, "storageClassName": "gp3"},
            "status": {
                "capacity": {"storage": "1Gi"},
                "conditions": [{"type": "FileSystemResizePending", "status": "True",
                                "message": "Waiting for user to (re-)start a pod"}]
            }
        }))
        .unwrap();
        assert_eq!(requested_storage(&pvc), Some("2Gi"));
        let (cap, cond) = pvc_status_summary(&pvc);
        assert_eq!(cap, "1Gi");
        assert_eq!(
            cond,
            "FileSystemResizePending=True (Waiting for user to (re-)start a pod)"
        );
    }
}
