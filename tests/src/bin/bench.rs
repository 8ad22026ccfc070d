//! `vesper-bench`: record-put throughput and latency of a local 3-node Vesper cluster against a local 3-member
//! etcd cluster, side by side in one run, at several client counts.
//!
//! Both systems run on this machine with TLS on every port, and clients spread over all three members (each
//! forwards writes to its leader). Each client has its own connection and does one put at a time. Build in
//! release mode first: `cargo build --release --workspace --bins && target/release/vesper-bench`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use vesper_tests::cluster::{Cluster, NodeOptions};

mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Benchmark record puts: Vesper vs etcd.
#[derive(Debug, Parser)]
struct Args {
    /// Client counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    clients: Vec<usize>,
    /// Measured time per run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Spread clients over this many members (1: every client on the first member, normally the leader).
    #[arg(long, default_value_t = 3)]
    spread: usize,
    /// The etcd binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
}

/// Result of one run.
struct Outcome {
    /// One error message, to say what failed.
    sample_error: Option<String>,
    ops: u64,
    errors: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

impl Outcome {
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn p(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Runs `clients` workers doing `op` back to back for `duration`.
async fn drive<F, Fut>(clients: usize, duration: Duration, op: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for client in 0..clients {
        let op = op.clone();
        tasks.spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).expect("histogram");
            let (mut ops, mut errors, mut n) = (0u64, 0u64, 0u64);
            let mut sample_error = None;
            while Instant::now() < deadline {
                n += 1;
                let begin = Instant::now();
                match op(client, n).await {
                    Ok(()) => {
                        ops += 1;
                        let _ = histogram.record(begin.elapsed().as_micros() as u64);
                    }
                    Err(error) => {
                        errors += 1;
                        sample_error.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            (ops, errors, histogram, sample_error)
        });
    }
    let mut outcome = Outcome {
        sample_error: None,
        ops: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: Histogram::new(3).expect("histogram"),
    };
    while let Some(joined) = tasks.join_next().await {
        let (ops, errors, histogram, sample_error) = joined.expect("bench task");
        if outcome.sample_error.is_none() {
            outcome.sample_error = sample_error;
        }
        outcome.ops += ops;
        outcome.errors += errors;
        outcome
            .latency_us
            .add(histogram)
            .expect("same histogram bounds");
    }
    outcome.elapsed = start.elapsed();
    outcome
}

/// CPU time (user + system) used so far by the given processes, from /proc.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // Clock ticks per second of /proc's utime and stime fields; 100 on Linux.
    const TICKS_PER_SECOND: f64 = 100.0;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which is in parentheses and may hold spaces).
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / TICKS_PER_SECOND)
        })
        .sum()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A 3-member etcd cluster with TLS on client and peer ports, using the Vesper test PKI.
struct Etcd {
    children: Vec<Child>,
    client_urls: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Etcd {
    fn start(
        binary: &Path,
        root: &Path,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> anyhow::Result<Etcd> {
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..3 {
            peers.push(format!("https://127.0.0.1:{}", free_port()?));
            clients.push(format!("https://127.0.0.1:{}", free_port()?));
        }
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(index, url)| format!("e{index}={url}"))
            .collect();
        let mut children = Vec::new();
        for index in 0..3 {
            let data = root.join(format!("etcd-{index}"));
            let log = std::fs::File::create(root.join(format!("etcd-{index}.log")))?;
            let child = Command::new(binary)
                .args(["--name", &format!("e{index}")])
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &clients[index]])
                .args(["--advertise-client-urls", &clients[index]])
                .args(["--listen-peer-urls", &peers[index]])
                .args(["--initial-advertise-peer-urls", &peers[index]])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--peer-cert-file")
                .arg(cert)
                .arg("--peer-key-file")
                .arg(key)
                .arg("--peer-trusted-ca-file")
                .arg(ca)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| {
                    format!("start {} (apt-get install etcd-server)", binary.display())
                })?;
            children.push(child);
        }
        Ok(Etcd {
            children,
            client_urls: clients,
        })
    }
}

async fn etcd_client(
    url: &str,
    ca_pem: &[u8],
    cert: &[u8],
    key: &[u8],
) -> anyhow::Result<etcd::kv_client::KvClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert, key))
        .domain_name("127.0.0.1");
    let channel = Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(etcd::kv_client::KvClient::new(channel))
}

