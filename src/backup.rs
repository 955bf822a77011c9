//! Backup: plan what the archive lacks, fetch it, write it in closure
//! order, and commit a new `index.json`.
//!
//! The plan is made before any blob is downloaded: it fetches only the
//! manifests of images the archive does not have (an image whose manifest
//! blob is present is complete, by the closure invariant) and so knows the
//! exact bytes still to fetch, which capacity planning uses.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::digest::Digest;
use crate::imagestream::{self, ImageRef, StreamRecord};
use crate::index::{ArchiveIndex, Entry, EntryRef, Known};
use crate::jsonfile::JsonFile;
use crate::layout::{Layout, LayoutError};
use crate::manifest::{self, Parsed};
use crate::registry::RegistryClient;
use crate::report::{Failure, Report};
use crate::transfer::{self, human_bytes};
use serde_json::value::RawValue;

/// What the backup was asked to do.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Skip tag events whose image is not on the internal registry.
    pub skip_external: bool,
    /// Drop index entries whose tag event left its stream.
    pub prune_history: bool,
    /// Parallel transfers.
    pub jobs: usize,
    /// Log progress lines.
    pub progress: bool,
    /// Namespaces whose discovery failed: nothing of theirs is pruned.
    pub failed_namespaces: Vec<String>,
    /// Images to fetch again although their manifest is present (their
    /// closure has a corrupt or missing blob: `--repair`).
    pub force: HashSet<Digest>,
}

/// A manifest fetched during planning, not yet written.
#[derive(Debug, Clone)]
struct Fetched {
    bytes: Bytes,
    parsed: Parsed,
}

/// A blob to download.
#[derive(Debug, Clone)]
pub struct BlobNeed {
    /// Declared size.
    pub size: Option<u64>,
    /// Repository to pull it from.
    pub repo: String,
    /// The stream it is counted for.
    pub stream: String,
}

/// The plan of a backup.
#[derive(Debug, Default)]
pub struct Plan {
    /// The streams, each with the tag events to archive.
    streams: Vec<StreamRecord>,
    external_skipped: Vec<ImageRef>,
    /// Top-level images not complete in the archive (or to be fetched
    /// again): the others are present.
    missing: HashSet<Digest>,
    /// Manifests fetched, keyed by digest.
    fetched: HashMap<Digest, Fetched>,
    /// Top-level digest -> the manifests of its tree, children first.
    trees: BTreeMap<Digest, Vec<Digest>>,
    /// Blobs to download.
    pub blobs: BTreeMap<Digest, BlobNeed>,
    /// Top-level digest -> why it failed.
    failed: HashMap<Digest, String>,
    /// How many of `failed` are credential, permission or TLS errors.
    pub config_failures: usize,
    /// Tag events that are not usable at all.
    bad_events: Vec<Failure>,
    /// Blobs referenced by fetched manifests that are already present.
    pub blobs_present: usize,
    /// Their bytes.
    pub bytes_present: u64,
    /// Media type and size of archived images: from the previous index,
    /// then this run's.
    known: Known,
}

impl Plan {
    /// True when the top-level image `digest` is complete in the archive
    /// and not to be fetched again.
    fn is_present(&self, digest: &Digest) -> bool {
        !self.missing.contains(digest)
    }

    /// The tag events to archive, stream by stream.
    fn refs(&self) -> impl Iterator<Item = &ImageRef> {
        self.streams.iter().flat_map(|s| s.refs.iter())
    }

    /// One failure reason, for messages.
    pub fn first_failure(&self) -> Option<String> {
        self.failed.values().min().cloned()
    }

    /// True when every image to fetch failed for credentials, permissions
    /// or TLS: a configuration problem, not a partial backup.
    pub fn refused_entirely(&self) -> bool {
        self.config_failures > 0
            && self.config_failures == self.failed.len()
            && self.fetched.is_empty()
    }

    /// Bytes still to download (blobs plus manifests).
    pub fn bytes_to_fetch(&self) -> u64 {
        self.blobs
            .values()
            .map(|b| b.size.unwrap_or(0))
            .sum::<u64>()
            + self
                .fetched
                .values()
                .map(|f| f.bytes.len() as u64)
                .sum::<u64>()
    }
}

