//! Restore: push archived images back so that the same ImageStreams, tags,
//! history and digests exist again.
//!
//! For each tag, the archived history is pushed to the tag oldest first and
//! the current image last, so the registry records the tag events in the
//! same order. Every image's closure is pushed before its manifest (blobs,
//! then children by digest); blobs the target has are not sent again, and a
//! blob already pushed to another repository in this run is mounted.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::closure;
use crate::digest::Digest;
use crate::index::Entry;
use crate::layout::{Layout, LayoutError};
use crate::registry::{RegistryClient, RegistryError};
use crate::report::{Failure, Report, StreamReport};
use crate::transfer;

/// What to restore and how.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Only these archived namespaces (all when empty).
    pub namespaces: Vec<String>,
    /// Only these archived streams, `ns/name` (all when empty).
    pub imagestreams: Vec<String>,
    /// Archived namespace -> target namespace.
    pub map_namespaces: BTreeMap<String, String>,
    /// Move tags that point at a different image.
    pub overwrite: bool,
    /// Report only.
    pub dry_run: bool,
    /// Parallel tags.
    pub jobs: usize,
    /// Show progress on stderr.
    pub progress: bool,
    /// Read the target ImageStreams' tag histories first
    /// (`--keep-target-history`).
    pub target_streams: Option<TargetStreams>,
}

/// Read access to the target cluster's ImageStreams.
#[derive(Clone)]
pub struct TargetStreams {
    /// The API server.
    pub client: kube::Client,
    /// Retries and per-request timeout of the API calls.
    pub retry: crate::discovery::RetryPolicy,
}

impl std::fmt::Debug for TargetStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetStreams")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// Parses `OLD=NEW` pairs.
pub fn parse_namespace_map(pairs: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let (old, new) = p
            .split_once('=')
            .filter(|(o, n)| {
                crate::index::is_valid_namespace(o) && crate::index::is_valid_namespace(n)
            })
            .ok_or_else(|| {
                format!("--map-namespace {p:?}: expected OLD=NEW with two namespace names")
            })?;
        if out.insert(old.to_string(), new.to_string()).is_some() {
            return Err(format!("--map-namespace: {old} is mapped twice"));
        }
    }
    Ok(out)
}

/// One tag to restore: its archived events, oldest first.
#[derive(Debug, Clone)]
pub(crate) struct Unit {
    pub(crate) target_namespace: String,
    pub(crate) stream: String,
    pub(crate) tag: String,
    /// Oldest first; the last is the current image.
    pub(crate) events: Vec<Entry>,
    /// The tag's history in the target ImageStream, newest first, when it
    /// was read (`--keep-target-history`); empty when it has no such tag;
    /// why not, when the stream could not be read.
    pub(crate) target_history: Option<Result<Vec<Digest>, String>>,
}

impl Unit {
    pub(crate) fn repo(&self) -> String {
        format!("{}/{}", self.target_namespace, self.stream)
    }

    fn failure(&self, e: &Entry, reason: String) -> Failure {
        Failure {
            namespace: self.target_namespace.clone(),
            imagestream: self.stream.clone(),
            tag: self.tag.clone(),
            position: Some(e.position),
            digest: Some(e.digest.clone()),
            reason,
        }
    }
}

/// Selects and groups the entries to restore. Two archived streams that
/// `--map-namespace` would land on the same target stream are not merged
/// ([`claim_targets`]): the other is left out and named in the returned
/// problems.
pub(crate) fn units(entries: &[Entry], opts: &RestoreOptions) -> (Vec<Unit>, Vec<String>) {
    let selected: Vec<&Entry> = entries
        .iter()
        .filter(|e| {
            opts.namespaces.is_empty() || opts.namespaces.iter().any(|n| **n == *e.namespace)
        })
        .filter(|e| opts.imagestreams.is_empty() || opts.imagestreams.contains(&e.stream_key()))
        .collect();
    let (kept, left_out) = claim_targets(
        selected,
        &opts.map_namespaces,
        |e: &&Entry| -> &str { &e.namespace },
        |e: &&Entry| -> &str { &e.stream },
    );
    let target = |ns: &str| {
        opts.map_namespaces
            .get(ns)
            .cloned()
            .unwrap_or_else(|| ns.to_string())
    };
    let problems: std::collections::BTreeSet<String> = left_out
        .into_iter()
        .map(|(e, source)| {
            format!(
                "{} is not restored: --map-namespace would put it on {}/{}, which {}/{} restores",
                e.stream_key(),
                target(&e.namespace),
                e.stream,
                source,
                e.stream
            )
        })
        .collect();
    let mut by_tag: BTreeMap<(String, String, String), Vec<Entry>> = BTreeMap::new();
    for e in kept {
        by_tag
            .entry((
                target(&e.namespace),
                e.stream.to_string(),
                e.tag.to_string(),
            ))
            .or_default()
            .push(e.clone());
    }
    let units = by_tag
        .into_iter()
        .map(|((ns, stream, tag), mut events)| {
            events.sort_by_key(|e| std::cmp::Reverse(e.position));
            Unit {
                target_namespace: ns,
                stream,
                tag,
                events,
                target_history: None,
            }
        })
        .collect();
    (units, problems.into_iter().collect())
}

