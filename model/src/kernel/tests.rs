//! The kernel against an f64 reference on odd shapes, for every code path this CPU runs and
//! every weight dtype; the fixed summation order (rows, batches, threads and paths give
//! bit-identical outputs); shape errors.

use half::{bf16, f16};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;

/// A weight matrix in all three dtypes, with the exact f32 values of the narrow ones.
struct Mat {
    n: usize,
    k: usize,
    stride: usize,
    bf16: Vec<bf16>,
    f16: Vec<f16>,
    f32: Vec<f32>,
}

impl Mat {
    fn random(rng: &mut SmallRng, n: usize, k: usize, stride: usize) -> Self {
        let vals: Vec<f32> = (0..n * stride)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Self {
            n,
            k,
            stride,
            bf16: vals.iter().map(|&v| bf16::from_f32(v)).collect(),
            f16: vals.iter().map(|&v| f16::from_f32(v)).collect(),
            f32: vals,
        }
    }

    fn views(&self) -> [(&'static str, WeightView<'_>, Vec<f64>); 3] {
        let v = |data| WeightView {
            data,
            n: self.n,
            k: self.k,
            row_stride: self.stride,
        };
        [
            (
                "bf16",
                v(WeightData::Bf16(&self.bf16)),
                self.bf16.iter().map(|x| x.to_f64()).collect(),
            ),
            (
                "f16",
                v(WeightData::F16(&self.f16)),
                self.f16.iter().map(|x| x.to_f64()).collect(),
            ),
            (
                "f32",
                v(WeightData::F32(&self.f32)),
                self.f32.iter().map(|&x| x as f64).collect(),
            ),
        ]
    }
}

fn random_rows(rng: &mut SmallRng, m: usize, k: usize) -> Vec<f32> {
    // Magnitudes spread over a few binades, as activations are.
    (0..m * k)
        .map(|_| rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-4..4)))
        .collect()
}

/// Checks `y` against Σ x·w in f64 with the error bound of the kernel's summation: a chain of
/// ⌈k/16⌉ fused multiply-adds per lane, then 4 pairwise adds, each off by at most 2⁻²⁴
/// relative, so |Δ| ≤ (⌈k/16⌉ + 4) · 2⁻²⁴ · Σ|x·w| (plus rounding of the result).
#[allow(clippy::too_many_arguments)]
fn check_against_f64(
    what: &str,
    x: &[f32],
    m: usize,
    k: usize,
    w64: &[f64],
    n: usize,
    stride: usize,
    y: &[f32],
) {
    let u = 2f64.powi(-24);
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut abs) = (0f64, 0f64);
            for l in 0..k {
                let p = x[i * k + l] as f64 * w64[j * stride + l];
                exact += p;
                abs += p.abs();
            }
            let bound = (k.div_ceil(LANES) as f64 + 5.0) * u * abs + f64::MIN_POSITIVE;
            let got = y[i * n + j] as f64;
            assert!(
                (got - exact).abs() <= bound,
                "{what}: y[{i}, {j}] = {got}, f64 reference {exact}, bound {bound}"
            );
        }
    }
}

const SHAPES: &[(usize, usize, usize)] = &[
    // (m, n, k)
    (1, 1, 1),
    (1, 7, 15),
    (3, 7, 17),
    (1, 1408, 33),
    (17, 5, 100),
    (64, 9, 47),
    (3, 1, 2048),
    // 3+ rows (the AVX2 4 × 3 tiles) with only a partial chunk, and with k = 0.
    (5, 7, 15),
    (4, 5, 0),
    (65, 6, 31),
    (2, 13, 0),
];

