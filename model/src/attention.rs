//! Self-attention of a Qwen2-MoE decoder layer, as transformers' `Qwen2MoeAttention`
//! (`modeling_qwen2_moe.py`): q/k/v projections with bias (stacked into one kernel pass),
//! RoPE (rotate-half, [`Rotary`]), grouped-query attention against the sequence's
//! [`KvCache`](crate::KvCache) read in place ([`attend`]), optional sliding window, and the
//! output projection.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::control_plane::Span;
use crate::error::Result;
use crate::kernel::Kernel;
use crate::kv_cache::{attend, AttentionSpan, KvCache};
use crate::linear::{with_f32, Linear};

/// RoPE tables `cos`, `sin`: `[max_position_embeddings, head_dim / 2]` f32, row-major, with
/// `inv_freq_i = θ^(-2i/d)` (transformers' default rope init).
pub(crate) struct Rotary {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotary {
    pub(crate) fn new(cfg: &Config) -> Self {
        let dim = cfg.head_dim;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / cfg.rope_theta.powf(i as f64 / dim as f64) as f32)
            .collect();
        let half = inv_freq.len();
        let max = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(max * half);
        let mut sin = Vec::with_capacity(max * half);
        for t in 0..max {
            for &f in &inv_freq {
                let a = t as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates one head `x: [head_dim]` at position `pos` in place (rotate-half, as
    /// `candle_nn::rotary_emb::rope`: `x1·cos − x2·sin`, `x1·sin + x2·cos`).
    pub(crate) fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let (cos, sin) = (
            &self.cos[pos * h..(pos + 1) * h],
            &self.sin[pos * h..(pos + 1) * h],
        );
        let (x1, x2) = x.split_at_mut(h);
        for i in 0..h {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = a * sin[i] + b * cos[i];
        }
    }
}

pub(crate) struct Attention {
    /// q, k and v projections stacked by rows, `[(heads + 2 · kv_heads) · head_dim, hidden]`
    /// (biases likewise): one kernel pass over the rows for all three.
    pub(crate) qkv_proj: Linear,
    pub(crate) o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

impl Attention {
    pub(crate) fn load(ckpt: &mut Checkpoint, cfg: &Config, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}.self_attn");
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let names = [
            format!("{p}.q_proj"),
            format!("{p}.k_proj"),
            format!("{p}.v_proj"),
        ];
        let rows = [nh * hd, nkv * hd, nkv * hd];
        let weights: Vec<String> = names.iter().map(|n| format!("{n}.weight")).collect();
        let w = ckpt.load_weight_rows(
            &weights.iter().map(String::as_str).collect::<Vec<_>>(),
            &rows,
            h,
        )?;
        let bias = if cfg.qkv_bias {
            let mut b = Vec::with_capacity(rows.iter().sum());
            for (n, &r) in names.iter().zip(&rows) {
                b.extend(ckpt.load(&format!("{n}.bias"), &[r])?.to_vec1::<f32>()?);
            }
            Some(b)
        } else {
            None
        };
        Ok(Self {
            qkv_proj: Linear::new(Arc::new(w), bias)?,
            o_proj: Linear::load(ckpt, &format!("{p}.o_proj"), h, nh * hd, false)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            sliding_window: cfg.sliding_window_for(layer),
        })
    }

    /// `xs: [n, hidden]` (all sequences' new rows stacked) → `[n, hidden]`.
    ///
    /// Rotates q and k in place, appends each sequence's new keys and values to its cache
    /// (written where they belong, no copy of what is cached), then attends against the
    /// cache in place ([`attend`]: GQA reads each kv head once for its query heads).
    pub(crate) fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        spans: &[Span],
        caches: &mut [&mut KvCache],
        rotary: &Rotary,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let n = xs.dim(0)?;
        let width = (nh + 2 * nkv) * hd;
        let kernel = Kernel::from_env()?;
        let mut qkv = with_f32(xs, |x| {
            let mut y = vec![0f32; n * width];
            self.qkv_proj.forward_with(&kernel, x, n, &mut y)?;
            Ok(y)
        })?;
        let mut q = vec![0f32; n * nh * hd];
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            let mut keys = Vec::with_capacity(span.len * nkv * hd);
            let mut values = Vec::with_capacity(span.len * nkv * hd);
            for i in 0..span.len {
                let (r, pos) = (span.row + i, span.offset + i);
                let row = &mut qkv[r * width..(r + 1) * width];
                for head in row[..(nh + nkv) * hd].chunks_exact_mut(hd) {
                    rotary.apply(head, pos);
                }
                q[r * nh * hd..(r + 1) * nh * hd].copy_from_slice(&row[..nh * hd]);
                keys.extend_from_slice(&row[nh * hd..(nh + nkv) * hd]);
                values.extend_from_slice(&row[(nh + nkv) * hd..]);
            }
            cache.append(layer, span.offset, nkv, hd, &keys, &values)?;
        }
        let att_spans: Vec<AttentionSpan<'_>> = spans
            .iter()
            .zip(caches.iter())
            .map(|(s, c)| AttentionSpan {
                cache: c,
                row: s.row,
                len: s.len,
                offset: s.offset,
            })
            .collect();
        let scale = (1f64 / (hd as f64).sqrt()) as f32;
        let o = attend(
            &kernel,
            layer,
            &att_spans,
            &q,
            nh,
            hd,
            self.sliding_window,
            scale,
        )?;
        let h = self.o_proj.out_features();
        let mut y = vec![0f32; n * h];
        self.o_proj.forward_with(&kernel, &o, n, &mut y)?;
        Ok(Tensor::from_vec(y, (n, h), &Device::Cpu)?)
    }
}
