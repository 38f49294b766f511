//! The x86-64 paths: AVX-512 (F + BW + VL; 16 lanes in one `zmm`, masked loads for the
//! tail) and AVX2 + FMA + F16C (16 lanes in two `ymm`, a zero-padded copy for the tail).
//!
//! Widening: bf16 → f32 is `vpmovzxwd` then a 16-bit left shift (`vpslld`), f16 → f32 is
//! `vcvtph2ps`; both exact.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{for_tiles, LANES};

/// A stored weight element with its SIMD widening loads.
pub(super) trait Elem: Copy {
    const ZERO: Self;
    /// 16 elements at `p`, widened.
    unsafe fn load16(p: *const Self) -> __m512;
    /// The first elements at `p` where `mask` is set, widened; zeros elsewhere (the masked
    /// elements are not read).
    unsafe fn load16_mask(p: *const Self, mask: __mmask16) -> __m512;
    /// 8 elements at `p`, widened.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Elem for bf16 {
    const ZERO: Self = bf16::ZERO;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16(p: *const Self) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16_mask(p: *const Self, mask: __mmask16) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const Self) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

impl Elem for f16 {
    const ZERO: Self = f16::ZERO;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16(p: *const Self) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16_mask(p: *const Self, mask: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16(p: *const Self) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16_mask(p: *const Self, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

/// `a[l] = s[l] + s[l + 8]` given, then the rest of the fixed tree of the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn reduce8(a: __m256) -> f32 {
    let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a)); // a[l] + a[l+4]
    let c = _mm_add_ps(b, _mm_movehl_ps(b, b)); // c[0] = b[0] + b[2], c[1] = b[1] + b[3]
    _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<1>(c, c))) // c[0] + c[1]
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn reduce16(s: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(s);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
    reduce8(_mm256_add_ps(lo, hi))
}

/// Prefetches, into L2 (`T1`), the cache line at element `off` of each of the `NR` weight rows that
/// follow the panel at `w` (the next panel of the same column range), while this panel
/// computes.
///
/// Why: at A2.7B's k = 2048 a bf16 weight row is one 4 KiB page, and the hardware streamer
/// does not cross pages, so without it every panel starts its `NR` streams cold. Measured on
/// an Intel Xeon (Emerald Rapids, 2 cores) with the hint then used, `T0` (into L1), and
/// `faasmoe bench --decode-only`, one A2.7B layer at batch 1, two binaries alternated:
/// 4.9–7.1 ms per step with it against 6.5–9.7 ms without (two quieter and two busier runs of
/// each), and in a kernel-only loop over 352 MB of bf16 weights at m = 1, 27–32 GB/s against
/// 19–23 GB/s; in the AVX2 [`tile256`] (one or two rows) 20–27 GB/s against 19–21 GB/s. On
/// that Xeon `T1` (into L2) or two panels ahead measured the same as `T0` or slower; `T2` was
/// not measured there, nor `T1` on the AVX2 path.
///
/// Why `T1` now: on an AMD EPYC (Zen 4, 2 cores, 32 KiB L1d, 1 MiB L2) `T1` measured faster
/// than `T0` at every m. Kernel-only loop over 176 MB of bf16 weights, 2 threads, variants
/// alternated 4 times (ms, min–max): at k = 2048, m = 8: `T0` 9.7–10.7, `T1` 8.2–9.0, `T2`
/// 8.1–9.9, no prefetch 9.8 (one run); m = 1: `T0` 5.2–7.2, `T1` 3.7–5.1, `T2` 3.5–5.3; at
/// k = 1408, m = 8: `T0` 9.0–10.4, `T1` 7.2–8.0; m = 16: `T0` 14.7–17.0, `T1` 14.0–15.4. A
/// likely cause at m = 8 (not at m = 1, which gains too): a tile's 8 rows of `x`
/// (8 × 2048 f32 = 64 KiB) stream through the 32 KiB L1 once per panel and evict the
/// prefetched weight lines before they are used. `T1` is kept over `T2` because on the Xeon
/// it measured no worse than `T0`, while `T2` is unmeasured there. Used by [`tile512`] and
/// [`tile256`]; not by
/// [`tile256_halves`], whose 16 `ymm` registers are all taken and which measured slower with
/// it on the Xeon (m = 4…16: about 0.8× the GFLOP/s).
///
/// A prefetch never faults, so the lines past the end of the column range or of `w` (the
/// last panel) are harmless; the address is formed with `wrapping_add` for that reason.
#[inline(always)]
unsafe fn prefetch_next_panel<E, const NR: usize>(w: *const E, ldw: usize, off: usize) {
    for j in 0..NR {
        let p = w.wrapping_add((NR + j) * ldw + off);
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
    }
}

