//! The weight-streaming matmul kernel: `y[m, n] = x[m, k] · W[n, k]ᵀ`.
//!
//! - `x`: f32, `[m, k]` row-major (row stride `k`);
//! - `W`: bf16, f16 or f32 as stored in the checkpoint, `[n, k]` with row stride
//!   `row_stride ≥ k` (a PyTorch `nn.Linear` weight: one row per output feature);
//! - `y`: f32, `[m, n]` row-major.
//!
//! **Exact math of the f32 reference.** Every weight is widened to f32 exactly (bf16 → f32 is
//! a 16-bit left shift of the bits; f16 → f32 by F16C / AVX-512F `vcvtph2ps` or `half`),
//! activations are never rounded to a narrower type (unlike ggml's `ggml_vec_dot_bf16`, which
//! rounds `x` to bf16), and every product is accumulated in f32 with a fused multiply-add.
//!
//! **One summation order.** Output `y[i, j]` is computed the same way whatever `m`, the other
//! rows of the batch, the thread count or the code path:
//! 1. [`LANES`] = 16 partial sums `s[0..16]`, all starting at `+0.0`; for chunk
//!    `c = 0, 1, …` in increasing order, `s[l] = fma(x[i, 16c + l], W[j, 16c + l], s[l])`, where
//!    the last, partial chunk is padded with `x = W = 0`;
//! 2. then the lanes are reduced pairwise in a fixed tree:
//!    `a[l] = s[l] + s[l + 8]` (l < 8), `b[l] = a[l] + a[l + 4]` (l < 4),
//!    `c[l] = b[l] + b[l + 2]` (l < 2), `y = c[0] + c[1]`.
//!
//! The AVX-512 path holds the 16 lanes in one `zmm` register, the AVX2 path in two `ymm`
//! registers, the portable path in an array; all three give bit-identical results, so a row's
//! output depends only on that row and the weights (and is the same on every machine).
//!
//! **Reading W once.** Rows of `x` are taken in blocks of [`ROW_BLOCK`] = 64; within a block,
//! a panel of a few weight rows (the micro-tile's width: 3 on AVX-512, 2 on AVX2 for up to 2 rows and 3 for more, 4 portable;
//! at most 4 × k × 4 bytes, L1/L2 resident) is multiplied with every row of the block, a
//! micro-tile of rows at a time (8 on AVX-512), before the next panel is read, so for `m ≤ 64` each weight is read from
//! memory once per call. Threads split the output columns `n` into contiguous ranges (each
//! output is computed by one thread), so `m = 1` uses every core too: the caller and, for a
//! caller outside rayon, the kernel's own `cores − 1` helper threads (see `helpers`, so the
//! threads fill the cores exactly) claim [`RANGES_PER_THREAD`] ranges per thread in order,
//! each thread taking the next range when it finishes one.
//!
//! **Choosing a path.** At run time the best path the CPU supports is picked
//! (`is_x86_feature_detected!`): AVX-512 (F, BW, VL) → AVX2 + FMA + F16C → portable. The
//! environment variable [`KERNEL_ENV`] (`FAASMOE_KERNEL=avx512|avx2|portable|auto`) or
//! [`set_default_path`] force one, and [`Kernel::new`] takes one explicitly, so tests exercise
//! every path on any machine that supports it.

mod portable;
pub mod softmax;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

use half::{bf16, f16};

/// Width of the canonical accumulation: 16 f32 partial sums per output (one AVX-512 register).
pub const LANES: usize = 16;

/// Rows of `x` per pass over the weights: for `m ≤ ROW_BLOCK` the weights are read once per call.
/// 64 rows of k = 2048 f32 are 512 KiB, which stays in a 1 MiB L2 (and spills to L3 for
/// larger k, where the weight panel still is the only stream from memory).
pub const ROW_BLOCK: usize = 64;

/// Weight rows per panel of the portable path, and the unit of the threads' column ranges.
pub(crate) const PANEL: usize = 4;

