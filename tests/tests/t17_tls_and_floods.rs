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
use vesper_tests::tlsprobe::{self, connect_from, pem_der, served_certificate};
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
        extra_args: vec!["--tls-reload-interval".into(), "200ms".into()],
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

    // A pair from another CA (a mistake in the secret store) is not installed: every peer would refuse it. The
    // old pair stays in use and each node logs why.
    let foreign = vesper_tests::pki::Pki::create(&cluster.root().join("foreign-ca"))?;
    let (foreign_cert, foreign_key) = foreign.issue("superpeer", "superpeer-foreign", &[])?;
    replace_file(&foreign_key, &key)?;
    replace_file(&foreign_cert, &cert)?;
    for node in 0..cluster.nodes.len() {
        wait::until(
            "the certificate from another CA refused",
            Duration::from_secs(20),
            || async {
                let log = std::fs::read_to_string(cluster.log_path(node))?;
                Ok(log.contains("not valid under the cluster CA").then_some(()))
            },
        )
        .await?;
    }
    for &port in &ports {
        assert_eq!(served_certificate(port, &ca).await?, old, "{port}");
    }

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
            "--tls-handshake-timeout".into(),
            format!("{}ms", HANDSHAKE_TIMEOUT.as_millis()),
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

/// Streams a flooding client opened on one connection, more than the Leaf port allows at once.
const FLOOD_STREAMS: u32 = 1000;

/// Opens `FLOOD_STREAMS` gRPC streams on one connection without ever acknowledging or obeying the server's
/// SETTINGS, each a PutRecord whose body never comes (so every accepted stream stays open). Returns the
/// connection (held open by the caller), the advertised stream limit, and how many streams were accepted.
async fn flood_streams(
    leaf_addr: std::net::SocketAddr,
    ca: &[u8],
    source: IpAddr,
) -> anyhow::Result<(
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Option<u32>,
    u32,
)> {
    use tokio::io::AsyncWriteExt;
    use vesper_tests::http2;
    let mut tls = tlsprobe::tls_connect(leaf_addr, ca, Some(source)).await?;
    let mut bytes = http2::PREFACE.to_vec();
    bytes.extend(http2::frame(http2::SETTINGS, 0, 0, &[]));
    let block =
        http2::grpc_request_headers("/vesper.v1.Leaf/PutRecord", &leaf_addr.to_string(), &[]);
    for n in 0..FLOOD_STREAMS {
        bytes.extend(http2::frame(
            http2::HEADERS,
            http2::END_HEADERS,
            2 * n + 1,
            &block,
        ));
    }
    tls.write_all(&bytes).await?;
    tls.flush().await?;

    // Every stream is either refused (RST_STREAM REFUSED_STREAM) or, after a GOAWAY, above its last stream id;
    // what is left was accepted. Stop once the refusals account for every stream the limit cannot hold, or
    // when the server has been silent for a while.
    let mut advertised = None;
    let mut refused = 0u32;
    let mut beyond_goaway = 0u32;
    loop {
        let frame =
            match tokio::time::timeout(Duration::from_secs(5), http2::read_frame(&mut tls)).await {
                Ok(Ok(frame)) => frame,
                Ok(Err(_)) | Err(_) => break,
            };
        match frame.kind {
            http2::SETTINGS => {
                for (id, value) in frame.settings() {
                    if id == http2::SETTINGS_MAX_CONCURRENT_STREAMS {
                        advertised = Some(value);
                    }
                }
            }
            http2::RST_STREAM if frame.error_code() == Some(http2::REFUSED_STREAM) => refused += 1,
            http2::GOAWAY => {
                let last = frame.last_stream().unwrap_or(0);
                beyond_goaway = (0..FLOOD_STREAMS).filter(|n| 2 * n + 1 > last).count() as u32;
                break;
            }
            _ => {}
        }
        if let Some(limit) = advertised {
            if refused + beyond_goaway >= FLOOD_STREAMS.saturating_sub(limit) {
                break;
            }
        }
    }
    Ok((tls, advertised, FLOOD_STREAMS - refused - beyond_goaway))
}

