//! The OpenAI-compatible HTTP gateway of faasmoe (`faasmoe-gateway`).
//!
//! It serves `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health` and `GET /metrics`, and translates each generation into one request on the
//! controllers' NATS client API (`faasmoe.v1.generate.<tenant>`, the bodies of
//! [`faasmoe_proto::generate`]). It is a separate process so that it scales on its own and
//! the controllers stay NATS-only.
//!
//! **Tenants.** A caller sends `Authorization: Bearer <api key>`; the key, issued by
//! `faasmoe tenant create`, names its tenant and is checked against the bcrypt hash in the
//! tenant's record ([`faasmoe_broker::TenantStore::verify_api_key`]); verified keys are kept
//! in memory for [`Settings::key_cache_s`]. The gateway connects to NATS as the user
//! `gateway`, may publish every tenant's generate subject and subscribe only to its own inbox
//! `_INBOX.gateway.>`; the controller derives the tenant from the subject, so the tenant's
//! quota and isolation hold for HTTP callers as for NATS ones.
//!
//! **Streaming.** With `stream: true` the gateway subscribes an inbox of its own for the
//! request and turns the controller's [`StreamMessage`]s into server-sent events. The
//! controller sends each chunk as a request whose *no responders* answer means the client is
//! gone; when the HTTP client disconnects, the event stream is dropped with its
//! subscription, and the next chunk cancels the sequence, as for a NATS client that goes away.
//!
//! It does not tokenize, render chat templates or sample (the controller does), and it does
//! not know tensors.

pub mod error;
pub mod metrics;
pub mod openai;
mod relay;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use faasmoe_broker::TenantStore;
use faasmoe_proto::connection::NatsArgs;
use faasmoe_proto::generate::{
    ClientError, ErrorReply, GenerateRequest, GenerateResponse, StreamMessage,
};
use faasmoe_proto::stats::ControllerStats;
use faasmoe_proto::subject;
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, CompletionRequest, Endpoint};
use crate::relay::*;

/// The gateway's settings (flags, each also from the environment).
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Where NATS is and as whom to connect (user `gateway`).
    #[command(flatten)]
    pub nats: NatsArgs,
    /// HTTP listen address (port 0: a free one; the address is printed on stdout).
    #[arg(long, env = "FAASMOE_GATEWAY_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Longest wait for a controller's answer (non-streaming) or the next stream message, ms.
    #[arg(
        long,
        env = "FAASMOE_GATEWAY_REQUEST_TIMEOUT_MS",
        default_value_t = 600_000
    )]
    pub request_timeout_ms: u64,
    /// How long a verified API key is trusted without checking the tenant store again, s.
    #[arg(long, env = "FAASMOE_GATEWAY_KEY_CACHE_S", default_value_t = 60)]
    pub key_cache_s: u64,
    /// How often the controllers are asked for their stats (health, models), ms.
    #[arg(
        long,
        env = "FAASMOE_GATEWAY_HEALTH_INTERVAL_MS",
        default_value_t = 2_000
    )]
    pub health_interval_ms: u64,
    /// `Retry-After` of a 429 (quota exceeded), s.
    #[arg(long, env = "FAASMOE_GATEWAY_RETRY_AFTER_S", default_value_t = 1)]
    pub retry_after_s: u64,
}

/// What the controllers said when last asked.
#[derive(Debug, Clone, Default)]
struct Health {
    /// Model ids they serve.
    models: Vec<String>,
    /// How many answered.
    controllers: usize,
    /// When one last answered.
    at: Option<Instant>,
}

/// The gateway's shared state.
pub struct Gateway {
    client: async_nats::Client,
    settings: Settings,
    store: tokio::sync::OnceCell<TenantStore>,
    keys: Mutex<HashMap<String, (String, Instant)>>,
    health: RwLock<Health>,
    prometheus: PrometheusHandle,
}

/// The id of an HTTP request: the caller's `x-request-id`, else a fresh one; echoed in the
/// response's `x-request-id` and used in the completion's `id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

const X_REQUEST_ID: &str = "x-request-id";

