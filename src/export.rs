//! `export`: the archive (or some namespaces of it) as one deterministic
//! `.tar.zst` stream that is itself a valid OCI image layout.
//!
//! Stream layout (see `docs/export-format.md`):
//! 1. `oci-layout`, `index.json` (filtered to the selected namespaces), and
//!    [`BLOB_LIST`]: every blob of the stream, in stream order, with the
//!    repositories (`ns/name`) that need it;
//! 2. the ImageStream `List` blob (filtered, rewritten when filtering
//!    dropped streams);
//! 3. every other blob exactly once, in closure order: layers and configs
//!    before the manifest that references them, children before their index.
//!
//! So a reader can push every blob the moment it arrives and tag images at
//! the end (`restore --from`), or unpack everything (`import`).
//!
//! Determinism: entries in a stable order, mode 0644, uid/gid 0, mtime 0,
//! no user or group names, no PAX headers; zstd in multithreaded mode, whose
//! output does not depend on the number of workers. Blobs that are already
//! compressed (gzip, zstd, xz, bzip2 magic) go into zstd frames of level 1,
//! everything else into frames of the requested level; every frame carries
//! a content checksum.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::closure::{self, ClosureError};
use crate::digest::{Digest, Sha256};
use crate::imagestream;
use crate::index::ArchiveIndex;
use crate::layout::{Layout, LayoutError};

/// Path of the extra file listing the stream's blobs and their repositories.
pub const BLOB_LIST: &str = "imagestream-archiver/blobs.json";
/// Version of [`BlobList`] written by this build.
pub const BLOB_LIST_VERSION: u32 = 1;
/// zstd level used for blobs that are already compressed.
pub const COMPRESSED_BLOB_LEVEL: i32 = 1;
/// `oci-layout` content.
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The content of [`BLOB_LIST`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobList {
    /// Format version.
    pub version: u32,
    /// Every blob of the stream, in stream order.
    pub blobs: Vec<BlobInfo>,
}

/// One blob of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    /// The blob.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// The media type, for a manifest or index (absent for layers, configs
    /// and the ImageStream List).
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The repositories (`ns/name`, as archived) whose images need the blob.
    #[serde(default)]
    pub repositories: Vec<String>,
}

/// What an export wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportStats {
    /// The namespaces selected (empty: all).
    pub namespaces: Vec<String>,
    /// Index entries (tag events) exported.
    pub entries: usize,
    /// Blobs in the stream (the ImageStream List included).
    pub blobs: usize,
    /// Their total size.
    pub blob_bytes: u64,
    /// Blobs written at [`COMPRESSED_BLOB_LEVEL`] because they were already compressed.
    pub compressed_blobs: usize,
    /// Size of the uncompressed tar stream.
    pub tar_bytes: u64,
    /// Size of the compressed stream.
    pub stream_bytes: u64,
    /// zstd level of everything not already compressed.
    pub level: i32,
    /// Wall time.
    pub seconds: f64,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the archive failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// An exported image is incomplete in the archive.
    #[error("{what}: {source}")]
    Closure {
        /// `ns/name:tag` and position.
        what: String,
        /// What is missing or unreadable.
        #[source]
        source: ClosureError,
    },
    /// Nothing matched the namespaces.
    #[error("the archive holds no images in namespace(s) {0}")]
    NothingSelected(String),
    /// The archived ImageStream List is not readable.
    #[error("archived ImageStream list {digest}: {reason}")]
    ImageStreams {
        /// The List blob.
        digest: Digest,
        /// What is wrong.
        reason: String,
    },
    /// A blob file changed or vanished while it was being exported.
    #[error("blob {digest} changed while it was exported ({reason}); is another process rewriting the archive?")]
    Changed {
        /// The blob.
        digest: Digest,
        /// What differed.
        reason: String,
    },
    /// A blob's content does not match its digest: it is not shipped.
    #[error("blob {digest} is corrupt in the archive (its content hashes to {actual}); nothing was exported; run `imagestream-archiver backup --repair` to fetch it again")]
    Corrupt {
        /// The blob.
        digest: Digest,
        /// What its content hashes to.
        actual: Digest,
    },
    /// Writing or compressing the stream failed.
    #[error("writing the export stream ({what})")]
    Write {
        /// The entry being written.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One member of the stream, before it is written.
enum Member {
    /// A small file held in memory.
    Bytes(String, Vec<u8>),
    /// A blob of the archive, streamed from its file.
    Blob(Digest, u64),
}

/// Writes the selected namespaces of `layout` (all when empty) to `writer`
/// as a `.tar.zst` stream; `level` is the zstd level for content that is not
/// already compressed. Memory stays bounded: blobs are streamed from their
/// files, only the index, the blob list and the ImageStream List are held.
pub fn export<W: Write>(
    layout: &Layout,
    namespaces: &[String],
    writer: W,
    level: i32,
) -> Result<ExportStats, ExportError> {
    export_with_workers(layout, namespaces, writer, level, default_workers())
}

/// zstd workers: one per core, at most 8 (never 0, so the output is the
/// multithreaded format whatever the machine).
fn default_workers() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
        .clamp(1, 8)
}

