//! The bench's phases after the cold one (issue 12): a **warm** replay of a longer slice of
//! the same traces (the cold workload is its start), once a priming pass (the cold workload
//! sent at once) has started the functions, and a closed-loop
//! **capacity sweep** (1, 2, 4, … concurrent sequences) that finds where each mode's
//! throughput stops growing. Every phase is measured on its own: requests, wall time, the
//! deployment's CPU-seconds, and the function instances that became ready during it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faasmoe_proto::generate::{GenerateResponse, CONTENT_TYPE, JSON};

use super::{f, mbf, tpot_ms, Mode, Req, ReqResult, RunResult};
use crate::monitor::percentile;

/// Throughput growth below which the sweep counts a mode as saturated (10%).
pub(super) const SATURATION_GROWTH: f64 = 1.10;
/// The sweep's latency objective: TPOT p99 at most this multiple of its value at concurrency 1.
pub(super) const SLO_TPOT_P99_MULTIPLE: f64 = 2.0;

/// One measured phase.
#[derive(Debug, Clone, Default)]
pub(super) struct Phase {
    /// Concurrent sequences of a closed-loop phase; `None` for a trace replay.
    pub concurrency: Option<usize>,
    pub requests: Vec<ReqResult>,
    /// Wall time of the phase, s.
    pub wall_s: f64,
    /// CPU time of the deployment's processes during the phase, s.
    pub cpu_s: f64,
    /// Function instances that became ready during the phase, s since its start.
    pub ready_at_s: Vec<f64>,
    /// The phase's window on the run's sample clock (s since the cold workload's start).
    pub from_s: f64,
    pub to_s: f64,
}

/// A phase's figures.
#[derive(Debug, Clone, Default)]
pub(super) struct PhaseStats {
    pub ok: usize,
    pub errors: usize,
    pub completion_tokens: u64,
    /// Output tokens per second of wall time.
    pub tok_s: f64,
    /// TTFT of every successful request, ms.
    pub ttft: Vec<f64>,
    /// TPOT of every successful request with ≥ 2 tokens, ms.
    pub tpot: Vec<f64>,
    /// Requests during which no function instance became ready.
    pub warm: usize,
    /// CPU-seconds of the whole deployment per output token.
    pub cpu_s_per_token: f64,
}

impl Phase {
    pub fn stats(&self) -> PhaseStats {
        let oks: Vec<&GenerateResponse> =
            self.requests.iter().filter_map(|r| r.ok.as_ref()).collect();
        let completion: u64 = oks.iter().map(|r| r.usage.completion_tokens as u64).sum();
        PhaseStats {
            ok: oks.len(),
            errors: self.requests.len() - oks.len(),
            completion_tokens: completion,
            tok_s: completion as f64 / self.wall_s.max(1e-9),
            ttft: oks.iter().map(|r| r.timings.ttft_ms).collect(),
            tpot: oks.iter().filter_map(|r| tpot_ms(r)).collect(),
            warm: self
                .requests
                .iter()
                .filter(|q| q.ok.is_some())
                .filter(|q| {
                    !crate::function_events::ready_between(
                        &self.ready_at_s,
                        q.sent_s,
                        q.sent_s + q.e2e_ms / 1e3,
                    )
                })
                .count(),
            cpu_s_per_token: if completion > 0 {
                self.cpu_s / completion as f64
            } else {
                f64::NAN
            },
        }
    }
}

/// Sends one generate request as `tenant` and waits for its reply; `sent_s` is measured
/// from `start`.
pub(super) async fn send(
    client: &async_nats::Client,
    tenant: &str,
    index: usize,
    ids: &[u32],
    max_tokens: u32,
    start: tokio::time::Instant,
) -> ReqResult {
    let sent = start.elapsed().as_secs_f64();
    let body = serde_json::json!({"input_ids": ids, "max_tokens": max_tokens, "temperature": 0.0});
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(CONTENT_TYPE, JSON);
    let subject = faasmoe_proto::subject::generate(tenant).expect("tenant name");
    let t0 = Instant::now();
    let resp = client
        .send_request(
            subject,
            async_nats::Request::new()
                .headers(headers)
                .payload(body.to_string().into())
                .timeout(Some(Duration::from_secs(1800))),
        )
        .await;
    let e2e_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut out = ReqResult {
        tenant: tenant.to_string(),
        index,
        sent_s: sent,
        e2e_ms,
        ..Default::default()
    };
    match resp {
        Ok(m) => match serde_json::from_slice::<GenerateResponse>(&m.payload) {
            Ok(g) => out.ok = Some(g),
            Err(_) => {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                out.error = Some(format!(
                    "{}: {}",
                    v["error"]["code"].as_str().unwrap_or("invalid_reply"),
                    v["error"]["message"].as_str().unwrap_or("")
                ));
            }
        },
        Err(e) => out.error = Some(format!("nats: {}", e.kind())),
    }
    out
}

