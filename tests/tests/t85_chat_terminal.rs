//! Two interactive `leafpeer chat` processes in real pseudo-terminals (tmux): lines typed on one side appear on
//! the other.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::wait;

/// A private tmux server, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        Tmux {
            socket: format!(
                "vesper-test-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ),
        }
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn screen(&self, session: &str) -> anyhow::Result<String> {
        self.run(&["capture-pane", "-p", "-t", session])
    }

    async fn wait_for(&self, session: &str, text: &str) -> anyhow::Result<()> {
        wait::until(
            &format!("{text:?} on {session}'s screen"),
            Duration::from_secs(30),
            || async { Ok(self.screen(session)?.contains(text).then_some(())) },
        )
        .await
        .map_err(|error| {
            let screen = self.screen(session).unwrap_or_default();
            error.context(format!("{session}'s screen:\n{screen}"))
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t85_two_interactive_chats_exchange_typed_lines() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, NodeOptions::default()).await?;
    let leafpeer = vesper_tests::binary("leafpeer");
    let seeds = cluster.leaf_addrs().join(",");
    let ca = cluster.pki.ca_cert();
    let base = |key: &str| {
        format!(
            "{} --seeds {} --ca {} --key {}",
            leafpeer.display(),
            seeds,
            ca.display(),
            cluster.root().join(key).display()
        )
    };
    let id_of = |key: &str| -> anyhow::Result<String> {
        let output = Command::new("sh")
            .arg("-c")
            .arg(format!("{} --json id", base(key)))
            .output()?;
        let value: Value = serde_json::from_slice(&output.stdout)?;
        Ok(value["peer_id"].as_str().unwrap_or_default().to_string())
    };
    let (alice_id, bob_id) = (id_of("alice.key")?, id_of("bob.key")?);

    let tmux = Tmux::new();
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "alice",
        "-x",
        "200",
        "-y",
        "40",
        &format!("{} chat {bob_id}", base("alice.key")),
    ])?;
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "bob",
        "-x",
        "200",
        "-y",
        "40",
        &format!("{} chat {alice_id}", base("bob.key")),
    ])?;
    tmux.wait_for("alice", "chatting with").await?;
    tmux.wait_for("bob", "chatting with").await?;

    tmux.run(&["send-keys", "-t", "alice", "hello from alice", "Enter"])?;
    tmux.wait_for("bob", "hello from alice").await?;
    tmux.run(&["send-keys", "-t", "bob", "hi alice, bob here", "Enter"])?;
    tmux.wait_for("alice", "hi alice, bob here").await?;
    // Presence changes show up live: bob leaves (Ctrl-D detaches) and alice sees him go offline.
    tmux.run(&["send-keys", "-t", "bob", "C-d"])?;
    tmux.wait_for("alice", "is offline").await?;
    Ok(())
}
