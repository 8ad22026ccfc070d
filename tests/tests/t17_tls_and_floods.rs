//! The TLS layer under change and under abuse: certificates rotate on running super peers without a failed
//! request (and the old certificate can then be revoked), and floods of half-open TLS connections or of
//! sessions from one address are cut off while legitimate clients keep working, with the super peer's memory
//! growth reported.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tonic::Code;
use vesper_leafpeer::Consistency;
use vesper_proto::Keypair;
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::load::Load;
use vesper_tests::raw::{self, Signing};
use vesper_tests::rss_kib;
use vesper_tests::tlsprobe::{connect_from, pem_der, served_certificate};
use vesper_tests::wait;

/// Replaces `target` with a copy of `source` in one rename, as a secret update does.
fn replace_file(source: &std::path::Path, target: &std::path::Path) -> anyhow::Result<()> {
    let temporary = target.with_extension("next");
    std::fs::copy(source, &temporary)?;
    std::fs::rename(&temporary, target)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t17_certificates_rotate_on_live_super_peers_without_failed_requests() -> anyhow::Result<()>
{
    let options = NodeOptions {
        extra_args: vec!["--tls-reload-ms".into(), "200".into()],
        ..Default::default()
    };
    let cluster = Cluster::start(2, options).await?;
    let ca = cluster.pki.ca_pem();
    let (cert, key) = cluster.pki.superpeer_cert();
    let retired = cluster.root().join("retired-superpeer.pem");
    std::fs::copy(&cert, &retired)?;
    let old = pem_der(&cert)?;
    let ports: Vec<_> = cluster
        .nodes
        .iter()
        .flat_map(|node| {
            let endpoints = node.endpoints();
            [endpoints.leaf, endpoints.cluster, endpoints.admin]
        })
        .collect();
    for &port in &ports {
        assert_eq!(served_certificate(port, &ca).await?, old, "{port}");
    }

    // Writes through both nodes all along: one of them is a follower, whose writes go to the leader over the
    // Cluster port, so super peer to super peer calls are in the load too.
    let load = Load::start(
        vec![cluster.leaf(0).await?, cluster.leaf(1).await?],
        "rotation",
        "w",
    );
    wait::until("writes flowing", Duration::from_secs(20), || async {
        Ok((load.acknowledged() >= 20).then_some(()))
    })
    .await?;

    // Rotate the way a secret update does: the key first, then the certificate, each in one rename. In
    // between the two files do not match; the nodes must keep the old pair until the new one is whole.
    let (next_cert, next_key) = cluster.pki.issue("superpeer", "superpeer-next", &[])?;
    let new = pem_der(&next_cert)?;
    assert_ne!(new, old);
    replace_file(&next_key, &key)?;
    // A handshake now still gets the old, whole pair.
    assert_eq!(served_certificate(ports[0], &ca).await?, old);
    replace_file(&next_cert, &cert)?;
    let rotated = wait::until(
        "every port serving the new certificate",
        Duration::from_secs(20),
        || async {
            for &port in &ports {
                if served_certificate(port, &ca).await? != new {
                    return Ok(None);
                }
            }
            Ok(Some(Instant::now()))
        },
    )
    .await?;
    wait::until(
        "writes after the rotation",
        Duration::from_secs(20),
        || async { Ok(load.first_ack_after(rotated).map(|_| ())) },
    )
    .await?;

    // Retire the old certificate for good: revoked, the cluster goes on with the new one, since the nodes
    // dial each other with it now.
    let output = cluster.vesperctl(0, &["cert", "revoke", retired.to_str().unwrap(), "--json"])?;
    assert!(output.status.success(), "{output:?}");
    let revoked: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let log_index = revoked["log_index"].as_u64().expect("log_index");
    cluster.wait_applied(1, log_index).await?;
    let after_revocation = Instant::now();
    wait::until(
        "writes after the revocation",
        Duration::from_secs(20),
        || async { Ok(load.first_ack_after(after_revocation).map(|_| ())) },
    )
    .await?;
    let late = cluster.leaf(1).await?;
    late.put("rotation", "late", HashMap::new(), b"late".to_vec(), None)
        .await?;
    let reader = cluster.leaf(0).await?;
    let stored = reader
        .get("rotation", "late", Consistency::Linearizable)
        .await?;
    assert_eq!(stored.map(|record| record.value), Some(b"late".to_vec()));

    let report = load.stop().await;
    assert!(
        report.failures.is_empty(),
        "requests failed during the rotation: {:?}",
        report.failures
    );
    println!(
        "rotation: {} writes acknowledged, none failed",
        report.acknowledged.len()
    );
    vesper_tests::load::verify(&reader, "rotation", &report.acknowledged).await?;
    Ok(())
}

/// How a flood connection ended: closed by the server within `within`, or still open.
async fn closed_within(mut stream: tokio::net::TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buffer)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t17_floods_are_cut_off_while_a_legitimate_client_keeps_working() -> anyhow::Result<()> {
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(1500);
    const PER_IP: usize = 32;
    const HALF_OPEN: usize = 400;
    const SESSIONS_PER_IP: usize = 20;
    let options = NodeOptions {
        extra_args: vec![
            "--tls-handshake-timeout-ms".into(),
            HANDSHAKE_TIMEOUT.as_millis().to_string(),
            "--max-pending-handshakes-per-ip".into(),
            PER_IP.to_string(),
            "--max-sessions-per-ip".into(),
            SESSIONS_PER_IP.to_string(),
        ],
        ..Default::default()
    };
    let cluster = Cluster::start(1, options).await?;
    let pid = cluster.nodes[0].pid().expect("running");
    let leaf_addr = cluster.nodes[0].endpoints().leaf;
    let legitimate = cluster.leaf(0).await?;
    let write = |key: &'static str| {
        let leaf = legitimate.clone();
        async move {
            leaf.put("flood", key, HashMap::new(), key.as_bytes().to_vec(), None)
                .await
        }
    };
    write("before").await?;
    let rss_before = rss_kib(pid)?;

    // Half-open TLS: connections from another address (127.0.0.3) that send nothing, or only the first bytes
    // of a record header.
    let flooder = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let mut flood = Vec::with_capacity(HALF_OPEN);
    for n in 0..HALF_OPEN {
        let mut stream = connect_from(flooder, leaf_addr).await?;
        if n % 2 == 1 {
            use tokio::io::AsyncWriteExt;
            // A TLS record header announcing a handshake message that never comes.
            stream.write_all(&[0x16, 0x03, 0x01]).await?;
        }
        flood.push(stream);
    }
    let rss_flood = rss_kib(pid)?;
    // Beyond the per-address bound the connections are closed at once.
    // (The connections holding a slot stay open through this window, shorter than the handshake timeout.)
    let quick = futures::future::join_all(
        flood
            .into_iter()
            .map(|stream| closed_within(stream, HANDSHAKE_TIMEOUT * 2 / 3)),
    )
    .await;
    let closed_at_once = quick.iter().filter(|closed| **closed).count();
    assert!(
        closed_at_once >= HALF_OPEN - PER_IP,
        "only {closed_at_once} of {HALF_OPEN} half-open connections were closed at once"
    );

    // Meanwhile the legitimate leaf works and a new one attaches (from 127.0.0.1).
    write("during").await?;
    cluster.leaf(0).await?;

    // The ones that got a handshake slot are cut at the handshake timeout: a fresh batch, held to the end.
    let mut held = Vec::new();
    for _ in 0..PER_IP {
        held.push(connect_from(flooder, leaf_addr).await?);
    }
    let started = Instant::now();
    let outcomes = futures::future::join_all(
        held.into_iter()
            .map(|stream| closed_within(stream, HANDSHAKE_TIMEOUT * 4)),
    )
    .await;
    assert!(
        outcomes.iter().all(|closed| *closed),
        "a half-open connection outlived the timeout"
    );
    let cut_after = started.elapsed();
    assert!(
        cut_after >= HANDSHAKE_TIMEOUT / 2,
        "held connections were closed after {cut_after:?}, before the handshake timeout"
    );

    // Sessions from one address: beyond the bound they are refused, and the refusal changes nothing for others.
    let crowd = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
    let mut sessions = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..SESSIONS_PER_IP + 5 {
        let channel =
            raw::channel_from(&leaf_addr.to_string(), &cluster.pki.ca_pem(), Some(crowd)).await?;
        match raw::open(channel, &Keypair::generate(), Signing::Valid).await {
            Ok(session) => sessions.push(session),
            Err(status) => refused.push(status),
        }
    }
    assert_eq!(sessions.len(), SESSIONS_PER_IP, "{refused:?}");
    assert_eq!(refused.len(), 5);
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("too many sessions from 127.0.0.4"),
            "{status:?}"
        );
    }
    write("after").await?;
    cluster.leaf(0).await?;
    let rss_after = rss_kib(pid)?;
    println!(
        "super peer RSS: {rss_before} KiB before, {rss_flood} KiB with {HALF_OPEN} half-open connections \
         (+{} KiB), {rss_after} KiB after the floods and {SESSIONS_PER_IP} sessions from one address (+{} KiB)",
        rss_flood.saturating_sub(rss_before),
        rss_after.saturating_sub(rss_before),
    );
    // Bounded: far less than what 400 handshakes and their buffers would hold if nothing cut them off.
    assert!(
        rss_after.saturating_sub(rss_before) < 64 * 1024,
        "RSS grew by {} KiB",
        rss_after - rss_before
    );
    drop(sessions);
    Ok(())
}
