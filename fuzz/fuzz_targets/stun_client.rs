//! A leaf reading STUN answers: anything may arrive on its socket. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vesper_proto::stun;

fuzz_target!(|data: &[u8]| {
    // The transaction the leaf waits for: the one in the datagram half of the time (so the attribute parsing is
    // reached), another one otherwise.
    let transaction = match data.get(8..20) {
        Some(id) if data[0] & 1 == 0 => {
            let mut bytes = [0u8; 16];
            bytes[4..].copy_from_slice(id);
            u128::from_be_bytes(bytes)
        }
        _ => 42,
    };
    let _ = stun::parse_binding_response(data, transaction);
    let _ = stun::looks_like_stun(data);
});
