//! `faasmoe bench-prefill`: what chunked prefill buys and costs, per token budget, measured
//! side by side in one run (issue 11).
//!
//! For each budget (`--max-prefill-tokens` of the controller) the engine runs in-process over
//! in-process experts (local-split: no NATS, so only the scheduling is measured), with
//! `--decodes` sequences decoding; once each has produced `WARMUP_TOKENS` tokens, their
//! inter-token gaps are recorded for `--alone-tokens` tokens (TPOT without a prefill), then a
//! `--prompt-tokens` prompt arrives and their gaps are recorded until the long prompt's first
//! token (TPOT during the prefill), whose time from submission is the long prompt's TTFT.
//! The budget equal to the prompt length is the unchunked reference.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::DType;
use faasmoe_controller::dispatch::{Dispatch, LocalDispatch};
use faasmoe_controller::engine::{self, EngineSettings, SeqEvent, Submission};
use faasmoe_controller::sampling::SamplingParams;
use tokio::sync::mpsc;

use crate::monitor::percentile;

/// Tokens each decode produces before its gaps count (the first steps include admission).
const WARMUP_TOKENS: usize = 4;

/// Settings of the chunked-prefill benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefillArgs {
    /// Checkpoint; default demo-data/qwen15-moe-demo (the demo geometry: the A2.7B structure
    /// shrunk 4× in width, 24 layers), generated without a tokenizer if absent.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt-token budgets per engine step (`--max-prefill-tokens`) to compare (the prompt
    /// length is added as the unchunked reference).
    #[arg(long, value_delimiter = ',', default_value = "8,12,16,32,256")]
    pub budgets: Vec<usize>,
    /// Running decodes the long prompt interrupts.
    #[arg(long, default_value_t = 4)]
    pub decodes: usize,
    /// Length of the long prompt, tokens.
    #[arg(long, default_value_t = 4096)]
    pub prompt_tokens: usize,
    /// Tokens of each decode measured before the long prompt arrives.
    #[arg(long, default_value_t = 16)]
    pub alone_tokens: usize,
    /// Pipeline each step as two micro-batches (a controller with `--local-experts`, as
    /// here, never does; one with remote experts does unless `--no-pipeline`).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub pipeline: bool,
}

/// One budget's figures (ms).
#[derive(Debug, Clone)]
pub struct PrefillRow {
    /// Tokens per engine step.
    pub budget: usize,
    /// TPOT of the decodes before the long prompt: p50, p99 (ms).
    pub alone_ms: (f64, f64),
    /// TPOT of the decodes while the long prompt prefills: p50, p99 (ms).
    pub during_ms: (f64, f64),
    /// The long prompt's time to first token (ms).
    pub ttft_ms: f64,
}

fn ensure_model(a: &PrefillArgs) -> anyhow::Result<PathBuf> {
    if let Some(m) = &a.model {
        return Ok(m.clone());
    }
    let dir = PathBuf::from("demo-data/qwen15-moe-demo");
    if !dir.join("config.json").exists() {
        println!("creating {} (demo geometry, random weights)", dir.display());
        faasmoe_model::random_checkpoint::init(&faasmoe_model::random_checkpoint::InitArgs::new(
            &dir, "demo",
        ))?;
    }
    Ok(dir)
}

/// Token ids from a fixed LCG: distinct prompts, so the decodes touch different experts.
fn prompt(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Per decode, the arrival times of its tokens.
type Arrivals = Vec<Vec<Instant>>;

/// Receives every decode's events into `arrivals` until `stop` is set.
async fn collect(
    mut rxs: Vec<mpsc::UnboundedReceiver<SeqEvent>>,
    arrivals: Arc<std::sync::Mutex<Arrivals>>,
) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for (i, mut rx) in rxs.drain(..).enumerate() {
        let arrivals = arrivals.clone();
        set.spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    SeqEvent::Token(_) => arrivals.lock().unwrap()[i].push(Instant::now()),
                    SeqEvent::Failed(e) => return Err(anyhow::anyhow!("decode {i} failed: {e}")),
                    SeqEvent::Finished(_) => return Ok(()),
                    SeqEvent::Admitted => {}
                }
            }
            Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// Gaps (ms) between consecutive arrivals that both fall in `[from, to)`.
fn gaps(arrivals: &Arrivals, from: Instant, to: Instant) -> Vec<f64> {
    let mut out = Vec::new();
    for a in arrivals {
        for w in a.windows(2) {
            if w[0] >= from && w[1] < to {
                out.push((w[1] - w[0]).as_secs_f64() * 1e3);
            }
        }
    }
    out
}

fn p50_p99(v: Vec<f64>) -> (f64, f64) {
    (percentile(&v, 50.0), percentile(&v, 99.0))
}

