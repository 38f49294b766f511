//! `faasmoe demo`: the main job end to end — a multi-tenant workload replayed from the Azure
//! traces against the real stack (nats-server, broker, controller, expert functions started
//! on demand), with progress while it runs and a report measured during the run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use faasmoe_broker::Quota;
use faasmoe_controller::tokenizer::QwenTokenizer;
use faasmoe_proto::generate::{GenerateResponse, CONTENT_TYPE, JSON};

use crate::function_events::{ready_between, FunctionEvents};
use crate::monitor::{mb, percentile, Monitor, Role};
use crate::stack::{Stack, StackArgs};
use crate::workload::{self, ScaleArgs, TraceRow};

/// Settings of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Checkpoint directory; default: demo-data/qwen15-moe-demo, generated if absent
    /// (Qwen1.5-MoE-A2.7B structure shrunk 4× in width, random weights, real tokenizer).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Qwen's BPE ranks used to build tokenizer.json for the generated checkpoint.
    #[arg(long, default_value = ".tools/qwen.tiktoken")]
    pub tiktoken: PathBuf,
    /// Requests per tenant.
    #[arg(long, default_value_t = 6)]
    pub requests: usize,
    /// How the trace is shrunk.
    #[command(flatten)]
    pub scale: ScaleArgs,
    /// Experts per function.
    #[arg(long, default_value_t = 20)]
    pub granularity: u32,
    /// Workers exit after this many ms idle.
    #[arg(long, default_value_t = 8_000)]
    pub idle_timeout_ms: u64,
    /// Logs of the stack.
    #[arg(long, default_value = "demo-data/logs")]
    pub log_dir: PathBuf,
    /// Skip the warm replay: by default, once the workload is done and before the functions
    /// scale to zero, the tenants without a token budget send the same requests again at the
    /// same offsets, so the report compares the TTFT of each request that waited on a cold
    /// start with its own warm TTFT.
    #[arg(long)]
    pub no_warm_replay: bool,
}

struct TenantPlan {
    name: &'static str,
    shape: &'static str,
    quota: Quota,
    rows: Vec<TraceRow>,
}

/// The outcomes of the requests sent so far, by tenant.
type Results = Arc<Mutex<BTreeMap<&'static str, Vec<Outcome>>>>;

#[derive(Debug, Clone, Default)]
struct Outcome {
    /// The request's index in its tenant's plan (the same request in the warm replay).
    index: usize,
    /// When it was sent, s after the workload's start.
    sent_s: f64,
    ok: Option<GenerateResponse>,
    error: Option<String>,
}

/// Ensures the demo checkpoint exists; returns its directory.
pub(crate) fn ensure_model(a: &DemoArgs) -> anyhow::Result<PathBuf> {
    if let Some(m) = &a.model {
        return Ok(m.clone());
    }
    let dir = PathBuf::from("demo-data/qwen15-moe-demo");
    if dir.join("config.json").exists() && dir.join("tokenizer.json").exists() {
        return Ok(dir);
    }
    let g = faasmoe_model::random_checkpoint::preset("demo").expect("demo preset");
    let real = faasmoe_model::random_checkpoint::preset("qwen1.5-moe-a2.7b").expect("preset");
    println!(
        "creating the demo checkpoint: Qwen1.5-MoE-A2.7B structure ({} layers, {} experts top-{}, shared expert, vocab {}) shrunk {}× in width (hidden {} vs {}, expert {} vs {})",
        g.num_hidden_layers, g.num_experts, g.num_experts_per_tok, g.vocab_size,
        real.hidden_size / g.hidden_size, g.hidden_size, real.hidden_size, g.moe_intermediate_size, real.moe_intermediate_size
    );
    let tok = QwenTokenizer::from_tiktoken(&a.tiktoken).with_context(|| {
        format!(
            "building tokenizer.json from {} (run scripts/fetch-qwen-tiktoken)",
            a.tiktoken.display()
        )
    })?;
    faasmoe_model::random_checkpoint::init(&faasmoe_model::random_checkpoint::InitArgs::new(
        &dir, "demo",
    ))?;
    tok.save(dir.join("tokenizer.json"))?;
    Ok(dir)
}

