//! Record commands: `put`, `get`, `list`, `delete`, `search` on the cluster's index.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use vesper_leafpeer::{Consistency, Record};

use crate::args::{terms, Command};
use crate::error::CliError;
use crate::output::{record_json, Attached};

/// Runs one of this module's commands.
pub async fn run(at: &Attached<'_>, command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Put {
            namespace,
            record_key: key,
            value,
            value_file,
            attributes,
            expect_version,
        } => {
            let bytes = value_bytes(value, value_file)?;
            let attributes = attributes.iter().cloned().collect();
            put(at, namespace, key, attributes, bytes, *expect_version).await
        }
        Command::Get {
            namespace,
            record_key: key,
            stale,
        } => get(at, namespace, key, *stale).await,
        Command::List {
            namespace,
            prefix,
            limit,
        } => list(at, namespace, prefix, *limit).await,
        Command::Delete {
            namespace,
            record_key: key,
            expect_version,
        } => delete(at, namespace, key, *expect_version).await,
        Command::Search {
            namespace,
            equals,
            prefixes,
            limit,
        } => search(at, namespace, equals, prefixes, *limit).await,
        other => unreachable!("not a records command: {other:?}"),
    }
}

/// The value of a put: `--value` as text, else the `--value-file`'s bytes, else empty.
fn value_bytes(value: &Option<String>, value_file: &Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
    Ok(match (value, value_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        (None, None) => Vec::new(),
    })
}

async fn put(
    at: &Attached<'_>,
    namespace: &str,
    key: &str,
    attributes: HashMap<String, String>,
    bytes: Vec<u8>,
    expect_version: Option<u64>,
) -> anyhow::Result<()> {
    let record = at
        .leaf
        .put(namespace, key, attributes, bytes, expect_version)
        .await?;
    at.out.print(record_json(&record), || {
        format!(
            "{}/{} version {}",
            record.namespace, record.key, record.version
        )
    });
    Ok(())
}

async fn get(at: &Attached<'_>, namespace: &str, key: &str, stale: bool) -> anyhow::Result<()> {
    let consistency = if stale {
        Consistency::Stale
    } else {
        Consistency::Linearizable
    };
    match at.leaf.get(namespace, key, consistency).await? {
        Some(record) => at.out.print(record_json(&record), || {
            String::from_utf8_lossy(&record.value).into_owned()
        }),
        None => bail!(CliError::NotFound(format!(
            "{namespace}/{key} does not exist"
        ))),
    }
    Ok(())
}

async fn list(at: &Attached<'_>, namespace: &str, prefix: &str, limit: u32) -> anyhow::Result<()> {
    let page = at
        .leaf
        .list(namespace, prefix, limit, None, Consistency::Linearizable)
        .await?;
    at.out.print(records_json(&page.records), || {
        page.records
            .iter()
            .map(|record| {
                format!(
                    "{} v{} {}",
                    record.key,
                    record.version,
                    String::from_utf8_lossy(&record.value)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

async fn delete(
    at: &Attached<'_>,
    namespace: &str,
    key: &str,
    expect_version: Option<u64>,
) -> anyhow::Result<()> {
    let deleted = at.leaf.delete(namespace, key, expect_version).await?;
    at.out.print(json!({ "deleted": deleted }), || {
        if deleted {
            format!("deleted {namespace}/{key}")
        } else {
            format!("{namespace}/{key} did not exist")
        }
    });
    Ok(())
}

async fn search(
    at: &Attached<'_>,
    namespace: &str,
    equals: &[(String, String)],
    prefixes: &[(String, String)],
    limit: u32,
) -> anyhow::Result<()> {
    let page = at
        .leaf
        .search(
            namespace,
            &terms(equals, prefixes),
            limit,
            None,
            Consistency::Linearizable,
        )
        .await?;
    at.out.print(records_json(&page.records), || {
        page.records
            .iter()
            .map(|record| record.key.clone())
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// A page of records for scripts.
fn records_json(records: &[Record]) -> Value {
    Value::Array(records.iter().map(record_json).collect())
}
