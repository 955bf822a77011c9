//! `export` and `import`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::Context;

use crate::cli::{ExportArgs, ImportArgs};
use crate::layout::{Access, Layout};

/// True when a path argument means stdin/stdout.
pub(crate) fn is_dash(p: &Path) -> bool {
    p.as_os_str() == "-"
}

/// Refuses an export file inside the archive it exports: it would take
/// about the archive's size again on the archive's volume, and K8up would
/// snapshot it with the archive.
fn refuse_inside_archive(target: &Path, archive: &Path) -> anyhow::Result<()> {
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (Ok(dir), Ok(archive)) = (dir.canonicalize(), archive.canonicalize()) else {
        return Ok(());
    };
    if dir.starts_with(&archive) {
        return Err(super::config_error(anyhow::anyhow!(
            "-o {}: inside the archive {} it exports; write it to another volume, or to stdout \
             (-o -) and pipe it to where it goes",
            target.display(),
            archive.display()
        )));
    }
    Ok(())
}

/// Writes the archive as a `.tar.zst` stream to a file or stdout.
pub fn export(args: ExportArgs) -> anyhow::Result<i32> {
    let layout = Layout::open(&args.archive, Access::Read).map_err(super::config_error)?;
    let stats = if is_dash(&args.output) {
        let stdout = io::stdout().lock();
        let mut out = BufWriter::with_capacity(1 << 20, stdout);
        let stats = crate::export::export(&layout, &args.namespaces, &mut out, args.level)
            .context("exporting to stdout")?;
        out.flush().context("writing to stdout")?;
        stats
    } else {
        // Written beside the target and renamed: a failed export leaves no
        // file that looks complete.
        let target = &args.output;
        let name = target.file_name().ok_or_else(|| {
            super::config_error(anyhow::anyhow!("-o {}: not a file name", target.display()))
        })?;
        refuse_inside_archive(target, &args.archive)?;
        let tmp = target.with_file_name(format!(
            ".{}.partial.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = File::create(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))
            .map_err(super::config_error)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let res = crate::export::export(&layout, &args.namespaces, &mut out, args.level)
            .map_err(anyhow::Error::from)
            .and_then(|stats| {
                let file = out.into_inner().map_err(|e| e.into_error())?;
                file.sync_all()?;
                std::fs::rename(&tmp, target)?;
                // The rename itself must survive a crash too.
                let dir = target
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                File::open(dir)?.sync_all()?;
                Ok(stats)
            });
        match res {
            Ok(stats) => stats,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.context(format!("exporting to {}", target.display())));
            }
        }
    };
    let ratio = if stats.blob_bytes > 0 {
        stats.stream_bytes as f64 / stats.blob_bytes as f64
    } else {
        0.0
    };
    tracing::info!(
        blobs = stats.blobs,
        blob_bytes = stats.blob_bytes,
        stream_bytes = stats.stream_bytes,
        ratio = format!("{ratio:.3}"),
        seconds = stats.seconds,
        "export done"
    );
    let json = serde_json::to_string_pretty(&stats).expect("stats serialize");
    if is_dash(&args.output) {
        eprintln!("{json}");
    } else {
        println!("{json}");
    }
    Ok(crate::report::EXIT_OK)
}

/// Opens an export stream: stdin for `-`, else the file (buffered); also
/// returns its name for messages. A file that cannot be opened is a
/// configuration error.
fn open_input(path: &Path) -> anyhow::Result<(Box<dyn io::Read + Send>, String)> {
    if is_dash(path) {
        return Ok((Box::new(io::stdin()), "from stdin".into()));
    }
    let file = File::open(path)
        .with_context(|| format!("opening {}", path.display()))
        .map_err(super::config_error)?;
    Ok((
        Box::new(io::BufReader::with_capacity(1 << 20, file)),
        path.display().to_string(),
    ))
}

/// Unpacks a `.tar.zst` stream from a file or stdin into an archive.
pub fn import(args: ImportArgs) -> anyhow::Result<i32> {
    let layout = Layout::open(&args.archive, Access::Write).map_err(super::config_error)?;
    let (reader, name) = open_input(&args.input)?;
    let stats =
        crate::import::import(reader, &layout).with_context(|| format!("importing {name}"))?;
    tracing::info!(
        blobs_new = stats.blobs_new,
        bytes_new = stats.bytes_new,
        entries = stats.entries_total,
        seconds = stats.seconds,
        "import committed"
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&stats).expect("stats serialize")
    );
    Ok(crate::report::EXIT_OK)
}

/// `restore --from FILE|-`: pushes straight from an export stream.
pub(crate) async fn restore_from(
    args: &crate::cli::RestoreArgs,
    client: &crate::registry::RegistryClient,
    host: &str,
    opts: &crate::restore::RestoreOptions,
    started: std::time::Instant,
) -> anyhow::Result<i32> {
    let from = args.from.as_deref().ok_or_else(|| {
        super::config_error(anyhow::anyhow!(
            "restore needs --archive DIR or --from FILE"
        ))
    })?;
    let (reader, _) = open_input(from)?;
    let mut report = crate::report::Report {
        command: "restore".into(),
        archive: from.display().to_string(),
        registry: host.to_string(),
        dry_run: args.dry_run,
        ..Default::default()
    };
    crate::restore_stream::restore_from(reader, client, opts, &mut report)
        .await
        .with_context(|| format!("restoring from {}", from.display()))?;
    super::finish(
        report,
        &client.stats,
        started,
        args.report.report.as_deref(),
    )
}
