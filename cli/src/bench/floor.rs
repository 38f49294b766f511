//! The floors of the decode section, measured on this machine in the same run as the steps:
//! the read bandwidth (how fast the weights can stream in) and the f32 FMA peak (how fast
//! the kernel's multiply-adds can go once they are in registers).
//!
//! A decode step reads each weight it touches once whatever the batch, but multiplies each by every
//! row: at batch `b` it does `b` × (weights of the matrices a token goes through) FMAs. So a
//! step can be no faster than the larger of its **memory floor** (bytes ÷ read bandwidth)
//! and its **compute floor** (FMAs ÷ FMA peak), and from some batch on the compute floor is
//! the larger one — where depends on the machine's FLOP-to-byte ratio, not on the kernel.

use std::time::Instant;

use faasmoe_model::Config;
use rayon::prelude::*;

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
pub(super) fn read_bandwidth_of(buf: &[f32]) -> f64 {
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
pub(super) fn bandwidth_buffer(bytes: usize) -> Vec<f32> {
    (0..bytes.div_ceil(4).max(1))
        .map(|i| (i % 7) as f32)
        .collect()
}

/// Read bandwidth in bytes/s over `mib` MiB (see [`read_bandwidth_of`]).
pub(super) fn read_bandwidth(mib: usize) -> f64 {
    read_bandwidth_of(&bandwidth_buffer(mib.max(1) << 20))
}

/// Independent FMA chains of the peak loops: more than latency × issue width of any x86
/// core (Zen 4 and Sapphire Rapids: 4-cycle latency, up to 2 per cycle).
const CHAINS: usize = 12;

/// `iters` × [`CHAINS`] vector FMAs of 16 lanes on AVX-512 F; returns a value that depends
/// on all of them (so none is optimised away).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_avx512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm512_fmadd_ps(*c, a, b);
        }
    }
    acc.iter().map(|&c| _mm512_reduce_add_ps(c)).sum()
}

/// As [`fma_chains_avx512`], 8 lanes on AVX2 with FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm256_fmadd_ps(*c, a, b);
        }
    }
    let mut out = [0f32; 8];
    let mut s = 0f32;
    for c in acc {
        _mm256_storeu_ps(out.as_mut_ptr(), c);
        s += out.iter().sum::<f32>();
    }
    s
}

/// As [`fma_chains_avx512`], scalar `mul_add` (what the portable kernel path runs).
fn fma_chains_scalar(iters: usize) -> f32 {
    let mut acc = [1f32; CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = c.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

/// Peak f32 FMA rate of this machine on the kernel's widest path, FMA/s: every rayon thread
/// (`rayon::broadcast`: one call per thread, all at once) runs independent FMA chains in
/// registers (no memory traffic); passes of at least 20 ms each, best of 3 after a warm-up
/// pass that also sizes them (and lets the cores reach their AVX clock).
///
/// `path` is the kernel path's name ([`faasmoe_model::kernel::KernelPath::name`]): `avx512`
/// (16 lanes), `avx2` (8 lanes), anything else scalar.
pub(super) fn fma_peak(path: &str) -> f64 {
    #[allow(unused_mut)]
    let mut lanes = 1usize;
    #[allow(unused_mut)]
    let mut chains: fn(usize) -> f32 = fma_chains_scalar;
    #[cfg(target_arch = "x86_64")]
    if path == "avx512" && is_x86_feature_detected!("avx512f") {
        lanes = 16;
        // SAFETY: the CPU has AVX-512 F.
        chains = |n| unsafe { fma_chains_avx512(n) };
    } else if path == "avx2" && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    {
        lanes = 8;
        // SAFETY: the CPU has AVX2 and FMA.
        chains = |n| unsafe { fma_chains_avx2(n) };
    }
    let threads = rayon::current_num_threads().max(1);
    let pass = |iters: usize| -> (f64, f32) {
        let t = Instant::now();
        let s: f32 = rayon::broadcast(|_| chains(iters)).into_iter().sum();
        (t.elapsed().as_secs_f64(), s)
    };
    // Warm-up: 50 ms at least, doubling a small pass until it takes that long.
    let mut iters = 10_000usize;
    let mut sink = 0f32;
    loop {
        let (dt, s) = pass(iters);
        sink += s;
        if dt >= 0.05 || iters > 1 << 34 {
            // Size the timed passes to about 20 ms each.
            iters = ((iters as f64) * 0.02 / dt.max(1e-9)).ceil().max(1.0) as usize;
            break;
        }
        iters *= 2;
    }
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let (dt, s) = pass(iters);
        best = best.min(dt);
        sink += s;
    }
    std::hint::black_box(sink);
    (threads * iters * CHAINS * lanes) as f64 / best
}

/// Multiply-adds of one decode token through the model's matrices and attention, at
/// `context` cached positions: q/k/v/o, the router, the shared expert and its gate, top-k
/// routed experts (gate, up, down) or the dense MLP, the LM head, and attention's
/// `q·k` and `p·v` over `context + 1` positions. The embedding is a row lookup, the norms
/// and activations are elementwise: not counted.
pub(super) fn macs_per_token(cfg: &Config, context: usize) -> usize {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let attn = h * q + 2 * h * kv + q * h + 2 * q * (context + 1);
    let moe = h * cfg.num_experts
        + 3 * h * cfg.shared_expert_intermediate_size
        + if cfg.shared_expert_intermediate_size > 0 {
            h
        } else {
            0
        }
        + cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size;
    let dense = 3 * h * cfg.intermediate_size;
    let layers: usize = (0..cfg.num_hidden_layers)
        .map(|l| attn + if cfg.is_moe_layer(l) { moe } else { dense })
        .sum();
    layers + h * cfg.vocab_size
}
