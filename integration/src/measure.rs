//! Figures for the benchmarks: percentiles, the load average (the machine is shared, so every
//! figure is printed with it), a process's memory and CPU time from `/proc`, samples of the
//! agent's `/metrics`, and the moment a real connection's verdict flips after a change.
//!
//! ```text
//! flip() at t0 ──▶ until_allowed: probers connect back to back; first connect that completes
//!              ──▶ until_denied:  one prober; first probe that fails, confirmed by the next
//! ```

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test support: a failure fails the benchmark by panicking"
)]

use std::fs::{self, File};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Whether the benchmark's command line (`cargo bench --bench NAME -- PART...`) asks for
/// `part`: every part is wanted when none is named. (`cargo bench` itself passes `--bench`.)
pub fn wants(part: &str) -> bool {
    let mut named = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .peekable();
    named.peek().is_none() || named.any(|p| p == part)
}

/// The value of environment variable `name`, or `default` when unset or not a number.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` has them.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Nearest-rank percentile of sorted `values`.
pub fn pct(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// An interval that holds the median of what `values` were drawn from with probability at
/// least `level`, whatever the distribution: the k-th smallest and the k-th largest value,
/// k as large as the sign test allows (the chance that fewer than k of n values fall below the
/// median, Binomial(n, 1/2), is at most (1 - level) / 2). `None` when there are too few values
/// for any such interval (fewer than 6 at 95%). The benchmarks print it beside a median of
/// per-round ratios, so a figure near a target says whether the rounds can tell.
pub fn median_interval(values: &[f64], level: f64) -> Option<(f64, f64)> {
    let n = values.len();
    let tail = (1.0 - level) / 2.0;
    // P(X = i) for X ~ Binomial(n, 1/2), in logarithms: 0.5^n underflows past ~1,070 values.
    let mut ln_p = -(n as f64) * std::f64::consts::LN_2;
    let (mut below, mut k) = (0.0, 0);
    for i in 0..n {
        let p = ln_p.exp();
        if below + p > tail {
            break;
        }
        below += p;
        k = i + 1;
        ln_p += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    if k == 0 {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some((sorted[k - 1], sorted[n - k]))
}

/// `n, min, p50, p90, p99, max` of `values` (not empty).
pub fn summary(values: &[f64], unit: &str) -> String {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    format!(
        "n {}, min {:.1}, p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1} {unit}",
        v.len(),
        v[0],
        pct(&v, 0.5),
        pct(&v, 0.9),
        pct(&v, 0.99),
        v[v.len() - 1]
    )
}

/// xorshift64: change moments spread over a period without a crate.
pub struct Jitter(u64);

impl Jitter {
    pub fn new() -> Jitter {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64);
        Jitter(seed | 1)
    }

    /// Uniform in `[0, max)`.
    pub fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

impl Default for Jitter {
    fn default() -> Self {
        Jitter::new()
    }
}

// ------------------------------------------------------------------------------ /proc

/// Memory of process `pid` from `/proc/PID/status`, in MiB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Memory {
    /// Resident now (`VmRSS`).
    pub rss: f64,
    /// The highest resident size so far (`VmHWM`).
    pub peak: f64,
}

impl Memory {
    pub fn of(pid: u32) -> Memory {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
                .expect("a VmRSS and a VmHWM line")
        };
        Memory {
            rss: kib("VmRSS:") / 1024.0,
            peak: kib("VmHWM:") / 1024.0,
        }
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RSS {:.0} MiB (peak {:.0} MiB)", self.rss, self.peak)
    }
}

/// CPU time process `pid` used so far, user plus system (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("process stat");
    // The command name may hold spaces; the fields after it do not.
    let (_, after) = stat.rsplit_once(')').expect("a (comm) field");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state), so utime (14) and stime (15) are fields[11] and fields[12].
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// `getconf CLK_TCK`: the unit of `/proc/PID/stat` times.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// The sum of every sample of metric `name` (all label sets) in a Prometheus text exposition.
pub fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The seconds since midnight UTC of a log line that starts with an RFC 3339 UTC timestamp
/// (`2026-12-03T21:30:00.123456Z ...`, as the agent's text logs do).
pub fn log_time_of_day(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (_, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// Seconds since midnight UTC of `at`, to compare with [`log_time_of_day`].
pub fn time_of_day(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() % 86_400.0)
}

/// How long after `from` (seconds since midnight) `to` came, across midnight too.
pub fn seconds_after(from: f64, to: f64) -> f64 {
    (to - from).rem_euclid(86_400.0)
}

// ------------------------------------------------------------------------ verdict flips

/// A denied connect is given up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(25);
/// Probers waiting for an allow start a connect this often between them: one every
/// CONNECT_TIMEOUT / STAGGER.
pub const STAGGER: u32 = 5;
/// Pause between connects that went through.
pub const GAP: Duration = Duration::from_millis(1);

/// Moves the calling thread into lab namespace `name`; the rest of the process stays put.
pub fn enter_netns(name: &str) {
    let ns = File::open(Path::new("/run/netns").join(name)).expect("namespace file");
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Reads the server's reply to its end within CONNECT_TIMEOUT: whether it came. Reading to
/// the end lets the server close first, so the client keeps no TIME_WAIT socket (its
/// ephemeral ports would run out over thousands of probes). The rulesets filter every packet
/// of the client's direction, not only the first: a deny that lands between the SYN and the
/// client's ACK stops the exchange here, with the connect already done.
fn exchange(mut stream: TcpStream) -> bool {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut buf = [0u8; 64];
    let mut replied = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match stream.read(&mut buf) {
            Ok(0) => return replied,
            Ok(_) => replied = true,
            Err(_) => return false,
        }
    }
}

/// What one sample saw: when the new verdict showed, and how many connects it took.
pub struct Seen {
    pub at: Instant,
    pub attempts: u32,
}

/// Deny -> allow: STAGGER threads in `netns` connect back to back, each attempt given up after
/// CONNECT_TIMEOUT, their starts spread evenly; the first connect that completes is the
/// moment. A SYN the old ruleset dropped is not resent within the timeout, so a completed
/// connect was sent after the kernel changed: the figure is late by at most the spacing of
/// attempts (CONNECT_TIMEOUT / STAGGER) plus one round trip. `flip` makes the change and
/// returns its moment.
pub fn until_allowed(
    netns: &str,
    dst: SocketAddr,
    flip: impl FnOnce() -> Instant,
) -> (Seen, Instant) {
    let done = AtomicBool::new(false);
    let first: Mutex<Option<Instant>> = Mutex::new(None);
    let attempts = Mutex::new(0u32);
    let give_up = Instant::now() + Duration::from_secs(10);
    let t0 = thread::scope(|s| {
        for i in 0..STAGGER {
            let (done, first, attempts) = (&done, &first, &attempts);
            s.spawn(move || {
                enter_netns(netns);
                thread::sleep(CONNECT_TIMEOUT * i / STAGGER);
                let mut mine = 0;
                while !done.load(Ordering::Relaxed) && Instant::now() < give_up {
                    mine += 1;
                    match TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT) {
                        Ok(stream) => {
                            let at = Instant::now();
                            let mut slot = first.lock().unwrap();
                            *slot = Some(slot.map_or(at, |f| f.min(at)));
                            done.store(true, Ordering::Relaxed);
                            drop(slot);
                            exchange(stream);
                        }
                        // Refused or unreachable come back at once: do not spin.
                        Err(_) => thread::sleep(GAP),
                    }
                }
                *attempts.lock().unwrap() += mine;
            });
        }
        // Every prober is in its loop before the change.
        thread::sleep(CONNECT_TIMEOUT * 2);
        flip()
    });
    let at = first
        .into_inner()
        .unwrap()
        .expect("no connection went through within 10 s of allowing it");
    let attempts = attempts.into_inner().unwrap();
    (Seen { at, attempts }, t0)
}

