//! The certificate issuer of adopted nodes.
//!
//! The Cluster port admits only super peer certificates that chain to the cluster CA, whose key stays offline
//! with the operator. An operator can hand some super peers (the "core" ones they run themselves) an
//! intermediate issuer (`vesperctl ca issuer`: a CA certificate signed by the cluster CA, path length 0,
//! short-lived) with `placement.issuer_cert` / `placement.issuer_key`. A node holding one:
//!
//! - reports that it does, through Raft (so the controller on any leader knows adoption is possible, and
//!   `placement status` says when it is not);
//! - signs, when the controller has started an adoption, a super peer certificate for the adopted
//!   candidate's own key (its PeerId's Ed25519 key, the one the dial-back proof saw in TLS), naming only the IP
//!   it was proven on, valid for `placement.issued_validity` and never past the issuer's own end, and hands it
//!   in through Raft. It signs only for the candidate the replicated adoption names, and only while that
//!   candidate's replicated entry is eligible and granted, so no caller can ask it for anything else.
//!
//! The certificate then reaches the candidate in the answer to its next capability report (on its session,
//! from its host). When the node is retired its certificate is revoked (the controller does that for every
//! retired node); when an adoption times out, the certificate it got is revoked too.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::command::{Adoption, IssueCertificate, IssuedCertificate, NodeIssuer, PeerKey};
use crate::raft::propose::now_ms;
use crate::replica::Replica;
use crate::store::nodes::{is_granted, read_adoption, read_candidate, read_issuers};

/// Signed certificates start this much before they are signed, for clocks that disagree a little.
pub const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// How often the replicated adoption is looked at (one small local read).
const CHECK: Duration = Duration::from_millis(250);

/// Why the issuer material cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("certificate issuer: {0}")]
pub struct IssuerError(String);

/// An issuer certificate and its key, checked against the cluster CA.
pub struct IssuerMaterial {
    issuer: Issuer<'static, KeyPair>,
    issuer_pem: String,
    not_after_ms: u64,
}

impl std::fmt::Debug for IssuerMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerMaterial")
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

fn read(what: &str, path: &Path) -> Result<String, IssuerError> {
    std::fs::read_to_string(path).map_err(|error| {
        IssuerError(format!(
            "cannot read the {what} {}: {error}",
            path.display()
        ))
    })
}

fn first_der(what: &str, pem: &str) -> Result<Vec<u8>, IssuerError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or_else(|| IssuerError(format!("the {what} holds no certificate")))?
        .map(|der| der.to_vec())
        .map_err(|error| IssuerError(format!("the {what} does not parse: {error}")))
}

impl IssuerMaterial {
    /// Loads `cert` and `key` and checks that the certificate is a CA certificate signed by the cluster CA in
    /// `ca_pem`, that it is valid now, and that the key is its key.
    pub fn load(cert: &Path, key_path: &Path, ca_pem: &[u8]) -> Result<Self, IssuerError> {
        let issuer_pem = read("issuer certificate", cert)?;
        let key_pem = read("issuer key", key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|error| {
            IssuerError(format!(
                "{} is not a private key: {error}",
                key_path.display()
            ))
        })?;
        let der = first_der("issuer certificate", &issuer_pem)?;
        let (_, parsed) = X509Certificate::from_der(&der).map_err(|error| {
            IssuerError(format!("the issuer certificate does not parse: {error}"))
        })?;
        if !parsed.is_ca() {
            return Err(IssuerError(format!(
                "{} is not a CA certificate (make one with vesperctl ca issuer)",
                cert.display()
            )));
        }
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(IssuerError(format!(
                "the key {} is not the key of {}",
                key_path.display(),
                cert.display()
            )));
        }
        let ca_der = first_der(
            "cluster CA certificate",
            std::str::from_utf8(ca_pem)
                .map_err(|_| IssuerError("the cluster CA certificate is not text".into()))?,
        )?;
        let (_, ca) = X509Certificate::from_der(&ca_der)
            .map_err(|error| IssuerError(format!("the cluster CA does not parse: {error}")))?;
        parsed
            .verify_signature(Some(ca.public_key()))
            .map_err(|_| {
                IssuerError(format!(
                    "{} is not signed by this cluster's CA",
                    cert.display()
                ))
            })?;
        let now = now_ms() / 1000;
        let not_after = parsed.validity().not_after.timestamp();
        if parsed.validity().not_before.timestamp() > now as i64 || not_after <= now as i64 {
            return Err(IssuerError(format!(
                "{} is not valid now (valid {} to {})",
                cert.display(),
                parsed.validity().not_before,
                parsed.validity().not_after
            )));
        }
        let issuer = Issuer::from_ca_cert_pem(&issuer_pem, key)
            .map_err(|error| IssuerError(format!("cannot use {}: {error}", cert.display())))?;
        Ok(Self {
            issuer,
            issuer_pem,
            not_after_ms: u64::try_from(not_after).unwrap_or(0).saturating_mul(1000),
        })
    }

    /// Signs a super peer certificate for the Ed25519 key `peer`, naming `ip`, valid for `validity` (never past
    /// the issuer's own end). Returns the certificate chain (the certificate, then the issuer's).
    pub fn sign(
        &self,
        by_node: u64,
        peer: &PeerKey,
        ip: IpAddr,
        validity: Duration,
    ) -> Result<IssuedCertificate, IssuerError> {
        // RFC 8410 SubjectPublicKeyInfo for Ed25519: a fixed prefix, then the 32-byte key.
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(peer);
        let public = SubjectPublicKeyInfo::from_der(&spki)
            .map_err(|error| IssuerError(format!("the candidate's key: {error}")))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        let mut subject = DistinguishedName::new();
        subject.push(
            DnType::CommonName,
            format!("adopted-{}", data_encoding::HEXLOWER.encode(&peer[..8])),
        );
        subject.push(DnType::OrganizationalUnitName, "superpeer");
        params.distinguished_name = subject;
        let now = time::OffsetDateTime::now_utc();
        let wanted = now + time::Duration::try_from(validity).unwrap_or(time::Duration::DAY);
        let issuer_end = time::OffsetDateTime::from_unix_timestamp(
            i64::try_from(self.not_after_ms / 1000).unwrap_or(i64::MAX),
        )
        .unwrap_or(wanted);
        let not_after = wanted.min(issuer_end);
        params.not_before = now - time::Duration::try_from(CLOCK_SLACK).unwrap_or_default();
        params.not_after = not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&public, &self.issuer)
            .map_err(|error| IssuerError(format!("cannot sign: {error}")))?;
        Ok(IssuedCertificate {
            by_node,
            chain_pem: format!("{}{}", cert.pem(), self.issuer_pem),
            fingerprint: crate::roles::fingerprint(cert.der()),
            not_after_ms: u64::try_from(not_after.unix_timestamp())
                .unwrap_or(0)
                .saturating_mul(1000),
        })
    }

    /// Until when the issuer itself is valid (ms since the epoch).
    pub fn not_after_ms(&self) -> u64 {
        self.not_after_ms
    }
}

