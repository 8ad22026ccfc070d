//! `leafpeer`: a leaf peer on the command line: identity, presence, records, messages.
//!
//! Every command attaches to a super peer (seeds from `--seeds` / `VESPER_SEEDS`, default the local dev cluster),
//! does its work and detaches. `--json` prints one JSON document per result (one line per message for
//! `listen`), for scripts.
//!
//! This file parses the command line and hands each command to its module: `args` (the definition),
//! `config` and `identity` (settings, key, attaching), `presence`, `nat`, `records`, `messaging`,
//! `conferences`, `peers` (connect / accept), with `output` and `error` shared by all of them.

mod args;
mod conferences;
mod config;
mod error;
mod identity;
mod messaging;
mod nat;
mod output;
mod peers;
mod presence;
mod records;
mod serve;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, LogFormat};
use output::{Attached, Output};

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    config::apply_config_file(&mut cli)?;
    let key_path = cli.key.clone().unwrap_or_else(config::default_key_path);
    let out = Output { json: cli.json };
    match &cli.command {
        Command::Keygen => return identity::keygen(out, &key_path),
        Command::Id => return identity::id(out, &key_path),
        _ => {}
    }
    let leaf = config::attach(&cli, &key_path).await?;
    let result = command(&Attached { leaf: &leaf, out }, &cli.command).await;
    leaf.detach().await;
    result
}

/// Runs a command that needs the cluster, in the module of its group.
async fn command(at: &Attached<'_>, command: &Command) -> anyhow::Result<()> {
    use Command::*;
    match command {
        Keygen | Id => unreachable!("handled before attaching"),
        Status { .. } | Lookup { .. } | SearchPeers { .. } => presence::run(at, command).await,
        Nat => nat::run(at).await,
        Put { .. } | Get { .. } | List { .. } | Delete { .. } | Search { .. } => {
            records::run(at, command).await
        }
        Send { .. } | Listen { .. } | Chat { .. } => messaging::run(at, command).await,
        Create { .. }
        | Invite { .. }
        | Accept { id: Some(_), .. }
        | Decline { .. }
        | Roster { .. }
        | Say { .. }
        | Join { .. } => conferences::run(at, command).await,
        Connect { .. } | Accept { id: None, .. } => peers::run(at, command).await,
        Serve {
            offer_superpeer, ..
        } => serve::run(at, *offer_superpeer).await,
    }
}

/// The library logs through `tracing`; this shows it on stderr: warnings by default, more with `-v`, or what
/// `RUST_LOG` says. With the OTEL_* variables set, its spans (a message sent or received) are exported too,
/// sampled as `OTEL_TRACES_SAMPLER` says.
fn init_telemetry(verbose: u8, format: LogFormat) -> vesper_telemetry::Telemetry {
    let default = match verbose {
        0 => "warn",
        1 => "warn,vesper_leafpeer=info,leafpeer=info",
        _ => "info,vesper_leafpeer=debug,leafpeer=debug",
    };
    vesper_telemetry::init(vesper_telemetry::Options {
        service: "vesper-leaf",
        default_filter: default.into(),
        json: format == LogFormat::Json,
        sampling: vesper_telemetry::Sampling::Environment,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = init_telemetry(cli.verbose, cli.log_format);
    let result = run(cli).await;
    // Spans still queued are sent before exit.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("leafpeer: {error:#}");
            error::exit_code(&error)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
