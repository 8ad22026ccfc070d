//! `vesper-bench-tracing`: what exporting traces costs messaging, side by side in one run.
//!
//! Two clusters of two super peers: one plain, one exporting to an OTLP receiver (a sink in this process that
//! decodes each export and counts its spans; a collector's own work is not what is measured, and on a 2-core
//! machine it would take its CPU from the system under test). Leaves in this process send across the two super
//! peers of each cluster; for the traced cluster this process exports its leaves' spans too (default sampling:
//! `parentbased_always_on`, so every message is traced: 4 spans), for the plain one it records none. The cases
//! take turns for `--rounds` rounds and the medians are compared:
//! - pipelined throughput: `--window` sends in flight for `--seconds`, messages per second received;
//! - round trips: `--round-trips` sends one after the other, p50 and p99;
//! - record puts: `--put-window` puts in flight for `--seconds` from the sending leaf, puts per second
//!   (a traced put is 6 spans or more: the leaf's call, the super peer's, propose, forward, commit, apply on each
//!   member).
//!
//! Build in release mode first: `cargo build --release --workspace --bins && target/release/vesper-bench-tracing`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::task::JoinSet;
use vesper_leafpeer::Leaf;
use vesper_tests::cluster::{Cluster, NodeOptions};

#[derive(Debug, Clone, Parser)]
struct Args {
    /// Rounds; each runs both cases once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of pipelined sending per case and round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Sends in flight in the pipelined test.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Round trips per case and round.
    #[arg(long, default_value_t = 1000)]
    round_trips: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
    /// Record puts in flight in the put test (each writer rewrites its own key).
    #[arg(long, default_value_t = 64)]
    put_window: usize,
}

fn options(env: Vec<(String, String)>) -> NodeOptions {
    NodeOptions {
        extra_args: [
            "--send-rate",
            "10000000",
            "--send-burst",
            "10000000",
            "--request-rate",
            "10000000",
            "--request-burst",
            "10000000",
        ]
        .map(String::from)
        .to_vec(),
        env,
        ..NodeOptions::default()
    }
}

async fn pipelined(sender: &Leaf, to: &Leaf, received: &AtomicU64, args: &Args) -> f64 {
    let before = received.load(Ordering::Relaxed);
    let start = Instant::now();
    let duration = Duration::from_secs(args.seconds);
    let mut senders = JoinSet::new();
    for _ in 0..args.window {
        let (sender, to, payload) = (
            sender.clone(),
            to.peer_id(),
            vec![0x42u8; args.payload_bytes],
        );
        senders.spawn(async move {
            while start.elapsed() < duration {
                let _ = sender.send(&to, "tp", payload.clone()).await;
            }
        });
    }
    while senders.join_next().await.is_some() {}
    (received.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64()
}

async fn round_trips(sender: &Leaf, to: &Leaf, args: &Args) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new(3)?;
    for _ in 0..args.round_trips {
        let begin = Instant::now();
        sender
            .send(&to.peer_id(), "rt", vec![0x42u8; args.payload_bytes])
            .await?;
        histogram.record(begin.elapsed().as_micros() as u64)?;
    }
    Ok(histogram)
}

