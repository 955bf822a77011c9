//! The closure of an archived image: every blob and child manifest it needs,
//! in dependency order (layers and config before their manifest, children
//! before their index). Used by verify, gc, restore and export.

use std::collections::HashSet;

use crate::digest::Digest;
use crate::layout::Layout;
use crate::manifest;

/// One member of a closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The blob.
    pub digest: Digest,
    /// Declared size (from the referencing descriptor), if any.
    pub size: Option<u64>,
    /// `Some(media type)` for a manifest or index, `None` for a plain blob.
    pub manifest: Option<String>,
}

/// Why a closure is incomplete or unreadable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClosureError {
    /// A referenced blob is not in the archive.
    #[error("image {image}: blob {blob} is missing from the archive")]
    Missing {
        /// The top-level image.
        image: Digest,
        /// The missing blob.
        blob: Digest,
    },
    /// A manifest in the closure cannot be read or parsed.
    #[error("image {image}: manifest {manifest} is unreadable: {reason}")]
    Unreadable {
        /// The top-level image.
        image: Digest,
        /// The manifest.
        manifest: Digest,
        /// Why.
        reason: String,
    },
}

impl ClosureError {
    /// The blob at fault.
    pub fn blob(&self) -> &Digest {
        match self {
            ClosureError::Missing { blob, .. } => blob,
            ClosureError::Unreadable { manifest, .. } => manifest,
        }
    }
}

/// Walks the closure of `root` in dependency order; the root comes last.
/// `seen` lets callers skip what an earlier walk already produced. Fails on
/// the first missing or unreadable member.
pub fn walk(
    layout: &Layout,
    root: &Digest,
    seen: &mut HashSet<Digest>,
) -> Result<Vec<Node>, ClosureError> {
    let (nodes, mut errors) = walk_all(layout, root, seen);
    if errors.is_empty() {
        Ok(nodes)
    } else {
        Err(errors.swap_remove(0))
    }
}

/// Like [`walk`], but goes on past missing or unreadable members, so that
/// everything still reachable is marked in `seen` (gc relies on this).
pub fn walk_all(
    layout: &Layout,
    root: &Digest,
    seen: &mut HashSet<Digest>,
) -> (Vec<Node>, Vec<ClosureError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    visit(layout, root, root, None, 0, seen, &mut out, &mut errors);
    (out, errors)
}

#[allow(clippy::too_many_arguments)]
fn visit(
    layout: &Layout,
    image: &Digest,
    digest: &Digest,
    size: Option<u64>,
    depth: usize,
    seen: &mut HashSet<Digest>,
    out: &mut Vec<Node>,
    errors: &mut Vec<ClosureError>,
) {
    if seen.contains(digest) {
        return;
    }
    if depth > 8 {
        errors.push(ClosureError::Unreadable {
            image: image.clone(),
            manifest: digest.clone(),
            reason: "index nesting deeper than 8 levels (a loop?)".into(),
        });
        return;
    }
    if !layout.has_blob(digest) {
        errors.push(ClosureError::Missing {
            image: image.clone(),
            blob: digest.clone(),
        });
        return;
    }
    let unreadable = |reason: String| ClosureError::Unreadable {
        image: image.clone(),
        manifest: digest.clone(),
        reason,
    };
    let parsed = match layout
        .read_small_blob(digest)
        .map_err(|e| unreadable(e.to_string()))
        .and_then(|bytes| {
            manifest::parse(digest, &bytes, None)
                .map(|p| (p, bytes.len() as u64))
                .map_err(|e| unreadable(e.to_string()))
        }) {
        Ok(p) => p,
        Err(e) => {
            // Still reachable itself, even if what it references is unknown.
            seen.insert(digest.clone());
            errors.push(e);
            return;
        }
    };
    let (parsed, len) = parsed;
    let before = errors.len();
    for child in &parsed.children {
        visit(
            layout,
            image,
            &child.digest,
            child.size,
            depth + 1,
            seen,
            out,
            errors,
        );
    }
    for blob in &parsed.blobs {
        if seen.contains(&blob.digest) {
            continue;
        }
        if !layout.has_blob(&blob.digest) {
            errors.push(ClosureError::Missing {
                image: image.clone(),
                blob: blob.digest.clone(),
            });
            continue;
        }
        seen.insert(blob.digest.clone());
        out.push(Node {
            digest: blob.digest.clone(),
            size: blob.size,
            manifest: None,
        });
    }
    seen.insert(digest.clone());
    if errors.len() == before {
        out.push(Node {
            digest: digest.clone(),
            size: size.or(Some(len)),
            manifest: Some(parsed.media_type),
        });
    }
}
