//! The gateway end to end with the official `openai` Python package: a real nats-server with
//! the project's `nats.conf`, tenants with API keys in the JetStream store, two in-process
//! controllers (one with its experts in-process serving `alice` and `poor`, one with NATS
//! dispatch and no broker serving `nofn`, so no expert function can be activated), the
//! `faasmoe-gateway` binary connected as user `gateway`, and `openai_client.py`.
//!
//! Needs `scripts/install-test-deps` (nats-server, `openai`, `prometheus-client`) and
//! `cargo build -p faasmoe-gateway`. Fixtures: `$FAASMOE_FIXTURES`, else `../shared/fixtures`;
//! when absent the test prints a loud SKIPPED and passes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use faasmoe_broker::{Admission, Quota, TenantStore};
use faasmoe_controller::quota::{QuotaGate, QuotaTicket};
use faasmoe_controller::service::{ControllerSettings, ControllerTask};
use faasmoe_e2e::{cargo_bin, dev_users, workspace_root, NatsServer};
use faasmoe_proto::generate::{ClientError, ClientErrorCode};
use futures::future::BoxFuture;

/// The controller's quota gate over the JetStream store (what the CLI crate wires).
struct KvQuota(TenantStore);

impl QuotaGate for KvQuota {
    fn admit<'a>(
        &'a self,
        tenant: &'a str,
        prompt_tokens: u32,
        max_tokens: u32,
    ) -> BoxFuture<'a, Result<QuotaTicket, ClientError>> {
        Box::pin(async move {
            match self
                .0
                .admit(tenant, prompt_tokens.into(), max_tokens.into())
                .await
            {
                Ok(a) => Ok(QuotaTicket(Box::new(a))),
                Err(e) => Err(ClientError {
                    code: if matches!(e, faasmoe_broker::QuotaError::Store(_)) {
                        ClientErrorCode::Unavailable
                    } else {
                        ClientErrorCode::QuotaExceeded
                    },
                    message: e.to_string(),
                }),
            }
        })
    }
    fn settle(&self, ticket: QuotaTicket, tokens: u32) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Ok(a) = ticket.0.downcast::<Admission>() {
                let _ = self.0.settle(*a, tokens.into()).await;
            }
        })
    }
}

