//! Raw TLS and TCP clients: which certificate a port serves to a new handshake, and connections that never
//! finish one (for the handshake flood test).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};

/// The DER of the first certificate in a PEM file.
pub fn pem_der(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let first = rustls_pemfile::certs(&mut &pem[..])
        .next()
        .context("no certificate in the PEM file")??;
    Ok(first.to_vec())
}

/// A TLS connection (ALPN h2, trusting `ca_pem`, presenting no certificate) to `address`, from `source` when
/// given, as a leaf would open it.
pub async fn tls_connect(
    address: SocketAddr,
    ca_pem: &[u8],
    source: Option<IpAddr>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(certificate?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = match source {
        Some(source) => connect_from(source, address).await?,
        None => TcpStream::connect(address).await?,
    };
    let name = ServerName::IpAddress(address.ip().into());
    Ok(connector.connect(name, stream).await?)
}

/// Makes a new TLS handshake with `address` (trusting `ca_pem`, presenting no certificate) and returns the
/// DER of the certificate the server presented.
pub async fn served_certificate(address: SocketAddr, ca_pem: &[u8]) -> anyhow::Result<Vec<u8>> {
    let tls = tls_connect(address, ca_pem, None).await?;
    let (_, session) = tls.get_ref();
    let served: &CertificateDer<'_> = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .context("the server presented no certificate")?;
    Ok(served.to_vec())
}

/// A TCP connection to `address` from `source` (any port), e.g. 127.0.0.3 to look like another host.
pub async fn connect_from(source: IpAddr, address: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(address).await
}
