//! The OCI image layout on disk: the blob store, `index.json` (the single
//! commit point) and the writer lock.
//!
//! Invariants kept here (see DESIGN.md §3):
//! - a blob file exists only with its full, verified content: it is written
//!   to a temp file under `.ingest/` on the same filesystem, hashed while
//!   streaming, checked for size and digest, fsynced, renamed, and the
//!   directory fsynced;
//! - `index.json` is replaced atomically and written last;
//! - one writer at a time: an exclusive `flock` on `.lock`, naming its holder.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::digest::{Digest, Sha256};
use crate::index::ArchiveIndex;
use crate::jsonfile::JsonFile;

/// Name of the directory holding temp files of blobs being written.
pub const INGEST_DIR: &str = ".ingest";
/// Name of the lock file.
pub const LOCK_FILE: &str = ".lock";
/// Largest manifest or index the archiver will read into memory.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;
/// Largest `index.json` the archiver will read.
pub const MAX_INDEX_SIZE: u64 = 16 << 30;

/// Errors of the layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process holds the lock.
    #[error("archive {path} is locked by another run ({holder}); wait for it to finish")]
    Locked {
        /// The archive root.
        path: PathBuf,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// Written content did not match its digest or size.
    #[error("blob {expected}: content does not match ({reason}); nothing was stored")]
    Mismatch {
        /// The expected digest.
        expected: Digest,
        /// What differed.
        reason: String,
    },
    /// The directory is not an OCI image layout.
    #[error("{path} is not an OCI image layout: {reason}")]
    NotALayout {
        /// The archive root.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `index.json` exists but cannot be parsed.
    #[error("{path} is corrupt ({reason}); refusing to overwrite it. Run `imagestream-archiver verify --archive {root}` to inspect it, then restore index.json from a snapshot")]
    CorruptIndex {
        /// The index file.
        path: PathBuf,
        /// The archive root.
        root: String,
        /// The parse error.
        reason: String,
    },
    /// A stored blob does not hash to its name: damaged on disk.
    #[error("{path} is damaged: {reason}; `imagestream-archiver verify` lists every damaged blob")]
    Damaged {
        /// The blob.
        digest: Digest,
        /// Its file.
        path: PathBuf,
        /// What differed.
        reason: String,
    },
    /// A blob is larger than allowed for what it is.
    #[error("blob {digest} is {size} bytes, more than the {limit} allowed for this kind of blob (manifests, the ImageStream list)")]
    TooLarge {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

impl LayoutError {
    /// True when the error is the filesystem being full or read-only, or a
    /// permission error: permanent, not worth a retry.
    pub fn is_permanent(&self) -> bool {
        match self {
            LayoutError::Io { source, .. } => is_permanent_io(source),
            _ => false,
        }
    }
}

/// ENOSPC, EDQUOT, EROFS, EACCES, EPERM.
pub fn is_permanent_io(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28 | 122 | 30 | 13 | 1))
        || e.kind() == io::ErrorKind::PermissionDenied
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayoutError + 'a {
    move |source| LayoutError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// How the layout is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Exclusive: backup, gc, import. Creates the layout when missing.
    Write,
    /// Shared: verify, list, restore, export.
    Read,
}

/// An OCI image layout directory, locked for the lifetime of the value.
#[derive(Debug)]
pub struct Layout {
    root: PathBuf,
    _lock: File,
    access: Access,
    /// Blobs found corrupt (`backup --repair`): treated as absent until a
    /// verified copy replaces them by an atomic rename.
    suspect: Arc<Mutex<HashSet<Digest>>>,
    /// Blob files are written with O_DIRECT ([`Sink`]): only on a local
    /// block filesystem, see [`direct_io_pays`].
    direct_io: bool,
}

impl Drop for Layout {
    fn drop(&mut self) {
        // The holder's name is true only while it holds the lock: a writer
        // that is done clears it, so that a reader holding the lock later
        // is not taken for this run.
        if self.access == Access::Write {
            let _ = self._lock.set_len(0);
        }
    }
}

impl Layout {
    /// Opens (and for [`Access::Write`], creates) the layout at `root`,
    /// taking the lock without waiting. A writer also sweeps stale temp files.
    pub fn open(root: &Path, access: Access) -> Result<Self, LayoutError> {
        if access == Access::Write {
            fs::create_dir_all(root.join("blobs").join("sha256"))
                .map_err(io_err("create", root))?;
            fs::create_dir_all(root.join(INGEST_DIR)).map_err(io_err("create", root))?;
        } else if !root.join("oci-layout").is_file() {
            return Err(LayoutError::NotALayout {
                path: root.to_path_buf(),
                reason: "no oci-layout file".into(),
            });
        }
        let lock_path = root.join(LOCK_FILE);
        let lock = match access {
            // A reader on a read-only mount can still lock an existing file.
            Access::Read => OpenOptions::new()
                .read(true)
                .write(false)
                .open(&lock_path)
                .or_else(|_| {
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&lock_path)
                }),
            Access::Write => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock_path),
        };
        let mut lock = match lock {
            Ok(f) => f,
            // No lock file and no right to create one: a read-only archive.
            Err(_) if access == Access::Read => File::open(root).map_err(io_err("open", root))?,
            Err(e) => return Err(io_err("open", &lock_path)(e)),
        };
        let taken = match access {
            Access::Write => fs2::FileExt::try_lock_exclusive(&lock),
            Access::Read => fs2::FileExt::try_lock_shared(&lock),
        };
        if taken.is_err() {
            let mut holder = String::new();
            let _ = File::open(&lock_path).and_then(|mut f| f.read_to_string(&mut holder));
            return Err(LayoutError::Locked {
                path: root.to_path_buf(),
                holder: if holder.trim().is_empty() {
                    "a reader".into()
                } else {
                    holder.trim().to_string()
                },
            });
        }
        let layout = Layout {
            root: root.to_path_buf(),
            _lock: lock.try_clone().map_err(io_err("open", &lock_path))?,
            access,
            suspect: Arc::default(),
            direct_io: access == Access::Write && direct_io_pays(&root.join(INGEST_DIR)),
        };
        if access == Access::Write {
            let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let me = format!("pid {} on {}", std::process::id(), host.trim());
            lock.set_len(0).map_err(io_err("write", &lock_path))?;
            lock.write_all(me.as_bytes())
                .map_err(io_err("write", &lock_path))?;
            layout.sweep_ingest()?;
            let marker = root.join("oci-layout");
            if !marker.exists() {
                layout.write_file_atomic("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            }
        }
        Ok(layout)
    }

    /// The layout's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of a blob.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(digest.blob_path())
    }

    /// True when the blob is present. By the closure invariant, a present
    /// manifest means a complete image.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file() && !self.is_suspect(digest)
    }

    /// Marks blobs as corrupt: they count as absent, and the next verified
    /// write replaces them atomically (the corrupt file stays visible until
    /// then, so nothing the committed index references ever disappears).
    pub fn mark_suspect(&self, digests: impl IntoIterator<Item = Digest>) {
        self.suspect.lock().expect("suspect lock").extend(digests);
    }

    fn is_suspect(&self, digest: &Digest) -> bool {
        let set = self.suspect.lock().expect("suspect lock");
        !set.is_empty() && set.contains(digest)
    }

    /// The size of a present blob.
    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.blob_path(digest)).ok().map(|m| m.len())
    }

    /// Reads a small blob (a manifest, index or config) whole, checked
    /// against its digest: what is pushed, parsed or walked from it is
    /// what was archived.
    pub fn read_small_blob(&self, digest: &Digest) -> Result<Vec<u8>, LayoutError> {
        self.read_blob_checked(digest, MAX_MANIFEST_SIZE)
    }

    /// Reads a blob of at most `limit` bytes whole (the ImageStream list),
    /// checked against its digest.
    pub fn read_blob_checked(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, LayoutError> {
        let path = self.blob_path(digest);
        let size = fs::metadata(&path).map_err(io_err("stat", &path))?.len();
        if size > limit {
            return Err(LayoutError::TooLarge {
                digest: digest.clone(),
                size,
                limit,
            });
        }
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        undamaged(digest, Digest::of(&bytes), path)?;
        Ok(bytes)
    }

    /// Re-hashes a stored blob: `Damaged` when it no longer matches its
    /// digest (used to tell a damaged archive from a refusing registry).
    pub fn check_blob(&self, digest: &Digest) -> Result<(), LayoutError> {
        let path = self.blob_path(digest);
        let actual = Digest::of_file(&path).map_err(io_err("read", &path))?;
        undamaged(digest, actual, path)
    }

    /// Opens a blob for streaming.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, LayoutError> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(io_err("open", &path))
    }

    /// Starts writing a blob that must hash to `expected` (and have
    /// `expected_size` bytes, when known).
    pub fn blob_writer(
        &self,
        expected: &Digest,
        expected_size: Option<u64>,
    ) -> Result<BlobWriter, LayoutError> {
        debug_assert_eq!(self.access, Access::Write);
        let tmp = self.root.join(INGEST_DIR).join(format!(
            "{}.{}.{}",
            expected.hex(),
            std::process::id(),
            rand::random::<u32>()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        Ok(BlobWriter {
            file: Some(Sink::new(file, self.direct_io)),
            tmp,
            target: self.blob_path(expected),
            dir: self.root.join("blobs").join("sha256"),
            expected: expected.clone(),
            expected_size,
            hasher: Sha256::new(),
            written: 0,
            failed: false,
            suspect: self.suspect.clone(),
        })
    }

    /// Makes the renames of blobs finished with
    /// [`BlobWriter::finish_deferring_dir_sync`] durable.
    pub fn sync_blobs(&self) -> Result<(), LayoutError> {
        sync_dir(&self.root.join("blobs").join("sha256"))
    }

    /// Writes small verified blobs held in memory (manifests) as one batch:
    /// temp files, one `syncfs` for all of them, renames, one directory
    /// fsync. Blobs already present are skipped. Every blob of the batch is
    /// durable and visible when this returns; none is visible unverified.
    pub fn write_blobs_batch(&self, blobs: &[(&Digest, &[u8])]) -> Result<(), LayoutError> {
        let mut staged = Vec::new();
        let cleanup = |staged: &[(PathBuf, PathBuf, Digest)]| {
            for (tmp, _, _) in staged {
                let _ = fs::remove_file(tmp);
            }
        };
        for (digest, data) in blobs {
            if self.has_blob(digest) || staged.iter().any(|(_, _, d)| d == *digest) {
                continue;
            }
            let actual = Digest::of(data);
            if &actual != *digest {
                cleanup(&staged);
                return Err(LayoutError::Mismatch {
                    expected: (*digest).clone(),
                    reason: format!("content hashes to {actual}"),
                });
            }
            let tmp = self.root.join(INGEST_DIR).join(format!(
                "{}.{}.{}",
                digest.hex(),
                std::process::id(),
                rand::random::<u32>()
            ));
            if let Err(e) = fs::write(&tmp, data) {
                cleanup(&staged);
                let _ = fs::remove_file(&tmp);
                return Err(io_err("write", &tmp)(e));
            }
            staged.push((tmp, self.blob_path(digest), (*digest).clone()));
        }
        if staged.is_empty() {
            return Ok(());
        }
        let root = File::open(&self.root).map_err(io_err("open", &self.root))?;
        // SAFETY: syncfs only reads the descriptor, which `root` keeps open.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)) } != 0 {
            cleanup(&staged);
            return Err(io_err("syncfs", &self.root)(io::Error::last_os_error()));
        }
        for (tmp, target, _) in &staged {
            fs::rename(tmp, target).map_err(io_err("rename", target))?;
        }
        self.sync_blobs()?;
        let mut suspect = self.suspect.lock().expect("suspect lock");
        for (_, _, d) in &staged {
            suspect.remove(d);
        }
        Ok(())
    }

    /// Stores bytes held in memory as a verified blob.
    pub fn write_blob(&self, expected: &Digest, data: &[u8]) -> Result<(), LayoutError> {
        if self.has_blob(expected) {
            return Ok(());
        }
        let mut w = self.blob_writer(expected, Some(data.len() as u64))?;
        w.write(data)?;
        w.finish()
    }

    /// Stores a blob by copying from a reader, verifying as it streams.
    pub fn write_blob_from(
        &self,
        expected: &Digest,
        expected_size: Option<u64>,
        mut reader: impl Read,
    ) -> Result<u64, LayoutError> {
        let mut w = self.blob_writer(expected, expected_size)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(io_err("read", &w.tmp))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        let n = w.written;
        w.finish()?;
        Ok(n)
    }

    /// Removes a blob (garbage collection only).
    pub fn remove_blob(&self, digest: &Digest) -> Result<(), LayoutError> {
        let path = self.blob_path(digest);
        fs::remove_file(&path).map_err(io_err("remove", &path))
    }

    /// Every blob file name that is a valid digest, with size and mtime.
    pub fn list_blobs(&self) -> Result<Vec<(Digest, fs::Metadata)>, LayoutError> {
        let dir = self.root.join("blobs").join("sha256");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(d) = Digest::parse(&format!("sha256:{name}")) {
                let meta = entry.metadata().map_err(io_err("stat", &entry.path()))?;
                if meta.is_file() {
                    out.push((d, meta));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Reads the committed `index.json`; an absent one is an empty index.
    pub fn read_index(&self) -> Result<ArchiveIndex, LayoutError> {
        self.with_index(ArchiveIndex::from_file)
    }

    /// Reads the committed `index.json`, keeping only the entries `keep`
    /// gives a position ([`ArchiveIndex::from_file_filtered`]).
    pub fn read_index_filtered(
        &self,
        keep: &mut crate::index::OnEntry<'_>,
    ) -> Result<ArchiveIndex, LayoutError> {
        self.with_index(|file| ArchiveIndex::from_file_filtered(file, keep))
    }

    /// Reads what a plan needs of the committed `index.json` (digests,
    /// media types and sizes of the archived images), in little memory.
    pub fn read_known(&self) -> Result<crate::index::Known, LayoutError> {
        self.with_index(crate::index::Known::from_file)
    }

    fn with_index<T: Default>(
        &self,
        parse: impl FnOnce(&JsonFile) -> Result<T, String>,
    ) -> Result<T, LayoutError> {
        let path = self.root.join("index.json");
        let file = match JsonFile::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(T::default()),
            Err(e) => return Err(io_err("read", &path)(e)),
            Ok(f) => f,
        };
        let len = file.bytes().len() as u64;
        if len > MAX_INDEX_SIZE {
            return Err(self.corrupt(&path, format!("{len} bytes is too large")));
        }
        parse(&file).map_err(|e| self.corrupt(&path, e))
    }

    fn corrupt(&self, path: &Path, reason: String) -> LayoutError {
        LayoutError::CorruptIndex {
            path: path.to_path_buf(),
            root: self.root.display().to_string(),
            reason,
        }
    }

    /// Commits `index` as the new `index.json`: the single atomic commit point.
    ///
    /// An index identical to the committed one is not written again: an
    /// unchanged run leaves `index.json` untouched (same inode and mtime,
    /// so file-level backup tools such as restic skip it).
    pub fn commit(&self, index: &ArchiveIndex) -> Result<(), LayoutError> {
        debug_assert_eq!(self.access, Access::Write);
        // Compared as it is serialized: neither the new index nor the
        // committed one is ever whole in memory.
        if let Ok(old) = JsonFile::open(&self.root.join("index.json")) {
            let mut same = SameAs {
                old: &old,
                at: 0,
                same: true,
            };
            let mut w = io::BufWriter::with_capacity(1 << 16, &mut same);
            let written = index.write_json(&mut w).and_then(|_| w.flush()).is_ok();
            drop(w);
            if written && same.same && same.at == old.bytes().len() {
                return Ok(());
            }
        }
        self.write_file_atomic_with("index.json", |w| index.write_json(w))
    }

    /// Writes a top-level file atomically (temp, fsync, rename, fsync dir).
    pub(crate) fn write_file_atomic(&self, name: &str, data: &[u8]) -> Result<(), LayoutError> {
        self.write_file_atomic_with(name, |w| w.write_all(data))
    }

    /// Like [`Layout::write_file_atomic`], with the content written by
    /// `write`.
    fn write_file_atomic_with(
        &self,
        name: &str,
        write: impl FnOnce(&mut io::BufWriter<&File>) -> io::Result<()>,
    ) -> Result<(), LayoutError> {
        let target = self.root.join(name);
        let tmp = self
            .root
            .join(INGEST_DIR)
            .join(format!("{name}.{}", std::process::id()));
        let f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        let mut w = io::BufWriter::with_capacity(1 << 20, &f);
        let res = write(&mut w)
            .and_then(|_| w.flush())
            .and_then(|_| f.sync_all())
            .map_err(io_err("write", &tmp))
            .and_then(|_| fs::rename(&tmp, &target).map_err(io_err("rename", &target)))
            .and_then(|_| sync_dir(&self.root));
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Removes temp files left by a killed run.
    fn sweep_ingest(&self) -> Result<(), LayoutError> {
        let dir = self.root.join(INGEST_DIR);
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let path = entry.path();
            fs::remove_file(&path).map_err(io_err("remove stale temp file", &path))?;
        }
        Ok(())
    }
}

/// A writer that only compares what is written with a file's bytes.
struct SameAs<'a> {
    old: &'a JsonFile,
    at: usize,
    same: bool,
}

impl Write for SameAs<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let end = self.at + buf.len();
        self.same = self.same && self.old.bytes().get(self.at..end) == Some(buf);
        self.at = end;
        self.old.release_before(self.at.min(self.old.bytes().len()));
        if self.same {
            Ok(buf.len())
        } else {
            // Different: no need to look further.
            Err(io::Error::other("differs"))
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Keeps a blob written through the page cache (see [`Sink`]) from filling
/// it: every [`WRITEBACK_WINDOW`] bytes handed to the kernel, writeback of
/// them is started, and the window before it, written back by then, is
/// dropped from the cache. A backup streams far more than it reads again:
/// this way each transfer holds at most two windows of cached pages (not
/// the whole blob, charged to the Job's memory cgroup), the same freed
/// pages are reused instead of fresh ones, and the final fsync has little
/// left to flush. Only a hint to the kernel: durability still comes from
/// that fsync, and failures are ignored.
#[derive(Default)]
struct Writeback {
    /// Bytes whose writeback has been started.
    started: u64,
    /// Bytes dropped from the page cache.
    dropped: u64,
}

const WRITEBACK_WINDOW: u64 = 8 << 20;

impl Writeback {
    /// `handed`: bytes of the file written to the kernel so far.
    fn advance(&mut self, file: &File, handed: u64) {
        if handed - self.started < WRITEBACK_WINDOW {
            return;
        }
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: plain system calls on an open descriptor, with ranges
        // inside the file.
        unsafe {
            libc::sync_file_range(
                fd,
                self.started as i64,
                (handed - self.started) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
            if self.started > self.dropped {
                let (off, len) = (self.dropped as i64, (self.started - self.dropped) as i64);
                libc::sync_file_range(
                    fd,
                    off,
                    len,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
                libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_DONTNEED);
            }
        }
        self.dropped = self.started;
        self.started = handed;
    }

    /// After the fsync: the rest of the file leaves the cache too.
    fn finish(&self, file: &File) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on an open descriptor.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                self.dropped as i64,
                0,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
}

/// Size of a blob writer's buffer: one write to the file per this many bytes.
const SINK_BUFFER: usize = 1 << 20;
/// Alignment O_DIRECT asks of memory, file offsets and lengths (the page
/// size; no block device wants more).
const DIRECT_ALIGN: usize = 4096;

/// The temp file of a blob being written, behind a buffer of
/// [`SINK_BUFFER`] bytes. On a local block filesystem ([`direct_io_pays`])
/// the file is written with O_DIRECT: the bytes go from the buffer to the
/// device without the page cache (a backup streams far more than it reads
/// again): no copy into cache pages, no dirty-page accounting, no writeback
/// and dropping afterwards (8% less CPU for a whole backup of the medium
/// benchmark). Buffers go out whole and aligned; the last partial block of
/// a blob, and everything once O_DIRECT is refused (when setting it or at
/// a write), goes through the page cache, kept small by [`Writeback`].
/// Durability comes from the fsync either way.
struct Sink {
    file: File,
    /// Padding up to `start`, then the buffered bytes; capacity
    /// `start + SINK_BUFFER`, so it never moves: `mem[start..]` stays
    /// aligned (and no byte of it is zeroed for nothing).
    mem: Vec<u8>,
    start: usize,
    direct: bool,
    /// Bytes written to the file.
    handed: u64,
    writeback: Writeback,
}

impl Sink {
    fn new(file: File, try_direct: bool) -> Self {
        let mut mem: Vec<u8> = Vec::with_capacity(SINK_BUFFER + DIRECT_ALIGN);
        let start = mem.as_ptr().align_offset(DIRECT_ALIGN);
        mem.resize(start, 0);
        let direct = try_direct && set_direct(&file, true).is_ok();
        Sink {
            file,
            mem,
            start,
            direct,
            handed: 0,
            writeback: Writeback::default(),
        }
    }

    fn buffered(&self) -> usize {
        self.mem.len() - self.start
    }

    /// True when `len` more bytes fit without a write to the file.
    fn buffers(&self, len: usize) -> bool {
        self.buffered() + len < SINK_BUFFER
    }

    fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(SINK_BUFFER - self.buffered());
            self.mem.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buffered() == SINK_BUFFER {
                self.drain()?;
            }
        }
        Ok(())
    }

    /// Writes the buffer to the file: whole blocks with O_DIRECT (when on),
    /// a last partial block (the end of the blob) through the page cache.
    fn drain(&mut self) -> io::Result<()> {
        let len = self.buffered();
        let blocks = if self.direct {
            len / DIRECT_ALIGN * DIRECT_ALIGN
        } else {
            0
        };
        if blocks > 0 {
            let buf = &self.mem[self.start..self.start + blocks];
            match self.file.write_all_at(buf, self.handed) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The filesystem took the flag but not the write: this
                    // and the rest go through the page cache.
                    self.buffer_from_now_on()?;
                    return self.drain();
                }
                r => r?,
            }
            self.handed += blocks as u64;
        }
        if blocks < len {
            if self.direct {
                self.buffer_from_now_on()?;
            }
            self.file
                .write_all_at(&self.mem[self.start + blocks..], self.handed)?;
            self.handed += (len - blocks) as u64;
            self.writeback.advance(&self.file, self.handed);
        }
        self.mem.truncate(self.start);
        Ok(())
    }

    fn buffer_from_now_on(&mut self) -> io::Result<()> {
        set_direct(&self.file, false)?;
        self.direct = false;
        // What was written directly is on the device, not in the cache.
        self.writeback.started = self.handed;
        self.writeback.dropped = self.handed;
        Ok(())
    }

    /// Writes what is buffered; the file is then complete (not yet synced).
    fn finish(mut self) -> io::Result<(File, Writeback)> {
        if self.buffered() > 0 {
            self.drain()?;
        }
        Ok((self.file, self.writeback))
    }
}

