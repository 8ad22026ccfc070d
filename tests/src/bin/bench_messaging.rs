//! `vesper-bench-messaging`: leaf-to-leaf messaging against NATS, side by side in one run.
//!
//! 1. Round trip: Vesper `send` returns when the recipient's library acknowledged the message (leaf -> super
//!    peer -> [super peer ->] leaf -> ack back), through one super peer and across two; NATS request/reply
//!    through one server. Same payload.
//! 2. Pipelined throughput: a window of sends in flight from one leaf to another (through one super peer and
//!    across two) vs NATS publish to a subscriber, counting what the receiver got per second. The cases take
//!    turns for `--rounds` rounds and the medians are compared, so a slow stretch of a shared machine hits
//!    every case.
//! 3. Memory per idle attached leaf: RSS growth of a super peer over N idle sessions vs nats-server's RSS growth
//!    over N idle connections.
//!
//! Both use TLS with the same test CA. Build in release mode first:
//! `cargo build --release --workspace --bins && target/release/vesper-bench-messaging`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use vesper_leafpeer::{Keypair, Leaf, LeafConfig};
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::rss_kib;

/// Benchmark leaf messaging: Vesper vs NATS.
#[derive(Debug, Parser)]
struct Args {
    /// Round trips measured per case.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
    /// Seconds of pipelined sending per system.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Messages in flight in the pipelined test. The default is a super peer's limit of sends in flight per
    /// session (`validate::MAX_SENDS_IN_FLIGHT`; the library holds any further sends back until one finishes);
    /// NATS publishes with no acknowledgement, so it has no such window.
    #[arg(long, default_value_t = vesper_proto::validate::MAX_SENDS_IN_FLIGHT)]
    window: usize,
    /// Rounds of the pipelined test; each round runs every case once, and the medians are compared.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Idle sessions / connections for the memory test.
    #[arg(long, default_value_t = 2000)]
    idle: usize,
    /// How the receiving app takes messages in the pipelined test: a handler (`on_message`, run on a thread of
    /// the blocking pool, so it may block) or the async stream (`messages()`).
    #[arg(long, value_enum, default_value_t = Receiver::Handler)]
    receiver: Receiver,
    /// The nats-server binary.
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    nats: std::path::PathBuf,
}

/// How the receiving app takes messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Receiver {
    Handler,
    Stream,
}

/// Counts the messages of kind "tp" that `receiver`'s app gets, by a handler or from its stream.
fn count_received(receiver: &Leaf, how: Receiver) -> Arc<AtomicU64> {
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    match how {
        Receiver::Handler => receiver.on_message("tp", move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        }),
        Receiver::Stream => {
            let mut stream = receiver.messages().expect("the stream is taken once");
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    received
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Raises this process's open-file limit (children inherit it), for thousands of sessions.
fn raise_fd_limit(wanted: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = Some(limit.maximum.map_or(wanted, |maximum| wanted.min(maximum)));
    let _ = setrlimit(Resource::Nofile, limit);
}

fn summary(histogram: &Histogram<u64>) -> (f64, f64, f64) {
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    (ms(0.5), ms(0.95), ms(0.99))
}

struct Nats {
    child: std::process::Child,
    url: String,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nats(
    binary: &std::path::Path,
    root: &std::path::Path,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<Nats> {
    let port = free_port()?;
    let config = root.join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nmax_connections: 100000\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n}}\n",
            cert.display(),
            key.display(),
            ca.display()
        ),
    )?;
    let log = std::fs::File::create(root.join("nats.log"))?;
    let child = std::process::Command::new(binary)
        .arg("-c")
        .arg(&config)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {} (apt-get install nats-server)", binary.display()))?;
    Ok(Nats {
        child,
        url: format!("tls://127.0.0.1:{port}"),
    })
}

async fn nats_client(url: &str, ca: &std::path::Path) -> anyhow::Result<async_nats::Client> {
    Ok(async_nats::ConnectOptions::new()
        .add_root_certificates(ca.to_path_buf())
        .require_tls(true)
        .connect(url)
        .await?)
}

async fn vesper_round_trips(
    sender: &Leaf,
    receiver: &Leaf,
    count: usize,
    payload: &[u8],
) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new(3)?;
    for _ in 0..count {
        let begin = Instant::now();
        sender
            .send(&receiver.peer_id(), "rt", payload.to_vec())
            .await?;
        histogram.record(begin.elapsed().as_micros() as u64)?;
    }
    Ok(histogram)
}

