//! The Qwen2-MoE control plane: everything but the routed experts.
//!
//! Follows transformers' `modeling_qwen2_moe.py` (`Qwen2MoeForCausalLM`; v4.40 hub form and
//! v5): embeddings, RMSNorm, RoPE (rotate-half), attention with q/k/v bias and GQA, the
//! router (softmax → top-k → optional renormalisation), the shared expert with its sigmoid
//! gate, dense MLP layers, the final norm and the LM head.
//!
//! **The MoE cut.** At a MoE layer the control plane stops and hands the routed part to
//! whoever holds the experts: [`ControlPlane::advance`] returns a [`RoutedBatch`] (the
//! layer's normed hidden states and each row's top-k experts with routing weights), and
//! [`ControlPlane::complete_moe`] takes back the weighted routed output, adds the shared
//! expert and the residual and goes on. A synchronous driver over an [`ExpertBackend`] is
//! [`ControlPlane::forward`]; the controller drives the same steps asynchronously over NATS.
//!
//! Batches are ragged: sequences of different lengths and positions go through one pass.
//! All token rows are stacked into `[n_tokens, hidden]` for every projection; attention runs
//! per sequence against that sequence's [`KvCache`].

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::attention::{Attention, Rotary};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::experts::{RowRoutes, SwiGlu};
pub use crate::kv_cache::KvCache;
use crate::linear::{Embedding, Linear};

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(ckpt: &mut Checkpoint, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: ckpt.load(&format!("{name}.weight"), &[size])?,
            eps: eps as f32,
        })
    }
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(xs, &self.weight, self.eps)?)
    }
}

/// The control-plane half of a sparse MoE block: router and shared expert.
struct MoeControl {
    /// Router weight `[num_experts, hidden]`.
    gate: Linear,
    shared_expert: Option<SwiGlu>,
    /// Shared-expert gate `[1, hidden]`.
    shared_expert_gate: Option<Linear>,
    top_k: usize,
    norm_topk_prob: bool,
}

impl MoeControl {
    fn load(ckpt: &mut Checkpoint, cfg: &Config, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}.mlp");
        let h = cfg.hidden_size;
        let gate = Linear::load(ckpt, &format!("{p}.gate"), cfg.num_experts, h, false)?;
        let (shared_expert, shared_expert_gate) = if cfg.shared_expert_intermediate_size > 0 {
            (
                Some(SwiGlu::load(
                    ckpt,
                    &format!("{p}.shared_expert"),
                    h,
                    cfg.shared_expert_intermediate_size,
                )?),
                Some(Linear::load(
                    ckpt,
                    &format!("{p}.shared_expert_gate"),
                    1,
                    h,
                    false,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            gate,
            shared_expert,
            shared_expert_gate,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
        })
    }

    /// Router: softmax over all experts in f32, top-k, optional renormalisation
    /// (transformers' `Qwen2MoeSparseMoeBlock.forward`). Returns per row the chosen
    /// `(expert, weight)` in descending weight order.
    fn route(&self, xs: &Tensor) -> Result<Vec<RowRoutes>> {
        let logits = self.gate.forward(xs)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
        Ok(probs
            .into_iter()
            .map(|p| {
                let mut idx: Vec<usize> = (0..p.len()).collect();
                // Stable sort by descending probability: ties go to the lower index, as torch.topk.
                idx.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap_or(std::cmp::Ordering::Equal));
                idx.truncate(self.top_k);
                let sum: f32 = idx.iter().map(|&e| p[e]).sum();
                idx.into_iter()
                    .map(|e| {
                        (
                            e,
                            if self.norm_topk_prob {
                                p[e] / sum
                            } else {
                                p[e]
                            },
                        )
                    })
                    .collect()
            })
            .collect())
    }

    /// `sigmoid(shared_expert_gate(xs)) * shared_expert(xs)`, or zeros without a shared expert.
    fn shared(&self, xs: &Tensor) -> Result<Tensor> {
        match (&self.shared_expert, &self.shared_expert_gate) {
            (Some(e), Some(g)) => {
                let gate = candle_nn::ops::sigmoid(&g.forward(xs)?)?;
                Ok(e.forward(xs)?.broadcast_mul(&gate)?)
            }
            _ => Ok(xs.zeros_like()?),
        }
    }
}

enum Ffn {
    Dense(SwiGlu),
    Moe(MoeControl),
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    ffn: Ffn,
}

/// Where one sequence's new rows sit in a pass: rows `row..row + len` at positions
/// `offset..offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First row of this sequence in the stacked `[n_tokens, hidden]`.
    pub row: usize,
    /// New tokens of this sequence in the pass.
    pub len: usize,
    /// Position of the first new token (tokens already cached).
    pub offset: usize,
}

