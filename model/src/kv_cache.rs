//! The per-sequence key/value cache and the attention that reads it in place.
//!
//! **Storage.** Per decoder layer, one preallocated f32 buffer for the keys,
//! `[kv_heads, capacity, head_dim]` (a head's positions are consecutive rows), and one for the
//! values stored transposed, `[kv_heads, head_dim, capacity]` (a head's channel is a row over
//! positions). Appending writes only the new positions; the capacity doubles when it runs
//! out, which is the only time cached positions are copied. [`KvCache::truncate`] only moves
//! the length back.
//!
//! **Attention without copies.** Both products run on the matmul kernel
//! ([`crate::kernel`]) with the cache as its `W`: scores `q · Kᵀ` read the key rows in
//! place, and `p · V` reads the transposed value rows in place (row stride = capacity). For
//! GQA/MQA the `groups = heads / kv_heads` query heads that share a kv head are stacked as
//! rows of one product (`[groups · q_len, head_dim]` against that kv head's keys), so the
//! shared heads are read once and never repeated.
//!
//! **One result per row.** A query row's output depends only on its own `q` and the keys and
//! values it may see, never on the other rows of the pass, on chunking or on the capacity:
//! the kernel sums in a fixed order per output; the key range of a block of queries starts
//! at a multiple of the kernel's [`LANES`] (so each position always falls into the same lane
//! and chunk), and positions a row may not see get a probability of exactly `0`, which adds
//! exactly nothing. A decode step in a batch of 8 therefore equals the same step alone, and a
//! prompt prefilled in chunks equals it prefilled at once, bit for bit.

use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::kernel::{Kernel, WeightData, WeightView, LANES};

/// Smallest capacity (positions) of a layer's buffers.
pub const MIN_CAPACITY: usize = 16;

/// Query positions per work item of [`attend`] (times `groups` rows per kernel call).
const QUERY_BLOCK: usize = 64;

/// One layer's cached keys and values.
#[derive(Debug, Clone, Default)]
struct LayerKv {
    kv_heads: usize,
    head_dim: usize,
    /// Cached positions.
    len: usize,
    /// Positions the buffers hold room for.
    cap: usize,
    /// Keys `[kv_heads, cap, head_dim]`.
    k: Vec<f32>,
    /// Values, transposed: `[kv_heads, head_dim, cap]`.
    vt: Vec<f32>,
}

impl LayerKv {
    /// Makes room for `need` positions: doubles the capacity (at least [`MIN_CAPACITY`],
    /// at least `need`) and copies the cached positions once.
    fn reserve(&mut self, need: usize) {
        if need <= self.cap {
            return;
        }
        let cap = need.max(2 * self.cap).max(MIN_CAPACITY);
        let (nkv, hd, len, old) = (self.kv_heads, self.head_dim, self.len, self.cap);
        let mut k = vec![0f32; nkv * cap * hd];
        let mut vt = vec![0f32; nkv * hd * cap];
        for h in 0..nkv {
            k[h * cap * hd..h * cap * hd + len * hd]
                .copy_from_slice(&self.k[h * old * hd..h * old * hd + len * hd]);
            for d in 0..hd {
                let (src, dst) = ((h * hd + d) * old, (h * hd + d) * cap);
                vt[dst..dst + len].copy_from_slice(&self.vt[src..src + len]);
            }
        }
        self.k = k;
        self.vt = vt;
        self.cap = cap;
    }
}

