//! The Python reference client (`clients/python`, stubs generated from the .proto files at test time) against a
//! real cluster, beside a Rust leaf: attach, records with compare-and-set, presence, keepalives past the session
//! TTL, a watch, a message each way, and the mailbox after a detach. The client's scenario (`check.py`) checks
//! its side and reports each step as a JSON line; this test checks the Rust side and tells it what it needs.
//! The venv comes from `scripts/python-client.sh`: without Python or packages the test fails, it never skips.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use vesper_leafpeer::{Consistency, Message, PeerId, PresenceStatus, SendOutcome};
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::wait;

/// What the scenario sends with; `check.py` expects the same.
const KIND: &str = "vesper.pytest";
/// Deadline of each step of the scenario (check.py allows each of its waits 60 s).
const STEP: Duration = Duration::from_secs(90);
/// The session TTL of this cluster, and how long the client stays attached without a call: only its pings
/// keep it attached that long.
const SESSION_TTL: &str = "3s";
const HOLD_SECONDS: &str = "7";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

/// Runs `scripts/python-client.sh` (creating the venv and stubs on first use) and returns its `python`.
fn python() -> PathBuf {
    let output = Command::new(repo_root().join("scripts/python-client.sh"))
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/python-client.sh");
    assert!(
        output.status.success(),
        "scripts/python-client.sh failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        path.is_file(),
        "scripts/python-client.sh printed {path:?}, not an interpreter"
    );
    path
}

/// `check.py` running: its stdin, and its stdout lines parsed.
struct Scenario {
    child: Child,
    stdin: ChildStdin,
    steps: tokio::sync::mpsc::Receiver<Value>,
    stderr: PathBuf,
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Scenario {
    fn start(python: &Path, cluster: &Cluster) -> anyhow::Result<Scenario> {
        let stderr = cluster.root().join("check-py.stderr");
        let mut child = Command::new(python)
            .arg(repo_root().join("clients/python/check.py"))
            .arg("--seeds")
            .arg(cluster.leaf_addrs().join(","))
            .arg("--ca")
            .arg(cluster.pki.ca_cert())
            .arg("--hold")
            .arg(HOLD_SECONDS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, steps) = tokio::sync::mpsc::channel(64);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({"step": "not json", "line": line}));
                if tx.blocking_send(value).is_err() {
                    break;
                }
            }
        });
        Ok(Scenario {
            child,
            stdin,
            steps,
            stderr,
        })
    }

    /// The next step the client reports, which must be `expected`.
    async fn step(&mut self, expected: &str) -> Value {
        let got = wait::next(
            &format!("step {expected:?} of check.py"),
            STEP,
            &mut self.steps,
        )
        .await;
        let got = match got {
            Ok(value) => value,
            Err(error) => panic!("{error:#}\n{}", self.log()),
        };
        assert_eq!(
            got["step"],
            expected,
            "check.py reported {got} instead of step {expected:?}\n{}",
            self.log()
        );
        got
    }

    fn tell(&mut self, value: Value) {
        writeln!(self.stdin, "{value}").expect("write to check.py");
        self.stdin.flush().expect("flush to check.py");
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("check.py stderr ({}):\n{text}", self.stderr.display())
    }
}

