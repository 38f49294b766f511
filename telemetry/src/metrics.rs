//! Prometheus metrics of every faasmoe process, through the `metrics` facade and
//! `metrics-exporter-prometheus`.
//!
//! Names follow vLLM's (`vllm:time_to_first_token_seconds` → `faasmoe_time_to_first_token_seconds`,
//! vLLM `vllm/v1/metrics/loggers.py`) with vLLM's histogram buckets; the function-level
//! names are ours. Labels stay low-cardinality: an endpoint, an HTTP status, a finish reason,
//! a function id (bounded by the deployment's layout); never a tenant, model or request id.
//!
//! [`install`] installs the process's recorder once and returns its handle; [`serve`] binds an
//! HTTP listener that answers `GET /metrics` (what the controller and the broker use; the
//! gateway renders the same handle on its own router).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Time to first token, seconds (histogram): arrival of the request to its first token.
pub const TTFT: &str = "faasmoe_time_to_first_token_seconds";
/// Time between two tokens of one request, seconds (histogram).
pub const ITL: &str = "faasmoe_inter_token_latency_seconds";
/// Arrival of the request to its last token, seconds (histogram).
pub const E2E: &str = "faasmoe_e2e_request_latency_seconds";
/// Time a request waited for admission and a batch slot, seconds (histogram).
pub const QUEUE: &str = "faasmoe_request_queue_time_seconds";
/// Prompt tokens of finished requests (counter, tokens).
pub const PROMPT_TOKENS: &str = "faasmoe_prompt_tokens_total";
/// Generated tokens of finished requests (counter, tokens).
pub const GENERATION_TOKENS: &str = "faasmoe_generation_tokens_total";
/// Finished requests by `finish_reason` (counter).
pub const REQUEST_SUCCESS: &str = "faasmoe_request_success_total";
/// Requests being served now: in a batch (gauge).
pub const RUNNING: &str = "faasmoe_num_requests_running";
/// Requests admitted but waiting for a batch slot (gauge).
pub const WAITING: &str = "faasmoe_num_requests_waiting";
/// HTTP requests by `endpoint` and `status` (counter; the gateway).
pub const HTTP_REQUESTS: &str = "faasmoe_http_requests_total";

/// Expert-function requests a controller sent, retries included (counter).
pub const FUNCTION_REQUESTS: &str = "faasmoe_function_requests_total";
/// Payload bytes a controller sent to expert functions (counter, bytes).
pub const FUNCTION_BYTES_SENT: &str = "faasmoe_function_request_bytes_total";
/// Payload bytes a controller received from expert functions (counter, bytes).
pub const FUNCTION_BYTES_RECEIVED: &str = "faasmoe_function_reply_bytes_total";
/// Expert-function requests sent again after a timeout or error (counter).
pub const FUNCTION_RETRIES: &str = "faasmoe_function_retries_total";
/// Function calls that found no instance and waited for a cold start (counter).
pub const FUNCTION_COLD_MISSES: &str = "faasmoe_function_cold_misses_total";
/// Activation requests a controller sent the broker, attempts and predicted ones included
/// (counter).
pub const ACTIVATION_REQUESTS: &str = "faasmoe_activation_requests_total";
/// Activations a controller started ahead of the pass from predicted routes (counter).
pub const PREDICTED_ACTIVATIONS: &str = "faasmoe_activation_predicted_total";
/// Predicted activations that a real route then used (counter; precision = this ÷ predicted).
pub const PREDICTION_HITS: &str = "faasmoe_activation_prediction_hits_total";
/// Extra expert requests made to fit the server's `max_payload` (counter).
pub const SPLIT_REQUESTS: &str = "faasmoe_function_split_requests_total";
/// Times a process's NATS connection came back after being lost (counter).
pub const RECONNECTS: &str = "faasmoe_nats_reconnects_total";

