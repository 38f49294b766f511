use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use faasmoe_broker::{
    ActivationConfig, Activator, Deployment, EmbeddedServer, InternalCredentials,
    LocalProcessBackend, Quota, RuntimeConfig, ServerOptions, TenantAdmin, TenantStore,
    TenantStoreConfig, TenantsConf,
};
use faasmoe_proto::connection::{self, NatsArgs};
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    name = "faasmoe-broker",
    version,
    about = "The faasmoe FaaS platform on NATS: activates expert functions on demand and administers tenants"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve activations of one model's expert functions (starts nats-server unless --nats-url is given).
    Run(RunArgs),
    /// Administer tenants and their quotas (JetStream KV bucket `faasmoe_tenants`).
    #[command(subcommand)]
    Tenant(TenantCommand),
}

/// The broker's NATS flags: unlike the other processes' ([`NatsArgs`]), no URL means "start
/// an embedded server" for `run`, and the user defaults to `broker`.
#[derive(Debug, Args)]
struct BrokerNatsArgs {
    /// NATS server URL. For `run`: without it, an embedded nats-server is started.
    #[arg(long, env = "NATS_URL")]
    nats_url: Option<String>,
    /// NATS user.
    #[arg(long, env = "NATS_USER", default_value = "broker")]
    nats_user: String,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
}