/// Column ranges per thread of one call: the threads claim the ranges in order, each taking
/// the next when done, so a thread that the OS runs late (another process's threads on the
/// same cores: the controller and an expert worker computing at once in faasmoe-shared, or a
/// noisy neighbour) does fewer ranges instead of holding up the call with a fixed half.
///
/// Measured on an AMD EPYC (Zen 4, 2 cores, a noisy shared host), `faasmoe bench
/// --decode-only --decode-batches 1,8 --decode-contexts 16 --decode-reps 20`, one A2.7B layer,
/// two binaries alternated 3 times (ms per step, this / one fixed range per thread):
/// local-split batch 1 6.91 / 7.40, 6.93 / 7.57, 7.54 / 8.01; faasmoe-shared (granularity 60)
/// batch 1 8.12 / 8.72, 7.38 / 8.60, 8.23 / 8.73; local-split batch 8 13.17 / 12.76,
/// 11.33 / 14.52, 12.30 / 13.92. Which thread computes a range does not change its bits.
pub const RANGES_PER_THREAD: usize = 4;

/// Below this many weight bytes a call runs on the calling thread only: waking a second
/// thread costs a few microseconds, about what 128 KiB take at ~30 GB/s.
pub const PARALLEL_MIN_BYTES: usize = 128 * 1024;

/// The environment variable that forces a code path: `avx512`, `avx2`, `portable` or `auto`.
pub const KERNEL_ENV: &str = "FAASMOE_KERNEL";

/// A code path of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// AVX-512 F + BW + VL (x86-64): 16 lanes in one `zmm` register, masked tails.
    Avx512,
    /// AVX2 + FMA + F16C (x86-64): 16 lanes in two `ymm` registers.
    Avx2,
    /// Plain Rust (`f32::mul_add`, `half`), any target.
    Portable,
}

impl KernelPath {
    /// Every path, fastest first.
    pub const ALL: [KernelPath; 3] = [KernelPath::Avx512, KernelPath::Avx2, KernelPath::Portable];

    /// The name used by [`KERNEL_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Avx512 => "avx512",
            KernelPath::Avx2 => "avx2",
            KernelPath::Portable => "portable",
        }
    }

    /// The CPU features the path needs.
    pub fn needs(self) -> &'static str {
        match self {
            KernelPath::Avx512 => "x86-64 with avx512f, avx512bw, avx512vl",
            KernelPath::Avx2 => "x86-64 with avx2, fma, f16c",
            KernelPath::Portable => "nothing",
        }
    }

    /// Parses a [`KERNEL_ENV`] value; `auto` (or empty) is `None`: detect.
    pub fn parse(value: &str) -> Result<Option<Self>, KernelError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(None),
            "avx512" => Ok(Some(KernelPath::Avx512)),
            "avx2" => Ok(Some(KernelPath::Avx2)),
            "portable" => Ok(Some(KernelPath::Portable)),
            _ => Err(KernelError::UnknownPath {
                value: value.to_string(),
            }),
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            KernelPath::Portable => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest path this CPU supports.
    pub fn detect() -> Self {
        KernelPath::ALL
            .into_iter()
            .find(|p| p.is_supported())
            .unwrap_or(KernelPath::Portable)
    }

    /// The paths this CPU supports, fastest first.
    pub fn supported() -> Vec<Self> {
        KernelPath::ALL
            .into_iter()
            .filter(|p| p.is_supported())
            .collect()
    }

    fn code(self) -> u8 {
        match self {
            KernelPath::Avx512 => 1,
            KernelPath::Avx2 => 2,
            KernelPath::Portable => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(KernelPath::Avx512),
            2 => Some(KernelPath::Avx2),
            3 => Some(KernelPath::Portable),
            _ => None,
        }
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the kernel: a bad setting or inconsistent shapes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// [`KERNEL_ENV`] holds something else than `avx512`, `avx2`, `portable` or `auto`.
    #[error("{KERNEL_ENV}={value}: unknown kernel path (expected avx512, avx2, portable or auto)")]
    UnknownPath { value: String },
    /// A path was forced that this CPU cannot run.
    #[error("kernel path {path} is not supported by this CPU (it needs {})", path.needs())]
    Unsupported { path: KernelPath },
    /// Buffers whose lengths do not match the shapes.
    #[error("matmul shapes: {0}")]
    Shape(String),
}

