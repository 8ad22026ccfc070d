//! Waiting on observable state with a deadline.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set once a wait of this test process timed out. A test that fails by returning the error (not by
/// panicking) then still keeps its cluster's files and shows the end of each node's log (`cluster.rs`).
static TIMED_OUT: AtomicBool = AtomicBool::new(false);

/// Whether any wait of this process timed out (nextest runs each test in a process of its own).
pub fn timed_out() -> bool {
    TIMED_OUT.load(Ordering::Relaxed)
}

/// Polls `probe` every `every` until it returns `Ok(Some(value))`, or fails after `timeout` with `what` and the
/// last error seen.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition not met yet");
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last = format!("{error:#}"),
        }
        if Instant::now() >= deadline {
            TIMED_OUT.store(true, Ordering::Relaxed);
            anyhow::bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next item of `stream`, or an error naming `what` when none comes within `timeout` or the stream ended.
pub async fn next<T>(
    what: &str,
    timeout: Duration,
    stream: &mut tokio::sync::mpsc::Receiver<T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(timeout, stream.recv())
        .await
        .map_err(|_| {
            TIMED_OUT.store(true, Ordering::Relaxed);
            anyhow::anyhow!("no {what} within {timeout:?}")
        })?
        .ok_or_else(|| anyhow::anyhow!("the {what} stream ended"))
}