/// [`export`] with an explicit number of zstd workers (the output does not
/// depend on it).
pub fn export_with_workers<W: Write>(
    layout: &Layout,
    namespaces: &[String],
    writer: W,
    level: i32,
    workers: u32,
) -> Result<ExportStats, ExportError> {
    let started = Instant::now();
    let (index, members, list) = plan(layout, namespaces)?;
    let mut stats = ExportStats {
        namespaces: namespaces.to_vec(),
        entries: index.entries.len(),
        blobs: list.blobs.len(),
        blob_bytes: list.blobs.iter().map(|b| b.size).sum(),
        level,
        ..Default::default()
    };
    let werr = |what: &str| {
        let what = what.to_string();
        move |source| ExportError::Write { what, source }
    };
    let counter = CountingWriter {
        inner: writer,
        count: 0,
    };
    let frames = FrameWriter::new(counter, level, workers).map_err(werr("starting zstd"))?;
    let mut tar = tar::Builder::new(frames);
    let mut head = vec![
        Member::Bytes("oci-layout".into(), OCI_LAYOUT.to_vec()),
        Member::Bytes("index.json".into(), index.to_json()),
    ];
    let mut list_json = serde_json::to_vec(&list).expect("blob list serializes");
    list_json.push(b'\n');
    head.push(Member::Bytes(BLOB_LIST.into(), list_json));
    for member in head.into_iter().chain(members) {
        match member {
            Member::Bytes(path, data) => {
                tar.get_mut().set_level(level).map_err(werr(&path))?;
                let header = header(&path, data.len() as u64).map_err(werr(&path))?;
                tar.append(&header, data.as_slice()).map_err(werr(&path))?;
                stats.tar_bytes += 512 + padded(data.len() as u64);
            }
            Member::Blob(digest, size) => {
                let what = format!("blob {digest}");
                let mut file = layout.open_blob(&digest)?;
                let compressed =
                    already_compressed(&mut file).map_err(|e| ExportError::Changed {
                        digest: digest.clone(),
                        reason: e.to_string(),
                    })?;
                let blob_level = if compressed {
                    stats.compressed_blobs += 1;
                    COMPRESSED_BLOB_LEVEL.min(level)
                } else {
                    level
                };
                tar.get_mut().set_level(blob_level).map_err(werr(&what))?;
                let path = format!("blobs/sha256/{}", digest.hex());
                let header = header(&path, size).map_err(werr(&what))?;
                let mut exact = ExactReader {
                    inner: file,
                    remaining: size,
                    digest: digest.clone(),
                    failure: None,
                    hasher: Sha256::new(),
                };
                let res = tar.append(&header, &mut exact);
                if let Some(reason) = exact.failure.take() {
                    return Err(ExportError::Changed { digest, reason });
                }
                res.map_err(werr(&what))?;
                // A blob that rotted on disk is not shipped: the stream would
                // only be refused at import, possibly at the recovery site.
                let actual = exact.hasher.finish();
                if actual != digest {
                    return Err(ExportError::Corrupt { digest, actual });
                }
                stats.tar_bytes += 512 + padded(size);
            }
        }
    }
    stats.tar_bytes += 1024;
    let frames = tar.into_inner().map_err(werr("tar end marker"))?;
    let mut counter = frames.finish().map_err(werr("zstd end of frame"))?;
    counter.flush().map_err(werr("flush"))?;
    stats.stream_bytes = counter.count;
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Decides what goes into the stream: the filtered index, the members after
/// the head (ImageStream List, then every blob in closure order) and the
/// blob list.
fn plan(
    layout: &Layout,
    namespaces: &[String],
) -> Result<(ArchiveIndex, Vec<Member>, BlobList), ExportError> {
    let full = layout.read_index()?;
    let selected = |ns: &str| namespaces.is_empty() || namespaces.iter().any(|n| n == ns);
    let mut index = ArchiveIndex {
        entries: full
            .entries
            .iter()
            .filter(|e| selected(&e.namespace))
            .cloned()
            .collect(),
        imagestreams: None,
        // Descriptors of other tools belong to no namespace: whole exports only.
        foreign: if namespaces.is_empty() {
            full.foreign.clone()
        } else {
            Vec::new()
        },
    };
    if index.entries.is_empty() && !namespaces.is_empty() {
        return Err(ExportError::NothingSelected(namespaces.join(", ")));
    }
    let mut members = Vec::new();
    let mut blobs = Vec::new();

    // The ImageStream objects, filtered to the selected namespaces.
    if let Some(d) = &full.imagestreams {
        let bad = |reason: String| ExportError::ImageStreams {
            digest: d.clone(),
            reason,
        };
        if namespaces.is_empty() {
            let size = layout
                .blob_size(d)
                .ok_or_else(|| bad("missing from the archive".into()))?;
            members.push(Member::Blob(d.clone(), size));
            blobs.push(BlobInfo {
                digest: d.clone(),
                size,
                media_type: None,
                repositories: Vec::new(),
            });
            index.imagestreams = Some(d.clone());
        } else {
            // Checked against its digest: a damaged list is not shipped,
            // nor hidden behind the digest of a filtered copy.
            let bytes = layout
                .read_blob_checked(d, crate::layout::MAX_INDEX_SIZE)
                .map_err(|e| bad(e.to_string()))?;
            let streams = imagestream::parse_list(&bytes, "archived ImageStream list")
                .map_err(|e| bad(e.to_string()))?;
            let kept: Vec<_> = streams
                .iter()
                .filter(|is| selected(&is.metadata.namespace))
                .cloned()
                .collect();
            let (digest, data) = if kept.len() == streams.len() {
                (d.clone(), bytes)
            } else {
                let json = imagestream::list_json(&kept);
                (Digest::of(&json), json)
            };
            blobs.push(BlobInfo {
                digest: digest.clone(),
                size: data.len() as u64,
                media_type: None,
                repositories: Vec::new(),
            });
            members.push(Member::Bytes(
                format!("blobs/sha256/{}", digest.hex()),
                data,
            ));
            index.imagestreams = Some(digest);
        }
    }

    // Every image's closure, stream by stream; a blob is listed once, at
    // its first use, with every repository that needs it.
    let mut global: HashSet<Digest> = blobs.iter().map(|b| b.digest.clone()).collect();
    let mut order: Vec<closure::Node> = Vec::new();
    let mut repos: HashMap<Digest, BTreeSet<String>> = HashMap::new();
    let mut by_stream: BTreeMap<String, Vec<&crate::index::Entry>> = BTreeMap::new();
    for e in &index.entries {
        by_stream.entry(e.stream_key()).or_default().push(e);
    }
    for (stream, entries) in &by_stream {
        let mut seen = HashSet::new();
        for e in entries {
            let nodes = closure::walk(layout, &e.digest, &mut seen).map_err(|source| {
                ExportError::Closure {
                    what: format!("{} (history position {})", e.ref_name(), e.position),
                    source,
                }
            })?;
            for node in nodes {
                repos
                    .entry(node.digest.clone())
                    .or_default()
                    .insert(stream.clone());
                if global.insert(node.digest.clone()) {
                    order.push(node);
                }
            }
        }
    }
    for f in &index.foreign {
        let Some(d) = f
            .get("digest")
            .and_then(serde_json::Value::as_str)
            .and_then(|s| Digest::parse(s).ok())
        else {
            continue;
        };
        let mut seen = global.clone();
        let nodes = match closure::walk(layout, &d, &mut seen) {
            Ok(nodes) => nodes,
            // Unknown media types: the descriptor's own blob is all we know.
            Err(ClosureError::Unreadable { .. }) if !global.contains(&d) => vec![closure::Node {
                digest: d.clone(),
                size: None,
                manifest: None,
            }],
            Err(ClosureError::Unreadable { .. }) => Vec::new(),
            Err(source) => {
                return Err(ExportError::Closure {
                    what: format!("descriptor {d} of another tool"),
                    source,
                })
            }
        };
        for node in nodes {
            if global.insert(node.digest.clone()) {
                order.push(node);
            }
        }
    }
    for node in order {
        let size = layout
            .blob_size(&node.digest)
            .ok_or_else(|| ExportError::Changed {
                digest: node.digest.clone(),
                reason: "vanished".into(),
            })?;
        blobs.push(BlobInfo {
            digest: node.digest.clone(),
            size,
            media_type: node.manifest.clone(),
            repositories: repos
                .remove(&node.digest)
                .unwrap_or_default()
                .into_iter()
                .collect(),
        });
        members.push(Member::Blob(node.digest, size));
    }
    Ok((
        index,
        members,
        BlobList {
            version: BLOB_LIST_VERSION,
            blobs,
        },
    ))
}

/// A deterministic header of a regular file.
fn header(path: &str, size: u64) -> io::Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)?;
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_username("")?;
    h.set_groupname("")?;
    h.set_cksum();
    Ok(h)
}

