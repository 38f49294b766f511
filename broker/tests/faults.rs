//! The fault suite: a real nats-server, the broker's activator spawning real
//! `faasmoe-expert-worker` processes, real controllers, clients sending greedy generate
//! requests while something breaks. Each scenario prints one line:
//!
//! `fault <scenario>: sent N, correct N, failed with a typed error N, lost N, slowest S s`
//!
//! where *correct* means the greedy ids equal those of the same request on the healthy
//! system, *lost* a request that got no answer within its own timeout (or a wrong answer),
//! and every scenario must lose nothing. (nats-server killed and restarted is
//! `server_restart.rs`; a killed node of the 3-node cluster is in `cluster.rs`.)
//!
//! Build the binaries first: `cargo build --workspace --bins`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faasmoe_broker::{ActivationConfig, Activator, Deployment, InstanceState, LocalProcessBackend};
use faasmoe_controller::quota::Unlimited;
use faasmoe_controller::service::{ControllerSettings, ControllerTask};
use faasmoe_e2e::{cargo_bin, NatsServer};
use faasmoe_proto::connection::NatsArgs;
use serde_json::Value;

const MODEL: &str = "tiny";
const GRANULARITY: u32 = 4;
const PROMPT: [u32; 5] = [3, 14, 15, 92, 65];

/// The outcome of one client request.
#[derive(Debug)]
enum Outcome {
    Correct,
    Typed(String),
    Lost(String),
}

/// What a scenario's clients saw.
#[derive(Debug, Default)]
struct Tally {
    correct: usize,
    typed: Vec<String>,
    lost: Vec<String>,
    slowest: Duration,
}

impl Tally {
    fn add(&mut self, (o, took): (Outcome, Duration)) {
        self.slowest = self.slowest.max(took);
        match o {
            Outcome::Correct => self.correct += 1,
            Outcome::Typed(e) => self.typed.push(e),
            Outcome::Lost(e) => self.lost.push(e),
        }
    }

    fn report(&self, scenario: &str) {
        let sent = self.correct + self.typed.len() + self.lost.len();
        println!(
            "fault {scenario}: sent {sent}, correct {}, failed with a typed error {}, lost {}, slowest {:.2} s",
            self.correct,
            self.typed.len(),
            self.lost.len(),
            self.slowest.as_secs_f64()
        );
        if !self.typed.is_empty() {
            println!("  typed errors: {:?}", self.typed);
        }
        assert!(
            self.lost.is_empty(),
            "{scenario}: lost requests: {:?}",
            self.lost
        );
    }
}

/// A deployment of the tiny checkpoint on a fresh nats-server.
struct Bed {
    server: NatsServer,
    activator: Activator,
    model_dir: PathBuf,
    client: async_nats::Client,
    reference: Vec<u64>,
    _dir: tempfile::TempDir,
}

fn checkpoint(dir: &Path) -> PathBuf {
    let model_dir = dir.join(MODEL);
    let g = faasmoe_model::random_checkpoint::preset("tiny").unwrap();
    faasmoe_model::random_checkpoint::write_checkpoint(
        &model_dir,
        &g,
        7,
        faasmoe_model::random_checkpoint::DEFAULT_MAX_SHARD_BYTES,
        |_, _| {},
    )
    .unwrap();
    model_dir
}

