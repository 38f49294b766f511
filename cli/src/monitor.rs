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
        Self {
            start: Instant::now(),
            last: None,
            ticks: BTreeMap::new(),
            samples: vec![],
            fixed,
            worker_parents,
        }
    }

    fn workers(&self) -> Vec<i32> {
        let Ok(all) = procfs::process::all_processes() else {
            return vec![];
        };
        all.filter_map(|p| p.ok())
            .filter_map(|p| p.stat().ok())
            .filter(|s| self.worker_parents.contains(&s.ppid) && s.state != 'Z')
            .map(|s| s.pid)
            .collect()
    }

    /// Takes a sample now.
    pub fn sample(&mut self) -> &Sample {
        let now = Instant::now();
        let dt = self
            .last
            .map(|l| now.duration_since(l).as_secs_f64())
            .unwrap_or(0.0);
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
            let Some(r) = read_process(pid) else { continue };
            let e = roles.entry(role).or_default();
            e.processes += 1;
            e.rss_bytes += r.rss_bytes;
            e.pss_bytes += r.pss_bytes;
            if let (Some(prev), true) = (self.ticks.get(&pid), dt > 0.0) {
                e.cpu_percent += cpu_percent(*prev, r.cpu_ticks, dt);
            }
            ticks.insert(pid, r.cpu_ticks);
        }
        self.ticks = ticks;
        self.samples.push(Sample {
            t_s: now.duration_since(self.start).as_secs_f64(),
            roles,
        });
        self.samples.last().expect("pushed")
    }
}

/// One process's memory and CPU counters, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct ProcReading {
    /// Resident set, bytes.
    pub rss_bytes: u64,
    /// Proportional set size, bytes (0 where smaps_rollup is unreadable).
    pub pss_bytes: u64,
    /// utime + stime, clock ticks.
    pub cpu_ticks: u64,
}

/// Reads `pid`'s counters; `None` for a gone or zombie process.
pub fn read_process(pid: i32) -> Option<ProcReading> {
    let p = procfs::process::Process::new(pid).ok()?;
    let stat = p.stat().ok()?;
    if stat.state == 'Z' {
        return None;
    }
    let pss_bytes = p
        .smaps_rollup()
        .ok()
        .and_then(|r| {
            r.memory_map_rollup
                .0
                .first()
                .and_then(|m| m.extension.map.get("Pss").copied())
        })
        .unwrap_or(0);
    Some(ProcReading {
        rss_bytes: stat.rss * procfs::page_size(),
        pss_bytes,
        cpu_ticks: stat.utime + stat.stime,
    })
}

/// CPU % of one core used between two tick readings `dt_s` seconds apart.
pub fn cpu_percent(ticks_before: u64, ticks_now: u64, dt_s: f64) -> f64 {
    ticks_now.saturating_sub(ticks_before) as f64 / tps() / dt_s * 100.0
}

/// The `p`-th percentile (nearest rank) of the finite values of `v`; NaN when there are none.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i]
}

/// Bytes as MB with one decimal.
pub fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}
