//! `vesper-bench-connect`: how long a direct connection between two leaves takes to carry its first byte,
//! through the NAT lab with emulated round-trip times.
//!
//! For each RTT the lab is built anew: two super peers, two hosts behind port-restricted ("easy") NATs and one
//! behind a symmetric NAT, every packet into a host's edge delayed by RTT/2 (so RTT between two hosts, RTT/2
//! between a host and a super peer). Leaves run in this process, each in its host's namespace. A run: the caller asks
//! to connect, opens a stream and writes one byte; the target's app reads it. Reported per run: from the
//! caller's plan to the first byte at the target (the goal: within 1.5 round trips), from the connect
//! call to that byte, and QUIC's own RTT estimate.
//!
//! Needs root (namespaces, iptables, NFQUEUE). Build in release mode first:
//! `cargo build --release --workspace --bins && $CARGO_TARGET_DIR/release/vesper-bench-connect`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tokio::sync::mpsc;
use vesper_leafpeer::{Path, PeerId};
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::natlab::{Lab, LabHost, NatKind};

/// Time to first byte of a direct connection through the NAT lab at emulated RTTs.
#[derive(Debug, Parser)]
struct Args {
    /// Round-trip times between two lab hosts, in milliseconds (0: no emulated delay).
    #[arg(long, value_delimiter = ',', default_value = "0,20,80")]
    rtts: Vec<u64>,
    /// Connections per pair and RTT.
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

/// One measured connection.
struct Sample {
    plan_to_byte: Duration,
    request_to_byte: Duration,
    quic_rtt: Duration,
    direct: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "{:>7} {:<32} {:>5} {:>9} {:>12} {:>12} {:>14} {:>12}",
        "rtt ms",
        "pair",
        "runs",
        "direct",
        "quic rtt ms",
        "plan->1st ms",
        "plan->1st rtts",
        "call->1st ms"
    );
    for &rtt in &args.rtts {
        let mut lab = Lab::new(2)?;
        let easy_a = lab.add_host(NatKind::Easy)?;
        let easy_b = lab.add_host(NatKind::Easy)?;
        let symmetric = lab.add_host(NatKind::Symmetric)?;
        let inbound = Duration::from_millis(rtt) / 2;
        let _delays = if rtt > 0 {
            vec![
                lab.delay(&easy_a, inbound)?,
                lab.delay(&easy_b, inbound)?,
                lab.delay(&symmetric, inbound)?,
            ]
        } else {
            Vec::new()
        };
        let lab = Arc::new(lab);
        let ips = vec![lab.super_peer_ip(0).into(), lab.super_peer_ip(1).into()];
        let cluster = Arc::new(lab.run_in(&lab.inet(), async move {
            Cluster::start(
                2,
                NodeOptions {
                    listen_ips: ips,
                    ..NodeOptions::default()
                },
            )
            .await
        })?);
        for (name, caller) in [
            ("easy -> easy", &easy_a),
            ("symmetric -> easy (port prediction)", &symmetric),
        ] {
            let samples = measure(&lab, &cluster, caller, &easy_b, args.runs)?;
            report(rtt, name, &samples);
        }
        // The cluster's processes live in the lab's namespaces: stop them before the lab goes.
        drop(cluster);
    }
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report(rtt: u64, name: &str, samples: &[Sample]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let quic_rtt = median(samples.iter().map(|s| ms(s.quic_rtt)).collect());
    let plan = median(samples.iter().map(|s| ms(s.plan_to_byte)).collect());
    let call = median(samples.iter().map(|s| ms(s.request_to_byte)).collect());
    let in_rtts = if rtt > 0 {
        format!("{:.2}", plan / rtt as f64)
    } else {
        "-".into()
    };
    println!(
        "{rtt:>7} {name:<32} {:>5} {:>9} {quic_rtt:>12.1} {plan:>12.1} {in_rtts:>14} {call:>12.1}",
        samples.len(),
        samples.iter().filter(|s| s.direct).count(),
    );
}

/// `runs` connections from `caller` to `target`, each timed to the first byte the target's app reads.
fn measure(
    lab: &Arc<Lab>,
    cluster: &Arc<Cluster>,
    caller: &LabHost,
    target: &LabHost,
    runs: usize,
) -> anyhow::Result<Vec<Sample>> {
    let (id_tx, mut id_rx) = mpsc::unbounded_channel::<PeerId>();
    let (byte_tx, mut byte_rx) = mpsc::unbounded_channel::<Instant>();
    let acceptor = {
        let (lab, cluster, ns) = (lab.clone(), cluster.clone(), target.ns.clone());
        std::thread::spawn(move || {
            lab.run_in(&ns, async move {
                let leaf = cluster.leaf(1).await?;
                leaf.set_connect_policy(|_| true);
                let mut incoming = leaf
                    .incoming_connections()
                    .context("incoming connections")?;
                id_tx.send(leaf.peer_id())?;
                for _ in 0..runs {
                    let connection = tokio::time::timeout(Duration::from_secs(60), incoming.recv())
                        .await
                        .context("no connection within 60 s")?
                        .context("session ended")?;
                    let (_send, mut recv) = connection.accept_bi().await?;
                    let mut byte = [0u8; 1];
                    recv.read_exact(&mut byte).await?;
                    byte_tx.send(Instant::now())?;
                    // Keep the connection until the caller closes it.
                    let _ = connection.quic().closed().await;
                }
                anyhow::Ok(())
            })
        })
    };
    let caller_ns = caller.ns.clone();
    let samples = lab.run_in(&caller_ns, {
        let cluster = cluster.clone();
        async move {
            let leaf = cluster.leaf(0).await?;
            let target = id_rx.recv().await.context("the acceptor did not start")?;
            let mut samples = Vec::new();
            for _ in 0..runs {
                let called = Instant::now();
                let connection = leaf.connect_to(&target).await?;
                let (mut send, _recv) = connection.open_bi().await?;
                send.write_all(b"x").await?;
                let first_byte = tokio::time::timeout(Duration::from_secs(30), byte_rx.recv())
                    .await
                    .context("the first byte did not arrive")?
                    .context("the acceptor stopped")?;
                samples.push(Sample {
                    plan_to_byte: first_byte.saturating_duration_since(connection.planned_at()),
                    request_to_byte: first_byte.saturating_duration_since(called),
                    quic_rtt: connection.quic().rtt(),
                    direct: matches!(connection.path(), Path::Direct(_)),
                });
                connection.close().await;
            }
            anyhow::Ok(samples)
        }
    })?;
    acceptor
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    Ok(samples)
}
