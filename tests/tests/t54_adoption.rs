//! Adoption: a voter is SIGKILLed and a node that only ran a leaf takes its place. Real `superpeer` processes
//! holding the certificate issuer (`vesperctl ca issuer`), a real `leafpeer serve --offer-superpeer` process as
//! the candidate, the candidate gates and placement timers shortened through settings. The candidate is proven,
//! granted and eligible; after the kill the controller adopts it: an issuer signs a super peer certificate for
//! its own key, its leaf process starts `superpeer` on the role's ports, the node joins as a standby, catches
//! up, and replaces the dead voter; the dead voter is retired and its certificate revoked; no acknowledged
//! write is lost. The adopted node presents only its issued certificate, so the Cluster port took a chain
//! through the intermediate issuer.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use vesper_proto::v1::{MemberRole, StatusResponse};
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::load::{self, Load};
use vesper_tests::wait;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Candidate gates short enough for a test (a second of uptime is "stable"), proofs that stay fresh through
/// the kill (a 3-node cluster with one node dead has one prover left besides a host: no new proof then), and
/// issued certificates that live 15 s, so the adopted node renews its own within the test.
const RULES: &str = "[placement]
issued_validity = \"15s\"

[placement.candidates]
min_uptime = \"1s\"
min_mean_session = \"1s\"
max_sessions_per_day = 3
proof_interval = \"2s\"
proof_ttl = \"60s\"
report_interval = \"300ms\"
refresh = \"5s\"
min_cores = 1
min_free_memory_bytes = 1048576
min_free_disk_bytes = 1048576
";

/// Placement timers of every super peer, the adopted one included.
const TIMERS: [&str; 12] = [
    "--tls-reload-interval",
    "200ms",
    "--placement-update-interval",
    "100ms",
    "--placement-reconcile-interval",
    "300ms",
    "--placement-stabilization",
    "1500ms",
    "--placement-dead-voter-after",
    "3s",
    "--placement-dead-standby-after",
    "6s",
];

fn vesperctl(cluster: &Cluster, node: usize, args: &[&str]) -> anyhow::Result<Value> {
    cluster.vesperctl_json(node, args)
}

fn voter_ids(status: &StatusResponse) -> Vec<u64> {
    status
        .members
        .iter()
        .filter(|member| member.role == MemberRole::Voter as i32)
        .map(|member| member.node_id)
        .collect()
}

/// Waits until a running node that knows a leader reports a status for which `accept` holds.
async fn wait_status(
    cluster: &mut Cluster,
    what: &str,
    accept: impl Fn(&StatusResponse) -> bool,
) -> anyhow::Result<StatusResponse> {
    cluster.wait_status(what, TIMEOUT, accept).await
}

/// The candidate: `leafpeer serve --offer-superpeer`, its verdicts (JSON lines) kept as they come.
struct Candidate {
    child: tokio::process::Child,
    last: Arc<Mutex<Value>>,
    peer_id: String,
}

impl Candidate {
    async fn start(
        cluster: &Cluster,
        dir: &std::path::Path,
        config: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let key = dir.join("leaf.key");
        let keypair = vesper_leafpeer::Keypair::load_or_generate(&key)?;
        let mut command = tokio::process::Command::new(vesper_tests::binary("leafpeer"));
        command
            .arg("--seeds")
            .arg(cluster.leaf_addrs().join(","))
            .arg("--ca")
            .arg(cluster.pki.ca_cert())
            .arg("--key")
            .arg(&key)
            .arg("--json")
            .args(["serve", "--offer-superpeer", "--role-dir"])
            .arg(dir.join("role"))
            .arg("--superpeer-bin")
            .arg(vesper_tests::binary("superpeer"))
            .args(["--role-ip", "127.0.0.1", "--role-ports", "0,0,0"])
            .arg(format!("--role-arg=--config={}", config.display()));
        for arg in TIMERS {
            command.arg(format!("--role-arg={arg}"));
        }
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().context("start leafpeer serve")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let last = Arc::new(Mutex::new(Value::Null));
        let keep = last.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if value.get("state").is_some() {
                        *keep.lock().expect("verdict lock") = value;
                    }
                }
            }
        });
        Ok(Self {
            child,
            last,
            peer_id: keypair.peer_id().to_string(),
        })
    }

    fn state(&self) -> Value {
        self.last.lock().expect("verdict lock").clone()
    }

    async fn wait_state(&self, state: &str) -> anyhow::Result<Value> {
        wait::until(&format!("the candidate {state}"), TIMEOUT, || async {
            let last = self.state();
            Ok((last["state"] == state).then_some(last))
        })
        .await
        .with_context(|| format!("last verdict {}", self.state()))
    }

    /// Ends `serve` as a user does (SIGTERM); the role's super peer ends with it.
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(TIMEOUT, self.child.wait())
            .await
            .context("leafpeer serve to end on SIGTERM")??;
        Ok(())
    }
}

