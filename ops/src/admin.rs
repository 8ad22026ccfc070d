//! Admin service calls and how their answers are printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use vesper_proto::v1::admin_client::AdminClient;
use vesper_proto::v1::{
    AddStandbyRequest, DemoteRequest, Member, MemberRole, MembersRequest, PromoteRequest,
    RemoveNodeRequest, StatusRequest, TransferLeaderRequest,
};

/// Where the dev cluster keeps its files; its operator certificate is the default identity.
pub const DEV_DIR: &str = ".vesper/dev";

/// A usage problem (exit code 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// How to reach and authenticate to the Admin service.
#[derive(Debug, clap::Args)]
pub struct Connection {
    /// Admin address (host:port) of any super peer.
    #[arg(
        long,
        global = true,
        env = "VESPER_ADMIN",
        default_value = "127.0.0.1:7402"
    )]
    pub server: String,
    /// Cluster CA certificate. Default: .vesper/dev/ca/ca.pem when it exists.
    #[arg(long, global = true, env = "VESPER_CA")]
    pub ca: Option<PathBuf>,
    /// Operator certificate. Default: .vesper/dev/certs/operator.pem when it exists.
    #[arg(long, global = true, env = "VESPER_CERT")]
    pub cert: Option<PathBuf>,
    /// Operator private key. Default: .vesper/dev/certs/operator.key when it exists.
    #[arg(long, global = true, env = "VESPER_KEY")]
    pub key: Option<PathBuf>,
    /// Deadline of the call in seconds.
    #[arg(long, global = true, default_value_t = 30)]
    pub timeout_secs: u64,
    /// The name the super peer's certificate must carry, when --server is an address the certificate does not
    /// name (a `kubectl port-forward` to 127.0.0.1, for example). Default: the host of --server.
    #[arg(long, global = true, env = "VESPER_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

fn pick(given: &Option<PathBuf>, default: &str, flag: &str) -> anyhow::Result<PathBuf> {
    match given {
        Some(path) => Ok(path.clone()),
        None if Path::new(default).exists() => Ok(PathBuf::from(default)),
        None => Err(UsageError(format!(
            "{flag} is required (no dev cluster files at {default}; run `vesperctl dev up` or pass {flag})"
        ))
        .into()),
    }
}

/// An Admin client for `connection`.
pub async fn client(connection: &Connection) -> anyhow::Result<AdminClient<Channel>> {
    connection.client().await
}

impl Connection {
    pub(crate) async fn client(&self) -> anyhow::Result<AdminClient<Channel>> {
        let ca = pick(&self.ca, &format!("{DEV_DIR}/ca/ca.pem"), "--ca")?;
        let cert = pick(
            &self.cert,
            &format!("{DEV_DIR}/certs/operator.pem"),
            "--cert",
        )?;
        let key = pick(&self.key, &format!("{DEV_DIR}/certs/operator.key"), "--key")?;
        let read = |path: &Path| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let host = self
            .server
            .rsplit_once(':')
            .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
            .ok_or_else(|| UsageError(format!("--server {:?} must be host:port", self.server)))?;
        let host = self.tls_server_name.as_deref().unwrap_or(host);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&ca)?))
            .identity(Identity::from_pem(read(&cert)?, read(&key)?))
            .domain_name(host);
        let channel = Endpoint::from_shared(format!("https://{}", self.server))
            .map_err(|error| UsageError(format!("--server {:?}: {error}", self.server)))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(self.timeout_secs))
            .tls_config(tls)?
            .connect()
            .await
            .with_context(|| format!("cannot connect to the admin service at {}", self.server))?;
        Ok(AdminClient::new(channel))
    }
}

pub(crate) fn role_name(role: i32) -> &'static str {
    match MemberRole::try_from(role) {
        Ok(MemberRole::Voter) => "voter",
        Ok(MemberRole::Standby) => "standby",
        Ok(MemberRole::Removed) => "removed",
        _ => "unknown",
    }
}

