//! `config.json` of `Qwen2MoeForCausalLM`, in both forms found in the wild.
//!
//! - the published hub form (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): `rope_theta`, `torch_dtype`,
//!   `sliding_window`, `max_window_layers`;
//! - the transformers-5 form: `rope_parameters: {rope_theta, rope_type}`, `dtype`,
//!   `layer_types`, `sliding_window: 0`, `qkv_bias`.
//!
//! Field meanings and defaults follow transformers' `Qwen2MoeConfig`
//! (`src/transformers/models/qwen2_moe/configuration_qwen2_moe.py`). Validation lives here,
//! in one place: a missing field, a wrong value or inconsistent sizes is a
//! [`ModelError::Config`] that names the field.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The architecture string of `config.json`'s `architectures`.
pub const ARCHITECTURE: &str = "Qwen2MoeForCausalLM";
/// The `model_type` of `config.json`.
pub const MODEL_TYPE: &str = "qwen2_moe";

/// A validated Qwen2-MoE configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size (rows of `embed_tokens` and `lm_head`).
    pub vocab_size: usize,
    /// Hidden size `h`: the width of every hidden state row.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width: `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Intermediate size of dense MLP layers.
    pub intermediate_size: usize,
    /// Intermediate size of each routed expert.
    pub moe_intermediate_size: usize,
    /// Intermediate size of the shared expert (0: no shared expert).
    pub shared_expert_intermediate_size: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts selected per token (top-k).
    pub num_experts_per_tok: usize,
    /// Renormalise the top-k routing weights to sum to 1.
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is MoE (`(layer + 1) % step == 0`).
    pub decoder_sparse_step: usize,
    /// Layers that are dense MLPs even where the sparse step says MoE.
    pub mlp_only_layers: Vec<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// Context length (positions the RoPE table covers).
    pub max_position_embeddings: usize,
    /// Sliding-window attention width in tokens, where enabled.
    pub sliding_window: Option<usize>,
    /// Layers from this index on use the sliding window (hub form's `max_window_layers`).
    pub max_window_layers: usize,
    /// q/k/v projections carry a bias.
    pub qkv_bias: bool,
    /// `lm_head` shares `embed_tokens`' weight.
    pub tie_word_embeddings: bool,
    /// Stored dtype named by `torch_dtype`/`dtype` (informational).
    pub torch_dtype: Option<String>,
    /// BOS token id, if any.
    pub bos_token_id: Option<u32>,
    /// EOS token ids (may be empty).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// The raw JSON, every field optional so that a missing one gets an error naming it.
#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    qkv_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

fn required(v: Option<usize>, field: &str) -> Result<usize> {
    match v {
        None => Err(ModelError::config(field, "missing")),
        Some(0) => Err(ModelError::config(field, "must be at least 1")),
        Some(v) => Ok(v),
    }
}

impl Config {
    /// Checks that every id of `tokens` is below `vocab_size`.
    ///
    /// Errors: [`ModelError::TokenOutOfRange`] naming the first id that is not.
    pub fn check_token_ids(&self, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            Some(&token) => Err(ModelError::TokenOutOfRange {
                token,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// Reads and validates `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and validates a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| ModelError::config("(json)", e.to_string()))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self> {
        match raw.model_type.as_deref() {
            Some(MODEL_TYPE) => {}
            Some(other) => {
                return Err(ModelError::UnsupportedArchitecture(format!(
                    "model_type `{other}`"
                )))
            }
            None => return Err(ModelError::config("model_type", "missing")),
        }
        if let Some(archs) = &raw.architectures {
            if let Some(a) = archs.iter().find(|a| a.as_str() != ARCHITECTURE) {
                return Err(ModelError::UnsupportedArchitecture(format!(
                    "architecture `{a}`"
                )));
            }
        }
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ModelError::config(
                    "hidden_act",
                    format!("`{act}` is not supported (silu)"),
                ));
            }
        }
        if let Some(s) = &raw.rope_scaling {
            if !s.is_null() {
                return Err(ModelError::config(
                    "rope_scaling",
                    "RoPE scaling is not supported",
                ));
            }
        }
        let rope_theta = match (&raw.rope_parameters, raw.rope_theta) {
            (Some(p), _) => {
                if let Some(t) = p.rope_type.as_deref() {
                    if t != "default" {
                        return Err(ModelError::config(
                            "rope_parameters.rope_type",
                            format!("`{t}` is not supported (default)"),
                        ));
                    }
                }
                p.rope_theta
                    .or(raw.rope_theta)
                    .ok_or_else(|| ModelError::config("rope_parameters.rope_theta", "missing"))?
            }
            (None, Some(t)) => t,
            // transformers' Qwen2MoeConfig default
            (None, None) => 10000.0,
        };
        if rope_theta.is_nan() || rope_theta <= 0.0 {
            return Err(ModelError::config("rope_theta", "must be positive"));
        }

