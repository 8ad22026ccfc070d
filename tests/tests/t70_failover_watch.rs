//! Watches and leaf failover: a watcher sees its contacts' presence changes in order; when the super peer that
//! hosts 20 leaves (and the watcher) is SIGKILLed, every leaf re-attaches elsewhere, messages sent meanwhile
//! reach each app exactly once, and the watcher's stream goes on with no gap and no duplicate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vesper_leafpeer::{
    Keypair, Leaf, LeafConfig, PresenceStatus, SendOutcome, WatchItem, WatchSpec,
};
use vesper_proto::v1::watch_event;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::wait;

/// Next item of a watch stream, with a deadline.
async fn next_item(
    stream: &mut tokio::sync::mpsc::Receiver<WatchItem>,
) -> anyhow::Result<WatchItem> {
    wait::next("watch item", Duration::from_secs(20), stream).await
}

/// A leaf attached first to `first` but knowing every super peer.
async fn leaf_on(cluster: &Cluster, first: usize) -> anyhow::Result<Leaf> {
    let first = cluster.nodes[first].endpoints().leaf.to_string();
    let mut seeds = vec![first.clone()];
    seeds.extend(
        cluster
            .leaf_addrs()
            .into_iter()
            .filter(|addr| *addr != first),
    );
    let mut config = LeafConfig::new(seeds, cluster.pki.ca_pem(), Keypair::generate());
    // Endpoint publishing is another presence change; these tests count presence changes exactly.
    config.publish_endpoints = false;
    Ok(Leaf::connect(config).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_a_watcher_sees_its_contacts_presence_changes_in_order() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, NodeOptions::default()).await?;
    let watcher = cluster.leaf(0).await?;
    let alice = cluster.leaf(1).await?;
    let bob = cluster.leaf(2).await?;
    let mut stream = watcher
        .watch(WatchSpec {
            peers: vec![alice.peer_id().to_string(), bob.peer_id().to_string()],
            ..WatchSpec::default()
        })
        .await?;
    // A new watch starts with a reset and the current state.
    let WatchItem::Reset {
        applied_index: start,
    } = next_item(&mut stream).await?
    else {
        panic!("a watch starts with a reset");
    };
    for _ in 0..2 {
        let WatchItem::Event(event) = next_item(&mut stream).await? else {
            panic!("state event")
        };
        assert_eq!(event.applied_index, start);
    }
    alice
        .set_presence(PresenceStatus::Away, "lunch", HashMap::new())
        .await?;
    bob.set_presence(PresenceStatus::Busy, "", HashMap::new())
        .await?;
    alice
        .set_presence(PresenceStatus::Online, "back", HashMap::new())
        .await?;
    bob.detach().await;
    let expected = [
        (alice.peer_id().to_string(), PresenceStatus::Away),
        (bob.peer_id().to_string(), PresenceStatus::Busy),
        (alice.peer_id().to_string(), PresenceStatus::Online),
        (bob.peer_id().to_string(), PresenceStatus::Offline),
    ];
    let mut last_index = start;
    for (peer, status) in expected {
        let WatchItem::Event(event) = next_item(&mut stream).await? else {
            panic!("event")
        };
        assert!(
            event.applied_index > last_index,
            "events come in index order"
        );
        last_index = event.applied_index;
        let Some(watch_event::Change::Presence(presence)) = event.change else {
            panic!("presence change")
        };
        assert_eq!((presence.peer_id, presence.status), (peer, status as i32));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_killing_a_super_peer_moves_its_leaves_without_losing_messages_or_watch_events(
) -> anyhow::Result<()> {
    const LEAVES: usize = 20;
    let mut cluster = Cluster::start(3, NodeOptions::default()).await?;
    let leader = cluster.wait_leader().await?;
    let doomed = (0..3).find(|&index| index != leader).expect("a follower");
    let survivor = (0..3)
        .find(|&index| index != leader && index != doomed)
        .expect("another follower");
    let doomed_addr = cluster.nodes[doomed].endpoints().leaf.to_string();

    // 20 leaves on the doomed super peer, each counting what its app receives.
    let received: Arc<Mutex<HashMap<String, Vec<Vec<u8>>>>> = Arc::default();
    let mut leaves = Vec::new();
    for _ in 0..LEAVES {
        let leaf = leaf_on(&cluster, doomed).await?;
        assert_eq!(leaf.server(), doomed_addr);
        let (received, me) = (received.clone(), leaf.peer_id().to_string());
        leaf.on_message("note", move |message| {
            received
                .lock()
                .unwrap()
                .entry(me.clone())
                .or_default()
                .push(message.payload);
        });
        leaves.push(leaf);
    }
    // The watcher is on the doomed super peer too: its watch must survive the failover.
    let watcher = leaf_on(&cluster, doomed).await?;
    let mut stream = watcher
        .watch(WatchSpec {
            peers: leaves
                .iter()
                .map(|leaf| leaf.peer_id().to_string())
                .collect(),
            namespace: "fo".into(),
            ..WatchSpec::default()
        })
        .await?;
    let writer = cluster.leaf(survivor).await?;
    let sender = cluster.leaf(survivor).await?;

    // Before the kill: some records and messages.
    let mut written = Vec::new();
    for n in 0..10 {
        let key = format!("r{n:03}");
        writer.put("fo", &key, HashMap::new(), vec![], None).await?;
        written.push(key);
    }
    let mut sent_ok: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let mut failed_sends = 0;
    let send_round = |round: usize| {
        let leaves = &leaves;
        let sender = sender.clone();
        async move {
            let mut results = Vec::new();
            for leaf in leaves {
                let payload = format!("round {round}").into_bytes();
                let result = sender.send(&leaf.peer_id(), "note", payload.clone()).await;
                results.push((leaf.peer_id().to_string(), payload, result));
            }
            results
        }
    };
    for (peer, payload, result) in send_round(0).await {
        assert_eq!(result?, SendOutcome::Delivered);
        sent_ok.entry(peer).or_default().push(payload);
    }

    cluster.kill(doomed);
    // During the failover: more records and messages.
    for round in 1..=3 {
        for n in 0..10 {
            let key = format!("r{:03}", round * 10 + n);
            writer.put("fo", &key, HashMap::new(), vec![], None).await?;
            written.push(key);
        }
        for (peer, payload, result) in send_round(round).await {
            match result {
                Ok(_) => sent_ok.entry(peer).or_default().push(payload),
                Err(error) => {
                    failed_sends += 1;
                    println!("send failed during failover: {error}");
                }
            }
        }
    }
    // Every leaf re-attaches elsewhere.
    wait::until(
        "every leaf to re-attach elsewhere",
        Duration::from_secs(60),
        || async {
            Ok(leaves
                .iter()
                .chain(std::iter::once(&watcher))
                .all(|leaf| !leaf.server().is_empty() && leaf.server() != doomed_addr)
                .then_some(()))
        },
    )
    .await?;
    let mut times: Vec<Duration> = leaves
        .iter()
        .flat_map(|leaf| leaf.reattach_times())
        .collect();
    times.sort();
    let quantile = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "re-attach after SIGKILL of the hosting super peer ({} leaves): p50 {} ms, p95 {} ms, max {} ms",
        times.len(),
        quantile(0.5).as_millis(),
        quantile(0.95).as_millis(),
        times.last().expect("at least one").as_millis()
    );
    assert_eq!(times.len(), LEAVES);

    // After the failover: one more round, then every acknowledged message is in its app exactly once.
    for (peer, payload, result) in send_round(4).await {
        assert_eq!(
            result?,
            SendOutcome::Delivered,
            "after re-attaching, delivery is direct"
        );
        sent_ok.entry(peer).or_default().push(payload);
    }
    for n in 0..10 {
        let key = format!("r{:03}", 40 + n);
        writer.put("fo", &key, HashMap::new(), vec![], None).await?;
        written.push(key);
    }
    wait::until(
        "every acknowledged message to arrive",
        Duration::from_secs(60),
        || async {
            let received = received.lock().unwrap();
            Ok(sent_ok
                .iter()
                .all(|(peer, payloads)| received.get(peer).map_or(0, Vec::len) >= payloads.len())
                .then_some(()))
        },
    )
    .await?;
    {
        let received = received.lock().unwrap();
        for (peer, payloads) in &sent_ok {
            let got = &received[peer];
            let mut counts: BTreeMap<&Vec<u8>, usize> = BTreeMap::new();
            for payload in got {
                *counts.entry(payload).or_default() += 1;
            }
            for payload in payloads {
                assert_eq!(
                    counts.get(payload),
                    Some(&1),
                    "{peer}: {:?} not exactly once",
                    String::from_utf8_lossy(payload)
                );
            }
            assert!(
                got.len() <= payloads.len() + failed_sends,
                "{peer} got more than was sent"
            );
        }
    }

    // The watch: every record put exactly once, in index order, across the failover; no contact flapped offline.
    let mut seen_keys = HashSet::new();
    let mut last_index = 0;
    let mut offline = Vec::new();
    while seen_keys.len() < written.len() {
        match next_item(&mut stream).await? {
            WatchItem::Event(event) => {
                assert!(event.applied_index >= last_index, "index order");
                last_index = event.applied_index;
                match event.change {
                    Some(watch_event::Change::Record(change)) => {
                        assert!(
                            seen_keys.insert(change.key.clone()),
                            "{} delivered twice",
                            change.key
                        );
                    }
                    Some(watch_event::Change::Presence(presence))
                        if presence.status == PresenceStatus::Offline as i32 =>
                    {
                        offline.push(presence.peer_id);
                    }
                    _ => {}
                }
            }
            WatchItem::Reset { applied_index } => {
                assert_eq!(
                    last_index, 0,
                    "only the first item may be a reset (got one at {applied_index})"
                );
            }
            WatchItem::Refused(reason) => panic!("watch refused: {reason}"),
        }
    }
    assert_eq!(seen_keys, written.iter().cloned().collect::<HashSet<_>>());
    assert!(
        offline.is_empty(),
        "contacts flapped offline during the failover: {offline:?}"
    );
    Ok(())
}
