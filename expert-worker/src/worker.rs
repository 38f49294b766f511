//! The instance's life on NATS: load, subscribe in the queue group, batch, reply, drain, exit.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::DType;
use faasmoe_model::{Checkpoint, ExpertSelection, ExpertSet};
use faasmoe_proto::events::{EventKind, FunctionEvent};
use faasmoe_proto::expert::{decode_request, encode, ExpertReply, ExpertRequest};
use faasmoe_proto::layout::FunctionSpec;
use faasmoe_proto::{subject, ErrorCode, WireError};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::drain::{fence, Intake, FENCE_TIMEOUT, STEP_TIMEOUT};
use crate::function::Function;
use crate::outage::OutageLog;
use crate::settings::Settings;
use crate::stats::WorkerStats;

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// No request for the idle timeout (scale to zero).
    Idle,
    /// The shutdown future resolved (SIGTERM / SIGINT).
    Shutdown,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Pending {
    msg: async_nats::Message,
    req: ExpertRequest,
    received: Instant,
}

/// Runs one instance until it is idle for the timeout or `shutdown` resolves; in both cases
/// it drains (see [`crate::drain`]: unsubscribes, waits for the server to confirm, answers
/// every request delivered before), then returns. Every NATS step of the drain and exit is
/// bounded, so it also returns when the server is gone.
///
/// Errors: the experts could not be loaded, the ids are not valid subject tokens, or
/// connecting, subscribing or announcing the instance failed.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ExitReason> {
    let started = Instant::now();
    let model = settings.model_id();
    subject::validate_token("model", &model).with_context(|| format!("model id `{model}`"))?;
    let instance_id = settings
        .instance_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_string());

    // Load only this function's experts.
    let dir = settings.model_dir.clone();
    let spec = settings.experts.clone();
    let (experts, selection) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<(ExpertSet, ExpertSelection)> {
            let mut ckpt = Checkpoint::open(&dir, DType::F32)?;
            let sel = ExpertSelection::parse(&spec, ckpt.config().num_experts)
                .map_err(anyhow::Error::msg)?;
            Ok((ExpertSet::load(&mut ckpt, &sel)?, sel))
        })
        .await??;
    let function_id = match &settings.function_id {
        Some(f) => f.clone(),
        None => default_function_id(&selection),
    };
    subject::validate_token("function id", &function_id)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    info!(%model, %function_id, %instance_id, experts = selection.0.len(), weight_mb = experts.weight_bytes() as f64 / 1e6, load_ms, "experts loaded");
    let function = Arc::new(Function::new(experts, settings.max_request_bytes));

    // Outages are logged with their duration; the drain and exit never wait on one.
    let outage = OutageLog::new();
    let client = settings
        .nats
        .connect_with(
            &format!("faasmoe-expert-worker {function_id} {instance_id}"),
            outage.options(async_nats::ConnectOptions::new()),
        )
        .await?;

    let experts_named: Vec<String> = selection
        .0
        .iter()
        .map(|id| format!("{}:{}", id.layer, id.expert))
        .collect();
    let stats = Arc::new(Mutex::new(WorkerStats::new(
        function_id.clone(),
        instance_id.clone(),
        experts_named.clone(),
    )));

    // Subscribe every expert subject in the function's queue group; the intake forwards
    // their requests to the batching loop and drains them on scale-to-zero.
    let queue = subject::function_queue_group(&model, &function_id)?;
    let status_subject = subject::status(&model, &function_id)?;
    let (tx, rx) = mpsc::channel::<async_nats::Message>(1024);
    let mut subs = Vec::new();
    for id in &selection.0 {
        let subj = subject::expert(&model, id.layer as u32, id.expert as u32)?;
        subs.push(client.queue_subscribe(subj, queue.clone()).await?);
    }
    let mut intake = Intake::start(client.clone(), subs, tx, status_subject.clone());

    let (service, status_task) = start_service(
        &client,
        &stats,
        [
            ("model".to_string(), model.clone()),
            ("function_id".to_string(), function_id.clone()),
            ("instance_id".to_string(), instance_id.clone()),
            ("experts".to_string(), experts_named.join(",")),
        ],
        &status_subject,
    )
    .await?;
    // A round trip: the server has every subscription before anyone is told this instance is
    // ready (a flush only writes the socket).
    fence(&client, &status_subject, FENCE_TIMEOUT)
        .await
        .context("confirming the subscriptions with the NATS server")?;

    let events = subject::events(&model)?;
    let event = |kind| FunctionEvent {
        kind,
        model: model.clone(),
        function_id: function_id.clone(),
        instance_id: instance_id.clone(),
        pid: Some(std::process::id()),
        at_unix_ms: unix_ms(),
        cold_start_ms: Some(started.elapsed().as_secs_f64() * 1e3),
        exit_status: None,
    };
    client
        .publish(events.clone(), event(EventKind::Subscribed).encode())
        .await?;
    if tokio::time::timeout(STEP_TIMEOUT, client.flush())
        .await
        .is_err()
    {
        warn!("the subscribed event was not written in time (connection down?)");
    }
    info!(%queue, ready_ms = started.elapsed().as_secs_f64() * 1e3, "ready");
    println!("READY {function_id} {instance_id}");

    let reason = serve(
        &client,
        &function,
        &stats,
        &settings,
        rx,
        &mut intake,
        shutdown,
    )
    .await;
    // Every request delivered before the drain is answered (the intake ended, so `rx` did).
    let drain = intake.finished().await;
    // Ending the status task drops its endpoint, which unsubscribes it before the last round
    // trip below is sent (that round trip goes to the status subject: an endpoint still
    // subscribed but no longer answering would hold it up). Not by waiting for the stream to
    // end after `stop`: it ends only once the connection handler has processed the UNSUB,
    // i.e. never while the server is gone.
    let _ = tokio::time::timeout(STEP_TIMEOUT, service.stop()).await;
    status_task.abort();
    let _ = tokio::time::timeout(STEP_TIMEOUT, status_task).await;
    let mut ev = event(EventKind::Draining);
    ev.cold_start_ms = None;
    if tokio::time::timeout(STEP_TIMEOUT, client.publish(events, ev.encode()))
        .await
        .is_err()
    {
        warn!("the draining event was not accepted in time (connection down?)");
    }
    // A last round trip: the server has every reply and the draining event before the
    // connection closes (a flush only writes the socket).
    let delivered = fence(&client, &status_subject, FENCE_TIMEOUT).await;
    if let Err(e) = &delivered {
        warn!(error = %e, "exiting without the server confirming the last replies");
    }
    let s = stats.lock().unwrap().snapshot();
    info!(
        ?reason,
        requests = s.requests,
        batches = s.batches,
        uptime_s = s.uptime_s,
        drain_confirmed = drain.confirmed,
        drain_ms = drain.drain_ms,
        answered_after_drain_began = drain.forwarded_after_stop,
        "exiting"
    );
    Ok(reason)
}

