//! Where a scenario's CPU went, from `/proc`: each party's threads, their waits and switches.
//!
//! The parties are the first proxy (its threads by name), the gateways (their threads summed by
//! name), the fleet (this process) and the host. Beside each CPU time is the time its threads
//! spent runnable but waiting for a core (the scheduler's run delay,
//! `/proc/PID/task/TID/schedstat`) and their context switches: on a host the whole stack
//! shares, a storm lasts as long as everyone's CPU takes, whoever spends it.

use std::collections::BTreeMap;

/// A thread's (or a party's) CPU and run delay, in nanoseconds, and context switches.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Times {
    #[serde(rename = "cpu_ns")]
    cpu: u64,
    /// Runnable, waiting for a core.
    #[serde(rename = "waited_ns")]
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

    fn show(self) -> String {
        format!(
            "{:.2} s [{:.2}] {:.1}k",
            self.cpu as f64 / 1e9,
            self.waited as f64 / 1e9,
            self.switches as f64 / 1e3
        )
    }
}

/// A process's threads at one reading: by thread id, its name and its times so far.
type Threads = BTreeMap<u32, (String, Times)>;

/// Each thread of `pid` now. Empty when the process is gone.
fn threads(pid: u32) -> Threads {
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
        // Time on a core, time waiting for one (both ns), time slices.
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

/// What a process's threads spent from `before` to `now`, by thread name (threads of one name
/// summed). A thread that started in between counts in full; one that ended in between is not
/// counted (its time is gone with it).
fn spent(now: &Threads, before: &Threads) -> BTreeMap<String, Times> {
    let mut by_name: BTreeMap<String, Times> = BTreeMap::new();
    for (tid, (name, t)) in now {
        let t = match before.get(tid) {
            // The same thread (a reused id would have another name, as a rule).
            Some((was, b)) if was == name => t.since(*b),
            _ => *t,
        };
        by_name.entry(name.clone()).or_default().add(t);
    }
    by_name
}

/// CPU seconds (user + system) a process has used, ended threads included, from
/// `/proc/PID/stat` (at the clock tick's precision).
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) start after its ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    (hz > 0.0).then(|| ticks / hz)
}

/// The host's CPU time so far, in clock ticks (`/proc/stat`'s first line).
#[derive(Debug, Clone, Copy)]
struct Host {
    /// user, nice, system, irq, softirq.
    busy: u64,
    /// Taken by the hypervisor for other guests.
    steal: u64,
    /// Everything: busy, idle, iowait, steal.
    total: u64,
    /// Cores online (`cpuN` lines).
    cores: usize,
}

fn host() -> Option<Host> {
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
    // user nice system idle iowait irq softirq steal (guest time is within user's).
    let [user, nice, system, idle, iowait, irq, softirq, steal] = *f.get(..8)? else {
        return None;
    };
    let busy = user + nice + system + irq + softirq;
    Some(Host {
        busy,
        steal,
        total: busy + idle + iowait + steal,
        cores,
    })
}

/// A reading of every party's threads.
pub(super) struct Snapshot {
    proxy: Threads,
    gateways: Vec<Threads>,
    fleet: Threads,
    host: Option<Host>,
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

    /// What each party spent from `before` to this reading.
    pub(super) fn since(&self, before: &Snapshot) -> Spent {
        let mut gateways: BTreeMap<String, Times> = BTreeMap::new();
        for (now, before) in self.gateways.iter().zip(&before.gateways) {
            for (name, t) in spent(now, before) {
                gateways.entry(name).or_default().add(t);
            }
        }
        let host = self.host.zip(before.host).and_then(|(now, was)| {
            let total = now.total.saturating_sub(was.total) as f64;
            (total > 0.0).then(|| HostShare {
                busy: now.busy.saturating_sub(was.busy) as f64 / total,
                steal: now.steal.saturating_sub(was.steal) as f64 / total,
                cores: now.cores,
            })
        });
        Spent {
            proxy: spent(&self.proxy, &before.proxy),
            gateways,
            fleet: spent(&self.fleet, &before.fleet),
            host,
        }
    }
}

/// The host's busy and stolen shares of its cores' time between two readings.
#[derive(Debug, serde::Serialize)]
struct HostShare {
    busy: f64,
    steal: f64,
    cores: usize,
}

/// What each party spent between two readings, by thread name.
#[derive(Debug, serde::Serialize)]
pub(super) struct Spent {
    proxy: BTreeMap<String, Times>,
    gateways: BTreeMap<String, Times>,
    fleet: BTreeMap<String, Times>,
    host: Option<HostShare>,
}

impl Spent {
    /// A party's total, then its threads by name (those under 10 ms in the total only).
    fn party(
        f: &mut std::fmt::Formatter<'_>,
        what: &str,
        by: &BTreeMap<String, Times>,
    ) -> std::fmt::Result {
        let mut all = Times::default();
        for t in by.values() {
            all.add(*t);
        }
        write!(f, "{what} {}", all.show())?;
        let parts: Vec<String> = by
            .iter()
            .filter(|(_, t)| t.cpu >= 10_000_000)
            .map(|(name, t)| format!("{name} {}", t.show()))
            .collect();
        if parts.is_empty() {
            return Ok(());
        }
        write!(f, " ({})", parts.join(", "))
    }
}

impl std::fmt::Display for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CPU [waiting for a core] context switches: ")?;
        Spent::party(f, "proxy", &self.proxy)?;
        f.write_str("; ")?;
        Spent::party(f, "gateways", &self.gateways)?;
        f.write_str("; ")?;
        Spent::party(f, "fleet", &self.fleet)?;
        if let Some(h) = &self.host {
            write!(f, "; host busy {:.0}% of {} cores", 100.0 * h.busy, h.cores)?;
            if h.steal >= 0.005 {
                write!(f, " (stolen {:.0}%)", 100.0 * h.steal)?;
            }
        }
        Ok(())
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
                // 30 ms of this thread's own CPU, however long the host takes to give it (but
                // not forever: a `/proc` without schedstat reads 0, and the check below fails).
                let from = own_cpu();
                let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
                let mut x = 0u64;
                while own_cpu() < from + 30_000_000 && std::time::Instant::now() < give_up {
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
        let line = Snapshot::take(None, &[]).since(&before).to_string();
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