impl Gateway {
    /// A gateway over `client` (connected as `gateway`, inbox prefix `_INBOX.gateway`).
    pub fn new(
        client: async_nats::Client,
        settings: Settings,
        prometheus: PrometheusHandle,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            settings,
            store: tokio::sync::OnceCell::new(),
            keys: Mutex::new(HashMap::new()),
            health: RwLock::new(Health::default()),
            prometheus,
        })
    }

    /// The HTTP routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics_text))
            .fallback(|req: Request| async move {
                ApiError::NoRoute(format!("{} {}", req.method(), req.uri().path()))
            })
            .layer(axum::middleware::from_fn(request_id))
            .with_state(self.clone())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.request_timeout_ms)
    }

    /// Asks every controller for its stats (`faasmoe.v1.admin.controller_stats`) and keeps
    /// the models they name. Waits up to 1 s for the first answer, then 100 ms for others.
    pub async fn probe_controllers(&self) {
        let Ok(subj) = subject::admin("controller_stats") else {
            return;
        };
        let inbox = self.client.new_inbox();
        let Ok(mut sub) = self.client.subscribe(inbox.clone()).await else {
            return;
        };
        if self
            .client
            .publish_with_reply(subj, inbox, Bytes::new())
            .await
            .is_err()
        {
            return;
        }
        let mut answers: Vec<ControllerStats> = Vec::new();
        let mut wait = Duration::from_secs(1);
        while let Ok(Some(m)) = tokio::time::timeout(wait, sub.next()).await {
            if m.status.is_some() {
                break; // no responders
            }
            match ControllerStats::decode(&m.payload) {
                Ok(s) => answers.push(s),
                Err(e) => warn!(error = %e, "a controller's controller_stats does not parse"),
            }
            wait = Duration::from_millis(100);
        }
        let mut models: Vec<String> = answers.iter().map(|s| s.model.clone()).collect();
        models.sort();
        models.dedup();
        let mut h = self.health.write().expect("health lock");
        if !answers.is_empty() {
            h.at = Some(Instant::now());
        }
        h.controllers = answers.len();
        h.models = models;
    }

    fn healthy(&self) -> Option<Health> {
        let h = self.health.read().expect("health lock").clone();
        let fresh = Duration::from_millis(self.settings.health_interval_ms * 3 + 1_000);
        (h.controllers > 0 && h.at.is_some_and(|t| t.elapsed() < fresh)).then_some(h)
    }

    /// The served models, asking the controllers once more when none answered recently.
    async fn served_models(&self) -> Result<Vec<String>, ApiError> {
        if self.healthy().is_none() {
            self.probe_controllers().await;
        }
        self.healthy()
            .map(|h| h.models)
            .ok_or_else(|| ApiError::Unavailable("no controller answers".into()))
    }

    async fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.served_models().await?.iter().any(|m| m == model) {
            Ok(())
        } else {
            Err(ApiError::ModelNotFound(model.into()))
        }
    }

    async fn tenant_store(&self) -> Result<&TenantStore, ApiError> {
        self.store
            .get_or_try_init(|| TenantStore::open_default(self.client.clone()))
            .await
            .map_err(|e| ApiError::Unavailable(format!("the tenant store cannot be read: {e}")))
    }

    /// The tenant of the request's `Authorization: Bearer` key.
    ///
    /// Errors: 401 for a missing or wrong key, 503 when the tenant store cannot be read.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "missing API key: send `Authorization: Bearer <key>` with the key `faasmoe tenant create` printed".into(),
                )
            })?;
        let ttl = Duration::from_secs(self.settings.key_cache_s);
        if let Some((tenant, at)) = self.keys.lock().expect("key cache").get(key) {
            if at.elapsed() < ttl {
                return Ok(tenant.clone());
            }
        }
        let store = self.tenant_store().await?;
        match store.verify_api_key(key).await {
            Ok(Some(tenant)) => {
                let mut keys = self.keys.lock().expect("key cache");
                keys.retain(|_, (_, at)| at.elapsed() < ttl);
                keys.insert(key.to_string(), (tenant.clone(), Instant::now()));
                Ok(tenant)
            }
            Ok(None) => Err(ApiError::Unauthorized("incorrect API key provided".into())),
            Err(e) => Err(ApiError::Unavailable(format!(
                "the tenant store cannot be read: {e}"
            ))),
        }
    }

    fn client_error(&self, e: ClientError) -> ApiError {
        ApiError::from_client(e, self.settings.retry_after_s)
    }

    /// Runs one generation for `tenant` and writes the OpenAI response (JSON or events).
    async fn generate(
        self: &Arc<Self>,
        g: Generation,
        req: GenerateRequest,
    ) -> Result<Response, ApiError> {
        let subj = subject::generate(&g.tenant)
            .map_err(|e| ApiError::Internal(format!("tenant subject: {e}")))?;
        let body = Bytes::from(serde_json::to_vec(&req).expect("requests serialise"));
        let stream = req.stream.unwrap_or(false);
        let running = Running::start();
        if !stream {
            let r = async_nats::Request::new()
                .payload(body)
                .timeout(Some(self.timeout()));
            let msg = self.client.send_request(subj, r).await.map_err(|e| {
                use async_nats::client::RequestErrorKind as K;
                match e.kind() {
                    K::NoResponders => {
                        ApiError::Unavailable(format!("no controller serves tenant `{}`", g.tenant))
                    }
                    K::TimedOut => {
                        ApiError::Unavailable("the controller did not answer in time".into())
                    }
                    _ => ApiError::Unavailable(format!("NATS request failed: {e}")),
                }
            })?;
            let r = decode_reply(&msg.payload).map_err(|e| self.client_error(e))?;
            record_finished(&r, g.t0);
            let n = r.token_ids.len();
            if n > 1 {
                let per = (r.timings.total_ms - r.timings.ttft_ms).max(0.0) / (n - 1) as f64;
                for _ in 1..n {
                    metrics::inter_token(Duration::from_secs_f64(per / 1e3));
                }
            }
            drop(running);
            return Ok(Json(openai::response_body(
                g.endpoint,
                &g.id,
                &g.model,
                &r,
                g.token_ids,
            ))
            .into_response());
        }
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| ApiError::Unavailable(format!("NATS subscribe failed: {e}")))?;
        self.client
            .publish_with_reply(subj, inbox, body)
            .await
            .map_err(|e| ApiError::Unavailable(format!("NATS publish failed: {e}")))?;
        // The first message decides the status: an error (bad request, quota, no function)
        // is an HTTP error, anything else starts the event stream.
        let first = next_stream_message(&mut sub, self.timeout(), &g.tenant).await?;
        if let StreamMessage::Error(e) = first {
            return Err(self.client_error(e));
        }
        let state = StreamState {
            sub,
            pending: Some(first),
            g,
            timeout: self.timeout(),
            created: openai::now_unix_s(),
            started: false,
            done: false,
            last_chunk: None,
            _running: running,
        };
        let events = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            let msg = match st.pending.take() {
                Some(m) => Ok(m),
                None => next_stream_message(&mut st.sub, st.timeout, &st.g.tenant).await,
            };
            let events = st.events(msg);
            Some((
                futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>)),
                st,
            ))
        })
        .flatten();
        Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response())
    }
}

