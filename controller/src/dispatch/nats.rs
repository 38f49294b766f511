//! [`NatsDispatch`]: the routed experts of each layer sent to the expert functions over
//! NATS (the module above says how: grouping, retries, resends after an outage, activation
//! ahead of the pass); activation itself is in [`activation`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_nats::connection::State as ConnectionState;
use async_nats::{RequestError, RequestErrorKind};
use candle_core::{Device, Tensor};
use faasmoe_model::RoutedBatch;
use faasmoe_proto::expert::{
    decode_reply, encode, ExpertRequest, ExpertResult, RowRoutes, WireError,
};
use faasmoe_proto::layout::Layout;
use faasmoe_proto::tensor::{WireDType, WireTensor};
use faasmoe_proto::{subject, ErrorCode, PROTOCOL_VERSION};
use futures::future::BoxFuture;
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use super::{Dispatch, DispatchContext, DispatchError, DispatchStats};

mod activation;

/// Attempts of one activation (the first included) on transient `unavailable`.
const ACTIVATION_ATTEMPTS: u32 = 5;
/// Backoff before the second activation attempt; doubled for each next one, up to
/// [`ACTIVATION_BACKOFF_MAX`].
const ACTIVATION_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest backoff between activation attempts.
const ACTIVATION_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long one activation request waits for the broker's reply before asking again (the
/// broker joins the start already in progress, so asking again starts nothing new).
///
/// Why: nats-server forgets a responder's pending reply permissions (`allow_responses`)
/// when it reloads its configuration, which the broker makes it do on every tenant change;
/// the broker's reply to an activation that was outstanding then is refused ("Permissions
/// Violation for Publish to _INBOX.controller…") and never arrives. Seen in `faasmoe demo`:
/// its tenants are created while the first requests' activations are out, and one request
/// waited the whole 60 s activation timeout. Re-asking bounds that loss to this long.
///
/// The broker now answers on a `faasmoe.v1.reply.<requester>.…` subject (the dispatcher's
/// connection's inbox prefix, [`faasmoe_proto::subject::reply_prefix`]), an explicit
/// publish permission that a reload keeps, so this no longer fires on reloads (measured in
/// `faasmoe demo`: 16 refused replies and a 3 s gap before the first functions were up with
/// `_INBOX` replies, none with these); it stays for a reply lost otherwise (a broker
/// restarted between request and reply).
const ACTIVATION_REPLY_WAIT: Duration = Duration::from_secs(3);
/// How often the dispatcher looks at its connection's state (async-nats exposes the state,
/// not a stream of changes, on a client it did not configure).
const CONNECTION_POLL: Duration = Duration::from_millis(10);
/// A function that answered within this long is taken to be warm: prefetching skips it.
pub const WARM_FRESH: Duration = Duration::from_secs(2);
/// After *no responders* on any function, the model counts as cold for this long: the
/// engine predicts every remaining layer, not just [`NatsDispatchSettings::prefetch_layers`].
pub const COLD_WINDOW: Duration = Duration::from_secs(10);

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
    /// Background activations from predictions in flight at once, at most (more wait in a
    /// queue, see [`Dispatch::prefetch`](super::Dispatch::prefetch)).
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

/// Activation ahead of the pass: how many run, and which predictions wait for one to end.
#[derive(Debug, Default)]
struct PrefetchSlots {
    /// Background activations running (at most `prefetch_max_in_flight`).
    in_flight: usize,
    /// Predicted functions waiting for a slot, with when they were queued, in the order
    /// predicted (nearer layers first): a finished background activation takes the next.
    queue: std::collections::VecDeque<(usize, Instant)>,
}

/// Dispatch over NATS request/reply to the expert functions.
pub struct NatsDispatch {
    /// The dispatcher's own connection, whose inbox prefix is
    /// [`subject::reply_prefix`]`(<controller id>-<random session id>)`: every request's
    /// reply comes through its one multiplexed reply subscription.
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
    /// Background activations running and the predictions waiting for a slot.
    prefetch_slots: std::sync::Mutex<PrefetchSlots>,
    /// Predictions that waited in the queue of `prefetch_slots`.
    prefetch_queued: AtomicU64,
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
    /// A dispatcher for a model of hidden size `hidden_size`, on a connection of its own to
    /// the server of `nats`, named `name`, whose inbox prefix is
    /// [`subject::reply_prefix`]`(<controller id>-<random session id>)`: the requests share
    /// one multiplexed reply subscription (no subscribe and unsubscribe per request), on
    /// subjects the broker and the workers answer by an explicit permission (see
    /// [`subject::reply_prefix`] for why not `_INBOX`), and two controllers with one id never
    /// share reply subjects. Called within a tokio runtime, it also follows the connection
    /// (resends on reconnect, outage logs) on a task of that runtime, which ends when the
    /// dispatcher is dropped; without one, requests are only retried after their timeout.
    ///
    /// Errors: [`faasmoe_proto::connection::ConnectionError`] when the server cannot be
    /// reached or refuses the credentials.
    pub async fn connect(
        nats: &faasmoe_proto::connection::NatsArgs,
        name: &str,
        settings: NatsDispatchSettings,
        hidden_size: usize,
    ) -> Result<Arc<Self>, faasmoe_proto::connection::ConnectionError> {
        let requester = format!(
            "{}-{}",
            subject::sanitize_token(&settings.controller_id),
            uuid::Uuid::new_v4().simple()
        );
        let client = nats
            .connect_with_inbox_prefix(name, &subject::reply_prefix(&requester))
            .await?;
        Ok(Self::new(client, settings, hidden_size))
    }

    /// As [`NatsDispatch::connect`], on `client`, whose inbox prefix should be a
    /// [`subject::reply_prefix`] (replies to any other inbox go by the server's
    /// `allow_responses`, which a configuration reload forgets).
    fn new(
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
            prefetch_slots: Default::default(),
            prefetch_queued: AtomicU64::new(0),
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
    /// once with the time left (a new reply token: a reply to the superseded send is
    /// dropped). A request sent while the connection is down is queued by async-nats and
    /// written after the reconnect, so only a later reconnect resends it.
    ///
    /// Each send has its own reply subject under the connection's inbox prefix
    /// ([`NatsDispatch::connect`]), through async-nats' one multiplexed reply subscription.
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
}

impl NatsDispatch {
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
                    // A reply must name the request it answers (a uuid that only the
                    // function's instances saw): reply tokens of the multiplexed reply
                    // subscription are predictable, so this is what keeps another publisher
                    // on `faasmoe.v1.reply.>` from passing off an output as this one. An
                    // error about a request the worker could not decode names no request.
                    let unnamed_error =
                        reply.request_id.is_nil() && matches!(reply.result, ExpertResult::Err(_));
                    if reply.request_id != req.request_id && !unnamed_error {
                        return Err(wrong(format!(
                            "a reply to request {} for request {}",
                            reply.request_id, req.request_id
                        )));
                    }
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
            prefetch_queued: self.prefetch_queued.load(Ordering::Relaxed),
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
