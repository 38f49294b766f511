//! Starting function instances. [`InstanceBackend`] is the seam where other platforms
//! (Kubernetes, Nomad) plug in; [`LocalProcessBackend`] runs `faasmoe-expert-worker` as a
//! child process of the broker, which dies with the broker (parent-death signal).

use faasmoe_proto::connection::NatsArgs;
use std::path::PathBuf;
use std::process::Stdio;

use faasmoe_proto::layout::FunctionSpec;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceExit {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Terminating signal, when it was killed by one.
    pub signal: Option<i32>,
}

impl InstanceExit {
    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl From<std::process::ExitStatus> for InstanceExit {
    fn from(s: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            code: s.code(),
            signal: s.signal(),
        }
    }
}

/// Why an instance could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The process could not be spawned (binary missing, not executable, resources).
    #[error("spawning {program}: {source}")]
    Spawn {
        /// What was run.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A backend-specific failure.
    #[error("{0}")]
    Backend(String),
}

/// One running instance of a function, owned by the broker's instance task.
pub trait Instance: Send {
    /// OS process id (or `None` where the backend has none).
    fn pid(&self) -> Option<u32>;

    /// Fires once when the instance reports it is ready by a backend-specific channel (the
    /// local backend: the worker's `READY <function_id> <instance_id>` stdout line). Taken
    /// once; `None` when the backend has no such channel (the broker then relies on the
    /// worker's `subscribed` event on NATS).
    fn take_ready_signal(&mut self) -> Option<oneshot::Receiver<()>>;

    /// The exit status, if the instance has already ended (does not block).
    fn try_wait(&mut self) -> std::io::Result<Option<InstanceExit>>;

    /// Waits until the instance ends.
    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<InstanceExit>>;

    /// Asks the instance to stop gracefully (SIGTERM: the worker drains and exits).
    fn terminate(&mut self) -> std::io::Result<()>;

    /// Stops the instance at once (SIGKILL).
    fn kill(&mut self) -> std::io::Result<()>;
}

/// Something that starts instances of functions.
pub trait InstanceBackend: Send + Sync {
    /// Starts one instance of `function` named `instance_id`. Returns once the instance
    /// exists (the process is spawned), not when it is ready.
    fn spawn(
        &self,
        function: &FunctionSpec,
        instance_id: &str,
    ) -> Result<Box<dyn Instance>, SpawnError>;
}

/// Runs `faasmoe-expert-worker` processes on this machine.
///
/// A worker dies with the process that started it: it gets SIGTERM (drain, then exit) when
/// that process ends, however it ends (`prctl(PR_SET_PDEATHSIG)`, Linux). Linux sends that
/// signal when the *thread* that forked the child ends, and runtime threads do end (tokio's
/// blocking-pool threads after an idle while, a test's runtime with its test), so every worker
/// is forked from one thread that lives as long as the process ([`spawn_child`]).
#[derive(Debug, Clone)]
pub struct LocalProcessBackend {
    /// The worker binary.
    pub worker_bin: PathBuf,
    /// Where the worker connects and as whom (the password goes in the worker's
    /// environment, not on its command line).
    pub nats: NatsArgs,
    /// Checkpoint directory.
    pub model_dir: PathBuf,
    /// Model id for subjects.
    pub model_id: String,
    /// The worker's idle timeout (scale to zero), ms; 0: never.
    pub idle_timeout_ms: u64,
    /// Where each worker's stderr (its log) goes: `<dir>/<function>-<instance>.log`; `None`:
    /// inherited from the broker.
    pub log_dir: Option<PathBuf>,
    /// Extra environment for the worker (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
}