/// True when `dir` is on ext2/3/4, XFS or btrfs: filesystems on a block
/// device, where an O_DIRECT write goes to the device as it is. On network
/// and FUSE filesystems (NFS, CephFS, SMB, ...) an O_DIRECT write is a
/// synchronous round trip, and often a commit on the server, per call:
/// far slower than their own write-back caching, so blobs go through the
/// page cache there.
fn direct_io_pays(dir: &Path) -> bool {
    const EXT: u32 = 0xEF53;
    const XFS: u32 = 0x5846_5342;
    const BTRFS: u32 = 0x9123_683E;
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: statfs writes the struct it is given, for a valid C string.
    if unsafe { libc::statfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: initialised by the successful call above.
    let st = unsafe { st.assume_init() };
    // The magic numbers are 32-bit; f_type is i64 on x86_64 and arm64,
    // u32 on s390x, i32 on 32-bit targets (where btrfs' is negative).
    #[allow(clippy::unnecessary_cast)]
    let kind = st.f_type as u32;
    matches!(kind, EXT | XFS | BTRFS)
}

/// [`LayoutError::Damaged`] unless the blob file `path` of `digest` hashed
/// to `actual` is what its name says.
fn undamaged(digest: &Digest, actual: Digest, path: PathBuf) -> Result<(), LayoutError> {
    if &actual == digest {
        return Ok(());
    }
    Err(LayoutError::Damaged {
        digest: digest.clone(),
        path,
        reason: format!("content hashes to {actual}"),
    })
}

/// Sets or clears O_DIRECT on an open file.
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an open descriptor, with flags taken from it.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_DIRECT
        } else {
            flags & !libc::O_DIRECT
        };
        if libc::fcntl(fd, libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), LayoutError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// A blob being written: becomes visible only through [`BlobWriter::finish`]
