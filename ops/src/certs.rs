//! Certificate authority and certificates for a Vesper cluster (rcgen, ECDSA P-256).
//!
//! Layout of a CA folder: `ca.pem` (certificate) and `ca.key` (private key, mode 0600). An issued certificate is
//! `NAME.pem` + `NAME.key`. Super peer certificates serve and dial (server and client auth); operator
//! certificates only dial (client auth). The role is written in the subject's organizational unit, where issue
//! #6's role checks will read it.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// A super peer: serves every port and dials other super peers.
    Superpeer,
    /// An operator: calls the Admin service.
    Operator,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Superpeer => "superpeer",
            Role::Operator => "operator",
        })
    }
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Creates a new CA in `dir`. Refuses to overwrite an existing one.
pub fn init_ca(dir: &Path) -> anyhow::Result<PathBuf> {
    let cert_path = dir.join("ca.pem");
    if cert_path.exists() {
        bail!(
            "{} already exists; a CA is never overwritten (remove the folder to start over)",
            cert_path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Vesper cluster CA");
    name.push(DnType::OrganizationName, "Vesper");
    params.distinguished_name = name;
    let cert = params.self_signed(&key).context("cannot sign the CA")?;
    write_private(&dir.join("ca.key"), &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    Ok(cert_path)
}

/// Issues a certificate named `name` for `role`, valid for the DNS names and IPs in `sans`, into `out_dir`.
/// Returns the paths of the certificate and key.
pub fn issue(
    ca_dir: &Path,
    role: Role,
    name: &str,
    sans: &[String],
    out_dir: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("certificate name {name:?} must be non-empty and use only letters, digits, '-', '_' and '.'");
    }
    let ca_cert_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca.key");
    let ca_pem = std::fs::read_to_string(&ca_cert_path).with_context(|| {
        format!(
            "cannot read {} (create a CA first: vesperctl ca init --dir {})",
            ca_cert_path.display(),
            ca_dir.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(&ca_key_path)
            .with_context(|| format!("cannot read {}", ca_key_path.display()))?,
    )
    .with_context(|| format!("{} is not a private key", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("{} is not a CA certificate", ca_cert_path.display()))?;

    let mut params = CertificateParams::new(sans.to_vec())
        .with_context(|| format!("invalid subject alternative names {sans:?}"))?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, name);
    subject.push(DnType::OrganizationalUnitName, role.to_string());
    params.distinguished_name = subject;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match role {
        Role::Superpeer => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let key = KeyPair::generate()?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the certificate")?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_certificates_are_written_and_ca_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("vesper-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init_ca(&dir).unwrap();
        assert!(init_ca(&dir).is_err());
        let (cert, key) = issue(
            &dir,
            Role::Superpeer,
            "sp1",
            &["localhost".into(), "127.0.0.1".into()],
            &dir,
        )
        .unwrap();
        assert!(std::fs::read_to_string(cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
        assert!(std::fs::read_to_string(key)
            .unwrap()
            .contains("PRIVATE KEY"));
        assert!(issue(&dir, Role::Operator, "bad name", &[], &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
