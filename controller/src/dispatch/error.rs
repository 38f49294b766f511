//! [`DispatchError`]: why the routed part of a layer could not be computed.

use std::sync::Arc;

use faasmoe_proto::expert::{ClientErrorCode, WireError};
use faasmoe_proto::subject::SubjectError;
use faasmoe_proto::tensor::TensorError;

/// Why the routed part of a layer could not be computed. [`DispatchError::client_code`]
/// says what the requests of the failed batch see: `unavailable` when an expert function
/// could not be reached or started in time, `internal` for everything else (a defect of
/// this deployment or of this code, not of the request).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// The broker did not get an instance of `function` serving within the activation
    /// timeout: every one of `attempts` activation requests timed out or met a transient
    /// failure; `last` is the last one's.
    #[error(
        "activation of {function} failed after {attempts} attempt(s) in {waited_ms} ms: {last}"
    )]
    ActivationFailed {
        function: String,
        attempts: u32,
        /// Time since the first activation request, ms.
        waited_ms: u64,
        last: String,
    },
    /// The broker refused to activate `function` with a non-transient error (an unknown
    /// function, a layout it does not serve).
    #[error("the broker refused to activate {function}: {source}")]
    ActivationRefused {
        function: String,
        #[source]
        source: WireError,
    },
    /// The broker said an instance of `function` serves, yet none answered before the
    /// activation timeout (`waited_ms`).
    #[error("{function}: no responders after activation, for {waited_ms} ms")]
    NoRespondersAfterActivation { function: String, waited_ms: u64 },
    /// Every one of `attempts` requests to `function` timed out or met a broken instance;
    /// `last` is the last one's failure.
    #[error("{function}: {last} after {attempts} attempts")]
    RetriesExhausted {
        function: String,
        attempts: u32,
        last: String,
    },
    /// `function` rejected the request itself (`bad_request`, `not_found`, …): retrying
    /// cannot help, the controller and the function disagree.
    #[error("{function} rejected the request: {source}")]
    Rejected {
        function: String,
        #[source]
        source: WireError,
    },
    /// A reply (of `function`, or of the broker for an activation) could not be decoded.
    #[error("malformed reply from {from}: {source}")]
    MalformedReply {
        from: String,
        #[source]
        source: WireError,
    },
    /// `function` replied with a tensor of another shape than `[rows, hidden]` asked, or
    /// one whose bytes do not match its shape and dtype.
    #[error("{function} replied {detail}")]
    WrongReply { function: String, detail: String },
    /// An expert message to `function` cannot fit the server's `max_payload` even one row
    /// per request (the deployment's limit is too small for the model). Never retried.
    #[error("expert request to {function} too large: {source}")]
    PayloadTooLarge {
        function: String,
        #[source]
        source: WireError,
    },
    /// The batch routes to an expert that no function of the layout holds.
    #[error("no function holds expert {expert} of layer {layer}")]
    UnknownExpert { layer: usize, expert: usize },
    /// The batch's hidden states are `[n, got]`, the model's hidden size is `want`.
    #[error("hidden states have {got} columns, the model {want}")]
    HiddenSize { got: usize, want: usize },
    /// A NATS subject could not be built from the model id.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// Packing hidden states into a wire tensor failed.
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// A tensor operation of the dispatcher failed.
    #[error("tensor: {0}")]
    Candle(#[source] Arc<candle_core::Error>),
    /// The control plane, or the in-process experts, failed (shapes, token ids, cache).
    #[error("model: {0}")]
    Model(#[source] Arc<faasmoe_model::ModelError>),
}

impl DispatchError {
    /// The client error code of a request whose batch failed with this error.
    pub fn client_code(&self) -> ClientErrorCode {
        match self {
            DispatchError::ActivationFailed { .. }
            | DispatchError::ActivationRefused { .. }
            | DispatchError::NoRespondersAfterActivation { .. }
            | DispatchError::RetriesExhausted { .. } => ClientErrorCode::Unavailable,
            _ => ClientErrorCode::Internal,
        }
    }
}

impl From<candle_core::Error> for DispatchError {
    fn from(e: candle_core::Error) -> Self {
        DispatchError::Candle(Arc::new(e))
    }
}

impl From<faasmoe_model::ModelError> for DispatchError {
    fn from(e: faasmoe_model::ModelError) -> Self {
        DispatchError::Model(Arc::new(e))
    }
}
