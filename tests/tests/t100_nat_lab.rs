//! The NAT lab, the STUN port and NAT classification.
//!
//! Two super peers run on the lab's internet segment; one host sits behind each kind of network. The tests
//! check the lab itself (each router maps and filters as its kind says), that a third-party STUN client
//! (coturn's `turnutils_stunclient`) gets the right mapped address from a super peer, that real `leafpeer`
//! processes behind every NAT measure the right class and publish it, and that a STUN flood from one source
//! gets a bounded number of answers no larger than the requests. Connections: every pair of NAT kinds connects
//! (directly unless both sides map endpoint-dependently), and relays are picked by replicated load, carry only
//! ciphertext, and end a connection on a cap with an error that names it.

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

/// What a connection attempt reports: the path, the relay or peer address, and milliseconds from the connect
/// call to connected.
struct Connected {
    path: String,
    via: String,
    millis: u64,
}

/// One connection attempt between two lab hosts through real `leafpeer accept` / `leafpeer connect`
/// processes, checking that the payload arrived intact.
async fn attempt(
    lab: &Lab,
    cluster: &Cluster,
    keys: &std::path::Path,
    from: (&LabHost, &str),
    to: (&LabHost, &str),
    payload: &[u8],
) -> anyhow::Result<Connected> {
    let (connected, accepted) = run_pair(lab, cluster, keys, from, to, payload).await?;
    let ((from, _), (to, _)) = (from, to);
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
    connected_event(&stderr)
}

/// The `connected` event a `leafpeer --json connect` printed on stderr.
fn connected_event(stderr: &str) -> anyhow::Result<Connected> {
    let event: serde_json::Value = stderr
        .lines()
        .find_map(|line| serde_json::from_str(line).ok())
        .with_context(|| format!("no connected event in {stderr}"))?;
    Ok(Connected {
        path: event["path"].as_str().unwrap_or_default().to_string(),
        via: event["via"].as_str().unwrap_or_default().to_string(),
        millis: event["elapsed_ms"].as_u64().unwrap_or_default(),
    })
}

