//! Why a tenant operation or an admission failed: [`TenantError`], [`QuotaError`] and the
//! quota that refused ([`QuotaKind`]).

use super::*;

/// The quota that refused an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaKind {
    /// `max_concurrent`.
    Concurrency,
    /// `tokens_per_minute`.
    TokensPerMinute,
    /// `total_tokens`.
    TotalTokens,
}

impl std::fmt::Display for QuotaKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Concurrency => "concurrency",
            Self::TokensPerMinute => "tokens_per_minute",
            Self::TotalTokens => "total_tokens",
        })
    }
}

/// Why an admission (or settlement) failed.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// No such tenant.
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
    /// A quota is exhausted (client code `quota_exceeded`).
    #[error("{which} quota exceeded: {message}")]
    QuotaExceeded {
        /// Which quota.
        which: QuotaKind,
        /// Details for the client.
        message: String,
    },
    /// The KV store failed (client code `unavailable`).
    #[error("tenant store: {0}")]
    Store(String),
}

impl QuotaError {
    /// The wire error for the client API.
    pub fn to_wire(&self) -> faasmoe_proto::WireError {
        use faasmoe_proto::ErrorCode;
        let code = match self {
            Self::UnknownTenant(_) => ErrorCode::BadRequest,
            Self::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
            Self::Store(_) => ErrorCode::Unavailable,
        };
        faasmoe_proto::WireError::new(code, self.to_string())
    }
}

/// Why an administrative operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The name is not a valid subject token.
    #[error("invalid tenant name: {0}")]
    InvalidName(#[from] subject::SubjectError),
    /// `create` of a tenant that exists.
    #[error("tenant `{0}` already exists")]
    AlreadyExists(String),
    /// No such tenant.
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
    /// A stored record is not valid JSON.
    #[error("tenant `{name}`: corrupt record: {message}")]
    Corrupt {
        /// Tenant.
        name: String,
        /// Parse error.
        message: String,
    },
    /// The KV store failed.
    #[error("tenant store: {0}")]
    Store(String),
    /// The server did not take the new users (render or reload failed).
    #[error("nats-server: {0}")]
    Server(String),
    /// Writing `tenants.conf` failed.
    #[error("tenants.conf: {0}")]
    Conf(#[from] std::io::Error),
}

impl From<TenantError> for QuotaError {
    fn from(e: TenantError) -> Self {
        match e {
            TenantError::UnknownTenant(n) => Self::UnknownTenant(n),
            other => Self::Store(other.to_string()),
        }
    }
}
