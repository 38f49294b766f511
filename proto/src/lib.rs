//! The faasmoe wire contract: everything two faasmoe processes (or a client in any language)
//! must agree on to talk over NATS, and nothing else.
//!
//! It defines the versioned subject scheme ([`subject`], the only place subjects are built),
//! the expert invocation messages (msgpack, tensors as raw little-endian bytes with dtype and
//! shape: [`tensor`], [`expert`]), the client API bodies (JSON or msgpack: [`generate`]),
//! function activation and lifecycle events ([`activation`], [`events`]), typed error codes
//! and their mapping to the four client-facing codes, and W3C trace-context headers
//! ([`trace`]), how a process reaches NATS and as whom ([`connection`]: the shared
//! `--nats-*` flags and the one connect call), and the deployment registry in JetStream KV
//! ([`deployment`]: the broker writes a model's layout, controllers read it). It deliberately
//! does no tensor math (no candle; [`tensor::WireTensor`] only converts to and from `f32`
//! slices), keeps no connections or subscriptions of its own (its calls take the caller's
//! client), and knows nothing of scheduling,
//! batching or process management: those live in the controller, the expert worker and the
//! broker, which all depend on this crate and never the other way round.

#![warn(missing_docs)]

pub mod activation;
pub mod connection;
pub mod deployment;
pub mod events;
pub mod expert;
pub mod generate;
pub mod layout;
pub mod stats;
pub mod subject;
pub mod tensor;
pub mod trace;

pub use expert::{ClientErrorCode, ErrorCode, WireError};
pub use subject::PROTOCOL_VERSION;

/// Serialises `value` as JSON. Used for the control messages ([`activation`], [`events`]).
fn encode_json<T: serde::Serialize>(value: &T) -> bytes::Bytes {
    // Our own types have string keys and no non-serialisable fields, so this cannot fail.
    bytes::Bytes::from(serde_json::to_vec(value).expect("proto types always serialise to JSON"))
}

/// Parses a JSON control message; a parse failure is [`ErrorCode::Malformed`].
fn decode_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(body).map_err(|e| WireError::new(ErrorCode::Malformed, e.to_string()))
}

/// Checks a message's protocol version; a different one is [`ErrorCode::VersionMismatch`].
fn check_version(got: u16) -> Result<(), WireError> {
    if got == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::VersionMismatch,
            format!(
                "message has protocol version {got}, this build speaks version {PROTOCOL_VERSION}"
            ),
        ))
    }
}
