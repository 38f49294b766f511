//! The controller end to end: a real `nats-server`, real `faasmoe-expert-worker` processes
//! (one per function of the layout), the controller in-process, clients speaking the JSON
//! API on `faasmoe.v1.generate.<tenant>`.
//!
//! Needs `scripts/install-nats-server` (or `scripts/install-test-deps`) and the worker binary
//! (`cargo build -p faasmoe-expert-worker`). Fixtures: `$FAASMOE_FIXTURES`, else
//! `../shared/fixtures`; when absent, each test prints a loud SKIPPED and passes.
//! `FAASMOE_TEST_WORKER_LOGS=1` shows the workers' logs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use faasmoe_controller::quota::{QuotaGate, QuotaTicket, Unlimited};
use faasmoe_controller::service::{ControllerSettings, ControllerTask};
use faasmoe_e2e::{cargo_bin, workspace_root, NatsServer};
use faasmoe_model::fixtures::fixture;
use faasmoe_proto::generate::ClientError;
use faasmoe_proto::layout::{FunctionSpec, Layout};
use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{json, Value};

const TINY: &str = "qwen15-moe-tiny";
const GQA: &str = "qwen2-moe-gqa-mixed";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// A fixture checkpoint with what the tests need to know about it.
struct Model {
    dir: PathBuf,
    moe_layers: Vec<u32>,
    num_experts: u32,
    golden: HashMap<String, Tensor>,
}

impl Model {
    /// `None` (with a loud skip) when the fixtures are absent.
    fn load(name: &str) -> Option<Self> {
        let Some(dir) = fixture(name) else {
            eprintln!("!!! SKIPPED: fixture {name} not found");
            return None;
        };
        let golden =
            candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
        Some(Self::with_golden(dir, golden))
    }

    /// A checkpoint without goldens (one the test generated).
    fn generated(dir: PathBuf) -> Self {
        Self::with_golden(dir, HashMap::new())
    }

    fn with_golden(dir: PathBuf, golden: HashMap<String, Tensor>) -> Self {
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let layers = cfg["num_hidden_layers"].as_u64().unwrap() as u32;
        let step = cfg["decoder_sparse_step"].as_u64().unwrap_or(1).max(1) as u32;
        let dense: Vec<u32> = cfg["mlp_only_layers"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_u64().unwrap() as u32).collect())
            .unwrap_or_default();
        let moe_layers = (0..layers)
            .filter(|l| !dense.contains(l) && (l + 1) % step == 0)
            .collect();
        let num_experts = cfg["num_experts"].as_u64().unwrap() as u32;
        Self {
            dir,
            moe_layers,
            num_experts,
            golden,
        }
    }

    fn ids(&self, key: &str) -> Vec<u32> {
        self.golden[key]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect()
    }

    fn prompt(&self, i: usize) -> Vec<u32> {
        self.ids(&format!("prompt.{i}.input_ids"))
    }

    fn greedy(&self, i: usize) -> Vec<u32> {
        self.ids(&format!("prompt.{i}.greedy_ids"))
    }

    fn layout(&self, granularity: u32) -> Layout {
        Layout::new(&self.moe_layers, self.num_experts, granularity)
    }
}

fn greedy_body(ids: &[u32]) -> Value {
    json!({"input_ids": ids, "max_tokens": 24, "temperature": 0})
}

// ---------------------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------------------

/// Running worker processes, killed (and reaped) on drop.
#[derive(Default)]
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