/// Of the `items` that `map` would put on one target stream (its
/// `namespace`, mapped, and `stream` name), keeps those of one archived
/// stream: the one whose namespace is not mapped (already there), else the
/// first in `items`. The others come back second, each with the archived
/// namespace that took its place. Used by the push and by
/// `--apply-imagestreams`, so that both keep the same stream.
pub(crate) fn claim_targets<T>(
    mut items: Vec<T>,
    map: &BTreeMap<String, String>,
    namespace: impl Fn(&T) -> &str,
    stream: impl Fn(&T) -> &str,
) -> (Vec<T>, Vec<(T, String)>) {
    // Unmapped namespaces claim their own names first (a stable sort).
    items.sort_by_key(|t| map.contains_key(namespace(t)));
    // target ns/name -> the archived namespace it comes from
    let mut source_of: BTreeMap<(String, String), String> = BTreeMap::new();
    let (mut kept, mut left_out) = (Vec::new(), Vec::new());
    for t in items {
        let ns = namespace(&t).to_string();
        let target = map.get(&ns).unwrap_or(&ns).clone();
        let source = source_of
            .entry((target, stream(&t).to_string()))
            .or_insert_with(|| ns.clone());
        if *source == ns {
            kept.push(t);
        } else {
            left_out.push((t, source.clone()));
        }
    }
    (kept, left_out)
}

/// Why an image could not be pushed.
enum PushError {
    /// The archive (or stream) cannot provide it: missing or corrupt there.
    Archive(String),
    /// The registry refused or failed.
    Registry {
        reason: String,
        /// Retrying cannot help (a refusal, not an outage).
        permanent: bool,
        /// Credentials or permissions (401, 403).
        config: bool,
    },
}

impl PushError {
    fn registry(reason: String, e: &RegistryError) -> Self {
        PushError::Registry {
            reason,
            permanent: e.is_permanent(),
            config: e.is_config(),
        }
    }
}

/// What happened to one tag.
#[derive(Debug, Default)]
struct UnitResult {
    /// The registry refused the tag for credentials, permissions or TLS.
    refused: bool,
    pushed: usize,
    skipped: usize,
    conflict: Option<String>,
    failures: Vec<Failure>,
    blobs_new: usize,
    bytes_new: u64,
    blobs_skipped: usize,
}

impl UnitResult {
    /// Records that the registry could not say what it holds for `e` of
    /// `unit`: a failure, and whether that was a refusal of credentials or
    /// rights.
    fn lookup_failed(&mut self, unit: &Unit, e: &Entry, err: &RegistryError) {
        self.refused = err.is_config();
        self.failures.push(unit.failure(e, format!("{err:#}")));
    }
}

/// Where the images to push come from.
pub(crate) enum Source {
    /// An archive directory: blobs are uploaded from their files.
    Layout(Arc<Layout>),
    /// An export stream already read (`restore --from`): manifests are in
    /// memory, blobs were uploaded while the stream went by.
    Stream(Arc<crate::restore_stream::StreamedImages>),
}

impl Source {
    fn walk(&self, image: &Digest) -> Result<Vec<closure::Node>, String> {
        match self {
            Source::Layout(layout) => {
                let mut seen = std::collections::HashSet::new();
                closure::walk(layout, image, &mut seen).map_err(|e| e.to_string())
            }
            Source::Stream(images) => images.walk(image),
        }
    }

