//! Proves the end-to-end harness against a real nats-server.

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use async_nats::jetstream::{self, kv};
use faasmoe_e2e::{
    cargo_bin, dev_users, echo_responder, echo_responder_fenced_by, nats_server_bin,
    workspace_root, NatsServer,
};
use futures::StreamExt;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

/// Linux (CI): a killed and reaped process has no /proc entry.
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn finds_nats_server_binary() {
    let bin = nats_server_bin();
    assert!(bin.is_file(), "{}", bin.display());
    assert!(workspace_root().join("Cargo.toml").is_file());
}

#[test]
#[should_panic(expected = "cargo build --workspace --bins")]
fn cargo_bin_panics_with_build_hint_when_missing() {
    cargo_bin("no-such-faasmoe-binary");
}

#[tokio::test]
async fn plain_server_request_reply_kv_and_cleanup() -> Result<()> {
    let server = NatsServer::start();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    assert!(server.monitor_url().starts_with("http://127.0.0.1:"));
    let pid = server.pid();
    let port = server.port();
    let temp = server.temp_dir().to_path_buf();
    assert!(process_exists(pid));

    let client = timeout(T, server.connect()).await?.context("connect")?;

    // Request/reply round trip.
    echo_responder(&client, "faasmoe.v1.test.echo", "echo:").await?;
    let reply = timeout(T, client.request("faasmoe.v1.test.echo", "hello".into()))
        .await?
        .context("request")?;
    assert_eq!(&reply.payload[..], b"echo:hello");

    // JetStream KV put/get.
    let js = jetstream::new(client.clone());
    let store = timeout(
        T,
        js.create_key_value(kv::Config {
            bucket: "harness".into(),
            history: 1,
            ..Default::default()
        }),
    )
    .await?
    .context("create kv bucket")?;
    timeout(T, store.put("tenant.demo", "42".into()))
        .await?
        .context("kv put")?;
    let got = timeout(T, store.get("tenant.demo"))
        .await?
        .context("kv get")?;
    assert_eq!(got.as_deref(), Some(&b"42"[..]));
    assert!(
        server.store_dir().read_dir()?.next().is_some(),
        "JetStream wrote nothing to the store dir"
    );

    // Monitoring port is up.
    TcpStream::connect(("127.0.0.1", server.monitor_port())).context("monitor port")?;

    drop(client);
    drop(server);
    assert!(
        !process_exists(pid),
        "nats-server pid {pid} still exists after drop"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts"
    );
    assert!(!temp.exists(), "temp dir {} not removed", temp.display());
    Ok(())
}

#[tokio::test]
async fn two_servers_get_distinct_ports() {
    let a = NatsServer::start();
    let b = NatsServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.monitor_port(), b.monitor_port());
    assert_ne!(a.pid(), b.pid());
}

#[tokio::test]
async fn project_config_users_and_permissions() -> Result<()> {
    let server = NatsServer::start_project_config();

    // Auth is on: no anonymous connections.
    ensure!(
        timeout(T, server.connect()).await?.is_err(),
        "anonymous connection accepted by nats.conf"
    );

    let controller = timeout(T, server.connect_as(dev_users::CONTROLLER)).await??;
    assert_eq!(controller.server_info().max_payload, 8 * 1024 * 1024);

    // Each internal user can do its part: a worker answers expert requests in its
    // function's queue group, the controller sends them; the broker administers JetStream,
    // the controller reads the quota bucket.
    let worker = timeout(T, server.connect_as(dev_users::WORKER)).await??;
    let mut expert = worker
        .queue_subscribe("faasmoe.v1.expert.m.0.1", "faasmoe.v1.fn.m.l0-e0-3".into())
        .await?;
    let w = worker.clone();
    tokio::spawn(async move {
        while let Some(m) = expert.next().await {
            if let Some(reply) = m.reply {
                let _ = w
                    .publish(reply, [&b"expert:"[..], &m.payload].concat().into())
                    .await;
            }
        }
    });
    worker.flush().await?;
    let r = timeout(T, async {
        loop {
            match controller
                .request("faasmoe.v1.expert.m.0.1", "x".into())
                .await
            {
                Ok(r) => return r,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await?;
    assert_eq!(&r.payload[..], b"expert:x");

    let broker = timeout(T, server.connect_as(dev_users::BROKER)).await??;
    let js = jetstream::new(broker.clone());
    let store = timeout(
        T,
        js.create_key_value(kv::Config {
            bucket: "faasmoe_tenants".into(),
            ..Default::default()
        }),
    )
    .await??;
    timeout(T, store.put("demo", "1000".into())).await??;
    let js_c = jetstream::new(controller.clone());
    let store_c = timeout(T, js_c.get_key_value("faasmoe_tenants")).await??;
    assert_eq!(
        timeout(T, store_c.get("demo")).await??.as_deref(),
        Some(&b"1000"[..])
    );

    // The tenant may request its generate subject and get the reply in its own inbox
    // (`_INBOX.tenant-demo.>`; the controller may publish into inboxes).
    let (perm_tx, mut perm_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (user, pass) = dev_users::TENANT_DEMO;
    let tenant = timeout(
        T,
        async_nats::ConnectOptions::with_user_and_password(user.into(), pass.into())
            .custom_inbox_prefix(format!("_INBOX.{user}"))
            .event_callback(move |event| {
                let perm_tx = perm_tx.clone();
                async move {
                    let _ = perm_tx.send(event.to_string());
                }
            })
            .connect(server.url()),
    )
    .await??;
    echo_responder_fenced_by(&controller, &tenant, "faasmoe.v1.generate.demo", "gen:").await?;
    let r = timeout(
        T,
        tenant.request("faasmoe.v1.generate.demo", "prompt".into()),
    )
    .await??;
    assert_eq!(&r.payload[..], b"gen:prompt");

    // ...but nothing else: publishing to an expert subject is a permissions violation.
    tenant
        .publish("faasmoe.v1.expert.m.0.1", "sneaky".into())
        .await?;
    tenant.flush().await?;
    let violation = timeout(T, async {
        while let Some(ev) = perm_rx.recv().await {
            if ev.to_lowercase().contains("permissions violation") {
                return Some(ev);
            }
        }
        None
    })
    .await
    .context("no permissions violation reported for tenant publish to an expert subject")?;
    assert!(violation.is_some());
    Ok(())
}

#[test]
#[should_panic(expected = "failed to start")]
fn startup_failure_panics_with_log_tail() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bad.conf");
    std::fs::write(
        &conf,
        "jetstream { store_dir: $FAASMOE_NO_SUCH_VARIABLE }\n",
    )
    .unwrap();
    NatsServer::start_with_config(&conf, &[]);
}
