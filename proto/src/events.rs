//! Function lifecycle events on `faasmoe.v1.events.<model>` ([`crate::subject::events`]),
//! JSON bodies. Each kind has one publisher and one meaning:
//!
//! | kind | published by | means | `cold_start_ms` |
//! |---|---|---|---|
//! | `started` | broker | it spawned the process | — |
//! | `subscribed` | worker | it loaded its experts and its subscriptions are confirmed by the server | process start → subscribed |
//! | `ready` | broker | it saw the worker's `subscribed`: the instance serves | spawn → ready (the cold start) |
//! | `draining` | worker | it has unsubscribed and answered everything it received; it exits next | — |
//! | `stopped` | broker | it reaped the process (idle scale to zero, crash or shutdown) | — |
//! | `spawn_failed` | broker | the process could not be spawned or exited before `ready` | — |
//!
//! Monitoring and benchmarks read the broker's kinds; the broker reads the worker's.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::WireError;

/// What happened to an instance (`"started"`, `"subscribed"`, `"ready"`, `"draining"`,
/// `"stopped"`, `"spawn_failed"`); the module's table says who publishes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Broker: the process was spawned.
    Started,
    /// Worker: it loaded its experts and the server confirmed its subscriptions.
    Subscribed,
    /// Broker: the instance serves (it saw the worker's `subscribed`); the cold start is
    /// complete, `cold_start_ms` = spawn → ready.
    Ready,
    /// Worker: it has unsubscribed and answered every request it received; it exits next
    /// (the broker counts it as draining until it has reaped the process).
    Draining,
    /// Broker: the process exited and was reaped (idle scale-to-zero, crash or shutdown).
    Stopped,
    /// Broker: the process could not be spawned or died before becoming ready.
    SpawnFailed,
}

/// One lifecycle event of one function instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionEvent {
    /// What happened.
    pub kind: EventKind,
    /// Model id.
    pub model: String,
    /// The function.
    pub function_id: String,
    /// The instance.
    pub instance_id: String,
    /// OS process id, when known.
    pub pid: Option<u32>,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// On `ready`: spawn → ready, ms (the broker's clock); on `subscribed`: the worker's
    /// process start → subscribed, ms.
    pub cold_start_ms: Option<f64>,
    /// Process exit status (on `stopped` and `spawn_failed`, when it exited normally).
    pub exit_status: Option<i32>,
}

impl FunctionEvent {
    /// Encodes as JSON.
    pub fn encode(&self) -> Bytes {
        crate::encode_json(self)
    }

    /// Decodes JSON. Errors: [`crate::ErrorCode::Malformed`].
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        crate::decode_json(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_round_trips_with_snake_case_kind() {
        let ev = FunctionEvent {
            kind: EventKind::SpawnFailed,
            model: "m".into(),
            function_id: "f".into(),
            instance_id: "i".into(),
            pid: None,
            at_unix_ms: 1_700_000_000_000,
            cold_start_ms: Some(12.5),
            exit_status: Some(1),
        };
        let body = ev.encode();
        assert!(std::str::from_utf8(&body)
            .unwrap()
            .contains(r#""kind":"spawn_failed""#));
        assert_eq!(FunctionEvent::decode(&body).unwrap(), ev);
    }
}
