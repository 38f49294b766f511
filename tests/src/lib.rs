//! End-to-end test harness for faasmoe: runs a REAL `nats-server` and locates the
//! workspace's binaries.
//!
//! Install the server once with `scripts/install-nats-server` (or `scripts/install-test-deps`);
//! it lands in `<workspace>/.tools/bin/nats-server`. `$NATS_SERVER` overrides the path.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let server = faasmoe_e2e::NatsServer::start(); // JetStream on, no auth, free port
//! let client = async_nats::connect(server.url()).await?;
//! # Ok(()) }
//! ```
//!
//! With the project's `nats.conf` (users and permissions):
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use faasmoe_e2e::{NatsServer, dev_users};
//! let server = NatsServer::start_project_config();
//! let controller = server.connect_as(dev_users::CONTROLLER).await?;
//! # Ok(()) }
//! ```

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server may take to accept TCP connections.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a start is retried when a picked port turns out to be taken.
const PORT_ATTEMPTS: usize = 5;

/// Environment variable that `nats.conf` reads its JetStream store directory from.
/// [`NatsServer`] always sets it (to a fresh temp dir) for the server it spawns.
pub const JS_DIR_ENV: &str = "FAASMOE_JS_DIR";

/// The development users defined in the project's `nats.conf` (user, password); their
/// passwords are public development defaults (`nats.conf` holds their bcrypt hashes).
pub use faasmoe_proto::connection::dev_users;

/// The workspace root (the directory holding the root `Cargo.toml`).
pub use faasmoe_broker::server::workspace_root;

/// The project's NATS configuration, `<workspace>/nats.conf`.
pub fn nats_conf() -> PathBuf {
    workspace_root().join("nats.conf")
}

/// Path of the `nats-server` binary to use: [`faasmoe_broker::server::nats_server_bin`]
/// (`$NATS_SERVER`, else `<workspace>/.tools/bin/nats-server`, else `nats-server` on `PATH`).
///
/// Panics, naming `scripts/install-nats-server`, when none is found.
pub fn nats_server_bin() -> PathBuf {
    faasmoe_broker::server::nats_server_bin().unwrap_or_else(|e| {
        panic!(
            "{e} (run it from the workspace root {})",
            workspace_root().display()
        )
    })
}

/// Path of the workspace binary target `name`, in the same target directory and profile as
/// the running test (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
///
/// Panics with a hint to build it (`cargo build --workspace --bins`) when it is missing:
/// `cargo test` does not build binaries of other packages.
pub fn cargo_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test executable has a parent directory");
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir = dir.parent().expect("deps/ has a parent directory");
    }
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        let profile = dir
            .file_name()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let release = if profile == "release" {
            " --release"
        } else {
            ""
        };
        panic!(
            "binary `{name}` not found at {}: build it first with \
             `cargo build --workspace --bins{release}` (or `cargo build --bin {name}{release}`)",
            bin.display()
        );
    }
    bin
}

/// A free TCP port on 127.0.0.1, found by binding port 0 and releasing it
/// ([`faasmoe_broker::server::free_port`]). Another process may take it before it is used:
/// callers retry on collision.
pub fn free_port() -> u16 {
    faasmoe_broker::server::free_port().expect("bind 127.0.0.1:0 to find a free port")
}