/// Controller flags for this bed: request timeout `timeout_ms` per expert request.
fn controller_flags(url: &str, model_dir: &Path, timeout_ms: u64) -> Vec<String> {
    [
        "--nats-url",
        url,
        "--model-dir",
        &model_dir.to_string_lossy(),
        "--model-id",
        MODEL,
        "--granularity",
        &GRANULARITY.to_string(),
        "--request-timeout-ms",
        &timeout_ms.to_string(),
        "--max-retries",
        "6",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Bed {
    /// Server, activator (workers idle out after `idle_timeout_ms`, cap `max_instances`), and
    /// the reference ids from one request on the healthy system (which also warms it up).
    async fn start(idle_timeout_ms: u64, max_instances: u32) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let model_dir = checkpoint(dir.path());
        let server = NatsServer::start();
        let mut d = Deployment::new(&model_dir);
        d.model_id = Some(MODEL.into());
        d.granularity = GRANULARITY;
        let backend = LocalProcessBackend {
            worker_bin: cargo_bin("faasmoe-expert-worker"),
            nats: NatsArgs::anonymous(server.url()),
            model_dir: model_dir.clone(),
            model_id: MODEL.into(),
            idle_timeout_ms,
            log_dir: Some(dir.path().join("worker-logs")),
            env: vec![],
        };
        let cfg = ActivationConfig {
            max_instances_per_function: max_instances,
            ready_timeout: Duration::from_secs(30),
            ..ActivationConfig::new(MODEL, d.layout().unwrap())
        };
        let activator = Activator::start(server.connect().await.unwrap(), cfg, Arc::new(backend))
            .await
            .unwrap();
        let client = server.connect().await.unwrap();
        Bed {
            server,
            activator,
            model_dir,
            client,
            reference: Vec::new(),
            _dir: dir,
        }
    }

    /// Waits for a controller to serve, then records the healthy system's answer.
    async fn record_reference(&mut self, max_tokens: u32) {
        let t0 = Instant::now();
        loop {
            if let (Outcome::Correct, _) | (Outcome::Typed(_), _) =
                ask(&self.client, max_tokens, &[], Duration::from_secs(60)).await
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "no controller came up"
            );
        }
        let m = self
            .client
            .request("faasmoe.v1.generate.t1", body(max_tokens).into())
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        self.reference = v["token_ids"]
            .as_array()
            .unwrap_or_else(|| panic!("reference: {v}"))
            .iter()
            .map(|i| i.as_u64().unwrap())
            .collect();
        assert_eq!(self.reference.len(), max_tokens as usize, "{v}");
    }

    fn ready_pids(&self) -> Vec<u32> {
        self.activator
            .instances()
            .into_iter()
            .filter(|i| i.state == InstanceState::Ready)
            .filter_map(|i| i.pid)
            .collect()
    }

    /// `n` concurrent requests, each with its own `timeout`, while `fault` runs.
    async fn load<F: std::future::Future<Output = ()>>(
        &self,
        n: usize,
        max_tokens: u32,
        timeout: Duration,
        fault: F,
    ) -> Tally {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (c, r) = (self.client.clone(), self.reference.clone());
                tokio::spawn(async move { ask(&c, max_tokens, &r, timeout).await })
            })
            .collect();
        fault.await;
        let mut tally = Tally::default();
        for t in tasks {
            tally.add(t.await.unwrap());
        }
        tally
    }
}

fn body(max_tokens: u32) -> String {
    serde_json::json!({"input_ids": PROMPT, "max_tokens": max_tokens, "temperature": 0}).to_string()
}

