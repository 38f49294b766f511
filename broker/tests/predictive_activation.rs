//! Activation ahead of the pass (pre-gating), against a real nats-server, the in-process
//! broker and real `faasmoe-expert-worker` processes: the same requests on a cold model,
//! once with `--prefetch-layers 0` and once with the default, give the same greedy ids;
//! with it the controller starts functions before the pass reaches them (prefetches, of
//! which some are then used), and a wrong guess costs only an instance that idles out.
//!
//! Build the worker first: `cargo build -p faasmoe-expert-worker`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faasmoe_broker::{ActivationConfig, Activator, Deployment, InstanceState, LocalProcessBackend};
use faasmoe_controller::quota::Unlimited;
use faasmoe_controller::service::{ControllerSettings, ControllerTask};
use faasmoe_e2e::{cargo_bin, NatsServer};
use faasmoe_proto::connection::NatsArgs;
use futures::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "tiny";
const GRANULARITY: u32 = 4;
const IDLE_TIMEOUT_MS: u64 = 3_000;
const MAX_TOKENS: usize = 5;

/// What one cold run gave.
struct Outcome {
    ids: Vec<Vec<u32>>,
    /// The controller's dispatch counters after the requests.
    stats: Value,
    /// Functions with an instance started during the run.
    started: BTreeSet<String>,
    first_request_ms: f64,
}