fn repo_of(r: &ImageRef) -> String {
    format!("{}/{}", r.namespace, r.stream)
}

/// Builds the plan: which images are missing, their manifests, and the blobs
/// still to fetch. Sends no request for an image already archived.
pub async fn plan(
    layout: Arc<Layout>,
    client: &RegistryClient,
    mut streams: Vec<StreamRecord>,
    known: Known,
    opts: &BackupOptions,
) -> Result<Plan, LayoutError> {
    let mut plan = Plan {
        known,
        ..Default::default()
    };
    for is in &mut streams {
        plan.bad_events
            .extend(std::mem::take(&mut is.bad).into_iter().map(|b| Failure {
                namespace: is.namespace.to_string(),
                imagestream: is.name.to_string(),
                tag: String::new(),
                position: None,
                digest: None,
                reason: format!("{}: {}", b.what, b.reason),
            }));
        if opts.skip_external {
            let (external, refs) = std::mem::take(&mut is.refs)
                .into_iter()
                .partition(|r| r.is_external(client.host()));
            is.refs = refs;
            plan.external_skipped.extend::<Vec<_>>(external);
        }
    }
    plan.streams = streams;

    // Distinct missing images, each with the repositories that may serve it.
    let mut candidates: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
    let (mut events, mut present) = (0usize, 0usize);
    for r in plan.refs() {
        events += 1;
        let forced = opts.force.contains(&r.digest);
        if !forced && (plan.known.contains(&r.digest) || layout.has_blob(&r.digest)) {
            present += 1;
            continue;
        }
        let repos = candidates.entry(r.digest.clone()).or_default();
        let repo = repo_of(r);
        if !repos.contains(&repo) {
            repos.push(repo);
        }
    }
    plan.missing = candidates.keys().cloned().collect();
    tracing::info!(
        tag_events = events,
        present,
        missing = candidates.len(),
        "planning"
    );

    // A manifest is a few KiB and its fetch mostly waits on the registry
    // (a cold manifest costs it a few disk reads): planning keeps more
    // requests in flight than the blob downloads do. One bound for all of
    // them, children of manifest lists included.
    let jobs = opts.jobs.max(1);
    let in_flight = (jobs * 4).clamp(jobs, 64.max(jobs));
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let results = transfer::bounded(candidates.into_iter().collect(), in_flight, {
        let client = client.clone();
        let layout = layout.clone();
        let permits = permits.clone();
        let force = Arc::new(opts.force.clone());
        move |(digest, repos): (Digest, Vec<String>)| {
            let client = client.clone();
            let layout = layout.clone();
            let permits = permits.clone();
            let all = force.contains(&digest);
            async move {
                let mut last = (String::new(), false);
                for repo in &repos {
                    match fetch_tree(&client, &layout, &permits, repo, &digest, all).await {
                        Ok(tree) => return (digest, repo.clone(), Ok(tree)),
                        Err(e) => last = e,
                    }
                }
                (digest, repos[0].clone(), Err(last))
            }
        }
    })
    .await;

    let mut counted: HashSet<Digest> = HashSet::new();
    for (top, repo, result) in results {
        match result {
            Err((reason, config)) => {
                plan.config_failures += usize::from(config);
                plan.failed.insert(top, reason);
            }
            Ok(tree) => {
                let mut order = Vec::new();
                for (digest, fetched) in tree {
                    for b in &fetched.parsed.blobs {
                        if !counted.insert(b.digest.clone()) {
                            continue;
                        }
                        if layout.has_blob(&b.digest) {
                            plan.blobs_present += 1;
                            plan.bytes_present += b.size.unwrap_or(0);
                        } else {
                            plan.blobs.insert(
                                b.digest.clone(),
                                BlobNeed {
                                    size: b.size,
                                    repo: repo.clone(),
                                    stream: repo.clone(),
                                },
                            );
                        }
                    }
                    order.push(digest.clone());
                    plan.fetched.insert(digest, fetched);
                }
                plan.trees.insert(top, order);
            }
        }
    }
    Ok(plan)
}

