//! This leaf's key file: loading (created on first use), and the commands that need no cluster (`keygen`,
//! `id`).

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::json;
use vesper_leafpeer::Keypair;

use crate::error::CliError;
use crate::output::Output;

/// The key in `path`, created (and said so on stderr) when the file does not exist yet.
pub fn load_key(path: &Path) -> anyhow::Result<Keypair> {
    let existed = path.exists();
    let key =
        Keypair::load_or_generate(path).with_context(|| format!("key file {}", path.display()))?;
    if !existed {
        eprintln!(
            "leafpeer: created a new key in {} ({})",
            path.display(),
            key.peer_id()
        );
    }
    Ok(key)
}

/// `keygen`: a new key in `key_path`, which must not exist yet.
pub fn keygen(out: Output, key_path: &Path) -> anyhow::Result<()> {
    if key_path.exists() {
        bail!(CliError::Usage(format!(
            "{} already exists; it is never overwritten (pass --key for another file)",
            key_path.display()
        )));
    }
    let key = Keypair::generate();
    key.save(key_path)
        .with_context(|| format!("cannot write {}", key_path.display()))?;
    out.print(
        json!({ "peer_id": key.peer_id().to_string(), "key": key_path }),
        || format!("{} (key {})", key.peer_id(), key_path.display()),
    );
    Ok(())
}

/// `id`: this leaf's PeerId (creating the key if need be).
pub fn id(out: Output, key_path: &Path) -> anyhow::Result<()> {
    let key = load_key(key_path)?;
    out.print(json!({ "peer_id": key.peer_id().to_string() }), || {
        key.peer_id().to_string()
    });
    Ok(())
}