    fn manifest(&self, image: &Digest, digest: &Digest) -> Result<Bytes, String> {
        match self {
            Source::Layout(layout) => layout
                .read_small_blob(digest)
                .map(Bytes::from)
                .map_err(|e| format!("image {image}: {e}")),
            Source::Stream(images) => images
                .manifest(digest)
                .ok_or_else(|| format!("image {image}: manifest {digest} was not in the stream")),
        }
    }

    fn blob_size(&self, digest: &Digest) -> u64 {
        match self {
            Source::Layout(layout) => layout.blob_size(digest).unwrap_or(0),
            Source::Stream(images) => images.size(digest),
        }
    }

    async fn upload(
        &self,
        client: &RegistryClient,
        repo: &str,
        digest: &Digest,
    ) -> Result<u64, RegistryError> {
        match self {
            Source::Layout(layout) => client.push_blob(repo, digest, layout).await,
            Source::Stream(images) => Err(RegistryError::Request {
                op: "push blob",
                what: format!("{}/{repo}@{digest}", client.host()),
                message: images.unavailable(digest),
                permanent: true,
                not_found: false,
                config: false,
            }),
        }
    }
}

/// The outcome of putting one blob into one repository, decided once.
type OutcomeCell = Arc<OnceCell<BlobOutcome>>;

/// Pushes blobs once per repository, mounting from where they already are.
pub(crate) struct Pusher {
    client: RegistryClient,
    source: Source,
    done: Mutex<HashMap<(String, Digest), OutcomeCell>>,
    /// Where each blob is (or is being put) first in the target registry.
    located: Mutex<HashMap<Digest, Arc<OnceCell<String>>>>,
    /// Blobs a streaming restore already put into a repository: reported
    /// as new by the first tag that needs them there.
    streamed: Mutex<HashMap<(String, Digest), u64>>,
    /// Blobs found damaged in the archive (file, why): not uploaded again.
    damaged: Mutex<HashMap<Digest, (PathBuf, String)>>,
    /// Blobs the registry refused for good in a repository (a LimitRange,
    /// a quota): not uploaded again for the next image that needs them.
    refused: Mutex<HashMap<(String, Digest), RegistryError>>,
    dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlobOutcome {
    Present,
    Mounted,
    Uploaded(u64),
    WouldUpload(u64),
}

impl Pusher {
    /// A pusher of the images of `source`.
    pub(crate) fn new(client: &RegistryClient, source: Source, dry_run: bool) -> Self {
        Pusher {
            client: client.clone(),
            source,
            done: Mutex::default(),
            located: Mutex::default(),
            streamed: Mutex::default(),
            damaged: Mutex::default(),
            refused: Mutex::default(),
            dry_run,
        }
    }

    /// Where `digest` is (or is being put) first in the target registry.
    fn located_cell(&self, digest: &Digest) -> Arc<OnceCell<String>> {
        self.located
            .lock()
            .expect("pusher lock")
            .entry(digest.clone())
            .or_default()
            .clone()
    }

    /// The outcome of putting `digest` into `repo`, decided once.
    fn done_cell(&self, repo: &str, digest: &Digest) -> OutcomeCell {
        self.done
            .lock()
            .expect("pusher lock")
            .entry((repo.to_string(), digest.clone()))
            .or_default()
            .clone()
    }

    /// Records that `repo` holds `digest` (uploaded by a streaming restore,
    /// `bytes` long, or found present when `bytes` is `None`): later
    /// repositories mount it from there.
    pub(crate) fn record_located(&self, repo: &str, digest: &Digest, bytes: Option<u64>) {
        let cell = self.located_cell(digest);
        let _ = cell.set(repo.to_string());
        let done = self.done_cell(repo, digest);
        let _ = done.set(BlobOutcome::Present);
        if let Some(n) = bytes {
            self.streamed
                .lock()
                .expect("pusher lock")
                .insert((repo.to_string(), digest.clone()), n);
        }
    }