/// Fetches a manifest and, for an index, every child manifest not yet in
/// the archive: the children of one level at once (a manifest list's
/// platforms are not a chain of round trips), each request holding one of
/// `permits`. Returns the tree children first, the root last: every
/// manifest after all manifests it references.
async fn fetch_tree(
    client: &RegistryClient,
    layout: &Layout,
    permits: &tokio::sync::Semaphore,
    repo: &str,
    top: &Digest,
    all_children: bool,
) -> Result<Vec<(Digest, Fetched)>, (String, bool)> {
    let mut fetched: HashMap<Digest, Fetched> = HashMap::new();
    let mut level = vec![top.clone()];
    let mut seen: HashSet<Digest> = HashSet::from([top.clone()]);
    for depth in 0.. {
        if level.is_empty() {
            break;
        }
        if depth > 8 {
            return Err((
                format!("index nesting deeper than 8 levels at {}", level[0]),
                false,
            ));
        }
        let got = futures::future::try_join_all(level.into_iter().map(|digest| async move {
            let permit = permits
                .acquire()
                .await
                .expect("the semaphore is never closed");
            let bytes = client
                .pull_manifest(repo, &digest)
                .await
                .map_err(|e| (format!("{e:#}"), e.is_config()))?;
            drop(permit);
            let parsed =
                manifest::parse(&digest, &bytes, None).map_err(|e| (e.to_string(), false))?;
            Ok::<_, (String, bool)>((digest, Fetched { bytes, parsed }))
        }))
        .await?;
        let mut next = Vec::new();
        for (digest, f) in got {
            for child in &f.parsed.children {
                if &child.digest == top {
                    return Err((
                        format!("index {digest} references {} again (loop)", child.digest),
                        false,
                    ));
                }
                // A child shared by two indexes of the tree is fetched once.
                if (all_children || !layout.has_blob(&child.digest))
                    && seen.insert(child.digest.clone())
                {
                    next.push(child.digest.clone());
                }
            }
            fetched.insert(digest, f);
        }
        level = next;
    }
    Ok(children_first(top, fetched))
}

/// The fetched manifests of a tree, each after every fetched manifest it
/// references (depth first from `top`); a manifest not fetched is in the
/// archive already.
fn children_first(top: &Digest, mut fetched: HashMap<Digest, Fetched>) -> Vec<(Digest, Fetched)> {
    let mut out: Vec<(Digest, Fetched)> = Vec::with_capacity(fetched.len());
    let mut entered: HashSet<Digest> = HashSet::new();
    let mut stack = vec![(top.clone(), false)];
    while let Some((digest, children_done)) = stack.pop() {
        if children_done {
            if let Some(f) = fetched.remove(&digest) {
                out.push((digest, f));
            }
            continue;
        }
        let Some(f) = fetched
            .get(&digest)
            .filter(|_| entered.insert(digest.clone()))
        else {
            continue;
        };
        stack.push((digest.clone(), true));
        for child in &f.parsed.children {
            if fetched.contains_key(&child.digest) {
                stack.push((child.digest.clone(), false));
            }
        }
    }
    out
}

