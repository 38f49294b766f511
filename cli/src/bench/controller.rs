//! The controller's memory next to the bytes it must hold: a real `faasmoe controller`
//! process on the expert checkpoint (the exact A2.7B layer geometry), its resident set read
//! from /proc against the bytes of its weight tensors (which it reports in
//! `faasmoe.v1.admin.controller_stats`) plus its KV caches.
//!
//! Three states: remote experts (the faasmoe-shared controller: attention, router, shared
//! expert, embeddings and LM head), loaded and idle; local experts (`--local-experts`, every
//! tensor in the process), loaded and idle; and local experts while one request of
//! `prompt + output` tokens is in flight, where the peak resident set during the request is
//! compared with the tensors plus that sequence's KV cache at its final capacity. The remote
//! controller is not measured with a live sequence: that needs the broker and workers, and its
//! KV caches are the same code and size as the local one's.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faasmoe_broker::InternalCredentials;
use faasmoe_proto::generate::{GenerateRequest, GenerateResponse};
use tokio::process::Command;

use super::{mbf, page_size, start_server};
use crate::stack::{log_file, terminate};

/// Tenant the measured request runs as.
const TENANT: &str = "bench-memory";

/// One measured state of a controller.
#[derive(Debug, Clone)]
pub(super) struct ControllerRow {
    /// `remote experts, idle`, `local experts, idle` or `local experts, 1 request`.
    pub state: String,
    /// Bytes of the weight tensors the process holds (its `controller_stats`).
    pub weight_bytes: u64,
    /// Bytes of the KV caches live at the measurement (capacity, f32; 0 when idle).
    pub kv_bytes: u64,
    /// Resident set, bytes: after loading (idle), or the peak sampled every 10 ms while the
    /// request ran.
    pub rss: u64,
    /// The process's high-water resident set (`VmHWM`), bytes: loading's transients included.
    pub hwm: u64,
    /// Spawn → answering its stats request, ms.
    pub ready_ms: f64,
}

impl ControllerRow {
    /// `rss ÷ (weight_bytes + kv_bytes)`.
    pub fn ratio(&self) -> f64 {
        self.rss as f64 / (self.weight_bytes + self.kv_bytes).max(1) as f64
    }
}

fn rss_of(pid: i32) -> (u64, u64) {
    let Ok(p) = procfs::process::Process::new(pid) else {
        return (0, 0);
    };
    let rss = p.stat().map(|s| s.rss * page_size()).unwrap_or(0);
    let hwm = p
        .status()
        .ok()
        .and_then(|s| s.vmhwm)
        .map_or(0, |kb| kb * 1024);
    (rss, hwm)
}

/// KV cache bytes of one sequence of `tokens` positions: per layer, keys and values of
/// `kv_heads × head_dim` f32 each, at the cache's capacity (16 positions, doubling:
/// `faasmoe_model::kv_cache`).
fn kv_bytes(cfg: &faasmoe_model::Config, tokens: usize) -> u64 {
    let cap = tokens
        .max(faasmoe_model::kv_cache::MIN_CAPACITY)
        .next_power_of_two();
    (cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4 * cap) as u64
}

