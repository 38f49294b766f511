//! What `faasmoe.v1.admin.controller_stats` answers: one [`ControllerStats`] (JSON) from
//! every controller on the server (scatter-gather: publish with a reply inbox and collect).
//! Read by the bench (dispatch counters, resident weight bytes), the HTTP gateway (health,
//! models) and `faasmoe up` (readiness).

use serde::{Deserialize, Serialize};

use crate::WireError;

/// One controller's answer on `faasmoe.v1.admin.controller_stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerStats {
    /// Model id it serves (as in subjects).
    pub model: String,
    /// The tenants it serves (private mode); `None`: every tenant (shared mode).
    pub tenants: Option<Vec<String>>,
    /// Whether it computes the routed experts in-process (local-split).
    pub local_experts: bool,
    /// Bytes of the weight tensors the process holds, in their stored dtype: the control
    /// plane (embedding included), plus every routed expert with `local_experts`.
    pub weight_bytes: u64,
    /// Its Prometheus endpoint (`http://<addr>/metrics`), when it serves one.
    pub metrics: Option<String>,
    /// Its dispatch counters.
    pub dispatch: DispatchStats,
}

impl ControllerStats {
    /// JSON body.
    pub fn encode(&self) -> bytes::Bytes {
        crate::encode_json(self)
    }

    /// Parses a body.
    ///
    /// Errors: [`ErrorCode::Malformed`](crate::ErrorCode::Malformed) when it is not a `ControllerStats` (e.g. a field was
    /// renamed: the reader fails loudly instead of reading zeros).
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        crate::decode_json(body)
    }
}

/// Counters of a controller's expert dispatcher, since it started (monotonic; counts, or
/// bytes where the name says so).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchStats {
    /// Function invocations (requests sent, retries included).
    pub invocations: u64,
    /// Request payload bytes sent.
    pub bytes_sent: u64,
    /// Reply payload bytes received.
    pub bytes_received: u64,
    /// Activations asked of the broker.
    pub activations: u64,
    /// Retries after a timeout or error.
    pub retries: u64,
    /// Requests sent again because the connection came back while they waited.
    pub resends: u64,
    /// Times the NATS connection came back after being lost.
    pub reconnects: u64,
    /// Activations started ahead of the pass from predicted routes.
    pub prefetches: u64,
    /// Predictions that found every in-flight slot of activation ahead taken and waited in
    /// its queue (each is then started, or dropped if warm or stale by its turn).
    #[serde(default)]
    pub prefetch_queued: u64,
    /// Prefetched functions that a real route then called (precision = hits ÷ prefetches).
    pub prefetch_hits: u64,
    /// Function calls that found no instance (*no responders* on their first send) and so
    /// waited for a cold start (recall ≈ hits ÷ (hits + cold misses)).
    pub cold_misses: u64,
    /// Extra requests made because a function's rows did not fit one message under the
    /// server's `max_payload` (see `ExpertRequest::split_to_fit`).
    pub split_requests: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn stats_round_trip_and_a_renamed_field_is_an_error() {
        let s = ControllerStats {
            model: "m".into(),
            tenants: Some(vec!["a".into()]),
            local_experts: false,
            weight_bytes: 7,
            metrics: None,
            dispatch: DispatchStats {
                invocations: 3,
                ..Default::default()
            },
        };
        assert_eq!(ControllerStats::decode(&s.encode()).unwrap(), s);
        let renamed = String::from_utf8(s.encode().to_vec())
            .unwrap()
            .replace("weight_bytes", "weights");
        let e = ControllerStats::decode(renamed.as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed);
    }
}