/// Sets [`RequestId`] and the `x-request-id` response header; counts the request.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map(String::from)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let endpoint = match req.uri().path() {
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/models" => "models",
        "/health" => "health",
        "/metrics" => "metrics",
        _ => "other",
    };
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(X_REQUEST_ID, v);
    }
    metrics::http(endpoint, resp.status().as_u16());
    resp
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::bad_request(format!("the body is not valid JSON: {e}"))
        } else {
            ApiError::bad_request(format!("invalid request: {e}"))
        }
    })
}

/// What the chat and completion endpoints need of their request bodies.
trait EndpointRequest: serde::de::DeserializeOwned {
    const ENDPOINT: Endpoint;
    fn model(&self) -> &str;
    fn include_usage(&self) -> bool;
    fn return_token_ids(&self) -> bool;
    fn to_generate(&self) -> Result<GenerateRequest, ApiError>;
}

macro_rules! endpoint_request {
    ($ty:ty, $endpoint:expr) => {
        impl EndpointRequest for $ty {
            const ENDPOINT: Endpoint = $endpoint;
            fn model(&self) -> &str {
                &self.model
            }
            fn include_usage(&self) -> bool {
                self.stream_options
                    .as_ref()
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false)
            }
            fn return_token_ids(&self) -> bool {
                self.return_token_ids.unwrap_or(false)
            }
            fn to_generate(&self) -> Result<GenerateRequest, ApiError> {
                <$ty>::to_generate(self)
            }
        }
    };
}
endpoint_request!(ChatCompletionRequest, Endpoint::Chat);
endpoint_request!(CompletionRequest, Endpoint::Completions);

