//! Leaf requests as a super peer decodes and checks them before anything reaches Raft: protobuf decoding, then
//! the input checks and the id and candidate parsing the services run. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use vesper_proto::nat::parse_candidates;
use vesper_proto::v1::{
    ClientFrame, ConnectRequest, PunchPlan, PutRecordRequest, SendMessageRequest,
    SetPresenceRequest,
};
use vesper_proto::{validate, PeerId};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    // The defaults, as a super peer started without size flags checks.
    let limits = validate::SizeLimits::DEFAULT;
    match which % 6 {
        0 => {
            if let Ok(put) = PutRecordRequest::decode(bytes) {
                let _ = validate::record(
                    &limits,
                    &put.namespace,
                    &put.key,
                    &put.attributes,
                    &put.value,
                );
            }
        }
        1 => {
            if let Ok(presence) = SetPresenceRequest::decode(bytes) {
                let _ = validate::attributes(&limits, &presence.attributes);
            }
        }
        2 => {
            if let Ok(send) = SendMessageRequest::decode(bytes) {
                let _ = send.to.parse::<PeerId>();
                let _ = validate::kind(&send.kind);
                let _ = validate::message_payload(&limits, &send.payload);
            }
        }
        3 => {
            if let Ok(connect) = ConnectRequest::decode(bytes) {
                let _ = connect.peer_id.parse::<PeerId>();
                let _ = parse_candidates(&connect.candidates);
                let _ = connect.nat_class.parse::<vesper_proto::nat::NatClass>();
            }
        }
        4 => {
            if let Ok(plan) = PunchPlan::decode(bytes) {
                let _ = plan.peer_id.parse::<PeerId>();
                let _ = parse_candidates(&plan.peer_candidates);
            }
        }
        _ => {
            let _ = ClientFrame::decode(bytes);
        }
    }
});