fn row(system: &str, clients: usize, outcome: &Outcome, server_cpu: f64) {
    println!(
        "| {clients:>7} | {system:<6} | {:>10.0} | {:>8.2} | {:>8.2} | {:>6} | {:>13.1} |",
        outcome.throughput(),
        outcome.p(0.50),
        outcome.p(0.99),
        outcome.errors,
        server_cpu * 1e6 / outcome.ops.max(1) as f64,
    );
    if let Some(error) = &outcome.sample_error {
        eprintln!("  {system} error sample: {error}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.etcd.exists() {
        bail!(
            "{} not found: apt-get install etcd-server",
            args.etcd.display()
        );
    }
    let duration = Duration::from_secs(args.seconds);
    let value = vec![0x5a_u8; args.value_bytes];
    eprintln!("starting a 3-node Vesper cluster ...");
    let cluster = Cluster::start(3, NodeOptions::default()).await?;
    let (cert, key) = cluster.pki.superpeer_cert();
    let ca_pem = cluster.pki.ca_pem();
    eprintln!("starting a 3-member etcd cluster ...");
    let etcd = Etcd::start(
        &args.etcd,
        cluster.root(),
        &cluster.pki.ca_cert(),
        &cert,
        &key,
    )?;
    let (cert_pem, key_pem) = (std::fs::read(&cert)?, std::fs::read(&key)?);
    // Wait until etcd accepts a put on every member.
    for url in &etcd.client_urls {
        vesper_tests::wait::until("etcd to accept writes", Duration::from_secs(60), || async {
            let mut client = etcd_client(url, &ca_pem, &cert_pem, &key_pem).await?;
            client
                .put(etcd::PutRequest {
                    key: b"ready".to_vec(),
                    value: vec![],
                })
                .await?;
            Ok(Some(()))
        })
        .await?;
    }

    println!(
        "| clients | system | puts/s     | p50 ms   | p99 ms   | errors | server CPU µs/put |"
    );
    println!("|--------:|--------|-----------:|---------:|---------:|-------:|--------------:|");
    let vesper_pids: Vec<u32> = cluster.nodes.iter().filter_map(|node| node.pid()).collect();
    let etcd_pids: Vec<u32> = etcd.children.iter().map(Child::id).collect();
    let mut ratios = Vec::new();
    for (run, &clients) in args.clients.iter().enumerate() {
        let mut leaves = Vec::new();
        for client in 0..clients {
            leaves.push(cluster.leaf(client % args.spread).await?);
        }
        let leaves = Arc::new(leaves);
        let value_for_vesper = value.clone();
        // Keys are unique per run: a later run's leaves must not collide with an earlier run's records.
        let cpu_before = cpu_seconds(&vesper_pids);
        let ours = drive(clients, duration, move |client, n| {
            let (leaves, value) = (leaves.clone(), value_for_vesper.clone());
            async move {
                let attributes =
                    std::collections::HashMap::from([("kind".to_string(), "bench".to_string())]);
                leaves[client]
                    .put(
                        "bench",
                        &format!("run{run}-c{client}-{n}"),
                        attributes,
                        value,
                        None,
                    )
                    .await?;
                Ok(())
            }
        })
        .await;
        row(
            "vesper",
            clients,
            &ours,
            cpu_seconds(&vesper_pids) - cpu_before,
        );

        let mut kv = Vec::new();
        for client in 0..clients {
            kv.push(
                etcd_client(&etcd.client_urls[client % 3], &ca_pem, &cert_pem, &key_pem).await?,
            );
        }
        let kv = Arc::new(kv);
        let value_for_etcd = value.clone();
        let cpu_before = cpu_seconds(&etcd_pids);
        let theirs = drive(clients, duration, move |client, n| {
            let (kv, value) = (kv.clone(), value_for_etcd.clone());
            async move {
                kv[client]
                    .clone()
                    .put(etcd::PutRequest {
                        key: format!("bench/run{run}-c{client}-{n}").into_bytes(),
                        value,
                    })
                    .await?;
                Ok(())
            }
        })
        .await;
        row(
            "etcd",
            clients,
            &theirs,
            cpu_seconds(&etcd_pids) - cpu_before,
        );
        ratios.push((
            clients,
            ours.throughput() / theirs.throughput(),
            ours.p(0.99) / theirs.p(0.99),
        ));
    }
    println!();
    for (clients, throughput, p99) in ratios {
        println!(
            "{clients} clients: vesper/etcd throughput {throughput:.2}x, p99 latency {p99:.2}x"
        );
    }
    drop(etcd);
    Ok(())
}
