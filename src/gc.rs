//! `gc`: delete blobs that the committed `index.json` no longer reaches and
//! that are older than a grace period (a snapshot of the previous state may
//! still be reading them).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::closure::{self, ClosureError};
use crate::digest::Digest;
use crate::layout::{Layout, LayoutError};

/// Errors of gc.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The layout failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A manifest in the index cannot be read, so what it references is
    /// unknown: gc refuses to delete anything.
    #[error("refusing to collect garbage: {0}; run `verify` and repair the archive first")]
    Unreadable(ClosureError),
}

/// The result of gc.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Blobs reachable from the index.
    pub reachable_blobs: usize,
    /// Unreferenced blobs deleted (or, in a dry run, to delete).
    pub deleted_blobs: Vec<Digest>,
    /// Bytes freed (or to free).
    pub bytes_freed: u64,
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub kept_in_grace: usize,
    /// Whether nothing was deleted on purpose.
    pub dry_run: bool,
}

/// Name of the file recording since when each blob is unreferenced.
pub const STATE_FILE: &str = ".gc-state.json";

/// Every blob reachable from the committed index.
pub fn reachable(layout: &Layout) -> Result<HashSet<Digest>, GcError> {
    let index = layout.read_index()?;
    let ours: HashSet<&Digest> = index.entries.iter().map(|e| &e.digest).collect();
    let mut seen = HashSet::new();
    for root in index.roots() {
        if Some(&root) == index.imagestreams.as_ref() {
            seen.insert(root);
            continue;
        }
        let (_, errors) = closure::walk_all(layout, &root, &mut seen);
        // A missing blob is no reason to stop (nothing to delete there); an
        // unreadable manifest of ours is: what it references is unknown. A
        // foreign descriptor need not point at a manifest: it is a leaf.
        if let Some(e) = errors
            .into_iter()
            .find(|e| matches!(e, ClosureError::Unreadable { image, .. } if ours.contains(image)))
        {
            return Err(GcError::Unreadable(e));
        }
        seen.insert(root);
    }
    Ok(seen)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Since when (unix seconds) each unreferenced blob has been seen
/// unreferenced by gc. The grace period counts from then, not from the
/// blob's mtime: a blob written months ago and dropped by the last commit
/// may still be read by a snapshot of the previous state.
fn read_state(layout: &Layout) -> BTreeMap<Digest, u64> {
    std::fs::read(layout.root().join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<BTreeMap<Digest, u64>>(&b).ok())
        .unwrap_or_default()
}

/// Runs gc.
pub fn gc(layout: &Layout, grace: Duration, dry_run: bool) -> Result<GcReport, GcError> {
    let mut keep = reachable(layout)?;
    let now = now_secs();
    let old_state = read_state(layout);
    let mut state = BTreeMap::new();
    let mut report = GcReport {
        reachable_blobs: keep.len(),
        dry_run,
        ..Default::default()
    };
    let blobs = layout.list_blobs()?;
    let mut candidates = Vec::new();
    for (digest, meta) in &blobs {
        if keep.contains(digest) {
            continue;
        }
        let since = old_state.get(digest).copied().unwrap_or(now).min(now);
        state.insert(digest.clone(), since);
        if now - since < grace.as_secs() {
            report.kept_in_grace += 1;
            keep.insert(digest.clone());
        } else {
            candidates.push((digest.clone(), meta.len()));
        }
    }
    // What a kept manifest references is kept too, whatever its own age:
    // a manifest must never outlive its closure.
    let kept_in_grace: Vec<Digest> = keep
        .iter()
        .filter(|d| state.contains_key(*d))
        .cloned()
        .collect();
    for d in kept_in_grace {
        let mut seen = HashSet::new();
        let _ = closure::walk_all(layout, &d, &mut seen);
        keep.extend(seen);
    }
    candidates.retain(|(d, _)| !keep.contains(d));
    // Manifests go first: if gc stops halfway, no manifest is left whose
    // blobs are gone.
    candidates.sort_by_key(|(d, size)| {
        let is_manifest = *size <= crate::layout::MAX_MANIFEST_SIZE
            && layout
                .read_small_blob(d)
                .ok()
                .and_then(|b| crate::manifest::parse(d, &b, None).ok())
                .is_some_and(|p| !p.blobs.is_empty() || !p.children.is_empty());
        !is_manifest
    });
    for (digest, size) in candidates {
        if !dry_run {
            layout.remove_blob(&digest)?;
        }
        state.remove(&digest);
        report.bytes_freed += size;
        report.deleted_blobs.push(digest);
    }
    if !dry_run {
        let json = serde_json::to_vec(&state).expect("gc state serializes");
        layout.write_file_atomic(STATE_FILE, &json)?;
    }
    Ok(report)
}
