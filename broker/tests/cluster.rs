//! A three-node NATS cluster on loopback: the tenant KV replicated on all three nodes, and a
//! generate request served end to end across nodes (client on C, controller on A, broker on
//! B, expert workers spawned on demand on C).
//!
//! Build the worker first: `cargo build -p faasmoe-expert-worker`.

use faasmoe_proto::connection::NatsArgs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faasmoe_broker::{
    ActivationConfig, Activator, Deployment, LocalProcessBackend, Quota, TenantStore,
    TenantStoreConfig,
};
use faasmoe_controller::service::{ControllerSettings, ControllerTask};
use faasmoe_e2e::{cargo_bin, free_port, NatsServer};

mod common;
use common::KvQuota;

const MODEL: &str = "tiny";

/// Starts the three nodes: per-node config (server_name, own JetStream store, cluster block
/// with routes to all three) in `dir`; the harness adds `-a 127.0.0.1 -p <port> -m <port>`.
fn start_cluster(dir: &Path) -> Vec<NatsServer> {
    let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes: Vec<String> = route_ports
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect();
    (0..3)
        .map(|i| {
            let name = ["a", "b", "c"][i];
            let store = dir.join(format!("js-{name}"));
            std::fs::create_dir_all(&store).unwrap();
            let conf = format!(
                "server_name: node-{name}\nmax_payload: 8MB\njetstream {{\n  store_dir: \"{}\"\n}}\ncluster {{\n  name: faasmoe-test\n  listen: 127.0.0.1:{}\n  routes: [\n    {}\n  ]\n}}\n",
                store.display(),
                route_ports[i],
                routes.join("\n    ")
            );
            let path = dir.join(format!("node-{name}.conf"));
            std::fs::write(&path, conf).unwrap();
            NatsServer::start_with_config(&path, &[])
        })
        .collect()
}

async fn connect(server: &NatsServer) -> async_nats::Client {
    async_nats::connect(server.url()).await.unwrap()
}

