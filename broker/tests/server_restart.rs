//! Recovery from a nats-server restart under load: a real nats-server, the broker's activator
//! and a controller in-process, real `faasmoe-expert-worker` processes. While eight clients
//! keep generate requests in flight, nats-server is killed (SIGKILL) and started again on
//! the same port 1 s later. Every request must come back correct or with a typed error
//! (none lost), the slowest within 3 s: the controller resends its in-flight expert requests
//! as soon as its connection is back instead of waiting out their 10 s timeout.
//!
//! The clients behave as a careful NATS client does across a server restart (any language
//! can): a request still unanswered when the client's connection comes back is sent again
//! (its first send or its reply may have died with the old connection; each send has its own
//! inbox, and a greedy generate request is idempotent), and *no responders* just after the
//! reconnect (the controller has not resubscribed yet) is retried after a short backoff; all
//! within the request's own timeout.
//!
//! Build the worker first: `cargo build -p faasmoe-expert-worker`.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faasmoe_broker::{ActivationConfig, Activator, Deployment, LocalProcessBackend};
use faasmoe_controller::quota::Unlimited;
use faasmoe_controller::service::{ControllerSettings, ControllerTask};
use faasmoe_e2e::{cargo_bin, free_port, nats_server_bin};
use faasmoe_proto::connection::NatsArgs;
use serde_json::{json, Value};
use tokio::sync::watch;

const MODEL: &str = "tiny";
const GRANULARITY: u32 = 4;
const MAX_TOKENS: usize = 4;
const CLIENTS: usize = 8;
/// Each client request's own timeout (the controller's expert request timeout is 10 s too).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Load before the kill, the server's downtime, load after the restart.
const BEFORE_KILL: Duration = Duration::from_millis(1500);
const DOWNTIME: Duration = Duration::from_secs(1);
const AFTER_RESTART: Duration = Duration::from_secs(3);
/// The bound the issue sets on the slowest request.
const SLOWEST_LIMIT: Duration = Duration::from_secs(3);

/// A nats-server on a fixed loopback port that can be killed and started again on the same
/// port (the harness's `NatsServer` picks a new port per start). Killed on drop.
struct RestartableServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    starts: usize,
}

impl RestartableServer {
    fn start() -> Self {
        let mut s = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            starts: 0,
        };
        s.spawn();
        s
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log(&self, start: usize) -> PathBuf {
        self.dir.path().join(format!("nats-server-{start}.log"))
    }

    /// Starts the server on the port and waits until it accepts connections.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let log = File::create(self.log(self.starts)).unwrap();
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "nats-server exited during start {} with {status}: {}",
                    self.starts,
                    read(&self.log(self.starts))
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server not accepting on {addr}: {}",
                read(&self.log(self.starts))
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RestartableServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Counts the times `client`'s connection came back after being lost (polls its state
/// every 5 ms; async-nats exposes the state, not a stream of it, on a client built
/// elsewhere). Ends when the receiver is dropped.
fn reconnects(client: async_nats::Client) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        let mut was_up = true;
        while !tx.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let up = client.connection_state() == async_nats::connection::State::Connected;
            if up && !was_up {
                tx.send_modify(|n| *n += 1);
            }
            was_up = up;
        }
    });
    rx
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// The ids of the request when nothing was going on.
    Correct,
    /// Other ids (a wrong answer).
    Wrong(Vec<u32>),
    /// A typed error reply (`{"error": {"code": …}}`).
    TypedError(String),
    /// No answer within the client's timeout (or an untyped failure).
    Lost(String),
}

struct Sample {
    issued: Instant,
    latency: Duration,
    outcome: Outcome,
    sends: u32,
}

