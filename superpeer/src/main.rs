//! `superpeer`: runs one Vesper super peer. Flags and configuration layering: [`vesper_superpeer::cli`] and
//! docs/CONFIG.md. All configuration problems are reported together, with exit code 64.

use std::process::ExitCode;

use clap::Parser;
use vesper_superpeer::cli::{build_config, Args};

/// Exit code for bad usage or configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,stun_types=error")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
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
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
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
    init_tracing(args.log_json);
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
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = parent_gone => tracing::info!("standard input closed (the parent is gone): shutting down"),
        _ = stopped.cancelled() => tracing::error!("node stopped on its own"),
    }
    node.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
