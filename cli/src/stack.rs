//! Starting the whole stack: nats-server with `nats.conf`, the broker, a controller, the
//! OpenAI-compatible HTTP gateway.
//! Expert functions start on demand (the broker spawns them).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use faasmoe_broker::{EmbeddedServer, InternalCredentials, ServerOptions};
use tokio::process::{Child, Command};
use tracing::info;

/// How to start the stack.
#[derive(Debug, Clone, clap::Args)]
pub struct StackArgs {
    /// Checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Experts per function.
    #[arg(long, default_value_t = 20)]
    pub granularity: u32,
    /// Workers exit after this many ms without a request.
    #[arg(long, default_value_t = 10_000)]
    pub idle_timeout_ms: u64,
    /// Most instances per function.
    #[arg(long, default_value_t = 2)]
    pub max_instances: u32,
    /// NATS client port (default: a free one).
    #[arg(long)]
    pub port: Option<u16>,
    /// nats-server configuration.
    #[arg(long)]
    pub nats_config: Option<PathBuf>,
    /// HTTP port of the OpenAI-compatible gateway (default: 8000, else a free one).
    #[arg(long, env = "FAASMOE_GATEWAY_PORT")]
    pub http_port: Option<u16>,
    /// Port of the controller's Prometheus `/metrics` (default: a free one).
    #[arg(long)]
    pub controller_metrics_port: Option<u16>,
    /// Port of the broker's Prometheus `/metrics`, which also reports the workers' counters
    /// (default: a free one).
    #[arg(long)]
    pub broker_metrics_port: Option<u16>,
    /// Where logs of the broker, controller and workers go.
    #[arg(long, default_value = "demo-data/logs")]
    pub log_dir: PathBuf,
}

/// The running stack; stops everything when dropped.
pub struct Stack {
    /// nats-server.
    pub server: EmbeddedServer,
    /// The broker process.
    pub broker: Child,
    /// The controller process.
    pub controller: Child,
    /// The HTTP gateway process.
    pub gateway: Child,
    /// The gateway's base URL (`http://127.0.0.1:<port>`).
    pub http_url: String,
    /// Model id in subjects.
    pub model_id: String,
    /// The controller's metrics URL (`http://127.0.0.1:<port>/metrics`).
    pub controller_metrics_url: String,
    /// The broker's metrics URL, with the workers' counters.
    pub broker_metrics_url: String,
    /// The internal users' passwords generated for this deployment (in memory only; the
    /// server's configuration holds their bcrypt hashes, the children get them in their
    /// environment).
    pub credentials: InternalCredentials,
}

/// A binary next to this one (`target/<profile>/`), else one of that name on `PATH`.
///
/// Errors: neither exists; the message names both places and the build command.
pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().unwrap_or_default();
    let p = exe.with_file_name(name);
    if p.exists() {
        return Ok(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|v| std::env::split_paths(&v).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if on_path {
        return Ok(PathBuf::from(name));
    }
    anyhow::bail!(
        "{name} is neither next to {} nor on PATH: build every binary of the workspace in \
         the same profile (`cargo build --release --workspace`, or without --release for a \
         debug build)",
        exe.display()
    )
}

/// Creates `<dir>/<name>` (and `dir`) for a child process's log.
pub(crate) fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join(name);
    std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))
}

/// What `faasmoe-broker run` is started with, by the stack and by the bench.
pub(crate) struct BrokerLaunch<'a> {
    /// The NATS server (the broker connects as user `broker`).
    pub url: &'a str,
    /// This deployment's internal passwords (broker's and workers').
    pub credentials: &'a InternalCredentials,
    /// Checkpoint directory.
    pub model: &'a Path,
    /// Model id in subjects.
    pub model_id: &'a str,
    /// Experts per function; the broker registers it for the controllers.
    pub granularity: u32,
    /// Workers exit after this many ms without a request.
    pub idle_timeout_ms: u64,
    /// Most instances per function.
    pub max_instances: u32,
    /// Where `broker.log` and `workers/` go.
    pub log_dir: &'a Path,
}

