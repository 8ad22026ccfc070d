//! A throwaway PKI for tests, made with the real `vesperctl ca init` and `vesperctl cert issue`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context};

/// CA and certificates in a folder.
pub struct Pki {
    pub dir: PathBuf,
}

fn vesperctl(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(crate::binary("vesperctl"))
        .args(args)
        .output()
        .context("run vesperctl")?;
    ensure!(
        output.status.success(),
        "vesperctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

impl Pki {
    /// Creates the CA, one super peer certificate for localhost/127.0.0.1 and an operator certificate.
    pub fn create(dir: &Path) -> anyhow::Result<Pki> {
        Pki::create_with_sans(dir, &[])
    }

    /// As [`Pki::create`], with more names or IPs in the super peer certificate.
    pub fn create_with_sans(dir: &Path, extra_sans: &[String]) -> anyhow::Result<Pki> {
        let dir = dir.to_path_buf();
        let ca = dir.join("ca");
        let certs = dir.join("certs");
        let (ca, certs) = (ca.to_str().unwrap(), certs.to_str().unwrap());
        vesperctl(&["ca", "init", "--dir", ca])?;
        let mut args = vec![
            "cert",
            "issue",
            "--ca-dir",
            ca,
            "--role",
            "superpeer",
            "--name",
            "superpeer",
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
            "--out",
            certs,
        ];
        for san in extra_sans {
            args.extend(["--san", san.as_str()]);
        }
        vesperctl(&args)?;
        vesperctl(&[
            "cert", "issue", "--ca-dir", ca, "--role", "operator", "--name", "operator", "--out",
            certs,
        ])?;
        Ok(Pki { dir })
    }

    /// Issues one more certificate `name` of `role` ("superpeer" ones name localhost and 127.0.0.1), with
    /// `extra` flags for `vesperctl cert issue` (e.g. `["--not-after", "2020-01-01"]`).
    pub fn issue(
        &self,
        role: &str,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        let (ca, certs) = (self.dir.join("ca"), self.dir.join("certs"));
        let (ca, certs) = (ca.to_str().unwrap(), certs.to_str().unwrap());
        let mut args = vec![
            "cert", "issue", "--ca-dir", ca, "--role", role, "--name", name, "--out", certs,
        ];
        if role == "superpeer" {
            args.extend(["--san", "localhost", "--san", "127.0.0.1"]);
        }
        args.extend(extra);
        vesperctl(&args)?;
        Ok((
            self.dir.join(format!("certs/{name}.pem")),
            self.dir.join(format!("certs/{name}.key")),
        ))
    }

    /// The intermediate issuer of adopted nodes' certificates (`vesperctl ca issuer`), made on first use.
    pub fn issuer(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let (cert, key) = (
            self.dir.join("issuer/issuer.pem"),
            self.dir.join("issuer/issuer.key"),
        );
        if !cert.exists() {
            let (ca, out) = (self.dir.join("ca"), self.dir.join("issuer"));
            vesperctl(&[
                "ca",
                "issuer",
                "--ca-dir",
                ca.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--valid-days",
                "2",
            ])?;
        }
        Ok((cert, key))
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca/ca.pem")
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_cert()).expect("CA certificate was written")
    }

    pub fn superpeer_cert(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("certs/superpeer.pem"),
            self.dir.join("certs/superpeer.key"),
        )
    }

    pub fn operator_cert(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("certs/operator.pem"),
            self.dir.join("certs/operator.key"),
        )
    }
}
