//! STUN Binding (RFC 8489): the one STUN method Vesper uses, on both sides.
//!
//! Super peers answer Binding requests so a leaf can learn its server-reflexive address (the address and port its
//! NAT maps its socket to); asking two super peers at different addresses tells whether that mapping depends on
//! the destination. Message parsing and building is done by the `stun-types` crate; this module decides what
//! Vesper accepts and answers, so that both sides and the fuzz targets share one definition.
//!
//! What a super peer answers (see [`answer`]):
//! - a well-formed Binding request gets a success response with XOR-MAPPED-ADDRESS (plus FINGERPRINT when the
//!   request carried one, so clients that demultiplex by fingerprint keep working);
//! - a Binding request with a comprehension-required attribute the server does not know (for example RFC 5780's
//!   CHANGE-REQUEST) gets a 420 error naming it;
//! - anything else (responses, indications, other methods, malformed or truncated data) gets no answer at all, so
//!   a forged packet can never make a super peer send more than a reflexive address.
//!
//! Limits on how often and how large answers may be live with the server (amplification and rates).

use std::net::SocketAddr;

use stun_types::attribute::{
    Attribute, AttributeStaticType, ErrorCode, Fingerprint, Software, UnknownAttributes,
    XorMappedAddress,
};
use stun_types::message::{
    Message, MessageClass, MessageWrite, MessageWriteExt, MessageWriteVec, TransactionId, BINDING,
};

/// The magic cookie every RFC 5389/8489 message carries in bytes 4..8.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Length of the fixed STUN header.
pub const HEADER_LEN: usize = 20;

/// Largest datagram a super peer reads as STUN; larger ones are not Binding requests Vesper answers.
pub const MAX_REQUEST_LEN: usize = 548;

/// Value of the SOFTWARE attribute in the requests a leaf sends.
pub const CLIENT_SOFTWARE: &str = "vesper-leafpeer";

/// Whether a datagram looks like STUN at all: the two top bits of the first byte are zero (RFC 7983 puts QUIC
/// and other protocols elsewhere), the length is a multiple of four and the magic cookie is in place.
pub fn looks_like_stun(packet: &[u8]) -> bool {
    packet.len() >= HEADER_LEN
        && packet[0] & 0xC0 == 0
        && u16::from_be_bytes([packet[2], packet[3]]).is_multiple_of(4)
        && u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]) == MAGIC_COOKIE
}

/// Why a datagram got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    /// Not STUN: wrong first bits, bad length or no magic cookie.
    #[error("not a STUN message")]
    NotStun,
    /// Longer than [`MAX_REQUEST_LEN`].
    #[error("STUN message longer than {MAX_REQUEST_LEN} bytes")]
    TooLong,
    /// STUN, but it did not parse (truncated, bad attribute lengths, fingerprint mismatch, ...).
    #[error("malformed STUN message: {0}")]
    Malformed(String),
    /// A well-formed message that is not a Binding request (a response, an indication, another method).
    #[error("not a Binding request")]
    NotBindingRequest,
}

/// The answer of a super peer to one datagram from `source`: the bytes to send back, or why there are none.
pub fn answer(request: &[u8], source: SocketAddr) -> Result<Vec<u8>, Ignored> {
    if request.len() > MAX_REQUEST_LEN {
        return Err(Ignored::TooLong);
    }
    if !looks_like_stun(request) {
        return Err(Ignored::NotStun);
    }
    let message =
        Message::from_bytes(request).map_err(|error| Ignored::Malformed(error.to_string()))?;
    if !message.has_class(MessageClass::Request) || !message.has_method(BINDING) {
        return Err(Ignored::NotBindingRequest);
    }
    // Comprehension-required attributes (type < 0x8000) Vesper does not implement get a 420 (RFC 8489 7.3.1).
    // Only FINGERPRINT-like optional attributes are skipped silently; Binding needs no request attributes.
    let unknown: Vec<_> = message
        .iter_attributes()
        .map(|(_, attribute)| attribute.get_type())
        .filter(|kind| kind.comprehension_required())
        .collect();
    let with_fingerprint = message.has_attribute(Fingerprint::TYPE);
    let mut out = if unknown.is_empty() {
        let mut out = Message::builder_success(&message, MessageWriteVec::with_capacity(64));
        out.add_attribute(&XorMappedAddress::new(source, message.transaction_id()))
            .map_err(|error| Ignored::Malformed(error.to_string()))?;
        out
    } else {
        let mut out = Message::builder_error(&message, MessageWriteVec::with_capacity(64));
        let code = ErrorCode::new(420, "Unknown Attribute")
            .map_err(|error| Ignored::Malformed(error.to_string()))?;
        out.add_attribute(&code)
            .map_err(|error| Ignored::Malformed(error.to_string()))?;
        out.add_attribute(&UnknownAttributes::new(&unknown))
            .map_err(|error| Ignored::Malformed(error.to_string()))?;
        out
    };
    if with_fingerprint {
        out.add_fingerprint()
            .map_err(|error| Ignored::Malformed(error.to_string()))?;
    }
    Ok(out.finish())
}

/// A Binding request as a leaf sends it: SOFTWARE and FINGERPRINT, so that the request is at least as large as
/// the answer (a server that refuses to amplify still answers it). Returns the transaction id and the bytes.
pub fn binding_request() -> (u128, Vec<u8>) {
    let mut out = Message::builder_request(BINDING, MessageWriteVec::with_capacity(64));
    let software = Software::new(CLIENT_SOFTWARE).expect("a short constant SOFTWARE value");
    out.add_attribute(&software)
        .expect("SOFTWARE fits an empty request");
    out.add_fingerprint().expect("FINGERPRINT fits any request");
    let bytes = out.finish();
    let transaction = u128::from(
        Message::from_bytes(&bytes)
            .expect("a request built here parses")
            .transaction_id(),
    );
    (transaction, bytes)
}

