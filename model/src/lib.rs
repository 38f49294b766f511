//! Qwen2-MoE on candle, cut at the routed experts.
//!
//! One definition of the model math, used by the controller (the control plane) and by the
//! expert workers (the routed experts):
//!
//! - [`config`]: `config.json` in hub and transformers-5 forms, validated in one place;
//! - [`checkpoint`]: safetensors loading (single or sharded, memory-mapped), tensor by tensor;
//! - [`kv_cache`]: the per-sequence KV cache (preallocated, grown by doubling) and the
//!   attention that reads it in place (GQA without repeated heads);
//! - [`control_plane`]: the control plane (attention with per-sequence KV caches, router, shared
//!   expert, dense layers, LM head) that stops at each MoE layer and hands the routed part to
//!   an [`ExpertBackend`];
//! - [`kernel`]: the one matmul kernel, `y = x · Wᵀ` with W in its stored dtype (bf16, f16,
//!   f32) and f32 math, AVX-512 / AVX2 / portable, on every core, in a fixed summation order;
//! - [`linear`]: the seam to the kernel: weights resident in their stored dtype, [`Linear`]
//!   projections and the token [`Embedding`];
//! - [`experts`]: the expert function: any subset of routed experts, SwiGLU over row batches;
//! - [`backend`]: the in-process expert backend (all experts resident);
//! - [`baseline`]: candle-transformers' monolithic `qwen2_moe` as the full-model reference;
//! - [`greedy`]: greedy decoding over a batch (tests, local-split, baselines);
//! - [`random_checkpoint`]: random-weight checkpoints in the exact hub layout.
//!
//! It does not know about NATS, tenants, tokenizers or sampling: those live in `proto`,
//! `controller` and `expert-worker`.

mod attention;
pub mod backend;
pub mod baseline;
pub mod checkpoint;
pub mod config;
pub mod control_plane;
pub mod error;
pub mod experts;
pub mod fixtures;
pub mod greedy;
pub mod kernel;
pub mod kv_cache;
pub mod linear;
pub mod random_checkpoint;

pub use backend::InProcessBackend;
pub use checkpoint::Checkpoint;
pub use config::{Config, GenerationConfig};
pub use control_plane::{ControlPlane, ExpertBackend, ForwardPass, KvCache, RoutedBatch, Step};
pub use error::{ModelError, Result};
pub use experts::{ExpertId, ExpertSelection, ExpertSet, RowRoutes};
pub use linear::{Embedding, Linear, Weight};

/// Loads the control plane and all routed experts in-process (the local-split mode).
pub fn load_local(
    dir: &std::path::Path,
    dtype: candle_core::DType,
) -> Result<(ControlPlane, InProcessBackend)> {
    let mut ckpt = Checkpoint::open(dir, dtype)?;
    let cp = ControlPlane::load(&mut ckpt)?;
    let moe: Vec<usize> = cp.config().moe_layers().collect();
    let sel = ExpertSelection::whole_layers(&moe, cp.config().num_experts);
    let experts = ExpertSet::load(&mut ckpt, &sel)?;
    Ok((cp, InProcessBackend::new(std::sync::Arc::new(experts))))
}
