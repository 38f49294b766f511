//! Expert dispatch: the routed part of each MoE layer, sent to the expert functions.
//!
//! For one [`RoutedBatch`] the NATS dispatcher groups the rows by function (the deployment
//! [`Layout`]), packs each function's rows into one request (every row once, with its
//! experts in that function and their routing weights; `combine: true`, so the function
//! returns the weighted sum per row), sends all requests concurrently, and sums the partial
//! outputs. Bytes on the wire grow with the functions a token touches, not with top-k.
//!
//! Failure handling per request: a timeout or an error reply from a broken instance is
//! retried (the queue group picks an instance again); *no responders* means the function is
//! scaled to zero: ask the broker to activate it (cold start), bounded by the activation
//! timeout, then retry. A transient `unavailable` from the broker (function at its cap, a
//! start that failed, no broker answering yet) is retried with exponential backoff, a few
//! times, within the same activation timeout. *No responders* again after the broker said an
//! instance serves (it is draining without having said so yet, or resubscribing after a
//! reconnect) asks the broker again after a backoff, until the activation timeout.
//!
//! Connection outages: when the NATS connection comes back after being lost (nats-server
//! restarted, network cut), every expert and activation request still waiting for a reply
//! is sent again at once instead of waiting out its timeout — its request or its reply may
//! have died with the old connection. Each send has its own reply inbox, so a late reply to
//! the superseded send is dropped and the requests stay correct; a resend keeps the
//! deadline of the attempt it replaces, so no request waits past its own timeout. Outages
//! are logged with their duration.
//!
//! Activation ahead of the pass (pre-gating): at each MoE layer the engine asks
//! [`Dispatch::prefetch_depth`] how many later MoE layers to predict, applies their routers
//! to the current residual stream ([`faasmoe_model::ControlPlane::predict_experts`]) and
//! hands the predicted experts to [`Dispatch::prefetch`]. The NATS dispatcher activates, in
//! the background, the predicted functions that have not answered within
//! [`WARM_FRESH`], at most [`NatsDispatchSettings::prefetch_max_in_flight`] at once, so the
//! cold starts of later layers overlap the pass instead of following one another. When the
//! model is cold (nothing answered yet, or *no responders* within [`COLD_WINDOW`]) it asks
//! for every remaining layer at once; otherwise for
//! [`NatsDispatchSettings::prefetch_layers`]. Predictions never route: the real router
//! still decides, and a wrong guess costs one activation (an instance that idles out).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_nats::connection::State as ConnectionState;
use async_nats::{RequestError, RequestErrorKind};
use candle_core::{Device, Tensor};
use faasmoe_model::control_plane::ExpertBackend;
use faasmoe_model::{InProcessBackend, RoutedBatch};
use faasmoe_proto::activation::{ActivateReply, ActivateRequest, ActivateResult};
use faasmoe_proto::expert::{
    decode_reply, encode, ClientErrorCode, ExpertRequest, ExpertResult, RowRoutes, WireError,
};
use faasmoe_proto::layout::Layout;
use faasmoe_proto::subject::SubjectError;
use faasmoe_proto::tensor::{TensorError, WireDType, WireTensor};
use faasmoe_proto::{subject, ErrorCode, PROTOCOL_VERSION};
use futures::future::BoxFuture;
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

/// Attempts of one activation (the first included) on transient `unavailable`.
const ACTIVATION_ATTEMPTS: u32 = 5;
/// Backoff before the second activation attempt; doubled for each next one, up to
/// [`ACTIVATION_BACKOFF_MAX`].
const ACTIVATION_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest backoff between activation attempts.
const ACTIVATION_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often the dispatcher looks at its connection's state (async-nats exposes the state,
/// not a stream of changes, on a client it did not configure).
const CONNECTION_POLL: Duration = Duration::from_millis(10);
/// A function that answered within this long is taken to be warm: prefetching skips it.
pub const WARM_FRESH: Duration = Duration::from_secs(2);
/// After *no responders* on any function, the model counts as cold for this long: the
/// engine predicts every remaining layer, not just [`NatsDispatchSettings::prefetch_layers`].
pub const COLD_WINDOW: Duration = Duration::from_secs(10);

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