async fn generate(client: &async_nats::Client, prompt: &[u32]) -> Vec<u32> {
    let body = json!({"input_ids": prompt, "max_tokens": MAX_TOKENS, "temperature": 0});
    let req = async_nats::Request::new()
        .payload(serde_json::to_vec(&body).unwrap().into())
        .timeout(Some(Duration::from_secs(60)));
    let m = client
        .send_request("faasmoe.v1.generate.t1", req)
        .await
        .expect("generate reply");
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    v["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("expected a response, got {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

async fn controller_stats(client: &async_nats::Client) -> Value {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("faasmoe.v1.admin.controller_stats", inbox, "".into())
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("controller stats")
        .unwrap();
    serde_json::from_slice::<Value>(&m.payload).unwrap()["dispatch"].clone()
}

/// A fresh server and broker (nothing warm), a controller with `prefetch_layers` and at
/// most `max_in_flight` activations ahead at once, the prompts one after the other, then
/// waits for every instance to scale to zero.
async fn cold_run(
    model_dir: &Path,
    logs: &Path,
    (prefetch_layers, max_in_flight): (&str, &str),
    prompts: &[Vec<u32>],
) -> Outcome {
    let server = NatsServer::start();
    let mut d = Deployment::new(model_dir);
    d.model_id = Some(MODEL.into());
    d.granularity = GRANULARITY;
    let layout = d.layout().unwrap();
    let backend = LocalProcessBackend {
        worker_bin: cargo_bin("faasmoe-expert-worker"),
        nats: NatsArgs::anonymous(server.url()),
        model_dir: model_dir.to_path_buf(),
        model_id: MODEL.into(),
        idle_timeout_ms: IDLE_TIMEOUT_MS,
        log_dir: Some(logs.to_path_buf()),
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
    let dir = model_dir.to_string_lossy().into_owned();
    let g = GRANULARITY.to_string();
    let args = vec![
        "--nats-url",
        &url,
        "--model-dir",
        &dir,
        "--model-id",
        MODEL,
        "--granularity",
        &g,
        "--prefetch-layers",
        prefetch_layers,
        "--prefetch-max-in-flight",
        max_in_flight,
    ];
    let settings = ControllerSettings::from_flags(args).unwrap();
    let mut controller = ControllerTask::spawn(settings, Arc::new(Unlimited));
    let client = server.connect().await.unwrap();
    controller
        .wait_serving(&client, "probe", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(activator.spawn_count(), 0, "spawned before any request");

    let mut ids = Vec::new();
    let mut first_request_ms = 0.0;
    for (i, p) in prompts.iter().enumerate() {
        let t0 = Instant::now();
        ids.push(generate(&client, p).await);
        if i == 0 {
            first_request_ms = t0.elapsed().as_secs_f64() * 1e3;
        }
    }
    let stats = controller_stats(&client).await;

    // Every instance, used or mispredicted, scales to zero and exits cleanly.
    let deadline =
        Instant::now() + Duration::from_millis(IDLE_TIMEOUT_MS) + Duration::from_secs(20);
    while !(activator.instances().is_empty()
        && activator.exited().len() as u64 >= activator.spawn_count())
    {
        assert!(
            Instant::now() < deadline,
            "not scaled to zero: alive {:?}",
            activator.instances()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exited = activator.exited();
    for rec in &exited {
        assert_eq!(rec.state, InstanceState::Exited, "{rec:?}");
        assert!(rec.exit.is_some_and(|e| e.success()), "{rec:?}");
    }
    let started = exited.iter().map(|r| r.function_id.clone()).collect();
    controller.stop().await;
    drop(activator);
    Outcome {
        ids,
        stats,
        started,
        first_request_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_ahead_of_the_pass_changes_no_result_and_starts_functions_early() {
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
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|i| (0..(4 + 3 * i)).map(|j| 17 + 131 * i + 29 * j).collect())
        .collect();

    let off = cold_run(
        &model_dir,
        &dir.path().join("logs-off"),
        ("0", "16"),
        &prompts,
    )
    .await;
    let on = cold_run(
        &model_dir,
        &dir.path().join("logs-on"),
        ("2", "16"),
        &prompts,
    )
    .await;
    // One activation ahead at a time: the other predictions wait in the queue.
    let one = cold_run(
        &model_dir,
        &dir.path().join("logs-one"),
        ("2", "1"),
        &prompts,
    )
    .await;

    // Predictions never route: the same ids.
    assert_eq!(
        on.ids, off.ids,
        "greedy ids with activation ahead vs without"
    );
    assert_eq!(
        one.ids, off.ids,
        "greedy ids with one activation ahead at a time vs without"
    );
    let n = |s: &Value, k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {s}"))
    };
    assert_eq!(n(&off.stats, "prefetches"), 0, "{}", off.stats);
    assert_eq!(n(&off.stats, "prefetch_hits"), 0, "{}", off.stats);
    let (prefetches, hits, misses_on, misses_off) = (
        n(&on.stats, "prefetches"),
        n(&on.stats, "prefetch_hits"),
        n(&on.stats, "cold_misses"),
        n(&off.stats, "cold_misses"),
    );
    assert!(prefetches > 0, "nothing activated ahead: {}", on.stats);
    // With one slot, predictions waited in the queue and were then started (more than
    // the one slot's worth); every instance also scaled to zero in `cold_run`.
    assert!(
        n(&one.stats, "prefetch_queued") > 0 && n(&one.stats, "prefetches") > 1,
        "one at a time: {}",
        one.stats
    );
    assert!(hits > 0 && hits <= prefetches, "{}", on.stats);
    // Without prediction every needed function was reached cold; with it, at most as many.
    assert!(
        misses_off as usize >= off.started.len(),
        "cold misses vs functions started without prediction: {}",
        off.stats
    );
    assert!(
        misses_on <= misses_off,
        "cold misses: {misses_on} with prediction, {misses_off} without"
    );
    // The functions the requests needed were all started either way; what prediction
    // started beyond them is the cost of its wrong guesses (and they scaled to zero above).
    assert!(
        on.started.is_superset(&off.started),
        "needed {:?}, started with prediction {:?}",
        off.started,
        on.started
    );
    let wasted = on.started.difference(&off.started).count();
    eprintln!(
        "activation ahead: {prefetches} prefetches, {hits} used (precision {:.2}), cold misses {misses_on} vs {misses_off} without \
         (recall {:.2}); functions started {} vs {} needed ({wasted} wasted); first request {:.0} ms vs {:.0} ms without",
        hits as f64 / prefetches as f64,
        hits as f64 / (hits + misses_on) as f64,
        on.started.len(),
        off.started.len(),
        on.first_request_ms,
        off.first_request_ms,
    );
}
