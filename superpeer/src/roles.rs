//! Who may call which internal service, by the role in the client certificate.
//!
//! Certificates from `vesperctl cert issue` carry their role in the subject's organizational unit:
//! `superpeer` or `operator`. The Cluster port (Raft, forwarding, joining) takes super peer certificates only;
//! the Admin port takes operator certificates, and super peer certificates too, because a follower forwards
//! admin calls to the leader with its own certificate. The TLS layer has already checked that the certificate
//! chains to the cluster CA; this adds what the certificate may do.

use tonic::{Request, Status};
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

/// Checks that the caller's certificate carries one of `allowed`.
pub fn require<T>(request: &Request<T>, allowed: &[Role]) -> Result<(), Status> {
    let certificates = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let Some(leaf) = certificates.first() else {
        return Err(Status::unauthenticated("a client certificate is required"));
    };
    let roles = roles_of(leaf.as_ref());
    if allowed
        .iter()
        .any(|role| roles.iter().any(|held| held == role.name()))
    {
        Ok(())
    } else {
        let wanted: Vec<&str> = allowed.iter().map(|role| role.name()).collect();
        Err(Status::permission_denied(format!(
            "this port takes certificates of role {} (the certificate has {:?})",
            wanted.join(" or "),
            roles
        )))
    }
}

/// An interceptor for the Cluster service: super peers only.
pub fn cluster_only(request: Request<()>) -> Result<Request<()>, Status> {
    require(&request, &[Role::Superpeer])?;
    Ok(request)
}

/// An interceptor for the Admin service: operators, and super peers forwarding an operator's call.
pub fn admin_only(request: Request<()>) -> Result<Request<()>, Status> {
    require(&request, &[Role::Operator, Role::Superpeer])?;
    Ok(request)
}
