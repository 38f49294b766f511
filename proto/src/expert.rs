//! Expert invocation: the controller sends one [`ExpertRequest`] per function and MoE layer
//! to `faasmoe.v1.expert.<model>.<layer>.<expert>` (see [`crate::subject::expert`]); the
//! function answers with an [`ExpertReply`]. Both are msgpack maps with named fields
//! ([`rmp_serde::to_vec_named`]) so that any language can read them; `request_id` is a
//! UUID encoded as 16 raw bytes (`bin`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tensor::{TensorError, WireDType, WireTensor};

/// What went wrong, as carried on the wire (serialised snake_case, e.g. `"wrong_shape"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is well-formed but semantically invalid (bad parameters).
    BadRequest,
    /// The payload could not be decoded (invalid msgpack/JSON, missing or mistyped fields).
    Malformed,
    /// The sender speaks another [`crate::PROTOCOL_VERSION`].
    VersionMismatch,
    /// A tensor's shape disagrees with its data, the model's hidden size, or the routes.
    WrongShape,
    /// The requested dtype is not supported by the receiver (serialised `"unsupported_dtype"`).
    #[serde(rename = "unsupported_dtype")]
    UnsupportedDType,
    /// The function does not hold an expert the request routes to.
    UnknownExpert,
    /// The function does not serve the request's layer (or model).
    WrongLayer,
    /// The payload exceeds the receiver's or the server's size limit.
    PayloadTooLarge,
    /// The tenant's quota (tokens, requests) is exhausted.
    QuotaExceeded,
    /// No instance could serve the request (no responders, activation failed, shutting down).
    Unavailable,
    /// A bug or unexpected failure in the receiver.
    Internal,
    /// The receiver or a downstream call did not answer in time.
    Timeout,
}

/// The four error codes of the client API (serialised `"bad_request"`, `"quota_exceeded"`,
/// `"unavailable"`, `"internal"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientErrorCode {
    /// The client's request is invalid; retrying it unchanged will fail again.
    BadRequest,
    /// The tenant's quota is exhausted; retry later.
    QuotaExceeded,
    /// Capacity is temporarily missing (cold start failed, timeouts); retry later.
    Unavailable,
    /// A server-side fault the client cannot fix.
    Internal,
}

impl ErrorCode {
    /// The client-facing code: decoding failures of a client's body are `bad_request`;
    /// errors between controller and functions (shapes, versions, experts) are the server's
    /// fault, so `internal`; missing capacity and timeouts are `unavailable`.
    pub fn client_code(&self) -> ClientErrorCode {
        use ErrorCode::*;
        match self {
            BadRequest | Malformed | PayloadTooLarge => ClientErrorCode::BadRequest,
            QuotaExceeded => ClientErrorCode::QuotaExceeded,
            Unavailable | Timeout => ClientErrorCode::Unavailable,
            VersionMismatch | WrongShape | UnsupportedDType | UnknownExpert | WrongLayer
            | Internal => ClientErrorCode::Internal,
        }
    }
}

impl ErrorCode {
    /// The wire name (as serialised), e.g. `"wrong_shape"`.
    pub fn as_str(&self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadRequest => "bad_request",
            Malformed => "malformed",
            VersionMismatch => "version_mismatch",
            WrongShape => "wrong_shape",
            UnsupportedDType => "unsupported_dtype",
            UnknownExpert => "unknown_expert",
            WrongLayer => "wrong_layer",
            PayloadTooLarge => "payload_too_large",
            QuotaExceeded => "quota_exceeded",
            Unavailable => "unavailable",
            Internal => "internal",
            Timeout => "timeout",
        }
    }
}

impl ClientErrorCode {
    /// The wire name (as serialised), e.g. `"bad_request"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ClientErrorCode::BadRequest => "bad_request",
            ClientErrorCode::QuotaExceeded => "quota_exceeded",
            ClientErrorCode::Unavailable => "unavailable",
            ClientErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ClientErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed error with a human-readable message, as carried in replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// Machine-readable kind.
    pub code: ErrorCode,
    /// Human-readable detail (never parsed).
    pub message: String,
}