/// Whether element `off` of a weight row starts one of the row's 64-byte cache lines (rows
/// of a [`Weight`](crate::linear::Weight) start 64-byte aligned when `k · size_of::<E>()` is a
/// multiple of 64; otherwise every line is still touched once per 64 bytes).
#[inline(always)]
fn starts_line<E>(off: usize) -> bool {
    (off * std::mem::size_of::<E>()).is_multiple_of(64)
}

/// One `MR × NR` tile on AVX-512: rows `x[0..MR]` (stride `k`), weight rows `w[0..NR]`
/// (stride `ldw`), outputs `y[i * ldy + j]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn tile512<E: Elem, const MR: usize, const NR: usize>(
    x: *const f32,
    k: usize,
    w: *const E,
    ldw: usize,
    y: *mut f32,
    ldy: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let full = k / LANES;
    for c in 0..full {
        let off = c * LANES;
        if starts_line::<E>(off) {
            prefetch_next_panel::<E, NR>(w, ldw, off);
        }
        let mut wv = [_mm512_setzero_ps(); NR];
        for (j, v) in wv.iter_mut().enumerate() {
            *v = E::load16(w.add(j * ldw + off));
        }
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let xv = _mm512_loadu_ps(x.add(i * k + off));
            for (a, v) in acc_i.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(xv, *v, *a);
            }
        }
    }
    let r = k % LANES;
    if r != 0 {
        let off = full * LANES;
        let mask = ((1u32 << r) - 1) as __mmask16;
        let mut wv = [_mm512_setzero_ps(); NR];
        for (j, v) in wv.iter_mut().enumerate() {
            *v = E::load16_mask(w.add(j * ldw + off), mask);
        }
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let xv = _mm512_maskz_loadu_ps(mask, x.add(i * k + off));
            for (a, v) in acc_i.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(xv, *v, *a);
            }
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        for (j, a) in acc_i.iter().enumerate() {
            *y.add(i * ldy + j) = reduce16(*a);
        }
    }
}

/// One 16-element chunk of an AVX2 tile: rows at `x + i·ldx`, weight rows at `w + j·ldw`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn chunk256<E: Elem, const MR: usize, const NR: usize>(
    lo: &mut [[__m256; NR]; MR],
    hi: &mut [[__m256; NR]; MR],
    x: *const f32,
    ldx: usize,
    w: *const E,
    ldw: usize,
) {
    let z = _mm256_setzero_ps();
    let mut wl = [z; NR];
    let mut wh = [z; NR];
    for j in 0..NR {
        wl[j] = E::load8(w.add(j * ldw));
        wh[j] = E::load8(w.add(j * ldw + 8));
    }
    for i in 0..MR {
        let xl = _mm256_loadu_ps(x.add(i * ldx));
        let xh = _mm256_loadu_ps(x.add(i * ldx + 8));
        for j in 0..NR {
            lo[i][j] = _mm256_fmadd_ps(xl, wl[j], lo[i][j]);
            hi[i][j] = _mm256_fmadd_ps(xh, wh[j], hi[i][j]);
        }
    }
}

/// The partial last chunk of an AVX2 tile, zero-padded to [`LANES`]: elements `off..k` of
/// the `MR` rows at `x + i·k` and of the `NR` weight rows at `w + j·ldw` (`k - off < LANES`).
#[inline]
unsafe fn padded_tail<E: Elem, const MR: usize, const NR: usize>(
    x: *const f32,
    k: usize,
    w: *const E,
    ldw: usize,
    off: usize,
) -> ([[f32; LANES]; MR], [[E; LANES]; NR]) {
    let r = k - off;
    let mut xb = [[0f32; LANES]; MR];
    let mut wb = [[E::ZERO; LANES]; NR];
    for (i, b) in xb.iter_mut().enumerate() {
        std::ptr::copy_nonoverlapping(x.add(i * k + off), b.as_mut_ptr(), r);
    }
    for (j, b) in wb.iter_mut().enumerate() {
        std::ptr::copy_nonoverlapping(w.add(j * ldw + off), b.as_mut_ptr(), r);
    }
    (xb, wb)
}

