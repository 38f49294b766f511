//! The decode-scaling section of `faasmoe bench`: one decode step timed at batch 1, 2, 4, …
//! and at several context lengths, next to the floors measured in the same run, for
//! - **local-split**: the control plane and every routed expert in this process, the kernel
//!   on every core;
//! - **faasmoe-shared**: the same control plane, the routed experts in real expert workers
//!   started by a real broker at one granularity (`--decode-granularity`, default 60), over
//!   a real nats-server ([`super::functions`]).
//!
//! Both run [`faasmoe_controller::engine::forward_batch`], what an engine step runs per
//! micro-batch.
//!
//! - **Floor** of a step = (bytes of the distinct weights it reads: control-plane matrices,
//!   the routed experts the step touches, plus the KV cache it attends over) ÷ (read
//!   bandwidth of re-reading a buffer of those same bytes, every core, best of 3 after a
//!   warm-up pass). The step re-reads its weights every step, so on a machine whose last-level
//!   cache holds part of them (300 MiB of L3 on an Emerald Rapids Xeon, against 177 MB for
//!   one A2.7B layer) the step is served partly from cache, and so is this floor. The
//!   **DRAM floor** divides by the bandwidth over a buffer much larger than the caches
//!   (`--bandwidth-mib`), what a full model whose weights exceed the caches sees.
//! - Both bandwidths are sums of f32 with 64 partial sums (AVX-512 when the CPU has it), so
//!   the reader is not slower than the kernel's own weight stream.
//! - **Compute floor** of a step = (multiply-adds of its rows through the matrices and
//!   attention, [`super::floor::macs_per_token`]) ÷ (f32 FMA peak of every core on the
//!   kernel's path, [`super::floor::fma_peak`]). A step can be no faster than the larger
//!   floor; at large batches that is the compute one.
//! - **Identical prompts**: every sequence of a batch feeds the same token at the same
//!   context, so all rows route to the same experts (the floor does not grow with the batch).
//! - **Distinct prompts**: sequence `i` feeds its own token, so rows route to different
//!   experts: the step touches more of them and its floor grows with the batch; the table
//!   shows how many and the step ÷ its own floor.
//! - **Context**: each sequence's cache is filled with `context` positions of synthetic keys
//!   and values through [`KvCache::append`] (what attention costs does not depend on the
//!   values), and truncated back after each timed step so every step sees the same context.
//! - **Side by side**: the timed steps go round-robin over every point (rep 1 of each
//!   point, then rep 2, …), so noise from the machine's neighbours weighs on all points
//!   alike; each point reports its median.
//!
//! - **Baseline**: candle-transformers' `qwen2_moe` (f32 weights, its own KV cache) at the
//!   same batch sizes and identical prompts, points in sequence; printed next to local-split
//!   (`decode_baseline.csv`). Checkpoints candle's model cannot load (`mlp_only_layers`,
//!   `qkv_bias: false`) skip it with the reason.
//!
//! Writes `decode.csv` (one row per mode × context × batch × prompts) and prints a table
//! per mode.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use candle_core::DType;
use faasmoe_controller::dispatch::{Dispatch, DispatchContext, LocalDispatch};
use faasmoe_controller::engine::forward_batch;
use faasmoe_model::{load_local, KvCache};

use super::floor::{bandwidth_buffer, fma_peak, macs_per_token, read_bandwidth, read_bandwidth_of};
use super::functions::{Functions, Touched};

mod table;

use table::*;

/// Where a decode point's routed experts are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DecodeMode {
    /// In this process (`faasmoe controller --local-experts`).
    LocalSplit,
    /// In expert workers over NATS, one granularity (`faasmoe up`).
    FaasmoeShared,
}

impl DecodeMode {
    /// The bench's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            DecodeMode::LocalSplit => "local-split",
            DecodeMode::FaasmoeShared => "faasmoe-shared",
        }
    }
}

/// Settings of the section.
#[derive(Debug, Clone)]
pub struct DecodeSettings {
    /// Batch sizes at the first context.
    pub batches: Vec<usize>,
    /// Context lengths (tokens cached before the step), at batch 1 (and the batch sweep at
    /// the first one).
    pub contexts: Vec<usize>,
    /// Timed steps per point (the median is reported), after one untimed warm-up step.
    pub reps: usize,
    /// Size of the bandwidth buffer, MiB.
    pub bandwidth_mib: usize,
    /// Experts per function of the faasmoe-shared points; `None` measures local-split only.
    pub shared_granularity: Option<u32>,
}

