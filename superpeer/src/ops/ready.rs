//! Liveness and readiness, as the ops port's `/livez` and `/readyz` answer them.
//!
//! - **Live** means the process and its runtime answer: the handler ran. It never looks at Raft, so a node that
//!   lost quorum is not restarted by its orchestrator (a restart cannot bring quorum back, and restarting every
//!   member at once is how clusters lose their data).
//! - **Ready** means this node can serve leaves now: it belongs to a cluster, knows a leader, has applied the
//!   log to within `ready_max_lag` entries (a setting, 1000 by default) of what the cluster committed (a node
//!   still installing a snapshot or replaying a long log is not), and is not shutting down. The verdict is a
//!   pure function of a snapshot of the node's state, so it is tested on tables and costs no RPC per probe.

/// What readiness is judged from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadyInputs {
    /// Raft runs on this node.
    pub in_cluster: bool,
    /// The node is stopping (draining its sessions).
    pub draining: bool,
    /// The leader this node knows of, if any.
    pub leader: Option<u64>,
    /// The highest index the cluster has committed, as the leader last told this node; `None` until it has
    /// (a restarted member knows its own log, not how far the cluster went without it).
    pub cluster_committed: Option<u64>,
    /// The highest index applied here.
    pub applied: u64,
    /// Entries the node may be behind `cluster_committed` and still be ready.
    pub max_lag: u64,
}

/// Why a node is not ready; the `/readyz` body says it in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    Draining,
    NotInCluster,
    NoLeader,
    /// The leader has not told this node the cluster's commit index since it started.
    CommitUnknown,
    /// Nothing applied yet: every cluster's log starts with its first membership, so a member that applied
    /// nothing is still receiving its first snapshot or entries.
    NothingApplied,
    CatchingUp {
        behind: u64,
        max_lag: u64,
    },
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Draining => write!(f, "shutting down"),
            NotReady::NotInCluster => write!(
                f,
                "not in a cluster yet (waiting to bootstrap, join or be adopted)"
            ),
            NotReady::NoLeader => write!(f, "no leader known (an election or a lost quorum)"),
            NotReady::CommitUnknown => write!(
                f,
                "waiting to hear the cluster's commit index from the leader"
            ),
            NotReady::NothingApplied => write!(
                f,
                "catching up: nothing applied yet (receiving a snapshot or the first entries)"
            ),
            NotReady::CatchingUp { behind, max_lag } => write!(
                f,
                "catching up: {behind} entries behind the cluster's commit index (ready within {max_lag})"
            ),
        }
    }
}

/// The readiness verdict.
pub fn readiness(inputs: &ReadyInputs) -> Result<(), NotReady> {
    if inputs.draining {
        return Err(NotReady::Draining);
    }
    if !inputs.in_cluster {
        return Err(NotReady::NotInCluster);
    }
    if inputs.leader.is_none() {
        return Err(NotReady::NoLeader);
    }
    if inputs.applied == 0 {
        return Err(NotReady::NothingApplied);
    }
    let Some(committed) = inputs.cluster_committed else {
        return Err(NotReady::CommitUnknown);
    };
    let behind = committed.saturating_sub(inputs.applied);
    if behind > inputs.max_lag {
        return Err(NotReady::CatchingUp {
            behind,
            max_lag: inputs.max_lag,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVING: ReadyInputs = ReadyInputs {
        in_cluster: true,
        draining: false,
        leader: Some(1),
        cluster_committed: Some(5000),
        applied: 4990,
        max_lag: 1000,
    };

    #[test]
    fn the_verdict_on_a_table_of_states() {
        let cases: &[(ReadyInputs, Result<(), NotReady>)] = &[
            (SERVING, Ok(())),
            (
                ReadyInputs {
                    applied: 4000,
                    ..SERVING
                },
                Ok(()),
            ),
            (
                ReadyInputs {
                    applied: 3999,
                    ..SERVING
                },
                Err(NotReady::CatchingUp {
                    behind: 1001,
                    max_lag: 1000,
                }),
            ),
            // A fresh member that has applied nothing: installing a snapshot, whatever the leader said so far.
            (
                ReadyInputs {
                    applied: 0,
                    ..SERVING
                },
                Err(NotReady::NothingApplied),
            ),
            (
                ReadyInputs {
                    applied: 0,
                    cluster_committed: None,
                    ..SERVING
                },
                Err(NotReady::NothingApplied),
            ),
            // Restarted with its own log, not yet told how far the cluster went meanwhile.
            (
                ReadyInputs {
                    cluster_committed: None,
                    ..SERVING
                },
                Err(NotReady::CommitUnknown),
            ),
            // A bound of 0: ready only when fully caught up.
            (
                ReadyInputs {
                    max_lag: 0,
                    ..SERVING
                },
                Err(NotReady::CatchingUp {
                    behind: 10,
                    max_lag: 0,
                }),
            ),
            // Applied past what the leader last said (the leader's word travels with the next heartbeat).
            (
                ReadyInputs {
                    applied: 5003,
                    ..SERVING
                },
                Ok(()),
            ),
            (
                ReadyInputs {
                    leader: None,
                    ..SERVING
                },
                Err(NotReady::NoLeader),
            ),
            (ReadyInputs::default(), Err(NotReady::NotInCluster)),
            // Draining wins over everything, so a stopping node leaves its Service before it goes.
            (
                ReadyInputs {
                    draining: true,
                    ..SERVING
                },
                Err(NotReady::Draining),
            ),
            (
                ReadyInputs {
                    draining: true,
                    ..ReadyInputs::default()
                },
                Err(NotReady::Draining),
            ),
        ];
        for (inputs, expected) in cases {
            assert_eq!(readiness(inputs), *expected, "{inputs:?}");
        }
    }

    #[test]
    fn every_reason_reads_as_a_sentence() {
        for reason in [
            NotReady::Draining,
            NotReady::NotInCluster,
            NotReady::NoLeader,
            NotReady::CommitUnknown,
            NotReady::NothingApplied,
            NotReady::CatchingUp {
                behind: 7,
                max_lag: 5,
            },
        ] {
            let text = reason.to_string();
            assert!(text.len() > 10 && !text.ends_with('.'), "{text}");
        }
    }
}