/// Downloads the plan's blobs, writes manifests in closure order, merges
/// the index and commits it. Returns the report.
pub async fn execute(
    layout: Arc<Layout>,
    client: &RegistryClient,
    plan: &mut Plan,
    opts: &BackupOptions,
    report: &mut Report,
) -> Result<(), LayoutError> {
    let started = Instant::now();
    let total_bytes: u64 = plan.blobs.values().map(|b| b.size.unwrap_or(0)).sum();
    let progress = Arc::new(transfer::Progress::default());
    let ticker = transfer::report_progress(
        "download",
        progress.clone(),
        plan.blobs.len() as u64,
        total_bytes,
        Duration::from_secs(5),
        opts.progress,
    );
    // Largest first: the long transfers start at once and the small ones
    // fill the other slots around them, instead of a large blob starting
    // last and running alone.
    let mut blobs: Vec<(Digest, BlobNeed)> = plan.blobs.clone().into_iter().collect();
    blobs.sort_by_key(|(_, need)| std::cmp::Reverse(need.size.unwrap_or(0)));
    let results = transfer::bounded(blobs, opts.jobs.max(1), {
        let client = client.clone();
        let layout = layout.clone();
        let progress = progress.clone();
        move |(digest, need): (Digest, BlobNeed)| {
            let client = client.clone();
            let layout = layout.clone();
            let progress = progress.clone();
            async move {
                let r = client
                    .pull_blob(&need.repo, &digest, need.size, &layout)
                    .await;
                progress
                    .items
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(n) = &r {
                    progress
                        .bytes
                        .fetch_add(*n, std::sync::atomic::Ordering::Relaxed);
                }
                (digest, need, r)
            }
        }
    })
    .await;
    transfer::stop_progress(ticker);
    // One directory fsync for the whole batch, before any manifest that
    // references these blobs is written.
    layout.sync_blobs()?;
    let mut blob_failed: HashMap<Digest, String> = HashMap::new();
    for (digest, need, r) in results {
        match r {
            Ok(n) => {
                let s = report.imagestreams.entry(need.stream.clone()).or_default();
                s.blobs_new += 1;
                s.bytes_new += n;
                report.totals.blobs_new += 1;
                report.totals.bytes_new += n;
            }
            Err(e)
                if e.is_permanent() && matches!(e, crate::registry::RegistryError::Layout(_)) =>
            {
                // A full disk or a permission error ends the run; the
                // committed index stays as it was.
                if let crate::registry::RegistryError::Layout(le) = e {
                    return Err(le);
                }
            }
            Err(e) => {
                blob_failed.insert(digest, format!("{e:#}"));
            }
        }
    }
    tracing::info!(
        blobs = report.totals.blobs_new,
        bytes = %human_bytes(report.totals.bytes_new),
        seconds = started.elapsed().as_secs_f64(),
        "download done"
    );

    // Write manifests children first, a level at a time (one sync per
    // level); a manifest only when its whole closure is present.
    let trees = std::mem::take(&mut plan.trees);
    let mut level: HashMap<Digest, usize> = HashMap::new();
    for order in trees.values() {
        for digest in order {
            let l = plan.fetched[digest]
                .parsed
                .children
                .iter()
                .map(|c| level.get(&c.digest).map_or(0, |l| l + 1))
                .max()
                .unwrap_or(0);
            level.insert(digest.clone(), l);
        }
    }
    let mut levels: BTreeMap<usize, Vec<&Digest>> = BTreeMap::new();
    for (d, l) in &level {
        levels.entry(*l).or_default().push(d);
    }
    let mut unwritten: HashMap<Digest, String> = HashMap::new();
    for digests in levels.values() {
        let mut batch: Vec<(&Digest, &[u8])> = Vec::new();
        for digest in digests {
            let fetched = &plan.fetched[*digest];
            let missing = fetched
                .parsed
                .blobs
                .iter()
                .chain(fetched.parsed.children.iter())
                .find(|b| !layout.has_blob(&b.digest));
            match missing {
                Some(m) => {
                    let reason = match blob_failed.get(&m.digest).or(unwritten.get(&m.digest)) {
                        Some(reason) => format!("blob {}: {reason}", m.digest),
                        None => format!("blob {} is missing", m.digest),
                    };
                    unwritten.insert((*digest).clone(), reason);
                }
                None => batch.push((*digest, &fetched.bytes)),
            }
        }
        layout.write_blobs_batch(&batch)?;
    }
    for (top, order) in trees {
        match order.iter().find_map(|d| unwritten.get(d)) {
            Some(reason) => {
                plan.failed.insert(top, reason.clone());
            }
            None => {
                let f = &plan.fetched[&top];
                plan.known
                    .insert(top.clone(), &f.parsed.media_type, f.bytes.len() as u64);
            }
        }
    }

    let new_index = merge_index(&layout, plan, opts, report)?;
    layout.commit(&new_index)?;
    report.committed = true;
    Ok(())
}

