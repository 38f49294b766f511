//! An embedded `nats-server`: started with the project's `nats.conf` when the broker is given
//! no external `--nats-url`, stopped (killed and reaped) when the [`EmbeddedServer`] is dropped.
//!
//! The binary is found like the test harness finds it: `$NATS_SERVER`, else
//! `<workspace>/.tools/bin/nats-server` (installed by `scripts/install-nats-server`), else
//! `nats-server` on `PATH`. `nats.conf` reads its JetStream store directory from
//! `$FAASMOE_JS_DIR`, which is always set for the child.
//!
//! The server does not run from the given configuration file itself but from its rendered
//! copy in a runtime directory, with the tenant users of `<runtime dir>/tenants.conf`
//! inserted at the `# @faasmoe-tenants` marker (see [`crate::server_config`]); [`EmbeddedServer::tenant_admin`]
//! gives the administration that adds/removes tenant users and reloads the server.

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::credentials::InternalCredentials;
use crate::server_config::{
    RuntimeConfig, RuntimeError, RuntimeState, ServerControl, TenantAdmin, DEFAULT_RELOAD_TIMEOUT,
};
use crate::tenants::TenantStore;

/// Environment variable `nats.conf` reads its JetStream store directory from.
pub const JS_DIR_ENV: &str = "FAASMOE_JS_DIR";

/// Why an embedded server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No `nats-server` binary was found.
    #[error("nats-server not found ($NATS_SERVER, {local}, PATH); install it with scripts/install-nats-server")]
    NotFound {
        /// The workspace-local path that was tried.
        local: String,
    },
    /// `$NATS_SERVER` names neither a file nor a command on `PATH`.
    #[error("$NATS_SERVER is set to {0} but no such file or command exists; unset it or run scripts/install-nats-server")]
    EnvNotFound(String),
    /// The configuration file does not exist.
    #[error("nats-server config {0} does not exist")]
    NoConfig(PathBuf),
    /// Spawning the process or preparing its directories failed.
    #[error("starting nats-server: {0}")]
    Io(#[from] std::io::Error),
    /// Rendering the runtime configuration failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The configuration still accepts published development passwords (the users listed)
    /// and the server would listen beyond loopback.
    #[error("refusing to listen on {addr} with the published development passwords of {users:?}: give the server generated internal credentials (ServerOptions::internal_credentials, what `faasmoe up` does) or your own configuration with other passwords, or listen on 127.0.0.1")]
    DevelopmentPasswords {
        /// The listen address.
        addr: String,
        /// The users whose development password the configuration accepts.
        users: Vec<&'static str>,
    },
    /// The process exited or did not accept connections in time.
    #[error("nats-server did not become ready: {why}\n--- log tail ---\n{log_tail}")]
    NotReady {
        /// What went wrong.
        why: String,
        /// The end of the server's log.
        log_tail: String,
    },
}

/// Whether the listen address `addr` (an IP or a host name) is a loopback address only
/// (`127.0.0.0/8`, `::1`, `localhost`); `0.0.0.0` and `::` listen everywhere.
pub fn is_loopback(addr: &str) -> bool {
    let a = addr.trim_start_matches('[').trim_end_matches(']');
    match a.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => a.eq_ignore_ascii_case("localhost"),
    }
}

