//! `faasmoe-controller`: the control plane service (no quotas; the `faasmoe` CLI wires the
//! broker's JetStream quotas in).

use std::sync::Arc;

use clap::Parser;
use faasmoe_controller::quota::Unlimited;
use faasmoe_controller::service::{run, ControllerSettings};

#[derive(Parser)]
#[command(
    name = "faasmoe-controller",
    version,
    about = "faasmoe controller: attention, router, shared expert and LM head; routed experts over NATS"
)]
struct Cli {
    #[command(flatten)]
    settings: ControllerSettings,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _telemetry = faasmoe_telemetry::init("faasmoe-controller");
    let cli = Cli::parse();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => std::process::ExitCode::SUCCESS,
        r = run(cli.settings, Arc::new(Unlimited)) => match r {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => { tracing::error!("{e:#}"); std::process::ExitCode::FAILURE }
        },
        _ = tokio::signal::ctrl_c() => std::process::ExitCode::SUCCESS,
    }
}