/// after its content was verified; dropped unfinished, it leaves nothing.
pub struct BlobWriter {
    file: Option<Sink>,
    tmp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    expected: Digest,
    expected_size: Option<u64>,
    hasher: Sha256,
    written: u64,
    /// A write to the file failed.
    failed: bool,
    suspect: Arc<Mutex<HashSet<Digest>>>,
}

impl BlobWriter {
    /// Appends bytes, hashing them.
    pub fn write(&mut self, data: &[u8]) -> Result<(), LayoutError> {
        self.written += data.len() as u64;
        if let Some(size) = self.expected_size {
            if self.written > size {
                return Err(LayoutError::Mismatch {
                    expected: self.expected.clone(),
                    reason: format!("more than the expected {size} bytes"),
                });
            }
        }
        if self.failed {
            return Err(self.earlier_failure());
        }
        self.hasher.update(data);
        let file = self.file.as_mut().expect("writer used after finish");
        file.write(data).map_err(|e| {
            // Hashed but maybe not written: this writer can finish no more.
            self.failed = true;
            io_err("write", &self.tmp)(e)
        })
    }

    fn earlier_failure(&self) -> LayoutError {
        io_err("write", &self.tmp)(io::Error::other(
            "an earlier write to it failed; the blob is incomplete",
        ))
    }

