//! Certificates beyond "signed by the right CA" (t10 covers other CAs, roles and plaintext): expired
//! certificates are refused, and a revocation committed through Raft cuts a certificate off on every super peer,
//! on connections opened before it too, and stays in force across a restart.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use vesper_proto::v1::admin_client::AdminClient;
use vesper_proto::v1::cluster_client::ClusterClient;
use vesper_proto::v1::{DeliverCall, DescribeRequest, Message, StatusRequest};
use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::wait;

async fn channel(
    address: std::net::SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .identity(Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ))
        .domain_name("127.0.0.1");
    Ok(Endpoint::from_shared(format!("https://{address}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .tls_config(tls)?
        .connect()
        .await?)
}

async fn applied_index(cluster: &Cluster, node: usize) -> anyhow::Result<u64> {
    let (cert, key) = cluster.pki.operator_cert();
    let mut admin = AdminClient::new(
        channel(
            cluster.nodes[node].endpoints().admin,
            &cluster.pki.ca_cert(),
            &cert,
            &key,
        )
        .await?,
    );
    Ok(admin
        .status(StatusRequest {})
        .await?
        .into_inner()
        .applied_index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t15_expired_and_revoked_certificates_are_refused_everywhere() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(2, NodeOptions::default()).await?;
    let ca = cluster.pki.ca_cert();
    let (expired_op, expired_op_key) = cluster.pki.issue(
        "operator",
        "expired-operator",
        &["--not-after", "2020-01-01"],
    )?;
    let (expired_sp, expired_sp_key) = cluster.pki.issue(
        "superpeer",
        "expired-superpeer",
        &["--not-after", "2020-01-01"],
    )?;
    let (second_op, second_op_key) = cluster.pki.issue("operator", "second-operator", &[])?;
    let (extra_sp, extra_sp_key) = cluster.pki.issue("superpeer", "extra-superpeer", &[])?;

    // Expired certificates get nowhere on either node: the TLS layer refuses them before any call.
    for node in 0..2 {
        let endpoints = cluster.nodes[node].endpoints();
        let admin = async {
            AdminClient::new(channel(endpoints.admin, &ca, &expired_op, &expired_op_key).await?)
                .status(StatusRequest {})
                .await?;
            anyhow::Ok(())
        };
        assert!(
            admin.await.is_err(),
            "node {node}: Admin took an expired operator certificate"
        );
        let cluster_port = async {
            ClusterClient::new(
                channel(endpoints.cluster, &ca, &expired_sp, &expired_sp_key).await?,
            )
            .describe(DescribeRequest {})
            .await?;
            anyhow::Ok(())
        };
        assert!(
            cluster_port.await.is_err(),
            "node {node}: the Cluster port took an expired super peer certificate"
        );
    }

    // The second operator and the extra super peer work, on connections they keep open.
    let mut admins = Vec::new();
    let mut peers = Vec::new();
    for node in 0..2 {
        let endpoints = cluster.nodes[node].endpoints();
        let mut admin =
            AdminClient::new(channel(endpoints.admin, &ca, &second_op, &second_op_key).await?);
        admin.status(StatusRequest {}).await?;
        admins.push(admin);
        let mut peer = ClusterClient::with_interceptor(
            channel(endpoints.cluster, &ca, &extra_sp, &extra_sp_key).await?,
            vesper_proto::version::ClusterStamp,
        );
        peer.describe(DescribeRequest {}).await?;
        peers.push(peer);
    }
    // A delivery stream the extra super peer keeps open: the Cluster gate sees only the call that opens it, so
    // each delivery on it is checked against the revocations too. One delivery to a peer that is not attached
    // shows the stream works.
    let (calls, call_stream) = tokio::sync::mpsc::unbounded_channel();
    let mut outcomes = peers[0]
        .clone()
        .deliver_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(
            call_stream,
        ))
        .await?
        .into_inner();
    let delivery = |id: u64| DeliverCall {
        id,
        to: vesper_proto::Keypair::generate().peer_id().to_string(),
        messages: vec![Message {
            id: format!("m{id}"),
            kind: "note".into(),
            ..Message::default()
        }],
    };
    calls.send(delivery(1))?;
    let outcome = outcomes.message().await?.expect("an outcome");
    assert_eq!((outcome.id, outcome.each), (1, vec![false]));

    // Bad revocations are refused and commit nothing. (First wait for both nodes' relay load reports, the only
    // writes an idle cluster makes by itself, so that the log index stands still.)
    let before = cluster.wait_quiet(0).await?;
    let output = cluster.vesperctl(0, &["cert", "revoke", "--fingerprint", "abc"])?;
    assert_eq!(output.status.code(), Some(64), "{output:?}"); // EX_USAGE
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("not 64 hex digits"),
        "{output:?}"
    );
    let as_superpeer = async {
        let (cert, key) = cluster.pki.superpeer_cert();
        AdminClient::new(channel(cluster.nodes[0].endpoints().admin, &ca, &cert, &key).await?)
            .revoke_certificate(vesper_proto::v1::RevokeCertificateRequest {
                fingerprint: vec![7; 32],
            })
            .await
            .map_err(anyhow::Error::from)
    };
    let refused = as_superpeer
        .await
        .expect_err("a super peer certificate revoked something");
    let status = refused
        .downcast_ref::<tonic::Status>()
        .expect("a gRPC status");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        applied_index(&cluster, 0).await?,
        before,
        "a refused revocation moved the log"
    );

    // Revoke both through node 1 (a follower or the leader: either forwards the proposal).
    for cert in [&second_op, &extra_sp] {
        let output = cluster.vesperctl(1, &["cert", "revoke", cert.to_str().unwrap(), "--json"])?;
        assert!(output.status.success(), "{output:?}");
        let reply: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        assert!(reply["log_index"].as_u64().unwrap_or(0) > before, "{reply}");
    }

    // The open delivery stream is cut off with the reason once node 0 has applied the revocation.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut id = 1;
    let status = loop {
        id += 1;
        calls.send(delivery(id))?;
        match outcomes.message().await {
            Ok(Some(outcome)) => assert_eq!((outcome.id, outcome.each), (id, vec![false])),
            Ok(None) => anyhow::bail!("the delivery stream ended without a status"),
            Err(status) => break status,
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "a revoked super peer kept delivering on its open stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");

    // Within seconds every node refuses them on the connections opened before, and on new ones.
    for node in 0..2 {
        let admin = &mut admins[node];
        let status = wait::until(
            "the revoked operator is refused on its open connection",
            Duration::from_secs(10),
            || {
                let mut admin = admin.clone();
                async move { Ok(admin.status(StatusRequest {}).await.err()) }
            },
        )
        .await?;
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("revoked"), "{status:?}");
        let peer = &mut peers[node];
        let status = wait::until(
            "the revoked super peer is refused on its open connection",
            Duration::from_secs(10),
            || {
                let mut peer = peer.clone();
                async move { Ok(peer.describe(DescribeRequest {}).await.err()) }
            },
        )
        .await?;
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("revoked"), "{status:?}");
    }

    // The revocation is state, not memory: node 1 still refuses after a restart.
    cluster.stop(1).await?;
    cluster.restart(1).await?;
    let endpoints = cluster.nodes[1].endpoints();
    let status = AdminClient::new(channel(endpoints.admin, &ca, &second_op, &second_op_key).await?)
        .status(StatusRequest {})
        .await
        .expect_err("a revoked operator after a restart");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // The cluster's own certificates are untouched: the original operator still reads both nodes.
    for node in 0..2 {
        applied_index(&cluster, node).await?;
    }
    Ok(())
}
