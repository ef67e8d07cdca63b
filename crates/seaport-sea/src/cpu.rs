//! Where a benchmark phase's time went: CPU seconds per process group, and how busy the
//! machine's cores were, read from `/proc` before and after the phase.
//!
//! On two cores shared by the database, the broker and Seaport, a figure's ratio to its raw
//! limit is bounded by how much CPU the extra work takes; these readings put that bound beside
//! each figure in the same run instead of in a separate profile.

use std::collections::BTreeMap;
use std::time::Duration;

/// CPU time spent by each process group during one phase, beside its wall time.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CpuPhase {
    pub phase: &'static str,
    pub wall_secs: f64,
    /// `seaport` (this process), `nats-server`, `postgres` (all backends), `other`.
    /// Per-process accounting on some VMs over-reports in absolute terms (more CPU seconds than
    /// cores × wall time); read the proportions.
    pub cpu_secs: BTreeMap<String, f64>,
    /// Share of all cores' time that was not idle during the phase (`/proc/stat`), 0 to 1:
    /// near 1, the phase was bound by the cores; well below, by waiting.
    pub machine_busy: f64,
}

impl CpuPhase {
    /// CPU seconds of every group together.
    pub fn total(&self) -> f64 {
        self.cpu_secs.values().sum()
    }

    pub fn of(&self, group: &str) -> f64 {
        self.cpu_secs.get(group).copied().unwrap_or(0.0)
    }
}

/// The counters at one moment; [`Snapshot::phase`] turns two of them into a [`CpuPhase`].
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// CPU seconds so far of every process, by pid, with its group.
    by_pid: BTreeMap<u32, (&'static str, f64)>,
    /// (busy, all) jiffies of all cores together.
    machine: (u64, u64),
}

impl Snapshot {
    pub fn take() -> Snapshot {
        Snapshot {
            by_pid: cpu_by_pid(),
            machine: machine_jiffies(),
        }
    }

    /// What happened between `self` and now. Counted per pid, then grouped: a kernel worker
    /// renames itself with each job, and grouped by name first it would count its whole life.
    pub fn phase(&self, phase: &'static str, wall: Duration) -> CpuPhase {
        let now = Snapshot::take();
        let mut cpu_secs = BTreeMap::new();
        for (pid, (group, secs)) in &now.by_pid {
            let before = self.by_pid.get(pid).map(|(_, s)| *s).unwrap_or(0.0);
            *cpu_secs.entry((*group).to_owned()).or_insert(0.0) += (secs - before).max(0.0);
        }
        let busy = now.machine.0.saturating_sub(self.machine.0) as f64;
        let all = now.machine.1.saturating_sub(self.machine.1) as f64;
        CpuPhase {
            phase,
            wall_secs: wall.as_secs_f64(),
            cpu_secs,
            machine_busy: if all > 0.0 { busy / all } else { 0.0 },
        }
    }
}

/// Linux reports in clock ticks; 100 per second on every mainstream kernel configuration.
const TICKS: f64 = 100.0;

/// User + system CPU seconds of every process, by pid, with its group, from `/proc`.
fn cpu_by_pid() -> BTreeMap<u32, (&'static str, f64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ... utime(14) stime(15)": comm may hold spaces, so split at ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) else {
            continue;
        };
        let secs = (u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0)) / TICKS;
        let group = match comm {
            c if c.starts_with("seaport") => "seaport",
            "nats-server" => "nats-server",
            "postgres" => "postgres",
            _ => "other",
        };
        out.insert(pid, (group, secs));
    }
    out
}

/// (busy, all) jiffies summed over the cores, from the first line of `/proc/stat`:
/// `cpu user nice system idle iowait irq softirq steal …`. Idle and iowait are not busy; steal
/// (time the hypervisor gave another guest) counts as busy, since the phase could not use it.
fn machine_jiffies() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    parse_machine_jiffies(&stat)
}

fn parse_machine_jiffies(stat: &str) -> (u64, u64) {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    // guest and guest_nice (fields 9, 10) are already inside user and nice.
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let all: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (all.saturating_sub(idle), all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_jiffies_leave_out_idle_and_iowait_and_guest_time() {
        let stat = "cpu  100 5 50 800 20 3 7 15 40 0\ncpu0 50 2 25 400 10 1 3 7 20 0\nintr 1 2 3\n";
        // busy = user 100 + nice 5 + system 50 + irq 3 + softirq 7 + steal 15; guest is in user.
        assert_eq!(parse_machine_jiffies(stat), (180, 1000));
        assert_eq!(parse_machine_jiffies("intr 1 2\n"), (0, 0));
    }

    #[test]
    fn a_phase_reads_this_process_and_the_machine() {
        let before = Snapshot::take();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let phase = before.phase("spin", started.elapsed());
        assert!(phase.machine_busy > 0.0 && phase.machine_busy <= 1.0, "{phase:?}");
        assert!(phase.total() > 0.0, "{phase:?}");
        assert!(phase.wall_secs >= 0.3);
    }
}
