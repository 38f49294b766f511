//! The OpenAI request bodies the gateway accepts and their translation to faasmoe's
//! [`GenerateRequest`]; the response bodies it writes.
//!
//! Fields that map to ours pass through: `max_tokens` (`max_completion_tokens` for chat),
//! `temperature`, `top_p`, `seed`, `stop` (a string or a list), `stream`,
//! `stream_options.include_usage`, and as extras `top_k` and `return_token_ids` (vLLM's
//! names). Fields with no effect here are accepted only at the value that means "off"
//! (`n: 1`, `presence_penalty: 0`, `frequency_penalty: 0`, `logprobs: false`/`null`,
//! `echo: false`, `best_of: 1`, `response_format: {"type": "text"}`); `user` and `metadata`
//! are ignored. Any other field is refused with 400, never silently dropped.
//!
//! Why these types are ours and not `async-openai`'s: its request types are written for a
//! client (they serialise what a caller sets); deserialising with them drops unknown fields
//! and fields we cannot honour without a trace, and has no place for vLLM's extras, so a
//! request with `n: 2` or a misspelt field would be served as if it said something else.
//! Here every body is `deny_unknown_fields` and each field is mapped or refused by name.

use faasmoe_proto::generate::{ChatMessage, FinishReason, GenerateRequest, GenerateResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and `"usage": null` on the others).
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The content of a chat message: a string or a list of `{"type": "text", "text": …}` parts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts; only text parts are supported.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    /// Must be `"text"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// One message of `messages`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool` (the chat template decides what it accepts).
    pub role: String,
    /// The text (`null` only for an assistant turn without text: refused here).
    #[serde(default)]
    pub content: Option<Content>,
    /// Ignored by Qwen's templates: refused unless absent.
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatCompletionRequest {
    /// The served model's id (`GET /v1/models`).
    pub model: String,
    /// The conversation, rendered by the checkpoint's chat template.
    pub messages: Vec<Message>,
    /// Most tokens to generate (deprecated name).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Most tokens to generate.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature (0: greedy).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Extra (vLLM): sample among the `top_k` most likely tokens.
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Seed of the sampler.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Extra (vLLM): add `token_ids` to each choice (each streamed chunk too) and, in a
    /// non-streamed response, the prompt's ids (`prompt_token_ids`: in the choice of a
    /// completion, at the top level of a chat completion, as vLLM places them).
    #[serde(default)]
    pub return_token_ids: Option<bool>,
    /// Everything else: checked by [`check_other`].
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `prompt` of a completion: text or token ids, alone or as a list of one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// A batch of texts (only one is supported).
    Texts(Vec<String>),
    /// A batch of token id lists (only one is supported).
    IdLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CompletionRequest {
    /// The served model's id.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Most tokens to generate (OpenAI's default for completions: 16).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (0: greedy).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Extra (vLLM): sample among the `top_k` most likely tokens.
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Seed of the sampler.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Extra (vLLM): add `token_ids` to each choice (each streamed chunk too) and, in a
    /// non-streamed response, the prompt's ids (`prompt_token_ids`: in the choice of a
    /// completion, at the top level of a chat completion, as vLLM places them).
    #[serde(default)]
    pub return_token_ids: Option<bool>,
    /// Everything else: checked by [`check_other`].
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// OpenAI's default `max_tokens` of `/v1/completions`.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

/// Fields accepted and ignored.
const IGNORED: [&str; 2] = ["user", "metadata"];

/// Refuses every field of `other` that does not have its "off" value (see the module doc).
pub fn check_other(other: &Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in other {
        let off = match k.as_str() {
            k if IGNORED.contains(&k) => true,
            "n" | "best_of" => v.is_null() || v.as_u64() == Some(1),
            "presence_penalty" | "frequency_penalty" => v.is_null() || v.as_f64() == Some(0.0),
            "logprobs" | "echo" | "parallel_tool_calls" => v.is_null() || v == &json!(false),
            "response_format" => v.is_null() || v == &json!({"type": "text"}),
            "tools" | "functions" | "logit_bias" => {
                v.is_null()
                    || v.as_array().is_some_and(|a| a.is_empty())
                    || v.as_object().is_some_and(|o| o.is_empty())
            }
            _ => false,
        };
        if !off {
            return Err(ApiError::bad_param(
                k,
                format!("`{k}` = {v} is not supported by faasmoe"),
            ));
        }
    }
    Ok(())
}

fn stop_vec(stop: Option<Stop>) -> Option<Vec<String>> {
    stop.map(Stop::into_vec).filter(|v| !v.is_empty())
}

impl ChatCompletionRequest {
    /// Our request: `messages` as role/content pairs (text parts joined with newlines, as
    /// vLLM does), the sampling fields as they are.
    pub fn to_generate(&self) -> Result<GenerateRequest, ApiError> {
        check_other(&self.other)?;
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            if m.name.is_some() {
                return Err(ApiError::bad_param(
                    &format!("messages[{i}].name"),
                    "`name` is not supported by faasmoe",
                ));
            }
            let content = match &m.content {
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut texts = Vec::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => texts.push(t.as_str()),
                            (kind, _) => {
                                return Err(ApiError::bad_param(
                                    &format!("messages[{i}].content"),
                                    format!(
                                    "content parts of type `{kind}` are not supported (only text)"
                                ),
                                ))
                            }
                        }
                    }
                    texts.join("\n")
                }
                None => {
                    return Err(ApiError::bad_param(
                        &format!("messages[{i}].content"),
                        "`content` is required",
                    ))
                }
            };
            messages.push(ChatMessage {
                role: m.role.clone(),
                content,
            });
        }
        Ok(GenerateRequest {
            messages: Some(messages),
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: stop_vec(self.stop.clone()),
            stream: Some(self.stream.unwrap_or(false)),
            ..Default::default()
        })
    }
}

