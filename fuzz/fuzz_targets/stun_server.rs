//! A super peer's STUN port: any datagram from any source. Never panics; whatever is answered is a Binding
//! success for that transaction that names the source (or a 400/420 error for it), and stays small (the port's amplification limit is
//! checked on top of this, in superpeer/src/stun.rs).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use vesper_proto::stun;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, datagram)) = data.split_first() else {
        return;
    };
    let port = u16::from(selector) * 257;
    let source = if selector & 1 == 0 {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, selector)), port)
    } else {
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            port,
        )
    };
    let Ok(reply) = stun::answer(datagram, source) else {
        return;
    };
    assert!(stun::looks_like_stun(&reply), "an answer that is not STUN");
    // A success is 32-44 bytes; a 420 lists the unknown attributes, 2 bytes for each of at least 4 in the request.
    assert!(
        reply.len() <= 64 + datagram.len() / 2,
        "answer of {} bytes to {} bytes",
        reply.len(),
        datagram.len()
    );
    // An answered datagram is a Binding request: its 96-bit transaction id follows the 8-byte header start.
    let mut id = [0u8; 16];
    id[4..].copy_from_slice(&datagram[8..20]);
    let transaction = u128::from_be_bytes(id);
    match stun::parse_binding_response(&reply, transaction) {
        Ok(mapped) => assert_eq!(mapped, source, "the answer names another address"),
        // RFC 8489: a request with unknown comprehension-required attributes (420) or a bad one (400) gets an
        // error response for its transaction.
        Err(stun::ResponseError::ErrorResponse {
            code: 400 | 420, ..
        }) => {}
        Err(other) => panic!("the answer does not parse as a Binding answer: {other:?}"),
    }
});
