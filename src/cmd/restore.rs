//! `restore`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::apply::{self, ApplyOptions};
use crate::cli::RestoreArgs;
use crate::layout::{Access, Layout};
use crate::registry::{RegistryClient, RegistrySettings};
use crate::report::Report;
use crate::restore::{self, RestoreOptions};

/// Runs a restore.
pub async fn run(args: RestoreArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let settings = RegistrySettings::from_args(&args.registry).map_err(super::config_error)?;
    let client = RegistryClient::new(&settings);
    let map_namespaces = restore::parse_namespace_map(&args.map_namespaces)
        .map_err(|e| super::config_error(anyhow::anyhow!(e)))?;
    for s in &args.imagestreams {
        if s.split('/').count() != 2 || s.starts_with('/') || s.ends_with('/') {
            return Err(super::config_error(anyhow::anyhow!(
                "--imagestream {s:?}: expected NAMESPACE/NAME"
            )));
        }
    }
    if args.archive.is_none() && args.apply_imagestreams {
        return Err(super::config_error(anyhow::anyhow!(
            "--apply-imagestreams needs --archive DIR (import the stream first)"
        )));
    }
    // Kubernetes access is checked before anything is pushed.
    let kube = match args.keep_target_history || args.apply_imagestreams {
        true => Some(
            crate::discovery::client_from_env()
                .await
                .map_err(super::config_error)?,
        ),
        false => None,
    };
    let opts = RestoreOptions {
        namespaces: args.namespaces.clone(),
        imagestreams: args.imagestreams.clone(),
        map_namespaces,
        overwrite: args.overwrite,
        dry_run: args.dry_run,
        jobs: args.registry.jobs as usize,
        progress: super::progress_enabled(args.report.progress),
        target_streams: kube.clone().map(|client| restore::TargetStreams {
            client,
            retry: Default::default(),
        }),
    };
    let Some(archive) = &args.archive else {
        return super::export::restore_from(&args, &client, &settings.host, &opts, started).await;
    };
    let layout = Arc::new(Layout::open(archive, Access::Read).map_err(super::config_error)?);
    // `--apply-imagestreams`: the archived objects are checked before
    // anything is pushed.
    let apply_to = match kube.filter(|_| args.apply_imagestreams) {
        Some(kube) => Some((
            apply::archived_streams(&layout).map_err(super::config_error)?,
            kube,
        )),
        None => None,
    };
    let mut report = Report {
        command: "restore".into(),
        archive: archive.display().to_string(),
        registry: settings.host.clone(),
        dry_run: args.dry_run,
        ..Default::default()
    };
    restore::restore(layout, &client, &opts, &mut report)
        .await
        .with_context(|| format!("restoring from {}", archive.display()))?;
    if let Some((streams, kube)) = &apply_to {
        let aopts = ApplyOptions {
            namespaces: opts.namespaces.clone(),
            imagestreams: opts.imagestreams.clone(),
            map_namespaces: opts.map_namespaces.clone(),
            dry_run: args.dry_run,
            ..Default::default()
        };
        report.applied = apply::apply(kube, streams, &aopts).await;
        report.problems.extend(
            report
                .applied
                .iter()
                .filter_map(|a| a.message.clone().filter(|_| a.failed())),
        );
    }
    super::finish(
        report,
        &client.stats,
        started,
        args.report.report.as_deref(),
    )
}
