//! Running the `leafpeer` command line against a test cluster, with `--json`.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::cluster::Cluster;

/// `leafpeer --seeds <every node> --ca <the cluster's CA> --key <key> --json <args>`, with stdin closed; spawn or
/// run it.
pub fn leafpeer_command(cluster: &Cluster, key: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(crate::binary("leafpeer"));
    command
        .arg("--seeds")
        .arg(cluster.leaf_addrs().join(","))
        .arg("--ca")
        .arg(cluster.pki.ca_cert())
        .arg("--key")
        .arg(key)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null());
    command
}

/// Runs `leafpeer` (see [`leafpeer_command`]) to the end.
pub fn leafpeer(cluster: &Cluster, key: &Path, args: &[&str]) -> Output {
    leafpeer_command(cluster, key, args)
        .output()
        .expect("run leafpeer")
}

/// The JSON document a successful command printed; panics with its stderr when it failed.
pub fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "leafpeer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "not JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}
