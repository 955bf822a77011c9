//! `gc`: delete blobs that the committed `index.json` no longer reaches and
//! that are older than a grace period (a snapshot of the previous state may
//! still be reading them).

use std::collections::HashSet;
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

/// Every blob reachable from the committed index.
pub fn reachable(layout: &Layout) -> Result<HashSet<Digest>, GcError> {
    let index = layout.read_index()?;
    let mut seen = HashSet::new();
    for root in index.roots() {
        if Some(&root) == index.imagestreams.as_ref() {
            seen.insert(root);
            continue;
        }
        let (_, errors) = closure::walk_all(layout, &root, &mut seen);
        // A missing blob is no reason to stop (nothing to delete there); an
        // unreadable manifest is: what it references is unknown.
        if let Some(e) = errors
            .into_iter()
            .find(|e| matches!(e, ClosureError::Unreadable { .. }))
        {
            return Err(GcError::Unreadable(e));
        }
    }
    Ok(seen)
}

/// Runs gc.
pub fn gc(layout: &Layout, grace: Duration, dry_run: bool) -> Result<GcReport, GcError> {
    let keep = reachable(layout)?;
    let now = SystemTime::now();
    let mut report = GcReport {
        reachable_blobs: keep.len(),
        dry_run,
        ..Default::default()
    };
    for (digest, meta) in layout.list_blobs()? {
        if keep.contains(&digest) {
            continue;
        }
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        if age < grace {
            report.kept_in_grace += 1;
            continue;
        }
        if !dry_run {
            layout.remove_blob(&digest)?;
        }
        report.bytes_freed += meta.len();
        report.deleted_blobs.push(digest);
    }
    Ok(report)
}
