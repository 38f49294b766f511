//! Tenants and their quotas, in the JetStream KV bucket `faasmoe_tenants` (one JSON record
//! per tenant, key = tenant name).
//!
//! [`TenantStore`] is used by the broker's CLI for administration and by controllers for
//! admission: [`TenantStore::admit`] reserves `prompt + max_tokens` tokens and a concurrency
//! slot, [`TenantStore::settle`] releases them and charges only what was processed. Both are
//! compare-and-set updates on the key's revision (`kv.update(key, value, revision)`) retried
//! on conflict, so any number of controllers on any number of connections can admit for
//! the same tenant without lost updates.
//!
//! Tenant credentials: [`TenantStore::create`] generates a random password and returns it
//! once, with the NATS `users` entry ([`TenantCredentials::nats_user_entry`]) that lets the
//! tenant publish only to `faasmoe.v1.generate.<tenant>`. The password is NOT stored in the
//! KV. [`TenantsConf`] keeps such entries in a `tenants.conf` file (one block per tenant,
//! added on create, removed on delete); [`crate::server_config`] renders them into the server's
//! runtime configuration at the `# @faasmoe-tenants` marker and reloads the server
//! (nats-server cannot `include` inside the `users` array), and
//! [`crate::server_config::TenantAdmin`] does all of it on create/delete.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::kv;
use faasmoe_proto::subject;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

mod conf;
mod error;

pub use conf::TenantsConf;
pub use error::{QuotaError, QuotaKind, TenantError};

/// The bucket name.
pub const BUCKET: &str = "faasmoe_tenants";

/// How often a compare-and-set update is retried before giving up.
const CAS_ATTEMPTS: usize = 1000;

/// How many update ids a record remembers ([`TenantRecord::recent_ops`]): more than the
/// updates other writers make while one writer waits out a lost acknowledgement.
pub const RECENT_OPS: usize = 64;

/// How long an update keeps retrying transient store errors (no responders, timeouts,
/// *temporarily unavailable*: a stream leader being elected after a node of the cluster is
/// lost, or the server restarting). JetStream elects a new leader within a few seconds
/// (raft election timeouts of nats-server 2.10+: 4–9 s), so 20 s covers one election with
/// margin; a controller's own request timeout still bounds the client's wait.
const TRANSIENT_RETRY: Duration = Duration::from_secs(20);

/// How long one JetStream API request of the store (read, update) waits for its answer
/// before it is retried (async-nats' default is 5 s). While a stream has no leader its
/// requests go unanswered, so this bounds how late after an election the store notices
/// the new leader; an update that timed out is checked against
/// [`TenantRecord::recent_ops`] before it is sent again, so retrying never charges twice.
const STORE_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A tenant's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Requests in flight at once.
    pub max_concurrent: Option<u32>,
    /// Tokens (prompt + generated, reserved at admission) per one-minute window.
    pub tokens_per_minute: Option<u64>,
    /// Tokens over the tenant's lifetime.
    pub total_tokens: Option<u64>,
}

/// A tenant's consumption.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Requests admitted and not yet settled.
    pub in_flight: u32,
    /// Tokens charged (settled) over the tenant's lifetime.
    pub total_tokens: u64,
    /// Start of the current rate window, seconds since the Unix epoch.
    pub window_start_unix_s: u64,
    /// Tokens counted in the current window (reservations, less refunds).
    pub window_tokens: u64,
    /// Tokens reserved by requests in flight (counted against `total_tokens` quota).
    #[serde(default)]
    pub reserved_tokens: u64,
}

/// The stored record of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Tenant name (a subject token).
    pub name: String,
    /// Limits.
    pub quota: Quota,
    /// Consumption.
    pub usage: Usage,
    /// The tenant's NATS user.
    #[serde(default)]
    pub nats_user: String,
    /// Creation time, seconds since the Unix epoch.
    #[serde(default)]
    pub created_unix_s: u64,
    /// Ids of the last [`RECENT_OPS`] updates written (an admission's id, `settle:<id>`, …),
    /// oldest first. A write whose acknowledgement is lost (a JetStream leader change, a
    /// reconnect) is recognised by its id when the record is read again, so it is neither
    /// applied twice nor lost, even when other writers updated the record meanwhile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_ops: Vec<String>,
    /// bcrypt hash of the tenant's HTTP API key ([`TenantCredentials::api_key`]); `None` for
    /// a tenant created before API keys existed (it has no key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_hash: Option<String>,
}

