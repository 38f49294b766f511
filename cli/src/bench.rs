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

mod args;
mod controller;
pub mod decode;
mod deployment;
mod experts;
mod floor;
mod functions;
mod phases;
mod plot;
pub mod prefill;
mod report;
mod run;
mod sampler;
mod serve;

use self::deployment::*;
use self::experts::*;
use self::report::*;
use self::run::*;
use self::sampler::*;

pub use args::BenchArgs;
pub use serve::{run as serve_baseline, ServeBaselineArgs};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faasmoe_broker::{EmbeddedServer, ServerOptions};
use faasmoe_controller::tokenizer::QwenTokenizer;
use faasmoe_proto::generate::GenerateResponse;
use futures::StreamExt;
use procfs::Current as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::monitor::{self, percentile};
use crate::stack::{log_file, model_id_of, sibling};
use crate::workload::{self, Scale};
use faasmoe_broker::InternalCredentials;

pub(crate) fn mem_available() -> u64 {
    procfs::Meminfo::current()
        .ok()
        .and_then(|m| m.mem_available)
        .unwrap_or(0)
}

/// The bench's run settings: the flags given, the defaults of `--quick` or of the full run
/// for the others.
struct Resolved {
    tenant_counts: Vec<usize>,
    grans: Vec<u32>,
    /// The granularity the modes are compared at.
    compare_g: u32,
    modes: Vec<Mode>,
    /// Requests per tenant in the cold phase.
    n_req: usize,
    /// Requests per tenant in the warm phase.
    warm_req: usize,
    /// Largest prompt and output, tokens.
    max_prompt: u32,
    max_output: u32,
    /// Concurrency levels of the capacity sweep (empty: no sweep).
    sweep_levels: Vec<usize>,
    /// Cold starts measured per expert count.
    repeats: usize,
    /// How long to keep sampling after the workload (scale to zero), s.
    tail_s: f64,
    /// Results directory.
    out: PathBuf,
}

impl Resolved {
    /// Errors: an unknown mode name.
    fn from_args(a: &BenchArgs) -> anyhow::Result<Self> {
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
        let out = a.out.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "results/bench-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            ))
        });
        Ok(Resolved {
            tenant_counts,
            grans,
            compare_g,
            modes,
            n_req: a.requests.unwrap_or(if quick { 2 } else { 4 }),
            warm_req: a.warm_requests_per_tenant(),
            max_prompt: a.max_prompt.unwrap_or(if quick { 32 } else { 128 }),
            max_output: a.max_output.unwrap_or(if quick { 8 } else { 24 }),
            sweep_levels,
            repeats: a.cold_start_repeats.unwrap_or(if quick { 5 } else { 10 }),
            tail_s: a.tail_s.unwrap_or(if quick {
                0.0
            } else {
                a.idle_timeout_ms as f64 / 1e3 + 2.0
            }),
            out,
        })
    }
}