/// Retries `f` until it succeeds (cluster forming, JetStream meta leader election).
async fn retry<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("{what}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what}: still failing after {timeout:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_serves_a_request_end_to_end_with_replicated_quota_kv() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(dir.path());
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (ca, cb, cc) = (connect(a).await, connect(b).await, connect(c).await);

    // The cluster has formed when JetStream answers (meta leader elected) and the R3 bucket
    // can be created (three peers known).
    let js_a = async_nats::jetstream::new(ca.clone());
    retry("JetStream account info", Duration::from_secs(30), || {
        js_a.query_account()
    })
    .await;
    let cfg = || TenantStoreConfig {
        replicas: 3,
        ..Default::default()
    };
    let store_a = retry("open the R3 tenant bucket", Duration::from_secs(30), || {
        TenantStore::open(ca.clone(), cfg())
    })
    .await;
    let mut stream = js_a.get_stream("KV_faasmoe_tenants").await.unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3, "bucket stream replicas");
    let cluster = info
        .cluster
        .clone()
        .expect("cluster info of the bucket stream");
    let mut peers: Vec<String> = cluster
        .replicas
        .iter()
        .map(|p| p.name.clone())
        .chain(cluster.leader.clone())
        .collect();
    peers.sort();
    assert_eq!(
        peers,
        ["node-a", "node-b", "node-c"],
        "bucket peers: {cluster:?}"
    );

    // Admission through node B, usage read through node C.
    store_a
        .create(
            "t1",
            Quota {
                total_tokens: Some(1000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let store_b = TenantStore::open(cb.clone(), cfg()).await.unwrap();
    let store_c = TenantStore::open(cc.clone(), cfg()).await.unwrap();
    let adm = store_b.admit("t1", 10, 20).await.unwrap();
    let in_flight = retry(
        "usage via node C shows the admission",
        Duration::from_secs(5),
        || async {
            let u = store_c.usage("t1").await.map_err(|e| e.to_string())?;
            if u.in_flight == 1 && u.reserved_tokens == 30 {
                Ok(u)
            } else {
                Err(format!("{u:?}"))
            }
        },
    )
    .await;
    assert_eq!((in_flight.in_flight, in_flight.reserved_tokens), (1, 30));
    store_b.settle(adm, 25).await.unwrap();
    let settled = retry(
        "usage via node C shows the settlement",
        Duration::from_secs(5),
        || async {
            let u = store_c.usage("t1").await.map_err(|e| e.to_string())?;
            if u.in_flight == 0 && u.total_tokens == 25 {
                Ok(u)
            } else {
                Err(format!("{u:?}"))
            }
        },
    )
    .await;
    assert_eq!(
        (
            settled.in_flight,
            settled.total_tokens,
            settled.reserved_tokens
        ),
        (0, 25, 0)
    );

    // The broker on node B; workers it spawns connect to node C.
    let model_dir = common::tiny_checkpoint(dir.path(), MODEL);
    let mut d = Deployment::new(&model_dir);
    d.model_id = Some(MODEL.into());
    let experts = faasmoe_model::random_checkpoint::preset("tiny")
        .unwrap()
        .num_experts as u32;
    d.granularity = experts; // whole layer per function
    let layout = d.layout().unwrap();
    let layers = layout.functions.len();
    let backend = LocalProcessBackend {
        worker_bin: cargo_bin("faasmoe-expert-worker"),
        nats: NatsArgs::anonymous(c.url()),
        model_dir: model_dir.clone(),
        model_id: MODEL.into(),
        idle_timeout_ms: 0,
        log_dir: Some(dir.path().join("worker-logs")),
        env: vec![],
    };
    let acfg = ActivationConfig {
        ready_timeout: Duration::from_secs(30),
        ..ActivationConfig::new(MODEL, layout)
    };
    let activator = Activator::start(cb.clone(), acfg, Arc::new(backend))
        .await
        .unwrap();

    // The controller on node A, admitting against the replicated bucket.
    let settings = ControllerSettings {
        nats: NatsArgs::anonymous(a.url()),
        model_dir: model_dir.clone(),
        model_id: Some(MODEL.into()),
        granularity: Some(experts),
        tenants: None,
        local_experts: false,
        request_timeout_ms: 10_000,
        prefetch_layers: 2,
        prefetch_max_in_flight: 16,
        max_retries: 4,
        activation_timeout_ms: 30_000,
        wire_dtype: "f32".into(),
        max_batch_seqs: 8,
        max_prefill_tokens: 1024,
        max_prefill_tokens_alone: 1024,
        no_pipeline: false,
        default_max_tokens: 16,
        max_request_ms: 600_000,
        queue_group: "faasmoe-controllers".into(),
        metrics_listen: None,
        allow_custom_roles: false,
    };
    let controller = ControllerTask::spawn(settings, Arc::new(KvQuota(store_a.clone())));

    // The client on node C (retried while the controller loads and its interest propagates).
    let body = r#"{"input_ids":[1,2,3],"max_tokens":4,"temperature":0}"#;
    let reply = retry(
        "generate request via node C",
        Duration::from_secs(60),
        || async {
            if controller.is_finished() {
                return Ok(Err("controller exited".to_string()));
            }
            let req = async_nats::Request::new()
                .payload(body.into())
                .timeout(Some(Duration::from_secs(60)));
            cc.send_request("faasmoe.v1.generate.t1", req)
                .await
                .map(|m| Ok(m.payload))
        },
    )
    .await
    .expect("the controller is running");
    let v: serde_json::Value = serde_json::from_slice(&reply)
        .unwrap_or_else(|e| panic!("reply {}: {e}", String::from_utf8_lossy(&reply)));
    let ids = v["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids in {v}"));
    assert_eq!(ids.len(), 4, "{v}");
    assert!(ids.iter().all(|i| i.as_u64().is_some()), "{v}");

    // The workers were spawned on demand, one per layer function; the quota was charged
    // (prompt 3 + 4 generated) in the replicated bucket, visible through node C.
    let ready = activator
        .instances()
        .into_iter()
        .filter(|i| i.state == faasmoe_broker::InstanceState::Ready)
        .count();
    assert_eq!(
        ready,
        layers,
        "ready instances: {:?}",
        activator.instances()
    );
    let charged = retry(
        "usage via node C shows the request's charge",
        Duration::from_secs(5),
        || async {
            let u = store_c.usage("t1").await.map_err(|e| e.to_string())?;
            if u.in_flight == 0 && u.total_tokens == 25 + 7 {
                Ok(u)
            } else {
                Err(format!("{u:?}"))
            }
        },
    )
    .await;
    assert_eq!(charged.total_tokens, 32);

    // Fault: node B (the broker's) is killed. The R3 bucket keeps its quorum on A and C, so
    // admission and settlement go on; the warm workers on C and the controller on A serve.
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(b.pid() as i32, libc::SIGKILL) };
    let t_kill = Instant::now();
    let (mut correct, mut failed, mut slowest, mut times) =
        (0, Vec::new(), Duration::ZERO, Vec::new());
    let sent = 4;
    for _ in 0..sent {
        let t0 = Instant::now();
        let req = async_nats::Request::new()
            .payload(body.into())
            .timeout(Some(Duration::from_secs(30)));
        match cc.send_request("faasmoe.v1.generate.t1", req).await {
            Ok(m) => {
                let w: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                if w["token_ids"] == v["token_ids"] {
                    correct += 1
                } else {
                    failed.push(w.to_string())
                }
            }
            Err(e) => failed.push(e.to_string()),
        }
        slowest = slowest.max(t0.elapsed());
        times.push(format!("{:.2}", t0.elapsed().as_secs_f64()));
    }
    println!(
        "after the kill: correct {correct} of {sent}, each {} s, failures {failed:?}",
        times.join(", ")
    );
    let usage = retry(
        "usage via node A after the kill",
        Duration::from_secs(10),
        || async {
            let u = store_a.usage("t1").await.map_err(|e| e.to_string())?;
            if u.in_flight == 0 && u.total_tokens == 32 + 7 * sent as u64 {
                Ok(u)
            } else {
                Err(format!("{u:?}"))
            }
        },
    )
    .await;
    println!(
        "fault cluster-node-killed: sent {sent}, correct {correct}, failed {}, lost 0, slowest {:.2} s (each: {} s); quota charged {} tokens through the 2 surviving nodes ({:.1} s after the kill)",
        failed.len(),
        slowest.as_secs_f64(),
        times.join(", "),
        usage.total_tokens - 32,
        t_kill.elapsed().as_secs_f64()
    );
    assert_eq!(
        correct, sent,
        "requests after node B was killed: {failed:?}"
    );

    // Stop everything: controller, workers (through the broker), servers.
    controller.stop().await;
    activator.shutdown(Duration::from_secs(10)).await;
    assert!(
        activator.instances().is_empty(),
        "still alive: {:?}",
        activator.instances()
    );
    assert_eq!(activator.exited().len(), layers, "{:?}", activator.exited());
    drop((ca, cb, cc));
    for n in nodes {
        n.stop();
    }
}
