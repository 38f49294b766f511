//! Function activation: the broker's answer to *no responders*.
//!
//! A controller that finds no instance subscribed to an expert subject sends an
//! [`ActivateRequest`] on `faasmoe.v1.activate.<model>`. The [`Activator`] then
//!
//! - replies `already_running` when a ready instance of the function exists and is connected
//!   (it answers its NATS micro `$SRV.PING`, see [`ActivationConfig::probe_timeout`]);
//! - otherwise starts ONE instance through its [`InstanceBackend`]: concurrent activations of
//!   the same function join the start in progress and all get the same reply;
//! - waits until the instance is ready (the worker's `READY` stdout line, or its `subscribed`
//!   event on `faasmoe.v1.events.<model>`, whichever comes first) and replies with the
//!   instance id and the cold start (spawn → ready);
//! - never has more than [`ActivationConfig::max_instances_per_function`] instances of a
//!   function alive (starting, ready or draining). At the cap an activation *waits* (at most
//!   [`ActivationConfig::cap_wait`], and never past the requester's own
//!   [`ActivateRequest::wait_ms`]) for the state to change — a draining instance exits, an
//!   instance that lost its connection resubscribes — and only then replies `unavailable`.
//!
//! # Liveness
//!
//! Whether an instance serves is never judged by a request that queues behind its work: a
//! worker busy computing answers no expert request until its batch is done. The broker's
//! records come from the instance itself: its `READY` line and `subscribed` event (ready),
//! its `draining` event once it has unsubscribed (draining), the OS exit status (exited). The one
//! thing it asks the instance is whether it is *connected*: the instance's NATS micro
//! service ([`WORKER_SERVICE`]) answers `$SRV.PING.faasmoe-expert.<service id>` from its own
//! task, independently of the batching loop, and the server answers *no responders* at once
//! when the instance is not connected (reconnecting after a server restart, or at the very
//! end of its drain). The service id of an instance is learnt from its answer to the
//! broadcast `$SRV.PING.faasmoe-expert` (its metadata carries the instance id the broker gave
//! it). Silence — no pong within the probe timeout, to the direct ping or the broadcast —
//! counts as connected (frozen, busy or on a loaded machine, not gone). *No responders* is
//! not a verdict either: nothing is marked, the instance may be reconnecting (it
//! resubscribes) or draining (its `draining` event and exit follow), and the activation waits
//! for either instead of declaring a healthy instance dead.
//!
//! When the broker answers `already_running` for an instance that is draining but has not
//! said so yet, the controller's retry meets *no responders* again and asks again after a
//! backoff; by then the `draining` event has arrived.
//!
//! Every instance is owned by a task that waits for its exit and records it (exit status),
//! and lifecycle events (`started`, `ready`, `stopped`, `spawn_failed`) are published on the
//! events subject. Nothing is restarted on its own: scale to zero is the workers' idle exit,
//! which the broker only records; the next activation starts a new instance.
//!
//! The worker publishes its own kinds on the same subject, `subscribed` and `draining`
//! ([`faasmoe_proto::events`] has the table); the broker's `ready` carries spawn → ready and
//! its `stopped` the OS exit status.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faasmoe_proto::activation::{ActivateReply, ActivateRequest, ActivateResult};
use faasmoe_proto::events::{EventKind, FunctionEvent};
use faasmoe_proto::layout::{FunctionSpec, Layout};
use faasmoe_proto::{subject, ErrorCode, WireError};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::spawner::{Instance, InstanceBackend, InstanceExit};

mod config;
mod lifecycle;
mod liveness;

pub use config::ActivationConfig;
use liveness::watch_connection;

/// Longest wait to queue a lifecycle event on the broker's connection before the state
/// change it reports is acted on anyway.
const EVENT_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
/// How many exited instances are remembered for [`Activator::exited`].
const EXITED_HISTORY: usize = 1024;

