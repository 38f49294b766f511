//! `faasmoe`: run the stack, send generate requests, administer tenants, make checkpoints,
//! run the demo.

mod bench;
mod demo;
mod function_events;
mod monitor;
mod quota;
mod stack;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use faasmoe_broker::{TenantAdmin, TenantStore};
use faasmoe_controller::quota::{QuotaGate, Unlimited};
use faasmoe_controller::service::ControllerSettings;
use faasmoe_proto::generate::{StreamMessage, CONTENT_TYPE, JSON};
use futures::StreamExt;

#[derive(Parser)]
#[command(
    name = "faasmoe",
    version,
    about = "Serve Mixture-of-Experts models with the routed experts as scale-to-zero functions over NATS",
    long_about = "faasmoe splits a Qwen2-MoE model: a controller keeps attention, router, shared expert and LM head; \
                  the routed experts run as stateless functions (expert worker processes) that a broker starts on demand \
                  and that exit when idle. Tenants call the controller with a NATS request."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the stack (nats-server, broker, controller) and stay up until Ctrl-C.
    Up(stack::StackArgs),
    /// Run a controller (the control plane service) against a running NATS server.
    Controller {
        #[command(flatten)]
        settings: ControllerSettings,
        /// Admit every request (no JetStream quotas).
        #[arg(long)]
        no_quota: bool,
    },
    /// Send a generate request as a tenant and stream the answer to the terminal.
    Generate(GenerateArgs),
    /// Administer tenants and quotas (runs `faasmoe-broker tenant …`; see its --help).
    #[command(disable_help_flag = true)]
    Tenant {
        /// Arguments of `faasmoe-broker tenant` (create, list, quota, usage, delete).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Checkpoint tools.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Run the main job: a multi-tenant workload from real traces against the whole stack,
    /// with a per-tenant and resource report.
    Demo(demo::DemoArgs),
    /// Benchmark every deployment mode (baseline, shared-baseline, faasmoe-shared,
    /// faasmoe-private, local-split) on the same workload; writes results/bench-<time>/.
    Bench(bench::BenchArgs),
    /// Measure chunked prefill: the TPOT of running decodes while a long prompt prefills,
    /// and that prompt's TTFT, for several token budgets per step (in-process, local-split).
    BenchPrefill(bench::prefill::PrefillArgs),
    /// Serve tenants with candle-transformers' monolithic model (the bench's baseline).
    #[command(hide = true)]
    ServeBaseline(bench::ServeBaselineArgs),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Write a random-weight checkpoint in the exact Hugging Face hub layout.
    Init {
        #[command(flatten)]
        args: faasmoe_model::random_checkpoint::InitArgs,
        /// Build tokenizer.json from Qwen's BPE ranks (`qwen.tiktoken`, see scripts/fetch-qwen-tiktoken).
        #[arg(long)]
        tiktoken: Option<PathBuf>,
    },
    /// Load only the given routed experts of one MoE layer, as an expert function does, and
    /// print this process's resident memory as JSON: `experts`, `rss_before_bytes`,
    /// `rss_after_bytes` (before and after loading) and `weight_bytes` (the experts' tensors
    /// in their stored dtype).
    ExpertRss {
        /// Checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// MoE layer index.
        #[arg(long)]
        layer: usize,
        /// Experts as a range `A..B` (end exclusive) or a list `1,5,9`.
        #[arg(long, value_parser = parse_experts)]
        experts: ExpertList,
    },
}

/// Expert indices given on the command line.
#[derive(Debug, Clone)]
struct ExpertList(Vec<usize>);

/// Parses `A..B` (end exclusive) or `1,5,9`.
fn parse_experts(s: &str) -> Result<ExpertList, String> {
    let num = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|e| format!("{x:?} is not an expert index: {e}"))
    };
    let v: Vec<usize> = match s.split_once("..") {
        Some((a, b)) => (num(a)?..num(b)?).collect(),
        None => s.split(',').map(num).collect::<Result<_, _>>()?,
    };
    if v.is_empty() {
        return Err(format!("{s:?} names no expert"));
    }
    Ok(ExpertList(v))
}