impl BrokerNatsArgs {
    /// Connects to `url` as the broker user when a password is given, else anonymously.
    async fn connect(&self, url: &str) -> anyhow::Result<async_nats::Client> {
        let user = self.nats_password.as_ref().map(|_| self.nats_user.as_str());
        Ok(connection::connect(url, user, self.nats_password.as_deref(), "faasmoe-broker").await?)
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    nats: BrokerNatsArgs,
    /// Deployment file (JSON, fields of `Deployment`); flags below override it.
    #[arg(long)]
    deployment: Option<PathBuf>,
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, env = "FAASMOE_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Model id used in subjects (default: the directory name, sanitised).
    #[arg(long)]
    model_id: Option<String>,
    /// Experts per function.
    #[arg(long)]
    granularity: Option<u32>,
    /// Workers exit after this many ms without a request (0: never).
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// Most instances alive per function.
    #[arg(long = "max-instances")]
    max_instances: Option<u32>,
    /// Instances per function started at startup (pre-warming).
    #[arg(long = "min-instances")]
    min_instances: Option<u32>,
    /// Spawn → ready limit per instance, ms.
    #[arg(long)]
    ready_timeout_ms: Option<u64>,
    /// The faasmoe-expert-worker binary (default: next to this one, else PATH).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// NATS URL given to workers (default: the broker's).
    #[arg(long)]
    worker_nats_url: Option<String>,
    /// NATS user of the workers.
    #[arg(long, default_value = "worker")]
    worker_nats_user: String,
    /// NATS password of the workers.
    #[arg(long, env = "FAASMOE_WORKER_PASSWORD", hide_env_values = true)]
    worker_nats_password: Option<String>,
    /// Write each worker's log to <DIR>/<function>-<instance>.log (default: the broker's stderr).
    #[arg(long)]
    worker_log_dir: Option<PathBuf>,
    /// Embedded server: configuration file (default ./nats.conf, else the workspace's).
    #[arg(long)]
    nats_config: Option<PathBuf>,
    /// Embedded server: runtime directory (rendered config with the tenant users, tenants.conf,
    /// server.json); give it to `tenant create/delete --conf-dir` so that they reload this
    /// server. Default: a temp dir, removed at exit.
    #[arg(long, env = "FAASMOE_RUNTIME_DIR")]
    runtime_dir: Option<PathBuf>,
    /// Embedded server: JetStream store directory (default: a temp dir, removed at exit).
    #[arg(long, env = "FAASMOE_JS_DIR")]
    js_dir: Option<PathBuf>,
    /// Embedded server: listen address.
    #[arg(long, default_value = "127.0.0.1")]
    listen: String,
    /// Embedded server: client port (default: the config's).
    #[arg(long)]
    port: Option<u16>,
    /// Embedded server: monitoring port (default: the config's).
    #[arg(long)]
    monitor_port: Option<u16>,
    /// Replicas of the tenant KV bucket.
    #[arg(long, default_value_t = 1)]
    tenant_replicas: usize,
    /// Serve Prometheus metrics at `http://<ADDR>/metrics` (e.g. `127.0.0.1:9102`; port 0
    /// picks a free one, logged): instances by function and state, cold starts and their
    /// spawn → READY histogram, and the workers' requests, batches, rows and busy time
    /// (asked of them over `$SRV.STATS` at each scrape). Off when unset.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
struct StoreArgs {
    #[command(flatten)]
    nats: BrokerNatsArgs,
    /// KV bucket.
    #[arg(long, default_value = faasmoe_broker::tenants::BUCKET)]
    bucket: String,
    /// Replicas when the bucket is created.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Keep NATS user entries in <DIR>/tenants.conf (added on create, removed on delete).
    /// When DIR is the runtime dir of a broker's embedded server (`run --runtime-dir`, it has
    /// a server.json), the server's configuration is re-rendered and reloaded too, so the
    /// credentials work at once.
    #[arg(long, env = "FAASMOE_TENANTS_CONF_DIR")]
    conf_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl StoreArgs {
    /// Tenant administration that reloads the server, when `--conf-dir` is a runtime dir.
    fn admin(&self, store: &TenantStore) -> anyhow::Result<Option<TenantAdmin>> {
        match &self.conf_dir {
            Some(dir)
                if dir
                    .join(faasmoe_broker::server_config::STATE_FILE)
                    .is_file() =>
            {
                let (runtime, control) = RuntimeConfig::from_state_dir(dir)?;
                Ok(Some(TenantAdmin::new(store.clone(), runtime, control)))
            }
            _ => Ok(None),
        }
    }

    async fn open(&self) -> anyhow::Result<TenantStore> {
        let url = self
            .nats
            .nats_url
            .clone()
            .unwrap_or_else(|| connection::DEFAULT_NATS_URL.into());
        let client = self.nats.connect(&url).await?;
        Ok(TenantStore::open(
            client,
            TenantStoreConfig {
                bucket: self.bucket.clone(),
                replicas: self.replicas,
                ..Default::default()
            },
        )
        .await?)
    }
}

/// A limit: a number, or `none` for unlimited.
#[derive(Debug, Clone, Copy)]
struct Limit(Option<u64>);

fn parse_limit(s: &str) -> Result<Limit, String> {
    if s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("unlimited") {
        Ok(Limit(None))
    } else {
        s.parse()
            .map(|n| Limit(Some(n)))
            .map_err(|e| format!("`{s}`: {e} (a number or `none`)"))
    }
}

#[derive(Debug, Args)]
struct QuotaArgs {
    /// Requests in flight at once (number or `none`).
    #[arg(long, value_parser = parse_limit)]
    max_concurrent: Option<Limit>,
    /// Tokens per minute (number or `none`).
    #[arg(long, value_parser = parse_limit)]
    tokens_per_minute: Option<Limit>,
    /// Lifetime token budget (number or `none`).
    #[arg(long, value_parser = parse_limit)]
    total_tokens: Option<Limit>,
}

impl QuotaArgs {
    fn apply(&self, mut q: Quota) -> Quota {
        if let Some(Limit(v)) = self.max_concurrent {
            q.max_concurrent = v.map(|v| v.min(u32::MAX as u64) as u32);
        }
        if let Some(Limit(v)) = self.tokens_per_minute {
            q.tokens_per_minute = v;
        }
        if let Some(Limit(v)) = self.total_tokens {
            q.total_tokens = v;
        }
        q
    }
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant; prints its NATS credentials and the nats.conf `users` entry once.
    Create {
        /// Tenant name ([A-Za-z0-9_-]).
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List tenants with quota and usage.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Change a tenant's quota (limits not given are kept).
    Quota {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show a tenant's usage.
    Usage {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete a tenant.
    Delete {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn limit(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

async fn tenant(cmd: TenantCommand) -> anyhow::Result<()> {
    match cmd {
        TenantCommand::Create { name, quota, store } => {
            let s = store.open().await?;
            let creds = match store.admin(&s)? {
                Some(admin) => {
                    let creds = admin.create(&name, quota.apply(Quota::default())).await?;
                    eprintln!(
                        "added to {} and reloaded the server",
                        admin.runtime().path().display()
                    );
                    creds
                }
                None => {
                    let creds = s.create(&name, quota.apply(Quota::default())).await?;
                    if let Some(dir) = &store.conf_dir {
                        let conf = TenantsConf::in_dir(dir);
                        conf.upsert(&creds)?;
                        eprintln!(
                            "added to {} (render it into the server's users and reload the server)",
                            conf.path().display()
                        );
                    }
                    creds
                }
            };
            if store.json {
                println!(
                    "{}",
                    serde_json::json!({"credentials": creds, "inbox_prefix": creds.inbox_prefix(), "nats_user_entry": creds.nats_user_entry()})
                );
            } else {
                println!(
                    "tenant:       {}\nuser:         {}\npassword:     {}   (shown once: only its bcrypt hash is kept)\napi key:      {}   (HTTP gateway: Authorization: Bearer <key>, OPENAI_API_KEY; shown once, only its bcrypt hash is kept)\ninbox prefix: {}   (set it in the client: nats --inbox-prefix, nats-py inbox_prefix=, nats.go CustomInboxPrefix)\n\nnats.conf users entry:\n{}",
                    creds.tenant,
                    creds.user,
                    creds.password,
                    creds.api_key,
                    creds.inbox_prefix(),
                    creds.nats_user_entry()
                );
            }
        }
        TenantCommand::List { store } => {
            let all = store.open().await?.list().await?;
            if store.json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "{:<20} {:>8} {:>12} {:>14} {:>9} {:>14}",
                    "TENANT", "MAX_CONC", "TOK/MIN", "TOTAL_BUDGET", "IN_FLIGHT", "TOTAL_USED"
                );
                for r in all {
                    println!(
                        "{:<20} {:>8} {:>12} {:>14} {:>9} {:>14}",
                        r.name,
                        limit(r.quota.max_concurrent.map(u64::from)),
                        limit(r.quota.tokens_per_minute),
                        limit(r.quota.total_tokens),
                        r.usage.in_flight,
                        r.usage.total_tokens
                    );
                }
            }
        }
        TenantCommand::Quota { name, quota, store } => {
            let s = store.open().await?;
            let current = s.get(&name).await?.quota;
            let r = s.set_quota(&name, quota.apply(current)).await?;
            println!("{}", serde_json::to_string_pretty(&r.quota)?);
        }
        TenantCommand::Usage { name, store } => {
            let u = store.open().await?.usage(&name).await?;
            println!("{}", serde_json::to_string_pretty(&u)?);
        }
        TenantCommand::Delete { name, store } => {
            let s = store.open().await?;
            match store.admin(&s)? {
                Some(admin) => admin.delete(&name).await?,
                None => {
                    s.delete(&name).await?;
                    if let Some(dir) = &store.conf_dir {
                        TenantsConf::in_dir(dir).remove(&name)?;
                    }
                }
            }
            eprintln!("deleted tenant {name}");
        }
    }
    Ok(())
}

async fn run(mut args: RunArgs) -> anyhow::Result<()> {
    let mut d = match &args.deployment {
        Some(f) => Deployment::from_file(f)?,
        None => Deployment::new(
            args.model_dir
                .clone()
                .context("give --model-dir or --deployment")?,
        ),
    };
    if let Some(m) = &args.model_dir {
        d.model_dir = m.clone();
    }
    macro_rules! set {
        ($($field:ident <- $arg:expr),*) => { $( if let Some(v) = $arg.clone() { d.$field = v; } )* };
    }
    set!(granularity <- args.granularity, idle_timeout_ms <- args.idle_timeout_ms, max_instances_per_function <- args.max_instances,
         min_instances <- args.min_instances, ready_timeout_ms <- args.ready_timeout_ms);
    if args.model_id.is_some() {
        d.model_id = args.model_id.clone();
    }
    if args.worker_bin.is_some() {
        d.worker_bin = args.worker_bin.clone();
    }
    if args.worker_nats_url.is_some() {
        d.worker_nats_url = args.worker_nats_url.clone();
    }
    if d.worker_user.is_none() {
        d.worker_user = Some(args.worker_nats_user.clone());
    }
    if args.worker_nats_password.is_some() {
        d.worker_password = args.worker_nats_password.clone();
    }
    d.validate()?;
    let layout = d.layout()?;
    let model_id = d.model_id();

    let server = match &args.nats.nats_url {
        Some(_) => None,
        None => {
            // This deployment's internal passwords: the ones given, else generated now.
            let given = [
                args.nats.nats_password.clone(),
                d.worker_password.clone(),
                std::env::var("FAASMOE_CONTROLLER_PASSWORD").ok(),
            ];
            let generated = InternalCredentials::generate();
            let creds = InternalCredentials {
                broker: given[0].clone().unwrap_or(generated.broker),
                worker: given[1].clone().unwrap_or(generated.worker),
                controller: given[2].clone().unwrap_or(generated.controller),
                gateway: std::env::var("FAASMOE_GATEWAY_PASSWORD").unwrap_or(generated.gateway),
            };
            if given.iter().any(Option::is_none) {
                eprintln!("generated internal passwords for this deployment (shown once; the server keeps bcrypt hashes):");
                for ((user, pw), given) in [
                    ("broker", &creds.broker),
                    ("worker", &creds.worker),
                    ("controller", &creds.controller),
                ]
                .into_iter()
                .zip(&given)
                {
                    if given.is_none() {
                        eprintln!("  {user:<10} {pw}");
                    }
                }
            }
            args.nats.nats_password = Some(creds.broker.clone());
            d.worker_password = Some(creds.worker.clone());
            let opts = ServerOptions {
                internal_credentials: Some(creds),
                config: args
                    .nats_config
                    .clone()
                    .unwrap_or_else(faasmoe_broker::server::default_config),
                runtime_dir: args.runtime_dir.clone(),
                store_dir: args.js_dir.clone(),
                addr: args.listen.clone(),
                port: args.port,
                monitor_port: args.monitor_port,
                ..Default::default()
            };
            let s = tokio::task::spawn_blocking(move || EmbeddedServer::start(opts)).await??;
            Some(s)
        }
    };
    let url = args
        .nats
        .nats_url
        .clone()
        .unwrap_or_else(|| server.as_ref().expect("embedded").url().to_string());
    let client = args.nats.connect(&url).await?;
    // Provision JetStream: the tenant bucket.
    TenantStore::open(
        client.clone(),
        TenantStoreConfig {
            replicas: args.tenant_replicas,
            ..Default::default()
        },
    )
    .await?;
    // The deployment registry: controllers learn this layout from it.
    let record = faasmoe_proto::deployment::DeploymentRecord::new(&model_id, &layout);
    faasmoe_proto::deployment::register(&client, &record, args.tenant_replicas)
        .await
        .context("registering the deployment")?;
    if d.worker_password.is_none() {
        tracing::warn!("no worker password (--worker-nats-password / FAASMOE_WORKER_PASSWORD): workers connect without credentials");
    }
    let backend = LocalProcessBackend {
        worker_bin: d.worker_bin(),
        nats: NatsArgs {
            url: d.worker_nats_url.clone().unwrap_or_else(|| url.clone()),
            user: d.worker_password.as_ref().and(d.worker_user.clone()),
            password: d.worker_password.clone(),
        },
        model_dir: d.model_dir.clone(),
        model_id: model_id.clone(),
        idle_timeout_ms: d.idle_timeout_ms,
        log_dir: args.worker_log_dir.clone(),
        env: Vec::new(),
    };
    info!(%model_id, functions = layout.functions.len(), granularity = layout.granularity, worker_bin = %backend.worker_bin.display(), "deployment");
    let cfg = ActivationConfig {
        max_instances_per_function: d.max_instances_per_function,
        min_instances: d.min_instances,
        ready_timeout: Duration::from_millis(d.ready_timeout_ms),
        ..ActivationConfig::new(model_id, layout)
    };
    let activator = Activator::start(client.clone(), cfg, Arc::new(backend)).await?;
    if let Some(addr) = args.metrics_listen {
        let bm = faasmoe_broker::metrics::BrokerMetrics::new(activator.clone(), client.clone());
        let refresh: faasmoe_telemetry::metrics::Refresh = Arc::new(move || {
            let bm = bm.clone();
            Box::pin(async move { bm.refresh().await })
        });
        let local = faasmoe_telemetry::metrics::serve(addr, Some(refresh))
            .await
            .with_context(|| format!("serving metrics on {addr} (--metrics-listen)"))?;
        eprintln!("metrics on http://{local}/metrics");
    }
    let warm = activator.clone();
    tokio::spawn(async move {
        let results = warm.prewarm().await;
        if !results.is_empty() {
            info!(instances = results.len(), "pre-warming done");
        }
    });
    println!("READY faasmoe-broker {url}");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("shutting down: stopping instances");
    activator.shutdown(Duration::from_secs(10)).await;
    if let Err(e) = faasmoe_proto::deployment::unregister(&client, &record.model_id).await {
        tracing::warn!(error = %e, "removing the deployment record");
    }
    let _ = client.flush().await;
    drop(server);
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Run(a) => run(a).await,
        Command::Tenant(t) => tenant(t).await,
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
