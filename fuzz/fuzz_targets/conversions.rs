//! The proto-to-domain conversions a super peer runs on requests: search terms, namespace ACLs (Admin), the
//! attach answer that opens a session, and read consistencies sent as integers. Never panics, and what converts keeps the
//! promises of the conversion: terms are within limits and match what they name, ACLs survive a round trip,
//! and no fuzzed attach verifies (that would be a forged Ed25519 signature).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use vesper_proto::acl::{NamespaceAcl, MAX_ACL_MEMBERS};
use vesper_proto::search::{self, Condition};
use vesper_proto::session::verify_attach;
use vesper_proto::v1::{
    client_frame, ClientFrame, ReadConsistency, SearchPeersRequest, SearchRecordsRequest,
    SetNamespaceAclRequest,
};
use vesper_proto::validate;

fn check_terms(terms: &[vesper_proto::v1::SearchTerm]) {
    let Ok(checked) = search::terms(terms) else {
        return;
    };
    assert!(!checked.is_empty() && checked.len() <= validate::MAX_SEARCH_TERMS);
    for term in &checked {
        validate::attribute_name(&term.attribute).expect("a checked attribute name");
        let (Condition::Equals(value) | Condition::Prefix(value)) = &term.condition;
        validate::attribute_value(&validate::SizeLimits::CEILING, value)
            .expect("a checked attribute value");
        let attributes = BTreeMap::from([(term.attribute.clone(), value.clone())]);
        assert!(
            term.matches(&attributes),
            "{term:?} does not match its own value"
        );
        assert!(!term.matches(&BTreeMap::new()));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(request) = SearchRecordsRequest::decode(bytes) {
                check_terms(&request.terms);
                let _ = ReadConsistency::try_from(request.consistency);
                let _ = validate::page_limit(request.limit);
            }
        }
        1 => {
            if let Ok(request) = SearchPeersRequest::decode(bytes) {
                check_terms(&request.terms);
            }
        }
        2 => {
            let Ok(request) = SetNamespaceAclRequest::decode(bytes) else {
                return;
            };
            let Some(proto) = request.acl else {
                return;
            };
            let _ = validate::namespace(&proto.namespace);
            if let Ok(acl) = NamespaceAcl::from_proto(&proto) {
                assert!(acl.members.len() <= MAX_ACL_MEMBERS);
                let again = NamespaceAcl::from_proto(&acl.to_proto(proto.namespace.clone()))
                    .expect("printed rules convert again");
                assert_eq!(again, acl);
            }
        }
        _ => {
            let Ok(frame) = ClientFrame::decode(bytes) else {
                return;
            };
            if let Some(client_frame::Frame::Attach(attach)) = frame.frame {
                let nonce = [0x5a; 32];
                assert!(
                    verify_attach(&attach, &nonce, "vp1server").is_err(),
                    "a fuzzed attach verified: {attach:?}"
                );
            }
        }
    }
});
