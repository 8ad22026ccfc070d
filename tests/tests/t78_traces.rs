//! One message is one trace: a real OTLP receiver (Python's grpcio with the OpenTelemetry protocol package, so
//! another language and gRPC stack than the exporters) gets the spans of a message sent by a `leafpeer` on one
//! super peer to a `leafpeer` on another, all in one trace and parented hop by hop; the same for a message that
//! waited in the mailbox and for a record put forwarded from a follower to the leader; and a collector that is
//! down changes nothing for the data path.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use vesper_tests::cli::json_of;
use vesper_tests::cluster::{Cluster, NodeOptions, CONVERGE_TIMEOUT};
use vesper_tests::wait;

/// The Python OTLP receiver (clients/python/otlp_receiver.py) writing spans to `spans`; killed when dropped.
struct Receiver {
    _child: tokio::process::Child,
    port: u16,
}

async fn receiver(spans: &Path) -> anyhow::Result<Receiver> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut child = tokio::process::Command::new(root.join("scripts/python-client.sh"))
        .arg(root.join("clients/python/otlp_receiver.py"))
        .arg(spans)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("the OTLP receiver did not start within 120 s"))??
        .ok_or_else(|| anyhow::anyhow!("the OTLP receiver exited"))?;
    let port = line
        .strip_prefix("listening ")
        .and_then(|port| port.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected first line {line:?}"))?;
    Ok(Receiver {
        _child: child,
        port,
    })
}

/// Environment of a process exporting to `endpoint`: short batching so spans leave within a moment.
fn otel_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
    ]
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .to_vec()
}