/// One measured point.
#[derive(Debug, Clone)]
pub struct DecodeRow {
    /// Where the routed experts were computed.
    pub mode: DecodeMode,
    /// Tokens in each sequence's cache before the step.
    pub context: usize,
    /// Sequences in the step.
    pub batch: usize,
    /// Median step time, ms.
    pub step_ms: f64,
    /// Bytes the step reads at least once (weights and KV caches).
    pub bytes: usize,
    /// `bytes` ÷ read bandwidth of re-reading `bytes`, ms.
    pub floor_ms: f64,
    /// `bytes` ÷ read bandwidth over a buffer larger than the caches, ms.
    pub dram_floor_ms: f64,
    /// Read bandwidth of re-reading `bytes`, bytes/s.
    pub read_bw: f64,
    /// Distinct routed experts the step touched (over all MoE layers).
    pub experts: usize,
    /// Whether every sequence fed its own token (distinct prompts) rather than the same one.
    pub distinct: bool,
    /// Multiply-adds of the step ÷ the FMA peak measured in the same run, ms.
    pub compute_floor_ms: f64,
}

impl DecodeRow {
    /// The larger of the memory floor (re-read) and the compute floor, ms.
    pub fn max_floor_ms(&self) -> f64 {
        self.floor_ms.max(self.compute_floor_ms)
    }
}

/// Fills `cache` with `len` positions of synthetic keys and values in every layer.
fn fill(cache: &mut KvCache, layers: usize, kv_heads: usize, head_dim: usize, len: usize) {
    let w = kv_heads * head_dim;
    let mut x = 0x2545_f491_u32;
    let vals: Vec<f32> = (0..len * w)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 - 0.5) * 2.0
        })
        .collect();
    for l in 0..layers {
        cache
            .append(l, 0, kv_heads, head_dim, &vals, &vals)
            .expect("synthetic KV fits the layer");
    }
}

/// Bytes a step reads at least once, and what it takes to count them.
struct Sizes {
    /// Control-plane weights.
    cp_bytes: usize,
    /// One routed expert's weights.
    expert_bytes: usize,
    /// Cached keys and values (f32) of one position over every layer.
    kv_per_token: usize,
}

impl Sizes {
    /// Weights, plus each sequence's cached keys and values over every layer.
    fn point_bytes(&self, experts: usize, batch: usize, context: usize) -> usize {
        self.cp_bytes + experts * self.expert_bytes + batch * context * self.kv_per_token
    }
}

/// A decode point while it is being timed.
struct Point {
    mode: DecodeMode,
    context: usize,
    batch: usize,
    distinct: bool,
    caches: Vec<KvCache>,
    feeds: Vec<[u32; 1]>,
    times: Vec<f64>,
    experts: usize,
}

/// The points of the sweep, per mode: `(mode, context, batch, distinct prompts)`: the batch
/// sweep at the first context with identical and with distinct prompts, batch 1 at each
/// other context.
fn plan(s: &DecodeSettings, modes: &[DecodeMode]) -> Vec<(DecodeMode, usize, usize, bool)> {
    let mut points = Vec::new();
    for &m in modes {
        if let Some(&c0) = s.contexts.first() {
            points.extend(s.batches.iter().map(|&b| (m, c0, b, false)));
            points.extend(
                s.batches
                    .iter()
                    .filter(|&&b| b > 1)
                    .map(|&b| (m, c0, b, true)),
            );
        }
        for &c in s.contexts.iter().skip(1) {
            points.push((m, c, 1, false));
        }
    }
    points
}

