//! `faasmoe bench`: the paper's comparison in one run — every deployment mode serves the same
//! workload (Azure trace replay, the same token ids for every mode), measured from /proc, the
//! controllers' dispatch counters, nats-server's /varz and the broker's function events; plus
//! a granularity sweep of faasmoe-shared and single-expert cold start / memory with the real
//! Qwen1.5-MoE-A2.7B layer geometry. Writes `report.md`, CSVs and PNG plots.
//!
//! Modes (see ARCHITECTURE.md):
//! - `baseline`: one `faasmoe serve-baseline` process (candle-transformers' monolithic
//!   qwen2_moe, every weight resident) per tenant;
//! - `shared-baseline`: one such process serving every tenant, one request at a time (the
//!   model has one KV cache);
//! - `faasmoe-shared`: broker + one controller for all tenants, expert functions on demand;
//! - `faasmoe-private`: broker + one controller per tenant (`--tenants <t>`), the same functions;
//! - `local-split`: one controller with `--local-experts` (experts in-process, no broker);
//! - `local-baseline`: one such controller per tenant (`--local-experts --tenants <t>`): our
//!   own unsplit model per tenant, with the same kernels and dtype as the controller and the
//!   workers, so a ratio against it measures the architecture and not the kernel.
//!
//! Every mode has a nats-server (the client transport); its memory and CPU are counted in
//! every mode. With one tenant, shared-baseline is the same deployment as baseline,
//! faasmoe-private the same as faasmoe-shared and local-baseline the same as local-split: the
//! bench measures it once and reports it under both names.

mod controller;
pub mod decode;
mod phases;
mod plot;
pub mod prefill;
mod serve;

pub use serve::{run as serve_baseline, ServeBaselineArgs};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faasmoe_broker::{EmbeddedServer, ServerOptions};
use faasmoe_controller::tokenizer::QwenTokenizer;
use faasmoe_proto::events::{EventKind, FunctionEvent};
use faasmoe_proto::generate::GenerateResponse;
use futures::StreamExt;
use procfs::Current as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::monitor::{self, percentile};
use crate::stack::{log_file, model_id_of, sibling};
use crate::workload::{self, Scale, ScaleArgs};
use faasmoe_broker::InternalCredentials;

/// Settings of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Checkpoint for the mode comparison; default: demo-data/qwen15-moe-demo (generated if absent).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Checkpoint for the per-expert memory and cold-start measurement; default:
    /// demo-data/qwen15-moe-a2.7b-l1-v1024 (the exact Qwen1.5-MoE-A2.7B layer geometry, 1 layer,
    /// vocab 1024, random weights; generated if absent).
    #[arg(long)]
    pub expert_model: Option<PathBuf>,
    /// Skip the per-expert measurement.
    #[arg(long)]
    pub no_expert_bench: bool,
    /// Run only the decode-scaling section (per-layer decode step vs batch and context, next
    /// to the read-bandwidth floor) and write decode.csv.
    #[arg(long)]
    pub decode_only: bool,
    /// Skip the decode-scaling section.
    #[arg(long)]
    pub no_decode_bench: bool,
    /// Checkpoint of the decode-scaling section (default: the expert model).
    #[arg(long)]
    pub decode_model: Option<PathBuf>,
    /// Batch sizes of the decode-scaling section.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    pub decode_batches: Vec<usize>,
    /// Context lengths (tokens cached) of the decode-scaling section: the batch sweep at the
    /// first, batch 1 at each.
    #[arg(long, value_delimiter = ',', default_value = "16,4096")]
    pub decode_contexts: Vec<usize>,
    /// Timed decode steps per point (median reported).
    #[arg(long, default_value_t = 10)]
    pub decode_reps: usize,
    /// Buffer of the read-bandwidth measurement, MiB.
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
    /// Qwen's BPE ranks (for generating the demo checkpoint's tokenizer).
    #[arg(long, default_value = ".tools/qwen.tiktoken")]
    pub tiktoken: PathBuf,
    /// Tenant counts.
    #[arg(long, value_delimiter = ',')]
    pub tenants: Option<Vec<usize>>,
    /// Granularities (experts per function) of the faasmoe-shared sweep (at the largest tenant count).
    #[arg(long, value_delimiter = ',')]
    pub granularities: Option<Vec<u32>>,
    /// Granularity of faasmoe-shared/-private in the mode comparison (default: 20 if swept, else the largest swept).
    #[arg(long)]
    pub granularity: Option<u32>,
    /// Modes to run (baseline, shared-baseline, faasmoe-shared, faasmoe-private, local-split,
    /// local-baseline).
    #[arg(long, value_delimiter = ',')]
    pub modes: Option<Vec<String>>,
    /// Requests per tenant.
    #[arg(long)]
    pub requests: Option<usize>,
    /// How the trace is shrunk.
    #[command(flatten)]
    pub scale: ScaleArgs,
    /// Largest prompt (tokens) after scaling.
    #[arg(long)]
    pub max_prompt: Option<u32>,
    /// Largest output (tokens) after scaling.
    #[arg(long)]
    pub max_output: Option<u32>,
    /// Expert workers exit after this many ms idle.
    #[arg(long, default_value_t = 10_000)]
    pub idle_timeout_ms: u64,
    /// Most instances per function.
    #[arg(long, default_value_t = 2)]
    pub max_instances: u32,
    /// Seconds to keep sampling after the workload (to see scale to zero); default: idle timeout + 2 s, 0 with --quick.
    #[arg(long)]
    pub tail_s: Option<f64>,
    /// Sampling interval, ms.
    #[arg(long, default_value_t = 500)]
    pub sample_ms: u64,
    /// Spawn → READY repeats per expert set.
    #[arg(long)]
    pub cold_start_repeats: Option<usize>,
    /// A subset that finishes in about 15 minutes on 2 cores: tenants 1,3; granularities 4,10,60;
    /// 2 requests per tenant; prompts ≤ 32, outputs ≤ 8 tokens; 5 cold-start repeats.
    #[arg(long)]
    pub quick: bool,
    /// Skip the warm phase (the workload replayed once the functions it needs are started).
    #[arg(long)]
    pub no_warm: bool,
    /// Concurrencies of the closed-loop capacity sweep (run for every mode at the largest
    /// tenant count); default 1,2,4,8 with --quick, else 1,2,4,8,16,32.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Option<Vec<usize>>,
    /// Skip the capacity sweep.
    #[arg(long)]
    pub no_sweep: bool,
    /// Requests each client of the sweep sends, one after another (default 2 with --quick, else 4).
    #[arg(long)]
    pub sweep_requests: Option<usize>,
    /// Results folder (default: results/bench-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Mode {
    Baseline,
    SharedBaseline,
    FaasmoeShared,
    FaasmoePrivate,
    LocalSplit,
    LocalBaseline,
}

const ALL_MODES: [Mode; 6] = [
    Mode::Baseline,
    Mode::SharedBaseline,
    Mode::FaasmoeShared,
    Mode::FaasmoePrivate,
    Mode::LocalSplit,
    Mode::LocalBaseline,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::SharedBaseline => "shared-baseline",
            Mode::FaasmoeShared => "faasmoe-shared",
            Mode::FaasmoePrivate => "faasmoe-private",
            Mode::LocalSplit => "local-split",
            Mode::LocalBaseline => "local-baseline",
        }
    }
    fn parse(s: &str) -> anyhow::Result<Self> {
        ALL_MODES
            .iter()
            .copied()
            .find(|m| m.name() == s)
            .with_context(|| format!("unknown mode `{s}`"))
    }
    fn uses_functions(self) -> bool {
        matches!(self, Mode::FaasmoeShared | Mode::FaasmoePrivate)
    }
}

/// One planned run.
#[derive(Debug, Clone)]
struct Spec {
    mode: Mode,
    tenants: usize,
    granularity: Option<u32>,
    /// Reported from the run of this (mode, granularity) instead (identical deployment).
    same_as: Option<Mode>,
}

impl Spec {
    fn key(&self) -> String {
        match self.granularity {
            Some(g) => format!("{}-t{}-g{g}", self.mode.name(), self.tenants),
            None => format!("{}-t{}", self.mode.name(), self.tenants),
        }
    }
}

/// One request of the workload (the same for every mode).
#[derive(Debug, Clone)]
struct Req {
    tenant: String,
    index: usize,
    at_s: f64,
    ids: Vec<u32>,
    max_tokens: u32,
}

#[derive(Debug, Clone, Default)]
struct ReqResult {
    tenant: String,
    index: usize,
    sent_s: f64,
    e2e_ms: f64,
    ok: Option<GenerateResponse>,
    error: Option<String>,
}

/// Role totals of one sample.
#[derive(Debug, Clone, Copy, Default)]
struct RoleTotals {
    processes: usize,
    rss: u64,
    pss: u64,
    cpu_percent: f64,
}

#[derive(Debug, Clone)]
struct Sample {
    t_s: f64,
    roles: BTreeMap<&'static str, RoleTotals>,
}

impl Sample {
    fn total(&self) -> RoleTotals {
        let mut t = RoleTotals::default();
        for r in self.roles.values() {
            t.processes += r.processes;
            t.rss += r.rss;
            t.pss += r.pss;
            t.cpu_percent += r.cpu_percent;
        }
        t
    }
    fn workers(&self) -> usize {
        self.roles.get("worker").map(|r| r.processes).unwrap_or(0)
    }
}