/// The per-sequence key/value cache: per decoder layer, the keys (after RoPE) and values of
/// every cached position, f32, `kv_heads × head_dim` each (see the module docs for the layout).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` decoder layers (buffers are allocated at the
    /// first append, sized by the layer's heads).
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
        }
    }

    /// Tokens cached (as of the first layer).
    pub fn seq_len(&self) -> usize {
        self.layer_len(0)
    }

    /// Tokens cached in decoder layer `layer` (0 for a layer index past the model).
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.len)
    }

    /// Positions the first layer's buffers hold room for before they next grow.
    pub fn capacity(&self) -> usize {
        self.layers.first().map_or(0, |l| l.cap)
    }

    /// Drops cached positions from `len` on, in every layer (undoes a failed step). Keeps the
    /// buffers: re-appending writes in place.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for l in self.layers.iter_mut() {
            l.len = l.len.min(len);
        }
        Ok(())
    }

    /// Bytes held by the key and value buffers (their capacity, f32).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.vt.len()) * std::mem::size_of::<f32>())
            .sum()
    }

    /// Appends `len` positions to decoder layer `layer` at position `offset`, which must be
    /// the layer's cached length: `keys` (already rotated) and `values` are
    /// `[len, kv_heads · head_dim]` f32, row-major, head-major within a row.
    ///
    /// Errors: `offset` is not the cached length, the layer index is past the model, the
    /// shapes do not match the buffers' `kv_heads`/`head_dim` or the slices' lengths.
    pub fn append(
        &mut self,
        layer: usize,
        offset: usize,
        kv_heads: usize,
        head_dim: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<()> {
        let n_layers = self.layers.len();
        let l = self.layers.get_mut(layer).ok_or_else(|| {
            ModelError::InvalidInput(format!("KV cache layer {layer} of {n_layers}"))
        })?;
        if l.len != offset {
            return Err(ModelError::InvalidInput(format!(
                "KV cache layer {layer} holds {} positions, the pass starts at {offset}",
                l.len
            )));
        }
        let width = kv_heads * head_dim;
        if width == 0 || keys.len() != values.len() || !keys.len().is_multiple_of(width) {
            return Err(ModelError::InvalidInput(format!(
                "KV append of {} keys and {} values for {kv_heads} kv heads of {head_dim}",
                keys.len(),
                values.len()
            )));
        }
        if l.cap == 0 {
            l.kv_heads = kv_heads;
            l.head_dim = head_dim;
        } else if (l.kv_heads, l.head_dim) != (kv_heads, head_dim) {
            return Err(ModelError::InvalidInput(format!(
                "KV cache layer {layer} holds {} kv heads of {}, got {kv_heads} of {head_dim}",
                l.kv_heads, l.head_dim
            )));
        }
        let n = keys.len() / width;
        l.reserve(offset + n);
        let (cap, hd) = (l.cap, head_dim);
        for i in 0..n {
            let pos = offset + i;
            for h in 0..kv_heads {
                let src = i * width + h * hd;
                let dst = (h * cap + pos) * hd;
                l.k[dst..dst + hd].copy_from_slice(&keys[src..src + hd]);
                for d in 0..hd {
                    l.vt[(h * hd + d) * cap + pos] = values[src + d];
                }
            }
        }
        l.len = offset + n;
        Ok(())
    }
}

/// The attention of one sequence's new rows in a pass.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpan<'a> {
    /// The sequence's cache, already holding the new positions (appended with
    /// [`KvCache::append`]).
    pub cache: &'a KvCache,
    /// Rotated queries of the new rows, `[len, heads · head_dim]` f32 (a window of the pass's
    /// stacked queries: rows `row..row + len`).
    pub row: usize,
    /// New rows.
    pub len: usize,
    /// Position of the first new row.
    pub offset: usize,
}

