//! The transfer machinery shared by backup and restore: a bounded parallel
//! map whose results come back in input order (a pre-sized slot per item),
//! and progress accounting.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

/// Runs `f` on every item with at most `jobs` at once, each on its own task
/// (so hashing and I/O spread over all cores), returning results in the
/// order of `items`.
///
/// A finished item frees its slot at once, whatever is still running
/// before it: one large blob never holds the other slots idle.
pub async fn bounded<T, R, F, Fut>(items: Vec<T>, jobs: usize, f: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: Future<Output = R> + Send + 'static,
{
    let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    let mut done = futures::stream::iter(items.into_iter().enumerate())
        .map(|(i, item)| {
            let task = tokio::spawn(f(item));
            async move { (i, task.await.expect("transfer task panicked")) }
        })
        .buffer_unordered(jobs.max(1));
    while let Some((i, r)) = done.next().await {
        slots[i] = Some(r);
    }
    slots
        .into_iter()
        .map(|r| r.expect("every item has a result"))
        .collect()
}

/// Byte and item counters for progress lines.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes done.
    pub bytes: AtomicU64,
    /// Items done.
    pub items: AtomicU64,
}

/// Shows progress until the returned task is aborted: a live line on a
/// terminal (every half second), a log line every `every` otherwise (a Job's
/// log). `total_bytes` 0 shows items only.
pub fn report_progress(
    what: &'static str,
    progress: Arc<Progress>,
    total_items: u64,
    total_bytes: u64,
    every: Duration,
    enabled: bool,
) -> tokio::task::JoinHandle<()> {
    let live = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tokio::spawn(async move {
        if !enabled || total_items == 0 {
            return;
        }
        let start = Instant::now();
        let tick = if live {
            Duration::from_millis(500)
        } else {
            every
        };
        loop {
            tokio::time::sleep(tick).await;
            let bytes = progress.bytes.load(Ordering::Relaxed);
            let items = progress.items.load(Ordering::Relaxed);
            let secs = start.elapsed().as_secs_f64().max(0.001);
            let line = if total_bytes == 0 {
                format!("{what}: {items}/{total_items}")
            } else {
                format!(
                    "{what}: {items}/{total_items}, {} / {} ({:.1} MiB/s)",
                    human_bytes(bytes),
                    human_bytes(total_bytes),
                    bytes as f64 / secs / 1048576.0
                )
            };
            if live {
                use std::io::Write;
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K{line}");
                let _ = err.flush();
            } else {
                tracing::info!("{line}");
            }
        }
    })
}

/// Stops a progress display, ending its live line.
pub fn stop_progress(task: tokio::task::JoinHandle<()>) {
    task.abort();
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprint!("\r\x1b[2K");
    }
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bounded_keeps_order_and_limit() {
        let running = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let out = bounded((0..50u64).collect(), 4, |i| {
            let running = running.clone();
            let peak = peak.clone();
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50 - i)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                i * 2
            }
        })
        .await;
        assert_eq!(out, (0..50).map(|i| i * 2).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 4);
        assert!(peak.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_item_holds_no_other_slot() {
        // Item 0 is slow; with 2 slots the others all run, one after
        // another in the second slot, while it is still running.
        let others = Arc::new(AtomicU64::new(0));
        let out = bounded((0..6u64).collect(), 2, |i| {
            let others = others.clone();
            async move {
                if i == 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    others.load(Ordering::SeqCst)
                } else {
                    others.fetch_add(1, Ordering::SeqCst);
                    i * 10
                }
            }
        })
        .await;
        assert_eq!(out, vec![5, 10, 20, 30, 40, 50]);
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