impl WireError {
    /// Builds an error from a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

impl From<TensorError> for WireError {
    fn from(e: TensorError) -> Self {
        WireError::new(ErrorCode::WrongShape, e.to_string())
    }
}

/// Per row of [`ExpertRequest::hidden`]: the experts of the called function this row is
/// routed to, and their routing weights (`experts.len() == weights.len()`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowRoutes {
    /// Expert indices within the layer (0-based, as in the checkpoint).
    pub experts: Vec<u32>,
    /// Routing weights (after top-k and optional renormalisation), one per expert.
    pub weights: Vec<f32>,
}

/// One invocation of a function's experts for one MoE layer, batching rows of any tenants.
///
/// If `combine` is true the reply's output is `[n_rows, hidden]`: per row,
/// Σ weight · expert(row) over that row's experts (a row with no experts gives zeros).
/// If false it is `[Σ len(experts), hidden]`: one unweighted expert output per
/// (row, expert) pair, in order of appearance (row-major over `routes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertRequest {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub version: u16,
    /// Echoed in the reply.
    pub request_id: Uuid,
    /// The tenants whose rows are in the request, sorted and comma separated (`"t1"`,
    /// `"t1,t3"`): a batch may mix tenants. For the function's accounting and logs only; it
    /// grants nothing (the function trusts the controller, not this field).
    pub tenant: String,
    /// Model id (as in the subject).
    pub model: String,
    /// MoE layer index (0-based decoder layer).
    pub layer: u32,
    /// Hidden states `[n_rows, hidden]`, each row sent once however many experts it uses.
    pub hidden: WireTensor,
    /// One entry per row of `hidden`.
    pub routes: Vec<RowRoutes>,
    /// The dtype the output should be encoded in.
    pub reply_dtype: WireDType,
    /// Whether the function combines expert outputs per row (see the type's doc).
    pub combine: bool,
}

impl ExpertRequest {
    /// Number of output rows the reply must have (`n_rows` if `combine`, else the number of
    /// (row, expert) pairs).
    pub fn output_rows(&self) -> usize {
        if self.combine {
            self.routes.len()
        } else {
            self.routes.iter().map(|r| r.experts.len()).sum()
        }
    }

    /// Checks the shapes: `hidden` is rank 2 with `hidden_size` columns and data matching
    /// shape × dtype, `routes.len()` equals its rows, and each row has as many weights as
    /// experts. Every failure is [`ErrorCode::WrongShape`].
    pub fn validate(&self, hidden_size: usize) -> Result<(), WireError> {
        let wrong = |m: String| Err(WireError::new(ErrorCode::WrongShape, m));
        let (rows, cols) = self.hidden.dims2()?;
        if cols != hidden_size {
            return wrong(format!(
                "hidden has {cols} columns, the model's hidden size is {hidden_size}"
            ));
        }
        self.hidden.check()?;
        if self.routes.len() != rows {
            return wrong(format!(
                "hidden has {rows} rows but routes has {} entries",
                self.routes.len()
            ));
        }
        if let Some((i, r)) = self
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.experts.len() != r.weights.len())
        {
            return wrong(format!(
                "row {i} has {} experts but {} weights",
                r.experts.len(),
                r.weights.len()
            ));
        }
        Ok(())
    }
}

/// Bytes kept free in every expert message for what [`ExpertRequest::split_to_fit`] does not
/// count exactly: NATS headers (a W3C `traceparent` is 55 bytes, plus `NATS/1.0` framing)
/// and msgpack length prefixes. NATS checks headers + payload against `max_payload`.
pub const MESSAGE_HEADROOM_BYTES: usize = 1024;

/// Upper bound on the msgpack bytes of one [`RowRoutes`] with `k` experts, named fields:
/// map header (1) + `"experts"` (8) + array header (≤ 3) + k · u32 (≤ 5 each) + `"weights"`
/// (8) + array header (≤ 3) + k · f32 (5 each).
fn row_routes_bytes(k: usize) -> usize {
    23 + 10 * k
}

