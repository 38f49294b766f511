//! The expert worker as a stateless function on a REAL nats-server, with REAL worker
//! processes (the `faasmoe-expert-worker` binary): bit-exact outputs against the in-process
//! experts, queue-group load sharing, cross-tenant batching, scale to zero and SIGTERM
//! without losing requests, typed errors for bad input, and memory proportional to the
//! experts held.
//!
//! Needs `nats-server` (`scripts/install-nats-server`). Uses the reference fixture
//! `qwen15-moe-tiny` when present, else generates the `tiny` preset into a temp dir.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use faasmoe_e2e::NatsServer;
use faasmoe_model::random_checkpoint::{
    preset, write_checkpoint, write_checkpoint_filled, Fill, DEFAULT_MAX_SHARD_BYTES,
};
use faasmoe_model::{Checkpoint, ExpertId, ExpertSelection, ExpertSet};
use faasmoe_proto::events::{EventKind, FunctionEvent};
use faasmoe_proto::expert::{decode_reply, encode, ExpertRequest, ExpertResult, RowRoutes};
use faasmoe_proto::tensor::{WireDType, WireTensor};
use faasmoe_proto::{subject, ErrorCode, PROTOCOL_VERSION};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

const MODEL: &str = "tiny";
/// Bound on a worker's start (load + subscribe) before its READY line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-request timeout of the test client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Checkpoint and in-process reference
// ---------------------------------------------------------------------------------------

/// The tiny checkpoint (hidden 64, 16 experts, 4 layers): the reference fixture, or the
/// `tiny` preset generated into a temp dir (kept alive by the returned guard).
fn tiny_checkpoint() -> (PathBuf, Option<tempfile::TempDir>) {
    if let Some(dir) = faasmoe_model::fixtures::fixture("qwen15-moe-tiny") {
        return (dir, None);
    }
    eprintln!("fixture qwen15-moe-tiny absent: generating the `tiny` preset instead");
    let tmp = tempfile::tempdir().unwrap();
    let mut g = preset("tiny").unwrap();
    g.vocab_size = 512;
    write_checkpoint(tmp.path(), &g, 11, DEFAULT_MAX_SHARD_BYTES, |_, _| {}).unwrap();
    (tmp.path().to_path_buf(), Some(tmp))
}

/// The experts of `spec` loaded in-process, in F32 (as the worker does).
fn reference_experts(dir: &Path, spec: &str) -> ExpertSet {
    let mut ckpt = Checkpoint::open(dir, DType::F32).unwrap();
    let sel = ExpertSelection::parse(spec, ckpt.config().num_experts).unwrap();
    ExpertSet::load(&mut ckpt, &sel).unwrap()
}

/// Deterministic pseudo-random numbers (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn rows(&mut self, n: usize, h: usize) -> Vec<f32> {
        (0..n * h).map(|_| self.f32()).collect()
    }
    /// Per row: 0..=max distinct experts drawn from `experts`, with positive weights.
    fn routes(&mut self, n: usize, experts: &[u32], max: usize) -> Vec<RowRoutes> {
        (0..n)
            .map(|_| {
                let k = self.below(max + 1);
                let mut pool = experts.to_vec();
                let mut chosen = Vec::new();
                for _ in 0..k.min(pool.len()) {
                    chosen.push(pool.swap_remove(self.below(pool.len())));
                }
                let weights = chosen
                    .iter()
                    .map(|_| (self.f32() + 1.0) / 2.0 + 0.01)
                    .collect();
                RowRoutes {
                    experts: chosen,
                    weights,
                }
            })
            .collect()
    }
}

fn request(
    tenant: &str,
    layer: u32,
    h: usize,
    rows: &[f32],
    routes: Vec<RowRoutes>,
    combine: bool,
) -> ExpertRequest {
    let n = rows.len() / h;
    ExpertRequest {
        version: PROTOCOL_VERSION,
        request_id: Uuid::new_v4(),
        tenant: tenant.into(),
        model: MODEL.into(),
        layer,
        hidden: WireTensor::from_f32(vec![n as u32, h as u32], rows, WireDType::F32).unwrap(),
        routes,
        reply_dtype: WireDType::F32,
        combine,
    }
}

/// What the function must answer, computed in-process with the same experts:
/// `combine`: [`ExpertSet::forward_routed`] over the request's rows and routes;
/// else one [`ExpertSet::forward`] per expert over exactly the rows routed to it,
/// scattered back to (row, expert) pair order.
fn expected(set: &ExpertSet, req: &ExpertRequest) -> Vec<f32> {
    let h = set.hidden_size();
    let data = req.hidden.to_f32_vec().unwrap();
    let n = data.len() / h;
    let xs = Tensor::from_vec(data.clone(), (n, h), &Device::Cpu).unwrap();
    let layer = req.layer as usize;
    if req.combine {
        let routes: Vec<Vec<(usize, f32)>> = req
            .routes
            .iter()
            .map(|r| {
                r.experts
                    .iter()
                    .zip(&r.weights)
                    .map(|(&e, &w)| (e as usize, w))
                    .collect()
            })
            .collect();
        let ys = set.forward_routed(layer, &xs, &routes).unwrap();
        return ys.flatten_all().unwrap().to_vec1().unwrap();
    }
    // Pairs in order of appearance; grouped per expert (ascending row order within each).
    let pairs: Vec<(usize, u32)> = req
        .routes
        .iter()
        .enumerate()
        .flat_map(|(row, r)| r.experts.iter().map(move |&e| (row, e)))
        .collect();
    let mut out = vec![f32::NAN; pairs.len() * h];
    let mut by_expert: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (p, &(_, e)) in pairs.iter().enumerate() {
        by_expert.entry(e).or_default().push(p);
    }
    for (e, ps) in by_expert {
        let mut x = Vec::with_capacity(ps.len() * h);
        for &p in &ps {
            let row = pairs[p].0;
            x.extend_from_slice(&data[row * h..(row + 1) * h]);
        }
        let x = Tensor::from_vec(x, (ps.len(), h), &Device::Cpu).unwrap();
        let y: Vec<f32> = set
            .forward(
                ExpertId {
                    layer,
                    expert: e as usize,
                },
                &x,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, &p) in ps.iter().enumerate() {
            out[p * h..(p + 1) * h].copy_from_slice(&y[i * h..(i + 1) * h]);
        }
    }
    out
}

