//! Function activation: a controller that meets *no responders* on an expert subject asks
//! the broker on `faasmoe.v1.activate.<model>` ([`crate::subject::activate`]) to start the
//! function holding those experts; the broker replies once an instance has subscribed.
//! JSON bodies.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::WireError;

/// A request to start (or confirm) an instance of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateRequest {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub version: u16,
    /// Model id.
    pub model: String,
    /// The function to start (a subject token, see [`crate::subject::validate_token`]).
    pub function_id: String,
    /// The MoE layer the missing experts belong to.
    pub layer: u32,
    /// The experts that had no responders.
    pub experts: Vec<u32>,
    /// Who asks (controller id), for logs and events.
    pub requested_by: String,
    /// How long the requester waits for the reply, in milliseconds (its activation
    /// timeout). The broker answers within it: a request that finds the function at its
    /// instance cap waits for an instance at most this long (less a margin for the reply),
    /// then gets `unavailable`. Absent (older controllers): the broker's own limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

impl ActivateRequest {
    /// Encodes as JSON.
    pub fn encode(&self) -> Bytes {
        crate::encode_json(self)
    }

    /// Decodes JSON. Errors: [`crate::ErrorCode::Malformed`], [`crate::ErrorCode::VersionMismatch`].
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let req: Self = crate::decode_json(body)?;
        crate::check_version(req.version)?;
        Ok(req)
    }
}

/// The outcome of an activation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivateResult {
    /// An instance is subscribed and serving.
    Ok {
        /// The instance that serves (new or already running).
        instance_id: String,
        /// Spawn to subscribed, in milliseconds (0 if already running).
        cold_start_ms: f64,
        /// Whether an instance was already running (nothing was started).
        already_running: bool,
    },
    /// The function could not be started (`unavailable`, `bad_request` for unknown functions).
    Err(WireError),
}

/// The broker's reply to an [`ActivateRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivateReply {
    /// Instance or error.
    pub result: ActivateResult,
}

impl ActivateReply {
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
    use crate::ErrorCode;

    #[test]
    fn activation_round_trips_and_checks_version() {
        let mut req = ActivateRequest {
            version: crate::PROTOCOL_VERSION,
            model: "m".into(),
            function_id: "l0-g1".into(),
            layer: 0,
            experts: vec![4, 5],
            requested_by: "ctl-1".into(),
            wait_ms: Some(30_000),
        };
        assert_eq!(ActivateRequest::decode(&req.encode()).unwrap(), req);
        // Without `wait_ms` (older controllers) it decodes as `None`.
        let old = format!(
            r#"{{"version":{},"model":"m","function_id":"f","layer":0,"experts":[1],"requested_by":"c"}}"#,
            crate::PROTOCOL_VERSION
        );
        assert_eq!(
            ActivateRequest::decode(old.as_bytes()).unwrap().wait_ms,
            None
        );
        assert_eq!(ActivateRequest::decode(&req.encode()).unwrap(), req);
        req.version = 2;
        assert_eq!(
            ActivateRequest::decode(&req.encode()).unwrap_err().code,
            ErrorCode::VersionMismatch
        );
        assert_eq!(
            ActivateRequest::decode(b"{").unwrap_err().code,
            ErrorCode::Malformed
        );
        for reply in [
            ActivateReply {
                result: ActivateResult::Ok {
                    instance_id: "i1".into(),
                    cold_start_ms: 5.5,
                    already_running: false,
                },
            },
            ActivateReply {
                result: ActivateResult::Err(WireError::new(ErrorCode::Unavailable, "spawn failed")),
            },
        ] {
            assert_eq!(ActivateReply::decode(&reply.encode()).unwrap(), reply);
        }
    }
}