/// The elements of `W`, in their stored dtype.
#[derive(Debug, Clone, Copy)]
pub enum WeightData<'a> {
    /// bfloat16 (the Qwen checkpoints' dtype).
    Bf16(&'a [bf16]),
    /// IEEE half precision.
    F16(&'a [f16]),
    /// f32.
    F32(&'a [f32]),
}

impl WeightData<'_> {
    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            WeightData::Bf16(s) => s.len(),
            WeightData::F16(s) => s.len(),
            WeightData::F32(s) => s.len(),
        }
    }

    /// Whether no element is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per element.
    pub fn elem_bytes(&self) -> usize {
        match self {
            WeightData::Bf16(_) | WeightData::F16(_) => 2,
            WeightData::F32(_) => 4,
        }
    }
}

/// A weight matrix `W[n, k]`: row `j` is `data[j * row_stride .. j * row_stride + k]`.
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    /// The elements.
    pub data: WeightData<'a>,
    /// Rows (output features).
    pub n: usize,
    /// Columns (input features).
    pub k: usize,
    /// Elements from one row to the next (`≥ k`; `k` for a packed matrix).
    pub row_stride: usize,
}

impl<'a> WeightView<'a> {
    /// A packed `[n, k]` matrix (`row_stride = k`).
    pub fn packed(data: WeightData<'a>, n: usize, k: usize) -> Self {
        Self {
            data,
            n,
            k,
            row_stride: k,
        }
    }

    fn check(&self) -> Result<(), KernelError> {
        let need = if self.n == 0 {
            0
        } else {
            (self.n - 1) * self.row_stride + self.k
        };
        if self.row_stride < self.k || self.data.len() < need {
            return Err(KernelError::Shape(format!(
                "weight [{}, {}] with row stride {} needs {need} elements, has {}",
                self.n,
                self.k,
                self.row_stride,
                self.data.len()
            )));
        }
        Ok(())
    }
}

static FORCED: AtomicU8 = AtomicU8::new(0);
static FROM_ENV: OnceLock<Result<Option<KernelPath>, KernelError>> = OnceLock::new();

/// Forces the process-wide default path (`None`: back to [`KERNEL_ENV`], then detection).
///
/// Errors: [`KernelError::Unsupported`] when this CPU cannot run `path`.
pub fn set_default_path(path: Option<KernelPath>) -> Result<(), KernelError> {
    if let Some(p) = path {
        if !p.is_supported() {
            return Err(KernelError::Unsupported { path: p });
        }
    }
    FORCED.store(path.map_or(0, KernelPath::code), Ordering::Relaxed);
    Ok(())
}

/// The process-wide default path: the one set by [`set_default_path`], else [`KERNEL_ENV`],
/// else [`KernelPath::detect`].
///
/// Errors: [`KERNEL_ENV`] names an unknown path or one this CPU cannot run.
pub fn default_path() -> Result<KernelPath, KernelError> {
    if let Some(p) = KernelPath::from_code(FORCED.load(Ordering::Relaxed)) {
        return Ok(p);
    }
    let env = FROM_ENV.get_or_init(|| {
        let Ok(v) = std::env::var(KERNEL_ENV) else {
            return Ok(None);
        };
        let p = KernelPath::parse(&v)?;
        match p {
            Some(p) if !p.is_supported() => Err(KernelError::Unsupported { path: p }),
            p => Ok(p),
        }
    });
    match env {
        Ok(Some(p)) => Ok(*p),
        Ok(None) => Ok(KernelPath::detect()),
        Err(e) => Err(e.clone()),
    }
}

/// A kernel configuration: a code path and a thread count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    path: KernelPath,
    threads: usize,
}

impl Kernel {
    /// A kernel on `path` with at most `threads` threads (the caller's plus rayon's; ≥ 1).
    ///
    /// Errors: [`KernelError::Unsupported`] when this CPU cannot run `path`.
    pub fn new(path: KernelPath, threads: usize) -> Result<Self, KernelError> {
        if !path.is_supported() {
            return Err(KernelError::Unsupported { path });
        }
        Ok(Self {
            path,
            threads: threads.max(1),
        })
    }

    /// The process default: [`default_path`] and rayon's thread count (all cores unless
    /// `RAYON_NUM_THREADS` says otherwise).
    pub fn from_env() -> Result<Self, KernelError> {
        Ok(Self {
            path: default_path()?,
            threads: rayon::current_num_threads().max(1),
        })
    }

    /// The code path.
    pub fn path(&self) -> KernelPath {
        self.path
    }

