//! The `leafpeer` command line against a real cluster: records, presence, messages and errors, through `--json`.

use std::process::Command;

use serde_json::Value;
use vesper_tests::cli::{json_of, leafpeer};
use vesper_tests::cluster::{Cluster, NodeOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t80_the_command_line_covers_records_presence_and_messages() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, NodeOptions::default()).await?;
    let alice = cluster.root().join("alice.key");
    let bob = cluster.root().join("bob.key");
    let alice_id = json_of(&leafpeer(&cluster, &alice, &["id"]))["peer_id"]
        .as_str()
        .expect("peer id")
        .to_string();
    let bob_id = json_of(&leafpeer(&cluster, &bob, &["id"]))["peer_id"]
        .as_str()
        .expect("peer id")
        .to_string();
    assert_ne!(alice_id, bob_id);

    let put = json_of(&leafpeer(
        &cluster,
        &alice,
        &[
            "put",
            "notes",
            "n1",
            "--value",
            "hello",
            "--attr",
            "topic=test",
        ],
    ));
    assert_eq!(put["version"], 1);
    assert_eq!(put["owner"], alice_id);
    let got = json_of(&leafpeer(&cluster, &bob, &["get", "notes", "n1"]));
    assert_eq!(got["value"], "hello");
    let found = json_of(&leafpeer(
        &cluster,
        &bob,
        &["search", "notes", "--eq", "topic=test"],
    ));
    assert_eq!(found.as_array().map(Vec::len), Some(1));

    // Errors: a foreign write, a missing record, a bad status, an unreachable cluster.
    let refused = leafpeer(&cluster, &bob, &["put", "notes", "n1", "--value", "mine"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr)
        .contains("permission denied: record is owned by another peer"));
    let missing = leafpeer(&cluster, &bob, &["get", "notes", "nope"]);
    assert_eq!(missing.status.code(), Some(2));
    let bad = leafpeer(&cluster, &bob, &["status", "sleepy"]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not online, away or busy"));

    // Presence.
    let presence = json_of(&leafpeer(
        &cluster,
        &alice,
        &["status", "away", "--note", "lunch", "--attr", "city=porto"],
    ));
    assert_eq!(presence["status"], "away");
    let peers = json_of(&leafpeer(
        &cluster,
        &bob,
        &["search-peers", "--eq", "city=porto"],
    ));
    assert_eq!(peers[0]["peer_id"], alice_id);

    // Messages: bob is offline (each command detaches), so they wait in his mailbox and arrive in order.
    for text in ["one", "two"] {
        let sent = json_of(&leafpeer(&cluster, &alice, &["send", &bob_id, text]));
        assert_eq!(sent["outcome"], "queued");
    }
    let listened = leafpeer(
        &cluster,
        &bob,
        &["listen", "--count", "2", "--timeout", "30"],
    );
    assert!(
        listened.status.success(),
        "{}",
        String::from_utf8_lossy(&listened.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&listened.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON document per line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[0]["text"].as_str(), lines[1]["text"].as_str()),
        (Some("one"), Some("two"))
    );
    assert_eq!(lines[0]["from"], alice_id);
    assert_eq!(lines[0]["from_mailbox"], true);

    // Conferences through the command line.
    let carol = cluster.root().join("carol.key");
    let mallory = cluster.root().join("mallory.key");
    let carol_id = json_of(&leafpeer(&cluster, &carol, &["id"]))["peer_id"]
        .as_str()
        .expect("id")
        .to_string();
    let created = json_of(&leafpeer(
        &cluster,
        &alice,
        &["create", "retro", "--title", "Retro", "--starts-in", "3600"],
    ));
    assert_eq!(created["owner"], alice_id);
    json_of(&leafpeer(
        &cluster,
        &alice,
        &["invite", "retro", &bob_id, &carol_id],
    ));
    json_of(&leafpeer(&cluster, &bob, &["accept", "retro"]));
    let roster = json_of(&leafpeer(&cluster, &carol, &["decline", "retro"]));
    let state = |peer: &str| {
        roster["invitees"]
            .as_array()
            .expect("invitees")
            .iter()
            .find(|invitee| invitee["peer_id"] == peer)
            .map(|invitee| invitee["state"].clone())
    };
    assert_eq!(state(&bob_id), Some(Value::from("accepted")));
    assert_eq!(state(&carol_id), Some(Value::from("declined")));
    let refused = leafpeer(&cluster, &mallory, &["accept", "retro"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not invited"));
    let said = json_of(&leafpeer(&cluster, &bob, &["say", "retro", "hello all"]));
    assert_eq!(said["sequence"], 1);

    // Seeds, CA and key from a config file instead of flags.
    let config = cluster.root().join("leafpeer.toml");
    std::fs::write(
        &config,
        format!(
            "seeds = [\"{}\"]\nca = \"{}\"\nkey = \"{}\"\n",
            cluster.leaf_addrs()[0],
            cluster.pki.ca_cert().display(),
            carol.display()
        ),
    )?;
    let output = Command::new(vesper_tests::binary("leafpeer"))
        .arg("--config")
        .arg(&config)
        .args(["--json", "roster", "retro"])
        .output()?;
    assert_eq!(json_of(&output)["id"], "retro");
    std::fs::write(&config, "seedz = []\n")?;
    let output = Command::new(vesper_tests::binary("leafpeer"))
        .arg("--config")
        .arg(&config)
        .args(["roster", "retro"])
        .output()?;
    assert_eq!(output.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unknown field"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t80_the_command_line_shows_what_the_library_logs() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut cluster = Cluster::start(3, NodeOptions::default()).await?;
    let key = cluster.root().join("listener.key");
    let peer_id: vesper_proto::PeerId = json_of(&leafpeer(&cluster, &key, &["id"]))["peer_id"]
        .as_str()
        .expect("peer id")
        .parse()?;
    // Seeded with node 0 alone; its welcome names the other members to fail over to.
    let mut listener = tokio::process::Command::new(vesper_tests::binary("leafpeer"))
        .arg("--seeds")
        .arg(cluster.nodes[0].endpoints().leaf.to_string())
        .arg("--ca")
        .arg(cluster.pki.ca_cert())
        .arg("--key")
        .arg(&key)
        .args(["--json", "-v", "--log-format", "json"])
        .args(["listen", "--count", "1", "--timeout", "120"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(256);
    let mut stderr = tokio::io::BufReader::new(listener.stderr.take().expect("piped")).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            if lines_tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let sender = cluster.leaf(1).await?;
    vesper_tests::wait::until(
        "the listener online",
        vesper_tests::cluster::CONVERGE_TIMEOUT,
        || async {
            let presence = sender
                .lookup(&peer_id, vesper_leafpeer::Consistency::Linearizable)
                .await?;
            Ok(presence
                .filter(|presence| {
                    presence.status != vesper_leafpeer::PresenceStatus::Offline as i32
                })
                .map(|_| ()))
        },
    )
    .await?;
    cluster.kill(0);
    // With -v the library's account of the failover reaches stderr, one JSON object per line.
    let mut seen = Vec::new();
    loop {
        let line = vesper_tests::wait::next(
            "a log line saying the listener re-attached",
            vesper_tests::cluster::CONVERGE_TIMEOUT,
            &mut lines,
        )
        .await
        .map_err(|error| anyhow::anyhow!("{error}; stderr so far: {seen:#?}"))?;
        let object: Value = serde_json::from_str(&line)
            .map_err(|error| anyhow::anyhow!("not a JSON log line ({error}): {line}"))?;
        assert!(object["level"].is_string(), "{line}");
        let message = object["fields"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        seen.push(line);
        if message == "re-attached" {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|line| line.contains("session lost; re-attaching")),
        "{seen:#?}"
    );
    sender.send(&peer_id, "text", b"after".to_vec()).await?;
    let output = tokio::time::timeout(
        vesper_tests::cluster::CONVERGE_TIMEOUT,
        listener.wait_with_output(),
    )
    .await??;
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("after"));
    Ok(())
}