    /// True when `len` more bytes go into the write buffer without a
    /// write to the file: [`BlobWriter::write`] then only hashes and copies
    /// (no system call), cheap enough for an async task.
    pub fn buffers(&self, len: usize) -> bool {
        self.file.as_ref().is_some_and(|f| f.buffers(len))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies size and digest, then makes the blob visible durably.
    pub fn finish(self) -> Result<(), LayoutError> {
        let dir = self.dir.clone();
        self.finish_deferring_dir_sync()?;
        sync_dir(&dir)
    }

    /// Like [`BlobWriter::finish`], but leaves the directory fsync to a
    /// later [`Layout::sync_blobs`], which must run before anything that
    /// references this blob is written (a batch of downloads shares one).
    pub fn finish_deferring_dir_sync(mut self) -> Result<(), LayoutError> {
        if self.failed {
            return Err(self.earlier_failure());
        }
        if let Some(size) = self.expected_size {
            if self.written != size {
                return Err(LayoutError::Mismatch {
                    expected: self.expected.clone(),
                    reason: format!("{} bytes instead of {size}", self.written),
                });
            }
        }
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual != self.expected {
            return Err(LayoutError::Mismatch {
                expected: self.expected.clone(),
                reason: format!("content hashes to {actual}"),
            });
        }
        let sink = self.file.take().expect("finish called once");
        let (file, writeback) = sink.finish().map_err(io_err("write", &self.tmp))?;
        file.sync_all().map_err(io_err("fsync", &self.tmp))?;
        writeback.finish(&file);
        drop(file);
        fs::rename(&self.tmp, &self.target).map_err(io_err("rename", &self.target))?;
        self.suspect
            .lock()
            .expect("suspect lock")
            .remove(&self.expected);
        Ok(())
    }
}

impl BlobWriter {
    /// The error of a failed [`Write`] to this writer: the layout error it
    /// carries, or the I/O error on its temp file.
    pub fn error(&self, e: io::Error) -> LayoutError {
        match e.downcast::<LayoutError>() {
            Ok(le) => le,
            Err(e) => io_err("write", &self.tmp)(e),
        }
    }
}

/// Writes through [`BlobWriter::write`] (hashing and checking the size);
/// a layout error comes back inside the I/O error ([`BlobWriter::error`]).
impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        BlobWriter::write(self, buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.tmp.exists() {
            self.file = None;
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_visible_only_when_verified() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let d = Digest::of(b"abc");
        let wrong = Digest::of(b"abd");
        assert!(layout.write_blob(&wrong, b"abc").is_err());
        assert!(!layout.has_blob(&wrong));
        layout.write_blob(&d, b"abc").unwrap();
        assert_eq!(fs::read(layout.blob_path(&d)).unwrap(), b"abc");
        let mut w = layout.blob_writer(&Digest::of(b"xyz"), Some(3)).unwrap();
        w.write(b"xy").unwrap();
        drop(w);
        assert_eq!(
            fs::read_dir(dir.path().join(INGEST_DIR)).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_blob_larger_than_the_writeback_windows_is_stored_whole() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        // 2.5 windows plus an odd tail, in uneven chunks.
        let data: Vec<u8> = (0..(WRITEBACK_WINDOW * 5 / 2 + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        let d = Digest::of(&data);
        let mut w = layout.blob_writer(&d, Some(data.len() as u64)).unwrap();
        // As where the filesystem refuses O_DIRECT.
        w.file.as_mut().unwrap().buffer_from_now_on().unwrap();
        for chunk in data.chunks(300_007) {
            w.write(chunk).unwrap();
        }
        // Two windows were written back, and the first dropped from the cache.
        let wb = &w.file.as_ref().unwrap().writeback;
        assert!(wb.dropped >= WRITEBACK_WINDOW);
        assert!(wb.started >= WRITEBACK_WINDOW * 2);
        w.finish().unwrap();
        assert!(fs::read(layout.blob_path(&d)).unwrap() == data);
    }

    #[test]
    fn blobs_of_every_size_around_the_block_and_buffer_edges_are_stored_whole() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let b = DIRECT_ALIGN;
        let m = SINK_BUFFER;
        let mut direct_seen = false;
        for (i, size) in [
            0,
            1,
            b - 1,
            b,
            b + 1,
            m - 1,
            m,
            m + 1,
            2 * m + b,
            2 * m + 3 * b + 7,
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..size).map(|x| ((x * 7 + i) % 253) as u8).collect();
            let d = Digest::of(&data);
            let mut w = layout.blob_writer(&d, Some(size as u64)).unwrap();
            direct_seen |= w.file.as_ref().unwrap().direct;
            for (n, chunk) in data.chunks(65_537 + i).enumerate() {
                // Half way through one of them, as if the filesystem
                // refused a direct write: the rest goes through the cache.
                if i == 9 && n == 20 {
                    w.file.as_mut().unwrap().buffer_from_now_on().unwrap();
                }
                w.write(chunk).unwrap();
            }
            w.finish().unwrap();
            assert!(
                fs::read(layout.blob_path(&d)).unwrap() == data,
                "blob of {size} bytes"
            );
        }
        // On ext4, XFS or btrfs, O_DIRECT was used.
        assert_eq!(direct_seen, direct_io_pays(dir.path()));
    }

    #[test]
    fn a_writer_whose_write_failed_cannot_finish() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        let data = vec![7u8; SINK_BUFFER + 10];
        let d = Digest::of(&data);
        let mut w = layout.blob_writer(&d, Some(data.len() as u64)).unwrap();
        // A descriptor that refuses writes stands in for a failing disk.
        let ro = File::open(&w.tmp).unwrap();
        w.file = Some(Sink::new(ro, false));
        assert!(w.write(&data[..SINK_BUFFER]).is_err());
        // The rest would make size and digest match: still refused.
        assert!(w.write(&data[SINK_BUFFER..]).is_err());
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("write"), "{e}");
        assert!(!layout.has_blob(&d));
        assert_eq!(
            fs::read_dir(dir.path().join(INGEST_DIR)).unwrap().count(),
            0
        );
    }

