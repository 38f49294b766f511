//! The client API: a NATS request on `faasmoe.v1.generate.<tenant>`.
//!
//! Body JSON (`nats req` and any language work) or msgpack (header
//! `Content-Type: application/msgpack`), see [`faasmoe_proto::generate`]. The reply is a
//! [`GenerateResponse`], or with `stream: true` a [`StreamMessage`] per token chunk on the
//! reply inbox and a final `done` message. Failures are typed replies
//! (`{"error": {"code", "message"}}`), never a silent timeout.
//!
//! A streaming client that goes away stops its sequence: every chunk is sent as a NATS
//! request to the client's inbox, and *no responders* means nobody listens any more.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faasmoe_model::GenerationConfig;
use faasmoe_proto::generate::{
    decode_generate, encode_body, ClientError, ClientErrorCode, ErrorReply, FinishReason,
    GenerateRequest, GenerateResponse, StreamChunk, StreamMessage, Timings, Usage, CONTENT_TYPE,
};
use faasmoe_proto::subject;
use faasmoe_telemetry::metrics;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{info, info_span, warn, Instrument};

use crate::completion::CompletionText;
use crate::engine::{EngineHandle, Finish, SeqEvent, Submission};
use crate::quota::QuotaGate;
use crate::sampling::SamplingParams;
use crate::tokenizer::QwenTokenizer;

/// Defaults and limits of the API.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Tenants served: `None` all (`faasmoe.v1.generate.*`, shared mode), else these only
    /// (private mode).
    pub tenants: Option<Vec<String>>,
    /// Queue group shared by controllers serving the same tenants.
    pub queue_group: String,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: u32,
    /// Context length (prompt + generated), tokens.
    pub max_context: usize,
    /// Vocabulary size (input_ids check).
    pub vocab_size: usize,
    /// Sampling defaults (`generation_config.json`).
    pub generation: GenerationConfig,
    /// Longest a request may run from its arrival; then its sequence is cancelled and the
    /// reply (partial text) says `finish_reason: "cancelled"`. `None`: no limit.
    pub max_request: Option<std::time::Duration>,
    /// Pass roles outside [`CHAT_ROLES`] to the chat template (as vLLM does) instead of
    /// refusing them; the template may still refuse them itself.
    pub allow_custom_roles: bool,
}

/// Chat roles accepted in `messages` (OpenAI's, as Qwen's ChatML renders them); any other
/// role is a `bad_request` unless [`ApiSettings::allow_custom_roles`].
pub const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Everything a request handler needs.
pub struct Api {
    pub client: async_nats::Client,
    pub engine: EngineHandle,
    pub tokenizer: Option<Arc<QwenTokenizer>>,
    pub quota: Arc<dyn QuotaGate>,
    pub settings: ApiSettings,
}

/// The NATS user of the HTTP gateway: it publishes generate requests on behalf of tenants
/// whose API keys it verified, with reply subjects in its own inbox.
pub const GATEWAY_USER: &str = "gateway";

/// Whether a request of `tenant` may be answered on `reply`: on a server that authenticates
/// its users (`auth_required` in its INFO), only in the tenant's own inbox
/// ([`subject::is_inbox_of`] for the user [`subject::tenant_user`]) or in the HTTP gateway's
/// ([`GATEWAY_USER`]), the only inboxes that the tenant's credentials, or the gateway that
/// forwards for it, can subscribe to under the project's `nats.conf`. No tenant may
/// subscribe to the gateway's inbox, so a reply there reaches no other tenant. On a server
/// without authentication (development, tests) there are no identities to keep apart.
pub fn reply_allowed(auth_required: bool, tenant: &str, reply: &str) -> bool {
    !auth_required
        || subject::is_inbox_of(reply, GATEWAY_USER)
        || subject::tenant_user(tenant).is_ok_and(|user| subject::is_inbox_of(reply, &user))
}

