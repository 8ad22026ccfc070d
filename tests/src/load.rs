//! A steady write load for failure tests: writers put unique keys in a loop and remember every write the
//! cluster acknowledged, so a test can check afterwards that none was lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use vesper_leafpeer::{Consistency, Leaf};

/// What the writers saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Acknowledged writes: key -> value.
    pub acknowledged: BTreeMap<String, Vec<u8>>,
    /// Failed attempts, with when and why.
    pub failures: Vec<(Instant, String)>,
    /// (started, returned) of each acknowledged write.
    pub acked_at: Vec<(Instant, Instant)>,
}

impl LoadReport {
    /// The longest stretch within [`from`, `to`] in which no write was acknowledged: how long writes were
    /// unavailable around a fault (each end of the window counts as an edge).
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut edges: Vec<Instant> = self
            .acked_at
            .iter()
            .map(|(_, returned)| *returned)
            .filter(|returned| *returned > from && *returned < to)
            .collect();
        edges.push(from);
        edges.push(to);
        edges.sort();
        edges
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default()
    }
}

/// A running load.
pub struct Load {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    report: Arc<Mutex<LoadReport>>,
}

impl Load {
    /// Starts one writer per leaf, writing keys `{prefix}-{writer}-{n}` in namespace `namespace`.
    pub fn start(leaves: Vec<Leaf>, namespace: &str, prefix: &str) -> Load {
        let stop = CancellationToken::new();
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let mut tasks = JoinSet::new();
        for (writer, leaf) in leaves.into_iter().enumerate() {
            let (stop, report) = (stop.clone(), report.clone());
            let (namespace, prefix) = (namespace.to_string(), prefix.to_string());
            tasks.spawn(async move {
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    n += 1;
                    let key = format!("{prefix}-{writer}-{n:06}");
                    let value = format!("value of {key}").into_bytes();
                    let attributes = HashMap::from([("writer".to_string(), writer.to_string())]);
                    let started = Instant::now();
                    let result = leaf
                        .put(&namespace, &key, attributes, value.clone(), None)
                        .await;
                    let failed = {
                        let mut report = report.lock().expect("report lock");
                        match result {
                            Ok(_) => {
                                report.acknowledged.insert(key, value);
                                report.acked_at.push((started, Instant::now()));
                                false
                            }
                            Err(error) => {
                                report.failures.push((Instant::now(), error.to_string()));
                                true
                            }
                        }
                    };
                    if failed {
                        // Do not spin while the cluster has no leader.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
        }
        Load {
            stop,
            tasks,
            report,
        }
    }

    /// Number of acknowledged writes so far.
    pub fn acknowledged(&self) -> usize {
        self.report.lock().expect("report lock").acknowledged.len()
    }

    /// When the first write that started after `instant` was acknowledged, if one was.
    pub fn first_ack_after(&self, instant: Instant) -> Option<Instant> {
        let report = self.report.lock().expect("report lock");
        report
            .acked_at
            .iter()
            .filter(|(started, _)| *started > instant)
            .map(|(_, returned)| *returned)
            .min()
    }

    /// Stops the writers and returns what they saw.
    pub async fn stop(mut self) -> LoadReport {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        std::mem::take(&mut *self.report.lock().expect("report lock"))
    }
}

/// Checks that every acknowledged write is readable with its value through `reader`.
pub async fn verify(
    reader: &Leaf,
    namespace: &str,
    acknowledged: &BTreeMap<String, Vec<u8>>,
) -> anyhow::Result<()> {
    for (key, value) in acknowledged {
        let record = reader
            .get(namespace, key, Consistency::Linearizable)
            .await?
            .ok_or_else(|| anyhow::anyhow!("acknowledged write {key} is lost"))?;
        anyhow::ensure!(&record.value == value, "{key} has the wrong value");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_counts_the_window_edges_and_ignores_acks_outside() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let report = LoadReport {
            acked_at: [5, 100, 120, 900, 950, 5000]
                .iter()
                .map(|ms| (at(0), at(*ms)))
                .collect(),
            ..LoadReport::default()
        };
        // Window 50..1000: edges 50, 100, 120, 900, 950, 1000 -> the gap 120..900.
        assert_eq!(
            report.longest_gap(at(50), at(1000)),
            Duration::from_millis(780)
        );
        // No ack inside the window: the whole window.
        assert_eq!(
            report.longest_gap(at(1000), at(1500)),
            Duration::from_millis(500)
        );
        // The last ack to the window's end is the longest.
        assert_eq!(
            report.longest_gap(at(940), at(2000)),
            Duration::from_millis(1050)
        );
    }
}
