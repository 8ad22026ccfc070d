//! Test harnesses for Vesper: real `superpeer` processes on free ports with real TLS, driven through the Admin
//! service, `vesperctl` and the `leafpeer` library.
//!
//! - [`podlab`]: the chart's containers run as processes, each pod in its own network and mount namespace.
//! - [`pki`]: a throwaway CA and certificates made with the real `vesperctl`.
//! - [`chart`]: the Helm chart rendered by a real `helm`, its manifests parsed, a container's argv and env.
//! - [`cluster`]: start, kill, stop and restart super peer processes; wait on observable state.
//! - [`http2`]: HTTP/2 frames written by hand, for clients that break the protocol's rules on purpose.
//! - [`modgraph`]: the module graph of a crate from its sources, and the import circles in it.
//! - [`natlab`]: home networks behind real Linux NATs in network namespaces, for connectivity tests.
//! - [`ops`]: GETs to a node's ops port, `promtool`, and a real Prometheus scraping a cluster.
//! - [`relay`]: a raw client of a super peer's UDP relay (grants and binds by hand).
//! - [`tlsprobe`]: which certificate a port serves, and raw TCP/TLS clients for flood tests.
//! - [`wait`]: polling with a deadline and a message, instead of sleeps.

pub mod chart;
pub mod cli;
pub mod cluster;
pub mod http2;
pub mod load;
pub mod modgraph;
pub mod natlab;
pub mod ops;
pub mod pki;
pub mod podlab;
pub mod raw;
pub mod relay;
pub mod tlsprobe;
pub mod wait;

use std::path::PathBuf;

/// Folder holding the workspace's built binaries (`superpeer`, `vesperctl`). Test executables live in
/// `target/<profile>/deps`, the binaries one level up; `VESPER_BIN_DIR` overrides.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VESPER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current executable path");
    let mut dir = exe.parent().expect("executable has a folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, with a clear message when it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} does not exist: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// Runs a system tool (`ip`, `iptables`, ...) to completion: its stdout, or an error naming the command and
/// what it printed on stderr.
pub fn run_system(program: &str, args: &[&str]) -> anyhow::Result<String> {
    use anyhow::Context;
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (scripts/test.sh installs it)"))?;
    if !output.status.success() {
        anyhow::bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Resident set size of process `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS line in /proc/{pid}/status"))
}