/// Live instances of a function by `function_id` and `state` (`starting`, `ready`,
/// `draining`) (gauge; the broker).
pub const INSTANCES: &str = "faasmoe_function_instances";
/// Instances the broker spawned (counter).
pub const COLD_STARTS: &str = "faasmoe_function_cold_starts_total";
/// Spawn to READY of one instance, seconds (histogram; the broker).
pub const COLD_START_SECONDS: &str = "faasmoe_function_cold_start_seconds";
/// Expert requests the instances of a function received, by `function_id` (counter; the
/// broker, from the workers' `$SRV.STATS`, keeping what exited instances had reported).
pub const WORKER_REQUESTS: &str = "faasmoe_worker_requests_total";
/// Batches the instances of a function computed, by `function_id` (counter, as above).
pub const WORKER_BATCHES: &str = "faasmoe_worker_batches_total";
/// Token rows the instances of a function computed, by `function_id` (counter, as above).
pub const WORKER_ROWS: &str = "faasmoe_worker_rows_total";
/// Batches holding requests of more than one tenant, by `function_id` (counter, as above).
pub const WORKER_CROSS_TENANT_BATCHES: &str = "faasmoe_worker_cross_tenant_batches_total";
/// Seconds the instances of a function spent computing, by `function_id` (a gauge that only
/// grows: `metrics` counters hold integers).
pub const WORKER_BUSY_SECONDS: &str = "faasmoe_worker_busy_seconds";
/// Most requests one batch of a function held, over its live instances (gauge, by
/// `function_id`; the mean batch is [`WORKER_REQUESTS`] ÷ [`WORKER_BATCHES`]).
pub const WORKER_MAX_BATCH_REQUESTS: &str = "faasmoe_worker_max_batch_requests";

/// vLLM's TTFT buckets, seconds.
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets, seconds.
const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets, seconds (end to end, queue time).
const E2E_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Cold start buckets, seconds (spawn → READY is 0.1–0.5 s on the demo, seconds at A2.7B).
const COLD_START_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder: installed on the first call, the same handle after
/// (several controllers in one test process share it).
///
/// Errors: another `metrics` recorder was installed first, or a bucket list is empty.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(TTFT.into()), &TTFT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(ITL.into()), &ITL_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(E2E.into()), &E2E_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(QUEUE.into()), &E2E_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(COLD_START_SECONDS.into()),
            &COLD_START_BUCKETS,
        )?
        .build_recorder();
    let handle = recorder.handle();
    match metrics::set_global_recorder(recorder) {
        Ok(()) => {
            describe();
            let _ = HANDLE.set(handle);
            Ok(HANDLE.get().expect("just set").clone())
        }
        // Lost a race with another thread of this module: use the winner's handle.
        Err(e) => HANDLE
            .get()
            .cloned()
            .ok_or(metrics_exporter_prometheus::BuildError::FailedToSetGlobalRecorder(e)),
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        TTFT,
        Unit::Seconds,
        "Histogram of time to first token in seconds."
    );
    describe_histogram!(
        ITL,
        Unit::Seconds,
        "Histogram of inter-token latency in seconds."
    );
    describe_histogram!(
        E2E,
        Unit::Seconds,
        "Histogram of end to end request latency in seconds."
    );
    describe_histogram!(
        QUEUE,
        Unit::Seconds,
        "Histogram of time spent waiting for admission and a batch slot in seconds."
    );
    describe_counter!(PROMPT_TOKENS, "Number of prefill tokens processed.");
    describe_counter!(GENERATION_TOKENS, "Number of generation tokens processed.");
    describe_counter!(REQUEST_SUCCESS, "Count of successfully processed requests.");
    describe_gauge!(RUNNING, "Number of requests in a batch now.");
    describe_gauge!(WAITING, "Number of requests waiting for a batch slot.");
    describe_counter!(HTTP_REQUESTS, "HTTP requests by endpoint and status.");
    describe_counter!(
        FUNCTION_REQUESTS,
        "Expert-function requests sent, retries included."
    );
    describe_counter!(
        FUNCTION_BYTES_SENT,
        Unit::Bytes,
        "Request payload bytes sent to expert functions."
    );
    describe_counter!(
        FUNCTION_BYTES_RECEIVED,
        Unit::Bytes,
        "Reply payload bytes received from expert functions."
    );
    describe_counter!(
        FUNCTION_RETRIES,
        "Expert-function requests sent again after a timeout or error."
    );
    describe_counter!(
        FUNCTION_COLD_MISSES,
        "Function calls that found no instance and waited for a cold start."
    );
    describe_counter!(
        ACTIVATION_REQUESTS,
        "Activation requests sent to the broker, attempts included."
    );
    describe_counter!(
        PREDICTED_ACTIVATIONS,
        "Activations started ahead of the pass from predicted routes."
    );
    describe_counter!(
        PREDICTION_HITS,
        "Predicted activations that a real route then used."
    );
    describe_counter!(
        SPLIT_REQUESTS,
        "Extra expert requests made to fit the server's max_payload."
    );
    describe_counter!(
        RECONNECTS,
        "Times the NATS connection came back after being lost."
    );
    describe_gauge!(INSTANCES, "Live instances of a function by state.");
    describe_counter!(COLD_STARTS, "Instances spawned by the broker.");
    describe_histogram!(
        COLD_START_SECONDS,
        Unit::Seconds,
        "Spawn to READY of one instance in seconds."
    );
    describe_counter!(
        WORKER_REQUESTS,
        "Expert requests received by the instances of a function."
    );
    describe_counter!(
        WORKER_BATCHES,
        "Batches computed by the instances of a function."
    );
    describe_counter!(
        WORKER_ROWS,
        "Token rows computed by the instances of a function."
    );
    describe_counter!(
        WORKER_CROSS_TENANT_BATCHES,
        "Batches holding requests of more than one tenant."
    );
    describe_gauge!(
        WORKER_BUSY_SECONDS,
        Unit::Seconds,
        "Seconds the live instances of a function spent computing."
    );
    describe_gauge!(
        WORKER_MAX_BATCH_REQUESTS,
        "Most requests one batch of a function held."
    );
}

