//! `faasmoe-gateway`: the OpenAI-compatible HTTP gateway (see the crate documentation).

use clap::Parser;

/// OpenAI-compatible HTTP gateway for faasmoe: /v1/chat/completions, /v1/completions,
/// /v1/models, /health, /metrics over the controllers' NATS API. Connect as NATS user
/// `gateway`; callers authenticate with a tenant's API key (`faasmoe tenant create`).
#[derive(Debug, Parser)]
#[command(name = "faasmoe-gateway", version)]
struct Cli {
    #[command(flatten)]
    settings: faasmoe_gateway::Settings,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _telemetry = faasmoe_telemetry::init("faasmoe-gateway");
    let cli = Cli::parse();
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    match faasmoe_gateway::run(cli.settings, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