/// Runs the section on `model`, prints a table per mode and writes `out/decode.csv` (and
/// the baseline's `decode_baseline.csv`). Must be called on a blocking thread of a tokio
/// runtime (`spawn_blocking`): the faasmoe-shared steps block on the runtime's handle.
///
/// Errors: the checkpoint does not load, the points' KV caches would not fit in memory, the
/// functions do not start (nats-server or broker missing), or a step fails.
pub fn run(model: &Path, out: &Path, s: &DecodeSettings) -> anyhow::Result<Vec<DecodeRow>> {
    anyhow::ensure!(s.reps >= 1, "--decode-reps must be at least 1");
    let rt = tokio::runtime::Handle::try_current()
        .context("the decode section runs on a tokio runtime's blocking thread")?;
    let (cp, backend) =
        load_local(model, DType::F32).with_context(|| format!("loading {}", model.display()))?;
    let cfg = cp.config().clone();
    let moe_layers = cfg.moe_layers().count().max(1);
    let sizes = Sizes {
        cp_bytes: cp.weight_bytes(),
        expert_bytes: backend.experts().weight_bytes() / (moe_layers * cfg.num_experts.max(1)),
        kv_per_token: cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4,
    };
    let bw = read_bandwidth(s.bandwidth_mib);
    let path = faasmoe_model::kernel::default_path().map_or("portable", |p| p.name());
    let peak = fma_peak(path);
    println!(
        "decode scaling: {} ({} layer(s), hidden {}, {} heads / {} kv heads × {}, {} experts top-{}); \
         control plane {:.1} MB, {:.2} MB per routed expert; read bandwidth {:.1} GB/s ({} MiB, {} threads); \
         FMA peak {:.1} GFLOP/s ({path} kernel path)",
        model.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        sizes.cp_bytes as f64 / 1e6,
        sizes.expert_bytes as f64 / 1e6,
        bw / 1e9,
        s.bandwidth_mib,
        rayon::current_num_threads(),
        2.0 * peak / 1e9
    );
    let functions = match s.shared_granularity {
        Some(g) => {
            let logs = out.join("decode-logs");
            println!(
                "    faasmoe-shared: nats-server and faasmoe-broker at granularity {} (logs in {})",
                g.clamp(1, cfg.num_experts.max(1) as u32),
                logs.display()
            );
            match rt.block_on(Functions::start(model, &cfg, g, &logs)) {
                Ok(f) => Some(f),
                Err(e) => {
                    println!("    faasmoe-shared: not measured: {e:#}");
                    None
                }
            }
        }
        None => None,
    };
    let mut modes = vec![DecodeMode::LocalSplit];
    if functions.is_some() {
        modes.push(DecodeMode::FaasmoeShared);
    }
    let state = new_points(&cp, s, &sizes, &plan(s, &modes));
    let local = LocalDispatch(backend);
    let timed = match state {
        Ok(mut state) => {
            let shared = functions
                .as_ref()
                .map(|f| f.dispatch.as_ref() as &dyn Dispatch);
            time_points(&rt, &cp, &local, shared, &mut state, s.reps).map(|()| state)
        }
        Err(e) => Err(e),
    };
    // The model and the workers go before the floors' buffer (as large as the largest
    // point's bytes) is allocated, so it never sits on top of them.
    drop((cp, local));
    let granularity = functions.as_ref().map(|f| f.granularity);
    if let Some(f) = functions {
        rt.block_on(f.stop());
    }
    let rows = floors(timed?, &sizes, bw, peak, &cfg);
    for m in &modes {
        let of_mode: Vec<DecodeRow> = rows.iter().filter(|r| r.mode == *m).cloned().collect();
        match (m, granularity) {
            (DecodeMode::FaasmoeShared, Some(g)) => println!(
                "    faasmoe-shared (granularity {g}: routed experts in expert workers over NATS):"
            ),
            _ => println!("    local-split (routed experts in-process):"),
        }
        print_table(&of_mode, cfg.num_hidden_layers);
    }
    print_shared_over_local(&rows);
    write_csv(&out.join("decode.csv"), &rows, bw)?;
    if let Some(&c0) = s.contexts.first() {
        let token = first_token(&cfg);
        match baseline_sweep(model, s, c0, token) {
            Ok(b) => {
                print_baseline(&b, &rows, c0);
                write_baseline_csv(&out.join("decode_baseline.csv"), &b, &rows, c0)?;
            }
            Err(e) => println!("    baseline (candle-transformers): not measured: {e:#}"),
        }
    }
    Ok(rows)
}