/// What a certificate presented to this node says about an adopted node: its Ed25519 key and the IP it names.
pub fn adopted_identity(der: &[u8]) -> Result<(PeerKey, IpAddr), String> {
    let (_, certificate) = X509Certificate::from_der(der)
        .map_err(|error| format!("certificate does not parse: {error}"))?;
    let spki = certificate.public_key();
    // id-Ed25519, 1.3.101.112.
    if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
        return Err("the certificate's key is not Ed25519: it is not an adopted node's".into());
    }
    let peer: PeerKey = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| "the Ed25519 key is not 32 bytes".to_string())?;
    let ip = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|names| {
            names
                .value
                .general_names
                .iter()
                .find_map(|name| match name {
                    x509_parser::extensions::GeneralName::IPAddress(bytes) => match bytes.len() {
                        4 => Some(IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?)),
                        16 => Some(IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?)),
                        _ => None,
                    },
                    _ => None,
                })
        })
        .ok_or_else(|| "the certificate names no IP address".to_string())?;
    Ok((peer, ip))
}

/// Renews the certificate of the caller that presented `der`: only for an adopted node that is a member now
/// (its certificate's key is a current member's own key), for the same key and IP. The new certificate is
/// recorded through Raft before it is handed out, so a retirement revokes it too.
pub async fn renew(
    replica: &Replica,
    material: &IssuerMaterial,
    validity: Duration,
    der: &[u8],
) -> Result<IssuedCertificate, crate::error::ServiceError> {
    use crate::error::ServiceError;
    let (peer, ip) = adopted_identity(der).map_err(ServiceError::Precondition)?;
    let node_id = replica.node_id().ok_or(ServiceError::NotInCluster)?;
    let peer_text = vesper_proto::PeerId::from_public_key_bytes(&peer)
        .map(|peer| peer.to_string())
        .map_err(|_| {
            ServiceError::Precondition("the certificate's key is not a peer key".into())
        })?;
    let member = replica.members()?.into_iter().any(|member| {
        member.peer_id == peer_text && member.role != vesper_proto::v1::MemberRole::Removed as i32
    });
    if !member {
        return Err(ServiceError::Precondition(format!(
            "{peer_text} is not a member whose certificate this cluster issued; nothing to renew"
        )));
    }
    if now_ms() >= material.not_after_ms() {
        return Err(ServiceError::Precondition(
            "this node's certificate issuer has expired".into(),
        ));
    }
    let issued = material
        .sign(node_id, &peer, ip, validity)
        .map_err(|error| ServiceError::Internal(error.to_string()))?;
    replica
        .propose_accepted(
            crate::command::RecordIssued {
                peer,
                fingerprint: issued.fingerprint,
                not_after_ms: issued.not_after_ms,
            }
            .into(),
        )
        .await?;
    tracing::info!(
        peer = %peer_text,
        fingerprint = %data_encoding::HEXLOWER.encode(&issued.fingerprint[..8]),
        "renewed the certificate of an adopted node"
    );
    Ok(issued)
}