fn err(code: ClientErrorCode, message: impl Into<String>) -> ClientError {
    ClientError {
        code,
        message: message.into(),
    }
}

impl Api {
    /// Subscribes and serves until the subscription ends.
    pub async fn serve(self: Arc<Self>) -> anyhow::Result<()> {
        let subjects: Vec<String> = match &self.settings.tenants {
            None => vec![subject::generate_wildcard()],
            Some(ts) => ts
                .iter()
                .map(|t| subject::generate(t))
                .collect::<Result<_, _>>()?,
        };
        let mut subs = Vec::new();
        for s in &subjects {
            subs.push(
                self.client
                    .queue_subscribe(s.clone(), self.settings.queue_group.clone())
                    .await?,
            );
        }
        self.client.flush().await?;
        info!(subjects = ?subjects, "serving generate requests");
        let mut all = futures::stream::select_all(subs);
        while let Some(msg) = all.next().await {
            let api = self.clone();
            tokio::spawn(async move { api.handle(msg).await });
        }
        Ok(())
    }

    async fn handle(&self, msg: async_nats::Message) {
        let Some(reply) = msg.reply.clone() else {
            return;
        };
        let content_type = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(CONTENT_TYPE))
            .map(|v| v.as_str().to_string());
        let ct = content_type.as_deref();
        let tenant = subject::parse_generate(&msg.subject).unwrap_or_default();
        if !reply_allowed(self.client.server_info().auth_required, &tenant, &reply) {
            // Never answer into another user's inbox: a tenant could otherwise direct its
            // replies (and our errors) at another tenant. Nothing is sent.
            warn!(%tenant, reply = %reply, "dropped a generate request whose reply subject is not the tenant's inbox (the client must use the inbox prefix _INBOX.tenant-<tenant>, or be the gateway)");
            return;
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let span = info_span!("generate.request", request_id = %id, %tenant);
        async {
            let submitted = Instant::now();
            let req = match decode_generate(&msg.payload, ct) {
                Ok(r) => r,
                Err(e) => return self.reply_error(&reply, ct, e, false).await,
            };
            let stream = req.stream.unwrap_or(false);
            if let Err(e) = self
                .generate(&id, &tenant, req, &reply, ct, submitted)
                .await
            {
                warn!(code = %e.code, message = %e.message, "request failed");
                self.reply_error(&reply, ct, e, stream).await;
            }
        }
        .instrument(span)
        .await
    }

    async fn reply_error(
        &self,
        reply: &async_nats::Subject,
        ct: Option<&str>,
        e: ClientError,
        stream: bool,
    ) {
        let body = if stream {
            encode_body(&StreamMessage::Error(e), ct)
        } else {
            encode_body(&ErrorReply { error: e }, ct)
        };
        let _ = self.client.publish(reply.clone(), body).await;
    }

