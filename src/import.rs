//! `import`: unpack an exported `.tar.zst` stream into an archive (new or
//! existing), verifying every blob while it streams, and commit the merged
//! `index.json` only once everything arrived and every incoming image's
//! closure is present. A manifest or index that arrives before what it
//! references is held in memory and written only once all of that is
//! present, so the closure invariant holds for a stream in any order.
//!
//! The stream reader ([`read_stream`]) is shared with `restore --from`: it
//! decodes zstd (frame checksums), walks the tar structure, refuses any
//! member that is not part of an OCI layout, and checks the end: the tar
//! end-of-archive marker, nothing but padding after it, and the end of the
//! last zstd frame.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::closure;
use crate::digest::{Digest, Sha256};
use crate::export::{BlobList, BLOB_LIST};
use crate::imagestream::{self, ImageStream};
use crate::index::{ArchiveIndex, Entry};
use crate::layout::{Layout, LayoutError, MAX_MANIFEST_SIZE};
use crate::manifest;

/// Largest `index.json` or blob list read from a stream: what an archive
/// may hold (an export ships its `index.json` as it is; 10,000 streams of
/// 50 tag events make one of about 320 MiB).
pub(crate) const MAX_METADATA_SIZE: u64 = crate::layout::MAX_INDEX_SIZE;

/// Why reading or importing a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// zstd or tar decoding failed: the stream is truncated or corrupt.
    #[error("the stream is truncated or corrupt at {at}: {message}")]
    Stream {
        /// The member being read (or "the tar structure").
        at: String,
        /// The decoder's message.
        message: String,
    },
    /// A member that has no place in an OCI layout.
    #[error("refusing tar member {path:?}: {reason}")]
    BadMember {
        /// The member's path, as in the stream.
        path: String,
        /// Why.
        reason: String,
    },
    /// A metadata file of the stream is invalid.
    #[error("{file} in the stream is invalid: {reason}")]
    Metadata {
        /// `index.json`, `oci-layout` or the blob list.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A blob's content does not match its name.
    #[error("blob {digest} in the stream does not match its digest: {reason}")]
    BlobMismatch {
        /// The blob.
        digest: Digest,
        /// What differed.
        reason: String,
    },
    /// The stream ended before something it announced.
    #[error("the stream is incomplete: {0}")]
    Incomplete(String),
    /// Writing into the archive failed.
    #[error("writing blob {digest} into the archive")]
    Write {
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: LayoutError,
    },
    /// The archive itself failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportStats {
    /// Index entries (tag events) in the stream.
    pub entries_in_stream: usize,
    /// Index entries of the archive after the merge.
    pub entries_total: usize,
    /// Blobs in the stream.
    pub blobs_received: usize,
    /// Blobs the archive did not have yet.
    pub blobs_new: usize,
    /// Their size.
    pub bytes_new: u64,
    /// Blobs already present (verified and skipped).
    pub blobs_present: usize,
    /// Size of the compressed stream read.
    pub stream_bytes: u64,
    /// Size of the tar stream.
    pub tar_bytes: u64,
    /// Whether `index.json` was committed.
    pub committed: bool,
    /// Wall time.
    pub seconds: f64,
}

/// A member of the stream, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// `oci-layout`.
    OciLayout,
    /// `index.json`.
    Index,
    /// The blob list ([`BLOB_LIST`]).
    BlobList,
    /// `blobs/sha256/<hex>`.
    Blob(Digest),
}

/// Classifies a tar member by path and type. `Ok(None)` for the directories
/// of the layout (skipped); an error for anything else.
pub fn classify(path: &[u8], kind: tar::EntryType) -> Result<Option<Member>, ImportError> {
    let shown = String::from_utf8_lossy(path)
        .chars()
        .take(200)
        .collect::<String>();
    let bad = |reason: &str| ImportError::BadMember {
        path: shown.clone(),
        reason: reason.into(),
    };
    let path = std::str::from_utf8(path).map_err(|_| bad("not UTF-8"))?;
    let path = path.strip_prefix("./").unwrap_or(path);
    if kind.is_dir() {
        return match path.trim_end_matches('/') {
            "" | "." | "blobs" | "blobs/sha256" | "imagestream-archiver" => Ok(None),
            _ => Err(bad("not a directory of an OCI layout")),
        };
    }
    if kind != tar::EntryType::Regular && kind != tar::EntryType::Continuous {
        return Err(bad("only regular files and directories are allowed"));
    }
    match path {
        "oci-layout" => Ok(Some(Member::OciLayout)),
        "index.json" => Ok(Some(Member::Index)),
        p if p == BLOB_LIST => Ok(Some(Member::BlobList)),
        p => {
            let hex = p.strip_prefix("blobs/sha256/").ok_or_else(|| {
                bad("not oci-layout, index.json, blobs/sha256/<hex> or the blob list")
            })?;
            let digest =
                Digest::parse(&format!("sha256:{hex}")).map_err(|e| bad(&e.to_string()))?;
            Ok(Some(Member::Blob(digest)))
        }
    }
}

