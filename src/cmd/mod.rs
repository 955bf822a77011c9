//! The verbs: each turns parsed CLI arguments into validated settings,
//! runs the library, prints the report and returns the exit code.

mod backup;
mod export;
mod inspect;
mod restore;

use crate::cli::{Cli, Command, Progress};

/// An error that ends a verb and the exit code it deserves.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    /// The exit code.
    pub code: i32,
    /// The message.
    pub message: String,
}

/// The report a backup writes if it is stopped (SIGTERM, a Job's deadline,
/// Ctrl-C) before it wrote its own, and where: set while a backup runs.
static STOPPED_REPORT: std::sync::Mutex<
    Option<(crate::report::Report, Option<std::path::PathBuf>)>,
> = std::sync::Mutex::new(None);

/// Writes the report of a run stopped by a signal, if one is running, with
/// `committed: false` and `why`: a `--report` file then never shows an
/// earlier run's success as the latest.
pub fn report_stopped(why: &str) {
    let taken = STOPPED_REPORT.lock().map(|mut r| r.take());
    if let Ok(Some(stand_in)) = taken {
        emit_unfinished(stand_in, why.to_string());
    }
}

/// Writes the stand-in report of a run that ended before writing its own:
/// `committed: false`, and `why` among the problems.
fn emit_unfinished(
    (mut report, path): (crate::report::Report, Option<std::path::PathBuf>),
    why: String,
) {
    report.committed = false;
    report.problems.push(why);
    if let Err(e) = report.emit(path.as_deref()) {
        tracing::warn!("cannot write the report: {e}");
    }
}

/// Marks an error as a configuration, auth or permission problem (exit 2).
pub fn config_error(e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Exit {
        code: crate::report::EXIT_CONFIG,
        message: format!("{:#}", e.into()),
    })
}

/// Whether periodic progress lines should be logged.
pub fn progress_enabled(p: Progress) -> bool {
    match p {
        Progress::None => false,
        Progress::Auto | Progress::Log => true,
    }
}

/// Runs the verb named on the command line; returns the exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Backup(args) => backup::run(args).await,
        // Blocking work off the runtime thread, so SIGTERM is still seen.
        Command::Verify(args) => tokio::task::spawn_blocking(move || inspect::verify(args)).await?,
        Command::List(args) => tokio::task::spawn_blocking(move || inspect::list(args)).await?,
        Command::Gc(args) => tokio::task::spawn_blocking(move || inspect::gc(args)).await?,
        Command::Restore(args) => restore::run(args).await,
        Command::Export(args) => tokio::task::spawn_blocking(move || export::export(args)).await?,
        Command::Import(args) => tokio::task::spawn_blocking(move || export::import(args)).await?,
    }
}

/// Ends a backup or restore: counts the requests, writes the report (stdout
/// or `--report FILE`), logs a summary line, and returns the exit code.
pub(crate) fn finish(
    mut report: crate::report::Report,
    stats: &crate::registry::Stats,
    started: std::time::Instant,
    path: Option<&std::path::Path>,
) -> anyhow::Result<i32> {
    use anyhow::Context;
    report.requests = crate::report::RequestCounts::from_stats(stats);
    report.seconds = started.elapsed().as_secs_f64();
    if let Err(e) = report.emit(path) {
        let Some(p) = path else {
            return Err(anyhow::Error::from(e).context("writing the report to stdout"));
        };
        // The run's outcome stands (a committed backup stays committed);
        // the report goes where a Job's logs keep it, and says that the
        // file is stale.
        let problem = format!(
            "cannot write the report to {}: {e}; it went to stdout, and the file still holds an earlier run's",
            p.display()
        );
        tracing::error!("{problem}");
        report.problems.push(problem);
        report.emit(None).context("writing the report to stdout")?;
    }
    let t = &report.totals;
    tracing::info!(
        images_new = t.images_new,
        images_skipped = t.images_skipped,
        images_failed = t.images_failed,
        bytes_new = t.bytes_new,
        seconds = report.seconds,
        "{} {}",
        report.command,
        if report.dry_run { "planned" } else { "done" }
    );
    Ok(report.exit_code())
}
