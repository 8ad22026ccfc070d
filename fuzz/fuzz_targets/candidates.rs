//! Address candidates and PeerIds as they arrive in requests and punch plans (strings from the other side).
//! Never panics; what parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vesper_proto::nat::parse_candidates;
use vesper_proto::PeerId;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let candidates: Vec<String> = text.split('\n').map(str::to_string).collect();
    if let Ok(addresses) = parse_candidates(&candidates) {
        let printed: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        assert_eq!(
            parse_candidates(&printed).expect("printed candidates parse"),
            addresses
        );
    }
    for line in text.split('\n') {
        if let Ok(peer) = line.parse::<PeerId>() {
            assert_eq!(
                peer.to_string()
                    .parse::<PeerId>()
                    .expect("printed id parses"),
                peer
            );
        }
    }
});
