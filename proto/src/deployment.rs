//! The deployment registry: how a model's routed experts are deployed as functions, kept in
//! the JetStream KV bucket [`BUCKET`] (one JSON [`DeploymentRecord`] per model id).
//!
//! The broker is the one source of truth for a deployment: it writes its record when it
//! starts ([`register`]). A controller reads it ([`lookup`]) and takes the granularity from
//! it instead of being told again; a controller given a granularity, or loading a checkpoint,
//! that disagrees with the record refuses to start with [`DeploymentMismatch`] naming the
//! field, rather than sending requests to subjects no function serves.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

/// The JetStream KV bucket of deployment records (key: the model id).
pub const BUCKET: &str = "faasmoe_deployments";

/// How long one registry request may take before it counts as unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// One model's deployment as the broker runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Model id in subjects (`faasmoe.v1.expert.<model_id>.…`); also the record's key.
    pub model_id: String,
    /// Routed experts per function.
    pub granularity: u32,
    /// Routed experts per MoE layer of the deployed checkpoint (`num_experts`).
    pub num_experts: u32,
    /// The deployed checkpoint's MoE layer indices, ascending.
    pub moe_layers: Vec<u32>,
}

/// A controller's view of the deployment disagrees with the registry's record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the deployment of model {model_id:?} registered by the broker (JetStream KV bucket \
     {BUCKET}) has {field} = {registered}, but this controller has {ours} ({hint})"
)]
pub struct DeploymentMismatch {
    /// The model id.
    pub model_id: String,
    /// The field that differs: `granularity`, `num_experts` or `moe_layers`.
    pub field: &'static str,
    /// The registered value.
    pub registered: String,
    /// This controller's value.
    pub ours: String,
    /// What to change.
    pub hint: &'static str,
}

impl DeploymentRecord {
    /// The record of `layout` deployed as `model_id`.
    pub fn new(model_id: impl Into<String>, layout: &crate::layout::Layout) -> Self {
        Self {
            model_id: model_id.into(),
            granularity: layout.granularity,
            num_experts: layout.num_experts,
            moe_layers: layout.moe_layers(),
        }
    }

    /// Checks the record against a controller's checkpoint (`num_experts`, `moe_layers`) and
    /// its `--granularity` (`None`: not given; clamped to `1..=num_experts` as
    /// [`Layout::new`](crate::layout::Layout::new) does), and returns the granularity to use:
    /// the record's.
    ///
    /// Errors: [`DeploymentMismatch`] naming the first field that differs.
    pub fn check(
        &self,
        num_experts: u32,
        moe_layers: &[u32],
        granularity: Option<u32>,
    ) -> Result<u32, DeploymentMismatch> {
        let mismatch = |field, registered: String, ours: String, hint| DeploymentMismatch {
            model_id: self.model_id.clone(),
            field,
            registered,
            ours,
            hint,
        };
        if self.num_experts != num_experts {
            return Err(mismatch(
                "num_experts",
                self.num_experts.to_string(),
                num_experts.to_string(),
                "controller and broker must load the same checkpoint",
            ));
        }
        if self.moe_layers != moe_layers {
            return Err(mismatch(
                "moe_layers",
                format!("{:?}", self.moe_layers),
                format!("{moe_layers:?}"),
                "controller and broker must load the same checkpoint",
            ));
        }
        match granularity {
            Some(g) if g.clamp(1, num_experts.max(1)) != self.granularity => Err(mismatch(
                "granularity",
                self.granularity.to_string(),
                g.to_string(),
                "leave out --granularity to use the broker's, or restart the broker with this one",
            )),
            _ => Ok(self.granularity),
        }
    }
}

/// The registry could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// JetStream or the bucket is not there (no broker has registered yet, JetStream is
    /// off, or this user may not read it), or a request failed.
    #[error("deployment registry (JetStream KV bucket {BUCKET}) unavailable: {0}")]
    Unavailable(String),
    /// A record is not a [`DeploymentRecord`].
    #[error("deployment record {key:?} in {BUCKET} is malformed: {source}")]
    Malformed {
        /// The key (model id).
        key: String,
        /// The parse error.
        source: serde_json::Error,
    },
}

