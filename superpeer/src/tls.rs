//! TLS of a super peer: the material it serves and dials with, reloaded in place when its files change, and
//! the acceptor that runs the handshakes of its three ports.
//!
//! Every port is TLS (rustls). The Leaf port authenticates only the server (leaves prove who they are with their
//! session signature); the Cluster and Admin ports also require a client certificate issued by the cluster CA
//! (mutual TLS).
//!
//! Rotation: [`ServerTls::reload`] re-reads the three PEM files and, when they changed and form a usable set
//! (the key matches the certificate, the CA parses), swaps the configs that new handshakes use. Connections
//! already open keep the session they negotiated, so no request fails; a half-written set (a certificate
//! replaced before its key) is refused with a warning and the previous material stays until the next try.
//! The node calls it every `tls_reload_interval` and on SIGHUP.
//!
//! Handshakes run here rather than in tonic so that they are bounded: each gets `timeout`, and at most
//! `max_pending` run at once (`max_pending_per_ip` from one address). A connection beyond those is closed at
//! once, so a flood of connections that never finish a handshake costs a bounded amount of memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Default time a client gets to finish the TLS handshake before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Paths of the PEM files a super peer needs.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
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
    #[error("{what} not usable: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// Loaded TLS material (PEM bytes).
#[derive(Clone, PartialEq, Eq)]
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

fn invalid(what: &'static str) -> impl Fn(String) -> TlsError {
    move |reason| TlsError::Invalid { what, reason }
}

fn certificates(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(what)(error.to_string()))?;
    if certificates.is_empty() {
        return Err(invalid(what)("no CERTIFICATE block".into()));
    }
    Ok(certificates)
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

    /// Client config for calls to other super peers: verifies them against the CA and presents our certificate.
    pub fn cluster_client(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
            .domain_name(host)
            .timeout(TLS_HANDSHAKE_TIMEOUT)
    }

    /// This node's certificate chain (PEM).
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// SHA-256 of this node's certificate (DER), as `vesperctl cert issue` prints it.
    pub fn fingerprint(&self) -> Result<[u8; 32], TlsError> {
        let chain = certificates("certificate", &self.cert_pem)?;
        Ok(crate::roles::fingerprint(chain[0].as_ref()))
    }

    /// The server configs of the Leaf port and of the mutual-TLS ports. Fails when the key does not match the
    /// certificate or a file does not parse.
    fn server_configs(&self) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates("certificate", &self.cert_pem)?;
        let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &self.key_pem[..])
            .map_err(|error| invalid("private key")(error.to_string()))?
            .ok_or_else(|| invalid("private key")("no PRIVATE KEY block".into()))?;
        let mut roots = RootCertStore::empty();
        for ca in certificates("CA certificate", &self.ca_pem)? {
            roots
                .add(ca)
                .map_err(|error| invalid("CA certificate")(error.to_string()))?;
        }
        let builder = || {
            ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|error| invalid("TLS versions")(error.to_string()))
        };
        let key_mismatch = invalid("certificate and private key");
        let mut leaf = builder()?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|error| key_mismatch(error.to_string()))?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|error| invalid("CA certificate")(error.to_string()))?;
        // Other super peers check our certificate with the same verifier (we are their client on the Cluster
        // port), so one it refuses would be refused by every peer: a certificate of another CA or an expired
        // one is not installed, neither at start nor on a reload.
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|error| {
                invalid("certificate")(format!("not valid under the cluster CA: {error}"))
            })?;
        let mut mutual = builder()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|error| key_mismatch(error.to_string()))?;
        // gRPC runs over HTTP/2 only; tonic's clients insist on negotiating it.
        leaf.alpn_protocols = vec![b"h2".to_vec()];
        mutual.alpn_protocols = vec![b"h2".to_vec()];
        Ok((Arc::new(leaf), Arc::new(mutual)))
    }
}