/// What a phase needs of the running deployment.
pub(super) struct Harness<'a> {
    /// One connection per tenant of the run.
    pub clients: &'a BTreeMap<String, async_nats::Client>,
    /// CPU-seconds of the deployment so far.
    pub cpu_seconds: Box<dyn Fn() -> f64 + Send + Sync + 'a>,
    /// Takes a memory sample now (each phase has one at its start and one at its end, so
    /// a phase shorter than the sampling interval still has its memory measured).
    pub sample: Box<dyn Fn() + Send + Sync + 'a>,
    /// When function instances became ready (from the events subject).
    pub ready_at: Arc<Mutex<Vec<tokio::time::Instant>>>,
    /// The cold workload's start (the run's sample clock).
    pub origin: tokio::time::Instant,
}

impl Harness<'_> {
    async fn measure<F, Fut>(&self, concurrency: Option<usize>, body: F) -> Phase
    where
        F: FnOnce(tokio::time::Instant) -> Fut,
        Fut: std::future::Future<Output = Vec<ReqResult>>,
    {
        let cpu0 = (self.cpu_seconds)();
        let start = tokio::time::Instant::now();
        (self.sample)();
        let requests = body(start).await;
        let wall_s = start.elapsed().as_secs_f64();
        let cpu_s = (self.cpu_seconds)() - cpu0;
        (self.sample)();
        let end = tokio::time::Instant::now();
        let ready_at_s = self
            .ready_at
            .lock()
            .unwrap()
            .iter()
            .filter(|&&t| t >= start && t <= end)
            .map(|&t| (t - start).as_secs_f64())
            .collect();
        Phase {
            concurrency,
            requests,
            wall_s,
            cpu_s,
            ready_at_s,
            from_s: (start - self.origin).as_secs_f64(),
            to_s: (end - self.origin).as_secs_f64(),
        }
    }

    /// Sends every request of `work` at once and waits for all (not measured): starts the
    /// functions the same requests will need.
    pub async fn prime(&self, work: &[Req]) {
        let start = tokio::time::Instant::now();
        let sends = work.iter().map(|r| self.send_req(r, start));
        futures::future::join_all(sends).await;
    }

    /// Sends trace request `r` as its tenant (times relative to `start`).
    async fn send_req(&self, r: &Req, start: tokio::time::Instant) -> ReqResult {
        send(
            &self.clients[&r.tenant],
            &r.tenant,
            r.index,
            &r.ids,
            r.max_tokens,
            start,
        )
        .await
    }

    /// Replays `work` with its arrival times.
    pub async fn replay(&self, work: &[Req]) -> Phase {
        self.measure(None, |start| async move {
            let sends = work.iter().map(|r| async move {
                crate::workload::sleep_until(start, r.at_s).await;
                self.send_req(r, start).await
            });
            futures::future::join_all(sends).await
        })
        .await
    }

    /// `concurrency` clients, each sending `per_client` requests one after another
    /// (prompts of `work` in turn, `max_tokens` each); client `j` is tenant `j mod n`.
    pub async fn closed_loop(
        &self,
        work: &[Req],
        concurrency: usize,
        per_client: usize,
        max_tokens: u32,
    ) -> Phase {
        let tenants: Vec<&String> = self.clients.keys().collect();
        self.measure(Some(concurrency), |start| {
            let tenants = tenants.clone();
            async move {
                let loops = (0..concurrency).map(|j| {
                    let tenant = tenants[j % tenants.len()];
                    async move {
                        let mut out = Vec::with_capacity(per_client);
                        for i in 0..per_client {
                            let r = &work[(j * per_client + i) % work.len()];
                            out.push(
                                send(
                                    &self.clients[tenant],
                                    tenant,
                                    j * per_client + i,
                                    &r.ids,
                                    max_tokens,
                                    start,
                                )
                                .await,
                            );
                        }
                        out
                    }
                });
                futures::future::join_all(loops)
                    .await
                    .into_iter()
                    .flatten()
                    .collect()
            }
        })
        .await
    }
}

