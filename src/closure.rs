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
/// `seen` lets callers skip what an earlier walk already produced.
pub fn walk(layout: &Layout, root: &Digest, seen: &mut HashSet<Digest>) -> Result<Vec<Node>, ClosureError> {
    let mut out = Vec::new();
    visit(layout, root, root, None, 0, seen, &mut out)?;
    Ok(out)
}

fn visit(
    layout: &Layout,
    image: &Digest,
    digest: &Digest,
    size: Option<u64>,
    depth: usize,
    seen: &mut HashSet<Digest>,
    out: &mut Vec<Node>,
) -> Result<(), ClosureError> {
    if seen.contains(digest) {
        return Ok(());
    }
    if depth > 8 {
        return Err(ClosureError::Unreadable {
            image: image.clone(),
            manifest: digest.clone(),
            reason: "index nesting deeper than 8 levels (a loop?)".into(),
        });
    }
    if !layout.has_blob(digest) {
        return Err(ClosureError::Missing {
            image: image.clone(),
            blob: digest.clone(),
        });
    }
    let unreadable = |reason: String| ClosureError::Unreadable {
        image: image.clone(),
        manifest: digest.clone(),
        reason,
    };
    let bytes = layout.read_small_blob(digest).map_err(|e| unreadable(e.to_string()))?;
    let parsed = manifest::parse(digest, &bytes, None).map_err(|e| unreadable(e.to_string()))?;
    for child in &parsed.children {
        visit(layout, image, &child.digest, child.size, depth + 1, seen, out)?;
    }
    for blob in &parsed.blobs {
        if seen.contains(&blob.digest) {
            continue;
        }
        if !layout.has_blob(&blob.digest) {
            return Err(ClosureError::Missing {
                image: image.clone(),
                blob: blob.digest.clone(),
            });
        }
        seen.insert(blob.digest.clone());
        out.push(Node {
            digest: blob.digest.clone(),
            size: blob.size,
            manifest: None,
        });
    }
    seen.insert(digest.clone());
    out.push(Node {
        digest: digest.clone(),
        size: size.or(Some(bytes.len() as u64)),
        manifest: Some(parsed.media_type),
    });
    Ok(())
}
