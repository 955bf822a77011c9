//! `restore --from FILE|-`: push straight from an export stream, without
//! unpacking it to disk.
//!
//! The export writes its blob list ([`crate::export::BLOB_LIST`]) before
//! the blobs, and the blobs in closure order. So:
//! 1. while the stream goes by, each layer and config is uploaded to the
//!    first target repository that needs it (blobs of up to
//!    [`SMALL_BLOB`] bytes from memory, with retries and several at once;
//!    larger ones streamed from the tar entry straight into the HTTP body,
//!    one attempt, never held whole); manifests are kept in memory;
//! 2. only when the whole stream was read and verified (zstd checksums, tar
//!    end marker, every blob's digest, every announced blob arrived) are the
//!    manifests pushed, exactly as a directory restore does: per tag, the
//!    history oldest first, then the current image; children before their
//!    index; other repositories mount the blobs. A truncated or corrupt
//!    stream therefore tags nothing.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::closure::Node;
use crate::digest::{Digest, Sha256};
use crate::export::{BlobInfo, BLOB_LIST};
use crate::import::{self, ImportError, Member};
use crate::index::ArchiveIndex;
use crate::layout::MAX_MANIFEST_SIZE;
use crate::manifest;
use crate::registry::RegistryClient;
use crate::report::Report;
use crate::restore::{self, Pusher, RestoreOptions, Source};

/// Blobs up to this size are read into memory and uploaded with retries;
/// larger ones are streamed into the request body.
pub const SMALL_BLOB: u64 = 8 * 1024 * 1024;
/// Most manifest bytes a streaming restore keeps in memory.
const MAX_HELD_MANIFESTS: u64 = 512 << 20;

/// Chunk size of streamed blobs.
const CHUNK: usize = 1 << 20;

/// Why a streaming restore stopped before tagging anything.
#[derive(Debug, thiserror::Error)]
pub enum RestoreStreamError {
    /// Reading the stream failed; nothing was tagged.
    #[error("{0}; no tag was pushed")]
    Stream(#[from] ImportError),
    /// The stream is not an export of this tool.
    #[error("{0}")]
    NotAnExport(String),
}

/// Manifests kept from the stream, the sizes of its blobs, and why a blob is
/// unavailable in the target registry (its upload failed, or it was not in
/// the stream).
#[derive(Debug, Default)]
pub struct StreamedImages {
    manifests: HashMap<Digest, (Bytes, String)>,
    sizes: HashMap<Digest, u64>,
    failed: HashMap<Digest, String>,
}

impl StreamedImages {
    /// The closure of `root`, dependencies first, root last.
    pub(crate) fn walk(&self, root: &Digest) -> Result<Vec<Node>, String> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        self.visit(root, root, 0, &mut seen, &mut out)?;
        Ok(out)
    }

    fn visit(
        &self,
        image: &Digest,
        digest: &Digest,
        depth: usize,
        seen: &mut HashSet<Digest>,
        out: &mut Vec<Node>,
    ) -> Result<(), String> {
        if !seen.insert(digest.clone()) {
            return Ok(());
        }
        if depth > 8 {
            return Err(format!("image {image}: index nesting deeper than 8 levels"));
        }
        let (bytes, media_type) = self
            .manifests
            .get(digest)
            .ok_or_else(|| format!("image {image}: manifest {digest} was not in the stream"))?;
        let parsed = manifest::parse(digest, bytes, Some(media_type.as_str()))
            .map_err(|e| format!("image {image}: {e}"))?;
        for child in &parsed.children {
            self.visit(image, &child.digest, depth + 1, seen, out)?;
        }
        for blob in &parsed.blobs {
            if seen.insert(blob.digest.clone()) {
                out.push(Node {
                    digest: blob.digest.clone(),
                    size: blob.size,
                    manifest: None,
                });
            }
        }
        out.push(Node {
            digest: digest.clone(),
            size: Some(bytes.len() as u64),
            manifest: Some(media_type.clone()),
        });
        Ok(())
    }

    /// A manifest's bytes.
    pub(crate) fn manifest(&self, digest: &Digest) -> Option<Bytes> {
        self.manifests.get(digest).map(|(b, _)| b.clone())
    }

    /// A blob's size (0 when unknown).
    pub(crate) fn size(&self, digest: &Digest) -> u64 {
        self.sizes.get(digest).copied().unwrap_or(0)
    }

