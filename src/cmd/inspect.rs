//! `verify`, `list` and `gc`.

use anyhow::Context;

use crate::cli::{GcArgs, ListArgs, Output, VerifyArgs};
use crate::layout::{Access, Layout};
use crate::report::{EXIT_OK, EXIT_PARTIAL};

fn open(path: &std::path::Path, access: Access) -> anyhow::Result<Layout> {
    Layout::open(path, access).map_err(super::config_error)
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializes"));
}

/// `verify`.
pub fn verify(args: VerifyArgs) -> anyhow::Result<i32> {
    let layout = open(&args.archive, Access::Read)?;
    let report = crate::verify::verify(&layout)
        .with_context(|| format!("verifying {}", args.archive.display()))?;
    match args.output {
        Output::Json => print_json(&report),
        Output::Text => {
            for p in &report.problems {
                println!("{}: {}", p.kind, p.message);
            }
            println!(
                "{} blobs ({} bytes) re-hashed, {} index entries checked: {}",
                report.blobs_checked,
                report.bytes_checked,
                report.entries_checked,
                if report.ok() {
                    "archive OK".to_string()
                } else {
                    format!("{} problem(s)", report.problems.len())
                }
            );
        }
    }
    Ok(if report.ok() { EXIT_OK } else { EXIT_PARTIAL })
}

/// `list`.
pub fn list(args: ListArgs) -> anyhow::Result<i32> {
    let layout = open(&args.archive, Access::Read)?;
    let listing = crate::list::list(&layout)
        .with_context(|| format!("listing {}", args.archive.display()))?;
    match args.output {
        Output::Json => print_json(&listing),
        Output::Text => print!("{}", crate::list::render(&listing)),
    }
    Ok(EXIT_OK)
}

/// `gc`.
pub fn gc(args: GcArgs) -> anyhow::Result<i32> {
    let grace = humantime::parse_duration(&args.grace)
        .map_err(|e| super::config_error(anyhow::anyhow!("--grace {:?}: {e}", args.grace)))?;
    let layout = open(&args.archive, Access::Write)?;
    let report = crate::gc::gc(&layout, grace, args.dry_run)
        .with_context(|| format!("collecting garbage in {}", args.archive.display()))?;
    tracing::info!(
        deleted = report.deleted_blobs.len(),
        bytes_freed = report.bytes_freed,
        kept_in_grace = report.kept_in_grace,
        dry_run = args.dry_run,
        "gc done"
    );
    print_json(&report);
    Ok(EXIT_OK)
}