/// One greedy request; `reference` empty accepts any ids.
async fn ask(
    client: &async_nats::Client,
    max_tokens: u32,
    reference: &[u64],
    timeout: Duration,
) -> (Outcome, Duration) {
    let t0 = Instant::now();
    let req = async_nats::Request::new()
        .payload(body(max_tokens).into())
        .timeout(Some(timeout));
    let o = match client.send_request("faasmoe.v1.generate.t1", req).await {
        Ok(m) => match serde_json::from_slice::<Value>(&m.payload) {
            Ok(v) if v.get("error").is_some() => {
                Outcome::Typed(format!("{}: {}", v["error"]["code"], v["error"]["message"]))
            }
            Ok(v) => {
                let ids: Vec<u64> = v["token_ids"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                if reference.is_empty() || ids == reference {
                    Outcome::Correct
                } else {
                    Outcome::Lost(format!("wrong ids {ids:?} (want {reference:?})"))
                }
            }
            Err(e) => Outcome::Lost(format!("undecodable reply: {e}")),
        },
        Err(e) => Outcome::Lost(format!("no answer: {e}")),
    };
    (o, t0.elapsed())
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, sig) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sigkilled_under_load_lose_nothing() {
    let mut bed = Bed::start(120_000, 2).await;
    let controller = ControllerTask::spawn(
        ControllerSettings::from_flags(controller_flags(&bed.server.url(), &bed.model_dir, 2_000))
            .unwrap(),
        Arc::new(Unlimited),
    );
    bed.record_reference(12).await;
    let mut killed = 0;
    let tally = bed
        .load(16, 12, Duration::from_secs(60), async {
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                for pid in bed.ready_pids() {
                    signal(pid, libc::SIGKILL);
                    killed += 1;
                }
            }
        })
        .await;
    println!(
        "fault workers-sigkilled: {killed} worker processes SIGKILLed in two waves during the load"
    );
    assert!(killed >= 2, "no worker was killed");
    tally.report("workers-sigkilled");
    assert_eq!(tally.correct, 16, "{tally:?}");
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_and_resumed_delays_but_loses_nothing() {
    let mut bed = Bed::start(120_000, 1).await;
    let controller = ControllerTask::spawn(
        ControllerSettings::from_flags(controller_flags(&bed.server.url(), &bed.model_dir, 10_000))
            .unwrap(),
        Arc::new(Unlimited),
    );
    bed.record_reference(8).await;
    let tally = bed
        .load(8, 8, Duration::from_secs(60), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let pid = bed.ready_pids()[0];
            signal(pid, libc::SIGSTOP);
            tokio::time::sleep(Duration::from_secs(3)).await;
            signal(pid, libc::SIGCONT);
        })
        .await;
    tally.report("worker-stopped-3s");
    assert_eq!(tally.correct, 8, "{tally:?}");
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_while_a_second_serves_the_queue_group() {
    let mut bed = Bed::start(120_000, 2).await;
    // Controller A is a real process (so that SIGKILL kills its connection and all it holds);
    // B runs in the test. Both join the queue group `faasmoe-controllers`.
    let mut a = tokio::process::Command::new(cargo_bin("faasmoe"))
        .arg("controller")
        .arg("--no-quota")
        .args(controller_flags(&bed.server.url(), &bed.model_dir, 2_000))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start `faasmoe controller` (cargo build --workspace --bins)");
    let b = ControllerTask::spawn(
        ControllerSettings::from_flags(controller_flags(&bed.server.url(), &bed.model_dir, 2_000))
            .unwrap(),
        Arc::new(Unlimited),
    );
    bed.record_reference(16).await;
    // Both serve before the kill (A is a process: give it the time to load and subscribe).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = a.id().unwrap();
    // The documented behaviour for A's in-flight requests: the client gets no answer within
    // its timeout (the controller held their state; nothing else can finish them), so a
    // client retries them; such a retry goes to the survivor. Clients here do that once.
    let tally_before = bed
        .load(8, 16, Duration::from_secs(10), async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            signal(pid, libc::SIGKILL);
        })
        .await;
    let _ = a.wait().await;
    let in_flight_on_a = tally_before.lost.len();
    let mut retried = Tally::default();
    for _ in 0..in_flight_on_a {
        retried.add(ask(&bed.client, 16, &bed.reference, Duration::from_secs(30)).await);
    }
    // New requests after the kill all go to the survivor.
    let after = bed.load(8, 16, Duration::from_secs(30), async {}).await;
    println!(
        "fault controller-killed: of 8 requests in flight, {} answered, {in_flight_on_a} unanswered (they were on the killed controller) and retried by the client: {} correct",
        tally_before.correct + tally_before.typed.len(),
        retried.correct
    );
    retried.report("controller-killed (retries of its in-flight requests)");
    after.report("controller-killed (new requests)");
    assert_eq!(after.correct, 8, "{after:?}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_to_zero_racing_requests_loses_nothing() {
    // Workers idle out after 300 ms; requests arrive about that often, so some reach a
    // function just as its instance drains.
    let mut bed = Bed::start(300, 2).await;
    let controller = ControllerTask::spawn(
        ControllerSettings::from_flags(controller_flags(&bed.server.url(), &bed.model_dir, 2_000))
            .unwrap(),
        Arc::new(Unlimited),
    );
    bed.record_reference(4).await;
    const REQUESTS: usize = 10;
    let mut tally = Tally::default();
    let mut gaps = [250u64, 300, 320, 280, 350, 310, 290, 400, 305, 295]
        .iter()
        .cycle();
    for _ in 0..REQUESTS {
        tally.add(ask(&bed.client, 4, &bed.reference, Duration::from_secs(60)).await);
        tokio::time::sleep(Duration::from_millis(*gaps.next().unwrap())).await;
    }
    let exits = bed.activator.exited().len();
    println!("fault scale-down-race: {exits} instances exited (scale to zero) during {REQUESTS} requests");
    tally.report("scale-down-race");
    assert_eq!(tally.correct, REQUESTS, "{tally:?}");
    drop(controller);
}