/// The `faasmoe-broker run` command of `b` (the sibling binary), stdout discarded, stderr to
/// `<log_dir>/broker.log`, killed on drop; the caller adds flags and spawns it.
///
/// Errors: a sibling binary is missing, or the log file cannot be created.
pub(crate) fn broker_command(b: &BrokerLaunch<'_>) -> anyhow::Result<Command> {
    let mut cmd = Command::new(sibling("faasmoe-broker")?);
    cmd.args(["run", "--nats-url", b.url, "--nats-user", "broker"])
        .env("NATS_PASSWORD", &b.credentials.broker)
        .arg("--model-dir")
        .arg(b.model)
        .args(["--model-id", b.model_id])
        .args(["--granularity", &b.granularity.to_string()])
        .args(["--idle-timeout-ms", &b.idle_timeout_ms.to_string()])
        .args(["--max-instances", &b.max_instances.to_string()])
        .args(["--worker-nats-user", "worker"])
        .env("FAASMOE_WORKER_PASSWORD", &b.credentials.worker)
        .arg("--worker-bin")
        .arg(sibling("faasmoe-expert-worker")?)
        .arg("--worker-log-dir")
        .arg(b.log_dir.join("workers"))
        .stdout(Stdio::null())
        .stderr(log_file(b.log_dir, "broker.log")?)
        .kill_on_drop(true);
    Ok(cmd)
}

/// The model id in subjects: the checkpoint directory's name, sanitised (as the worker and
/// broker derive it).
pub(crate) fn model_id_of(model: &Path) -> anyhow::Result<String> {
    model
        .canonicalize()
        .with_context(|| format!("model directory {}", model.display()))?;
    Ok(faasmoe_proto::subject::model_id_for_dir(model))
}

impl Stack {
    /// Starts nats-server, the broker and a controller with JetStream quotas, and waits until
    /// both answer.
    pub async fn start(a: &StackArgs) -> anyhow::Result<Self> {
        let model_id = model_id_of(&a.model)?;
        let port = match a.port {
            Some(p) => p,
            None => faasmoe_broker::server::free_port()?,
        };
        let credentials = InternalCredentials::generate();
        let opts = ServerOptions {
            internal_credentials: Some(credentials.clone()),
            config: a
                .nats_config
                .clone()
                .unwrap_or_else(faasmoe_broker::server::default_config),
            runtime_dir: Some(a.log_dir.join("nats-runtime")),
            port: Some(port),
            monitor_port: Some(faasmoe_broker::server::free_port()?),
            log_file: Some(a.log_dir.join("nats-server.log")),
            ..Default::default()
        };
        std::fs::create_dir_all(&a.log_dir)?;
        let server = EmbeddedServer::start(opts)
            .context("starting nats-server (run scripts/install-nats-server?)")?;
        let url = server.url().to_string();
        info!(%url, "nats-server ready");

        let port_or_free = |p: Option<u16>| match p {
            Some(p) => Ok(p),
            None => faasmoe_broker::server::free_port(),
        };
        let broker_metrics = format!("127.0.0.1:{}", port_or_free(a.broker_metrics_port)?);
        let controller_metrics = format!("127.0.0.1:{}", port_or_free(a.controller_metrics_port)?);
        let broker = broker_command(&BrokerLaunch {
            url: &url,
            credentials: &credentials,
            model: &a.model,
            model_id: &model_id,
            granularity: a.granularity,
            idle_timeout_ms: a.idle_timeout_ms,
            max_instances: a.max_instances,
            log_dir: &a.log_dir,
        })?
        .args(["--metrics-listen", &broker_metrics])
        .spawn()
        .context("starting faasmoe-broker")?;
        let controller = Command::new(std::env::current_exe()?)
            .args([
                "controller",
                "--nats-url",
                &url,
                "--nats-user",
                "controller",
                "--metrics-listen",
                &controller_metrics,
            ])
            .env("NATS_PASSWORD", &credentials.controller)
            .arg("--model-dir")
            .arg(&a.model)
            // The granularity comes from the broker's deployment record.
            .args(["--model-id", &model_id])
            .stdout(Stdio::null())
            .stderr(log_file(&a.log_dir, "controller.log")?)
            .kill_on_drop(true)
            .spawn()
            .context("starting the controller")?;
        let http_port = match a.http_port {
            Some(p) => p,
            None if std::net::TcpListener::bind(("127.0.0.1", 8000)).is_ok() => 8000,
            None => faasmoe_broker::server::free_port()?,
        };
        let gateway = Command::new(sibling("faasmoe-gateway")?)
            .args(["--nats-url", &url, "--nats-user", "gateway"])
            .env("NATS_PASSWORD", &credentials.gateway)
            .args(["--listen", &format!("127.0.0.1:{http_port}")])
            .stdout(Stdio::null())
            .stderr(log_file(&a.log_dir, "gateway.log")?)
            .kill_on_drop(true)
            .spawn()
            .context("starting faasmoe-gateway")?;
        let stack = Self {
            server,
            broker,
            controller,
            gateway,
            http_url: format!("http://127.0.0.1:{http_port}"),
            model_id,
            controller_metrics_url: format!("http://{controller_metrics}/metrics"),
            broker_metrics_url: format!("http://{broker_metrics}/metrics"),
            credentials,
        };
        stack.wait_ready(Duration::from_secs(120)).await?;
        Ok(stack)
    }

