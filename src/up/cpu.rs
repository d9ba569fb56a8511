//! Where a scenario's CPU went: the proxy's threads one by one, the gateways, the fleet (this
//! process) and the whole host, read from `/proc` before and after. Each figure is CPU time
//! and, beside it, the time the threads spent runnable but waiting for a core (the
//! scheduler's run delay, `/proc/PID/task/TID/schedstat`): on a host the whole stack shares, a
//! storm's length is set as much by who gets a core as by what anyone spends.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One thread's CPU and run delay so far, in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Times {
    cpu: u64,
    waited: u64,
    /// Context switches, voluntary (a wait) and not (preempted).
    switches: u64,
}

impl Times {
    fn add(&mut self, other: Times) {
        self.cpu += other.cpu;
        self.waited += other.waited;
        self.switches += other.switches;
    }

    fn since(self, before: Times) -> Times {
        Times {
            cpu: self.cpu.saturating_sub(before.cpu),
            waited: self.waited.saturating_sub(before.waited),
            switches: self.switches.saturating_sub(before.switches),
        }
    }
}

/// Each thread of `pid` now: its id, its name and its times. Empty when the process is gone.
fn threads(pid: u32) -> BTreeMap<u32, (String, Times)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let path = task.path();
        let Ok(stat) = std::fs::read_to_string(path.join("schedstat")) else {
            continue; // the thread ended between the listing and the read
        };
        let mut f = stat.split_whitespace().map(|v| v.parse::<u64>().ok());
        let (Some(Some(cpu)), Some(Some(waited))) = (f.next(), f.next()) else {
            continue;
        };
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        let times = Times {
            cpu,
            waited,
            switches,
        };
        out.insert(tid, (name.trim().to_string(), times));
    }
    out
}

/// The host's busy and total CPU time so far, in clock ticks (`/proc/stat`'s first line), and
/// its number of cores.
fn host() -> Option<(u64, u64, usize)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cores = stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4)?;
    Some((total.saturating_sub(idle), total, cores))
}

/// A reading of every party's threads.
pub(super) struct Snapshot {
    proxy: BTreeMap<u32, (String, Times)>,
    gateways: Vec<BTreeMap<u32, (String, Times)>>,
    fleet: BTreeMap<u32, (String, Times)>,
    host: Option<(u64, u64, usize)>,
}

impl Snapshot {
    pub(super) fn take(proxy: Option<u32>, gateways: &[u32]) -> Snapshot {
        Snapshot {
            proxy: proxy.map(threads).unwrap_or_default(),
            gateways: gateways.iter().map(|&g| threads(g)).collect(),
            fleet: threads(std::process::id()),
            host: host(),
        }
    }

    /// What was spent from `before` to this reading, as one line: the proxy's threads (those
    /// alive at both readings; by name, threads of one name summed), the gateways summed,
    /// the fleet, and the host's busy share of its cores.
    pub(super) fn since(&self, before: &Snapshot) -> String {
        fn spent(
            now: &BTreeMap<u32, (String, Times)>,
            before: &BTreeMap<u32, (String, Times)>,
        ) -> BTreeMap<String, Times> {
            let mut by_name: BTreeMap<String, Times> = BTreeMap::new();
            for (tid, (name, t)) in now {
                if let Some((_, b)) = before.get(tid) {
                    by_name.entry(name.clone()).or_default().add(t.since(*b));
                }
            }
            by_name
        }
        fn total(by: &BTreeMap<String, Times>) -> Times {
            let mut t = Times::default();
            for v in by.values() {
                t.add(*v);
            }
            t
        }
        fn show(t: Times) -> String {
            format!(
                "{:.2} s [{:.2}] {:.1}k",
                t.cpu as f64 / 1e9,
                t.waited as f64 / 1e9,
                t.switches as f64 / 1e3
            )
        }
        /// A party's total, then its threads by name (those that barely ran in the total only).
        fn party(line: &mut String, what: &str, by: &BTreeMap<String, Times>) {
            let _ = write!(line, "{what} {}", show(total(by)));
            let parts: Vec<String> = by
                .iter()
                .filter(|(_, t)| t.cpu >= 10_000_000)
                .map(|(name, t)| format!("{name} {}", show(*t)))
                .collect();
            if !parts.is_empty() {
                let _ = write!(line, " ({})", parts.join(", "));
            }
        }
        let mut line = "CPU [waiting for a core] context switches: ".to_string();
        party(&mut line, "proxy", &spent(&self.proxy, &before.proxy));
        let mut gateways: BTreeMap<String, Times> = BTreeMap::new();
        for (now, before) in self.gateways.iter().zip(&before.gateways) {
            for (name, t) in spent(now, before) {
                gateways.entry(name).or_default().add(t);
            }
        }
        line.push_str("; ");
        party(&mut line, "gateways", &gateways);
        line.push_str("; ");
        party(&mut line, "fleet", &spent(&self.fleet, &before.fleet));
        if let (Some((busy, all, cores)), Some((busy0, all0, _))) = (self.host, before.host) {
            let (busy, all) = (busy.saturating_sub(busy0), all.saturating_sub(all0));
            if all > 0 {
                let _ = write!(
                    line,
                    "; host busy {:.0}% of {cores} cores",
                    100.0 * busy as f64 / all as f64
                );
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's CPU so far, in nanoseconds.
    fn own_cpu() -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn a_threads_cpu_is_counted_under_its_name_between_two_readings() {
        let (go, start) = std::sync::mpsc::channel::<()>();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let (leave, exit) = std::sync::mpsc::channel::<()>();
        let burner = std::thread::Builder::new()
            .name("burner".into())
            .spawn(move || {
                let _ = start.recv();
                // 30 ms of this thread's own CPU, however long the host takes to give it.
                let from = own_cpu();
                let mut x = 0u64;
                while own_cpu() < from + 30_000_000 {
                    for i in 0..10_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                }
                let _ = done.send(());
                let _ = exit.recv();
            })
            .expect("a thread");
        let before = Snapshot::take(None, &[]);
        go.send(()).expect("the burner waits");
        finished.recv().expect("the burner burns");
        let line = Snapshot::take(None, &[]).since(&before);
        leave.send(()).expect("the burner waits to leave");
        burner.join().expect("the burner ends");
        let burnt: f64 = line
            .split("burner ")
            .nth(1)
            .and_then(|rest| rest.split(" s").next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no burner in {line}"));
        assert!(
            burnt >= 0.03,
            "the burner's 30 ms read as {burnt} s: {line}"
        );
        assert!(line.contains("; host busy "), "{line}");
    }
}
