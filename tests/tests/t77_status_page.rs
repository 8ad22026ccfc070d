//! The status page in a real browser (Debian's headless Chromium): it lists the three members with their health,
//! a leaf's session and the NAT class mix, marks a SIGKILLed member within seconds, and leaves a screenshot
//! behind as an artifact.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vesper_tests::cluster::{Cluster, NodeOptions, CONVERGE_TIMEOUT};
use vesper_tests::ops;
use vesper_tests::wait;

/// Runs headless Chromium on `url` with its own profile in `profile`, letting the page's script run for a
/// moment of virtual time; `extra` picks the output (`--dump-dom`, `--screenshot=...`).
fn chromium(profile: &Path, url: &str, extra: &[String]) -> anyhow::Result<String> {
    let binary = ops::system_tool("chromium", "chromium")?;
    let output = std::process::Command::new(binary)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=3000")
        .args(extra)
        .arg(url)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The health the rendered page shows for each member row, by node id.
fn healths(dom: &str) -> Vec<(u64, String)> {
    dom.split("<tr data-node=\"")
        .skip(1)
        .filter_map(|row| {
            let (node, rest) = row.split_once('"')?;
            let health = rest.split("data-health=\"").nth(1)?.split('"').next()?;
            Some((node.parse().ok()?, health.to_string()))
        })
        .collect()
}

/// Where the test leaves its screenshot: `VESPER_ARTIFACTS`, else a folder in the system's temp dir.
fn artifact_dir() -> PathBuf {
    std::env::var_os("VESPER_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("vesper-artifacts"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t77_the_status_page_shows_the_members_and_marks_a_killed_one() -> anyhow::Result<()> {
    let options = NodeOptions {
        extra_args: [
            "--placement-update-interval",
            "200ms",
            "--placement-reconcile-interval",
            "500ms",
        ]
        .map(String::from)
        .to_vec(),
        ..NodeOptions::default()
    };
    let mut cluster = Cluster::start(3, options).await?;
    let leader = cluster.wait_leader().await?;
    let followers: Vec<usize> = (0..3).filter(|&index| index != leader).collect();
    let (viewer, victim) = (followers[0], followers[1]);
    // The page of a follower: its health figures come from the leader through the cluster.
    let ops: SocketAddr = cluster.nodes[viewer].endpoints().ops.expect("ops port");
    let url = format!("http://{ops}/");
    let profile = tempfile::tempdir()?;
    let dump = ["--dump-dom".to_string()];
    let status = cluster.status_of(leader).await?;
    let victim_id = cluster
        .node_id_in(&status, victim)
        .expect("the victim is a member");

    let rows = wait::until(
        "the page to show three healthy members",
        CONVERGE_TIMEOUT,
        || async {
            let rows = healths(&chromium(profile.path(), &url, &dump)?);
            let healthy = rows
                .iter()
                .filter(|(_, health)| health == "stable" || health == "healthy")
                .count();
            Ok((rows.len() == 3 && healthy == 3).then_some(rows))
        },
    )
    .await?;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let page = chromium(profile.path(), &url, &dump)?;
    assert!(page.contains("badge leader"), "no leader badge:\n{page}");

    // A leaf attached to the viewed node shows up in its session table and in the NAT class mix.
    let leaf = cluster.leaf(viewer).await?;
    let row = format!("data-peer=\"{}\"", leaf.peer_id());
    let page = wait::until(
        "the page to list the leaf's session",
        CONVERGE_TIMEOUT,
        || async {
            let page = chromium(profile.path(), &url, &dump)?;
            Ok((page.contains(&row) && page.contains("data-nat=\"")).then_some(page))
        },
    )
    .await?;
    assert!(page.contains("1 peers online"), "{page}");

    cluster.kill(victim);
    let killed_at = Instant::now();
    let marked = wait::until(
        "the page to mark the killed member",
        CONVERGE_TIMEOUT,
        || async {
            let rows = healths(&chromium(profile.path(), &url, &dump)?);
            Ok(rows
                .iter()
                .find(|(node, health)| {
                    *node == victim_id && (health == "suspect" || health == "dead")
                })
                .map(|(_, health)| health.clone()))
        },
    )
    .await?;
    let took = killed_at.elapsed();
    println!(
        "the page marked node {victim_id} {marked} {:.1} s after its SIGKILL",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(15), "marked only after {took:?}");

    let dir = artifact_dir();
    std::fs::create_dir_all(&dir)?;
    let shot = dir.join("t77-status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        profile.path(),
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,800".into(),
        ],
    )?;
    let png = std::fs::read(&shot)?;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!("screenshot: {}", shot.display());

    // The JSON behind the page says the same, and carries no record or message data.
    let (code, body) = ops::get(ops, "/api/v1/cluster").await?;
    assert_eq!(code, 200);
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(answer["members"].as_array().map(Vec::len), Some(3));
    assert!(
        answer["placement"]["target_voters"].as_u64().is_some(),
        "{answer}"
    );
    Ok(())
}