impl ExpertRequest {
    /// Splits the request by rows into consecutive parts such that each part's encoded
    /// request, and the reply it asks for (`output_rows × hidden` in `reply_dtype`), stay
    /// within `max_payload` bytes (the NATS server's limit, headers included, as
    /// `async_nats::Client::max_payload` reports it) less [`MESSAGE_HEADROOM_BYTES`].
    /// Returns `(first row, part)` in row order; a request that already fits is returned
    /// whole (no copy: parts share `hidden.data`). Every part keeps the request's fields
    /// but gets a fresh `request_id`.
    ///
    /// This is the one place the split is computed: it holds for any wire dtype,
    /// granularity (experts per row) and prompt length.
    ///
    /// Errors: [`ErrorCode::PayloadTooLarge`] when a single row cannot fit (a server with a
    /// `max_payload` below a few hidden rows); [`ErrorCode::WrongShape`] when `hidden` is
    /// not a rank-2 tensor matching its data and `routes`.
    pub fn split_to_fit(
        self,
        max_payload: usize,
    ) -> Result<Vec<(usize, ExpertRequest)>, WireError> {
        let (rows, cols) = self.hidden.dims2()?;
        self.hidden.check()?;
        if self.routes.len() != rows {
            return Err(WireError::new(
                ErrorCode::WrongShape,
                format!(
                    "hidden has {rows} rows but routes has {} entries",
                    self.routes.len()
                ),
            ));
        }
        let row_in = cols * self.hidden.dtype.size();
        let out_row = cols * self.reply_dtype.size();
        let budget = max_payload.saturating_sub(MESSAGE_HEADROOM_BYTES);
        let empty = |r: &ExpertRequest| ExpertRequest {
            hidden: WireTensor {
                dtype: r.hidden.dtype,
                shape: vec![0, cols as u32],
                data: Bytes::new(),
            },
            routes: Vec::new(),
            ..r.clone_header()
        };
        let fixed_request = encode(&empty(&self)).len() + 10;
        let fixed_reply = encode(&ExpertReply::ok(
            self.request_id,
            WireTensor {
                dtype: self.reply_dtype,
                shape: vec![0, cols as u32],
                data: Bytes::new(),
            },
        ))
        .len()
            + 10;
        let costs = |r: &RowRoutes| {
            let k = r.experts.len();
            let reply = if self.combine { out_row } else { k * out_row };
            (row_in + row_routes_bytes(k), reply)
        };
        if let Some((i, (req, rep))) = self
            .routes
            .iter()
            .map(costs)
            .enumerate()
            .find(|(_, (q, p))| fixed_request + q > budget || fixed_reply + p > budget)
        {
            return Err(WireError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "row {i} alone needs a {} byte request and a {} byte reply; the server's max_payload is {max_payload} bytes ({MESSAGE_HEADROOM_BYTES} kept for headers)",
                    fixed_request + req,
                    fixed_reply + rep
                ),
            ));
        }
        let (mut parts, mut start, mut req_bytes, mut rep_bytes) =
            (Vec::new(), 0usize, fixed_request, fixed_reply);
        for (i, r) in self.routes.iter().enumerate() {
            let (q, p) = costs(r);
            if req_bytes + q > budget || rep_bytes + p > budget {
                parts.push((start, i));
                start = i;
                req_bytes = fixed_request;
                rep_bytes = fixed_reply;
            }
            req_bytes += q;
            rep_bytes += p;
        }
        parts.push((start, rows));
        if parts.len() == 1 {
            return Ok(vec![(0, self)]);
        }
        Ok(parts
            .into_iter()
            .map(|(a, b)| {
                let part = ExpertRequest {
                    request_id: Uuid::new_v4(),
                    hidden: WireTensor {
                        dtype: self.hidden.dtype,
                        shape: vec![(b - a) as u32, cols as u32],
                        data: self.hidden.data.slice(a * row_in..b * row_in),
                    },
                    routes: self.routes[a..b].to_vec(),
                    ..self.clone_header()
                };
                (a, part)
            })
            .collect())
    }

    /// The request without its rows (`hidden` and `routes` emptied): what every part of a
    /// split shares.
    fn clone_header(&self) -> ExpertRequest {
        ExpertRequest {
            version: self.version,
            request_id: self.request_id,
            tenant: self.tenant.clone(),
            model: self.model.clone(),
            layer: self.layer,
            hidden: WireTensor {
                dtype: self.hidden.dtype,
                shape: vec![0, 0],
                data: Bytes::new(),
            },
            routes: Vec::new(),
            reply_dtype: self.reply_dtype,
            combine: self.combine,
        }
    }
}