#[test]
fn every_path_and_dtype_matches_an_f64_reference_on_odd_shapes() {
    let mut rng = SmallRng::seed_from_u64(15);
    let paths = KernelPath::supported();
    assert!(paths.contains(&KernelPath::Portable));
    eprintln!("kernel paths on this CPU: {paths:?}");
    for &(m, n, k) in SHAPES {
        for stride in [k, k + 3] {
            let w = Mat::random(&mut rng, n, k, stride);
            let x = random_rows(&mut rng, m, k);
            for (dtype, view, w64) in w.views() {
                let mut first: Option<Vec<f32>> = None;
                for &path in &paths {
                    for threads in [1, 2, 3] {
                        let kernel = Kernel::new(path, threads).unwrap();
                        let mut y = vec![f32::NAN; m * n];
                        kernel.matmul_t(&x, m, &view, &mut y).unwrap();
                        let what = format!(
                            "{path} {dtype} m={m} n={n} k={k} stride={stride} threads={threads}"
                        );
                        check_against_f64(&what, &x, m, k, &w64, n, stride, &y);
                        match &first {
                            None => first = Some(y),
                            Some(f) => {
                                let same =
                                    f.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits());
                                assert!(
                                    same,
                                    "{what}: differs bitwise from {:?} with 1 thread",
                                    paths[0]
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Large enough to run on several threads (above `PARALLEL_MIN_BYTES`), with m across a row
/// block boundary: a row's output is the same bits alone, in any batch, at any position.
#[test]
fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
    let mut rng = SmallRng::seed_from_u64(16);
    let (n, k) = (1411, 203);
    let w = Mat::random(&mut rng, n, k, k);
    let x = random_rows(&mut rng, 70, k);
    for &path in &KernelPath::supported() {
        for (dtype, view, _) in w.views() {
            let kernel = Kernel::new(path, 2).unwrap();
            let alone: Vec<Vec<f32>> = (0..70)
                .map(|i| {
                    let mut y = vec![0f32; n];
                    kernel
                        .matmul_t(&x[i * k..(i + 1) * k], 1, &view, &mut y)
                        .unwrap();
                    y
                })
                .collect();
            for m in [2, 3, 8, 17, 64, 70] {
                let mut y = vec![0f32; m * n];
                kernel.matmul_t(&x[..m * k], m, &view, &mut y).unwrap();
                for (i, row) in alone.iter().enumerate().take(m) {
                    let same = row
                        .iter()
                        .zip(&y[i * n..(i + 1) * n])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{path} {dtype}: row {i} in a batch of {m} differs from the row alone"
                    );
                }
                for threads in [1, 3] {
                    let mut yt = vec![0f32; m * n];
                    Kernel::new(path, threads)
                        .unwrap()
                        .matmul_t(&x[..m * k], m, &view, &mut yt)
                        .unwrap();
                    let same = y.iter().zip(&yt).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{path} {dtype} m={m}: {threads} threads differ from 2"
                    );
                }
            }
        }
    }
}

#[test]
fn widening_is_exact_and_activations_are_not_rounded() {
    // One weight, one activation that bf16 cannot hold: y must be their exact f32 product.
    let x = [1.0f32 + f32::EPSILON];
    let wb = [bf16::from_f32(3.0)];
    let wh = [f16::from_f32(-0.333)];
    for &path in &KernelPath::supported() {
        let kernel = Kernel::new(path, 1).unwrap();
        let mut y = [0f32];
        kernel
            .matmul_t(
                &x,
                1,
                &WeightView::packed(WeightData::Bf16(&wb), 1, 1),
                &mut y,
            )
            .unwrap();
        assert_eq!(y[0], x[0] * 3.0, "{path} bf16");
        kernel
            .matmul_t(
                &x,
                1,
                &WeightView::packed(WeightData::F16(&wh), 1, 1),
                &mut y,
            )
            .unwrap();
        assert_eq!(y[0], x[0] * wh[0].to_f32(), "{path} f16");
    }
}

#[test]
fn shapes_that_do_not_match_are_errors() {
    let w = [0f32; 12];
    let k = Kernel::new(KernelPath::Portable, 1).unwrap();
    let view = WeightView::packed(WeightData::F32(&w), 3, 4);
    let mut y = [0f32; 6];
    assert!(matches!(
        k.matmul_t(&[0.0; 7], 2, &view, &mut y),
        Err(KernelError::Shape(_))
    ));
    assert!(matches!(
        k.matmul_t(&[0.0; 8], 2, &view, &mut y[..5]),
        Err(KernelError::Shape(_))
    ));
    let short = WeightView {
        data: WeightData::F32(&w),
        n: 3,
        k: 4,
        row_stride: 5,
    };
    assert!(matches!(
        k.matmul_t(&[0.0; 8], 2, &short, &mut y),
        Err(KernelError::Shape(_))
    ));
    k.matmul_t(&[0.0; 8], 2, &view, &mut y).unwrap();
}

#[test]
fn path_settings_parse_and_refuse_what_the_cpu_lacks() {
    assert_eq!(
        KernelPath::parse("AVX512").unwrap(),
        Some(KernelPath::Avx512)
    );
    assert_eq!(KernelPath::parse("auto").unwrap(), None);
    assert!(matches!(
        KernelPath::parse("sse9"),
        Err(KernelError::UnknownPath { .. })
    ));
    for p in KernelPath::ALL {
        assert_eq!(Kernel::new(p, 1).is_ok(), p.is_supported());
        if !p.is_supported() {
            assert!(matches!(
                set_default_path(Some(p)),
                Err(KernelError::Unsupported { .. })
            ));
        }
    }
    assert!(default_path().unwrap().is_supported());
}

#[test]
fn exp_nonpositive_is_within_two_ulp_of_f64() {
    use super::softmax::exp_nonpositive;
    let mut worst = 0f64;
    let mut x = 0f32;
    while x > -87.0 {
        let want = (x as f64).exp();
        let got = exp_nonpositive(x) as f64;
        let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
        worst = worst.max((got - want).abs() / ulp);
        x -= 0.001_7;
    }
    assert!(worst <= 2.0, "exp error {worst} ulp");
    assert_eq!(exp_nonpositive(0.0), 1.0);
    assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
}

#[test]
fn softmax_matches_f64_and_gives_the_same_bits_on_every_path() {
    let mut rng = SmallRng::seed_from_u64(11);
    for &(len, lo, hi) in &[
        (1, 0, 1),
        (7, 2, 7),
        (16, 0, 16),
        (33, 5, 30),
        (4100, 17, 4100),
    ] {
        let base: Vec<f32> = (0..len).map(|_| rng.random_range(-30.0f32..30.0)).collect();
        let scale = 0.088_388_35; // 1 / √128
        let m = base[lo..hi]
            .iter()
            .map(|&v| v as f64 * scale as f64)
            .fold(f64::MIN, f64::max);
        let sum: f64 = base[lo..hi]
            .iter()
            .map(|&v| (v as f64 * scale as f64 - m).exp())
            .sum();
        let mut first: Option<Vec<f32>> = None;
        for path in KernelPath::supported() {
            let mut row = base.clone();
            Kernel::new(path, 1)
                .unwrap()
                .softmax_visible(&mut row, lo, hi, scale);
            for (j, &p) in row.iter().enumerate() {
                let want = if (lo..hi).contains(&j) {
                    (base[j] as f64 * scale as f64 - m).exp() / sum
                } else {
                    0.0
                };
                assert!(
                    (p as f64 - want).abs() <= 4e-6 * want + 1e-12,
                    "{path:?} len {len} entry {j}: {p} vs {want}"
                );
            }
            match &first {
                None => first = Some(row),
                Some(f) => assert!(
                    f.iter().zip(&row).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{path:?} differs from the first path"
                ),
            }
        }
    }
}