/// The token every sequence feeds with identical prompts.
fn first_token(cfg: &faasmoe_model::Config) -> u32 {
    1u32.min(cfg.vocab_size as u32 - 1)
}

/// Every point's sequences, their caches filled to the point's context.
///
/// Errors: every point's caches live at once (the round-robin of [`time_points`]), each
/// grown once to twice its context by the warm-up step: a sweep that cannot fit in the
/// available memory is refused instead of swapping.
fn new_points(
    cp: &faasmoe_model::ControlPlane,
    s: &DecodeSettings,
    sizes: &Sizes,
    planned: &[(DecodeMode, usize, usize, bool)],
) -> anyhow::Result<Vec<Point>> {
    let cfg = cp.config();
    let kv_bytes: usize = planned
        .iter()
        .map(|&(_, context, batch, _)| batch * 2 * (context + 1) * sizes.kv_per_token)
        .sum();
    let avail = super::mem_available();
    anyhow::ensure!(
        (kv_bytes as u64) < avail / 10 * 8,
        "the decode points' KV caches need about {:.1} GB at once, {:.1} GB is available: \
         fewer --decode-batches or a smaller first --decode-contexts (the batch sweep runs there)",
        kv_bytes as f64 / 1e9,
        avail as f64 / 1e9
    );
    let token = first_token(cfg);
    let mut state = Vec::new();
    for &(mode, context, batch, distinct) in planned {
        if context + 1 > cfg.max_position_embeddings {
            println!("    context {context}: past max_position_embeddings, skipped");
            continue;
        }
        let caches: Vec<KvCache> = (0..batch)
            .map(|_| {
                let mut c = cp.new_cache();
                fill(
                    &mut c,
                    cfg.num_hidden_layers,
                    cfg.num_key_value_heads,
                    cfg.head_dim,
                    context,
                );
                c
            })
            .collect();
        // Distinct prompts: tokens spread over the vocabulary (a multiplicative hash), so
        // the rows route differently.
        let feeds: Vec<[u32; 1]> = (0..batch)
            .map(|i| {
                if distinct {
                    [((i as u64 * 2_654_435_761 + 1) % cfg.vocab_size as u64) as u32]
                } else {
                    [token]
                }
            })
            .collect();
        state.push(Point {
            mode,
            context,
            batch,
            distinct,
            caches,
            feeds,
            times: Vec::with_capacity(s.reps),
            experts: 0,
        });
    }
    Ok(state)
}

/// Times `reps` steps of every point, round-robin over the points (rep 1 of each point,
/// then rep 2, …), so the machine's drift and its neighbours weigh on every point alike and
/// the ratios between points compare steps taken side by side. Rep 0 warms every point up
/// (it grows each cache once and, for faasmoe-shared, starts the functions cold), untimed.
/// Each step is truncated back to the point's context afterwards.
fn time_points(
    rt: &tokio::runtime::Handle,
    cp: &faasmoe_model::ControlPlane,
    local: &dyn Dispatch,
    shared: Option<&dyn Dispatch>,
    state: &mut [Point],
    reps: usize,
) -> anyhow::Result<()> {
    let ctx = DispatchContext {
        tenants: "faasmoe-bench".into(),
    };
    for rep in 0..=reps {
        for p in state.iter_mut() {
            let dispatch = match p.mode {
                DecodeMode::LocalSplit => local,
                DecodeMode::FaasmoeShared => shared.context("faasmoe-shared without functions")?,
            };
            let touched = Touched::new(dispatch);
            let batch_in: Vec<(usize, &[u32])> =
                p.feeds.iter().map(|f| (p.context, &f[..])).collect();
            let mut refs: Vec<&mut KvCache> = p.caches.iter_mut().collect();
            let t = Instant::now();
            let logits = rt
                .block_on(forward_batch(cp, &touched, &batch_in, &mut refs, &ctx))
                .with_context(|| {
                    format!(
                        "{} decode step, batch {}, context {}",
                        p.mode.name(),
                        p.batch,
                        p.context
                    )
                })?;
            std::hint::black_box(&logits);
            let dt = t.elapsed().as_secs_f64() * 1e3;
            p.experts = touched.count();
            if rep > 0 {
                p.times.push(dt);
            }
            for c in p.caches.iter_mut() {
                c.truncate(p.context)?;
            }
        }
    }
    Ok(())
}