/// Records a finished request: its token counts, queue time, TTFT (when it generated a token)
/// and end-to-end latency.
pub fn finished(
    finish_reason: &'static str,
    prompt_tokens: u32,
    completion_tokens: u32,
    queue: Duration,
    ttft: Duration,
    e2e: Duration,
) {
    metrics::counter!(PROMPT_TOKENS).increment(prompt_tokens.into());
    metrics::counter!(GENERATION_TOKENS).increment(completion_tokens.into());
    metrics::counter!(REQUEST_SUCCESS, "finish_reason" => finish_reason).increment(1);
    metrics::histogram!(QUEUE).record(queue.as_secs_f64());
    if completion_tokens > 0 {
        metrics::histogram!(TTFT).record(ttft.as_secs_f64());
    }
    metrics::histogram!(E2E).record(e2e.as_secs_f64());
}

/// Records one inter-token interval.
pub fn inter_token(d: Duration) {
    metrics::histogram!(ITL).record(d.as_secs_f64());
}

/// What `GET /metrics` runs before rendering (e.g. copying counters kept elsewhere into the
/// recorder); may ask other processes, so it is async.
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Renders the recorder in the Prometheus text format (version 0.0.4).
pub fn render(handle: &PrometheusHandle) -> String {
    handle.run_upkeep();
    handle.render()
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Binds `addr` (port 0: a free one) and serves `GET /metrics` there until the runtime
/// stops, running `refresh` before each render. Returns the bound address.
///
/// Errors: the address cannot be bound, or the recorder cannot be installed.
pub async fn serve(addr: SocketAddr, refresh: Option<Refresh>) -> std::io::Result<SocketAddr> {
    use axum::http::header;
    use axum::routing::get;
    let handle = install().map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let (handle, refresh) = (handle.clone(), refresh.clone());
            async move {
                if let Some(r) = refresh {
                    r().await;
                }
                ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&handle))
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(%local, error = %e, "metrics listener stopped");
        }
    });
    tracing::info!(%local, "Prometheus metrics on http://{local}/metrics");
    Ok(local)
}
