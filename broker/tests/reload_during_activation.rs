//! A server reload while activations and expert requests are out: the project's `nats.conf`
//! on an embedded nats-server, a real controller, the broker's activator spawning real expert
//! workers, and tenants created through the broker (each one reloads the server's
//! configuration) while a request waits for its cold functions.
//!
//! nats-server forgets a responder's pending reply permissions (`allow_responses`) when it
//! reloads, so a reply to an `_INBOX` that was outstanding at that moment is refused and
//! never arrives: an activation then waited its whole timeout (60 s), later a re-ask
//! (`ACTIVATION_REPLY_WAIT` in `controller/src/dispatch/nats.rs`, 3 s), and an expert
//! request its request timeout (10 s). The broker and the workers now answer on
//! `faasmoe.v1.reply.<requester>.…` (`faasmoe_proto::subject::reply_prefix`), an explicit
//! permission; the test checks that the request completes and that the server refused no
//! reply.
//!
//! Build the worker first: `cargo build -p faasmoe-expert-worker`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use faasmoe_broker::server::free_port;
use faasmoe_broker::{
    ActivationConfig, Activator, Deployment, EmbeddedServer, LocalProcessBackend, Quota,
    ServerOptions, TenantStore,
};
use faasmoe_controller::service::{ControllerSettings, ControllerTask};
use faasmoe_e2e::{cargo_bin, dev_users};
use faasmoe_proto::connection::NatsArgs;

mod common;
use common::KvQuota;

const MODEL: &str = "tiny";

async fn connect(url: &str, user: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(format!("_INBOX.{user}"))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_activation_replies_a_reload_drops_still_completes_in_seconds() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let model_dir = common::tiny_checkpoint(dir.path(), MODEL);
    let server = EmbeddedServer::start(ServerOptions {
        port: Some(free_port().unwrap()),
        monitor_port: Some(free_port().unwrap()),
        ..Default::default()
    })
    .unwrap();
    let url = server.url().to_string();
    let broker = connect(&url, dev_users::BROKER.0, dev_users::BROKER.1).await;
    let store = TenantStore::open_default(broker.clone()).await.unwrap();
    let admin = server.tenant_admin(store.clone());
    let alice = admin.create("alice", Quota::default()).await.unwrap();
    let mut d = Deployment::new(&model_dir);
    d.model_id = Some(MODEL.into());
    // One function per expert: many activations out at once, so a reload meets some.
    d.granularity = 1;
    let layout = d.layout().unwrap();
    let backend = LocalProcessBackend {
        worker_bin: cargo_bin("faasmoe-expert-worker"),
        nats: NatsArgs::with_user(&url, dev_users::WORKER.0, dev_users::WORKER.1),
        model_dir: model_dir.clone(),
        model_id: MODEL.into(),
        idle_timeout_ms: 60_000,
        log_dir: Some(dir.path().join("logs")),
        env: vec![],
    };
    let _activator = Activator::start(
        broker.clone(),
        ActivationConfig {
            ready_timeout: Duration::from_secs(30),
            ..ActivationConfig::new(MODEL, layout)
        },
        Arc::new(backend),
    )
    .await
    .unwrap();
    let settings = ControllerSettings::from_flags([
        "--nats-url",
        &url,
        "--nats-user",
        dev_users::CONTROLLER.0,
        "--nats-password",
        dev_users::CONTROLLER.1,
        "--model-dir",
        model_dir.to_str().unwrap(),
        "--model-id",
        MODEL,
        "--granularity",
        "1",
        "--default-max-tokens",
        "4",
    ])
    .unwrap();
    let mut controller = ControllerTask::spawn(settings, Arc::new(KvQuota(store.clone())));
    let alice_client = connect(&url, &alice.user, &alice.password).await;
    controller
        .wait_serving(&alice_client, "alice", Duration::from_secs(120))
        .await
        .expect("the controller serves alice");

    // A cold request, and tenants created (server reloads) while its functions start.
    let t0 = Instant::now();
    let body = r#"{"input_ids":[1,2,3,4,5],"max_tokens":4,"temperature":0}"#;
    let ask = alice_client.send_request(
        "faasmoe.v1.generate.alice".to_string(),
        async_nats::Request::new()
            .payload(body.into())
            .timeout(Some(Duration::from_secs(90))),
    );
    let reloads = async {
        let mut n = 0;
        while t0.elapsed() < Duration::from_secs(3) {
            admin
                .create(&format!("t{n}"), Quota::default())
                .await
                .unwrap();
            n += 1;
        }
        n
    };
    let (reply, reloads) = tokio::join!(ask, reloads);
    let took = t0.elapsed();
    let reply = reply.expect("a reply");
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        v.get("error").is_none(),
        "the request failed: {v} ({reloads} reloads)"
    );
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    // Lost replies cost at most a few re-asks (3 s each), not the 60 s activation timeout.
    assert!(
        took < Duration::from_secs(30),
        "the request took {took:?} with {reloads} reloads during its cold start"
    );
    // And no reply was refused: the broker and the workers answer on `faasmoe.v1.reply.>`, an
    // explicit permission that a reload keeps (with `_INBOX` replies this run logged
    // refused replies, each costing a re-ask or an expert-request timeout). Not checked: a
    // worker's answer to the broker's status probe (`_INBOX.broker.…`) still goes by
    // `allow_responses` and can be refused the same way; the probe is retried.
    let log = std::fs::read_to_string(server.log_file()).unwrap_or_default();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("Publish Violation")
                && (l.contains("\"_INBOX.controller.") || l.contains("\"faasmoe.v1.reply."))
        })
        .collect();
    assert!(
        refused.is_empty(),
        "{} replies refused during {reloads} reloads, e.g. {}",
        refused.len(),
        refused[0]
    );
    eprintln!("completed in {took:?} with {reloads} reloads during the cold start");
    controller.stop().await;
}
