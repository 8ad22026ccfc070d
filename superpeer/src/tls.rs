//! TLS material of a super peer, loaded once at start.
//!
//! Every port is TLS (rustls through tonic). The Leaf port authenticates only the server (leaves prove who they
//! are with their session signature); the Cluster and Admin ports also require a client certificate issued by the
//! cluster CA (mutual TLS).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Time a client gets to finish the TLS handshake before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Paths of the PEM files a super peer needs.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct TlsPaths {
    /// CA certificate that signs every super peer and operator certificate.
    pub ca_cert: PathBuf,
    /// This node's certificate (server and client use), signed by the CA.
    pub cert: PathBuf,
    /// Private key of `cert`.
    pub key: PathBuf,
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM block")]
    NotPem { what: &'static str, path: PathBuf },
}

/// Loaded TLS material.
#[derive(Clone)]
pub struct TlsMaterial {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN") {
        return Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

impl TlsMaterial {
    /// Reads the CA certificate, certificate and key.
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        Ok(Self {
            ca_pem: read_pem("CA certificate", &paths.ca_cert)?,
            cert_pem: read_pem("certificate", &paths.cert)?,
            key_pem: read_pem("private key", &paths.key)?,
        })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }

    /// Server config for the public Leaf port: server authentication only.
    pub fn leaf_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .timeout(TLS_HANDSHAKE_TIMEOUT)
    }

    /// Server config for the Cluster and Admin ports: clients must present a certificate from the cluster CA.
    pub fn mutual_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(self.ca())
            .timeout(TLS_HANDSHAKE_TIMEOUT)
    }

    /// Client config for calls to other super peers: verifies them against the CA and presents our certificate.
    pub fn cluster_client(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
            .domain_name(host)
            .timeout(TLS_HANDSHAKE_TIMEOUT)
    }
}

/// The host part of a `host:port` address (brackets of an IPv6 literal removed), used as the TLS server name.
pub fn host_of(address: &str) -> &str {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _port)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("127.0.0.1:7400"), "127.0.0.1");
        assert_eq!(host_of("sp-0.vesper:7401"), "sp-0.vesper");
        assert_eq!(host_of("[::1]:7401"), "::1");
    }

    #[test]
    fn missing_files_name_the_path() {
        let paths = TlsPaths {
            ca_cert: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
        };
        let error = TlsMaterial::load(&paths)
            .err()
            .expect("must fail")
            .to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }
}