/// Scaled dot-product attention of every span's new rows against its cache in `layer`:
/// causal, with an optional sliding `window` (query at position `p` sees keys `j` with
/// `p - window < j ≤ p`), softmax in f32 by [`Kernel::softmax_visible`] (max subtracted;
/// `exp` and summation order in `kernel::softmax`'s docs).
///
/// `q: [n_rows, heads · head_dim]` (all spans' rows stacked; query head `i` uses kv head
/// `i / (heads / kv_heads)`, as `repeat_kv`), returns `[n_rows, heads · head_dim]` f32. Work
/// items (span, kv head, block of [`QUERY_BLOCK`] positions) run on rayon's threads, each
/// on one thread of `kernel`'s path.
///
/// Errors: a span whose cache does not hold its positions in `layer`, heads that are not a
/// multiple of the cache's kv heads, or a `q` of another size.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    kernel: &Kernel,
    layer: usize,
    spans: &[AttentionSpan<'_>],
    q: &[f32],
    heads: usize,
    head_dim: usize,
    window: Option<usize>,
    scale: f32,
) -> Result<Vec<f32>> {
    let width = heads * head_dim;
    let n_rows = spans.iter().map(|s| s.row + s.len).max().unwrap_or(0);
    if q.len() < n_rows * width {
        return Err(ModelError::InvalidInput(format!(
            "attention queries: {} values for {n_rows} rows of {width}",
            q.len()
        )));
    }
    let mut items = Vec::new();
    for (si, s) in spans.iter().enumerate() {
        let l =
            s.cache.layers.get(layer).ok_or_else(|| {
                ModelError::InvalidInput(format!("KV cache has no layer {layer}"))
            })?;
        if l.len < s.offset + s.len || l.head_dim != head_dim || l.kv_heads == 0 {
            return Err(ModelError::InvalidInput(format!(
                "KV cache layer {layer} holds {} positions of {} kv heads × {}, attention needs {} × {head_dim}",
                l.len,
                l.kv_heads,
                l.head_dim,
                s.offset + s.len
            )));
        }
        if !heads.is_multiple_of(l.kv_heads) {
            return Err(ModelError::InvalidInput(format!(
                "{heads} query heads for {} kv heads",
                l.kv_heads
            )));
        }
        for h in 0..l.kv_heads {
            for b in (0..s.len).step_by(QUERY_BLOCK) {
                items.push((si, h, b, QUERY_BLOCK.min(s.len - b)));
            }
        }
    }
    let single = Kernel::new(kernel.path(), 1)?;
    let results: Vec<Result<Vec<f32>>> = items
        .par_iter()
        .map(|&(si, h, b, bl)| {
            let s = &spans[si];
            let l = &s.cache.layers[layer];
            block(
                &single,
                l,
                h,
                heads / l.kv_heads,
                &q[(s.row + b) * width..(s.row + b + bl) * width],
                heads,
                s.offset + b,
                bl,
                window,
                scale,
            )
        })
        .collect();
    let mut out = vec![0f32; n_rows * width];
    for (&(si, h, b, bl), r) in items.iter().zip(results) {
        let r = r?;
        let s = &spans[si];
        let chunk = (heads / s.cache.layers[layer].kv_heads) * head_dim;
        for i in 0..bl {
            let dst = (s.row + b + i) * width + h * chunk;
            out[dst..dst + chunk].copy_from_slice(&r[i * chunk..(i + 1) * chunk]);
        }
    }
    Ok(out)
}

/// One work item: kv head `h`, the `bl` query positions from `pos0`, `q: [bl, heads · hd]`.
/// Returns `[bl, groups · hd]`: row `i` holds query heads `h · groups ..` of position
/// `pos0 + i`, each `hd` values.
#[allow(clippy::too_many_arguments)]
fn block(
    kernel: &Kernel,
    l: &LayerKv,
    h: usize,
    groups: usize,
    q: &[f32],
    heads: usize,
    pos0: usize,
    bl: usize,
    window: Option<usize>,
    scale: f32,
) -> Result<Vec<f32>> {
    let hd = l.head_dim;
    let visible_from = |pos: usize| window.map_or(0, |w| (pos + 1).saturating_sub(w));
    // Keys from a multiple of LANES (so a position always lands in the same lane) to the
    // block's last position.
    let k0 = visible_from(pos0) / LANES * LANES;
    let k1 = pos0 + bl;
    let klen = k1 - k0;
    let m = bl * groups;
    // Rows (i, g): query head h·groups + g at position pos0 + i.
    let mut x = Vec::with_capacity(m * hd);
    for i in 0..bl {
        let row = &q[i * heads * hd..(i + 1) * heads * hd];
        x.extend_from_slice(&row[h * groups * hd..(h + 1) * groups * hd]);
    }
    let keys = WeightView {
        data: WeightData::F32(&l.k[(h * l.cap + k0) * hd..(h * l.cap + k1) * hd]),
        n: klen,
        k: hd,
        row_stride: hd,
    };
    let mut p = vec![0f32; m * klen];
    kernel.matmul_t(&x, m, &keys, &mut p)?;
    for i in 0..bl {
        let pos = pos0 + i;
        let (lo, hi) = (visible_from(pos) - k0, pos + 1 - k0);
        for g in 0..groups {
            let row = &mut p[(i * groups + g) * klen..(i * groups + g + 1) * klen];
            kernel.softmax_visible(row, lo, hi, scale);
        }
    }
    let vstart = h * hd * l.cap + k0;
    let values = WeightView {
        data: WeightData::F32(&l.vt[vstart..vstart + (hd - 1) * l.cap + klen]),
        n: hd,
        k: klen,
        row_stride: l.cap,
    };
    let mut o = vec![0f32; m * hd];
    kernel.matmul_t(&p, m, &values, &mut o)?;
    Ok(o)
}
