//! CPU time used: this process's (getrusage) and another process's (`/proc/<pid>/stat`), so a
//! run can report the generator's cost per request next to the server's.
//!
//! Concurrency: none (reads of kernel counters).

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

/// User + system CPU time of this process so far (all threads).
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage writes a plain-old-data struct we own; RUSAGE_SELF is always valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system CPU time of process `pid` so far (all threads), from `/proc/<pid>/stat`.
pub fn process_cpu(pid: u32) -> io::Result<Duration> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// CPU time of process `pid`'s live threads, summed per thread name with a trailing `-N`
/// removed (`kvgate-shard-0` and `kvgate-shard-1` count as `kvgate-shard`). Threads that
/// already exited are missing here but counted in [`process_cpu`].
pub fn threads_cpu(pid: u32) -> io::Result<BTreeMap<String, Duration>> {
    let mut out = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = t?.path();
        let (Ok(comm), Ok(cpu)) =
            (std::fs::read_to_string(dir.join("comm")), stat_cpu(&dir.join("stat").to_string_lossy()))
        else {
            continue; // the thread exited meanwhile
        };
        let comm = comm.trim();
        let name = match comm.rsplit_once('-') {
            Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
            _ => comm,
        };
        *out.entry(name.to_string()).or_default() += cpu;
    }
    Ok(out)
}

/// The server's CPU counters at the start of a run.
pub struct ServerProbe {
    pid: u32,
    total: Duration,
    threads: BTreeMap<String, Duration>,
}

/// The server's CPU time over a run: in total, and per thread name (live threads only).
pub struct ServerCpu {
    pub total: Duration,
    pub by_thread: BTreeMap<String, Duration>,
}

impl ServerProbe {
    pub fn start(pid: u32) -> io::Result<Self> {
        Ok(Self { pid, total: process_cpu(pid)?, threads: threads_cpu(pid).unwrap_or_default() })
    }

    pub fn finish(&self) -> io::Result<ServerCpu> {
        let total = process_cpu(self.pid)?.saturating_sub(self.total);
        let mut by_thread = threads_cpu(self.pid).unwrap_or_default();
        for (name, t) in by_thread.iter_mut() {
            *t = t.saturating_sub(self.threads.get(name).copied().unwrap_or_default());
        }
        Ok(ServerCpu { total, by_thread })
    }
}

fn stat_cpu(path: &str) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(path)?;
    // fields after the command name (which may hold spaces) start at field 3, `state`
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: no field {}", i + 3)))
    };
    // utime and stime are fields 14 and 15 (1-based), in clock ticks
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_pid_matches_getrusage_roughly() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let a = super::self_cpu();
        let b = super::process_cpu(std::process::id()).unwrap();
        assert!(a.as_secs_f64() - b.as_secs_f64() < 0.05 + a.as_secs_f64() * 0.1, "{a:?} vs {b:?}");
    }
}
