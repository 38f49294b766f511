//! [`ActivationConfig`]: the policy of one model's activations (caps, waits, probes).

use super::*;

/// Policy of one model's activations.
#[derive(Debug, Clone)]
pub struct ActivationConfig {
    /// Model id (subject token).
    pub model_id: String,
    /// The functions that may be activated.
    pub layout: Layout,
    /// Most instances alive per function (starting, ready or draining).
    pub max_instances_per_function: u32,
    /// Instances per function started by [`Activator::prewarm`].
    pub min_instances: u32,
    /// Spawn → ready limit; an instance not ready by then is killed and the activation fails
    /// with `unavailable`.
    pub ready_timeout: Duration,
    /// Before answering `already_running`, the broker pings the ready instance's micro
    /// service (`$SRV.PING.faasmoe-expert.<id>`, answered by the worker independently of
    /// its batching; the first time, the broadcast `$SRV.PING.faasmoe-expert` finds the id).
    /// *No responders* (or no answer to the broadcast within this long) means the instance is
    /// not connected now; an unanswered direct ping means connected but slow. The ping does
    /// not touch the worker's idle timer. `None`: the records alone decide.
    pub probe_timeout: Option<Duration>,
    /// Longest time an activation that finds the function at its instance cap (with no
    /// instance subscribed) waits for one — a draining instance to exit so a new one can
    /// start, or an instance to resubscribe — before replying `unavailable`. Also bounded
    /// by the request's [`ActivateRequest::wait_ms`].
    pub cap_wait: Duration,
}

impl ActivationConfig {
    /// Defaults: cap 1, no pre-warming, ready timeout 60 s, probe timeout 1 s, cap wait 60 s.
    pub fn new(model_id: impl Into<String>, layout: Layout) -> Self {
        Self {
            model_id: model_id.into(),
            layout,
            max_instances_per_function: 1,
            min_instances: 0,
            ready_timeout: Duration::from_secs(60),
            probe_timeout: Some(Duration::from_secs(1)),
            cap_wait: Duration::from_secs(60),
        }
    }
}