/// The cold phase of a run, as a [`Phase`].
pub(super) fn cold_phase(r: &RunResult) -> Phase {
    Phase {
        concurrency: None,
        requests: r.requests.clone(),
        wall_s: r.wall_s,
        cpu_s: r.cpu_s,
        ready_at_s: r.ready_at_s.clone(),
        from_s: 0.0,
        to_s: r.wall_s,
    }
}

/// Mean PSS (bytes) of the run's samples inside a phase's window; NaN without samples.
pub(super) fn pss_mean(r: &RunResult, p: &Phase) -> f64 {
    let v: Vec<f64> = r
        .samples
        .iter()
        .filter(|s| s.t_s >= p.from_s && s.t_s <= p.to_s + 0.01)
        .map(|s| s.total().pss as f64)
        .collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Capacity of a sweep: (the concurrency past which throughput grows by less than
/// [`SATURATION_GROWTH`], if reached; the largest concurrency whose TPOT p99 is within
/// [`SLO_TPOT_P99_MULTIPLE`] × its value at the smallest concurrency).
pub(super) fn capacity(sweep: &[Phase]) -> (Option<usize>, Option<usize>) {
    let stats: Vec<(usize, PhaseStats)> = sweep
        .iter()
        .filter_map(|p| p.concurrency.map(|c| (c, p.stats())))
        .collect();
    let saturated = stats
        .windows(2)
        .find(|w| w[1].1.tok_s < w[0].1.tok_s * SATURATION_GROWTH)
        .map(|w| w[0].0);
    let base = stats.first().map(|(_, s)| percentile(&s.tpot, 99.0));
    let slo = base.and_then(|b| {
        stats
            .iter()
            .filter(|(_, s)| percentile(&s.tpot, 99.0) <= b * SLO_TPOT_P99_MULTIPLE)
            .map(|(c, _)| *c)
            .max()
    });
    (saturated, slo)
}

fn label(r: &RunResult) -> (String, String) {
    let g = r
        .spec
        .granularity
        .map(|g| g.to_string())
        .unwrap_or_else(|| "-".into());
    (r.spec.mode.name().to_string(), g)
}

/// The warm phase's CPU-s per token of `mode` at `tenants` tenants.
fn warm_cpu_per_token(results: &[RunResult], mode: Mode, tenants: usize) -> Option<f64> {
    results
        .iter()
        .find(|r| r.spec.mode == mode && r.spec.tenants == tenants && r.skipped.is_none())
        .and_then(|r| r.warm.as_ref())
        .map(|w| w.stats().cpu_s_per_token)
}

/// The report's section on phases and capacity (markdown).
pub(super) fn report(results: &[RunResult]) -> String {
    let mut t = String::new();
    t.push_str("## Cold and warm phases\n\n");
    t.push_str("The cold phase starts from scale to zero; the warm phase replays a longer slice of the same traces (`--warm-requests` per tenant) after a priming pass (the cold workload, sent at once) has started the functions (warm requests: those during which no instance became ready). CPU-s/token counts every process of the deployment. Ratios: against `baseline` (candle-transformers, a full model per tenant), `local-baseline` (our own unsplit model per tenant, same kernels and dtype) and `local-split` (our own unsplit model, one process for every tenant).\n\n");
    t.push_str("| mode | tenants | experts/function | cold TTFT p50 ms | cold TPOT p50 ms | warm requests | warm TTFT p50 ms | warm TTFT p99 ms | warm TPOT p50 ms | warm TPOT p99 ms | warm tok/s | warm PSS/tenant MB | cold CPU-s/token | warm CPU-s/token | × baseline | × local-baseline | × local-split |\n");
    t.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in results.iter().filter(|r| r.skipped.is_none()) {
        let Some(w) = &r.warm else { continue };
        let (mode, g) = label(r);
        let c = cold_phase(r).stats();
        let s = w.stats();
        let ratio = |m: Mode| {
            warm_cpu_per_token(results, m, r.spec.tenants)
                .map(|b| f(s.cpu_s_per_token / b, 2))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            t,
            "| {mode} | {} | {g} | {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.spec.tenants,
            f(percentile(&c.ttft, 50.0), 0),
            f(percentile(&c.tpot, 50.0), 1),
            s.warm,
            w.requests.len(),
            f(percentile(&s.ttft, 50.0), 0),
            f(percentile(&s.ttft, 99.0), 0),
            f(percentile(&s.tpot, 50.0), 1),
            f(percentile(&s.tpot, 99.0), 1),
            f(s.tok_s, 2),
            f(mbf(pss_mean(r, w)) / r.spec.tenants as f64, 0),
            f(c.cpu_s_per_token, 3),
            f(s.cpu_s_per_token, 3),
            ratio(Mode::Baseline),
            ratio(Mode::LocalBaseline),
            ratio(Mode::LocalSplit),
        );
    }
    let swept: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.skipped.is_none() && !r.sweep.is_empty())
        .collect();
    if !swept.is_empty() {
        let _ = write!(
            t,
            "\n## Capacity sweep (closed loop)\n\nEach point: that many clients, each sending its requests one after another. Saturation: the concurrency past which output tokens/s grows by less than {:.0}%. SLO: TPOT p99 ≤ {SLO_TPOT_P99_MULTIPLE}× its value at concurrency 1.\n\n| mode | tenants | experts/function | concurrency | requests (ok) | tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | CPU-s/token |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
            (SATURATION_GROWTH - 1.0) * 100.0
        );
        for r in &swept {
            let (mode, g) = label(r);
            for p in &r.sweep {
                let s = p.stats();
                let _ = writeln!(
                    t,
                    "| {mode} | {} | {g} | {} | {} ({}) | {} | {} | {} | {} | {} | {} |",
                    r.spec.tenants,
                    p.concurrency.unwrap_or(0),
                    p.requests.len(),
                    s.ok,
                    f(s.tok_s, 2),
                    f(percentile(&s.ttft, 50.0), 0),
                    f(percentile(&s.ttft, 99.0), 0),
                    f(percentile(&s.tpot, 50.0), 1),
                    f(percentile(&s.tpot, 99.0), 1),
                    f(s.cpu_s_per_token, 3),
                );
            }
        }
        t.push_str("\n| mode | tenants | experts/function | throughput stops growing at | largest concurrency meeting the SLO | best tok/s |\n|---|---|---|---|---|---|\n");
        for r in &swept {
            let (mode, g) = label(r);
            let (sat, slo) = capacity(&r.sweep);
            let best = r
                .sweep
                .iter()
                .map(|p| p.stats().tok_s)
                .fold(f64::NAN, f64::max);
            let largest = r
                .sweep
                .iter()
                .filter_map(|p| p.concurrency)
                .max()
                .unwrap_or(0);
            let _ = writeln!(
                t,
                "| {mode} | {} | {g} | {} | {} | {} |",
                r.spec.tenants,
                sat.map(|c| c.to_string())
                    .unwrap_or_else(|| format!("not reached (≤ {largest})")),
                slo.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                f(best, 2)
            );
        }
    }
    t
}

/// `phases.csv`: one row per (run, phase): cold, warm, and each point of the sweep.
pub(super) fn write_csv(out: &Path, results: &[RunResult]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(out.join("phases.csv"))?;
    w.write_record([
        "mode",
        "tenants",
        "granularity",
        "phase",
        "concurrency",
        "requests",
        "ok",
        "errors",
        "warm_requests",
        "completion_tokens",
        "wall_s",
        "tok_per_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "tpot_p99_ms",
        "cpu_s",
        "cpu_s_per_token",
        "pss_mean_mb",
    ])?;
    for r in results.iter().filter(|r| r.skipped.is_none()) {
        let (mode, g) = label(r);
        let cold = cold_phase(r);
        let mut phases = vec![("cold".to_string(), &cold)];
        if let Some(wp) = &r.warm {
            phases.push(("warm".to_string(), wp));
        }
        for p in &r.sweep {
            phases.push((format!("sweep-c{}", p.concurrency.unwrap_or(0)), p));
        }
        for (name, p) in phases {
            let s = p.stats();
            w.write_record([
                mode.clone(),
                r.spec.tenants.to_string(),
                g.clone(),
                name,
                p.concurrency.map(|c| c.to_string()).unwrap_or_default(),
                p.requests.len().to_string(),
                s.ok.to_string(),
                s.errors.to_string(),
                s.warm.to_string(),
                s.completion_tokens.to_string(),
                format!("{:.3}", p.wall_s),
                format!("{:.3}", s.tok_s),
                format!("{:.1}", percentile(&s.ttft, 50.0)),
                format!("{:.1}", percentile(&s.ttft, 99.0)),
                format!("{:.2}", percentile(&s.tpot, 50.0)),
                format!("{:.2}", percentile(&s.tpot, 99.0)),
                format!("{:.3}", p.cpu_s),
                format!("{:.4}", s.cpu_s_per_token),
                format!("{:.1}", mbf(pss_mean(r, p))),
            ])?;
        }
    }
    w.flush()?;
    Ok(())
}
