//! The lifecycle events of a model's expert functions as `faasmoe demo` and `faasmoe bench`
//! record them: per instance its cold start, when each became ready, how many started.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use faasmoe_proto::events::{EventKind, FunctionEvent};
use futures::StreamExt;

/// What the function events told so far (shared with the task that records them).
#[derive(Debug, Default)]
pub struct FunctionEvents {
    /// The longest cold start (spawn → ready, ms) per instance.
    pub cold: Arc<Mutex<BTreeMap<String, f64>>>,
    /// When each `ready` event arrived.
    pub ready_at: Arc<Mutex<Vec<tokio::time::Instant>>>,
    /// Instances started (`started` events).
    pub spawned: Arc<Mutex<usize>>,
}

impl FunctionEvents {
    /// Subscribes to `model_id`'s function events and records them until the returned task
    /// is aborted.
    ///
    /// Errors: an invalid model id or a failed subscription.
    pub async fn watch(
        client: &async_nats::Client,
        model_id: &str,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let this = Self::default();
        let mut events = client
            .subscribe(faasmoe_proto::subject::events(model_id)?)
            .await?;
        let (cold, spawned, ready_at) = (
            this.cold.clone(),
            this.spawned.clone(),
            this.ready_at.clone(),
        );
        let task = tokio::spawn(async move {
            while let Some(m) = events.next().await {
                let Ok(e) = FunctionEvent::decode(&m.payload) else {
                    continue;
                };
                match e.kind {
                    EventKind::Started => *spawned.lock().unwrap() += 1,
                    EventKind::Ready => {
                        ready_at.lock().unwrap().push(tokio::time::Instant::now());
                        if let Some(ms) = e.cold_start_ms {
                            let mut c = cold.lock().unwrap();
                            let v = c.entry(e.instance_id).or_insert(0.0);
                            *v = v.max(ms);
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok((this, task))
    }

    /// The cold starts so far (spawn → ready, ms), one per instance.
    pub fn cold_starts(&self) -> Vec<f64> {
        self.cold.lock().unwrap().values().copied().collect()
    }

    /// When the instances became ready, s since `origin` (negative before it).
    pub fn ready_since(&self, origin: tokio::time::Instant) -> Vec<f64> {
        self.ready_at
            .lock()
            .unwrap()
            .iter()
            .map(|&t| {
                if t >= origin {
                    (t - origin).as_secs_f64()
                } else {
                    -(origin - t).as_secs_f64()
                }
            })
            .collect()
    }
}

/// Whether an instance became ready (a time of `ready_at_s`) between `from_s` and `to_s`
/// (inclusive, s on the same clock): a request sent at `from_s` that ended, or got its first
/// token, at `to_s` then may have waited on a cold start.
pub fn ready_between(ready_at_s: &[f64], from_s: f64, to_s: f64) -> bool {
    ready_at_s.iter().any(|&t| t >= from_s && t <= to_s)
}
