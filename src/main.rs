//! The `imagestream-archiver` binary: parse, run, map errors to exit codes.

use clap::Parser;
use imagestream_archiver::cli::Cli;
use imagestream_archiver::cmd::{self, Exit};
use imagestream_archiver::report::{EXIT_FAILED, EXIT_INTERRUPTED};

fn main() {
    limit_malloc_arenas();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,oci_client=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            res = cmd::run(cli) => match res {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    e.downcast_ref::<Exit>().map_or(EXIT_FAILED, |x| x.code)
                }
            },
            _ = term.recv() => {
                let why = "stopped by SIGTERM; the archive keeps its last committed state";
                cmd::report_stopped(why);
                eprintln!("error: {why}");
                EXIT_INTERRUPTED
            }
            _ = tokio::signal::ctrl_c() => {
                let why = "interrupted; the archive keeps its last committed state";
                cmd::report_stopped(why);
                eprintln!("error: {why}");
                EXIT_INTERRUPTED
            }
        }
    });
    // Do not wait for abandoned transfers: their temp files are invisible
    // and swept by the next run.
    std::process::exit(code);
}

/// glibc gives each thread that allocates an arena of its own (up to 8 per
/// core), and every arena keeps what was freed in it. Transfers move
/// between the async workers and the blocking threads, so their buffers
/// spread over many arenas: a medium backup peaked at 55-64 MiB with the
/// default, 30-32 MiB with two arenas, at the same speed. An explicit
/// `MALLOC_ARENA_MAX` is left to glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator settings; it runs first
        // in main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}