/// Fills the report from the plan (used for dry runs and real runs).
pub fn summarize(plan: &Plan, report: &mut Report, dry_run: bool) {
    let mut images: HashSet<&Digest> = HashSet::with_capacity(plan.refs().count());
    let totals = &mut report.totals;
    totals.imagestreams = plan.streams.len();
    for is in &plan.streams {
        let s = report.imagestreams.entry(is.key()).or_default();
        s.tags = is.tags;
        s.history_items = is.history_items;
        totals.tags += s.tags;
        totals.history_items += s.history_items;
        let mut seen: HashSet<&Digest> = HashSet::with_capacity(is.refs.len());
        for r in &is.refs {
            let failed = plan.failed.get(&r.digest);
            if let Some(reason) = failed {
                // Every tag event of a failed image is named.
                s.failures.push(Failure {
                    namespace: r.namespace.to_string(),
                    imagestream: r.stream.to_string(),
                    tag: r.tag.to_string(),
                    position: Some(r.position),
                    digest: Some(r.digest.clone()),
                    reason: reason.clone(),
                });
            }
            if !seen.insert(&r.digest) {
                continue;
            }
            let present = plan.is_present(&r.digest);
            if present {
                s.images_skipped += 1;
            } else if failed.is_none() {
                s.images_new += 1;
            }
            if images.insert(&r.digest) {
                totals.images += 1;
                if present {
                    totals.images_skipped += 1;
                } else if failed.is_some() {
                    totals.images_failed += 1;
                } else {
                    totals.images_new += 1;
                }
            }
        }
    }
    for r in &plan.external_skipped {
        report
            .imagestreams
            .entry(repo_of(r))
            .or_default()
            .images_external_skipped += 1;
    }
    for f in &plan.bad_events {
        report
            .imagestreams
            .entry(format!("{}/{}", f.namespace, f.imagestream))
            .or_default()
            .failures
            .push(f.clone());
    }
    report.totals.blobs_skipped = plan.blobs_present;
    report.totals.bytes_skipped = plan.bytes_present;
    if dry_run {
        report.totals.blobs_new = plan.blobs.len();
        report.totals.bytes_new = plan.bytes_to_fetch();
        for need in plan.blobs.values() {
            let s = report.imagestreams.entry(need.stream.clone()).or_default();
            s.blobs_new += 1;
            s.bytes_new += need.size.unwrap_or(0);
        }
    }
}

/// The shared copy of `s` in `table`.
fn intern(table: &mut HashSet<Arc<str>>, s: &str) -> Arc<str> {
    match table.get(s) {
        Some(a) => a.clone(),
        None => {
            let a: Arc<str> = s.into();
            table.insert(a.clone());
            a
        }
    }
}

/// Reports that the earlier ImageStream list at `path` is `what` (missing,
/// damaged) and that the run carries none of its objects over.
fn list_lost(report: &mut Report, path: &std::path::Path, what: &str) {
    let problem = format!(
        "the archived ImageStream list {} is {what}: this run keeps only its own ImageStream \
         objects; the volume's snapshots hold the earlier list",
        path.display()
    );
    tracing::error!("{problem}");
    report.problems.push(problem);
}

