//! Expert dispatch: the routed part of each MoE layer, sent to the expert functions.
//!
//! For one [`RoutedBatch`] the NATS dispatcher groups the rows by function (the deployment
//! [`Layout`]), packs each function's rows into one request (every row once, with its
//! experts in that function and their routing weights; `combine: true`, so the function
//! returns the weighted sum per row), sends all requests concurrently, and sums the partial
//! outputs. Bytes on the wire grow with the functions a token touches, not with top-k.
//!
//! Failure handling per request: a timeout or an error reply from a broken instance is
//! retried (the queue group picks an instance again); *no responders* means the function is
//! scaled to zero: ask the broker to activate it (cold start), bounded by the activation
//! timeout, then retry. A transient `unavailable` from the broker (function at its cap, a
//! start that failed, no broker answering yet) is retried with exponential backoff, a few
//! times, within the same activation timeout. *No responders* again after the broker said an
//! instance serves (it is draining without having said so yet, or resubscribing after a
//! reconnect) asks the broker again after a backoff, until the activation timeout.
//!
//! Connection outages: when the NATS connection comes back after being lost (nats-server
//! restarted, network cut), every expert and activation request still waiting for a reply
//! is sent again at once instead of waiting out its timeout — its request or its reply may
//! have died with the old connection. Each send has its own reply inbox, so a late reply to
//! the superseded send is dropped and the requests stay correct; a resend keeps the
//! deadline of the attempt it replaces, so no request waits past its own timeout. Outages
//! are logged with their duration.
//!
//! Activation ahead of the pass (pre-gating): at each MoE layer the engine asks
//! [`Dispatch::prefetch_depth`] how many later MoE layers to predict, applies their routers
//! to the current residual stream ([`faasmoe_model::ControlPlane::predict_experts`]) and
//! hands the predicted experts to [`Dispatch::prefetch`]. The NATS dispatcher activates, in
//! the background, the predicted functions that have not answered within
//! [`WARM_FRESH`], at most [`NatsDispatchSettings::prefetch_max_in_flight`] at once (the
//! others wait in a queue, in the order predicted, and start as slots free up), so the
//! cold starts of later layers overlap the pass instead of following one another. When the
//! model is cold (nothing answered yet, or *no responders* within [`COLD_WINDOW`]) it asks
//! for every remaining layer at once; otherwise for
//! [`NatsDispatchSettings::prefetch_layers`]. Predictions never route: the real router
//! still decides, and a wrong guess costs one activation (an instance that idles out).

use candle_core::Tensor;
use faasmoe_model::control_plane::ExpertBackend;
use faasmoe_model::{InProcessBackend, RoutedBatch};
use futures::future::BoxFuture;

mod error;
mod nats;

pub use error::DispatchError;
pub use nats::{NatsDispatch, NatsDispatchSettings, COLD_WINDOW, WARM_FRESH};

/// Who the rows belong to. The trace the expert requests continue is not here: it is the
/// caller's current `tracing` span (the engine step's), whose W3C `traceparent` the NATS
/// dispatcher puts in each request's headers.
#[derive(Debug, Clone, Default)]
pub struct DispatchContext {
    /// Tenants whose rows are in the batch, sorted, comma separated (e.g. `"t1,t2"`); sent
    /// as [`ExpertRequest::tenant`] for the functions' accounting and logs.
    pub tenants: String,
}

/// Computes the routed experts of a layer: `[n, hidden]` weighted sums.
///
/// **First-poll contract.** The engine overlaps the shared expert with the routed experts
/// (`engine::forward_batch`): it polls the future of [`Dispatch::routed`] once, and only if
/// that returns `Pending` computes the shared expert before awaiting it. An implementation
/// that computes remotely must therefore have handed every request of the batch to its
/// transport by the end of that first poll, or the remote work waits for the shared expert:
/// the NATS dispatcher polls all its calls together (`join_all`), and each queues its
/// request on the client's command channel in that poll (unless the channel is full, which
/// only delays it). One that computes in-process should finish in the first poll (return a
/// ready future), so that the two are not computed one after the other on the same cores.
pub trait Dispatch: Send + Sync {
    /// Returns row `i` = `Σ w · expert_e(hidden[i])` over `batch.routes[i]`.
    fn routed<'a>(
        &'a self,
        batch: &'a RoutedBatch,
        ctx: &'a DispatchContext,
    ) -> BoxFuture<'a, Result<Tensor, DispatchError>>;
    /// Counters so far.
    fn stats(&self) -> DispatchStats {
        DispatchStats::default()
    }
    /// How many MoE layers after the current one the engine should predict and pass to
    /// [`Dispatch::prefetch`]: 0 (the default) for none, `usize::MAX` for all.
    fn prefetch_depth(&self) -> usize {
        0
    }
    /// A hint that these experts, `(decoder layer, experts)`, will probably be routed to
    /// soon: a dispatcher may start their functions early. Returns at once; never fails
    /// (a wrong hint costs at most an unneeded activation). The default ignores it.
    fn prefetch(&self, _predicted: &[(usize, Vec<u32>)]) {}
}

pub use faasmoe_proto::stats::DispatchStats;

/// All experts in this process (the local-split mode, and tests).
pub struct LocalDispatch(pub InProcessBackend);

impl Dispatch for LocalDispatch {
    fn routed<'a>(
        &'a self,
        batch: &'a RoutedBatch,
        _ctx: &'a DispatchContext,
    ) -> BoxFuture<'a, Result<Tensor, DispatchError>> {
        let mut b = self.0.clone();
        let r = b.routed(batch).map_err(DispatchError::from);
        Box::pin(async move { r })
    }
}