/// How to start the embedded server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Path of the `nats-server` binary (default: [`nats_server_bin`]).
    pub bin: Option<PathBuf>,
    /// The base configuration file (default: [`default_config`]); the server runs from its
    /// rendered copy in `runtime_dir`.
    pub config: PathBuf,
    /// Runtime directory: `tenants.conf`, the rendered `nats.conf`, `server.json`
    /// (see [`crate::server_config`]); default: a temp dir removed on drop. Give a persistent one
    /// to keep tenant users across restarts and to administer tenants from another process.
    pub runtime_dir: Option<PathBuf>,
    /// JetStream store directory (`$FAASMOE_JS_DIR`); default: a temp dir removed on drop.
    pub store_dir: Option<PathBuf>,
    /// Listen address (`-a`), default `127.0.0.1`.
    pub addr: String,
    /// Client port (`-p`); `None` keeps the config's (4222 in `nats.conf`).
    pub port: Option<u16>,
    /// Monitoring port (`-m`); `None` keeps the config's.
    pub monitor_port: Option<u16>,
    /// Where the server's stdout/stderr go; default: `nats-server.log` in a temp dir.
    pub log_file: Option<PathBuf>,
    /// How long to wait for the server to accept connections.
    pub startup_timeout: Duration,
    /// The internal users' passwords of this deployment: their bcrypt hashes replace the
    /// development ones of the base configuration (`<runtime dir>/internal.conf`, see
    /// [`crate::credentials`]). `None`: the base configuration's (in the project's
    /// `nats.conf`, the published development passwords: loopback only).
    pub internal_credentials: Option<InternalCredentials>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            bin: None,
            config: default_config(),
            runtime_dir: None,
            store_dir: None,
            addr: "127.0.0.1".into(),
            port: None,
            monitor_port: None,
            log_file: None,
            startup_timeout: Duration::from_secs(10),
            internal_credentials: None,
        }
    }
}

/// The workspace root this crate was built in.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `./nats.conf` if it exists, else `<workspace>/nats.conf`.
pub fn default_config() -> PathBuf {
    let local = PathBuf::from("nats.conf");
    if local.is_file() {
        local
    } else {
        workspace_root().join("nats.conf")
    }
}

/// The `nats-server` binary: `$NATS_SERVER` (a file, or a command on `PATH`), else
/// `<workspace>/.tools/bin/nats-server` (where `scripts/install-nats-server` puts it), else
/// `nats-server` on `PATH`. The one lookup of the project: the broker, the stack, the bench
/// and the test harness (`faasmoe-e2e`) all use it.
///
/// Errors: [`ServerError::EnvNotFound`] when `$NATS_SERVER` is set to something that does
/// not exist (it is not silently ignored), [`ServerError::NotFound`] when nothing is found.
pub fn nats_server_bin() -> Result<PathBuf, ServerError> {
    if let Some(p) = std::env::var_os("NATS_SERVER").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return find_on_path(&p).ok_or_else(|| ServerError::EnvNotFound(p.display().to_string()));
    }
    let local = workspace_root()
        .join(".tools")
        .join("bin")
        .join("nats-server");
    if local.is_file() {
        return Ok(local);
    }
    find_on_path(Path::new("nats-server")).ok_or(ServerError::NotFound {
        local: local.display().to_string(),
    })
}

fn find_on_path(name: &Path) -> Option<PathBuf> {
    if name.components().count() != 1 {
        return None;
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|c| c.is_file())
}

/// A free TCP port on 127.0.0.1 (bind port 0 and release it; another process may take it).
pub fn free_port() -> std::io::Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()
        .map(|a| a.port())
}

/// A running `nats-server` child, killed and reaped on drop.
pub struct EmbeddedServer {
    child: Child,
    url: String,
    log_file: PathBuf,
    store_dir: PathBuf,
    runtime: RuntimeConfig,
    // Dropped after the process is gone (field order).
    _temp: Option<tempfile::TempDir>,
}