/// /proc sampler of one deployment: fixed processes by role, workers = children of the broker.
struct Sampler {
    start: Instant,
    fixed: Vec<(&'static str, i32)>,
    worker_parent: Option<i32>,
    last: Option<(Instant, BTreeMap<i32, u64>)>,
    samples: Vec<Sample>,
}

fn page_size() -> u64 {
    procfs::page_size()
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(all) = procfs::process::all_processes() else {
        return vec![];
    };
    all.filter_map(|p| p.ok())
        .filter_map(|p| p.stat().ok())
        .filter(|s| s.ppid == parent && s.state != 'Z')
        .map(|s| s.pid)
        .collect()
}

impl Sampler {
    fn procs(&self) -> Vec<(&'static str, i32)> {
        let mut v = self.fixed.clone();
        if let Some(b) = self.worker_parent {
            v.extend(children_of(b).into_iter().map(|p| ("worker", p)));
        }
        v
    }

    fn sample(&mut self) {
        let now = Instant::now();
        let mut roles: BTreeMap<&'static str, RoleTotals> = BTreeMap::new();
        for (r, _) in &self.fixed {
            roles.entry(r).or_default();
        }
        if self.worker_parent.is_some() {
            roles.entry("worker").or_default();
        }
        let mut ticks = BTreeMap::new();
        for (role, pid) in self.procs() {
            let Some(r) = monitor::read_process(pid) else {
                continue;
            };
            let e = roles.entry(role).or_default();
            e.processes += 1;
            e.rss += r.rss_bytes;
            e.pss += r.pss_bytes;
            if let Some((prev_t, prev)) = &self.last {
                let dt = now.duration_since(*prev_t).as_secs_f64();
                if let (Some(p0), true) = (prev.get(&pid), dt > 0.0) {
                    e.cpu_percent += monitor::cpu_percent(*p0, r.cpu_ticks, dt);
                }
            }
            ticks.insert(pid, r.cpu_ticks);
        }
        self.last = Some((now, ticks));
        self.samples.push(Sample {
            t_s: now.duration_since(self.start).as_secs_f64(),
            roles,
        });
    }

    /// CPU seconds used so far by the deployment: fixed processes with their reaped children
    /// (exited workers), plus live workers.
    fn cpu_seconds(&self) -> f64 {
        let mut ticks = 0u64;
        for (_, pid) in &self.fixed {
            if let Ok(s) = procfs::process::Process::new(*pid).and_then(|p| p.stat()) {
                ticks += s.utime + s.stime + s.cutime.max(0) as u64 + s.cstime.max(0) as u64;
            }
        }
        if let Some(b) = self.worker_parent {
            for pid in children_of(b) {
                if let Ok(s) = procfs::process::Process::new(pid).and_then(|p| p.stat()) {
                    ticks += s.utime + s.stime;
                }
            }
        }
        ticks as f64 / procfs::ticks_per_second() as f64
    }
}

/// A running deployment of one mode.
struct Deployment {
    server: EmbeddedServer,
    /// This deployment's internal passwords (generated per deployment).
    credentials: InternalCredentials,
    /// One connection per tenant, with the tenant's own credentials (created at start).
    tenant_clients: BTreeMap<String, async_nats::Client>,
    monitor_port: u16,
    broker: Option<Child>,
    serving: Vec<Child>,
    model_id: String,
}

fn start_server(
    log_dir: &Path,
    credentials: &InternalCredentials,
) -> anyhow::Result<(EmbeddedServer, u16)> {
    // Two free ports, distinct; a port taken between the probe and the server's bind is retried.
    let mut last = None;
    for _ in 0..4 {
        let monitor_port = faasmoe_broker::server::free_port()?;
        let mut port = faasmoe_broker::server::free_port()?;
        while port == monitor_port {
            port = faasmoe_broker::server::free_port()?;
        }
        let _ = std::fs::remove_dir_all(log_dir.join("nats-runtime"));
        let opts = ServerOptions {
            internal_credentials: Some(credentials.clone()),
            config: faasmoe_broker::server::default_config(),
            runtime_dir: Some(log_dir.join("nats-runtime")),
            port: Some(port),
            monitor_port: Some(monitor_port),
            log_file: Some(log_dir.join("nats-server.log")),
            ..Default::default()
        };
        std::fs::create_dir_all(log_dir)?;
        match EmbeddedServer::start(opts) {
            Ok(server) => return Ok((server, monitor_port)),
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow::Error::from(last.expect("tried"))
        .context("starting nats-server (run scripts/install-nats-server?)"))
}

/// Creates `tenants` (default quotas) on `server` and connects as each; also returns the
/// admin connection (the broker's user) that created them.
async fn tenant_clients(
    server: &EmbeddedServer,
    credentials: &InternalCredentials,
    tenants: &[String],
) -> anyhow::Result<(async_nats::Client, BTreeMap<String, async_nats::Client>)> {
    let url = server.url();
    let admin_client = faasmoe_proto::connection::connect(
        url,
        Some("broker"),
        Some(&credentials.broker),
        "faasmoe-bench-admin",
    )
    .await?;
    let admin =
        server.tenant_admin(faasmoe_broker::TenantStore::open_default(admin_client.clone()).await?);
    let mut clients = BTreeMap::new();
    for t in tenants {
        let creds = admin.create(t, faasmoe_broker::Quota::default()).await?;
        clients.insert(
            t.clone(),
            faasmoe_proto::connection::connect(
                url,
                Some(&creds.user),
                Some(&creds.password),
                &format!("faasmoe-bench-{t}"),
            )
            .await?,
        );
    }
    Ok((admin_client, clients))
}

impl Deployment {
    async fn start(
        spec: &Spec,
        tenants: &[String],
        model: &Path,
        a: &BenchArgs,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let model_id = model_id_of(model)?;
        let credentials = InternalCredentials::generate();
        let (server, monitor_port) = start_server(log_dir, &credentials)?;
        let url = server.url().to_string();
        // The load comes from the tenants themselves, each on its own credentials (the
        // controllers run without quotas).
        let (_, tenant_clients) = tenant_clients(&server, &credentials, tenants).await?;
        let me = std::env::current_exe()?;
        let mut serving = Vec::new();
        let mut broker = None;
        let controller = |extra: Vec<String>, name: &str| -> anyhow::Result<Child> {
            Command::new(&me)
                .args([
                    "controller",
                    "--no-quota",
                    "--nats-url",
                    &url,
                    "--nats-user",
                    "controller",
                ])
                .env("NATS_PASSWORD", &credentials.controller)
                .arg("--model-dir")
                .arg(model)
                .args(["--model-id", &model_id])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log_file(log_dir, name)?)
                .kill_on_drop(true)
                .spawn()
                .context("starting a controller")
        };
        let baseline = |ts: &[String], name: &str| -> anyhow::Result<Child> {
            Command::new(&me)
                .args([
                    "serve-baseline",
                    "--nats-url",
                    &url,
                    "--nats-user",
                    "controller",
                ])
                .env("NATS_PASSWORD", &credentials.controller)
                .arg("--model")
                .arg(model)
                .arg("--tenants")
                .arg(ts.join(","))
                .stdout(Stdio::null())
                .stderr(log_file(log_dir, name)?)
                .kill_on_drop(true)
                .spawn()
                .context("starting serve-baseline")
        };
        let g = spec.granularity.unwrap_or(1);
        if spec.mode.uses_functions() {
            broker = Some(
                crate::stack::broker_command(&crate::stack::BrokerLaunch {
                    url: &url,
                    credentials: &credentials,
                    model,
                    model_id: &model_id,
                    granularity: g,
                    idle_timeout_ms: a.idle_timeout_ms,
                    max_instances: a.max_instances,
                    log_dir,
                })?
                .spawn()
                .context("starting faasmoe-broker")?,
            );
        }
        match spec.mode {
            Mode::Baseline => {
                for t in tenants {
                    serving.push(baseline(
                        std::slice::from_ref(t),
                        &format!("baseline-{t}.log"),
                    )?);
                }
            }
            Mode::SharedBaseline => serving.push(baseline(tenants, "baseline-shared.log")?),
            // The controllers take the granularity from the broker's deployment record.
            Mode::FaasmoeShared => serving.push(controller(Vec::new(), "controller.log")?),
            Mode::FaasmoePrivate => {
                for t in tenants {
                    serving.push(controller(
                        vec!["--tenants".into(), t.clone()],
                        &format!("controller-{t}.log"),
                    )?);
                }
            }
            Mode::LocalSplit => serving.push(controller(
                vec!["--local-experts".into()],
                "controller.log",
            )?),
            Mode::LocalBaseline => {
                for t in tenants {
                    serving.push(controller(
                        vec!["--local-experts".into(), "--tenants".into(), t.clone()],
                        &format!("controller-{t}.log"),
                    )?);
                }
            }
        }
        let d = Self {
            server,
            credentials,
            tenant_clients,
            monitor_port,
            broker,
            serving,
            model_id,
        };
        d.wait_ready(tenants, Duration::from_secs(900)).await?;
        Ok(d)
    }

    /// The operator's connection (user `broker`): events and the controllers' stats.
    async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        Ok(faasmoe_proto::connection::connect(
            self.server.url(),
            Some("broker"),
            Some(&self.credentials.broker),
            "faasmoe-bench",
        )
        .await?)
    }

