//! One benchmark run: the modes and their specs, the requests and what each measured, and
//! [`run_one`], which starts a deployment, replays the workload and samples it.

use super::*;
use crate::function_events::{ready_between, FunctionEvents};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Mode {
    Baseline,
    SharedBaseline,
    FaasmoeShared,
    FaasmoePrivate,
    LocalSplit,
    LocalBaseline,
}

pub(super) const ALL_MODES: [Mode; 6] = [
    Mode::Baseline,
    Mode::SharedBaseline,
    Mode::FaasmoeShared,
    Mode::FaasmoePrivate,
    Mode::LocalSplit,
    Mode::LocalBaseline,
];

impl Mode {
    pub(super) fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::SharedBaseline => "shared-baseline",
            Mode::FaasmoeShared => "faasmoe-shared",
            Mode::FaasmoePrivate => "faasmoe-private",
            Mode::LocalSplit => "local-split",
            Mode::LocalBaseline => "local-baseline",
        }
    }
    pub(super) fn parse(s: &str) -> anyhow::Result<Self> {
        ALL_MODES
            .iter()
            .copied()
            .find(|m| m.name() == s)
            .with_context(|| format!("unknown mode `{s}`"))
    }
    pub(super) fn uses_functions(self) -> bool {
        matches!(self, Mode::FaasmoeShared | Mode::FaasmoePrivate)
    }
}

/// One planned run.
#[derive(Debug, Clone)]
pub(super) struct Spec {
    pub(super) mode: Mode,
    pub(super) tenants: usize,
    pub(super) granularity: Option<u32>,
    /// Reported from the run of this (mode, granularity) instead (identical deployment).
    pub(super) same_as: Option<Mode>,
}

impl Spec {
    pub(super) fn key(&self) -> String {
        match self.granularity {
            Some(g) => format!("{}-t{}-g{g}", self.mode.name(), self.tenants),
            None => format!("{}-t{}", self.mode.name(), self.tenants),
        }
    }
}

/// One request of the workload (the same for every mode).
#[derive(Debug, Clone)]
pub(super) struct Req {
    pub(super) tenant: String,
    pub(super) index: usize,
    pub(super) at_s: f64,
    pub(super) ids: Vec<u32>,
    pub(super) max_tokens: u32,
}

#[derive(Debug, Clone, Default)]
pub(super) struct ReqResult {
    pub(super) tenant: String,
    pub(super) index: usize,
    pub(super) sent_s: f64,
    pub(super) e2e_ms: f64,
    pub(super) ok: Option<GenerateResponse>,
    pub(super) error: Option<String>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub(super) struct RunResult {
    pub(super) spec: Spec,
    pub(super) skipped: Option<String>,
    pub(super) load_s: f64,
    pub(super) wall_s: f64,
    pub(super) requests: Vec<ReqResult>,
    /// Samples with t relative to the workload start.
    pub(super) samples: Vec<Sample>,
    pub(super) idle: Option<RoleTotals>,
    pub(super) cpu_s: f64,
    pub(super) dispatch: Dispatch,
    pub(super) varz: Varz,
    pub(super) cold_starts: Vec<f64>,
    /// When function instances became ready (`ready` events), s since the workload start.
    pub(super) ready_at_s: Vec<f64>,
    pub(super) spawned: usize,
    /// The warm phase (after the cold workload and a priming pass).
    pub(super) warm: Option<phases::Phase>,
    /// The capacity sweep's points, in increasing concurrency.
    pub(super) sweep: Vec<phases::Phase>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Summary {
    pub(super) ok: usize,
    pub(super) errors: usize,
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u64,
    pub(super) tok_s: f64,
    pub(super) ttft: Vec<f64>,
    pub(super) tpot: Vec<f64>,
    /// TPOT of the warm requests: those during which no function instance became ready.
    pub(super) tpot_warm: Vec<f64>,
    pub(super) pss_mean: f64,
    pub(super) pss_peak: f64,
    pub(super) rss_mean: f64,
    pub(super) rss_peak: f64,
    pub(super) cpu_percent: f64,
    pub(super) inv_per_token: f64,
    pub(super) dispatch_bytes_per_token: f64,
    pub(super) nats_bytes_per_token: f64,
    pub(super) nats_msgs_per_token: f64,
    pub(super) peak_instances: usize,
}

/// Time per output token after the first, ms: `(total − TTFT) / (completion tokens − 1)`;
/// `None` for fewer than 2 tokens.
pub(super) fn tpot_ms(r: &GenerateResponse) -> Option<f64> {
    (r.usage.completion_tokens > 1)
        .then(|| (r.timings.total_ms - r.timings.ttft_ms) / (r.usage.completion_tokens - 1) as f64)
}

impl RunResult {
    /// The result of `spec` when it did not run (`why`: skipped for memory, or failed).
    pub(super) fn not_run(spec: &Spec, why: String) -> Self {
        RunResult {
            spec: spec.clone(),
            skipped: Some(why),
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
        }
    }

    pub(super) fn summary(&self) -> Summary {
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
                .filter(|q| !ready_between(&self.ready_at_s, q.sent_s, q.sent_s + q.e2e_ms / 1e3))
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

pub(super) fn mbf(b: f64) -> f64 {
    b / 1e6
}

/// Runs one spec.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_one(
    spec: &Spec,
    all_tenants: &[String],
    work: &[Req],
    warm_work: &[Req],
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
    let (events, ev_task) = FunctionEvents::watch(&client, &dep.model_id).await?;
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
    let requests = send_cold_phase(&dep.tenant_clients, work, tenants, start, &spec.key()).await?;
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
        ready_at: events.ready_at.clone(),
        origin: start,
    };
    let warm = if a.no_warm || mine.is_empty() {
        None
    } else {
        Some(warm_phase(&harness, &mine, warm_work, tenants).await)
    };
    let sweep_points = if mine.is_empty() {
        Vec::new()
    } else {
        sweep_phase(&harness, &mine, sweep, a).await
    };
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
    let cold_starts = events.cold_starts();
    let ready_at_s = events.ready_since(start);
    let spawned = *events.spawned.lock().unwrap();
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
        varz: v1.since(&v0),
        cold_starts,
        ready_at_s,
        spawned,
        warm,
        sweep: sweep_points,
    })
}

