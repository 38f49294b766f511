//! The deployment registry as a user meets it: `faasmoe-broker run` and `faasmoe controller`
//! started by hand with their defaults against one nats-server agree on the layout (the
//! controller reads the broker's record from JetStream KV) and give transformers' greedy
//! ids, as a `--local-experts` controller does; a controller told another granularity exits at once
//! with an error naming both values, and one started before any broker registered the model
//! exits after `--activation-timeout-ms` saying so.
//!
//! Needs nats-server and the sibling binaries (`cargo build --workspace --bins`). Without
//! the fixture or nats-server the test prints a loud SKIPPED and passes.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use faasmoe_e2e::{cargo_bin, die_with_spawning_thread, NatsServer};

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn controller(url: &str, model: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(cargo_bin("faasmoe"));
    cmd.args(["controller", "--no-quota", "--nats-url", url])
        .arg("--model-dir")
        .arg(model)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    die_with_spawning_thread(&mut cmd);
    cmd
}

/// Runs `cmd` to its end (at most `limit`) and returns (success, stderr).
fn run_to_end(mut cmd: Command, limit: Duration) -> (bool, String) {
    let mut child = Proc(cmd.stderr(Stdio::piped()).spawn().expect("spawn"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < limit, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.success(), err)
}

/// `prompt.{i}.{what}` of the fixture's golden file (transformers' ids).
fn golden_ids(model: &Path, name: &str) -> Vec<u32> {
    let golden =
        candle_core::safetensors::load(model.join("golden.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    golden[name]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// Greedy ids (24) for `input_ids` from whichever controller serves `tenant`.
async fn generate(client: &async_nats::Client, tenant: &str, input_ids: &[u32]) -> Vec<u32> {
    let body = serde_json::json!({"input_ids": input_ids, "max_tokens": 24, "temperature": 0});
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reply = client
            .send_request(
                format!("faasmoe.v1.generate.{tenant}"),
                async_nats::Request::new()
                    .payload(serde_json::to_vec(&body).unwrap().into())
                    .timeout(Some(Duration::from_secs(60))),
            )
            .await;
        match reply {
            Ok(m) => {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                let ids = v["token_ids"].as_array().unwrap_or_else(|| panic!("{v}"));
                return ids.iter().map(|x| x.as_u64().unwrap() as u32).collect();
            }
            // No controller subscribed yet (still loading).
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the controller of {tenant}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no answer for {tenant}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_controller_with_their_defaults_agree_or_the_controller_names_the_mismatch() {
    let Some(tiny) = faasmoe_model::fixtures::fixture("qwen15-moe-tiny") else {
        eprintln!("!!! SKIPPED deployment test: fixture qwen15-moe-tiny not found");
        return;
    };
    if let Err(e) = faasmoe_broker::server::nats_server_bin() {
        eprintln!(
            "!!! SKIPPED deployment test: no nats-server ({e}); run scripts/install-nats-server"
        );
        return;
    }
    let server = NatsServer::start();
    let url = server.url();

    // No broker yet: a controller without --granularity has nothing to go by.
    let (ok, err) = run_to_end(
        controller(&url, &tiny, &["--activation-timeout-ms", "1500"]),
        Duration::from_secs(60),
    );
    assert!(!ok, "a controller without a registered deployment served");
    assert!(
        err.contains("no broker registered model") && err.contains("--granularity"),
        "{err}"
    );

    // The broker with its defaults (granularity 1) registers the deployment.
    let mut cmd = Command::new(cargo_bin("faasmoe-broker"));
    cmd.args(["run", "--nats-url", &url])
        .arg("--model-dir")
        .arg(&tiny)
        .args(["--idle-timeout-ms", "60000"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_spawning_thread(&mut cmd);
    let mut broker = Proc(cmd.spawn().expect("spawn faasmoe-broker"));
    let mut out = BufReader::new(broker.0.stdout.take().unwrap()).lines();
    let ready = out
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("READY"));
    assert!(ready.is_some(), "the broker exited before READY");
    // Keep its stdout drained.
    std::thread::spawn(move || out.for_each(drop));

    // A controller told another granularity refuses to start, naming both values.
    let (ok, err) = run_to_end(
        controller(&url, &tiny, &["--granularity", "2"]),
        Duration::from_secs(60),
    );
    assert!(!ok, "a controller with a mismatching granularity served");
    assert!(
        err.contains("granularity = 1") && err.contains("this controller has 2"),
        "{err}"
    );

    // With its defaults it learns granularity 1, and its greedy ids are transformers' (as are
    // those of in-process experts).
    let mut remote = controller(&url, &tiny, &["--tenants", "remote"]);
    let _remote = Proc(remote.stderr(Stdio::inherit()).spawn().unwrap());
    let mut local = controller(&url, &tiny, &["--tenants", "local", "--local-experts"]);
    let _local = Proc(local.stderr(Stdio::inherit()).spawn().unwrap());
    let client = server.connect().await.unwrap();
    let prompt = golden_ids(&tiny, "prompt.0.input_ids");
    let greedy = golden_ids(&tiny, "prompt.0.greedy_ids");
    assert_eq!(generate(&client, "remote", &prompt).await, greedy);
    assert_eq!(generate(&client, "local", &prompt).await, greedy);
    drop(broker);
}
