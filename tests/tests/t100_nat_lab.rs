//! The NAT lab, the STUN port and NAT classification.
//!
//! Two super peers run on the lab's internet segment; one host sits behind each kind of network. The tests
//! check the lab itself (each router maps and filters as its kind says), that a third-party STUN client
//! (coturn's `turnutils_stunclient`) gets the right mapped address from a super peer, that real `leafpeer`
//! processes behind every NAT measure the right class and publish it, and that a STUN flood from one source
//! gets a bounded number of answers no larger than the requests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use tokio::net::UdpSocket;
use vesper_leafpeer::nat;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::natlab::{Lab, LabHost, NatKind};

/// Starts two super peers on the lab's internet addresses; returns the cluster and their STUN addresses.
async fn cluster_in(lab_ips: Vec<std::net::IpAddr>) -> anyhow::Result<(Cluster, Vec<SocketAddr>)> {
    let cluster = Cluster::start(
        2,
        NodeOptions {
            listen_ips: lab_ips,
            ..NodeOptions::default()
        },
    )
    .await?;
    let stun = cluster
        .nodes
        .iter()
        .map(|node| node.endpoints().stun.context("super peer serves STUN"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((cluster, stun))
}

/// What one lab host saw: its socket's mappings towards two super peers, and which probes got in.
#[derive(Debug)]
struct Observed {
    mapped: Vec<SocketAddr>,
    /// Sources of the datagrams that reached the host's socket after the probes were sent.
    reached_from: Vec<SocketAddr>,
}

/// On `host`: binds a socket, learns its mappings from both STUN servers, reports them on `mapped_tx`, then
/// collects which probes arrive within `listen`.
fn observe(
    lab: &Lab,
    host: &LabHost,
    stun: Vec<SocketAddr>,
    mapped_tx: std::sync::mpsc::Sender<Vec<SocketAddr>>,
) -> anyhow::Result<Observed> {
    lab.run_in(&host.ns, async move {
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        let mut mapped = Vec::new();
        for server in &stun {
            mapped.push(nat::query(&socket, *server).await?);
        }
        mapped_tx.send(mapped.clone())?;
        let mut reached_from = Vec::new();
        let mut buffer = [0u8; 64];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok((len, from))) =
            tokio::time::timeout_at(deadline, socket.recv_from(&mut buffer)).await
        {
            if &buffer[..len] == b"probe" {
                reached_from.push(from);
            }
        }
        Ok(Observed {
            mapped,
            reached_from,
        })
    })
}

/// The lab routers behave as their kinds say: mapping (same or different towards two servers) and filtering
/// (who gets in through the mapping: a stranger, or the contacted server's IP from another port).
#[test]
fn lab_routers_map_and_filter_as_their_kind_says() -> anyhow::Result<()> {
    let mut lab = Lab::new(2)?;
    let hosts: Vec<LabHost> = NatKind::ALL
        .iter()
        .map(|kind| lab.add_host(*kind))
        .collect::<anyhow::Result<_>>()?;
    let stranger = lab.add_host(NatKind::Public)?;
    let lab = Arc::new(lab);
    let ips = vec![lab.super_peer_ip(0).into(), lab.super_peer_ip(1).into()];
    let inet = lab.inet();
    let (cluster, stun) = {
        let lab_ips = ips.clone();
        lab.run_in(&inet, async move { cluster_in(lab_ips).await })?
    };

    let mut table = Vec::new();
    for host in &hosts {
        let (mapped_tx, mapped_rx) = std::sync::mpsc::channel();
        let observer = {
            let (lab, host, stun) = (lab.clone(), host.clone(), stun.clone());
            std::thread::spawn(move || observe(&lab, &host, stun, mapped_tx))
        };
        let mapped = mapped_rx
            .recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("{} host learns its mappings", host.kind))?;
        let target = mapped[0];
        // A stranger (an address the host never contacted) sends to the mapping.
        lab.run_in(&stranger.ns, async move {
            let socket = UdpSocket::bind("0.0.0.0:0").await?;
            socket.send_to(b"probe", target).await?;
            Ok(())
        })?;
        // The first super peer's IP, from a port the host never contacted.
        let server_ip = stun[0].ip();
        lab.run_in(&inet, async move {
            let socket = UdpSocket::bind(SocketAddr::new(server_ip, 0)).await?;
            socket.send_to(b"probe", target).await?;
            Ok(())
        })?;
        let observed = observer.join().expect("observer thread")?;
        let stranger_in = observed
            .reached_from
            .iter()
            .any(|from| from.ip() == std::net::IpAddr::from(stranger.ip));
        let server_ip_in = observed
            .reached_from
            .iter()
            .any(|from| from.ip() == server_ip);
        let same_mapping = observed.mapped[0] == observed.mapped[1];
        println!(
            "{:<20} mapped {:<22} {:<22} same={same_mapping:<5} stranger_in={stranger_in:<5} server_ip_other_port_in={server_ip_in}",
            host.kind.name(),
            observed.mapped[0].to_string(),
            observed.mapped[1].to_string()
        );
        table.push((
            host.kind,
            same_mapping,
            stranger_in,
            server_ip_in,
            observed.mapped[0],
        ));
    }
    for (kind, same, stranger_in, server_ip_in, mapped) in table {
        let host = hosts
            .iter()
            .find(|host| host.kind == kind)
            .expect("host of kind");
        assert_eq!(
            mapped.ip(),
            std::net::IpAddr::from(host.public_ip),
            "{kind}: mapped to the outermost address"
        );
        let expected = match kind {
            NatKind::Public => (true, true, true),
            NatKind::FullCone => (true, true, true),
            NatKind::AddressRestricted => (true, false, true),
            NatKind::Easy | NatKind::Double => (true, false, false),
            NatKind::Symmetric => (false, false, false),
        };
        assert_eq!(
            (same, stranger_in, server_ip_in),
            expected,
            "{kind}: (same mapping, stranger gets in, contacted IP from another port gets in)"
        );
    }
    drop(cluster);
    Ok(())
}