    /// [`Pusher::ensure_blob`], except for a blob already found damaged in
    /// the archive: that one is not uploaded (and refused) again.
    async fn ensure_blob_unless_damaged(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<BlobOutcome, RegistryError> {
        let known = self
            .damaged
            .lock()
            .expect("pusher lock")
            .get(digest)
            .cloned();
        if let Some((path, reason)) = known {
            return Err(RegistryError::Layout(LayoutError::Damaged {
                digest: digest.clone(),
                path,
                reason,
            }));
        }
        let key = (repo.to_string(), digest.clone());
        if let Some(e) = self.refused.lock().expect("pusher lock").get(&key) {
            return Err(e.request_copy().expect("only requests are kept"));
        }
        let r = self.ensure_blob(repo, digest).await;
        match &r {
            Err(RegistryError::Layout(LayoutError::Damaged { path, reason, .. })) => {
                self.damaged
                    .lock()
                    .expect("pusher lock")
                    .insert(digest.clone(), (path.clone(), reason.clone()));
            }
            Err(e) if e.is_permanent() => {
                if let Some(copy) = e.request_copy() {
                    self.refused.lock().expect("pusher lock").insert(key, copy);
                }
            }
            _ => {}
        }
        r
    }

    async fn ensure_blob(&self, repo: &str, digest: &Digest) -> Result<BlobOutcome, RegistryError> {
        let cell = self.done_cell(repo, digest);
        let mut fresh = false;
        let outcome = cell
            .get_or_try_init(|| async {
                fresh = true;
                if self.client.blob_exists(repo, digest).await? {
                    let cell = self.located_cell(digest);
                    let _ = cell.set(repo.to_string());
                    return Ok(BlobOutcome::Present);
                }
                if self.dry_run {
                    return Ok(BlobOutcome::WouldUpload(self.source.blob_size(digest)));
                }
                // The first repository to need a blob uploads it; the others
                // wait for that and mount it, falling back to an upload.
                let first = self.located_cell(digest);
                let mut uploaded = None;
                let from = first
                    .get_or_try_init(|| async {
                        uploaded = Some(self.source.upload(&self.client, repo, digest).await?);
                        Ok::<_, RegistryError>(repo.to_string())
                    })
                    .await?;
                if let Some(n) = uploaded {
                    return Ok(BlobOutcome::Uploaded(n));
                }
                if from != repo && self.client.mount_blob(repo, from, digest).await {
                    return Ok(BlobOutcome::Mounted);
                }
                let n = self.source.upload(&self.client, repo, digest).await?;
                Ok::<_, RegistryError>(BlobOutcome::Uploaded(n))
            })
            .await?;
        if let Some(n) = self
            .streamed
            .lock()
            .expect("pusher lock")
            .remove(&(repo.to_string(), digest.clone()))
        {
            return Ok(BlobOutcome::Uploaded(n));
        }
        // Another tag of the same repository did the work: count it once.
        Ok(if fresh {
            *outcome
        } else {
            BlobOutcome::Present
        })
    }

    /// Pushes the closure of `image` into `repo` and returns the root
    /// manifest's bytes and media type (the caller tags it).
    async fn push_closure(
        &self,
        repo: &str,
        image: &Digest,
        result: &mut UnitResult,
    ) -> Result<(Bytes, String), PushError> {
        let nodes = self.source.walk(image).map_err(PushError::Archive)?;
        let mut root = None;
        for node in nodes {
            match &node.manifest {
                None => match self.ensure_blob_unless_damaged(repo, &node.digest).await {
                    Ok(BlobOutcome::Present) => result.blobs_skipped += 1,
                    Ok(BlobOutcome::Mounted) => result.blobs_new += 1,
                    Ok(BlobOutcome::Uploaded(n)) | Ok(BlobOutcome::WouldUpload(n)) => {
                        result.blobs_new += 1;
                        result.bytes_new += n;
                    }
                    Err(e) => {
                        let reason = format!("image {image}: blob {}: {e}", node.digest);
                        return Err(match e {
                            // Unreadable or damaged in the archive: no
                            // re-run could push it.
                            RegistryError::Layout(_) => PushError::Archive(reason),
                            _ => PushError::registry(reason, &e),
                        });
                    }
                },
                Some(media_type) => {
                    let bytes = self
                        .source
                        .manifest(image, &node.digest)
                        .map_err(PushError::Archive)?;
                    if &node.digest == image {
                        root = Some((bytes, media_type.clone()));
                    } else if !self.dry_run {
                        // A child of an index: pushed by digest before its index.
                        let present = self
                            .client
                            .resolve(repo, &node.digest.to_string())
                            .await
                            .map_err(|e| PushError::registry(format!("image {image}: {e}"), &e))?
                            .is_some();
                        if !present {
                            self.client
                                .push_manifest(repo, &node.digest.to_string(), bytes, media_type)
                                .await
                                .map_err(|e| {
                                    PushError::registry(
                                        format!(
                                            "image {image}: child manifest {}: {e}",
                                            node.digest
                                        ),
                                        &e,
                                    )
                                })?;
                        }
                    }
                }
            }
        }
        root.ok_or_else(|| {
            PushError::Archive(format!("image {image}: manifest not found in its closure"))
        })
    }

    async fn restore_unit(&self, unit: &Unit, overwrite: bool) -> UnitResult {
        let mut result = UnitResult::default();
        let events: Vec<&Entry> = match &unit.target_history {
            Some(Err(reason)) => {
                let current = unit.events.last().expect("a unit has events");
                result.failures.push(unit.failure(
                    current,
                    format!("not pushed: {reason}; without the tag's history there, a push could duplicate it"),
                ));
                return result;
            }
            Some(Ok(history)) if !history.is_empty() => {
                match self
                    .onto_history(unit, history, overwrite, &mut result)
                    .await
                {
                    Some(events) => events,
                    None => return result,
                }
            }
            _ => match self.start_from_tag(unit, overwrite, &mut result).await {
                Some(start) => unit.events[start..].iter().collect(),
                None => return result,
            },
        };
        // History is pushed in order. An image the archive cannot provide
        // (missing or corrupt there), or one the registry refuses for good
        // (a LimitRange on image size, a manifest it will not take), is
        // skipped: no re-run could push it, and it must not keep the newer
        // images and the current one out. A registry outage stops the tag,
        // so that a re-run resumes in order instead of leaving a hole in the
        // history under a current tag.
        let repo = unit.repo();
        let mut refused = false;
        for (i, e) in events.iter().enumerate() {
            match self
                .push_image(&repo, &unit.tag, &e.digest, &mut result)
                .await
            {
                Ok(()) => {}
                Err(PushError::Archive(reason)) => result.failures.push(unit.failure(e, reason)),
                Err(PushError::Registry {
                    reason,
                    permanent: true,
                    config,
                }) => {
                    refused |= config;
                    result.failures.push(unit.failure(e, reason));
                }
                Err(PushError::Registry { reason, .. }) => {
                    result.failures.push(unit.failure(e, reason));
                    for later in &events[i + 1..] {
                        result.failures.push(unit.failure(
                            later,
                            format!(
                                "not pushed: the older {} of {repo}:{} failed; a re-run resumes from there",
                                e.digest, unit.tag
                            ),
                        ));
                    }
                    break;
                }
            }
        }
        // Credentials or permissions refused every push of the tag.
        result.refused |= refused && result.pushed == 0;
        result
    }

    /// Where to start pushing to the tag, from what the registry says it
    /// points at: a tag already at the current image is done; one at an
    /// archived history image of this tag resumes after it. `None`: nothing
    /// to push (done, a conflict, or the registry failed).
    async fn start_from_tag(
        &self,
        unit: &Unit,
        overwrite: bool,
        result: &mut UnitResult,
    ) -> Option<usize> {
        let repo = unit.repo();
        let current = unit.events.last().expect("a unit has events");
        let existing = match self.client.resolve(&repo, &unit.tag).await {
            Ok(d) => d,
            Err(e) => {
                result.lookup_failed(unit, current, &e);
                return None;
            }
        };
        let start = match &existing {
            None => 0,
            Some(d) => {
                let at: Vec<usize> = (0..unit.events.len())
                    .filter(|&i| &unit.events[i].digest == d)
                    .collect();
                if at.is_empty() {
                    if !overwrite {
                        result.conflict = Some(format!(
                            "{repo}:{} points at {d}, not at the archived {}; left alone (use --overwrite)",
                            unit.tag, current.digest
                        ));
                        return None;
                    }
                    0
                } else {
                    self.event_reached(unit, &at, result).await? + 1
                }
            }
        };
        result.skipped = start;
        (start < unit.events.len()).then_some(start)
    }

    /// Which of the tag's archived events at `at` (the positions of the
    /// digest the tag points at, oldest first) a restore has reached. With
    /// one, that one. A digest that repeats in the history (a, b, a) is
    /// ambiguous: the tag is at the later event only if the registry serves
    /// the images between the two, which a restore pushes first (a restore
    /// stopped after the first `a` resumes with `b`, a finished one is
    /// done). `None` when the registry could not say.
    async fn event_reached(
        &self,
        unit: &Unit,
        at: &[usize],
        result: &mut UnitResult,
    ) -> Option<usize> {
        let repo = unit.repo();
        'later: for pair in at.windows(2).rev() {
            for e in &unit.events[pair[0] + 1..pair[1]] {
                match self.client.resolve(&repo, &e.digest.to_string()).await {
                    Ok(Some(_)) => {}
                    Ok(None) => continue 'later,
                    Err(err) => {
                        result.lookup_failed(unit, e, &err);
                        return None;
                    }
                }
            }
            return Some(pair[1]);
        }
        Some(at[0])
    }