/// The f32 output of an OK reply (panics, naming the error, otherwise).
fn reply_output(payload: &[u8], req: &ExpertRequest, h: usize) -> Vec<f32> {
    let reply = decode_reply(payload).expect("reply decodes");
    assert_eq!(
        reply.request_id, req.request_id,
        "reply echoes the request id"
    );
    match reply.result {
        ExpertResult::Ok { output } => {
            assert_eq!(output.dtype, WireDType::F32);
            assert_eq!(
                output.shape,
                vec![req.output_rows() as u32, h as u32],
                "output shape"
            );
            output.to_f32_vec().unwrap()
        }
        ExpertResult::Err(e) => panic!("expected an output, got error {e}"),
    }
}

fn assert_bits_equal(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let diff = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    if let Some(i) = diff {
        let max = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        panic!(
            "{what}: element {i} differs: got {} want {} (max abs diff {max:e})",
            got[i], want[i]
        );
    }
}

/// Equal within 1e-5: for requests that may have been batched with others (a different
/// number of rows per matmul may round differently).
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let max = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max <= 1e-5, "{what}: max abs diff {max:e}");
}

/// The error code of an error reply (panics on an OK reply).
fn reply_error_code(payload: &[u8]) -> (ErrorCode, Uuid, String) {
    let reply = decode_reply(payload).expect("error reply decodes");
    assert_eq!(reply.version, PROTOCOL_VERSION);
    match reply.result {
        ExpertResult::Err(e) => (e.code, reply.request_id, e.message),
        ExpertResult::Ok { output } => panic!(
            "expected an error, got an output of shape {:?}",
            output.shape
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------------------

/// A running worker process; killed on drop (its log is printed if the test is failing) and
/// with its test's thread, however the test ends.
struct Worker {
    child: tokio::process::Child,
    pid: u32,
    function_id: String,
    instance_id: String,
    log: tempfile::NamedTempFile,
}

impl Worker {
    /// Spawns the worker with `--nats-url`, `--model-dir`, `--model-id tiny` and `args`,
    /// and waits (bounded) for its `READY <function_id> <instance_id>` line.
    async fn start(nats_url: &str, model_dir: &Path, args: &[&str]) -> Worker {
        let mut w = Worker::spawn(nats_url, model_dir, args);
        w.ready().await;
        w
    }

    /// Spawns the worker without waiting for it.
    fn spawn(nats_url: &str, model_dir: &Path, args: &[&str]) -> Worker {
        let log = tempfile::Builder::new()
            .prefix("faasmoe-worker-")
            .suffix(".log")
            .tempfile()
            .unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_faasmoe-expert-worker"));
        // Killed with its test (the test's thread spawns it), even one killed by a timeout.
        faasmoe_e2e::die_with_spawning_thread(cmd.as_std_mut());
        let child = cmd
            .arg("--nats-url")
            .arg(nats_url)
            .arg("--model-dir")
            .arg(model_dir)
            .args(["--model-id", MODEL])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.reopen().unwrap()))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn faasmoe-expert-worker");
        let pid = child.id().expect("pid");
        Worker {
            child,
            pid,
            function_id: String::new(),
            instance_id: String::new(),
            log,
        }
    }

    /// Waits (bounded) for the READY line; sets the function and instance ids.
    async fn ready(&mut self) {
        let mut lines =
            BufReader::new(self.child.stdout.take().expect("stdout not yet read")).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.strip_prefix("READY ") {
                    return Some(rest.to_string());
                }
            }
            None
        })
        .await;
        let rest = match ready {
            Ok(Some(rest)) => rest,
            Ok(None) => panic!("worker exited before READY; log:\n{}", self.log()),
            Err(_) => panic!(
                "worker not READY within {READY_TIMEOUT:?}; log:\n{}",
                self.log()
            ),
        };
        // Keep draining stdout so the worker never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let mut parts = rest.split_whitespace();
        self.function_id = parts.next().expect("function id").to_string();
        self.instance_id = parts.next().expect("instance id").to_string();
    }

    /// Whether the process has a handler installed for SIGTERM (SigCgt in /proc).
    fn catches_sigterm(&self) -> bool {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// VmRSS from /proc/<pid>/status, bytes.
    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS line");
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    /// Sends SIGTERM (without nix: the `kill` command).
    fn sigterm(&self) {
        let st = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -TERM {}", self.pid);
    }

    /// Waits (bounded) for the process to exit.
    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(st) => st.unwrap(),
            Err(_) => panic!(
                "worker {} did not exit within {within:?}; log:\n{}",
                self.instance_id,
                self.log()
            ),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- log of worker {} {} (pid {}) ---\n{}",
                self.function_id,
                self.instance_id,
                self.pid,
                self.log()
            );
        }
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
    }
}

async fn connect(server: &NatsServer) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .request_timeout(Some(REQUEST_TIMEOUT))
        .connect(server.url())
        .await
        .unwrap()
}

/// Sends one request on `subject` and returns the reply payload.
async fn call(client: &async_nats::Client, subject: String, body: Bytes) -> Bytes {
    client
        .request(subject, body)
        .await
        .expect("a reply")
        .payload
}

fn expert_subject(layer: u32, expert: u32) -> String {
    subject::expert(MODEL, layer, expert).unwrap()
}

/// The subject a request goes to: that of its first routed expert (any of the function's
/// experts would do: they share the queue group).
fn subject_for(req: &ExpertRequest, fallback: u32) -> String {
    let e = req
        .routes
        .iter()
        .flat_map(|r| r.experts.first())
        .next()
        .copied()
        .unwrap_or(fallback);
    expert_subject(req.layer, e)
}

/// `$SRV.STATS.faasmoe-expert`: every instance answers; returns the stats data (our
/// `WorkerStats` JSON) of the instances of `function_id`, by instance id. Collects until
/// `expect` of them answered or 2 s passed.
async fn stats_by_instance(
    client: &async_nats::Client,
    function_id: &str,
    expect: usize,
) -> BTreeMap<String, serde_json::Value> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.STATS.faasmoe-expert", inbox, Bytes::new())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut out = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while out.len() < expect {
        let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) => m,
            _ => break,
        };
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        let data = v["endpoints"]
            .as_array()
            .and_then(|eps| {
                eps.iter()
                    .find_map(|ep| ep.get("data").filter(|d| d.get("instance_id").is_some()))
            })
            .unwrap_or_else(|| panic!("no stats data in {v}"))
            .clone();
        if data["function_id"] == function_id {
            out.insert(data["instance_id"].as_str().unwrap().to_string(), data);
        }
    }
    out
}