/// What [`TenantStore::create`] hands out, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantCredentials {
    /// Tenant name.
    pub tenant: String,
    /// NATS user (`tenant-<name>`).
    pub user: String,
    /// Random password (two v4 UUIDs, 244 random bits, hex); shown once, stored nowhere
    /// (the server's configuration holds its bcrypt hash).
    pub password: String,
    /// Bearer API key for the HTTP gateway (`fm-<tenant>.<secret>`, see
    /// [`crate::credentials::api_key`]); shown once, the tenant record holds its bcrypt hash.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_key: String,
}

impl TenantCredentials {
    /// The `users` entry for a `nats.conf`-style account: the password as a bcrypt hash
    /// ([`crate::credentials::hash_password`]), publish only to the tenant's generate
    /// subject, subscribe only to the tenant's own inbox `_INBOX.tenant-<name>.>`
    /// ([`subject::inbox_prefix`]): no other user's replies can reach it.
    pub fn nats_user_entry(&self) -> String {
        let generate = subject::generate(&self.tenant).expect("tenant names are validated");
        let inbox = subject::inbox_prefix(&self.user).expect("tenant users are validated");
        format!(
            "{{\n  user: \"{}\"\n  password: \"{}\"\n  permissions: {{\n    publish: {{ allow: [\"{generate}\"] }}\n    subscribe: {{ allow: [\"{inbox}.>\"] }}\n  }}\n}}",
            self.user,
            crate::credentials::hash_password(&self.password)
        )
    }

    /// The inbox prefix the tenant's clients must use (`_INBOX.tenant-<name>`).
    pub fn inbox_prefix(&self) -> String {
        subject::inbox_prefix(&self.user).expect("tenant users are validated")
    }
}

/// JetStream errors that go away on their own (server starting, meta leader election).
fn is_transient(e: &str) -> bool {
    let e = e.to_lowercase();
    e.contains("no responders")
        || e.contains("temporarily unavailable")
        || e.contains("timed out")
        || e.contains("offline")
        || e.contains("no leader")
        // A stream whose leader was lost answers direct gets with "no stream found" until
        // a new leader is elected (nats-server 2.10+); a bucket really deleted fails after
        // the retry window with the same message.
        || e.contains("no stream found")
        || (e.contains("insufficient resources") && e.contains("peers"))
}

fn store_err(e: impl std::fmt::Display) -> TenantError {
    TenantError::Store(e.to_string())
}

/// A granted admission; pass it to [`TenantStore::settle`] exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[must_use = "an admission holds a concurrency slot and a token reservation until settled"]
pub struct Admission {
    /// Tenant.
    pub tenant: String,
    /// Tokens reserved (prompt + max_tokens).
    pub reserved_tokens: u64,
    /// The rate window the reservation was counted in.
    pub window_start_unix_s: u64,
    /// Admission id, for logs.
    pub id: String,
}

// Controllers call admit/settle per request from spawned tasks and keep the admission in a
// type-erased ticket: both must stay Send + Sync + 'static (and the store cheap to clone).
const _: () = {
    fn assert_send_sync_static<T: Send + Sync + 'static>() {}
    let _ = assert_send_sync_static::<Admission>;
    let _ = assert_send_sync_static::<TenantStore>;
    let _ = assert_send_sync_static::<QuotaError>;
};

/// Options of the tenant bucket.
#[derive(Debug, Clone)]
pub struct TenantStoreConfig {
    /// Bucket name (default [`BUCKET`]).
    pub bucket: String,
    /// Replicas of the bucket's stream (default 1; 3 in a cluster).
    pub replicas: usize,
    /// Length of the rate window (default one minute).
    pub window: Duration,
}

impl Default for TenantStoreConfig {
    fn default() -> Self {
        Self {
            bucket: BUCKET.into(),
            replicas: 1,
            window: Duration::from_secs(60),
        }
    }
}