    /// The tag's history in the target ImageStream is known
    /// (`--keep-target-history`, newest first). Every archived image it
    /// records gets its content back by digest, without a new tag event (a
    /// cluster that lost only its registry storage keeps its history as it
    /// is, and images pinned by digest come back whatever the tag does).
    /// Returns the archived images to push to the tag, oldest first:
    /// - none when the target records the archived current image: the tag
    ///   is where the archive left it or has moved on since (new images, a
    ///   rollback), and is left alone;
    /// - those after the target's current image when that is an archived
    ///   image of the tag (the target is behind: an older etcd, or an
    ///   interrupted restore);
    /// - otherwise a conflict, or with `--overwrite` the images it does not
    ///   record.
    ///
    /// An archived image the target's history does not record and that is
    /// not pushed to the tag is left out: a push to the tag would move it.
    /// `None` when the registry refused for credentials or permissions.
    async fn onto_history<'u>(
        &self,
        unit: &'u Unit,
        history: &[Digest],
        overwrite: bool,
        result: &mut UnitResult,
    ) -> Option<Vec<&'u Entry>> {
        let repo = unit.repo();
        let current = unit.events.last().expect("a unit has events");
        let recorded = |e: &Entry| history.contains(&e.digest);
        // A tag that holds the archived current image is never moved, even
        // when that digest repeats in the history (a, b, a) and the target
        // holds only its first event: a pruned history and an interrupted
        // restore look the same, and moving a live tag rolls out old images.
        let to_tag: Vec<usize> = if recorded(current) {
            Vec::new()
        } else {
            match recorded_prefix(&unit.events, history) {
                Some(k) => (k..unit.events.len()).collect(),
                None if overwrite => (0..unit.events.len())
                    .filter(|&i| !recorded(&unit.events[i]))
                    .collect(),
                None => {
                    result.conflict = Some(format!(
                        "{repo}:{} is at {} in its ImageStream, not at an archived image of this tag (the archived current is {}); its recorded images are restored by digest, the tag is left alone (use --overwrite)",
                        unit.tag, history[0], current.digest
                    ));
                    Vec::new()
                }
            }
        };
        let mut done = std::collections::HashSet::new();
        for (i, e) in unit.events.iter().enumerate() {
            if to_tag.contains(&i) {
                continue;
            }
            if !recorded(e) {
                tracing::info!(
                    tag = %format!("{repo}:{}", unit.tag),
                    image = %e.digest,
                    "not in the tag's history in the target ImageStream: left out"
                );
                result.skipped += 1;
                continue;
            }
            if !done.insert(&e.digest) {
                result.skipped += 1;
                continue;
            }
            let served = match self.client.resolve(&repo, &e.digest.to_string()).await {
                Ok(d) => d.is_some(),
                Err(err) => {
                    result.lookup_failed(unit, e, &err);
                    if result.refused {
                        return None;
                    }
                    continue;
                }
            };
            if served {
                result.skipped += 1;
                continue;
            }
            if let Err(PushError::Archive(reason) | PushError::Registry { reason, .. }) = self
                .push_image(&repo, &e.digest.to_string(), &e.digest, result)
                .await
            {
                result.failures.push(unit.failure(e, reason));
            }
        }
        Some(to_tag.into_iter().map(|i| &unit.events[i]).collect())
    }

    /// Pushes one image's closure, then its manifest under `reference` (the
    /// tag, or the digest for content only).
    async fn push_image(
        &self,
        repo: &str,
        reference: &str,
        image: &Digest,
        result: &mut UnitResult,
    ) -> Result<(), PushError> {
        let (bytes, media_type) = self.push_closure(repo, image, result).await?;
        if !self.dry_run {
            self.client
                .push_manifest(repo, reference, bytes, &media_type)
                .await
                .map_err(|err| PushError::registry(format!("{err:#}"), &err))?;
        }
        result.pushed += 1;
        Ok(())
    }
}