/// The rows of the timed points, with their floors: re-reading each point's bytes (a prefix
/// of one buffer, measured per point), the DRAM bandwidth `bw` (bytes/s) and the FMA peak
/// `peak` (FMA/s).
fn floors(
    mut state: Vec<Point>,
    sizes: &Sizes,
    bw: f64,
    peak: f64,
    cfg: &faasmoe_model::Config,
) -> Vec<DecodeRow> {
    // The caches go before the buffer is allocated, so it never sits on top of them.
    for p in state.iter_mut() {
        p.caches = Vec::new();
    }
    let max_bytes = state
        .iter()
        .map(|p| sizes.point_bytes(p.experts, p.batch, p.context))
        .max()
        .unwrap_or(0);
    let buf = bandwidth_buffer(max_bytes);
    state
        .into_iter()
        .map(|p| {
            let bytes = sizes.point_bytes(p.experts, p.batch, p.context);
            let read_bw = read_bandwidth_of(&buf[..bytes.div_ceil(4).clamp(1, buf.len())]);
            DecodeRow {
                mode: p.mode,
                context: p.context,
                batch: p.batch,
                step_ms: median(p.times),
                bytes,
                floor_ms: bytes as f64 / read_bw * 1e3,
                dram_floor_ms: bytes as f64 / bw * 1e3,
                read_bw,
                experts: p.experts,
                distinct: p.distinct,
                compute_floor_ms: (p.batch * macs_per_token(cfg, p.context)) as f64 / peak * 1e3,
            }
        })
        .collect()
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// One decode step of the baseline at one batch size.
#[derive(Debug, Clone)]
pub struct BaselineRow {
    /// Sequences in the step (identical prompts).
    pub batch: usize,
    /// Median step time, ms.
    pub step_ms: f64,
}

/// The baseline's decode step (candle-transformers' monolithic `qwen2_moe`, f32 weights as
/// the bench's baseline mode serves them) at each batch size, identical prompts of `context`
/// tokens. candle's KV cache lives inside the model, so the points run one after another
/// (not round-robin) and the context grows by one token per step (`context` to
/// `context + reps + 1`).
fn baseline_sweep(
    model: &Path,
    s: &DecodeSettings,
    context: usize,
    token: u32,
) -> anyhow::Result<Vec<BaselineRow>> {
    let mut m = faasmoe_model::baseline::Baseline::load(model, DType::F32)?;
    let cfg = m.config().clone();
    let avail = super::mem_available();
    let mut rows = Vec::new();
    for &b in &s.batches {
        // candle's prefill holds `[b, heads, t, t]` f32 attention scores (a few copies):
        // stop before a batch whose prefill cannot fit rather than let the allocation abort.
        let t = context.max(1) as u64;
        let scores = 3 * b as u64 * cfg.num_attention_heads as u64 * t * t * 4;
        if scores > avail / 10 * 8 {
            println!(
                "    baseline: batch {b} and larger skipped (its {t}-token prefill needs about {:.1} GB, {:.1} GB is available)",
                scores as f64 / 1e9,
                avail as f64 / 1e9
            );
            break;
        }
        m.reset();
        let prompt = vec![token; context.max(1)];
        let prompts: Vec<&[u32]> = vec![&prompt[..]; b];
        m.forward_batch(&prompts)?;
        let feed = [token];
        let feeds: Vec<&[u32]> = vec![&feed[..]; b];
        let mut times = Vec::with_capacity(s.reps);
        for rep in 0..=s.reps {
            let t = Instant::now();
            let logits = m.forward_batch(&feeds)?;
            std::hint::black_box(&logits);
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        rows.push(BaselineRow {
            batch: b,
            step_ms: median(times),
        });
    }
    Ok(rows)
}

/// The local-split step at `batch` with identical prompts at `context`, ms.
fn local_step(rows: &[DecodeRow], context: usize, batch: usize) -> f64 {
    rows.iter()
        .find(|r| {
            r.mode == DecodeMode::LocalSplit
                && r.context == context
                && r.batch == batch
                && !r.distinct
        })
        .map_or(f64::NAN, |r| r.step_ms)
}
