//! The ops port of real super peer processes: a real Prometheus scrapes three of them and sees a leader change,
//! `promtool` accepts the exposition, `/livez` stays up when quorum is lost while `/readyz` says why, and a
//! member catching up by snapshot is not ready until it has caught up.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use vesper_tests::cluster::{Cluster, NodeOptions, Start, CONVERGE_TIMEOUT};
use vesper_tests::ops::{self, Prometheus};
use vesper_tests::wait;

fn ops_addr(cluster: &Cluster, index: usize) -> SocketAddr {
    cluster.nodes[index]
        .endpoints()
        .ops
        .expect("the node wrote its ops port to endpoints.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t75_prometheus_scrapes_three_super_peers_and_sees_the_leader_change() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start(3, NodeOptions::default()).await?;
    // Some traffic, so the counters have something to count.
    let alice = cluster.leaf(0).await?;
    let bob = cluster.leaf(1).await?;
    alice
        .put("ops", "k", Default::default(), b"v".to_vec(), None)
        .await?;
    alice.send(&bob.peer_id(), "text", b"hi".to_vec()).await?;

    // A STUN Binding request to node 0's UDP port, answered and counted; a datagram that is not STUN is not.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let stun = cluster.nodes[0]
        .endpoints()
        .stun
        .expect("STUN is on by default");
    let (_, request) = vesper_proto::stun::binding_request();
    udp.send_to(&request, stun).await?;
    let mut answer = [0u8; 512];
    tokio::time::timeout(CONVERGE_TIMEOUT, udp.recv_from(&mut answer)).await??;
    udp.send_to(b"not stun at all, long enough to be looked at", stun)
        .await?;

    let targets: Vec<SocketAddr> = (0..3).map(|index| ops_addr(&cluster, index)).collect();
    for (index, &addr) in targets.iter().enumerate() {
        let (status, text) = ops::get(addr, "/metrics").await?;
        assert_eq!(status, 200, "{text}");
        let findings = ops::promtool_check_metrics(&text)?;
        assert!(
            findings.is_empty(),
            "promtool on sp{}: {findings}",
            index + 1
        );
        assert_eq!(
            ops::sample(&text, "vesper_raft_has_leader"),
            Some(1.0),
            "{text}"
        );
    }
    let (_, sender_side) = ops::get(targets[0], "/metrics").await?;
    assert!(
        sender_side.contains("vesper_messages_routed_total{path=\"remote\"} 1")
            || sender_side.contains("vesper_messages_routed_total{path=\"local\"} 1"),
        "{sender_side}"
    );
    assert!(
        sender_side.contains("vesper_record_writes_total{op=\"put\",result=\"ok\"} 1"),
        "{sender_side}"
    );
    assert_eq!(
        ops::sample(&sender_side, "vesper_sessions_attached_total"),
        Some(1.0)
    );
    assert!(ops::sample(&sender_side, "vesper_stun_answers_total").unwrap_or(0.0) >= 1.0);
    let malformed = "vesper_stun_dropped_total{reason=\"malformed\"}";
    wait::until(
        "the datagram that is not STUN counted",
        CONVERGE_TIMEOUT,
        || async {
            let (_, text) = ops::get(targets[0], "/metrics").await?;
            Ok(text.contains(malformed).then_some(()))
        },
    )
    .await?;

    let prometheus = Prometheus::start(&targets).await?;
    wait::until(
        "Prometheus to see one leader among three nodes",
        CONVERGE_TIMEOUT,
        || async {
            let with_leader = prometheus.scalar("sum(vesper_raft_has_leader)").await?;
            let leaders = prometheus.scalar("sum(vesper_raft_is_leader)").await?;
            Ok((with_leader == Some(3.0) && leaders == Some(1.0)).then_some(()))
        },
    )
    .await?;

    let leader = cluster.wait_leader().await?;
    let survivors: Vec<String> = (0..3)
        .filter(|&index| index != leader)
        .map(|index| targets[index].to_string())
        .collect();
    let survivors = survivors.join("|");
    let changes = format!("sum(vesper_raft_leader_changes_total{{instance=~\"{survivors}\"}})");
    let before = prometheus.scalar(&changes).await?.unwrap_or(0.0);
    cluster.kill(leader);
    let killed = targets[leader].to_string();
    wait::until(
        "Prometheus to see the killed node down, a new leader, and the leader change counted",
        CONVERGE_TIMEOUT,
        || async {
            let down = prometheus
                .scalar(&format!("up{{instance=\"{killed}\"}}"))
                .await?;
            let with_leader = prometheus
                .scalar(&format!(
                    "sum(vesper_raft_has_leader{{instance=~\"{survivors}\"}})"
                ))
                .await?;
            let leaders = prometheus
                .scalar(&format!(
                    "sum(vesper_raft_is_leader{{instance=~\"{survivors}\"}})"
                ))
                .await?;
            let after = prometheus.scalar(&changes).await?.unwrap_or(0.0);
            Ok((down == Some(0.0)
                && with_leader == Some(2.0)
                && leaders == Some(1.0)
                && after > before)
                .then_some(after))
        },
    )
    .await?;

    // Every dashboard query is PromQL this Prometheus accepts (that they name only exposed metrics is a unit
    // test of superpeer/src/metrics.rs).
    let monitoring = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        monitoring.join("grafana/vesper-dashboard.json"),
    )?)?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(queries.len() > 20, "{} queries", queries.len());
    for query in &queries {
        let query = query.replace("$job", ".*");
        prometheus
            .query(&query)
            .await
            .map_err(|error| anyhow::anyhow!("dashboard query {query}: {error}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t75_livez_stays_up_without_quorum_while_readyz_says_why() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, NodeOptions::default()).await?;
    for index in 0..3 {
        let addr = ops_addr(&cluster, index);
        wait::until("every node ready", CONVERGE_TIMEOUT, || async {
            Ok((ops::get(addr, "/readyz").await?.0 == 200).then_some(()))
        })
        .await?;
        let (status, body) = ops::get(addr, "/nothing-here").await?;
        assert_eq!(status, 404);
        assert!(body.contains("/metrics"), "{body}");
    }
    let leader = cluster.wait_leader().await?;
    let others: Vec<usize> = (0..3).filter(|&index| index != leader).collect();
    let survivor = others[0];
    cluster.kill(leader);
    cluster.kill(others[1]);
    let addr = ops_addr(&cluster, survivor);
    let reason = wait::until("the survivor to be not ready", CONVERGE_TIMEOUT, || async {
        let (status, body) = ops::get(addr, "/readyz").await?;
        Ok((status == 503).then_some(body))
    })
    .await?;
    assert!(reason.contains("no leader"), "{reason}");
    // Live all along, and still: a restart cannot bring quorum back.
    let (status, body) = ops::get(addr, "/livez").await?;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, text) = ops::get(addr, "/metrics").await?;
    assert_eq!(status, 200);
    assert_eq!(
        ops::sample(&text, "vesper_raft_has_leader"),
        Some(0.0),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t75_a_member_catching_up_by_snapshot_is_not_ready_until_it_has() -> anyhow::Result<()> {
    let max_lag = 10;
    let options = NodeOptions {
        snapshot_after_logs: Some(100),
        logs_kept_after_snapshot: Some(10),
        extra_args: vec!["--ready-max-lag".into(), max_lag.to_string()],
        ..NodeOptions::default()
    };
    let mut cluster = Cluster::start(3, options).await?;
    // A node that belongs to no cluster yet is live and says why it is not ready.
    let idle = cluster.add_node(Start::Idle).await?;
    let (status, body) = ops::get(ops_addr(&cluster, idle), "/readyz").await?;
    assert_eq!(status, 503);
    assert!(body.contains("not in a cluster"), "{body}");
    assert_eq!(ops::get(ops_addr(&cluster, idle), "/livez").await?.0, 200);

    let leader = cluster.wait_leader().await?;
    let lagging = (0..3).find(|&index| index != leader).expect("a follower");
    let writer_node = (0..3)
        .find(|&index| index != leader && index != lagging)
        .expect("another follower");
    let position = cluster.status_of(lagging).await?.applied_index;
    cluster.stop(lagging).await?;
    let writer = cluster.leaf(writer_node).await?;
    let mut written = BTreeMap::new();
    for n in 0..400 {
        let key = format!("k{n:04}");
        writer
            .put("snap", &key, Default::default(), b"v".to_vec(), None)
            .await?;
        written.insert(key, ());
    }
    let purged = wait::until("the leader to purge its log", CONVERGE_TIMEOUT, || async {
        let status = cluster.status_of(leader).await?;
        Ok((status.purged_index > position + 1).then_some(status))
    })
    .await?;

    cluster.restart(lagging).await?;
    let addr = ops_addr(&cluster, lagging);
    let not_ready = std::cell::RefCell::new(Vec::new());
    let ready_body = wait::until(
        "the restarted member to be ready",
        CONVERGE_TIMEOUT,
        || async {
            let (status, body) = ops::get(addr, "/readyz").await?;
            if status == 200 {
                return Ok(Some(body));
            }
            not_ready.borrow_mut().push(body);
            Ok(None)
        },
    )
    .await?;
    let applied: u64 = ready_body
        .trim()
        .strip_prefix("ready (applied ")
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {ready_body:?}"));
    // Ready only once within the bound of what the cluster had committed before it came back.
    assert!(
        applied + max_lag >= purged.applied_index,
        "ready at {applied}, the cluster was at {}; answers before: {:?}",
        purged.applied_index,
        not_ready.borrow()
    );
    let caught_up = cluster.status_of(lagging).await?;
    assert!(
        caught_up.snapshot_index >= purged.purged_index,
        "the member should have installed a snapshot: {caught_up:?}"
    );
    // The install and the leader's build are in the metrics.
    let (_, text) = ops::get(addr, "/metrics").await?;
    assert_eq!(
        ops::sample(&text, "vesper_raft_snapshot_install_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert!(ops::sample(&text, "vesper_raft_snapshot_size_bytes").unwrap_or(0.0) > 0.0);
    let (_, text) = ops::get(ops_addr(&cluster, leader), "/metrics").await?;
    assert!(
        ops::sample(&text, "vesper_raft_snapshot_build_seconds_count").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    println!(
        "not ready {} times before ready at {applied}; reasons: {:?}",
        not_ready.borrow().len(),
        not_ready
            .borrow()
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t75_the_ops_port_is_read_only() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, NodeOptions::default()).await?;
    let addr = ops_addr(&cluster, 0);
    // Nothing but GET is served.
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::post("/metrics")
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))?;
    let response = sender.send_request(request).await?;
    assert_eq!(response.status().as_u16(), 405);
    Ok(())
}

/// The ops port keeps at most 64 connections: one past that is closed at once (and counted), and a freed slot
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t75_the_ops_port_closes_connections_past_its_cap() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    const CAP: usize = 64;
    let cluster = Cluster::start(1, NodeOptions::default()).await?;
    let addr = ops_addr(&cluster, 0);
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(tokio::net::TcpStream::connect(addr).await?);
    }
    // Accepted in order: once a further connection is closed unanswered, all 64 hold their slots.
    let mut extra = tokio::net::TcpStream::connect(addr).await?;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(20), extra.read(&mut byte))
        .await
        .map_err(|_| anyhow::anyhow!("the connection past the cap was kept open"))?;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed without an answer: {read:?}"
    );
    // Free one slot: the port answers again, and says how many it closed.
    held.pop();
    let text = wait::until("the ops port to answer again", CONVERGE_TIMEOUT, || async {
        Ok(ops::get(addr, "/metrics").await.ok().map(|(_, text)| text))
    })
    .await?;
    assert!(
        ops::sample(&text, "vesper_ops_connections_refused_total").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    Ok(())
}

/// `/api/v1/sessions` lists a node's sessions, sorted and paged, and refuses bad parameters by name;
/// `/api/v1/connectivity` counts the leaves of every super peer and the NAT classes of the peers online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t75_sessions_are_listed_paged_and_sorted_and_leaves_counted_per_super_peer(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(2, NodeOptions::default()).await?;
    let status = cluster.status_of(0).await?;
    let ids: Vec<u64> = (0..2)
        .map(|index| cluster.node_id_in(&status, index).expect("member"))
        .collect();
    let receiver = cluster.leaf(0).await?;
    let others = [cluster.leaf(0).await?, cluster.leaf(0).await?];
    let remote = cluster.leaf(1).await?;
    let mut inbox = receiver.messages().expect("the stream");
    for n in 0..3 {
        let outcome = remote
            .send(&receiver.peer_id(), "ops", format!("m{n}").into_bytes())
            .await?;
        assert_eq!(outcome, vesper_leafpeer::SendOutcome::Delivered);
        tokio::time::timeout(CONVERGE_TIMEOUT, inbox.recv())
            .await?
            .expect("delivered");
    }
    let addr = ops_addr(&cluster, 0);

    let (code, body) = ops::get(addr, "/api/v1/sessions?sort=pushed&limit=2").await?;
    assert_eq!(code, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(page["total"], 3, "{page}");
    assert_eq!(
        (page["limit"].as_u64(), page["sort"].as_str()),
        (Some(2), Some("pushed"))
    );
    let rows = page["sessions"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    let top = &rows[0];
    assert_eq!(top["peer_id"], receiver.peer_id().to_string(), "{page}");
    assert_eq!(
        (
            top["pushed"].as_u64(),
            top["acked"].as_u64(),
            top["pending"].as_u64()
        ),
        (Some(3), Some(3), Some(0))
    );
    assert_eq!(top["remote_ip"], "127.0.0.1");
    assert!(top["attached_at_ms"].as_u64() > Some(0));
    assert!(!body.contains("m0") && !body.contains("token"), "{body}");
    let (_, rest) = ops::get(addr, "/api/v1/sessions?sort=pushed&offset=2").await?;
    let rest: serde_json::Value = serde_json::from_str(&rest)?;
    let mut peers: Vec<String> = rows
        .iter()
        .chain(rest["sessions"].as_array().expect("rows"))
        .map(|row| row["peer_id"].as_str().unwrap_or("").to_string())
        .collect();
    peers.sort();
    let mut expected: Vec<String> = [&receiver, &others[0], &others[1]]
        .iter()
        .map(|leaf| leaf.peer_id().to_string())
        .collect();
    expected.sort();
    assert_eq!(peers, expected, "two pages cover every session once");

    for (query, says) in [
        ("limit=0", "limit must be between 1 and 1000"),
        ("limit=5000", "limit must be between 1 and 1000"),
        ("sort=bytes", "unknown variant `bytes`"),
        ("page=2", "unknown field `page`"),
        ("offset=-1", "offset"),
    ] {
        let (code, body) = ops::get(addr, &format!("/api/v1/sessions?{query}")).await?;
        assert_eq!(code, 400, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }

    let census = wait::until(
        "the census to count every leaf",
        CONVERGE_TIMEOUT,
        || async {
            let (code, body) = ops::get(addr, "/api/v1/connectivity").await?;
            anyhow::ensure!(code == 200, "{body}");
            let census: serde_json::Value = serde_json::from_str(&body)?;
            let on = |id: u64| census["sessions_by_node"][id.to_string()].as_u64();
            Ok((on(ids[0]) == Some(3) && on(ids[1]) == Some(1)).then_some(census))
        },
    )
    .await?;
    assert_eq!(census["peers_online"], 4, "{census}");
    let classes: u64 = census["peers_by_nat_class"]
        .as_object()
        .expect("classes")
        .values()
        .filter_map(|count| count.as_u64())
        .sum();
    assert_eq!(classes, 4, "every online peer has a class: {census}");
    Ok(())
}

#[test]
fn t75_the_alert_rules_pass_promtool_and_their_own_tests() -> anyhow::Result<()> {
    let promtool = ops::system_tool("promtool", "prometheus")?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring/prometheus");
    for args in [
        ["check", "rules", "vesper-rules.yml"],
        ["test", "rules", "vesper-rules.test.yml"],
    ] {
        let output = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "promtool {}: {text}",
            args.join(" ")
        );
        assert!(text.contains("SUCCESS"), "{text}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t75_a_leafs_metrics_go_into_the_apps_own_registry() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, NodeOptions::default()).await?;
    let alice = cluster.leaf(0).await?;
    let bob = cluster.leaf(0).await?;
    let mut inbox = bob.messages().expect("the stream");
    let mut registry = prometheus_client::registry::Registry::default();
    alice.metrics().register(&mut registry);
    let mut bobs = prometheus_client::registry::Registry::default();
    bob.metrics().register(&mut bobs);
    alice.send(&bob.peer_id(), "note", b"hi".to_vec()).await?;
    tokio::time::timeout(CONVERGE_TIMEOUT, inbox.recv())
        .await?
        .expect("a message");
    let text = |registry: &prometheus_client::registry::Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    };
    let sent = text(&registry);
    assert!(
        sent.contains("vesper_leaf_messages_sent_total{outcome=\"delivered\"} 1"),
        "{sent}"
    );
    assert!(sent.contains("vesper_leaf_send_seconds_count 1"), "{sent}");
    let received = text(&bobs);
    assert!(
        received.contains("vesper_leaf_messages_received_total 1"),
        "{received}"
    );
    Ok(())
}
