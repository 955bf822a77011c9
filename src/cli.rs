//! Command-line parsing (clap derive). Kept apart from the validated
//! settings the commands build from it.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// The OpenShift internal registry's in-cluster address.
pub const DEFAULT_REGISTRY: &str = "image-registry.openshift-image-registry.svc:5000";

/// Back up the images of OpenShift ImageStreams into one OCI image layout,
/// and restore them.
#[derive(Debug, Parser)]
#[command(
    name = "imagestream-archiver",
    version,
    about,
    propagate_version = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Archive every tag and history image of the discovered ImageStreams.
    Backup(BackupArgs),
    /// Push an archive back into a registry: same streams, tags, history, digests.
    Restore(RestoreArgs),
    /// Re-hash every blob and check the closure of every index entry.
    Verify(VerifyArgs),
    /// Show namespaces, streams, tags, history depth and sizes of an archive.
    List(ListArgs),
    /// Delete blobs the committed index no longer reaches, after a grace period.
    Gc(GcArgs),
    /// Write the archive (or some namespaces of it) as one .tar.zst stream.
    Export(ExportArgs),
    /// Unpack an exported stream into an archive (new or existing).
    Import(ImportArgs),
}

/// How to reach and authenticate to a registry.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Registry host, with :port when not the default, to pull from / push to.
    #[arg(long, default_value = DEFAULT_REGISTRY, env = "ISA_REGISTRY")]
    pub registry: String,
    /// File holding a bearer token (default: the pod's service-account token, when present and the registry is a cluster service, *.svc, over TLS).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// User name for Basic auth (with --password-file).
    #[arg(long, requires = "password_file")]
    pub username: Option<String>,
    /// File holding the password for Basic auth.
    #[arg(long, requires = "username")]
    pub password_file: Option<PathBuf>,
    /// Do not authenticate, even when a service-account token is present.
    #[arg(long, conflicts_with_all = ["token_file", "username"])]
    pub anonymous: bool,
    /// PEM file of CA certificates to trust (default: the pod's service-ca.crt, when present).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Do not verify the registry's TLS certificate. Never the default.
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,
    /// Talk plain HTTP to the registry (a local test registry).
    #[arg(long)]
    pub plain_http: bool,
    /// Parallel transfers (blobs; a backup's planning fetches four times as
    /// many manifests at once, at most 64 unless --jobs is more).
    #[arg(long, short = 'j', default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// Attempts per request on transient errors (5xx, 429, resets, timeouts).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub retries: u32,
}

/// Output of the JSON report.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Write the JSON report to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// How progress is shown on stderr.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
}

/// Progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Progress {
    /// A live line on a terminal, periodic log lines otherwise.
    Auto,
    /// Periodic log lines.
    Log,
    /// Nothing but warnings and errors.
    None,
}

/// `backup`.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// The OCI image layout directory (created when missing).
    #[arg(long, env = "ISA_ARCHIVE")]
    pub archive: PathBuf,
    /// Only these namespaces (repeatable); needs only namespace-scoped rights.
    #[arg(long = "namespace", short = 'n', value_name = "NS")]
    pub namespaces: Vec<String>,
    /// Only ImageStreams whose labels match this selector (`a=b,c!=d`).
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
    /// Read ImageStreams from FILE (`oc get is -A -o json`) instead of the Kubernetes API.
    #[arg(long, value_name = "FILE")]
    pub imagestreams_from: Option<PathBuf>,
    /// Skip tag events whose dockerImageReference is not on the internal registry.
    #[arg(long)]
    pub skip_external: bool,
    /// Plan only: print what would be fetched, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Drop from the index the history items that left their ImageStream.
    #[arg(long)]
    pub prune_history: bool,
    /// Re-hash every archived blob first and fetch again the images whose
    /// closure has a corrupt or missing blob (replaced atomically).
    #[arg(long)]
    pub repair: bool,
    /// The PVC holding --archive: grow it before downloading when the plan needs room.
    #[arg(long, value_name = "NAME")]
    pub pvc: Option<String>,
    /// Namespace of --pvc (default: the pod's own namespace).
    #[arg(long, value_name = "NS", requires = "pvc")]
    pub pvc_namespace: Option<String>,
    /// Free space to keep after the download, in percent of the volume.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(0..=90))]
    pub headroom: u8,
    /// Never grow the PVC beyond this size (e.g. 500Gi).
    #[arg(long, value_name = "QUANTITY", requires = "pvc")]
    pub max_size: Option<String>,
    /// How long to wait for the volume to grow, in seconds.
    #[arg(long, default_value_t = 600)]
    pub resize_timeout: u64,
    /// Registry options.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Report options.
    #[command(flatten)]
    pub report: ReportArgs,
}

/// `restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The archive directory to restore from.
    #[arg(
        long,
        env = "ISA_ARCHIVE",
        required_unless_present = "from",
        conflicts_with = "from"
    )]
    pub archive: Option<PathBuf>,
    /// Restore straight from an exported .tar.zst stream (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// Only these namespaces of the archive (repeatable).
    #[arg(long = "namespace", short = 'n', value_name = "NS")]
    pub namespaces: Vec<String>,
    /// Only these streams (repeatable), as NS/NAME.
    #[arg(long = "imagestream", value_name = "NS/NAME")]
    pub imagestreams: Vec<String>,
    /// Restore namespace OLD into NEW (repeatable).
    #[arg(long = "map-namespace", value_name = "OLD=NEW")]
    pub map_namespaces: Vec<String>,
    /// Move tags that point at a different image in the target.
    #[arg(long)]
    pub overwrite: bool,
    /// Print what would be pushed, push nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Re-apply archived ImageStream specs through the Kubernetes API.
    /// Implies --keep-target-history.
    #[arg(long)]
    pub apply_imagestreams: bool,
    /// Read the target ImageStreams through the Kubernetes API first: an
    /// archived image already in a tag's history there gets its content
    /// back by digest, without a new tag event, and only newer images are
    /// pushed to the tag (a cluster that lost only its registry storage
    /// keeps its history as it is).
    #[arg(long)]
    pub keep_target_history: bool,
    /// Registry options.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Report options.
    #[command(flatten)]
    pub report: ReportArgs,
}

/// Output format of `list` and `verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable table.
    Text,
    /// JSON.
    Json,
}

/// `verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The archive directory.
    #[arg(long, env = "ISA_ARCHIVE")]
    pub archive: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// `list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// The archive directory.
    #[arg(long, env = "ISA_ARCHIVE")]
    pub archive: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// `gc`.
#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// The archive directory.
    #[arg(long, env = "ISA_ARCHIVE")]
    pub archive: PathBuf,
    /// Keep unreferenced blobs younger than this (e.g. 24h, 30m, 7d, 0s).
    #[arg(long, default_value = "24h")]
    pub grace: String,
    /// Only report what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
}

/// `export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// The archive directory.
    #[arg(long, env = "ISA_ARCHIVE")]
    pub archive: PathBuf,
    /// Only these namespaces (repeatable).
    #[arg(long = "namespace", short = 'n', value_name = "NS")]
    pub namespaces: Vec<String>,
    /// Output file, `-` for stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// zstd compression level.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
}

/// `import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// Input file, `-` for stdin.
    #[arg(long, short = 'i', value_name = "FILE")]
    pub input: PathBuf,
    /// The archive directory (created when missing).
    #[arg(long, env = "ISA_ARCHIVE")]
    pub archive: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
