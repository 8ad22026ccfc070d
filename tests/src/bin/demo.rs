//! `vesper-demo`: the conference story with real processes, from start to summary.
//!
//! A local 3-super-peer cluster starts (its own throwaway CA and free ports). Alice creates a conference and
//! invites Bob and Carol; Bob accepts, Carol declines. Alice and Bob open the conference window (`leafpeer
//! join`, real processes fed through their standard input) and chat; in the middle of the chat the super peer
//! Alice is attached to is killed; her leaf moves to another super peer and the chat goes on. At the end a
//! summary shows who received what, in which order.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use clap::Parser;
use serde_json::{json, Value};
use vesper_tests::cluster::{Cluster, NodeOptions};

/// Run the Vesper conference demo.
#[derive(Debug, Parser)]
struct Args {
    /// Print the summary as JSON (for scripts and CI).
    #[arg(long)]
    json: bool,
}

struct Demo {
    cluster: Cluster,
}

impl Demo {
    fn leafpeer(&self, key: &str, first_seed: usize) -> Command {
        let first = self.cluster.nodes[first_seed].endpoints().leaf.to_string();
        let mut seeds = vec![first.clone()];
        seeds.extend(
            self.cluster
                .leaf_addrs()
                .into_iter()
                .filter(|addr| *addr != first),
        );
        let mut command = Command::new(vesper_tests::binary("leafpeer"));
        command
            .arg("--seeds")
            .arg(seeds.join(","))
            .arg("--ca")
            .arg(self.cluster.pki.ca_cert())
            .arg("--key")
            .arg(self.cluster.root().join(format!("{key}.key")));
        command
    }

    fn run_json(&self, key: &str, args: &[&str]) -> anyhow::Result<Value> {
        let output = self.leafpeer(key, 0).arg("--json").args(args).output()?;
        ensure!(
            output.status.success(),
            "leafpeer {args:?} as {key}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(serde_json::from_slice(&output.stdout)?)
    }
}

/// A `leafpeer join` process: its stdin, and the chat lines it printed.
struct Window {
    child: Child,
    stdin: ChildStdin,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Window {
    fn open(demo: &Demo, key: &str, first_seed: usize) -> anyhow::Result<Window> {
        let mut child = demo
            .leafpeer(key, first_seed)
            .args(["join", "standup"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines lock").push(line);
            }
        });
        Ok(Window {
            child,
            stdin,
            lines,
        })
    }

    fn say(&mut self, text: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{text}")?;
        Ok(self.stdin.flush()?)
    }

    /// Chat lines seen so far ("#N author: text"), without the roster header.
    fn chat(&self) -> Vec<String> {
        self.lines
            .lock()
            .expect("lines lock")
            .iter()
            .filter(|line| line.starts_with('#'))
            .cloned()
            .collect()
    }
}

async fn wait_chat(windows: &[&Window], count: usize) -> anyhow::Result<()> {
    vesper_tests::wait::until(
        &format!("{count} chat lines in every window"),
        Duration::from_secs(60),
        || async {
            Ok(windows
                .iter()
                .all(|window| window.chat().len() >= count)
                .then_some(()))
        },
    )
    .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let say = |text: &str| {
        if !args.json {
            println!("{text}");
        }
    };
    say("starting a local cluster of 3 super peers ...");
    let mut demo = Demo {
        cluster: Cluster::start(3, NodeOptions::default()).await?,
    };
    let id = |demo: &Demo, key: &str| -> anyhow::Result<String> {
        Ok(demo.run_json(key, &["id"])?["peer_id"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    let (alice, bob, carol) = (id(&demo, "alice")?, id(&demo, "bob")?, id(&demo, "carol")?);
    say("alice creates the conference \"standup\" and invites bob and carol");
    demo.run_json(
        "alice",
        &[
            "create",
            "standup",
            "--title",
            "Daily standup",
            "--starts-in",
            "0",
        ],
    )?;
    demo.run_json("alice", &["invite", "standup", &bob, &carol])?;
    say("bob accepts, carol declines");
    demo.run_json("bob", &["accept", "standup"])?;
    let roster = demo.run_json("carol", &["decline", "standup"])?;

    // Alice's window is attached to super peer 2, which dies mid-chat; Bob's to super peer 3.
    let mut alice_window = Window::open(&demo, "alice", 1)?;
    let mut bob_window = Window::open(&demo, "bob", 2)?;
    say("alice and bob open the conference window and chat");
    // Wait until both windows watch the conference: they say "joined" once their watch is in place.
    vesper_tests::wait::until("both windows to join", Duration::from_secs(30), || async {
        Ok([&alice_window, &bob_window]
            .iter()
            .all(|window| {
                window
                    .lines
                    .lock()
                    .expect("lines")
                    .iter()
                    .any(|line| line.starts_with("joined"))
            })
            .then_some(()))
    })
    .await?;
    alice_window.say("good morning")?;
    wait_chat(&[&alice_window, &bob_window], 1).await?;
    bob_window.say("morning! shipping the watch resume today")?;
    wait_chat(&[&alice_window, &bob_window], 2).await?;
    say("super peer 2 (alice's) is killed mid-chat");
    demo.cluster.kill(1);
    alice_window.say("nice. my super peer just died, still here")?;
    wait_chat(&[&alice_window, &bob_window], 3).await?;
    bob_window.say("no gap on my side")?;
    wait_chat(&[&alice_window, &bob_window], 4).await?;

    let alice_saw = alice_window.chat();
    let bob_saw = bob_window.chat();
    for mut window in [alice_window, bob_window] {
        drop(window.stdin);
        let _ = window.child.wait();
    }
    let summary = json!({
        "conference": "standup",
        "roster": roster["invitees"],
        "owner": alice,
        "killed_super_peer": 2,
        "received": { "alice": alice_saw, "bob": bob_saw },
        "same_order": alice_saw == bob_saw,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!("\nsummary");
        println!("  roster: bob accepted, carol declined");
        println!("  alice received:");
        for line in &alice_saw {
            println!("    {line}");
        }
        println!("  bob received:");
        for line in &bob_saw {
            println!("    {line}");
        }
        println!(
            "  both saw the same {} lines in the same order: {}",
            alice_saw.len(),
            if alice_saw == bob_saw { "yes" } else { "NO" }
        );
    }
    ensure!(alice_saw == bob_saw, "the participants saw different chats");
    Ok(())
}