/// Runs the demo.
pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let t_all = Instant::now();
    let model = ensure_model(&a)?;
    let tokenizer = QwenTokenizer::from_checkpoint_dir(&model)?;
    let scale = a.scale.with_ranges((8, 128), (4, 24));
    let n = a.requests;
    let plans = tenant_plans(n, &scale)?;
    println!("workload: {} tenants × {n} requests from the Azure LLM traces (Splitwise, ISCA 2024, CC-BY 4.0); scale: prompt tokens ÷{}, output tokens ÷{}, time ×{}", plans.len(), scale.prompt_div, scale.output_div, scale.time_mul);

    let stack_args = StackArgs {
        model: model.clone(),
        granularity: a.granularity,
        idle_timeout_ms: a.idle_timeout_ms,
        max_instances: 2,
        port: None,
        http_port: None,
        controller_metrics_port: None,
        broker_metrics_port: None,
        nats_config: None,
        log_dir: a.log_dir.clone(),
    };
    println!("starting the stack (nats-server, broker, controller; expert functions start on demand, granularity {})…", a.granularity);
    let stack = Stack::start(&stack_args).await?;
    let internal = stack.connect_admin().await?;

    // Resource monitor.
    let monitor = Arc::new(Mutex::new(Monitor::new(
        vec![
            (Role::Nats, stack.server.pid() as i32),
            (Role::Broker, stack.broker.id().unwrap_or(0) as i32),
            (Role::Controller, stack.controller.id().unwrap_or(0) as i32),
        ],
        vec![stack.broker.id().unwrap_or(0) as i32],
    )));
    let sampler = sample_every_second(monitor.clone());
    // Cold starts from the function events.
    let (cold, ev_task) = FunctionEvents::watch(&internal, &stack.model_id).await?;

    // Tenants with their own credentials and quotas.
    let admin = crate::tenant_admin(&stack).await?;
    let clients = connect_tenants(&plans, &admin, stack.server.url()).await?;
    let corpus = tokenizer.encode(workload::CORPUS)?;
    let (results, start) = replay(&plans, &clients, |_| true, &corpus, &tokenizer).await?;
    println!("workload finished in {:.1}s", start.elapsed().as_secs_f64());
    let warm = if a.no_warm_replay {
        None
    } else {
        let names: Vec<&str> = plans
            .iter()
            .filter(|p| p.quota.total_tokens.is_none())
            .map(|p| p.name)
            .collect();
        println!(
            "replaying the requests of {} warm, at the same offsets, to compare TTFT cold and warm…",
            names.join(", ")
        );
        let w = replay(
            &plans,
            &clients,
            |p| p.quota.total_tokens.is_none(),
            &corpus,
            &tokenizer,
        )
        .await?;
        println!(
            "warm replay finished in {:.1}s",
            w.1.elapsed().as_secs_f64()
        );
        Some(w)
    };
    println!(
        "waiting {:.0}s for idle functions to scale to zero…",
        a.idle_timeout_ms as f64 / 1e3 + 4.0
    );
    let t_wait = Instant::now();
    while t_wait.elapsed() < Duration::from_millis(a.idle_timeout_ms + 4000) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sampler.abort();
    ev_task.abort();
    monitor.lock().unwrap().sample();

    print_report(
        &plans,
        (&results, start),
        warm.as_ref(),
        &cold,
        &monitor,
        &admin,
        a.idle_timeout_ms,
    )
    .await;
    stack.stop().await;
    println!(
        "\ndemo done in {:.0}s; logs in {}",
        t_all.elapsed().as_secs_f64(),
        a.log_dir.display()
    );
    Ok(())
}