    /// An operator's connection (user `broker`: events, administration, tenants, JetStream).
    pub async fn connect_admin(&self) -> anyhow::Result<async_nats::Client> {
        Ok(faasmoe_proto::connection::connect(
            self.server.url(),
            Some("broker"),
            Some(&self.credentials.broker),
            "faasmoe-admin",
        )
        .await?)
    }

    async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        // The controller answers its stats request (the broker's user may send it), the broker
        // an activation the controller's user sends with a body it refuses as malformed:
        // any reply means each serves.
        let admin = self.connect_admin().await?;
        let controller = faasmoe_proto::connection::connect(
            self.server.url(),
            Some("controller"),
            Some(&self.credentials.controller),
            "faasmoe-probe",
        )
        .await?;
        let wait = |client: async_nats::Client, subject: String, body: &'static [u8]| async move {
            faasmoe_proto::connection::wait_answering(
                &client,
                &[(subject, body)],
                Duration::from_millis(200),
                limit,
            )
            .await
        };
        let (a, b) = tokio::join!(
            wait(
                admin,
                faasmoe_proto::subject::admin("controller_stats")?,
                b""
            ),
            wait(
                controller,
                faasmoe_proto::subject::activate(&self.model_id)?,
                b"{}"
            )
        );
        let mut silent: Vec<String> = a.into_iter().chain(b).collect();
        let addr = self.http_url.trim_start_matches("http://").to_string();
        let gateway_up = async {
            while Instant::now() < t0 + limit {
                if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        };
        if !gateway_up.await {
            silent.push(format!("gateway on {addr}"));
        }
        if !silent.is_empty() {
            bail!(
                "the stack did not come up within {limit:?} (not answering: {}); see the logs",
                silent.join(", ")
            );
        }
        info!(
            secs = t0.elapsed().as_secs_f64(),
            "controller and broker ready"
        );
        Ok(())
    }

    /// Stops the controller and the broker (which stops its workers) with SIGTERM, then the server.
    pub async fn stop(mut self) {
        for child in [&mut self.gateway, &mut self.controller, &mut self.broker] {
            terminate(child).await;
        }
        self.server.stop();
    }
}

/// Stops `child` with SIGTERM (its graceful shutdown), then SIGKILL if it has not exited
/// within 10 s.
pub(crate) async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