fn member_json(member: &Member) -> serde_json::Value {
    json!({
        "node_id": member.node_id,
        "peer_id": member.peer_id,
        "cluster_addr": member.cluster_addr,
        "leaf_addr": member.leaf_addr,
        "admin_addr": member.admin_addr,
        "role": role_name(member.role),
        "leader": member.is_leader,
        "relay_active": member.relay_active,
        "relay_capacity": member.relay_capacity,
        "leaves": member.leaves,
    })
}

fn print_members(members: &[Member]) {
    println!(
        "{:<5} {:<8} {:<7} {:<22} {:<22} {:<22} {:<11} {:<7} PEER ID",
        "NODE", "ROLE", "LEADER", "CLUSTER", "LEAF", "ADMIN", "RELAY", "LEAVES"
    );
    for member in members {
        println!(
            "{:<5} {:<8} {:<7} {:<22} {:<22} {:<22} {:<11} {:<7} {}",
            member.node_id,
            role_name(member.role),
            if member.is_leader { "*" } else { "" },
            member.cluster_addr,
            member.leaf_addr,
            member.admin_addr,
            format!("{}/{}", member.relay_active, member.relay_capacity),
            member.leaves,
            member.peer_id
        );
    }
}

pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", status.message(), status.code())
}

pub async fn status(connection: &Connection, as_json: bool) -> anyhow::Result<()> {
    let status = connection
        .client()
        .await?
        .status(StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        let value = json!({
            "node_id": status.node_id,
            "peer_id": status.peer_id,
            "leader_id": status.leader_id,
            "term": status.term,
            "applied_index": status.applied_index,
            "last_log_index": status.last_log_index,
            "raft_state": status.raft_state,
            "purged_index": status.purged_index,
            "snapshot_index": status.snapshot_index,
            "members": status.members.iter().map(member_json).collect::<Vec<_>>(),
        });
        println!("{value}");
    } else {
        println!("node          {} ({})", status.node_id, status.raft_state);
        println!("peer id       {}", status.peer_id);
        println!("leader        {}", status.leader_id);
        println!("term          {}", status.term);
        println!(
            "log           applied {} / last {} / snapshot {} / purged {}",
            status.applied_index, status.last_log_index, status.snapshot_index, status.purged_index
        );
        println!();
        print_members(&status.members);
    }
    Ok(())
}

pub async fn members(connection: &Connection, as_json: bool) -> anyhow::Result<()> {
    let reply = connection
        .client()
        .await?
        .members(MembersRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        let value = json!({
            "leader_id": reply.leader_id,
            "term": reply.term,
            "applied_index": reply.applied_index,
            "members": reply.members.iter().map(member_json).collect::<Vec<_>>(),
        });
        println!("{value}");
    } else {
        print_members(&reply.members);
    }
    Ok(())
}

fn print_change(as_json: bool, what: String, members: &[Member]) {
    if as_json {
        let value = json!({
            "result": what,
            "members": members.iter().map(member_json).collect::<Vec<_>>(),
        });
        println!("{value}");
    } else {
        println!("{what}");
        print_members(members);
    }
}