    fn prompt_ids(&self, req: &GenerateRequest) -> Result<Vec<u32>, ClientError> {
        let tok = || {
            self.tokenizer.as_ref().ok_or_else(|| {
                ClientError::bad_request("this model has no tokenizer.json: send `input_ids`")
            })
        };
        let ids = if let Some(ids) = &req.input_ids {
            if let Some(&t) = ids
                .iter()
                .find(|&&t| t as usize >= self.settings.vocab_size)
            {
                return Err(ClientError::bad_request(format!(
                    "input id {t} is outside the vocabulary of {}",
                    self.settings.vocab_size
                )));
            }
            ids.clone()
        } else if let Some(p) = &req.prompt {
            let t = tok()?;
            self.check_text_bytes(t, p.len())?;
            t.encode(p)
                .map_err(|e| ClientError::bad_request(e.to_string()))?
        } else if let Some(m) = &req.messages {
            let t = tok()?;
            self.check_text_bytes(t, m.iter().map(|m| m.content.len()).sum())?;
            let pairs: Vec<(&str, &str)> = m
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str()))
                .collect();
            let text = t
                .render_messages(&pairs)
                .map_err(|e| ClientError::bad_request(e.to_string()))?;
            // After rendering, so that a template's own refusal (its `raise_exception`
            // message) is the one a client sees; roles a template accepts but that no
            // OpenAI client sends are refused here.
            if let Some((i, bad)) = m.iter().enumerate().find(|(_, m)| {
                !self.settings.allow_custom_roles && !CHAT_ROLES.contains(&m.role.as_str())
            }) {
                return Err(ClientError::bad_request(format!(
                    "messages[{i}] has role `{}`; the roles are {}",
                    bad.role,
                    CHAT_ROLES.join(", ")
                )));
            }
            t.encode(&text)
                .map_err(|e| ClientError::bad_request(e.to_string()))?
        } else {
            return Err(ClientError::bad_request(
                "one of `prompt`, `messages` or `input_ids` is required",
            ));
        };
        if ids.is_empty() {
            return Err(ClientError::bad_request("the prompt encodes to no tokens"));
        }
        if ids.len() + 1 > self.settings.max_context {
            return Err(ClientError::bad_request(format!(
                "the prompt has {} tokens; the context holds {}",
                ids.len(),
                self.settings.max_context
            )));
        }
        Ok(ids)
    }

    /// Refuses, before tokenizing, a text of `bytes` bytes that cannot fit the context:
    /// one token covers at most [`QwenTokenizer::max_token_bytes`] bytes, so such a text
    /// has more tokens than the context holds (tokenizing a 7 MB prompt takes seconds).
    fn check_text_bytes(&self, tok: &QwenTokenizer, bytes: usize) -> Result<(), ClientError> {
        let limit = self
            .settings
            .max_context
            .saturating_mul(tok.max_token_bytes());
        if bytes > limit {
            return Err(ClientError::bad_request(format!(
                "the prompt has {bytes} bytes: more than the {} tokens of the context can hold (at most {} bytes per token)",
                self.settings.max_context,
                tok.max_token_bytes()
            )));
        }
        Ok(())
    }

    async fn generate(
        &self,
        id: &str,
        tenant: &str,
        req: GenerateRequest,
        reply: &async_nats::Subject,
        ct: Option<&str>,
        submitted: Instant,
    ) -> Result<(), ClientError> {
        let prompt = self.prompt_ids(&req)?;
        let max_tokens = self.max_tokens_for(&req, prompt.len())?;
        let sampling = self.sampling_for(&req);
        let ticket = self
            .quota
            .admit(tenant, prompt.len() as u32, max_tokens)
            .await?;
        let stream = req.stream.unwrap_or(false);
        let stops = req.stop.clone().unwrap_or_default();
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let ok = self.engine.submit(Submission {
            id: id.to_string(),
            tenant: tenant.to_string(),
            prompt: prompt.clone(),
            max_tokens: max_tokens as usize,
            sampling,
            seed: req.seed,
            cancel: cancel.clone(),
            events: tx,
            traceparent: faasmoe_telemetry::current_traceparent(),
        });
        if !ok {
            self.quota.settle(ticket, 0).await;
            return Err(err(ClientErrorCode::Unavailable, "the engine has stopped"));
        }
        let gone = Arc::new(AtomicBool::new(false));
        let probe = if stream {
            self.watch_client(&cancel, &gone).await
        } else {
            None
        };
        let expired = Arc::new(AtomicBool::new(false));
        let lifetime = self.settings.max_request.map(|limit| {
            let (cancel, expired) = (cancel.clone(), expired.clone());
            let left = limit.saturating_sub(submitted.elapsed());
            tokio::spawn(async move {
                tokio::time::sleep(left).await;
                expired.store(true, Ordering::Relaxed);
                cancel.store(true, Ordering::Relaxed);
            })
        });
        let out = self
            .collect(
                &mut rx,
                Collecting {
                    id,
                    text: CompletionText::new(self.tokenizer.as_deref(), &stops),
                    cancel: &cancel,
                    submitted,
                    stream: stream.then(|| (reply, probe.as_ref().map(|(p, _)| p), ct)),
                },
            )
            .await;
        let Collected {
            ids,
            text,
            queue_ms,
            ttft_ms,
            finish,
            failure,
            chunk_index,
        } = out;
        if let Some((_, watcher)) = probe {
            watcher.abort();
        }
        if let Some(timer) = lifetime {
            timer.abort();
        }
        if expired.load(Ordering::Relaxed) && failure.is_none() {
            warn!(
                limit_ms = self.settings.max_request.unwrap_or_default().as_millis() as u64,
                completion_tokens = ids.len(),
                "request reached its lifetime limit (--max-request-ms): cancelled"
            );
        }
        let processed = if failure.is_some() {
            ids.len()
        } else {
            prompt.len() + ids.len()
        };
        self.quota.settle(ticket, processed as u32).await;
        if let Some(e) = failure {
            return Err(err(e.client_code(), e.to_string()));
        }
        let done = Completed {
            id,
            prompt: &prompt,
            return_prompt: req.return_prompt_token_ids.unwrap_or(false),
            ids,
            text,
            finish,
            queue_ms,
            ttft_ms,
            submitted,
            chunk_index,
        };
        if gone.load(Ordering::Relaxed) {
            self.record_done(done);
            return Ok(());
        }
        let (response, tail) = self.record_done(done);
        let body = if stream {
            if let Some(tail) = tail {
                let _ = self
                    .client
                    .publish(reply.clone(), encode_body(&tail, ct))
                    .await;
            }
            encode_body(&StreamMessage::Done(response), ct)
        } else {
            encode_body(&response, ct)
        };
        let _ = self.client.publish(reply.clone(), body).await;
        Ok(())
    }

    /// Reads a generation's engine events until it finishes or fails: the tokens, their
    /// text (up to a stop string, which ends the sequence by setting `cancel`), the queue
    /// time and TTFT (ms since `submitted`), and for a streamed request one chunk per token
    /// sent as it comes (a client that is gone cancels the sequence).
    async fn collect<'t>(
        &self,
        rx: &mut mpsc::UnboundedReceiver<SeqEvent>,
        c: Collecting<'_, 't>,
    ) -> Collected<'t> {
        let mut out = Collected {
            ids: Vec::new(),
            text: c.text,
            queue_ms: 0.0,
            ttft_ms: 0.0,
            finish: None,
            failure: None,
            chunk_index: 0,
        };
        let mut last_token: Option<Instant> = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                SeqEvent::Admitted => out.queue_ms = c.submitted.elapsed().as_secs_f64() * 1e3,
                SeqEvent::Token(t) => {
                    let now = Instant::now();
                    if out.ids.is_empty() {
                        out.ttft_ms = c.submitted.elapsed().as_secs_f64() * 1e3;
                    }
                    if let Some(prev) = last_token.replace(now) {
                        metrics::inter_token(now - prev);
                    }
                    if out.finish.is_some() {
                        continue; // past a stop string, waiting for the cancel to land
                    }
                    out.ids.push(t);
                    match out.text.push(t) {
                        Ok(true) => {
                            out.finish = Some(FinishReason::Stop);
                            c.cancel.store(true, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => warn!(token = t, error = %e, "decoding a generated token failed"),
                    }
                    if let Some((reply, probe, ct)) = c.stream {
                        let chunk = StreamMessage::Chunk(StreamChunk {
                            id: c.id.to_string(),
                            index: out.chunk_index,
                            text: out.text.take_stream_delta(),
                            token_ids: vec![t],
                        });
                        out.chunk_index += 1;
                        if !self.send_chunk(reply, probe, &chunk, ct).await {
                            c.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                }
                SeqEvent::Finished(f) => {
                    if out.finish.is_none() {
                        out.finish = Some(match f {
                            Finish::Eos => FinishReason::Stop,
                            Finish::Length => FinishReason::Length,
                            Finish::Cancelled => FinishReason::Cancelled,
                        });
                    }
                    break;
                }
                SeqEvent::Failed(e) => {
                    out.failure = Some(e);
                    break;
                }
            }
        }
        out
    }

    /// Builds the reply of a finished generation — the response, and the stream's last text
    /// chunk if some text was still held back — and records it (metrics, the `request
    /// done` log line).
    fn record_done(&self, d: Completed<'_>) -> (GenerateResponse, Option<StreamMessage>) {
        let total_ms = d.submitted.elapsed().as_secs_f64() * 1e3;
        let (text, tail) = d.text.finish();
        let response = GenerateResponse {
            id: d.id.to_string(),
            text,
            finish_reason: d.finish.unwrap_or(FinishReason::Cancelled),
            usage: Usage {
                prompt_tokens: d.prompt.len() as u32,
                completion_tokens: d.ids.len() as u32,
            },
            timings: Timings {
                queue_ms: d.queue_ms,
                ttft_ms: d.ttft_ms,
                total_ms,
            },
            prompt_token_ids: d.return_prompt.then(|| d.prompt.to_vec()),
            token_ids: d.ids,
        };
        metrics::finished(
            response.finish_reason.as_str(),
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
            Duration::from_secs_f64(d.queue_ms / 1e3),
            Duration::from_secs_f64(d.ttft_ms / 1e3),
            Duration::from_secs_f64(total_ms / 1e3),
        );
        info!(
            prompt_tokens = response.usage.prompt_tokens,
            completion_tokens = response.usage.completion_tokens,
            ttft_ms = d.ttft_ms,
            total_ms,
            "request done"
        );
        let tail = (!tail.is_empty()).then(|| {
            StreamMessage::Chunk(StreamChunk {
                id: d.id.to_string(),
                index: d.chunk_index,
                text: tail,
                token_ids: vec![],
            })
        });
        (response, tail)
    }

    /// The completion's token budget: as vLLM, an explicit `max_tokens` beyond what the
    /// context leaves after the prompt (`prompt_len` tokens) is refused with `bad_request`;
    /// the default (`--default-max-tokens`) is clamped to it. At least 1.
    fn max_tokens_for(&self, req: &GenerateRequest, prompt_len: usize) -> Result<u32, ClientError> {
        let room = (self.settings.max_context - prompt_len) as u32;
        match req.max_tokens {
            Some(m) if m > room => Err(ClientError::bad_request(format!(
                "this model's maximum context length is {} tokens; you requested {} tokens ({prompt_len} in the prompt, {m} in the completion)",
                self.settings.max_context,
                prompt_len as u64 + m as u64,
            ))),
            Some(m) => Ok(m.max(1)),
            None => Ok(self.settings.default_max_tokens.min(room).max(1)),
        }
    }

    /// The request's sampling parameters; the ones it leaves out come from the checkpoint's
    /// `generation_config.json` when that samples (`do_sample: true`), else greedy
    /// (temperature 0, no top-k, top-p 1) — as transformers' `generate`.
    fn sampling_for(&self, req: &GenerateRequest) -> SamplingParams {
        let g = &self.settings.generation;
        let sampling_default = g.do_sample.unwrap_or(false);
        SamplingParams {
            temperature: req.temperature.unwrap_or(if sampling_default {
                g.temperature.unwrap_or(1.0)
            } else {
                0.0
            }),
            top_k: req
                .top_k
                .or(if sampling_default { g.top_k } else { None })
                .unwrap_or(0) as usize,
            top_p: req
                .top_p
                .or(if sampling_default { g.top_p } else { None })
                .unwrap_or(1.0),
        }
    }

    /// Publishes one stream message to the client's `reply` subject, naming `probe` (the
    /// inbox [`watch_client`](Self::watch_client) watches) as its reply subject when there is
    /// one. Returns whether the connection accepted it.
    async fn send_chunk(
        &self,
        reply: &async_nats::Subject,
        probe: Option<&async_nats::Subject>,
        msg: &StreamMessage,
        ct: Option<&str>,
    ) -> bool {
        let body = encode_body(msg, ct);
        let sent = match probe {
            Some(p) => {
                self.client
                    .publish_with_reply(reply.clone(), p.clone(), body)
                    .await
            }
            None => self.client.publish(reply.clone(), body).await,
        };
        sent.is_ok()
    }

    /// Watches the probe inbox that stream chunks name as their reply subject: the server
    /// answers a chunk nobody receives with *no responders*, so the sequence is cancelled.
    async fn watch_client(
        &self,
        cancel: &Arc<AtomicBool>,
        gone: &Arc<AtomicBool>,
    ) -> Option<(async_nats::Subject, tokio::task::JoinHandle<()>)> {
        let inbox = self.client.new_inbox();
        let mut sub = self.client.subscribe(inbox.clone()).await.ok()?;
        let (cancel, gone) = (cancel.clone(), gone.clone());
        let watcher = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                    gone.store(true, Ordering::Relaxed);
                    cancel.store(true, Ordering::Relaxed);
                    break;
                }
                if cancel.load(Ordering::Relaxed) {
                    break;
                }
            }
        });
        Some((inbox.into(), watcher))
    }
}