/// Runs `leafpeer` in `ns` with the lab cluster's seeds and CA; returns its stdout.
async fn leafpeer(
    lab: &Lab,
    ns: &str,
    cluster: &Cluster,
    key: &std::path::Path,
    args: &[&str],
) -> anyhow::Result<String> {
    let seeds = cluster.leaf_addrs().join(",");
    let mut command =
        tokio::process::Command::from(lab.command(ns, vesper_tests::binary("leafpeer")));
    command
        .arg("--seeds")
        .arg(&seeds)
        .arg("--ca")
        .arg(cluster.pki.ca_cert())
        .arg("--key")
        .arg(key)
        .args(args)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .context("leafpeer timed out")??;
    ensure!(
        output.status.success(),
        "leafpeer {args:?} in {ns} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `leafpeer nat` behind every kind measures the expected class, and the published class and candidates show
/// in the presence other leaves look up. coturn's STUN client gets the NAT's public address from a super peer.
#[test]
fn leaves_measure_and_publish_their_nat_class_and_coturn_interoperates() -> anyhow::Result<()> {
    let mut lab = Lab::new(2)?;
    let hosts: Vec<LabHost> = NatKind::ALL
        .iter()
        .map(|kind| lab.add_host(*kind))
        .collect::<anyhow::Result<_>>()?;
    let lab = Arc::new(lab);
    let inet = lab.inet();
    let ips = vec![lab.super_peer_ip(0).into(), lab.super_peer_ip(1).into()];
    let task_lab = lab.clone();
    lab.run_in(&inet, async move {
        let lab = task_lab;
        let (cluster, stun) = cluster_in(ips).await?;
        let keys = tempfile::tempdir()?;
        let mut measured = HashMap::new();
        for host in &hosts {
            let key = keys.path().join(format!("{}.key", host.kind));
            let out = leafpeer(&lab, &host.ns, &cluster, &key, &["--json", "nat"]).await?;
            let report: serde_json::Value = serde_json::from_str(out.trim())
                .with_context(|| format!("leafpeer nat output {out:?}"))?;
            println!("{:<20} {}", host.kind.name(), report);
            let class = report["nat_class"].as_str().unwrap_or_default().to_string();
            assert_eq!(class, host.kind.expected_class(), "{}: {report}", host.kind);
            let mapped = report["reflexive"][0]["mapped"]
                .as_str()
                .unwrap_or_default();
            assert!(
                mapped.starts_with(&format!("{}:", host.public_ip)),
                "{}: mapped {mapped} is not on {}",
                host.kind,
                host.public_ip
            );
            measured.insert(host.kind, (key, report));
        }
        // Another leaf looks the easy host's peer up: the published class and candidates are there.
        let (easy_key, easy_report) = &measured[&NatKind::Easy];
        let easy_id = leafpeer(&lab, &hosts[0].ns, &cluster, easy_key, &["id"]).await?;
        let public_host = hosts
            .iter()
            .find(|host| host.kind == NatKind::Public)
            .expect("public host");
        let lookup = leafpeer(
            &lab,
            &public_host.ns,
            &cluster,
            &keys.path().join("looker.key"),
            &["--json", "lookup", easy_id.trim()],
        )
        .await?;
        let presence: serde_json::Value = serde_json::from_str(lookup.trim())?;
        assert_eq!(presence["nat_class"], "endpoint-independent", "{presence}");
        assert_eq!(
            presence["candidates"], easy_report["candidates"],
            "{presence}"
        );

        // coturn's client, behind the easy NAT, against the second super peer.
        let easy = hosts
            .iter()
            .find(|host| host.kind == NatKind::Easy)
            .expect("easy host");
        let output = tokio::process::Command::from(lab.command(&easy.ns, "turnutils_stunclient"))
            .arg("-p")
            .arg(stun[1].port().to_string())
            .arg(stun[1].ip().to_string())
            .output()
            .await
            .context("run turnutils_stunclient (Debian package coturn)")?;
        let text = String::from_utf8_lossy(&output.stdout);
        println!("turnutils_stunclient: {}", text.trim());
        ensure!(
            text.contains(&format!("UDP reflexive addr: {}:", easy.public_ip)),
            "turnutils_stunclient did not report the NAT's public address {}: {text}",
            easy.public_ip
        );
        Ok(())
    })
}

/// A flood of Binding requests from one source gets the burst and then the per-source rate, every answer
/// no larger than the amplification limit allows; another source is still answered meanwhile.
#[test]
fn a_stun_flood_gets_bounded_unamplified_answers() -> anyhow::Result<()> {
    let mut lab = Lab::new(2)?;
    let flooder = lab.add_host(NatKind::Public)?;
    let other = lab.add_host(NatKind::Public)?;
    let lab = Arc::new(lab);
    let inet = lab.inet();
    let ips = vec![lab.super_peer_ip(0).into(), lab.super_peer_ip(1).into()];
    let (cluster, stun) = lab.run_in(&inet, async move { cluster_in(ips).await })?;
    let server = stun[0];
    let flood = lab.run_in(&flooder.ns, async move {
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        // The bare 20-byte request: the smallest a client can send, the largest amplification.
        let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        request.extend_from_slice(&[1; 12]);
        for _ in 0..2000 {
            socket.send_to(&request, server).await?;
        }
        let mut answers = 0usize;
        let mut largest = 0usize;
        let mut buffer = [0u8; 1500];
        while let Ok(Ok((len, _))) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buffer)).await
        {
            answers += 1;
            largest = largest.max(len);
        }
        Ok((answers, largest))
    })?;
    let (answers, largest) = flood;
    println!("flood of 2000 requests (20 bytes each): {answers} answers, largest {largest} bytes");
    // Burst 40 plus 20/s for the time the flood took (well under 2 s here, 2000 datagrams).
    assert!(
        (40..=80).contains(&answers),
        "{answers} answers to one source"
    );
    assert!(
        (largest + 28) * 100 <= (20 + 28) * 150,
        "answer of {largest} bytes amplifies too much"
    );
    let other_answer = lab.run_in(&other.ns, async move {
        let socket = UdpSocket::bind("0.0.0.0:0").await?;
        Ok(nat::query(&socket, server).await?)
    })?;
    assert_eq!(
        other_answer.ip(),
        std::net::IpAddr::from(other.ip),
        "another source is answered"
    );
    drop(cluster);
    Ok(())
}