/// Totals of [`read_stream`].
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamTotals {
    /// Compressed bytes read.
    pub stream_bytes: u64,
    /// Decompressed (tar) bytes read.
    pub tar_bytes: u64,
}

/// Reads a `.tar.zst` stream, calling `on_member` for every file member with
/// a reader over its content and its size. A decoding failure inside
/// `on_member` (zstd, tar) is reported as [`ImportError::Stream`] naming the
/// member, whatever `on_member` made of it. After the last member, checks the
/// tar end marker and reads to the end so that the last zstd frame's
/// checksum is verified.
pub fn read_stream<R: Read>(
    reader: R,
    mut on_member: impl FnMut(Member, &mut dyn Read, u64) -> Result<(), ImportError>,
) -> Result<StreamTotals, ImportError> {
    let raw = Counting::new(reader);
    let raw_count = raw.count.clone();
    let decoder = zstd::stream::read::Decoder::new(raw).map_err(|e| ImportError::Stream {
        at: "the start".into(),
        message: e.to_string(),
    })?;
    let tar_in = Counting::new(decoder);
    let tar_count = tar_in.count.clone();
    let mut archive = tar::Archive::new(tar_in);
    let mut end_of_last = 0u64;
    let mut last = String::from("the first tar header");
    {
        let entries = archive.entries().map_err(|e| ImportError::Stream {
            at: last.clone(),
            message: e.to_string(),
        })?;
        for entry in entries {
            let mut entry = entry.map_err(|e| ImportError::Stream {
                at: if end_of_last == 0 {
                    last.clone()
                } else {
                    format!("the tar header after {last}")
                },
                message: e.to_string(),
            })?;
            let size = entry.size();
            end_of_last = entry.raw_file_position() + size.div_ceil(512) * 512;
            let kind = entry.header().entry_type();
            let path = entry.path_bytes().into_owned();
            let Some(member) = classify(&path, kind)? else {
                last = format!("directory {}", String::from_utf8_lossy(&path));
                continue;
            };
            last = match &member {
                Member::Blob(d) => format!("blob {d}"),
                _ => String::from_utf8_lossy(&path).into_owned(),
            };
            let failure = Rc::new(RefCell::new(None));
            let mut tracked = Tracked {
                inner: &mut entry,
                failure: failure.clone(),
            };
            let res = on_member(member, &mut tracked, size);
            if let Some(message) = failure.borrow_mut().take() {
                return Err(ImportError::Stream { at: last, message });
            }
            res?;
        }
    }
    let mut rest = archive.into_inner();
    // The tar crate treats a clean EOF between members as the end: insist
    // on the end-of-archive marker (a zero block) having been read.
    if rest.count.get() < end_of_last + 512 {
        return Err(ImportError::Stream {
            at: format!("the end of the tar archive after {last}"),
            message: "no end-of-archive marker: the stream is cut short".into(),
        });
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if buf[..n].iter().any(|b| *b != 0) {
                    return Err(ImportError::Stream {
                        at: "the end of the tar archive".into(),
                        message: "data after the end-of-archive marker".into(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(ImportError::Stream {
                    at: "the end of the stream".into(),
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(StreamTotals {
        stream_bytes: raw_count.get(),
        tar_bytes: tar_count.get(),
    })
}

/// Reads a small member whole (`limit` bytes at most).
pub fn read_small(
    reader: &mut dyn Read,
    size: u64,
    limit: u64,
    file: &str,
) -> Result<Vec<u8>, ImportError> {
    if size > limit {
        return Err(ImportError::Metadata {
            file: file.into(),
            reason: format!("{size} bytes is more than the {limit} allowed"),
        });
    }
    // A header may claim more than the stream holds: grow as bytes come.
    let mut data = Vec::with_capacity(size.min(64 << 20) as usize);
    reader
        .take(size)
        .read_to_end(&mut data)
        .map_err(|e| ImportError::Stream {
            at: file.into(),
            message: e.to_string(),
        })?;
    Ok(data)
}

/// Reads a blob member to its end, hashing it; fails unless it matches.
pub fn drain_verify(reader: &mut dyn Read, digest: &Digest, size: u64) -> Result<(), ImportError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n_total = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| ImportError::Stream {
            at: format!("blob {digest}"),
            message: e.to_string(),
        })?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        hasher.update(&buf[..n]);
    }
    verify_hash(digest, size, n_total, hasher)
}

/// Checks bytes held in memory against the digest and declared size.
pub fn verify_bytes(digest: &Digest, size: u64, data: &[u8]) -> Result<(), ImportError> {
    let mut hasher = Sha256::new();
    hasher.update(data);
    verify_hash(digest, size, data.len() as u64, hasher)
}

/// Checks a finished hash against the digest.
pub fn verify_hash(
    digest: &Digest,
    size: u64,
    got: u64,
    hasher: Sha256,
) -> Result<(), ImportError> {
    if got != size {
        return Err(ImportError::BlobMismatch {
            digest: digest.clone(),
            reason: format!("{got} bytes instead of {size}"),
        });
    }
    let actual = hasher.finish();
    if &actual != digest {
        return Err(ImportError::BlobMismatch {
            digest: digest.clone(),
            reason: format!("content hashes to {actual}"),
        });
    }
    Ok(())
}

/// Parses the `index.json` member.
pub fn parse_index(data: &[u8]) -> Result<ArchiveIndex, ImportError> {
    ArchiveIndex::from_json(data).map_err(|reason| ImportError::Metadata {
        file: "index.json".into(),
        reason,
    })
}

/// Parses the blob list member.
pub fn parse_blob_list(data: &[u8]) -> Result<BlobList, ImportError> {
    let list: BlobList = serde_json::from_slice(data).map_err(|e| ImportError::Metadata {
        file: BLOB_LIST.into(),
        reason: e.to_string(),
    })?;
    if list.version != crate::export::BLOB_LIST_VERSION {
        return Err(ImportError::Metadata {
            file: BLOB_LIST.into(),
            reason: format!(
                "version {} is not the supported {}",
                list.version,
                crate::export::BLOB_LIST_VERSION
            ),
        });
    }
    Ok(list)
}

/// Refuses a second copy of a metadata member: which one counts would be
/// the stream's choice, not the reader's.
pub(crate) fn only_once(already: bool, file: &str) -> Result<(), ImportError> {
    match already {
        false => Ok(()),
        true => Err(ImportError::Metadata {
            file: file.into(),
            reason: "appears twice in the stream".into(),
        }),
    }
}

/// Unpacks the stream into `layout` and commits the merged index. Nothing is
/// committed unless the whole stream was read and verified.
pub fn import<R: Read>(reader: R, layout: &Layout) -> Result<ImportStats, ImportError> {
    let started = Instant::now();
    let mut stats = ImportStats::default();
    let mut incoming: Option<ArchiveIndex> = None;
    let mut announced: Option<BlobList> = None;
    let mut received: HashSet<Digest> = HashSet::new();
    let mut listed_manifests: HashSet<Digest> = HashSet::new();
    let mut held = Held::default();
    let mut has_layout = false;
    let totals = read_stream(reader, |member, r, size| {
        match member {
            Member::OciLayout => {
                only_once(std::mem::replace(&mut has_layout, true), "oci-layout")?;
                let data = read_small(r, size, 4096, "oci-layout")?;
                let v: serde_json::Value =
                    serde_json::from_slice(&data).map_err(|e| ImportError::Metadata {
                        file: "oci-layout".into(),
                        reason: e.to_string(),
                    })?;
                if !v["imageLayoutVersion"].is_string() {
                    return Err(ImportError::Metadata {
                        file: "oci-layout".into(),
                        reason: "no imageLayoutVersion".into(),
                    });
                }
            }
            Member::Index => {
                only_once(incoming.is_some(), "index.json")?;
                let data = read_small(r, size, MAX_METADATA_SIZE, "index.json")?;
                incoming = Some(parse_index(&data)?);
            }
            Member::BlobList => {
                only_once(announced.is_some(), BLOB_LIST)?;
                let data = read_small(r, size, MAX_METADATA_SIZE, BLOB_LIST)?;
                let list = parse_blob_list(&data)?;
                listed_manifests.extend(
                    list.blobs
                        .iter()
                        .filter(|b| b.media_type.is_some())
                        .map(|b| b.digest.clone()),
                );
                announced = Some(list);
            }
            Member::Blob(digest) => {
                stats.blobs_received += 1;
                if layout.has_blob(&digest) || held.contains(&digest) {
                    drain_verify(r, &digest, size)?;
                    stats.blobs_present += 1;
                } else if size <= MAX_MANIFEST_SIZE {
                    // Small enough to be a manifest: look into it before
                    // it becomes visible.
                    let data = read_small(r, size, MAX_MANIFEST_SIZE, &format!("blob {digest}"))?;
                    let refs = match manifest::parse(&digest, &data, None) {
                        Ok(p) => {
                            let mut refs: Vec<Digest> = p
                                .children
                                .into_iter()
                                .chain(p.blobs)
                                .map(|r| r.digest)
                                .collect();
                            refs.sort();
                            refs.dedup();
                            refs
                        }
                        // Not a manifest we can read: a plain blob.
                        Err(_) => Vec::new(),
                    };
                    held.arrived(layout, digest.clone(), data, refs, &mut stats)?;
                } else if listed_manifests.contains(&digest) {
                    return Err(ImportError::Metadata {
                        file: BLOB_LIST.into(),
                        reason: format!(
                            "blob {digest} is listed as a manifest but has {size} bytes, \
                             over the {MAX_MANIFEST_SIZE} allowed"
                        ),
                    });
                } else {
                    layout
                        .write_blob_from(&digest, Some(size), r)
                        .map_err(write_error(&digest))?;
                    stats.blobs_new += 1;
                    stats.bytes_new += size;
                    held.present(layout, digest.clone(), &mut stats)?;
                }
                received.insert(digest);
            }
        }
        Ok(())
    })?;
    stats.stream_bytes = totals.stream_bytes;
    stats.tar_bytes = totals.tar_bytes;
    held.finish(layout, &mut stats)?;
    let incoming =
        incoming.ok_or_else(|| ImportError::Incomplete("no index.json in the stream".into()))?;
    if let Some(list) = &announced {
        if let Some(b) = list.blobs.iter().find(|b| !received.contains(&b.digest)) {
            return Err(ImportError::Incomplete(format!(
                "blob {} listed in {BLOB_LIST} never arrived",
                b.digest
            )));
        }
    }
    // Every incoming image must be complete before anything is committed.
    let mut seen = HashSet::new();
    for e in &incoming.entries {
        closure::walk(layout, &e.digest, &mut seen).map_err(|err| {
            ImportError::Incomplete(format!(
                "{} (history position {}): {err}",
                e.ref_name(),
                e.position
            ))
        })?;
    }
    for d in incoming.roots() {
        if !layout.has_blob(&d) {
            return Err(ImportError::Incomplete(format!(
                "blob {d} named by index.json is missing"
            )));
        }
    }
    stats.entries_in_stream = incoming.entries.len();
    let existing = layout.read_index()?;
    let merged = merge(layout, existing, incoming)?;
    stats.entries_total = merged.entries.len();
    layout.commit(&merged)?;
    stats.committed = true;
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Maps a blob writer's failure to the import's error.
fn write_error(digest: &Digest) -> impl Fn(LayoutError) -> ImportError + '_ {
    move |source| match source {
        LayoutError::Mismatch { expected, reason } => ImportError::BlobMismatch {
            digest: expected,
            reason,
        },
        source => ImportError::Write {
            digest: digest.clone(),
            source,
        },
    }
}

/// A manifest that arrived before some blob it references.
struct HeldManifest {
    /// Its verified bytes (at most 4 MiB).
    data: Vec<u8>,
    /// Everything it references (blobs and child manifests), deduplicated.
    refs: Vec<Digest>,
    /// How many of `refs` are not present yet.
    missing: usize,
}

/// Keeps the closure invariant for streams in any order: a manifest (or
/// index) whose references are not all present stays in memory, and is
/// written the moment its last reference is.
#[derive(Default)]
struct Held {
    /// Held manifests by digest.
    manifests: std::collections::HashMap<Digest, HeldManifest>,
    /// Missing digest -> held manifests waiting for it.
    waiting: std::collections::HashMap<Digest, Vec<Digest>>,
    /// Bytes held, bounded by [`MAX_HELD_BYTES`].
    bytes: u64,
}

/// Most manifest bytes an import holds while they wait for their blobs.
const MAX_HELD_BYTES: u64 = 512 << 20;

impl Held {
    fn contains(&self, digest: &Digest) -> bool {
        self.manifests.contains_key(digest)
    }

    /// A small blob arrived whole (`refs` empty unless it is a manifest):
    /// written now if everything it references is present, else held.
    fn arrived(
        &mut self,
        layout: &Layout,
        digest: Digest,
        data: Vec<u8>,
        refs: Vec<Digest>,
        stats: &mut ImportStats,
    ) -> Result<(), ImportError> {
        let missing: Vec<&Digest> = refs.iter().filter(|d| !layout.has_blob(d)).collect();
        if missing.is_empty() {
            self.write(layout, &digest, &data, stats)?;
            return self.present(layout, digest, stats);
        }
        // Only verified bytes are held.
        verify_bytes(&digest, data.len() as u64, &data)?;
        for d in &missing {
            self.waiting
                .entry((*d).clone())
                .or_default()
                .push(digest.clone());
        }
        let missing = missing.len();
        self.bytes += data.len() as u64;
        if self.bytes > MAX_HELD_BYTES {
            return Err(ImportError::Metadata {
                file: format!("manifest {digest}"),
                reason: format!(
                    "more than {} MiB of manifests wait for blobs that have not arrived",
                    MAX_HELD_BYTES >> 20
                ),
            });
        }
        self.manifests.insert(
            digest,
            HeldManifest {
                data,
                refs,
                missing,
            },
        );
        Ok(())
    }

    fn write(
        &self,
        layout: &Layout,
        digest: &Digest,
        data: &[u8],
        stats: &mut ImportStats,
    ) -> Result<(), ImportError> {
        layout
            .write_blob(digest, data)
            .map_err(write_error(digest))?;
        stats.blobs_new += 1;
        stats.bytes_new += data.len() as u64;
        Ok(())
    }

    /// `digest` is now present: writes every held manifest that waited only
    /// for it, and so on up (children before their index).
    fn present(
        &mut self,
        layout: &Layout,
        digest: Digest,
        stats: &mut ImportStats,
    ) -> Result<(), ImportError> {
        if self.waiting.is_empty() {
            return Ok(());
        }
        let mut queue = vec![digest];
        while let Some(d) = queue.pop() {
            for w in self.waiting.remove(&d).unwrap_or_default() {
                let Some(h) = self.manifests.get_mut(&w) else {
                    continue;
                };
                h.missing -= 1;
                if h.missing == 0 {
                    let h = self.manifests.remove(&w).expect("held");
                    self.bytes -= h.data.len() as u64;
                    self.write(layout, &w, &h.data, stats)?;
                    queue.push(w);
                }
            }
        }
        Ok(())
    }

    /// At the end of the stream: writes what became complete (children
    /// first); fails naming every manifest whose references never arrived.
    fn finish(&mut self, layout: &Layout, stats: &mut ImportStats) -> Result<(), ImportError> {
        loop {
            let ready: Vec<Digest> = self
                .manifests
                .iter()
                .filter(|(_, h)| h.refs.iter().all(|r| layout.has_blob(r)))
                .map(|(d, _)| d.clone())
                .collect();
            if ready.is_empty() {
                break;
            }
            for d in ready {
                let h = self.manifests.remove(&d).expect("held");
                self.bytes -= h.data.len() as u64;
                self.write(layout, &d, &h.data, stats)?;
            }
        }
        if self.manifests.is_empty() {
            return Ok(());
        }
        let mut incomplete: Vec<(&Digest, &HeldManifest)> = self.manifests.iter().collect();
        incomplete.sort_by(|a, b| a.0.cmp(b.0));
        let shown: Vec<String> = incomplete
            .iter()
            .take(5)
            .map(|(d, h)| {
                let missing: Vec<String> = h
                    .refs
                    .iter()
                    .filter(|r| !layout.has_blob(r))
                    .take(3)
                    .map(|r| r.to_string())
                    .collect();
                format!(
                    "manifest {d} was not written: it references {} that never arrived",
                    missing.join(", ")
                )
            })
            .collect();
        let more = match incomplete.len() {
            n if n > 5 => format!(" (and {} more incomplete manifests)", n - 5),
            _ => String::new(),
        };
        Err(ImportError::Incomplete(format!(
            "{}{more}",
            shown.join("; ")
        )))
    }
}

/// Merges the history of one tag (`existing` and `incoming`, each ordered by
/// position) without ever losing or duplicating an archived image:
///
/// - normally the incoming events come first, in their order, followed by
///   the existing events whose digest is not among the incoming ones, in
///   their order (the incoming history is newer or equal);
/// - but when the existing current image (position 0) is not among the
///   incoming events and the incoming current image is an existing history
///   item (the incoming history is older), the existing events come first,
///   followed by the incoming events whose digest is not among them.
///
/// Positions are then renumbered 0..n.
fn merge_tag(existing: Vec<Entry>, incoming: Vec<Entry>) -> Vec<Entry> {
    let older = match (existing.first(), incoming.first()) {
        (Some(e0), Some(i0)) => {
            !incoming.iter().any(|i| i.digest == e0.digest)
                && existing[1..].iter().any(|e| e.digest == i0.digest)
        }
        _ => false,
    };
    let (first, second) = if older {
        (existing, incoming)
    } else {
        (incoming, existing)
    };
    let known: HashSet<Digest> = first.iter().map(|e| e.digest.clone()).collect();
    let mut out = first;
    out.extend(second.into_iter().filter(|e| !known.contains(&e.digest)));
    for (i, e) in out.iter_mut().enumerate() {
        e.position = i;
    }
    out
}

/// Merges the entries of two indexes tag by tag ([`merge_tag`]).
fn merge_entries(existing: Vec<Entry>, incoming: Vec<Entry>) -> Vec<Entry> {
    type Tag = (Arc<str>, Arc<str>, Arc<str>);
    let mut tags: BTreeMap<Tag, (Vec<Entry>, Vec<Entry>)> = BTreeMap::new();
    let key = |e: &Entry| (e.namespace.clone(), e.stream.clone(), e.tag.clone());
    for e in existing {
        tags.entry(key(&e)).or_default().0.push(e);
    }
    for e in incoming {
        tags.entry(key(&e)).or_default().1.push(e);
    }
    let mut out = Vec::new();
    for (_, (mut old, mut new)) in tags {
        old.sort_by_key(|e| e.position);
        new.sort_by_key(|e| e.position);
        out.extend(merge_tag(old, new));
    }
    out
}

/// Merges the incoming index into the existing one: tag histories as
/// [`merge_tag`] says, descriptors of other tools by union, and ImageStreams
/// of the same namespace/name taken from the incoming one (a new List blob
/// is written).
fn merge(
    layout: &Layout,
    existing: ArchiveIndex,
    incoming: ArchiveIndex,
) -> Result<ArchiveIndex, ImportError> {
    let entries = merge_entries(existing.entries, incoming.entries);
    let mut foreign = existing.foreign;
    for f in incoming.foreign {
        if !foreign.contains(&f) {
            foreign.push(f);
        }
    }
    let imagestreams = match (existing.imagestreams, incoming.imagestreams) {
        (None, x) | (x, None) => x,
        (Some(a), Some(b)) if a == b => Some(a),
        (Some(old), Some(new)) => {
            let mut streams: BTreeMap<String, ImageStream> = BTreeMap::new();
            // Both checked against their digests. An archived list that is
            // damaged or unreadable stops the import (nothing is committed):
            // merging without it would drop the ImageStream objects of every
            // namespace the stream does not carry.
            for (d, which) in [(&old, "archived"), (&new, "incoming")] {
                let list = layout
                    .read_blob_checked(d, MAX_METADATA_SIZE)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        imagestream::parse_list(&b, "ImageStream list").map_err(|e| e.to_string())
                    })
                    .map_err(|reason| ImportError::Metadata {
                        file: format!("{which} ImageStream list {}", layout.blob_path(d).display()),
                        reason: format!("{reason}; nothing was committed (run `verify`)"),
                    })?;
                for is in list {
                    streams.insert(is.key(), is);
                }
            }
            let list: Vec<ImageStream> = streams.into_values().collect();
            let json = imagestream::list_json(&list);
            let digest = Digest::of(&json);
            layout.write_blob(&digest, &json)?;
            Some(digest)
        }
    };
    let mut index = ArchiveIndex {
        entries,
        imagestreams,
        foreign,
    };
    index.sort();
    Ok(index)
}

/// Counts bytes read through it.
struct Counting<R> {
    inner: R,
    count: Rc<std::cell::Cell<u64>>,
}

impl<R> Counting<R> {
    fn new(inner: R) -> Self {
        Counting {
            inner,
            count: Rc::default(),
        }
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Remembers the first read error of the stream below, so that a consumer
/// that wraps it (a blob writer) cannot hide a decoding failure.
struct Tracked<'a, R> {
    inner: &'a mut R,
    failure: Rc<RefCell<Option<String>>>,
}

impl<R: Read> Read for Tracked<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => Ok(n),
            Err(e) => {
                let mut f = self.failure.borrow_mut();
                if f.is_none() {
                    *f = Some(e.to_string());
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Access;

    #[test]
    fn classify_accepts_only_layout_members() {
        let reg = tar::EntryType::Regular;
        let hex = "a".repeat(64);
        assert_eq!(
            classify(b"oci-layout", reg).unwrap(),
            Some(Member::OciLayout)
        );
        assert_eq!(classify(b"./index.json", reg).unwrap(), Some(Member::Index));
        assert_eq!(
            classify(BLOB_LIST.as_bytes(), reg).unwrap(),
            Some(Member::BlobList)
        );
        assert!(matches!(
            classify(format!("blobs/sha256/{hex}").as_bytes(), reg).unwrap(),
            Some(Member::Blob(_))
        ));
        assert_eq!(
            classify(b"blobs/sha256/", tar::EntryType::Directory).unwrap(),
            None
        );
        for bad in [
            "../index.json".to_string(),
            "/index.json".into(),
            format!("blobs/sha256/{hex}/x"),
            format!("blobs/sha256/../../{}", &hex[..58]),
            "blobs/sha256/ABC".into(),
            format!("blobs/sha512/{hex}"),
            ".lock".into(),
            "imagestream-archiver/other.json".into(),
        ] {
            assert!(classify(bad.as_bytes(), reg).is_err(), "{bad}");
        }
        assert!(classify(
            format!("blobs/sha256/{hex}").as_bytes(),
            tar::EntryType::Symlink
        )
        .is_err());
        assert!(classify(b"etc", tar::EntryType::Directory).is_err());
    }

    fn stream(members: &[(&str, &[u8])], end_marker: bool) -> Vec<u8> {
        let mut tar = Vec::new();
        for (path, data) in members {
            let mut h = tar::Header::new_ustar();
            h.set_path(path).unwrap();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.extend_from_slice(h.as_bytes());
            tar.extend_from_slice(data);
            tar.resize(tar.len().div_ceil(512) * 512, 0);
        }
        if end_marker {
            tar.resize(tar.len() + 1024, 0);
        }
        zstd::stream::encode_all(tar.as_slice(), 3).unwrap()
    }

    fn empty_index() -> Vec<u8> {
        ArchiveIndex::default().to_json()
    }

    #[test]
    fn imports_blobs_and_commits() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let blob = b"some layer";
        let d = Digest::of(blob);
        let path = format!("blobs/sha256/{}", d.hex());
        let idx = empty_index();
        let s = stream(
            &[
                ("oci-layout", crate::export::OCI_LAYOUT),
                ("index.json", &idx),
                (&path, blob),
            ],
            true,
        );
        let stats = import(s.as_slice(), &layout).unwrap();
        assert!(stats.committed);
        assert_eq!(stats.blobs_new, 1);
        assert!(layout.has_blob(&d));
        let again = import(s.as_slice(), &layout).unwrap();
        assert_eq!((again.blobs_new, again.blobs_present), (0, 1));
    }

    #[test]
    fn refuses_missing_end_marker_wrong_digest_and_no_index() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let idx = empty_index();
        let err = import(stream(&[("index.json", &idx)], false).as_slice(), &layout).unwrap_err();
        assert!(err.to_string().contains("end-of-archive"), "{err}");
        let wrong = format!("blobs/sha256/{}", Digest::of(b"other").hex());
        let err = import(
            stream(&[("index.json", &idx), (&wrong, b"data")], true).as_slice(),
            &layout,
        )
        .unwrap_err();
        assert!(matches!(err, ImportError::BlobMismatch { .. }), "{err}");
        let err = import(stream(&[], true).as_slice(), &layout).unwrap_err();
        assert!(err.to_string().contains("no index.json"), "{err}");
        assert!(!dir.path().join("index.json").exists());
    }

    fn image(layer: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","n":{}}}"#,
            layer.len()
        );
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
            crate::manifest::OCI_MANIFEST,
            Digest::of(config.as_bytes()),
            config.len(),
            Digest::of(layer),
            layer.len()
        );
        (m.into_bytes(), config.into_bytes(), layer.to_vec())
    }

    fn blob_path(data: &[u8]) -> String {
        format!("blobs/sha256/{}", Digest::of(data).hex())
    }

    fn index_of(tags: &[(&str, &[u8])]) -> Vec<u8> {
        ArchiveIndex {
            entries: tags
                .iter()
                .map(|(tag, m)| Entry {
                    namespace: "ns".into(),
                    stream: "app".into(),
                    tag: (*tag).into(),
                    position: 0,
                    digest: Digest::of(m),
                    media_type: crate::manifest::OCI_MANIFEST.into(),
                    size: m.len() as u64,
                    created: Default::default(),
                    reference: Default::default(),
                })
                .collect(),
            ..Default::default()
        }
        .to_json()
    }

    #[test]
    fn manifests_before_their_blobs_wait_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let (m, config, layer) = image(b"layer one");
        let list = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":{}}}]}}"#,
            crate::manifest::OCI_INDEX,
            crate::manifest::OCI_MANIFEST,
            Digest::of(&m),
            m.len()
        )
        .into_bytes();
        let idx = index_of(&[("v1", &m), ("multi", &list)]);
        // Index first, then its child, then the child's blobs.
        let s = stream(
            &[
                ("index.json", &idx),
                (&blob_path(&list), &list),
                (&blob_path(&m), &m),
                (&blob_path(&config), &config),
                (&blob_path(&layer), &layer),
            ],
            true,
        );
        let stats = import(s.as_slice(), &layout).unwrap();
        assert!(stats.committed);
        assert_eq!(stats.blobs_new, 4);
        for d in [&list, &m, &config, &layer] {
            assert!(layout.has_blob(&Digest::of(d)));
        }
    }

    #[test]
    fn manifest_whose_blob_never_arrives_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let (m, config, _layer) = image(b"layer two");
        let (ok, ok_config, ok_layer) = image(b"complete");
        let idx = index_of(&[("broken", &m), ("fine", &ok)]);
        let s = stream(
            &[
                ("index.json", &idx),
                (&blob_path(&m), &m),
                (&blob_path(&ok), &ok),
                (&blob_path(&config), &config),
                (&blob_path(&ok_config), &ok_config),
                (&blob_path(&ok_layer), &ok_layer),
            ],
            true,
        );
        let err = import(s.as_slice(), &layout).unwrap_err();
        assert!(matches!(err, ImportError::Incomplete(_)), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("manifest {} was not written", Digest::of(&m))),
            "{err}"
        );
        assert!(!layout.has_blob(&Digest::of(&m)));
        // The complete image was written (it is complete), nothing committed.
        assert!(layout.has_blob(&Digest::of(&ok)));
        assert!(!dir.path().join("index.json").exists());
    }

    fn ev(tag: &str, position: usize, image: &str) -> Entry {
        Entry {
            namespace: "ns".into(),
            stream: "app".into(),
            tag: tag.into(),
            position,
            digest: Digest::of(image.as_bytes()),
            media_type: crate::manifest::OCI_MANIFEST.into(),
            size: 1,
            created: format!("created {image}").into(),
            reference: Default::default(),
        }
    }

    fn history(entries: &[Entry], tag: &str) -> Vec<(usize, Digest)> {
        entries
            .iter()
            .filter(|e| *e.tag == *tag)
            .map(|e| (e.position, e.digest.clone()))
            .collect()
    }

    fn expect(images: &[&str]) -> Vec<(usize, Digest)> {
        images
            .iter()
            .enumerate()
            .map(|(i, x)| (i, Digest::of(x.as_bytes())))
            .collect()
    }

    #[test]
    fn merge_keeps_history_when_incoming_is_older() {
        let existing = vec![
            ev("latest", 0, "X"),
            ev("latest", 1, "W"),
            ev("latest", 2, "V"),
        ];
        let incoming = vec![ev("latest", 0, "W"), ev("latest", 1, "V")];
        let merged = merge_entries(existing, incoming);
        assert_eq!(history(&merged, "latest"), expect(&["X", "W", "V"]));
        // Older incoming with an image the archive did not know: appended.
        let existing = vec![ev("latest", 0, "X"), ev("latest", 1, "W")];
        let incoming = vec![ev("latest", 0, "W"), ev("latest", 1, "U")];
        let merged = merge_entries(existing, incoming);
        assert_eq!(history(&merged, "latest"), expect(&["X", "W", "U"]));
    }

    #[test]
    fn merge_takes_newer_incoming_first() {
        let existing = vec![ev("latest", 0, "W"), ev("latest", 1, "V")];
        let incoming = vec![
            ev("latest", 0, "X"),
            ev("latest", 1, "W"),
            ev("latest", 2, "V"),
        ];
        let merged = merge_entries(existing, incoming.clone());
        assert_eq!(history(&merged, "latest"), expect(&["X", "W", "V"]));
        // The incoming events are taken as they are.
        assert!(merged.iter().all(|e| incoming.contains(e)));
        // The same history again changes nothing.
        assert_eq!(merge_entries(merged.clone(), incoming.clone()), merged);
        // Newer incoming that dropped an old image: the old one is kept last.
        let existing = vec![ev("latest", 0, "W"), ev("latest", 1, "V")];
        let incoming = vec![ev("latest", 0, "X"), ev("latest", 1, "W")];
        let merged = merge_entries(existing, incoming);
        assert_eq!(history(&merged, "latest"), expect(&["X", "W", "V"]));
    }

    #[test]
    fn merge_of_disjoint_histories_and_tags() {
        let existing = vec![
            ev("latest", 0, "A"),
            ev("latest", 1, "B"),
            ev("old", 0, "O"),
        ];
        let incoming = vec![
            ev("latest", 0, "C"),
            ev("latest", 1, "D"),
            ev("new", 0, "N"),
        ];
        let merged = merge_entries(existing, incoming);
        assert_eq!(history(&merged, "latest"), expect(&["C", "D", "A", "B"]));
        assert_eq!(history(&merged, "old"), expect(&["O"]));
        assert_eq!(history(&merged, "new"), expect(&["N"]));
        assert_eq!(merged.len(), 6);
        // Through merge(), the index stays sorted and valid.
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let idx = merge(
            &layout,
            ArchiveIndex {
                entries: vec![
                    ev("latest", 0, "X"),
                    ev("latest", 1, "W"),
                    ev("latest", 2, "V"),
                ],
                ..Default::default()
            },
            ArchiveIndex {
                entries: vec![ev("latest", 0, "W"), ev("latest", 1, "V")],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(history(&idx.entries, "latest"), expect(&["X", "W", "V"]));
        assert_eq!(ArchiveIndex::from_json(&idx.to_json()).unwrap(), idx);
    }

    #[test]
    fn truncated_zstd_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let blob: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_be_bytes()).collect();
        let path = format!("blobs/sha256/{}", Digest::of(&blob).hex());
        let idx = empty_index();
        let s = stream(&[("index.json", &idx), (&path, &blob)], true);
        for cut in [s.len() / 3, s.len() / 2, s.len() - 1] {
            let err = import(&s[..cut], &layout).unwrap_err();
            assert!(
                err.to_string().contains("truncated or corrupt"),
                "{cut}: {err}"
            );
        }
        assert!(!dir.path().join("index.json").exists());
    }
}