/// Runs the benchmark.
pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let t_all = Instant::now();
    let Resolved {
        tenant_counts,
        grans,
        compare_g,
        modes,
        n_req,
        warm_req,
        max_prompt,
        max_output,
        sweep_levels,
        repeats,
        tail_s,
        out,
    } = Resolved::from_args(&a)?;
    std::fs::create_dir_all(&out)?;
    if a.decode_only || !a.no_decode_bench {
        decode_section(&a, &out).await?;
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
            no_warm_replay: true,
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
    // Tenant i's rows start at the same trace row in both phases, so the cold workload (the
    // warm phase's priming pass) is the start of the warm one.
    let stride = n_req.max(warm_req);
    let work = trace_requests(&tenant_names, n_req, stride, &corpus, &scale)?;
    let warm_work = if a.no_warm {
        Vec::new()
    } else {
        trace_requests(&tenant_names, warm_req, stride, &corpus, &scale)?
    };

    let specs = plan(&modes, &tenant_counts, &grans, compare_g, max_t);
    let ckpt_bytes = checkpoint_bytes(&model);
    println!(
        "faasmoe bench: {} runs on {} ({} layers, hidden {}, {} experts top-{}, {:.2} GB on disk); tenants {:?}; granularities {:?} (comparison at {compare_g}); {n_req} requests per tenant; results in {}",
        specs.iter().filter(|s| s.same_as.is_none()).count(), model.display(), cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, ckpt_bytes as f64 / 1e9, tenant_counts, grans, out.display()
    );

    let mut results = run_specs(
        &specs,
        &a,
        &model,
        &cfg,
        ckpt_bytes,
        (&tenant_names, &work, &warm_work),
        (&out, tail_s, &sweep_levels),
        (max_t, compare_g),
    )
    .await;
    add_aliases(&specs, &mut results);
    results.sort_by_key(|r| (r.spec.tenants, r.spec.mode, r.spec.granularity));

    // Per-expert memory and cold start; a controller's memory.
    let expert = if a.no_expert_bench {
        ExpertSection::not_measured()
    } else {
        expert_section(&a, repeats, &out).await?
    };

    let (table, report, plot_note) = write_outputs(
        &a,
        &out,
        &model,
        &cfg,
        ckpt_bytes,
        &scale,
        (n_req, &tenant_counts, &grans, compare_g, max_t),
        &results,
        &expert,
        t_all,
    )?;
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

/// Runs every spec of `specs` that is not an alias of another, one after the other, with
/// the workload (`tenant_names`, the cold phase `work`, the warm phase `warm_work`): skips
/// those that would not fit in memory ([`memory_shortfall`]); the capacity sweep
/// (`sweep_levels`) runs only at `max_t` tenants and, for faasmoe modes, at `compare_g`. A
/// failed or skipped run is a result with its reason.
#[allow(clippy::too_many_arguments)]
async fn run_specs(
    specs: &[Spec],
    a: &BenchArgs,
    model: &Path,
    cfg: &faasmoe_model::Config,
    ckpt_bytes: u64,
    (tenant_names, work, warm_work): (&[String], &[Req], &[Req]),
    (out, tail_s, sweep_levels): (&Path, f64, &[usize]),
    (max_t, compare_g): (usize, u32),
) -> Vec<RunResult> {
    let mut results: Vec<RunResult> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        if spec.same_as.is_some() {
            continue;
        }
        if let Some(why) = memory_shortfall(spec, model, cfg, ckpt_bytes) {
            println!("[{}/{}] {}: SKIPPED: {why}", i + 1, specs.len(), spec.key());
            results.push(RunResult::not_run(spec, why));
            continue;
        }
        println!("[{}/{}] {} …", i + 1, specs.len(), spec.key());
        let sweep: &[usize] =
            if spec.tenants == max_t && spec.granularity.is_none_or(|g| g == compare_g) {
                sweep_levels
            } else {
                &[]
            };
        match run_one(
            spec,
            tenant_names,
            work,
            warm_work,
            model,
            a,
            out,
            tail_s,
            sweep,
        )
        .await
        {
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
                results.push(RunResult::not_run(spec, format!("failed: {e:#}")));
            }
        }
    }
    results
}

/// Writes the CSVs, the plots and `report.md` of the runs `results` and the single-function
/// section `expert` into `out`; returns the headline table, the report and the plots' line.
///
/// Errors: a CSV or the report cannot be written (a plot failure is only reported).
#[allow(clippy::too_many_arguments)]
fn write_outputs(
    a: &BenchArgs,
    out: &Path,
    model: &Path,
    cfg: &faasmoe_model::Config,
    ckpt_bytes: u64,
    scale: &Scale,
    (n_req, tenant_counts, grans, compare_g, max_t): (usize, &[usize], &[u32], u32, usize),
    results: &[RunResult],
    expert: &ExpertSection,
    t_all: Instant,
) -> anyhow::Result<(String, String, String)> {
    // CSVs.
    write_csvs(out, results, &expert.expert_rows)?;
    write_controller_csv(out, &expert.controller_rows)?;
    phases::write_csv(out, results)?;
    // Plots.
    let plot_note = match plot::all(out, results, max_t) {
        Ok(files) => format!("plots: {}", files.join(", ")),
        Err(e) => format!("plots FAILED: {e:#}"),
    };
    // Report.
    let table = headline(results);
    let report = report_md(
        a,
        model,
        cfg,
        ckpt_bytes,
        scale,
        n_req,
        tenant_counts,
        grans,
        compare_g,
        results,
        &expert.expert_rows,
        &expert.expert_model_desc,
        &expert.controller_rows,
        &expert.controller_desc,
        &table,
        &plot_note,
        t_all.elapsed().as_secs_f64(),
    );
    Ok((table, report, plot_note))
}

