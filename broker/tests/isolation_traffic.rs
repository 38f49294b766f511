//! Isolation under real traffic: the project's `nats.conf` on an embedded nats-server, a real
//! controller (quota in JetStream KV), the broker's activator spawning real expert workers,
//! two tenants created through the broker. Every credential (each tenant, `tenant-demo`, and
//! every internal role) tries to listen everywhere it must not; then both tenants generate.
//! No message of another tenant, and none of the internal traffic, reaches any of them; every
//! publish a role must not make is refused by the server. A second test checks that no
//! plaintext secret is written to the runtime directory, and that development passwords are
//! refused beyond loopback.
//!
//! Build the worker first: `cargo build -p faasmoe-expert-worker`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use faasmoe_broker::server::free_port;
use faasmoe_broker::{
    ActivationConfig, Activator, Deployment, EmbeddedServer, InternalCredentials,
    LocalProcessBackend, Quota, ServerOptions, TenantStore,
};
use faasmoe_controller::service::{ControllerSettings, ControllerTask};
use faasmoe_e2e::{cargo_bin, dev_users};
use faasmoe_proto::connection::NatsArgs;
use futures::StreamExt;
use tokio::sync::mpsc;

mod common;
use common::KvQuota;

const MODEL: &str = "tiny";

/// A connection as `user` whose client events (the server's permission violations among
/// them) go to the returned channel. Inboxes under `_INBOX.<user>`, as every client must.
async fn connect(
    url: &str,
    user: &str,
    password: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(format!("_INBOX.{user}"))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event.to_string());
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
    (client, rx)
}