/// Which server config a port uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The Leaf port: server authentication only.
    Leaf,
    /// The Cluster and Admin ports: client certificates of the cluster CA required.
    Mutual,
}

struct Installed {
    material: TlsMaterial,
    leaf: Arc<ServerConfig>,
    mutual: Arc<ServerConfig>,
}

/// The TLS material a node serves with, swapped in place by [`ServerTls::reload`].
pub struct ServerTls {
    paths: TlsPaths,
    installed: RwLock<Installed>,
}

impl ServerTls {
    /// Reads and checks the files.
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let material = TlsMaterial::load(paths)?;
        let (leaf, mutual) = material.server_configs()?;
        Ok(Self {
            paths: paths.clone(),
            installed: RwLock::new(Installed {
                material,
                leaf,
                mutual,
            }),
        })
    }

    fn installed(&self) -> std::sync::RwLockReadGuard<'_, Installed> {
        self.installed.read().expect("tls lock poisoned")
    }

    /// The config new handshakes on `port` use.
    pub fn config(&self, port: Port) -> Arc<ServerConfig> {
        let installed = self.installed();
        match port {
            Port::Leaf => installed.leaf.clone(),
            Port::Mutual => installed.mutual.clone(),
        }
    }

    /// The path of this node's certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.paths.cert
    }

    /// The material in use (for clients of other super peers).
    pub fn material(&self) -> TlsMaterial {
        self.installed().material.clone()
    }

    /// Re-reads the files. Returns the new material when they changed and were installed, None when they are
    /// unchanged; an error (and the old material stays) when the new files are not a usable set.
    pub fn reload(&self) -> Result<Option<TlsMaterial>, TlsError> {
        let material = TlsMaterial::load(&self.paths)?;
        if material == self.installed().material {
            return Ok(None);
        }
        let (leaf, mutual) = material.server_configs()?;
        *self.installed.write().expect("tls lock poisoned") = Installed {
            material: material.clone(),
            leaf,
            mutual,
        };
        Ok(Some(material))
    }
}

/// Bounds on TLS handshakes of one port.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// Time a client gets to finish its handshake.
    pub timeout: Duration,
    /// Handshakes in progress at once on the port.
    pub max_pending: usize,
    /// Handshakes in progress at once from one IP address.
    pub max_pending_per_ip: usize,
}

/// Connections of one port whose handshake finished, for tonic's `serve_with_incoming_shutdown`.
pub type Incoming = ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>;

/// Completed handshakes waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// Accepts TCP connections on `listener` and runs their TLS handshakes within `limits`, until `shutdown`. The
/// accept loop and every handshake are tasks on `tasks` (a handshake ends within `limits.timeout`).
pub fn accept(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    port: Port,
    limits: HandshakeLimits,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Incoming {
    let (ready, incoming) = mpsc::channel(READY_QUEUE);
    let pending = Arc::new(Semaphore::new(limits.max_pending));
    let per_ip: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let handshakes = tasks.clone();
    tasks.spawn(async move {
        loop {
            let (stream, remote) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, ?port, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::debug!(%remote, ?port, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let Some(slot) = IpSlot::take(&per_ip, remote.ip(), limits.max_pending_per_ip) else {
                tracing::debug!(%remote, ?port, "too many TLS handshakes from this address; connection closed");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config(port));
            let ready = ready.clone();
            handshakes.spawn(async move {
                let outcome = tokio::time::timeout(limits.timeout, acceptor.accept(stream)).await;
                drop((permit, slot));
                match outcome {
                    Ok(Ok(stream)) => {
                        let _ = ready.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%remote, ?port, %error, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(%remote, ?port, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

/// One handshake in progress from an address; the count drops with it.
struct IpSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl IpSlot {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<Self> {
        let mut map = counts.lock().expect("handshake count lock poisoned");
        let count = map.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Self {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().expect("handshake count lock poisoned");
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
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
        let error = ServerTls::load(&paths)
            .err()
            .expect("must fail")
            .to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }
}
