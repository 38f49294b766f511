//! Prometheus metrics of the gateway (`GET /metrics`), named as vLLM's under a `faasmoe_`
//! prefix, with vLLM's histogram buckets, through the `metrics` facade and
//! `metrics-exporter-prometheus`. Labels stay low-cardinality: the endpoint, the HTTP status,
//! the finish reason; never a tenant, model or request id.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Time to first token, seconds (histogram).
pub const TTFT: &str = "faasmoe_time_to_first_token_seconds";
/// Time between two tokens of a request, seconds (histogram).
pub const ITL: &str = "faasmoe_inter_token_latency_seconds";
/// Arrival at the gateway to the last token, seconds (histogram).
pub const E2E: &str = "faasmoe_e2e_request_latency_seconds";
/// Time waiting for admission and a batch slot, seconds (histogram).
pub const QUEUE: &str = "faasmoe_request_queue_time_seconds";
/// Prompt tokens of finished requests (counter).
pub const PROMPT_TOKENS: &str = "faasmoe_prompt_tokens_total";
/// Generated tokens of finished requests (counter).
pub const GENERATION_TOKENS: &str = "faasmoe_generation_tokens_total";
/// Finished requests by `finish_reason` (counter).
pub const REQUEST_SUCCESS: &str = "faasmoe_request_success_total";
/// HTTP requests by `endpoint` and `status` (counter).
pub const HTTP_REQUESTS: &str = "faasmoe_http_requests_total";
/// Requests being served now (gauge).
pub const RUNNING: &str = "faasmoe_num_requests_running";

const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const E2E_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Installs the global recorder (once per process) and returns the handle that renders it.
///
/// Errors: a recorder is already installed, or a bucket list is empty.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(TTFT.into()), &TTFT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(ITL.into()), &ITL_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(E2E.into()), &E2E_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(QUEUE.into()), &E2E_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(metrics_exporter_prometheus::BuildError::FailedToSetGlobalRecorder)?;
    describe();
    Ok(handle)
}

fn describe() {
    metrics::describe_histogram!(
        TTFT,
        metrics::Unit::Seconds,
        "Histogram of time to first token in seconds."
    );
    metrics::describe_histogram!(
        ITL,
        metrics::Unit::Seconds,
        "Histogram of inter-token latency in seconds."
    );
    metrics::describe_histogram!(
        E2E,
        metrics::Unit::Seconds,
        "Histogram of end to end request latency in seconds."
    );
    metrics::describe_histogram!(
        QUEUE,
        metrics::Unit::Seconds,
        "Histogram of time spent waiting for admission and a batch slot in seconds."
    );
    metrics::describe_counter!(PROMPT_TOKENS, "Number of prefill tokens processed.");
    metrics::describe_counter!(GENERATION_TOKENS, "Number of generation tokens processed.");
    metrics::describe_counter!(REQUEST_SUCCESS, "Count of successfully processed requests.");
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests by endpoint and status.");
    metrics::describe_gauge!(RUNNING, "Number of requests the gateway is serving now.");
}

/// Records a finished request: its token counts, queue time, TTFT and end-to-end latency.
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

/// Counts an HTTP request.
pub fn http(endpoint: &'static str, status: u16) {
    metrics::counter!(HTTP_REQUESTS, "endpoint" => endpoint, "status" => status.to_string())
        .increment(1);
}
