//! Resource sampling of a running deployment: RSS, PSS and CPU per role (nats-server,
//! broker, controllers, workers), from /proc every interval.

use super::*;

/// Role totals of one sample.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RoleTotals {
    pub(super) processes: usize,
    pub(super) rss: u64,
    pub(super) pss: u64,
    pub(super) cpu_percent: f64,
}

#[derive(Debug, Clone)]
pub(super) struct Sample {
    pub(super) t_s: f64,
    pub(super) roles: BTreeMap<&'static str, RoleTotals>,
}

impl Sample {
    pub(super) fn total(&self) -> RoleTotals {
        let mut t = RoleTotals::default();
        for r in self.roles.values() {
            t.processes += r.processes;
            t.rss += r.rss;
            t.pss += r.pss;
            t.cpu_percent += r.cpu_percent;
        }
        t
    }
    pub(super) fn workers(&self) -> usize {
        self.roles.get("worker").map(|r| r.processes).unwrap_or(0)
    }
}

/// /proc sampler of one deployment: fixed processes by role, workers = children of the broker.
pub(super) struct Sampler {
    pub(super) start: Instant,
    pub(super) fixed: Vec<(&'static str, i32)>,
    pub(super) worker_parent: Option<i32>,
    pub(super) last: Option<(Instant, BTreeMap<i32, u64>)>,
    pub(super) samples: Vec<Sample>,
}

pub(super) fn page_size() -> u64 {
    procfs::page_size()
}

pub(super) fn children_of(parent: i32) -> Vec<i32> {
    let Ok(all) = procfs::process::all_processes() else {
        return vec![];
    };
    all.filter_map(|p| p.ok())
        .filter_map(|p| p.stat().ok())
        .filter(|s| s.ppid == parent && s.state != 'Z')
        .map(|s| s.pid)
        .collect()
}

impl Sampler {
    pub(super) fn procs(&self) -> Vec<(&'static str, i32)> {
        let mut v = self.fixed.clone();
        if let Some(b) = self.worker_parent {
            v.extend(children_of(b).into_iter().map(|p| ("worker", p)));
        }
        v
    }

    pub(super) fn sample(&mut self) {
        let now = Instant::now();
        let mut roles: BTreeMap<&'static str, RoleTotals> = BTreeMap::new();
        for (r, _) in &self.fixed {
            roles.entry(r).or_default();
        }
        if self.worker_parent.is_some() {
            roles.entry("worker").or_default();
        }
        let mut ticks = BTreeMap::new();
        for (role, pid) in self.procs() {
            let Some(r) = monitor::read_process(pid) else {
                continue;
            };
            let e = roles.entry(role).or_default();
            e.processes += 1;
            e.rss += r.rss_bytes;
            e.pss += r.pss_bytes;
            if let Some((prev_t, prev)) = &self.last {
                let dt = now.duration_since(*prev_t).as_secs_f64();
                if let (Some(p0), true) = (prev.get(&pid), dt > 0.0) {
                    e.cpu_percent += monitor::cpu_percent(*p0, r.cpu_ticks, dt);
                }
            }
            ticks.insert(pid, r.cpu_ticks);
        }
        self.last = Some((now, ticks));
        self.samples.push(Sample {
            t_s: now.duration_since(self.start).as_secs_f64(),
            roles,
        });
    }

    /// CPU seconds used so far by the deployment: fixed processes with their reaped children
    /// (exited workers), plus live workers.
    pub(super) fn cpu_seconds(&self) -> f64 {
        let mut ticks = 0u64;
        for (_, pid) in &self.fixed {
            if let Ok(s) = procfs::process::Process::new(*pid).and_then(|p| p.stat()) {
                ticks += s.utime + s.stime + s.cutime.max(0) as u64 + s.cstime.max(0) as u64;
            }
        }
        if let Some(b) = self.worker_parent {
            for pid in children_of(b) {
                if let Ok(s) = procfs::process::Process::new(pid).and_then(|p| p.stat()) {
                    ticks += s.utime + s.stime;
                }
            }
        }
        ticks as f64 / procfs::ticks_per_second() as f64
    }
}