    /// Why a blob cannot be uploaded now.
    pub(crate) fn unavailable(&self, digest: &Digest) -> String {
        match self.failed.get(digest) {
            Some(reason) => format!("its upload from the stream failed: {reason}"),
            None if self.sizes.contains_key(digest) => {
                "it went by in the stream before a repository needed it".into()
            }
            None => "it is not in the stream".into(),
        }
    }
}

/// A blob put into (or found in) a repository during the stream: repository,
/// digest, bytes uploaded (`None`: it was already there).
type Located = (String, Digest, Option<u64>);

/// What the stream reader hands to the uploader.
enum Msg {
    Index(ArchiveIndex),
    Blobs(Vec<BlobInfo>),
    Manifest(Digest, Bytes, String),
    Small(Digest, Bytes),
    Large(Digest, u64, mpsc::Receiver<std::io::Result<Bytes>>),
}

/// Restores the images of an export stream into the registry; fills
/// `report`. Nothing is tagged unless the whole stream was read and verified.
pub async fn restore_from<R: Read + Send + 'static>(
    reader: R,
    client: &RegistryClient,
    opts: &RestoreOptions,
    report: &mut Report,
) -> Result<(), RestoreStreamError> {
    let (tx, mut rx) = mpsc::channel::<Msg>(4);
    let reading = tokio::task::spawn_blocking(move || read_into(reader, tx));

    let mut index = None;
    let mut targets: HashMap<Digest, Vec<String>> = HashMap::new();
    let mut images = StreamedImages::default();
    let located: Arc<Mutex<Vec<Located>>> = Arc::default();
    let failed: Arc<Mutex<HashMap<Digest, String>>> = Arc::default();
    let uploads = Arc::new(tokio::sync::Semaphore::new(opts.jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Index(i) => index = Some(i),
            Msg::Blobs(list) => {
                for b in list {
                    images.sizes.insert(b.digest.clone(), b.size);
                    let repos = target_repos(&b.repositories, opts);
                    if !repos.is_empty() {
                        targets.insert(b.digest, repos);
                    }
                }
            }
            Msg::Manifest(d, bytes, media_type) => {
                images.manifests.insert(d, (bytes, media_type));
            }
            Msg::Small(d, bytes) => {
                let Some(repo) = targets.get(&d).and_then(|r| r.first()).cloned() else {
                    continue;
                };
                if opts.dry_run {
                    continue;
                }
                let permit = uploads
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open");
                let (client, located, failed) = (client.clone(), located.clone(), failed.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    let res = match client.blob_exists(&repo, &d).await {
                        Ok(true) => Ok(None),
                        _ => client.push_blob_bytes(&repo, &d, bytes).await.map(Some),
                    };
                    match res {
                        Ok(n) => located.lock().expect("lock").push((repo, d, n)),
                        Err(e) => {
                            tracing::warn!(digest = %d, repo, error = %e, "upload failed");
                            failed.lock().expect("lock").insert(d, format!("{e:#}"));
                        }
                    }
                });
            }
            Msg::Large(d, size, body) => {
                let Some(repo) = targets.get(&d).and_then(|r| r.first()).cloned() else {
                    continue; // dropping `body` lets the reader verify and skip it
                };
                if opts.dry_run {
                    continue;
                }
                let res = match client.blob_exists(&repo, &d).await {
                    Ok(true) => Ok(None),
                    _ => {
                        let chunks = futures::stream::unfold(body, |mut rx| async move {
                            rx.recv().await.map(|item| (item, rx))
                        });
                        client
                            .push_blob_chunks(&repo, &d, size, chunks)
                            .await
                            .map(Some)
                    }
                };
                match res {
                    Ok(n) => located.lock().expect("lock").push((repo, d, n)),
                    Err(e) => {
                        tracing::warn!(digest = %d, repo, error = %e, "streamed upload failed");
                        failed.lock().expect("lock").insert(d, format!("{e:#}"));
                    }
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    match reading.await {
        Ok(res) => res?,
        Err(e) => {
            return Err(RestoreStreamError::NotAnExport(format!(
                "the stream reader stopped: {e}"
            )))
        }
    }
    let index =
        index.ok_or_else(|| ImportError::Incomplete("no index.json in the stream".into()))?;
    images.failed = std::mem::take(&mut *failed.lock().expect("lock"));

    let (units, problems) = restore::units(&index.entries, opts);
    report.problems.extend(problems);
    tracing::info!(
        tags = units.len(),
        dry_run = opts.dry_run,
        "stream read and verified; pushing manifests"
    );
    let pusher = Pusher::new(client, Source::Stream(Arc::new(images)), opts.dry_run);
    for (repo, digest, bytes) in located.lock().expect("lock").drain(..) {
        pusher.record_located(&repo, &digest, bytes);
    }
    restore::run_units(Arc::new(pusher), units, opts, report).await;
    Ok(())
}

/// The target repositories of a blob: archived `ns/name` filtered by the
/// options and mapped to their target namespace, first one first.
fn target_repos(archived: &[String], opts: &RestoreOptions) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in archived {
        let Some((ns, name)) = r.split_once('/') else {
            continue;
        };
        // Names from the stream go into registry URLs: only valid ones.
        if !crate::index::is_valid_namespace(ns) || !crate::index::is_valid_stream_name(name) {
            tracing::warn!(repository = %r, "ignoring an invalid repository name in the blob list");
            continue;
        }
        if !opts.namespaces.is_empty() && !opts.namespaces.iter().any(|n| n == ns) {
            continue;
        }
        if !opts.imagestreams.is_empty() && !opts.imagestreams.contains(r) {
            continue;
        }
        let ns = opts
            .map_namespaces
            .get(ns)
            .map(String::as_str)
            .unwrap_or(ns);
        let repo = format!("{ns}/{name}");
        if !out.contains(&repo) {
            out.push(repo);
        }
    }
    out
}

/// The blocking half: reads and verifies the stream, sending what the
/// uploader needs. Returns the first failure of the stream.
fn read_into<R: Read>(reader: R, tx: mpsc::Sender<Msg>) -> Result<(), ImportError> {
    let mut kinds: Option<HashMap<Digest, Option<String>>> = None;
    let mut received: HashSet<Digest> = HashSet::new();
    let mut announced: Vec<Digest> = Vec::new();
    let mut manifest_bytes: u64 = 0;
    let mut has_index = false;
    import::read_stream(reader, |member, r, size| {
        match member {
            Member::OciLayout => {
                import::read_small(r, size, 4096, "oci-layout")?;
            }
            Member::Index => {
                import::only_once(has_index, "index.json")?;
                let data = import::read_small(r, size, import::MAX_METADATA_SIZE, "index.json")?;
                let _ = tx.blocking_send(Msg::Index(import::parse_index(&data)?));
                has_index = true;
            }
            Member::BlobList => {
                import::only_once(kinds.is_some(), BLOB_LIST)?;
                let data = import::read_small(r, size, import::MAX_METADATA_SIZE, BLOB_LIST)?;
                let list = import::parse_blob_list(&data)?;
                kinds = Some(
                    list.blobs
                        .iter()
                        .map(|b| (b.digest.clone(), b.media_type.clone()))
                        .collect(),
                );
                announced = list.blobs.iter().map(|b| b.digest.clone()).collect();
                let _ = tx.blocking_send(Msg::Blobs(list.blobs));
            }
            Member::Blob(digest) => {
                let Some(kinds) = &kinds else {
                    return Err(ImportError::Metadata {
                        file: BLOB_LIST.into(),
                        reason: format!(
                            "blob {digest} came before the blob list: restore --from needs a stream written by `export` (use `import`, then `restore --archive`)"
                        ),
                    });
                };
                received.insert(digest.clone());
                match kinds.get(&digest) {
                    Some(Some(media_type)) => {
                        let data = import::read_small(
                            r,
                            size,
                            MAX_MANIFEST_SIZE,
                            &format!("manifest {digest}"),
                        )?;
                        import::verify_bytes(&digest, size, &data)?;
                        // Kept in memory to the end: only real manifests,
                        // and a bounded amount of them.
                        crate::manifest::parse(&digest, &data, Some(media_type)).map_err(|e| {
                            ImportError::Metadata {
                                file: BLOB_LIST.into(),
                                reason: format!("blob {digest} is listed as a manifest: {e}"),
                            }
                        })?;
                        manifest_bytes += data.len() as u64;
                        if manifest_bytes > MAX_HELD_MANIFESTS {
                            return Err(ImportError::Metadata {
                                file: BLOB_LIST.into(),
                                reason: format!(
                                    "more than {} MiB of manifests (at {digest})",
                                    MAX_HELD_MANIFESTS >> 20
                                ),
                            });
                        }
                        let _ = tx.blocking_send(Msg::Manifest(
                            digest,
                            Bytes::from(data),
                            media_type.clone(),
                        ));
                    }
                    Some(None) if size <= SMALL_BLOB => {
                        let data =
                            import::read_small(r, size, SMALL_BLOB, &format!("blob {digest}"))?;
                        import::verify_bytes(&digest, size, &data)?;
                        let _ = tx.blocking_send(Msg::Small(digest, Bytes::from(data)));
                    }
                    Some(None) => stream_blob(r, &digest, size, &tx)?,
                    // Not announced: not needed by any image; still verified.
                    None => import::drain_verify(r, &digest, size)?,
                }
            }
        }
        Ok(())
    })?;
    if !has_index {
        return Err(ImportError::Incomplete(
            "no index.json in the stream".into(),
        ));
    }
    if let Some(d) = announced.iter().find(|d| !received.contains(d)) {
        return Err(ImportError::Incomplete(format!(
            "blob {d} listed in {BLOB_LIST} never arrived"
        )));
    }
    Ok(())
}

/// Sends a large blob in chunks, hashing it; a digest mismatch is sent as
/// the last chunk's error so the upload fails. If the uploader does not
/// want the blob (dropped the receiver), it is still read and verified.
fn stream_blob(
    r: &mut dyn Read,
    digest: &Digest,
    size: u64,
    tx: &mpsc::Sender<Msg>,
) -> Result<(), ImportError> {
    let (ctx, crx) = mpsc::channel::<std::io::Result<Bytes>>(8);
    let mut wanted = tx
        .blocking_send(Msg::Large(digest.clone(), size, crx))
        .is_ok();
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = match r.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                let message = e.to_string();
                if wanted {
                    let _ = ctx.blocking_send(Err(e));
                }
                return Err(ImportError::Stream {
                    at: format!("blob {digest}"),
                    message,
                });
            }
        };
        if n == 0 {
            break;
        }
        got += n as u64;
        hasher.update(&buf[..n]);
        buf.truncate(n);
        if wanted && ctx.blocking_send(Ok(Bytes::from(buf))).is_err() {
            wanted = false;
        }
    }
    let res = import::verify_hash(digest, size, got, hasher);
    if let (Err(e), true) = (&res, wanted) {
        let _ = ctx.blocking_send(Err(std::io::Error::other(e.to_string())));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_filtered_and_mapped() {
        let archived = vec!["a/x".to_string(), "b/y".to_string(), "a/z".to_string()];
        let mut opts = RestoreOptions::default();
        assert_eq!(target_repos(&archived, &opts), archived);
        opts.namespaces = vec!["a".into()];
        opts.map_namespaces.insert("a".into(), "c".into());
        assert_eq!(target_repos(&archived, &opts), ["c/x", "c/z"]);
        opts.imagestreams = vec!["a/z".into()];
        assert_eq!(target_repos(&archived, &opts), ["c/z"]);
    }

    #[test]
    fn memory_walk_is_dependencies_first() {
        let layer = Digest::of(b"layer");
        let config = Digest::of(b"config");
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":6}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":5}}]}}"#,
            manifest::OCI_MANIFEST
        );
        let md = Digest::of(m.as_bytes());
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{md}","size":{}}}]}}"#,
            manifest::OCI_INDEX,
            manifest::OCI_MANIFEST,
            m.len()
        );
        let id = Digest::of(idx.as_bytes());
        let mut images = StreamedImages::default();
        images
            .manifests
            .insert(md.clone(), (Bytes::from(m), manifest::OCI_MANIFEST.into()));
        images
            .manifests
            .insert(id.clone(), (Bytes::from(idx), manifest::OCI_INDEX.into()));
        let order: Vec<Digest> = images
            .walk(&id)
            .unwrap()
            .into_iter()
            .map(|n| n.digest)
            .collect();
        assert_eq!(order.last(), Some(&id));
        let pos = |d: &Digest| order.iter().position(|x| x == d).unwrap();
        assert!(pos(&config) < pos(&md) && pos(&layer) < pos(&md) && pos(&md) < pos(&id));
        assert!(images
            .walk(&Digest::of(b"nope"))
            .unwrap_err()
            .contains("not in the stream"));
        assert!(images.unavailable(&layer).contains("not in the stream"));
    }
}