/// `faasmoe model expert-rss`: see [`ModelCmd::ExpertRss`].
fn expert_rss(model: &std::path::Path, layer: usize, experts: ExpertList) -> anyhow::Result<()> {
    use faasmoe_model::experts::{ExpertId, ExpertSelection};
    let rss = || -> anyhow::Result<u64> {
        Ok(monitor::read_process(std::process::id() as i32)
            .context("reading this process's /proc entry")?
            .rss_bytes)
    };
    let before = rss()?;
    let mut ckpt = faasmoe_model::Checkpoint::open(model, candle_core::DType::F32)?;
    let sel = ExpertSelection(
        experts
            .0
            .into_iter()
            .map(|expert| ExpertId { layer, expert })
            .collect(),
    );
    let set = faasmoe_model::ExpertSet::load(&mut ckpt, &sel)?;
    drop(ckpt);
    let after = rss()?;
    println!(
        "{}",
        serde_json::json!({
            "experts": sel.0.len(),
            "rss_before_bytes": before,
            "rss_after_bytes": after,
            "weight_bytes": set.weight_bytes(),
        })
    );
    Ok(())
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Tenant name (the request goes to faasmoe.v1.generate.<tenant>).
    #[arg(long)]
    tenant: String,
    /// NATS user (default: tenant-<tenant>).
    #[arg(long, env = "NATS_USER")]
    user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Most new tokens.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// The prompt.
    prompt: String,
}

async fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    // The user goes with a password only: without one, connect anonymously (a server
    // without authorization).
    let user = a.password.as_ref().map(|_| {
        a.user
            .clone()
            .unwrap_or_else(|| format!("tenant-{}", a.tenant))
    });
    let client = faasmoe_proto::connection::connect(
        &a.nats_url,
        user.as_deref(),
        a.password.as_deref(),
        "faasmoe-generate",
    )
    .await?;
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    let body = serde_json::json!({"prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": a.temperature, "stream": true});
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(CONTENT_TYPE, JSON);
    client
        .publish_with_reply_and_headers(
            faasmoe_proto::subject::generate(&a.tenant)?,
            inbox,
            headers,
            body.to_string().into(),
        )
        .await?;
    use std::io::Write;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(300), sub.next())
            .await
            .context("no answer within 300 s")?
            .context("subscription closed")?;
        if msg.payload.is_empty() {
            anyhow::bail!("no controller answered (no responders)");
        }
        let m: serde_json::Value = serde_json::from_slice(&msg.payload)?;
        if m.get("error").is_some() {
            anyhow::bail!("{}: {}", m["error"]["code"], m["error"]["message"]);
        }
        match serde_json::from_value::<StreamMessage>(m)? {
            StreamMessage::Chunk(c) => {
                print!("{}", c.text);
                std::io::stdout().flush()?;
            }
            StreamMessage::Done(d) => {
                println!();
                eprintln!(
                    "[{:?}; {} prompt + {} completion tokens; TTFT {:.0} ms, total {:.0} ms]",
                    d.finish_reason,
                    d.usage.prompt_tokens,
                    d.usage.completion_tokens,
                    d.timings.ttft_ms,
                    d.timings.total_ms
                );
                return Ok(());
            }
            StreamMessage::Error(e) => anyhow::bail!("{}: {}", e.code, e.message),
        }
    }
}

/// The tenant `faasmoe up` creates (or recreates) for trying the stack.
const DEV_TENANT: &str = "dev";

