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
//! timeout, then retry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use faasmoe_model::{InProcessBackend, RoutedBatch};
use faasmoe_model::qwen2_moe::ExpertBackend;
use faasmoe_proto::activation::{ActivateReply, ActivateRequest, ActivateResult};
use faasmoe_proto::expert::{decode_reply, encode, ExpertRequest, ExpertResult, RowRoutes};
use faasmoe_proto::layout::Layout;
use faasmoe_proto::tensor::{WireDType, WireTensor};
use faasmoe_proto::{subject, ErrorCode, PROTOCOL_VERSION};
use futures::future::BoxFuture;
use tracing::{debug, info, warn, Instrument};

/// Why the routed part of a layer could not be computed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// A function could not be reached or activated in time (maps to `unavailable`).
    #[error("expert function unavailable: {0}")]
    Unavailable(String),
    /// A function answered with an error or a malformed reply (maps to `internal`).
    #[error("expert function failed: {0}")]
    Internal(String),
}

/// Who the rows belong to and the trace they continue.
#[derive(Debug, Clone, Default)]
pub struct DispatchContext {
    /// Tenants whose rows are in the batch (comma separated).
    pub tenants: String,
    /// W3C `traceparent` of the engine step span.
    pub traceparent: Option<String>,
}

/// Computes the routed experts of a layer: `[n, hidden]` weighted sums.
pub trait Dispatch: Send + Sync {
    /// Returns row `i` = Σ w · expert_e(hidden[i]) over `batch.routes[i]`.
    fn routed<'a>(&'a self, batch: &'a RoutedBatch, ctx: &'a DispatchContext) -> BoxFuture<'a, Result<Tensor, DispatchError>>;
    /// Counters so far.
    fn stats(&self) -> DispatchStats {
        DispatchStats::default()
    }
}

/// Counters of a dispatcher.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DispatchStats {
    /// Function invocations (requests sent, retries included).
    pub invocations: u64,
    /// Request payload bytes sent.
    pub bytes_sent: u64,
    /// Reply payload bytes received.
    pub bytes_received: u64,
    /// Activations asked of the broker.
    pub activations: u64,
    /// Retries after a timeout or error.
    pub retries: u64,
}

/// All experts in this process (the local-split mode, and tests).
pub struct LocalDispatch(pub InProcessBackend);

impl Dispatch for LocalDispatch {
    fn routed<'a>(&'a self, batch: &'a RoutedBatch, _ctx: &'a DispatchContext) -> BoxFuture<'a, Result<Tensor, DispatchError>> {
        let mut b = self.0.clone();
        let r = b.routed(batch).map_err(|e| DispatchError::Internal(e.to_string()));
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
}

impl NatsDispatch {
    /// A dispatcher for a model of hidden size `hidden_size`.
    pub fn new(client: async_nats::Client, settings: NatsDispatchSettings, hidden_size: usize) -> Arc<Self> {
        Arc::new(Self {
            client,
            settings,
            hidden_size,
            invocations: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            activations: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        })
    }

    async fn activate(&self, fidx: usize) -> Result<(), DispatchError> {
        let f = &self.settings.layout.functions[fidx];
        self.activations.fetch_add(1, Ordering::Relaxed);
        let req = ActivateRequest {
            version: PROTOCOL_VERSION,
            model: self.settings.model_id.clone(),
            function_id: f.id.clone(),
            layer: f.layer,
            experts: f.experts.clone(),
            requested_by: self.settings.controller_id.clone(),
        };
        let subj = subject::activate(&self.settings.model_id).map_err(|e| DispatchError::Internal(e.to_string()))?;
        let t0 = Instant::now();
        let fut = self.client.request(subj, req.encode());
        let msg = match tokio::time::timeout(self.settings.activation_timeout, fut).await {
            Err(_) => return Err(DispatchError::Unavailable(format!("activation of {} timed out", f.id))),
            Ok(Err(e)) => return Err(DispatchError::Unavailable(format!("activation of {}: {e} (is the broker running?)", f.id))),
            Ok(Ok(m)) => m,
        };
        match ActivateReply::decode(&msg.payload).map_err(|e| DispatchError::Internal(e.to_string()))?.result {
            ActivateResult::Ok { instance_id, cold_start_ms, already_running } => {
                info!(function = %f.id, %instance_id, cold_start_ms, already_running, wait_ms = t0.elapsed().as_secs_f64() * 1e3, "function activated");
                Ok(())
            }
            ActivateResult::Err(e) => Err(DispatchError::Unavailable(format!("activation of {}: {}: {}", f.id, e.code, e.message))),
        }
    }