fn golden_ids(dir: &std::path::Path, key: &str) -> Vec<u32> {
    let g =
        candle_core::safetensors::load(dir.join("golden.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    g[key]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

async fn controller(
    server: &NatsServer,
    model_dir: &std::path::Path,
    extra: &[&str],
    probe_tenant: &str,
) -> ControllerTask {
    let url = server.url();
    let dir = model_dir.to_string_lossy().into_owned();
    let mut args = vec![
        "--nats-url",
        &url,
        "--nats-user",
        dev_users::CONTROLLER.0,
        "--nats-password",
        dev_users::CONTROLLER.1,
        "--model-dir",
        &dir,
        "--model-id",
        "tiny",
        "--granularity",
        "4",
    ];
    args.extend_from_slice(extra);
    let settings = ControllerSettings::from_flags(args).unwrap();
    let store = TenantStore::open_default(server.connect_as(dev_users::CONTROLLER).await.unwrap())
        .await
        .unwrap();
    let mut c = ControllerTask::spawn(settings, Arc::new(KvQuota(store)));
    let probe = server.connect_as(dev_users::GATEWAY).await.unwrap();
    c.wait_serving(&probe, probe_tenant, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    c
}

/// A copy of `model_dir` (weights and tokenizer linked, not copied) whose
/// `tokenizer_config.json` carries `template` as its `chat_template`.
fn with_chat_template(model_dir: &std::path::Path, template: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(model_dir).unwrap() {
        let f = f.unwrap();
        let name = f.file_name();
        if name != "tokenizer_config.json" {
            std::os::unix::fs::symlink(f.path(), dir.path().join(&name)).unwrap();
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg["chat_template"] = serde_json::Value::String(template.into());
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    dir
}

/// The gateway process, killed on drop.
struct GatewayProcess(std::process::Child);

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_chats_completes_lists_models_and_sees_typed_errors() {
    let Some(model_dir) = faasmoe_model::fixtures::fixture("qwen15-moe-tiny") else {
        eprintln!("!!! SKIPPED: fixture qwen15-moe-tiny not found");
        return;
    };
    let root = workspace_root();
    let py_path = root.join(".tools/py");
    let has_deps = || {
        Command::new("python3")
            .args(["-c", "import openai, prometheus_client"])
            .env("PYTHONPATH", &py_path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !has_deps() {
        let st = Command::new(root.join("scripts/install-test-deps"))
            .status()
            .expect("run scripts/install-test-deps");
        assert!(st.success() && has_deps(), "openai could not be installed");
    }

    let server = NatsServer::start_project_config();
    let admin = TenantStore::open_default(server.connect_as(dev_users::BROKER).await.unwrap())
        .await
        .unwrap();
    let alice = admin.create("alice", Quota::default()).await.unwrap();
    let poor = admin
        .create(
            "poor",
            Quota {
                total_tokens: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let nofn = admin.create("nofn", Quota::default()).await.unwrap();
    let quit = admin.create("quit", Quota::default()).await.unwrap();
    assert!(alice.api_key.starts_with("fm-alice."));
    let record = admin.get("alice").await.unwrap();
    let hash = record
        .api_key_hash
        .expect("the record holds the key's hash");
    assert!(hash.starts_with("$2") && !hash.contains(&alice.api_key));

    let _a = controller(
        &server,
        &model_dir,
        &["--local-experts", "--tenants", "alice,poor,quit"],
        "alice",
    )
    .await;
    let _b = controller(
        &server,
        &model_dir,
        &["--tenants", "nofn", "--activation-timeout-ms", "1000"],
        "nofn",
    )
    .await;
    // The chat-template goldens: one tenant per template, each served by a controller whose
    // checkpoint carries that template.
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            faasmoe_model::fixtures::fixtures_dir()
                .unwrap()
                .join("chat-template-golden.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // They run with `--allow-custom-roles` so that roles outside OpenAI's set reach the
    // template as in transformers (alice's controller, without it, refuses them).
    let mut template_keys = serde_json::Map::new();
    let mut template_controllers = Vec::new();
    for (name, tenant) in [
        ("fixture_chatml", "tpl-c"),
        ("default_system", "tpl-a"),
        ("strict_roles", "tpl-b"),
    ] {
        let dir = with_chat_template(&model_dir, golden["templates"][name].as_str().unwrap());
        let t = admin.create(tenant, Quota::default()).await.unwrap();
        template_keys.insert(name.into(), t.api_key.into());
        let c = controller(
            &server,
            dir.path(),
            &[
                "--local-experts",
                "--allow-custom-roles",
                "--tenants",
                tenant,
            ],
            tenant,
        )
        .await;
        template_controllers.push((c, dir));
    }

    let mut child = Command::new(cargo_bin("faasmoe-gateway"))
        .args([
            "--nats-url",
            &server.url(),
            "--nats-user",
            dev_users::GATEWAY.0,
        ])
        .env("NATS_PASSWORD", dev_users::GATEWAY.1)
        .args(["--listen", "127.0.0.1:0", "--health-interval-ms", "300"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start faasmoe-gateway (cargo build -p faasmoe-gateway)");
    let stdout = child.stdout.take().unwrap();
    let gateway = GatewayProcess(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("faasmoe-gateway listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    tokio::time::sleep(Duration::from_millis(800)).await; // a health probe round

    let prompt_ids = golden_ids(&model_dir, "prompt.0.input_ids");
    let cfg = serde_json::json!({
        "base_url": format!("{url}/v1"),
        "model": "tiny",
        "key": alice.api_key,
        "poor_key": poor.api_key,
        "nofn_key": nofn.api_key,
        "prompt_ids": prompt_ids.clone(),
        "greedy_ids": golden_ids(&model_dir, "prompt.0.greedy_ids"),
        "template_keys": template_keys,
        "template_cases": golden["cases"],
    });
    let script = root.join("gateway/tests/openai_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(cfg.to_string())
            .env("PYTHONPATH", py_path)
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "openai client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The refused requests charged nothing; the unlimited tenant was charged.
    assert_eq!(admin.usage("poor").await.unwrap().total_tokens, 0);
    assert!(admin.usage("alice").await.unwrap().total_tokens > 0);

    // A client that disconnects mid-stream cancels its sequence: the tenant's request
    // settles long before its 4000 tokens, charged for what was generated.
    let max_tokens = 4000u64;
    let addr = url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = serde_json::json!({"model": "tiny", "prompt": prompt_ids, "max_tokens": max_tokens,
        "temperature": 0, "stream": true})
    .to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        quit.api_key,
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data: ").count() < 3 {
        let n = tokio::time::timeout(Duration::from_secs(60), conn.read(&mut buf))
            .await
            .expect("stream events")
            .unwrap();
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    let cut = std::time::Instant::now();
    drop(conn);
    let usage = loop {
        let u = admin.usage("quit").await.unwrap();
        if u.in_flight == 0 {
            break u;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "the sequence was not cancelled: {u:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        usage.total_tokens > 0 && usage.total_tokens < prompt_ids.len() as u64 + max_tokens,
        "charged {} of at most {}",
        usage.total_tokens,
        prompt_ids.len() as u64 + max_tokens
    );
    println!(
        "disconnect: settled {:?} after the cut, {} tokens charged",
        cut.elapsed(),
        usage.total_tokens
    );
    drop(gateway);
}