/// Why a Binding response could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not a STUN message, or malformed.
    #[error("not a well-formed STUN message")]
    Malformed,
    /// A STUN message of another transaction (a late answer to an earlier request, or someone else's).
    #[error("STUN response of another transaction")]
    OtherTransaction,
    /// The server answered with an error.
    #[error("STUN server answered error {code}: {reason}")]
    ErrorResponse { code: u16, reason: String },
    /// A success response without XOR-MAPPED-ADDRESS.
    #[error("STUN response without XOR-MAPPED-ADDRESS")]
    NoMappedAddress,
}

/// The reflexive address in the answer to the request with id `transaction`.
pub fn parse_binding_response(
    packet: &[u8],
    transaction: u128,
) -> Result<SocketAddr, ResponseError> {
    if !looks_like_stun(packet) {
        return Err(ResponseError::Malformed);
    }
    let message = Message::from_bytes(packet).map_err(|_| ResponseError::Malformed)?;
    if u128::from(message.transaction_id()) != transaction {
        return Err(ResponseError::OtherTransaction);
    }
    if !message.has_method(BINDING) {
        return Err(ResponseError::Malformed);
    }
    if message.has_class(MessageClass::Error) {
        let (code, reason) = message
            .attribute::<ErrorCode>()
            .map(|error| (error.code(), error.reason().to_string()))
            .unwrap_or((0, String::from("no ERROR-CODE")));
        return Err(ResponseError::ErrorResponse { code, reason });
    }
    if !message.has_class(MessageClass::Success) {
        return Err(ResponseError::Malformed);
    }
    message
        .attribute::<XorMappedAddress>()
        .map(|mapped| mapped.addr(message.transaction_id()))
        .map_err(|_| ResponseError::NoMappedAddress)
}

/// Builds a transaction id from its integer form (for tests and tools).
pub fn transaction_id(value: u128) -> TransactionId {
    TransactionId::from(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SocketAddr {
        "192.0.2.7:40000".parse().unwrap()
    }

    #[test]
    fn a_bare_request_gets_its_reflexive_address() {
        // The 20-byte request turnutils_stunclient sends.
        let mut request = vec![0x00, 0x01, 0x00, 0x00];
        request.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        request.extend_from_slice(&[7; 12]);
        let reply = answer(&request, source()).unwrap();
        let transaction = u128::from_be_bytes({
            let mut id = [0; 16];
            id[4..].copy_from_slice(&[7; 12]);
            id
        });
        assert_eq!(parse_binding_response(&reply, transaction), Ok(source()));
        assert_eq!(reply.len(), 32, "header + XOR-MAPPED-ADDRESS only");
    }

    #[test]
    fn the_leaf_request_round_trips_and_is_not_smaller_than_the_answer() {
        let (transaction, request) = binding_request();
        let reply = answer(&request, source()).unwrap();
        assert!(
            reply.len() <= request.len(),
            "{} > {}",
            reply.len(),
            request.len()
        );
        assert_eq!(parse_binding_response(&reply, transaction), Ok(source()));
        assert_eq!(
            parse_binding_response(&reply, transaction ^ 1),
            Err(ResponseError::OtherTransaction)
        );
        let v6: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        let reply = answer(&request, v6).unwrap();
        assert_eq!(parse_binding_response(&reply, transaction), Ok(v6));
    }

    #[test]
    fn unknown_required_attributes_get_420() {
        // CHANGE-REQUEST (0x0003), as RFC 5780 clients send.
        let mut request = vec![0x00, 0x01, 0x00, 0x08];
        request.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        request.extend_from_slice(&[9; 12]);
        request.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, 6]);
        let reply = answer(&request, source()).unwrap();
        let transaction = u128::from_be_bytes({
            let mut id = [0; 16];
            id[4..].copy_from_slice(&[9; 12]);
            id
        });
        match parse_binding_response(&reply, transaction) {
            Err(ResponseError::ErrorResponse { code: 420, .. }) => {}
            other => panic!("expected a 420, got {other:?}"),
        }
    }

    #[test]
    fn non_requests_and_garbage_get_nothing() {
        let (_, request) = binding_request();
        let reply = answer(&request, source()).unwrap();
        // A response reflected at the server is not answered (no loops between servers).
        assert_eq!(answer(&reply, source()), Err(Ignored::NotBindingRequest));
        assert_eq!(answer(b"hello", source()), Err(Ignored::NotStun));
        assert_eq!(answer(&[0u8; 600], source()), Err(Ignored::TooLong));
        // A length that runs past the end of the datagram.
        let mut truncated = request.clone();
        truncated[3] = 0x40;
        assert!(matches!(
            answer(&truncated, source()),
            Err(Ignored::Malformed(_))
        ));
        // A flipped bit is caught by the fingerprint.
        let mut corrupt = request.clone();
        corrupt[HEADER_LEN + 5] ^= 1;
        assert!(matches!(
            answer(&corrupt, source()),
            Err(Ignored::Malformed(_))
        ));
        // QUIC long-header packets are not STUN.
        let mut quic = request;
        quic[0] = 0xC0;
        assert_eq!(answer(&quic, source()), Err(Ignored::NotStun));
    }
}
