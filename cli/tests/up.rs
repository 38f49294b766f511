//! `faasmoe up` as a new user meets it: the stack starts on the tiny fixture, the lines it
//! prints (`export OPENAI_BASE_URL=…`, `export OPENAI_API_KEY=…`, the `curl` line) are run
//! as printed by `sh` and answer, and the three Prometheus endpoints it prints (gateway,
//! controller, broker with the workers' counters) parse with `prometheus_client`'s parser
//! and move by exactly what a known number of requests reports (`up_metrics.py`).
//!
//! Needs nats-server, curl, python3 with `prometheus-client` (`scripts/install-test-deps`)
//! and the sibling binaries (`cargo build --workspace --bins`). Without the fixture or
//! nats-server the test prints a loud SKIPPED and passes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use faasmoe_e2e::{die_with_spawning_thread, free_port, workspace_root};

/// Stops `faasmoe up` as a user does (Ctrl-C), then kills it if it lingers.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn up_prints_a_curl_line_that_answers_and_metrics_that_count() {
    let Some(tiny) = faasmoe_model::fixtures::fixture("qwen15-moe-tiny") else {
        eprintln!("!!! SKIPPED up test: fixture qwen15-moe-tiny not found");
        return;
    };
    if let Err(e) = faasmoe_broker::server::nats_server_bin() {
        eprintln!("!!! SKIPPED up test: no nats-server ({e}); run scripts/install-nats-server");
        return;
    }
    let root = workspace_root();
    let py_path = root.join(".tools/py");
    let has_deps = || {
        Command::new("python3")
            .args(["-c", "import prometheus_client"])
            .env("PYTHONPATH", &py_path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !has_deps() {
        let st = Command::new(root.join("scripts/install-test-deps"))
            .status()
            .expect("run scripts/install-test-deps");
        assert!(
            st.success() && has_deps(),
            "prometheus-client could not be installed"
        );
    }
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_faasmoe"));
    for sib in ["faasmoe-broker", "faasmoe-expert-worker", "faasmoe-gateway"] {
        assert!(
            exe.with_file_name(sib).exists(),
            "{sib} is missing next to {}: cargo build --workspace --bins",
            exe.display()
        );
    }

    let logs = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(&exe);
    cmd.arg("up")
        .arg("--model")
        .arg(&tiny)
        .args(["--granularity", "4", "--idle-timeout-ms", "60000"])
        .args(["--port", &free_port().to_string()])
        .args(["--http-port", &free_port().to_string()])
        .args(["--controller-metrics-port", &free_port().to_string()])
        .args(["--broker-metrics-port", &free_port().to_string()])
        .arg("--log-dir")
        .arg(logs.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_spawning_thread(&mut cmd);
    let mut up = Up(cmd.spawn().expect("spawn faasmoe up"));
    let stdout = up.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("up | {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !printed
        .iter()
        .any(|l: &String| l.starts_with("Prometheus metrics:"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => printed.push(l),
            Err(e) => panic!(
                "faasmoe up did not print its metrics line ({e}); printed:\n{}",
                printed.join("\n")
            ),
        }
    }
    let line = |prefix: &str| -> String {
        printed
            .iter()
            .map(|l| l.trim())
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", printed.join("\n")))
            .to_string()
    };
    let export_url = line("export OPENAI_BASE_URL=");
    let export_key = line("export OPENAI_API_KEY=");
    let curl = line("curl ");

    // The printed lines, as a user pastes them.
    let script = format!("{export_url}\n{export_key}\n{curl} -sS --fail-with-body\n");
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("run sh");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the printed curl failed ({}): {body}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("curl's answer is not JSON ({e}): {body}"));
    assert_eq!(reply["object"], "chat.completion", "{reply}");
    let text = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty(), "an empty answer: {reply}");
    assert_eq!(reply["usage"]["completion_tokens"], 16, "{reply}");

    // The metrics endpoints it printed, scraped around three more requests.
    let metrics = line("Prometheus metrics:");
    let urls: Vec<&str> = metrics
        .split_whitespace()
        .filter(|w| w.starts_with("http://"))
        .collect();
    assert_eq!(urls.len(), 3, "three metrics URLs in {metrics:?}");
    let base = export_url.trim_start_matches("export OPENAI_BASE_URL=");
    let cfg = serde_json::json!({
        "base_url": base,
        "key": export_key.trim_start_matches("export OPENAI_API_KEY="),
        "model": tiny.file_name().unwrap().to_string_lossy(),
        "gateway": urls[0],
        "controller": urls[1],
        "broker": urls[2],
    });
    let out = Command::new("python3")
        .arg(root.join("cli/tests/up_metrics.py"))
        .arg(cfg.to_string())
        .env("PYTHONPATH", &py_path)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "metrics check failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    drop(up);
}