impl CompletionRequest {
    /// Our request: a text prompt as `prompt`, token ids as `input_ids`.
    pub fn to_generate(&self) -> Result<GenerateRequest, ApiError> {
        check_other(&self.other)?;
        let one = || ApiError::bad_param("prompt", "faasmoe takes one prompt per request");
        let (prompt, input_ids) = match &self.prompt {
            Prompt::Text(t) => (Some(t.clone()), None),
            Prompt::Ids(ids) => (None, Some(ids.clone())),
            Prompt::Texts(v) if v.len() == 1 => (Some(v[0].clone()), None),
            Prompt::IdLists(v) if v.len() == 1 => (None, Some(v[0].clone())),
            _ => return Err(one()),
        };
        Ok(GenerateRequest {
            prompt,
            input_ids,
            max_tokens: Some(self.max_tokens.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS)),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: stop_vec(self.stop.clone()),
            stream: Some(self.stream.unwrap_or(false)),
            ..Default::default()
        })
    }
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

impl Endpoint {
    /// The label in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completions => "completions",
        }
    }

    /// The id prefix (`chatcmpl-`, `cmpl-`).
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completions => "cmpl-",
        }
    }
}

/// OpenAI's `finish_reason`; a cancelled sequence (request lifetime limit) is `"abort"` as
/// in vLLM.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "abort",
    }
}

/// The `usage` object.
pub fn usage(r: &GenerateResponse) -> Value {
    json!({
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
        "total_tokens": r.usage.prompt_tokens + r.usage.completion_tokens,
    })
}

/// Seconds since the Unix epoch (`created`).
pub fn now_unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The non-streaming response body.
pub fn response_body(
    ep: Endpoint,
    id: &str,
    model: &str,
    r: &GenerateResponse,
    token_ids: bool,
) -> Value {
    let mut choice = match ep {
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": null,
            "finish_reason": finish_reason(r.finish_reason),
        }),
        Endpoint::Completions => json!({
            "index": 0,
            "text": r.text,
            "logprobs": null,
            "finish_reason": finish_reason(r.finish_reason),
        }),
    };
    if token_ids {
        choice["token_ids"] = json!(r.token_ids);
        // As vLLM: a completion choice carries its prompt's ids, a chat response carries
        // them at the top level.
        if ep == Endpoint::Completions {
            choice["prompt_token_ids"] = json!(r.prompt_token_ids);
        }
    }
    let mut body = json!({
        "id": id,
        "object": if ep == Endpoint::Chat { "chat.completion" } else { "text_completion" },
        "created": now_unix_s(),
        "model": model,
        "choices": [choice],
        "usage": usage(r),
    });
    if token_ids && ep == Endpoint::Chat {
        body["prompt_token_ids"] = json!(r.prompt_token_ids);
    }
    body
}

