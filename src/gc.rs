//! `gc`: delete blobs that the committed `index.json` no longer reaches and
//! that are older than a grace period (a snapshot of the previous state may
//! still be reading them).

use std::collections::{BTreeMap, HashMap, HashSet};
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
    // Ours, and foreign descriptors that say they are manifests or indexes.
    let mut manifests: HashSet<Digest> = index.entries.iter().map(|e| e.digest.clone()).collect();
    manifests.extend(index.foreign.iter().filter_map(|f| {
        let media_type = f.get("mediaType")?.as_str()?;
        if !crate::manifest::ACCEPTED.contains(&media_type) {
            return None;
        }
        Digest::parse(f.get("digest")?.as_str()?).ok()
    }));
    let mut seen = HashSet::new();
    for root in index.roots() {
        if Some(&root) == index.imagestreams.as_ref() {
            seen.insert(root);
            continue;
        }
        let (_, errors) = closure::walk_all(layout, &root, &mut seen);
        // A missing blob is no reason to stop (nothing to delete there); an
        // unreadable manifest is: what it references is unknown (one over
        // 4 MiB, damaged, or referencing sha512 blobs). A foreign descriptor
        // of another media type need not point at a manifest: a leaf.
        if let Some(e) = errors.into_iter().find(
            |e| matches!(e, ClosureError::Unreadable { image, .. } if manifests.contains(image)),
        ) {
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
    // What references goes before what it references: indexes before their
    // child manifests, manifests before their blobs. If gc stops halfway,
    // no manifest is left whose closure is incomplete (a later backup
    // would take it for a complete image).
    let height = heights(layout, &candidates);
    candidates.sort_by_key(|(d, _)| std::cmp::Reverse(height.get(d).copied().unwrap_or(0)));
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

/// For each manifest among `blobs`: 1 for an image manifest, one more than
/// its highest child for an index (a blob that is no manifest is 0).
fn heights(layout: &Layout, blobs: &[(Digest, u64)]) -> HashMap<Digest, usize> {
    let children: HashMap<&Digest, Vec<Digest>> = blobs
        .iter()
        .filter(|(_, size)| *size <= crate::layout::MAX_MANIFEST_SIZE)
        .filter_map(|(d, _)| {
            let bytes = layout.read_small_blob(d).ok()?;
            let p = crate::manifest::parse(d, &bytes, None).ok()?;
            (!p.blobs.is_empty() || !p.children.is_empty())
                .then(|| (d, p.children.into_iter().map(|c| c.digest).collect()))
        })
        .collect();
    fn height(
        d: &Digest,
        children: &HashMap<&Digest, Vec<Digest>>,
        memo: &mut HashMap<Digest, usize>,
        depth: usize,
    ) -> usize {
        if let Some(h) = memo.get(d) {
            return *h;
        }
        let h = match children.get(d) {
            None => 0,
            // Nesting is at most 8 deep (see backup); no deeper walk.
            Some(_) if depth > 8 => 1,
            Some(cs) => {
                1 + cs
                    .iter()
                    .map(|c| height(c, children, memo, depth + 1))
                    .max()
                    .unwrap_or(0)
            }
        };
        memo.insert(d.clone(), h);
        h
    }
    let mut memo = HashMap::new();
    for d in children.keys() {
        height(d, &children, &mut memo, 0);
    }
    memo
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Access;
    use serde_json::json;

    fn put(layout: &Layout, body: &[u8]) -> (Digest, u64) {
        let d = Digest::of(body);
        layout.write_blob(&d, body).unwrap();
        (d, body.len() as u64)
    }

    fn descriptor(media_type: &str, (d, size): &(Digest, u64)) -> serde_json::Value {
        json!({"mediaType": media_type, "digest": d.to_string(), "size": size})
    }

    /// An OCI image manifest of one config and one layer.
    fn manifest_of(
        config: &(Digest, u64),
        layer: &(Digest, u64),
        annotations: serde_json::Value,
    ) -> Vec<u8> {
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
            "annotations": annotations,
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn indexes_go_before_their_manifests_and_manifests_before_their_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let layer = put(&layout, b"layer bytes");
        let config = put(&layout, b"{\"architecture\":\"amd64\",\"os\":\"linux\"}");
        let manifest = put(&layout, &manifest_of(&config, &layer, json!({})));
        // An index whose digest sorts after its child's: the order below is
        // not the digests'.
        let index = (0..)
            .map(|n| {
                json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [descriptor("application/vnd.oci.image.manifest.v1+json", &manifest)],
                    "annotations": {"n": n.to_string()},
                })
                .to_string()
            })
            .find(|body| Digest::of(body.as_bytes()) > manifest.0)
            .unwrap();
        let index = put(&layout, index.as_bytes());
        // None of them is referenced by a committed index.
        let report = gc(&layout, Duration::ZERO, false).unwrap();
        let at = |d: &Digest| report.deleted_blobs.iter().position(|x| x == d).unwrap();
        assert_eq!(report.deleted_blobs.len(), 4, "{report:?}");
        assert!(at(&index.0) < at(&manifest.0), "{report:?}");
        assert!(at(&manifest.0) < at(&config.0), "{report:?}");
        assert!(at(&manifest.0) < at(&layer.0), "{report:?}");
    }

    #[test]
    fn an_unreadable_foreign_manifest_stops_gc_and_an_unknown_descriptor_is_a_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let layer = put(&layout, b"a layer only another tool's manifest references");
        let config = put(&layout, b"{}");
        // Over the 4 MiB a manifest may have: gc cannot know what it
        // references beyond this layer.
        let padding = json!({"padding": "x".repeat(5 << 20)});
        let manifest = put(&layout, &manifest_of(&config, &layer, padding));
        let unused = put(&layout, b"referenced by nothing");
        let mut index = layout.read_index().unwrap();
        index.foreign = vec![descriptor(crate::manifest::OCI_MANIFEST, &manifest)];
        layout.commit(&index).unwrap();
        let e = gc(&layout, Duration::ZERO, false).unwrap_err().to_string();
        assert!(e.contains(&manifest.0.to_string()), "{e}");
        for d in [&layer.0, &config.0, &manifest.0, &unused.0] {
            assert!(layout.has_blob(d), "{d} deleted");
        }

        // The same blob under a media type that is no manifest's: a leaf.
        index.foreign = vec![descriptor("application/vnd.example.data", &manifest)];
        layout.commit(&index).unwrap();
        let report = gc(&layout, Duration::ZERO, false).unwrap();
        assert!(layout.has_blob(&manifest.0));
        assert!(!layout.has_blob(&unused.0), "{report:?}");
    }
}
