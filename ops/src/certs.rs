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
/// How long an issued certificate is valid when no other validity is asked for.
pub const DEFAULT_VALID_DAYS: u32 = 365;
/// The longest validity `cert issue` gives (ten years).
pub const MAX_VALID_DAYS: u32 = 3650;

/// When an issued certificate stops being valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// This many days from now (1 to [`MAX_VALID_DAYS`]).
    Days(u32),
    /// The end of this UTC date (year, month, day); may be in the past, which makes an expired certificate (for
    /// testing that expired certificates are refused).
    Until(i32, u8, u8),
}

impl Validity {
    /// Parses `YYYY-MM-DD`.
    pub fn parse_date(text: &str) -> anyhow::Result<Self> {
        let parts: Vec<&str> = text.split('-').collect();
        let [year, month, day] = parts.as_slice() else {
            bail!("date {text:?} is not YYYY-MM-DD");
        };
        let (Ok(year), Ok(month), Ok(day)) =
            (year.parse::<i32>(), month.parse::<u8>(), day.parse::<u8>())
        else {
            bail!("date {text:?} is not YYYY-MM-DD");
        };
        if !(1970..=9999).contains(&year)
            || time::Date::from_calendar_date(year, time::Month::try_from(month)?, day).is_err()
        {
            bail!("date {text:?} is not a calendar date between 1970 and 9999");
        }
        Ok(Validity::Until(year, month, day))
    }

    fn not_after(self) -> anyhow::Result<time::OffsetDateTime> {
        match self {
            Validity::Days(days) => {
                if !(1..=MAX_VALID_DAYS).contains(&days) {
                    bail!("--valid-days must be between 1 and {MAX_VALID_DAYS} (got {days})");
                }
                Ok(time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(days)))
            }
            Validity::Until(year, month, day) => {
                let date =
                    time::Date::from_calendar_date(year, time::Month::try_from(month)?, day)?;
                Ok(date.with_hms(23, 59, 59)?.assume_utc())
            }
        }
    }
}

/// What `issue` made.
#[derive(Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SHA-256 of the certificate's DER, hex: how `cert revoke` names it.
    pub fingerprint: String,
    pub not_after: time::OffsetDateTime,
}

/// SHA-256 of the first certificate in a PEM file, hex.
pub fn fingerprint_of(pem_path: &Path) -> anyhow::Result<String> {
    let pem =
        std::fs::read(pem_path).with_context(|| format!("cannot read {}", pem_path.display()))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .with_context(|| format!("{} holds no certificate", pem_path.display()))?
        .with_context(|| format!("{} holds a broken certificate", pem_path.display()))?;
    Ok(fingerprint(der.as_ref()))
}

fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(der))
}

/// The CA in `ca_dir`, ready to sign.
fn load_ca(ca_dir: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
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
    Ok(issuer)
}

/// Checks a certificate name: the file names are made from it.
fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("certificate name {name:?} must be non-empty and use only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// Default validity of an issuer: short, since core super peers hold its key online.
pub const DEFAULT_ISSUER_DAYS: u32 = 90;

/// Creates an intermediate issuer `NAME.pem` + `NAME.key` in `out_dir`, signed by the CA in `ca_dir`: a CA
/// certificate that may sign end certificates only (path length 0). Core super peers hold it
/// (`placement.issuer_cert`, `placement.issuer_key`) to sign the certificates of nodes the placement
/// controller adopts.
pub fn issue_issuer(
    ca_dir: &Path,
    name: &str,
    out_dir: &Path,
    validity: Validity,
) -> anyhow::Result<Issued> {
    check_name(name)?;
    let issuer = load_ca(ca_dir)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, name);
    subject.push(DnType::OrganizationalUnitName, "issuer");
    params.distinguished_name = subject;
    let not_after = validity.not_after()?;
    params.not_before = (time::OffsetDateTime::now_utc() - time::Duration::hours(1))
        .min(not_after - time::Duration::days(1));
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    if out_dir.join(format!("{name}.pem")).exists() {
        bail!(
            "{} already exists; pick another --name or remove it",
            out_dir.join(format!("{name}.pem")).display()
        );
    }
    sign_and_write(&params, &issuer, name, out_dir, not_after)
}

/// Signs `params` with `issuer` for a new key, and writes `NAME.pem` and `NAME.key` (mode 0600) into `out_dir`.
fn sign_and_write(
    params: &CertificateParams,
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    out_dir: &Path,
    not_after: time::OffsetDateTime,
) -> anyhow::Result<Issued> {
    let key = KeyPair::generate()?;
    let cert = params
        .signed_by(&key, issuer)
        .context("cannot sign the certificate")?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        fingerprint: fingerprint(cert.der()),
        not_after,
    })
}

pub fn issue(
    ca_dir: &Path,
    role: Role,
    name: &str,
    sans: &[String],
    out_dir: &Path,
    validity: Validity,
) -> anyhow::Result<Issued> {
    check_name(name)?;
    let issuer = load_ca(ca_dir)?;

    let mut params = CertificateParams::new(sans.to_vec())
        .with_context(|| format!("invalid subject alternative names {sans:?}"))?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, name);
    subject.push(DnType::OrganizationalUnitName, role.to_string());
    params.distinguished_name = subject;
    let not_after = validity.not_after()?;
    // Valid from an hour ago (clocks of the cluster disagree a little), or from a day before an end in the past.
    params.not_before = (time::OffsetDateTime::now_utc() - time::Duration::hours(1))
        .min(not_after - time::Duration::days(1));
    params.not_after = not_after;
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
    sign_and_write(&params, &issuer, name, out_dir, not_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_parsed_strictly() {
        assert_eq!(
            Validity::parse_date("2020-01-01").unwrap(),
            Validity::Until(2020, 1, 1)
        );
        for bad in [
            "2020-13-01",
            "2020-02-30",
            "20-01-01x",
            "2020/01/01",
            "",
            "1969-12-31",
        ] {
            assert!(Validity::parse_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ca_and_certificates_are_written_and_ca_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("vesper-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init_ca(&dir).unwrap();
        assert!(init_ca(&dir).is_err());
        let issued = issue(
            &dir,
            Role::Superpeer,
            "sp1",
            &["localhost".into(), "127.0.0.1".into()],
            &dir,
            Validity::Days(DEFAULT_VALID_DAYS),
        )
        .unwrap();
        assert!(std::fs::read_to_string(&issued.cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
        assert!(std::fs::read_to_string(&issued.key)
            .unwrap()
            .contains("PRIVATE KEY"));
        // The printed fingerprint is the one `cert revoke` computes from the file.
        assert_eq!(fingerprint_of(&issued.cert).unwrap(), issued.fingerprint);
        assert_eq!(issued.fingerprint.len(), 64);
        let days = (issued.not_after - time::OffsetDateTime::now_utc()).whole_days();
        assert!((364..=365).contains(&days), "{days}");
        let valid = Validity::Days(DEFAULT_VALID_DAYS);
        assert!(issue(&dir, Role::Operator, "bad name", &[], &dir, valid).is_err());
        for days in [0, MAX_VALID_DAYS + 1] {
            let error = issue(&dir, Role::Operator, "op", &[], &dir, Validity::Days(days))
                .unwrap_err()
                .to_string();
            assert!(error.contains("--valid-days"), "{error}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