/// Builds the new index from the previous one and this run's results.
fn merge_index(
    layout: &Layout,
    plan: &mut Plan,
    opts: &BackupOptions,
    report: &mut Report,
) -> Result<ArchiveIndex, LayoutError> {
    let discovered: HashSet<(&str, &str)> = plan
        .streams
        .iter()
        .map(|is| (&*is.namespace, &*is.name))
        .collect();
    // Sized once: a vector grown by doubling holds up to twice its entries.
    let mut entries: Vec<Entry> =
        Vec::with_capacity(plan.refs().count() + plan.external_skipped.len());
    // Per tag: its next free history position and the digests of its
    // current tag events that are archived (keys borrow from this run's
    // refs; positions are cells so that the reader of the committed index
    // below can count through a shared borrow, with keys borrowed from the
    // file). Held per tag, not per event: a set of (names, digest) tuples
    // took 60 MB at 500,000 events.
    struct TagState<'p> {
        next_position: Cell<usize>,
        current: Vec<&'p Digest>,
        /// This run archived the tag's current image (position 0).
        has_current: bool,
    }
    let mut tags: HashMap<(&str, &str, &str), TagState> = HashMap::new();
    // One allocation per media type, not per entry.
    let mut media_types: HashSet<Arc<str>> = HashSet::new();
    let all_refs = plan.refs().chain(plan.external_skipped.iter());
    for r in all_refs {
        let tag = tags
            .entry((&r.namespace, &r.stream, &r.tag))
            .or_insert(TagState {
                next_position: Cell::new(1),
                current: Vec::new(),
                has_current: false,
            });
        let np = &tag.next_position;
        np.set(np.get().max(r.position + 1));
        let meta = match plan.known.get(&r.digest) {
            Some((media_type, size)) => Some((intern(&mut media_types, media_type), size)),
            None if layout.has_blob(&r.digest) => match layout.read_small_blob(&r.digest) {
                Ok(bytes) => manifest::parse(&r.digest, &bytes, None)
                    .ok()
                    .map(|p| (intern(&mut media_types, &p.media_type), bytes.len() as u64)),
                // Not indexed; `verify` names it, `--repair` fetches it again.
                Err(e @ LayoutError::Damaged { .. }) => {
                    tracing::warn!("{e}");
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        let Some((media_type, size)) = meta else {
            continue;
        };
        tag.current.push(&r.digest);
        tag.has_current |= r.position == 0;
        entries.push(Entry {
            namespace: r.namespace.clone(),
            stream: r.stream.clone(),
            tag: r.tag.clone(),
            position: r.position,
            digest: r.digest.clone(),
            media_type,
            size,
            created: r.created.clone(),
            reference: r.index_reference(),
        });
    }
    for t in tags.values_mut() {
        t.current.sort_unstable();
    }
    // Tags whose new image failed: nothing of theirs is pruned this run.
    let failed_tags: HashSet<(&str, &str, &str)> = plan
        .refs()
        .filter(|r| plan.failed.contains_key(&r.digest))
        .map(|r| (&*r.namespace, &*r.stream, &*r.tag))
        .collect();
    // Earlier entries: kept unless their stream was discovered and they are
    // in its status (then they were re-added above) or pruned. Decided as
    // the committed index is read: a dropped entry is never copied out.
    // Tags no longer in their stream count positions from 1.
    let mut gone: HashMap<(String, String, String), usize> = HashMap::new();
    let previous = layout.read_index_filtered(&mut |e: &EntryRef<'_>| {
        let (ns, stream, tag) = (e.namespace, e.stream, e.tag);
        if !discovered.contains(&(ns, stream)) {
            return Some(e.position);
        }
        let state = tags.get(&(ns, stream, tag));
        let tag_failed = failed_tags.contains(&(ns, stream, tag));
        // The tag's current image of an earlier run, when this run's failed:
        // it stays the tag's (`ns/is:tag`) until a run archives the new one.
        if e.position == 0 && tag_failed && state.is_some_and(|t| !t.has_current) {
            return Some(0);
        }
        if state.is_some_and(|t| t.current.binary_search(&e.digest).is_ok()) {
            return None;
        }
        if opts.prune_history && !tag_failed && !opts.failed_namespaces.iter().any(|n| n == ns) {
            report.pruned.push(Failure {
                namespace: ns.to_string(),
                imagestream: stream.to_string(),
                tag: tag.to_string(),
                position: Some(e.position),
                digest: Some(e.digest.clone()),
                reason: "no longer in the ImageStream's history".into(),
            });
            return None;
        }
        // Gone from the stream: keep it as the oldest history.
        Some(match state {
            Some(t) => t.next_position.replace(t.next_position.get() + 1),
            None => {
                let np = gone
                    .entry((ns.to_string(), stream.to_string(), tag.to_string()))
                    .or_insert(1);
                *np += 1;
                *np - 1
            }
        })
    })?;
    drop((tags, failed_tags, discovered, gone));
    entries.reserve_exact(previous.entries.len());
    entries.extend(previous.entries);
    // The ImageStream objects: this run's replace earlier ones (kept as
    // archived, unparsed).
    let earlier = match &previous.imagestreams {
        Some(d) => {
            let path = layout.blob_path(d);
            match JsonFile::open(&path) {
                Ok(file) => Some(file),
                // Gone (removed by hand, or by a tool that does not know
                // the archive): as damaged, below.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    list_lost(report, &path, "missing");
                    None
                }
                Err(source) => {
                    return Err(LayoutError::Io {
                        op: "read ImageStream list",
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        None => None,
    };
    enum Object<'a> {
        Archived(&'a RawValue),
        Listed(&'a imagestream::PackedObject),
    }
    let mut objects: BTreeMap<String, Object> = BTreeMap::new();
    if let (Some(file), Some(digest)) = (&earlier, &previous.imagestreams) {
        // Hashed as it is parsed (each part before its pages are released):
        // earlier objects are carried over only from the list as archived.
        let bytes = file.bytes();
        let mut hasher = crate::digest::Sha256::new();
        let mut hashed = 0;
        let scanned = imagestream::scan_list(bytes, "archived ImageStream list", &mut |_, raw| {
            let key = imagestream::key_of(raw)?;
            // Borrowed from the map, which outlives `objects`; its
            // pages may leave memory (they are read back if needed).
            let raw: &RawValue = serde_json::from_str(raw).map_err(|e| e.to_string())?;
            let end = raw.get().as_ptr() as usize + raw.get().len() - bytes.as_ptr() as usize;
            hasher.update(&bytes[hashed..end]);
            hashed = end;
            file.release_through(raw.get());
            objects.insert(key, Object::Archived(raw));
            Ok(())
        })
        .map_err(|e| e.to_string())
        .and_then(|_| {
            hasher.update(&bytes[hashed..]);
            let actual = hasher.finish();
            match &actual == digest {
                true => Ok(()),
                false => Err(format!("content hashes to {actual}")),
            }
        });
        if let Err(e) = scanned {
            list_lost(report, &layout.blob_path(digest), &format!("damaged ({e})"));
            objects.clear();
        }
    }
    for is in &plan.streams {
        if let Some(object) = &is.object {
            objects.insert(is.key(), Object::Listed(object));
        }
    }
    // Hashed first, written only when new: an unchanged list costs no
    // write and is never whole in memory.
    // Each packed object is unpacked only for its turn.
    let items: Vec<Object> = objects.into_values().collect();
    let write = |w: &mut dyn std::io::Write| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, w);
        imagestream::write_list_raw(
            items.iter().map(|o| match o {
                Object::Archived(raw) => Ok(Cow::Borrowed(raw.get())),
                Object::Listed(packed) => packed.json().map(Cow::Owned),
            }),
            &mut w,
        )?;
        std::io::Write::flush(&mut w)
    };
    let mut hasher = crate::digest::Sha256::new();
    write(&mut hasher).expect("hashing, and unpacking what this run packed, cannot fail");
    let list_digest = hasher.finish();
    if !layout.has_blob(&list_digest) {
        let mut blob = layout.blob_writer(&list_digest, None)?;
        write(&mut blob).map_err(|e| blob.error(e))?;
        blob.finish()?;
    }

    let mut index = ArchiveIndex {
        entries,
        imagestreams: Some(list_digest),
        foreign: previous.foreign,
    };
    index.sort();
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(json: String) -> (Digest, Fetched) {
        let digest = Digest::of(json.as_bytes());
        let parsed = manifest::parse(&digest, json.as_bytes(), None).unwrap();
        (
            digest,
            Fetched {
                bytes: Bytes::from(json),
                parsed,
            },
        )
    }

    fn index(children: &[&Digest]) -> (Digest, Fetched) {
        let manifests: Vec<String> = children
            .iter()
            .map(|d| {
                format!(
                    r#"{{"mediaType":"{}","digest":"{d}","size":1}}"#,
                    manifest::OCI_INDEX
                )
            })
            .collect();
        fetched(format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{}]}}"#,
            manifest::OCI_INDEX,
            manifests.join(",")
        ))
    }

    #[test]
    fn a_manifest_comes_after_everything_it_references() {
        // top -> [a, x], a -> [x, y], y -> [x], and `present` is archived
        // already: x is shared across levels, y sits below a.
        let present = Digest::of(b"archived");
        let x = index(&[]);
        let y = index(&[&x.0]);
        let a = index(&[&x.0, &y.0, &present]);
        let top = index(&[&a.0, &x.0]);
        let names: HashMap<Digest, &str> = [(&top, "top"), (&a, "a"), (&x, "x"), (&y, "y")]
            .into_iter()
            .map(|(m, n)| (m.0.clone(), n))
            .collect();
        let top_digest = top.0.clone();
        let order: Vec<&str> = children_first(&top_digest, HashMap::from([top, a, x, y]))
            .iter()
            .map(|(d, _)| names[d])
            .collect();
        assert_eq!(order.len(), 4, "each manifest once: {order:?}");
        let at = |n: &str| order.iter().position(|o| *o == n).unwrap();
        assert!(
            at("x") < at("y") && at("y") < at("a") && at("a") < at("top"),
            "{order:?}"
        );
    }
}