/// Runs `leafpeer accept` on `to` and `leafpeer connect` on `from` with `payload` on its stdin; returns both
/// processes' outputs (connect's, accept's) whatever their exit status.
async fn run_pair(
    lab: &Lab,
    cluster: &Cluster,
    keys: &std::path::Path,
    (from, from_key): (&LabHost, &str),
    (to, to_key): (&LabHost, &str),
    payload: &[u8],
) -> anyhow::Result<(std::process::Output, std::process::Output)> {
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
    // Read accept's output while the transfer runs: a full stdout pipe would stall it (and so the sender).
    let accept_stderr = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = acceptor_err.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    let acceptor = tokio::spawn(acceptor.wait_with_output());
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
    // A connect that fails early stops reading its stdin; its own output says why.
    let _ = writer.await?;
    let mut accepted = tokio::time::timeout(Duration::from_secs(30), acceptor)
        .await
        .context("leafpeer accept did not finish")???;
    accepted.stderr = accept_stderr.await?.into_bytes();
    Ok((connected, accepted))
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
                        Ok(Connected { path, millis, .. }) => {
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

/// Relayed connections: the broker picks the least loaded relay by the replicated load reports; bulk data
/// arrives intact while a capture on the relay finds none of its plaintext; and a relay's byte cap ends a
/// connection with an error that names the cap.
#[test]
fn relays_are_picked_by_load_carry_only_ciphertext_and_name_their_caps() -> anyhow::Result<()> {
    const MARKER: &[u8] = b"VESPER-PLAINTEXT-MARKER";
    const SMALL_CAP: u64 = 1024 * 1024;
    let mut lab = Lab::new(2)?;
    // Both sides endpoint-dependent: the broker plans a relayed connection at once. Two easy hosts for the
    // same transfer over a direct path.
    let (a, b) = (
        lab.add_host(NatKind::Symmetric)?,
        lab.add_host(NatKind::Symmetric)?,
    );
    let (c, d) = (lab.add_host(NatKind::Easy)?, lab.add_host(NatKind::Easy)?);
    let lab = Arc::new(lab);
    let inet = lab.inet();
    let ips: Vec<std::net::IpAddr> = vec![lab.super_peer_ip(0).into(), lab.super_peer_ip(1).into()];
    let (task_lab, task_inet) = (lab.clone(), inet.clone());
    lab.run_in(&inet, async move {
        let (lab, inet) = (task_lab, task_inet);
        // The first super peer relays one connection at a time; the second has a small byte cap.
        let cluster = Cluster::start(
            2,
            NodeOptions {
                listen_ips: ips,
                node_args: vec![
                    vec!["--relay-max-allocations".into(), "1".into()],
                    vec!["--relay-max-bytes".into(), SMALL_CAP.to_string()],
                ],
                ..NodeOptions::default()
            },
        )
        .await?;
        let stun: Vec<SocketAddr> = cluster
            .nodes
            .iter()
            .map(|node| node.endpoints().stun.context("super peer serves STUN"))
            .collect::<anyhow::Result<_>>()?;
        let relay_load = |node: usize| {
            let cluster = &cluster;
            async move {
                // Members come sorted by node id, which follows the start order.
                let status = cluster.status_of(0).await?;
                anyhow::Ok(
                    status
                        .members
                        .get(node)
                        .map(|member| (member.relay_active, member.relay_capacity)),
                )
            }
        };
        // Both nodes have reported their (empty) relays.
        vesper_tests::wait::until("relay load reports", Duration::from_secs(30), || async {
            let reported = (relay_load(0).await?, relay_load(1).await?);
            Ok((reported == (Some((0, 1)), Some((0, 1000)))).then_some(()))
        })
        .await?;

        // Capture everything on the first relay's port.
        let dir = tempfile::tempdir()?;
        let capture = dir.path().join("relay.pcap");
        let mut tcpdump = tokio::process::Command::from(lab.command(&inet, "tcpdump"));
        tcpdump
            .args(["-i", "any", "-n", "-U", "-w"])
            .arg(&capture)
            .arg(format!("udp and host {} and port {}", stun[0].ip(), stun[0].port()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut tcpdump = tcpdump.spawn().context("start tcpdump")?;
        let mut tcpdump_err = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            tcpdump.stderr.take().expect("piped"),
        ));
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = tcpdump_err.next_line().await? {
                if line.contains("listening on") {
                    return anyhow::Ok(());
                }
            }
            anyhow::bail!("tcpdump ended before listening")
        })
        .await
        .context("tcpdump did not start")??;
        // A control: the marker in the clear to the relay port must show up in the capture.
        let control = UdpSocket::bind(SocketAddr::new(stun[1].ip(), 0)).await?;
        control.send_to(MARKER, stun[0]).await?;

        // 8 MiB full of the marker, through the first relay (the emptiest, and the broker's own node).
        let payload: Vec<u8> = (0..8 * 1024 * 1024 / 32)
            .flat_map(|i: u32| {
                let mut block = MARKER.to_vec();
                block.extend_from_slice(format!("{i:>9}").as_bytes());
                block
            })
            .collect();
        let keys = tempfile::tempdir()?;
        let from = (&a, "a.key");
        let to = (&b, "b.key");
        let first = attempt(&lab, &cluster, keys.path(), from, to, &payload).await?;
        println!("first: {} via {} in {} ms", first.path, first.via, first.millis);
        ensure!(first.path == "relayed" && first.via == stun[0].to_string(), "first connection relayed by {}, expected {}", first.via, stun[0]);

        let pid = tcpdump.id().context("tcpdump pid")?;
        std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status()?;
        tokio::time::timeout(Duration::from_secs(10), tcpdump.wait()).await.context("tcpdump did not stop")??;
        let captured = std::fs::read(&capture)?;
        let markers = captured.windows(MARKER.len()).filter(|window| *window == MARKER).count();
        println!(
            "capture on the relay: {} bytes, plaintext markers found: {markers} (the control datagram only)",
            captured.len()
        );
        ensure!(
            captured.len() as u64 > 2 * payload.len() as u64,
            "the capture holds the relayed traffic both ways ({} bytes)",
            captured.len()
        );
        ensure!(markers == 1, "{markers} plaintext markers in the relay capture; expected only the control's");

        // The same 8 MiB over a direct path arrive intact too.
        let direct = attempt(&lab, &cluster, keys.path(), (&c, "c.key"), (&d, "d.key"), &payload).await?;
        println!("direct: {} via {} in {} ms", direct.path, direct.via, direct.millis);
        ensure!(direct.path == "direct", "easy to easy went {}", direct.path);

        // A forged token gets the relay's named refusal.
        let forger = UdpSocket::bind(SocketAddr::new(stun[1].ip(), 0)).await?;
        let mut bind = vec![0x00, b'V', b'R', b'B'];
        bind.extend_from_slice(&rand::random::<[u8; 16]>());
        forger.send_to(&bind, stun[0]).await?;
        let mut answer = [0u8; 16];
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), forger.recv_from(&mut answer))
            .await
            .context("no answer to a forged relay token")??;
        ensure!(
            answer[..len] == [0x00, b'V', b'R', b'A', 1],
            "forged token answered {:?}",
            &answer[..len]
        );


        // The first relay is now full (1 of 1): once that load is replicated, the broker picks the second.
        vesper_tests::wait::until("the first relay's load report", Duration::from_secs(30), || async {
            Ok((relay_load(0).await? == Some((1, 1))).then_some(()))
        })
        .await?;
        let big: Vec<u8> = payload[..4 * 1024 * 1024].to_vec();
        let (connected, accepted) = run_pair(&lab, &cluster, keys.path(), from, to, &big).await?;
        let stderr = String::from_utf8_lossy(&connected.stderr);
        let second = connected_event(&stderr)?;
        println!("second: {} via {}; connect said: {}", second.path, second.via, stderr.trim());
        ensure!(second.via == stun[1].to_string(), "second connection relayed by {}, expected {}", second.via, stun[1]);
        ensure!(!connected.status.success() && !accepted.status.success(), "4 MiB through a 1 MiB cap must fail");
        let cap_error = format!("byte cap ({SMALL_CAP} bytes) was reached");
        ensure!(stderr.contains(&cap_error), "connect's error names the cap: {stderr}");
        let accept_err = String::from_utf8_lossy(&accepted.stderr);
        ensure!(accept_err.contains(&cap_error), "accept's error names the cap: {accept_err}");
        ensure!(accepted.stdout.len() < big.len(), "the cap stopped the transfer");
        Ok(())
    })
}