/// One greedy generate request, sent as the module docs describe; returns the reply body.
async fn generate(
    client: &async_nats::Client,
    link: &mut watch::Receiver<u64>,
    tenant: &str,
    prompt: &[u32],
) -> (Result<Value, String>, u32) {
    let body: bytes::Bytes = serde_json::to_vec(
        &json!({"input_ids": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}),
    )
    .unwrap()
    .into();
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut sends = 0;
    loop {
        let seen = *link.borrow_and_update();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (Err(format!("no reply within {CLIENT_TIMEOUT:?}")), sends);
        }
        sends += 1;
        let req = async_nats::Request::new()
            .payload(body.clone())
            .timeout(Some(left));
        let reply = client.send_request(format!("faasmoe.v1.generate.{tenant}"), req);
        tokio::select! {
            r = reply => match r {
                Ok(m) => return (serde_json::from_slice(&m.payload).map_err(|e| format!("reply is not JSON ({e})")), sends),
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    tokio::time::sleep(Duration::from_millis(50).min(left)).await;
                }
                Err(e) => return (Err(e.to_string()), sends),
            },
            _ = async { let _ = link.wait_for(|n| *n > seen).await; } => {}
        }
    }
}

fn token_ids(v: &Value) -> Option<Vec<u32>> {
    v["token_ids"]
        .as_array()
        .map(|a| a.iter().map(|t| t.as_u64().unwrap() as u32).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_and_restarted_1s_later_loses_no_request_and_the_slowest_takes_under_3s()
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "warn,faasmoe_controller::dispatch=info,faasmoe_broker::activation=info",
                )
            }),
        )
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

    let mut server = RestartableServer::start();
    let url = server.url();
    let mut d = Deployment::new(&model_dir);
    d.model_id = Some(MODEL.into());
    d.granularity = GRANULARITY;
    let layout = d.layout().unwrap();
    let backend = LocalProcessBackend {
        worker_bin: cargo_bin("faasmoe-expert-worker"),
        nats: NatsArgs::anonymous(url.clone()),
        model_dir: model_dir.clone(),
        model_id: MODEL.into(),
        idle_timeout_ms: 120_000, // no scale to zero during the test
        log_dir: Some(dir.path().join("worker-logs")),
        // Workers hold each request for a 5 ms batching window, so that expert requests are
        // surely in flight at the kill (their replies then come out during the outage; with
        // the worker reconnecting before the controller they are lost). Without the
        // controller's resend on reconnect this test fails: those requests wait out 10 s.
        env: vec![("FAASMOE_BATCH_MAX_WAIT_US".into(), "5000".into())],
    };
    let cfg = ActivationConfig {
        max_instances_per_function: 1,
        ready_timeout: Duration::from_secs(30),
        ..ActivationConfig::new(MODEL, layout)
    };
    let activator = Activator::start(
        async_nats::connect(url.clone()).await.unwrap(),
        cfg,
        Arc::new(backend),
    )
    .await
    .unwrap();

    let mdir = model_dir.to_string_lossy().into_owned();
    let gran = GRANULARITY.to_string();
    let settings = ControllerSettings::from_flags([
        "--nats-url",
        &url,
        "--model-dir",
        &mdir,
        "--model-id",
        MODEL,
        "--granularity",
        &gran,
    ])
    .unwrap();
    let mut controller = ControllerTask::spawn(settings, Arc::new(Unlimited));
    let client = async_nats::connect(url.clone()).await.unwrap();
    controller
        .wait_serving(&client, "probe", Duration::from_secs(30))
        .await
        .unwrap();

    // Warm-up: every prompt once (this starts the functions); its ids are the reference.
    let prompts: Vec<Vec<u32>> = (0..CLIENTS as u32)
        .map(|i| (0..(3 + i)).map(|j| 11 + 97 * i + 31 * j).collect())
        .collect();
    let mut link = reconnects(client.clone());
    let mut want = Vec::new();
    for p in &prompts {
        let (r, _) = generate(&client, &mut link, "warmup", p).await;
        let v = r.unwrap_or_else(|e| panic!("warm-up request: {e}"));
        want.push(token_ids(&v).unwrap_or_else(|| panic!("warm-up reply: {v}")));
    }
    let spawned_before = activator.spawn_count();

    // Load: eight clients, each with its own connection, one request in flight at a time.
    let t_load = Instant::now();
    let stop_issuing = t_load + BEFORE_KILL + DOWNTIME + AFTER_RESTART;
    let mut clients = Vec::new();
    for (i, (p, w)) in prompts.iter().cloned().zip(want.clone()).enumerate() {
        let c = async_nats::connect(url.clone()).await.unwrap();
        clients.push(tokio::spawn(async move {
            let mut link = reconnects(c.clone());
            let mut samples = Vec::new();
            while Instant::now() < stop_issuing {
                let issued = Instant::now();
                let (r, sends) = generate(&c, &mut link, &format!("t{}", i % 2), &p).await;
                let outcome = match r {
                    Ok(v) => match (token_ids(&v), v["error"]["code"].as_str()) {
                        (Some(ids), _) if ids == w => Outcome::Correct,
                        (Some(ids), _) => Outcome::Wrong(ids),
                        (None, Some(code)) => {
                            Outcome::TypedError(format!("{code}: {}", v["error"]["message"]))
                        }
                        (None, None) => Outcome::Lost(format!("untyped reply {v}")),
                    },
                    Err(e) => Outcome::Lost(e),
                };
                samples.push(Sample {
                    issued,
                    latency: issued.elapsed(),
                    outcome,
                    sends,
                });
            }
            samples
        }));
    }
    tokio::time::sleep_until((t_load + BEFORE_KILL).into()).await;
    let killed_at = Instant::now();
    server.kill();
    tokio::time::sleep(DOWNTIME).await;
    server.spawn();
    let restarted_at = Instant::now();
    let mut samples = Vec::new();
    for c in clients {
        samples.extend(c.await.unwrap());
    }
    let spawned_during = activator.spawn_count() - spawned_before;
    controller.stop().await;
    activator.shutdown(Duration::from_secs(5)).await;

    let count = |f: &dyn Fn(&Outcome) -> bool| samples.iter().filter(|s| f(&s.outcome)).count();
    let correct = count(&|o| *o == Outcome::Correct);
    let typed = count(&|o| matches!(o, Outcome::TypedError(_)));
    let wrong = count(&|o| matches!(o, Outcome::Wrong(_)));
    let lost = count(&|o| matches!(o, Outcome::Lost(_)));
    let in_flight: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.issued <= killed_at && s.issued + s.latency >= killed_at)
        .collect();
    let slowest = samples.iter().map(|s| s.latency).max().unwrap_or_default();
    let resent = samples.iter().filter(|s| s.sends > 1).count();
    // How long after the restart the last request in flight at the kill completed.
    let recovered = in_flight
        .iter()
        .map(|s| (s.issued + s.latency).saturating_duration_since(restarted_at))
        .max()
        .unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "nats-server killed {:.0} ms into the load, restarted {:.0} ms later: requests sent {}, correct {correct}, \
         failed with a typed error {typed}, wrong {wrong}, lost {lost}; in flight at the kill {} (slowest of them {:.0} ms, the last done {:.0} ms after the restart); \
         slowest overall {:.0} ms; requests the clients sent again {resent}; instances spawned during the load {spawned_during}",
        ms(killed_at - t_load),
        ms(restarted_at - killed_at),
        samples.len(),
        in_flight.len(),
        ms(in_flight.iter().map(|s| s.latency).max().unwrap_or_default()),
        ms(recovered),
        ms(slowest),
    );
    for s in samples.iter().filter(|s| s.outcome != Outcome::Correct) {
        eprintln!(
            "  issued {:.0} ms after the kill, took {:.0} ms: {:?}",
            ms(s.issued.saturating_duration_since(killed_at)),
            ms(s.latency),
            s.outcome
        );
    }
    assert!(
        !in_flight.is_empty(),
        "no request was in flight at the kill: the test tested nothing"
    );
    assert_eq!(lost, 0, "lost requests");
    assert_eq!(wrong, 0, "wrong answers");
    assert_eq!(
        typed, 0,
        "typed errors (none expected: the outage is shorter than every timeout)"
    );
    assert!(
        slowest <= SLOWEST_LIMIT,
        "slowest request {slowest:?} > {SLOWEST_LIMIT:?}"
    );
    assert_eq!(
        spawned_during, 0,
        "a running instance was replaced during the outage"
    );
}