/// Allow -> deny: one thread in `netns` connects, reads the reply and closes, GAP apart; the
/// moment is the start of the first probe whose connect or reply does not complete within
/// CONNECT_TIMEOUT, confirmed by the next one failing too (a lone timeout under load is not
/// taken for the change). The timeouts themselves are not counted; the figure is late by at
/// most one probe (a connect and reply, well under a millisecond here, plus GAP).
pub fn until_denied(
    netns: &str,
    dst: SocketAddr,
    flip: impl FnOnce() -> Instant,
) -> (Seen, Instant) {
    let flipped: Mutex<Option<Instant>> = Mutex::new(None);
    let give_up = Instant::now() + Duration::from_secs(10);
    thread::scope(|s| {
        let prober = s.spawn(|| {
            enter_netns(netns);
            let mut pending: Option<Instant> = None;
            let mut attempts = 0;
            while Instant::now() < give_up {
                let start = Instant::now();
                attempts += 1;
                let done = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)
                    .map(exchange)
                    .unwrap_or(false);
                if done {
                    pending = None;
                    thread::sleep(GAP);
                } else {
                    let t0 = *flipped.lock().unwrap();
                    match (pending, t0) {
                        // A probe started before the change is not taken for it.
                        (Some(at), Some(t0)) if at >= t0 => return Seen { at, attempts },
                        _ => pending = Some(start),
                    }
                }
            }
            panic!("connections still went through 10 s after denying them");
        });
        // The prober sees connections go through before the change.
        thread::sleep(CONNECT_TIMEOUT * 2);
        let t0 = flip();
        *flipped.lock().unwrap() = Some(t0);
        (prober.join().expect("prober"), t0)
    })
}

