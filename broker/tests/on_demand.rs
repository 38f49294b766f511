//! On-demand activation under load: generate requests arrive while no expert worker runs;
//! the broker (in-process, real `faasmoe-expert-worker` processes) spawns every function the
//! requests need exactly once (again only after an instance scaled to zero mid-run, never
//! while one is alive), within the per-function cap, and everything scales back to zero after
//! the idle timeout. Run it with both cores kept busy by other processes too: activation then
//! waits for capacity instead of refusing (see `broker/src/activation.rs`). The generated ids equal those of a `--local-experts`
//! controller (experts in-process) on the same checkpoint.
//!
//! Build the worker first: `cargo build -p faasmoe-expert-worker`.

use faasmoe_proto::connection::NatsArgs;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faasmoe_broker::{ActivationConfig, Activator, Deployment, InstanceState, LocalProcessBackend};
use faasmoe_controller::quota::Unlimited;
use faasmoe_controller::service::{ControllerSettings, ControllerTask};
use faasmoe_e2e::{cargo_bin, NatsServer};
use faasmoe_proto::events::{EventKind, FunctionEvent};
use faasmoe_proto::subject;
use futures::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "tiny";
const GRANULARITY: u32 = 4;
const IDLE_TIMEOUT_MS: u64 = 2_000;
const MAX_TOKENS: usize = 6;

