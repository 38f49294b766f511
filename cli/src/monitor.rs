//! Resource sampling from /proc (procfs): memory (RSS, PSS) and CPU (utime + stime) of the
//! stack's processes, grouped by role, over time.

use std::collections::BTreeMap;
use std::time::Instant;

/// The role of a process in the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Role {
    /// nats-server.
    Nats,
    /// The broker.
    Broker,
    /// Controllers.
    Controller,
    /// Expert worker instances.
    Worker,
}

/// One sample of one role: totals over its processes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RoleSample {
    /// Processes alive.
    pub processes: usize,
    /// Resident set, bytes.
    pub rss_bytes: u64,
    /// Proportional set size, bytes (shared pages split among sharers).
    pub pss_bytes: u64,
    /// CPU since the previous sample, % of one core.
    pub cpu_percent: f64,
}

/// One point in time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Seconds since the monitor started.
    pub t_s: f64,
    /// Per role.
    pub roles: BTreeMap<Role, RoleSample>,
}

/// Samples the processes it is told about (and workers found as children of the broker).
pub struct Monitor {
    start: Instant,
    last: Option<Instant>,
    ticks: BTreeMap<i32, u64>,
    pub samples: Vec<Sample>,
    /// Fixed processes by role.
    pub fixed: Vec<(Role, i32)>,
    /// Workers are the children of these pids.
    pub worker_parents: Vec<i32>,
}

fn tps() -> f64 {
    procfs::ticks_per_second() as f64
}

impl Monitor {
    /// A monitor for `fixed` processes whose workers are children of `worker_parents`.
    pub fn new(fixed: Vec<(Role, i32)>, worker_parents: Vec<i32>) -> Self {
        Self { start: Instant::now(), last: None, ticks: BTreeMap::new(), samples: vec![], fixed, worker_parents }
    }

    fn workers(&self) -> Vec<i32> {
        let Ok(all) = procfs::process::all_processes() else { return vec![] };
        all.filter_map(|p| p.ok())
            .filter_map(|p| p.stat().ok())
            .filter(|s| self.worker_parents.contains(&s.ppid) && s.state != 'Z')
            .map(|s| s.pid)
            .collect()
    }

    /// Takes a sample now.
    pub fn sample(&mut self) -> &Sample {
        let now = Instant::now();
        let dt = self.last.map(|l| now.duration_since(l).as_secs_f64()).unwrap_or(0.0);
        self.last = Some(now);
        let mut procs: Vec<(Role, i32)> = self.fixed.clone();
        procs.extend(self.workers().into_iter().map(|p| (Role::Worker, p)));
        let mut roles: BTreeMap<Role, RoleSample> = BTreeMap::new();
        for r in [Role::Nats, Role::Broker, Role::Controller, Role::Worker] {
            if self.fixed.iter().any(|(x, _)| *x == r) || r == Role::Worker {
                roles.insert(r, RoleSample::default());
            }
        }
        let mut ticks = BTreeMap::new();
        for (role, pid) in procs {
            let Ok(p) = procfs::process::Process::new(pid) else { continue };
            let Ok(stat) = p.stat() else { continue };
            if stat.state == 'Z' {
                continue;
            }
            let e = roles.entry(role).or_default();
            e.processes += 1;
            e.rss_bytes += stat.rss * procfs::page_size();
            if let Ok(r) = p.smaps_rollup() {
                if let Some(m) = r.memory_map_rollup.0.first() {
                    e.pss_bytes += m.extension.map.get("Pss").copied().unwrap_or(0);
                }
            }
            let t = stat.utime + stat.stime;
            if let (Some(prev), true) = (self.ticks.get(&pid), dt > 0.0) {
                e.cpu_percent += (t.saturating_sub(*prev)) as f64 / tps() / dt * 100.0;
            }
            ticks.insert(pid, t);
        }
        self.ticks = ticks;
        self.samples.push(Sample { t_s: now.duration_since(self.start).as_secs_f64(), roles });
        self.samples.last().expect("pushed")
    }
}

/// Bytes as MB with one decimal.
pub fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}