        let vocab_size = required(raw.vocab_size, "vocab_size")?;
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let num_hidden_layers = required(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = required(
            raw.num_key_value_heads.or(Some(num_attention_heads)),
            "num_key_value_heads",
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::config("num_key_value_heads", format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}")));
        }
        let head_dim = match raw.head_dim {
            Some(d) if d * num_attention_heads != hidden_size => {
                return Err(ModelError::config(
                    "head_dim",
                    format!("{d} × {num_attention_heads} heads != hidden_size {hidden_size}"),
                ));
            }
            _ => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(ModelError::config(
                        "num_attention_heads",
                        format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::config(
                "hidden_size",
                format!("head dim {head_dim} must be even for RoPE"),
            ));
        }
        let num_experts = raw
            .num_experts
            .ok_or_else(|| ModelError::config("num_experts", "missing"))?;
        let num_experts_per_tok = required(raw.num_experts_per_tok, "num_experts_per_tok")?;
        if num_experts > 0 && num_experts_per_tok > num_experts {
            return Err(ModelError::config(
                "num_experts_per_tok",
                format!("{num_experts_per_tok} > num_experts {num_experts}"),
            ));
        }
        let decoder_sparse_step =
            required(raw.decoder_sparse_step.or(Some(1)), "decoder_sparse_step")?;
        let mlp_only_layers = raw.mlp_only_layers.unwrap_or_default();
        if let Some(&l) = mlp_only_layers.iter().find(|&&l| l >= num_hidden_layers) {
            return Err(ModelError::config(
                "mlp_only_layers",
                format!("layer {l} >= num_hidden_layers {num_hidden_layers}"),
            ));
        }
        let max_position_embeddings =
            required(raw.max_position_embeddings, "max_position_embeddings")?;
        let rms_norm_eps = raw
            .rms_norm_eps
            .ok_or_else(|| ModelError::config("rms_norm_eps", "missing"))?;
        if let Some(types) = &raw.layer_types {
            if types.len() != num_hidden_layers {
                return Err(ModelError::config(
                    "layer_types",
                    format!("{} entries for {num_hidden_layers} layers", types.len()),
                ));
            }
        }
        // Sliding window: on only where `use_sliding_window` is true and the window is non-zero
        // (transformers-5 writes `sliding_window: 0` and `layer_types` of `full_attention`).
        let sliding_window = match (raw.use_sliding_window.unwrap_or(false), raw.sliding_window) {
            (true, Some(w)) if w > 0 => Some(w),
            _ => None,
        };
        let mut cfg = Config {
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size: raw.intermediate_size.unwrap_or(0),
            moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(0),
            shared_expert_intermediate_size: raw.shared_expert_intermediate_size.unwrap_or(0),
            num_experts,
            num_experts_per_tok,
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
            decoder_sparse_step,
            mlp_only_layers,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            sliding_window,
            max_window_layers: raw.max_window_layers.unwrap_or(num_hidden_layers),
            qkv_bias: raw.qkv_bias.unwrap_or(true),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            torch_dtype: raw.dtype.or(raw.torch_dtype),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(t)) => vec![t],
                Some(OneOrMany::Many(v)) => v,
            },
        };
        if cfg.moe_layers().next().is_some() && cfg.moe_intermediate_size == 0 {
            return Err(ModelError::config(
                "moe_intermediate_size",
                "missing or 0 with MoE layers present",
            ));
        }
        if cfg.dense_layers().next().is_some() && cfg.intermediate_size == 0 {
            return Err(ModelError::config(
                "intermediate_size",
                "missing or 0 with dense layers present",
            ));
        }
        cfg.eos_token_ids.dedup();
        Ok(cfg)
    }

    /// Whether decoder layer `layer` is a sparse MoE block (else a dense MLP), as in
    /// transformers' `Qwen2MoeDecoderLayer.__init__`.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// Indices of the MoE layers, ascending.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_hidden_layers).filter(|&l| self.is_moe_layer(l))
    }

    /// Indices of the dense-MLP layers, ascending.
    pub fn dense_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_hidden_layers).filter(|&l| !self.is_moe_layer(l))
    }

    /// The sliding window for `layer`, if that layer uses one.
    pub fn sliding_window_for(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| layer >= self.max_window_layers)
    }

    /// The config in candle-transformers' `qwen2_moe::Config` form, for the full-model baseline.
    pub fn to_candle_transformers(&self) -> candle_transformers::models::qwen2_moe::Config {
        candle_transformers::models::qwen2_moe::Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: self.sliding_window.unwrap_or(self.max_position_embeddings),
            max_window_layers: self.max_window_layers,
            tie_word_embeddings: self.tie_word_embeddings,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            use_sliding_window: self.sliding_window.is_some(),
            hidden_act: candle_nn::Activation::Silu,
            decoder_sparse_step: self.decoder_sparse_step,
            moe_intermediate_size: self.moe_intermediate_size,
            shared_expert_intermediate_size: self.shared_expert_intermediate_size,
            num_experts_per_tok: self.num_experts_per_tok,
            num_experts: self.num_experts,
            norm_topk_prob: self.norm_topk_prob,
        }
    }
}

/// `generation_config.json`: the EOS ids and sampling defaults a checkpoint ships.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationConfig {
    #[serde(default, deserialize_with = "de_ids")]
    pub eos_token_id: Vec<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub repetition_penalty: Option<f32>,
    pub do_sample: Option<bool>,
}

fn de_ids<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => vec![],
        Some(OneOrMany::One(t)) => vec![t],
        Some(OneOrMany::Many(v)) => v,
    })
}

impl GenerationConfig {
    /// Reads `<dir>/generation_config.json`; absent file: defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| ModelError::config("generation_config.json", e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ModelError::Io { path, source }),
        }
    }
}

/// The EOS ids generation stops at: `generation_config.json`'s, else `config.json`'s.
pub fn eos_token_ids(cfg: &Config, gen: &GenerationConfig) -> Vec<u32> {
    if gen.eos_token_id.is_empty() {
        cfg.eos_token_ids.clone()
    } else {
        gen.eos_token_id.clone()
    }
}
