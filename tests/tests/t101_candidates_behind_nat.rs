//! Candidates in the NAT lab: real `leafpeer serve --offer-superpeer` processes on a public host and behind two
//! kinds of NAT, three super peers on the lab's internet. Every host gets the operator's grant; only the public
//! one is proven reachable and becomes eligible. Behind a full-cone NAT (inbound UDP forwarded, TCP not) and an
//! ordinary home NAT, the dial-back fails and says why, and the node stays a candidate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::natlab::{Lab, LabHost, NatKind};

const RULES: &str = "[placement.candidates]
min_uptime = \"1s\"
min_mean_session = \"1s\"
proof_interval = \"3s\"
proof_ttl = \"30s\"
report_interval = \"500ms\"
refresh = \"10s\"
min_cores = 1
min_free_memory_bytes = 1048576
min_free_disk_bytes = 1048576
";

/// How long a host gets to reach its final verdict: a failed dial-back takes up to 5 s per prover.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(90);

fn gate<'a>(verdict: &'a Value, name: &str) -> Option<&'a Value> {
    verdict["gates"]
        .as_array()?
        .iter()
        .find(|gate| gate["name"] == name)
}

fn passed(verdict: &Value, name: &str) -> Option<bool> {
    gate(verdict, name)?["passed"].as_bool()
}

/// Runs `leafpeer serve --offer-superpeer` on `host` and reads its verdicts until `done` holds for one; returns
/// that verdict. The process is killed when the returned future ends.
async fn serve_until(
    lab: &Lab,
    host: &LabHost,
    cluster: &Cluster,
    dir: &std::path::Path,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let mut command =
        tokio::process::Command::from(lab.command(&host.ns, vesper_tests::binary("leafpeer")));
    command
        .arg("--seeds")
        .arg(cluster.leaf_addrs().join(","))
        .arg("--ca")
        .arg(cluster.pki.ca_cert())
        .arg("--key")
        .arg(dir.join("leaf.key"))
        .arg("--json")
        .args(["serve", "--offer-superpeer", "--role-dir"])
        .arg(dir.join("role"))
        .arg("--superpeer-bin")
        .arg(vesper_tests::binary("superpeer"))
        .args(["--role-ports", "7501,7500,7502", "--zone", host.kind.name()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().context("start leafpeer serve")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let verdict = tokio::time::timeout(VERDICT_TIMEOUT, async {
        let mut last = Value::Null;
        while let Some(line) = lines.next_line().await? {
            let value: Value = serde_json::from_str(&line)
                .with_context(|| format!("leafpeer printed a line that is not JSON: {line}"))?;
            if value.get("state").is_some() {
                if done(&value) {
                    return Ok(value);
                }
                last = value;
            }
        }
        anyhow::bail!("leafpeer serve on {} ended; last verdict {last}", host.kind)
    })
    .await;
    let _ = child.start_kill();
    let output = child.wait_with_output().await?;
    match verdict {
        Ok(Ok(verdict)) => Ok(verdict),
        Ok(Err(error)) => Err(error.context(format!(
            "stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        ))),
        Err(_) => anyhow::bail!(
            "no final verdict on {} within {VERDICT_TIMEOUT:?}; stderr: {}",
            host.kind,
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

#[test]
fn t101_only_a_public_candidate_is_proven_and_eligible() -> anyhow::Result<()> {
    let mut lab = Lab::new(3)?;
    let hosts: Vec<LabHost> = [NatKind::Public, NatKind::FullCone, NatKind::Easy]
        .into_iter()
        .map(|kind| lab.add_host(kind))
        .collect::<anyhow::Result<_>>()?;
    let lab = Arc::new(lab);
    let inet = lab.inet();
    let ips = (0..3)
        .map(|index| lab.super_peer_ip(index).into())
        .collect();
    let files = tempfile::tempdir()?;
    let config = files.path().join("superpeer.toml");
    std::fs::write(&config, RULES)?;
    let lab_inner = lab.clone();
    let root = files.path().to_path_buf();
    lab.run_in(&inet, async move {
        let lab = lab_inner;
        let cluster = Cluster::start(
            3,
            NodeOptions {
                listen_ips: ips,
                extra_args: vec!["--config".into(), config.display().to_string()],
                ..NodeOptions::default()
            },
        )
        .await?;
        let granted = cluster.vesperctl(0, &["placement", "grant", "--all"])?;
        ensure!(granted.status.success(), "{granted:?}");

        // The public host: proven, and eligible once its second of uptime has passed.
        let public = &hosts[0];
        let dir = root.join(public.kind.name());
        let verdict = serve_until(&lab, public, &cluster, &dir, |verdict| {
            verdict["state"] == "eligible"
        })
        .await?;
        ensure!(passed(&verdict, "proof") == Some(true), "{verdict}");

        // Behind a NAT: once the dial-back has been tried and the uptime gate passes, the verdict is final for
        // this proof interval, and it is "candidate" with the proof failing, saying why.
        for host in &hosts[1..] {
            let dir = root.join(host.kind.name());
            let verdict = serve_until(&lab, host, &cluster, &dir, |verdict| {
                passed(verdict, "uptime") == Some(true)
                    && gate(verdict, "proof").is_some_and(|proof| {
                        proof["detail"]
                            .as_str()
                            .is_some_and(|detail| detail != "not proven reachable yet")
                    })
            })
            .await?;
            ensure!(verdict["state"] == "candidate", "{}: {verdict}", host.kind);
            ensure!(
                passed(&verdict, "proof") == Some(false),
                "{}: {verdict}",
                host.kind
            );
            let detail = gate(&verdict, "proof").and_then(|proof| proof["detail"].as_str());
            println!(
                "{} candidate: proof gate: {}",
                host.kind,
                detail.unwrap_or_default()
            );
        }

        // The cluster's own view agrees: one eligible candidate, the public host's.
        let status = cluster.vesperctl(0, &["placement", "status", "--json"])?;
        ensure!(status.status.success(), "{status:?}");
        let status: Value = serde_json::from_slice(&status.stdout)?;
        let eligible: Vec<&Value> = status["candidates"]
            .as_array()
            .context("candidates")?
            .iter()
            .filter(|candidate| candidate["state"] == "eligible")
            .collect();
        ensure!(eligible.len() == 1, "{status}");
        ensure!(eligible[0]["zone"] == "public", "{status}");
        Ok(())
    })
}
