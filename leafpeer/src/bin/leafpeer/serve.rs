//! The `serve` command: a long-running leaf, optionally offering this node as a super peer.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;
use vesper_leafpeer::{OfferStatus, SuperPeerOffer};

use crate::args::Command;
use crate::output::Attached;

/// The offer `serve --offer-superpeer` makes, if it makes one.
pub fn offer(command: &Command) -> anyhow::Result<Option<SuperPeerOffer>> {
    let Command::Serve {
        offer_superpeer: true,
        superpeer_bin,
        role_dir,
        role_ip,
        role_ports,
        zone,
        metered,
        on_battery,
        role_args,
    } = command
    else {
        return Ok(None);
    };
    let superpeer_binary = match superpeer_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("cannot find this program's own path to look for `superpeer` next to it")?
            .with_file_name("superpeer"),
    };
    let state_dir: PathBuf = role_dir
        .clone()
        .context("--role-dir is required with --offer-superpeer")?;
    let [cluster_port, leaf_port, admin_port] = role_ports[..] else {
        anyhow::bail!("--role-ports takes three ports: cluster,leaf,admin");
    };
    Ok(Some(SuperPeerOffer {
        superpeer_binary,
        state_dir,
        listen_ip: *role_ip,
        cluster_port,
        leaf_port,
        admin_port,
        zone: zone.clone(),
        metered: *metered,
        on_battery: *on_battery,
        role_args: role_args.clone(),
    }))
}

fn verdict_json(status: &OfferStatus) -> serde_json::Value {
    json!({
        "state": status.state,
        "proof_at_ms": status.proof_at_ms,
        "gates": status.gates.iter().map(|gate| json!({
            "name": gate.name, "passed": gate.passed, "detail": gate.detail,
        })).collect::<Vec<_>>(),
    })
}

fn verdict_text(status: &OfferStatus) -> String {
    let mut text = format!("super peer offer: {}", status.state);
    for gate in &status.gates {
        text.push_str(&format!(
            "\n  {} {:<12} {}",
            if gate.passed { "ok  " } else { "FAIL" },
            gate.name,
            gate.detail
        ));
    }
    text
}

/// Runs `serve` until interrupted, printing each new verdict on the offer (when it makes one).
pub async fn run(at: &Attached<'_>, offering: bool) -> anyhow::Result<()> {
    let leaf = at.leaf;
    at.out.print(
        json!({ "serving": leaf.peer_id().to_string(), "server": leaf.server(), "offer": offering }),
        || format!("serving as {} (attached to {})", leaf.peer_id(), leaf.server()),
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let mut last: Option<OfferStatus> = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            ended = leaf.closed() => anyhow::bail!(
                "the session ended for good{}",
                ended.map(|error| format!(": {error}")).unwrap_or_default()
            ),
            verdict = leaf.offer_changed(), if offering => {
                if let Some(verdict) = verdict {
                    if last.as_ref() != Some(&verdict) {
                        at.out.print(verdict_json(&verdict), || verdict_text(&verdict));
                        last = Some(verdict);
                    }
                }
            }
        }
    }
    Ok(())
}