impl Workers {
    /// Starts one worker per function, all at once, and waits for every `READY` line.
    fn start(url: &str, dir: &Path, model_id: &str, functions: &[FunctionSpec]) -> Self {
        let bin = cargo_bin("faasmoe-expert-worker");
        let show_logs = std::env::var_os("FAASMOE_TEST_WORKER_LOGS").is_some();
        let mut workers = Workers::default();
        let (tx, rx) = std::sync::mpsc::channel::<(String, String)>();
        for f in functions {
            let mut child = Command::new(&bin)
                .args([
                    "--nats-url",
                    url,
                    "--model-id",
                    model_id,
                    "--idle-timeout-ms",
                    "0",
                ])
                .arg("--model-dir")
                .arg(dir)
                .args(["--experts", &f.experts_spec(), "--function-id", &f.id])
                .env_remove("NATS_USER")
                .env_remove("NATS_PASSWORD")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(if show_logs {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                })
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
            let stdout = child.stdout.take().expect("piped stdout");
            workers.0.push(child);
            let (tx, id) = (tx.clone(), f.id.clone());
            std::thread::spawn(move || {
                // Reads to EOF, so the worker never writes into a closed pipe.
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.starts_with("READY ") {
                        let _ = tx.send((id.clone(), line));
                    }
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut ready = std::collections::BTreeSet::new();
        while ready.len() < functions.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((id, line)) => {
                    assert_eq!(
                        line.split_whitespace().nth(1),
                        Some(id.as_str()),
                        "READY line of {id}: {line}"
                    );
                    ready.insert(id);
                }
                Err(e) => {
                    let exited: Vec<String> = workers
                        .0
                        .iter_mut()
                        .filter_map(|c| {
                            c.try_wait()
                                .ok()
                                .flatten()
                                .map(|s| format!("pid {}: {s}", c.id()))
                        })
                        .collect();
                    panic!(
                        "{} of {} workers ready ({e}); exited: {exited:?}",
                        ready.len(),
                        functions.len()
                    );
                }
            }
        }
        workers
    }
}

// ---------------------------------------------------------------------------------------
// Controller in-process
// ---------------------------------------------------------------------------------------

/// A NATS server, the workers of a layout and a controller, torn down on drop (controller
/// first, then workers, then the server).
struct Deployment {
    _controller: ControllerTask,
    _workers: Workers,
    client: async_nats::Client,
    model_id: String,
    server: NatsServer,
}

impl Deployment {
    /// Starts a server, a worker for each function of `functions`, and a controller with
    /// `flags` (added to `--nats-url --model-dir --model-id`), and waits until the
    /// controller answers on `faasmoe.v1.generate.<probe_tenant>`.
    async fn start(
        model: &Model,
        functions: &[FunctionSpec],
        flags: &[&str],
        quota: Arc<dyn QuotaGate>,
        probe_tenant: &str,
    ) -> Self {
        Self::start_on(
            NatsServer::start(),
            model,
            functions,
            flags,
            quota,
            probe_tenant,
        )
        .await
    }