async fn next_message(inbox: &mut tokio::sync::mpsc::Receiver<Message>) -> Message {
    wait::next("message from the Python client", STEP, inbox)
        .await
        .expect("a message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t67_the_python_reference_client_speaks_the_protocol() -> anyhow::Result<()> {
    // First, so that a first run's venv set-up does not eat into any cluster deadline.
    let python = python();
    let options = NodeOptions {
        extra_args: [
            "--keepalive-interval",
            "300ms",
            "--session-ttl",
            SESSION_TTL,
        ]
        .map(String::from)
        .to_vec(),
        ..NodeOptions::default()
    };
    let cluster = Cluster::start(3, options).await?;
    let rust = cluster.leaf(1).await?;
    let mut inbox = rust.messages().expect("the first call gets the stream");
    let mut scenario = Scenario::start(&python, &cluster)?;

    let attached = scenario.step("attached").await;
    let python_text = attached["peer_id"].as_str().expect("peer id").to_string();
    // The Python client writes the PeerId text as Rust does: it parses, and the cluster knows it under it.
    let python_peer: PeerId = python_text.parse()?;
    assert_eq!(python_peer.to_string(), python_text);
    assert_eq!(attached["protocol"], vesper_proto::version::NEWEST);
    let seen = rust
        .lookup(&python_peer, Consistency::Linearizable)
        .await?
        .expect("the Python client attached");
    assert_eq!(seen.status, PresenceStatus::Online as i32);
    scenario.tell(json!({"rust_peer_id": rust.peer_id().to_string()}));

    let records = scenario.step("records").await;
    let record = rust
        .get("pyclient", "k1", Consistency::Linearizable)
        .await?
        .expect("the record the Python client put");
    assert_eq!(record.owner, python_text);
    assert_eq!((record.value.as_slice(), record.version), (&b"v2"[..], 2));
    assert_eq!(records["version"], 2);

    scenario.step("presence").await;
    let seen = rust
        .lookup(&python_peer, Consistency::Linearizable)
        .await?
        .expect("known");
    assert_eq!(seen.status, PresenceStatus::Away as i32);
    assert_eq!(seen.note, "written in python");
    assert_eq!(
        seen.attributes.get("lang").map(String::as_str),
        Some("python")
    );

    scenario.step("keepalive").await;

    scenario.step("watching").await;
    rust.set_presence(PresenceStatus::Busy, "rust is busy", Default::default())
        .await?;
    scenario.step("watch_event").await;

    let outcome = rust
        .send(&python_peer, KIND, b"hello from rust".to_vec())
        .await?;
    assert_eq!(
        outcome,
        SendOutcome::Delivered,
        "the Python client acknowledged it"
    );
    scenario.step("received").await;

    let sent = scenario.step("sent").await;
    assert_eq!(sent["outcome"], "delivered");
    let message = next_message(&mut inbox).await;
    assert_eq!(message.from, python_text);
    assert_eq!(message.kind, KIND);
    assert_eq!(message.payload, b"hello from python");
    assert!(!message.from_mailbox);

    // After its goodbye the Python client shows offline (at once, not after the grace period), and a message
    // to it waits in its mailbox.
    scenario.step("detached").await;
    wait::until(
        "the Python client to show offline",
        Duration::from_secs(30),
        || async {
            let presence = rust.lookup(&python_peer, Consistency::Linearizable).await?;
            Ok(presence
                .filter(|presence| presence.status == PresenceStatus::Offline as i32)
                .map(|_| ()))
        },
    )
    .await?;
    let outcome = rust
        .send(&python_peer, KIND, b"kept in the mailbox".to_vec())
        .await?;
    assert_eq!(outcome, SendOutcome::Queued, "the Python client is offline");
    scenario.tell(json!({"mailbox": "sent"}));
    scenario.step("mailbox_received").await;
    // A direct message after it: once the client has this one, it has seen whatever the mailbox held. The Rust
    // leaf's super peer routes by its own replica, which may not have applied the re-attach yet (then the send
    // is queued and drained instead): wait until that replica shows the client online.
    wait::until(
        "the Rust leaf's super peer to see the Python client online again",
        Duration::from_secs(30),
        || async {
            let presence = rust.lookup(&python_peer, Consistency::Stale).await?;
            Ok(presence
                .filter(|presence| presence.status == PresenceStatus::Online as i32)
                .map(|_| ()))
        },
    )
    .await?;
    let outcome = rust
        .send(&python_peer, KIND, b"after the mailbox".to_vec())
        .await?;
    assert_eq!(outcome, SendOutcome::Delivered);
    let done = scenario.step("done").await;
    eprintln!("check.py: {done}");

    let status = wait::until("check.py to exit", STEP, || {
        let exited = scenario.child.try_wait();
        async move { Ok(exited?) }
    })
    .await?;
    assert!(
        status.success(),
        "check.py exited with {status}\n{}",
        scenario.log()
    );
    Ok(())
}