/// What [`Api::collect`] reads a generation's events with.
struct Collecting<'a, 't> {
    id: &'a str,
    /// The completion's text so far (empty), with the request's stop strings.
    text: CompletionText<'t>,
    /// Set to end the sequence (a stop string, a client gone).
    cancel: &'a AtomicBool,
    /// When the request arrived.
    submitted: Instant,
    /// For a streamed request: its reply subject, the probe inbox chunks name as theirs,
    /// and the content type.
    stream: Option<(
        &'a async_nats::Subject,
        Option<&'a async_nats::Subject>,
        Option<&'a str>,
    )>,
}

/// What [`Api::collect`] read.
struct Collected<'t> {
    ids: Vec<u32>,
    text: CompletionText<'t>,
    /// Since the request arrived, ms.
    queue_ms: f64,
    ttft_ms: f64,
    finish: Option<FinishReason>,
    failure: Option<crate::dispatch::DispatchError>,
    /// The index the stream's next chunk gets.
    chunk_index: u32,
}

/// A finished generation, handed from `Api::generate`'s token loop to the reply.
struct Completed<'a> {
    id: &'a str,
    prompt: &'a [u32],
    /// The request set `return_prompt_token_ids`.
    return_prompt: bool,
    ids: Vec<u32>,
    text: CompletionText<'a>,
    finish: Option<FinishReason>,
    /// Since the request arrived, ms.
    queue_ms: f64,
    ttft_ms: f64,
    submitted: Instant,
    /// The index the stream's next chunk gets.
    chunk_index: u32,
}

#[cfg(test)]
mod tests {
    use super::reply_allowed;

    #[test]
    fn replies_go_only_to_the_tenants_inbox_when_the_server_authenticates() {
        assert!(reply_allowed(true, "alice", "_INBOX.tenant-alice.Xy12.3"));
        assert!(!reply_allowed(true, "alice", "_INBOX.tenant-bob.Xy12.3"));
        assert!(!reply_allowed(true, "alice", "_INBOX.Xy12.3"));
        assert!(!reply_allowed(true, "alice", "faasmoe.v1.expert.m.0.1"));
        assert!(!reply_allowed(true, "", "_INBOX.tenant-.x"));
        assert!(reply_allowed(false, "alice", "_INBOX.Xy12.3"));
        assert!(reply_allowed(true, "alice", "_INBOX.gateway.Xy12.3"));
        assert!(!reply_allowed(true, "alice", "_INBOX.gatewayx.Xy12.3"));
        assert!(!reply_allowed(true, "alice", "_INBOX.gateway"));
    }
}
