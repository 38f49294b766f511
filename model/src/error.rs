//! The model crate's error type: every failure names the field, tensor or file at fault.

use std::path::PathBuf;

/// Errors from loading a checkpoint or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` is missing a field, has a wrong value or inconsistent sizes.
    #[error("config.json: field `{field}`: {message}")]
    Config { field: String, message: String },
    /// The checkpoint is not a Qwen2-MoE (`model_type` / `architectures`).
    #[error("unsupported architecture: {0} (faasmoe serves `qwen2_moe` / Qwen2MoeForCausalLM)")]
    UnsupportedArchitecture(String),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is malformed or truncated.
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// `model.safetensors.index.json` is malformed.
    #[error("{path}: invalid shard index: {message}")]
    Index { path: PathBuf, message: String },
    /// A tensor the model needs is in no file of the checkpoint.
    #[error("missing tensor `{name}` in checkpoint {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    /// A tensor has another shape than the config implies.
    #[error("tensor `{name}` in {path}: expected shape {expected:?}, found {actual:?}")]
    WrongShape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// A tensor is stored in a dtype the loader does not read (bf16, f16, f32 are read).
    #[error("tensor `{name}` in {path}: unsupported stored dtype {dtype}")]
    UnsupportedDType {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {token} is out of range for a vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    /// A sequence would grow past `max_position_embeddings`.
    #[error("sequence of {len} tokens exceeds the context length of {max}")]
    ContextOverflow { len: usize, max: usize },
    /// An expert that this expert set does not hold was asked for.
    #[error("expert {expert} of layer {layer} is not held here")]
    UnknownExpert { layer: usize, expert: usize },
    /// A caller passed inputs of the wrong shape or an inconsistent batch.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The expert backend failed (remote experts: timeouts, errors from a function).
    #[error("expert backend: {0}")]
    Backend(String),
    /// The matmul kernel refused a setting or a shape.
    #[error("kernel: {0}")]
    Kernel(#[from] crate::kernel::KernelError),
    /// An error inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn config(field: &str, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.to_string(),
            message: message.into(),
        }
    }
}