/// Starts the instance's NATS micro service `faasmoe-expert` (`$SRV.PING` / `INFO` / `STATS`
/// discover it; `metadata` names model, function, instance and experts) with a `status`
/// endpoint on `status_subject` that answers the [`WorkerStats`] snapshot; returns the
/// service and the task that answers status requests.
///
/// Errors: the service or its endpoint could not be started (connection down, permissions).
async fn start_service(
    client: &async_nats::Client,
    stats: &Arc<Mutex<WorkerStats>>,
    metadata: [(String, String); 4],
    status_subject: &str,
) -> anyhow::Result<(async_nats::service::Service, tokio::task::JoinHandle<()>)> {
    use async_nats::service::ServiceExt;
    let stats_for_srv = stats.clone();
    let (model, function_id) = (metadata[0].1.clone(), metadata[1].1.clone());
    let service = client
        .service_builder()
        .description(format!("faasmoe expert function {function_id} of {model}"))
        .metadata(metadata.into_iter().collect())
        .stats_handler(move |_endpoint, _stats| {
            serde_json::to_value(stats_for_srv.lock().unwrap().snapshot()).unwrap_or_default()
        })
        .start("faasmoe-expert", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting the micro service: {e}"))?;
    let mut status = service
        .endpoint_builder()
        .name("status")
        .add(status_subject.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("adding the status endpoint: {e}"))?;
    let stats_for_status = stats.clone();
    let status_task = tokio::spawn(async move {
        while let Some(req) = status.next().await {
            let body = serde_json::to_vec(&stats_for_status.lock().unwrap().snapshot())
                .unwrap_or_default();
            let _ = req.respond(Ok(body.into())).await;
        }
    });
    Ok((service, status_task))
}

/// The batching loop: takes the requests the intake forwards on `rx`, admits them into a
/// batch of at most `batch_max_tokens` rows (waiting up to `batch_max_wait_us` for more
/// after the first, or for nothing when that is 0) and computes each batch, until idle for
/// the idle timeout or `shutdown` resolves (then it drains the intake and goes on until the
/// intake has forwarded its last request). Returns why it ended.
async fn serve(
    client: &async_nats::Client,
    function: &Arc<Function>,
    stats: &Mutex<WorkerStats>,
    settings: &Settings,
    mut rx: mpsc::Receiver<async_nats::Message>,
    intake: &mut Intake,
    shutdown: impl std::future::Future<Output = ()>,
) -> ExitReason {
    let idle = settings.idle_timeout();
    let max_wait = Duration::from_micros(settings.batch_max_wait_us);
    let mut idle_deadline =
        tokio::time::Instant::now() + idle.unwrap_or(Duration::from_secs(86400 * 365));
    let mut reason = None;
    tokio::pin!(shutdown);
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => break },
            _ = tokio::time::sleep_until(idle_deadline), if idle.is_some() && reason.is_none() => {
                info!(idle_ms = settings.idle_timeout_ms, "idle: scaling to zero");
                reason = Some(ExitReason::Idle);
                intake.drain();
                continue;
            }
            _ = &mut shutdown, if reason.is_none() => {
                info!("shutdown requested: draining");
                reason = Some(ExitReason::Shutdown);
                intake.drain();
                continue;
            }
        };
        let mut batch = Vec::new();
        let mut rows = 0usize;
        if let Some(p) = admit(client, function, stats, first).await {
            rows += p.req.routes.len();
            batch.push(p);
        }
        let deadline = tokio::time::Instant::now() + max_wait;
        while rows < settings.batch_max_tokens {
            if max_wait.is_zero() {
                // Greedy: take what has already arrived, wait for nothing.
                match rx.try_recv() {
                    Ok(m) => {
                        if let Some(p) = admit(client, function, stats, m).await {
                            rows += p.req.routes.len();
                            batch.push(p);
                        }
                        continue;
                    }
                    Err(_) => break,
                }
            }
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => if let Some(p) = admit(client, function, stats, m).await { rows += p.req.routes.len(); batch.push(p); },
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !batch.is_empty() {
            execute(client, function, stats, batch).await;
        }
        if let Some(idle) = idle {
            idle_deadline = tokio::time::Instant::now() + idle;
        }
    }
    reason.unwrap_or(ExitReason::Shutdown)
}

