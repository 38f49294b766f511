//! Tenant credentials that reach the server: the *runtime configuration*.
//!
//! nats-server cannot `include` a file inside an array, so tenant `users` entries cannot live
//! in a file of their own that `nats.conf` pulls in. Instead the project's `nats.conf` carries
//! a marker comment line ([`TENANTS_MARKER`]) inside its account's `users: [...]` list, and
//! the broker renders a runtime configuration: the base file's text with the tenant entries
//! of a [`TenantsConf`] inserted after the marker line ([`render_config`]). The embedded
//! server ([`crate::EmbeddedServer`]) is started from the rendered file, and
//! [`TenantAdmin`] re-renders it and reloads the server (SIGHUP, what
//! `nats-server --signal reload=<pid>` sends) on every tenant create/delete.
//!
//! The runtime directory holds:
//!
//! - `tenants.conf`: the tenant entries ([`TenantsConf`], bcrypt hashes only), kept across
//!   restarts when the directory is persistent;
//! - `internal.conf`: the bcrypt hashes of the deployment's internal passwords, when it has
//!   generated ones; they replace the base's `@faasmoe-internal-begin/end` block
//!   ([`crate::credentials`]);
//! - `nats.conf`: the rendered configuration (mode 0600; it holds password hashes, no plaintext);
//! - `server.json`: which server runs from it ([`RuntimeState`]: pid, base config, log file),
//!   so that another process (the `faasmoe-broker tenant` CLI) can render and reload too.
//!
//! The rendered file lives in the runtime directory, so a base configuration must not use
//! relative `include` paths (the project's `nats.conf` has none).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::tenants::{Quota, TenantCredentials, TenantError, TenantStore, TenantsConf};

/// The comment line (trimmed) inside the `users: [...]` array after which tenant entries go.
pub const TENANTS_MARKER: &str = "# @faasmoe-tenants";

/// The rendered configuration's file name in the runtime directory.
pub const RENDERED_FILE: &str = "nats.conf";

/// The state file's name in the runtime directory.
pub const STATE_FILE: &str = "server.json";

/// What nats-server logs when a reload succeeded.
const RELOADED: &str = "Reloaded server configuration";
/// What nats-server logs when a signalled reload failed.
const RELOAD_FAILED: &str = "Failed to reload server configuration";

/// Why rendering or reloading failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The base configuration has tenant entries to take but no marker line.
    #[error("{path}: no `{TENANTS_MARKER}` line inside the users array, cannot add tenant users")]
    NoMarker {
        /// The base configuration.
        path: String,
    },
    /// The runtime directory holds generated internal credentials but the base
    /// configuration has no block to put them in.
    #[error(
        "{path}: no `{}` … `{}` block for the deployment's internal passwords",
        crate::credentials::INTERNAL_BEGIN,
        crate::credentials::INTERNAL_END
    )]
    NoInternalBlock {
        /// The base configuration.
        path: String,
    },
    /// Reading or writing files, or signalling the server, failed.
    #[error("runtime config: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused the new configuration (its log line).
    #[error("nats-server refused the reload: {0}")]
    ReloadRefused(String),
    /// The server did not confirm the reload in time.
    #[error("nats-server (pid {pid}) did not confirm the reload within {timeout:?}")]
    ReloadTimeout {
        /// The server.
        pid: u32,
        /// How long we waited.
        timeout: Duration,
    },
    /// `server.json` is missing or invalid.
    #[error("{path}: {message}")]
    State {
        /// The state file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl From<RuntimeError> for TenantError {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::Io(e) => TenantError::Conf(e),
            other => TenantError::Server(other.to_string()),
        }
    }
}

/// `base` with `tenant_entries` inserted after the marker line (indented like the marker).
/// Without a marker, `base` is returned unchanged if there are no entries, else
/// [`RuntimeError::NoMarker`].
pub fn render_config(
    base: &str,
    tenant_entries: &str,
    base_name: &str,
) -> Result<String, RuntimeError> {
    let mut out = String::with_capacity(base.len() + tenant_entries.len() + 64);
    let mut found = false;
    for line in base.split_inclusive('\n') {
        out.push_str(line);
        if !found && line.trim() == TENANTS_MARKER {
            found = true;
            if !line.ends_with('\n') {
                out.push('\n');
            }
            let indent: String = line.chars().take_while(|c| c.is_whitespace()).collect();
            for entry_line in tenant_entries.lines() {
                if entry_line.is_empty() {
                    out.push('\n');
                } else {
                    out.push_str(&indent);
                    out.push_str(entry_line);
                    out.push('\n');
                }
            }
        }
    }
    if !found && !tenant_entries.trim().is_empty() {
        return Err(RuntimeError::NoMarker {
            path: base_name.to_string(),
        });
    }
    Ok(out)
}