/// The demo's three tenants: `chat` and `code` (8 concurrent requests each, no token
/// budget) and `trial` (2 concurrent, a 200-token budget), `n` requests each from the
/// conversation and code traces.
fn tenant_plans(n: usize, scale: &workload::Scale) -> anyhow::Result<Vec<TenantPlan>> {
    Ok(vec![
        TenantPlan {
            name: "chat",
            shape: "conversation trace",
            quota: Quota {
                max_concurrent: Some(8),
                tokens_per_minute: None,
                total_tokens: None,
            },
            rows: workload::load(workload::CONV_TRACE, 0, n, scale)?,
        },
        TenantPlan {
            name: "code",
            shape: "code-completion trace",
            quota: Quota {
                max_concurrent: Some(8),
                tokens_per_minute: None,
                total_tokens: None,
            },
            rows: workload::load(workload::CODE_TRACE, 0, n, scale)?,
        },
        TenantPlan {
            name: "trial",
            shape: "conversation trace, 200-token budget",
            quota: Quota {
                max_concurrent: Some(2),
                tokens_per_minute: None,
                total_tokens: Some(200),
            },
            rows: workload::load(workload::CONV_TRACE, 100, n, scale)?,
        },
    ])
}

/// Sends one generate request (JSON `body`) and waits for its reply, at most 600 s; an
/// error reply's `error.code`, a NATS error or the timeout becomes the outcome's error.
async fn send(client: &async_nats::Client, subject: String, body: serde_json::Value) -> Outcome {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(CONTENT_TYPE, JSON);
    let r = tokio::time::timeout(
        Duration::from_secs(600),
        client.send_request(
            subject,
            async_nats::Request::new()
                .headers(headers)
                .payload(body.to_string().into())
                .timeout(Some(Duration::from_secs(600))),
        ),
    )
    .await;
    match r {
        Ok(Ok(m)) => match serde_json::from_slice::<GenerateResponse>(&m.payload) {
            Ok(resp) => Outcome {
                ok: Some(resp),
                ..Outcome::default()
            },
            Err(_) => {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                Outcome {
                    error: Some(
                        v["error"]["code"]
                            .as_str()
                            .unwrap_or("invalid_reply")
                            .to_string(),
                    ),
                    ..Outcome::default()
                }
            }
        },
        Ok(Err(e)) => Outcome {
            error: Some(format!("nats: {}", e.kind())),
            ..Outcome::default()
        },
        Err(_) => Outcome {
            error: Some("client_timeout".into()),
            ..Outcome::default()
        },
    }
}

/// Prints, every 3 s until aborted, the requests done of `total_requests` (per tenant) and
/// the output tokens per second so far.
fn print_progress(results: Results, total_requests: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let t0 = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let r = results.lock().unwrap();
            let done: usize = r.values().map(Vec::len).sum();
            let toks: u32 = r
                .values()
                .flatten()
                .filter_map(|o| o.ok.as_ref())
                .map(|x| x.usage.completion_tokens)
                .sum();
            let per: Vec<String> = r.iter().map(|(k, v)| format!("{k} {}", v.len())).collect();
            println!(
                "  [{:5.1}s] {done}/{total_requests} requests done ({}), {:.1} output tokens/s",
                t0.elapsed().as_secs_f64(),
                per.join(", "),
                toks as f64 / t0.elapsed().as_secs_f64()
            );
        }
    })
}