/// The per-layer decode section (`bench --decode-only`, or first in a full run): results in
/// `out`. A failure ends a `--decode-only` run and is only reported in a full one.
async fn decode_section(a: &BenchArgs, out: &Path) -> anyhow::Result<()> {
    let dm = match &a.decode_model {
        Some(m) => m.clone(),
        None => ensure_expert_model(a)?,
    };
    let settings = decode::DecodeSettings {
        batches: a.decode_batches.clone(),
        contexts: a.decode_contexts.clone(),
        reps: a.decode_reps,
        bandwidth_mib: a.bandwidth_mib,
        shared_granularity: (!a.decode_local_only).then_some(a.decode_granularity),
    };
    let dir = out.to_path_buf();
    match tokio::task::spawn_blocking(move || decode::run(&dm, &dir, &settings)).await? {
        Ok(_) => Ok(()),
        Err(e) if !a.decode_only => {
            println!("    decode bench FAILED: {e:#}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Why the run `spec` of `model` would not fit in memory (MemAvailable now), if it would
/// not: an estimate of what its processes need, used only to skip.
fn memory_shortfall(
    spec: &Spec,
    model: &Path,
    cfg: &faasmoe_model::Config,
    ckpt_bytes: u64,
) -> Option<String> {
    let file_elem = match cfg_torch_dtype(model).as_deref() {
        Some("float32") => 4.0,
        _ => 2.0,
    };
    // candle-transformers' baseline widens every weight to f32.
    let est_baseline = ckpt_bytes as f64 * 4.0 / file_elem;
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
    // for one function of the A2.7B layer geometry).
    let mut fn_procs = 0usize;
    if let Some(g) = spec.granularity {
        let g = (g as usize).clamp(1, cfg.num_experts.max(1));
        let per_layer = cfg.num_experts.div_ceil(g);
        fn_procs = cfg.moe_layers().count() * per_layer;
        let expert_bytes = 3.0 * cfg.hidden_size as f64 * cfg.moe_intermediate_size as f64 * 4.0;
        need += fn_procs as f64 * (16e6 + g as f64 * expert_bytes);
    }
    if (procs == 0 && fn_procs == 0) || need <= avail as f64 * 0.9 {
        return None;
    }
    Some(if procs > 0 {
        format!("needs ≈{:.1} GB ({procs} × f32 copy of the {:.2} GB checkpoint) but MemAvailable is {:.1} GB", need / 1e9, ckpt_bytes as f64 / 1e9, avail as f64 / 1e9)
    } else {
        format!("up to {fn_procs} function instances would need ≈{:.1} GB (estimate) but MemAvailable is {:.1} GB", need / 1e9, avail as f64 / 1e9)
    })
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

/// The runs of the mode comparison: every mode at every tenant count (the faasmoe modes at
/// `compare_g` experts per function), one tenant's shared-baseline, faasmoe-private and
/// local-baseline marked as the same deployment as baseline, faasmoe-shared and local-split;
/// then faasmoe-shared at each other granularity of `grans` at `max_t` tenants.
fn plan(
    modes: &[Mode],
    tenant_counts: &[usize],
    grans: &[u32],
    compare_g: u32,
    max_t: usize,
) -> Vec<Spec> {
    let mut specs = Vec::new();
    for &t in tenant_counts {
        for &m in modes {
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
        for &g in grans {
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
    specs
}

/// Adds a copy of its source's result for every spec that is the same deployment as
/// another (one tenant: shared-baseline ≡ baseline, …).
fn add_aliases(specs: &[Spec], results: &mut Vec<RunResult>) {
    for spec in specs {
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
}

/// What the per-expert section measured, or why not.
struct ExpertSection {
    expert_rows: Vec<ExpertRow>,
    expert_model_desc: String,
    controller_rows: Vec<controller::ControllerRow>,
    controller_desc: String,
}

impl ExpertSection {
    fn not_measured() -> Self {
        Self {
            expert_rows: Vec::new(),
            expert_model_desc: "not measured (--no-expert-bench)".into(),
            controller_rows: Vec::new(),
            controller_desc: "not measured (--no-expert-bench)".into(),
        }
    }
}

/// One function's cold start and RSS per expert (`repeats` spawns of 1 expert, sets of 1, 10
/// and, without `--quick`, all experts) and a controller's memory, on the expert checkpoint
/// (the exact A2.7B layer geometry). A failed part is reported in its description.
///
/// Errors: an unreadable `config.json` of the expert checkpoint.
async fn expert_section(
    a: &BenchArgs,
    repeats: usize,
    out: &Path,
) -> anyhow::Result<ExpertSection> {
    let mut sec = ExpertSection::not_measured();
    match ensure_expert_model(a) {
        Ok(em) => {
            let ecfg = faasmoe_model::Config::from_dir(&em)?;
            let n = ecfg.num_experts as u32;
            let mut sets = vec![1, 10.min(n)];
            if !a.quick {
                sets.push(n);
            }
            sets.dedup();
            println!("per-expert memory and cold start ({} layer(s), hidden {}, expert intermediate {}, {} experts; sets {:?}, {repeats} repeats of 1 expert)…", ecfg.num_hidden_layers, ecfg.hidden_size, ecfg.moe_intermediate_size, n, sets);
            sec.expert_model_desc = format!(
                "{} ({} layer(s), hidden {}, expert intermediate {}, {} experts, vocab {}; {:.2} GB on disk)",
                em.display(), ecfg.num_hidden_layers, ecfg.hidden_size, ecfg.moe_intermediate_size, n, ecfg.vocab_size, checkpoint_bytes(&em) as f64 / 1e9
            );
            match expert_bench(&em, &sets, repeats, &out.join("logs").join("experts")).await {
                Ok(r) => sec.expert_rows = r,
                Err(e) => {
                    println!("    expert bench FAILED: {e:#}");
                    sec.expert_model_desc.push_str(&format!("; FAILED: {e:#}"));
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
                Ok(r) => sec.controller_rows = r,
                Err(e) => {
                    println!("    controller memory FAILED: {e:#}");
                    sec.controller_desc = format!("FAILED: {e:#}");
                }
            }
        }
        Err(e) => sec.expert_model_desc = format!("FAILED to create the checkpoint: {e:#}"),
    }
    Ok(sec)
}

/// The workload of `per_tenant` requests for each tenant: tenant `i` (from 0) replays
/// `per_tenant` rows of the conversation (even `i`) or code (odd `i`) trace from row
/// `(i / 2) × stride` (`stride` ≥ `per_tenant`), scaled by `scale`; its token ids are windows of `corpus`, so every mode gets
/// the same ids.
///
/// Errors: a trace shorter than the rows asked for.
fn trace_requests(
    tenant_names: &[String],
    per_tenant: usize,
    stride: usize,
    corpus: &[u32],
    scale: &Scale,
) -> anyhow::Result<Vec<Req>> {
    let mut work = Vec::new();
    for (i, t) in tenant_names.iter().enumerate() {
        let trace = if i % 2 == 0 {
            workload::CONV_TRACE
        } else {
            workload::CODE_TRACE
        };
        let rows = workload::load(trace, (i / 2) * stride, per_tenant, scale)?;
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
    }
    Ok(work)
}
