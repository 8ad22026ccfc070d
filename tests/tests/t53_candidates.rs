//! Candidates: leaves that offer to serve as super peers. Real `superpeer` processes on three loopback IPs (so
//! leaves classify their NAT), real leaf libraries answering dial-back proofs on their role ports, and the
//! candidate gates with short timers from a config file. A steady candidate is proven reachable, stays a
//! candidate until an operator grants it eligibility and then becomes eligible, and `placement status` says
//! why it is not adopted; a flapping one (a new session again and again) never becomes eligible; absurd
//! reports and report floods are refused with the reason.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde_json::Value;
use vesper_leafpeer::{Keypair, Leaf, OfferStatus, SuperPeerOffer};
use vesper_proto::v1::OfferSuperPeerRequest;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::{raw, wait};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Candidate gates short enough for a test: a second of uptime is "stable".
const RULES: &str = "[placement.candidates]
min_uptime = \"1s\"
min_mean_session = \"1s\"
max_sessions_per_day = 3
proof_interval = \"2s\"
proof_ttl = \"20s\"
report_interval = \"400ms\"
refresh = \"5s\"
min_cores = 1
min_free_memory_bytes = 1048576
min_free_disk_bytes = 1048576
";

async fn cluster() -> anyhow::Result<(Cluster, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("superpeer.toml");
    std::fs::write(&config, RULES)?;
    let options = NodeOptions {
        listen_ips: ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|ip| ip.parse().expect("ip"))
            .collect(),
        extra_args: vec!["--config".into(), config.display().to_string()],
        ..NodeOptions::default()
    };
    Ok((Cluster::start(3, options).await?, dir))
}

fn offer(state_dir: &std::path::Path) -> SuperPeerOffer {
    SuperPeerOffer {
        superpeer_binary: vesper_tests::binary("superpeer"),
        state_dir: state_dir.to_path_buf(),
        listen_ip: IpAddr::from([127, 0, 0, 1]),
        cluster_port: 0,
        leaf_port: 0,
        admin_port: 0,
        zone: Some("zone-a".into()),
        metered: false,
        on_battery: false,
        role_args: Vec::new(),
    }
}

async fn candidate(
    cluster: &Cluster,
    index: usize,
    keypair: Keypair,
    state_dir: &std::path::Path,
) -> anyhow::Result<Leaf> {
    let mut config = cluster.leaf_config(index, keypair);
    config.publish_endpoints = true;
    config.offer_super_peer = Some(offer(state_dir));
    Ok(Leaf::connect(config).await?)
}

fn gate<'a>(status: &'a OfferStatus, name: &str) -> Option<&'a vesper_leafpeer::Gate> {
    status.gates.iter().find(|gate| gate.name == name)
}

/// Waits until the leaf's latest verdict satisfies `accept`.
async fn wait_verdict(
    leaf: &Leaf,
    what: &str,
    accept: impl Fn(&OfferStatus) -> bool,
) -> anyhow::Result<OfferStatus> {
    let accept = &accept;
    wait::until(what, TIMEOUT, || async {
        Ok(leaf.offer_status().filter(|status| accept(status)))
    })
    .await
    .with_context(|| format!("last verdict: {:?}", leaf.offer_status()))
}