async fn puts(leaf: &Leaf, args: &Args) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let duration = Duration::from_secs(args.seconds);
    let mut writers = JoinSet::new();
    for writer in 0..args.put_window {
        let (leaf, done, value) = (leaf.clone(), done.clone(), vec![0x42u8; args.payload_bytes]);
        writers.spawn(async move {
            let key = format!("k{writer}");
            while start.elapsed() < duration {
                let put = leaf
                    .put("bench", &key, Default::default(), value.clone(), None)
                    .await;
                if put.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while writers.join_next().await.is_some() {}
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The OTLP sink: counts the spans of each export and answers at once.
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let count: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|resource| &resource.scope_spans)
            .map(|scope| scope.spans.len())
            .sum();
        self.spans.fetch_add(count as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts the sink on a free loopback port: its endpoint URL and its span count.
async fn span_sink() -> anyhow::Result<(String, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let spans = Arc::new(AtomicU64::new(0));
    let service = TraceServiceServer::new(Sink {
        spans: spans.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok((endpoint, spans))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Case {
    sender: Leaf,
    receiver: Leaf,
    received: Arc<AtomicU64>,
    rates: Vec<f64>,
    p50s: Vec<f64>,
    p99s: Vec<f64>,
    puts: Vec<f64>,
}

async fn case(cluster: &Cluster) -> anyhow::Result<Case> {
    let sender = cluster.leaf(0).await?;
    let receiver = cluster.leaf(1).await?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    receiver.on_message("tp", move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    receiver.on_message("rt", |_| {});
    Ok(Case {
        sender,
        receiver,
        received,
        rates: Vec::new(),
        p50s: Vec::new(),
        p99s: Vec::new(),
        puts: Vec::new(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    eprintln!("starting the span sink and two clusters of two super peers ...");
    let (endpoint, spans) = span_sink().await?;
    // This process's own leaves export there too, while the traced case runs.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    let telemetry = vesper_telemetry::init(vesper_telemetry::Options {
        service: "vesper-bench",
        default_filter: "warn".into(),
        json: false,
        sampling: vesper_telemetry::Sampling::Environment,
    });
    anyhow::ensure!(
        telemetry.exporting(),
        "trace export did not start: {:?}",
        telemetry.export_error
    );
    let plain = Cluster::start(2, options(Vec::new())).await?;
    let traced_cluster = Cluster::start(
        2,
        options(vec![(
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            endpoint.clone(),
        )]),
    )
    .await?;
    let mut off = case(&plain).await?;
    let mut on = case(&traced_cluster).await?;
    // Warm up connections and code paths.
    let warm_up = Args {
        round_trips: 200,
        ..args.clone()
    };
    for (case, traced) in [(&off, false), (&on, true)] {
        telemetry.set_exporting(traced);
        round_trips(&case.sender, &case.receiver, &warm_up).await?;
    }
    for round in 1..=args.rounds {
        for (case, traced) in [(&mut off, false), (&mut on, true)] {
            telemetry.set_exporting(traced);
            let rate = pipelined(&case.sender, &case.receiver, &case.received, &args).await;
            let histogram = round_trips(&case.sender, &case.receiver, &args).await?;
            let put_rate = puts(&case.sender, &args).await;
            case.puts.push(put_rate);
            case.rates.push(rate);
            case.p50s
                .push(histogram.value_at_quantile(0.5) as f64 / 1000.0);
            case.p99s
                .push(histogram.value_at_quantile(0.99) as f64 / 1000.0);
            eprintln!(
                "round {round}: tracing {}: {rate:.0} msg/s, p50 {:.3} ms, {put_rate:.0} puts/s",
                if traced { "on " } else { "off" },
                histogram.value_at_quantile(0.5) as f64 / 1000.0
            );
        }
    }
    telemetry.set_exporting(false);
    let exported = spans.load(Ordering::Relaxed);
    println!(
        "## Tracing export on vs off, across two super peers ({} rounds, medians; window {}, {} s; {} round trips; {} bytes)\n",
        args.rounds, args.window, args.seconds, args.round_trips, args.payload_bytes
    );
    println!("| case | pipelined msg/s | round trip p50 ms | p99 ms | puts/s |");
    println!("|---|---:|---:|---:|---:|");
    let (rate_off, rate_on) = (median(&mut off.rates), median(&mut on.rates));
    let (p50_off, p50_on) = (median(&mut off.p50s), median(&mut on.p50s));
    let (puts_off, puts_on) = (median(&mut off.puts), median(&mut on.puts));
    let sampler = match (
        std::env::var("OTEL_TRACES_SAMPLER"),
        std::env::var("OTEL_TRACES_SAMPLER_ARG"),
    ) {
        (Ok(sampler), Ok(argument)) => format!("{sampler} {argument}"),
        (Ok(sampler), Err(_)) => sampler,
        _ => "parentbased_always_on, every message".into(),
    };
    let traced = format!("tracing on (sampler {sampler})");
    for (name, rate, p50, p99, put_rate) in [
        (
            "tracing off",
            rate_off,
            p50_off,
            median(&mut off.p99s),
            puts_off,
        ),
        (
            traced.as_str(),
            rate_on,
            p50_on,
            median(&mut on.p99s),
            puts_on,
        ),
    ] {
        println!("| {name} | {rate:.0} | {p50:.3} | {p99:.3} | {put_rate:.0} |");
    }
    println!(
        "\nthroughput on/off {:.3} ({:+.1} %), p50 on/off {:.3}, puts on/off {:.3} ({:+.1} %); spans the receiver got: {exported}",
        rate_on / rate_off,
        (rate_on / rate_off - 1.0) * 100.0,
        p50_on / p50_off,
        puts_on / puts_off,
        (puts_on / puts_off - 1.0) * 100.0
    );
    drop((off, on));
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(())
}