/// Who the rows belong to. The trace the expert requests continue is not here: it is the
/// caller's current `tracing` span (the engine step's), whose W3C `traceparent` the NATS
/// dispatcher puts in each request's headers.
#[derive(Debug, Clone, Default)]
pub struct DispatchContext {
    /// Tenants whose rows are in the batch, sorted, comma separated (e.g. `"t1,t2"`); sent
    /// as [`ExpertRequest::tenant`] for the functions' accounting and logs.
    pub tenants: String,
}

/// Computes the routed experts of a layer: `[n, hidden]` weighted sums.
///
/// **First-poll contract.** The engine overlaps the shared expert with the routed experts
/// (`engine::forward_batch`): it polls the future of [`Dispatch::routed`] once, and only if
/// that returns `Pending` computes the shared expert before awaiting it. An implementation
/// that computes remotely must therefore have handed every request of the batch to its
/// transport by the end of that first poll, or the remote work waits for the shared expert:
/// the NATS dispatcher polls all its calls together (`join_all`), and each queues its
/// request on the client's command channel in that poll (unless the channel is full, which
/// only delays it). One that computes in-process should finish in the first poll (return a
/// ready future), so that the two are not computed one after the other on the same cores.
pub trait Dispatch: Send + Sync {
    /// Returns row `i` = `Σ w · expert_e(hidden[i])` over `batch.routes[i]`.
    fn routed<'a>(
        &'a self,
        batch: &'a RoutedBatch,
        ctx: &'a DispatchContext,
    ) -> BoxFuture<'a, Result<Tensor, DispatchError>>;
    /// Counters so far.
    fn stats(&self) -> DispatchStats {
        DispatchStats::default()
    }
    /// How many MoE layers after the current one the engine should predict and pass to
    /// [`Dispatch::prefetch`]: 0 (the default) for none, `usize::MAX` for all.
    fn prefetch_depth(&self) -> usize {
        0
    }
    /// A hint that these experts, `(decoder layer, experts)`, will probably be routed to
    /// soon: a dispatcher may start their functions early. Returns at once; never fails
    /// (a wrong hint costs at most an unneeded activation). The default ignores it.
    fn prefetch(&self, _predicted: &[(usize, Vec<u32>)]) {}
}

pub use faasmoe_proto::stats::DispatchStats;

/// All experts in this process (the local-split mode, and tests).
pub struct LocalDispatch(pub InProcessBackend);

impl Dispatch for LocalDispatch {
    fn routed<'a>(
        &'a self,
        batch: &'a RoutedBatch,
        _ctx: &'a DispatchContext,
    ) -> BoxFuture<'a, Result<Tensor, DispatchError>> {
        let mut b = self.0.clone();
        let r = b.routed(batch).map_err(DispatchError::from);
        Box::pin(async move { r })
    }
}

/// Settings of [`NatsDispatch`].
#[derive(Debug, Clone)]
pub struct NatsDispatchSettings {
    /// Model id in subjects.
    pub model_id: String,
    /// The function layout (granularity).
    pub layout: Layout,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Retries after a timeout or error reply.
    pub max_retries: u32,
    /// How long to wait for the broker to activate a function.
    pub activation_timeout: Duration,
    /// Dtype of hidden states on the wire (f32 exact, bf16 half the bytes).
    pub wire_dtype: WireDType,
    /// Name of this controller (in activation requests).
    pub controller_id: String,
    /// MoE layers predicted ahead while the model is warm (see the module docs); 0 turns
    /// activation ahead of the pass off entirely.
    pub prefetch_layers: usize,
    /// Background activations from predictions in flight at once, at most.
    pub prefetch_max_in_flight: usize,
}

impl NatsDispatchSettings {
    /// Default of [`NatsDispatchSettings::prefetch_layers`].
    pub const DEFAULT_PREFETCH_LAYERS: usize = 2;
    /// Default of [`NatsDispatchSettings::prefetch_max_in_flight`].
    pub const DEFAULT_PREFETCH_MAX_IN_FLIGHT: usize = 16;
}

/// The connection as the dispatcher last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    /// How many times it came back after being lost.
    reconnects: u64,
    /// Whether it is up now.
    connected: bool,
}