pub async fn add_standby(
    connection: &Connection,
    cluster_addr: &str,
    as_json: bool,
) -> anyhow::Result<()> {
    let reply = connection
        .client()
        .await?
        .add_standby(AddStandbyRequest {
            cluster_addr: cluster_addr.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let member = reply.member.unwrap_or_default();
    print_change(
        as_json,
        format!("added {cluster_addr} as standby node {}", member.node_id),
        &[member],
    );
    Ok(())
}

pub async fn promote(connection: &Connection, node_id: u64, as_json: bool) -> anyhow::Result<()> {
    let reply = connection
        .client()
        .await?
        .promote(PromoteRequest { node_id })
        .await
        .map_err(status_error)?
        .into_inner();
    print_change(
        as_json,
        format!("promoted node {node_id} to voter"),
        &reply.members,
    );
    Ok(())
}

pub async fn demote(connection: &Connection, node_id: u64, as_json: bool) -> anyhow::Result<()> {
    let reply = connection
        .client()
        .await?
        .demote(DemoteRequest { node_id })
        .await
        .map_err(status_error)?
        .into_inner();
    print_change(
        as_json,
        format!("demoted node {node_id} to standby"),
        &reply.members,
    );
    Ok(())
}

pub async fn remove(connection: &Connection, node_id: u64, as_json: bool) -> anyhow::Result<()> {
    let reply = connection
        .client()
        .await?
        .remove_node(RemoveNodeRequest { node_id })
        .await
        .map_err(status_error)?
        .into_inner();
    print_change(as_json, format!("removed node {node_id}"), &reply.members);
    Ok(())
}

/// `vesperctl init`: asks the node to bootstrap, trying again (with progress on stderr) while it cannot be
/// reached or is still starting, for up to `wait`.
pub async fn init(
    connection: &Connection,
    wait: std::time::Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    use vesper_proto::v1::initialize_response::Outcome;
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(200);
    let reply = loop {
        // Not reachable yet, or `UNAVAILABLE` (still starting): worth another try. A refusal, or a usage
        // problem (no certificate), is not.
        let (error, retry) = match connection.client().await {
            Err(error) => {
                let usage = error.downcast_ref::<UsageError>().is_some();
                (error, !usage)
            }
            Ok(mut client) => match client
                .initialize(vesper_proto::v1::InitializeRequest {})
                .await
            {
                Ok(reply) => break reply.into_inner(),
                Err(status) => {
                    let retry = matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    );
                    (status_error(status), retry)
                }
            },
        };
        if !retry || tokio::time::Instant::now() + pause > deadline {
            return Err(error);
        }
        eprintln!(
            "vesperctl: {} is not ready for init yet ({error:#}); trying again",
            connection.server
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    };
    let outcome = match reply.outcome() {
        Outcome::Bootstrapped => "bootstrapped",
        Outcome::AlreadyMember => "already_member",
        Outcome::ClusterExists => "cluster_exists",
        Outcome::Unspecified => "unspecified",
    };
    if as_json {
        println!(
            "{}",
            json!({ "outcome": outcome, "node_id": reply.node_id, "detail": reply.detail })
        );
    } else {
        println!("{}", reply.detail);
    }
    Ok(())
}

pub async fn transfer_leader(
    connection: &Connection,
    node_id: u64,
    as_json: bool,
) -> anyhow::Result<()> {
    let reply = connection
        .client()
        .await?
        .transfer_leader(TransferLeaderRequest { node_id })
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        println!("{}", json!({ "leader_id": reply.leader_id }));
    } else {
        println!("node {} is the leader", reply.leader_id);
    }
    Ok(())
}

/// Revokes the certificate with this SHA-256 fingerprint (hex).
pub async fn revoke(
    connection: &Connection,
    fingerprint: &str,
    as_json: bool,
) -> anyhow::Result<()> {
    let bytes = data_encoding::HEXLOWER_PERMISSIVE
        .decode(fingerprint.trim().as_bytes())
        .ok()
        .filter(|bytes| bytes.len() == 32)
        .ok_or_else(|| {
            UsageError(format!(
                "fingerprint {fingerprint:?} is not 64 hex digits (a SHA-256)"
            ))
        })?;
    let reply = connection
        .client()
        .await?
        .revoke_certificate(vesper_proto::v1::RevokeCertificateRequest { fingerprint: bytes })
        .await
        .map_err(status_error)?
        .into_inner();
    let fingerprint = fingerprint.trim().to_ascii_lowercase();
    if as_json {
        println!(
            "{}",
            json!({ "fingerprint": fingerprint, "log_index": reply.log_index })
        );
    } else {
        println!(
            "revoked certificate {fingerprint} (committed at log index {})",
            reply.log_index
        );
    }
    Ok(())
}

/// Who may do something in a namespace, as the command line says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessArg {
    /// Every attached peer.
    Anyone,
    /// Only the listed members.
    Members,
}

