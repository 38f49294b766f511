//! Prometheus metrics of the gateway (`GET /metrics`): the request metrics every faasmoe
//! process shares ([`faasmoe_telemetry::metrics`]: vLLM's names under a `faasmoe_` prefix,
//! vLLM's buckets) plus HTTP requests by endpoint and status.

pub use faasmoe_telemetry::metrics::{
    finished, install, inter_token, render, CONTENT_TYPE, HTTP_REQUESTS, RUNNING,
};

/// Counts an HTTP request.
pub fn http(endpoint: &'static str, status: u16) {
    metrics::counter!(HTTP_REQUESTS, "endpoint" => endpoint, "status" => status.to_string())
        .increment(1);
}
