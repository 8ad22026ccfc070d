//! Namespace access rules: the form the super peers store and enforce, and its conversion from and to the
//! Admin service's messages (where operators set them).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::v1::{NamespaceAccess, NamespaceAcl as ProtoAcl};
use crate::validate::InvalidInput;
use crate::PeerId;

/// Most members one namespace ACL may list.
pub const MAX_ACL_MEMBERS: usize = 1024;

/// Who may do something in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    /// Every attached peer.
    Anyone,
    /// Only the peers listed in the ACL.
    Members,
}

/// Access rules of one record namespace. A namespace without rules is open: anyone reads, anyone creates keys,
/// and a record is changed only by the peer that created it.
///
/// With `write: Members` only members write, and any member may change or delete any record of the namespace
/// (group write; a record keeps the creator as its owner). With `read: Members` only members read, list,
/// search or watch it. Owner-write / public-read is `write: Members` with the owner as the one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceAcl {
    pub write: Access,
    pub read: Access,
    /// Raw public keys (PeerIds) of the members.
    pub members: BTreeSet<[u8; 32]>,
}

impl NamespaceAcl {
    pub fn may_write(&self, peer: &[u8; 32]) -> bool {
        self.write == Access::Anyone || self.members.contains(peer)
    }

    pub fn may_read(&self, peer: &[u8; 32]) -> bool {
        self.read == Access::Anyone || self.members.contains(peer)
    }

    /// Checks and converts the rules an operator sent (the namespace itself is checked by the caller).
    pub fn from_proto(proto: &ProtoAcl) -> Result<Self, InvalidInput> {
        if proto.members.len() > MAX_ACL_MEMBERS {
            return Err(InvalidInput::TooLong {
                field: "acl members",
                len: proto.members.len(),
                max: MAX_ACL_MEMBERS,
            });
        }
        let mut members = BTreeSet::new();
        for text in &proto.members {
            let peer: PeerId = text.parse().map_err(|error| InvalidInput::BadValue {
                field: "acl member",
                reason: format!("{text:?}: {error}"),
            })?;
            members.insert(*peer.as_bytes());
        }
        let acl = NamespaceAcl {
            write: access_from_proto("write access", proto.write)?,
            read: access_from_proto("read access", proto.read)?,
            members,
        };
        if (acl.write != Access::Anyone || acl.read != Access::Anyone) && acl.members.is_empty() {
            return Err(InvalidInput::BadValue {
                field: "acl members",
                reason: "access MEMBERS needs at least one member (or clear the namespace's rules)"
                    .into(),
            });
        }
        Ok(acl)
    }

    /// The Admin service's form of these rules for `namespace`.
    pub fn to_proto(&self, namespace: String) -> ProtoAcl {
        let access = |access: Access| match access {
            Access::Anyone => NamespaceAccess::Anyone as i32,
            Access::Members => NamespaceAccess::Members as i32,
        };
        ProtoAcl {
            namespace,
            write: access(self.write),
            read: access(self.read),
            members: self
                .members
                .iter()
                .filter_map(|key| PeerId::from_public_key_bytes(key).ok())
                .map(|peer| peer.to_string())
                .collect(),
        }
    }
}

fn access_from_proto(field: &'static str, value: i32) -> Result<Access, InvalidInput> {
    match NamespaceAccess::try_from(value) {
        Ok(NamespaceAccess::Anyone) => Ok(Access::Anyone),
        Ok(NamespaceAccess::Members) => Ok(Access::Members),
        _ => Err(InvalidInput::BadValue {
            field,
            reason: format!("must be ANYONE or MEMBERS, got {value}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    #[test]
    fn rules_round_trip_and_bad_ones_name_the_field() {
        let member = Keypair::generate().peer_id().to_string();
        let proto = ProtoAcl {
            namespace: "team".into(),
            write: NamespaceAccess::Members as i32,
            read: NamespaceAccess::Anyone as i32,
            members: vec![member.clone()],
        };
        let acl = NamespaceAcl::from_proto(&proto).unwrap();
        assert_eq!(acl.to_proto("team".into()), proto);

        let no_members = ProtoAcl {
            members: vec![],
            ..proto.clone()
        };
        let error = NamespaceAcl::from_proto(&no_members).unwrap_err();
        assert!(
            error.to_string().contains("needs at least one member"),
            "{error}"
        );
        let bad_access = ProtoAcl {
            read: 9,
            ..proto.clone()
        };
        let error = NamespaceAcl::from_proto(&bad_access).unwrap_err();
        assert_eq!(
            error.to_string(),
            "read access: must be ANYONE or MEMBERS, got 9"
        );
        let bad_member = ProtoAcl {
            members: vec!["not-a-peer".into()],
            ..proto
        };
        let error = NamespaceAcl::from_proto(&bad_member).unwrap_err();
        assert!(
            error.to_string().starts_with("acl member: \"not-a-peer\""),
            "{error}"
        );
    }
}
