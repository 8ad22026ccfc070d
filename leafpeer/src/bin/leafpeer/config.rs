//! Where a command's settings come from (flags, environment, the config file, the dev cluster's defaults),
//! and attaching the leaf they describe.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use vesper_leafpeer::{Leaf, LeafConfig, LeafError};

use crate::args::{Cli, Command};
use crate::error::CliError;
use crate::identity::load_key;

/// The dev cluster's CA (made by `scripts/up.sh`), used when --ca is not given and it exists.
const DEV_CA: &str = ".vesper/dev/ca/ca.pem";

/// Leaf ports of the local dev cluster (`vesperctl dev up`, `scripts/up.sh`): node i at 7400 + 10(i - 1).
const DEV_SEEDS: [&str; 3] = ["127.0.0.1:7400", "127.0.0.1:7410", "127.0.0.1:7420"];

fn config_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".config/vesper")
}

/// The key file when --key is not given.
pub fn default_key_path() -> PathBuf {
    config_dir().join("leaf.key")
}

/// What a config file may set.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    seeds: Option<Vec<String>>,
    ca: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// Fills what flags and environment left open from the config file.
pub fn apply_config_file(cli: &mut Cli) -> anyhow::Result<()> {
    let (path, required) = match &cli.config {
        Some(path) => (path.clone(), true),
        None => (config_dir().join("leafpeer.toml"), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if !required && error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => bail!(CliError::Usage(format!(
            "cannot read config file {}: {error}",
            path.display()
        ))),
    };
    let file: FileConfig = toml::from_str(&text)
        .map_err(|error| CliError::Usage(format!("config file {}: {error}", path.display())))?;
    if cli.seeds.is_none() {
        cli.seeds = file.seeds;
    }
    if cli.ca.is_none() {
        cli.ca = file.ca;
    }
    if cli.key.is_none() {
        cli.key = file.key;
    }
    Ok(())
}

fn ca_pem(given: &Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
    let path = match given {
        Some(path) => path.clone(),
        None if Path::new(DEV_CA).exists() => PathBuf::from(DEV_CA),
        None => bail!(CliError::Usage(format!(
            "--ca is required (no dev cluster CA at {DEV_CA}; start one with scripts/up.sh or pass the cluster's CA)"
        ))),
    };
    std::fs::read(&path).with_context(|| format!("cannot read CA certificate {}", path.display()))
}

/// Attaches the leaf of the key in `key_path` to the cluster `cli` names.
pub async fn attach(cli: &Cli, key_path: &Path) -> anyhow::Result<Leaf> {
    let keypair = load_key(key_path)?;
    let seeds = cli
        .seeds
        .clone()
        .unwrap_or_else(|| DEV_SEEDS.iter().map(|seed| seed.to_string()).collect());
    let mut config = LeafConfig::new(seeds, ca_pem(&cli.ca)?, keypair);
    // One-shot commands do not measure and publish endpoints in the background; sessions that stay do.
    config.publish_endpoints = matches!(
        cli.command,
        Command::Listen { .. }
            | Command::Chat { .. }
            | Command::Join { .. }
            | Command::Accept { id: None, .. }
            | Command::Serve { .. }
    );
    // Commands that stay to receive (messages, offers) or that change this peer's presence list their session
    // in its presence; the others attach without presence, so they never disturb another session of the same
    // key (a running `listen`, say) and nothing is pushed to them.
    config.claim_presence = matches!(
        cli.command,
        Command::Listen { .. }
            | Command::Chat { .. }
            | Command::Join { .. }
            | Command::Accept { id: None, .. }
            | Command::Status { .. }
            | Command::Nat
            | Command::Serve { .. }
    );
    config.offer_super_peer = crate::serve::offer(&cli.command)?;
    Leaf::connect(config).await.map_err(|error| match error {
        LeafError::Unreachable(_) => anyhow::anyhow!(
            "{error}\n(is a cluster running? scripts/up.sh starts one; --seeds names others)"
        ),
        other => other.into(),
    })
}