/// How many of the archived `events` (oldest first) the target's `history`
/// (newest first) already ends with: the `k` whose `events[k - 1]` is the
/// target's current image and whose older events match the target's
/// history for longest (the earliest such `k` on a tie: after an
/// interrupted restore of a history that repeats a digest, the target holds
/// only the first pushes). `None` when the target's current image is not an
/// archived image of the tag.
fn recorded_prefix(events: &[Entry], history: &[Digest]) -> Option<usize> {
    let current = history.first()?;
    (1..=events.len())
        .filter(|&k| &events[k - 1].digest == current)
        .map(|k| {
            let matched = events[..k]
                .iter()
                .rev()
                .zip(history)
                .take_while(|(e, h)| &e.digest == *h)
                .count();
            (k, matched)
        })
        .max_by_key(|&(k, matched)| (matched, std::cmp::Reverse(k)))
        .map(|(k, _)| k)
}

/// Restores the archive's images into the registry; fills `report`.
pub async fn restore(
    layout: Arc<Layout>,
    client: &RegistryClient,
    opts: &RestoreOptions,
    report: &mut Report,
) -> Result<(), crate::layout::LayoutError> {
    let index = layout.read_index()?;
    let (units, problems) = units(&index.entries, opts);
    // The units hold what the push needs; the index is not needed again.
    drop(index);
    report.problems.extend(problems);
    tracing::info!(tags = units.len(), dry_run = opts.dry_run, "restoring");
    let pusher = Arc::new(Pusher::new(client, Source::Layout(layout), opts.dry_run));
    run_units(pusher, units, opts, report).await;
    Ok(())
}