/// [`until_allowed`] when `allowed`, else [`until_denied`]; with the milliseconds from the
/// moment `flip` returned to the one the probes saw the new verdict.
pub fn until_verdict(
    allowed: bool,
    netns: &str,
    dst: SocketAddr,
    flip: impl FnOnce() -> Instant,
) -> (Seen, f64) {
    let (seen, flipped) = if allowed {
        until_allowed(netns, dst, flip)
    } else {
        until_denied(netns, dst, flip)
    };
    let ms = seen.at.saturating_duration_since(flipped).as_secs_f64() * 1e3;
    (seen, ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 50.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&v, 1.0), 100.0);
        assert_eq!(pct(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn median_intervals_are_the_sign_test_order_statistics() {
        let upto = |n: u32| -> Vec<f64> { (1..=n).rev().map(f64::from).collect() };
        // The published 95% table: n = 6 -> (1, 6), 10 -> (2, 9), 20 -> (6, 15), 50 -> (18, 33).
        assert_eq!(median_interval(&upto(5), 0.95), None);
        assert_eq!(median_interval(&upto(6), 0.95), Some((1.0, 6.0)));
        assert_eq!(median_interval(&upto(10), 0.95), Some((2.0, 9.0)));
        assert_eq!(median_interval(&upto(20), 0.95), Some((6.0, 15.0)));
        assert_eq!(median_interval(&upto(50), 0.95), Some((18.0, 33.0)));
        // A lower level narrows it; many values do not underflow to no interval at all.
        assert_eq!(median_interval(&upto(50), 0.80), Some((20.0, 31.0)));
        let (lo, hi) = median_interval(&upto(2_000), 0.95).expect("2,000 values");
        assert_eq!((lo, hi), (956.0, 1_045.0));
    }

    #[test]
    fn metric_sums_every_label_set_of_one_name_only() {
        let text = "# HELP nftpol_syncs_total x\n\
                    nftpol_syncs_total{kind=\"full\",result=\"ok\"} 2\n\
                    nftpol_syncs_total{kind=\"delta\",result=\"ok\"} 40\n\
                    nftpol_syncs_total_other 1000\n\
                    nftpol_ready 1\n";
        assert_eq!(metric_sum(text, "nftpol_syncs_total"), 42.0);
        assert_eq!(metric_sum(text, "nftpol_ready"), 1.0);
        assert_eq!(metric_sum(text, "nftpol_missing"), 0.0);
    }

    #[test]
    fn log_times_of_day_and_midnight() {
        let line = "2026-12-03T21:30:05.250000Z  INFO agent::run: synced";
        assert_eq!(
            log_time_of_day(line),
            Some(21.0 * 3600.0 + 30.0 * 60.0 + 5.25)
        );
        assert_eq!(log_time_of_day("synced without a time"), None);
        assert!((seconds_after(86_399.5, 0.25) - 0.75).abs() < 1e-9);
        assert!((seconds_after(10.0, 10.5) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn own_memory_and_cpu_time_read_from_proc() {
        let memory = Memory::of(std::process::id());
        assert!(memory.rss > 0.0 && memory.peak >= memory.rss);
        // Spins until the clock-tick counter moves: a reading of the wrong fields never does.
        let before = cpu_time(std::process::id());
        let give_up = Instant::now() + Duration::from_secs(30);
        let mut x = 0u64;
        while cpu_time(std::process::id()) == before {
            assert!(Instant::now() < give_up, "utime + stime never moved");
            for _ in 0..1_000_000 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            }
        }
        assert_ne!(x, 1);
    }
}