/// Tenant administration for a stack started by this process (credentials take effect at once).
pub(crate) async fn tenant_admin(stack: &stack::Stack) -> anyhow::Result<TenantAdmin> {
    let client = stack.connect_admin().await?;
    let store = TenantStore::open_default(client).await?;
    Ok(stack.server.tenant_admin(store))
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Up(a) => {
            let stack = stack::Stack::start(&a).await?;
            let url = stack.server.url();
            println!(
                "faasmoe is up: NATS at {url}, model id {}. Ctrl-C stops.",
                stack.model_id
            );
            let admin = tenant_admin(&stack).await?;
            let dev = match admin.create(DEV_TENANT, Default::default()).await {
                Err(faasmoe_broker::TenantError::AlreadyExists(_)) => {
                    // Only hashes are kept: a new key is the only way to print one.
                    admin.delete(DEV_TENANT).await?;
                    admin.create(DEV_TENANT, Default::default()).await?
                }
                r => r?,
            };
            let http = &stack.http_url;
            println!("development tenant `{DEV_TENANT}` (unlimited quota; key shown once, stored as a bcrypt hash):");
            println!("  export OPENAI_BASE_URL={http}/v1");
            println!("  export OPENAI_API_KEY={}", dev.api_key);
            println!("  curl {http}/v1/chat/completions -H \"Authorization: Bearer $OPENAI_API_KEY\" -H 'Content-Type: application/json' -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 16}}'", stack.model_id);
            println!("  NATS_PASSWORD={} faasmoe generate --nats-url {url} --tenant {DEV_TENANT} \"Hello\"", dev.password);
            println!("Prometheus metrics: {http}/metrics (gateway), {} (controller), {} (broker, with the workers' counters)", stack.controller_metrics_url, stack.broker_metrics_url);
            println!("this deployment's administrator password (user broker; generated now, shown only here, stored nowhere):");
            println!("  export NATS_PASSWORD={}", stack.credentials.broker);
            println!("create a tenant:  faasmoe tenant create alice --total-tokens 100000 --nats-url {url} --conf-dir {}", a.log_dir.join("nats-runtime").display());
            println!("then ask it:      NATS_PASSWORD=<the tenant's printed password> faasmoe generate --nats-url {url} --tenant alice \"Hello\"");
            println!("(any NATS client works as tenant alice: user tenant-alice, inbox prefix _INBOX.tenant-alice)");
            tokio::signal::ctrl_c().await?;
            stack.stop().await;
            Ok(())
        }
        Cmd::Controller { settings, no_quota } => {
            let quota: Arc<dyn QuotaGate> = if no_quota {
                Arc::new(Unlimited)
            } else {
                let client = settings.nats.connect("faasmoe-controller-quota").await?;
                Arc::new(quota::JetStreamQuota(
                    TenantStore::open_default(client).await?,
                ))
            };
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = faasmoe_controller::service::run(settings, quota) => r,
                _ = term.recv() => Ok(()),
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        }
        Cmd::Generate(a) => generate(a).await,
        Cmd::Tenant { args } => {
            let exe = std::env::current_exe()?.with_file_name("faasmoe-broker");
            let status = tokio::process::Command::new(&exe)
                .arg("tenant")
                .args(&args)
                .status()
                .await
                .with_context(|| format!("running {}", exe.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Model(ModelCmd::Init { args, tiktoken }) => {
            faasmoe_model::random_checkpoint::init(&args)?;
            if let Some(t) = tiktoken {
                let tok = faasmoe_controller::tokenizer::QwenTokenizer::from_tiktoken(&t)?;
                tok.save(args.out.join("tokenizer.json"))?;
                eprintln!("wrote tokenizer.json from {}", t.display());
            }
            Ok(())
        }
        Cmd::Model(ModelCmd::ExpertRss {
            model,
            layer,
            experts,
        }) => expert_rss(&model, layer, experts),
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Bench(a) => bench::run(a).await,
        Cmd::BenchPrefill(a) => bench::prefill::run(a).await,
        Cmd::ServeBaseline(a) => bench::serve_baseline(a).await,
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let _telemetry = faasmoe_telemetry::init("faasmoe");
    match main_inner(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
