//! The controller's quota gate backed by the broker's JetStream tenant store.

use faasmoe_broker::tenants::{Admission, TenantStore};
use faasmoe_controller::quota::{QuotaGate, QuotaTicket};
use faasmoe_proto::generate::ClientError;
use futures::future::BoxFuture;

/// Admits requests against the tenant records in the `faasmoe_tenants` KV bucket.
pub struct JetStreamQuota(pub TenantStore);

impl QuotaGate for JetStreamQuota {
    fn admit<'a>(
        &'a self,
        tenant: &'a str,
        prompt_tokens: u32,
        max_tokens: u32,
    ) -> BoxFuture<'a, Result<QuotaTicket, ClientError>> {
        Box::pin(async move {
            match self
                .0
                .admit(tenant, prompt_tokens as u64, max_tokens as u64)
                .await
            {
                Ok(a) => Ok(QuotaTicket(Box::new(a))),
                Err(e) => {
                    let w = e.to_wire();
                    Err(ClientError {
                        code: w.code.client_code(),
                        message: w.message,
                    })
                }
            }
        })
    }

    fn settle(&self, ticket: QuotaTicket, tokens: u32) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match ticket.0.downcast::<Admission>() {
                Ok(a) => {
                    if let Err(e) = self.0.settle(*a, tokens as u64).await {
                        tracing::warn!(error = %e, "settling quota failed");
                    }
                }
                Err(_) => tracing::warn!("foreign quota ticket"),
            }
        })
    }
}