/// The outcome of an [`ExpertRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertResult {
    /// `output`: `[ExpertRequest::output_rows(), hidden]` in the requested `reply_dtype`.
    Ok {
        /// The expert outputs.
        output: WireTensor,
    },
    /// The function refused or failed the request.
    Err(WireError),
}

/// The reply to an [`ExpertRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertReply {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub version: u16,
    /// The request's `request_id`.
    pub request_id: Uuid,
    /// Output or error.
    pub result: ExpertResult,
}

impl ExpertReply {
    /// A successful reply.
    pub fn ok(request_id: Uuid, output: WireTensor) -> Self {
        ExpertReply {
            version: crate::PROTOCOL_VERSION,
            request_id,
            result: ExpertResult::Ok { output },
        }
    }

    /// A failed reply.
    pub fn err(request_id: Uuid, error: WireError) -> Self {
        ExpertReply {
            version: crate::PROTOCOL_VERSION,
            request_id,
            result: ExpertResult::Err(error),
        }
    }
}

/// Encodes a message as a msgpack map with named fields.
pub fn encode<T: Serialize>(value: &T) -> Bytes {
    // Our types have string keys only; msgpack serialisation into a Vec cannot fail.
    Bytes::from(rmp_serde::to_vec_named(value).expect("proto types always serialise to msgpack"))
}

/// Decodes a versioned msgpack message: first its `version` (else [`ErrorCode::Malformed`]),
/// which must be [`crate::PROTOCOL_VERSION`] ([`ErrorCode::VersionMismatch`]), then the rest
/// ([`ErrorCode::Malformed`] on failure).
fn decode_versioned<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    #[derive(Deserialize)]
    struct Version {
        version: u16,
    }
    let malformed =
        |e: rmp_serde::decode::Error| WireError::new(ErrorCode::Malformed, e.to_string());
    let v: Version = rmp_serde::from_slice(payload).map_err(malformed)?;
    crate::check_version(v.version)?;
    rmp_serde::from_slice(payload).map_err(malformed)
}

/// Decodes an [`ExpertRequest`] (does not [`ExpertRequest::validate`] it).
/// Errors: [`ErrorCode::Malformed`], [`ErrorCode::VersionMismatch`].
///
/// A dtype other than `f32`/`bf16` in `hidden.dtype` or `reply_dtype` is
/// [`ErrorCode::UnsupportedDType`] rather than `Malformed`.
pub fn decode_request(payload: &[u8]) -> Result<ExpertRequest, WireError> {
    decode_versioned(payload).map_err(|e| {
        #[derive(Deserialize)]
        struct Loose {
            hidden: LooseTensor,
            reply_dtype: String,
        }
        #[derive(Deserialize)]
        struct LooseTensor {
            dtype: String,
        }
        if e.code == ErrorCode::Malformed {
            if let Ok(l) = rmp_serde::from_slice::<Loose>(payload) {
                for d in [&l.hidden.dtype, &l.reply_dtype] {
                    if d != "f32" && d != "bf16" {
                        return WireError::new(
                            ErrorCode::UnsupportedDType,
                            format!("dtype `{d}` is not supported (f32, bf16)"),
                        );
                    }
                }
            }
        }
        e
    })
}