/// Messages per second a NATS subscriber gets while a publisher on another connection publishes back to
/// back for `duration`, flushing every 64 messages.
async fn nats_pipelined(
    url: &str,
    ca: &std::path::Path,
    duration: Duration,
    payload: &[u8],
) -> anyhow::Result<f64> {
    let publisher = nats_client(url, ca).await?;
    let subscriber = nats_client(url, ca).await?;
    let mut messages = subscriber.subscribe("tp").await?;
    subscriber.flush().await?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let counting = tokio::spawn(async move {
        while messages.next().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let start = Instant::now();
    while start.elapsed() < duration {
        for _ in 0..64 {
            publisher.publish("tp", payload.to_vec().into()).await?;
        }
        publisher.flush().await?;
    }
    let rate = received.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    counting.abort();
    Ok(rate)
}

/// Messages per second that `receiver`'s app gets while `window` tasks each send to it back to back for
/// `duration` (every send waits for its acknowledgement before the task sends the next).
async fn vesper_pipelined(
    sender: &Leaf,
    receiver: &Leaf,
    received: &AtomicU64,
    window: usize,
    duration: Duration,
    payload: &[u8],
) -> f64 {
    let before = received.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut senders = JoinSet::new();
    for _ in 0..window {
        let (sender, to, payload) = (sender.clone(), receiver.peer_id(), payload.to_vec());
        senders.spawn(async move {
            while start.elapsed() < duration {
                let _ = sender.send(&to, "tp", payload.clone()).await;
            }
        });
    }
    while senders.join_next().await.is_some() {}
    (received.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_fd_limit(1 << 20);
    let payload = vec![0x42u8; args.payload_bytes];
    eprintln!("starting a 3-node Vesper cluster and nats-server ...");
    // The per-session send limit (200/s by default) is lifted: this measures the path, not the limit.
    let options = NodeOptions {
        extra_args: [
            "--send-rate",
            "10000000",
            "--send-burst",
            "10000000",
            "--max-sessions-per-ip",
            "1000000",
        ]
        .map(String::from)
        .to_vec(),
        ..NodeOptions::default()
    };
    let cluster = Cluster::start(3, options).await?;
    let (cert, key) = cluster.pki.superpeer_cert();
    let ca = cluster.pki.ca_cert();
    let nats = start_nats(&args.nats, cluster.root(), &ca, &cert, &key)?;
    let nats_ready = vesper_tests::wait::until(
        "nats to accept connections",
        Duration::from_secs(30),
        || async { Ok(nats_client(&nats.url, &ca).await.ok()) },
    )
    .await?;
    drop(nats_ready);

    // --- round trips -------------------------------------------------------------------------------------
    let a = cluster.leaf(0).await?;
    let b_same = cluster.leaf(0).await?;
    let b_other = cluster.leaf(1).await?;
    for receiver in [&b_same, &b_other] {
        receiver.on_message("rt", |_| {});
    }
    // Warm up connections and code paths.
    vesper_round_trips(&a, &b_same, 200, &payload).await?;
    vesper_round_trips(&a, &b_other, 200, &payload).await?;
    let one = vesper_round_trips(&a, &b_same, args.round_trips, &payload).await?;
    let two = vesper_round_trips(&a, &b_other, args.round_trips, &payload).await?;

    let requester = nats_client(&nats.url, &ca).await?;
    let responder = nats_client(&nats.url, &ca).await?;
    let mut requests = responder.subscribe("rt").await?;
    let reply_client = responder.clone();
    let replier = tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            if let Some(reply) = message.reply {
                let _ = reply_client.publish(reply, message.payload).await;
            }
        }
    });
    responder.flush().await?;
    // The subscription can take a moment to be in place on a busy machine ("no responders").
    vesper_tests::wait::until(
        "the nats responder to answer",
        Duration::from_secs(10),
        || async { Ok(requester.request("rt", payload.clone().into()).await.ok()) },
    )
    .await?;
    let mut nats_rt = Histogram::<u64>::new(3)?;
    for n in 0..(args.round_trips + 200) {
        let begin = Instant::now();
        requester.request("rt", payload.clone().into()).await?;
        if n >= 200 {
            nats_rt.record(begin.elapsed().as_micros() as u64)?;
        }
    }
    replier.abort();
    println!(
        "## Round trip ({} bytes, {} each)\n",
        args.payload_bytes, args.round_trips
    );
    println!("| path | p50 ms | p95 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for (name, histogram) in [
        ("vesper, one super peer", &one),
        ("vesper, across two super peers", &two),
        ("nats request/reply", &nats_rt),
    ] {
        let (p50, p95, p99) = summary(histogram);
        println!("| {name} | {p50:.3} | {p95:.3} | {p99:.3} |");
    }
    let nats_p50 = summary(&nats_rt).0;
    println!(
        "\np50 ratio vesper/nats: one super peer {:.2}x, two super peers {:.2}x\n",
        summary(&one).0 / nats_p50,
        summary(&two).0 / nats_p50
    );

    // --- pipelined throughput -----------------------------------------------------------------------------
    // Rounds alternate the three cases, so a slow stretch of this shared machine hits all of them; the
    // medians are compared.
    let duration = Duration::from_secs(args.seconds);
    let (mut ones, mut twos, mut natses) = (Vec::new(), Vec::new(), Vec::new());
    let same_received = count_received(&b_same, args.receiver);
    let other_received = count_received(&b_other, args.receiver);
    for _ in 0..args.rounds {
        ones.push(
            vesper_pipelined(&a, &b_same, &same_received, args.window, duration, &payload).await,
        );
        twos.push(
            vesper_pipelined(
                &a,
                &b_other,
                &other_received,
                args.window,
                duration,
                &payload,
            )
            .await,
        );
        natses.push(nats_pipelined(&nats.url, &ca, duration, &payload).await?);
    }
    println!(
        "## Pipelined throughput ({} bytes, {} rounds of {} s each)\n",
        args.payload_bytes, args.rounds, args.seconds
    );
    println!("| system | messages/s received, median | each round |");
    println!("|---|---:|---|");
    let rows = [
        (
            format!(
                "vesper (window {}, one super peer, each acknowledged, to a {})",
                args.window,
                match args.receiver {
                    Receiver::Handler => "handler",
                    Receiver::Stream => "stream",
                }
            ),
            &mut ones,
        ),
        (
            format!(
                "vesper (window {}, across two super peers, each acknowledged, to a {})",
                args.window,
                match args.receiver {
                    Receiver::Handler => "handler",
                    Receiver::Stream => "stream",
                }
            ),
            &mut twos,
        ),
        ("nats pub/sub (no acknowledgement)".to_string(), &mut natses),
    ];
    let mut medians = Vec::new();
    for (name, rates) in rows {
        let each: Vec<String> = rates.iter().map(|rate| format!("{rate:.0}")).collect();
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        medians.push(median);
        println!("| {name} | {median:.0} | {} |", each.join(", "));
    }
    println!(
        "\nthroughput ratio vesper/nats (medians): one super peer {:.2}x, two super peers {:.2}x\n",
        medians[0] / medians[2],
        medians[1] / medians[2]
    );

    // --- memory per idle session --------------------------------------------------------------------------
    let host = cluster.nodes[2].pid().context("node 3 runs")?;
    let seed = cluster.nodes[2].endpoints().leaf.to_string();
    let before = rss_kib(host)?;
    let mut idle = Vec::with_capacity(args.idle);
    let ca_pem = cluster.pki.ca_pem();
    for _ in 0..args.idle {
        idle.push(
            Leaf::connect({
                let mut config =
                    LeafConfig::new(vec![seed.clone()], ca_pem.clone(), Keypair::generate());
                // Idle sessions as before: no STUN round and presence write per attach.
                config.publish_endpoints = false;
                config
            })
            .await?,
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(host)?;
    let vesper_per = (after.saturating_sub(before)) as f64 * 1024.0 / args.idle as f64;
    drop(idle);

    let nats_pid = nats.child.id();
    let before = rss_kib(nats_pid)?;
    let mut connections = Vec::with_capacity(args.idle);
    for _ in 0..args.idle {
        connections.push(nats_client(&nats.url, &ca).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(nats_pid)?;
    let nats_per = (after.saturating_sub(before)) as f64 * 1024.0 / args.idle as f64;
    drop(connections);
    println!("## Memory per idle session ({} sessions)\n", args.idle);
    println!("| system | server RSS growth per session |");
    println!("|---|---:|");
    println!(
        "| vesper super peer (attached leaf) | {:.1} KiB |",
        vesper_per / 1024.0
    );
    println!(
        "| nats-server (idle connection) | {:.1} KiB |",
        nats_per / 1024.0
    );
    if nats_per > 0.0 {
        println!("\nmemory ratio vesper/nats: {:.2}x", vesper_per / nats_per);
    } else {
        println!(
            "\nmemory ratio vesper/nats: n/a (nats-server's RSS did not grow; use more --idle)"
        );
    }
    Ok(())
}
