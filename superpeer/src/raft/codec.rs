//! Encoding of openraft messages and state machine commands on the Cluster service: postcard inside a bytes
//! field, tagged with [`ENCODING`] so a peer that speaks another encoding is refused with a clear error instead of
//! being misread.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::Status;

use crate::error::ServiceError;

/// The one encoding this build speaks (2 since record puts carry their owner's index quota, 3 since a command
/// can carry its trace context, `Op::Traced`).
pub const ENCODING: u32 = 3;

/// Encodes `value` for the wire.
pub fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, Status> {
    postcard::to_stdvec(value)
        .map_err(|error| ServiceError::Internal(format!("cannot encode {what}: {error}")).into())
}

/// Decodes `bytes` sent with encoding `encoding`.
pub fn decode<T: DeserializeOwned>(what: &str, encoding: u32, bytes: &[u8]) -> Result<T, Status> {
    if encoding != ENCODING {
        return Err(ServiceError::Precondition(format!(
            "{what} uses encoding {encoding}; this super peer speaks encoding {ENCODING} (mixed versions?)"
        ))
        .into());
    }
    postcard::from_bytes(bytes)
        .map_err(|error| ServiceError::Malformed(format!("cannot decode {what}: {error}")).into())
}

/// Wraps an encoded value into the Cluster service's payload message.
pub fn payload<T: Serialize>(
    what: &str,
    value: &T,
) -> Result<vesper_proto::v1::RaftPayload, Status> {
    Ok(vesper_proto::v1::RaftPayload {
        encoding: ENCODING,
        data: encode(what, value)?,
    })
}

/// Decodes a Cluster service payload.
pub fn from_payload<T: DeserializeOwned>(
    what: &str,
    payload: &vesper_proto::v1::RaftPayload,
) -> Result<T, Status> {
    decode(what, payload.encoding, &payload.data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, DeleteRecord};

    #[test]
    fn commands_round_trip_and_foreign_encodings_are_refused() {
        let command = Command {
            at_ms: 42,
            op: DeleteRecord {
                owner: [1; 32],
                namespace: "ns".into(),
                key: "k".into(),
                expected_version: Some(3),
            }
            .into(),
        };
        let wire = payload("command", &command).unwrap();
        assert_eq!(from_payload::<Command>("command", &wire).unwrap(), command);
        let foreign = vesper_proto::v1::RaftPayload {
            encoding: 99,
            data: wire.data,
        };
        let error = from_payload::<Command>("command", &foreign).unwrap_err();
        assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    }
}
