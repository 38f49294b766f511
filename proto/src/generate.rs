//! The client API on `faasmoe.v1.generate.<tenant>`: request and reply bodies.
//!
//! Bodies are JSON unless the message header `Content-Type` is `application/msgpack`
//! (then msgpack maps with named fields); replies use the request's encoding. A failure is
//! answered with [`ErrorReply`]: `{"error": {"code": "bad_request", "message": "..."}}`.
//! With `stream: true` the controller publishes [`StreamMessage`]s to the reply subject:
//! chunks, then exactly one `done` or `error`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use crate::expert::ClientErrorCode;

/// Header naming the body encoding.
pub const CONTENT_TYPE: &str = "Content-Type";
/// `Content-Type` value for msgpack bodies.
pub const MSGPACK: &str = "application/msgpack";
/// `Content-Type` value for JSON bodies (the default).
pub const JSON: &str = "application/json";

/// One chat turn; the controller renders `messages` with the model's chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `"system"`, `"user"` or `"assistant"`.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

/// A generation request. Exactly one of `prompt`, `messages`, `input_ids` is given;
/// unset sampling fields take the controller's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// Raw prompt text (non-empty), tokenized as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Chat turns, rendered with the chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Pre-tokenized prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_ids: Option<Vec<u32>>,
    /// Maximum new tokens (>= 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (>= 0; 0 is greedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Sample among the `top_k` most likely tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Seed for reproducible sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop strings: generation ends when the text ends with one (it is not included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Stream [`StreamMessage`]s instead of one [`GenerateResponse`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Echo the prompt's token ids (after the chat template and tokenizer) in
    /// [`GenerateResponse::prompt_token_ids`] (vLLM's `return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_prompt_token_ids: Option<bool>,
}

impl GenerateRequest {
    /// Checks the request: exactly one of prompt/messages/input_ids, a non-empty prompt
    /// (or messages, or input_ids), temperature >= 0, 0 < top_p <= 1, max_tokens >= 1.
    /// Every failure is `bad_request`.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |m: &str| Err(ClientError::bad_request(m));
        let given = [
            self.prompt.is_some(),
            self.messages.is_some(),
            self.input_ids.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return bad("exactly one of prompt, messages, input_ids must be given");
        }
        if self.prompt.as_deref() == Some("") {
            return bad("prompt is empty");
        }
        if self.messages.as_ref().is_some_and(|m| m.is_empty()) {
            return bad("messages is empty");
        }
        if self.input_ids.as_ref().is_some_and(|m| m.is_empty()) {
            return bad("input_ids is empty");
        }
        if self
            .temperature
            .is_some_and(|t| !(t >= 0.0 && t.is_finite()))
        {
            return bad("temperature must be a finite number >= 0");
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return bad("top_p must be in (0, 1]");
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens must be >= 1");
        }
        Ok(())
    }
}

/// Why generation ended (`"stop"`, `"length"`, `"cancelled"`; [`FinishReason::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` (or the context length) reached.
    Length,
    /// The client or the server cancelled the request.
    Cancelled,
}

impl FinishReason {
    /// The wire name (`"stop"`, `"length"`, `"cancelled"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the (templated) prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// Latencies of one request, in milliseconds since the controller received it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Time waiting for admission and a batch slot.
    pub queue_ms: f64,
    /// Time to first token.
    pub ttft_ms: f64,
    /// Time until the last token.
    pub total_ms: f64,
}

/// The reply to a non-streaming request, and the payload of the final `done` stream message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateResponse {
    /// Request id assigned by the controller.
    pub id: String,
    /// The generated text (without the prompt).
    pub text: String,
    /// The generated token ids.
    pub token_ids: Vec<u32>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Latencies.
    pub timings: Timings,
    /// The prompt's token ids, when the request set `return_prompt_token_ids`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// A piece of streamed output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamChunk {
    /// Request id (as in the final response).
    pub id: String,
    /// Chunk sequence number, from 0.
    pub index: u32,
    /// New text since the previous chunk (may be empty while a character is incomplete).
    pub text: String,
    /// New token ids since the previous chunk.
    pub token_ids: Vec<u32>,
}

/// A client-facing error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ClientError {
    /// One of the four client codes.
    pub code: ClientErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl ClientError {
    /// A `bad_request` error.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ClientError {
            code: ClientErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

impl From<crate::WireError> for ClientError {
    /// Maps through [`crate::ErrorCode::client_code`], keeping the message.
    fn from(e: crate::WireError) -> Self {
        ClientError {
            code: e.code.client_code(),
            message: e.message,
        }
    }
}

/// The body of a failed non-streaming reply: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The error.
    pub error: ClientError,
}

/// One message of a streamed reply, tagged by `"type"`: `{"type":"chunk", ...StreamChunk}`,
/// `{"type":"done", ...GenerateResponse}` (last), or `{"type":"error", ...ClientError}` (last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamMessage {
    /// New output.
    Chunk(StreamChunk),
    /// Generation finished; the full response.
    Done(GenerateResponse),
    /// Generation failed.
    Error(ClientError),
}

/// Whether a `Content-Type` header value selects msgpack (case-insensitive, parameters ignored).
pub fn is_msgpack(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|c| c.split(';').next())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case(MSGPACK))
}