    /// One function call with retries and activation; returns the `[rows, hidden]` output.
    async fn call(&self, fidx: usize, req: ExpertRequest, traceparent: Option<&str>) -> Result<Vec<f32>, DispatchError> {
        let f = &self.settings.layout.functions[fidx];
        let subj = subject::expert(&self.settings.model_id, f.layer, f.experts[0]).map_err(|e| DispatchError::Internal(e.to_string()))?;
        let payload = encode(&req);
        let mut activated = false;
        let mut attempt = 0;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(tp) = traceparent {
                faasmoe_proto::trace::inject(&mut headers, tp);
            }
            self.invocations.fetch_add(1, Ordering::Relaxed);
            self.bytes_sent.fetch_add(payload.len() as u64, Ordering::Relaxed);
            let request = async_nats::Request::new().payload(payload.clone()).headers(headers).timeout(Some(self.settings.request_timeout));
            let outcome = self.client.send_request(subj.clone(), request).await;
            let retry_reason = match outcome {
                Ok(msg) => {
                    self.bytes_received.fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
                    let reply = decode_reply(&msg.payload).map_err(|e| DispatchError::Internal(format!("{}: {e}", f.id)))?;
                    match reply.result {
                        ExpertResult::Ok { output } => {
                            let (rows, cols) = output.dims2().map_err(|e| DispatchError::Internal(e.to_string()))?;
                            if rows != req.routes.len() || cols != self.hidden_size {
                                return Err(DispatchError::Internal(format!("{} replied [{rows}, {cols}] for [{}, {}]", f.id, req.routes.len(), self.hidden_size)));
                            }
                            return output.to_f32_vec().map_err(|e| DispatchError::Internal(e.to_string()));
                        }
                        // Errors about the request itself are ours: retrying will not help.
                        ExpertResult::Err(e) if e.code != ErrorCode::Internal && e.code != ErrorCode::Unavailable => {
                            return Err(DispatchError::Internal(format!("{}: {}: {}", f.id, e.code, e.message)));
                        }
                        ExpertResult::Err(e) => format!("{}: {}", e.code, e.message),
                    }
                }
                Err(e) => match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        if activated && attempt > self.settings.max_retries {
                            return Err(DispatchError::Unavailable(format!("{}: no responders after activation", f.id)));
                        }
                        self.activate(fidx).await?;
                        activated = true;
                        attempt += 1;
                        continue;
                    }
                    async_nats::RequestErrorKind::TimedOut => "timed out".to_string(),
                    _ => e.to_string(),
                },
            };
            attempt += 1;
            if attempt > self.settings.max_retries {
                return Err(DispatchError::Unavailable(format!("{}: {retry_reason} after {attempt} attempts", f.id)));
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            warn!(function = %f.id, reason = %retry_reason, attempt, "retrying expert request");
        }
    }
}

impl Dispatch for NatsDispatch {
    fn routed<'a>(&'a self, batch: &'a RoutedBatch, ctx: &'a DispatchContext) -> BoxFuture<'a, Result<Tensor, DispatchError>> {
        Box::pin(
            async move {
                let h = self.hidden_size;
                let (n, cols) = batch.hidden.dims2().map_err(|e| DispatchError::Internal(e.to_string()))?;
                if cols != h {
                    return Err(DispatchError::Internal(format!("hidden {cols} != {h}")));
                }
                let data: Vec<f32> = batch
                    .hidden
                    .to_dtype(candle_core::DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .map_err(|e| DispatchError::Internal(e.to_string()))?;
                // function index → (row indices, routes)
                let mut groups: std::collections::BTreeMap<usize, (Vec<usize>, Vec<RowRoutes>)> = Default::default();
                for (row, routes) in batch.routes.iter().enumerate() {
                    for &(e, w) in routes {
                        let fidx = self
                            .settings
                            .layout
                            .function_of(batch.layer as u32, e as u32)
                            .ok_or_else(|| DispatchError::Internal(format!("no function holds expert {e} of layer {}", batch.layer)))?;
                        let g = groups.entry(fidx).or_default();
                        if g.0.last() != Some(&row) {
                            g.0.push(row);
                            g.1.push(RowRoutes { experts: vec![], weights: vec![] });
                        }
                        let r = g.1.last_mut().expect("pushed");
                        r.experts.push(e as u32);
                        r.weights.push(w);
                    }
                }
                // Expert requests are children of this layer's dispatch span.
                let traceparent = faasmoe_telemetry::current_traceparent().or_else(|| ctx.traceparent.clone());
                let traceparent = traceparent.as_deref();
                let calls = groups.into_iter().map(|(fidx, (rows, routes))| {
                    let mut buf = Vec::with_capacity(rows.len() * h);
                    for &r in &rows {
                        buf.extend_from_slice(&data[r * h..(r + 1) * h]);
                    }
                    async move {
                        let hidden = WireTensor::from_f32(vec![rows.len() as u32, h as u32], &buf, self.settings.wire_dtype)
                            .map_err(|e| DispatchError::Internal(e.to_string()))?;
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
                        let out = self.call(fidx, req, traceparent).await?;
                        Ok::<_, DispatchError>((rows, out))
                    }
                });
                let results = futures::future::join_all(calls).await;
                let mut acc = vec![0f32; n * h];
                for r in results {
                    let (rows, out) = r?;
                    for (k, &row) in rows.iter().enumerate() {
                        let dst = &mut acc[row * h..(row + 1) * h];
                        for (d, s) in dst.iter_mut().zip(&out[k * h..(k + 1) * h]) {
                            *d += s;
                        }
                    }
                }
                debug!(layer = batch.layer, rows = n, "layer dispatched");
                Tensor::from_vec(acc, (n, h), &Device::Cpu).map_err(|e| DispatchError::Internal(e.to_string()))
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
        }
    }
}
