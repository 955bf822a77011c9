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

/// Builds the listing. The committed index is read one entry at a time
/// (it is sorted by stream), and what is counted per stream is dropped once
/// the next stream begins: memory grows with the distinct images and blobs,
/// not with every tag event and every stream's blob set at once. An index
/// in another order is read whole and sorted first.
pub fn list(layout: &Layout) -> Result<Listing, LayoutError> {
    let mut acc = Accumulator::default();
    let mut in_order = true;
    layout.read_index_filtered(&mut |e| {
        in_order = in_order && acc.add(layout, e.namespace, e.stream, e.tag, e.digest);
        None
    })?;
    if !in_order {
        let mut index = layout.read_index()?;
        index.sort();
        acc = Accumulator::default();
        for e in &index.entries {
            acc.add(layout, &e.namespace, &e.stream, &e.tag, &e.digest);
        }
    }
    let mut out = acc.finish();
    out.archived_bytes = layout.list_blobs()?.iter().map(|(_, m)| m.len()).sum();
    Ok(out)
}

/// The listing as it is built, entry by entry, stream after stream.
#[derive(Default)]
struct Accumulator {
    out: Listing,
    /// Distinct images, with the bytes of their closure.
    images: HashMap<Digest, u64>,
    /// Distinct blobs the images use, with their sizes.
    used: HashMap<Digest, u64>,
    /// The stream being counted (`namespace`, `name`), its images and its blobs.
    current: Option<(String, String)>,
    stream_images: HashSet<Digest>,
    stream_blobs: HashSet<Digest>,
}

impl Accumulator {
    /// Counts one entry; false when it belongs to a stream before the
    /// current one (the entries are not in the index's order).
    fn add(
        &mut self,
        layout: &Layout,
        namespace: &str,
        stream: &str,
        tag: &str,
        digest: &Digest,
    ) -> bool {
        match &self.current {
            Some((ns, name)) if (ns.as_str(), name.as_str()) == (namespace, stream) => {}
            Some((ns, name)) if (ns.as_str(), name.as_str()) > (namespace, stream) => return false,
            _ => {
                self.current = Some((namespace.to_string(), stream.to_string()));
                self.stream_images.clear();
                self.stream_blobs.clear();
            }
        }
        let s = self
            .out
            .namespaces
            .entry(namespace.to_string())
            .or_default()
            .entry(stream.to_string())
            .or_default();
        *s.tags.entry(tag.to_string()).or_default() += 1;
        if !self.stream_images.insert(digest.clone()) {
            return true;
        }
        s.images += 1;
        let mut seen = HashSet::new();
        let mut logical = 0;
        for n in closure::walk_all(layout, digest, &mut seen).0 {
            let size = layout.blob_size(&n.digest).or(n.size).unwrap_or(0);
            logical += size;
            if self.stream_blobs.insert(n.digest.clone()) {
                s.bytes += size;
            }
            self.used.insert(n.digest, size);
        }
        self.images.insert(digest.clone(), logical);
        true
    }

    fn finish(mut self) -> Listing {
        self.out.entries = self
            .out
            .namespaces
            .values()
            .flat_map(|streams| streams.values())
            .flat_map(|s| s.tags.values())
            .sum();
        self.out.images = self.images.len();
        self.out.logical_bytes = self.images.values().sum();
        let unique: u64 = self.used.values().sum();
        self.out.bytes_saved_by_dedup = self.out.logical_bytes.saturating_sub(unique);
        self.out
    }
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