/// `leafpeer` seeded with node `index` alone, with `env`.
fn leafpeer(
    cluster: &Cluster,
    index: usize,
    key: &Path,
    env: &[(String, String)],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(vesper_tests::binary("leafpeer"));
    command
        .arg("--seeds")
        .arg(cluster.nodes[index].endpoints().leaf.to_string())
        .arg("--ca")
        .arg(cluster.pki.ca_cert())
        .arg("--key")
        .arg(key)
        .arg("--json")
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

fn spans_in(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Two super peers exporting to a receiver, and the environment that makes a `leafpeer` export there too.
struct Traced {
    cluster: Cluster,
    env: Vec<(String, String)>,
    spans: std::path::PathBuf,
    _receiver: Receiver,
    _dir: tempfile::TempDir,
}

impl Traced {
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let spans = dir.path().join("spans.jsonl");
        let receiver = receiver(&spans).await?;
        let env = otel_env(&format!("http://127.0.0.1:{}", receiver.port));
        let cluster = Cluster::start(
            2,
            NodeOptions {
                env: env.clone(),
                ..NodeOptions::default()
            },
        )
        .await?;
        Ok(Self {
            cluster,
            env,
            spans,
            _receiver: receiver,
            _dir: dir,
        })
    }
}

/// The PeerId text of the key at `key` (`leafpeer id`).
fn peer_id_of(cluster: &Cluster, key: &Path) -> String {
    json_of(&vesper_tests::cli::leafpeer(cluster, key, &["id"]))["peer_id"]
        .as_str()
        .expect("peer id")
        .to_string()
}

/// Runs `command` to its end; its output, after checking that it succeeded.
async fn succeeded(command: &mut tokio::process::Command) -> anyhow::Result<std::process::Output> {
    let output = command.output().await?;
    anyhow::ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// Sends one message from a leaf on node 0 to a listening leaf on node 1; returns once it was received.
async fn one_message(cluster: &Cluster, env: &[(String, String)]) -> anyhow::Result<()> {
    let alice = cluster.root().join("alice.key");
    let bob = cluster.root().join("bob.key");
    let bob_id = peer_id_of(cluster, &bob);
    let listener = leafpeer(cluster, 1, &bob, env)
        .args(["listen", "--count", "1", "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Bob online before the send, so the message goes straight to him, not to his mailbox.
    let observer = cluster.leaf(0).await?;
    let bob_peer: vesper_proto::PeerId = bob_id.parse()?;
    wait::until("bob online", CONVERGE_TIMEOUT, || async {
        let presence = observer
            .lookup(&bob_peer, vesper_leafpeer::Consistency::Linearizable)
            .await?;
        Ok(presence
            .filter(|presence| presence.status != vesper_leafpeer::PresenceStatus::Offline as i32)
            .map(|_| ()))
    })
    .await?;
    let sent =
        succeeded(leafpeer(cluster, 0, &alice, env).args(["send", &bob_id, "hello"])).await?;
    let sent: Value = serde_json::from_slice(&sent.stdout)?;
    assert_eq!(sent["outcome"], "delivered", "{sent}");
    let received = tokio::time::timeout(CONVERGE_TIMEOUT, listener.wait_with_output()).await??;
    assert!(
        received.status.success(),
        "{}",
        String::from_utf8_lossy(&received.stderr)
    );
    assert!(String::from_utf8_lossy(&received.stdout).contains("hello"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t78_one_message_across_two_super_peers_is_one_trace() -> anyhow::Result<()> {
    let traced = Traced::start().await?;
    let (cluster, env, spans_path) = (&traced.cluster, &traced.env, traced.spans.as_path());
    one_message(cluster, env).await?;

    // The leaves flushed at exit; the super peers export within their batch delay.
    let by_name = wait::until(
        "the four spans of the message",
        CONVERGE_TIMEOUT,
        || async {
            let spans = spans_in(spans_path);
            let Some(send) = spans.iter().find(|span| span["name"] == "vesper.send") else {
                return Ok(None);
            };
            let id = send["attributes"]["messaging.message.id"].clone();
            let of_message: BTreeMap<String, Value> = spans
                .iter()
                .filter(|span| span["attributes"]["messaging.message.id"] == id)
                .map(|span| {
                    (
                        span["name"].as_str().unwrap_or("").to_string(),
                        span.clone(),
                    )
                })
                .collect();
            Ok((of_message.len() >= 4).then_some(of_message))
        },
    )
    .await
    .map_err(|error| anyhow::anyhow!("{error}; spans: {:#?}", spans_in(spans_path)))?;
    let span = |name: &str| &by_name[name];
    let (send, route, deliver, receive) = (
        span("vesper.send"),
        span("vesper.route"),
        span("vesper.deliver"),
        span("vesper.receive"),
    );
    for hop in [route, deliver, receive] {
        assert_eq!(hop["trace_id"], send["trace_id"], "one trace: {by_name:#?}");
    }
    assert_eq!(route["parent_span_id"], send["span_id"], "{by_name:#?}");
    assert_eq!(deliver["parent_span_id"], route["span_id"], "{by_name:#?}");
    assert_eq!(
        receive["parent_span_id"], deliver["span_id"],
        "{by_name:#?}"
    );
    assert_eq!(send["service"], "vesper-leaf");
    assert_eq!(receive["service"], "vesper-leaf");
    assert_eq!(route["service"], "vesper-superpeer");
    assert_eq!(deliver["service"], "vesper-superpeer");
    assert_eq!(
        (send["kind"].as_str(), receive["kind"].as_str()),
        (Some("producer"), Some("consumer"))
    );
    assert_eq!(send["attributes"]["messaging.system"], "vesper");
    // Super peers start no traces of their own: every span the receiver got belongs to the message's trace.
    let strays: Vec<Value> = spans_in(spans_path)
        .into_iter()
        .filter(|other| other["trace_id"] != send["trace_id"])
        .collect();
    assert!(
        strays.is_empty(),
        "spans outside the message's trace: {strays:#?}"
    );
    println!(
        "trace {}: {}",
        send["trace_id"],
        [
            "vesper.send",
            "vesper.route",
            "vesper.deliver",
            "vesper.receive"
        ]
        .join(" -> ")
    );
    Ok(())
}

/// Waits until the receiver holds the trace that contains a span named `root` of `service`, with at least one
/// span of each name in `names`; returns that trace's spans.
async fn trace_with(
    spans_path: &Path,
    service: &str,
    root: &str,
    names: &[&str],
) -> anyhow::Result<Vec<Value>> {
    wait::until(
        &format!("a trace from {root} with {names:?}"),
        CONVERGE_TIMEOUT,
        || async {
            let spans = spans_in(spans_path);
            let Some(first) = spans
                .iter()
                .find(|span| span["name"] == root && span["service"] == service)
            else {
                return Ok(None);
            };
            let trace: Vec<Value> = spans
                .iter()
                .filter(|span| span["trace_id"] == first["trace_id"])
                .cloned()
                .collect();
            let complete = names
                .iter()
                .all(|name| trace.iter().any(|span| span["name"] == *name));
            Ok(complete.then_some(trace))
        },
    )
    .await
    .map_err(|error| anyhow::anyhow!("{error}; spans: {:#?}", spans_in(spans_path)))
}

fn named<'a>(trace: &'a [Value], name: &str) -> Vec<&'a Value> {
    trace.iter().filter(|span| span["name"] == name).collect()
}

fn one<'a>(trace: &'a [Value], name: &str) -> &'a Value {
    let found = named(trace, name);
    assert_eq!(found.len(), 1, "one {name} span: {trace:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t78_a_message_that_waited_in_the_mailbox_keeps_its_trace() -> anyhow::Result<()> {
    let traced = Traced::start().await?;
    let (cluster, env, spans_path) = (&traced.cluster, &traced.env, traced.spans.as_path());
    let alice = cluster.root().join("alice.key");
    let bob = cluster.root().join("bob.key");
    let bob_id = peer_id_of(cluster, &bob);
    // Bob is offline: the message goes to his mailbox.
    let sent =
        succeeded(leafpeer(cluster, 0, &alice, env).args(["send", &bob_id, "while you were out"]))
            .await?;
    let sent: Value = serde_json::from_slice(&sent.stdout)?;
    assert_eq!(sent["outcome"], "queued", "{sent}");
    // He comes online on the other super peer and gets it from there.
    let received = succeeded(leafpeer(cluster, 1, &bob, env).args([
        "listen",
        "--count",
        "1",
        "--timeout",
        "60",
    ]))
    .await?;
    assert!(String::from_utf8_lossy(&received.stdout).contains("while you were out"));

    let trace = trace_with(
        spans_path,
        "vesper-leaf",
        "vesper.send",
        &[
            "vesper.route",
            "vesper.propose",
            "vesper.apply",
            "vesper.deliver",
            "vesper.receive",
        ],
    )
    .await?;
    let (send, route, propose, deliver, receive) = (
        one(&trace, "vesper.send"),
        one(&trace, "vesper.route"),
        one(&trace, "vesper.propose"),
        one(&trace, "vesper.deliver"),
        one(&trace, "vesper.receive"),
    );
    assert_eq!(route["parent_span_id"], send["span_id"], "{trace:#?}");
    assert_eq!(propose["parent_span_id"], route["span_id"], "{trace:#?}");
    assert_eq!(propose["attributes"]["vesper.command"], "mailbox_put");
    // The drain on Bob's super peer continues from the mailbox put, however long the message waited.
    assert_eq!(deliver["parent_span_id"], propose["span_id"], "{trace:#?}");
    assert_eq!(
        deliver["attributes"]["vesper.from_mailbox"], "True",
        "Python renders booleans"
    );
    assert_eq!(deliver["instance"], cluster.nodes[1].name.as_str());
    assert_eq!(receive["parent_span_id"], deliver["span_id"], "{trace:#?}");
    for apply in named(&trace, "vesper.apply") {
        assert_eq!(apply["parent_span_id"], propose["span_id"], "{trace:#?}");
    }
    println!(
        "trace {}: send -> route -> propose (mailbox put; {} apply spans) -> deliver (from the mailbox) -> receive",
        send["trace_id"],
        named(&trace, "vesper.apply").len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t78_a_record_put_through_a_follower_is_one_trace_to_every_apply() -> anyhow::Result<()> {
    let traced = Traced::start().await?;
    let (cluster, env, spans_path) = (&traced.cluster, &traced.env, traced.spans.as_path());
    let leader = cluster.wait_leader_index().await?;
    let follower = 1 - leader;
    let alice = cluster.root().join("alice.key");
    succeeded(
        leafpeer(cluster, follower, &alice, env)
            .args(["put", "notes", "traced", "--value", "hello"]),
    )
    .await?;

    let method = "vesper.v1.Leaf/PutRecord";
    let trace = trace_with(
        spans_path,
        "vesper-leaf",
        method,
        &[
            "vesper.propose",
            "vesper.v1.Cluster/Propose",
            "vesper.apply",
        ],
    )
    .await?;
    // Apply spans come from both members; wait for the second one too.
    let trace = if named(&trace, "vesper.apply").len() < 2 {
        wait::until(
            "an apply span from each member",
            CONVERGE_TIMEOUT,
            || async {
                let trace: Vec<Value> = spans_in(spans_path)
                    .into_iter()
                    .filter(|span| span["trace_id"] == trace[0]["trace_id"])
                    .collect();
                Ok((named(&trace, "vesper.apply").len() >= 2).then_some(trace))
            },
        )
        .await?
    } else {
        trace
    };
    let calls = named(&trace, method);
    let client = calls
        .iter()
        .find(|span| span["kind"] == "client")
        .expect("the leaf's client span");
    let server = calls
        .iter()
        .find(|span| span["kind"] == "server")
        .expect("the super peer's server span");
    // The forward and the leader's commit are the two ends of one Cluster call, named as rpc spans are.
    let propose = one(&trace, "vesper.propose");
    let cluster_calls = named(&trace, "vesper.v1.Cluster/Propose");
    let end = |kind: &str| {
        *cluster_calls
            .iter()
            .find(|span| span["kind"] == kind)
            .unwrap_or_else(|| panic!("a {kind} span of the forwarded call: {trace:#?}"))
    };
    let (forward, commit) = (end("client"), end("server"));
    let (follower_name, leader_name) = (
        cluster.nodes[follower].name.as_str(),
        cluster.nodes[leader].name.as_str(),
    );
    assert_eq!(client["service"], "vesper-leaf");
    assert_eq!(client["attributes"]["rpc.method"], "PutRecord");
    assert_eq!(server["parent_span_id"], client["span_id"], "{trace:#?}");
    assert_eq!(server["instance"], follower_name);
    assert_eq!(propose["parent_span_id"], server["span_id"], "{trace:#?}");
    assert_eq!(propose["instance"], follower_name);
    assert_eq!(forward["parent_span_id"], propose["span_id"], "{trace:#?}");
    assert_eq!(forward["kind"], "client");
    assert_eq!(
        forward["links"][0]["span_id"], propose["span_id"],
        "the batch links to the command it carries: {trace:#?}"
    );
    assert_eq!(commit["parent_span_id"], propose["span_id"], "{trace:#?}");
    assert_eq!(commit["instance"], leader_name);
    assert_eq!(commit["kind"], "server");
    let mut applied_on: Vec<&str> = named(&trace, "vesper.apply")
        .iter()
        .map(|apply| {
            assert_eq!(apply["parent_span_id"], propose["span_id"], "{trace:#?}");
            assert_eq!(apply["attributes"]["vesper.command"], "put_record");
            apply["instance"].as_str().unwrap_or("")
        })
        .collect();
    applied_on.sort_unstable();
    let mut members = vec![follower_name, leader_name];
    members.sort_unstable();
    assert_eq!(applied_on, members, "applied on every member: {trace:#?}");
    // Nothing in the trace names the record's key or value.
    let text = serde_json::to_string(&trace)?;
    assert!(
        !text.contains("traced") && !text.contains("hello"),
        "{text}"
    );
    println!(
        "trace {}: leaf {method} -> {follower_name} server -> propose -> forward -> {leader_name} commit; apply on {applied_on:?}",
        client["trace_id"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t78_a_collector_that_is_down_changes_nothing_for_messages() -> anyhow::Result<()> {
    // A port nothing listens on: every export fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let env = otel_env(&format!("http://{closed}"));
    let cluster = Cluster::start(
        2,
        NodeOptions {
            env: env.clone(),
            ..NodeOptions::default()
        },
    )
    .await?;
    let started = std::time::Instant::now();
    one_message(&cluster, &env).await?;
    println!(
        "sent and received with the collector down in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