/// One `MR × NR` tile on AVX2: each output's 16 lanes in a (low, high) pair of registers.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile256<E: Elem, const MR: usize, const NR: usize>(
    x: *const f32,
    k: usize,
    w: *const E,
    ldw: usize,
    y: *mut f32,
    ldy: usize,
) {
    let z = _mm256_setzero_ps();
    let mut lo = [[z; NR]; MR];
    let mut hi = [[z; NR]; MR];
    let full = k / LANES;
    for c in 0..full {
        let off = c * LANES;
        if starts_line::<E>(off) {
            prefetch_next_panel::<E, NR>(w, ldw, off);
        }
        chunk256(&mut lo, &mut hi, x.add(off), k, w.add(off), ldw);
    }
    let r = k % LANES;
    if r != 0 {
        let (xb, wb) = padded_tail::<E, MR, NR>(x, k, w, ldw, full * LANES);
        chunk256(
            &mut lo,
            &mut hi,
            xb.as_ptr() as *const f32,
            LANES,
            wb.as_ptr() as *const E,
            LANES,
        );
    }
    for i in 0..MR {
        for j in 0..NR {
            *y.add(i * ldy + j) = reduce8(_mm256_add_ps(lo[i][j], hi[i][j]));
        }
    }
}

/// One `MR × NR` tile on AVX2 in two passes over `k`, one per half of the 16 lanes: the
/// low lanes `s[0..8]` of every output first, then the high lanes `s[8..16]`. A lane's sum
/// depends only on its own elements, so this is the same order as [`tile256`] (bit for bit),
/// while each pass needs one register per output instead of two: `MR × NR` = 12
/// accumulators + `NR` widened weights + 1 row vector fill the 16 `ymm` registers, and each
/// row vector feeds `NR` FMAs, each widened weight `MR`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
// Index loops as in the other tiles (the form measured; see `MR256`).
#[allow(clippy::needless_range_loop)]
unsafe fn tile256_halves<E: Elem, const MR: usize, const NR: usize>(
    x: *const f32,
    k: usize,
    w: *const E,
    ldw: usize,
    y: *mut f32,
    ldy: usize,
) {
    let z = _mm256_setzero_ps();
    let full = k / LANES;
    let r = k % LANES;
    let (xb, wb) = if r != 0 {
        padded_tail::<E, MR, NR>(x, k, w, ldw, full * LANES)
    } else {
        ([[0f32; LANES]; MR], [[E::ZERO; LANES]; NR])
    };
    let mut halves = [[[z; NR]; MR]; 2];
    for (h, out) in halves.iter_mut().enumerate() {
        let lane0 = h * (LANES / 2);
        let mut acc = [[z; NR]; MR];
        let mut step = |x: *const f32, ldx: usize, w: *const E, ldw: usize| {
            let mut wv = [z; NR];
            for j in 0..NR {
                wv[j] = E::load8(w.add(j * ldw));
            }
            for i in 0..MR {
                let xv = _mm256_loadu_ps(x.add(i * ldx));
                for j in 0..NR {
                    acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
                }
            }
        };
        for c in 0..full {
            let off = c * LANES + lane0;
            step(x.add(off), k, w.add(off), ldw);
        }
        if r != 0 {
            step(
                (xb.as_ptr() as *const f32).add(lane0),
                LANES,
                (wb.as_ptr() as *const E).add(lane0),
                LANES,
            );
        }
        *out = acc;
    }
    for i in 0..MR {
        for j in 0..NR {
            *y.add(i * ldy + j) = reduce8(_mm256_add_ps(halves[0][i][j], halves[1][i][j]));
        }
    }
}

/// Rows × outputs of an AVX2 micro-tile for `m ≥ 3` ([`tile256_halves`]):
/// 4 × 3 = 12 accumulators + 3 widened weight vectors + 1 row vector = the 16 `ymm`
/// registers; each row vector feeds 3 FMAs, each widened weight 4. Measured against 2 × 2
/// tiles of both halves (`tile256`) and against 6 × 2, 3 × 4 and 2 × 4 on an AMD EPYC
/// (Zen 3) at m = 4…16: 4 × 3 was the fastest, 0.81–0.87× the time of 2 × 2.
const MR256: usize = 4;
const NR256: usize = 3;

macro_rules! tiles {
    ($tile:ident, $E:ty, $mr:expr, $nr:expr, [$($m:literal),*], [$($n:literal),*], $args:tt) => {
        tiles!(@rows $tile, $E, $mr, $nr, [$($m),*], [$($n),*], $args)
    };
    (@rows $tile:ident, $E:ty, $mr:expr, $nr:expr, [$($m:literal),*], $ns:tt, $args:tt) => {
        match $mr {
            $( $m => tiles!(@cols $tile, $E, $m, $nr, $ns, $args), )*
            _ => unreachable!("tile rows"),
        }
    };
    (@cols $tile:ident, $E:ty, $m:literal, $nr:expr, [$($n:literal),*], $args:tt) => {
        match $nr {
            $( $n => $tile::<$E, $m, $n> $args, )*
            _ => unreachable!("tile columns"),
        }
    };
}