/// One connection attempt between two lab hosts through real `leafpeer accept` / `leafpeer connect`
/// processes: returns (path, milliseconds from the connect call to connected) after checking the payload.
async fn attempt(
    lab: &Lab,
    cluster: &Cluster,
    keys: &std::path::Path,
    (from, from_key): (&LabHost, &str),
    (to, to_key): (&LabHost, &str),
    payload: &[u8],
) -> anyhow::Result<(String, u64)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let seeds = cluster.leaf_addrs().join(",");
    let ca = cluster.pki.ca_cert();
    let id_of = |key: &str| {
        let output = lab
            .command(&to.ns, vesper_tests::binary("leafpeer"))
            .arg("--key")
            .arg(keys.join(key))
            .arg("id")
            .output()?;
        anyhow::Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let (from_id, to_id) = (id_of(from_key)?, id_of(to_key)?);
    let mut acceptor =
        tokio::process::Command::from(lab.command(&to.ns, vesper_tests::binary("leafpeer")));
    acceptor
        .args(["--seeds", &seeds, "--json", "--key"])
        .arg(keys.join(to_key))
        .arg("--ca")
        .arg(&ca)
        .args(["accept", "--allow", &from_id, "--timeout", "60"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut acceptor = acceptor.spawn()?;
    let mut acceptor_err =
        tokio::io::BufReader::new(acceptor.stderr.take().expect("piped")).lines();
    // Ready when it says it waits (its session is attached and its policy set).
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = acceptor_err.next_line().await? {
            if line.starts_with("waiting for a connection") {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("leafpeer accept ended before waiting")
    })
    .await
    .context("leafpeer accept did not get ready")??;
    let mut connector =
        tokio::process::Command::from(lab.command(&from.ns, vesper_tests::binary("leafpeer")));
    connector
        .args(["--seeds", &seeds, "--json", "--key"])
        .arg(keys.join(from_key))
        .arg("--ca")
        .arg(&ca)
        .args(["connect", &to_id])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut connector = connector.spawn()?;
    let mut stdin = connector.stdin.take().expect("piped");
    let data = payload.to_vec();
    let writer = tokio::spawn(async move {
        stdin.write_all(&data).await?;
        drop(stdin);
        anyhow::Ok(())
    });
    let connected = tokio::time::timeout(Duration::from_secs(60), connector.wait_with_output())
        .await
        .context("leafpeer connect timed out")??;
    writer.await??;
    let accepted = tokio::time::timeout(Duration::from_secs(30), acceptor.wait_with_output())
        .await
        .context("leafpeer accept did not finish")??;
    let stderr = String::from_utf8_lossy(&connected.stderr);
    ensure!(
        connected.status.success(),
        "{} -> {}: leafpeer connect failed: {stderr}",
        from.kind,
        to.kind
    );
    ensure!(
        accepted.status.success(),
        "{} -> {}: leafpeer accept failed",
        from.kind,
        to.kind
    );
    ensure!(
        accepted.stdout == payload,
        "{} -> {}: {} of {} bytes arrived intact",
        from.kind,
        to.kind,
        accepted.stdout.len(),
        payload.len()
    );
    let event: serde_json::Value = stderr
        .lines()
        .find_map(|line| serde_json::from_str(line).ok())
        .with_context(|| format!("no connected event in {stderr}"))?;
    Ok((
        event["path"].as_str().unwrap_or_default().to_string(),
        event["elapsed_ms"].as_u64().unwrap_or_default(),
    ))
}

/// Whether a pair must connect directly: every pair but those whose both sides map endpoint-dependently
/// (an endpoint-dependent side against a port-restricted one gets there by port prediction).
fn expect_direct(a: NatKind, b: NatKind) -> bool {
    !(a == NatKind::Symmetric && b == NatKind::Symmetric)
}

/// Every pair of NAT kinds connects, both ways, with data intact; pairs that can punch connect directly.
/// Prints the matrix (the same table is in docs/CONNECTIVITY.md).
#[test]
fn connection_matrix_across_every_pair_of_nat_kinds() -> anyhow::Result<()> {
    let mut lab = Lab::new(2)?;
    // Two hosts of each kind, so that a kind also meets itself.
    let mut hosts: Vec<(LabHost, LabHost)> = Vec::new();
    for kind in NatKind::ALL {
        hosts.push((lab.add_host(kind)?, lab.add_host(kind)?));
    }
    let lab = Arc::new(lab);
    let inet = lab.inet();
    let ips = vec![lab.super_peer_ip(0).into(), lab.super_peer_ip(1).into()];
    let task_lab = lab.clone();
    lab.run_in(&inet, async move {
        let lab = task_lab;
        let (cluster, _stun) = cluster_in(ips).await?;
        let keys = tempfile::tempdir()?;
        let payload: Vec<u8> = (0..64 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        // Each round tries every unordered pair both ways; more rounds: VESPER_MATRIX_ROUNDS.
        let rounds: usize = std::env::var("VESPER_MATRIX_ROUNDS")
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(2);
        let mut rows = Vec::new();
        let mut failures = Vec::new();
        for (i, (a, _)) in std::iter::repeat_n(hosts.iter().enumerate(), rounds).flatten() {
            for b in hosts.iter().skip(i).map(|pair| &pair.1) {
                for (from, from_key, to, to_key) in [
                    (
                        a,
                        format!("{}-1.key", a.kind),
                        b,
                        format!("{}-2.key", b.kind),
                    ),
                    (
                        b,
                        format!("{}-2.key", b.kind),
                        a,
                        format!("{}-1.key", a.kind),
                    ),
                ] {
                    match attempt(
                        &lab,
                        &cluster,
                        keys.path(),
                        (from, &from_key),
                        (to, &to_key),
                        &payload,
                    )
                    .await
                    {
                        Ok((path, millis)) => {
                            println!(
                                "{:<20} -> {:<20} {path:<8} {millis:>5} ms",
                                from.kind.name(),
                                to.kind.name()
                            );
                            let direct = path == "direct";
                            if direct != expect_direct(from.kind, to.kind) {
                                failures.push(format!("{} -> {}: {path}", from.kind, to.kind));
                            }
                            rows.push((from.kind, to.kind, path, millis));
                        }
                        Err(error) => {
                            println!(
                                "{:<20} -> {:<20} FAILED: {error:#}",
                                from.kind.name(),
                                to.kind.name()
                            );
                            failures.push(format!("{} -> {}: {error:#}", from.kind, to.kind));
                        }
                    }
                }
            }
        }
        println!("\nmatrix (caller row, target column; path, slowest time to connect in ms):");
        print!("{:<20}", "");
        for kind in NatKind::ALL {
            print!("{:<20}", kind.name());
        }
        println!();
        for from in NatKind::ALL {
            print!("{:<20}", from.name());
            for to in NatKind::ALL {
                // The path of every attempt (or "mixed") and the slowest time to connect.
                let cell: Vec<_> = rows
                    .iter()
                    .filter(|(a, b, _, _)| *a == from && *b == to)
                    .collect();
                let cell = match cell.first() {
                    None => "-".to_string(),
                    Some((_, _, first, _)) => {
                        let same = cell.iter().all(|(_, _, path, _)| path == first);
                        let slowest = cell
                            .iter()
                            .map(|(_, _, _, millis)| *millis)
                            .max()
                            .unwrap_or(0);
                        let path = if same { first.as_str() } else { "mixed" };
                        format!("{path} {slowest}")
                    }
                };
                print!("{cell:<20}");
            }
            println!();
        }
        ensure!(failures.is_empty(), "unexpected outcomes: {failures:#?}");
        Ok(())
    })
}