/// The grpc-status and grpc-message of one call made with h2 directly, so the test controls every header and
/// every byte of the body (tonic's client would not send what these cases send).
async fn raw_grpc_call(
    leaf_addr: std::net::SocketAddr,
    ca: &[u8],
    extra_headers: &[(&str, &str)],
    body: Vec<u8>,
    end_stream: bool,
) -> anyhow::Result<(i32, String)> {
    let tls = tlsprobe::tls_connect(leaf_addr, ca, None).await?;
    let (client, connection) = h2::client::handshake(tls).await?;
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("https://{leaf_addr}/vesper.v1.Leaf/PutRecord"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra_headers {
        request = request.header(*name, *value);
    }
    let mut client = client.ready().await?;
    let (response, mut send) = client.send_request(request.body(())?, false)?;
    send.send_data(bytes::Bytes::from(body), end_stream)?;
    let response = tokio::time::timeout(Duration::from_secs(20), response).await??;
    let mut headers = response.headers().clone();
    if !headers.contains_key("grpc-status") {
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            chunk?;
        }
        headers = body.trailers().await?.unwrap_or_default();
    }
    let status = headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no grpc-status in {headers:?}"))?;
    // grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
    let raw = headers
        .get("grpc-message")
        .map(|value| value.as_bytes().to_vec())
        .unwrap_or_default();
    let mut message = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    while let Some(&byte) = bytes.next() {
        let hex = |byte: Option<&u8>| byte.and_then(|b| char::from(*b).to_digit(16));
        match byte {
            b'%' => match (hex(bytes.next()), hex(bytes.next())) {
                (Some(high), Some(low)) => message.push((high * 16 + low) as u8),
                _ => anyhow::bail!("bad percent-encoding in grpc-message {raw:?}"),
            },
            other => message.push(other),
        }
    }
    Ok((status, String::from_utf8(message)?))
}

/// A gRPC length-prefixed message: the compressed flag, the length, the bytes.
fn grpc_frame(compressed: bool, length: u32, bytes: &[u8]) -> Vec<u8> {
    let mut frame = vec![u8::from(compressed)];
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(bytes);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t17_stream_floods_and_compressed_or_oversize_messages_are_refused() -> anyhow::Result<()> {
    use prost::Message;
    const STREAM_LIMIT: u32 = 100;
    let options = NodeOptions {
        extra_args: vec![
            "--max-streams-per-connection".into(),
            STREAM_LIMIT.to_string(),
        ],
        ..Default::default()
    };
    let cluster = Cluster::start(1, options).await?;
    let pid = cluster.nodes[0].pid().expect("running");
    let leaf_addr = cluster.nodes[0].endpoints().leaf;
    let ca = cluster.pki.ca_pem();
    let legitimate = cluster.leaf(0).await?;
    legitimate
        .put("bombs", "before", HashMap::new(), b"ok".to_vec(), None)
        .await?;
    let applied_before = cluster.wait_quiet(0).await?;
    let rss_before = rss_kib(pid)?;

    // A client that ignores SETTINGS: streams beyond the limit are refused, the rest wait for bodies.
    let flooder = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));
    let (held, advertised, accepted) = flood_streams(leaf_addr, &ca, flooder).await?;
    assert_eq!(
        advertised,
        Some(STREAM_LIMIT),
        "advertised SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    assert!(
        accepted <= STREAM_LIMIT,
        "{accepted} of {FLOOD_STREAMS} streams were accepted on one connection (limit {STREAM_LIMIT})"
    );
    let rss_flood = rss_kib(pid)?;

    // A gzip bomb: 8 MiB of record (twice the 4 MiB message limit) in about 8 KiB. No port takes compressed
    // messages, so it is refused on its headers, before a byte is inflated.
    let bomb = vesper_proto::v1::PutRecordRequest {
        namespace: "bombs".into(),
        key: "gzip".into(),
        value: vec![0; 8 << 20],
        ..Default::default()
    }
    .encode_to_vec();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut encoder, &bomb)?;
    let compressed = encoder.finish()?;
    assert!(
        compressed.len() < 64 << 10,
        "{} compressed bytes",
        compressed.len()
    );
    let length = u32::try_from(compressed.len())?;
    // (what, extra headers, body, whether the body ends the stream, expected code, expected wording)
    type Case = (
        &'static str,
        &'static [(&'static str, &'static str)],
        Vec<u8>,
        bool,
        Code,
        &'static str,
    );
    let cases: [Case; 3] = [
        (
            "a gzip bomb",
            &[("grpc-encoding", "gzip")],
            grpc_frame(true, length, &compressed),
            true,
            Code::Unimplemented,
            "gzip",
        ),
        // The same bytes flagged as compressed with no encoding named: a protocol error, nothing decoded.
        (
            "a compressed flag without an encoding",
            &[],
            grpc_frame(true, length, &compressed),
            true,
            Code::Internal,
            "compressed",
        ),
        // An uncompressed message announcing 64 MiB: refused on its 5-byte prefix, the rest never awaited.
        (
            "a prefix announcing 64 MiB",
            &[],
            grpc_frame(false, 64 << 20, &[0; 1024]),
            false,
            Code::OutOfRange,
            "too large",
        ),
    ];
    for (what, headers, body, end_stream, code, wording) in cases {
        let (got, message) = raw_grpc_call(leaf_addr, &ca, headers, body, end_stream).await?;
        assert_eq!(Code::from_i32(got), code, "{what}: {message}");
        assert!(message.contains(wording), "{what}: {message}");
    }

    // Nothing was committed, and the legitimate leaf, and a new one, work while the flood's streams are held.
    assert_eq!(
        cluster.wait_quiet(0).await?,
        applied_before,
        "the log moved"
    );
    let found = legitimate
        .get("bombs", "gzip", Consistency::Linearizable)
        .await?;
    assert!(found.is_none(), "{found:?}");
    legitimate
        .put("bombs", "during", HashMap::new(), b"ok".to_vec(), None)
        .await?;
    cluster.leaf(0).await?;
    let rss_after = rss_kib(pid)?;
    println!(
        "super peer RSS: {rss_before} KiB before, {rss_flood} KiB with {accepted} streams held of \
         {FLOOD_STREAMS} opened on one connection (+{} KiB), {rss_after} KiB after the compressed and \
         oversize messages (+{} KiB)",
        rss_flood.saturating_sub(rss_before),
        rss_after.saturating_sub(rss_before),
    );
    assert!(
        rss_after.saturating_sub(rss_before) < 64 * 1024,
        "RSS grew by {} KiB",
        rss_after.saturating_sub(rss_before)
    );
    drop(held);
    Ok(())
}

