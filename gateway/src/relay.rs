//! What the gateway makes of a controller's replies: one generation's context, a
//! non-streaming reply decoded or its typed error, and the server-sent event stream of a
//! streaming one (OpenAI chunks, usage, `[DONE]`).

use super::*;

/// One generation's context.
pub(crate) struct Generation {
    pub(crate) endpoint: Endpoint,
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) tenant: String,
    pub(crate) include_usage: bool,
    pub(crate) token_ids: bool,
    pub(crate) t0: Instant,
}

/// Counts a request in [`metrics::RUNNING`] while alive.
pub(crate) struct Running;

impl Running {
    pub(crate) fn start() -> Self {
        ::metrics::gauge!(metrics::RUNNING).increment(1.0);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        ::metrics::gauge!(metrics::RUNNING).decrement(1.0);
    }
}

pub(crate) fn record_finished(r: &GenerateResponse, t0: Instant) {
    metrics::finished(
        openai::finish_reason(r.finish_reason),
        r.usage.prompt_tokens,
        r.usage.completion_tokens,
        Duration::from_secs_f64(r.timings.queue_ms.max(0.0) / 1e3),
        Duration::from_secs_f64(r.timings.ttft_ms.max(0.0) / 1e3),
        t0.elapsed(),
    );
}

/// A non-streaming reply: the response or a typed error.
pub(crate) fn decode_reply(payload: &[u8]) -> Result<GenerateResponse, ClientError> {
    if let Ok(e) = serde_json::from_slice::<ErrorReply>(payload) {
        return Err(e.error);
    }
    serde_json::from_slice(payload).map_err(|e| ClientError {
        code: faasmoe_proto::generate::ClientErrorCode::Internal,
        message: format!("the controller's reply is not a response: {e}"),
    })
}

pub(crate) async fn next_stream_message(
    sub: &mut async_nats::Subscriber,
    timeout: Duration,
    tenant: &str,
) -> Result<StreamMessage, ApiError> {
    match tokio::time::timeout(timeout, sub.next()).await {
        Err(_) => Err(ApiError::Unavailable(
            "the controller did not answer in time".into(),
        )),
        Ok(None) => Err(ApiError::Unavailable("the NATS subscription ended".into())),
        Ok(Some(m)) if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) => Err(
            ApiError::Unavailable(format!("no controller serves tenant `{tenant}`")),
        ),
        Ok(Some(m)) => serde_json::from_slice(&m.payload).map_err(|e| {
            ApiError::Internal(format!("the controller's stream message is malformed: {e}"))
        }),
    }
}

/// The state of one event stream; dropping it (the HTTP client went away) drops the
/// subscription, so the controller's next chunk finds no responder and cancels.
pub(crate) struct StreamState {
    pub(crate) sub: async_nats::Subscriber,
    pub(crate) pending: Option<StreamMessage>,
    pub(crate) g: Generation,
    pub(crate) timeout: Duration,
    pub(crate) created: u64,
    pub(crate) started: bool,
    pub(crate) done: bool,
    pub(crate) last_chunk: Option<Instant>,
    pub(crate) _running: Running,
}

impl StreamState {
    pub(crate) fn data(v: &Value) -> Event {
        Event::default().data(v.to_string())
    }

    pub(crate) fn chunk(
        &self,
        text: Option<&str>,
        first: bool,
        finish: Option<faasmoe_proto::generate::FinishReason>,
        ids: Option<&[u32]>,
    ) -> Event {
        Self::data(&openai::chunk_body(
            self.g.endpoint,
            &self.g.id,
            &self.g.model,
            self.created,
            text,
            first,
            finish,
            ids.filter(|_| self.g.token_ids),
            self.g.include_usage,
        ))
    }

    pub(crate) fn events(&mut self, msg: Result<StreamMessage, ApiError>) -> Vec<Event> {
        let mut out = Vec::new();
        if !self.started && self.g.endpoint == Endpoint::Chat {
            out.push(self.chunk(Some(""), true, None, None));
        }
        self.started = true;
        match msg {
            Ok(StreamMessage::Chunk(c)) => {
                if !c.token_ids.is_empty() {
                    let now = Instant::now();
                    if let Some(last) = self.last_chunk.replace(now) {
                        metrics::inter_token(now - last);
                    }
                }
                if !c.text.is_empty() || (self.g.token_ids && !c.token_ids.is_empty()) {
                    out.push(self.chunk(Some(&c.text), false, None, Some(&c.token_ids)));
                }
            }
            Ok(StreamMessage::Done(r)) => {
                record_finished(&r, self.g.t0);
                let text = (self.g.endpoint == Endpoint::Completions).then_some("");
                out.push(self.chunk(text, false, Some(r.finish_reason), None));
                if self.g.include_usage {
                    out.push(Self::data(&openai::usage_chunk(
                        self.g.endpoint,
                        &self.g.id,
                        &self.g.model,
                        self.created,
                        &r,
                    )));
                }
                out.push(Event::default().data("[DONE]"));
                self.done = true;
            }
            Ok(StreamMessage::Error(e)) => {
                let e = ApiError::from_client(e, 0);
                out.push(Self::data(&json!({"error": e.body()})));
                out.push(Event::default().data("[DONE]"));
                self.done = true;
            }
            Err(e) => {
                out.push(Self::data(&json!({"error": e.body()})));
                out.push(Event::default().data("[DONE]"));
                self.done = true;
            }
        }
        out
    }
}