impl InstanceBackend for LocalProcessBackend {
    fn spawn(
        &self,
        function: &FunctionSpec,
        instance_id: &str,
    ) -> Result<Box<dyn Instance>, SpawnError> {
        let mut cmd = tokio::process::Command::new(&self.worker_bin);
        cmd.arg("--nats-url")
            .arg(&self.nats.url)
            .arg("--model-dir")
            .arg(&self.model_dir)
            .arg("--model-id")
            .arg(&self.model_id)
            .arg("--experts")
            .arg(function.experts_spec())
            .arg("--function-id")
            .arg(&function.id)
            .arg("--instance-id")
            .arg(instance_id)
            .arg("--idle-timeout-ms")
            .arg(self.idle_timeout_ms.to_string());
        // Only the credentials given here: not the broker's own NATS_USER / NATS_PASSWORD.
        cmd.env_remove("NATS_USER").env_remove("NATS_PASSWORD");
        if let Some(u) = &self.nats.user {
            cmd.arg("--nats-user").arg(u);
        }
        if let Some(p) = &self.nats.password {
            cmd.env("NATS_PASSWORD", p);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        match &self.log_dir {
            Some(dir) => {
                let path = dir.join(format!("{}-{instance_id}.log", function.id));
                let file = std::fs::create_dir_all(dir)
                    .and_then(|_| std::fs::File::create(&path))
                    .map_err(|source| SpawnError::Spawn {
                        program: format!("log file {}", path.display()),
                        source,
                    })?;
                cmd.stderr(file);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        // The worker dies with this process (SIGTERM: it drains and exits). No kill_on_drop:
        // an instance whose handle is dropped still drains and exits on its idle timeout.
        die_with_this_process(&mut cmd, libc::SIGTERM);
        let mut child = spawn_child(cmd).map_err(|source| SpawnError::Spawn {
            program: self.worker_bin.display().to_string(),
            source,
        })?;
        let pid = child.id();
        let (ready_tx, ready_rx) = oneshot::channel();
        if let Some(stdout) = child.stdout.take() {
            let expected = format!("READY {} {instance_id}", function.id);
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                let mut ready_tx = Some(ready_tx);
                // Keep reading to the end so the worker never blocks on a full pipe.
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.trim_end() == expected {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            });
        }
        Ok(Box::new(LocalProcess {
            child,
            pid,
            ready: Some(ready_rx),
        }))
    }
}

/// Makes the child that `cmd` starts receive `signal` when this process ends (when the thread
/// that forks it ends, to be exact: see [`spawn_child`]). If this process already ended
/// between the fork and the request, the child is not started (`ESRCH`).
fn die_with_this_process(cmd: &mut tokio::process::Command, signal: libc::c_int) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid) and allocation-free error returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// A request to the spawning thread: the command, the runtime the child is registered with,
/// where the result goes.
type SpawnJob = (
    tokio::process::Command,
    tokio::runtime::Handle,
    std::sync::mpsc::SyncSender<std::io::Result<tokio::process::Child>>,
);

/// Spawns `cmd` from a thread that lives as long as this process, registering the child with
/// the current tokio runtime (so its parent-death signal comes when the process ends, not
/// when the calling thread does). Blocks the caller for the fork and exec, as
/// [`tokio::process::Command::spawn`] does.
///
/// Errors: the spawn's own, or [`std::io::ErrorKind::Other`] when there is no current tokio
/// runtime or the spawning thread cannot be started.
fn spawn_child(cmd: tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    use std::sync::{mpsc, Mutex, OnceLock};
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let handle = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let started = std::thread::Builder::new()
            .name("faasmoe-spawner".into())
            .spawn(move || {
                for (mut cmd, handle, reply) in rx {
                    let _runtime = handle.enter();
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start the spawning thread");
        }
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let no_thread = || std::io::Error::other("the spawning thread is not running");
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, handle, reply_tx))
        .map_err(|_| no_thread())?;
    reply_rx.recv().map_err(|_| no_thread())?
}

/// A worker child process.
struct LocalProcess {
    child: tokio::process::Child,
    pid: Option<u32>,
    ready: Option<oneshot::Receiver<()>>,
}

impl Instance for LocalProcess {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn take_ready_signal(&mut self) -> Option<oneshot::Receiver<()>> {
        self.ready.take()
    }

    fn try_wait(&mut self) -> std::io::Result<Option<InstanceExit>> {
        Ok(self.child.try_wait()?.map(InstanceExit::from))
    }

    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<InstanceExit>> {
        Box::pin(async move { Ok(self.child.wait().await?.into()) })
    }

    fn terminate(&mut self) -> std::io::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        match self.pid {
            Some(pid) => {
                // SAFETY: plain syscall on a pid we spawned and have not reaped yet (try_wait
                // above returned None, so the pid cannot have been reused).
                let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            None => Ok(()),
        }
    }

    fn kill(&mut self) -> std::io::Result<()> {
        match self.child.start_kill() {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()), // already exited
            r => r,
        }
    }
}