/// Prints the tenants' table: requests, tokens, TTFT and TPOT p50/p99 (ms) and errors by code.
fn print_tenants(plans: &[TenantPlan], results: &BTreeMap<&'static str, Vec<Outcome>>) {
    println!("\n## Tenants (measured in this run)\n");
    println!("| tenant | shape | requests | ok | prompt tok | completion tok | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | errors |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for plan in plans {
        let v = results.get(plan.name).cloned().unwrap_or_default();
        let oks: Vec<&GenerateResponse> = v.iter().filter_map(|o| o.ok.as_ref()).collect();
        let ttft: Vec<f64> = oks.iter().map(|r| r.timings.ttft_ms).collect();
        let tpot: Vec<f64> = oks
            .iter()
            .filter(|r| r.usage.completion_tokens > 1)
            .map(|r| {
                (r.timings.total_ms - r.timings.ttft_ms) / (r.usage.completion_tokens - 1) as f64
            })
            .collect();
        let mut errs: BTreeMap<String, usize> = BTreeMap::new();
        for o in &v {
            if let Some(e) = &o.error {
                *errs.entry(e.clone()).or_default() += 1;
            }
        }
        let errs = if errs.is_empty() {
            "-".to_string()
        } else {
            errs.iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            plan.name,
            plan.shape,
            v.len(),
            oks.len(),
            oks.iter().map(|r| r.usage.prompt_tokens).sum::<u32>(),
            oks.iter().map(|r| r.usage.completion_tokens).sum::<u32>(),
            percentile(&ttft, 50.0),
            percentile(&ttft, 99.0),
            percentile(&tpot, 50.0),
            percentile(&tpot, 99.0),
            errs
        );
    }
}

/// Prints the resources over time (up to 17 of the monitor's samples) and the function
/// instances at their peak and at the end.
fn print_resources(m: &Monitor, idle_timeout_ms: u64) {
    let step = (m.samples.len() / 16).max(1);
    for (i, s) in m.samples.iter().enumerate() {
        if i % step != 0 && i + 1 != m.samples.len() {
            continue;
        }
        let g = |r: Role| s.roles.get(&r).copied().unwrap_or_default();
        let (c, w, nats, b) = (
            g(Role::Controller),
            g(Role::Worker),
            g(Role::Nats),
            g(Role::Broker),
        );
        println!(
            "| {:.0} | {} | {} | {:.0} | {} | {} | {:.0} | {} | {:.0} | {} |",
            s.t_s,
            w.processes,
            mb(c.rss_bytes),
            c.cpu_percent,
            mb(w.rss_bytes),
            mb(w.pss_bytes),
            w.cpu_percent,
            mb(nats.rss_bytes),
            nats.cpu_percent,
            mb(b.rss_bytes)
        );
    }
    let peak_workers = m
        .samples
        .iter()
        .map(|s| s.roles.get(&Role::Worker).map(|w| w.processes).unwrap_or(0))
        .max()
        .unwrap_or(0);
    let last_workers = m
        .samples
        .last()
        .and_then(|s| s.roles.get(&Role::Worker))
        .map(|w| w.processes)
        .unwrap_or(0);
    println!("\nfunction instances: peak {peak_workers}, at the end {last_workers} (idle timeout {} ms){}", idle_timeout_ms, if last_workers == 0 { ": scaled to zero" } else { "" });
}

/// Creates each tenant of `plans` (credentials and quota) through `admin` and connects as it
/// to `url`; the clients in the order of `plans`.
async fn connect_tenants(
    plans: &[TenantPlan],
    admin: &faasmoe_broker::TenantAdmin,
    url: &str,
) -> anyhow::Result<Vec<async_nats::Client>> {
    let mut clients = Vec::with_capacity(plans.len());
    for plan in plans {
        let creds = admin.create(plan.name, plan.quota).await?;
        clients.push(
            faasmoe_proto::connection::connect(
                url,
                Some(&creds.user),
                Some(&creds.password),
                plan.name,
            )
            .await?,
        );
    }
    Ok(clients)
}