/// The routed part of one MoE layer for the experts to compute.
#[derive(Debug, Clone)]
pub struct RoutedBatch {
    /// Decoder layer index.
    pub layer: usize,
    /// Normed hidden states `[n_tokens, hidden]` (the input of the experts).
    pub hidden: Tensor,
    /// Per row, the top-k `(expert, routing weight)`, descending weight.
    pub routes: Vec<RowRoutes>,
}

/// Computes the routed experts of a MoE layer.
pub trait ExpertBackend {
    /// Returns `[n_tokens, hidden]`: row `i` is Σ w·expert_e(hidden[i]) over `routes[i]`.
    fn routed(&mut self, batch: &RoutedBatch) -> Result<Tensor>;
}

/// One forward pass through the decoder stack, resumable at each MoE layer.
#[derive(Debug)]
pub struct ForwardPass {
    spans: Vec<Span>,
    hidden: Tensor,
    layer: usize,
    pending: Option<PendingMoe>,
}

/// A MoE layer waiting for its routed output.
#[derive(Debug)]
struct PendingMoe {
    /// Hidden states before the layer's MLP (the residual stream), `[n_tokens, hidden]`.
    residual: Tensor,
    /// Post-attention-normed hidden states, the experts' input, `[n_tokens, hidden]`.
    xs: Tensor,
    /// The gated shared-expert output once [`ControlPlane::shared_expert`] computed it.
    shared: Option<Tensor>,
}

impl ForwardPass {
    /// Spans of the sequences, in the order given to [`ControlPlane::start`].
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Rows of each sequence's last new token (where the next token is predicted).
    pub fn last_rows(&self) -> Vec<usize> {
        self.spans.iter().map(|s| s.row + s.len - 1).collect()
    }

    /// Tokens in the pass.
    pub fn n_tokens(&self) -> usize {
        self.spans.iter().map(|s| s.len).sum()
    }
}

/// What [`ControlPlane::advance`] stopped at.
#[derive(Debug)]
pub enum Step {
    /// A MoE layer needs its routed experts; answer with [`ControlPlane::complete_moe`].
    Experts(RoutedBatch),
    /// All layers done: final-normed hidden states `[n_tokens, hidden]`.
    Done(Tensor),
}