    #[test]
    fn direct_io_only_on_local_block_filesystems() {
        // procfs and tmpfs: no block device behind them.
        assert!(!direct_io_pays(Path::new("/proc")));
        if Path::new("/dev/shm").is_dir() {
            assert!(!direct_io_pays(Path::new("/dev/shm")));
        }
        assert!(!direct_io_pays(Path::new("/does/not/exist")));
    }

    #[test]
    fn second_writer_is_refused_with_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Layout::open(dir.path(), Access::Write).unwrap();
        let err = Layout::open(dir.path(), Access::Write).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(Layout::open(dir.path(), Access::Read).is_err());
    }

    #[test]
    fn a_finished_writer_is_not_named_as_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        drop(Layout::open(dir.path(), Access::Write).unwrap());
        let _reader = Layout::open(dir.path(), Access::Read).unwrap();
        let err = Layout::open(dir.path(), Access::Write).unwrap_err();
        assert!(err.to_string().contains("(a reader)"), "{err}");
    }

    #[test]
    fn readers_share() {
        let dir = tempfile::tempdir().unwrap();
        drop(Layout::open(dir.path(), Access::Write).unwrap());
        let _a = Layout::open(dir.path(), Access::Read).unwrap();
        let _b = Layout::open(dir.path(), Access::Read).unwrap();
        assert!(Layout::open(dir.path(), Access::Write).is_err());
    }

    #[test]
    fn corrupt_index_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path(), Access::Write).unwrap();
        fs::write(dir.path().join("index.json"), b"{not json").unwrap();
        let err = layout.read_index().unwrap_err();
        assert!(err.to_string().contains("verify"), "{err}");
    }
}
