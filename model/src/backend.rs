//! The in-process expert backend: all routed experts resident (the local-split mode).

use std::sync::Arc;

use candle_core::Tensor;

use crate::control_plane::{ExpertBackend, RoutedBatch};
use crate::error::Result;
use crate::experts::ExpertSet;

/// Computes routed experts in this process from an [`ExpertSet`].
#[derive(Debug, Clone)]
pub struct InProcessBackend {
    experts: Arc<ExpertSet>,
}

impl InProcessBackend {
    /// Wraps an expert set (usually every expert of every MoE layer).
    pub fn new(experts: Arc<ExpertSet>) -> Self {
        Self { experts }
    }

    /// The experts held.
    pub fn experts(&self) -> &ExpertSet {
        &self.experts
    }
}

impl ExpertBackend for InProcessBackend {
    fn routed(&mut self, batch: &RoutedBatch) -> Result<Tensor> {
        self.experts
            .forward_routed(batch.layer, &batch.hidden, &batch.routes)
    }
}