    async fn wait_ready(&self, tenants: &[String], limit: Duration) -> anyhow::Result<()> {
        use faasmoe_proto::connection::answers;
        // The broker's activation subject may be requested by controllers only.
        let client = faasmoe_proto::connection::connect(
            self.server.url(),
            Some("controller"),
            Some(&self.credentials.controller),
            "faasmoe-bench-probe",
        )
        .await?;
        let t0 = Instant::now();
        let mut pending: Vec<String> = tenants.to_vec();
        let mut broker_up = self.broker.is_none();
        let act = faasmoe_proto::subject::activate(&self.model_id)?;
        while t0.elapsed() < limit {
            let mut still = Vec::new();
            for t in pending {
                // An empty body is a bad request: any reply means the tenant is served.
                let subject = faasmoe_proto::subject::generate(&t)?;
                if !answers(
                    &self.tenant_clients[&t],
                    subject,
                    b"",
                    Duration::from_secs(2),
                )
                .await
                {
                    still.push(t);
                }
            }
            pending = still;
            if !broker_up {
                broker_up = answers(&client, act.clone(), b"{}", Duration::from_secs(2)).await;
            }
            if pending.is_empty() && broker_up {
                return Ok(());
            }
            for c in &self.serving {
                if c.id().is_none() {
                    bail!("a serving process exited during startup; see its log");
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        bail!("the deployment did not come up within {limit:?} (not served: {pending:?}, broker ready: {broker_up})")
    }

    fn sampler(&self) -> Sampler {
        let mut fixed = vec![("nats", self.server.pid() as i32)];
        if let Some(b) = &self.broker {
            fixed.push(("broker", b.id().unwrap_or(0) as i32));
        }
        for c in &self.serving {
            fixed.push(("serving", c.id().unwrap_or(0) as i32));
        }
        Sampler {
            start: Instant::now(),
            fixed,
            worker_parent: self.broker.as_ref().and_then(|b| b.id()).map(|p| p as i32),
            last: None,
            samples: vec![],
        }
    }

    async fn stop(mut self) {
        let mut all: Vec<&mut Child> = self.serving.iter_mut().collect();
        if let Some(b) = self.broker.as_mut() {
            all.push(b);
        }
        for child in all {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        self.server.stop();
    }
}

/// nats-server's /varz counters.
#[derive(Debug, Clone, Copy, Default)]
struct Varz {
    in_msgs: u64,
    out_msgs: u64,
    in_bytes: u64,
    out_bytes: u64,
}

async fn varz(port: u16) -> anyhow::Result<Varz> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1).context("no HTTP body")?;
    let v: serde_json::Value = serde_json::from_str(body)?;
    let g = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Varz {
        in_msgs: g("in_msgs"),
        out_msgs: g("out_msgs"),
        in_bytes: g("in_bytes"),
        out_bytes: g("out_bytes"),
    })
}

/// Dispatch counters summed over the controllers (scatter-gather on
/// `faasmoe.v1.admin.controller_stats`).
#[derive(Debug, Clone, Copy, Default)]
struct Dispatch {
    controllers: usize,
    invocations: u64,
    bytes: u64,
    activations: u64,
}

async fn dispatch_stats(client: &async_nats::Client, expected: usize) -> anyhow::Result<Dispatch> {
    let mut d = Dispatch::default();
    if expected == 0 {
        return Ok(d);
    }
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(
            faasmoe_proto::subject::admin("controller_stats")?,
            inbox,
            "".into(),
        )
        .await?;
    client.flush().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while d.controllers < expected {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await else {
            break;
        };
        let s = faasmoe_proto::stats::ControllerStats::decode(&m.payload)
            .context("a controller's controller_stats")?
            .dispatch;
        d.controllers += 1;
        d.invocations += s.invocations;
        d.bytes += s.bytes_sent + s.bytes_received;
        d.activations += s.activations;
    }
    Ok(d)
}

/// What one run measured.
#[derive(Debug, Clone)]
struct RunResult {
    spec: Spec,
    skipped: Option<String>,
    load_s: f64,
    wall_s: f64,
    requests: Vec<ReqResult>,
    /// Samples with t relative to the workload start.
    samples: Vec<Sample>,
    idle: Option<RoleTotals>,
    cpu_s: f64,
    dispatch: Dispatch,
    varz: Varz,
    cold_starts: Vec<f64>,
    /// When function instances became ready (`ready` events), s since the workload start.
    ready_at_s: Vec<f64>,
    spawned: usize,
    /// The warm phase (after the cold workload and a priming pass).
    warm: Option<phases::Phase>,
    /// The capacity sweep's points, in increasing concurrency.
    sweep: Vec<phases::Phase>,
}

#[derive(Debug, Clone, Default)]
struct Summary {
    ok: usize,
    errors: usize,
    prompt_tokens: u64,
    completion_tokens: u64,
    tok_s: f64,
    ttft: Vec<f64>,
    tpot: Vec<f64>,
    /// TPOT of the warm requests: those during which no function instance became ready.
    tpot_warm: Vec<f64>,
    pss_mean: f64,
    pss_peak: f64,
    rss_mean: f64,
    rss_peak: f64,
    cpu_percent: f64,
    inv_per_token: f64,
    dispatch_bytes_per_token: f64,
    nats_bytes_per_token: f64,
    nats_msgs_per_token: f64,
    peak_instances: usize,
}

/// Time per output token after the first, ms: `(total − TTFT) / (completion tokens − 1)`;
/// `None` for fewer than 2 tokens.
fn tpot_ms(r: &GenerateResponse) -> Option<f64> {
    (r.usage.completion_tokens > 1)
        .then(|| (r.timings.total_ms - r.timings.ttft_ms) / (r.usage.completion_tokens - 1) as f64)
}

impl RunResult {
    fn summary(&self) -> Summary {
        let oks: Vec<&GenerateResponse> =
            self.requests.iter().filter_map(|r| r.ok.as_ref()).collect();
        let completion: u64 = oks.iter().map(|r| r.usage.completion_tokens as u64).sum();
        let window: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.t_s >= 0.0 && s.t_s <= self.wall_s + 0.01)
            .collect();
        let n = window.len().max(1) as f64;
        let tot: Vec<RoleTotals> = window.iter().map(|s| s.total()).collect();
        let per_tok = |x: f64| {
            if completion > 0 {
                x / completion as f64
            } else {
                f64::NAN
            }
        };
        let functions = self.spec.mode.uses_functions();
        Summary {
            ok: oks.len(),
            errors: self.requests.len() - oks.len(),
            prompt_tokens: oks.iter().map(|r| r.usage.prompt_tokens as u64).sum(),
            completion_tokens: completion,
            tok_s: completion as f64 / self.wall_s.max(1e-9),
            ttft: oks.iter().map(|r| r.timings.ttft_ms).collect(),
            tpot: oks.iter().filter_map(|r| tpot_ms(r)).collect(),
            tpot_warm: self
                .requests
                .iter()
                .filter(|q| {
                    !self
                        .ready_at_s
                        .iter()
                        .any(|&t| t >= q.sent_s && t <= q.sent_s + q.e2e_ms / 1e3)
                })
                .filter_map(|q| q.ok.as_ref().and_then(tpot_ms))
                .collect(),
            pss_mean: tot.iter().map(|t| t.pss as f64).sum::<f64>() / n,
            pss_peak: tot.iter().map(|t| t.pss as f64).fold(0.0, f64::max),
            rss_mean: tot.iter().map(|t| t.rss as f64).sum::<f64>() / n,
            rss_peak: tot.iter().map(|t| t.rss as f64).fold(0.0, f64::max),
            cpu_percent: self.cpu_s / self.wall_s.max(1e-9) * 100.0,
            inv_per_token: if self.dispatch.controllers > 0 && functions {
                per_tok(self.dispatch.invocations as f64)
            } else {
                f64::NAN
            },
            dispatch_bytes_per_token: if self.dispatch.controllers > 0 && functions {
                per_tok(self.dispatch.bytes as f64)
            } else {
                f64::NAN
            },
            nats_bytes_per_token: per_tok((self.varz.in_bytes + self.varz.out_bytes) as f64),
            nats_msgs_per_token: per_tok((self.varz.in_msgs + self.varz.out_msgs) as f64),
            peak_instances: if functions {
                window.iter().map(|s| s.workers()).max().unwrap_or(0)
            } else {
                0
            },
        }
    }
}

fn mbf(b: f64) -> f64 {
    b / 1e6
}

