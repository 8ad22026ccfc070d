//! Serving as a super peer once adopted: the `superpeer` child process this library starts and supervises.
//!
//! When the placement controller adopts the node, the answer to its capability report carries a super peer
//! certificate for the node's own key, signed by an issuer of the cluster, the members to join through and
//! the host to advertise. The library then writes the role's files into its state directory:
//!
//! ```text
//! <state_dir>/role/cert.pem   the certificate chain (the node's certificate, then the issuer's)
//! <state_dir>/role/key.pem    the node's own Ed25519 key (PKCS#8), the key the certificate names
//! <state_dir>/role/ca.pem     the cluster CA (the one the library already trusts)
//! <state_dir>/role/adopted    the start parameters (advertise host, ports, join addresses), `key=value` lines
//! <state_dir>/data/           the super peer's data directory (its node key is the node's own key)
//! <state_dir>/superpeer.log   the child's output
//! ```
//!
//! and runs `superpeer` on the role's ports with them. A child that exits is started again after a pause that
//! doubles up to [`MAX_BACKOFF`]; a library that starts again with an `adopted` file in its state directory
//! goes straight to supervising. While the role runs, the node goes on reporting, marked `role_running`: the
//! answer "released" (the cluster retired the node, or gave its adoption up) stops the child, deletes `role/`
//! and `data/` (the id is tombstoned; a later adoption joins with a new one) and the node offers again. The
//! child is killed when the [`Leaf`] shuts down: the role lives only as long as the app that hosts it.
//!
//! [`Leaf`]: super::Leaf

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::shared::Shared;
use crate::error::LeafError;

/// Longest pause before a child that exited is started again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A child that ran this long before exiting starts again at once (the backoff is reset).
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Most join addresses kept.
const MAX_JOIN: usize = 16;
/// The start parameters file in `<state_dir>/role`.
const ADOPTED_FILE: &str = "adopted";

/// What the cluster handed over at adoption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The host (the IP the node was proven on) to advertise.
    pub advertise_host: String,
    /// Members' Cluster addresses to join through, in order of preference.
    pub join: Vec<String>,
    /// The role's Cluster, Leaf and Admin ports it was adopted on (a restart serves on these).
    pub ports: [u16; 3],
}

impl Adopted {
    fn to_text(&self) -> String {
        let [cluster, leaf, admin] = self.ports;
        let mut text = format!(
            "advertise_host={}\nports={cluster},{leaf},{admin}\n",
            self.advertise_host
        );
        for address in &self.join {
            text.push_str(&format!("join={address}\n"));
        }
        text
    }

    fn parse(text: &str) -> Option<Self> {
        let mut advertise_host = None;
        let mut join = Vec::new();
        let mut ports = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("advertise_host", value)) => advertise_host = Some(value.to_string()),
                Some(("ports", value)) => {
                    let parsed: Vec<u16> = value
                        .split(',')
                        .filter_map(|port| port.parse().ok())
                        .filter(|port| *port != 0)
                        .collect();
                    ports = <[u16; 3]>::try_from(parsed).ok();
                }
                Some(("join", value)) if join.len() < MAX_JOIN => join.push(value.to_string()),
                _ => {}
            }
        }
        Some(Self {
            advertise_host: advertise_host.filter(|host| !host.is_empty())?,
            join,
            ports: ports?,
        })
    }
}

/// What the role runs with: the offer's binary, directory, IP, ports, zone and extra flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSpec {
    pub superpeer_binary: PathBuf,
    pub state_dir: PathBuf,
    pub listen_ip: std::net::IpAddr,
    pub cluster_port: u16,
    pub leaf_port: u16,
    pub admin_port: u16,
    pub zone: Option<String>,
    pub role_args: Vec<String>,
}

fn role_dir(offer: &RoleSpec) -> PathBuf {
    offer.state_dir.join("role")
}

/// The start parameters of an earlier adoption, if this state directory has been adopted.
pub fn adopted_before(offer: &RoleSpec) -> Option<Adopted> {
    let text = std::fs::read_to_string(role_dir(offer).join(ADOPTED_FILE)).ok()?;
    Adopted::parse(&text)
}

fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), LeafError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    options
        .open(path)
        .and_then(|mut file| file.write_all(contents))
        .map_err(|error| LeafError::Config(format!("cannot write {}: {error}", path.display())))
}

/// Writes the role's files; the `adopted` file last, so a crash in between leaves a node that offers again.
pub fn install(
    shared: &Shared,
    offer: &RoleSpec,
    chain_pem: &str,
    adopted: &Adopted,
) -> Result<(), LeafError> {
    let dir = role_dir(offer);
    std::fs::create_dir_all(&dir)
        .map_err(|error| LeafError::Config(format!("cannot create {}: {error}", dir.display())))?;
    let keypair = &shared.config.keypair;
    let key_pem = vesper_proto::pinned_tls::private_key_pem(keypair)
        .map_err(|error| LeafError::Config(error.to_string()))?;
    write(&dir.join("cert.pem"), chain_pem.as_bytes(), false)?;
    write(&dir.join("key.pem"), key_pem.as_bytes(), true)?;
    write(&dir.join("ca.pem"), &shared.config.ca_cert_pem, false)?;
    let data = offer.state_dir.join("data");
    match keypair.save(&data.join("node.key")) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => {
            return Err(LeafError::Config(format!(
                "cannot write the super peer's node key in {}: {error}",
                data.display()
            )))
        }
    }
    write(&dir.join(ADOPTED_FILE), adopted.to_text().as_bytes(), false)
}

