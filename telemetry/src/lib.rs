//! Logs and OpenTelemetry traces for every faasmoe process.
//!
//! [`init`] installs a `tracing` subscriber: human-readable logs on stderr (`RUST_LOG`,
//! default `info`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, an OpenTelemetry layer that
//! exports spans over OTLP/HTTP (silent otherwise). [`init_with_exporter`] does the same with
//! any span exporter (tests use the SDK's in-memory exporter).
//!
//! Across NATS, spans are linked with W3C trace context: [`current_traceparent`] renders the
//! current span as a `traceparent` header value, [`set_parent`] makes a span the child of a
//! received one. It does not know about NATS headers (that is `faasmoe_proto::trace`).

use std::collections::HashMap;

pub mod metrics;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The OTLP endpoint variable of the OpenTelemetry specification.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Flushes and shuts the tracer provider down when dropped (keep it alive in `main`).
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every finished span now.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"))
}

/// Installs logging, plus OTLP trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
/// `service` names the process in traces (`service.name`).
pub fn init(service: &str) -> TelemetryGuard {
    if std::env::var_os(OTLP_ENDPOINT_ENV).is_some() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => {
                return init_provider(
                    service,
                    SdkTracerProvider::builder().with_batch_exporter(exporter),
                )
            }
            Err(e) => eprintln!("OTLP exporter not started: {e}"),
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init();
    TelemetryGuard::default()
}

/// Installs logging and trace export to `exporter` (spans exported as they end).
pub fn init_with_exporter<E: SpanExporter + 'static>(service: &str, exporter: E) -> TelemetryGuard {
    init_provider(
        service,
        SdkTracerProvider::builder().with_simple_exporter(exporter),
    )
}

fn init_provider(
    service: &str,
    builder: opentelemetry_sdk::trace::TracerProviderBuilder,
) -> TelemetryGuard {
    let provider = builder
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("faasmoe");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init();
    TelemetryGuard {
        provider: Some(provider),
    }
}

/// The `traceparent` of `span` (W3C Trace Context), if it is being traced.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The `traceparent` of the current span, if it is being traced.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// Makes `span` a child of the remote span named by `traceparent` (ignored when invalid).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier: HashMap<String, String> =
        [("traceparent".to_string(), traceparent.to_string())].into();
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// Re-export for tests: the SDK's in-memory span exporter.
pub use opentelemetry_sdk::trace::InMemorySpanExporter;