fn padded(n: u64) -> u64 {
    n.div_ceil(512) * 512
}

/// True when the file starts with the magic of a compressed format. Leaves
/// the file at offset 0.
fn already_compressed(file: &mut File) -> io::Result<bool> {
    use std::io::Seek;
    let mut magic = [0u8; 6];
    let mut n = 0;
    while n < magic.len() {
        match file.read(&mut magic[n..])? {
            0 => break,
            k => n += k,
        }
    }
    file.seek(io::SeekFrom::Start(0))?;
    let m = &magic[..n];
    Ok(m.starts_with(&[0x1f, 0x8b])
        || m.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || m.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00])
        || m.starts_with(b"BZh"))
}

/// Reads exactly `remaining` bytes of a blob file; a shorter or longer file
/// is recorded as a failure (the tar entry would be corrupt otherwise).
struct ExactReader {
    inner: File,
    remaining: u64,
    digest: Digest,
    failure: Option<String>,
    /// Hashes what is read, so that a corrupt blob is not shipped.
    hasher: Sha256,
}

impl Read for ExactReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? != 0 {
                self.failure = Some("it grew".into());
                return Err(io::Error::other(format!("blob {} grew", self.digest)));
            }
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.failure = Some(format!("{} bytes short", self.remaining));
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("blob {} shrank", self.digest),
            ));
        }
        self.remaining -= n as u64;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Counts bytes written through it.
struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type ZWriter<W> = zstd::stream::zio::Writer<W, zstd::stream::raw::Encoder<'static>>;

/// A zstd writer that can change the level between frames, reusing one
/// multithreaded compression context. Every frame has a content checksum.
struct FrameWriter<W: Write> {
    z: Option<ZWriter<W>>,
    level: i32,
    /// Bytes given to the current frame.
    pending: bool,
}

impl<W: Write> FrameWriter<W> {
    fn new(writer: W, level: i32, workers: u32) -> io::Result<Self> {
        use zstd::stream::raw::CParameter;
        let mut enc = zstd::stream::raw::Encoder::new(level)?;
        enc.set_parameter(CParameter::ChecksumFlag(true))?;
        enc.set_parameter(CParameter::NbWorkers(workers.max(1)))?;
        Ok(FrameWriter {
            z: Some(zstd::stream::zio::Writer::new(writer, enc)),
            level,
            pending: false,
        })
    }

    /// Ends the current frame (if it has content) and uses `level` from the
    /// next byte on.
    fn set_level(&mut self, level: i32) -> io::Result<()> {
        use zstd::stream::raw::{CParameter, Operation};
        if level == self.level {
            return Ok(());
        }
        let mut z = self.z.take().expect("frame writer in use");
        if self.pending {
            z.finish()?;
        }
        let (w, mut enc) = z.into_inner();
        enc.reinit()?;
        enc.set_parameter(CParameter::CompressionLevel(level))?;
        self.z = Some(zstd::stream::zio::Writer::new(w, enc));
        self.level = level;
        self.pending = false;
        Ok(())
    }