    /// As [`Deployment::start`], on a server already running.
    async fn start_on(
        server: NatsServer,
        model: &Model,
        functions: &[FunctionSpec],
        flags: &[&str],
        quota: Arc<dyn QuotaGate>,
        probe_tenant: &str,
    ) -> Self {
        let model_id = "m".to_string();
        let workers = tokio::task::block_in_place(|| {
            Workers::start(&server.url(), &model.dir, &model_id, functions)
        });
        let url = server.url();
        let dir = model.dir.to_string_lossy().into_owned();
        let mut args = vec![
            "--nats-url",
            &url,
            "--model-dir",
            &dir,
            "--model-id",
            &model_id,
        ];
        args.extend_from_slice(flags);
        let settings = ControllerSettings::from_flags(args)
            .unwrap_or_else(|e| panic!("controller flags: {e}"));
        let mut controller = ControllerTask::spawn(settings, quota);
        let client = server.connect().await.expect("connect to nats-server");
        controller
            .wait_serving(&client, probe_tenant, Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let d = Deployment {
            _controller: controller,
            _workers: workers,
            client,
            model_id,
            server,
        };
        // The probe is a bad request, answered as one.
        let v = d.request_raw(probe_tenant, b"{}".to_vec()).await;
        assert_eq!(v["error"]["code"], "bad_request", "probe reply {v}");
        d
    }

    /// A controller over workers for every function of `g`.
    async fn with_workers(model: &Model, g: u32, extra: &[&str]) -> Self {
        let gs = g.to_string();
        let mut flags = vec!["--granularity", gs.as_str()];
        flags.extend_from_slice(extra);
        Self::start(
            model,
            &model.layout(g).functions,
            &flags,
            Arc::new(Unlimited),
            "probe",
        )
        .await
    }

    /// Sends a raw body and parses the JSON reply.
    async fn request_raw(&self, tenant: &str, body: Vec<u8>) -> Value {
        let req = async_nats::Request::new()
            .payload(body.into())
            .timeout(Some(REQUEST_TIMEOUT));
        let m = self
            .client
            .send_request(format!("faasmoe.v1.generate.{tenant}"), req)
            .await
            .expect("generate reply");
        serde_json::from_slice(&m.payload)
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {:?}", m.payload))
    }

    async fn request(&self, tenant: &str, body: &Value) -> Value {
        self.request_raw(tenant, serde_json::to_vec(body).unwrap())
            .await
    }

    /// The generated ids of a successful reply (panics with the reply otherwise).
    async fn generate_ids(&self, tenant: &str, body: &Value) -> Vec<u32> {
        let v = self.request(tenant, body).await;
        token_ids(&v)
    }

    /// The error code of a failed reply (panics on success).
    async fn error_code(&self, tenant: &str, body: Vec<u8>) -> String {
        let v = self.request_raw(tenant, body).await;
        let code = v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("expected an error reply, got {v}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a message: {v}"
        );
        eprintln!("{tenant}: {}", v["error"]);
        code.to_string()
    }

    /// The controller's dispatch counter `name` (`faasmoe.v1.admin.controller_stats`).
    async fn dispatch_stat(&self, name: &str) -> u64 {
        let m = self
            .client
            .request("faasmoe.v1.admin.controller_stats", "".into())
            .await
            .expect("controller stats");
        let v: Value = serde_json::from_slice(&m.payload).expect("stats JSON");
        v["dispatch"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no dispatch.{name} in {v}"))
    }

    /// Sum of the `requests` counters of every worker (their status endpoints).
    async fn expert_requests(&self, functions: &[FunctionSpec]) -> u64 {
        let mut total = 0;
        for f in functions {
            let subject = format!("faasmoe.v1.status.{}.{}", self.model_id, f.id);
            let m = self
                .client
                .request(subject, "".into())
                .await
                .expect("worker status");
            let v: Value = serde_json::from_slice(&m.payload).expect("status JSON");
            total += v["requests"]
                .as_u64()
                .unwrap_or_else(|| panic!("status without requests: {v}"));
        }
        total
    }
}

fn token_ids(v: &Value) -> Vec<u32> {
    let ids = v["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("expected a response, got {v}"));
    ids.iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

/// One streamed request: the chunks and the final message.
struct Streamed {
    chunks: Vec<Value>,
    last: Value,
}

/// Streams `body` (with `stream: true`) through a subscription on a fresh inbox.
async fn stream(client: &async_nats::Client, tenant: &str, body: &Value) -> Streamed {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(
            format!("faasmoe.v1.generate.{tenant}"),
            inbox,
            serde_json::to_vec(body).unwrap().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut chunks = Vec::new();
    loop {
        let m = tokio::time::timeout(REQUEST_TIMEOUT, sub.next())
            .await
            .expect("stream message in time")
            .expect("subscription open");
        let v: Value = serde_json::from_slice(&m.payload).expect("JSON stream message");
        match v["type"].as_str() {
            Some("chunk") => chunks.push(v),
            Some("done") | Some("error") => return Streamed { chunks, last: v },
            _ => panic!("unexpected stream message {v}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Parity
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_match_transformers_through_remote_experts_at_granularity_1_4_and_whole_layer(
) {
    for name in [GQA, TINY] {
        let Some(model) = Model::load(name) else {
            return;
        };
        for g in [1, 4, model.num_experts] {
            let t0 = Instant::now();
            let d = Deployment::with_workers(&model, g, &[]).await;
            for i in 0..4 {
                let got = d.generate_ids("t1", &greedy_body(&model.prompt(i))).await;
                assert_eq!(got, model.greedy(i), "{name} g={g} prompt {i}");
            }
            eprintln!(
                "{name} g={g}: {} workers, 4 prompts match in {:.1?}",
                model.layout(g).functions.len(),
                t0.elapsed()
            );
        }
        // The same ids with the experts in-process (local-split mode).
        let d = Deployment::start(
            &model,
            &[],
            &["--local-experts"],
            Arc::new(Unlimited),
            "probe",
        )
        .await;
        for i in 0..4 {
            assert_eq!(
                d.generate_ids("t1", &greedy_body(&model.prompt(i))).await,
                model.greedy(i),
                "{name} local prompt {i}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tenants
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_tenants_submitting_concurrently_get_what_each_gets_alone() {
    let Some(model) = Model::load(TINY) else {
        return;
    };
    let d = Arc::new(Deployment::with_workers(&model, 4, &[]).await);
    // Extra requests of different lengths, greedy and seeded sampling: alone first.
    let extras = [
        json!({"prompt": "The quick brown fox", "max_tokens": 5, "temperature": 0}),
        json!({"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 12, "temperature": 0}),
        json!({"prompt": "Once upon a time", "max_tokens": 9, "temperature": 0.8, "top_p": 0.9, "seed": 7}),
    ];
    let mut alone = Vec::new();
    for e in &extras {
        alone.push(d.generate_ids("t1", e).await);
    }
    for (e, ids) in extras.iter().zip(&alone) {
        assert!(
            !ids.is_empty() && ids.len() <= e["max_tokens"].as_u64().unwrap() as usize,
            "{e}: {ids:?}"
        );
    }
    // Every tenant submits everything at once.
    let mut bodies: Vec<(Value, Vec<u32>)> = (0..4)
        .map(|i| (greedy_body(&model.prompt(i)), model.greedy(i)))
        .collect();
    bodies.extend(extras.iter().cloned().zip(alone.iter().cloned()));
    let mut tasks = Vec::new();
    for t in 1..=4 {
        for (k, (body, want)) in bodies.iter().enumerate() {
            // Each tenant starts at a different request, so the batch mixes them.
            let (d, body, want) = (d.clone(), body.clone(), want.clone());
            let tenant = format!("t{t}");
            tasks.push(tokio::spawn(async move {
                let got = d.generate_ids(&tenant, &body).await;
                assert_eq!(got, want, "tenant {tenant} request {k}: {body}");
            }));
        }
        bodies.rotate_left(1);
    }
    let t0 = Instant::now();
    for t in futures::future::join_all(tasks).await {
        t.expect("request task");
    }
    eprintln!(
        "{} concurrent requests of 4 tenants done in {:.1?}",
        4 * bodies.len(),
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Error codes
// ---------------------------------------------------------------------------------------

/// A controller over the tokenizer-less GQA fixture (requests rejected before any expert is
/// called need no workers).
async fn gqa_without_workers() -> Option<(Model, Deployment)> {
    let model = Model::load(GQA)?;
    let d = Deployment::start(
        &model,
        &[],
        &["--granularity", "4"],
        Arc::new(Unlimited),
        "probe",
    )
    .await;
    Some((model, d))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_prompt_is_bad_request() {
    let Some((_m, d)) = gqa_without_workers().await else {
        return;
    };
    assert_eq!(
        d.error_code("t1", br#"{"prompt": "", "max_tokens": 4}"#.to_vec())
            .await,
        "bad_request"
    );
    assert_eq!(
        d.error_code("t1", br#"{"input_ids": [], "max_tokens": 4}"#.to_vec())
            .await,
        "bad_request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_field_is_bad_request() {
    let Some((_m, d)) = gqa_without_workers().await else {
        return;
    };
    assert_eq!(
        d.error_code(
            "t1",
            br#"{"input_ids": [1, 2], "max_tokens": 4, "temprature": 0}"#.to_vec()
        )
        .await,
        "bad_request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_of_wrong_type_is_bad_request() {
    let Some((_m, d)) = gqa_without_workers().await else {
        return;
    };
    assert_eq!(
        d.error_code(
            "t1",
            br#"{"input_ids": [1, 2], "max_tokens": "four"}"#.to_vec()
        )
        .await,
        "bad_request"
    );
    assert_eq!(
        d.error_code("t1", br#"{"input_ids": "1 2"}"#.to_vec())
            .await,
        "bad_request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_body_is_bad_request() {
    let Some((_m, d)) = gqa_without_workers().await else {
        return;
    };
    assert_eq!(
        d.error_code("t1", b"{\"prompt\": \"\xff\xfe\"}".to_vec())
            .await,
        "bad_request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_longer_than_the_context_is_bad_request() {
    let Some((_m, d)) = gqa_without_workers().await else {
        return;
    };
    // max_position_embeddings of the GQA fixture is 512.
    let ids: Vec<u32> = (0..600).map(|i| i % 1000).collect();
    let body = serde_json::to_vec(&json!({"input_ids": ids, "max_tokens": 4})).unwrap();
    assert_eq!(d.error_code("t1", body).await, "bad_request");
    let ids: Vec<u32> = vec![1; 512];
    let body = serde_json::to_vec(&json!({"input_ids": ids, "max_tokens": 4})).unwrap();
    assert_eq!(
        d.error_code("t1", body).await,
        "bad_request",
        "512 prompt tokens leave no room in a context of 512"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_text_on_a_model_without_tokenizer_is_bad_request() {
    let Some((_m, d)) = gqa_without_workers().await else {
        return;
    };
    assert_eq!(
        d.error_code("t1", br#"{"prompt": "Hello", "max_tokens": 4}"#.to_vec())
            .await,
        "bad_request"
    );
    let chat = br#"{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}"#.to_vec();
    assert_eq!(d.error_code("t1", chat).await, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_beyond_the_context_is_bad_request_as_in_vllm() {
    let Some((_m, d)) = gqa_without_workers().await else {
        return;
    };
    // 500 prompt tokens leave 12 of the 512.
    let ids: Vec<u32> = (0..500).map(|i| i % 1000).collect();
    let v = d
        .request("t1", &json!({"input_ids": ids, "max_tokens": 13}))
        .await;
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("512") && m.contains("513"),
        "the message gives the context and the tokens asked for: {m}"
    );
    let v = d
        .request(
            "t1",
            &json!({"input_ids": [1, 2], "max_tokens": 4_000_000_000u64}),
        )
        .await;
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
}

/// A controller over the tiny fixture (real tokenizer) without workers, on a server whose
/// `max_payload` is 8 MB (bodies of a few MB reach the controller).
async fn tiny_without_workers() -> Option<(Model, Deployment)> {
    let model = Model::load(TINY)?;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 8MB\n").unwrap();
    let server = NatsServer::start_with_config(&conf, &[]);
    let d = Deployment::start_on(
        server,
        &model,
        &[],
        &["--granularity", "4"],
        Arc::new(Unlimited),
        "probe",
    )
    .await;
    Some((model, d))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_chat_role_is_bad_request() {
    let Some((_m, d)) = tiny_without_workers().await else {
        return;
    };
    let v = d.request("t1", &json!({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}], "max_tokens": 4})).await;
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[1] has role `robot`"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_too_long_in_bytes_is_refused_before_it_is_tokenized() {
    let Some((_m, d)) = tiny_without_workers().await else {
        return;
    };
    // 6 MB of text; the context (8192 tokens) holds at most 8192 × 256 bytes (the longest
    // Qwen token spells 256 bytes). Tokenizing it would take seconds.
    let prompt = "word ".repeat((6 << 20) / 5).into_bytes();
    let body = [
        br#"{"max_tokens": 4, "prompt": ""#.as_slice(),
        &prompt[..prompt.len() - 1],
        br#""}"#,
    ]
    .concat();
    let t0 = Instant::now();
    let v = d.request_raw("t1", body).await;
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("bytes"),
        "{v}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "refused after {:?}",
        t0.elapsed()
    );
    let chat = json!({"messages": [{"role": "user", "content": String::from_utf8(prompt).unwrap()}], "max_tokens": 4});
    assert_eq!(d.request("t1", &chat).await["error"]["code"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_lifetime_is_cancelled_with_what_it_has() {
    let Some(model) = Model::load(TINY) else {
        return;
    };
    let d = Deployment::with_workers(&model, 16, &["--max-request-ms", "1500"]).await;
    let t0 = Instant::now();
    let v = d
        .request(
            "t1",
            &json!({"input_ids": model.prompt(0), "max_tokens": 5000, "temperature": 0}),
        )
        .await;
    let took = t0.elapsed();
    assert_eq!(v["finish_reason"], "cancelled", "{v}");
    let n = token_ids(&v).len();
    assert!(n > 0 && n < 5000, "{n} tokens");
    assert_eq!(token_ids(&v)[..24.min(n)], model.greedy(0)[..24.min(n)]);
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(10),
        "answered after {took:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Long prompts: expert requests split to fit the server's max_payload
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_prompts_fit_any_max_payload_and_give_the_same_tokens() {
    let Some(model) = Model::load(TINY) else {
        return;
    };
    // Prompts of 1,024 and 4,096 tokens from the fixture's prompts, repeated.
    let base: Vec<u32> = (0..4).flat_map(|i| model.prompt(i)).collect();
    let prompts: Vec<Vec<u32>> = [1024, 4096]
        .iter()
        .map(|&n| base.iter().copied().cycle().take(n).collect())
        .collect();
    let mut answers: Vec<Vec<Vec<u32>>> = Vec::new();
    // The server default (1 MB), then 64 KB; whole layers per function, so one function
    // gets every row of a prompt chunk (a 4,096-token prompt in f32 is 1 MB per layer).
    for (max_payload, budget) in [
        (None, "4096"),
        (Some("64KB"), "4096"),
        (Some("64KB"), "256"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = match max_payload {
            None => NatsServer::start(),
            Some(m) => {
                let conf = dir.path().join("nats.conf");
                std::fs::write(&conf, format!("max_payload: {m}\n")).unwrap();
                NatsServer::start_with_config(&conf, &[])
            }
        };
        let g = model.num_experts;
        let flags = [
            "--granularity",
            &g.to_string(),
            "--max-prefill-tokens",
            budget,
        ];
        let d = Deployment::start_on(
            server,
            &model,
            &model.layout(g).functions,
            &flags,
            Arc::new(Unlimited),
            "probe",
        )
        .await;
        let t0 = Instant::now();
        let mut got = Vec::new();
        for p in &prompts {
            let v = d
                .request(
                    "t1",
                    &json!({"input_ids": p, "max_tokens": 4, "temperature": 0}),
                )
                .await;
            got.push(token_ids(&v));
        }
        let splits = d.dispatch_stat("split_requests").await;
        eprintln!("max_payload {max_payload:?}, budget {budget}: {got:?} in {:.1?}, {splits} extra requests from splits", t0.elapsed());
        if max_payload.is_some() && budget == "4096" {
            assert!(
                splits > 0,
                "a 64 KB server must split the 4,096-token prefill"
            );
        }
        answers.push(got);
    }
    assert_eq!(answers[0], answers[1], "splitting changes nothing");
    assert_eq!(answers[0], answers[2], "chunked prefill changes nothing");
    assert!(answers[0].iter().all(|a| a.len() == 4));
}

/// Prompts of 1k, 4k and 8k tokens on two layers of the exact Qwen1.5-MoE-A2.7B geometry
/// (hidden 2048, 60 experts top-4, vocab 1024, random bf16 weights): faasmoe-shared at
/// granularity 60 and 4, with f32 and bf16 hidden states on the wire, gives the greedy ids
/// of local-split. Every server has the default `max_payload` of 1 MB; one configuration
/// prefills 2,048 tokens per step, so a function of 15 experts gets over a thousand rows
/// (megabytes) per request and its requests must be split. Every configuration runs every
/// length (about 7 minutes on 2 cores: 6 s, 25 s and 55 s per configuration);
/// `FAASMOE_LONG_PROMPTS=1024,4096` overrides the lengths.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_prompts_at_the_a27b_geometry_give_the_local_split_ids_over_nats() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("a27b-l2-v1024");
    let t0 = Instant::now();
    faasmoe_model::random_checkpoint::init(&faasmoe_model::random_checkpoint::InitArgs {
        out: ckpt.clone(),
        preset: "qwen1.5-moe-a2.7b".into(),
        layers: Some(2),
        vocab_size: Some(1024),
        seed: 7,
        max_shard_bytes: faasmoe_model::random_checkpoint::DEFAULT_MAX_SHARD_BYTES,
        zeros: false,
        tokenizer: None,
    })
    .unwrap();
    eprintln!("checkpoint written in {:.1?}", t0.elapsed());
    let model = Model::generated(ckpt);
    let lengths: Vec<usize> = std::env::var("FAASMOE_LONG_PROMPTS")
        .map(|v| v.split(',').map(|n| n.trim().parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![1024, 4096, 8000]);
    // Token ids from a fixed LCG over the vocabulary.
    let prompt = |n: usize| -> Vec<u32> {
        let mut x = 0x2545_f491_u64 ^ n as u64;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) % 1024) as u32
            })
            .collect()
    };
    let body = |n: usize| json!({"input_ids": prompt(n), "max_tokens": 2, "temperature": 0});
    // (label, granularity (None: local-split), wire dtype, --max-prefill-tokens, lengths).
    type Config<'a> = (&'a str, Option<u32>, &'a str, usize, Vec<usize>);
    let configs: Vec<Config> = vec![
        ("local-split", None, "f32", 256, lengths.clone()),
        ("shared g60 f32", Some(60), "f32", 256, lengths.clone()),
        ("shared g60 bf16", Some(60), "bf16", 256, lengths.clone()),
        ("shared g4 f32", Some(4), "f32", 256, lengths.clone()),
        (
            "shared g4 bf16, 2048 tokens per step",
            Some(4),
            "bf16",
            2048,
            lengths.clone(),
        ),
    ];
    let mut reference: HashMap<usize, Vec<u32>> = HashMap::new();
    for (label, g, wire, budget, ns) in configs {
        // The server default max_payload (1 MB) throughout.
        let server = NatsServer::start();
        let (functions, mut flags) = match g {
            None => (Vec::new(), vec!["--local-experts".to_string()]),
            Some(g) => (
                model.layout(g).functions,
                vec!["--granularity".to_string(), g.to_string()],
            ),
        };
        flags.extend([
            "--wire-dtype".to_string(),
            wire.to_string(),
            "--max-prefill-tokens".to_string(),
            budget.to_string(),
        ]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let d = Deployment::start_on(
            server,
            &model,
            &functions,
            &flags,
            Arc::new(Unlimited),
            "probe",
        )
        .await;
        for n in ns {
            let t = Instant::now();
            let ids = d.generate_ids("t1", &body(n)).await;
            let splits = if g.is_some() {
                d.dispatch_stat("split_requests").await
            } else {
                0
            };
            eprintln!(
                "{label}: {n}-token prompt -> {ids:?} in {:.1?} ({splits} extra requests from splits so far)",
                t.elapsed()
            );
            assert_eq!(ids.len(), 2, "{label}, {n} tokens");
            match reference.get(&n) {
                None => {
                    reference.insert(n, ids);
                }
                Some(r) => assert_eq!(
                    &ids, r,
                    "{label}, {n}-token prompt: ids differ from local-split"
                ),
            }
            if budget >= 2048 && n >= 2048 {
                assert!(
                    splits > 0,
                    "{label}: a {n}-token prefill must be split under 1 MB"
                );
            }
        }
    }
}

/// Admits every tenant but one.
struct RejectOne(&'static str);

impl QuotaGate for RejectOne {
    fn admit<'a>(
        &'a self,
        tenant: &'a str,
        _p: u32,
        _m: u32,
    ) -> BoxFuture<'a, Result<QuotaTicket, ClientError>> {
        Box::pin(async move {
            if tenant == self.0 {
                Err(ClientError {
                    code: faasmoe_proto::generate::ClientErrorCode::QuotaExceeded,
                    message: format!("tenant {tenant} is over its quota"),
                })
            } else {
                Ok(QuotaTicket(Box::new(())))
            }
        })
    }
    fn settle(&self, _ticket: QuotaTicket, _tokens: u32) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_rejected_by_the_quota_gate_gets_quota_exceeded() {
    let Some(model) = Model::load(GQA) else {
        return;
    };
    let layout = model.layout(model.num_experts);
    let d = Deployment::start(
        &model,
        &layout.functions,
        &["--granularity", "8"],
        Arc::new(RejectOne("broke")),
        "probe",
    )
    .await;
    let body = serde_json::to_vec(&greedy_body(&model.prompt(0))).unwrap();
    assert_eq!(d.error_code("broke", body).await, "quota_exceeded");
    // Another tenant is served meanwhile.
    assert_eq!(
        d.generate_ids("rich", &greedy_body(&model.prompt(0))).await,
        model.greedy(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_without_worker_and_without_broker_is_unavailable_within_seconds() {
    let Some(model) = Model::load(GQA) else {
        return;
    };
    let layout = model.layout(4);
    // The function holding the expert that the router picks first for prompt 0's first token
    // in the second MoE layer: certainly called.
    let routes = &model.golden["prompt.0.router_topk"];
    let expert = routes
        .get(1)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()[0] as u32;
    let layer = model.moe_layers[1];
    let missing = layout.function_of(layer, expert).unwrap();
    let mut functions = layout.functions.clone();
    let gone = functions.remove(missing);
    let d = Deployment::start(
        &model,
        &functions,
        &["--granularity", "4", "--activation-timeout-ms", "2000"],
        Arc::new(Unlimited),
        "probe",
    )
    .await;
    let t0 = Instant::now();
    let body = serde_json::to_vec(&greedy_body(&model.prompt(0))).unwrap();
    assert_eq!(
        d.error_code("t1", body).await,
        "unavailable",
        "{} has no worker",
        gone.id
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "unavailable took {:?}",
        t0.elapsed()
    );
    // Also when something holds the activation subject but never answers: bounded by the
    // activation timeout.
    let _silent = d
        .client
        .subscribe(format!("faasmoe.v1.activate.{}", d.model_id))
        .await
        .unwrap();
    d.client.flush().await.unwrap();
    let t0 = Instant::now();
    let body = serde_json::to_vec(&greedy_body(&model.prompt(0))).unwrap();
    assert_eq!(d.error_code("t1", body).await, "unavailable");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "unavailable after a silent broker took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_another_granularity_give_internal() {
    let Some(model) = Model::load(GQA) else {
        return;
    };
    // Workers hold pairs of experts; the controller packs quads, so the first worker of each
    // quad gets experts it does not hold (unknown_expert).
    let d = Deployment::start(
        &model,
        &model.layout(2).functions,
        &["--granularity", "4"],
        Arc::new(Unlimited),
        "probe",
    )
    .await;
    let body = serde_json::to_vec(&greedy_body(&model.prompt(0))).unwrap();
    assert_eq!(d.error_code("t1", body).await, "internal");
}

// ---------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chunks_concatenate_to_the_final_text() {
    let Some(model) = Model::load(TINY) else {
        return;
    };
    let d = Deployment::with_workers(&model, 4, &[]).await;
    let body =
        json!({"prompt": "Hello, my name is", "max_tokens": 16, "temperature": 0, "stream": true});
    let s = stream(&d.client, "t1", &body).await;
    assert_eq!(s.last["type"], "done", "{}", s.last);
    let text: String = s
        .chunks
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    let ids: Vec<u32> = s.chunks.iter().flat_map(token_ids).collect();
    assert_eq!(text, s.last["text"].as_str().unwrap());
    assert_eq!(ids, token_ids(&s.last));
    assert_eq!(ids.len(), 16);
    for (k, c) in s.chunks.iter().enumerate() {
        assert_eq!(c["index"], k as u64, "chunk order");
        assert_eq!(c["id"], s.last["id"]);
    }
    // The same tokens as without streaming.
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    assert_eq!(d.generate_ids("t1", &plain).await, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_streams_a_json_generate_request() {
    let Some(model) = Model::load(TINY) else {
        return;
    };
    let root = workspace_root();
    let py_path = root.join(".tools/py");
    let has_nats = |p: &Path| {
        Command::new("python3")
            .args(["-c", "import nats"])
            .env("PYTHONPATH", p)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !has_nats(&py_path) {
        let st = Command::new(root.join("scripts/install-test-deps"))
            .status()
            .expect("run scripts/install-test-deps");
        assert!(
            st.success() && has_nats(&py_path),
            "nats-py could not be installed into {}",
            py_path.display()
        );
    }
    let d = Deployment::with_workers(&model, 4, &[]).await;
    let url = d.server.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(root.join("controller/tests/python_client.py"))
            .args([url.as_str(), "py-tenant"])
            .env("PYTHONPATH", py_path)
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("chunk ")).count(),
        8,
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("done: ")), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_disconnects_stops_its_stream() {
    let Some(model) = Model::load(TINY) else {
        return;
    };
    let g = 4;
    let functions = model.layout(g).functions;
    let d = Deployment::with_workers(&model, g, &[]).await;
    let before = d.expert_requests(&functions).await;
    let inbox = d.client.new_inbox();
    let mut sub = d.client.subscribe(inbox.clone()).await.unwrap();
    let body =
        json!({"input_ids": model.prompt(0), "max_tokens": 400, "temperature": 0, "stream": true});
    d.client
        .publish_with_reply(
            "faasmoe.v1.generate.t1",
            inbox,
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap();
    for _ in 0..2 {
        let m = tokio::time::timeout(REQUEST_TIMEOUT, sub.next())
            .await
            .expect("chunk in time")
            .expect("open");
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["type"], "chunk", "{v}");
    }
    sub.unsubscribe().await.unwrap();
    drop(sub);
    d.client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = d.expert_requests(&functions).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = d.expert_requests(&functions).await;
    assert_eq!(a, b, "expert requests still growing after the client left");
    eprintln!("{} expert requests for the abandoned stream", a - before);
    // Each token costs at least one request per MoE layer: far fewer than 400 tokens' worth.
    let per_token = model.moe_layers.len() as u64;
    assert!(
        a - before < 100 * per_token,
        "{} expert requests: the stream was not stopped early",
        a - before
    );
    // The controller still serves.
    assert_eq!(
        d.generate_ids("t2", &greedy_body(&model.prompt(1))).await,
        model.greedy(1)
    );
}
