//! The attention's other hot loop: softmax over a row of scores, in place.
//!
//! `row[lo..hi]` ← softmax(`scale · row[lo..hi]`), every other entry ← `0`, in f32:
//! 1. scale, and the maximum `m` of the scaled visible scores (exact, order-free);
//! 2. `e = exp(s - m)` by [`exp_nonpositive`] (a polynomial, so it vectorises), summed in
//!    [`LANES`] partial sums (entry `lo + 16c + l` into lane `l`, chunks in increasing order)
//!    reduced by the kernel's fixed tree ([`super::reduce_lanes`]);
//! 3. every `e` divided by the sum.
//!
//! Every step is plain f32 arithmetic written element by element (Rust never contracts `a·b + c`
//! into a fused multiply-add), so the AVX-512, AVX2 and portable builds of the same loop give
//! bit-identical results, and a row's probabilities depend only on that row.

use super::{reduce_lanes, KernelPath, LANES};

/// `exp(x)` for `x ≤ 0` in f32, as Cephes' `expf` (S. L. Moshier, Cephes Math Library 2.2,
/// `expf.c`): `x = n·ln 2 + r` with `n = ⌊x·log₂e + ½⌋`, `|r| ≤ ½ ln 2`, `e^r` by its degree-7
/// minimax polynomial (relative error ≤ 2⁻²³ on the range), times `2ⁿ` built in the exponent
/// bits. Inputs below −87 (where `e^x < 2⁻¹²⁵`) are taken as −87: next to the row's maximum,
/// whose term is `1`, they do not change the sum. `x = −∞` gives `e^−87 ≈ 1.6e-38`.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' coefficients as published
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two (Cody–Waite) so that n·C1 is exact.
    const C1: f32 = 0.693_359_375;
    const C2: f32 = -2.121_944_40e-4;
    let x = x.max(-87.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * C1;
    let r = r - n * C2;
    let p = 1.987_569_150_0e-4_f32;
    let p = p * r + 1.398_199_950_7e-3;
    let p = p * r + 8.333_451_907_3e-3;
    let p = p * r + 4.166_579_589_4e-2;
    let p = p * r + 1.666_666_545_9e-1;
    let p = p * r + 5.000_000_120_1e-1;
    let y = p * (r * r) + r + 1.0;
    // n ∈ [−126, 0], so n + 127 is a normal exponent.
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn softmax_body(row: &mut [f32], lo: usize, hi: usize, scale: f32) {
    let v = &mut row[lo..hi];
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] *= scale;
            mx[l] = mx[l].max(c[l]);
        }
    }
    for (l, e) in chunks.into_remainder().iter_mut().enumerate() {
        *e *= scale;
        mx[l] = mx[l].max(*e);
    }
    let max = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = [0f32; LANES];
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_nonpositive(c[l] - max);
            s[l] += c[l];
        }
    }
    for (l, e) in chunks.into_remainder().iter_mut().enumerate() {
        *e = exp_nonpositive(*e - max);
        s[l] += *e;
    }
    let sum = reduce_lanes(&s);
    for e in v.iter_mut() {
        *e /= sum;
    }
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn softmax_avx512(row: &mut [f32], lo: usize, hi: usize, scale: f32) {
    softmax_body(row, lo, hi, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_avx2(row: &mut [f32], lo: usize, hi: usize, scale: f32) {
    softmax_body(row, lo, hi, scale)
}

/// In place: `row[lo..hi]` ← softmax(`scale · row[lo..hi]`), every other entry ← `0`, built
/// for `path` (the results are the same on every path; see the module docs).
///
/// Panics if `lo > hi` or `hi > row.len()`; `lo == hi` only zeroes the row. `path` must be
/// supported by this CPU (a [`super::Kernel`]'s path always is).
pub(super) fn softmax_visible(path: KernelPath, row: &mut [f32], lo: usize, hi: usize, scale: f32) {
    assert!(
        lo <= hi && hi <= row.len(),
        "softmax range {lo}..{hi} of {}",
        row.len()
    );
    match path {
        // SAFETY: a Kernel's path is supported by this CPU (checked by Kernel::new).
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => unsafe { softmax_avx512(row, lo, hi, scale) },
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => unsafe { softmax_avx2(row, lo, hi, scale) },
        _ => softmax_body(row, lo, hi, scale),
    }
}
