//! Function lifecycle events, published by the broker on `faasmoe.v1.events.<model>`
//! ([`crate::subject::events`]) for monitoring and benchmarks. JSON bodies.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::WireError;

/// What happened to an instance (`"started"`, `"ready"`, `"stopped"`, `"spawn_failed"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The process was spawned.
    Started,
    /// The instance loaded its experts and subscribed (cold start complete).
    Ready,
    /// The process exited (idle scale-to-zero, crash or shutdown).
    Stopped,
    /// The process could not be spawned or died before becoming ready.
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
    /// Spawn to ready in milliseconds (on `ready`).
    pub cold_start_ms: Option<f64>,
    /// Process exit status (on `stopped`, when it exited normally).
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