async fn measure(
    cp: Arc<faasmoe_model::ControlPlane>,
    backend: Arc<dyn Dispatch>,
    a: &PrefillArgs,
    budget: usize,
    vocab: usize,
) -> anyhow::Result<PrefillRow> {
    let settings = EngineSettings {
        max_prefill_tokens: budget,
        // The same budget with no decode running (with `--decodes 0`, too).
        max_prefill_tokens_alone: budget,
        pipeline: a.pipeline,
        eos_token_ids: vec![],
        ..EngineSettings::default()
    };
    let engine = engine::spawn(cp, backend, settings);
    let cancel = Arc::new(AtomicBool::new(false));
    let submit = |id: String, prompt: Vec<u32>, max_tokens: usize, cancel: Arc<AtomicBool>| {
        let (tx, rx) = mpsc::unbounded_channel();
        let ok = engine.submit(Submission {
            id: id.clone(),
            tenant: format!("bench-{id}"),
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
            },
            seed: None,
            cancel,
            events: tx,
            traceparent: None,
        });
        (ok, rx)
    };
    let mut rxs = Vec::new();
    for i in 0..a.decodes {
        let (ok, rx) = submit(
            format!("d{i}"),
            prompt(i as u64 + 1, 16, vocab),
            1 << 20,
            cancel.clone(),
        );
        if !ok {
            bail!("the engine refused a decode");
        }
        rxs.push(rx);
    }
    let arrivals = Arc::new(std::sync::Mutex::new(vec![Vec::new(); a.decodes]));
    let collector = tokio::spawn(collect(rxs, arrivals.clone()));
    let wait_for = |n: usize| {
        let arrivals = arrivals.clone();
        async move {
            let t0 = Instant::now();
            loop {
                if arrivals.lock().unwrap().iter().all(|v| v.len() >= n) {
                    return Ok(Instant::now());
                }
                if t0.elapsed() > Duration::from_secs(600) {
                    bail!("decodes did not reach {n} tokens in 600 s");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    let alone_from = wait_for(WARMUP_TOKENS).await?;
    let alone_to = wait_for(WARMUP_TOKENS + a.alone_tokens).await?;
    let t_long = Instant::now();
    let (ok, mut long_rx) = submit(
        "long".into(),
        prompt(99, a.prompt_tokens, vocab),
        1,
        Arc::new(AtomicBool::new(false)),
    );
    if !ok {
        bail!("the engine refused the long prompt");
    }
    let first = loop {
        match long_rx.recv().await {
            Some(SeqEvent::Token(_)) => break Instant::now(),
            Some(SeqEvent::Failed(e)) => bail!("long prompt failed: {e}"),
            Some(_) => {}
            None => bail!("long prompt's events ended without a token"),
        }
    };
    cancel.store(true, Ordering::Relaxed);
    collector.await??;
    let arr = arrivals.lock().unwrap();
    let alone = gaps(&arr, alone_from, alone_to);
    let during = gaps(&arr, t_long, first);
    Ok(PrefillRow {
        budget,
        alone_ms: p50_p99(alone),
        during_ms: p50_p99(during),
        ttft_ms: (first - t_long).as_secs_f64() * 1e3,
    })
}

/// Runs the benchmark and prints its table.
pub async fn run(a: PrefillArgs) -> anyhow::Result<()> {
    let model = ensure_model(&a)?;
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(model.join("config.json"))
            .with_context(|| format!("reading {}/config.json", model.display()))?,
    )?;
    let vocab = cfg["vocab_size"]
        .as_u64()
        .context("config.json has no vocab_size")? as usize;
    let context = cfg["max_position_embeddings"].as_u64().unwrap_or(0) as usize;
    if a.prompt_tokens + 1 >= context {
        bail!(
            "--prompt-tokens {} does not fit the checkpoint's context of {context} tokens",
            a.prompt_tokens
        );
    }
    println!(
        "chunked prefill: {} decodes, then one {}-token prompt; {} (local-split, pipeline {}), {}",
        a.decodes,
        a.prompt_tokens,
        model.display(),
        a.pipeline,
        super::machine()
    );
    let (cp, backend) = faasmoe_model::load_local(&model, DType::F32)?;
    let (cp, backend): (_, Arc<dyn Dispatch>) = (Arc::new(cp), Arc::new(LocalDispatch(backend)));
    let mut budgets = a.budgets.clone();
    budgets.push(a.prompt_tokens);
    println!(
        "{:>8} | {:>17} | {:>17} | {:>9} | {:>9}",
        "budget", "TPOT alone p50/p99", "during p50/p99", "p99 ratio", "TTFT (s)"
    );
    let mut rows = Vec::new();
    for budget in budgets {
        let r = measure(cp.clone(), backend.clone(), &a, budget, vocab).await?;
        println!(
            "{:>8} | {:>8.1}/{:<8.1} | {:>8.1}/{:<8.1} | {:>9.2} | {:>9.2}{}",
            r.budget,
            r.alone_ms.0,
            r.alone_ms.1,
            r.during_ms.0,
            r.during_ms.1,
            r.during_ms.1 / r.alone_ms.1,
            r.ttft_ms / 1e3,
            if r.budget == a.prompt_tokens {
                "  (unchunked)"
            } else {
                ""
            }
        );
        rows.push(r);
    }
    Ok(())
}
