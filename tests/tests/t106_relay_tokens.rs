//! The relay port's refusals, seen from a raw UDP client against a real super peer: forged, taken and expired
//! tokens, a stranger's datagrams (never forwarded), and the byte cap ending an allocation with a notice to both
//! sides. (The same relay carrying real peer connections through NATs: t100_nat_lab.rs.)

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use vesper_tests::cluster::{Cluster, NodeOptions};
use vesper_tests::relay::{self, BOUND, ENDED, END_TAG, TAKEN, UNKNOWN_TOKEN};

/// Byte cap of every allocation in this test (both directions together).
const MAX_BYTES: u64 = 4096;

fn socket() -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(socket)
}

/// The next datagram `socket` receives from `from` within 5 s.
fn receive_from(socket: &UdpSocket, from: SocketAddr) -> anyhow::Result<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buffer = [0u8; 2048];
    while Instant::now() < deadline {
        match socket.recv_from(&mut buffer) {
            Ok((len, source)) if source == from => return Ok(buffer[..len].to_vec()),
            Ok(_) => {}
            Err(error) if relay::timed_out(&error) => {}
            Err(error) => return Err(error.into()),
        }
    }
    anyhow::bail!("nothing from {from} within 5 s")
}

#[tokio::test]
async fn relay_refuses_bad_tokens_strangers_and_traffic_past_its_caps() -> anyhow::Result<()> {
    let cluster = Cluster::start(
        1,
        NodeOptions {
            extra_args: vec![
                "--relay-max-bytes".into(),
                MAX_BYTES.to_string(),
                "--relay-max-lifetime".into(),
                "1s".into(),
            ],
            ..NodeOptions::default()
        },
    )
    .await?;
    let port = cluster.nodes[0]
        .endpoints()
        .stun
        .expect("the node serves a UDP relay/STUN port");

    // The grant reports the caps the relay will enforce.
    let grant = relay::grant(&cluster, 0).await?;
    assert_eq!((grant.max_bytes, grant.max_seconds), (MAX_BYTES, 1));
    let token = relay::token(&grant)?;

    // A forged token is refused by name.
    let forged: [u8; 16] = rand::random();
    let stranger = socket()?;
    assert_eq!(relay::bind(&stranger, port, &forged)?, UNKNOWN_TOKEN);

    // Two sides bind; a third address cannot take the token.
    let (a, b) = (socket()?, socket()?);
    assert_eq!(relay::bind(&a, port, &token)?, BOUND);
    assert_eq!(relay::bind(&b, port, &token)?, BOUND);
    assert_eq!(relay::bind(&stranger, port, &token)?, TAKEN);

    // A datagram from the stranger (no allocation of its own) reaches nobody: B's next datagram is A's fence.
    stranger.send_to(b"\x01stranger wants to reach b", port)?;
    a.send_to(b"\x01fence from a", port)?;
    assert_eq!(receive_from(&b, port)?, b"\x01fence from a");
    let mut used = b"\x01fence from a".len() as u64;

    // The byte cap: A sends 1000-byte datagrams until the allocation ends; both sides get the notice (reason 1,
    // bytes) and B received exactly what fitted under the cap.
    let datagram = vec![0x41u8; 1000];
    let mut forwarded = 0;
    while used + datagram.len() as u64 <= MAX_BYTES {
        a.send_to(&datagram, port)?;
        assert_eq!(receive_from(&b, port)?, datagram);
        used += datagram.len() as u64;
        forwarded += 1;
    }
    assert_eq!(forwarded, 4);
    a.send_to(&datagram, port)?;
    let notice = [END_TAG.as_slice(), &[1]].concat();
    assert_eq!(
        receive_from(&b, port)?,
        notice,
        "B is told the byte cap ended it"
    );
    assert_eq!(
        receive_from(&a, port)?,
        notice,
        "A is told the byte cap ended it"
    );
    // Later datagrams are answered with the notice, not forwarded; a new bind says the allocation ended.
    a.send_to(&datagram, port)?;
    assert_eq!(receive_from(&a, port)?, notice);
    assert_eq!(relay::bind(&a, port, &token)?, ENDED);

    // An expired grant: bound by one side, the other comes after the allocation's 1 s lifetime. (Waiting out a
    // time cap is the point here, not a readiness wait.)
    let late = relay::token(&relay::grant(&cluster, 0).await?)?;
    let (early_side, late_side) = (socket()?, socket()?);
    assert_eq!(relay::bind(&early_side, port, &late)?, BOUND);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(relay::bind(&late_side, port, &late)?, ENDED);

    // The node still serves: a fresh grant binds.
    let fresh = relay::token(&relay::grant(&cluster, 0).await?)?;
    assert_eq!(relay::bind(&socket()?, port, &fresh)?, BOUND);
    Ok(())
}