/// Measures the three states on `model` with one request of `prompt` input ids and
/// `output` generated tokens. Logs go to `log_dir`.
pub(super) async fn measure(
    model: &Path,
    prompt: usize,
    output: u32,
    log_dir: &Path,
) -> anyhow::Result<Vec<ControllerRow>> {
    let cfg = faasmoe_model::Config::from_dir(model)?;
    let credentials = InternalCredentials::generate();
    let (server, _) = start_server(log_dir, &credentials)?;
    let url = server.url().to_string();
    let (admin_client, mut tenants) =
        super::tenant_clients(&server, &credentials, &[TENANT.to_string()]).await?;
    let tenant = tenants.remove(TENANT).context("the tenant's connection")?;
    let stats_subject = faasmoe_proto::subject::admin("controller_stats")?;
    let mut rows = Vec::new();
    for local in [false, true] {
        let name = if local { "local" } else { "remote" };
        let t0 = Instant::now();
        let mut child = Command::new(std::env::current_exe()?)
            .args(["controller", "--no-quota", "--nats-url", &url])
            .args(["--nats-user", "controller"])
            .env("NATS_PASSWORD", &credentials.controller)
            .arg("--model-dir")
            .arg(model)
            .args(["--granularity", &cfg.num_experts.to_string()])
            .args(local.then_some("--local-experts"))
            .stdout(Stdio::null())
            .stderr(log_file(log_dir, &format!("controller-{name}.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning the controller")?;
        let pid = child.id().unwrap_or(0) as i32;
        let silent = faasmoe_proto::connection::wait_answering(
            &admin_client,
            &[(stats_subject.clone(), b"")],
            Duration::from_millis(100),
            Duration::from_secs(300),
        )
        .await;
        let ready_ms = t0.elapsed().as_secs_f64() * 1e3;
        if !silent.is_empty() {
            let _ = child.kill().await;
            bail!(
                "the {name}-experts controller did not answer within 300 s (see {})",
                log_dir.display()
            );
        }
        let stats = admin_client
            .request(stats_subject.clone(), "".into())
            .await
            .context("controller_stats")?;
        let weight_bytes = faasmoe_proto::stats::ControllerStats::decode(&stats.payload)
            .context("controller_stats")?
            .weight_bytes;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (rss, hwm) = rss_of(pid);
        rows.push(ControllerRow {
            state: format!("{name} experts, idle"),
            weight_bytes,
            kv_bytes: 0,
            rss,
            hwm,
            ready_ms,
        });
        if local {
            // The peak resident set while one sequence prefills and decodes.
            let peak = Arc::new(AtomicU64::new(0));
            let done = Arc::new(AtomicBool::new(false));
            let sampler = {
                let (peak, done) = (peak.clone(), done.clone());
                tokio::spawn(async move {
                    while !done.load(Ordering::Relaxed) {
                        peak.fetch_max(rss_of(pid).0, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            };
            let vocab = cfg.vocab_size as u32;
            let req = GenerateRequest {
                input_ids: Some((0..prompt as u32).map(|i| 1 + i % (vocab - 1)).collect()),
                max_tokens: Some(output),
                temperature: Some(0.0),
                ..Default::default()
            };
            // The client's default request timeout (10 s) is shorter than a long prefill on a
            // slow machine.
            let reply = tenant
                .send_request(
                    faasmoe_proto::subject::generate(TENANT)?,
                    async_nats::Request::new()
                        .payload(serde_json::to_vec(&req)?.into())
                        .timeout(Some(Duration::from_secs(600))),
                )
                .await;
            done.store(true, Ordering::Relaxed);
            let _ = sampler.await;
            let msg = reply.context("the generate request (600 s limit)")?;
            let r: GenerateResponse = serde_json::from_slice(&msg.payload)
                .with_context(|| format!("the reply: {}", String::from_utf8_lossy(&msg.payload)))?;
            let tokens = prompt + r.token_ids.len();
            rows.push(ControllerRow {
                state: format!("{name} experts, 1 request of {tokens} tokens"),
                weight_bytes,
                kv_bytes: kv_bytes(&cfg, tokens),
                rss: peak.load(Ordering::Relaxed),
                hwm: rss_of(pid).1,
                ready_ms,
            });
        }
        terminate(&mut child).await;
    }
    for r in &rows {
        println!(
            "    controller, {}: RSS {:.1} MB = {:.3} × (tensors {:.1} MB + KV {:.1} MB); high-water {:.1} MB; ready in {:.0} ms",
            r.state,
            mbf(r.rss as f64),
            r.ratio(),
            mbf(r.weight_bytes as f64),
            mbf(r.kv_bytes as f64),
            mbf(r.hwm as f64),
            r.ready_ms
        );
    }
    server.stop();
    Ok(rows)
}
