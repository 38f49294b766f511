use clap::Parser;
use faasmoe_expert_worker::{run, Settings};

// One runtime thread for NATS reads, admission and batching (the experts' compute runs on the
// blocking pool), so a request reaches the batching loop without a cross-thread wake-up
// (faasmoe-shared TPOT at 1 tenant vs local-split: 1.22x -> 1.06x, mean of 3 runs of
// `faasmoe bench` here).
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let _telemetry = faasmoe_telemetry::init("faasmoe-expert-worker");
    let settings = Settings::parse();
    // Install the handlers now, not when `run` first polls the future (after loading and
    // READY): a SIGTERM during the cold start must also end in a drain and exit 0.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    match run(settings, shutdown).await {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
