//! How a faasmoe process reaches NATS and as whom: the `--nats-url`, `--nats-user` and
//! `--nats-password` flags (also read from `NATS_URL`, `NATS_USER`, `NATS_PASSWORD`, the
//! variables of the `nats` CLI) and the one connect call every faasmoe process makes.
//!
//! The subjects a user may publish to are granted by the server per user (see `nats.conf`),
//! so the credentials are part of the contract: the controller connects as `controller`,
//! workers as `worker`, the broker as `broker`, the HTTP gateway as `gateway`, tenants as
//! themselves.

use crate::subject;

/// The internal users (`controller`, `worker`, `broker`) and the example tenant `tenant-demo`
/// of the project's `nats.conf` with their PUBLISHED development passwords (`nats.conf` holds
/// their bcrypt hashes). For tests and loopback development only: the broker refuses to start
/// a server with them that listens beyond loopback, and `faasmoe up` generates passwords per
/// deployment instead.
pub mod dev_users {
    /// Internal: the control plane.
    pub const CONTROLLER: (&str, &str) = ("controller", "faasmoe-controller-dev");
    /// Internal: expert function instances.
    pub const WORKER: (&str, &str) = ("worker", "faasmoe-worker-dev");
    /// Internal: the FaaS broker (activation, administration, JetStream).
    pub const BROKER: (&str, &str) = ("broker", "faasmoe-broker-dev");
    /// Internal: the OpenAI-compatible HTTP gateway (publishes any tenant's generate subject
    /// on behalf of a caller whose API key it verified, reads the tenant records).
    pub const GATEWAY: (&str, &str) = ("gateway", "faasmoe-gateway-dev");
    /// Example tenant: publishes only to `faasmoe.v1.generate.demo`, subscribes only to
    /// `_INBOX.tenant-demo.>`.
    pub const TENANT_DEMO: (&str, &str) = ("tenant-demo", "faasmoe-tenant-demo-dev");
    /// All of them.
    pub const ALL: [(&str, &str); 5] = [CONTROLLER, WORKER, BROKER, GATEWAY, TENANT_DEMO];
}

/// The server a process connects to when no URL is given (nats-server's default port).
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// NATS connection flags, flattened into a process's settings
/// (`#[command(flatten)] nats: NatsArgs`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma separated.
    #[arg(long = "nats-url", env = "NATS_URL", default_value = DEFAULT_NATS_URL)]
    pub url: String,
    /// NATS user (with --nats-password).
    #[arg(long = "nats-user", env = "NATS_USER")]
    pub user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(long = "nats-password", env = "NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

impl NatsArgs {
    /// Server `url` without credentials.
    pub fn anonymous(url: impl Into<String>) -> Self {
        NatsArgs {
            url: url.into(),
            user: None,
            password: None,
        }
    }

    /// Server `url` as `user` with `password`.
    pub fn with_user(
        url: impl Into<String>,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        NatsArgs {
            url: url.into(),
            user: Some(user.into()),
            password: Some(password.into()),
        }
    }

    /// Connects, naming the connection `name` (shown by the server's `/connz` and logs).
    ///
    /// Errors: [`ConnectionError`] with the URL, for an unreachable server, refused
    /// credentials, or a user given without a password (or the other way round).
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, ConnectionError> {
        connect(
            &self.url,
            self.user.as_deref(),
            self.password.as_deref(),
            name,
        )
        .await
    }

    /// As [`NatsArgs::connect`], with the connection's inboxes (its request replies) under
    /// `inbox_prefix` instead of the user's [`subject::inbox_prefix`]: a requester's
    /// [`subject::reply_prefix`], which the project's `nats.conf` lets the broker and the
    /// workers answer on explicitly (`faasmoe.v1.reply.>`).
    ///
    /// Errors: as [`NatsArgs::connect`].
    pub async fn connect_with_inbox_prefix(
        &self,
        name: &str,
        inbox_prefix: &str,
    ) -> Result<async_nats::Client, ConnectionError> {
        let options = connect_options(
            &self.url,
            self.user.as_deref(),
            self.password.as_deref(),
            name,
            async_nats::ConnectOptions::new(),
        )?
        .custom_inbox_prefix(inbox_prefix);
        open(&self.url, options).await
    }

    /// As [`NatsArgs::connect`], starting from `options` (e.g. with an `event_callback`);
    /// the name and the credentials are set on top of them, as [`connect`] does.
    ///
    /// Errors: as [`NatsArgs::connect`].
    pub async fn connect_with(
        &self,
        name: &str,
        options: async_nats::ConnectOptions,
    ) -> Result<async_nats::Client, ConnectionError> {
        connect_with(
            &self.url,
            self.user.as_deref(),
            self.password.as_deref(),
            name,
            options,
        )
        .await
    }
}

/// A failed connection to NATS, with the URL it was for.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The server could not be reached or refused the connection (credentials included).
    #[error("connecting to NATS at {url}")]
    Connect {
        /// The URL(s) given.
        url: String,
        /// What async-nats reported.
        #[source]
        source: async_nats::ConnectError,
    },
    /// Only one of user and password was given.
    #[error("connecting to NATS at {url}: a user needs a password and a password a user (got only the {given})")]
    HalfCredentials {
        /// The URL(s) given.
        url: String,
        /// `"user"` or `"password"`.
        given: &'static str,
    },
}