/// Makes the process that `cmd` starts receive SIGKILL when the thread that spawns it ends,
/// and so at the latest when this process ends, however it ends (`prctl(PR_SET_PDEATHSIG)`,
/// Linux): a test killed by a timeout or a signal leaves no process behind. Spawn from a
/// thread that lives as long as the child should: a test's own thread does (the child then
/// also dies with its test); a `spawn_blocking` or `block_in_place` thread may end while the
/// test still runs. [`spawn_for_this_process`] spawns from a thread that lives as long as
/// the process.
pub fn die_with_spawning_thread(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: runs in the forked child before exec; only async-signal-safe system calls
    // (prctl, getppid) and an allocation-free error.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                // The parent already ended between fork and prctl.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Spawns `cmd` from a thread that lives as long as this process, with
/// [`die_with_spawning_thread`]: the child dies when this process ends, however
/// it ends, and not before (whichever thread calls this). Blocks for the fork and exec.
///
/// Errors: the spawn's own, or `Other` when the spawning thread cannot be started.
pub fn spawn_for_this_process(mut cmd: Command) -> std::io::Result<Child> {
    use std::sync::mpsc;
    use std::sync::{Mutex, OnceLock};
    type Job = (Command, mpsc::SyncSender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    die_with_spawning_thread(&mut cmd);
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let _ = std::thread::Builder::new()
            .name("faasmoe-e2e-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let gone = || std::io::Error::other("the spawning thread is not running");
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| gone())?;
    reply_rx.recv().map_err(|_| gone())?
}

/// A running `nats-server` child process on loopback, killed (and reaped) on drop, and
/// killed with the test process however that ends ([`spawn_for_this_process`]).
pub struct NatsServer {
    child: Child,
    port: u16,
    monitor_port: u16,
    log_path: PathBuf,
    store_dir: PathBuf,
    // Last field: dropped after the process is gone.
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// A plain server: JetStream on (`-js`, store in a temp dir), no auth, free loopback port,
    /// monitoring on another free port.
    pub fn start() -> Self {
        Self::spawn(None, &[])
    }

    /// A server with a configuration file plus extra command-line arguments. Port, address
    /// and monitoring port are always given on the command line (`-a 127.0.0.1 -p <port>
    /// -m <port>`), overriding the file. `$FAASMOE_JS_DIR` is set to a fresh temp dir for
    /// configs that read their JetStream store dir from it (as `nats.conf` does).
    pub fn start_with_config(path: impl AsRef<Path>, extra_args: &[&str]) -> Self {
        let path = path.as_ref();
        assert!(
            path.is_file(),
            "nats-server config {} does not exist",
            path.display()
        );
        Self::spawn(Some(path), extra_args)
    }

    /// A server with the project's `nats.conf` (users `controller`, `worker`, `broker`,
    /// `tenant-demo`; see [`dev_users`]).
    pub fn start_project_config() -> Self {
        Self::start_with_config(nats_conf(), &[])
    }

    fn spawn(config: Option<&Path>, extra_args: &[&str]) -> Self {
        let bin = nats_server_bin();
        let dir = tempfile::Builder::new()
            .prefix("faasmoe-nats-")
            .tempdir()
            .expect("create temp dir for nats-server");
        let store_dir = dir.path().join("jetstream");
        fs::create_dir_all(&store_dir).expect("create JetStream store dir");
        let log_path = dir.path().join("nats-server.log");

        let mut failures = Vec::new();
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port();
            let mut monitor_port = free_port();
            while monitor_port == port {
                monitor_port = free_port();
            }

            let mut args: Vec<OsString> = Vec::new();
            if let Some(config) = config {
                args.push("-c".into());
                args.push(config.into());
            } else {
                args.push("-js".into());
                args.push("-sd".into());
                args.push(store_dir.clone().into());
            }
            for a in [
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor_port.to_string(),
            ] {
                args.push(a.into());
            }
            args.extend(extra_args.iter().map(OsString::from));

            let log = File::create(&log_path).expect("create nats-server log file");
            let mut cmd = Command::new(&bin);
            cmd.args(&args)
                .env(JS_DIR_ENV, &store_dir)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log file handle"))
                .stderr(log);
            let mut child = spawn_for_this_process(cmd)
                .unwrap_or_else(|e| panic!("failed to spawn {}: {e}", bin.display()));

            match wait_ready(&mut child, port, &log_path) {
                Ok(()) => {
                    return NatsServer {
                        child,
                        port,
                        monitor_port,
                        log_path,
                        store_dir,
                        dir,
                    }
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let tail = log_tail(&log_path, 40);
                    failures.push(format!(
                        "attempt {attempt} (port {port}, monitor port {monitor_port}): {why}"
                    ));
                    let collision = tail.contains("address already in use");
                    if collision && attempt < PORT_ATTEMPTS {
                        continue; // someone took a port between our probe and the bind
                    }
                    panic!(
                        "nats-server ({}) failed to start: {}\nargs: {:?}\n\
                         --- server log tail ---\n{}",
                        bin.display(),
                        failures.join("; "),
                        args,
                        tail
                    );
                }
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<monitor port>` (endpoints `/varz`, `/connz`, `/jsz`, `/healthz`, ...).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The monitoring port (on 127.0.0.1).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file the server's stdout and stderr go to (inside the temp dir).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// The JetStream store directory (a temp dir, removed on drop).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server's temp directory (store dir and log live here; removed on drop).
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connect without credentials.
    pub async fn connect(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        async_nats::connect(self.url()).await
    }

    /// Connect as `(user, password)`, e.g. one of [`dev_users`], with the user's own inbox
    /// prefix `_INBOX.<user>` (the only inboxes `nats.conf` lets a user subscribe to).
    pub async fn connect_as(
        &self,
        (user, password): (&str, &str),
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
            .custom_inbox_prefix(format!("_INBOX.{user}"))
            .connect(self.url())
            .await
    }

    /// Kill the server now and wait for it to exit (what drop does).
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

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill_and_wait();
    }
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("url", &self.url())
            .field("monitor_url", &self.monitor_url())
            .field("pid", &self.pid())
            .field("temp_dir", &self.dir.path())
            .finish()
    }
}

/// Wait until the child accepts TCP connections on `port` and has logged readiness.
fn wait_ready(child: &mut Child, port: u16, log_path: &Path) -> Result<(), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut accepted_at: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("exited during startup with {status}"));
        }
        if accepted_at.is_none()
            && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        {
            accepted_at = Some(Instant::now());
        }
        if let Some(at) = accepted_at {
            // Make sure it is OUR server listening: it logs "Server is ready" once its
            // listeners are up. If logging was redirected elsewhere (-l / log_file), the line
            // never comes: accept a server that accepted connections and stayed alive for 1 s.
            if log_tail(log_path, usize::MAX).contains("Server is ready")
                || at.elapsed() >= Duration::from_secs(1)
            {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "did not accept connections on {addr} within {STARTUP_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        text = String::from_utf8_lossy(&buf).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    all[from..].join("\n")
}

/// Serves `subject` on `client` with a responder that replies `prefix + payload` to every
/// request, until the connection closes. Returns once the server has the subscription, so
/// a request sent next from any connection is answered: it sends one request to `subject`
/// on `client` itself and waits for the echo (the server handles one connection's messages
/// in order; `flush` alone only writes the socket). A user who may not publish to `subject`
/// needs [`echo_responder_fenced_by`].
///
/// Errors: the subscribe failed, or the fence request got no echo within 10 s (connection
/// lost, or the user may not subscribe or publish to `subject`).
pub async fn echo_responder(
    client: &async_nats::Client,
    subject: &str,
    prefix: &'static str,
) -> anyhow::Result<()> {
    echo_responder_fenced_by(client, client, subject, prefix).await
}

/// [`echo_responder`] on `client`, fenced by requests from `requester` (a user allowed to
/// publish to `subject`, e.g. the tenant of a generate subject), repeated every 100 ms until
/// the echo comes back: the subscription has then reached the server.
///
/// Errors: the subscribe failed, or no echo within 10 s.
pub async fn echo_responder_fenced_by(
    client: &async_nats::Client,
    requester: &async_nats::Client,
    subject: &str,
    prefix: &'static str,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut sub = client.subscribe(subject.to_string()).await?;
    let c = client.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let mut body = prefix.as_bytes().to_vec();
                body.extend_from_slice(&msg.payload);
                let _ = c.publish(reply, body.into()).await;
            }
        }
    });
    let fence = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tokio::time::timeout(
                Duration::from_millis(100),
                requester.request(subject.to_string(), "".into()),
            )
            .await
            {
                Ok(Err(e)) if matches!(e.kind(), async_nats::RequestErrorKind::NoResponders) => {}
                Ok(r) => return r,
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    match fence {
        Ok(Ok(m)) if m.payload == prefix.as_bytes() => Ok(()),
        Ok(Ok(m)) => anyhow::bail!(
            "echo responder on {subject}: the fence request got {:?}, not {prefix:?}",
            m.payload
        ),
        Ok(Err(e)) => anyhow::bail!("echo responder on {subject}: fence request: {e}"),
        Err(_) => {
            anyhow::bail!("echo responder on {subject}: no echo to the fence request within 10 s")
        }
    }
}