/// Deletes a released role's files and data (its super peer is stopped; the cluster has removed the node or
/// never let it in, so nothing committed lives only here). The log and the uptime history stay.
pub fn release(offer: &RoleSpec) -> Result<(), LeafError> {
    for dir in [role_dir(offer), offer.state_dir.join("data")] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(LeafError::Config(format!(
                    "cannot delete {}: {error}",
                    dir.display()
                )))
            }
        }
    }
    Ok(())
}

/// The child's command line.
fn command(offer: &RoleSpec, adopted: &Adopted, join: Option<&str>) -> tokio::process::Command {
    let dir = role_dir(offer);
    let listen = |port: u16| std::net::SocketAddr::new(offer.listen_ip, port).to_string();
    let mut command = tokio::process::Command::new(&offer.superpeer_binary);
    command
        .arg("--data-dir")
        .arg(offer.state_dir.join("data"))
        .args(["--leaf-listen", &listen(offer.leaf_port)])
        .args(["--cluster-listen", &listen(offer.cluster_port)])
        .args(["--admin-listen", &listen(offer.admin_port)])
        // The role's ops port stays on loopback, on a free port (its data directory's endpoints.json names it).
        .args(["--ops-listen", "127.0.0.1:0"])
        .args(["--advertise-host", &adopted.advertise_host])
        .arg("--tls-ca")
        .arg(dir.join("ca.pem"))
        .arg("--tls-cert")
        .arg(dir.join("cert.pem"))
        .arg("--tls-key")
        .arg(dir.join("key.pem"))
        // It ends when this process does, even when this one is killed: its standard input is our pipe.
        .arg("--exit-with-stdin");
    if let Some(zone) = &offer.zone {
        command.args(["--zone", zone]);
    }
    if let Some(seed) = join {
        command.args(["--join", seed]);
    }
    command.args(&offer.role_args);
    command
}

/// Runs the child until `stop`, starting it again when it exits; `report` hears "serving" when it starts and
/// "restarting" between runs.
pub async fn supervise(
    stop: CancellationToken,
    offer: RoleSpec,
    adopted: Adopted,
    report: impl Fn(&'static str) + Send,
) {
    let log_path = offer.state_dir.join("superpeer.log");
    let mut backoff = Duration::from_secs(1);
    let mut attempt = 0usize;
    loop {
        // A data directory that belongs to a cluster already resumes whatever --join says; the join
        // addresses are tried in turn for a first start that did not get in.
        let join =
            (!adopted.join.is_empty()).then(|| adopted.join[attempt % adopted.join.len()].as_str());
        attempt += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path);
        let mut command = command(&offer, &adopted, join);
        command.stdin(Stdio::piped()).kill_on_drop(true);
        match log.and_then(|file| Ok((file.try_clone()?, file))) {
            Ok((out, err)) => {
                command.stdout(out).stderr(err);
            }
            Err(error) => {
                tracing::warn!(%error, path = %log_path.display(), "cannot open the super peer log");
                command.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let started = tokio::time::Instant::now();
        match command.spawn() {
            Ok(mut child) => {
                // Held while it runs: dropping it (or this process ending) closes the child's input.
                let _lifeline = child.stdin.take();
                tracing::info!(pid = child.id(), ?join, "super peer role started");
                report("serving");
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        // Asked to stop: SIGKILL is what kill_on_drop would do too; wait so no zombie stays.
                        let _ = child.kill().await;
                        return;
                    }
                    exit = child.wait() => {
                        tracing::warn!(?exit, "the super peer role exited; starting it again");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, binary = %offer.superpeer_binary.display(), "cannot start the super peer role");
            }
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff = Duration::from_secs(1);
        }
        report("restarting");
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_parameters_read_back_and_bad_files_are_ignored() {
        let adopted = Adopted {
            advertise_host: "10.0.0.7".into(),
            join: vec!["10.0.0.1:7401".into(), "10.0.0.2:7401".into()],
            ports: [7501, 7500, 7502],
        };
        assert_eq!(Adopted::parse(&adopted.to_text()), Some(adopted));
        assert_eq!(Adopted::parse(""), None);
        assert_eq!(
            Adopted::parse("ports=1,2,3\njoin=a:1\n"),
            None,
            "no host to advertise"
        );
        assert_eq!(
            Adopted::parse("advertise_host=h\nports=1,0,3\n"),
            None,
            "a port 0"
        );
        assert_eq!(Adopted::parse("advertise_host=h\n"), None, "no ports");
        let many: String = (0..100).map(|i| format!("join=h:{i}\n")).collect();
        let parsed = Adopted::parse(&format!("advertise_host=h\nports=1,2,3\n{many}")).unwrap();
        assert_eq!(parsed.join.len(), MAX_JOIN);
    }
}