    /// The most threads a call uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// In place on this thread: `row[lo..hi]` ← softmax(`scale · row[lo..hi]`), every other
    /// entry ← `0` (f32; the summation order and the `exp` are those of [`softmax`]'s docs,
    /// the same on every path).
    ///
    /// Panics if `lo > hi` or `hi > row.len()`.
    pub fn softmax_visible(&self, row: &mut [f32], lo: usize, hi: usize, scale: f32) {
        softmax::softmax_visible(self.path, row, lo, hi, scale)
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ` (see the module docs for the summation order).
    ///
    /// Errors: [`KernelError::Shape`] when `x.len() != m·k`, `y.len() != m·n` or `w` is
    /// shorter than its shape.
    pub fn matmul_t(
        &self,
        x: &[f32],
        m: usize,
        w: &WeightView<'_>,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        w.check()?;
        let (n, k) = (w.n, w.k);
        if x.len() != m * k || y.len() != m * n {
            return Err(KernelError::Shape(format!(
                "x has {} elements for [{m}, {k}], y has {} for [{m}, {n}]",
                x.len(),
                y.len()
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let bytes = n * k * w.data.elem_bytes();
        let threads = if bytes < PARALLEL_MIN_BYTES {
            1
        } else {
            self.threads.min(n.div_ceil(PANEL))
        };
        let out = OutPtr(y.as_mut_ptr());
        let run = |j0: usize, j1: usize| {
            // SAFETY: `x`, `w` and `y` were checked against the shapes above; each call
            // writes only the columns j0..j1 of y, and the ranges of different calls are
            // disjoint, so no element is written twice or read concurrently.
            unsafe { columns(self.path, x, m, w, out.get(), j0, j1) }
        };
        if threads == 1 {
            run(0, n);
            return Ok(());
        }
        // Contiguous column ranges of whole panels (the last may be partial), more ranges
        // than threads, claimed in order by whichever thread is free (see `RANGES_PER_THREAD`).
        let panels = n.div_ceil(PANEL);
        let ranges = (threads * RANGES_PER_THREAD).min(panels);
        let bounds: Vec<usize> = (0..=ranges)
            .map(|t| (panels * t / ranges * PANEL).min(n))
            .collect();
        let next = AtomicUsize::new(0);
        let claim = || loop {
            let r = next.fetch_add(1, Ordering::Relaxed);
            if r >= ranges {
                break;
            }
            run(bounds[r], bounds[r + 1]);
        };
        let claim = &claim;
        match helpers() {
            Some(pool) => pool.in_place_scope(|s| spawn_claimers(s, threads, claim)),
            None => rayon::in_place_scope(|s| spawn_claimers(s, threads, claim)),
        }
        Ok(())
    }
}

/// Runs `claim` on the calling thread and as `threads − 1` jobs of the scope `s`.
fn spawn_claimers<'s, F: Fn() + Sync>(s: &rayon::Scope<'s>, threads: usize, claim: &'s F) {
    for _ in 1..threads {
        s.spawn(move |_| claim());
    }
    claim();
}

/// The kernel's helper threads for callers outside any rayon pool: one pool of
/// `rayon::current_num_threads() − 1` threads (at least 1), built on first use and named
/// `faasmoe-kernel-<i>`; `None` when the caller is a rayon worker (its own pool then runs the
/// other ranges, as before).
///
/// Why: the engine and the expert workers call the kernel from their own threads, not from a
/// rayon worker. With rayon's global pool (one thread per core) such a call ran the caller
/// plus every pool thread, one more runnable thread than cores: the pool thread left without
/// a range spun (`sched_yield`) on a core the others needed (5–6% of the samples of a
/// profiled decode step). With `cores − 1` helpers the caller and its helpers fill the cores
/// exactly. Measured on an AMD EPYC (Zen 4, 2 cores), `faasmoe bench --decode-only
/// --decode-local-only`, one A2.7B layer, identical prompts, three alternated pairs: batch 1
/// 5.02 / 6.11 / 5.93 ms against 6.16 / 6.46 / 6.44 ms with the global pool, batch 8 10.19 /
/// 9.01 / 8.86 ms against 10.17 / 9.44 / 10.47 ms.
///
/// The pool only changes which thread computes a column range; every output is still
/// computed by one thread in the fixed order, so results do not change.
fn helpers() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    if rayon::current_thread_index().is_some() {
        return None;
    }
    POOL.get_or_init(|| {
        let threads = rayon::current_num_threads().saturating_sub(1).max(1);
        match rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("faasmoe-kernel-{i}"))
            .build()
        {
            Ok(pool) => Some(pool),
            Err(e) => {
                tracing::warn!(error = %e, "kernel helper threads not started; using rayon's global pool");
                None
            }
        }
    })
    .as_ref()
}

