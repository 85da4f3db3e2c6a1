//! CPU time of processes outside the harness's own tree: other sessions' builds and
//! tests may share this machine. A thread samples /proc every 100 ms during a run, so a
//! compiler process that starts and ends within the run is counted too (up to its last
//! sample).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::cpu::stat_fields;

/// One process as sampled: its parent and its utime + stime at first and last sight.
#[derive(Clone, Copy)]
struct Seen {
    ppid: u32,
    first: u64,
    last: u64,
}

pub struct OthersWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<HashMap<u32, Seen>>>,
}

impl OthersWatch {
    pub fn start() -> OthersWatch {
        let mut seen: HashMap<u32, Seen> = scan()
            .into_iter()
            .map(|(pid, (ppid, t))| {
                (
                    pid,
                    Seen {
                        ppid,
                        first: t,
                        last: t,
                    },
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("others-watch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    for (pid, (ppid, t)) in scan() {
                        // A process first seen now started during the run: all its time counts.
                        seen.entry(pid).and_modify(|s| s.last = t).or_insert(Seen {
                            ppid,
                            first: 0,
                            last: t,
                        });
                    }
                }
                seen
            })
            .ok();
        OthersWatch { stop, thread }
    }

    /// Ticks used since `start` by processes that do not descend from this one.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let Some(seen) = self.thread.take().and_then(|t| t.join().ok()) else {
            return 0;
        };
        let me = std::process::id();
        seen.iter()
            .filter(|(&pid, _)| !descends_from(pid, me, &seen))
            .map(|(_, s)| s.last.saturating_sub(s.first))
            .sum()
    }
}

impl Drop for OthersWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn descends_from(mut pid: u32, ancestor: u32, seen: &HashMap<u32, Seen>) -> bool {
    // Bounded walk: a recycled pid could otherwise make a cycle.
    for _ in 0..64 {
        if pid == ancestor {
            return true;
        }
        match seen.get(&pid) {
            Some(s) if s.ppid != 0 => pid = s.ppid,
            _ => return false,
        }
    }
    false
}

/// pid -> (ppid, utime + stime) of every user-space process. Kernel threads are left
/// out: their softirq and kworker time is partly the balancers' own work.
fn scan() -> HashMap<u32, (u32, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(f) = stat_fields(pid) else { continue };
        let at = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        let ppid = u32::try_from(at(1)).unwrap_or(0);
        // Kernel threads are kthreadd (pid 2) and its children.
        if pid != 2 && ppid != 2 {
            out.insert(pid, (ppid, at(11) + at(12)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestry_walk() {
        let s = |ppid| Seen {
            ppid,
            first: 0,
            last: 0,
        };
        let seen = HashMap::from([(10, s(1)), (11, s(10)), (12, s(11)), (20, s(1))]);
        assert!(descends_from(12, 10, &seen));
        assert!(descends_from(10, 10, &seen));
        assert!(!descends_from(20, 10, &seen));
        assert!(!descends_from(99, 10, &seen));
    }
}
