//! Who may call which internal service, by the role in the client certificate.
//!
//! Certificates from `vesperctl cert issue` carry their role in the subject's organizational unit:
//! `superpeer` or `operator`. The Cluster port (Raft, forwarding, joining) takes super peer certificates only;
//! the Admin port takes operator certificates only (a follower forwards an operator's membership call to the
//! leader over the Cluster port, not the leader's Admin port). The TLS layer has already checked that the certificate
//! chains to the cluster CA (and is within its validity); this adds what the certificate may do, and refuses
//! certificates an operator revoked (`vesperctl cert revoke`, committed through Raft). On the Cluster port it also
//! refuses calls whose protocol range does not meet this build's (`vesper_proto::version`).

use tonic::{Request, Status};

use crate::error::ServiceError;
use crate::store::state_machine::StateReader;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A certificate role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Superpeer,
    Operator,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Superpeer => "superpeer",
            Role::Operator => "operator",
        }
    }
}

/// The roles named in a DER certificate's subject organizational units.
fn roles_of(der: &[u8]) -> Vec<String> {
    let Ok((_, certificate)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    certificate
        .subject()
        .iter_organizational_unit()
        .filter_map(|unit| unit.as_str().ok().map(str::to_string))
        .collect()
}

/// SHA-256 of a certificate's DER: how revocations name certificates.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(der).into()
}

/// Checks that the caller's certificate carries one of `allowed`.
fn require<T>(request: &Request<T>, allowed: &[Role]) -> Result<(), Status> {
    let leaf = client_certificate(request)?;
    let roles = roles_of(leaf.as_ref());
    if allowed
        .iter()
        .any(|role| roles.iter().any(|held| held == role.name()))
    {
        Ok(())
    } else {
        let wanted: Vec<&str> = allowed.iter().map(|role| role.name()).collect();
        Err(ServiceError::PermissionDenied(format!(
            "this port takes certificates of role {} (the certificate has {:?})",
            wanted.join(" or "),
            roles
        ))
        .into())
    }
}

fn client_certificate<T>(
    request: &Request<T>,
) -> Result<tonic::transport::CertificateDer<'static>, Status> {
    request
        .peer_certs()
        .and_then(|certificates| certificates.first().cloned())
        .ok_or_else(|| {
            ServiceError::Unauthenticated("a client certificate is required".into()).into()
        })
}

/// The fingerprint of the caller's certificate.
pub fn caller_fingerprint<T>(request: &Request<T>) -> Result<[u8; 32], Status> {
    Ok(fingerprint(client_certificate(request)?.as_ref()))
}

/// Refuses a caller whose certificate, or any certificate of the chain it sent (an intermediate issuer of
/// adopted nodes), was revoked (as far as this node has applied the log).
fn require_not_revoked<T>(request: &Request<T>, reader: &StateReader) -> Result<(), Status> {
    require_unrevoked(reader, &caller_fingerprint(request)?)?;
    for certificate in request
        .peer_certs()
        .iter()
        .flat_map(|chain| chain.iter().skip(1))
    {
        require_unrevoked(reader, &fingerprint(certificate.as_ref()))?;
    }
    Ok(())
}

/// Refuses the certificate with `fingerprint` if it was revoked. Long-lived streams call this for every message
/// they carry, since the gate only sees the call that opened them.
pub fn require_unrevoked(reader: &StateReader, fingerprint: &[u8; 32]) -> Result<(), Status> {
    match reader.is_revoked(fingerprint) {
        Ok(false) => Ok(()),
        Ok(true) => Err(ServiceError::PermissionDenied(format!(
            "certificate {} has been revoked",
            data_encoding::HEXLOWER.encode(fingerprint)
        ))
        .into()),
        // Fail closed: a node that cannot read its revocations does not know who is allowed.
        Err(error) => {
            Err(ServiceError::Unavailable(format!("cannot check revocations: {error}")).into())
        }
    }
}

/// The gate in front of an internal service: a certificate of one of `allowed`, not revoked. Checked on every
/// call, so a revocation also cuts off connections opened before it.
#[derive(Clone)]
pub struct Gate {
    reader: StateReader,
    allowed: &'static [Role],
    /// Calls must carry the caller's protocol range (members stamp every Cluster call; operators' tools do not
    /// speak the Cluster protocol).
    stamped: bool,
}

impl Gate {
    /// The Cluster service: super peers only.
    pub fn cluster(reader: StateReader) -> Self {
        Self {
            reader,
            allowed: &[Role::Superpeer],
            stamped: true,
        }
    }

    /// The Admin service: operators only.
    pub fn admin(reader: StateReader) -> Self {
        Self {
            reader,
            allowed: &[Role::Operator],
            stamped: false,
        }
    }
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        require(&request, self.allowed)?;
        require_not_revoked(&request, &self.reader)?;
        if self.stamped {
            vesper_proto::version::check_cluster_stamp(request.metadata())
                .map_err(ServiceError::Incompatible)?;
        }
        Ok(request)
    }
}
