//! The full-model baseline: candle-transformers' monolithic `qwen2_moe::Model`, every weight
//! resident in one process (the paper's baseline).
//!
//! candle-transformers' implementation does not read `mlp_only_layers` nor
//! `qkv_bias: false`; [`Baseline::load`] refuses such checkpoints rather than compute
//! something else.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen2_moe;

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::config::Config;
use crate::error::{ModelError, Result};

/// A monolithic Qwen2-MoE with its own (single-sequence) KV cache.
pub struct Baseline {
    model: qwen2_moe::Model,
    config: Config,
    seq_len: usize,
}

fn safetensors_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    if dir.join(INDEX_FILE).exists() {
        let mut files: Vec<_> = crate::checkpoint::index_weight_map(dir)?
            .into_values()
            .collect();
        files.sort();
        files.dedup();
        Ok(files)
    } else {
        Ok(vec![dir.join(SINGLE_FILE)])
    }
}

impl Baseline {
    /// Loads the whole checkpoint in `dtype` through candle's mmap VarBuilder (dropped after
    /// load so only the converted weights stay resident).
    pub fn load(dir: &Path, dtype: DType) -> Result<Self> {
        let config = Config::from_dir(dir)?;
        if !config.mlp_only_layers.is_empty() {
            return Err(ModelError::config(
                "mlp_only_layers",
                "not supported by candle-transformers' qwen2_moe baseline",
            ));
        }
        if !config.qkv_bias {
            return Err(ModelError::config(
                "qkv_bias",
                "false is not supported by candle-transformers' qwen2_moe baseline",
            ));
        }
        let files = safetensors_files(dir)?;
        // SAFETY: read-only checkpoint files, as in candle's own examples.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, &Device::Cpu)? };
        let model = qwen2_moe::Model::new(&config.to_candle_transformers(), vb)?;
        Ok(Self {
            model,
            config,
            seq_len: 0,
        })
    }

    /// The checkpoint config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Feeds `tokens` (appended to the cached sequence); returns the logits of the last
    /// token, `[vocab]` f32.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Tensor> {
        self.config.check_token_ids(tokens)?;
        let ids = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        let logits = self.model.forward(&ids, self.seq_len)?;
        self.seq_len += tokens.len();
        Ok(logits.squeeze(0)?.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// Feeds the same number of tokens to each of `batch.len()` sequences that share the
    /// cache position (a `[batch, t]` input: candle's cache holds one batch of equal-length
    /// sequences); returns the logits of each sequence's last token, `[batch, vocab]` f32.
    ///
    /// Errors: an empty batch, sequences of different lengths, or a token past the
    /// vocabulary.
    pub fn forward_batch(&mut self, batch: &[&[u32]]) -> Result<Tensor> {
        let t = batch.first().map_or(0, |s| s.len());
        if t == 0 || batch.iter().any(|s| s.len() != t) {
            return Err(ModelError::InvalidInput(format!(
                "a baseline batch needs sequences of one non-zero length, got lengths {:?}",
                batch.iter().map(|s| s.len()).collect::<Vec<_>>()
            )));
        }
        let flat: Vec<u32> = batch.iter().flat_map(|s| s.iter().copied()).collect();
        if let Some(&tok) = flat.iter().find(|&&x| x as usize >= self.config.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                token: tok,
                vocab_size: self.config.vocab_size,
            });
        }
        let ids = Tensor::from_vec(flat, (batch.len(), t), &Device::Cpu)?;
        let logits = self.model.forward(&ids, self.seq_len)?;
        self.seq_len += t;
        Ok(logits.squeeze(1)?.to_dtype(DType::F32)?)
    }

    /// Tokens in the cache (per sequence).
    pub fn cached_len(&self) -> usize {
        self.seq_len
    }

    /// Clears the KV cache for a new sequence.
    pub fn reset(&mut self) {
        self.model.clear_kv_cache();
        self.seq_len = 0;
    }

    /// Greedy-decodes `max_new` tokens after `prompt` (resets the cache first).
    pub fn greedy(&mut self, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
        self.reset();
        let mut out = Vec::with_capacity(max_new);
        let mut logits = self.forward(prompt)?;
        for _ in 0..max_new {
            let t = crate::control_plane::argmax(&logits.to_vec1::<f32>()?);
            out.push(t);
            logits = self.forward(&[t])?;
        }
        Ok(out)
    }
}