impl AccessArg {
    fn wire(self) -> i32 {
        match self {
            AccessArg::Anyone => vesper_proto::v1::NamespaceAccess::Anyone as i32,
            AccessArg::Members => vesper_proto::v1::NamespaceAccess::Members as i32,
        }
    }
}

fn access_name(value: i32) -> &'static str {
    match vesper_proto::v1::NamespaceAccess::try_from(value) {
        Ok(vesper_proto::v1::NamespaceAccess::Anyone) => "anyone",
        Ok(vesper_proto::v1::NamespaceAccess::Members) => "members",
        _ => "unknown",
    }
}

/// The rules `vesperctl namespace set` was given.
#[derive(Debug)]
pub struct AclArgs {
    pub write: AccessArg,
    pub read: AccessArg,
    pub members: Vec<String>,
}

/// Sets (`Some`) or clears (`None`) the access rules of `namespace`.
pub async fn set_acl(
    connection: &Connection,
    namespace: &str,
    acl: Option<AclArgs>,
    as_json: bool,
) -> anyhow::Result<()> {
    vesper_proto::validate::namespace(namespace)
        .map_err(|error| UsageError(format!("namespace {namespace:?}: {error}")))?;
    let clear = acl.is_none();
    let request = match acl {
        Some(acl) => {
            for member in &acl.members {
                member
                    .parse::<vesper_proto::PeerId>()
                    .map_err(|error| UsageError(format!("--member {member:?}: {error}")))?;
            }
            if acl.members.is_empty()
                && (acl.write == AccessArg::Members || acl.read == AccessArg::Members)
            {
                return Err(UsageError(
                    "--write members or --read members needs at least one --member".into(),
                )
                .into());
            }
            vesper_proto::v1::SetNamespaceAclRequest {
                acl: Some(vesper_proto::v1::NamespaceAcl {
                    namespace: namespace.to_string(),
                    write: acl.write.wire(),
                    read: acl.read.wire(),
                    members: acl.members,
                }),
                clear: false,
            }
        }
        None => vesper_proto::v1::SetNamespaceAclRequest {
            acl: Some(vesper_proto::v1::NamespaceAcl {
                namespace: namespace.to_string(),
                ..Default::default()
            }),
            clear: true,
        },
    };
    let reply = connection
        .client()
        .await?
        .set_namespace_acl(request)
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        println!(
            "{}",
            json!({ "namespace": namespace, "cleared": clear, "log_index": reply.log_index })
        );
    } else if clear {
        println!(
            "cleared the rules of namespace {namespace} (committed at log index {})",
            reply.log_index
        );
    } else {
        println!(
            "set the rules of namespace {namespace} (committed at log index {})",
            reply.log_index
        );
    }
    Ok(())
}

/// Prints every namespace that has access rules.
pub async fn list_acls(connection: &Connection, as_json: bool) -> anyhow::Result<()> {
    let reply = connection
        .client()
        .await?
        .list_namespace_acls(vesper_proto::v1::ListNamespaceAclsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        let acls: Vec<_> = reply
            .acls
            .iter()
            .map(|acl| {
                json!({
                    "namespace": acl.namespace,
                    "write": access_name(acl.write),
                    "read": access_name(acl.read),
                    "members": acl.members,
                })
            })
            .collect();
        println!(
            "{}",
            json!({ "acls": acls, "applied_index": reply.applied_index })
        );
        return Ok(());
    }
    if reply.acls.is_empty() {
        println!("no namespace has rules (every namespace is open)");
    }
    for acl in &reply.acls {
        println!(
            "{}: write {}, read {}, {} member(s)",
            acl.namespace,
            access_name(acl.write),
            access_name(acl.read),
            acl.members.len()
        );
        for member in &acl.members {
            println!("  {member}");
        }
    }
    Ok(())
}