/// Publishes `body` to `subject`, bounded by [`STEP_TIMEOUT`] (the client only waits when
/// its command queue is full, i.e. the connection is down); a failure is logged.
async fn publish_bounded(
    client: &async_nats::Client,
    subject: async_nats::Subject,
    body: bytes::Bytes,
) {
    match tokio::time::timeout(STEP_TIMEOUT, client.publish(subject, body)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "reply failed"),
        Err(_) => warn!(timeout = ?STEP_TIMEOUT, "reply not accepted in time (connection down?)"),
    }
}

/// The default function id: [`FunctionSpec`]'s `l<layer>-e<a>-<b>` for a contiguous range of
/// one layer, else a listing of layers and experts.
pub fn default_function_id(sel: &ExpertSelection) -> String {
    let layer = sel.0[0].layer;
    let (a, b) = (sel.0[0].expert, sel.0[sel.0.len() - 1].expert);
    if sel.0.iter().all(|id| id.layer == layer) && b - a + 1 == sel.0.len() {
        FunctionSpec::new(layer as u32, a as u32, b as u32).id
    } else {
        let mut s = String::from("custom");
        for id in &sel.0 {
            s.push_str(&format!("-{}x{}", id.layer, id.expert));
        }
        s
    }
}

async fn reply_error(
    client: &async_nats::Client,
    stats: &Mutex<WorkerStats>,
    msg: &async_nats::Message,
    id: uuid::Uuid,
    err: WireError,
) {
    stats.lock().unwrap().error(err.code.as_str());
    debug!(code = %err.code, message = %err.message, "error reply");
    if let Some(reply) = &msg.reply {
        publish_bounded(client, reply.clone(), encode(&ExpertReply::err(id, err))).await;
    }
}