/// Every request of the tenants of `plans` that `include` selects, each on its own task that
/// waits for the request's arrival time (seconds after `start`), sends it with the tenant's
/// client (`clients[i]` for `plans[i]`) and records its [`Outcome`] under its tenant. The
/// prompts and seeds depend only on the tenant and the request's index, so a replay sends
/// the same requests.
#[allow(clippy::too_many_arguments)]
fn spawn_requests(
    plans: &[TenantPlan],
    clients: &[async_nats::Client],
    include: impl Fn(&TenantPlan) -> bool,
    corpus: &[u32],
    tokenizer: &QwenTokenizer,
    results: &Results,
    start: tokio::time::Instant,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for (ti, (plan, client)) in plans.iter().zip(clients).enumerate() {
        if !include(plan) {
            continue;
        }
        let subject = faasmoe_proto::subject::generate(plan.name)?;
        for (i, row) in plan.rows.iter().copied().enumerate() {
            let prompt = workload::prompt_text(
                corpus,
                (ti * 97 + i * 31) % corpus.len(),
                row.context_tokens as usize,
                |ids| tokenizer.decode(ids).unwrap_or_default(),
            );
            let body = serde_json::json!({"prompt": prompt, "max_tokens": row.generated_tokens, "temperature": 0.7, "top_p": 0.9, "seed": i});
            let (client, subject, results, name) =
                (client.clone(), subject.clone(), results.clone(), plan.name);
            tasks.push(tokio::spawn(async move {
                workload::sleep_until(start, row.at_s).await;
                let sent_s = start.elapsed().as_secs_f64();
                let outcome = Outcome {
                    index: i,
                    sent_s,
                    ..send(&client, subject, body).await
                };
                results
                    .lock()
                    .unwrap()
                    .entry(name)
                    .or_default()
                    .push(outcome);
            }));
        }
    }
    Ok(tasks)
}

/// Sends the requests of `plans` that `include` selects at their offsets from now, with
/// progress, and waits for all of them; their outcomes and the start.
#[allow(clippy::too_many_arguments)]
async fn replay(
    plans: &[TenantPlan],
    clients: &[async_nats::Client],
    include: impl Fn(&TenantPlan) -> bool,
    corpus: &[u32],
    tokenizer: &QwenTokenizer,
) -> anyhow::Result<(Results, tokio::time::Instant)> {
    let results: Results = Default::default();
    let start = tokio::time::Instant::now();
    let tasks = spawn_requests(plans, clients, include, corpus, tokenizer, &results, start)?;
    let progress = print_progress(results.clone(), tasks.len());
    for t in tasks {
        t.await?;
    }
    progress.abort();
    Ok((results, start))
}