/// Dispatch over NATS request/reply to the expert functions.
pub struct NatsDispatch {
    client: async_nats::Client,
    settings: NatsDispatchSettings,
    hidden_size: usize,
    invocations: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    activations: AtomicU64,
    retries: AtomicU64,
    resends: AtomicU64,
    /// Requests waiting for a reply now (for the outage log).
    in_flight: AtomicU64,
    link: watch::Receiver<Link>,
    /// This dispatcher, for the background activations it starts.
    me: Weak<NatsDispatch>,
    /// The origin of the millisecond stamps below.
    epoch: Instant,
    /// Per function: 1 + ms since `epoch` of its last good reply; 0 never.
    last_ok: Vec<AtomicU64>,
    /// Per function: 1 + ms since `epoch` when a prefetch activated it and no call has
    /// used it since; 0 none.
    prefetched: Vec<AtomicU64>,
    /// Per function: a prefetch activation is running.
    prefetching: Vec<AtomicBool>,
    prefetch_in_flight: AtomicU64,
    /// 1 + ms since `epoch` of the last *no responders*; 0 never.
    last_cold: AtomicU64,
    prefetches: AtomicU64,
    prefetch_hits: AtomicU64,
    cold_misses: AtomicU64,
    split_requests: AtomicU64,
}

/// Counts a request as in flight while it lives.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Follows the dispatcher's connection state until the dispatcher is dropped: counts
/// reconnects (which wake the requests waiting in [`NatsDispatch::request`]) and logs each
/// outage with its duration.
async fn watch_link(dispatch: std::sync::Weak<NatsDispatch>, tx: watch::Sender<Link>) {
    let mut down_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(CONNECTION_POLL).await;
        let Some(d) = dispatch.upgrade() else { return };
        let connected = d.client.connection_state() == ConnectionState::Connected;
        let in_flight = d.in_flight.load(Ordering::Relaxed);
        drop(d);
        match (connected, down_since) {
            (false, None) => {
                warn!(
                    in_flight,
                    "NATS connection lost: requests in flight are resent once it is back"
                );
                down_since = Some(Instant::now());
                tx.send_modify(|l| l.connected = false);
            }
            (true, Some(t)) => {
                info!(
                    outage_ms = t.elapsed().as_secs_f64() * 1e3,
                    in_flight,
                    "NATS connection restored: resending the requests sent before the outage"
                );
                down_since = None;
                tx.send_modify(|l| {
                    l.connected = true;
                    l.reconnects += 1;
                });
            }
            _ => {}
        }
    }
}