/// Encodes a client API body: msgpack (named fields) if `content_type` selects it, else JSON.
pub fn encode_body<T: Serialize>(value: &T, content_type: Option<&str>) -> Bytes {
    if is_msgpack(content_type) {
        crate::expert::encode(value)
    } else {
        Bytes::from(serde_json::to_vec(value).expect("proto types always serialise to JSON"))
    }
}

/// Decodes and validates a request body (JSON unless `content_type` selects msgpack).
/// Every failure (invalid UTF-8 or JSON, unknown fields, wrong types, [`GenerateRequest::validate`])
/// is `bad_request` with the parser's message.
pub fn decode_generate(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<GenerateRequest, ClientError> {
    let req: GenerateRequest = if is_msgpack(content_type) {
        rmp_serde::from_slice(body)
            .map_err(|e| ClientError::bad_request(format!("invalid msgpack body: {e}")))?
    } else {
        let text = std::str::from_utf8(body)
            .map_err(|e| ClientError::bad_request(format!("body is not valid UTF-8: {e}")))?;
        serde_json::from_str(text)
            .map_err(|e| ClientError::bad_request(format!("invalid JSON body: {e}")))?
    };
    req.validate()?;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(body: &[u8]) -> String {
        let e = decode_generate(body, None).unwrap_err();
        assert_eq!(e.code, ClientErrorCode::BadRequest);
        e.message
    }

    #[test]
    fn json_and_msgpack_requests_decode() {
        let req = decode_generate(
            br#"{"prompt":"hi","max_tokens":4,"temperature":0}"#,
            Some(JSON),
        )
        .unwrap();
        assert_eq!(
            (req.prompt.as_deref(), req.max_tokens, req.temperature),
            (Some("hi"), Some(4), Some(0.0))
        );
        let chat = GenerateRequest {
            messages: Some(vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }]),
            stream: Some(true),
            ..Default::default()
        };
        let body = encode_body(&chat, Some("Application/MsgPack; charset=binary"));
        assert_eq!(decode_generate(&body, Some(MSGPACK)).unwrap(), chat);
    }

    #[test]
    fn decode_generate_rejects_bad_bodies() {
        assert!(bad(br#"{"prompt":"hi","temprature":1}"#).contains("unknown field"));
        assert!(bad(br#"{"prompt":"hi","max_tokens":"4"}"#).contains("invalid type"));
        assert!(bad(b"{\"prompt\":\"\xff\"}").contains("UTF-8"));
        assert!(bad(br#"{"prompt":""}"#).contains("empty"));
        assert!(bad(b"not json").contains("JSON"));
        assert!(
            bad(br#"{"messages":[{"role":"user","content":"x","name":"a"}]}"#)
                .contains("unknown field")
        );
        let e = decode_generate(b"\x93\x01", Some(MSGPACK)).unwrap_err();
        assert_eq!(e.code, ClientErrorCode::BadRequest);
    }

    #[test]
    fn validate_checks_each_rule() {
        let ok = GenerateRequest {
            prompt: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let cases = [
            GenerateRequest::default(),
            GenerateRequest {
                input_ids: Some(vec![1]),
                ..ok.clone()
            },
            GenerateRequest {
                input_ids: Some(vec![]),
                prompt: None,
                ..ok.clone()
            },
            GenerateRequest {
                temperature: Some(-0.1),
                ..ok.clone()
            },
            GenerateRequest {
                temperature: Some(f32::NAN),
                ..ok.clone()
            },
            GenerateRequest {
                top_p: Some(0.0),
                ..ok.clone()
            },
            GenerateRequest {
                top_p: Some(1.5),
                ..ok.clone()
            },
            GenerateRequest {
                max_tokens: Some(0),
                ..ok.clone()
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(c.validate().is_err(), "case {i} accepted");
        }
    }

    #[test]
    fn replies_have_the_documented_json_shape() {
        let err = ErrorReply {
            error: ClientError::bad_request("nope"),
        };
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"error":{"code":"bad_request","message":"nope"}}"#
        );
        let done = GenerateResponse {
            id: "r1".into(),
            text: "ab".into(),
            token_ids: vec![1, 2],
            finish_reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
            },
            timings: Timings {
                queue_ms: 0.5,
                ttft_ms: 10.0,
                total_ms: 20.0,
            },
            prompt_token_ids: None,
        };
        let chunk = StreamChunk {
            id: "r1".into(),
            index: 0,
            text: "a".into(),
            token_ids: vec![1],
        };
        let v = serde_json::to_value(StreamMessage::Chunk(chunk.clone())).unwrap();
        assert_eq!(v["type"], "chunk");
        let v = serde_json::to_value(StreamMessage::Done(done.clone())).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["finish_reason"].as_str()),
            (Some("done"), Some("length"))
        );
        let v = serde_json::to_value(StreamMessage::Error(err.error.clone())).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some("bad_request"))
        );
        for m in [
            StreamMessage::Chunk(chunk),
            StreamMessage::Done(done),
            StreamMessage::Error(err.error),
        ] {
            for ct in [None, Some(MSGPACK)] {
                let body = encode_body(&m, ct);
                let back: StreamMessage = if ct.is_some() {
                    rmp_serde::from_slice(&body).unwrap()
                } else {
                    serde_json::from_slice(&body).unwrap()
                };
                assert_eq!(back, m);
            }
        }
    }
}