/// Request headers over the metadata limit are refused as RESOURCE_EXHAUSTED on that call alone: the same
/// connection's session stream lives on (a ping is answered), and so do other calls on it. Both shapes a client
/// may send: one 64 KiB value, and 2,000 small headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t17_oversized_request_headers_are_refused_without_ending_the_session() -> anyhow::Result<()>
{
    use tonic::metadata::{MetadataKey, MetadataValue};
    use vesper_proto::v1::{client_frame, server_frame, ClientFrame, LookupPeerRequest, Ping};
    let cluster = Cluster::start(1, NodeOptions::default()).await?;
    let address = cluster.nodes[0].endpoints().leaf.to_string();
    let keypair = Keypair::generate();
    // One connection carries the session and every call below.
    let channel = raw::channel(&address, &cluster.pki.ca_pem()).await?;
    let mut session = raw::open(channel, &keypair, Signing::Valid).await?;
    let (client, token) = (session.client.clone(), session.token.clone());
    let lookup = |extra: &dyn Fn(&mut tonic::metadata::MetadataMap)| {
        let mut request = raw::with_token(
            LookupPeerRequest {
                peer_id: keypair.peer_id().to_string(),
                consistency: 0,
            },
            &token,
        );
        extra(request.metadata_mut());
        let mut client = client.clone();
        async move { client.lookup_peer(request).await }
    };
    let big_value: MetadataValue<_> = "x".repeat(64 << 10).parse()?;
    let one_big = lookup(&|metadata| {
        metadata.insert("x-big", big_value.clone());
    })
    .await;
    let many_small = lookup(&|metadata| {
        for n in 0..2000 {
            let key: MetadataKey<_> = format!("x-h{n}").parse().expect("header name");
            metadata.insert(key, MetadataValue::from_static("v"));
        }
    })
    .await;
    for (what, outcome) in [
        ("one 64 KiB header", one_big),
        ("2,000 headers", many_small),
    ] {
        let status = outcome.err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(status.code(), Code::ResourceExhausted, "{what}: {status:?}");
        assert!(
            status.message().contains("metadata"),
            "{what}: a message that names the limit: {}",
            status.message()
        );
    }
    // The session on the same connection is alive: a ping is answered, and a normal call works.
    session
        .outbound
        .send(ClientFrame {
            frame: Some(client_frame::Frame::Ping(Ping { nonce: 7 })),
        })
        .await?;
    let pong = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match session.inbound.message().await? {
                Some(frame) => {
                    if let Some(server_frame::Frame::Pong(pong)) = frame.frame {
                        return anyhow::Ok(pong);
                    }
                }
                None => anyhow::bail!("the session stream ended"),
            }
        }
    })
    .await??;
    assert_eq!(pong.nonce, 7);
    lookup(&|_| {}).await?;
    Ok(())
}