fn vesperctl(cluster: &Cluster, args: &[&str]) -> anyhow::Result<Value> {
    let output = cluster.vesperctl(0, &[args, &["--json"]].concat())?;
    ensure!(
        output.status.success(),
        "vesperctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t53_a_steady_candidate_is_proven_then_eligible_once_granted_and_a_flapping_one_never(
) -> anyhow::Result<()> {
    let (cluster, _dir) = cluster().await?;
    let steady_dir = tempfile::tempdir()?;
    let steady_key = Keypair::generate();
    let steady_id = steady_key.peer_id().to_string();
    let steady = candidate(&cluster, 0, steady_key, steady_dir.path()).await?;

    // Proven reachable by two other super peers, public, stable: only the operator's grant is missing.
    let verdict = wait_verdict(
        &steady,
        "the steady candidate proven and waiting for a grant",
        |status| {
            status.state == "candidate"
                && status
                    .gates
                    .iter()
                    .all(|gate| gate.passed || gate.name == "granted")
        },
    )
    .await?;
    ensure!(verdict.proof_at_ms.is_some(), "{verdict:?}");
    ensure!(!gate(&verdict, "granted").context("granted gate")?.passed);
    // Its uptime history is kept in its state directory.
    ensure!(steady_dir.path().join("uptime-history").exists());

    // Nothing is eligible before the grant.
    let status = vesperctl(&cluster, &["placement", "status"])?;
    let listed = status["candidates"]
        .as_array()
        .context("candidates")?
        .iter()
        .find(|candidate| candidate["peer_id"] == steady_id.as_str())
        .cloned()
        .with_context(|| format!("the candidate is not listed: {status}"))?;
    ensure!(listed["state"] == "candidate", "{listed}");
    let expected_addr = format!("127.0.0.1:{}", verdict.ports[0]);
    ensure!(listed["cluster_addr"] == expected_addr.as_str(), "{listed}");

    vesperctl(&cluster, &["placement", "grant", &steady_id])?;
    let verdict = wait_verdict(&steady, "the steady candidate eligible", |status| {
        status.state == "eligible"
    })
    .await?;
    ensure!(verdict.gates.iter().all(|gate| gate.passed), "{verdict:?}");
    let status = wait::until(
        "the eligible candidate in placement status",
        TIMEOUT,
        || async {
            let status = vesperctl(&cluster, &["placement", "status"])?;
            let eligible = status["candidates"].as_array().is_some_and(|candidates| {
                candidates.iter().any(|candidate| {
                    candidate["peer_id"] == steady_id.as_str() && candidate["state"] == "eligible"
                })
            });
            Ok(eligible.then_some(status))
        },
    )
    .await?;
    ensure!(
        status["adoption"]
            .as_str()
            .is_some_and(|text| text.contains("certificate issuer")),
        "the operator is told why eligible candidates are not adopted: {status}"
    );
    ensure!(status["granted"][0] == steady_id.as_str(), "{status}");

    // A flapping candidate: granted, but a new session four times in a row.
    vesperctl(&cluster, &["placement", "grant", "--all"])?;
    let flapping_key = Keypair::generate();
    let flapping_dir = tempfile::tempdir()?;
    for round in 0..4 {
        let leaf = candidate(
            &cluster,
            round % 3,
            flapping_key.clone(),
            flapping_dir.path(),
        )
        .await?;
        wait_verdict(&leaf, "a verdict for the flapping candidate", |_| true).await?;
        if round < 3 {
            leaf.detach().await;
        } else {
            let verdict = wait_verdict(&leaf, "the flapping gate to fail", |status| {
                gate(status, "flapping").is_some_and(|gate| !gate.passed)
            })
            .await?;
            ensure!(verdict.state == "candidate", "{verdict:?}");
            // It stays so while the steady one stays eligible.
            ensure!(steady
                .offer_status()
                .is_some_and(|status| status.state == "eligible"));
            leaf.detach().await;
        }
    }
    // The history file counts the flapping node's runs (its own account, shown but not trusted).
    let history = std::fs::read_to_string(flapping_dir.path().join("uptime-history"))?;
    ensure!(history.lines().count() == 4, "{history}");
    steady.detach().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t53_absurd_reports_and_floods_are_refused_with_the_reason() -> anyhow::Result<()> {
    let (cluster, _dir) = cluster().await?;
    let address = cluster.nodes[0].endpoints().leaf.to_string();
    let keypair = Keypair::generate();
    let ca = cluster.leaf_config(0, keypair.clone()).ca_cert_pem;
    let channel = raw::channel(&address, &ca).await?;
    let session = raw::open(channel, &keypair, raw::Signing::Valid).await?;
    let mut client = session.client.clone();
    let absurd = OfferSuperPeerRequest {
        offer: true,
        cores: 0,
        cluster_port: 1,
        leaf_port: 2,
        admin_port: 3,
        ..Default::default()
    };
    let refused = client
        .offer_super_peer(session.request(absurd))
        .await
        .expect_err("cores 0 is refused");
    ensure!(
        refused.code() == tonic::Code::InvalidArgument,
        "{refused:?}"
    );
    ensure!(refused.message().contains("cores 0"), "{refused:?}");

    // A sane report is taken; one right after it is refused as a flood.
    let sane = sane_report();
    let first = client
        .offer_super_peer(session.request(sane.clone()))
        .await?
        .into_inner();
    // Nothing listens on ports 1-3 of this host: the proof fails, and says so.
    let proof = first
        .gates
        .iter()
        .find(|gate| gate.name == "proof")
        .context("proof gate")?;
    ensure!(!proof.passed, "{first:?}");
    let flood = client
        .offer_super_peer(session.request(sane))
        .await
        .expect_err("a second report at once is refused");
    ensure!(flood.code() == tonic::Code::ResourceExhausted, "{flood:?}");

    // A node that claims to run a role the cluster never gave it is told "released", and nothing is written.
    let stranger = Keypair::generate();
    let channel = raw::channel(&address, &ca).await?;
    let other = raw::open(channel, &stranger, raw::Signing::Valid).await?;
    let claim = OfferSuperPeerRequest {
        role_running: true,
        ..sane_report()
    };
    let answer = other
        .client
        .clone()
        .offer_super_peer(other.request(claim))
        .await?
        .into_inner();
    ensure!(answer.state == "released", "{answer:?}");
    let status = cluster.vesperctl_json(0, &["placement", "status"])?;
    let listed = status["candidates"].as_array().is_some_and(|candidates| {
        candidates
            .iter()
            .any(|candidate| candidate["peer_id"] == stranger.peer_id().to_string().as_str())
    });
    ensure!(
        !listed,
        "a released claim writes no candidate entry: {status}"
    );
    Ok(())
}

fn sane_report() -> OfferSuperPeerRequest {
    OfferSuperPeerRequest {
        offer: true,
        software_version: "0.1.0".into(),
        cores: 2,
        cluster_port: 1,
        leaf_port: 2,
        admin_port: 3,
        ..Default::default()
    }
}