/// The cold phase: every request of `work` for `tenants`, each sent at its offset from
/// `start` with its tenant's client, with progress every 10 s; their results.
async fn send_cold_phase(
    clients: &BTreeMap<String, async_nats::Client>,
    work: &[Req],
    tenants: &[String],
    start: tokio::time::Instant,
    key: &str,
) -> anyhow::Result<Vec<ReqResult>> {
    let results: Arc<Mutex<Vec<ReqResult>>> = Default::default();
    let mut tasks = Vec::new();
    for r in work.iter().filter(|r| tenants.contains(&r.tenant)) {
        let (client, results, r) = (clients[&r.tenant].clone(), results.clone(), r.clone());
        tasks.push(tokio::spawn(async move {
            workload::sleep_until(start, r.at_s).await;
            let out = phases::send(&client, &r.tenant, r.index, &r.ids, r.max_tokens, start).await;
            results.lock().unwrap().push(out);
        }));
    }
    let total = tasks.len();
    let r2 = results.clone();
    let key = key.to_string();
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
    let requests = std::mem::take(&mut *results.lock().unwrap());
    Ok(requests)
}

/// The warm phase: a priming pass over `mine` (the cold workload of these tenants), then
/// the warm workload of `tenants` replayed; printed and returned.
async fn warm_phase(
    harness: &phases::Harness<'_>,
    mine: &[Req],
    warm_work: &[Req],
    tenants: &[String],
) -> phases::Phase {
    harness.prime(mine).await;
    let warm_mine: Vec<Req> = warm_work
        .iter()
        .filter(|r| tenants.contains(&r.tenant))
        .cloned()
        .collect();
    let w = harness.replay(&warm_mine).await;
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
    w
}

/// The capacity sweep: a closed loop at each concurrency of `sweep` over the prompts of
/// `mine`; each point printed, all returned in order.
async fn sweep_phase(
    harness: &phases::Harness<'_>,
    mine: &[Req],
    sweep: &[usize],
    a: &BenchArgs,
) -> Vec<phases::Phase> {
    let per_client = a.sweep_requests.unwrap_or(if a.quick { 2 } else { 4 });
    let max_tokens = mine.iter().map(|r| r.max_tokens).max().unwrap_or(8).max(2);
    let mut points = Vec::new();
    for &c in sweep {
        let p = harness.closed_loop(mine, c, per_client, max_tokens).await;
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
        points.push(p);
    }
    points
}
