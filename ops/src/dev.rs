//! `vesperctl dev up`: a local cluster of super peer processes with a throwaway CA, for trying Vesper and for
//! development. Everything lives under one folder (default `.vesper/dev`): the CA, the certificates, each
//! node's data directory and log. Running it again resumes the same cluster with its data.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};
use vesper_proto::v1::{MemberRole, PromoteRequest, StatusRequest};

use crate::admin::{Connection, DEV_DIR};
use crate::certs::{self, Role};

/// How long the cluster gets to come up before `dev up` gives up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, clap::Subcommand)]
pub enum DevCommand {
    /// Start (or resume) a local cluster and keep it running until Ctrl-C.
    Up {
        /// Folder for the CA, certificates, data and logs.
        #[arg(long, default_value = DEV_DIR)]
        dir: PathBuf,
        /// Number of super peers (all voters).
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// First port; node i uses base+10(i-1) (leaf), +1 (cluster), +2 (admin).
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
        /// The superpeer binary. Default: next to vesperctl.
        #[arg(long, env = "VESPER_SUPERPEER_BIN")]
        superpeer: Option<PathBuf>,
    },
}

struct Ports {
    leaf: u16,
    cluster: u16,
    admin: u16,
    ops: u16,
}

fn ports(base: u16, index: u16) -> Ports {
    let first = base + 10 * (index - 1);
    Ports {
        leaf: first,
        cluster: first + 1,
        admin: first + 2,
        ops: first + 3,
    }
}

fn superpeer_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let me = std::env::current_exe().context("cannot find vesperctl's own path")?;
    let sibling = me.with_file_name("superpeer");
    if sibling.exists() {
        Ok(sibling)
    } else {
        bail!(
            "no superpeer binary next to {} (build the workspace, or pass --superpeer)",
            me.display()
        )
    }
}

/// Makes the CA and the certificates the dev cluster needs, keeping any that exist.
/// A dev folder is kept between runs: its certificates get the longest validity.
const DEV_VALIDITY: certs::Validity = certs::Validity::Days(certs::MAX_VALID_DAYS);

fn ensure_certificates(dir: &Path, nodes: u16) -> anyhow::Result<()> {
    let ca_dir = dir.join("ca");
    if !ca_dir.join("ca.pem").exists() {
        certs::init_ca(&ca_dir)?;
        println!("created a throwaway dev CA in {}", ca_dir.display());
    }
    let out = dir.join("certs");
    let sans = ["localhost".to_string(), "127.0.0.1".to_string()];
    for index in 1..=nodes {
        let name = format!("sp{index}");
        if !out.join(format!("{name}.pem")).exists() {
            certs::issue(&ca_dir, Role::Superpeer, &name, &sans, &out, DEV_VALIDITY)?;
        }
    }
    if !out.join("operator.pem").exists() {
        certs::issue(&ca_dir, Role::Operator, "operator", &[], &out, DEV_VALIDITY)?;
    }
    // Every dev node holds the issuer of adopted nodes' certificates, so candidates can be adopted locally.
    if !out.join("issuer.pem").exists() {
        certs::issue_issuer(&ca_dir, "issuer", &out, DEV_VALIDITY)?;
    }
    Ok(())
}

fn start_node(binary: &Path, dir: &Path, index: u16, base_port: u16) -> anyhow::Result<Child> {
    let ports = ports(base_port, index);
    let name = format!("sp{index}");
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut command = Command::new(binary);
    command
        .arg("--data-dir")
        .arg(dir.join(&name))
        .arg("--leaf-listen")
        .arg(format!("127.0.0.1:{}", ports.leaf))
        .arg("--cluster-listen")
        .arg(format!("127.0.0.1:{}", ports.cluster))
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{}", ports.admin))
        .arg("--ops-listen")
        .arg(format!("127.0.0.1:{}", ports.ops))
        .arg("--tls-ca")
        .arg(dir.join("ca/ca.pem"))
        .arg("--tls-cert")
        .arg(dir.join(format!("certs/{name}.pem")))
        .arg("--tls-key")
        .arg(dir.join(format!("certs/{name}.key")))
        .arg("--issuer-cert")
        .arg(dir.join("certs/issuer.pem"))
        .arg("--issuer-key")
        .arg(dir.join("certs/issuer.key"))
        // `dev up` stops every node at once: no member is left to take the leaves, so a short drain does.
        .arg("--drain-timeout")
        .arg("3s")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    if index == 1 {
        command.arg("--bootstrap");
    } else {
        command
            .arg("--join")
            .arg(format!("127.0.0.1:{}", ports_of_first(base_port)));
    }
    command
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))
}

