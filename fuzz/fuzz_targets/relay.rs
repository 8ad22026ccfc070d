//! The relay's allocation table fed arbitrary datagrams from a handful of sources, interleaved with grants,
//! binds of granted tokens (which a fuzzer could not guess), releases and the passing of time. Never panics, and
//! keeps the relay's promises: a datagram is forwarded only between two addresses that both bound the same
//! allocation, an allocation holds at most two addresses, and allocations in use never exceed the cap. The
//! leaf-side parsers of bind answers and end notices read every datagram too.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vesper_proto::relay::{
    bind_request, parse_bind_answer, parse_end_notice, release_request, Action, BindStatus,
    EndReason, RelayConfig, RelayTable,
};

const MAX_ALLOCATIONS: usize = 3;

/// What the table decided for a datagram from `source` may only reach the other address of an allocation both
/// bound (`bound`: the addresses each token's binds were answered "bound" for).
fn check(bound: &HashMap<[u8; 16], Vec<SocketAddr>>, source: SocketAddr, action: Action) {
    let same_allocation = |to: SocketAddr| {
        to != source
            && bound
                .values()
                .any(|sides| sides.contains(&source) && sides.contains(&to))
    };
    match action {
        Action::Forward(to) => assert!(
            same_allocation(to),
            "{source} -> {to} forwarded without both binding one allocation"
        ),
        Action::End(_, [from, to]) => {
            assert_eq!(from, source);
            assert!(same_allocation(to), "end notice to {to}");
        }
        Action::Answer(_) | Action::Drop | Action::NotRelay => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let config = RelayConfig {
        enabled: true,
        max_bytes: 4096,
        max_lifetime: Duration::from_secs(5),
        max_bytes_per_second: 2048,
        max_allocations: MAX_ALLOCATIONS,
    };
    let mut table = RelayTable::new(config);
    let mut now = Instant::now();
    let sources: Vec<SocketAddr> = (0..4u16)
        .map(|n| SocketAddr::from(([192, 0, 2, 1 + n as u8], 4000 + n)))
        .collect();
    let mut tokens: Vec<[u8; 16]> = Vec::new();
    // Which addresses each token's binds were answered "bound" for.
    let mut bound: HashMap<[u8; 16], Vec<SocketAddr>> = HashMap::new();
    let mut input = data;
    let mut next = |count: usize| -> Option<Vec<u8>> {
        if input.len() < count {
            return None;
        }
        let (head, rest) = input.split_at(count);
        input = rest;
        Some(head.to_vec())
    };
    while let Some(op) = next(1) {
        match op[0] % 5 {
            0 => {
                if let Some(grant) = table.grant(now) {
                    tokens.push(grant.token);
                }
                assert!(table.active(now) <= MAX_ALLOCATIONS);
            }
            1 => {
                let Some(pick) = next(2) else { break };
                let Some(token) = tokens.get(usize::from(pick[0]) % tokens.len().max(1)) else {
                    continue;
                };
                let source = sources[usize::from(pick[1]) % sources.len()];
                match table.handle(&bind_request(token), source, now) {
                    Action::Answer(answer) => {
                        let status = parse_bind_answer(&answer).expect("a bind answer");
                        if BindStatus::from_byte(status) == Some(BindStatus::Bound) {
                            let sides = bound.entry(*token).or_default();
                            if !sides.contains(&source) {
                                sides.push(source);
                            }
                            assert!(sides.len() <= 2, "three addresses bound one token");
                        }
                    }
                    other => panic!("a bind was answered with {other:?}"),
                }
            }
            2 => {
                let Some(header) = next(2) else { break };
                let source = sources[usize::from(header[0]) % sources.len()];
                let Some(datagram) = next(usize::from(header[1])) else {
                    break;
                };
                let _ = parse_bind_answer(&datagram);
                if let Some(reason) = parse_end_notice(&datagram) {
                    let _ = EndReason::from_byte(reason);
                }
                let action = table.handle(&datagram, source, now);
                check(&bound, source, action);
            }
            3 => {
                let Some(step) = next(1) else { break };
                now += Duration::from_millis(u64::from(step[0]) * 250);
                table.expire(now);
                assert!(table.active(now) <= MAX_ALLOCATIONS);
            }
            _ => {
                let Some(pick) = next(1) else { break };
                if let Some(token) = tokens.get(usize::from(pick[0]) % tokens.len().max(1)) {
                    // From a bound address it is relayed like any datagram; otherwise it is dropped.
                    let action = table.handle(&release_request(token), sources[0], now);
                    check(&bound, sources[0], action);
                }
            }
        }
    }
});