impl EmbeddedServer {
    /// Starts the server and waits until it accepts connections and logs `Server is ready`.
    pub fn start(opts: ServerOptions) -> Result<Self, ServerError> {
        let bin = match &opts.bin {
            Some(b) => b.clone(),
            None => nats_server_bin()?,
        };
        if !opts.config.is_file() {
            return Err(ServerError::NoConfig(opts.config.clone()));
        }
        let temp =
            if opts.store_dir.is_none() || opts.log_file.is_none() || opts.runtime_dir.is_none() {
                Some(
                    tempfile::Builder::new()
                        .prefix("faasmoe-broker-nats-")
                        .tempdir()?,
                )
            } else {
                None
            };
        let store_dir = match &opts.store_dir {
            Some(d) => d.clone(),
            None => temp.as_ref().expect("temp dir").path().join("jetstream"),
        };
        std::fs::create_dir_all(&store_dir)?;
        let log_file = match &opts.log_file {
            Some(f) => f.clone(),
            None => temp
                .as_ref()
                .expect("temp dir")
                .path()
                .join("nats-server.log"),
        };
        let runtime_dir = match &opts.runtime_dir {
            Some(d) => d.clone(),
            None => temp.as_ref().expect("temp dir").path().join("runtime"),
        };
        let runtime = RuntimeConfig::new(&opts.config, &runtime_dir);
        match &opts.internal_credentials {
            Some(creds) => {
                creds.write_hashes(&runtime_dir)?;
            }
            None => match std::fs::remove_file(runtime_dir.join(crate::credentials::INTERNAL_FILE))
            {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            },
        }
        let rendered = runtime.render()?;
        if !is_loopback(&opts.addr) {
            let users = crate::credentials::uses_development_passwords(&std::fs::read_to_string(
                &rendered,
            )?);
            if !users.is_empty() {
                return Err(ServerError::DevelopmentPasswords {
                    addr: opts.addr.clone(),
                    users,
                });
            }
        }
        let port = opts.port.unwrap_or(4222);
        let mut cmd = Command::new(&bin);
        cmd.arg("-c").arg(&rendered).arg("-a").arg(&opts.addr);
        if let Some(p) = opts.port {
            cmd.arg("-p").arg(p.to_string());
        }
        if let Some(m) = opts.monitor_port {
            cmd.arg("-m").arg(m.to_string());
        }
        let log = File::create(&log_file)?;
        let child = cmd
            .env(JS_DIR_ENV, &store_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let host = if opts.addr == "0.0.0.0" {
            "127.0.0.1".to_string()
        } else {
            opts.addr.clone()
        };
        let mut server = Self {
            child,
            url: format!("nats://{host}:{port}"),
            log_file,
            store_dir,
            runtime,
            _temp: temp,
        };
        server.wait_ready(&host, port, opts.startup_timeout)?;
        server.runtime.write_state(&RuntimeState {
            pid: server.pid(),
            base_config: std::path::absolute(&opts.config).unwrap_or(opts.config.clone()),
            config: rendered,
            log_file: Some(server.log_file.clone()),
            url: server.url.clone(),
        })?;
        tracing::info!(url = %server.url, config = %opts.config.display(), store_dir = %server.store_dir.display(), "embedded nats-server ready");
        Ok(server)
    }

    fn wait_ready(&mut self, host: &str, port: u16, timeout: Duration) -> Result<(), ServerError> {
        let addr: SocketAddr = (host, port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| self.not_ready(format!("cannot resolve {host}")))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(self.not_ready(format!("exited during startup with {status}")));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && self.log_tail(usize::MAX).contains("Server is ready")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(self.not_ready(format!("no connection on {addr} within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn not_ready(&self, why: String) -> ServerError {
        ServerError::NotReady {
            why,
            log_tail: self.log_tail(30),
        }
    }

    /// `nats://<addr>:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The runtime configuration the server was started from.
    pub fn runtime_config(&self) -> &RuntimeConfig {
        &self.runtime
    }

    /// Reloading this server (waits for the confirmation in its log).
    pub fn control(&self) -> ServerControl {
        ServerControl {
            pid: self.pid(),
            log_file: Some(self.log_file.clone()),
            reload_timeout: DEFAULT_RELOAD_TIMEOUT,
        }
    }

    /// Tenant administration whose credentials work on this server (see [`TenantAdmin`]).
    pub fn tenant_admin(&self, store: TenantStore) -> TenantAdmin {
        TenantAdmin::new(store, self.runtime.clone(), self.control())
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server's log file.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut buf = Vec::new();
        if let Ok(mut f) = File::open(&self.log_file) {
            let _ = f.read_to_end(&mut buf);
        }
        let text = String::from_utf8_lossy(&buf);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the server now (what drop does).
    pub fn stop(mut self) {
        self.kill_and_wait();
    }

    fn kill_and_wait(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        self.kill_and_wait();
    }
}

impl std::fmt::Debug for EmbeddedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedServer")
            .field("url", &self.url)
            .field("pid", &self.child.id())
            .field("store_dir", &self.store_dir)
            .finish()
    }
}
