//! `list`: what the archive holds, per namespace and stream, with sizes and
//! the bytes saved by storing every blob once.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::closure;
use crate::digest::Digest;
use crate::layout::{Layout, LayoutError};

/// One stream in the listing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamListing {
    /// Tags with their history depth (number of archived tag events).
    pub tags: BTreeMap<String, usize>,
    /// Distinct images.
    pub images: usize,
    /// Bytes of the distinct blobs this stream's images need.
    pub bytes: u64,
}

/// The listing of an archive.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Listing {
    /// `namespace` -> `stream` -> listing.
    pub namespaces: BTreeMap<String, BTreeMap<String, StreamListing>>,
    /// Archived tag events.
    pub entries: usize,
    /// Distinct images.
    pub images: usize,
    /// Bytes of all blobs in the archive directory.
    pub archived_bytes: u64,
    /// What the images would take if each stored its own blobs.
    pub logical_bytes: u64,
    /// `logical_bytes - bytes actually used by the images`.
    pub bytes_saved_by_dedup: u64,
}

/// Builds the listing.
pub fn list(layout: &Layout) -> Result<Listing, LayoutError> {
    let index = layout.read_index()?;
    let mut out = Listing {
        entries: index.entries.len(),
        ..Default::default()
    };
    // Closure (blob -> size) per image, computed once per digest.
    let mut closures: HashMap<Digest, Vec<(Digest, u64)>> = HashMap::new();
    let mut per_stream_blobs: HashMap<String, HashSet<Digest>> = HashMap::new();
    let mut per_stream_images: HashMap<String, HashSet<Digest>> = HashMap::new();
    let mut used: HashMap<Digest, u64> = HashMap::new();
    for e in &index.entries {
        let nodes = closures.entry(e.digest.clone()).or_insert_with(|| {
            let mut seen = HashSet::new();
            closure::walk_all(layout, &e.digest, &mut seen)
                .0
                .into_iter()
                .map(|n| {
                    let size = layout.blob_size(&n.digest).or(n.size).unwrap_or(0);
                    (n.digest, size)
                })
                .collect()
        });
        let key = e.stream_key();
        let blobs = per_stream_blobs.entry(key.clone()).or_default();
        let s = out
            .namespaces
            .entry(e.namespace.to_string())
            .or_default()
            .entry(e.stream.to_string())
            .or_default();
        *s.tags.entry(e.tag.to_string()).or_default() += 1;
        if per_stream_images
            .entry(key)
            .or_default()
            .insert(e.digest.clone())
        {
            s.images += 1;
        }
        for (d, size) in nodes.iter() {
            if blobs.insert(d.clone()) {
                s.bytes += size;
            }
            used.insert(d.clone(), *size);
        }
    }
    out.images = closures.len();
    out.logical_bytes = closures
        .values()
        .map(|n| n.iter().map(|(_, s)| s).sum::<u64>())
        .sum();
    let unique: u64 = used.values().sum();
    out.bytes_saved_by_dedup = out.logical_bytes.saturating_sub(unique);
    out.archived_bytes = layout.list_blobs()?.iter().map(|(_, m)| m.len()).sum();
    Ok(out)
}

/// Renders the listing as a text table.
pub fn render(l: &Listing) -> String {
    use crate::transfer::human_bytes;
    let mut s = String::new();
    s.push_str(&format!(
        "{:<50} {:>5} {:>8} {:>7} {:>12}\n",
        "NAMESPACE/IMAGESTREAM", "TAGS", "HISTORY", "IMAGES", "SIZE"
    ));
    for (ns, streams) in &l.namespaces {
        for (name, st) in streams {
            let history: usize = st.tags.values().map(|n| n.saturating_sub(1)).sum();
            s.push_str(&format!(
                "{:<50} {:>5} {:>8} {:>7} {:>12}\n",
                format!("{ns}/{name}"),
                st.tags.len(),
                history,
                st.images,
                human_bytes(st.bytes)
            ));
        }
    }
    let streams: usize = l.namespaces.values().map(|m| m.len()).sum();
    s.push_str(&format!(
        "\n{} namespaces, {streams} imagestreams, {} tag events, {} images\narchived: {}  (images would take {} stored separately; saved by dedup: {})\n",
        l.namespaces.len(),
        l.entries,
        l.images,
        human_bytes(l.archived_bytes),
        human_bytes(l.logical_bytes),
        human_bytes(l.bytes_saved_by_dedup)
    ));
    s
}
