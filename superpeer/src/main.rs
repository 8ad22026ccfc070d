//! `superpeer`: runs one Vesper super peer. Flags and configuration layering: [`vesper_superpeer::cli`] and
//! docs/CONFIG.md. All configuration problems are reported together, with exit code 64.

use std::process::ExitCode;

use clap::Parser;
use vesper_superpeer::cli::{build_config, Args};

/// Exit code for bad usage or configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Logs to stderr, and traces over OTLP when the OTEL_* variables ask for it (docs/OPERATIONS.md). A super
/// peer continues the traces leaves start and starts none of its own.
fn init_telemetry(json: bool) -> vesper_telemetry::Telemetry {
    vesper_telemetry::init(vesper_telemetry::Options {
        service: "vesper-superpeer",
        default_filter: "info,openraft=warn,stun_types=error".into(),
        json,
        sampling: vesper_telemetry::Sampling::FollowParent,
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: draining, then shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining, then shutting down"),
    }
}

/// Resolves when standard input reaches its end (or fails). The read runs on a thread of its own, not on the
/// runtime's blocking pool, so a node stopped another way does not wait for it at exit.
async fn stdin_closed() {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("stdin-lifeline".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut buffer = [0u8; 256];
            while matches!(stdin.read(&mut buffer), Ok(read) if read > 0) {}
            let _ = closed_tx.send(());
        });
    match spawned {
        Ok(_) => {
            let _ = closed_rx.await;
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch standard input; --exit-with-stdin has no effect");
            std::future::pending::<()>().await;
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.build_info {
        let build = vesper_superpeer::placement::candidates::Build::this();
        println!(
            "version={} store_format={} protocol={}",
            build.software_version, build.store_format, build.protocol_version
        );
        return ExitCode::SUCCESS;
    }
    if args.check_config {
        return match build_config(&args) {
            Ok(config) => match toml::to_string(&config) {
                Ok(text) => {
                    print!("{text}");
                    eprintln!("superpeer: the configuration is valid");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("superpeer: the configuration is valid but cannot be shown: {error}");
                    ExitCode::SUCCESS
                }
            },
            Err(problems) => {
                eprintln!("superpeer: invalid configuration:");
                for problem in problems {
                    eprintln!("  - {problem}");
                }
                ExitCode::from(EXIT_USAGE)
            }
        };
    }
    let telemetry = init_telemetry(args.log_json);
    if telemetry.exporting() {
        tracing::info!("exporting traces over OTLP");
    }
    let config = match build_config(&args) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("superpeer: invalid configuration:");
            for problem in problems {
                eprintln!("  - {problem}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let node = match vesper_superpeer::spawn(config).await {
        Ok(node) => node,
        Err(error) => {
            eprintln!("superpeer: {error}");
            return ExitCode::FAILURE;
        }
    };
    let stopped = node.shutdown_token();
    let parent_gone = async {
        if args.exit_with_stdin {
            stdin_closed().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut exit = ExitCode::SUCCESS;
    let drain = tokio::select! {
        _ = wait_for_signal() => true,
        _ = parent_gone => {
            tracing::info!("standard input closed (the parent is gone): shutting down");
            true
        }
        _ = stopped.cancelled() => {
            tracing::error!("node stopped on its own");
            exit = ExitCode::FAILURE;
            false
        }
    };
    if drain {
        // A second signal, or the node failing meanwhile, cuts the drain short.
        tokio::select! {
            _ = node.drain() => {}
            _ = wait_for_signal() => tracing::warn!("signalled again: stopping without finishing the drain"),
            _ = stopped.cancelled() => tracing::error!("node stopped on its own while draining"),
        }
    }
    node.shutdown().await;
    tracing::info!("stopped");
    // The last spans are sent before the process ends (bounded by the exporter's timeout).
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    exit
}