fn counter(stats: &serde_json::Value, key: &str) -> u64 {
    stats[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter `{key}` in {stats}"))
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_over_nats_equal_in_process_experts_bit_for_bit() {
    let (dir, _tmp) = tiny_checkpoint();
    let server = NatsServer::start();
    let reference = reference_experts(&dir, "0:0-3;1:4-7");
    let h = reference.hidden_size();
    let idle = ["--idle-timeout-ms", "0"];
    let a1 = Worker::start(
        &server.url(),
        &dir,
        &[&["--experts", "0:0-3"][..], &idle[..]].concat(),
    )
    .await;
    let a2 = Worker::start(
        &server.url(),
        &dir,
        &[&["--experts", "0:0-3"][..], &idle[..]].concat(),
    )
    .await;
    let b = Worker::start(
        &server.url(),
        &dir,
        &[&["--experts", "1:4-7"][..], &idle[..]].concat(),
    )
    .await;
    assert_eq!(a1.function_id, a2.function_id);
    assert_ne!(a1.instance_id, a2.instance_id);
    assert_ne!(a1.function_id, b.function_id);
    let client = connect(&server).await;

    let mut rng = Rng(42);
    let mut checked = BTreeMap::<&str, usize>::new();
    for (layer, experts, fid) in [
        (0u32, [0u32, 1, 2, 3], &a1.function_id),
        (1, [4, 5, 6, 7], &b.function_id),
    ] {
        for (i, n) in [1usize, 2, 5, 17, 64].into_iter().enumerate() {
            for combine in [false, true] {
                let rows = rng.rows(n, h);
                let mut routes = rng.routes(n, &experts, 4);
                if i == 0 && routes[0].experts.is_empty() {
                    routes[0] = RowRoutes {
                        experts: vec![experts[1]],
                        weights: vec![0.5],
                    };
                }
                let req = request("acme", layer, h, &rows, routes, combine);
                let got = reply_output(
                    &call(&client, subject_for(&req, experts[0]), encode(&req)).await,
                    &req,
                    h,
                );
                assert_bits_equal(
                    &got,
                    &expected(&reference, &req),
                    &format!("function {fid}, {n} rows, combine={combine}"),
                );
                *checked
                    .entry(if layer == 0 { "A" } else { "B" })
                    .or_default() += 1;
            }
        }
    }
    // Every expert subject of the function reaches it (not only the first).
    for e in 0..4u32 {
        let rows = rng.rows(3, h);
        let routes = vec![
            RowRoutes {
                experts: vec![e],
                weights: vec![1.0]
            };
            3
        ];
        let req = request("acme", 0, h, &rows, routes, true);
        let got = reply_output(
            &call(&client, expert_subject(0, e), encode(&req)).await,
            &req,
            h,
        );
        assert_bits_equal(
            &got,
            &expected(&reference, &req),
            &format!("expert subject 0.{e}"),
        );
    }
    // bf16 on the wire: bf16 hidden states are widened exactly, a bf16 reply is the f32
    // output rounded to nearest even (what `WireTensor::from_f32` does).
    for (hidden_dtype, reply_dtype) in [
        (WireDType::BF16, WireDType::F32),
        (WireDType::F32, WireDType::BF16),
        (WireDType::BF16, WireDType::BF16),
    ] {
        for combine in [false, true] {
            let rows = rng.rows(6, h);
            let mut req = request(
                "acme",
                0,
                h,
                &rows,
                rng.routes(6, &[0, 1, 2, 3], 4),
                combine,
            );
            req.hidden = WireTensor::from_f32(vec![6, h as u32], &rows, hidden_dtype).unwrap();
            req.reply_dtype = reply_dtype;
            let reply =
                decode_reply(&call(&client, subject_for(&req, 0), encode(&req)).await).unwrap();
            let want = WireTensor::from_f32(
                vec![req.output_rows() as u32, h as u32],
                &expected(&reference, &req),
                reply_dtype,
            )
            .unwrap();
            match reply.result {
                ExpertResult::Ok { output } => assert!(
                    output == want,
                    "{hidden_dtype:?} in, {reply_dtype:?} out, combine={combine}: outputs differ"
                ),
                ExpertResult::Err(e) => panic!("{hidden_dtype:?} in, {reply_dtype:?} out: {e}"),
            }
        }
    }
    // Degenerate requests: no rows at all; rows routed to no expert of this function.
    for (n, combine) in [(0usize, true), (0, false), (3, true), (3, false)] {
        let rows = rng.rows(n, h);
        let routes = vec![
            RowRoutes {
                experts: vec![],
                weights: vec![]
            };
            n
        ];
        let req = request("acme", 0, h, &rows, routes, combine);
        let got = reply_output(
            &call(&client, expert_subject(0, 0), encode(&req)).await,
            &req,
            h,
        );
        assert_bits_equal(
            &got,
            &expected(&reference, &req),
            &format!("{n} rows without experts, combine={combine}"),
        );
        assert!(
            got.iter().all(|&v| v == 0.0),
            "rows without experts give zeros"
        );
    }
    eprintln!("bit-exact replies checked: {checked:?} (+4 per-subject, +6 bf16, +4 degenerate)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_instances_of_a_function_receive_work() {
    let (dir, _tmp) = tiny_checkpoint();
    let server = NatsServer::start();
    let reference = reference_experts(&dir, "0:0-3");
    let h = reference.hidden_size();
    let args = ["--experts", "0:0-3", "--idle-timeout-ms", "0"];
    let a1 = Worker::start(&server.url(), &dir, &args).await;
    let a2 = Worker::start(&server.url(), &dir, &args).await;
    let client = connect(&server).await;

    let mut rng = Rng(7);
    let reqs: Vec<ExpertRequest> = (0..40)
        .map(|i| {
            let rows = rng.rows(4, h);
            let routes = rng.routes(4, &[0, 1, 2, 3], 3);
            request(&format!("tenant{}", i % 3), 0, h, &rows, routes, i % 2 == 0)
        })
        .collect();
    let replies = futures::future::join_all(
        reqs.iter()
            .map(|r| call(&client, subject_for(r, 0), encode(r))),
    )
    .await;
    for (req, payload) in reqs.iter().zip(&replies) {
        let got = reply_output(payload, req, h);
        let want = expected(&reference, req);
        // Concurrent requests may be batched together: equal to the in-process experts
        // within float tolerance (bit-exactness is the first test's business).
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max <= 1e-5,
            "request {}: max abs diff {max:e}",
            req.request_id
        );
    }

    let stats = stats_by_instance(&client, &a1.function_id, 2).await;
    let per_instance: BTreeMap<&str, u64> = stats
        .iter()
        .map(|(id, s)| (id.as_str(), counter(s, "requests")))
        .collect();
    eprintln!(
        "requests per instance of {}: {per_instance:?}",
        a1.function_id
    );
    assert_eq!(
        stats.len(),
        2,
        "both instances answer $SRV.STATS: {per_instance:?}"
    );
    for w in [&a1, &a2] {
        let n = per_instance
            .get(w.instance_id.as_str())
            .copied()
            .unwrap_or(0);
        assert!(
            n > 0,
            "instance {} received no request: {per_instance:?}",
            w.instance_id
        );
    }
    assert_eq!(
        per_instance.values().sum::<u64>(),
        40,
        "each request delivered to exactly one instance"
    );

    // The status endpoint answers too (one instance per request: a queue group).
    let status = client
        .request(
            subject::status(MODEL, &a1.function_id).unwrap(),
            Bytes::new(),
        )
        .await
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&status.payload).unwrap();
    assert_eq!(s["function_id"], a1.function_id.as_str());
    assert!(
        [&a1.instance_id, &a2.instance_id]
            .iter()
            .any(|id| s["instance_id"] == id.as_str()),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_two_tenants_arriving_together_are_batched_into_one_computation() {
    let (dir, _tmp) = tiny_checkpoint();
    let server = NatsServer::start();
    let reference = reference_experts(&dir, "0:0-3");
    let h = reference.hidden_size();
    let w = Worker::start(
        &server.url(),
        &dir,
        &[
            "--experts",
            "0:0-3",
            "--idle-timeout-ms",
            "0",
            "--batch-max-wait-us",
            "50000",
        ],
    )
    .await;
    let client = connect(&server).await;

    let mut rng = Rng(99);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (ra, rb) = (rng.rows(3, h), rng.rows(5, h));
        let qa = request("acme", 0, h, &ra, rng.routes(3, &[0, 1, 2, 3], 4), true);
        let qb = request("globex", 0, h, &rb, rng.routes(5, &[0, 1, 2, 3], 4), false);
        let t0 = Instant::now();
        let (pa, pb) = tokio::join!(
            call(&client, subject_for(&qa, 0), encode(&qa)),
            call(&client, subject_for(&qb, 1), encode(&qb))
        );
        eprintln!("two-tenant round trip: {:?}", t0.elapsed());
        for (req, payload) in [(&qa, &pa), (&qb, &pb)] {
            let got = reply_output(payload, req, h);
            let want = expected(&reference, req);
            let max = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let exact = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            eprintln!(
                "tenant {}: batched output vs in-process: bit-exact={exact}, max abs diff {max:e}",
                req.tenant
            );
            assert!(max <= 1e-5, "tenant {}: max abs diff {max:e}", req.tenant);
        }
        let stats = stats_by_instance(&client, &w.function_id, 1).await;
        let s = &stats[&w.instance_id];
        eprintln!("stats after attempt {attempts}: {s}");
        if counter(s, "cross_tenant_batches") >= 1 {
            assert!(counter(s, "max_batch_requests") >= 2, "{s}");
            assert!(counter(s, "multi_request_batches") >= 1, "{s}");
            assert_eq!(counter(s, "requests"), 2 * attempts, "{s}");
            break;
        }
        assert!(
            attempts < 3,
            "no cross-tenant batch after {attempts} attempts: {s}"
        );
    }
}

/// Subscribes to the model's lifecycle events; returns the subscription.
async fn events(client: &async_nats::Client) -> async_nats::Subscriber {
    let sub = client
        .subscribe(subject::events(MODEL).unwrap())
        .await
        .unwrap();
    client.flush().await.unwrap();
    sub
}

/// Waits (bounded) for the `draining` event of `instance_id` (the worker's last).
async fn wait_draining(sub: &mut async_nats::Subscriber, instance_id: &str) -> FunctionEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no `draining` event of {instance_id}"))
            .unwrap();
        let ev = FunctionEvent::decode(&msg.payload).unwrap();
        if ev.kind == EventKind::Draining && ev.instance_id == instance_id {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_exits_after_timeout_without_losing_requests() {
    let (dir, _tmp) = tiny_checkpoint();
    let server = NatsServer::start();
    let reference = reference_experts(&dir, "0:0-3");
    let h = reference.hidden_size();
    let client = connect(&server).await;
    let mut ev_sub = events(&client).await;
    const IDLE_MS: u64 = 1500;
    let mut w = Worker::start(
        &server.url(),
        &dir,
        &[
            "--experts",
            "0:0-3",
            "--idle-timeout-ms",
            &IDLE_MS.to_string(),
        ],
    )
    .await;

    // A subscribed event was published before READY.
    let ready = FunctionEvent::decode(
        &tokio::time::timeout(Duration::from_secs(2), ev_sub.next())
            .await
            .unwrap()
            .unwrap()
            .payload,
    )
    .unwrap();
    assert_eq!(
        (ready.kind, ready.instance_id.as_str()),
        (EventKind::Subscribed, w.instance_id.as_str())
    );

    // Busy for ~1 s: every request answered correctly, and the worker does not go idle.
    let mut rng = Rng(5);
    let t0 = Instant::now();
    let mut sent = 0;
    while t0.elapsed() < Duration::from_secs(1) {
        let rows = rng.rows(2, h);
        let req = request(
            "acme",
            0,
            h,
            &rows,
            rng.routes(2, &[0, 1, 2, 3], 4),
            sent % 2 == 0,
        );
        let got = reply_output(
            &call(&client, subject_for(&req, 0), encode(&req)).await,
            &req,
            h,
        );
        assert_bits_equal(&got, &expected(&reference, &req), "request while busy");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("{sent} requests answered while busy");

    // Requests 300 ms before the deadline are answered and restart the idle clock.
    let mut last_answer = Instant::now();
    for _ in 0..2 {
        tokio::time::sleep_until((last_answer + Duration::from_millis(IDLE_MS - 300)).into()).await;
        assert!(
            w.child.try_wait().unwrap().is_none(),
            "worker exited before its idle timeout; log:\n{}",
            w.log()
        );
        let rows = rng.rows(1, h);
        let req = request(
            "acme",
            0,
            h,
            &rows,
            vec![RowRoutes {
                experts: vec![2],
                weights: vec![0.25],
            }],
            true,
        );
        let got = reply_output(
            &call(&client, expert_subject(0, 2), encode(&req)).await,
            &req,
            h,
        );
        assert_bits_equal(
            &got,
            &expected(&reference, &req),
            "request shortly before the idle deadline",
        );
        last_answer = Instant::now();
    }
    // (Requests racing the drain itself: see `requests_racing_a_drain_are_answered_or_refused_never_lost`.)
    let exited = w.wait_exit(Duration::from_millis(IDLE_MS + 5000)).await;
    let exit_after = last_answer.elapsed();
    eprintln!("idle exit {exit_after:?} after the last answer (idle timeout {IDLE_MS} ms)");
    assert!(
        exited.success(),
        "exit status {exited:?}; log:\n{}",
        w.log()
    );
    assert!(
        exit_after >= Duration::from_millis(IDLE_MS),
        "exited after {exit_after:?}"
    );
    assert!(
        exit_after <= Duration::from_millis(IDLE_MS + 3000),
        "exited only after {exit_after:?}"
    );
    let ev = wait_draining(&mut ev_sub, &w.instance_id).await;
    assert_eq!(ev.exit_status, None, "draining comes before the exit");
    assert_eq!(ev.function_id, w.function_id);
    assert_eq!(ev.pid, Some(w.pid));
    assert!(
        w.log().contains("idle: scaling to zero"),
        "the worker exited because idle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits_zero() {
    let (dir, _tmp) = tiny_checkpoint();
    let server = NatsServer::start();
    let reference = reference_experts(&dir, "0:0-3");
    let h = reference.hidden_size();
    let client = connect(&server).await;
    let mut ev_sub = events(&client).await;
    // A long batching window holds the burst inside the worker when SIGTERM arrives.
    let mut w = Worker::start(
        &server.url(),
        &dir,
        &[
            "--experts",
            "0:0-3",
            "--idle-timeout-ms",
            "0",
            "--batch-max-wait-us",
            "300000",
            "--batch-max-tokens",
            "4096",
        ],
    )
    .await;

    let mut rng = Rng(77);
    let reqs: Vec<ExpertRequest> = (0..40)
        .map(|i| {
            let rows = rng.rows(16, h);
            request(
                &format!("t{}", i % 4),
                0,
                h,
                &rows,
                rng.routes(16, &[0, 1, 2, 3], 4),
                i % 2 == 1,
            )
        })
        .collect();
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(format!("{inbox}.*")).await.unwrap();
    for (i, req) in reqs.iter().enumerate() {
        client
            .publish_with_reply(subject_for(req, 0), format!("{inbox}.{i}"), encode(req))
            .await
            .unwrap();
    }
    client.flush().await.unwrap(); // the server has routed the whole burst to the worker
                                   // Nothing answered yet: the burst sits in the worker's 300 ms batching window.
    use futures::FutureExt;
    assert!(
        replies.next().now_or_never().is_none(),
        "a reply came before SIGTERM"
    );
    w.sigterm();
    let sent_at = Instant::now();

    let mut got: BTreeMap<usize, Bytes> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < reqs.len() {
        match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(m)) => {
                let i: usize = m.subject.rsplit('.').next().unwrap().parse().unwrap();
                got.insert(i, m.payload);
            }
            _ => panic!(
                "only {} of {} replies after SIGTERM; log:\n{}",
                got.len(),
                reqs.len(),
                w.log()
            ),
        }
    }
    for (i, req) in reqs.iter().enumerate() {
        let out = reply_output(&got[&i], req, h);
        let want = expected(&reference, req);
        let max = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-5, "request {i}: max abs diff {max:e}");
    }
    let st = w.wait_exit(Duration::from_secs(10)).await;
    eprintln!("SIGTERM: all {} requests were in flight, all answered after the signal; exit {st:?} {:?} after it", got.len(), sent_at.elapsed());
    assert!(st.success(), "exit status {st:?}; log:\n{}", w.log());
    let ev = wait_draining(&mut ev_sub, &w.instance_id).await;
    assert_eq!(ev.kind, EventKind::Draining);
    assert!(
        w.log().contains("shutdown requested"),
        "the worker saw SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_cold_start_still_exits_cleanly() {
    // A checkpoint dir whose config.json is a FIFO: the worker blocks loading it until the
    // test writes the config, so SIGTERM arrives deterministically during the cold start.
    let (src, _tmp) = tiny_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "config.json" {
            std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let fifo = dir.path().join("config.json");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success(),
        "mkfifo"
    );
    let config = std::fs::read(src.join("config.json")).unwrap();

    let server = NatsServer::start();
    let client = connect(&server).await;
    let mut ev_sub = events(&client).await;
    let mut w = Worker::spawn(
        &server.url(),
        dir.path(),
        &["--experts", "0:0-3", "--idle-timeout-ms", "0"],
    );
    let t0 = Instant::now();
    while !w.catches_sigterm() {
        if let Some(st) = w.child.try_wait().unwrap() {
            panic!(
                "worker exited during the cold start: {st:?}; log:\n{}",
                w.log()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no SIGTERM handler installed while the worker loads its experts: a SIGTERM now would kill \
             it without draining, a draining event or exit status 0; log:\n{}",
            w.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    w.sigterm();
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Some(st) = w.child.try_wait().unwrap() {
        panic!(
            "SIGTERM during the cold start killed the worker: {st:?}; log:\n{}",
            w.log()
        );
    }
    // Let the load finish: the worker completes its start, then honours the SIGTERM.
    tokio::task::spawn_blocking(move || std::fs::write(&fifo, config))
        .await
        .unwrap()
        .unwrap();
    let st = w.wait_exit(Duration::from_secs(10)).await;
    assert!(st.success(), "exit status {st:?}; log:\n{}", w.log());
    assert!(
        w.log().contains("shutdown requested"),
        "the worker saw SIGTERM; log:\n{}",
        w.log()
    );
    // It announced itself and its end.
    let mut kinds = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), ev_sub.next()).await {
        let ev = FunctionEvent::decode(&m.payload).unwrap();
        kinds.push(ev.kind);
        if ev.kind == EventKind::Draining {
            break;
        }
    }
    assert_eq!(
        kinds.last(),
        Some(&EventKind::Draining),
        "events: {kinds:?}"
    );
    // Only the worker's own kinds: `ready` and `stopped` are the broker's.
    assert!(
        kinds
            .iter()
            .all(|k| matches!(k, EventKind::Subscribed | EventKind::Draining)),
        "events: {kinds:?}"
    );
}

/// Requests that race the drain (sent continuously while the worker unsubscribes) must be
/// answered, or refused at once with no responders once the function is gone; none may be
/// lost, i.e. time out. (async-nats 0.51's own `Subscriber::drain` loses some: see
/// `faasmoe_expert_worker::drain` for how the worker drains instead.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_a_drain_are_answered_or_refused_never_lost() {
    let (dir, _tmp) = tiny_checkpoint();
    let server = NatsServer::start();
    let reference = reference_experts(&dir, "0:0-3");
    let h = reference.hidden_size();
    let w = Worker::start(
        &server.url(),
        &dir,
        &[
            "--experts",
            "0:0-3",
            "--idle-timeout-ms",
            "0",
            "--batch-max-wait-us",
            "0",
        ],
    )
    .await;
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(2)))
        .connect(server.url())
        .await
        .unwrap();
    let stop_at = Instant::now() + Duration::from_secs(8);
    let loops: Vec<_> = (0..4u64)
        .map(|k| {
            let client = client.clone();
            let reference = reference.clone();
            tokio::spawn(async move {
                let mut rng = Rng(1000 + k);
                let (mut ok, mut refused, mut lost) = (0u32, 0u32, 0u32);
                while Instant::now() < stop_at {
                    let rows = rng.rows(2, h);
                    let req = request("acme", 0, h, &rows, rng.routes(2, &[0, 1, 2, 3], 4), true);
                    match client.request(subject_for(&req, 0), encode(&req)).await {
                        Ok(m) => {
                            // Concurrent requests share batches: equal within float tolerance.
                            assert_close(
                                &reply_output(&m.payload, &req, h),
                                &expected(&reference, &req),
                                "racing request",
                            );
                            ok += 1;
                        }
                        Err(e)
                            if e.kind() == async_nats::client::RequestErrorKind::NoResponders =>
                        {
                            refused += 1;
                            break;
                        }
                        Err(_) => lost += 1,
                    }
                }
                (ok, refused, lost)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.sigterm();
    let mut totals = (0, 0, 0);
    for l in loops {
        let (ok, refused, lost) = l.await.unwrap();
        totals = (totals.0 + ok, totals.1 + refused, totals.2 + lost);
    }
    eprintln!(
        "racing a drain: {} answered, {} refused (no responders), {} lost (timed out)",
        totals.0, totals.1, totals.2
    );
    assert_eq!(totals.2, 0, "requests lost in the drain");
}

/// Mirrors [`ExpertRequest`] with free-form dtype strings (to send dtypes the proto types
/// cannot express).
#[derive(serde::Serialize)]
struct LooseRequest {
    version: u16,
    request_id: Uuid,
    tenant: String,
    model: String,
    layer: u32,
    hidden: LooseTensor,
    routes: Vec<RowRoutes>,
    reply_dtype: String,
    combine: bool,
}

#[derive(serde::Serialize)]
struct LooseTensor {
    dtype: String,
    shape: Vec<u32>,
    data: Bytes,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_and_the_worker_survives() {
    let (dir, _tmp) = tiny_checkpoint();
    let server = NatsServer::start();
    let reference = reference_experts(&dir, "0:0-3");
    let h = reference.hidden_size();
    let mut w = Worker::start(
        &server.url(),
        &dir,
        &[
            "--experts",
            "0:0-3",
            "--idle-timeout-ms",
            "0",
            "--max-request-bytes",
            "1000",
        ],
    )
    .await;
    let client = connect(&server).await;
    let subj = expert_subject(0, 0);
    let mut rng = Rng(3);
    let good = |rng: &mut Rng| {
        let rows = rng.rows(1, h);
        request(
            "acme",
            0,
            h,
            &rows,
            vec![RowRoutes {
                experts: vec![0, 3],
                weights: vec![0.6, 0.4],
            }],
            true,
        )
    };

    let mut cases: Vec<(&str, Bytes, ErrorCode, Option<Uuid>)> = Vec::new();
    cases.push((
        "garbage bytes",
        Bytes::from_static(b"\xc1\xc1 not msgpack"),
        ErrorCode::Malformed,
        None,
    ));
    cases.push((
        "a msgpack string",
        encode(&"hello"),
        ErrorCode::Malformed,
        None,
    ));
    let mut r = good(&mut rng);
    r.hidden = WireTensor::from_f32(vec![1, 32], &rng.rows(1, 32), WireDType::F32).unwrap();
    cases.push((
        "cols != hidden",
        encode(&r),
        ErrorCode::WrongShape,
        Some(r.request_id),
    ));
    let mut r = good(&mut rng);
    r.hidden.shape = vec![2, h as u32]; // data holds one row
    r.routes.push(r.routes[0].clone());
    cases.push((
        "data length != shape",
        encode(&r),
        ErrorCode::WrongShape,
        Some(r.request_id),
    ));
    let mut r = good(&mut rng);
    r.routes.push(r.routes[0].clone());
    cases.push((
        "routes != rows",
        encode(&r),
        ErrorCode::WrongShape,
        Some(r.request_id),
    ));
    let r = good(&mut rng);
    let loose = |hidden_dtype: &str, reply_dtype: &str| LooseRequest {
        version: PROTOCOL_VERSION,
        request_id: r.request_id,
        tenant: r.tenant.clone(),
        model: r.model.clone(),
        layer: r.layer,
        // f32 data of one row: `h` f32 values, or `2h` values of a 2-byte dtype.
        hidden: LooseTensor {
            dtype: hidden_dtype.into(),
            shape: vec![
                1,
                if hidden_dtype == "f32" {
                    h as u32
                } else {
                    2 * h as u32
                },
            ],
            data: r.hidden.data.clone(),
        },
        routes: r.routes.clone(),
        reply_dtype: reply_dtype.into(),
        combine: true,
    };
    cases.push((
        "hidden dtype f16",
        encode(&loose("f16", "f32")),
        ErrorCode::UnsupportedDType,
        None,
    ));
    cases.push((
        "reply dtype f64",
        encode(&loose("f32", "f64")),
        ErrorCode::UnsupportedDType,
        None,
    ));
    let mut r = good(&mut rng);
    r.routes[0].experts[1] = 9;
    cases.push((
        "expert 9 on function A",
        encode(&r),
        ErrorCode::UnknownExpert,
        Some(r.request_id),
    ));
    let mut r = good(&mut rng);
    r.layer = 2;
    cases.push((
        "layer 2 on function A",
        encode(&r),
        ErrorCode::WrongLayer,
        Some(r.request_id),
    ));
    let mut r = good(&mut rng);
    r.version = PROTOCOL_VERSION + 1;
    cases.push((
        "protocol version + 1",
        encode(&r),
        ErrorCode::VersionMismatch,
        None,
    ));
    let rows = rng.rows(16, h); // 4 KiB of hidden states > --max-request-bytes 1000
    let r = request(
        "acme",
        0,
        h,
        &rows,
        vec![
            RowRoutes {
                experts: vec![1],
                weights: vec![1.0]
            };
            16
        ],
        true,
    );
    let big = encode(&r);
    assert!(big.len() > 4096, "{} bytes", big.len());
    cases.push(("4 KiB payload", big, ErrorCode::PayloadTooLarge, None));
    // The good request itself fits the limit.
    assert!(encode(&good(&mut rng)).len() < 1000);

    let mut want_errors: BTreeMap<String, u64> = BTreeMap::new();
    for (what, body, code, id) in &cases {
        let (got, reply_id, message) =
            reply_error_code(&call(&client, subj.clone(), body.clone()).await);
        eprintln!("{what}: {got}: {message}");
        assert_eq!(got, *code, "{what}: {message}");
        if let Some(id) = id {
            assert_eq!(
                reply_id, *id,
                "{what}: the error reply echoes the request id"
            );
        }
        *want_errors.entry(code.as_str().to_string()).or_default() += 1;
        assert!(
            w.child.try_wait().unwrap().is_none(),
            "worker died on {what}; log:\n{}",
            w.log()
        );
    }

    // Still alive and correct.
    let req = good(&mut rng);
    let got = reply_output(&call(&client, subj.clone(), encode(&req)).await, &req, h);
    assert_bits_equal(
        &got,
        &expected(&reference, &req),
        "good request after the bad ones",
    );

    let stats = stats_by_instance(&client, &w.function_id, 1).await;
    let s = &stats[&w.instance_id];
    eprintln!("stats: {s}");
    let errors: BTreeMap<String, u64> = serde_json::from_value(s["errors"].clone()).unwrap();
    assert_eq!(errors, want_errors, "errors counted by code");
    assert_eq!(counter(s, "requests"), cases.len() as u64 + 1);
    assert_eq!(
        counter(s, "batches"),
        1,
        "only the good request was computed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_memory_is_proportional_to_its_experts_on_the_a27b_preset() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = preset("qwen1.5-moe-a2.7b").unwrap();
    g.num_hidden_layers = 1;
    g.vocab_size = 1024;
    let t0 = Instant::now();
    // Zero weights as file holes: the real sizes without 1.15 GB of disk (CI disks are small).
    let written = write_checkpoint_filled(
        tmp.path(),
        &g,
        Fill::Zeros,
        1,
        DEFAULT_MAX_SHARD_BYTES,
        |_, _| {},
    )
    .unwrap();
    eprintln!(
        "generated a2.7b geometry, 1 layer, vocab 1024: {:.2} GB in {:?}",
        written.bytes as f64 / 1e9,
        t0.elapsed()
    );
    let server = NatsServer::start();

    let mut rss = Vec::new();
    for spec in ["0:0-0", "0:all"] {
        let t = Instant::now();
        let mut w = Worker::start(
            &server.url(),
            tmp.path(),
            &["--experts", spec, "--idle-timeout-ms", "0"],
        )
        .await;
        // Let the allocator settle (freed conversion buffers returned).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let bytes = w.rss_bytes();
        eprintln!(
            "worker --experts {spec}: VmRSS {:.1} MB (ready in {:?})",
            bytes as f64 / 1e6,
            t.elapsed()
        );
        rss.push(bytes);
        w.sigterm();
        assert!(w.wait_exit(Duration::from_secs(10)).await.success());
    }
    // The preset is written in bf16 and the weights stay resident as stored (2 bytes each).
    let one_expert = (3 * g.hidden_size * g.moe_intermediate_size * 2) as f64;
    let want = 59.0 * one_expert;
    let diff = rss[1] as f64 - rss[0] as f64;
    eprintln!(
        "RSS(60 experts) - RSS(1 expert) = {:.1} MB; 59 x bf16 expert = {:.1} MB; ratio {:.4}",
        diff / 1e6,
        want / 1e6,
        diff / want
    );
    assert!(
        (diff - want).abs() <= 0.05 * want,
        "difference {:.1} MB not within 5% of {:.1} MB",
        diff / 1e6,
        want / 1e6
    );
    assert!(
        rss[0] < 150_000_000,
        "1-expert worker RSS {:.1} MB >= 150 MB",
        rss[0] as f64 / 1e6
    );
}

// ---------------------------------------------------------------------------------------
// Drain protocol and no orphans
// ---------------------------------------------------------------------------------------

/// What the worker's drain relies on (`faasmoe_expert_worker::drain`), checked against the
/// real nats-server: an UNSUB with a max of more than 9 digits makes the server remove the
/// subscription at once, while async-nats keeps delivering to it; after a round trip every
/// message the server routed before the UNSUB has been delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsub_with_an_oversized_max_stops_routing_but_keeps_receiving() {
    use faasmoe_expert_worker::drain::{fence, FENCE_TIMEOUT, UNSUB_KEEP_RECEIVING};
    let server = NatsServer::start();
    let a = connect(&server).await;
    let b = connect(&server).await;
    let mut sub = a.subscribe("guard.work").await.unwrap();
    fence(&a, "guard.fence", FENCE_TIMEOUT)
        .await
        .expect("round trip on a");
    // A burst the server routes to `a` before it sees the UNSUB (b's round trip returns only
    // once the server has processed, i.e. routed, all of it): 24 MiB, much of it still in
    // flight when `a` unsubscribes.
    const N: usize = 192;
    let body = Bytes::from(vec![7u8; 128 << 10]);
    for _ in 0..N {
        b.publish("guard.work", body.clone()).await.unwrap();
    }
    fence(&b, "guard.fence", FENCE_TIMEOUT)
        .await
        .expect("round trip on b");
    sub.unsubscribe_after(UNSUB_KEEP_RECEIVING).await.unwrap();
    fence(&a, "guard.fence", FENCE_TIMEOUT)
        .await
        .expect("round trip on a after the UNSUB");
    // The server has no subscription left: a request is refused at once.
    match b.request("guard.work", Bytes::new()).await {
        Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {}
        other => panic!("the server still routes to the subscription after UNSUB <sid> {UNSUB_KEEP_RECEIVING}: {other:?}"),
    }
    // Every message routed before the UNSUB arrives.
    sub.unsubscribe().await.unwrap();
    let mut got = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
        assert_eq!(m.payload.len(), body.len());
        got += 1;
    }
    assert_eq!(
        got, N,
        "messages routed before the UNSUB that reached the subscriber"
    );
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet: it runs no more).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) state ...`: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true),
    }
}

/// Waits (bounded) until process `pid` is gone; returns how long it took.
async fn wait_gone(pid: u32, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if process_gone(pid) {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Bound on an exit that should be prompt, generous for a loaded 2-core machine.
const PROMPT_EXIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_server_is_gone_still_exits_on_its_idle_timeout() {
    let (dir, _tmp) = tiny_checkpoint();
    let server = NatsServer::start();
    const IDLE_MS: u64 = 2000;
    let mut w = Worker::start(
        &server.url(),
        &dir,
        &[
            "--experts",
            "0:0-3",
            "--idle-timeout-ms",
            &IDLE_MS.to_string(),
        ],
    )
    .await;
    server.stop();
    let t0 = Instant::now();
    let st = w
        .wait_exit(Duration::from_millis(IDLE_MS) + PROMPT_EXIT)
        .await;
    eprintln!(
        "server killed: the worker exited {:?} later (idle timeout {IDLE_MS} ms): {st:?}",
        t0.elapsed()
    );
    assert!(st.success(), "exit status {st:?}; log:\n{}", w.log());
    let log = w.log();
    assert!(
        log.contains("idle: scaling to zero"),
        "the worker exited because idle; log:\n{log}"
    );
    assert!(
        log.contains("NATS connection lost"),
        "the worker logged the outage; log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_server_is_gone_exits_promptly_on_sigterm() {
    let (dir, _tmp) = tiny_checkpoint();
    let server = NatsServer::start();
    let mut w = Worker::start(
        &server.url(),
        &dir,
        &["--experts", "0:0-3", "--idle-timeout-ms", "0"],
    )
    .await;
    server.stop();
    // Let it notice the outage and start reconnecting (the state in which a drain used to
    // wait forever).
    let t_lost = Instant::now();
    while !w.log().contains("NATS connection lost") {
        assert!(
            t_lost.elapsed() < PROMPT_EXIT,
            "the worker did not log the outage; log:\n{}",
            w.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.sigterm();
    let t0 = Instant::now();
    let st = w.wait_exit(PROMPT_EXIT).await;
    eprintln!(
        "server killed, then SIGTERM: the worker exited {:?} after the signal: {st:?}",
        t0.elapsed()
    );
    assert!(st.success(), "exit status {st:?}; log:\n{}", w.log());
    assert!(
        w.log().contains("shutdown requested"),
        "the worker saw SIGTERM; log:\n{}",
        w.log()
    );
}

/// Environment of [`spawner_parent_process`] (set only when a test runs it as a child).
const PARENT_ENV_URL: &str = "FAASMOE_TEST_PARENT_NATS_URL";
const PARENT_ENV_DIR: &str = "FAASMOE_TEST_PARENT_MODEL_DIR";
const PARENT_ENV_LOG_DIR: &str = "FAASMOE_TEST_PARENT_LOG_DIR";

/// Not a test of its own: the parent process of `a_worker_dies_with_the_process_that_started_it`,
/// which runs this test binary with `--ignored --exact` on this name. Starts one worker (idle
/// timeout off) through the broker's spawner, prints `WORKER <pid>` once it is ready, then
/// waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of a_worker_dies_with_the_process_that_started_it"]
async fn spawner_parent_process() {
    use faasmoe_broker::{InstanceBackend, LocalProcessBackend};
    let (Ok(url), Ok(dir), Ok(log_dir)) = (
        std::env::var(PARENT_ENV_URL),
        std::env::var(PARENT_ENV_DIR),
        std::env::var(PARENT_ENV_LOG_DIR),
    ) else {
        eprintln!("not started by a_worker_dies_with_the_process_that_started_it: nothing to do");
        return;
    };
    let backend = LocalProcessBackend {
        worker_bin: env!("CARGO_BIN_EXE_faasmoe-expert-worker").into(),
        nats: faasmoe_proto::connection::NatsArgs::anonymous(url),
        model_dir: dir.into(),
        model_id: MODEL.into(),
        idle_timeout_ms: 0,
        log_dir: Some(log_dir.into()),
        env: vec![("RUST_LOG".into(), "info".into())],
    };
    let spec = faasmoe_proto::layout::FunctionSpec::new(0, 0, 3);
    let mut instance = backend.spawn(&spec, "orphan").expect("spawn the worker");
    let ready = instance
        .take_ready_signal()
        .expect("the local backend reports READY");
    tokio::time::timeout(READY_TIMEOUT, ready)
        .await
        .expect("worker ready in time")
        .expect("worker ready");
    println!("WORKER {}", instance.pid().expect("a pid"));
    tokio::time::sleep(Duration::from_secs(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dies_with_the_process_that_started_it() {
    let (dir, _tmp) = tiny_checkpoint();
    let server = NatsServer::start();
    let logs = tempfile::tempdir().unwrap();
    let mut parent = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "spawner_parent_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(PARENT_ENV_URL, server.url())
        .env(PARENT_ENV_DIR, &dir)
        .env(PARENT_ENV_LOG_DIR, logs.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(parent.stdout.take().unwrap()).lines();
    let pid: u32 = tokio::time::timeout(READY_TIMEOUT + Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // libtest may print `test spawner_parent_process ... ` on the same line first.
            if let Some((_, pid)) = line.split_once("WORKER ") {
                return pid.trim().parse().unwrap();
            }
        }
        panic!("the parent process ended without starting a worker");
    })
    .await
    .expect("the parent started a worker in time");
    let worker_log = || {
        std::fs::read_dir(logs.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>()
    };
    assert!(!process_gone(pid), "the worker runs while its parent does");
    parent.start_kill().unwrap(); // SIGKILL: the parent runs no handler at all
    parent.wait().await.unwrap();
    let gone = wait_gone(pid, PROMPT_EXIT).await;
    if gone.is_none() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    let log = worker_log();
    let after = gone.unwrap_or_else(|| {
        panic!("worker {pid} still runs {PROMPT_EXIT:?} after its parent was killed; log:\n{log}")
    });
    eprintln!("parent SIGKILLed: its worker exited {after:?} later");
    assert!(
        log.contains("shutdown requested"),
        "the worker drained on its parent-death signal (SIGTERM); log:\n{log}"
    );
    assert!(
        log.contains("exiting"),
        "the worker exited cleanly; log:\n{log}"
    );
}
