//! Peer connections through the library on one host: a refused offer, an offline peer and a good connection
//! each behave as documented. (Connectivity through NATs is the lab's job: t100_nat_lab.rs.)

use std::time::Duration;

use vesper_leafpeer::{Keypair, LeafError, Path};
use vesper_tests::cluster::{Cluster, NodeOptions};

#[tokio::test]
async fn refused_offline_and_accepted_connections() -> anyhow::Result<()> {
    let cluster = Cluster::start(2, NodeOptions::default()).await?;
    let alice = cluster.leaf(0).await?;
    let bob = cluster.leaf(1).await?;

    // Bob has no policy: every offer is refused, and alice is told so.
    let refused = alice
        .connect_to(&bob.peer_id())
        .await
        .err()
        .expect("refused");
    match &refused {
        LeafError::Status(status) => {
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{refused}");
            assert!(
                status.message().contains("refused the connection"),
                "{refused}"
            );
        }
        other => panic!("expected PERMISSION_DENIED, got {other}"),
    }

    // A peer that never attached.
    let nobody = Keypair::generate().peer_id();
    match alice.connect_to(&nobody).await {
        Err(LeafError::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
            assert!(status.message().contains("not online"), "{status:?}");
        }
        Err(other) => panic!("expected NOT_FOUND, got {other}"),
        Ok(_) => panic!("connected to a peer that does not exist"),
    }

    // Bob accepts alice only; the connection carries data both ways and is direct on one host.
    let alice_id = alice.peer_id();
    bob.set_connect_policy(move |peer| *peer == alice_id);
    let mut incoming = bob.incoming_connections().expect("first take");
    let connection = alice.connect_to(&bob.peer_id()).await?;
    assert!(
        matches!(connection.path(), Path::Direct(_)),
        "{}",
        connection.path()
    );
    assert_eq!(connection.peer(), bob.peer_id());
    let accepted = tokio::time::timeout(Duration::from_secs(30), incoming.recv())
        .await?
        .expect("an accepted connection");
    assert_eq!(accepted.peer(), alice.peer_id());

    let (mut send, mut recv) = connection.open_bi().await?;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    send.write_all(&payload).await?;
    send.finish()?;
    let (mut back, mut from_alice) = accepted.accept_bi().await?;
    let got = from_alice.read_to_end(1 << 20).await?;
    assert_eq!(got, payload, "bytes arrive intact");
    back.write_all(b"thanks").await?;
    back.finish()?;
    assert_eq!(recv.read_to_end(64).await?, b"thanks");

    // A third peer that bob does not allow is refused, and bob's connection keeps working.
    let carol = cluster.leaf(0).await?;
    assert!(matches!(
        carol.connect_to(&bob.peer_id()).await,
        Err(LeafError::Status(status)) if status.code() == tonic::Code::PermissionDenied
    ));
    let (mut send, _recv) = connection.open_bi().await?;
    send.write_all(b"still here").await?;
    send.finish()?;
    let (_, mut again) = accepted.accept_bi().await?;
    assert_eq!(again.read_to_end(64).await?, b"still here");
    Ok(())
}
