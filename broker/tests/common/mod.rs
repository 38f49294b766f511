//! Pieces shared by the broker's end-to-end tests.

use faasmoe_broker::{Admission, TenantStore};
use faasmoe_controller::quota::{QuotaGate, QuotaTicket};
use faasmoe_proto::generate::{ClientError, ClientErrorCode};
use futures::future::BoxFuture;

/// The controller's quota gate over the JetStream store (what the CLI crate wires).
pub struct KvQuota(pub TenantStore);

impl QuotaGate for KvQuota {
    fn admit<'a>(
        &'a self,
        tenant: &'a str,
        prompt_tokens: u32,
        max_tokens: u32,
    ) -> BoxFuture<'a, Result<QuotaTicket, ClientError>> {
        Box::pin(async move {
            match self
                .0
                .admit(tenant, prompt_tokens.into(), max_tokens.into())
                .await
            {
                Ok(a) => Ok(QuotaTicket(Box::new(a))),
                Err(e) => {
                    let code = if matches!(e, faasmoe_broker::QuotaError::Store(_)) {
                        ClientErrorCode::Unavailable
                    } else {
                        ClientErrorCode::QuotaExceeded
                    };
                    Err(ClientError {
                        code,
                        message: e.to_string(),
                    })
                }
            }
        })
    }
    fn settle(&self, ticket: QuotaTicket, tokens: u32) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Ok(a) = ticket.0.downcast::<Admission>() {
                let _ = self.0.settle(*a, tokens.into()).await;
            }
        })
    }
}

/// Writes the `tiny` preset checkpoint (random weights, seed 7) to `dir/<name>` and returns
/// that directory.
#[allow(dead_code)] // not every test that includes this module writes a checkpoint
pub fn tiny_checkpoint(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let model_dir = dir.join(name);
    let g = faasmoe_model::random_checkpoint::preset("tiny").unwrap();
    faasmoe_model::random_checkpoint::write_checkpoint(
        &model_dir,
        &g,
        7,
        faasmoe_model::random_checkpoint::DEFAULT_MAX_SHARD_BYTES,
        |_, _| {},
    )
    .unwrap();
    model_dir
}
