//! Activation of expert functions by the broker: on *no responders* (cold start) and ahead
//! of the pass (pre-gating predictions).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::RequestErrorKind;
use faasmoe_proto::activation::{ActivateReply, ActivateRequest, ActivateResult};
use faasmoe_proto::{subject, ErrorCode, PROTOCOL_VERSION};
use tracing::{debug, info, warn};

use super::{
    NatsDispatch, ACTIVATION_ATTEMPTS, ACTIVATION_BACKOFF_MAX, ACTIVATION_BACKOFF_MIN,
    ACTIVATION_REPLY_WAIT, COLD_WINDOW, WARM_FRESH,
};
use crate::dispatch::DispatchError;

impl NatsDispatch {
    /// Asks the broker to activate function `fidx` and waits until an instance serves.
    /// Transient failures (`unavailable` from the broker, no broker answering, a lost
    /// connection) are retried up to [`ACTIVATION_ATTEMPTS`] times with exponential backoff
    /// from [`ACTIVATION_BACKOFF_MIN`]; everything before `deadline`. A request that gets no
    /// reply within [`ACTIVATION_REPLY_WAIT`] is sent again (not counted as an attempt).
    ///
    /// Errors: [`DispatchError::ActivationFailed`] when no instance serves in time,
    /// [`DispatchError::ActivationRefused`] when the broker refuses,
    /// [`DispatchError::MalformedReply`] for an undecodable reply.
    pub(super) async fn activate(
        &self,
        fidx: usize,
        deadline: Instant,
    ) -> Result<(), DispatchError> {
        let f = &self.settings.layout.functions[fidx];
        let subj = subject::activate(&self.settings.model_id)?;
        let t0 = Instant::now();
        let mut backoff = ACTIVATION_BACKOFF_MIN;
        let mut attempt = 0;
        let mut asks = 0u32;
        let mut again = false;
        loop {
            if !std::mem::take(&mut again) {
                attempt += 1;
                self.activations.fetch_add(1, Ordering::Relaxed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let req = ActivateRequest {
                version: PROTOCOL_VERSION,
                model: self.settings.model_id.clone(),
                function_id: f.id.clone(),
                layer: f.layer,
                experts: f.experts.clone(),
                requested_by: self.settings.controller_id.clone(),
                wait_ms: Some(left.as_millis() as u64),
            };
            asks += 1;
            let wait = left.min(ACTIVATION_REPLY_WAIT);
            let transient = match self.request(&subj, &req.encode(), None, wait).await {
                Err(e) if e.kind() == RequestErrorKind::TimedOut && wait < left => {
                    // No reply yet: the start may still be running, or the reply was lost
                    // (see ACTIVATION_REPLY_WAIT). Ask again; this is not a failed attempt.
                    debug!(function = %f.id, asks, waited_ms = t0.elapsed().as_millis() as u64, "no activation reply yet; asking again");
                    again = true;
                    continue;
                }
                Err(e) if e.kind() == RequestErrorKind::TimedOut => {
                    return Err(DispatchError::ActivationFailed {
                        function: f.id.clone(),
                        attempts: attempt,
                        waited_ms: t0.elapsed().as_millis() as u64,
                        last: "timed out".into(),
                    })
                }
                Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                    format!("nobody answers on {subj} (is the broker running?)")
                }
                Err(e) => e.to_string(),
                Ok(msg) => match ActivateReply::decode(&msg.payload)
                    .map_err(|source| DispatchError::MalformedReply {
                        from: format!("the broker (activation of {})", f.id),
                        source,
                    })?
                    .result
                {
                    ActivateResult::Ok {
                        instance_id,
                        cold_start_ms,
                        already_running,
                    } => {
                        info!(function = %f.id, %instance_id, cold_start_ms, already_running, attempt, asks, wait_ms = t0.elapsed().as_secs_f64() * 1e3, "function activated");
                        return Ok(());
                    }
                    ActivateResult::Err(e) if e.code == ErrorCode::Unavailable => {
                        format!("{}: {}", e.code, e.message)
                    }
                    ActivateResult::Err(source) => {
                        return Err(DispatchError::ActivationRefused {
                            function: f.id.clone(),
                            source,
                        })
                    }
                },
            };
            if attempt >= ACTIVATION_ATTEMPTS || Instant::now() + backoff >= deadline {
                return Err(DispatchError::ActivationFailed {
                    function: f.id.clone(),
                    attempts: attempt,
                    waited_ms: t0.elapsed().as_millis() as u64,
                    last: transient,
                });
            }
            warn!(function = %f.id, reason = %transient, attempt, backoff_ms = backoff.as_millis() as u64, "activation failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(ACTIVATION_BACKOFF_MAX);
        }
    }

    /// 1 + ms since `epoch` (0 is kept for "never").
    pub(super) fn stamp(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether function `fidx` answered within `within`.
    pub(super) fn answered_within(&self, fidx: usize, within: Duration) -> bool {
        let t = self.last_ok[fidx].load(Ordering::Relaxed);
        t != 0 && self.stamp().saturating_sub(t) <= within.as_millis() as u64
    }

    /// Starts a background activation of function `fidx` from a prediction, unless it
    /// answered recently or one is already running or queued for it. While
    /// `prefetch_max_in_flight` are running, it is queued and started as soon as one of them
    /// ends (before, a prediction over the budget was dropped, so a cold model's functions
    /// started in waves, one per MoE layer the pass reached); a queued prediction older than
    /// [`COLD_WINDOW`] by its turn is dropped. A budget of 0 turns activation ahead off.
    pub(super) fn prefetch_function(&self, fidx: usize) {
        if self.settings.prefetch_max_in_flight == 0 || self.answered_within(fidx, WARM_FRESH) {
            return;
        }
        if self.prefetching[fidx].swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            self.prefetching[fidx].store(false, Ordering::Release);
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.prefetching[fidx].store(false, Ordering::Release);
            return;
        };
        {
            let mut slots = self.prefetch_slots.lock().unwrap();
            if slots.in_flight >= self.settings.prefetch_max_in_flight {
                slots.queue.push_back((fidx, Instant::now()));
                self.prefetch_queued.fetch_add(1, Ordering::Relaxed);
                return;
            }
            slots.in_flight += 1;
        }
        rt.spawn(async move {
            let mut next = Some(fidx);
            while let Some(fidx) = next {
                me.prefetches.fetch_add(1, Ordering::Relaxed);
                me.prefetched[fidx].store(me.stamp(), Ordering::Relaxed);
                debug!(function = %me.settings.layout.functions[fidx].id, "activating ahead of the pass");
                let deadline = Instant::now() + me.settings.activation_timeout;
                if let Err(e) = me.activate(fidx, deadline).await {
                    debug!(function = %me.settings.layout.functions[fidx].id, error = %e, "activation ahead of the pass failed (the pass will ask again)");
                }
                me.prefetching[fidx].store(false, Ordering::Release);
                next = me.next_queued_prefetch();
            }
        });
    }

    /// The next queued prediction that is neither warm nor older than [`COLD_WINDOW`] by now
    /// (those that are leave the queue), or `None`, giving up the caller's in-flight slot.
    fn next_queued_prefetch(&self) -> Option<usize> {
        let mut slots = self.prefetch_slots.lock().unwrap();
        while let Some((fidx, queued_at)) = slots.queue.pop_front() {
            if self.answered_within(fidx, WARM_FRESH) || queued_at.elapsed() > COLD_WINDOW {
                self.prefetching[fidx].store(false, Ordering::Release);
                continue;
            }
            return Some(fidx);
        }
        slots.in_flight -= 1;
        None
    }
}
