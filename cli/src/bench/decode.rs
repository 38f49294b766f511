//! The decode-scaling section of `faasmoe bench`: one decode step of the local-split model
//! (control plane and every routed expert in-process, the kernel on every core) timed at
//! batch 1, 2, 4, … and at several context lengths, next to the read-bandwidth floor measured
//! in the same run.
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
//! Writes `decode.csv` (one row per context × batch) and prints the table.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use candle_core::{DType, Tensor};
use faasmoe_model::{load_local, ExpertBackend, InProcessBackend, KvCache, RoutedBatch};
use rayon::prelude::*;

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
}

/// One measured point.
#[derive(Debug, Clone)]
pub struct DecodeRow {
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
}

/// Records the distinct experts touched while computing in-process.
struct Touching<'a> {
    inner: &'a mut InProcessBackend,
    seen: BTreeSet<(usize, usize)>,
}

impl ExpertBackend for Touching<'_> {
    fn routed(&mut self, b: &RoutedBatch) -> faasmoe_model::Result<Tensor> {
        for r in &b.routes {
            self.seen.extend(r.iter().map(|&(e, _)| (b.layer, e)));
        }
        self.inner.routed(b)
    }
}

/// Sum of `c` with 64 partial sums (independent add chains, so the adds keep up with memory).
#[inline(always)]
fn sum_lanes(c: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    let chunks = c.chunks_exact(64);
    let rest: f32 = chunks.remainder().iter().sum();
    for ch in chunks {
        for l in 0..64 {
            acc[l] += ch[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// [`sum_lanes`] compiled for AVX-512 (the bench binary is built for baseline x86-64).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_lanes_avx512(c: &[f32]) -> f32 {
    sum_lanes(c)
}

/// [`sum_lanes`] on the widest vectors this CPU has.
fn sum_fast(c: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { sum_lanes_avx512(c) };
    }
    sum_lanes(c)
}

/// Read bandwidth of `buf` in bytes/s: one warm-up pass, then the best of 3 sums over it on
/// rayon's threads (256 KiB blocks).
pub fn read_bandwidth_of(buf: &[f32]) -> f64 {
    let mut best = f64::INFINITY;
    let mut sink = 0f32;
    for pass in 0..4 {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(1 << 16).map(sum_fast).sum();
        if pass > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
        sink += s;
    }
    std::hint::black_box(sink);
    std::mem::size_of_val(buf) as f64 / best
}

/// A buffer of `bytes` (rounded up to whole f32) of small non-zero values.
fn bandwidth_buffer(bytes: usize) -> Vec<f32> {
    (0..bytes.div_ceil(4).max(1))
        .map(|i| (i % 7) as f32)
        .collect()
}

/// Read bandwidth in bytes/s over `mib` MiB (see [`read_bandwidth_of`]).
pub fn read_bandwidth(mib: usize) -> f64 {
    read_bandwidth_of(&bandwidth_buffer(mib.max(1) << 20))
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

/// Runs the section on `model`, prints the table and writes `out/decode.csv`.
pub fn run(model: &Path, out: &Path, s: &DecodeSettings) -> anyhow::Result<Vec<DecodeRow>> {
    let (cp, mut backend) =
        load_local(model, DType::F32).with_context(|| format!("loading {}", model.display()))?;
    let cfg = cp.config().clone();
    let moe_layers = cfg.moe_layers().count().max(1);
    let expert_bytes = backend.experts().weight_bytes() / (moe_layers * cfg.num_experts.max(1));
    let cp_bytes = cp.weight_bytes();
    let bw = read_bandwidth(s.bandwidth_mib);
    // Bytes a step reads at least once: weights, plus each sequence's cached keys and values
    // (f32) over every layer.
    let kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4;
    let point_bytes = |experts: usize, batch: usize, context: usize| {
        cp_bytes + experts * expert_bytes + batch * context * kv_per_token
    };
    println!(
        "decode scaling: {} ({} layer(s), hidden {}, {} heads / {} kv heads × {}, {} experts top-{}); \
         control plane {:.1} MB, {:.2} MB per routed expert; read bandwidth {:.1} GB/s ({} MiB, {} threads)",
        model.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cp_bytes as f64 / 1e6,
        expert_bytes as f64 / 1e6,
        bw / 1e9,
        s.bandwidth_mib,
        rayon::current_num_threads()
    );
    let token = 1u32.min(cfg.vocab_size as u32 - 1);
    // (context, batch, distinct prompts)
    let mut points: Vec<(usize, usize, bool)> = Vec::new();
    if let Some(&c0) = s.contexts.first() {
        points.extend(s.batches.iter().map(|&b| (c0, b, false)));
        points.extend(s.batches.iter().filter(|&&b| b > 1).map(|&b| (c0, b, true)));
    }
    for &c in s.contexts.iter().skip(1) {
        points.push((c, 1, false));
    }
    // Every point's sequences first; then the timed steps round-robin over the points, so
    // the machine's drift and its neighbours weigh on every point alike and the ratios
    // between points compare steps taken side by side.
    struct Point {
        context: usize,
        batch: usize,
        distinct: bool,
        caches: Vec<KvCache>,
        feeds: Vec<[u32; 1]>,
        times: Vec<f64>,
        experts: usize,
    }
    anyhow::ensure!(s.reps >= 1, "--decode-reps must be at least 1");
    // Every point's caches live at once (the round-robin below), each grown once to twice
    // its context by the warm-up step: refuse a sweep that cannot fit instead of swapping.
    let kv_bytes: usize = points
        .iter()
        .map(|&(context, batch, _)| batch * 2 * (context + 1) * kv_per_token)
        .sum();
    let avail = super::mem_available();
    anyhow::ensure!(
        (kv_bytes as u64) < avail / 10 * 8,
        "the decode points' KV caches need about {:.1} GB at once, {:.1} GB is available: \
         fewer --decode-batches or a smaller first --decode-contexts (the batch sweep runs there)",
        kv_bytes as f64 / 1e9,
        avail as f64 / 1e9
    );
    let mut state = Vec::new();
    for (context, batch, distinct) in points {
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
            context,
            batch,
            distinct,
            caches,
            feeds,
            times: Vec::with_capacity(s.reps),
            experts: 0,
        });
    }
    // Rep 0 warms every point up (and grows each cache once), untimed.
    for rep in 0..=s.reps {
        for p in state.iter_mut() {
            let batch_in: Vec<(usize, &[u32])> =
                p.feeds.iter().map(|f| (p.context, &f[..])).collect();
            let mut refs: Vec<&mut KvCache> = p.caches.iter_mut().collect();
            let mut rec = Touching {
                inner: &mut backend,
                seen: BTreeSet::new(),
            };
            let t = Instant::now();
            let (_pass, hidden) = cp.forward(&batch_in, &mut refs, &mut rec)?;
            let logits = cp.logits(&hidden)?;
            std::hint::black_box(&logits);
            let dt = t.elapsed().as_secs_f64() * 1e3;
            p.experts = rec.seen.len();
            if rep > 0 {
                p.times.push(dt);
            }
            for c in p.caches.iter_mut() {
                c.truncate(p.context)?;
            }
        }
    }
    // The caches and the model go before the floors' buffer (as large as the largest
    // point's bytes) is allocated, so it never sits on top of them.
    for p in state.iter_mut() {
        p.caches = Vec::new();
    }
    drop((cp, backend));
    // The floors: re-reading each point's bytes (a prefix of one buffer, measured per point).
    let max_bytes = state
        .iter()
        .map(|p| point_bytes(p.experts, p.batch, p.context))
        .max()
        .unwrap_or(0);
    let buf = bandwidth_buffer(max_bytes);
    let mut rows = Vec::new();
    for p in state {
        let step_ms = median(p.times);
        let bytes = point_bytes(p.experts, p.batch, p.context);
        let read_bw = read_bandwidth_of(&buf[..bytes.div_ceil(4).clamp(1, buf.len())]);
        rows.push(DecodeRow {
            context: p.context,
            batch: p.batch,
            step_ms,
            bytes,
            floor_ms: bytes as f64 / read_bw * 1e3,
            dram_floor_ms: bytes as f64 / bw * 1e3,
            read_bw,
            experts: p.experts,
            distinct: p.distinct,
        });
    }
    print_table(&rows, cfg.num_hidden_layers);
    write_csv(&out.join("decode.csv"), &rows, bw)?;
    drop(buf);
    if let Some(&c0) = s.contexts.first() {
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

/// The median of timed steps (the upper one of an even count; `times` is not empty).
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
        .find(|r| r.context == context && r.batch == batch && !r.distinct)
        .map_or(f64::NAN, |r| r.step_ms)
}

fn print_baseline(b: &[BaselineRow], local: &[DecodeRow], context: usize) {
    println!(
        "    baseline (candle-transformers qwen2_moe, f32 weights; identical prompts, context {context}, points in sequence):"
    );
    println!(
        "    {:>5} {:>10} {:>12} {:>16} {:>18}",
        "batch", "step ms", "step÷step(1)", "local-split ms", "baseline÷local"
    );
    let one = b
        .iter()
        .find(|r| r.batch == 1)
        .map_or(f64::NAN, |r| r.step_ms);
    for r in b {
        let l = local_step(local, context, r.batch);
        println!(
            "    {:>5} {:>10.2} {:>12.2} {:>16.2} {:>18.2}",
            r.batch,
            r.step_ms,
            r.step_ms / one,
            l,
            r.step_ms / l
        );
    }
}

fn write_baseline_csv(
    path: &Path,
    b: &[BaselineRow],
    local: &[DecodeRow],
    context: usize,
) -> anyhow::Result<()> {
    let one = b
        .iter()
        .find(|r| r.batch == 1)
        .map_or(f64::NAN, |r| r.step_ms);
    let mut s = String::from(
        "context,batch,step_ms,step_over_batch1,local_split_step_ms,over_local_split\n",
    );
    for r in b {
        let l = local_step(local, context, r.batch);
        s.push_str(&format!(
            "{context},{},{:.4},{:.4},{:.4},{:.4}\n",
            r.batch,
            r.step_ms,
            r.step_ms / one,
            l,
            r.step_ms / l
        ));
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

fn step_at_batch1(rows: &[DecodeRow], context: usize) -> Option<f64> {
    rows.iter()
        .find(|r| r.batch == 1 && r.context == context && !r.distinct)
        .map(|r| r.step_ms)
}

fn print_table(rows: &[DecodeRow], layers: usize) {
    println!(
        "    {:>7} {:>5} {:>9} {:>10} {:>12} {:>10} {:>10} {:>11} {:>8} {:>10} {:>11} {:>10}",
        "context",
        "batch",
        "prompts",
        "step ms",
        "ms / layer",
        "floor ms",
        "step÷floor",
        "step÷step(1)",
        "experts",
        "re-read GB/s",
        "DRAM floor",
        "step÷DRAM"
    );
    for r in rows {
        let one = step_at_batch1(rows, r.context).unwrap_or(f64::NAN);
        println!(
            "    {:>7} {:>5} {:>9} {:>10.2} {:>12.2} {:>10.2} {:>10.2} {:>11.2} {:>8} {:>12.1} {:>11.2} {:>10.2}",
            r.context,
            r.batch,
            if r.distinct { "distinct" } else { "same" },
            r.step_ms,
            r.step_ms / layers.max(1) as f64,
            r.floor_ms,
            r.step_ms / r.floor_ms,
            r.step_ms / one,
            r.experts,
            r.read_bw / 1e9,
            r.dram_floor_ms,
            r.step_ms / r.dram_floor_ms
        );
    }
    let mut ctx: Vec<usize> = rows
        .iter()
        .filter(|r| r.batch == 1 && !r.distinct)
        .map(|r| r.context)
        .collect();
    ctx.sort_unstable();
    ctx.dedup();
    if let (Some(&lo), Some(&hi)) = (ctx.first(), ctx.last()) {
        if lo != hi {
            let (a, b) = (
                step_at_batch1(rows, lo).unwrap(),
                step_at_batch1(rows, hi).unwrap(),
            );
            println!(
                "    TPOT at context {hi} ÷ at {lo} (batch 1): {:.2} ({b:.2} ms vs {a:.2} ms; issue 11 asks ≤ 1.5)",
                b / a
            );
        }
    }
}

fn write_csv(path: &Path, rows: &[DecodeRow], bw: f64) -> anyhow::Result<()> {
    let mut s = String::from(
        "context,batch,step_ms,floor_ms,step_over_floor,step_over_batch1,bytes,experts_touched,\
         reread_gb_per_s,dram_floor_ms,step_over_dram_floor,dram_gb_per_s,distinct_prompts\n",
    );
    for r in rows {
        let one = step_at_batch1(rows, r.context).unwrap_or(f64::NAN);
        s.push_str(&format!(
            "{},{},{:.4},{:.4},{:.4},{:.4},{},{},{:.3},{:.4},{:.4},{:.3},{}\n",
            r.context,
            r.batch,
            r.step_ms,
            r.floor_ms,
            r.step_ms / r.floor_ms,
            r.step_ms / one,
            r.bytes,
            r.experts,
            r.read_bw / 1e9,
            r.dram_floor_ms,
            r.step_ms / r.dram_floor_ms,
            bw / 1e9,
            u8::from(r.distinct)
        ));
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}