/// Decodes and checks one message; a bad one is answered with a typed error at once.
async fn admit(
    client: &async_nats::Client,
    function: &Function,
    stats: &Mutex<WorkerStats>,
    msg: async_nats::Message,
) -> Option<Pending> {
    stats.lock().unwrap().requests += 1;
    match &msg.reply {
        None => {
            stats.lock().unwrap().error("no_reply_subject");
            return None;
        }
        Some(r) if !subject::is_answerable(r) => {
            warn!(reply = %r, "expert request with a reply subject outside faasmoe.v1.reply and _INBOX: ignored");
            stats.lock().unwrap().error("bad_reply_subject");
            return None;
        }
        Some(_) => {}
    }
    if msg.payload.len() > function.max_request_bytes {
        let e = WireError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "{} bytes > limit {}",
                msg.payload.len(),
                function.max_request_bytes
            ),
        );
        reply_error(client, stats, &msg, uuid::Uuid::nil(), e).await;
        return None;
    }
    let req = match decode_request(&msg.payload) {
        Ok(r) => r,
        Err(e) => {
            reply_error(client, stats, &msg, uuid::Uuid::nil(), e).await;
            return None;
        }
    };
    if let Err(e) = function.check(&req) {
        reply_error(client, stats, &msg, req.request_id, e).await;
        return None;
    }
    Some(Pending {
        msg,
        req,
        received: Instant::now(),
    })
}

/// Computes one batch on a blocking thread and replies to every request.
async fn execute(
    client: &async_nats::Client,
    function: &Arc<Function>,
    stats: &Mutex<WorkerStats>,
    batch: Vec<Pending>,
) {
    let traceparent = batch
        .iter()
        .find_map(|p| faasmoe_proto::trace::extract(p.msg.headers.as_ref()));
    let tenants: Vec<String> = batch.iter().map(|p| p.req.tenant.clone()).collect();
    let rows: usize = batch.iter().map(|p| p.req.routes.len()).sum();
    let span = info_span!("expert.execute", requests = batch.len(), rows);
    if let Some(tp) = &traceparent {
        faasmoe_telemetry::set_parent(&span, tp);
    }
    async {
        let t0 = Instant::now();
        let f = function.clone();
        let reqs: Vec<ExpertRequest> = batch.iter().map(|p| p.req.clone()).collect();
        let result = tokio::task::spawn_blocking(move || {
            let refs: Vec<&ExpertRequest> = reqs.iter().collect();
            f.compute(&refs)
        })
        .await
        .unwrap_or_else(|e| Err(WireError::new(ErrorCode::Internal, format!("compute panicked: {e}"))));
        let busy_ms = t0.elapsed().as_secs_f64() * 1e3;
        stats.lock().unwrap().batch(tenants.iter().map(String::as_str), batch.len(), rows, busy_ms);
        match result {
            Ok(outputs) => {
                for (p, out) in batch.iter().zip(outputs) {
                    let body = encode(&ExpertReply::ok(p.req.request_id, out));
                    publish_bounded(client, p.msg.reply.clone().expect("checked"), body).await;
                    debug!(request_id = %p.req.request_id, tenant = %p.req.tenant, wait_ms = p.received.elapsed().as_secs_f64() * 1e3, "replied");
                }
            }
            Err(e) => {
                warn!(code = %e.code, message = %e.message, "batch failed");
                for p in &batch {
                    reply_error(client, stats, &p.msg, p.req.request_id, e.clone()).await;
                }
            }
        }
    }
    .instrument(span)
    .await
}
