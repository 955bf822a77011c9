//! `backup`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::backup::{self, BackupOptions};
use crate::cli::BackupArgs;
use crate::discovery::{self, DiscoveryOptions};
use crate::layout::{Access, Layout};
use crate::registry::{RegistryClient, RegistrySettings};
use crate::report::Report;

/// Runs a backup. A run that stops before its end (bad input, a refused
/// resize, a registry refusing everything) still writes a report, with
/// `committed: false` and the reason: a Job's `--report` file then never
/// shows the previous run's success as the latest.
pub async fn run(args: BackupArgs) -> anyhow::Result<i32> {
    let early = Report {
        command: "backup".into(),
        archive: args.archive.display().to_string(),
        dry_run: args.dry_run,
        ..Default::default()
    };
    let path = args.report.report.clone();
    // Until the run writes its own report, a signal writes this one.
    *super::STOPPED_REPORT.lock().expect("report lock") = Some((early, path));
    let result = run_reported(args).await;
    let unreported = super::STOPPED_REPORT.lock().expect("report lock").take();
    match (result, unreported) {
        (Err(e), Some(stand_in)) => {
            super::emit_unfinished(stand_in, format!("{e:#}"));
            Err(e)
        }
        (r, _) => r,
    }
}

/// [`run`]; takes the stand-in report of a stopped run once it writes its
/// own.
async fn run_reported(args: BackupArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    if let Some(ns) = args
        .namespaces
        .iter()
        .find(|ns| !crate::index::is_valid_namespace(ns))
    {
        return Err(super::config_error(anyhow::anyhow!(
            "--namespace {ns:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
        )));
    }
    let settings = RegistrySettings::from_args(&args.registry).map_err(super::config_error)?;
    let client = RegistryClient::new(&settings);
    let dopts = DiscoveryOptions {
        namespaces: args.namespaces.clone(),
        selector: args.selector.clone(),
        ..Default::default()
    };
    // An existing archive is locked first (a concurrent run fails before
    // any discovery) and its index read while discovery runs; a new one is
    // created only once the input is known to be good.
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let existing = args.archive.join("oci-layout").exists();
    let mut opened = None;
    let mut index_task = None;
    if existing {
        let layout = Arc::new(open_layout(&args, scratch.path())?);
        let l = layout.clone();
        index_task = Some(tokio::task::spawn_blocking(move || l.read_known()));
        opened = Some(layout);
    }
    // A dry run only plans: the objects themselves are not kept.
    let keep_objects = !args.dry_run;
    let discovered = match &args.imagestreams_from {
        Some(path) => {
            let (path, dopts) = (path.clone(), dopts.clone());
            tokio::task::spawn_blocking(move || {
                discovery::records_from_file(&path, &dopts, keep_objects)
            })
            .await
            .context("reading the ImageStream file")?
        }
        None => {
            let kube = discovery::client_from_env()
                .await
                .map_err(super::config_error)?;
            discovery::discover_records(&kube, &dopts, keep_objects).await
        }
    }
    .map_err(|e| match e.is_outage() {
        // Down or failing (an upgrade): the run failed, the setup is fine.
        true => anyhow::Error::from(e),
        false => super::config_error(e),
    })?;
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        streams = discovered.streams.len(),
        "discovered"
    );
    // An empty namespace and a mistyped one look the same to a list.
    for ns in &args.namespaces {
        let seen = discovered.streams.iter().any(|s| &*s.namespace == ns)
            || discovered
                .problems
                .iter()
                .any(|p| p.namespace.as_ref() == Some(ns));
        if !seen {
            tracing::warn!(
                namespace = %ns,
                "no ImageStreams in namespace {ns} (does it exist, and is it spelt right?)"
            );
        }
    }
    let layout = match opened {
        Some(l) => l,
        None => Arc::new(open_layout(&args, scratch.path())?),
    };
    let known = match index_task {
        Some(task) => task.await.context("reading index.json")?,
        None => layout.read_known(),
    }
    .map_err(super::config_error)?;
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        images = known.len(),
        "index read"
    );

    let force = if args.repair && !args.dry_run {
        repair_set(&layout)?
    } else {
        Default::default()
    };
    let opts = BackupOptions {
        force,
        skip_external: args.skip_external,
        prune_history: args.prune_history,
        jobs: args.registry.jobs as usize,
        progress: super::progress_enabled(args.report.progress),
        failed_namespaces: discovered
            .problems
            .iter()
            .filter_map(|p| p.namespace.clone())
            .collect(),
    };
    let mut report = Report {
        command: "backup".into(),
        archive: args.archive.display().to_string(),
        registry: settings.host.clone(),
        dry_run: args.dry_run,
        problems: discovered
            .problems
            .iter()
            .map(|p| p.message.clone())
            .collect(),
        ..Default::default()
    };
    let mut plan = backup::plan(layout.clone(), &client, discovered.streams, known, &opts)
        .await
        .map_err(super::config_error)?;
    tracing::info!(
        blobs = plan.blobs.len(),
        bytes_to_fetch = plan.bytes_to_fetch(),
        "plan made"
    );
    if plan.refused_entirely() {
        return Err(super::config_error(anyhow::anyhow!(
            "registry {} refused every request: {}",
            settings.host,
            plan.first_failure().unwrap_or_default()
        )));
    }
    if let Some(pvc) = &args.pvc {
        if let Some(warning) = ensure_room(&args, pvc, plan.bytes_to_fetch()).await? {
            report.problems.push(warning);
        }
    }
    let mut failure = None;
    if !args.dry_run {
        let to_fetch = plan.bytes_to_fetch();
        if let Err(e) = backup::execute(layout.clone(), &client, &mut plan, &opts, &mut report)
            .await
            .map_err(|e| explain_full_volume(e, &args.archive, to_fetch))
            .with_context(|| format!("backing up into {}", args.archive.display()))
        {
            // Still write the report (K8up keeps stdout): it says that
            // nothing was committed, and why.
            report.committed = false;
            report.problems.push(format!("{e:#}"));
            failure = Some(e);
        }
    }
    tracing::debug!(seconds = started.elapsed().as_secs_f64(), "executed");
    backup::summarize(&plan, &mut report, args.dry_run);
    super::STOPPED_REPORT.lock().expect("report lock").take();
    let code = super::finish(
        report,
        &client.stats,
        started,
        args.report.report.as_deref(),
    )?;
    match failure {
        Some(e) => Err(e),
        None => Ok(code),
    }
}