fn context(client: &async_nats::Client) -> jetstream::Context {
    let mut js = jetstream::new(client.clone());
    js.set_timeout(REQUEST_TIMEOUT);
    js
}

/// Writes `record` under its model id, creating the bucket (history 1, `replicas` copies)
/// when it is missing. A record of the same model id is replaced: the broker that started
/// last defines the deployment.
///
/// Errors: [`RegistryError::Unavailable`] when JetStream refuses the bucket or the write.
pub async fn register(
    client: &async_nats::Client,
    record: &DeploymentRecord,
    replicas: usize,
) -> Result<(), RegistryError> {
    let js = context(client);
    let unavailable = |e: &dyn std::fmt::Display| RegistryError::Unavailable(e.to_string());
    let store = match js.get_key_value(BUCKET).await {
        Ok(s) => s,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: BUCKET.into(),
                description: "faasmoe deployments: granularity and layers per model (JSON)".into(),
                history: 1,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&e))?,
    };
    store
        .put(&record.model_id, crate::encode_json(record))
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(())
}

/// Removes the record of `model_id` (a broker stopping): a controller starting later waits
/// for the next broker instead of trusting a layout nobody serves.
///
/// Errors: [`RegistryError::Unavailable`] when the bucket or the delete fails.
pub async fn unregister(client: &async_nats::Client, model_id: &str) -> Result<(), RegistryError> {
    let unavailable = |e: &dyn std::fmt::Display| RegistryError::Unavailable(e.to_string());
    let store = context(client)
        .get_key_value(BUCKET)
        .await
        .map_err(|e| unavailable(&e))?;
    store.delete(model_id).await.map_err(|e| unavailable(&e))
}

/// Reads the record of `model_id`; `Ok(None)` when the bucket has none.
///
/// Errors: [`RegistryError::Unavailable`] (no bucket, no JetStream, no permission, a failed
/// request), [`RegistryError::Malformed`].
pub async fn lookup(
    client: &async_nats::Client,
    model_id: &str,
) -> Result<Option<DeploymentRecord>, RegistryError> {
    let js = context(client);
    let store = js
        .get_key_value(BUCKET)
        .await
        .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
    let Some(body) = store
        .get(model_id)
        .await
        .map_err(|e| RegistryError::Unavailable(e.to_string()))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|source| RegistryError::Malformed {
            key: model_id.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DeploymentRecord {
        DeploymentRecord {
            model_id: "m".into(),
            granularity: 4,
            num_experts: 60,
            moe_layers: vec![0, 1],
        }
    }

    #[test]
    fn the_record_decides_the_granularity_unless_the_controller_disagrees() {
        let r = record();
        assert_eq!(r.check(60, &[0, 1], None), Ok(4));
        assert_eq!(r.check(60, &[0, 1], Some(4)), Ok(4));
        let e = r.check(60, &[0, 1], Some(1)).unwrap_err();
        assert_eq!(
            (e.field, e.registered.as_str(), e.ours.as_str()),
            ("granularity", "4", "1")
        );
        assert!(e.to_string().contains("granularity = 4"), "{e}");
        assert_eq!(r.check(64, &[0, 1], None).unwrap_err().field, "num_experts");
        assert_eq!(r.check(60, &[0], Some(4)).unwrap_err().field, "moe_layers");
    }

    #[test]
    fn a_layouts_record_names_its_layers_once() {
        let layout = crate::layout::Layout::new(&[1, 3], 10, 4);
        let r = DeploymentRecord::new("m", &layout);
        assert_eq!(
            (r.granularity, r.num_experts, r.moe_layers.clone()),
            (4, 10, vec![1, 3])
        );
        assert_eq!(
            r.check(10, &[1, 3], Some(64)).unwrap_err().field,
            "granularity"
        );
        assert_eq!(
            DeploymentRecord::new("m", &crate::layout::Layout::new(&[1], 10, 64)).check(
                10,
                &[1],
                Some(64)
            ),
            Ok(10)
        );
    }

    #[test]
    fn records_round_trip_as_json() {
        let r = record();
        let back: DeploymentRecord = serde_json::from_slice(&crate::encode_json(&r)).unwrap();
        assert_eq!(back, r);
    }
}
