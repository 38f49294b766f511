//! Counters an instance reports through `$SRV.STATS` and its status endpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::Serialize;

/// What one instance has done since it started.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStats {
    /// Function id.
    pub function_id: String,
    /// Instance id.
    pub instance_id: String,
    /// Experts held, `layer:expert`.
    pub experts: Vec<String>,
    /// Expert requests received (valid or not).
    pub requests: u64,
    /// Error replies, by error code.
    pub errors: BTreeMap<String, u64>,
    /// Computations run (each over one batch of requests).
    pub batches: u64,
    /// Most requests computed in one batch.
    pub max_batch_requests: u64,
    /// Batches that held more than one request.
    pub multi_request_batches: u64,
    /// Batches that held requests of more than one tenant.
    pub cross_tenant_batches: u64,
    /// Token rows computed (each row once per request, as sent).
    pub rows: u64,
    /// Time spent computing, ms.
    pub busy_ms: f64,
    /// Seconds since start.
    pub uptime_s: f64,
    #[serde(skip)]
    started: Option<Instant>,
}

impl WorkerStats {
    /// Fresh counters.
    pub fn new(function_id: String, instance_id: String, experts: Vec<String>) -> Self {
        Self {
            function_id,
            instance_id,
            experts,
            requests: 0,
            errors: BTreeMap::new(),
            batches: 0,
            max_batch_requests: 0,
            multi_request_batches: 0,
            cross_tenant_batches: 0,
            rows: 0,
            busy_ms: 0.0,
            uptime_s: 0.0,
            started: Some(Instant::now()),
        }
    }

    /// Counts an error reply.
    pub fn error(&mut self, code: &str) {
        *self.errors.entry(code.to_string()).or_default() += 1;
    }

    /// Counts a computed batch.
    pub fn batch<'a>(
        &mut self,
        tenants: impl Iterator<Item = &'a str>,
        requests: usize,
        rows: usize,
        busy_ms: f64,
    ) {
        let tenants: BTreeSet<&str> = tenants.collect();
        self.batches += 1;
        self.max_batch_requests = self.max_batch_requests.max(requests as u64);
        self.multi_request_batches += u64::from(requests > 1);
        self.cross_tenant_batches += u64::from(tenants.len() > 1);
        self.rows += rows as u64;
        self.busy_ms += busy_ms;
    }

    /// A snapshot with `uptime_s` filled in.
    pub fn snapshot(&self) -> Self {
        let mut s = self.clone();
        s.uptime_s = self
            .started
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        s
    }
}
