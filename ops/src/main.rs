//! `vesperctl`: operate a Vesper cluster.
//!
//! Certificates (`ca init`, `cert issue`), cluster inspection (`status`, `members`), membership changes
//! (`init`, `add-standby`, `promote`, `demote`, `remove`, `transfer-leader`), the placement controller (`placement`) and
//! namespace access rules (`namespace`) through the Admin service, and a local development cluster (`dev up`).

mod admin;
mod certs;
mod dev;
mod placement;
mod scale;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad usage (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Operate a Vesper cluster.
#[derive(Debug, Parser)]
#[command(name = "vesperctl", version)]
struct Cli {
    #[command(flatten)]
    connection: admin::Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificate authority of a cluster.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Certificates for super peers and operators.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Show the cluster as the contacted super peer sees it.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List members: node id, peer id, addresses, role, leader.
    Members {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Add an idle super peer (started without --bootstrap or --join) as a standby.
    AddStandby {
        /// Cluster address (host:port) of the idle super peer.
        cluster_addr: String,
        #[arg(long)]
        json: bool,
    },
    /// Promote a standby to voter.
    Promote {
        node_id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Demote a voter to standby.
    Demote {
        node_id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Remove a standby from the cluster (demote a voter first). Its node id is never reused.
    Remove {
        node_id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Start a new cluster on the contacted super peer, once: idempotent. A node that already belongs to a
    /// cluster, or whose join list names a member of one, answers so and starts nothing (exit 0 in every case).
    /// Only a node started without --bootstrap can be initialised; it then is node 1, the first voter.
    Init {
        /// Keep trying for this long while the node cannot be reached or is still starting (a Job that runs
        /// beside freshly started pods). Default: one attempt.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        wait: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// Take the pods at ordinal KEEP and above of a StatefulSet out of the cluster before they go, one change
    /// at a time, highest first: a leaving standby is removed; a leaving voter hands over leadership, is replaced
    /// by a kept standby when the voters would fall below --voters, and is demoted, then removed. The placement
    /// controller is paused meanwhile; at the end the targets are set and it resumes (unless it was paused
    /// before). Members whose address does not match --host-template are never touched. Idempotent: nothing to
    /// do is success. The Helm chart's pre-upgrade hook runs it.
    ScaleDown {
        /// Pods to keep: ordinals 0 to KEEP-1.
        #[arg(long)]
        keep: u32,
        /// The pods' stable host name with {ordinal} in it, as in their cluster addresses
        /// (vesper-{ordinal}.vesper-headless.NAMESPACE.svc.cluster.local).
        #[arg(long)]
        host_template: String,
        /// Voter target to keep and to set at the end: 1, 3, 5 or 7.
        #[arg(long, default_value_t = 3)]
        voters: u32,
        /// Standby target to set at the end (default: unchanged).
        #[arg(long)]
        standbys: Option<u32>,
        /// Give up after this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
        wait: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// Make another voter the leader.
    TransferLeader {
        node_id: u64,
        #[arg(long)]
        json: bool,
    },
    /// The placement controller: which super peers vote and stand by, kept so by the Raft leader.
    Placement {
        #[command(subcommand)]
        command: placement::PlacementCommand,
    },
    /// Access rules (ACLs) of record namespaces. Needs an operator certificate.
    Namespace {
        #[command(subcommand)]
        command: NamespaceCommand,
    },
    /// Local development cluster.
    Dev {
        #[command(subcommand)]
        command: dev::DevCommand,
    },
}

#[derive(Debug, Subcommand)]
enum NamespaceCommand {
    /// Set who may write and who may read a namespace, replacing its previous rules. Owner-write / public-read:
    /// `--write members --read anyone --member OWNER`; a group-write namespace lists every member (any member may
    /// then change any record of it).
    Set {
        /// The namespace.
        namespace: String,
        /// Who may put and delete records.
        #[arg(long, value_enum)]
        write: admin::AccessArg,
        /// Who may get, list, search and watch records.
        #[arg(long, value_enum)]
        read: admin::AccessArg,
        /// PeerId of a member (repeat the flag; at most 1024).
        #[arg(long = "member", value_name = "PEER_ID")]
        members: Vec<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove a namespace's rules: anyone may read it and create keys again.
    Clear {
        /// The namespace.
        namespace: String,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the namespaces that have rules.
    List {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a new CA (ca.pem, ca.key) in a folder.
    Init {
        /// Folder for the CA files.
        #[arg(long, env = "VESPER_CA_DIR")]
        dir: PathBuf,
    },
    /// Create an intermediate issuer (NAME.pem, NAME.key) signed by the CA, for the super peers you run
    /// yourself ("core" nodes): with `--issuer-cert` / `--issuer-key` (placement.issuer_cert, issuer_key) they
    /// sign the certificates of nodes the placement controller adopts. It may sign end certificates only; keep
    /// it short-lived, and revoke it (`vesperctl cert revoke`) if a core node is lost.
    Issuer {
        /// Folder of the CA (from `ca init`).
        #[arg(long, env = "VESPER_CA_DIR")]
        ca_dir: PathBuf,
        /// Name of the issuer (files NAME.pem and NAME.key).
        #[arg(long, default_value = "issuer")]
        name: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Days the issuer is valid from now (1 to 3650). Certificates it signs never outlive it.
        #[arg(long, default_value_t = certs::DEFAULT_ISSUER_DAYS)]
        valid_days: u32,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Issue a certificate signed by the CA.
    Issue {
        /// Folder of the CA (from `ca init`).
        #[arg(long, env = "VESPER_CA_DIR")]
        ca_dir: PathBuf,
        /// What the certificate is for.
        #[arg(long, value_enum)]
        role: certs::Role,
        /// Name of the certificate (files NAME.pem and NAME.key).
        #[arg(long)]
        name: String,
        /// DNS names and IP addresses the certificate is valid for (repeat the flag). Super peers need the
        /// names clients use to reach them.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid from now (1 to 3650).
        #[arg(long, default_value_t = certs::DEFAULT_VALID_DAYS, conflicts_with = "not_after")]
        valid_days: u32,
        /// Last day (UTC, YYYY-MM-DD) the certificate is valid, instead of --valid-days. A date in the past
        /// makes an already expired certificate (to check that super peers refuse it).
        #[arg(long, value_name = "YYYY-MM-DD")]
        not_after: Option<String>,
    },
    /// Revoke a certificate: committed through Raft, then refused by every super peer on every port that takes
    /// certificates, also on connections already open. Needs an operator certificate.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["certificate", "fingerprint"])))]
    Revoke {
        /// The certificate's PEM file (--cert is the operator's own certificate, for the connection).
        certificate: Option<PathBuf>,
        /// The certificate's SHA-256 fingerprint (64 hex digits, as `cert issue` printed it).
        #[arg(long)]
        fingerprint: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ca {
            command: CaCommand::Init { dir },
        } => certs::init_ca(&dir).map(|path| println!("created CA {}", path.display())),
        Command::Ca {
            command:
                CaCommand::Issuer {
                    ca_dir,
                    name,
                    out,
                    valid_days,
                },
        } => certs::issue_issuer(&ca_dir, &name, &out, certs::Validity::Days(valid_days)).map(
            |issued| {
                println!(
                    "created issuer {} (key {})\n  sha256 fingerprint {}\n  valid until {}\n  give it to core super peers: superpeer --issuer-cert {} --issuer-key {}",
                    issued.cert.display(),
                    issued.key.display(),
                    issued.fingerprint,
                    issued.not_after,
                    issued.cert.display(),
                    issued.key.display(),
                )
            },
        ),
        Command::Cert {
            command:
                CertCommand::Issue {
                    ca_dir,
                    role,
                    name,
                    sans,
                    out,
                    valid_days,
                    not_after,
                },
        } => {
            let validity = match not_after {
                Some(date) => certs::Validity::parse_date(&date),
                None => Ok(certs::Validity::Days(valid_days)),
            };
            validity
                .and_then(|validity| certs::issue(&ca_dir, role, &name, &sans, &out, validity))
                .map(|issued| {
                    println!(
                        "issued {role} certificate {} (key {})\n  sha256 fingerprint {}\n  valid until {}{}",
                        issued.cert.display(),
                        issued.key.display(),
                        issued.fingerprint,
                        issued.not_after,
                        if issued.not_after < time::OffsetDateTime::now_utc() {
                            " (already expired)"
                        } else {
                            ""
                        }
                    )
                })
        }
        Command::Cert {
            command:
                CertCommand::Revoke {
                    certificate,
                    fingerprint,
                    json,
                },
        } => {
            let fingerprint = match (certificate, fingerprint) {
                (Some(path), _) => certs::fingerprint_of(&path),
                (None, Some(hex)) => Ok(hex),
                (None, None) => unreachable!("clap requires --cert or --fingerprint"),
            };
            match fingerprint {
                Ok(fingerprint) => admin::revoke(&cli.connection, &fingerprint, json).await,
                Err(error) => Err(error),
            }
        }
        Command::Status { json } => admin::status(&cli.connection, json).await,
        Command::Members { json } => admin::members(&cli.connection, json).await,
        Command::AddStandby { cluster_addr, json } => {
            admin::add_standby(&cli.connection, &cluster_addr, json).await
        }
        Command::Promote { node_id, json } => admin::promote(&cli.connection, node_id, json).await,
        Command::Demote { node_id, json } => admin::demote(&cli.connection, node_id, json).await,
        Command::Remove { node_id, json } => admin::remove(&cli.connection, node_id, json).await,
        Command::TransferLeader { node_id, json } => {
            admin::transfer_leader(&cli.connection, node_id, json).await
        }
        Command::Init { wait, json } => admin::init(&cli.connection, wait, json).await,
        Command::ScaleDown {
            keep,
            host_template,
            voters,
            standbys,
            wait,
            json,
        } => match scale::HostTemplate::parse(&host_template) {
            Ok(template) => {
                if ![1, 3, 5, 7].contains(&voters) {
                    Err(admin::UsageError(format!("--voters {voters}: must be 1, 3, 5 or 7")).into())
                } else {
                    scale::scale_down(&cli.connection, keep, &template, voters, standbys, wait, json).await
                }
            }
            Err(error) => Err(error.into()),
        },
        Command::Namespace { command } => match command {
            NamespaceCommand::Set {
                namespace,
                write,
                read,
                members,
                json,
            } => {
                let acl = admin::AclArgs {
                    write,
                    read,
                    members,
                };
                admin::set_acl(&cli.connection, &namespace, Some(acl), json).await
            }
            NamespaceCommand::Clear { namespace, json } => {
                admin::set_acl(&cli.connection, &namespace, None, json).await
            }
            NamespaceCommand::List { json } => admin::list_acls(&cli.connection, json).await,
        },
        Command::Placement { command } => placement::run(&cli.connection, command).await,
        Command::Dev { command } => dev::run(command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vesperctl: {error:#}");
            if error.downcast_ref::<admin::UsageError>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