/// Connects to `url` (comma separated for several servers) as `user`/`password` when both
/// are given, anonymously when neither is, naming the connection `name`.
///
/// With a user, the connection's inboxes (request replies, JetStream API replies) are created
/// under [`subject::inbox_prefix`]`(user)`, the only inboxes the project's `nats.conf` lets
/// that user subscribe to.
///
/// Errors: see [`NatsArgs::connect`].
pub async fn connect(
    url: &str,
    user: Option<&str>,
    password: Option<&str>,
    name: &str,
) -> Result<async_nats::Client, ConnectionError> {
    connect_with(url, user, password, name, async_nats::ConnectOptions::new()).await
}

/// The most a faasmoe process waits between two reconnect attempts, ms.
pub const MAX_RECONNECT_DELAY_MS: u64 = 250;

/// Delay before reconnect attempt `attempts` (0-based): 0, 50, 100, 150, 200, then
/// [`MAX_RECONNECT_DELAY_MS`]. async-nats' default doubles up to 4 s, so a server back after
/// 1 s can be found only ≈ 2 s after the loss; this keeps recovery from a restart within a
/// few hundred ms of the server's return, at one connection attempt per 250 ms while it is down.
pub fn reconnect_delay(attempts: usize) -> std::time::Duration {
    std::time::Duration::from_millis((attempts as u64 * 50).min(MAX_RECONNECT_DELAY_MS))
}

/// As [`connect`], starting from `options` (e.g. with an `event_callback`); the reconnect
/// delay is [`reconnect_delay`].
///
/// Errors: see [`NatsArgs::connect`].
pub async fn connect_with(
    url: &str,
    user: Option<&str>,
    password: Option<&str>,
    name: &str,
    options: async_nats::ConnectOptions,
) -> Result<async_nats::Client, ConnectionError> {
    open(url, connect_options(url, user, password, name, options)?).await
}

/// The options [`connect_with`] connects with: `options` plus the name, the reconnect delay,
/// the credentials and the user's inbox prefix.
fn connect_options(
    url: &str,
    user: Option<&str>,
    password: Option<&str>,
    name: &str,
    options: async_nats::ConnectOptions,
) -> Result<async_nats::ConnectOptions, ConnectionError> {
    let mut opts = options.name(name).reconnect_delay_callback(reconnect_delay);
    match (user, password) {
        (Some(u), Some(p)) => {
            opts = opts.user_and_password(u.into(), p.into());
            if let Ok(prefix) = subject::inbox_prefix(u) {
                opts = opts.custom_inbox_prefix(prefix);
            }
            Ok(opts)
        }
        (None, None) => Ok(opts),
        (Some(_), None) => Err(ConnectionError::HalfCredentials {
            url: url.into(),
            given: "user",
        }),
        (None, Some(_)) => Err(ConnectionError::HalfCredentials {
            url: url.into(),
            given: "password",
        }),
    }
}

async fn open(
    url: &str,
    options: async_nats::ConnectOptions,
) -> Result<async_nats::Client, ConnectionError> {
    options
        .connect(url)
        .await
        .map_err(|source| ConnectionError::Connect {
            url: url.into(),
            source,
        })
}

/// Whether something answers requests on `subject` within `timeout`: sends `body` once and
/// counts any reply, error replies included. With a body the server refuses as malformed (an
/// empty one for `faasmoe.v1.generate.<tenant>`, `{}` for `faasmoe.v1.activate.<model>`) this
/// checks that a controller, baseline or broker serves, without admitting, queueing or
/// activating anything. `false` for no responders, a timeout or a lost connection.
pub async fn answers(
    client: &async_nats::Client,
    subject: String,
    body: &'static [u8],
    timeout: std::time::Duration,
) -> bool {
    matches!(
        tokio::time::timeout(
            timeout,
            client.request(subject, bytes::Bytes::from_static(body))
        )
        .await,
        Ok(Ok(_))
    )
}

/// Waits until [`answers`] holds for every subject, probing each every `every` until `limit`.
/// Returns the subjects still silent at the limit (empty: all answer).
pub async fn wait_answering(
    client: &async_nats::Client,
    probes: &[(String, &'static [u8])],
    every: std::time::Duration,
    limit: std::time::Duration,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut silent: Vec<(String, &'static [u8])> = probes.to_vec();
    loop {
        let mut still = Vec::new();
        for (subject, body) in silent {
            if !answers(
                client,
                subject.clone(),
                body,
                every.max(std::time::Duration::from_secs(2)),
            )
            .await
            {
                still.push((subject, body));
            }
        }
        silent = still;
        if silent.is_empty() || tokio::time::Instant::now() >= deadline {
            return silent.into_iter().map(|(s, _)| s).collect();
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        nats: NatsArgs,
    }

    #[test]
    fn flags_parse_with_the_documented_names_and_default() {
        let c = Cli::try_parse_from(["x"]).unwrap();
        if std::env::var_os("NATS_URL").is_none() {
            assert_eq!(c.nats.url, DEFAULT_NATS_URL);
        }
        let c = Cli::try_parse_from([
            "x",
            "--nats-url",
            "nats://h:1",
            "--nats-user",
            "u",
            "--nats-password",
            "p",
        ])
        .unwrap();
        assert_eq!(c.nats, NatsArgs::with_user("nats://h:1", "u", "p"));
    }

    #[tokio::test]
    async fn half_credentials_are_refused_before_connecting() {
        let e = connect("nats://127.0.0.1:1", Some("u"), None, "t")
            .await
            .unwrap_err();
        assert!(
            matches!(e, ConnectionError::HalfCredentials { given: "user", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("nats://127.0.0.1:1"));
    }
}