/// Sends SIGHUP to `pid` (what `nats-server --signal reload=<pid>` does). Returns at once;
/// see [`ServerControl::reload`] for a reload that waits for the server's confirmation.
pub fn reload(pid: u32) -> std::io::Result<()> {
    let pid =
        i32::try_from(pid).map_err(|_| std::io::Error::other(format!("pid {pid} out of range")))?;
    // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGHUP) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A base configuration, a runtime directory, and the rendered file in it.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    base: PathBuf,
    dir: PathBuf,
    tenants: TenantsConf,
}

impl RuntimeConfig {
    /// Renders `base` into `dir` (created if missing) with the tenants of `dir/tenants.conf`.
    pub fn new(base: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            base: base.into(),
            tenants: TenantsConf::in_dir(&dir),
            dir,
        }
    }

    /// The base configuration (e.g. the project's `nats.conf`).
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The runtime directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The rendered configuration, `<dir>/nats.conf`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(RENDERED_FILE)
    }

    /// The tenant entries, `<dir>/tenants.conf`.
    pub fn tenants(&self) -> &TenantsConf {
        &self.tenants
    }

    /// The rendered text.
    pub fn render_text(&self) -> Result<String, RuntimeError> {
        let base = std::fs::read_to_string(&self.base)?;
        let entries = match std::fs::read_to_string(self.tenants.path()) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        let base = match std::fs::read_to_string(self.dir.join(crate::credentials::INTERNAL_FILE)) {
            Ok(block) => {
                crate::credentials::replace_internal_block(&base, &block).ok_or_else(|| {
                    RuntimeError::NoInternalBlock {
                        path: self.base.display().to_string(),
                    }
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => base,
            Err(e) => return Err(e.into()),
        };
        render_config(&base, &entries, &self.base.display().to_string())
    }

    /// Writes the rendered configuration (atomically, mode 0600) and returns its path.
    pub fn render(&self) -> Result<PathBuf, RuntimeError> {
        let text = self.render_text()?;
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path();
        write_private(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Records which server runs from this directory (`<dir>/server.json`).
    pub fn write_state(&self, state: &RuntimeState) -> Result<(), RuntimeError> {
        std::fs::create_dir_all(&self.dir)?;
        let json = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        write_private(&self.dir.join(STATE_FILE), &json)?;
        Ok(())
    }

    /// Reads `<dir>/server.json` written by the broker that started the server.
    pub fn read_state(dir: &Path) -> Result<RuntimeState, RuntimeError> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read(&path).map_err(|e| RuntimeError::State {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        serde_json::from_slice(&text).map_err(|e| RuntimeError::State {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The configuration and control of the server recorded in `<dir>/server.json`.
    pub fn from_state_dir(dir: &Path) -> Result<(Self, ServerControl), RuntimeError> {
        let state = Self::read_state(dir)?;
        Ok((
            Self::new(&state.base_config, dir),
            ServerControl {
                pid: state.pid,
                log_file: state.log_file,
                reload_timeout: DEFAULT_RELOAD_TIMEOUT,
            },
        ))
    }
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// What `<runtime dir>/server.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeState {
    /// The server's process id.
    pub pid: u32,
    /// The base configuration the runtime file is rendered from.
    pub base_config: PathBuf,
    /// The rendered configuration the server was started with.
    pub config: PathBuf,
    /// The server's log (reload confirmations are read from it).
    pub log_file: Option<PathBuf>,
    /// Client URL.
    pub url: String,
}

/// How long [`ServerControl::reload`] waits for the server's confirmation by default.
pub const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server to reload.
#[derive(Debug, Clone)]
pub struct ServerControl {
    /// Its process id.
    pub pid: u32,
    /// Its log file: when known, a reload waits for the server's `Reloaded server
    /// configuration` (or its refusal) there; without it, a reload only sends the signal.
    pub log_file: Option<PathBuf>,
    /// How long to wait for the confirmation.
    pub reload_timeout: Duration,
}

fn count_in_log(path: &Path) -> (usize, usize, String) {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    let text = String::from_utf8_lossy(&buf);
    let last_failure = text
        .lines()
        .rev()
        .find(|l| l.contains(RELOAD_FAILED))
        .unwrap_or_default()
        .to_string();
    (
        text.matches(RELOADED).count(),
        text.matches(RELOAD_FAILED).count(),
        last_failure,
    )
}

impl ServerControl {
    /// Signals the server to reload and, when its log is known, waits until it confirms
    /// (the new users are in effect when this returns) or refuses.
    pub async fn reload(&self) -> Result<(), RuntimeError> {
        let Some(log) = self.log_file.clone() else {
            reload(self.pid)?;
            return Ok(());
        };
        let (ok0, failed0, _) = count_in_log(&log);
        reload(self.pid)?;
        let deadline = Instant::now() + self.reload_timeout;
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let (ok, failed, last) = count_in_log(&log);
            if failed > failed0 {
                return Err(RuntimeError::ReloadRefused(last));
            }
            if ok > ok0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(RuntimeError::ReloadTimeout {
                    pid: self.pid,
                    timeout: self.reload_timeout,
                });
            }
        }
    }
}

/// Tenant administration that reaches the server: the quota record in the KV
/// ([`TenantStore`]), the `users` entry in the runtime configuration ([`TenantsConf`]), and
/// a reload of the running server, so that the credentials [`TenantAdmin::create`] returns
/// work as soon as it returns and [`TenantAdmin::delete`] revokes them.
///
/// Create/delete through one `TenantAdmin` (and its clones) are serialised; two processes
/// editing the same runtime directory at once are not.
#[derive(Clone)]
pub struct TenantAdmin {
    store: TenantStore,
    runtime: RuntimeConfig,
    server: ServerControl,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for TenantAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantAdmin")
            .field("runtime", &self.runtime)
            .field("server", &self.server)
            .finish()
    }
}

impl TenantAdmin {
    /// Administers tenants of the server `server` running from `runtime`'s rendered file.
    pub fn new(store: TenantStore, runtime: RuntimeConfig, server: ServerControl) -> Self {
        Self {
            store,
            runtime,
            server,
            lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The quota store.
    pub fn store(&self) -> &TenantStore {
        &self.store
    }

    /// The runtime configuration.
    pub fn runtime(&self) -> &RuntimeConfig {
        &self.runtime
    }

    /// Re-renders the runtime configuration and reloads the server.
    pub async fn apply(&self) -> Result<(), RuntimeError> {
        self.runtime.render()?;
        self.server.reload().await
    }

    /// Creates the tenant (quota record + NATS user) and reloads the server; the returned
    /// credentials work when this returns. On a failed render/reload the tenant is removed
    /// again.
    pub async fn create(&self, name: &str, quota: Quota) -> Result<TenantCredentials, TenantError> {
        let _guard = self.lock.lock().await;
        let creds = self.store.create(name, quota).await?;
        let applied = async {
            self.runtime.tenants().upsert(&creds)?;
            self.apply().await
        }
        .await;
        if let Err(e) = applied {
            let _ = self.runtime.tenants().remove(name);
            let _ = self.runtime.render();
            let _ = self.store.delete(name).await;
            return Err(e.into());
        }
        Ok(creds)
    }

    /// Deletes the tenant's record and NATS user and reloads the server (connections of
    /// the user are closed by the server). The user entry is removed even when the record
    /// is already gone.
    pub async fn delete(&self, name: &str) -> Result<(), TenantError> {
        let _guard = self.lock.lock().await;
        let deleted = self.store.delete(name).await;
        self.runtime.tenants().remove(name)?;
        self.apply().await?;
        deleted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "accounts {\n  A {\n    users: [\n      { user: a, password: b }\n      # @faasmoe-tenants\n    ]\n  }\n}\n";

    #[test]
    fn renders_entries_after_the_marker() {
        let out = render_config(
            BASE,
            "# BEGIN tenant x\n{\n  user: \"tenant-x\"\n}\n# END tenant x\n",
            "base",
        )
        .unwrap();
        assert!(out.contains("      # @faasmoe-tenants\n      # BEGIN tenant x\n      {\n        user: \"tenant-x\"\n      }\n      # END tenant x\n    ]"), "{out}");
        assert_eq!(render_config(BASE, "", "base").unwrap(), BASE);
        assert!(matches!(
            render_config("users: []\n", "{ user: x }\n", "base"),
            Err(RuntimeError::NoMarker { .. })
        ));
        assert_eq!(
            render_config("users: []\n", "", "base").unwrap(),
            "users: []\n"
        );
    }

    #[test]
    fn project_nats_conf_has_the_marker_inside_the_users_array() {
        let text =
            std::fs::read_to_string(crate::server::workspace_root().join("nats.conf")).unwrap();
        let users = text.find("users: [").expect("users array");
        let marker = text
            .find(&format!("\n      {TENANTS_MARKER}\n"))
            .expect("marker line");
        let close = users + text[users..].find("\n    ]").expect("end of users array");
        assert!(users < marker && marker < close);
    }
}
