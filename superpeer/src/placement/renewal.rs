//! An adopted node renews its own certificate.
//!
//! A node whose certificate was signed by an issuer (its certificate file holds a chain: the certificate, then
//! the issuer's) asks a member that holds an issuer for a new one once a third of its lifetime is left
//! (`Cluster.RenewCertificate`, over mutual TLS with the certificate it still has), writes it over its
//! certificate file (a new file renamed into place, so a reader never sees half of it), and the TLS reload
//! (`tls_reload_interval`, or SIGHUP) starts presenting it. Nodes with operator-issued certificates (no chain)
//! do nothing here.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::issuer::CLOCK_SLACK;
use crate::raft::network::ClusterClients;
use crate::raft::propose::now_ms;
use crate::replica::Replica;
use crate::store::nodes::read_issuers;
use crate::tls::ServerTls;

/// How often the certificate's remaining validity is looked at (a parse of one certificate).
const CHECK: Duration = Duration::from_secs(1);
/// How long one issuer gets to answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed round, wait this long before asking again.
const RETRY: Duration = Duration::from_secs(5);

/// When a certificate chain is due for renewal: it holds an issuer's certificate after the node's own, and
/// a third or less of its lifetime (not counting the clock slack it starts with) is left at `now_ms`.
pub fn due(chain_pem: &[u8], now_ms: u64) -> bool {
    let chain: Vec<_> = rustls_pemfile::certs(&mut &chain_pem[..])
        .filter_map(Result::ok)
        .collect();
    if chain.len() < 2 {
        return false;
    }
    let Ok((_, certificate)) = X509Certificate::from_der(chain[0].as_ref()) else {
        return false;
    };
    let ms = |seconds: i64| u64::try_from(seconds).unwrap_or(0).saturating_mul(1000);
    let start = ms(certificate.validity().not_before.timestamp())
        .saturating_add(u64::try_from(CLOCK_SLACK.as_millis()).unwrap_or(0));
    let end = ms(certificate.validity().not_after.timestamp());
    let lifetime = end.saturating_sub(start);
    end.saturating_sub(now_ms) <= lifetime / 3
}

/// Keeps this node's issued certificate renewed until shutdown.
pub async fn run(
    replica: Replica,
    tls: Arc<ServerTls>,
    clients: ClusterClients,
    shutdown: CancellationToken,
) {
    loop {
        let mut pause = CHECK;
        if due(tls.material().cert_pem(), now_ms()) {
            match renew_once(&replica, &tls, &clients).await {
                Ok(node) => tracing::info!(
                    issuer = node,
                    "certificate renewed; the TLS reload presents it"
                ),
                Err(error) => {
                    tracing::warn!(%error, "cannot renew this node's certificate yet");
                    pause = RETRY;
                }
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Asks the members holding an issuer in turn; writes the first new certificate. Returns who signed it.
async fn renew_once(
    replica: &Replica,
    tls: &ServerTls,
    clients: &ClusterClients,
) -> Result<u64, String> {
    let now = now_ms();
    let me = replica.node_id();
    let issuers = read_issuers(replica.reader().db()).map_err(|error| error.to_string())?;
    let members = replica.members().map_err(|error| error.to_string())?;
    let mut errors = Vec::new();
    for (node, _) in issuers
        .iter()
        .filter(|(node, until)| **until > now && Some(**node) != me)
    {
        let Some(member) = members.iter().find(|member| member.node_id == *node) else {
            continue;
        };
        let answer = async {
            let mut client = clients
                .peer(&member.cluster_addr)
                .map_err(|error| error.to_string())?;
            tokio::time::timeout(
                CALL_TIMEOUT,
                client.renew_certificate(vesper_proto::v1::RenewCertificateRequest {}),
            )
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map(tonic::Response::into_inner)
            .map_err(|status| status.message().to_string())
        }
        .await;
        match answer {
            Ok(reply) => {
                write_atomically(tls.cert_path(), reply.certificate_chain.as_bytes()).map_err(
                    |error| format!("cannot write {}: {error}", tls.cert_path().display()),
                )?;
                return Ok(*node);
            }
            Err(error) => errors.push(format!("node {node}: {error}")),
        }
    }
    if errors.is_empty() {
        Err("no other member holds a certificate issuer".into())
    } else {
        Err(errors.join("; "))
    }
}

fn write_atomically(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension(format!("renew-{}", std::process::id()));
    std::fs::write(&temporary, contents)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(valid_for: Duration, with_issuer: bool) -> (Vec<u8>, u64) {
        let now = time::OffsetDateTime::now_utc();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        params.not_before = now - time::Duration::try_from(CLOCK_SLACK).unwrap();
        params.not_after = now + time::Duration::try_from(valid_for).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let mut pem = cert.pem();
        if with_issuer {
            pem.push_str(&cert.pem());
        }
        let now_ms = u64::try_from(now.unix_timestamp()).unwrap() * 1000;
        (pem.into_bytes(), now_ms)
    }

    #[test]
    fn an_issued_certificate_is_due_with_a_third_of_its_life_left_and_an_operators_never() {
        let day = Duration::from_secs(86_400);
        let (pem, now) = chain(3 * day, true);
        assert!(!due(&pem, now), "fresh");
        assert!(
            !due(&pem, now + 1_900 * 60 * 1000),
            "about 1.3 days in: more than a third left"
        );
        assert!(
            due(&pem, now + 2 * 86_400_000 + 60_000),
            "just past two thirds"
        );
        assert!(due(&pem, now + 4 * 86_400_000), "expired");
        let (single, now) = chain(3 * day, false);
        assert!(
            !due(&single, now + 4 * 86_400_000),
            "no issuer in the chain"
        );
        assert!(!due(b"not a certificate", now));
    }
}