/// Runs one spec.
#[allow(clippy::too_many_arguments)]
async fn run_one(
    spec: &Spec,
    all_tenants: &[String],
    work: &[Req],
    model: &Path,
    a: &BenchArgs,
    out: &Path,
    tail_s: f64,
    sweep: &[usize],
) -> anyhow::Result<RunResult> {
    let tenants = &all_tenants[..spec.tenants];
    let log_dir = out.join("logs").join(spec.key());
    let t_load = Instant::now();
    let dep = Deployment::start(spec, tenants, model, a, &log_dir).await?;
    let load_s = t_load.elapsed().as_secs_f64();
    let client = dep.connect().await?;
    let sampler = Arc::new(Mutex::new(dep.sampler()));
    sampler.lock().unwrap().sample();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sampler.lock().unwrap().sample();
    let idle = sampler.lock().unwrap().samples.last().map(|s| s.total());

    // Function events: cold starts.
    let cold: Arc<Mutex<BTreeMap<String, f64>>> = Default::default();
    let ready_at: Arc<Mutex<Vec<tokio::time::Instant>>> = Default::default();
    let spawned = Arc::new(Mutex::new(0usize));
    let mut events = client
        .subscribe(faasmoe_proto::subject::events(&dep.model_id)?)
        .await?;
    let (c2, s2, r2) = (cold.clone(), spawned.clone(), ready_at.clone());
    let ev_task = tokio::spawn(async move {
        while let Some(m) = events.next().await {
            if let Ok(e) = FunctionEvent::decode(&m.payload) {
                match e.kind {
                    EventKind::Started => *s2.lock().unwrap() += 1,
                    EventKind::Ready => {
                        r2.lock().unwrap().push(tokio::time::Instant::now());
                        if let Some(ms) = e.cold_start_ms {
                            let mut c = c2.lock().unwrap();
                            let v = c.entry(e.instance_id).or_insert(0.0);
                            *v = v.max(ms);
                        }
                    }
                    _ => {}
                }
            }
        }
    });
    client.flush().await?;
    let controllers = match spec.mode {
        Mode::FaasmoeShared | Mode::LocalSplit => 1,
        Mode::FaasmoePrivate | Mode::LocalBaseline => spec.tenants,
        _ => 0,
    };
    let d0 = dispatch_stats(&client, controllers).await?;
    let v0 = varz(dep.monitor_port).await.unwrap_or_default();
    let cpu0 = sampler.lock().unwrap().cpu_seconds();

    // The sampler runs on its own thread: /proc reads are blocking.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sm, st, every) = (
        sampler.clone(),
        stop.clone(),
        Duration::from_millis(a.sample_ms),
    );
    let sampler_thread = std::thread::spawn(move || {
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            sm.lock().unwrap().sample();
            std::thread::sleep(every);
        }
    });
    let start = tokio::time::Instant::now();
    let t_start = sampler.lock().unwrap().start.elapsed().as_secs_f64();
    // A sample at the start and one at the end: the window always has samples.
    sampler.lock().unwrap().sample();
    let results: Arc<Mutex<Vec<ReqResult>>> = Default::default();
    let mut tasks = Vec::new();
    for r in work.iter().filter(|r| tenants.contains(&r.tenant)) {
        let (client, results, r) = (
            dep.tenant_clients[&r.tenant].clone(),
            results.clone(),
            r.clone(),
        );
        tasks.push(tokio::spawn(async move {
            workload::sleep_until(start, r.at_s).await;
            let out = phases::send(&client, &r.tenant, r.index, &r.ids, r.max_tokens, start).await;
            results.lock().unwrap().push(out);
        }));
    }
    let total = tasks.len();
    let r2 = results.clone();
    let key = spec.key();
    let progress = tokio::spawn(async move {
        let t0 = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let done = r2.lock().unwrap().len();
            println!(
                "    [{key} {:4.0}s] {done}/{total} requests done",
                t0.elapsed().as_secs_f64()
            );
        }
    });
    for t in tasks {
        t.await?;
    }
    progress.abort();
    sampler.lock().unwrap().sample();
    let wall_s = start.elapsed().as_secs_f64();
    let cpu_s = sampler.lock().unwrap().cpu_seconds() - cpu0;
    let d1 = dispatch_stats(&client, controllers).await?;
    let v1 = varz(dep.monitor_port).await.unwrap_or_default();
    let mine: Vec<Req> = work
        .iter()
        .filter(|r| tenants.contains(&r.tenant))
        .cloned()
        .collect();
    let harness = phases::Harness {
        clients: &dep.tenant_clients,
        cpu_seconds: Box::new(|| sampler.lock().unwrap().cpu_seconds()),
        sample: Box::new(|| sampler.lock().unwrap().sample()),
        ready_at: ready_at.clone(),
        origin: start,
    };
    let warm = if a.no_warm || mine.is_empty() {
        None
    } else {
        harness.prime(&mine).await;
        let w = harness.replay(&mine).await;
        let s = w.stats();
        println!(
            "    warm phase {:.1}s: {}/{} ok, {} warm, TPOT p50 {} ms, {} CPU-s/token",
            w.wall_s,
            s.ok,
            w.requests.len(),
            s.warm,
            f(percentile(&s.tpot, 50.0), 1),
            f(s.cpu_s_per_token, 3)
        );
        Some(w)
    };
    let mut sweep_points = Vec::new();
    if !sweep.is_empty() && !mine.is_empty() {
        let per_client = a.sweep_requests.unwrap_or(if a.quick { 2 } else { 4 });
        let max_tokens = mine.iter().map(|r| r.max_tokens).max().unwrap_or(8).max(2);
        for &c in sweep {
            let p = harness.closed_loop(&mine, c, per_client, max_tokens).await;
            let s = p.stats();
            println!(
                "    sweep c={c}: {:.1}s, {}/{} ok, {} tok/s, TPOT p50/p99 {}/{} ms",
                p.wall_s,
                s.ok,
                p.requests.len(),
                f(s.tok_s, 2),
                f(percentile(&s.tpot, 50.0), 1),
                f(percentile(&s.tpot, 99.0), 1)
            );
            sweep_points.push(p);
        }
    }
    drop(harness);
    if tail_s > 0.0 && spec.mode.uses_functions() {
        tokio::time::sleep(Duration::from_secs_f64(tail_s)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler_thread.join();
    ev_task.abort();
    let mut samples = std::mem::take(&mut sampler.lock().unwrap().samples);
    for s in &mut samples {
        s.t_s -= t_start;
    }
    let requests = std::mem::take(&mut *results.lock().unwrap());
    let cold_starts: Vec<f64> = cold.lock().unwrap().values().copied().collect();
    let ready_at_s: Vec<f64> = ready_at
        .lock()
        .unwrap()
        .iter()
        .map(|&t| {
            if t >= start {
                (t - start).as_secs_f64()
            } else {
                -(start - t).as_secs_f64()
            }
        })
        .collect();
    let spawned = *spawned.lock().unwrap();
    drop(client);
    dep.stop().await;
    Ok(RunResult {
        spec: spec.clone(),
        skipped: None,
        load_s,
        wall_s,
        requests,
        samples,
        idle,
        cpu_s,
        dispatch: Dispatch {
            controllers: d1.controllers,
            invocations: d1.invocations.saturating_sub(d0.invocations),
            bytes: d1.bytes.saturating_sub(d0.bytes),
            activations: d1.activations.saturating_sub(d0.activations),
        },
        varz: Varz {
            in_msgs: v1.in_msgs.saturating_sub(v0.in_msgs),
            out_msgs: v1.out_msgs.saturating_sub(v0.out_msgs),
            in_bytes: v1.in_bytes.saturating_sub(v0.in_bytes),
            out_bytes: v1.out_bytes.saturating_sub(v0.out_bytes),
        },
        cold_starts,
        ready_at_s,
        spawned,
        warm,
        sweep: sweep_points,
    })
}

/// Single-expert function cold start and memory with one checkpoint.
#[derive(Debug, Clone)]
struct ExpertRow {
    experts: u32,
    repeat: usize,
    ready_ms: f64,
    rss: u64,
    pss: u64,
}

async fn expert_bench(
    model: &Path,
    sets: &[u32],
    repeats: usize,
    log_dir: &Path,
) -> anyhow::Result<Vec<ExpertRow>> {
    let credentials = InternalCredentials::generate();
    let (server, _) = start_server(log_dir, &credentials)?;
    let url = server.url().to_string();
    let mut rows = Vec::new();
    for &k in sets {
        let reps = if k == 1 { repeats } else { repeats.min(3) };
        for rep in 0..reps {
            let t0 = Instant::now();
            let mut child = Command::new(sibling("faasmoe-expert-worker")?)
                .args(["--nats-url", &url, "--nats-user", "worker"])
                .env("NATS_PASSWORD", &credentials.worker)
                .arg("--model-dir")
                .arg(model)
                .args([
                    "--experts",
                    &format!("0:0-{}", k - 1),
                    "--idle-timeout-ms",
                    "0",
                ])
                .stdout(Stdio::piped())
                .stderr(log_file(log_dir, &format!("worker-{k}-{rep}.log"))?)
                .kill_on_drop(true)
                .spawn()
                .context("spawning faasmoe-expert-worker")?;
            let mut lines =
                tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
            let ready = tokio::time::timeout(Duration::from_secs(300), async {
                while let Some(l) = lines.next_line().await? {
                    if l.starts_with("READY") {
                        return anyhow::Ok(true);
                    }
                }
                anyhow::Ok(false)
            })
            .await;
            let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
            if !matches!(ready, Ok(Ok(true))) {
                let _ = child.kill().await;
                bail!(
                    "expert worker with {k} experts did not get ready (see {})",
                    log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let pid = child.id().unwrap_or(0) as i32;
            let (mut rss, mut pss) = (0, 0);
            if let Ok(p) = procfs::process::Process::new(pid) {
                rss = p.stat().map(|s| s.rss * page_size()).unwrap_or(0);
                if let Ok(r) = p.smaps_rollup() {
                    pss = r
                        .memory_map_rollup
                        .0
                        .first()
                        .and_then(|m| m.extension.map.get("Pss").copied())
                        .unwrap_or(0);
                }
            }
            crate::stack::terminate(&mut child).await;
            println!("    {k} expert(s), repeat {}: spawn → READY {ready_ms:.0} ms, RSS {:.1} MB, PSS {:.1} MB", rep + 1, mbf(rss as f64), mbf(pss as f64));
            rows.push(ExpertRow {
                experts: k,
                repeat: rep,
                ready_ms,
                rss,
                pss,
            });
        }
    }
    server.stop();
    Ok(rows)
}

fn ensure_expert_model(a: &BenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(m) = &a.expert_model {
        return Ok(m.clone());
    }
    let dir = PathBuf::from("demo-data/qwen15-moe-a2.7b-l1-v1024");
    if dir.join("config.json").exists() && dir.join("model.safetensors.index.json").exists()
        || dir.join("model.safetensors").exists()
    {
        return Ok(dir);
    }
    println!("creating {}: the exact Qwen1.5-MoE-A2.7B layer geometry, 1 layer, vocab 1024, random weights", dir.display());
    faasmoe_model::generator::init(&faasmoe_model::generator::InitArgs {
        out: dir.clone(),
        preset: "qwen1.5-moe-a2.7b".into(),
        layers: Some(1),
        vocab_size: Some(1024),
        seed: 0,
        max_shard_bytes: faasmoe_model::generator::DEFAULT_MAX_SHARD_BYTES,
        zeros: false,
        tokenizer: None,
    })?;
    Ok(dir)
}

fn checkpoint_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    e.path().extension().is_some_and(|x| x == "safetensors")
                        && !e.file_name().to_string_lossy().starts_with("golden")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub(crate) fn mem_available() -> u64 {
    procfs::Meminfo::current()
        .ok()
        .and_then(|m| m.mem_available)
        .unwrap_or(0)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = procfs::Meminfo::current().map(|m| m.mem_total).unwrap_or(0);
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!(
        "{nproc} CPUs (nproc), {:.1} GiB memory, {cpu}",
        mem as f64 / (1u64 << 30) as f64
    )
}

fn git_commit() -> String {
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{head} (with uncommitted changes)")
    } else {
        head
    }
}

fn f(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "-".into()
    }
}

/// Runs the benchmark.
pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let t_all = Instant::now();
    let quick = a.quick;
    let tenant_counts =
        a.tenants
            .clone()
            .unwrap_or_else(|| if quick { vec![1, 3] } else { vec![1, 3, 6] });
    let grans = a.granularities.clone().unwrap_or_else(|| {
        if quick {
            vec![4, 10, 60]
        } else {
            vec![1, 2, 4, 10, 20, 60]
        }
    });
    let compare_g = a.granularity.unwrap_or_else(|| {
        if grans.contains(&20) {
            20
        } else {
            *grans.iter().max().unwrap_or(&20)
        }
    });
    let modes: Vec<Mode> = match &a.modes {
        Some(m) => m.iter().map(|s| Mode::parse(s)).collect::<Result<_, _>>()?,
        None => ALL_MODES.to_vec(),
    };
    let n_req = a.requests.unwrap_or(if quick { 2 } else { 4 });
    let max_prompt = a.max_prompt.unwrap_or(if quick { 32 } else { 128 });
    let max_output = a.max_output.unwrap_or(if quick { 8 } else { 24 });
    let sweep_levels: Vec<usize> = if a.no_sweep {
        vec![]
    } else {
        let mut v = a.sweep.clone().unwrap_or_else(|| {
            if quick {
                vec![1, 2, 4, 8]
            } else {
                vec![1, 2, 4, 8, 16, 32]
            }
        });
        v.retain(|&c| c > 0);
        v.sort_unstable();
        v.dedup();
        v
    };
    let repeats = a.cold_start_repeats.unwrap_or(if quick { 5 } else { 10 });
    let tail_s = a.tail_s.unwrap_or(if quick {
        0.0
    } else {
        a.idle_timeout_ms as f64 / 1e3 + 2.0
    });
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "results/bench-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ))
    });
    std::fs::create_dir_all(&out)?;
    if a.decode_only || !a.no_decode_bench {
        let dm = match &a.decode_model {
            Some(m) => m.clone(),
            None => ensure_expert_model(&a)?,
        };
        let settings = decode::DecodeSettings {
            batches: a.decode_batches.clone(),
            contexts: a.decode_contexts.clone(),
            reps: a.decode_reps,
            bandwidth_mib: a.bandwidth_mib,
        };
        let model = dm.clone();
        let dir = out.clone();
        let r = tokio::task::spawn_blocking(move || decode::run(&model, &dir, &settings)).await?;
        match r {
            Ok(_) => {}
            Err(e) if !a.decode_only => println!("    decode bench FAILED: {e:#}"),
            Err(e) => return Err(e),
        }
        if a.decode_only {
            return Ok(());
        }
    }
    let model = match &a.model {
        Some(m) => m.clone(),
        None => crate::demo::ensure_model(&crate::demo::DemoArgs {
            model: None,
            tiktoken: a.tiktoken.clone(),
            requests: 0,
            scale: a.scale,
            granularity: compare_g,
            idle_timeout_ms: a.idle_timeout_ms,
            log_dir: out.join("logs"),
        })?,
    };
    let cfg = faasmoe_model::Config::from_dir(&model)?;
    let num_experts = cfg.num_experts as u32;
    let grans: Vec<u32> = grans
        .into_iter()
        .filter(|&g| g >= 1 && g <= num_experts)
        .collect();
    let compare_g = compare_g.min(num_experts).max(1);
    let max_t = *tenant_counts.iter().max().context("no tenant counts")?;
    let tenant_names: Vec<String> = (1..=max_t).map(|i| format!("t{i}")).collect();

    // The workload: per tenant a slice of the conversation or code trace, token ids from the corpus.
    let tokenizer = QwenTokenizer::from_checkpoint_dir(&model)?;
    let corpus: Vec<u32> = tokenizer
        .encode(workload::CORPUS)?
        .into_iter()
        .filter(|&t| (t as usize) < cfg.vocab_size)
        .collect();
    anyhow::ensure!(!corpus.is_empty(), "no corpus tokens inside the vocabulary");
    let scale = a.scale.with_ranges(
        (4.min(max_prompt), max_prompt),
        (2.min(max_output), max_output),
    );
    let mut work = Vec::new();
    for (i, t) in tenant_names.iter().enumerate() {
        let (trace, name) = if i % 2 == 0 {
            (workload::CONV_TRACE, "conversation")
        } else {
            (workload::CODE_TRACE, "code")
        };
        let rows = workload::load(trace, (i / 2) * n_req, n_req, &scale)?;
        for (j, r) in rows.into_iter().enumerate() {
            let off = (i * 977 + j * 131) % corpus.len();
            let ids: Vec<u32> = (0..r.context_tokens as usize)
                .map(|k| corpus[(off + k) % corpus.len()])
                .collect();
            work.push(Req {
                tenant: t.clone(),
                index: j,
                at_s: r.at_s,
                ids,
                max_tokens: r.generated_tokens,
            });
        }
        let _ = name;
    }

    // The plan.
    let mut specs = Vec::new();
    for &t in &tenant_counts {
        for &m in &modes {
            let g = if m.uses_functions() {
                Some(compare_g)
            } else {
                None
            };
            let same_as = match (m, t) {
                (Mode::SharedBaseline, 1) if modes.contains(&Mode::Baseline) => {
                    Some(Mode::Baseline)
                }
                (Mode::FaasmoePrivate, 1) if modes.contains(&Mode::FaasmoeShared) => {
                    Some(Mode::FaasmoeShared)
                }
                (Mode::LocalBaseline, 1) if modes.contains(&Mode::LocalSplit) => {
                    Some(Mode::LocalSplit)
                }
                _ => None,
            };
            specs.push(Spec {
                mode: m,
                tenants: t,
                granularity: g,
                same_as,
            });
        }
    }
    if modes.contains(&Mode::FaasmoeShared) {
        for &g in &grans {
            if g != compare_g {
                specs.push(Spec {
                    mode: Mode::FaasmoeShared,
                    tenants: max_t,
                    granularity: Some(g),
                    same_as: None,
                });
            }
        }
    }
    let ckpt_bytes = checkpoint_bytes(&model);
    let file_elem = match cfg_torch_dtype(&model).as_deref() {
        Some("float32") => 4.0,
        _ => 2.0,
    };
    let est_baseline = ckpt_bytes as f64 * 4.0 / file_elem;
    println!(
        "faasmoe bench: {} runs on {} ({} layers, hidden {}, {} experts top-{}, {:.2} GB on disk); tenants {:?}; granularities {:?} (comparison at {compare_g}); {n_req} requests per tenant; results in {}",
        specs.iter().filter(|s| s.same_as.is_none()).count(), model.display(), cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, ckpt_bytes as f64 / 1e9, tenant_counts, grans, out.display()
    );

    // Runs.
    let mut results: Vec<RunResult> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        if spec.same_as.is_some() {
            continue;
        }
        let procs = match spec.mode {
            Mode::Baseline => spec.tenants,
            Mode::SharedBaseline => 1,
            _ => 0,
        };
        let avail = mem_available();
        let mut need = procs as f64 * est_baseline;
        // Our own full model per tenant: the checkpoint's tensors as stored, plus KV caches.
        if spec.mode == Mode::LocalBaseline {
            need += spec.tenants as f64 * ckpt_bytes as f64 * 1.2;
        }
        // faasmoe modes: every function of every MoE layer may be activated (random routing
        // touches them all): f32 expert weights plus a worker's fixed cost (≈16 MB measured
        // for one function of the A2.7B layer geometry; an estimate used only to skip).
        let mut fn_procs = 0usize;
        if let (Some(g), Ok(cfg)) = (spec.granularity, faasmoe_model::Config::from_dir(&model)) {
            let g = (g as usize).clamp(1, cfg.num_experts.max(1));
            let per_layer = cfg.num_experts.div_ceil(g);
            fn_procs = cfg.moe_layers().count() * per_layer;
            let expert_bytes =
                3.0 * cfg.hidden_size as f64 * cfg.moe_intermediate_size as f64 * 4.0;
            need += fn_procs as f64 * (16e6 + g as f64 * expert_bytes);
        }
        let empty = RunResult {
            spec: spec.clone(),
            skipped: None,
            load_s: f64::NAN,
            wall_s: f64::NAN,
            requests: vec![],
            samples: vec![],
            idle: None,
            cpu_s: f64::NAN,
            dispatch: Dispatch::default(),
            varz: Varz::default(),
            cold_starts: vec![],
            ready_at_s: vec![],
            spawned: 0,
            warm: None,
            sweep: vec![],
        };
        if (procs > 0 || fn_procs > 0) && need > avail as f64 * 0.9 {
            let why = if procs > 0 {
                format!("needs ≈{:.1} GB ({procs} × f32 copy of the {:.2} GB checkpoint) but MemAvailable is {:.1} GB", need / 1e9, ckpt_bytes as f64 / 1e9, avail as f64 / 1e9)
            } else {
                format!("up to {fn_procs} function instances would need ≈{:.1} GB (estimate) but MemAvailable is {:.1} GB", need / 1e9, avail as f64 / 1e9)
            };
            println!("[{}/{}] {}: SKIPPED: {why}", i + 1, specs.len(), spec.key());
            results.push(RunResult {
                skipped: Some(why),
                ..empty
            });
            continue;
        }
        println!("[{}/{}] {} …", i + 1, specs.len(), spec.key());
        let sweep: &[usize] =
            if spec.tenants == max_t && spec.granularity.is_none_or(|g| g == compare_g) {
                &sweep_levels
            } else {
                &[]
            };
        match run_one(spec, &tenant_names, &work, &model, &a, &out, tail_s, sweep).await {
            Ok(r) => {
                let s = r.summary();
                println!(
                    "    load {:.1}s, workload {:.1}s: {}/{} ok, {} tokens, PSS mean {:.0} MB, CPU {:.0} %, TPOT p50 {} ms, invocations/token {}",
                    r.load_s, r.wall_s, s.ok, r.requests.len(), s.completion_tokens, mbf(s.pss_mean), s.cpu_percent, f(percentile(&s.tpot, 50.0), 1), f(s.inv_per_token, 1)
                );
                results.push(r);
            }
            Err(e) => {
                println!("    FAILED: {e:#}");
                results.push(RunResult {
                    skipped: Some(format!("failed: {e:#}")),
                    ..empty
                });
            }
        }
    }
    // Aliased runs (identical deployments at one tenant).
    for spec in &specs {
        if let Some(src) = spec.same_as {
            if let Some(r) = results.iter().find(|r| {
                r.spec.mode == src
                    && r.spec.tenants == spec.tenants
                    && r.spec.granularity == spec.granularity
                    && r.spec.same_as.is_none()
            }) {
                let mut c = r.clone();
                c.spec = spec.clone();
                c.spec.granularity = r.spec.granularity;
                results.push(c);
            }
        }
    }
    results.sort_by_key(|r| (r.spec.tenants, r.spec.mode, r.spec.granularity));

    // Per-expert memory and cold start.
    let mut expert_rows = Vec::new();
    let mut expert_model_desc = String::from("not measured (--no-expert-bench)");
    let mut controller_rows = Vec::new();
    let mut controller_desc = String::from("not measured (--no-expert-bench)");
    if !a.no_expert_bench {
        match ensure_expert_model(&a) {
            Ok(em) => {
                let ecfg = faasmoe_model::Config::from_dir(&em)?;
                let n = ecfg.num_experts as u32;
                let mut sets = vec![1, 10.min(n)];
                if !quick {
                    sets.push(n);
                }
                sets.dedup();
                println!("per-expert memory and cold start ({} layer(s), hidden {}, expert intermediate {}, {} experts; sets {:?}, {repeats} repeats of 1 expert)…", ecfg.num_hidden_layers, ecfg.hidden_size, ecfg.moe_intermediate_size, n, sets);
                expert_model_desc = format!(
                    "{} ({} layer(s), hidden {}, expert intermediate {}, {} experts, vocab {}; {:.2} GB on disk)",
                    em.display(), ecfg.num_hidden_layers, ecfg.hidden_size, ecfg.moe_intermediate_size, n, ecfg.vocab_size, checkpoint_bytes(&em) as f64 / 1e9
                );
                match expert_bench(&em, &sets, repeats, &out.join("logs").join("experts")).await {
                    Ok(r) => expert_rows = r,
                    Err(e) => {
                        println!("    expert bench FAILED: {e:#}");
                        expert_model_desc.push_str(&format!("; FAILED: {e:#}"));
                    }
                }
                println!("controller memory (remote and local experts; one request of {CONTROLLER_PROMPT} + {CONTROLLER_OUTPUT} tokens)…");
                match controller::measure(
                    &em,
                    CONTROLLER_PROMPT,
                    CONTROLLER_OUTPUT,
                    &out.join("logs").join("controller"),
                )
                .await
                {
                    Ok(r) => controller_rows = r,
                    Err(e) => {
                        println!("    controller memory FAILED: {e:#}");
                        controller_desc = format!("FAILED: {e:#}");
                    }
                }
            }
            Err(e) => expert_model_desc = format!("FAILED to create the checkpoint: {e:#}"),
        }
    }

    // CSVs.
    write_csvs(&out, &results, &expert_rows)?;
    write_controller_csv(&out, &controller_rows)?;
    phases::write_csv(&out, &results)?;
    // Plots.
    let plot_note = match plot::all(&out, &results, max_t) {
        Ok(files) => format!("plots: {}", files.join(", ")),
        Err(e) => format!("plots FAILED: {e:#}"),
    };
    // Report.
    let table = headline(&results);
    let report = report_md(
        &a,
        &model,
        &cfg,
        ckpt_bytes,
        &scale,
        n_req,
        &tenant_counts,
        &grans,
        compare_g,
        &results,
        &expert_rows,
        &expert_model_desc,
        &controller_rows,
        &controller_desc,
        &table,
        &plot_note,
        t_all.elapsed().as_secs_f64(),
    );
    let phase_report = phases::report(&results);
    let report = format!("{report}\n{phase_report}");
    std::fs::write(out.join("report.md"), &report)?;
    println!("\n{table}");
    println!("\n{phase_report}");
    println!("{plot_note}");
    println!(
        "bench done in {:.0}s; report: {}",
        t_all.elapsed().as_secs_f64(),
        out.join("report.md").display()
    );
    Ok(())
}

