//! What the bench writes: the machine line, the CSV files and `report.md`.

use super::*;

pub(super) fn machine() -> String {
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

pub(super) fn git_commit() -> String {
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

pub(super) fn f(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "-".into()
    }
}

pub(super) fn write_controller_csv(
    out: &Path,
    rows: &[controller::ControllerRow],
) -> anyhow::Result<()> {
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

/// The run CSVs in `out`: `runs.csv`, `requests.csv`, `samples.csv` and `experts.csv`.
///
/// Errors: a file that cannot be written.
pub(super) fn write_csvs(
    out: &Path,
    results: &[RunResult],
    experts: &[ExpertRow],
) -> anyhow::Result<()> {
    write_runs_csv(out, results)?;
    write_requests_csv(out, results)?;
    write_samples_csv(out, results)?;
    write_experts_csv(out, experts)?;
    Ok(())
}

/// `runs.csv` in `out`: one row per run: what it served, its memory and CPU, dispatch and NATS traffic, cold starts, and its ratios to the baselines of the same tenant count.
fn write_runs_csv(out: &Path, results: &[RunResult]) -> anyhow::Result<()> {
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
    Ok(())
}

/// `requests.csv` in `out`: one row per request of every phase of every run (cold, warm, the sweep's points), with its timings.
fn write_requests_csv(out: &Path, results: &[RunResult]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(out.join("requests.csv"))?;
    w.write_record([
        "mode",
        "tenants",
        "granularity",
        "phase",
        "phase_start_s",
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
        // Every phase's requests: cold (from scale to zero), warm, then the sweep's points.
        // sent_s is measured from its phase's start, phase_start_s from the cold workload's.
        let mut phases: Vec<(String, f64, &[ReqResult])> = vec![("cold".into(), 0.0, &r.requests)];
        if let Some(w) = &r.warm {
            phases.push(("warm".into(), w.from_s, &w.requests));
        }
        for p in &r.sweep {
            phases.push((
                format!("sweep-c{}", p.concurrency.unwrap_or(0)),
                p.from_s,
                &p.requests,
            ));
        }
        for ((phase, phase_start), q) in phases
            .iter()
            .flat_map(|(p, from, qs)| qs.iter().map(move |q| ((p, *from), q)))
        {
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
                phase.clone(),
                f(phase_start, 3),
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
    Ok(())
}

/// `samples.csv` in `out`: the /proc samples of every run, per role and in total.
fn write_samples_csv(out: &Path, results: &[RunResult]) -> anyhow::Result<()> {
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
    Ok(())
}

/// `experts.csv` in `out`: the single-function cold starts and memory, per expert count and repeat.
fn write_experts_csv(out: &Path, experts: &[ExpertRow]) -> anyhow::Result<()> {
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
pub(super) fn baseline_of(results: &[RunResult], mode: Mode, tenants: usize) -> Option<Summary> {
    results
        .iter()
        .find(|r| r.spec.mode == mode && r.spec.tenants == tenants && r.skipped.is_none())
        .map(|r| r.summary())
}

pub(super) fn ratios(s: &Summary, base: Option<&Summary>) -> (f64, f64, f64) {
    match base {
        Some(b) => (
            s.pss_mean / b.pss_mean,
            s.cpu_percent / b.cpu_percent,
            percentile(&s.tpot, 50.0) / percentile(&b.tpot, 50.0),
        ),
        None => (f64::NAN, f64::NAN, f64::NAN),
    }
}

pub(super) fn headline(results: &[RunResult]) -> String {
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
pub(super) fn report_md(
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
        "- workload: Azure LLM inference traces (Splitwise, ISCA 2024, CC-BY 4.0); tenant t1, t3, t5 … replays the conversation trace and t2, t4 … the code trace, {n_req} requests each in the cold phase; {}; scale: prompt tokens ÷{}, clamped to {:?}; output tokens ÷{}, clamped to {:?}; inter-arrival × {}; greedy decoding; the same token ids for every mode",
        if a.no_warm { "no warm phase (--no-warm)".to_string() } else { format!("{} in the warm phase (the same trace rows, more of them: the cold workload is its start and its priming pass)", a.warm_requests_per_tenant()) }, scale.prompt_div, scale.prompt_range, scale.output_div, scale.output_range, scale.time_mul
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
    let _ = writeln!(r, "\n## Files\n\n- runs.csv (one row per mode/setting), requests.csv (every request of every phase: cold, warm, sweep-c<n>), phases.csv, samples.csv (per role over time), experts.csv, controller.csv\n- {plot_note}\n- logs/ (every process's log)");
    r
}