/// Rows × outputs of an AVX-512 micro-tile: 8 × 3 = 24 accumulators + 3 widened weight
/// vectors + 1 row vector = 28 of the 32 `zmm` registers. Widening a bf16 chunk takes a
/// shuffle (`vpmovzxwd`, port 5) and a shift (port 0), the two ports that also run FMAs, so
/// it is amortised over as many rows as the registers allow: 2 widening µops per 8 FMAs here,
/// against 2 per 4 with 4 × 4 tiles (measured: `faasmoe bench --decode-only`, batch 8).
const MR512: usize = 8;
const NR512: usize = 3;
/// Outputs of an AVX-512 tile for a single row (`m = 1`, every decode step of one sequence):
/// 8 accumulators + 8 widened weight vectors + 1 row vector. With one row nothing is
/// compute-bound: what counts is how many weight rows stream (and are prefetched,
/// [`prefetch_next_panel`]) at once, 8 per thread here against 3 with the 8 × 3 tile's
/// 1 × 3. Measured on an Intel Xeon (2 cores, 480 MiB L3, a noisy shared host), alternating
/// binaries, kernel-only loop over 176 MB of bf16 weights in 1408-row matrices: 6 of 6 pairs
/// faster (6.3–7.7 ms against 7.3–8.5 ms, k = 2048 and 1408); over 6 more rounds the median
/// 7.13 ms against 7.55 ms but the best run the same (5.54 against 5.46 ms), so the gain is
/// in fewer stalled streams, not a higher ceiling. `faasmoe bench --decode-only` at batch 1,
/// step ÷ re-read floor 0.79–0.98 against 0.93–1.15 (3 of 4 pairs). Tiles of 2 × 8 for two
/// rows and 4 × 6 for three or four measured mixed and are not used. Same summation order per
/// output, so results are unchanged bit for bit.
const NR512_ONE_ROW: usize = 8;

/// `y[:, j0..j1]` on AVX-512 (tiles of [`MR512`] rows × [`NR512`] outputs; one row:
/// 1 × [`NR512_ONE_ROW`]).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; `x: [m, k]`, `w` holds rows `j0..j1` at stride `ldw`, `y`
/// points to `[m, ldy]` of which no other thread touches columns `j0..j1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn columns_avx512<E: Elem>(
    x: *const f32,
    m: usize,
    k: usize,
    w: *const E,
    ldw: usize,
    y: *mut f32,
    ldy: usize,
    j0: usize,
    j1: usize,
) {
    if m == 1 {
        for_tiles::<1, NR512_ONE_ROW>(m, j0, j1, |i, mr, j, nr| {
            let (xp, wp, yp) = (x.add(i * k), w.add(j * ldw), y.add(i * ldy + j));
            tiles!(
                tile512,
                E,
                mr,
                nr,
                [1],
                [1, 2, 3, 4, 5, 6, 7, 8],
                (xp, k, wp, ldw, yp, ldy)
            )
        });
        return;
    }
    for_tiles::<MR512, NR512>(m, j0, j1, |i, mr, j, nr| {
        let (xp, wp, yp) = (x.add(i * k), w.add(j * ldw), y.add(i * ldy + j));
        tiles!(
            tile512,
            E,
            mr,
            nr,
            [1, 2, 3, 4, 5, 6, 7, 8],
            [1, 2, 3],
            (xp, k, wp, ldw, yp, ldy)
        )
    });
}

/// `y[:, j0..j1]` on AVX2: for one or two rows, tiles of 2 rows × 2 outputs in [`tile256`]
/// (8 accumulator registers of 16; the weights stream from memory and widening is cheap
/// next to that); for more, [`MR256`] × [`NR256`] tiles in [`tile256_halves`].
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; otherwise as [`columns_avx512`].
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn columns_avx2<E: Elem>(
    x: *const f32,
    m: usize,
    k: usize,
    w: *const E,
    ldw: usize,
    y: *mut f32,
    ldy: usize,
    j0: usize,
    j1: usize,
) {
    if m <= 2 {
        for_tiles::<2, 2>(m, j0, j1, |i, mr, j, nr| {
            let (xp, wp, yp) = (x.add(i * k), w.add(j * ldw), y.add(i * ldy + j));
            tiles!(
                tile256,
                E,
                mr,
                nr,
                [1, 2],
                [1, 2],
                (xp, k, wp, ldw, yp, ldy)
            )
        });
    } else {
        for_tiles::<MR256, NR256>(m, j0, j1, |i, mr, j, nr| {
            let (xp, wp, yp) = (x.add(i * k), w.add(j * ldw), y.add(i * ldy + j));
            tiles!(
                tile256_halves,
                E,
                mr,
                nr,
                [1, 2, 3, 4],
                [1, 2, 3],
                (xp, k, wp, ldw, yp, ldy)
            )
        });
    }
}
