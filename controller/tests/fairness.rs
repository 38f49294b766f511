//! Fair admission across tenants: one tenant's flood does not starve another tenant's single
//! request (round-robin admission at step boundaries).

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use faasmoe_controller::quota::Unlimited;
use faasmoe_controller::service::{self, ControllerSettings};
use faasmoe_e2e::NatsServer;
use faasmoe_model::fixtures::fixture;
use serde_json::{json, Value};

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    settings: ControllerSettings,
}

async fn ask(client: async_nats::Client, tenant: &str, body: Value) -> Value {
    let m = client
        .send_request(
            format!("faasmoe.v1.generate.{tenant}"),
            async_nats::Request::new()
                .payload(body.to_string().into())
                .timeout(Some(Duration::from_secs(120))),
        )
        .await
        .unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_flood_does_not_starve_another_tenants_single_request() {
    let Some(dir) = fixture("qwen15-moe-tiny") else {
        return;
    };
    let server = NatsServer::start();
    // One sequence per step: admission order is completion order.
    let w = Wrapper::try_parse_from([
        "t",
        "--nats-url",
        &server.url(),
        "--model-dir",
        dir.to_str().unwrap(),
        "--model-id",
        "tiny",
        "--local-experts",
        "--max-batch-seqs",
        "1",
    ])
    .unwrap();
    tokio::spawn(service::run(w.settings, Arc::new(Unlimited)));
    let client = server.connect().await.unwrap();
    // Wait until the controller serves.
    for _ in 0..300 {
        let r = client.request("faasmoe.v1.generate.probe", "".into()).await;
        if r.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Long enough that the flood outlasts the 300 ms before the single request (the bf16
    // kernel decodes the tiny model fast), and that a flood request takes much longer than
    // the single request's way to the engine: with 64 tokens, a loaded 2-core CI machine
    // finished two more flood requests in that time once.
    let body = json!({"input_ids": [1, 2, 3, 4], "max_tokens": 256, "temperature": 0});
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (c, o, b) = (client.clone(), order.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = ask(c, "flood", b).await;
            assert!(r.get("error").is_none(), "{r}");
            o.lock().unwrap().push(format!("flood{i}"));
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done_before = order.lock().unwrap().len();
    let (c, o) = (client.clone(), order.clone());
    tasks.push(tokio::spawn(async move {
        let r = ask(c, "single", body).await;
        assert!(r.get("error").is_none(), "{r}");
        o.lock().unwrap().push("single".into());
    }));
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let pos = order.iter().position(|s| s == "single").unwrap();
    eprintln!("completion order: {order:?}");
    // FIFO would finish it after every queued flood request; round-robin admits it as soon as
    // the flood's running request and at most one more have finished.
    assert!(
        done_before < 6,
        "the flood finished too fast to test anything: {order:?}"
    );
    assert!(
        pos - done_before <= 2,
        "{} flood requests finished before the single one: {order:?}",
        pos - done_before
    );
}