/// One streamed chunk: `delta` text (`role` too on the chat's first chunk), an optional
/// `finish_reason`, `usage: null` when usage comes last.
#[allow(clippy::too_many_arguments)]
pub fn chunk_body(
    ep: Endpoint,
    id: &str,
    model: &str,
    created: u64,
    text: Option<&str>,
    first: bool,
    finish: Option<FinishReason>,
    token_ids: Option<&[u32]>,
    include_usage: bool,
) -> Value {
    let mut choice = match ep {
        Endpoint::Chat => {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            json!({"index": 0, "delta": delta, "logprobs": null,
                   "finish_reason": finish.map(finish_reason)})
        }
        Endpoint::Completions => json!({
            "index": 0, "text": text.unwrap_or(""), "logprobs": null,
            "finish_reason": finish.map(finish_reason)
        }),
    };
    if let Some(ids) = token_ids {
        choice["token_ids"] = json!(ids);
    }
    let mut v = json!({
        "id": id,
        "object": if ep == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
    });
    if include_usage {
        v["usage"] = Value::Null;
    }
    v
}

/// The last chunk when `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk(
    ep: Endpoint,
    id: &str,
    model: &str,
    created: u64,
    r: &GenerateResponse,
) -> Value {
    json!({
        "id": id,
        "object": if ep == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<GenerateRequest, ApiError> {
        serde_json::from_value::<ChatCompletionRequest>(v)
            .map_err(|e| ApiError::bad_request(e.to_string()))?
            .to_generate()
    }

    #[test]
    fn chat_fields_map_and_unsupported_ones_are_refused() {
        let g = chat(json!({"model": "m", "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 5, "max_tokens": 9, "temperature": 0, "stop": "x",
            "top_k": 3, "n": 1, "user": "u", "presence_penalty": 0}))
        .unwrap();
        let m = g.messages.unwrap();
        assert_eq!(
            (m[1].role.as_str(), m[1].content.as_str()),
            ("user", "a\nb")
        );
        assert_eq!(
            (g.max_tokens, g.top_k, g.stop, g.stream),
            (Some(5), Some(3), Some(vec!["x".to_string()]), Some(false))
        );
        for bad in [
            json!({"n": 2}),
            json!({"logprobs": true}),
            json!({"tools": [{"type": "function"}]}),
            json!({"frequency_penalty": 0.5}),
            json!({"whatever": 1}),
        ] {
            let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "a"}]});
            for (k, x) in bad.as_object().unwrap() {
                v[k] = x.clone();
            }
            let e = chat(v).unwrap_err();
            assert!(
                matches!(e, ApiError::BadRequest { param: Some(_), .. }),
                "{e:?}"
            );
        }
        let e = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        );
        assert!(e.is_err());
    }

    #[test]
    fn completion_prompts_become_text_or_ids() {
        let c = |v: Value| {
            serde_json::from_value::<CompletionRequest>(v)
                .unwrap()
                .to_generate()
        };
        let g = c(json!({"model": "m", "prompt": [1, 2, 3]})).unwrap();
        assert_eq!(
            (g.input_ids, g.max_tokens),
            (Some(vec![1, 2, 3]), Some(COMPLETIONS_DEFAULT_MAX_TOKENS))
        );
        let g = c(json!({"model": "m", "prompt": ["hi"], "max_tokens": 4})).unwrap();
        assert_eq!((g.prompt.as_deref(), g.max_tokens), (Some("hi"), Some(4)));
        assert!(c(json!({"model": "m", "prompt": ["a", "b"]})).is_err());
        assert!(c(json!({"model": "m", "prompt": "a", "echo": true})).is_err());
    }
}