/// First and longest interval between pings while an activation waits at the cap.
const CAP_POLL_MIN: Duration = Duration::from_millis(25);
const CAP_POLL_MAX: Duration = Duration::from_millis(400);

/// Share of the requester's [`ActivateRequest::wait_ms`] the broker may spend; the rest is
/// left for the reply to arrive before the requester gives up.
const WAIT_SHARE: f64 = 0.9;

/// How often the broker looks at its NATS connection state (to log outages).
const CONNECTION_POLL: Duration = Duration::from_millis(20);

/// The NATS micro service name of expert workers (`faasmoe-expert-worker` starts it with
/// this name; its metadata carries `model`, `function_id` and `instance_id`).
pub const WORKER_SERVICE: &str = "faasmoe-expert";

/// Waits for a start in progress, at most until `deadline` (the start itself goes on).
async fn join_start(
    function_id: &str,
    p: PendingStart,
    deadline: tokio::time::Instant,
) -> ActivateResult {
    match tokio::time::timeout_at(deadline, p).await {
        Ok(r) => r,
        Err(_) => unavailable(format!(
            "function `{function_id}`: an instance is still starting; retry later"
        )),
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Spawned, not yet subscribed.
    Starting,
    /// Subscribed and serving.
    Ready,
    /// Alive but unsubscribed (idle exit or shutdown in progress).
    Draining,
    /// Ended.
    Exited,
}

/// One instance as the broker sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceInfo {
    /// The function.
    pub function_id: String,
    /// The instance.
    pub instance_id: String,
    /// OS process id, when the backend has one.
    pub pid: Option<u32>,
    /// Current state.
    pub state: InstanceState,
    /// Spawn time, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// Spawn → ready, ms (once ready).
    pub cold_start_ms: Option<f64>,
    /// How it ended (once exited).
    pub exit: Option<InstanceExit>,
}

enum Control {
    Terminate,
    Kill,
}

struct Live {
    info: InstanceInfo,
    /// The id of the instance's micro service, once learnt from a ping.
    service_id: Option<String>,
    spawned_at: Instant,
    state_tx: watch::Sender<InstanceState>,
    control: mpsc::UnboundedSender<Control>,
}

type PendingStart = Shared<BoxFuture<'static, ActivateResult>>;

#[derive(Default)]
struct State {
    live: HashMap<String, Live>,
    exited: VecDeque<InstanceInfo>,
    pending: HashMap<String, PendingStart>,
    peak_alive: HashMap<String, usize>,
}

impl State {
    fn alive(&self, function_id: &str) -> usize {
        self.live
            .values()
            .filter(|l| l.info.function_id == function_id)
            .count()
    }

    fn ready(&self, function_id: &str) -> Vec<String> {
        let mut r: Vec<&Live> = self
            .live
            .values()
            .filter(|l| l.info.function_id == function_id && l.info.state == InstanceState::Ready)
            .collect();
        r.sort_by_key(|l| l.spawned_at);
        r.into_iter().map(|l| l.info.instance_id.clone()).collect()
    }
}

struct Inner {
    client: async_nats::Client,
    cfg: ActivationConfig,
    functions: HashMap<String, FunctionSpec>,
    events_subject: String,
    backend: Arc<dyn InstanceBackend>,
    state: Mutex<State>,
    spawns: AtomicU64,
    cap_waits: AtomicU64,
    shutting_down: AtomicBool,
    /// Bumped on every change of the instance table or of a start in progress; activations
    /// waiting at the cap watch it.
    changes: watch::Sender<u64>,
}

/// The activation service of one model. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Activator {
    inner: Arc<Inner>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unavailable(message: impl Into<String>) -> ActivateResult {
    ActivateResult::Err(WireError::new(ErrorCode::Unavailable, message))
}

