//! Scale-down racing requests: real nats-server, the broker's activator and a controller
//! in-process, real `faasmoe-expert-worker` processes with a 300 ms idle timeout and a cap of
//! one instance per function. Generate requests arrive at intervals swept across the idle
//! timeout, so that some of them meet functions whose instance is draining (unsubscribed,
//! not yet exited) — the case that used to be refused with "function … is at its cap of 1
//! instance(s) (1 alive); retry later". Every request must be answered correctly: the
//! broker waits for the draining instance to exit and starts a new one, and the controller
//! asks again (with backoff) when *no responders* follows an activation.
//!
//! The drain window is a few milliseconds, so whether a run hits it is chance (the figures
//! print how many activations waited at the cap); `broker/tests/activation.rs` covers the
//! wait itself deterministically.
//!
//! Build the worker first: `cargo build -p faasmoe-expert-worker`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use faasmoe_broker::{ActivationConfig, Activator, Deployment, LocalProcessBackend};
use faasmoe_controller::quota::Unlimited;
use faasmoe_controller::service::{ControllerSettings, ControllerTask};
use faasmoe_e2e::{cargo_bin, NatsServer};
use faasmoe_proto::connection::NatsArgs;
use serde_json::{json, Value};

const MODEL: &str = "tiny";
const IDLE_TIMEOUT_MS: u64 = 300;
const MAX_TOKENS: usize = 2;
/// Pauses between requests: from 100 ms below the idle timeout to 100 ms above it.
const PAUSES_MS: std::ops::RangeInclusive<u64> = (IDLE_TIMEOUT_MS - 100)..=(IDLE_TIMEOUT_MS + 100);
const PAUSE_STEP_MS: usize = 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent clients.
const CLIENTS: usize = 4;

/// One greedy generate request; the reply body, or why none came.
async fn generate(client: &async_nats::Client, prompt: &[u32]) -> Result<Value, String> {
    let body = serde_json::to_vec(
        &json!({"input_ids": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}),
    )
    .unwrap();
    let req = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(REQUEST_TIMEOUT));
    let m = client
        .send_request("faasmoe.v1.generate.race", req)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&m.payload).map_err(|e| format!("reply is not JSON ({e})"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_scale_to_zero_are_all_served() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join(MODEL);
    let g = faasmoe_model::random_checkpoint::preset("tiny").unwrap();
    faasmoe_model::random_checkpoint::write_checkpoint(
        &model_dir,
        &g,
        7,
        faasmoe_model::random_checkpoint::DEFAULT_MAX_SHARD_BYTES,
        |_, _| {},
    )
    .unwrap();

    let server = NatsServer::start();
    let mut d = Deployment::new(&model_dir);
    d.model_id = Some(MODEL.into());
    d.granularity = 4;
    let layout = d.layout().unwrap();
    let backend = LocalProcessBackend {
        worker_bin: cargo_bin("faasmoe-expert-worker"),
        nats: NatsArgs::anonymous(server.url()),
        model_dir: model_dir.clone(),
        model_id: MODEL.into(),
        idle_timeout_ms: IDLE_TIMEOUT_MS,
        log_dir: Some(dir.path().join("worker-logs")),
        env: vec![],
    };
    let cfg = ActivationConfig {
        max_instances_per_function: 1,
        ready_timeout: Duration::from_secs(30),
        ..ActivationConfig::new(MODEL, layout)
    };
    let activator = Activator::start(server.connect().await.unwrap(), cfg, Arc::new(backend))
        .await
        .unwrap();
    let url = server.url();
    let mdir = model_dir.to_string_lossy().into_owned();
    let settings = ControllerSettings::from_flags([
        "--nats-url",
        &url,
        "--model-dir",
        &mdir,
        "--model-id",
        MODEL,
        "--granularity",
        "4",
    ])
    .unwrap();
    let mut controller = ControllerTask::spawn(settings, Arc::new(Unlimited));
    let client = server.connect().await.unwrap();
    controller
        .wait_serving(&client, "probe", Duration::from_secs(30))
        .await
        .unwrap();

    // Reference answers (cold start of every function they need), one prompt per client.
    let prompts: Vec<Vec<u32>> = (0..CLIENTS as u32)
        .map(|i| (0..(3 + i)).map(|j| 11 + 97 * i + 31 * j).collect())
        .collect();
    let mut want = Vec::new();
    for p in &prompts {
        let v = generate(&client, p).await.expect("reference request");
        assert!(v["token_ids"].is_array(), "reference request: {v}");
        want.push(v["token_ids"].clone());
    }

    // Rounds: a pause swept across the idle timeout, then every client's request at once
    // (different prompts, so different functions; concurrent activations of one function).
    let pauses: Vec<u64> = PAUSES_MS.step_by(PAUSE_STEP_MS).collect();
    let mut samples = Vec::new();
    for &pause in &pauses {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let round = prompts.iter().zip(&want).enumerate().map(|(i, (p, w))| {
            let c = client.clone();
            async move {
                let t0 = Instant::now();
                let outcome = match generate(&c, p).await {
                    Ok(v) if v["token_ids"] == *w => Ok(()),
                    Ok(v) if v["error"]["code"].is_string() => Err((
                        "typed",
                        format!("client {i}, after a {pause} ms pause: {}", v["error"]),
                    )),
                    Ok(v) => Err((
                        "wrong",
                        format!("client {i}, after a {pause} ms pause: {v}"),
                    )),
                    Err(e) => Err(("lost", format!("client {i}, after a {pause} ms pause: {e}"))),
                };
                (t0.elapsed(), outcome)
            }
        });
        samples.extend(futures::future::join_all(round).await);
    }
    let slowest = samples.iter().map(|(t, _)| *t).max().unwrap_or_default();
    let count = |k: &str| {
        samples
            .iter()
            .filter(|(_, o)| matches!(o, Err((kind, _)) if *kind == k))
            .count()
    };
    let (typed, wrong, lost) = (count("typed"), count("wrong"), count("lost"));
    let correct = samples.iter().filter(|(_, o)| o.is_ok()).count();
    let failures: Vec<&String> = samples
        .iter()
        .filter_map(|(_, o)| o.as_ref().err().map(|(_, m)| m))
        .collect();
    let spawns = activator.spawn_count();
    let cap_waits = activator.cap_waits();
    controller.stop().await;
    activator.shutdown(Duration::from_secs(5)).await;

    eprintln!(
        "scale-down race: requests sent {}, correct {correct}, failed with a typed error {typed}, wrong {wrong}, lost {lost}; \
         slowest {:.0} ms; instances spawned {spawns}; activations that waited at the cap for a draining instance {cap_waits}",
        samples.len(),
        slowest.as_secs_f64() * 1e3
    );
    for f in &failures {
        eprintln!("  {f}");
    }
    for f in &d.layout().unwrap().functions {
        assert!(activator.peak_alive(&f.id) <= 1, "{}: cap exceeded", f.id);
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests not answered correctly",
        failures.len(),
        samples.len()
    );
}
