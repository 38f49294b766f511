//! Admission against tenant quotas, behind a trait: the controller asks, the broker's
//! JetStream-backed store answers (wired by the `faasmoe` binary), so the controller does not
//! depend on how quotas are stored.

use std::any::Any;

use faasmoe_proto::generate::ClientError;
use futures::future::BoxFuture;

/// A reservation made by [`QuotaGate::admit`], given back to [`QuotaGate::settle`].
pub struct QuotaTicket(pub Box<dyn Any + Send + Sync>);

impl std::fmt::Debug for QuotaTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QuotaTicket")
    }
}

/// Admission control for tenants.
pub trait QuotaGate: Send + Sync {
    /// Reserves `prompt_tokens + max_tokens` for `tenant` before any work starts.
    /// Errors: `quota_exceeded` (over a limit or unknown tenant) or `unavailable` (store down).
    fn admit<'a>(
        &'a self,
        tenant: &'a str,
        prompt_tokens: u32,
        max_tokens: u32,
    ) -> BoxFuture<'a, Result<QuotaTicket, ClientError>>;
    /// Ends the request, charging only `tokens` actually processed (prompt + generated).
    fn settle(&self, ticket: QuotaTicket, tokens: u32) -> BoxFuture<'_, ()>;
}

/// No quotas: every tenant is admitted (tests, single-user setups).
#[derive(Debug, Default, Clone, Copy)]
pub struct Unlimited;

impl QuotaGate for Unlimited {
    fn admit<'a>(
        &'a self,
        _tenant: &'a str,
        _p: u32,
        _m: u32,
    ) -> BoxFuture<'a, Result<QuotaTicket, ClientError>> {
        Box::pin(async { Ok(QuotaTicket(Box::new(()))) })
    }
    fn settle(&self, _ticket: QuotaTicket, _tokens: u32) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