impl Activator {
    /// Creates the activator without listening on NATS (see [`Activator::start`]).
    pub fn new(
        client: async_nats::Client,
        cfg: ActivationConfig,
        backend: Arc<dyn InstanceBackend>,
    ) -> Result<Self, WireError> {
        let events_subject = subject::events(&cfg.model_id)
            .map_err(|e| WireError::new(ErrorCode::BadRequest, e.to_string()))?;
        let functions = cfg
            .layout
            .functions
            .iter()
            .map(|f| (f.id.clone(), f.clone()))
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                cfg,
                functions,
                events_subject,
                backend,
                state: Mutex::new(State::default()),
                spawns: AtomicU64::new(0),
                cap_waits: AtomicU64::new(0),
                shutting_down: AtomicBool::new(false),
                changes: watch::channel(0).0,
            }),
        })
    }

    /// Creates the activator and serves `faasmoe.v1.activate.<model>` (one task per request)
    /// and listens to the workers' events; returns once both subscriptions are registered
    /// with the server.
    pub async fn start(
        client: async_nats::Client,
        cfg: ActivationConfig,
        backend: Arc<dyn InstanceBackend>,
    ) -> anyhow::Result<Self> {
        let this = Self::new(client.clone(), cfg, backend)?;
        let mut requests = client
            .subscribe(subject::activate(&this.inner.cfg.model_id)?)
            .await?;
        let mut events = client.subscribe(this.inner.events_subject.clone()).await?;
        client.flush().await?;
        let me = this.clone();
        tokio::spawn(async move {
            while let Some(msg) = requests.next().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let result = match ActivateRequest::decode(&msg.payload) {
                        Ok(req) => me.activate(&req).await,
                        Err(e) => ActivateResult::Err(e),
                    };
                    if let Some(reply) = msg.reply {
                        if !subject::is_answerable(&reply) {
                            warn!(%reply, "activation asked to reply outside a reply subject or an inbox: ignored");
                            return;
                        }
                        let body = ActivateReply { result }.encode();
                        if let Err(e) = me.inner.client.publish(reply, body).await {
                            warn!(error = %e, "activation reply failed");
                        }
                    }
                });
            }
        });
        let me = this.clone();
        tokio::spawn(async move {
            while let Some(msg) = events.next().await {
                let Ok(ev) = FunctionEvent::decode(&msg.payload) else {
                    continue;
                };
                match ev.kind {
                    EventKind::Subscribed => me.inner.mark_ready(&ev.instance_id),
                    // The worker announces `draining` after unsubscribing, before it exits.
                    EventKind::Draining => me.inner.mark_draining(&ev.instance_id),
                    _ => {}
                }
            }
        });
        tokio::spawn(watch_connection(Arc::downgrade(&this.inner)));
        info!(model = %this.inner.cfg.model_id, functions = this.inner.functions.len(), "activation service listening");
        Ok(this)
    }

    /// The policy.
    pub fn config(&self) -> &ActivationConfig {
        &self.inner.cfg
    }

    /// Handles one activation (what the NATS handler does).
    pub async fn activate(&self, req: &ActivateRequest) -> ActivateResult {
        if req.model != self.inner.cfg.model_id {
            return ActivateResult::Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "this broker serves model `{}`, not `{}`",
                    self.inner.cfg.model_id, req.model
                ),
            ));
        }
        let mut wait = self.inner.cfg.cap_wait;
        if let Some(ms) = req.wait_ms {
            wait = wait.min(Duration::from_millis(ms).mul_f64(WAIT_SHARE));
        }
        debug!(function_id = %req.function_id, requested_by = %req.requested_by, wait_ms = wait.as_millis() as u64, "activate");
        self.activate_function(&req.function_id, false, wait).await
    }

    /// Starts an additional instance of `function_id` if it is below the cap (joining a
    /// start already in progress), whether or not one is ready. Used for pre-warming and
    /// by controllers that want more capacity. At the cap: `unavailable` at once (nothing
    /// waits for capacity that is only wanted, not needed).
    pub async fn scale_up(&self, function_id: &str) -> ActivateResult {
        let wait = self.inner.cfg.ready_timeout + Duration::from_secs(5);
        self.activate_function(function_id, true, wait).await
    }

    /// Starts [`ActivationConfig::min_instances`] instances of every function (one after
    /// the other per function, functions in parallel) and returns every result.
    pub async fn prewarm(&self) -> Vec<ActivateResult> {
        let n = self.inner.cfg.min_instances;
        if n == 0 {
            return Vec::new();
        }
        let jobs = self.inner.cfg.layout.functions.iter().map(|f| {
            let me = self.clone();
            let id = f.id.clone();
            async move {
                let mut out = Vec::new();
                for _ in 0..n {
                    out.push(me.scale_up(&id).await);
                }
                out
            }
        });
        futures::future::join_all(jobs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn activate_function(
        &self,
        function_id: &str,
        want_new: bool,
        wait: Duration,
    ) -> ActivateResult {
        let inner = &self.inner;
        let Some(spec) = inner.functions.get(function_id).cloned() else {
            return ActivateResult::Err(WireError::new(
                ErrorCode::UnknownExpert,
                format!(
                    "model `{}` has no function `{function_id}` at granularity {}",
                    inner.cfg.model_id, inner.cfg.layout.granularity
                ),
            ));
        };
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = inner.changes.subscribe();
        let mut poll = CAP_POLL_MIN;
        let mut waited_at_cap = false;
        loop {
            // Everything read below is at least as new as this mark: a change after it wakes
            // the wait at the end of the loop.
            changes.borrow_and_update();
            if inner.shutting_down.load(Ordering::SeqCst) {
                return unavailable("the broker is shutting down");
            }
            let (pending, ready) = {
                let st = inner.state.lock().unwrap();
                (st.pending.get(function_id).cloned(), st.ready(function_id))
            };
            if let Some(p) = pending {
                return join_start(function_id, p, deadline).await;
            }
            // A ready instance that is connected. One that is not is draining (its `draining`
            // event and exit follow) or reconnecting (it resubscribes): start another below
            // the cap, else wait for either.
            if !want_new {
                for id in &ready {
                    if inner.connected(id).await {
                        if waited_at_cap {
                            info!(function_id, instance_id = %id, waited_ms = t0.elapsed().as_secs_f64() * 1e3, "an instance serves again");
                        }
                        return ActivateResult::Ok {
                            instance_id: id.clone(),
                            cold_start_ms: 0.0,
                            already_running: true,
                        };
                    }
                }
                if !ready.is_empty() {
                    debug!(function_id, instances = ?ready, "no ready instance is connected now");
                }
            }
            let pending = {
                let mut st = inner.state.lock().unwrap();
                if let Some(p) = st.pending.get(function_id) {
                    Some(p.clone())
                } else {
                    let alive = st.alive(function_id);
                    let cap = inner.cfg.max_instances_per_function as usize;
                    if alive < cap {
                        Some(inner.begin_start(&mut st, spec.clone()))
                    } else if want_new {
                        return unavailable(format!("function `{function_id}` is at its cap of {cap} instance(s) ({alive} alive)"));
                    } else if tokio::time::Instant::now() >= deadline {
                        warn!(
                            function_id,
                            cap,
                            alive,
                            waited_ms = t0.elapsed().as_secs_f64() * 1e3,
                            "at the cap: no instance became available in time"
                        );
                        return unavailable(format!(
                            "function `{function_id}` is at its cap of {cap} instance(s) ({alive} alive, none available) \
                             and none became available within {:?}; retry later",
                            wait
                        ));
                    } else {
                        if !waited_at_cap {
                            info!(
                                function_id,
                                cap,
                                alive,
                                "at the cap with no instance available: waiting for one"
                            );
                            inner.cap_waits.fetch_add(1, Ordering::Relaxed);
                            waited_at_cap = true;
                        }
                        None
                    }
                }
            };
            if let Some(p) = pending {
                return join_start(function_id, p, deadline).await;
            }
            // Wait for the instance table to change (exit, ready, stopped), or re-probe
            // after `poll` (an instance resubscribing after a reconnect changes no record).
            let until = (tokio::time::Instant::now() + poll).min(deadline);
            let _ = tokio::time::timeout_at(until, changes.changed()).await;
            poll = (poll * 2).min(CAP_POLL_MAX);
        }
    }

    /// Instances alive now (starting, ready, draining), oldest first.
    pub fn instances(&self) -> Vec<InstanceInfo> {
        let st = self.inner.state.lock().unwrap();
        let mut v: Vec<(&Instant, InstanceInfo)> = st
            .live
            .values()
            .map(|l| (&l.spawned_at, l.info.clone()))
            .collect();
        v.sort_by_key(|(t, _)| **t);
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// Instances alive now of one function.
    pub fn alive(&self, function_id: &str) -> usize {
        self.inner.state.lock().unwrap().alive(function_id)
    }

    /// The most instances of `function_id` that were ever alive at once.
    pub fn peak_alive(&self, function_id: &str) -> usize {
        self.inner
            .state
            .lock()
            .unwrap()
            .peak_alive
            .get(function_id)
            .copied()
            .unwrap_or(0)
    }

    /// Recently exited instances (the last 1024), oldest first.
    pub fn exited(&self) -> Vec<InstanceInfo> {
        self.inner
            .state
            .lock()
            .unwrap()
            .exited
            .iter()
            .cloned()
            .collect()
    }

    /// How many instances were spawned since start.
    pub fn spawn_count(&self) -> u64 {
        self.inner.spawns.load(Ordering::SeqCst)
    }

    /// How many activations found their function at the cap with no instance available
    /// (draining, or not connected) and waited for one instead of being refused.
    pub fn cap_waits(&self) -> u64 {
        self.inner.cap_waits.load(Ordering::Relaxed)
    }

    /// Refuses new activations, asks every instance to stop (SIGTERM: drain), waits up to
    /// `grace`, then kills what is left and waits for it to be reaped.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.changed();
        self.inner.signal_all(|| Control::Terminate);
        let deadline = Instant::now() + grace;
        while !self.inner.state.lock().unwrap().live.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.inner.signal_all(|| Control::Kill);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.inner.state.lock().unwrap().live.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Inner {
    fn signal_all(&self, make: impl Fn() -> Control) {
        for l in self.state.lock().unwrap().live.values() {
            let _ = l.control.send(make());
        }
    }

    /// Records a change for the activations waiting at the cap.
    fn changed(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Registers a start of `spec` as in progress (in `st`, under its lock) and returns it.
    fn begin_start(self: &Arc<Self>, st: &mut State, spec: FunctionSpec) -> PendingStart {
        let id = spec.id.clone();
        let me = self.clone();
        let job = tokio::spawn(async move { me.start_instance(spec).await });
        let fut: BoxFuture<'static, ActivateResult> = async move {
            job.await.unwrap_or_else(|e| {
                ActivateResult::Err(WireError::new(
                    ErrorCode::Internal,
                    format!("start task failed: {e}"),
                ))
            })
        }
        .boxed();
        let shared = fut.shared();
        st.pending.insert(id, shared.clone());
        shared
    }

    fn event(&self, kind: EventKind, info: &InstanceInfo) -> FunctionEvent {
        FunctionEvent {
            kind,
            model: self.cfg.model_id.clone(),
            function_id: info.function_id.clone(),
            instance_id: info.instance_id.clone(),
            pid: info.pid,
            at_unix_ms: unix_ms(),
            cold_start_ms: None,
            exit_status: None,
        }
    }

    async fn publish(&self, ev: FunctionEvent) {
        if let Err(e) = self
            .client
            .publish(self.events_subject.clone(), ev.encode())
            .await
        {
            warn!(error = %e, "publishing a function event failed");
        }
    }
}