/// The tenant records in JetStream KV. Cheap to clone.
#[derive(Clone)]
pub struct TenantStore {
    kv: kv::Store,
    window_s: u64,
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TenantStore {
    /// Opens the bucket, creating it if it does not exist.
    ///
    /// Right after a server starts (or while a cluster elects its JetStream meta leader) the
    /// JetStream API answers *no responders* or *temporarily unavailable* for a moment: such
    /// errors are retried for up to 10 s.
    pub async fn open(
        client: async_nats::Client,
        cfg: TenantStoreConfig,
    ) -> Result<Self, TenantError> {
        let mut js = async_nats::jetstream::new(client);
        js.set_timeout(STORE_REQUEST_TIMEOUT);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let kv = loop {
            let attempt = match js.get_key_value(cfg.bucket.clone()).await {
                Ok(kv) => Ok(kv),
                Err(_) => js
                    .create_key_value(kv::Config {
                        bucket: cfg.bucket.clone(),
                        description: "faasmoe tenants: quota and usage (JSON)".into(),
                        history: 1,
                        num_replicas: cfg.replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string()),
            };
            match attempt {
                Ok(kv) => break kv,
                Err(e) if std::time::Instant::now() < deadline && is_transient(&e) => {
                    tracing::debug!(error = %e, "JetStream not ready yet, retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(TenantError::Store(e)),
            }
        };
        Ok(Self {
            kv,
            window_s: cfg.window.as_secs().max(1),
        })
    }

    /// Opens the default bucket (`faasmoe_tenants`, 1 replica).
    pub async fn open_default(client: async_nats::Client) -> Result<Self, TenantError> {
        Self::open(client, TenantStoreConfig::default()).await
    }

    /// Creates a tenant with `quota` and fresh credentials.
    pub async fn create(&self, name: &str, quota: Quota) -> Result<TenantCredentials, TenantError> {
        subject::validate_token("tenant", name)?;
        let creds = TenantCredentials {
            tenant: name.to_string(),
            user: subject::tenant_user(name)?,
            password: crate::credentials::random_secret(),
            api_key: crate::credentials::api_key(name, &crate::credentials::random_secret()),
        };
        let record = TenantRecord {
            name: name.to_string(),
            quota,
            usage: Usage {
                window_start_unix_s: now_s(),
                ..Default::default()
            },
            nats_user: creds.user.clone(),
            created_unix_s: now_s(),
            recent_ops: Vec::new(),
            api_key_hash: Some(crate::credentials::hash_password(&creds.api_key)),
        };
        match self.kv.create(name, encode(&record)).await {
            Ok(_) => Ok(creds),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(TenantError::AlreadyExists(name.into()))
            }
            Err(e) => Err(store_err(e)),
        }
    }

    /// The record and its revision.
    async fn entry(&self, name: &str) -> Result<(TenantRecord, u64), TenantError> {
        subject::validate_token("tenant", name)?;
        match self.kv.entry(name).await.map_err(store_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let rec = serde_json::from_slice(&e.value).map_err(|err| TenantError::Corrupt {
                    name: name.into(),
                    message: err.to_string(),
                })?;
                Ok((rec, e.revision))
            }
            _ => Err(TenantError::UnknownTenant(name.into())),
        }
    }

    /// One tenant's record.
    pub async fn get(&self, name: &str) -> Result<TenantRecord, TenantError> {
        Ok(self.entry(name).await?.0)
    }

    /// Every tenant, by name.
    pub async fn list(&self) -> Result<Vec<TenantRecord>, TenantError> {
        let mut keys: Vec<String> = Vec::new();
        let mut stream = self.kv.keys().await.map_err(store_err)?;
        while let Some(k) = stream.next().await {
            keys.push(k.map_err(store_err)?);
        }
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            match self.get(&k).await {
                Ok(r) => out.push(r),
                Err(TenantError::UnknownTenant(_)) => {} // deleted meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Replaces a tenant's quota (usage is kept).
    pub async fn set_quota(&self, name: &str, quota: Quota) -> Result<TenantRecord, TenantError> {
        let op = format!("quota:{}", uuid::Uuid::new_v4().simple());
        self.modify(name, &op, |r| {
            r.quota = quota;
            Ok::<_, TenantError>(())
        })
        .await
        .map(|(r, _)| r)
    }

    /// The tenant an HTTP API key belongs to: the name it carries
    /// ([`crate::credentials::api_key_tenant`]) when the record's hash matches the key.
    /// `Ok(None)` for a malformed key, an unknown tenant, a tenant without a key or a wrong
    /// key; `Err` only when the store cannot be read.
    pub async fn verify_api_key(&self, key: &str) -> Result<Option<String>, TenantError> {
        let Some(name) = crate::credentials::api_key_tenant(key) else {
            return Ok(None);
        };
        match self.get(name).await {
            Ok(r) => Ok(r
                .api_key_hash
                .as_deref()
                .is_some_and(|h| crate::credentials::verify_password(key, h))
                .then(|| name.to_string())),
            Err(TenantError::UnknownTenant(_)) | Err(TenantError::InvalidName(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A tenant's usage.
    pub async fn usage(&self, name: &str) -> Result<Usage, TenantError> {
        Ok(self.get(name).await?.usage)
    }

    /// Deletes a tenant.
    pub async fn delete(&self, name: &str) -> Result<(), TenantError> {
        self.entry(name).await?;
        self.kv.delete(name).await.map_err(store_err)
    }

    /// Applies `f` to the record with compare-and-set on its revision, retrying on conflict.
    /// `f` may refuse with its own error (then nothing is written).
    ///
    /// `op` names this update and is written into the record ([`TenantRecord::recent_ops`]).
    /// Transient store errors (see [`TRANSIENT_RETRY`]) are retried: when an update's
    /// outcome is unknown (its acknowledgement lost), the record is read again and the update
    /// counts as done if the record carries `op`, so it is applied exactly once.
    async fn modify<T, E>(
        &self,
        name: &str,
        op: &str,
        mut f: impl FnMut(&mut TenantRecord) -> Result<T, E>,
    ) -> Result<(TenantRecord, T), E>
    where
        E: From<TenantError>,
    {
        let deadline = std::time::Instant::now() + TRANSIENT_RETRY;
        let mut unknown: Option<T> = None; // the result of a write whose outcome is unknown
        let mut conflicts = 0;
        while conflicts < CAS_ATTEMPTS {
            let (mut rec, revision) = match self.entry(name).await {
                Ok(e) => e,
                Err(TenantError::Store(e))
                    if is_transient(&e) && std::time::Instant::now() < deadline =>
                {
                    tracing::debug!(tenant = name, op, error = %e, "tenant store unavailable, retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(out) = unknown.take() {
                if rec.recent_ops.iter().any(|o| o == op) {
                    tracing::info!(
                        tenant = name,
                        op,
                        "tenant update acknowledged late: found written"
                    );
                    return Ok((rec, out));
                }
            }
            let out = f(&mut rec)?;
            if rec.recent_ops.len() >= RECENT_OPS {
                rec.recent_ops.drain(..=rec.recent_ops.len() - RECENT_OPS);
            }
            rec.recent_ops.push(op.to_string());
            match self.kv.update(name, encode(&rec), revision).await {
                Ok(_) => return Ok((rec, out)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // Another writer won; back off a little (grows with contention).
                    conflicts += 1;
                    if conflicts > 3 {
                        tokio::time::sleep(Duration::from_micros(100 * (conflicts as u64).min(50)))
                            .await;
                    }
                }
                Err(e)
                    if (e.kind() == kv::UpdateErrorKind::TimedOut
                        || is_transient(&e.to_string()))
                        && std::time::Instant::now() < deadline =>
                {
                    tracing::warn!(tenant = name, op, error = %e, "tenant update outcome unknown, reading it back");
                    unknown = Some(out);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(store_err(e).into()),
            }
        }
        Err(TenantError::Store(format!(
            "tenant `{name}`: gave up after {CAS_ATTEMPTS} conflicting updates"
        ))
        .into())
    }

    /// Admits one request of `prompt_tokens` that may generate up to `max_tokens`: checks
    /// concurrency, the rate window and the total budget against the reservation
    /// `prompt_tokens + max_tokens`, then counts it in flight and reserves the tokens.
    pub async fn admit(
        &self,
        name: &str,
        prompt_tokens: u64,
        max_tokens: u64,
    ) -> Result<Admission, QuotaError> {
        let reserve = prompt_tokens.saturating_add(max_tokens);
        let window_s = self.window_s;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (_, window_start) = self
            .modify(name, &format!("admit:{id}"), |r| {
                let now = now_s();
                let u = &mut r.usage;
                if now >= u.window_start_unix_s.saturating_add(window_s) || u.window_start_unix_s > now {
                    u.window_start_unix_s = now - now % window_s;
                    u.window_tokens = 0;
                }
                let q = r.quota;
                if let Some(max) = q.max_concurrent {
                    if u.in_flight >= max {
                        return Err(QuotaError::QuotaExceeded {
                            which: QuotaKind::Concurrency,
                            message: format!("{} of {max} concurrent requests in flight", u.in_flight),
                        });
                    }
                }
                if let Some(tpm) = q.tokens_per_minute {
                    if u.window_tokens.saturating_add(reserve) > tpm {
                        return Err(QuotaError::QuotaExceeded {
                            which: QuotaKind::TokensPerMinute,
                            message: format!(
                                "{} tokens used in this window, request needs {reserve}, limit {tpm} per {window_s} s",
                                u.window_tokens
                            ),
                        });
                    }
                }
                if let Some(total) = q.total_tokens {
                    let committed = u.total_tokens.saturating_add(u.reserved_tokens);
                    if committed.saturating_add(reserve) > total {
                        return Err(QuotaError::QuotaExceeded {
                            which: QuotaKind::TotalTokens,
                            message: format!(
                                "{} tokens used and {} reserved, request needs {reserve}, budget {total}",
                                u.total_tokens, u.reserved_tokens
                            ),
                        });
                    }
                }
                u.in_flight += 1;
                u.reserved_tokens = u.reserved_tokens.saturating_add(reserve);
                u.window_tokens = u.window_tokens.saturating_add(reserve);
                Ok(u.window_start_unix_s)
            })
            .await?;
        Ok(Admission {
            tenant: name.to_string(),
            reserved_tokens: reserve,
            window_start_unix_s: window_start,
            id,
        })
    }

    /// Ends an admitted request: frees its concurrency slot and reservation and charges
    /// `actual_tokens` (clamped to the reservation; a failed request passes what it got
    /// processed). The unused part is refunded to the rate window it was counted in.
    /// Returns the usage after the update.
    pub async fn settle(
        &self,
        admission: Admission,
        actual_tokens: u64,
    ) -> Result<Usage, QuotaError> {
        let charge = actual_tokens.min(admission.reserved_tokens);
        let (rec, _) = self
            .modify(
                &admission.tenant,
                &format!("settle:{}", admission.id),
                |r| {
                    let u = &mut r.usage;
                    u.in_flight = u.in_flight.saturating_sub(1);
                    u.reserved_tokens = u.reserved_tokens.saturating_sub(admission.reserved_tokens);
                    u.total_tokens = u.total_tokens.saturating_add(charge);
                    if u.window_start_unix_s == admission.window_start_unix_s {
                        u.window_tokens = u
                            .window_tokens
                            .saturating_sub(admission.reserved_tokens - charge);
                    }
                    Ok::<_, QuotaError>(())
                },
            )
            .await?;
        Ok(rec.usage)
    }
}

fn encode(rec: &TenantRecord) -> bytes::Bytes {
    bytes::Bytes::from(serde_json::to_vec(rec).expect("tenant records serialise"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_conf_blocks_are_added_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let conf = TenantsConf::in_dir(dir.path());
        let a = TenantCredentials {
            tenant: "a".into(),
            user: "tenant-a".into(),
            password: "pa".into(),
            api_key: String::new(),
        };
        let b = TenantCredentials {
            tenant: "b".into(),
            user: "tenant-b".into(),
            password: "pb".into(),
            api_key: String::new(),
        };
        conf.upsert(&a).unwrap();
        conf.upsert(&b).unwrap();
        conf.upsert(&TenantCredentials {
            password: "pa2".into(),
            ..a.clone()
        })
        .unwrap();
        let text = std::fs::read_to_string(conf.path()).unwrap();
        // One block per tenant, the replaced one holding the new password's hash; no plaintext.
        assert_eq!(text.matches("user: \"tenant-a\"").count(), 1, "{text}");
        let hash_of_a = text
            .split("user: \"tenant-a\"")
            .nth(1)
            .and_then(|t| t.split('"').nth(1))
            .unwrap()
            .to_string();
        assert!(
            crate::credentials::verify_password("pa2", &hash_of_a)
                && !crate::credentials::verify_password("pa", &hash_of_a),
            "{text}"
        );
        assert!(
            !text.contains("pa2")
                && !text.contains("\"pa\"")
                && text.contains("faasmoe.v1.generate.b"),
            "{text}"
        );
        conf.remove("a").unwrap();
        let text = std::fs::read_to_string(conf.path()).unwrap();
        assert!(!text.contains("tenant-a") && text.contains("tenant-b"));
    }
}