/// Collects events until one says the server refused `kind` ("publish" / "subscription")
/// to `subject`, or 5 s pass.
async fn refused(events: &mut mpsc::UnboundedReceiver<String>, kind: &str, subject: &str) -> bool {
    let wanted = format!("\"{}\"", subject.to_lowercase());
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(ev) = events.recv().await {
            let l = ev.to_lowercase();
            if l.contains("permissions violation") && l.contains(kind) && l.contains(&wanted) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

/// Everything nobody may listen to, plus every other user's inbox.
fn forbidden_subscriptions(user: &str, users: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        ">",
        "_INBOX.>",
        "$SRV.>",
        "faasmoe.>",
        "faasmoe.v1.>",
        "$JS.>",
        "$KV.>",
        "_INBOX.*.>",
        "*.>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(
        users
            .iter()
            .filter(|u| **u != user)
            .map(|u| format!("_INBOX.{u}.>")),
    );
    v
}

/// What each role must not publish to.
fn forbidden_publishes(user: &str) -> Vec<&'static str> {
    match user {
        "controller" => vec![
            "faasmoe.v1.generate.alice",
            "faasmoe.v1.events.tiny",
            "faasmoe.v1.admin.tenant_create",
            "$JS.API.STREAM.DELETE.KV_faasmoe_tenants",
            "$KV.faasmoe_deployments.tiny",
            "$SRV.PING",
        ],
        "worker" => vec![
            "faasmoe.v1.generate.alice",
            "faasmoe.v1.expert.tiny.1.0",
            "faasmoe.v1.activate.tiny",
            "faasmoe.v1.admin.controller_stats",
            "$JS.API.INFO",
            "$KV.faasmoe_tenants.alice",
            "$KV.faasmoe_deployments.tiny",
            "_INBOX.tenant-alice.x",
            "_INBOX.controller.x",
        ],
        "broker" => vec![
            "faasmoe.v1.generate.alice",
            "faasmoe.v1.expert.tiny.1.0",
            "faasmoe.v1.activate.tiny",
            "_INBOX.tenant-alice.x",
            "_INBOX.controller.x",
        ],
        // tenants
        _ => vec![
            "faasmoe.v1.generate.bob",
            "faasmoe.v1.expert.tiny.1.0",
            "faasmoe.v1.activate.tiny",
            "faasmoe.v1.admin.controller_stats",
            "faasmoe.v1.events.tiny",
            "$JS.API.INFO",
            "$KV.faasmoe_tenants.alice",
            "$KV.faasmoe_deployments.tiny",
            "$SRV.PING",
            "_INBOX.tenant-alice.x",
            "_INBOX.controller.x",
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_receives_another_tenants_replies_or_internal_traffic() {
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

    // The platform: tenants (quota records + users), the activator, a controller.
    let (broker, _) = connect(&url, dev_users::BROKER.0, dev_users::BROKER.1).await;
    let store = TenantStore::open_default(broker.clone()).await.unwrap();
    let admin = server.tenant_admin(store.clone());
    let alice = admin.create("alice", Quota::default()).await.unwrap();
    let eve = admin.create("eve", Quota::default()).await.unwrap();
    let mut d = Deployment::new(&model_dir);
    d.model_id = Some(MODEL.into());
    d.granularity = 4;
    let layout = d.layout().unwrap();
    let backend = LocalProcessBackend {
        worker_bin: cargo_bin("faasmoe-expert-worker"),
        nats: NatsArgs::with_user(&url, dev_users::WORKER.0, dev_users::WORKER.1),
        model_dir: model_dir.clone(),
        model_id: MODEL.into(),
        idle_timeout_ms: 30_000,
        log_dir: Some(dir.path().join("logs")),
        env: vec![],
    };
    let activator = Activator::start(
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
        "4",
        "--default-max-tokens",
        "6",
    ])
    .unwrap();
    let mut controller = ControllerTask::spawn(settings, Arc::new(KvQuota(store.clone())));

    // Spies: every credential, listening wherever it must not.
    let creds: Vec<(String, String)> = vec![
        (alice.user.clone(), alice.password.clone()),
        (eve.user.clone(), eve.password.clone()),
        (
            dev_users::TENANT_DEMO.0.into(),
            dev_users::TENANT_DEMO.1.into(),
        ),
        (
            dev_users::CONTROLLER.0.into(),
            dev_users::CONTROLLER.1.into(),
        ),
        (dev_users::WORKER.0.into(), dev_users::WORKER.1.into()),
        (dev_users::BROKER.0.into(), dev_users::BROKER.1.into()),
    ];
    let users: Vec<&str> = creds.iter().map(|(u, _)| u.as_str()).collect();
    let mut spies = Vec::new();
    let mut not_refused = Vec::new();
    for (user, pass) in &creds {
        let (client, mut events) = connect(&url, user, pass).await;
        let mut subs = Vec::new();
        for subject in forbidden_subscriptions(user, &users) {
            subs.push((
                subject.clone(),
                client.subscribe(subject.clone()).await.unwrap(),
            ));
            client.flush().await.unwrap();
            if !refused(&mut events, "subscription", &subject).await {
                not_refused.push(format!("{user} subscribe {subject}"));
            }
        }
        spies.push((user.clone(), client, subs));
    }
    assert!(
        not_refused.is_empty(),
        "subscriptions the server accepted: {not_refused:?}"
    );
    // A positive control: eve listening on her own inbox does see her own replies.
    let (eve_spy, _) = connect(&url, &eve.user, &eve.password).await;
    let mut eve_own = eve_spy
        .subscribe(format!("{}.>", eve.inbox_prefix()))
        .await
        .unwrap();
    eve_spy.flush().await.unwrap();

    // Traffic: both tenants generate (streamed and not), through real workers and the KV quota.
    let (alice_client, _) = connect(&url, &alice.user, &alice.password).await;
    let (eve_client, _) = connect(&url, &eve.user, &eve.password).await;
    controller
        .wait_serving(&alice_client, "alice", Duration::from_secs(120))
        .await
        .expect("the controller serves alice");
    let ask = |client: async_nats::Client, tenant: &'static str, stream: bool| async move {
        let body =
            format!(r#"{{"input_ids":[1,2,3],"max_tokens":6,"temperature":0,"stream":{stream}}}"#);
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(inbox.clone()).await.unwrap();
        client
            .publish_with_reply(format!("faasmoe.v1.generate.{tenant}"), inbox, body.into())
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(60), sub.next()).await {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            let done = !stream
                || v.get("type").and_then(|t| t.as_str()) == Some("done")
                || v.get("error").is_some();
            got.push(v);
            if done {
                break;
            }
        }
        got
    };
    let (a1, a2, e1) = tokio::join!(
        ask(alice_client.clone(), "alice", false),
        ask(alice_client.clone(), "alice", true),
        ask(eve_client.clone(), "eve", false)
    );
    assert!(
        a1.len() == 1
            && a1[0]["token_ids"]
                .as_array()
                .is_some_and(|ids| ids.len() == 6),
        "alice's reply: {a1:?}"
    );
    assert!(
        a2.len() >= 2 && a2.last().unwrap()["type"] == "done",
        "alice's stream: {a2:?}"
    );
    assert!(
        e1.len() == 1 && e1[0]["token_ids"].is_array(),
        "eve's reply: {e1:?}"
    );
    // Internal traffic happened: workers were activated, the quota was charged.
    assert!(!activator.instances().is_empty(), "no worker was activated");
    assert!(store.usage("alice").await.unwrap().total_tokens > 0);

    // Nothing reached any spy; the control saw eve's own reply.
    let mut leaked = BTreeMap::<String, Vec<String>>::new();
    for (user, client, subs) in &mut spies {
        client.flush().await.unwrap();
        for (subject, sub) in subs.iter_mut() {
            while let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(50), sub.next()).await
            {
                leaked
                    .entry(format!("{user} on {subject}"))
                    .or_default()
                    .push(m.subject.to_string());
            }
        }
    }
    let mut own = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), eve_own.next()).await {
        own += 1;
    }
    println!("isolation: {} credentials × {} forbidden subscriptions each, 3 generate requests: {} messages leaked; the control (eve on her own inbox) saw {own}", creds.len(), forbidden_subscriptions("x", &users).len(), leaked.values().map(Vec::len).sum::<usize>());
    assert!(
        leaked.is_empty(),
        "messages that reached a forbidden subscription: {leaked:?}"
    );
    assert!(
        own >= 1,
        "the positive control saw nothing: the spies prove nothing"
    );

    // Every publish a role must not make is refused by the server.
    let mut not_refused = Vec::new();
    for (user, pass) in &creds {
        let (client, mut events) = connect(&url, user, pass).await;
        for subject in forbidden_publishes(user) {
            client.publish(subject, "sneaky".into()).await.unwrap();
            client.flush().await.unwrap();
            if !refused(&mut events, "publish", subject).await {
                not_refused.push(format!("{user} publish {subject}"));
            }
        }
    }
    assert!(
        not_refused.is_empty(),
        "publishes the server accepted: {not_refused:?}"
    );

    // Any-language clients work with the one documented setting, the inbox prefix: nats-py
    // as alice, streaming.
    let root = faasmoe_e2e::workspace_root();
    let py_path = root.join(".tools/py");
    let has_nats = |p: &Path| {
        std::process::Command::new("python3")
            .args(["-c", "import nats"])
            .env("PYTHONPATH", p)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !has_nats(&py_path) {
        let st = std::process::Command::new(root.join("scripts/install-test-deps"))
            .status()
            .expect("run scripts/install-test-deps");
        assert!(
            st.success() && has_nats(&py_path),
            "nats-py could not be installed into {}",
            py_path.display()
        );
    }
    let (u, user, pw) = (url.clone(), alice.user.clone(), alice.password.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(root.join("controller/tests/python_client.py"))
            .args([u.as_str(), "alice", user.as_str(), pw.as_str(), "1,2,3"])
            .env("PYTHONPATH", py_path)
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client as alice failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // A request into another tenant's inbox (eve naming alice's inbox as her reply subject)
    // is dropped by the controller: nothing arrives in alice's inbox.
    let mut alice_inbox = alice_client
        .subscribe(format!("{}.planted", alice.inbox_prefix()))
        .await
        .unwrap();
    alice_client.flush().await.unwrap();
    eve_client
        .publish_with_reply(
            "faasmoe.v1.generate.eve",
            format!("{}.planted", alice.inbox_prefix()),
            r#"{"input_ids":[1],"max_tokens":1}"#.into(),
        )
        .await
        .unwrap();
    eve_client.flush().await.unwrap();
    let planted = tokio::time::timeout(Duration::from_secs(2), alice_inbox.next()).await;
    assert!(
        planted.is_err(),
        "a reply to eve's request reached alice's inbox: {planted:?}"
    );
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_secret_in_the_runtime_directory_and_no_development_passwords_beyond_loopback()
{
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    let internal = InternalCredentials::generate();
    let server = EmbeddedServer::start(ServerOptions {
        port: Some(free_port().unwrap()),
        monitor_port: Some(free_port().unwrap()),
        runtime_dir: Some(runtime.clone()),
        log_file: Some(runtime.join("nats-server.log")),
        store_dir: Some(dir.path().join("js")),
        internal_credentials: Some(internal.clone()),
        ..Default::default()
    })
    .unwrap();
    let url = server.url().to_string();
    // The generated internal passwords work, the published development ones no longer do.
    let (broker, _) = connect(&url, "broker", &internal.broker).await;
    for (user, pw) in [
        dev_users::CONTROLLER,
        dev_users::WORKER,
        dev_users::BROKER,
        dev_users::TENANT_DEMO,
    ] {
        let r = async_nats::ConnectOptions::with_user_and_password(user.into(), pw.into())
            .max_reconnects(Some(1))
            .connect(&url)
            .await;
        assert!(r.is_err(), "the development password of {user} is accepted by a deployment with generated credentials");
    }
    let admin = server.tenant_admin(TenantStore::open_default(broker).await.unwrap());
    let alice = admin.create("alice", Quota::default()).await.unwrap();
    let bob = admin.create("bob", Quota::default()).await.unwrap();
    admin.delete("bob").await.unwrap();
    let carol = admin.create("carol", Quota::default()).await.unwrap();
    connect(&url, &alice.user, &alice.password).await;
    connect(&url, &carol.user, &carol.password).await;

    let secrets = [
        &internal.controller,
        &internal.worker,
        &internal.broker,
        &alice.password,
        &bob.password,
        &carol.password,
    ];
    let mut files = 0;
    let mut found = Vec::new();
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        files += 1;
        for s in secrets {
            if bytes.windows(s.len()).any(|w| w == s.as_bytes()) {
                found.push(entry.display().to_string());
            }
        }
    }
    let rendered = std::fs::read_to_string(runtime.join("nats.conf")).unwrap();
    assert!(
        rendered.contains("$2a$06$") && rendered.contains("tenant-alice"),
        "{rendered}"
    );
    println!("secrets: {} secrets searched in {files} files under the runtime and store directories: {} found", secrets.len(), found.len());
    assert!(found.is_empty(), "plaintext secrets in {found:?}");
    drop(server);

    // The published development passwords never listen beyond loopback.
    let e = EmbeddedServer::start(ServerOptions {
        addr: "0.0.0.0".into(),
        port: Some(free_port().unwrap()),
        ..Default::default()
    })
    .expect_err("refused");
    assert!(
        matches!(&e, faasmoe_broker::server::ServerError::DevelopmentPasswords { users, .. } if users.contains(&"broker")),
        "{e}"
    );
    assert!(
        faasmoe_broker::server::is_loopback("127.0.0.1")
            && faasmoe_broker::server::is_loopback("::1")
            && !faasmoe_broker::server::is_loopback("0.0.0.0")
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}