/// Restores every unit (tags in parallel, each tag's history in order) and
/// adds the results to `report`.
pub(crate) async fn run_units(
    pusher: Arc<Pusher>,
    mut units: Vec<Unit>,
    opts: &RestoreOptions,
    report: &mut Report,
) {
    if let Some(target) = &opts.target_streams {
        let streams = units
            .iter()
            .map(|u| (u.target_namespace.clone(), u.stream.clone()))
            .collect();
        let histories = crate::apply::tag_histories(&target.client, &streams, &target.retry).await;
        for u in &mut units {
            let key = (u.target_namespace.clone(), u.stream.clone());
            u.target_history = histories.get(&key).map(|tags| match tags {
                Ok(tags) => Ok(tags.get(&u.tag).cloned().unwrap_or_default()),
                Err(reason) => Err(reason.clone()),
            });
        }
    }
    let overwrite = opts.overwrite;
    let progress = Arc::new(transfer::Progress::default());
    let ticker = transfer::report_progress(
        "restore (tags)",
        progress.clone(),
        units.len() as u64,
        0,
        std::time::Duration::from_secs(10),
        opts.progress,
    );
    let results = transfer::bounded(units, opts.jobs.max(1), |unit: Unit| {
        let pusher = pusher.clone();
        let progress = progress.clone();
        async move {
            let r = pusher.restore_unit(&unit, overwrite).await;
            progress
                .items
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (unit, r)
        }
    })
    .await;
    transfer::stop_progress(ticker);
    report.refused = !results.is_empty() && results.iter().all(|(_, r)| r.refused);
    if report.refused {
        let first = results
            .iter()
            .find_map(|(_, r)| r.failures.first())
            .map(|f| f.reason.as_str())
            .unwrap_or_default();
        tracing::error!("the registry refused every tag: {first}");
    }
    let mut images = std::collections::HashSet::new();
    for (unit, r) in results {
        let s: &mut StreamReport = report.imagestreams.entry(unit.repo()).or_default();
        s.tags += 1;
        s.history_items += unit.events.len().saturating_sub(1);
        s.images_new += r.pushed;
        s.images_skipped += r.skipped;
        s.blobs_new += r.blobs_new;
        s.bytes_new += r.bytes_new;
        s.blobs_skipped += r.blobs_skipped;
        s.conflicts.extend(r.conflict.clone());
        s.failures.extend(r.failures.iter().cloned());
        let t = &mut report.totals;
        t.tags += 1;
        t.history_items += unit.events.len().saturating_sub(1);
        t.images_new += r.pushed;
        t.images_skipped += r.skipped;
        t.images_failed += r.failures.len();
        t.blobs_new += r.blobs_new;
        t.bytes_new += r.bytes_new;
        t.blobs_skipped += r.blobs_skipped;
        for e in &unit.events {
            images.insert(e.digest.clone());
        }
        if let Some(c) = r.conflict {
            report.problems.push(c);
        }
    }
    report.totals.imagestreams = report.imagestreams.len();
    report.totals.images = images.len();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_map() {
        let m = parse_namespace_map(&["a=b".into(), "c-1=d".into()]).unwrap();
        assert_eq!(m["a"], "b");
        assert!(parse_namespace_map(&["a".into()]).is_err());
        assert!(parse_namespace_map(&["A=b".into()]).is_err());
        assert!(parse_namespace_map(&["a=b".into(), "a=c".into()]).is_err());
        assert!(parse_namespace_map(&["a=../x".into()]).is_err());
    }

    /// Digests named by letters, for history tests.
    fn named(names: &[&str]) -> Vec<Digest> {
        names.iter().map(|s| Digest::of(s.as_bytes())).collect()
    }

    /// One tag's archived events, oldest first, named by letters.
    fn events_named(names: &[&str]) -> Vec<Entry> {
        named(names)
            .into_iter()
            .map(|digest| Entry {
                namespace: "ns".into(),
                stream: "app".into(),
                tag: "latest".into(),
                position: 0,
                digest,
                media_type: crate::manifest::OCI_MANIFEST.into(),
                size: 1,
                created: Default::default(),
                reference: Default::default(),
            })
            .collect()
    }

    #[test]
    fn the_recorded_prefix_follows_the_target_history() {
        let events = events_named(&["a", "b", "a", "c"]);
        let h = named;
        // Everything recorded: nothing goes to the tag.
        assert_eq!(recorded_prefix(&events, &h(&["c", "a", "b", "a"])), Some(4));
        // An interrupted restore into an empty stream: after the first `a`,
        // not the second.
        assert_eq!(recorded_prefix(&events, &h(&["a"])), Some(1));
        assert_eq!(recorded_prefix(&events, &h(&["b", "a"])), Some(2));
        assert_eq!(recorded_prefix(&events, &h(&["a", "b", "a"])), Some(3));
        // Older history of the target's own below the archived events.
        assert_eq!(recorded_prefix(&events, &h(&["b", "a", "x"])), Some(2));
        // The tag is at an image the archive does not have for it.
        assert_eq!(recorded_prefix(&events, &h(&["x", "c"])), None);
        assert_eq!(recorded_prefix(&events, &[]), None);
    }

    #[test]
    fn mapped_streams_never_merge() {
        let e = |ns: &str, pos| Entry {
            namespace: ns.into(),
            stream: "app".into(),
            tag: "latest".into(),
            position: pos,
            digest: Digest::of(ns.as_bytes()),
            media_type: crate::manifest::OCI_MANIFEST.into(),
            size: 1,
            created: Default::default(),
            reference: Default::default(),
        };
        let entries = vec![e("a", 0), e("b", 0), e("c", 0)];
        let opts = RestoreOptions {
            map_namespaces: parse_namespace_map(&["a=b".into(), "c=d".into()]).unwrap(),
            ..Default::default()
        };
        let (units, problems) = units(&entries, &opts);
        assert_eq!(units.len(), 2, "{units:?}");
        assert!(units.iter().all(|u| u.events.len() == 1));
        assert_eq!(
            units
                .iter()
                .find(|u| u.target_namespace == "b")
                .unwrap()
                .events[0]
                .namespace,
            "b".into()
        );
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("a/app"), "{problems:?}");
    }
}