impl NatsDispatch {
    /// A dispatcher for a model of hidden size `hidden_size`. Called within a tokio runtime,
    /// it also follows the connection (resends on reconnect, outage logs) on a task of that
    /// runtime, which ends when the dispatcher is dropped; without one, requests are only
    /// retried after their timeout.
    pub fn new(
        client: async_nats::Client,
        settings: NatsDispatchSettings,
        hidden_size: usize,
    ) -> Arc<Self> {
        let connected = client.connection_state() == ConnectionState::Connected;
        let (tx, link) = watch::channel(Link {
            reconnects: 0,
            connected,
        });
        let functions = settings.layout.functions.len();
        let this = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            epoch: Instant::now(),
            last_ok: (0..functions).map(|_| AtomicU64::new(0)).collect(),
            prefetched: (0..functions).map(|_| AtomicU64::new(0)).collect(),
            prefetching: (0..functions).map(|_| AtomicBool::new(false)).collect(),
            prefetch_in_flight: AtomicU64::new(0),
            last_cold: AtomicU64::new(0),
            prefetches: AtomicU64::new(0),
            prefetch_hits: AtomicU64::new(0),
            cold_misses: AtomicU64::new(0),
            split_requests: AtomicU64::new(0),
            client,
            settings,
            hidden_size,
            invocations: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            activations: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            resends: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            link,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(watch_link(Arc::downgrade(&this), tx));
        }
        this
    }

    /// One request on `subj`, waiting for its reply for at most `timeout`. When the
    /// connection comes back after an outage while it waits, the request is sent again at
    /// once with the time left (a new inbox token: a reply to the superseded send is
    /// dropped). A request sent while the connection is down is queued by async-nats and
    /// written after the reconnect, so only a later reconnect resends it.
    ///
    /// Errors: as async-nats' `send_request` (`TimedOut` once `timeout` has passed,
    /// `NoResponders`, …).
    async fn request(
        &self,
        subj: &str,
        payload: &bytes::Bytes,
        headers: Option<&async_nats::HeaderMap>,
        timeout: Duration,
    ) -> Result<async_nats::Message, RequestError> {
        let _in_flight = InFlight::new(&self.in_flight);
        let deadline = Instant::now() + timeout;
        let mut link = self.link.clone();
        loop {
            let sent = *link.borrow_and_update();
            let resend_after = if sent.connected {
                sent.reconnects
            } else {
                sent.reconnects + 1
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RequestError::new(RequestErrorKind::TimedOut));
            }
            let mut request = async_nats::Request::new()
                .payload(payload.clone())
                .timeout(Some(left));
            if let Some(h) = headers {
                request = request.headers(h.clone());
            }
            let reply = self.client.send_request(subj.to_string(), request);
            let reconnected = async {
                if link
                    .wait_for(|l| l.reconnects > resend_after)
                    .await
                    .is_err()
                {
                    // No connection watcher (no runtime at construction): only the timeout.
                    futures::future::pending::<()>().await;
                }
            };
            tokio::select! {
                r = reply => return r,
                () = reconnected => {
                    self.resends.fetch_add(1, Ordering::Relaxed);
                    debug!(subject = subj, left_ms = left.as_millis() as u64, "connection back: resending");
                }
            }
        }
    }

    /// Asks the broker to activate function `fidx` and waits until an instance serves.
    /// Transient failures (`unavailable` from the broker, no broker answering, a lost
    /// connection) are retried up to [`ACTIVATION_ATTEMPTS`] times with exponential backoff
    /// from [`ACTIVATION_BACKOFF_MIN`]; everything before `deadline`.
    ///
    /// Errors: [`DispatchError::ActivationFailed`] when no instance serves in time,
    /// [`DispatchError::ActivationRefused`] when the broker refuses,
    /// [`DispatchError::MalformedReply`] for an undecodable reply.
    async fn activate(&self, fidx: usize, deadline: Instant) -> Result<(), DispatchError> {
        let f = &self.settings.layout.functions[fidx];
        let subj = subject::activate(&self.settings.model_id)?;
        let t0 = Instant::now();
        let mut backoff = ACTIVATION_BACKOFF_MIN;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.activations.fetch_add(1, Ordering::Relaxed);
            let left = deadline.saturating_duration_since(Instant::now());
            let req = ActivateRequest {
                version: PROTOCOL_VERSION,
                model: self.settings.model_id.clone(),
                function_id: f.id.clone(),
                layer: f.layer,
                experts: f.experts.clone(),
                requested_by: self.settings.controller_id.clone(),
                wait_ms: Some(left.as_millis() as u64),
            };
            let transient = match self.request(&subj, &req.encode(), None, left).await {
                Err(e) if e.kind() == RequestErrorKind::TimedOut => {
                    return Err(DispatchError::ActivationFailed {
                        function: f.id.clone(),
                        attempts: attempt,
                        waited_ms: t0.elapsed().as_millis() as u64,
                        last: "timed out".into(),
                    })
                }
                Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                    format!("nobody answers on {subj} (is the broker running?)")
                }
                Err(e) => e.to_string(),
                Ok(msg) => match ActivateReply::decode(&msg.payload)
                    .map_err(|source| DispatchError::MalformedReply {
                        from: format!("the broker (activation of {})", f.id),
                        source,
                    })?
                    .result
                {
                    ActivateResult::Ok {
                        instance_id,
                        cold_start_ms,
                        already_running,
                    } => {
                        info!(function = %f.id, %instance_id, cold_start_ms, already_running, attempt, wait_ms = t0.elapsed().as_secs_f64() * 1e3, "function activated");
                        return Ok(());
                    }
                    ActivateResult::Err(e) if e.code == ErrorCode::Unavailable => {
                        format!("{}: {}", e.code, e.message)
                    }
                    ActivateResult::Err(source) => {
                        return Err(DispatchError::ActivationRefused {
                            function: f.id.clone(),
                            source,
                        })
                    }
                },
            };
            if attempt >= ACTIVATION_ATTEMPTS || Instant::now() + backoff >= deadline {
                return Err(DispatchError::ActivationFailed {
                    function: f.id.clone(),
                    attempts: attempt,
                    waited_ms: t0.elapsed().as_millis() as u64,
                    last: transient,
                });
            }
            warn!(function = %f.id, reason = %transient, attempt, backoff_ms = backoff.as_millis() as u64, "activation failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(ACTIVATION_BACKOFF_MAX);
        }
    }

    /// 1 + ms since `epoch` (0 is kept for "never").
    fn stamp(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether function `fidx` answered within `within`.
    fn answered_within(&self, fidx: usize, within: Duration) -> bool {
        let t = self.last_ok[fidx].load(Ordering::Relaxed);
        t != 0 && self.stamp().saturating_sub(t) <= within.as_millis() as u64
    }

    /// Starts a background activation of function `fidx` from a prediction, unless it
    /// answered recently, one is already running for it, or the in-flight budget is spent.
    fn prefetch_function(&self, fidx: usize) {
        if self.answered_within(fidx, WARM_FRESH)
            || self.prefetch_in_flight.load(Ordering::Relaxed)
                >= self.settings.prefetch_max_in_flight as u64
        {
            return;
        }
        if self.prefetching[fidx].swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.prefetching[fidx].store(false, Ordering::Release);
            return;
        };
        self.prefetch_in_flight.fetch_add(1, Ordering::Relaxed);
        self.prefetches.fetch_add(1, Ordering::Relaxed);
        self.prefetched[fidx].store(self.stamp(), Ordering::Relaxed);
        debug!(function = %self.settings.layout.functions[fidx].id, "activating ahead of the pass");
        rt.spawn(async move {
            let deadline = Instant::now() + me.settings.activation_timeout;
            if let Err(e) = me.activate(fidx, deadline).await {
                debug!(function = %me.settings.layout.functions[fidx].id, error = %e, "activation ahead of the pass failed (the pass will ask again)");
            }
            me.prefetching[fidx].store(false, Ordering::Release);
            me.prefetch_in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// One function call with retries and activation; returns the `[rows, hidden]` output.
    async fn call(
        &self,
        fidx: usize,
        req: ExpertRequest,
        traceparent: Option<&str>,
    ) -> Result<Vec<f32>, DispatchError> {
        let f = &self.settings.layout.functions[fidx];
        let subj = subject::expert(&self.settings.model_id, f.layer, f.experts[0])?;
        let payload = encode(&req);
        let mut headers = async_nats::HeaderMap::new();
        if let Some(tp) = traceparent {
            faasmoe_proto::trace::inject(&mut headers, tp);
        }
        let mut activated = false;
        if self.prefetched[fidx].swap(0, Ordering::Relaxed) != 0 {
            self.prefetch_hits.fetch_add(1, Ordering::Relaxed);
        }
        // Every activation of this call (and the backoff between them) ends by this deadline.
        let mut activation_deadline: Option<Instant> = None;
        let mut backoff = ACTIVATION_BACKOFF_MIN;
        let mut attempt = 0;
        loop {
            self.invocations.fetch_add(1, Ordering::Relaxed);
            self.bytes_sent
                .fetch_add(payload.len() as u64, Ordering::Relaxed);
            let outcome = self
                .request(
                    &subj,
                    &payload,
                    Some(&headers),
                    self.settings.request_timeout,
                )
                .await;
            let retry_reason = match outcome {
                Ok(msg) => {
                    self.bytes_received
                        .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
                    let reply = decode_reply(&msg.payload).map_err(|source| {
                        DispatchError::MalformedReply {
                            from: f.id.clone(),
                            source,
                        }
                    })?;
                    let wrong = |detail: String| DispatchError::WrongReply {
                        function: f.id.clone(),
                        detail,
                    };
                    match reply.result {
                        ExpertResult::Ok { output } => {
                            let (rows, cols) = output.dims2().map_err(|e| wrong(e.to_string()))?;
                            if rows != req.routes.len() || cols != self.hidden_size {
                                return Err(wrong(format!(
                                    "[{rows}, {cols}] for [{}, {}]",
                                    req.routes.len(),
                                    self.hidden_size
                                )));
                            }
                            self.last_ok[fidx].store(self.stamp(), Ordering::Relaxed);
                            return output.to_f32_vec().map_err(|e| wrong(e.to_string()));
                        }
                        // Errors about the request itself are ours: retrying will not help.
                        ExpertResult::Err(e)
                            if e.code != ErrorCode::Internal
                                && e.code != ErrorCode::Unavailable =>
                        {
                            return Err(DispatchError::Rejected {
                                function: f.id.clone(),
                                source: e,
                            });
                        }
                        ExpertResult::Err(e) => format!("{}: {}", e.code, e.message),
                    }
                }
                Err(e) => match e.kind() {
                    RequestErrorKind::NoResponders => {
                        if !activated {
                            self.cold_misses.fetch_add(1, Ordering::Relaxed);
                        }
                        self.last_cold.store(self.stamp(), Ordering::Relaxed);
                        let deadline = *activation_deadline.get_or_insert_with(|| {
                            Instant::now() + self.settings.activation_timeout
                        });
                        if activated {
                            // The broker said an instance serves, yet none is subscribed: it
                            // is draining without having said so yet, or resubscribing after
                            // a reconnect. Ask again after a backoff.
                            if Instant::now() + backoff >= deadline {
                                return Err(DispatchError::NoRespondersAfterActivation {
                                    function: f.id.clone(),
                                    waited_ms: self.settings.activation_timeout.as_millis() as u64,
                                });
                            }
                            debug!(function = %f.id, backoff_ms = backoff.as_millis() as u64, "no responders after activation: asking again");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(ACTIVATION_BACKOFF_MAX);
                        }
                        self.activate(fidx, deadline).await?;
                        activated = true;
                        continue;
                    }
                    RequestErrorKind::MaxPayloadExceeded => {
                        // Sending it again cannot help (split_to_fit keeps this from happening
                        // unless the server's limit shrank under us).
                        return Err(DispatchError::PayloadTooLarge {
                            function: f.id.clone(),
                            source: WireError {
                                code: ErrorCode::PayloadTooLarge,
                                message: e.to_string(),
                            },
                        });
                    }
                    RequestErrorKind::TimedOut => "timed out".to_string(),
                    _ => e.to_string(),
                },
            };
            attempt += 1;
            if attempt > self.settings.max_retries {
                return Err(DispatchError::RetriesExhausted {
                    function: f.id.clone(),
                    attempts: attempt,
                    last: retry_reason,
                });
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            warn!(function = %f.id, reason = %retry_reason, attempt, "retrying expert request");
        }
    }
}

impl Dispatch for NatsDispatch {
    fn routed<'a>(
        &'a self,
        batch: &'a RoutedBatch,
        ctx: &'a DispatchContext,
    ) -> BoxFuture<'a, Result<Tensor, DispatchError>> {
        Box::pin(
            async move {
                let h = self.hidden_size;
                let (n, cols) = batch.hidden.dims2()?;
                if cols != h {
                    return Err(DispatchError::HiddenSize { got: cols, want: h });
                }
                let data: Vec<f32> = batch
                    .hidden
                    .to_dtype(candle_core::DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())?;
                // function index → (row indices, routes)
                let mut groups: std::collections::BTreeMap<usize, (Vec<usize>, Vec<RowRoutes>)> =
                    Default::default();
                for (row, routes) in batch.routes.iter().enumerate() {
                    for &(e, w) in routes {
                        let fidx = self
                            .settings
                            .layout
                            .function_of(batch.layer as u32, e as u32)
                            .ok_or(DispatchError::UnknownExpert {
                                layer: batch.layer,
                                expert: e,
                            })?;
                        let g = groups.entry(fidx).or_default();
                        if g.0.last() != Some(&row) {
                            g.0.push(row);
                            g.1.push(RowRoutes {
                                experts: vec![],
                                weights: vec![],
                            });
                        }
                        let r = g.1.last_mut().expect("pushed");
                        r.experts.push(e as u32);
                        r.weights.push(w);
                    }
                }
                // Expert requests are children of this layer's dispatch span.
                let traceparent = faasmoe_telemetry::current_traceparent();
                let traceparent = traceparent.as_deref();
                // The server's limit, read per layer: after a reconnect it may be another server's.
                let max_payload = self.client.max_payload();
                let mut calls = Vec::with_capacity(groups.len());
                for (fidx, (rows, routes)) in groups {
                    let mut buf = Vec::with_capacity(rows.len() * h);
                    for &r in &rows {
                        buf.extend_from_slice(&data[r * h..(r + 1) * h]);
                    }
                    let hidden = WireTensor::from_f32(
                        vec![rows.len() as u32, h as u32],
                        &buf,
                        self.settings.wire_dtype,
                    )?;
                    let req = ExpertRequest {
                        version: PROTOCOL_VERSION,
                        request_id: uuid::Uuid::new_v4(),
                        tenant: ctx.tenants.clone(),
                        model: self.settings.model_id.clone(),
                        layer: batch.layer as u32,
                        hidden,
                        routes,
                        reply_dtype: self.settings.wire_dtype,
                        combine: true,
                    };
                    let parts = req.split_to_fit(max_payload).map_err(|source| {
                        DispatchError::PayloadTooLarge {
                            function: self.settings.layout.functions[fidx].id.clone(),
                            source,
                        }
                    })?;
                    if parts.len() > 1 {
                        self.split_requests
                            .fetch_add(parts.len() as u64 - 1, Ordering::Relaxed);
                    }
                    let rows = Arc::new(rows);
                    for (first, part) in parts {
                        let rows = Arc::clone(&rows);
                        calls.push(async move {
                            let n_rows = part.routes.len();
                            let out = self.call(fidx, part, traceparent).await?;
                            Ok::<_, DispatchError>((rows, first..first + n_rows, out))
                        });
                    }
                }
                let results = futures::future::join_all(calls).await;
                let mut acc = vec![0f32; n * h];
                for r in results {
                    let (rows, range, out) = r?;
                    for (k, &row) in rows[range].iter().enumerate() {
                        let dst = &mut acc[row * h..(row + 1) * h];
                        for (d, s) in dst.iter_mut().zip(&out[k * h..(k + 1) * h]) {
                            *d += s;
                        }
                    }
                }
                debug!(layer = batch.layer, rows = n, "layer dispatched");
                Ok(Tensor::from_vec(acc, (n, h), &Device::Cpu)?)
            }
            .instrument(tracing::info_span!("layer.dispatch", layer = batch.layer)),
        )
    }

    fn stats(&self) -> DispatchStats {
        DispatchStats {
            invocations: self.invocations.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            activations: self.activations.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            resends: self.resends.load(Ordering::Relaxed),
            reconnects: self.link.borrow().reconnects,
            prefetches: self.prefetches.load(Ordering::Relaxed),
            prefetch_hits: self.prefetch_hits.load(Ordering::Relaxed),
            cold_misses: self.cold_misses.load(Ordering::Relaxed),
            split_requests: self.split_requests.load(Ordering::Relaxed),
        }
    }

    fn prefetch_depth(&self) -> usize {
        if self.settings.prefetch_layers == 0 {
            return 0;
        }
        let cold = self.last_cold.load(Ordering::Relaxed);
        let never_answered = self.last_ok.iter().all(|t| t.load(Ordering::Relaxed) == 0);
        if never_answered
            || (cold != 0 && self.stamp().saturating_sub(cold) <= COLD_WINDOW.as_millis() as u64)
        {
            return usize::MAX;
        }
        if (0..self.last_ok.len()).all(|f| self.answered_within(f, WARM_FRESH)) {
            return 0;
        }
        self.settings.prefetch_layers
    }

    fn prefetch(&self, predicted: &[(usize, Vec<u32>)]) {
        for (layer, experts) in predicted {
            let mut fns: Vec<usize> = experts
                .iter()
                .filter_map(|&e| self.settings.layout.function_of(*layer as u32, e))
                .collect();
            fns.dedup();
            for f in fns {
                self.prefetch_function(f);
            }
        }
    }
}
