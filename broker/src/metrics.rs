//! The broker's Prometheus metrics (`faasmoe-broker run --metrics-listen`): instances by
//! function and state, cold starts (count and spawn → READY histogram), and the expert
//! workers' own counters, gathered from their NATS micro service `$SRV.STATS` at each scrape
//! (workers are short-lived processes, so they are scraped through the broker that spawned
//! them rather than one by one).
//!
//! Worker counters are cumulative per function: the broker adds the last stats it saw of an
//! instance that has since exited to a retired total, so a counter never goes down when an
//! instance scales to zero (what an exiting instance did after the last scrape is not seen).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faasmoe_telemetry::metrics as m;
use futures::StreamExt;
use serde::Deserialize;

use crate::activation::{Activator, InstanceState};

/// How long a scrape waits for the workers' `$SRV.STATS` answers.
pub const STATS_WAIT: Duration = Duration::from_millis(500);

/// The counters of one instance that the broker exports (a subset of the worker's
/// `WorkerStats`, read from its `$SRV.STATS` endpoint data).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct Counters {
    requests: u64,
    batches: u64,
    rows: u64,
    cross_tenant_batches: u64,
    busy_ms: f64,
    max_batch_requests: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.requests += o.requests;
        self.batches += o.batches;
        self.rows += o.rows;
        self.cross_tenant_batches += o.cross_tenant_batches;
        self.busy_ms += o.busy_ms;
        self.max_batch_requests = self.max_batch_requests.max(o.max_batch_requests);
    }
}

#[derive(Debug, Deserialize)]
struct StatsReply {
    #[serde(default)]
    endpoints: Vec<EndpointStats>,
}

#[derive(Debug, Deserialize)]
struct EndpointStats {
    #[serde(default)]
    data: Option<WorkerData>,
}

#[derive(Debug, Deserialize)]
struct WorkerData {
    function_id: String,
    instance_id: String,
    #[serde(flatten)]
    counters: Counters,
}

#[derive(Default)]
struct State {
    /// Last stats seen per live instance: (function id, counters).
    last: HashMap<String, (String, Counters)>,
    /// Per function, the last stats of instances that have exited.
    retired: BTreeMap<String, Counters>,
    /// Instance gauges set so far (function id, state), to zero the ones that empty.
    gauges: BTreeSet<(String, &'static str)>,
}

/// The broker's metrics: call [`BrokerMetrics::refresh`] before each render.
#[derive(Clone)]
pub struct BrokerMetrics {
    activator: Activator,
    client: async_nats::Client,
    state: Arc<Mutex<State>>,
}

impl BrokerMetrics {
    /// Metrics of `activator`'s instances; `client` asks the workers for their stats.
    pub fn new(activator: Activator, client: async_nats::Client) -> Self {
        Self {
            activator,
            client,
            state: Arc::default(),
        }
    }

    /// Sets the gauges and counters from the activator's records and the live workers'
    /// `$SRV.STATS` (waiting up to [`STATS_WAIT`] for their answers).
    pub async fn refresh(&self) {
        let live = self.activator.instances();
        metrics::counter!(m::COLD_STARTS).absolute(self.activator.spawn_count());
        let answered = self.worker_stats(&live).await;
        let mut st = self.state.lock().unwrap();
        // Instance gauges.
        let mut now: BTreeMap<(String, &'static str), f64> = BTreeMap::new();
        for i in &live {
            let state = match i.state {
                InstanceState::Starting => "starting",
                InstanceState::Ready => "ready",
                InstanceState::Draining => "draining",
                InstanceState::Exited => continue,
            };
            *now.entry((i.function_id.clone(), state)).or_default() += 1.0;
        }
        for key in st.gauges.iter() {
            if !now.contains_key(key) {
                metrics::gauge!(m::INSTANCES, "function_id" => key.0.clone(), "state" => key.1)
                    .set(0.0);
            }
        }
        for ((f, s), n) in &now {
            metrics::gauge!(m::INSTANCES, "function_id" => f.clone(), "state" => *s).set(*n);
        }
        st.gauges.extend(now.into_keys());
        // Worker counters: retire instances that are gone, take the new answers.
        let alive: BTreeSet<&str> = live.iter().map(|i| i.instance_id.as_str()).collect();
        let gone: Vec<String> = st
            .last
            .keys()
            .filter(|k| !alive.contains(k.as_str()))
            .cloned()
            .collect();
        for k in gone {
            if let Some((f, c)) = st.last.remove(&k) {
                st.retired.entry(f).or_default().add(&c);
            }
        }
        for (instance, function, c) in answered {
            st.last.insert(instance, (function, c));
        }
        let mut totals = st.retired.clone();
        for (f, c) in st.last.values() {
            totals.entry(f.clone()).or_default().add(c);
        }
        for (f, c) in totals {
            let l = [("function_id", f)];
            metrics::counter!(m::WORKER_REQUESTS, &l).absolute(c.requests);
            metrics::counter!(m::WORKER_BATCHES, &l).absolute(c.batches);
            metrics::counter!(m::WORKER_ROWS, &l).absolute(c.rows);
            metrics::counter!(m::WORKER_CROSS_TENANT_BATCHES, &l).absolute(c.cross_tenant_batches);
            // `metrics` counters hold integers: busy seconds are a (cumulative) gauge.
            metrics::gauge!(m::WORKER_BUSY_SECONDS, &l).set(c.busy_ms / 1e3);
            metrics::gauge!(m::WORKER_MAX_BATCH_REQUESTS, &l).set(c.max_batch_requests as f64);
        }
    }

    /// Asks `$SRV.STATS.faasmoe-expert` and gathers the answers of `live` instances:
    /// (instance id, function id, counters).
    async fn worker_stats(
        &self,
        live: &[crate::activation::InstanceInfo],
    ) -> Vec<(String, String, Counters)> {
        let want: BTreeSet<&str> = live
            .iter()
            .filter(|i| i.state == InstanceState::Ready || i.state == InstanceState::Draining)
            .map(|i| i.instance_id.as_str())
            .collect();
        if want.is_empty() {
            return Vec::new();
        }
        let inbox = self.client.new_inbox();
        let Ok(mut sub) = self.client.subscribe(inbox.clone()).await else {
            return Vec::new();
        };
        if self
            .client
            .publish_with_reply("$SRV.STATS.faasmoe-expert", inbox, "".into())
            .await
            .is_err()
        {
            return Vec::new();
        }
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + STATS_WAIT;
        while out.len() < want.len() {
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await else {
                break;
            };
            let Ok(reply) = serde_json::from_slice::<StatsReply>(&msg.payload) else {
                continue;
            };
            // Every endpoint of an instance carries the same instance-wide data: take one.
            if let Some(d) = reply.endpoints.into_iter().find_map(|e| e.data) {
                if want.contains(d.instance_id.as_str())
                    && !out.iter().any(|(i, _, _)| *i == d.instance_id)
                {
                    out.push((d.instance_id, d.function_id, d.counters));
                }
            }
        }
        out
    }
}