/// Three voters on three loopback IPs, each with its own certificate and the issuer, the test timers and
/// `adoption_timeout`; `config` holds the candidate gates.
async fn cluster(config: &std::path::Path, adoption_timeout: &str) -> anyhow::Result<Cluster> {
    let mut options = NodeOptions {
        listen_ips: ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|ip| ip.parse().expect("ip"))
            .collect(),
        per_node_certs: true,
        issuer: true,
        extra_args: vec!["--config".into(), config.display().to_string()],
        ..NodeOptions::default()
    };
    options.extra_args.extend(TIMERS.map(String::from));
    options.extra_args.extend([
        "--placement-adoption-timeout".into(),
        adoption_timeout.into(),
    ]);
    Cluster::start(3, options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t54_a_killed_voter_is_replaced_by_an_adopted_candidate_and_no_write_is_lost(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("superpeer.toml");
    std::fs::write(&config, RULES)?;
    let mut cluster = cluster(&config, "60s").await?;
    // No warm standby wanted: the kill is what makes the controller adopt.
    vesperctl(&cluster, 0, &["placement", "set", "--standbys", "0"])?;
    vesperctl(&cluster, 0, &["placement", "grant", "--all"])?;

    let candidate_dir = tempfile::tempdir()?;
    let candidate = Candidate::start(&cluster, candidate_dir.path(), &config).await?;
    let verdict = candidate.wait_state("eligible").await?;
    // The proof measured the round trip from the provers (loopback here: well under the 5 ms of full points).
    let listed = wait::until(
        "the candidate's round trip in placement status",
        TIMEOUT,
        || {
            let status = vesperctl(&cluster, 0, &["placement", "status"]);
            async move {
                let status = status?;
                let rtt = status["candidates"]
                    .as_array()
                    .and_then(|candidates| candidates.first())
                    .and_then(|candidate| candidate["rtt_us"].as_u64());
                Ok(rtt.map(|rtt| (rtt, status)))
            }
        },
    )
    .await?;
    ensure!(listed.0 > 0 && listed.0 < 5_000, "{}", listed.1);
    ensure!(
        verdict["gates"]
            .as_array()
            .is_some_and(|gates| gates.iter().all(|gate| gate["passed"] == true)),
        "{verdict}"
    );
    // Nothing is adopted while the cluster is at its targets.
    let status = vesperctl(&cluster, 0, &["placement", "status"])?;
    ensure!(status["adoption"].is_null(), "{status}");

    let leader = cluster.wait_leader().await?;
    let before = cluster.status_of(leader).await?;
    let victim_index = (leader + 1) % 3;
    let victim = cluster
        .node_id_in(&before, victim_index)
        .context("victim's id")?;
    let mut leaves = Vec::new();
    for index in (0..3).filter(|&index| index != victim_index) {
        leaves.push(cluster.leaf(index).await?);
    }
    let reader = cluster.leaf(leader).await?;
    let load = Load::start(leaves, "adoption", "a");
    wait::until("writes before the kill", TIMEOUT, || async {
        Ok((load.acknowledged() >= 20).then_some(()))
    })
    .await?;

    let killed_at = Instant::now();
    cluster.kill(victim_index);
    let serving = candidate.wait_state("serving").await?;
    let serving_after = killed_at.elapsed();
    ensure!(
        candidate_dir.path().join("role/role/cert.pem").exists(),
        "{serving}"
    );
    let peer_id = candidate.peer_id.clone();
    let restored = wait_status(
        &mut cluster,
        "the adopted node voting in the killed voter's place",
        |status| {
            let voters = voter_ids(status);
            let adopted = status
                .members
                .iter()
                .any(|member| member.peer_id == peer_id && member.role == MemberRole::Voter as i32);
            voters.len() == 3 && !voters.contains(&victim) && adopted
        },
    )
    .await?;
    let restored_after = killed_at.elapsed();
    let adopted = restored
        .members
        .iter()
        .find(|member| member.peer_id == peer_id)
        .context("the adopted member")?
        .clone();
    ensure!(
        adopted.cluster_addr.starts_with("127.0.0.1:"),
        "{adopted:?}"
    );

    // Its certificate is short-lived: it renews it from an issuer and presents the new one.
    let first_certificate = adopted.certificate.clone();
    ensure!(!first_certificate.is_empty(), "{adopted:?}");
    let adopted_id = adopted.node_id;
    let renewed = wait_status(
        &mut cluster,
        "the adopted node's certificate renewed",
        |status| {
            status.members.iter().any(|member| {
                member.node_id == adopted_id
                    && !member.certificate.is_empty()
                    && member.certificate != first_certificate
            })
        },
    )
    .await?;
    let renewed_after = killed_at.elapsed();
    ensure!(
        renewed
            .members
            .iter()
            .any(|member| member.node_id == adopted_id && member.role == MemberRole::Voter as i32),
        "{renewed:?}"
    );

    // The journal tells the story: adopted, finished, the dead voter replaced by the adopted node.
    let survivor = cluster.running()[0];
    let explain = wait::until("the adoption in the journal", TIMEOUT, || async {
        let explain = vesperctl(&cluster, survivor, &["placement", "explain", "--all"])?;
        let actions: Vec<(String, String)> = explain["journal"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|entry| {
                (
                    entry["action"].as_str().unwrap_or_default().to_string(),
                    entry["outcome"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let logged = |prefix: &str, outcome_starts: &str| {
            actions.iter().any(|(action, outcome)| {
                action.starts_with(prefix) && outcome.starts_with(outcome_starts)
            })
        };
        let done = |prefix: &str| logged(prefix, "done");
        let complete = logged(&format!("adopt candidate {peer_id}"), "started")
            && done(&format!("finish the adoption of candidate {peer_id}"))
            && done(&format!(
                "replace voter {victim} by standby {}",
                adopted.node_id
            ));
        Ok(complete.then_some(explain))
    })
    .await
    .with_context(|| {
        format!(
            "journal: {}",
            vesperctl(&cluster, survivor, &["placement", "explain", "--all"])
                .map(|explain| explain["journal"].to_string())
                .unwrap_or_default()
        )
    })?;

    // The adopted member keeps its candidate score (so a clearly better standby could one day take its seat);
    // the members the operator started have none and are never swapped out for one.
    let operator_ids: Vec<u64> = cluster
        .running()
        .into_iter()
        .filter_map(|index| cluster.node_id_in(&before, index))
        .collect();
    let scored = wait::until(
        "the adopted member's score in placement status",
        TIMEOUT,
        || {
            let status = vesperctl(&cluster, survivor, &["placement", "status"]);
            let operator_ids = &operator_ids;
            async move {
                let status = status?;
                let members = status["members"].as_array().cloned().unwrap_or_default();
                let score_of = |id: u64| {
                    members
                        .iter()
                        .find(|member| member["node_id"] == id)
                        .map(|member| member["score"].clone())
                };
                let adopted_score = score_of(adopted.node_id).and_then(|score| score.as_u64());
                let operators_unscored = operator_ids
                    .iter()
                    .all(|id| score_of(*id).is_none_or(|score| score.is_null()));
                Ok(adopted_score
                    .filter(|_| operators_unscored)
                    .map(|score| (score, status)))
            }
        },
    )
    .await?;
    ensure!(scored.0 <= 20, "{}", scored.1);

    // The dead voter is retired, and its certificate is refused.
    wait_status(&mut cluster, "the killed voter retired", |status| {
        status
            .members
            .iter()
            .any(|member| member.node_id == victim && member.role == MemberRole::Removed as i32)
    })
    .await?;
    let (cert, key) = cluster.node_cert(victim_index)?;
    for index in cluster.running() {
        cluster.wait_revoked_on(index, &cert, &key, TIMEOUT).await?;
    }

    let report = load.stop().await;
    load::verify(&reader, "adoption", &report.acknowledged).await?;
    println!(
        "adoption: voter killed -> candidate serving after {:.1} s, voting after {:.1} s, its certificate renewed after {:.1} s; {} writes acknowledged, none lost; journal {}",
        serving_after.as_secs_f64(),
        restored_after.as_secs_f64(),
        renewed_after.as_secs_f64(),
        report.acknowledged.len(),
        explain["journal"].as_array().map_or(0, Vec::len)
    );

    // Ending `serve` ends the role it hosts.
    let role_addr = adopted.cluster_addr.clone();
    candidate.stop().await?;
    wait::until("the role's super peer to end", TIMEOUT, || async {
        Ok(tokio::net::TcpStream::connect(&role_addr)
            .await
            .is_err()
            .then_some(()))
    })
    .await?;
    Ok(())
}

/// A candidate whose role never joins (its `superpeer` binary answers `--build-info` and nothing else): the
/// adoption is given up at its deadline, the certificate it got is revoked, the candidate cools down, the
/// controller can act again, and the node, released, stops its role and offers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t54_an_adoption_that_never_joins_is_given_up_and_its_certificate_revoked(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("superpeer.toml");
    std::fs::write(&config, RULES)?;
    let cluster = cluster(&config, "4s").await?;
    vesperctl(&cluster, 0, &["placement", "grant", "--all"])?;

    let broken = dir.path().join("broken-superpeer");
    std::fs::write(
        &broken,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --build-info ]; then exec {} --build-info; fi\nexit 3\n",
            vesper_tests::binary("superpeer").display()
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755))?;
    }
    let keypair = vesper_leafpeer::Keypair::generate();
    let peer_id = keypair.peer_id().to_string();
    let state = tempfile::tempdir()?;
    let mut leaf_config = cluster.leaf_config(0, keypair);
    leaf_config.publish_endpoints = true;
    leaf_config.offer_super_peer = Some(vesper_leafpeer::SuperPeerOffer {
        superpeer_binary: broken,
        state_dir: state.path().to_path_buf(),
        listen_ip: std::net::IpAddr::from([127, 0, 0, 1]),
        cluster_port: 0,
        leaf_port: 0,
        admin_port: 0,
        zone: None,
        metered: false,
        on_battery: false,
        role_args: Vec::new(),
    });
    let leaf = vesper_leafpeer::Leaf::connect(leaf_config).await?;
    wait::until("the candidate eligible", TIMEOUT, || async {
        Ok(leaf
            .offer_status()
            .filter(|status| status.state == "eligible")
            .map(|_| ()))
    })
    .await?;
    // Ask for a warm standby: the controller adopts the candidate.
    vesperctl(&cluster, 0, &["placement", "set", "--standbys", "1"])?;
    wait::until("the role failing to start", TIMEOUT, || async {
        Ok(leaf
            .offer_status()
            .filter(|status| status.state == "restarting")
            .map(|_| ()))
    })
    .await?;
    let (why, outcome) = wait::until("the adoption given up", TIMEOUT, || async {
        let explain = vesperctl(&cluster, 0, &["placement", "explain", "--all"])?;
        Ok(explain["journal"].as_array().and_then(|journal| {
            journal.iter().find_map(|entry| {
                (entry["action"] == format!("give up the adoption of candidate {peer_id}").as_str())
                    .then(|| {
                        (
                            entry["why"].as_str().unwrap_or_default().to_string(),
                            entry["outcome"].as_str().unwrap_or_default().to_string(),
                        )
                    })
            })
        }))
    })
    .await?;
    ensure!(why.contains("did not join"), "{why}");
    ensure!(
        outcome.contains("is revoked") && outcome.contains("cools down"),
        "{outcome}"
    );
    // The candidate is in its cooldown, nothing is adopted, and the controller is free again.
    let status = wait::until("the candidate cooling down", TIMEOUT, || async {
        let status = vesperctl(&cluster, 0, &["placement", "status"])?;
        let cooling = status["candidates"].as_array().is_some_and(|candidates| {
            candidates.iter().any(|candidate| {
                candidate["peer_id"] == peer_id.as_str()
                    && candidate["gates"].as_array().is_some_and(|gates| {
                        gates
                            .iter()
                            .any(|gate| gate["name"] == "cooldown" && gate["passed"] == false)
                    })
            })
        });
        Ok((cooling && status["adoption"].is_null()).then_some(status))
    })
    .await
    .with_context(|| {
        format!(
            "placement status: {}",
            vesperctl(&cluster, 0, &["placement", "status"]).unwrap_or_default()
        )
    })?;
    ensure!(status["blocked"] != "adopting", "{status}");
    // The node hears that the cluster released it: its role is stopped, the role's files are deleted, and it
    // offers again (answering proofs on its ports), judged in its cooldown.
    let verdict = wait::until("the node offering again, cooling down", TIMEOUT, || async {
        Ok(leaf.offer_status().filter(|status| {
            status.state == "candidate"
                && status
                    .gates
                    .iter()
                    .any(|gate| gate.name == "cooldown" && !gate.passed)
        }))
    })
    .await
    .with_context(|| format!("last verdict {:?}", leaf.offer_status()))?;
    ensure!(
        !state.path().join("role").exists() && !state.path().join("data").exists(),
        "the released role's files are deleted"
    );
    ensure!(
        verdict.gates.iter().any(|gate| gate.name == "proof"),
        "{verdict:?}"
    );
    leaf.detach().await;
    Ok(())
}