/// Grows the archive's PVC before anything is downloaded, when the plan
/// needs more room than the volume has (keeping `--headroom` free). When it
/// cannot be grown (`--max-size`, a StorageClass without expansion, a
/// quota, missing rights) but this run's downloads fit anyway, the backup
/// goes on and the returned warning says so (the run exits 1): only a
/// run that would fill the volume is refused before downloading.
async fn ensure_room(
    args: &BackupArgs,
    pvc: &str,
    to_fetch: u64,
) -> anyhow::Result<Option<String>> {
    use crate::capacity::{self, ResizeOutcome, ResizeRequest};
    let namespace = args
        .pvc_namespace
        .clone()
        .or_else(capacity::own_namespace)
        .ok_or_else(|| {
            super::config_error(anyhow::anyhow!(
                "--pvc {pvc}: no --pvc-namespace given and not running in a pod"
            ))
        })?;
    let max_size = args
        .max_size
        .as_deref()
        .map(capacity::parse_quantity)
        .transpose()
        .map_err(super::config_error)?;
    if args.dry_run {
        let space = capacity::fs_space(&args.archive).ok();
        if let Some(space) = space.filter(|s| capacity::needs_growth(s, to_fetch, args.headroom)) {
            tracing::info!(
                pvc,
                needed = %capacity::format_gib(capacity::needed_size(&space, to_fetch, args.headroom)),
                "dry run: the PVC would be grown before downloading"
            );
        }
        return Ok(None);
    }
    let req = ResizeRequest::new(
        pvc,
        namespace,
        &args.archive,
        to_fetch,
        args.headroom,
        max_size,
        std::time::Duration::from_secs(args.resize_timeout),
    );
    let space = capacity::fs_space(&args.archive)
        .with_context(|| format!("statvfs {}", args.archive.display()))?;
    if !capacity::needs_growth(&space, to_fetch, args.headroom) {
        return Ok(None);
    }
    // The downloads; a new index.json beside the old one until it replaces
    // it, and a new ImageStream list (smaller than the index); and 1 % of
    // the volume for the blocks that many small files round up to.
    let index_size = std::fs::metadata(args.archive.join("index.json")).map_or(0, |m| m.len());
    let needed = to_fetch
        .saturating_add(index_size.saturating_mul(2))
        .saturating_add(space.total / 100)
        .saturating_add(1 << 20);
    let fits = space.free >= needed;
    let grown = match discovery::client_from_env().await {
        Ok(kube) => capacity::ensure_capacity(&kube, &req)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(anyhow::Error::from(e)),
    };
    match grown {
        Ok(ResizeOutcome::Grown { from, to, .. }) => tracing::info!(
            pvc,
            from = %capacity::human(from),
            to = %capacity::human(to),
            "PVC grown before downloading"
        ),
        Ok(other) => tracing::info!(pvc, ?other, "PVC has room"),
        Err(e) if fits => {
            let warning = format!(
                "{e:#}; this run's {} fit without the {}% headroom, so it went on, but the \
                 volume needs room before it fills",
                capacity::human(to_fetch),
                args.headroom
            );
            tracing::warn!("{warning}");
            return Ok(Some(warning));
        }
        Err(e) => return Err(super::config_error(e)),
    }
    Ok(None)
}