fn ports_of_first(base_port: u16) -> u16 {
    ports(base_port, 1).cluster
}

pub async fn run(command: DevCommand) -> anyhow::Result<()> {
    let DevCommand::Up {
        dir,
        nodes,
        base_port,
        superpeer,
    } = command;
    if nodes == 0 {
        bail!(crate::admin::UsageError(
            "--nodes must be at least 1".into()
        ));
    }
    let binary = superpeer_binary(superpeer)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    ensure_certificates(&dir, nodes)?;
    let mut children = Vec::new();
    for index in 1..=nodes {
        children.push(start_node(&binary, &dir, index, base_port)?);
        let ports = ports(base_port, index);
        println!(
            "started sp{index}: leaf 127.0.0.1:{} cluster 127.0.0.1:{} admin 127.0.0.1:{} ops 127.0.0.1:{} (log {}/sp{index}.log)",
            ports.leaf,
            ports.cluster,
            ports.admin,
            ports.ops,
            dir.display()
        );
    }
    let connection = Connection {
        server: format!("127.0.0.1:{}", ports(base_port, 1).admin),
        ca: Some(dir.join("ca/ca.pem")),
        cert: Some(dir.join("certs/operator.pem")),
        key: Some(dir.join("certs/operator.key")),
        timeout_secs: 30,
        tls_server_name: None,
    };
    let started = Instant::now();
    println!("waiting for {nodes} super peers to form the cluster ...");
    let result = form_cluster(&connection, nodes, &mut children).await;
    if let Err(error) = result {
        stop(children).await;
        return Err(error.context(format!(
            "the cluster did not come up; see the logs in {}",
            dir.display()
        )));
    }
    println!(
        "cluster of {nodes} voters is up after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    crate::admin::status(&connection, false).await?;
    println!();
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("vesperctl"));
    // The defaults of vesperctl and leafpeer find the dev files only in ./.vesper/dev on port 7400; anywhere
    // else the command names them.
    if dir == Path::new(".vesper/dev") && base_port == 7400 {
        println!(
            "operator:  {} status   (run from this folder; uses the dev certificates in {})",
            me.display(),
            dir.display()
        );
    } else {
        println!(
            "operator:  {} --server 127.0.0.1:{} --ca {} --cert {} --key {} status",
            me.display(),
            ports(base_port, 1).admin,
            dir.join("ca/ca.pem").display(),
            dir.join("certs/operator.pem").display(),
            dir.join("certs/operator.key").display()
        );
    }
    println!(
        "leaves:    seeds 127.0.0.1:{}, CA {}",
        ports(base_port, 1).leaf,
        dir.join("ca/ca.pem").display()
    );
    println!(
        "metrics:   http://127.0.0.1:{}/metrics (and /livez, /readyz; each node's ops port, plain HTTP on loopback)",
        ports(base_port, 1).ops
    );
    println!(
        "press Ctrl-C to stop the cluster (data stays in {})",
        dir.display()
    );
    wait_for_signal().await;
    println!("stopping ...");
    stop(children).await;
    Ok(())
}

async fn form_cluster(
    connection: &Connection,
    nodes: u16,
    children: &mut [Child],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut last_problem = String::from("no answer yet");
    loop {
        for (index, child) in children.iter_mut().enumerate() {
            if let Some(status) = child.try_wait()? {
                bail!("sp{} exited early with {status}", index + 1);
            }
        }
        if Instant::now() > deadline {
            bail!("timed out after {STARTUP_TIMEOUT:?}: {last_problem}");
        }
        match try_form(connection, nodes).await {
            Ok(true) => return Ok(()),
            Ok(false) => last_problem = "members are still joining".into(),
            Err(error) => last_problem = format!("{error:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One step towards N voters: promote standbys that joined. Returns true once all N are voters.
async fn try_form(connection: &Connection, nodes: u16) -> anyhow::Result<bool> {
    let mut client = crate::admin::client(connection).await?;
    let status = client.status(StatusRequest {}).await?.into_inner();
    if status.leader_id == 0 {
        return Ok(false);
    }
    let mut voters = 0;
    for member in &status.members {
        match MemberRole::try_from(member.role) {
            Ok(MemberRole::Voter) => voters += 1,
            Ok(MemberRole::Standby) => {
                client
                    .promote(PromoteRequest {
                        node_id: member.node_id,
                    })
                    .await?;
                voters += 1;
            }
            _ => {}
        }
    }
    Ok(voters >= usize::from(nodes))
}

async fn stop(children: Vec<Child>) {
    for child in &children {
        if let Some(pid) = child.id() {
            // SIGTERM lets each node shut down cleanly.
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
    }
    for mut child in children {
        if tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