/// Prints the TTFT of the requests that waited on a cold start (a function instance became ready between its arrival and its first token, [`ready_between`]) next
/// to the TTFT of the same requests in the warm replay, per tenant and over all, and checks
/// the cold-start criterion of the project: cold TTFT p50 ≤ 2 × (p99 single-function cold
/// start) + their warm TTFT p50.
fn print_cold_and_warm(
    plans: &[TenantPlan],
    cold_run: (&BTreeMap<&'static str, Vec<Outcome>>, tokio::time::Instant),
    warm_run: Option<(&BTreeMap<&'static str, Vec<Outcome>>, tokio::time::Instant)>,
    cold: &FunctionEvents,
) {
    println!("\n## Cold and warm TTFT\n");
    let Some((warm, warm_start)) = warm_run else {
        println!("(no warm replay: --no-warm-replay)");
        return;
    };
    let ttft_of = |o: &Outcome| o.ok.as_ref().map(|r| (o.sent_s, r.timings.ttft_ms));
    println!("A request waited on a cold start when a function instance became ready between its arrival and its first token. The warm replay sends the same requests (same prompts, seeds and offsets) right after the workload, before the functions scale to zero; tenants with a token budget are not replayed.\n");
    println!("| tenant | requests | waited on a cold start | their TTFT p50 ms | the same requests warm: TTFT p50 ms | replayed requests that found a cold start |");
    println!("|---|---|---|---|---|---|");
    let (mut all_cold, mut all_warm) = (Vec::new(), Vec::new());
    let ready_cold = cold.ready_since(cold_run.1);
    for plan in plans {
        let (Some(first), Some(again)) = (cold_run.0.get(plan.name), warm.get(plan.name)) else {
            continue;
        };
        let again: BTreeMap<usize, (f64, f64)> = again
            .iter()
            .filter_map(|o| ttft_of(o).map(|t| (o.index, t)))
            .collect();
        let ready_warm = cold.ready_since(warm_start);
        let replay_cold = again
            .values()
            .filter(|&&(sent, ttft)| ready_between(&ready_warm, sent, sent + ttft / 1e3))
            .count();
        let (mut c, mut w) = (Vec::new(), Vec::new());
        for o in first {
            let Some((sent, ttft)) = ttft_of(o) else {
                continue;
            };
            if !ready_between(&ready_cold, sent, sent + ttft / 1e3) {
                continue;
            }
            if let Some(&(_, warm_ttft)) = again.get(&o.index) {
                c.push(ttft);
                w.push(warm_ttft);
            }
        }
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {} |",
            plan.name,
            first.len(),
            c.len(),
            percentile(&c, 50.0),
            percentile(&w, 50.0),
            replay_cold
        );
        all_cold.extend(c);
        all_warm.extend(w);
    }
    let starts = cold.cold_starts();
    let (c50, w50, s99) = (
        percentile(&all_cold, 50.0),
        percentile(&all_warm, 50.0),
        percentile(&starts, 99.0),
    );
    let bound = 2.0 * s99 + w50;
    if all_cold.is_empty() {
        println!("\nno replayed request waited on a cold start");
        return;
    }
    println!(
        "\n{} requests waited on a cold start: TTFT p50 {c50:.0} ms; the same requests warm {w50:.0} ms; single-function cold start p99 {s99:.0} ms.\ncriterion TTFT(cold) p50 ≤ 2 × cold start p99 + TTFT(warm) p50: {c50:.0} ≤ {bound:.0} ms — {}",
        all_cold.len(),
        if c50 <= bound { "met" } else { "NOT met" }
    );
}

/// Prints the demo's report, measured in this run: the tenants' table, the cold starts
/// (spawn → ready, ms), the resources over time and each tenant's usage in the quota store.
async fn print_report(
    plans: &[TenantPlan],
    cold_run: (&Results, tokio::time::Instant),
    warm_run: Option<&(Results, tokio::time::Instant)>,
    cold: &FunctionEvents,
    monitor: &Mutex<Monitor>,
    admin: &faasmoe_broker::TenantAdmin,
    idle_timeout_ms: u64,
) {
    let results = cold_run.0.lock().unwrap().clone();
    print_tenants(plans, &results);
    let warm = warm_run.map(|(r, start)| (r.lock().unwrap().clone(), *start));
    print_cold_and_warm(
        plans,
        (&results, cold_run.1),
        warm.as_ref().map(|(r, start)| (r, *start)),
        cold,
    );
    let cold = cold.cold_starts();
    println!("\n## Functions\n");
    println!(
        "cold starts: {} (spawn → ready p50 {:.0} ms, p99 {:.0} ms)",
        cold.len(),
        percentile(&cold, 50.0),
        percentile(&cold, 99.0)
    );
    println!("\n## Resources over time (from /proc; CPU in % of one core)\n");
    println!("| t s | instances | controller RSS MB | controller CPU % | workers RSS MB | workers PSS MB | workers CPU % | nats RSS MB | nats CPU % | broker RSS MB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    print_resources(&monitor.lock().unwrap(), idle_timeout_ms);
    println!("\nusage in the quota store:");
    for plan in plans {
        if let Ok(u) = admin.store().usage(plan.name).await {
            println!(
                "  {}: {} tokens charged, {} in flight",
                plan.name, u.total_tokens, u.in_flight
            );
        }
    }
}

/// Samples the processes of `monitor` once a second until aborted.
fn sample_every_second(monitor: Arc<Mutex<Monitor>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            monitor.lock().unwrap().sample();
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    })
}