/// `--repair`: re-hashes every blob, marks the corrupt ones as absent (a
/// verified copy will replace each atomically), and returns the images
/// whose closure is not intact, to be fetched again.
fn repair_set(layout: &Layout) -> anyhow::Result<std::collections::HashSet<crate::digest::Digest>> {
    let (corrupt, checked, bytes) =
        crate::verify::corrupt_blobs(layout).context("re-hashing the archive for --repair")?;
    for (d, reason) in &corrupt {
        tracing::warn!(digest = %d, "corrupt blob: {reason}; fetching it again");
    }
    layout.mark_suspect(corrupt.iter().map(|(d, _)| d.clone()));
    let index = layout.read_index().map_err(super::config_error)?;
    let mut force = std::collections::HashSet::new();
    for e in &index.entries {
        let mut seen = std::collections::HashSet::new();
        let (_, errors) = crate::closure::walk_all(layout, &e.digest, &mut seen);
        if !errors.is_empty() {
            force.insert(e.digest.clone());
        }
    }
    tracing::info!(
        blobs = checked,
        bytes,
        corrupt = corrupt.len(),
        images = force.len(),
        "repair check done"
    );
    Ok(force)
}

/// Adds what happened and what to do to a full-volume error (ENOSPC,
/// EDQUOT) of the download: nothing of this run was committed.
fn explain_full_volume(
    e: crate::layout::LayoutError,
    archive: &std::path::Path,
    to_fetch: u64,
) -> anyhow::Error {
    let full = match &e {
        crate::layout::LayoutError::Io { source, .. } => {
            matches!(source.raw_os_error(), Some(28 | 122))
        }
        _ => false,
    };
    if !full {
        return e.into();
    }
    use crate::capacity::{fs_space, human};
    let free = fs_space(archive).map_or_else(|_| "unknown".into(), |s| human(s.free));
    anyhow::Error::new(e).context(format!(
        "the archive volume is full ({} to fetch, {free} free now); nothing of this run was \
         committed, index.json keeps the last committed state; grow the volume (--pvc NAME \
         grows it before downloading) or back up fewer namespaces",
        human(to_fetch)
    ))
}

/// Opens the archive for writing; a dry run opens it shared, or plans
/// against an empty scratch layout when it does not exist (it must not
/// create anything).
fn open_layout(args: &BackupArgs, scratch: &std::path::Path) -> anyhow::Result<Layout> {
    if !args.dry_run {
        return Layout::open(&args.archive, Access::Write).map_err(super::config_error);
    }
    match Layout::open(&args.archive, Access::Read) {
        Ok(l) => Ok(l),
        Err(crate::layout::LayoutError::NotALayout { .. }) => {
            Layout::open(scratch, Access::Write).map_err(super::config_error)
        }
        Err(e) => Err(super::config_error(e)),
    }
}
