//! `faasmoe serve-baseline` (hidden): the paper's baseline as a service — candle-transformers'
//! monolithic `qwen2_moe` with every weight resident, serving `faasmoe.v1.generate.<tenant>`
//! for the given tenants. The model has one KV cache, so requests are served one at a time
//! (in arrival order); replies are `GenerateResponse` JSON like the controller's.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use faasmoe_controller::tokenizer::QwenTokenizer;
use faasmoe_model::baseline::Baseline;
use faasmoe_proto::generate::{FinishReason, GenerateRequest, GenerateResponse, Timings, Usage};
use futures::StreamExt;

/// Arguments of `faasmoe serve-baseline`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeBaselineArgs {
    /// Checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Tenants served (comma separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub tenants: Vec<String>,
    /// Where NATS is and as whom to connect.
    #[command(flatten)]
    pub nats: faasmoe_proto::connection::NatsArgs,
}

struct Job {
    req: GenerateRequest,
    reply: async_nats::Subject,
    received: Instant,
}

fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({"error": {"code": code, "message": message}}).to_string()
}

/// Serves until the connection ends.
pub async fn run(a: ServeBaselineArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dir = a.model.clone();
    let (mut model, tokenizer) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let m = Baseline::load(&dir, candle_core::DType::F32)
            .with_context(|| format!("loading {}", dir.display()))?;
        let tok = if dir.join("tokenizer.json").exists() {
            Some(QwenTokenizer::from_checkpoint_dir(&dir)?)
        } else {
            None
        };
        Ok((m, tok))
    })
    .await??;
    tracing::info!(
        load_ms = t0.elapsed().as_secs_f64() * 1e3,
        "baseline loaded"
    );
    let eos: Vec<u32> = {
        let cfg = faasmoe_model::config::Config::from_dir(&a.model)?;
        let generation = faasmoe_model::GenerationConfig::from_dir(&a.model)?;
        faasmoe_model::config::eos_token_ids(&cfg, &generation)
    };
    let client = a.nats.connect("faasmoe-baseline").await?;
    let mut subs = Vec::new();
    for t in &a.tenants {
        subs.push(
            client
                .subscribe(faasmoe_proto::subject::generate(t)?)
                .await?,
        );
    }
    client.flush().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
    let c2 = client.clone();
    tokio::spawn(async move {
        let mut all = futures::stream::select_all(subs);
        while let Some(msg) = all.next().await {
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let tenant = faasmoe_proto::subject::parse_generate(&msg.subject).unwrap_or_default();
            if !faasmoe_controller::api::reply_allowed(
                c2.server_info().auth_required,
                &tenant,
                &reply,
            ) {
                tracing::warn!(%tenant, %reply, "dropped a request whose reply subject is not the tenant's inbox");
                continue;
            }
            match serde_json::from_slice::<GenerateRequest>(&msg.payload)
                .map_err(|e| e.to_string())
                .and_then(|r| r.validate().map(|_| r).map_err(|e| e.to_string()))
            {
                Ok(req) => {
                    let _ = tx.send(Job {
                        req,
                        reply,
                        received: Instant::now(),
                    });
                }
                Err(e) => {
                    let _ = c2
                        .publish(reply, error_body("bad_request", &e).into())
                        .await;
                }
            }
        }
    });
    let mut n = 0u64;
    while let Some(job) = rx.recv().await {
        n += 1;
        let prompt: Vec<u32> = match (&job.req.input_ids, &job.req.prompt, &tokenizer) {
            (Some(ids), _, _) => ids.clone(),
            (None, Some(p), Some(t)) => t.encode(p)?,
            _ => {
                let _ = client
                    .publish(
                        job.reply,
                        error_body("bad_request", "the baseline serves input_ids or prompt").into(),
                    )
                    .await;
                continue;
            }
        };
        let max_new = job.req.max_tokens.unwrap_or(256) as usize;
        let eos = eos.clone();
        let received = job.received;
        // One request at a time on the blocking pool (the model has one KV cache).
        let (m, result) = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let r = (|| -> anyhow::Result<(Vec<u32>, f64, FinishReason)> {
                model.reset();
                let mut out = Vec::with_capacity(max_new);
                let mut logits = model.forward(&prompt)?;
                let mut ttft = 0.0;
                let mut finish = FinishReason::Length;
                for i in 0..max_new {
                    let t = faasmoe_model::control_plane::argmax(&logits.to_vec1::<f32>()?);
                    out.push(t);
                    if i == 0 {
                        ttft = received.elapsed().as_secs_f64() * 1e3;
                    }
                    if eos.contains(&t) {
                        finish = FinishReason::Stop;
                        break;
                    }
                    if i + 1 < max_new {
                        logits = model.forward(&[t])?;
                    }
                }
                Ok((out, ttft, finish))
            })();
            let queue_ms = start.duration_since(received).as_secs_f64() * 1e3;
            (model, r.map(|(o, t, f)| (o, t, f, queue_ms, prompt.len())))
        })
        .await?;
        model = m;
        let body = match result {
            Ok((ids, ttft_ms, finish, queue_ms, prompt_len)) => {
                let text = tokenizer
                    .as_ref()
                    .and_then(|t| t.decode(&ids).ok())
                    .unwrap_or_default();
                let resp = GenerateResponse {
                    id: format!("baseline-{n}"),
                    text,
                    usage: Usage {
                        prompt_tokens: prompt_len as u32,
                        completion_tokens: ids.len() as u32,
                    },
                    token_ids: ids,
                    finish_reason: finish,
                    timings: Timings {
                        queue_ms,
                        ttft_ms,
                        total_ms: received.elapsed().as_secs_f64() * 1e3,
                    },
                    prompt_token_ids: None,
                };
                serde_json::to_string(&resp)?
            }
            Err(e) => error_body("internal", &format!("{e:#}")),
        };
        let _ = client.publish(job.reply, body.into()).await;
    }
    Ok(())
}
