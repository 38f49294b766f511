//! OpenTelemetry traces cross NATS: the `expert.execute` span of a worker descends, through
//! `layer.dispatch` and `engine.micro_batch`, from the controller's `generate.request` span,
//! all in one trace.
//!
//! The controller and four whole-layer workers (granularity 16) run in this process so that
//! every span reaches one in-memory exporter; the messages still go through a real
//! `nats-server` (install it with `scripts/install-nats-server`). This file holds one test
//! only: it installs the process-wide tracing subscriber. No OTLP export is attempted
//! (`init_with_exporter` never looks at `OTEL_EXPORTER_OTLP_ENDPOINT`).
//! Skipped (passes with a loud message) when the `qwen15-moe-tiny` fixture is absent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use faasmoe_controller::quota::Unlimited;
use faasmoe_controller::service::ControllerSettings;
use faasmoe_proto::layout::Layout;
use faasmoe_telemetry::InMemorySpanExporter;
use futures::StreamExt;

const MODEL_ID: &str = "tiny";
const GRANULARITY: u32 = 16;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    settings: ControllerSettings,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_execution_span_descends_from_the_controller_request_span() {
    let Some(dir) = faasmoe_model::fixtures::fixture("qwen15-moe-tiny") else {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: fixture qwen15-moe-tiny not found (set FAASMOE_FIXTURES) ***\n"
        );
        return;
    };
    let exporter = InMemorySpanExporter::default();
    let guard = faasmoe_telemetry::init_with_exporter("faasmoe-tracing-test", exporter.clone());

    let server = faasmoe_e2e::NatsServer::start();
    let url = server.url();
    let client = async_nats::connect(url.as_str())
        .await
        .expect("connect to nats-server");

    // Workers announce themselves on the events subject once subscribed.
    let mut events = client
        .subscribe(faasmoe_proto::subject::events(MODEL_ID).unwrap())
        .await
        .unwrap();
    client.flush().await.unwrap();

    let layout = Layout::new(&[0, 1, 2, 3], 16, GRANULARITY);
    assert_eq!(layout.functions.len(), 4);
    let mut workers = Vec::new();
    for f in &layout.functions {
        let dir = dir.to_str().unwrap();
        let settings = faasmoe_expert_worker::Settings::try_parse_from([
            "faasmoe-expert-worker",
            "--nats-url",
            url.as_str(),
            "--model-dir",
            dir,
            "--model-id",
            MODEL_ID,
            "--experts",
            &f.experts_spec(),
            "--function-id",
            &f.id,
            "--idle-timeout-ms",
            "0",
        ])
        .expect("worker settings");
        workers.push(tokio::spawn(faasmoe_expert_worker::run(
            settings,
            std::future::pending::<()>(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 0..layout.functions.len() {
        match tokio::time::timeout_at(deadline.into(), events.next()).await {
            Ok(Some(_)) => {}
            _ => {
                for w in &workers {
                    if w.is_finished() {
                        panic!("a worker ended early");
                    }
                }
                panic!(
                    "only {n} of {} workers became ready",
                    layout.functions.len()
                );
            }
        }
    }

    let controller_settings = Cli::try_parse_from([
        "faasmoe-controller",
        "--nats-url",
        url.as_str(),
        "--model-dir",
        dir.to_str().unwrap(),
        "--model-id",
        MODEL_ID,
        "--granularity",
        &GRANULARITY.to_string(),
        "--activation-timeout-ms",
        "1000",
    ])
    .expect("controller settings")
    .settings;
    let controller = tokio::spawn(faasmoe_controller::service::run(
        controller_settings,
        Arc::new(Unlimited),
    ));

    // Retry until the controller has loaded and subscribed (no responders before that).
    let body = serde_json::json!({"input_ids": [1, 2, 3], "max_tokens": 2, "temperature": 0});
    let payload = bytes::Bytes::from(serde_json::to_vec(&body).unwrap());
    let reply = loop {
        let req = async_nats::Request::new()
            .payload(payload.clone())
            .timeout(Some(Duration::from_secs(30)));
        match client.send_request("faasmoe.v1.generate.acme", req).await {
            Ok(m) => break m,
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && Instant::now() < deadline =>
            {
                assert!(!controller.is_finished(), "the controller ended early");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("generate request failed: {e}"),
        }
    };
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
    assert!(reply.get("error").is_none(), "generate failed: {reply}");

    // Spans are exported as they end; the request and worker spans may end just after the
    // reply, so poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        guard.flush();
        let spans = exporter.get_finished_spans().expect("finished spans");
        let requests: Vec<_> = spans
            .iter()
            .filter(|s| s.name == "generate.request")
            .collect();
        let executes: Vec<_> = spans
            .iter()
            .filter(|s| s.name == "expert.execute")
            .collect();
        let by_id: HashMap<_, _> = spans
            .iter()
            .map(|s| (s.span_context.span_id(), s))
            .collect();
        let chains: Vec<Vec<&str>> = executes
            .iter()
            .map(|e| {
                let mut chain = vec![e.name.as_ref()];
                let mut cur = *e;
                while let Some(p) = by_id.get(&cur.parent_span_id) {
                    assert_eq!(
                        p.span_context.trace_id(),
                        e.span_context.trace_id(),
                        "{} and its parent {} are in different traces",
                        cur.name,
                        p.name
                    );
                    chain.push(p.name.as_ref());
                    cur = p;
                }
                chain
            })
            .collect();
        let complete = |c: &Vec<&str>| c.last() == Some(&"generate.request");
        if requests.len() == 1 && !executes.is_empty() && chains.iter().all(complete) {
            let request = requests[0];
            for e in &executes {
                assert_eq!(e.span_context.trace_id(), request.span_context.trace_id());
            }
            for c in &chains {
                for name in ["layer.dispatch", "engine.micro_batch"] {
                    assert!(c.contains(&name), "chain {c:?} lacks {name}");
                }
            }
            // One expert call per MoE layer per step: 4 layers, 2 steps (prefill + decode).
            assert!(
                executes.len() >= 4,
                "only {} expert.execute spans",
                executes.len()
            );
            eprintln!(
                "{} expert.execute spans, e.g. {:?}",
                executes.len(),
                chains[0]
            );
            break;
        }
        if Instant::now() >= deadline {
            let names: Vec<_> = spans
                .iter()
                .map(|s| {
                    (
                        s.name.to_string(),
                        s.span_context.trace_id(),
                        s.span_context.span_id(),
                        s.parent_span_id,
                    )
                })
                .collect();
            panic!("no complete chain: {} generate.request, {} expert.execute spans; chains {chains:?}; spans {names:#?}", requests.len(), executes.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    controller.abort();
    for w in workers {
        w.abort();
    }
}