/// Paths of the issuer material (`placement.issuer_cert` / `placement.issuer_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What stops an issuer from signing for `adoption` now, if anything; the adoption's candidate must be
/// granted and eligible, and its address an IP.
pub fn refusal(
    adoption: &Adoption,
    eligible: bool,
    granted: bool,
    now_ms: u64,
) -> Result<IpAddr, String> {
    if adoption.issued.is_some() {
        return Err("it has its certificate".into());
    }
    if now_ms >= adoption.deadline_ms {
        return Err("the adoption is past its deadline".into());
    }
    if !granted {
        return Err("the candidate is not granted eligibility".into());
    }
    if !eligible {
        return Err("the candidate's entry is not eligible".into());
    }
    adoption
        .cluster_addr
        .parse::<SocketAddr>()
        .map(|address| address.ip())
        .map_err(|_| format!("{:?} is not an IP address and port", adoption.cluster_addr))
}

/// Runs the issuer of this node until shutdown: keeps its replicated "holds an issuer" entry true, and signs
/// for the adoption that waits for a certificate.
pub async fn run(
    replica: Replica,
    material: std::sync::Arc<IssuerMaterial>,
    validity: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The adoption this node last signed for (by its start), so a certificate is signed once per adoption.
    let mut signed: Option<(PeerKey, u64)> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(node_id) = replica.node_id() else {
            continue;
        };
        let db = replica.reader().db();
        let held = now_ms() < material.not_after_ms();
        let wanted = held.then_some(material.not_after_ms());
        match read_issuers(db) {
            Ok(issuers) if issuers.get(&node_id).copied() != wanted => {
                let op = NodeIssuer {
                    node_id,
                    not_after_ms: wanted,
                };
                if let Err(error) = replica.propose(op.into()).await {
                    tracing::debug!(%error, "issuer report not committed; trying again");
                }
                continue;
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot read the issuers");
                continue;
            }
        }
        if !held {
            continue;
        }
        let adoption = match read_adoption(db) {
            Ok(Some(adoption)) => adoption,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, "cannot read the adoption");
                continue;
            }
        };
        if signed == Some((adoption.peer, adoption.started_ms)) || adoption.issued.is_some() {
            continue;
        }
        let eligible = read_candidate(db, &adoption.peer)
            .ok()
            .flatten()
            .is_some_and(|entry| entry.eligible);
        let granted = is_granted(db, &adoption.peer).unwrap_or(false);
        let ip = match refusal(&adoption, eligible, granted, now_ms()) {
            Ok(ip) => ip,
            Err(why) => {
                tracing::debug!(%why, "not signing for the adoption");
                continue;
            }
        };
        let issued = match material.sign(node_id, &adoption.peer, ip, validity) {
            Ok(issued) => issued,
            Err(error) => {
                tracing::warn!(%error, "cannot sign the adopted node's certificate");
                continue;
            }
        };
        let fingerprint = data_encoding::HEXLOWER.encode(&issued.fingerprint[..8]);
        let op = IssueCertificate {
            peer: adoption.peer,
            started_ms: adoption.started_ms,
            issued,
        };
        match replica.propose(op.into()).await {
            Ok(_) => {
                signed = Some((adoption.peer, adoption.started_ms));
                tracing::info!(%fingerprint, %ip, "signed the certificate of an adopted node");
            }
            Err(error) => tracing::debug!(%error, "certificate not handed in; trying again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adoption() -> Adoption {
        Adoption {
            peer: [7; 32],
            started_ms: 1_000,
            deadline_ms: 10_000,
            leader: 1,
            term: 2,
            cluster_addr: "10.0.0.5:7401".into(),
            leaf_addr: "10.0.0.5:7400".into(),
            admin_addr: "10.0.0.5:7402".into(),
            issued: None,
        }
    }

    #[test]
    fn an_issuer_signs_only_for_a_granted_eligible_candidate_in_time_at_an_ip() {
        let a = adoption();
        assert_eq!(
            refusal(&a, true, true, 2_000),
            Ok("10.0.0.5".parse().unwrap())
        );
        assert!(refusal(&a, true, false, 2_000)
            .unwrap_err()
            .contains("not granted"));
        assert!(refusal(&a, false, true, 2_000)
            .unwrap_err()
            .contains("not eligible"));
        assert!(refusal(&a, true, true, 10_000)
            .unwrap_err()
            .contains("deadline"));
        let named = Adoption {
            cluster_addr: "node.example:7401".into(),
            ..adoption()
        };
        assert!(refusal(&named, true, true, 2_000)
            .unwrap_err()
            .contains("not an IP"));
        let done = Adoption {
            issued: Some(IssuedCertificate {
                by_node: 1,
                chain_pem: String::new(),
                fingerprint: [0; 32],
                not_after_ms: 0,
            }),
            ..adoption()
        };
        assert!(refusal(&done, true, true, 2_000).is_err());
    }
}