    /// Ends the last frame and returns the writer.
    fn finish(mut self) -> io::Result<W> {
        let mut z = self.z.take().expect("frame writer in use");
        z.finish()?;
        let (mut w, _) = z.into_inner();
        w.flush()?;
        Ok(w)
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.pending = true;
        self.z.as_mut().expect("frame writer in use").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        // zstd's flush would end a block early and change the output; the
        // frame is flushed by `set_level` and `finish` only.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Access;

    fn frames(level_changes: &[(i32, &[u8])], workers: u32) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), 3, workers).unwrap();
        for (level, data) in level_changes {
            w.set_level(*level).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn frames_roundtrip_and_do_not_depend_on_workers() {
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let noise: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let parts: Vec<(i32, &[u8])> = vec![(3, &text), (1, &noise), (1, b"x"), (9, &text)];
        let one = frames(&parts, 1);
        let two = frames(&parts, 2);
        assert_eq!(one, two, "output must not depend on the number of workers");
        let back = zstd::stream::decode_all(one.as_slice()).unwrap();
        let expected: Vec<u8> = parts.iter().flat_map(|(_, d)| d.to_vec()).collect();
        assert_eq!(back, expected);
        assert!(one.len() < expected.len() / 2);
    }

    #[test]
    fn frames_carry_checksums() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let out = frames(&[(3, &data)], 2);
        // Frame header descriptor byte: bit 2 is the content checksum flag.
        assert_eq!(&out[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
        assert_ne!(out[4] & 0b100, 0);
        let mut bad = out.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(zstd::stream::decode_all(bad.as_slice()).is_err());
    }

    #[test]
    fn headers_are_deterministic() {
        let h = header("blobs/sha256/00", 5).unwrap();
        assert_eq!(h.mode().unwrap(), 0o644);
        assert_eq!(h.mtime().unwrap(), 0);
        assert_eq!(h.uid().unwrap(), 0);
        assert_eq!(h.username().unwrap(), Some(""));
    }

    #[test]
    fn empty_archive_exports_a_valid_layout() {
        let dir = tempfile::tempdir().unwrap();
        drop(Layout::open(dir.path(), Access::Write).unwrap());
        let layout = Layout::open(dir.path(), Access::Read).unwrap();
        let mut out = Vec::new();
        let stats = export(&layout, &[], &mut out, 3).unwrap();
        assert_eq!(stats.blobs, 0);
        assert_eq!(stats.stream_bytes, out.len() as u64);
        let tar = zstd::stream::decode_all(out.as_slice()).unwrap();
        assert_eq!(stats.tar_bytes, tar.len() as u64);
        let mut a = tar::Archive::new(tar.as_slice());
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["oci-layout", "index.json", BLOB_LIST]);
        let err = export(&layout, &["nope".into()], Vec::new(), 3).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
