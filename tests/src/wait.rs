//! Waiting on observable state with a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

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
        .map_err(|_| anyhow::anyhow!("no {what} within {timeout:?}"))?
        .ok_or_else(|| anyhow::anyhow!("the {what} stream ended"))
}