/// Authenticates, parses a `R` body, checks the model and generates (streamed or not).
async fn serve<R: EndpointRequest>(
    gw: Arc<Gateway>,
    rid: String,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = async {
        let t0 = Instant::now();
        let tenant = gw.authenticate(&headers).await?;
        let req: R = parse_json(&body)?;
        let mut g = req.to_generate()?;
        if req.return_token_ids() {
            g.return_prompt_token_ids = Some(true);
        }
        gw.check_model(req.model()).await?;
        let gen = Generation {
            endpoint: R::ENDPOINT,
            id: format!("{}{rid}", R::ENDPOINT.id_prefix()),
            model: req.model().to_string(),
            tenant,
            include_usage: req.include_usage(),
            token_ids: req.return_token_ids(),
            t0,
        };
        gw.generate(gen, g).await
    }
    .await;
    r.unwrap_or_else(|e| {
        let what = match R::ENDPOINT {
            Endpoint::Chat => "chat completion failed",
            Endpoint::Completions => "completion failed",
        };
        warn!(request_id = %rid, status = e.status().as_u16(), error = %e, "{what}");
        e.into_response()
    })
}

async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    Extension(RequestId(rid)): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve::<ChatCompletionRequest>(gw, rid, headers, body).await
}

async fn completions(
    State(gw): State<Arc<Gateway>>,
    Extension(RequestId(rid)): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve::<CompletionRequest>(gw, rid, headers, body).await
}

async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let r = async {
        gw.authenticate(&headers).await?;
        let data: Vec<Value> = gw
            .served_models()
            .await?
            .into_iter()
            .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "faasmoe"}))
            .collect();
        Ok::<_, ApiError>(Json(json!({"object": "list", "data": data})).into_response())
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.healthy() {
        Some(h) => Json(json!({"status": "ok", "controllers": h.controllers, "models": h.models}))
            .into_response(),
        None => ApiError::Unavailable("no controller answers".into()).into_response(),
    }
}

async fn metrics_text(State(gw): State<Arc<Gateway>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&gw.prometheus),
    )
        .into_response()
}

/// Errors of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// NATS could not be reached.
    #[error(transparent)]
    Connect(#[from] faasmoe_proto::connection::ConnectionError),
    /// The listen address could not be bound, or serving failed.
    #[error("HTTP server on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The metrics recorder could not be installed.
    #[error("metrics: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
}

/// Connects to NATS, starts the controller probe, binds `settings.listen`, prints
/// `faasmoe-gateway listening on http://<addr>` on stdout and serves until `shutdown`
/// completes.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let prometheus = metrics::install()?;
    let client = settings.nats.connect("faasmoe-gateway").await?;
    let addr = settings.listen;
    let gw = Gateway::new(client, settings, prometheus);
    {
        let gw = gw.clone();
        tokio::spawn(async move {
            let every = Duration::from_millis(gw.settings.health_interval_ms.max(100));
            loop {
                gw.probe_controllers().await;
                tokio::time::sleep(every).await;
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Http { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| RunError::Http { addr, source })?;
    println!("faasmoe-gateway listening on http://{local}");
    info!(%local, "gateway listening");
    axum::serve(listener, gw.router())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| RunError::Http {
            addr: local,
            source,
        })
}