/// Starts an in-process controller (flags as the binary takes them) and waits until it
/// answers on `faasmoe.v1.generate.probe` (an empty object is answered `bad_request`, which
/// activates nothing).
async fn start_controller(
    server: &NatsServer,
    model_dir: &Path,
    extra: &[&str],
) -> (ControllerTask, async_nats::Client) {
    let url = server.url();
    let dir = model_dir.to_string_lossy().into_owned();
    let g = GRANULARITY.to_string();
    let mut args = vec![
        "--nats-url",
        &url,
        "--model-dir",
        &dir,
        "--model-id",
        MODEL,
        "--granularity",
        &g,
    ];
    args.extend_from_slice(extra);
    let settings =
        ControllerSettings::from_flags(args).unwrap_or_else(|e| panic!("controller flags: {e}"));
    let mut controller = ControllerTask::spawn(settings, Arc::new(Unlimited));
    let client = server.connect().await.expect("connect to nats-server");
    controller
        .wait_serving(&client, "probe", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    (controller, client)
}

async fn generate(client: &async_nats::Client, tenant: &str, prompt: &[u32]) -> Vec<u32> {
    let body = json!({"input_ids": prompt, "max_tokens": MAX_TOKENS, "temperature": 0});
    let req = async_nats::Request::new()
        .payload(serde_json::to_vec(&body).unwrap().into())
        .timeout(Some(Duration::from_secs(60)));
    let m = client
        .send_request(format!("faasmoe.v1.generate.{tenant}"), req)
        .await
        .expect("generate reply");
    let v: Value = serde_json::from_slice(&m.payload)
        .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {:?}", m.payload));
    let ids = v["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("expected a response, got {v}"));
    ids.iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_requests_with_no_worker_running_spawn_each_needed_function_exactly_once() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let t_total = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let model_dir: PathBuf = dir.path().join(MODEL);
    let g = faasmoe_model::random_checkpoint::preset("tiny").unwrap();
    faasmoe_model::random_checkpoint::write_checkpoint(
        &model_dir,
        &g,
        7,
        faasmoe_model::random_checkpoint::DEFAULT_MAX_SHARD_BYTES,
        |_, _| {},
    )
    .unwrap();

    // The broker: cap 1 per function, workers exit after 2 s idle.
    let server = NatsServer::start();
    let mut d = Deployment::new(&model_dir);
    d.model_id = Some(MODEL.into());
    d.granularity = GRANULARITY;
    let layout = d.layout().unwrap();
    let all_functions: BTreeSet<String> = layout.functions.iter().map(|f| f.id.clone()).collect();
    assert_eq!(
        all_functions.len(),
        g.num_hidden_layers * (g.num_experts / GRANULARITY as usize),
        "{all_functions:?}"
    );
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
    let broker_client = server.connect().await.unwrap();
    let activator = Activator::start(broker_client, cfg, Arc::new(backend))
        .await
        .unwrap();

    // Watch the lifecycle events from before the first request.
    let watcher = server.connect().await.unwrap();
    let mut events = watcher
        .subscribe(subject::events(MODEL).unwrap())
        .await
        .unwrap();
    watcher.flush().await.unwrap();
    let (collected_tx, mut collected_rx) = tokio::sync::mpsc::unbounded_channel::<FunctionEvent>();
    let event_task = tokio::spawn(async move {
        while let Some(msg) = events.next().await {
            if let Ok(ev) = FunctionEvent::decode(&msg.payload) {
                if collected_tx.send(ev).is_err() {
                    break;
                }
            }
        }
    });

    let (_controller, client) = start_controller(&server, &model_dir, &[]).await;
    assert_eq!(
        activator.spawn_count(),
        0,
        "a worker was spawned before any generate request"
    );
    assert!(
        activator.instances().is_empty(),
        "{:?}",
        activator.instances()
    );

    // Eight concurrent requests, different prompts, two tenants.
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| (0..(3 + i)).map(|j| 11 + 97 * i + 31 * j).collect())
        .collect();
    let t0 = Instant::now();
    let got: Vec<Vec<u32>> = futures::future::join_all(prompts.iter().enumerate().map(|(i, p)| {
        let c = client.clone();
        async move { generate(&c, &format!("t{}", i % 2), p).await }
    }))
    .await;
    let serve_ms = t0.elapsed().as_secs_f64() * 1e3;
    for (i, ids) in got.iter().enumerate() {
        assert_eq!(ids.len(), MAX_TOKENS, "prompt {i}: {ids:?}");
    }
    let spawns = activator.spawn_count();
    let alive_after = activator.instances();
    eprintln!(
        "8 concurrent requests done in {serve_ms:.0} ms; {spawns} spawns, {} instances alive",
        alive_after.len()
    );

    // Reference ids: a `--local-experts` controller on its own server (while the workers idle).
    let ref_server = NatsServer::start();
    let (ref_controller, ref_client) =
        start_controller(&ref_server, &model_dir, &["--local-experts"]).await;
    let want: Vec<Vec<u32>> = futures::future::join_all(prompts.iter().map(|p| {
        let c = ref_client.clone();
        async move { generate(&c, "ref", p).await }
    }))
    .await;
    drop(ref_controller);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "prompt {i}: remote experts vs local experts");
    }

    // Scale to zero: every instance exits after its idle timeout and is reaped.
    let deadline =
        Instant::now() + Duration::from_millis(IDLE_TIMEOUT_MS) + Duration::from_secs(10);
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
    let idle_done_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Let the last `stopped` events arrive, then stop watching.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watcher.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    event_task.abort();
    let mut evs = Vec::new();
    while let Ok(ev) = collected_rx.try_recv() {
        evs.push(ev);
    }

    // Spawns: one `started` per spawn, at most one per function.
    assert_eq!(
        activator.spawn_count(),
        spawns,
        "spawned again after the requests completed"
    );
    let mut started: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ev in evs.iter().filter(|e| e.kind == EventKind::Started) {
        started
            .entry(ev.function_id.clone())
            .or_default()
            .push(ev.instance_id.clone());
    }
    // Concurrent demand never spawns a function twice. A function may only be started again
    // after its instance scaled to zero (a gap of more than the idle timeout between two of
    // its calls, which a heavily loaded machine can produce): its `stopped` event comes
    // before the next `started`.
    let pos = |kind: EventKind, instance: &str| {
        evs.iter()
            .position(|e| e.kind == kind && e.instance_id == instance)
    };
    let mut respawns_after_idle = Vec::new();
    for (f, ids) in started.iter().filter(|(_, v)| v.len() > 1) {
        for pair in ids.windows(2) {
            let stopped = pos(EventKind::Stopped, &pair[0]);
            let next = pos(EventKind::Started, &pair[1]);
            assert!(
                stopped.is_some() && stopped < next,
                "{f} spawned again while its instance {} was alive (instances {ids:?}): {evs:?}",
                pair[0]
            );
        }
        respawns_after_idle.push(f.clone());
    }
    assert_eq!(
        started.values().map(Vec::len).sum::<usize>() as u64,
        spawns,
        "started events vs spawn_count"
    );
    assert!(
        evs.iter().all(|e| e.kind != EventKind::SpawnFailed),
        "spawn failures: {evs:?}"
    );
    let instance_fn: BTreeMap<String, String> = started
        .iter()
        .flat_map(|(f, v)| v.iter().map(move |i| (i.clone(), f.clone())))
        .collect();

    // Ready: every spawned function became ready; the broker's `ready` carries its own cold start.
    let exited = activator.exited();
    assert_eq!(exited.len() as u64, spawns, "{exited:?}");
    let ready_fns: BTreeSet<String> = evs
        .iter()
        .filter(|e| e.kind == EventKind::Ready)
        .map(|e| e.function_id.clone())
        .collect();
    let started_fns: BTreeSet<String> = started.keys().cloned().collect();
    assert_eq!(
        ready_fns, started_fns,
        "functions in ready events vs started events"
    );
    assert!(ready_fns.is_subset(&all_functions));
    let mut cold = Vec::new();
    for rec in &exited {
        let broker_cold = rec
            .cold_start_ms
            .unwrap_or_else(|| panic!("never ready: {rec:?}"));
        // One `ready` per instance, the broker's (spawn → ready, as in its record); the
        // worker's own announcement is `subscribed`.
        let readies: Vec<_> = evs
            .iter()
            .filter(|e| e.kind == EventKind::Ready && e.instance_id == rec.instance_id)
            .collect();
        assert_eq!(readies.len(), 1, "{rec:?}: {readies:?}");
        let ev = readies[0];
        assert!(
            ev.cold_start_ms
                .is_some_and(|c| (c - broker_cold).abs() < 1e-3),
            "ready event {ev:?} vs the broker's record {rec:?}"
        );
        assert!(
            evs.iter()
                .any(|e| e.kind == EventKind::Subscribed && e.instance_id == rec.instance_id),
            "no subscribed event of {rec:?}"
        );
        let c = ev.cold_start_ms.unwrap();
        assert!(c > 0.0, "{ev:?}");
        cold.push(c);
    }
    cold.sort_by(|a, b| a.partial_cmp(b).unwrap());

    // Caps held.
    for f in &all_functions {
        assert!(
            activator.peak_alive(f) <= 1,
            "{f}: peak {}",
            activator.peak_alive(f)
        );
    }
    assert!(started_fns.iter().all(|f| activator.peak_alive(f) == 1));

    // Scaled to zero: every instance exited 0, `stopped` published for each.
    for rec in &exited {
        assert_eq!(rec.state, InstanceState::Exited);
        assert!(rec.exit.is_some_and(|e| e.success()), "{rec:?}");
        assert_eq!(
            instance_fn.get(&rec.instance_id),
            Some(&rec.function_id),
            "{rec:?}"
        );
        let stopped: Vec<_> = evs
            .iter()
            .filter(|e| e.kind == EventKind::Stopped && e.instance_id == rec.instance_id)
            .collect();
        // The broker's, after reaping (the worker's own last event is `draining`).
        assert!(
            stopped.len() == 1 && stopped[0].exit_status == Some(0),
            "{rec:?}: {stopped:?}"
        );
        assert!(
            evs.iter()
                .any(|e| e.kind == EventKind::Draining && e.instance_id == rec.instance_id),
            "no draining event of {rec:?}"
        );
    }
    assert!(activator.instances().is_empty());

    eprintln!(
        "functions: {} in layout, {} needed/spawned ({} spawn_count), peak alive per function 1; \
         cold start ms p50 {:.0} max {:.0} min {:.0}; 8 requests {serve_ms:.0} ms; scaled to zero {:.0} ms after the first request; \
         events: {} ({} stopped); total {:.1?}",
        all_functions.len(),
        started_fns.len(),
        spawns,
        percentile(&cold, 0.5),
        cold[cold.len() - 1],
        cold[0],
        idle_done_ms,
        evs.len(),
        evs.iter().filter(|e| e.kind == EventKind::Stopped).count(),
        t_total.elapsed()
    );
    let unused: Vec<_> = all_functions.difference(&started_fns).collect();
    eprintln!("never needed: {unused:?}; started again after scaling to zero mid-run: {respawns_after_idle:?}");
    for (i, ids) in got.iter().enumerate() {
        eprintln!("prompt {i} ({} tokens) → {ids:?}", prompts[i].len());
    }
    drop(activator);
    drop(server);
}
