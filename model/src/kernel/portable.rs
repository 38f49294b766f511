//! The portable path: plain Rust on `[f32; 16]` lane arrays, `f32::mul_add` (a fused
//! multiply-add, as the SIMD paths) and `half`'s exact widening.

use half::{bf16, f16};

use super::{for_tiles, reduce_lanes, LANES, PANEL};

/// A stored weight element, widened exactly to f32.
pub(crate) trait Widen: Copy {
    fn widen(self) -> f32;
}

impl Widen for bf16 {
    /// bf16 is the upper half of an f32: a 16-bit shift, exact.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Widen for f16 {
    /// Every f16 value is an f32 value: `half`'s conversion is exact.
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

const MR: usize = 4;

/// `y[:, j0..j1]` for `x: [m, k]`, `w: [n, k]` with row stride `ldw`, `y: [m, ldy]`.
///
/// # Safety
/// `y` points to `m · ldy` elements of which no other thread touches columns `j0..j1`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn columns<E: Widen>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[E],
    ldw: usize,
    y: *mut f32,
    ldy: usize,
    j0: usize,
    j1: usize,
) {
    for_tiles::<MR, PANEL>(m, j0, j1, |i, mr, j, nr| {
        let mut acc = [[[0f32; LANES]; PANEL]; MR];
        let mut off = 0;
        while off < k {
            let len = LANES.min(k - off);
            let mut wv = [[0f32; LANES]; PANEL];
            for (jj, wl) in wv.iter_mut().enumerate().take(nr) {
                let row = &w[(j + jj) * ldw + off..][..len];
                for (l, &e) in row.iter().enumerate() {
                    wl[l] = e.widen();
                }
            }
            for (ii, acc_i) in acc.iter_mut().enumerate().take(mr) {
                let mut xv = [0f32; LANES];
                xv[..len].copy_from_slice(&x[(i + ii) * k + off..][..len]);
                for (acc_ij, wl) in acc_i.iter_mut().zip(&wv).take(nr) {
                    for l in 0..LANES {
                        acc_ij[l] = xv[l].mul_add(wl[l], acc_ij[l]);
                    }
                }
            }
            off += len;
        }
        for (ii, acc_i) in acc.iter().enumerate().take(mr) {
            for (jj, acc_ij) in acc_i.iter().enumerate().take(nr) {
                // SAFETY: row i + ii < m, column j + jj < j1 ≤ ldy (caller's contract).
                unsafe { *y.add((i + ii) * ldy + j + jj) = reduce_lanes(acc_ij) };
            }
        }
    });
}