/// The control plane of a Qwen2-MoE model (all weights but the routed experts).
pub struct ControlPlane {
    config: Config,
    dtype: DType,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("layers", &self.layers.len())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl ControlPlane {
    /// Loads every tensor but the routed experts, then unmaps the checkpoint files.
    pub fn load(ckpt: &mut Checkpoint) -> Result<Self> {
        let cfg = ckpt.config().clone();
        let dtype = ckpt.dtype();
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = Arc::new(ckpt.load_weight("model.embed_tokens.weight", v, h)?);
        let embed_tokens = Embedding::new(embed.clone());
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let ffn = if cfg.is_moe_layer(l) {
                Ffn::Moe(MoeControl::load(ckpt, &cfg, l)?)
            } else {
                Ffn::Dense(SwiGlu::load(
                    ckpt,
                    &format!("{p}.mlp"),
                    h,
                    cfg.intermediate_size,
                )?)
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(
                    ckpt,
                    &format!("{p}.input_layernorm"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                self_attn: Attention::load(ckpt, &cfg, l)?,
                post_attention_layernorm: RmsNorm::load(
                    ckpt,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    cfg.rms_norm_eps,
                )?,
                ffn,
            });
        }
        let norm = RmsNorm::load(ckpt, "model.norm", h, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            Linear::new(embed, None)?
        } else {
            Linear::load(ckpt, "lm_head", v, h, false)?
        };
        ckpt.release_files();
        Ok(Self {
            rotary: Rotary::new(&cfg),
            config: cfg,
            dtype,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// The model config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Bytes of the weight matrices a decode step reads in full (stored dtype): attention,
    /// routers, shared experts and their gates, dense MLPs and the LM head. The embedding is
    /// not counted (a step reads one row per token).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let attn = l.self_attn.qkv_proj.weight_bytes() + l.self_attn.o_proj.weight_bytes();
                attn + match &l.ffn {
                    Ffn::Dense(m) => m.weight_bytes(),
                    Ffn::Moe(m) => {
                        m.gate.weight_bytes()
                            + m.shared_expert.as_ref().map_or(0, SwiGlu::weight_bytes)
                            + m.shared_expert_gate
                                .as_ref()
                                .map_or(0, Linear::weight_bytes)
                    }
                }
            })
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    /// Bytes of every weight matrix held (stored dtype): [`Self::weight_bytes`] plus the
    /// embedding, unless it is the tied LM head (one matrix). Norms, biases and the rotary
    /// tables are not counted (under 1% at every Qwen2-MoE geometry). What a controller's
    /// resident memory is compared with (`faasmoe bench`, its controller-memory section).
    pub fn resident_weight_bytes(&self) -> usize {
        let embed = self.embed_tokens.weight();
        let tied = Arc::ptr_eq(embed, self.lm_head.weight());
        self.weight_bytes() + if tied { 0 } else { embed.bytes() }
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers)
    }

    /// Starts a pass over the new `tokens` of each sequence, whose caches hold `offsets`
    /// tokens already. Embeds all rows into `[n_tokens, hidden]`.
    ///
    /// Errors: an empty token list, a token id ≥ vocab, or a sequence past the context length.
    pub fn start(&self, batch: &[(usize, &[u32])]) -> Result<ForwardPass> {
        let mut spans = Vec::with_capacity(batch.len());
        let mut ids = Vec::new();
        for &(offset, tokens) in batch {
            if tokens.is_empty() {
                return Err(ModelError::InvalidInput(
                    "a sequence with no new tokens".into(),
                ));
            }
            self.config.check_token_ids(tokens)?;
            let end = offset + tokens.len();
            if end > self.config.max_position_embeddings {
                return Err(ModelError::ContextOverflow {
                    len: end,
                    max: self.config.max_position_embeddings,
                });
            }
            spans.push(Span {
                row: ids.len(),
                len: tokens.len(),
                offset,
            });
            ids.extend_from_slice(tokens);
        }
        if ids.is_empty() {
            return Err(ModelError::InvalidInput("an empty batch".into()));
        }
        let hidden = self.embed_tokens.forward(&ids)?;
        Ok(ForwardPass {
            spans,
            hidden,
            layer: 0,
            pending: None,
        })
    }

    /// Runs layers until a MoE layer needs its routed experts or the stack is done.
    /// `caches[i]` is the cache of the pass's `i`-th sequence.
    pub fn advance(&self, pass: &mut ForwardPass, caches: &mut [&mut KvCache]) -> Result<Step> {
        if pass.pending.is_some() {
            return Err(ModelError::InvalidInput(
                "advance called before complete_moe".into(),
            ));
        }
        if caches.len() != pass.spans.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} caches for {} sequences",
                caches.len(),
                pass.spans.len()
            )));
        }
        while pass.layer < self.layers.len() {
            let l = pass.layer;
            let layer = &self.layers[l];
            let xs = layer.input_layernorm.forward(&pass.hidden)?;
            let attn = layer
                .self_attn
                .forward(l, &xs, &pass.spans, caches, &self.rotary)?;
            let residual = (&pass.hidden + attn)?;
            let xs = layer.post_attention_layernorm.forward(&residual)?;
            match &layer.ffn {
                Ffn::Dense(mlp) => {
                    pass.hidden = (residual + mlp.forward(&xs)?)?;
                    pass.layer += 1;
                }
                Ffn::Moe(moe) => {
                    let routes = moe.route(&xs)?;
                    pass.pending = Some(PendingMoe {
                        residual,
                        xs: xs.clone(),
                        shared: None,
                    });
                    return Ok(Step::Experts(RoutedBatch {
                        layer: l,
                        hidden: xs,
                        routes,
                    }));
                }
            }
        }
        Ok(Step::Done(self.norm.forward(&pass.hidden)?))
    }

    /// Computes the pending MoE layer's gated shared expert, `sigmoid(g·x) · shared_expert(x)`
    /// `[n_tokens, hidden]`, ahead of [`ControlPlane::complete_moe`]: a caller whose routed
    /// experts are remote calls it after sending the routed batch, so the shared expert runs
    /// while the experts do. Optional (`complete_moe` computes it otherwise) and idempotent.
    ///
    /// Errors: no pending MoE layer.
    pub fn shared_expert(&self, pass: &mut ForwardPass) -> Result<()> {
        let layer = pass.layer;
        let pending = pass.pending.as_mut().ok_or_else(|| {
            ModelError::InvalidInput("shared_expert without a pending MoE layer".into())
        })?;
        if pending.shared.is_none() {
            let Ffn::Moe(moe) = &self.layers[layer].ffn else {
                return Err(ModelError::InvalidInput("pending layer is not MoE".into()));
            };
            pending.shared = Some(moe.shared(&pending.xs)?);
        }
        Ok(())
    }

    /// Finishes the pending MoE layer with the routed output `[n_tokens, hidden]`:
    /// `hidden = residual + (routed + sigmoid(g·x) · shared_expert(x))`, the order of
    /// HF `Qwen2MoeSparseMoeBlock.forward` (routed sum plus gated shared expert).
    pub fn complete_moe(&self, pass: &mut ForwardPass, routed: &Tensor) -> Result<()> {
        let PendingMoe {
            residual,
            xs,
            shared,
        } = pass.pending.take().ok_or_else(|| {
            ModelError::InvalidInput("complete_moe without a pending MoE layer".into())
        })?;
        if routed.dims() != xs.dims() {
            return Err(ModelError::InvalidInput(format!(
                "routed output {:?}, expected {:?}",
                routed.dims(),
                xs.dims()
            )));
        }
        let Ffn::Moe(moe) = &self.layers[pass.layer].ffn else {
            return Err(ModelError::InvalidInput("pending layer is not MoE".into()));
        };
        let shared = match shared {
            Some(s) => s,
            None => moe.shared(&xs)?,
        };
        let routed = routed.to_dtype(self.dtype)?;
        pass.hidden = (residual + (routed + shared)?)?;
        pass.layer += 1;
        Ok(())
    }

    /// Pre-gating: the routed experts that the next `ahead` MoE layers after the pending one
    /// will probably choose, predicted from the pending layer's residual stream
    /// `[n_tokens, hidden]` (before its MLP): for each later MoE layer `j`, layer `j`'s
    /// post-attention RMSNorm and router applied to it, top-k per row, the union over rows.
    /// The attention and MLPs in between are skipped, so this is a guess (the residual
    /// stream changes little from one layer to the next; Pre-gated MoE, ISCA 2024, and
    /// MoE-Infinity's prefetching rest on the same observation): use it only to start
    /// functions early, never to route. At most `max_rows` rows are evaluated (evenly
    /// spaced, so a long prefill costs no more than a decode step of `max_rows` sequences).
    ///
    /// Returns `(decoder layer, experts ascending)` per predicted MoE layer, nearest first;
    /// empty when no MoE layer follows. Errors: no pending MoE layer.
    pub fn predict_experts(
        &self,
        pass: &ForwardPass,
        ahead: usize,
        max_rows: usize,
    ) -> Result<Vec<(usize, Vec<u32>)>> {
        let pending = pass.pending.as_ref().ok_or_else(|| {
            ModelError::InvalidInput("predict_experts without a pending MoE layer".into())
        })?;
        let n = pending.residual.dim(0)?;
        let rows = if n > max_rows.max(1) {
            let k = max_rows.max(1);
            let idx: Vec<u32> = (0..k).map(|i| (i * n / k) as u32).collect();
            pending
                .residual
                .index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, 0)?
        } else {
            pending.residual.clone()
        };
        let mut out = Vec::new();
        for j in pass.layer + 1..self.layers.len() {
            if out.len() >= ahead {
                break;
            }
            let layer = &self.layers[j];
            if let Ffn::Moe(moe) = &layer.ffn {
                let xs = layer.post_attention_layernorm.forward(&rows)?;
                let mut experts: Vec<u32> = moe
                    .route(&xs)?
                    .into_iter()
                    .flatten()
                    .map(|(e, _)| e as u32)
                    .collect();
                experts.sort_unstable();
                experts.dedup();
                out.push((j, experts));
            }
        }
        Ok(out)
    }

    /// LM head on final-normed rows `[n, hidden]` → logits `[n, vocab]` (f32).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// A whole pass with a synchronous expert backend; returns final-normed hidden states
    /// `[n_tokens, hidden]` of all new rows (use [`ForwardPass::last_rows`] via `start` to pick).
    pub fn forward(
        &self,
        batch: &[(usize, &[u32])],
        caches: &mut [&mut KvCache],
        backend: &mut dyn ExpertBackend,
    ) -> Result<(ForwardPass, Tensor)> {
        let mut pass = self.start(batch)?;
        loop {
            match self.advance(&mut pass, caches)? {
                Step::Experts(b) => {
                    let routed = backend.routed(&b)?;
                    self.complete_moe(&mut pass, &routed)?;
                }
                Step::Done(h) => return Ok((pass, h)),
            }
        }
    }
}

/// Index of the largest value in `row` (first on ties, as torch.argmax).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The logits at the last row of each sequence in `pass`: `[n_seqs, vocab]` f32.
pub fn last_logits(cp: &ControlPlane, pass: &ForwardPass, hidden: &Tensor) -> Result<Tensor> {
    let rows: Vec<u32> = pass.last_rows().into_iter().map(|r| r as u32).collect();
    let idx = Tensor::new(rows.as_slice(), hidden.device())?;
    cp.logits(&hidden.index_select(&idx, 0)?)
}