/// `y` shared by the threads of one call, each writing its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: see `Kernel::matmul_t`: threads write disjoint elements, and the scope ends before
// the borrow of `y` does.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y[:, j0..j1]` on `path`.
///
/// # Safety
/// `x` holds `[m, w.k]`, `w` its shape (checked), `y` points to `[m, w.n]` of which no other
/// thread touches columns `j0..j1`; the path is supported by this CPU.
unsafe fn columns(
    path: KernelPath,
    x: &[f32],
    m: usize,
    w: &WeightView<'_>,
    y: *mut f32,
    j0: usize,
    j1: usize,
) {
    let (n, k, ldw) = (w.n, w.k, w.row_stride);
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => match w.data {
            WeightData::Bf16(d) => {
                x86::columns_avx512(x.as_ptr(), m, k, d.as_ptr(), ldw, y, n, j0, j1)
            }
            WeightData::F16(d) => {
                x86::columns_avx512(x.as_ptr(), m, k, d.as_ptr(), ldw, y, n, j0, j1)
            }
            WeightData::F32(d) => {
                x86::columns_avx512(x.as_ptr(), m, k, d.as_ptr(), ldw, y, n, j0, j1)
            }
        },
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => match w.data {
            WeightData::Bf16(d) => {
                x86::columns_avx2(x.as_ptr(), m, k, d.as_ptr(), ldw, y, n, j0, j1)
            }
            WeightData::F16(d) => {
                x86::columns_avx2(x.as_ptr(), m, k, d.as_ptr(), ldw, y, n, j0, j1)
            }
            WeightData::F32(d) => {
                x86::columns_avx2(x.as_ptr(), m, k, d.as_ptr(), ldw, y, n, j0, j1)
            }
        },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx512 | KernelPath::Avx2 => unreachable!("x86 paths are never supported here"),
        KernelPath::Portable => match w.data {
            WeightData::Bf16(d) => portable::columns(x, m, k, d, ldw, y, n, j0, j1),
            WeightData::F16(d) => portable::columns(x, m, k, d, ldw, y, n, j0, j1),
            WeightData::F32(d) => portable::columns(x, m, k, d, ldw, y, n, j0, j1),
        },
    }
}

/// The row blocks, panels and micro-tiles of one column range, shared by all paths: calls
/// `tile(i, mr, j, nr)` for rows `i..i + mr` (mr ≤ `MR`) and columns `j..j + nr` (nr ≤ `NR`).
#[inline(always)]
pub(crate) fn for_tiles<const MR: usize, const NR: usize>(
    m: usize,
    j0: usize,
    j1: usize,
    mut tile: impl FnMut(usize, usize, usize, usize),
) {
    let mut ib = 0;
    while ib < m {
        let ie = (ib + ROW_BLOCK).min(m);
        let mut j = j0;
        while j < j1 {
            let nr = NR.min(j1 - j);
            let mut i = ib;
            while i < ie {
                let mr = MR.min(ie - i);
                tile(i, mr, j, nr);
                i += mr;
            }
            j += nr;
        }
        ib = ie;
    }
}

/// The fixed lane reduction of the module docs, on an array (the SIMD paths do the same adds).
#[inline(always)]
pub(crate) fn reduce_lanes(s: &[f32; LANES]) -> f32 {
    let mut a = [0f32; 8];
    for l in 0..8 {
        a[l] = s[l] + s[l + 8];
    }
    let mut b = [0f32; 4];
    for l in 0..4 {
        b[l] = a[l] + a[l + 4];
    }
    let c0 = b[0] + b[2];
    let c1 = b[1] + b[3];
    c0 + c1
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ` with the process default [`Kernel::from_env`].
pub fn matmul_t(x: &[f32], m: usize, w: &WeightView<'_>, y: &mut [f32]) -> Result<(), KernelError> {
    Kernel::from_env()?.matmul_t(x, m, w, y)
}

#[cfg(test)]
mod tests;