/// Decodes an [`ExpertReply`]. Errors: [`ErrorCode::Malformed`], [`ErrorCode::VersionMismatch`].
pub fn decode_reply(payload: &[u8]) -> Result<ExpertReply, WireError> {
    decode_versioned(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(rows: u32, hidden: u32) -> ExpertRequest {
        let values: Vec<f32> = (0..rows * hidden).map(|i| i as f32 * 0.5).collect();
        ExpertRequest {
            version: crate::PROTOCOL_VERSION,
            request_id: Uuid::new_v4(),
            tenant: "acme".into(),
            model: "m".into(),
            layer: 2,
            hidden: WireTensor::from_f32(vec![rows, hidden], &values, WireDType::F32).unwrap(),
            routes: (0..rows)
                .map(|r| RowRoutes {
                    experts: vec![r, r + 1],
                    weights: vec![0.7, 0.3],
                })
                .collect(),
            reply_dtype: WireDType::BF16,
            combine: false,
        }
    }

    /// Every part of a split, and the reply it asks for, fits; the rows come back in order.
    fn assert_split_fits(req: &ExpertRequest, max_payload: usize) -> usize {
        let cols = req.hidden.cols().unwrap();
        let parts = req.clone().split_to_fit(max_payload).unwrap();
        let mut next = 0;
        let mut data = Vec::new();
        for (first, part) in &parts {
            assert_eq!(*first, next);
            part.validate(cols).unwrap();
            assert!(
                encode(part).len() + MESSAGE_HEADROOM_BYTES <= max_payload,
                "{} bytes",
                encode(part).len()
            );
            let out = WireTensor::from_f32(
                vec![part.output_rows() as u32, cols as u32],
                &vec![1.5; part.output_rows() * cols],
                part.reply_dtype,
            )
            .unwrap();
            assert!(
                encode(&ExpertReply::ok(part.request_id, out)).len() + MESSAGE_HEADROOM_BYTES
                    <= max_payload
            );
            assert_eq!(part.routes, req.routes[next..next + part.routes.len()]);
            data.extend_from_slice(&part.hidden.data);
            next += part.routes.len();
        }
        assert_eq!(next, req.routes.len());
        assert_eq!(data, req.hidden.data);
        parts.len()
    }

    #[test]
    fn split_keeps_every_part_and_reply_under_max_payload() {
        for (rows, hidden, dtype, k) in [
            (4096, 64, WireDType::F32, 4),
            (1000, 2048, WireDType::BF16, 60),
            (333, 48, WireDType::F32, 1),
        ] {
            let mut req = request(rows, hidden);
            req.hidden = WireTensor::from_f32(
                vec![rows, hidden],
                &vec![0.25; (rows * hidden) as usize],
                dtype,
            )
            .unwrap();
            req.reply_dtype = dtype;
            req.combine = true;
            req.routes = (0..rows)
                .map(|r| RowRoutes {
                    experts: (0..k).map(|e| e + r % 7).collect(),
                    weights: vec![0.1; k as usize],
                })
                .collect();
            for max_payload in [64 << 10, 1 << 20, 8 << 20] {
                let n = assert_split_fits(&req, max_payload);
                // No more parts than needed, give or take the routes' bound and one row.
                let reply_bytes = req.output_rows() * (hidden as usize) * dtype.size();
                let needed = encode(&req)
                    .len()
                    .max(reply_bytes)
                    .div_ceil(max_payload - MESSAGE_HEADROOM_BYTES);
                assert!(
                    n >= needed && n <= needed + needed / 4 + 1,
                    "{rows}x{hidden} {dtype:?} k={k} at {max_payload}: {n} parts, {needed} needed"
                );
            }
            req.combine = false;
            assert_split_fits(&req, 1 << 20);
        }
    }

    #[test]
    fn split_of_a_request_that_fits_is_the_request() {
        let req = request(3, 8);
        let parts = req.clone().split_to_fit(1 << 20).unwrap();
        assert_eq!(parts, vec![(0, req)]);
    }

    #[test]
    fn a_row_that_cannot_fit_is_payload_too_large() {
        let req = request(2, 4096);
        let e = req.split_to_fit(8 << 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
        assert!(e.message.contains("max_payload is 8192"), "{}", e.message);
    }

    #[test]
    fn request_and_reply_round_trip() {
        let req = request(3, 8);
        assert_eq!(decode_request(&encode(&req)).unwrap(), req);
        assert_eq!(req.output_rows(), 6);
        let out = WireTensor::from_f32(vec![1, 2], &[1.0, 2.0], WireDType::BF16).unwrap();
        for reply in [
            ExpertReply::ok(req.request_id, out),
            ExpertReply::err(
                req.request_id,
                WireError::new(ErrorCode::UnknownExpert, "expert 7"),
            ),
        ] {
            assert_eq!(decode_reply(&encode(&reply)).unwrap(), reply);
        }
    }

    #[test]
    fn hidden_data_is_msgpack_bin_not_an_int_array() {
        let req = request(16, 256); // 16 KiB of hidden states
        let encoded = encode(&req);
        let data_len = req.hidden.data.len();
        assert!(
            encoded.len() < data_len + data_len / 10,
            "{} bytes for {data_len} of data",
            encoded.len()
        );
        // The data costs its length plus the bin header: compare with an empty tensor.
        let mut empty = req.clone();
        empty.hidden.data = Bytes::new();
        let overhead = encoded.len() - encode(&empty).len();
        assert!(
            (data_len..=data_len + 3).contains(&overhead),
            "data costs {overhead} bytes"
        );
        // bin 16 marker (0xc5) followed by the big-endian length.
        let mut marker = vec![0xc5];
        marker.extend_from_slice(&(data_len as u16).to_be_bytes());
        assert!(encoded.windows(3).any(|w| w == marker.as_slice()));
        // Named fields, readable from other languages.
        assert!(encoded.windows(11).any(|w| w == b"reply_dtype"));
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let mut req = request(1, 4);
        req.version = 7;
        let err = decode_request(&encode(&req)).unwrap_err();
        assert_eq!(err.code, ErrorCode::VersionMismatch);
        assert!(
            err.message.contains('7') && err.message.contains('1'),
            "{}",
            err.message
        );
    }

    #[test]
    fn malformed_bytes_are_malformed() {
        for bad in [
            &b""[..],
            b"\xc1\xc1",
            b"{\"version\":1}",
            &encode(&"just a string"),
        ] {
            assert_eq!(decode_request(bad).unwrap_err().code, ErrorCode::Malformed);
        }
        // Right version, missing fields.
        #[derive(Serialize)]
        struct Partial {
            version: u16,
        }
        let partial = encode(&Partial { version: 1 });
        assert_eq!(
            decode_request(&partial).unwrap_err().code,
            ErrorCode::Malformed
        );
    }

    #[test]
    fn validate_catches_each_shape_error() {
        assert_eq!(request(2, 8).validate(8), Ok(()));
        let shape_err = |r: ExpertRequest| r.validate(8).unwrap_err().code;
        assert_eq!(shape_err(request(2, 4)), ErrorCode::WrongShape); // wrong hidden size
        let mut r = request(2, 8);
        r.hidden.shape = vec![16];
        assert_eq!(shape_err(r), ErrorCode::WrongShape); // rank 1
        let mut r = request(2, 8);
        r.hidden.data = r.hidden.data.slice(..60);
        assert_eq!(shape_err(r), ErrorCode::WrongShape); // data shorter than shape
        let mut r = request(2, 8);
        r.hidden.dtype = WireDType::BF16;
        assert_eq!(shape_err(r), ErrorCode::WrongShape); // dtype inconsistent with data
        let mut r = request(2, 8);
        r.routes.pop();
        assert_eq!(shape_err(r), ErrorCode::WrongShape); // routes != rows
        let mut r = request(2, 8);
        r.routes[1].weights.pop();
        assert_eq!(shape_err(r), ErrorCode::WrongShape); // experts != weights
    }

    #[test]
    fn error_codes_are_snake_case_and_map_to_client_codes() {
        assert_eq!(
            serde_json::to_string(&ErrorCode::PayloadTooLarge).unwrap(),
            "\"payload_too_large\""
        );
        use ErrorCode::*;
        for c in [
            BadRequest,
            Malformed,
            VersionMismatch,
            WrongShape,
            UnsupportedDType,
            UnknownExpert,
            WrongLayer,
            PayloadTooLarge,
            QuotaExceeded,
            Unavailable,
            Internal,
            Timeout,
        ] {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{c}\""));
        }
        assert_eq!(
            serde_json::to_string(&ClientErrorCode::QuotaExceeded).unwrap(),
            "\"quota_exceeded\""
        );
        assert_eq!(
            ErrorCode::Malformed.client_code(),
            ClientErrorCode::BadRequest
        );
        assert_eq!(
            ErrorCode::Timeout.client_code(),
            ClientErrorCode::Unavailable
        );
        assert_eq!(
            ErrorCode::WrongShape.client_code(),
            ClientErrorCode::Internal
        );
        assert_eq!(
            ErrorCode::QuotaExceeded.client_code(),
            ClientErrorCode::QuotaExceeded
        );
    }
}