fn cfg_torch_dtype(model: &Path) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).ok()?).ok()?;
    v["torch_dtype"].as_str().map(String::from)
}

/// Prompt tokens of the controller-memory request (`prompt + output` just under a power of
/// two, so the KV cache's capacity is not mostly empty).
const CONTROLLER_PROMPT: usize = 1000;
/// Output tokens of the controller-memory request.
const CONTROLLER_OUTPUT: u32 = 24;

fn write_controller_csv(out: &Path, rows: &[controller::ControllerRow]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(out.join("controller.csv"))?;
    w.write_record([
        "state",
        "weight_mb",
        "kv_mb",
        "rss_mb",
        "rss_ratio",
        "high_water_mb",
        "ready_ms",
    ])?;
    for c in rows {
        w.write_record([
            c.state.clone(),
            f(mbf(c.weight_bytes as f64), 1),
            f(mbf(c.kv_bytes as f64), 1),
            f(mbf(c.rss as f64), 1),
            f(c.ratio(), 3),
            f(mbf(c.hwm as f64), 1),
            f(c.ready_ms, 0),
        ])?;
    }
    w.flush()?;
    Ok(())
}

fn write_csvs(out: &Path, results: &[RunResult], experts: &[ExpertRow]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(out.join("runs.csv"))?;
    w.write_record([
        "mode",
        "tenants",
        "granularity",
        "same_run_as",
        "skipped",
        "load_s",
        "wall_s",
        "requests",
        "ok",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "tok_per_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "tpot_p99_ms",
        "warm_tpot_p50_ms",
        "warm_requests",
        "pss_mean_mb",
        "pss_peak_mb",
        "pss_mean_per_tenant_mb",
        "rss_mean_mb",
        "rss_peak_mb",
        "idle_pss_mb",
        "idle_rss_mb",
        "cpu_s",
        "cpu_percent",
        "cpu_percent_per_tenant",
        "invocations",
        "invocations_per_token",
        "dispatch_bytes_per_token",
        "nats_bytes_per_token",
        "nats_msgs_per_token",
        "activations",
        "instances_started",
        "cold_starts",
        "cold_start_p50_ms",
        "cold_start_p99_ms",
        "peak_instances",
        "mem_ratio_vs_baseline",
        "cpu_ratio_vs_baseline",
        "tpot_ratio_vs_baseline",
        "mem_ratio_vs_local_baseline",
        "cpu_ratio_vs_local_baseline",
        "tpot_ratio_vs_local_baseline",
    ])?;
    for r in results {
        let s = r.summary();
        let base = baseline_of(results, Mode::Baseline, r.spec.tenants);
        let (mr, cr, tr) = ratios(&s, base.as_ref());
        let local = baseline_of(results, Mode::LocalBaseline, r.spec.tenants);
        let (lmr, lcr, ltr) = ratios(&s, local.as_ref());
        let t = r.spec.tenants as f64;
        w.write_record([
            r.spec.mode.name().to_string(),
            r.spec.tenants.to_string(),
            r.spec
                .granularity
                .map(|g| g.to_string())
                .unwrap_or_default(),
            r.spec
                .same_as
                .map(|m| m.name().to_string())
                .unwrap_or_default(),
            r.skipped.clone().unwrap_or_default(),
            f(r.load_s, 2),
            f(r.wall_s, 2),
            r.requests.len().to_string(),
            s.ok.to_string(),
            s.errors.to_string(),
            s.prompt_tokens.to_string(),
            s.completion_tokens.to_string(),
            f(s.tok_s, 3),
            f(percentile(&s.ttft, 50.0), 1),
            f(percentile(&s.ttft, 99.0), 1),
            f(percentile(&s.tpot, 50.0), 1),
            f(percentile(&s.tpot, 99.0), 1),
            f(percentile(&s.tpot_warm, 50.0), 1),
            s.tpot_warm.len().to_string(),
            f(mbf(s.pss_mean), 1),
            f(mbf(s.pss_peak), 1),
            f(mbf(s.pss_mean) / t, 1),
            f(mbf(s.rss_mean), 1),
            f(mbf(s.rss_peak), 1),
            r.idle.map(|i| f(mbf(i.pss as f64), 1)).unwrap_or_default(),
            r.idle.map(|i| f(mbf(i.rss as f64), 1)).unwrap_or_default(),
            f(r.cpu_s, 2),
            f(s.cpu_percent, 1),
            f(s.cpu_percent / t, 1),
            if r.dispatch.controllers > 0 {
                r.dispatch.invocations.to_string()
            } else {
                String::new()
            },
            f(s.inv_per_token, 2),
            f(s.dispatch_bytes_per_token, 0),
            f(s.nats_bytes_per_token, 0),
            f(s.nats_msgs_per_token, 2),
            r.dispatch.activations.to_string(),
            r.spawned.to_string(),
            r.cold_starts.len().to_string(),
            f(percentile(&r.cold_starts, 50.0), 1),
            f(percentile(&r.cold_starts, 99.0), 1),
            s.peak_instances.to_string(),
            f(mr, 3),
            f(cr, 3),
            f(tr, 3),
            f(lmr, 3),
            f(lcr, 3),
            f(ltr, 3),
        ])?;
    }
    w.flush()?;
    let mut w = csv::Writer::from_path(out.join("requests.csv"))?;
    w.write_record([
        "mode",
        "tenants",
        "granularity",
        "tenant",
        "index",
        "sent_s",
        "e2e_ms",
        "prompt_tokens",
        "completion_tokens",
        "queue_ms",
        "ttft_ms",
        "total_ms",
        "tpot_ms",
        "error",
    ])?;
    for r in results.iter().filter(|r| r.spec.same_as.is_none()) {
        for q in &r.requests {
            let (pt, ct, qm, tt, tot, tp) = match &q.ok {
                Some(g) => (
                    g.usage.prompt_tokens.to_string(),
                    g.usage.completion_tokens.to_string(),
                    f(g.timings.queue_ms, 1),
                    f(g.timings.ttft_ms, 1),
                    f(g.timings.total_ms, 1),
                    tpot_ms(g).map(|t| f(t, 1)).unwrap_or_default(),
                ),
                None => Default::default(),
            };
            w.write_record([
                r.spec.mode.name().to_string(),
                r.spec.tenants.to_string(),
                r.spec
                    .granularity
                    .map(|g| g.to_string())
                    .unwrap_or_default(),
                q.tenant.clone(),
                q.index.to_string(),
                f(q.sent_s, 3),
                f(q.e2e_ms, 1),
                pt,
                ct,
                qm,
                tt,
                tot,
                tp,
                q.error.clone().unwrap_or_default(),
            ])?;
        }
    }
    w.flush()?;
    let mut w = csv::Writer::from_path(out.join("samples.csv"))?;
    w.write_record([
        "mode",
        "tenants",
        "granularity",
        "t_s",
        "role",
        "processes",
        "rss_mb",
        "pss_mb",
        "cpu_percent",
    ])?;
    for r in results.iter().filter(|r| r.spec.same_as.is_none()) {
        for s in &r.samples {
            let mut roles: Vec<(&str, RoleTotals)> =
                s.roles.iter().map(|(k, v)| (*k, *v)).collect();
            roles.push(("total", s.total()));
            for (role, v) in roles {
                w.write_record([
                    r.spec.mode.name().to_string(),
                    r.spec.tenants.to_string(),
                    r.spec
                        .granularity
                        .map(|g| g.to_string())
                        .unwrap_or_default(),
                    f(s.t_s, 2),
                    role.to_string(),
                    v.processes.to_string(),
                    f(mbf(v.rss as f64), 1),
                    f(mbf(v.pss as f64), 1),
                    f(v.cpu_percent, 1),
                ])?;
            }
        }
    }
    w.flush()?;
    let mut w = csv::Writer::from_path(out.join("experts.csv"))?;
    w.write_record(["experts", "repeat", "spawn_to_ready_ms", "rss_mb", "pss_mb"])?;
    for e in experts {
        w.write_record([
            e.experts.to_string(),
            e.repeat.to_string(),
            f(e.ready_ms, 1),
            f(mbf(e.rss as f64), 1),
            f(mbf(e.pss as f64), 1),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// The summary of `mode`'s run at `tenants` tenants (`baseline`: candle-transformers per
/// tenant; `local-baseline`: our own unsplit model per tenant), if it ran.
fn baseline_of(results: &[RunResult], mode: Mode, tenants: usize) -> Option<Summary> {
    results
        .iter()
        .find(|r| r.spec.mode == mode && r.spec.tenants == tenants && r.skipped.is_none())
        .map(|r| r.summary())
}

fn ratios(s: &Summary, base: Option<&Summary>) -> (f64, f64, f64) {
    match base {
        Some(b) => (
            s.pss_mean / b.pss_mean,
            s.cpu_percent / b.cpu_percent,
            percentile(&s.tpot, 50.0) / percentile(&b.tpot, 50.0),
        ),
        None => (f64::NAN, f64::NAN, f64::NAN),
    }
}

fn headline(results: &[RunResult]) -> String {
    let mut t = String::new();
    t.push_str("| mode | tenants | experts/function | ok/req | PSS mean MB | PSS peak MB | PSS/tenant MB | CPU % | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | warm TPOT p50 ms (requests) | tok/s | invocations/token | NATS bytes/token | cold starts (p50 ms) | peak instances | memory × baseline | CPU × baseline | TPOT × baseline | memory × local-baseline | CPU × local-baseline |\n");
    t.push_str(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let g = r
            .spec
            .granularity
            .map(|g| g.to_string())
            .unwrap_or_else(|| "-".into());
        let name = match r.spec.same_as {
            Some(m) => format!("{} (= {} at 1 tenant)", r.spec.mode.name(), m.name()),
            None => r.spec.mode.name().to_string(),
        };
        if let Some(why) = &r.skipped {
            let why: String = why
                .lines()
                .next()
                .unwrap_or("")
                .replace('|', "/")
                .chars()
                .take(200)
                .collect();
            let _ = writeln!(
                t,
                "| {name} | {} | {g} | {why} (see the log) |",
                r.spec.tenants
            );
            continue;
        }
        let s = r.summary();
        let (mr, cr, tr) = ratios(
            &s,
            baseline_of(results, Mode::Baseline, r.spec.tenants).as_ref(),
        );
        let (lmr, lcr, _) = ratios(
            &s,
            baseline_of(results, Mode::LocalBaseline, r.spec.tenants).as_ref(),
        );
        let cold = if r.spec.mode.uses_functions() {
            format!(
                "{} ({})",
                r.cold_starts.len(),
                f(percentile(&r.cold_starts, 50.0), 0)
            )
        } else {
            "-".into()
        };
        let _ = writeln!(
            t,
            "| {name} | {} | {g} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {cold} | {} | {} | {} | {} | {} | {} |",
            r.spec.tenants, s.ok, r.requests.len(), f(mbf(s.pss_mean), 0), f(mbf(s.pss_peak), 0), f(mbf(s.pss_mean) / r.spec.tenants as f64, 0), f(s.cpu_percent, 0),
            f(percentile(&s.ttft, 50.0), 0), f(percentile(&s.ttft, 99.0), 0), f(percentile(&s.tpot, 50.0), 1), f(percentile(&s.tpot, 99.0), 1),
            f(percentile(&s.tpot_warm, 50.0), 1), s.tpot_warm.len(), f(s.tok_s, 2),
            f(s.inv_per_token, 1), f(s.nats_bytes_per_token, 0), if r.spec.mode.uses_functions() { s.peak_instances.to_string() } else { "-".into() }, f(mr, 2), f(cr, 2), f(tr, 2), f(lmr, 2), f(lcr, 2)
        );
    }
    t
}

use std::fmt::Write as _;

#[allow(clippy::too_many_arguments)]
fn report_md(
    a: &BenchArgs,
    model: &Path,
    cfg: &faasmoe_model::Config,
    ckpt_bytes: u64,
    scale: &Scale,
    n_req: usize,
    tenants: &[usize],
    grans: &[u32],
    compare_g: u32,
    results: &[RunResult],
    experts: &[ExpertRow],
    expert_desc: &str,
    controllers: &[controller::ControllerRow],
    controller_desc: &str,
    table: &str,
    plot_note: &str,
    total_s: f64,
) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "# faasmoe bench\n");
    let _ = writeln!(r, "- machine: {}", machine());
    let _ = writeln!(r, "- git commit: {}", git_commit());
    let _ = writeln!(
        r,
        "- command: `{}`",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let _ = writeln!(
        r,
        "- checkpoint (mode comparison): {} — {} layers, hidden {}, {} routed experts top-{} (expert intermediate {}), shared expert {}, vocab {}; {:.2} GB of safetensors ({}), served in F32",
        model.display(), cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.vocab_size,
        ckpt_bytes as f64 / 1e9, cfg_torch_dtype(model).unwrap_or_else(|| "?".into())
    );
    let _ = writeln!(r, "- checkpoint (per-expert): {expert_desc}");
    let _ = writeln!(
        r,
        "- workload: Azure LLM inference traces (Splitwise, ISCA 2024, CC-BY 4.0); tenant i replays the conversation (odd i) or code (even i) trace, {n_req} requests each; scale: prompt tokens ÷{}, clamped to {:?}; output tokens ÷{}, clamped to {:?}; inter-arrival × {}; greedy decoding; the same token ids for every mode",
        scale.prompt_div, scale.prompt_range, scale.output_div, scale.output_range, scale.time_mul
    );
    let _ = writeln!(r, "- tenants {tenants:?}; faasmoe-shared granularity sweep {grans:?} at {} tenants; faasmoe-shared/-private compared at {compare_g} experts per function; idle timeout {} ms, at most {} instances per function", tenants.iter().max().unwrap_or(&0), a.idle_timeout_ms, a.max_instances);
    let _ = writeln!(r, "- bench wall time: {total_s:.0} s\n");
    let _ = writeln!(r, "## What is measured\n");
    let _ = writeln!(r, "- memory: PSS and RSS from /proc (smaps_rollup, stat), summed over every process of the mode — nats-server (the client transport, present in every mode), the broker and its expert worker children, the controllers or baseline processes — sampled every {} ms during the workload (first request sent → last reply); per tenant = mean ÷ tenants; the idle column in runs.csv is the loaded, idle deployment before the workload", a.sample_ms);
    let _ = writeln!(r, "- CPU %: utime+stime of those processes (including exited workers, via the broker's cutime/cstime) over the workload's wall time, in % of one core");
    let _ = writeln!(r, "- TTFT / TPOT: from the server-side timings of each reply (since the controller / baseline process received the request, queueing included); TPOT = (total − TTFT) / (tokens − 1); warm TPOT: over the requests during whose lifetime (sent → reply) no function instance became ready, i.e. with warm functions (every request in the modes without functions)");
    let _ = writeln!(r, "- invocations/token and dispatch bytes/token: the controllers' dispatch counters (`faasmoe.v1.admin.controller_stats`), deltas over the workload ÷ completion tokens (prefill invocations included); NATS bytes/token: nats-server /varz (in + out bytes) deltas ÷ completion tokens, all traffic (client API included)");
    let _ = writeln!(r, "- cold starts: the broker's `ready` events (spawn → ready); instances: live children of the broker");
    let _ = writeln!(r, "- shared-baseline: one candle-transformers process serving all tenants one request at a time (the model keeps one KV cache); local-split is the split equivalent with continuous batching; local-baseline is one local-split controller per tenant (`--local-experts --tenants <t>`: our own full model per tenant). With 1 tenant shared-baseline ≡ baseline, faasmoe-private ≡ faasmoe-shared and local-baseline ≡ local-split (one run, reported twice)\n");
    let _ = writeln!(r, "## Headline (this run)\n\n{table}");
    let _ = writeln!(r, "Ratios are mode ÷ baseline (candle-transformers per tenant) and mode ÷ local-baseline (our own unsplit model per tenant, same kernels and dtype) at the same tenant count, in this run (memory: PSS mean; CPU: CPU %; TPOT: p50).\n");
    // Per-tenant.
    let _ = writeln!(r, "## Per tenant\n\n| mode | tenants | experts/function | tenant | requests | ok | completion tokens | TTFT p50 ms | TPOT p50 ms |\n|---|---|---|---|---|---|---|---|---|");
    for res in results
        .iter()
        .filter(|x| x.skipped.is_none() && x.spec.same_as.is_none())
    {
        let mut by: BTreeMap<&str, Vec<&ReqResult>> = BTreeMap::new();
        for q in &res.requests {
            by.entry(q.tenant.as_str()).or_default().push(q);
        }
        for (t, qs) in by {
            let oks: Vec<&GenerateResponse> = qs.iter().filter_map(|q| q.ok.as_ref()).collect();
            let ttft: Vec<f64> = oks.iter().map(|g| g.timings.ttft_ms).collect();
            let tpot: Vec<f64> = oks.iter().filter_map(|g| tpot_ms(g)).collect();
            let _ = writeln!(
                r,
                "| {} | {} | {} | {t} | {} | {} | {} | {} | {} |",
                res.spec.mode.name(),
                res.spec.tenants,
                res.spec
                    .granularity
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "-".into()),
                qs.len(),
                oks.len(),
                oks.iter().map(|g| g.usage.completion_tokens).sum::<u32>(),
                f(percentile(&ttft, 50.0), 0),
                f(percentile(&tpot, 50.0), 1)
            );
        }
    }
    let errs: Vec<String> = results
        .iter()
        .filter(|x| x.spec.same_as.is_none())
        .flat_map(|x| {
            x.requests.iter().filter_map(move |q| {
                q.error
                    .as_ref()
                    .map(|e| format!("{} ({} t{}): {e}", x.spec.key(), q.tenant, q.index))
            })
        })
        .collect();
    if !errs.is_empty() {
        let _ = writeln!(r, "\nerrors:\n");
        for e in errs {
            let _ = writeln!(r, "- {e}");
        }
    }
    // Experts.
    let _ = writeln!(r, "\n## Expert functions: memory and cold start\n");
    if experts.is_empty() {
        let _ = writeln!(r, "not measured.");
    } else {
        let _ = writeln!(r, "One `faasmoe-expert-worker` per repeat with `--experts 0:0-(k-1)`, timed from spawn to its READY line (loaded and subscribed), memory read 200 ms after READY.\n");
        let _ = writeln!(r, "| experts per function | repeats | spawn → READY p50 ms | p99 ms | RSS p50 MB | PSS p50 MB |\n|---|---|---|---|---|---|");
        let mut ks: Vec<u32> = experts.iter().map(|e| e.experts).collect();
        ks.dedup();
        let med = |k: u32, g: &dyn Fn(&ExpertRow) -> f64| {
            percentile(
                &experts
                    .iter()
                    .filter(|e| e.experts == k)
                    .map(g)
                    .collect::<Vec<_>>(),
                50.0,
            )
        };
        for &k in &ks {
            let v: Vec<f64> = experts
                .iter()
                .filter(|e| e.experts == k)
                .map(|e| e.ready_ms)
                .collect();
            let _ = writeln!(
                r,
                "| {k} | {} | {} | {} | {} | {} |",
                v.len(),
                f(percentile(&v, 50.0), 0),
                f(percentile(&v, 99.0), 0),
                f(med(k, &|e| mbf(e.rss as f64)), 1),
                f(med(k, &|e| mbf(e.pss as f64)), 1)
            );
        }
        if ks.len() >= 2 {
            let (k0, k1) = (ks[0], ks[1]);
            let per = (med(k1, &|e| e.rss as f64) - med(k0, &|e| e.rss as f64)) / (k1 - k0) as f64;
            let base = med(k0, &|e| e.rss as f64) - per * k0 as f64;
            let _ = writeln!(r, "\nper routed expert (slope between {k0} and {k1} experts, RSS p50): {:.1} MB; a function's fixed cost (intercept): {:.1} MB.", mbf(per), mbf(base));
        }
    }
    let _ = writeln!(r, "\n## Controller memory\n");
    if controllers.is_empty() {
        let _ = writeln!(r, "{controller_desc}");
    } else {
        let _ = writeln!(r, "A `faasmoe controller` on the expert checkpoint, granularity = every expert: its resident set (idle: 200 ms after it first answers `controller_stats`; with a request: the peak sampled every 10 ms while the request ran) against the bytes of its weight tensors (its `controller_stats`) plus the live KV cache (f32, at the cache's capacity).\n");
        let _ = writeln!(r, "| state | tensors MB | KV MB | RSS MB | RSS ÷ (tensors + KV) | high-water MB | spawn → answering ms |\n|---|---|---|---|---|---|---|");
        for c in controllers {
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} | {} | {} | {} |",
                c.state,
                f(mbf(c.weight_bytes as f64), 1),
                f(mbf(c.kv_bytes as f64), 1),
                f(mbf(c.rss as f64), 1),
                f(c.ratio(), 3),
                f(mbf(c.hwm as f64), 1),
                f(c.ready_ms, 0)
            );
        }
    }
    let _ = writeln!(r, "\n## Files\n\n- runs.csv (one row per mode/setting), requests.csv, samples.csv (per role over time), experts.csv, controller.csv\n- {plot_note}\n- logs/ (every process's log)");
    r
}
