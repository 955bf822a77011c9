//! `import`: unpack an exported `.tar.zst` stream into an archive (new or
//! existing), verifying every blob while it streams, and commit the merged
//! `index.json` only once everything arrived and every incoming image's
//! closure is present.
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
use std::time::Instant;

use serde::Serialize;
use sha2::Digest as _;

use crate::closure;
use crate::digest::Digest;
use crate::export::{BlobList, BLOB_LIST};
use crate::imagestream::{self, ImageStream};
use crate::index::{ArchiveIndex, Entry};
use crate::layout::{Layout, LayoutError};

/// Largest `index.json` or blob list read from a stream.
const MAX_METADATA_SIZE: u64 = 256 * 1024 * 1024;

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
    let mut data = Vec::with_capacity(size as usize);
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
    let mut hasher = sha2::Sha256::new();
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

/// Checks a finished hash against the digest.
pub fn verify_hash(
    digest: &Digest,
    size: u64,
    got: u64,
    hasher: sha2::Sha256,
) -> Result<(), ImportError> {
    if got != size {
        return Err(ImportError::BlobMismatch {
            digest: digest.clone(),
            reason: format!("{got} bytes instead of {size}"),
        });
    }
    let actual = Digest::from_sha256(hasher.finalize().into());
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

/// Unpacks the stream into `layout` and commits the merged index. Nothing is
/// committed unless the whole stream was read and verified.
pub fn import<R: Read>(reader: R, layout: &Layout) -> Result<ImportStats, ImportError> {
    let started = Instant::now();
    let mut stats = ImportStats::default();
    let mut incoming: Option<ArchiveIndex> = None;
    let mut announced: Option<BlobList> = None;
    let mut received: HashSet<Digest> = HashSet::new();
    let totals = read_stream(reader, |member, r, size| {
        match member {
            Member::OciLayout => {
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
                let data = read_small(r, size, MAX_METADATA_SIZE, "index.json")?;
                incoming = Some(parse_index(&data)?);
            }
            Member::BlobList => {
                let data = read_small(r, size, MAX_METADATA_SIZE, BLOB_LIST)?;
                announced = Some(parse_blob_list(&data)?);
            }
            Member::Blob(digest) => {
                stats.blobs_received += 1;
                if layout.has_blob(&digest) {
                    drain_verify(r, &digest, size)?;
                    stats.blobs_present += 1;
                } else {
                    layout.write_blob_from(&digest, Some(size), r).map_err(
                        |source| match source {
                            LayoutError::Mismatch { expected, reason } => {
                                ImportError::BlobMismatch {
                                    digest: expected,
                                    reason,
                                }
                            }
                            source => ImportError::Write {
                                digest: digest.clone(),
                                source,
                            },
                        },
                    )?;
                    stats.blobs_new += 1;
                    stats.bytes_new += size;
                }
                received.insert(digest);
            }
        }
        Ok(())
    })?;
    stats.stream_bytes = totals.stream_bytes;
    stats.tar_bytes = totals.tar_bytes;
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

/// Merges the incoming index into the existing one: the same
/// namespace/stream/tag/position is taken from the incoming one, and so are
/// ImageStreams of the same namespace/name (a new List blob is written).
fn merge(
    layout: &Layout,
    existing: ArchiveIndex,
    incoming: ArchiveIndex,
) -> Result<ArchiveIndex, ImportError> {
    let mut entries: BTreeMap<(String, String, String, usize), Entry> = BTreeMap::new();
    for e in existing.entries.into_iter().chain(incoming.entries) {
        entries.insert(
            (
                e.namespace.clone(),
                e.stream.clone(),
                e.tag.clone(),
                e.position,
            ),
            e,
        );
    }
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
            for (d, required) in [(&old, false), (&new, true)] {
                let path = layout.blob_path(d);
                let parsed = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        imagestream::parse_list(&b, "ImageStream list").map_err(|e| e.to_string())
                    });
                match parsed {
                    Ok(list) => {
                        for is in list {
                            streams.insert(is.key(), is);
                        }
                    }
                    Err(reason) if required => {
                        return Err(ImportError::Metadata {
                            file: format!("ImageStream list {d}"),
                            reason,
                        })
                    }
                    Err(reason) => {
                        tracing::warn!(digest = %d, %reason, "archived ImageStream list unreadable; replaced by the incoming one")
                    }
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
        entries: entries.into_values().collect(),
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
