//! Connections probed over and over from lab pods while a node's agent is killed with SIGKILL
//! and replaced: no probe may go the wrong way, before the kill, in the gap, or after.
//!
//! ```text
//! probers: one probe per ~50 ms each ─────────────────────────────────────────────▶
//!                          kill ── new agent ── its first `synced` ── +100 ms
//! burst:                   one probe of every prober every 10 ms
//! ```

#![allow(
    clippy::expect_used,
    reason = "test support: a failure fails the test by panicking"
)]

use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ruleset::{Cluster, Endpoint, Trace, Tracer};

use crate::agents::{logs, Agent};
use crate::lab::{Pod, Protocol};

/// One TCP connection probed over and over from a pod's namespace.
pub struct Prober<'a> {
    pub label: String,
    /// The `labpod` binary, which probes.
    labpod: &'a Path,
    from: &'a Pod,
    to: IpAddr,
    port: u16,
    /// What every probe must find.
    pub allowed: bool,
}

/// One probe: when it started (from the test's start), whether it reached, and the reason.
type Sample = (Duration, bool, String);

impl<'a> Prober<'a> {
    /// TCP from `from` to `to`'s IPv4 address on `port`, probed with the `labpod` binary; every
    /// probe must find what `Tracer` says of `cluster`, whose trace comes along.
    pub fn tcp(
        labpod: &'a Path,
        from: &'a Pod,
        to: &Pod,
        port: u16,
        cluster: &Cluster,
    ) -> (Prober<'a>, Trace) {
        let trace = Tracer::new(cluster.clone())
            .trace(
                &Endpoint::Address(IpAddr::V4(from.ipv4)),
                &Endpoint::Address(IpAddr::V4(to.ipv4)),
                Protocol::Tcp,
                port,
            )
            .expect("trace");
        let prober = Prober {
            label: format!(
                "{} -> {} TCP {port} ({})",
                from.name,
                to.name,
                if trace.allowed {
                    "allowed"
                } else {
                    "forbidden"
                }
            ),
            labpod,
            from,
            to: IpAddr::V4(to.ipv4),
            port,
            allowed: trace.allowed,
        };
        (prober, trace)
    }

    /// Starts one probe; a forbidden connection is given up sooner.
    fn spawn(&self) -> Child {
        let timeout = if self.allowed { "1000" } else { "250" };
        Command::new("ip")
            .args(["netns", "exec", &self.from.netns])
            .arg(self.labpod)
            .args(["probe", "--timeout-ms", timeout])
            .args([self.to.to_string(), "tcp".into(), self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("labpod probe starts")
    }

    /// Whether a probe reached, and what it said.
    fn outcome(probe: Child) -> (bool, String) {
        let out = probe.wait_with_output().expect("labpod probe ends");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            (text.ends_with(" ok"), text)
        } else {
            (
                false,
                format!(
                    "probe failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            )
        }
    }

    /// Probes every ~50 ms until `stop`.
    fn run(&self, stop: &AtomicBool, t0: Instant) -> Vec<Sample> {
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let at = t0.elapsed();
            let (ok, detail) = Prober::outcome(self.spawn());
            samples.push((at, ok, detail));
            thread::sleep(Duration::from_millis(50));
        }
        samples
    }
}

/// Sets the flag when dropped, so that prober threads stop even when the test panics
/// (`thread::scope` waits for them before it lets the panic through).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// While `probers` run, kills `agents[index]` with SIGKILL and puts `restart()` in its place;
/// the new agent must sync within `timeout`. Panics when a probe went the wrong way or when
/// a phase (before the kill, between the kill and the new agent's first `synced`, after) saw
/// too few probes. `t0` is the test's start, for the times printed.
pub fn restart_under_probes(
    agents: &mut [Agent],
    index: usize,
    restart: impl FnOnce() -> Agent,
    probers: &[Prober],
    timeout: Duration,
    t0: Instant,
) {
    let stop = AtomicBool::new(false);
    let mut killed_at = Duration::ZERO;
    let mut synced_at = Duration::ZERO;
    let mut samples: Vec<Vec<Sample>> = thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let handles: Vec<_> = probers
            .iter()
            .map(|p| s.spawn(|| p.run(&stop, t0)))
            .collect();
        // Let the probers run on the first agent, kill it, start another, let them run on it.
        thread::sleep(Duration::from_millis(700));
        agents[index].kill();
        let status = agents[index].wait_exit(Duration::from_secs(5));
        killed_at = t0.elapsed();
        agents[index] = restart();
        let restarted = Instant::now();
        // The loops above probe every ~300 ms (a forbidden probe waits out its timeout); an
        // agent starts and installs its table within tens of milliseconds. So, from the kill
        // until 100 ms after `synced`, also start a probe of every prober every 10 ms, without
        // waiting for it, to cover that window densely.
        let mut burst: Vec<(usize, Duration, Child)> = Vec::new();
        let mut synced: Option<Instant> = None;
        while synced.is_none_or(|at| at.elapsed() < Duration::from_millis(100)) {
            if burst.len() < 600 {
                for (i, p) in probers.iter().enumerate() {
                    burst.push((i, t0.elapsed(), p.spawn()));
                }
            }
            if synced.is_none() && agents[index].synced() > 0 {
                synced = Some(Instant::now());
                synced_at = t0.elapsed();
            }
            if synced.is_none() {
                if let Some(status) = agents[index].exit_status() {
                    panic!("the new agent exited ({status})\n{}", logs(agents));
                }
                assert!(
                    restarted.elapsed() < timeout,
                    "the new agent did not sync within {timeout:?}\n{}",
                    logs(agents)
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        println!(
            "  agent {} killed with SIGKILL at {killed_at:?} ({status:?}); the new one synced {:?} after, at {synced_at:?}; {} burst probes",
            agents[index].node,
            synced_at.saturating_sub(killed_at),
            burst.len()
        );
        thread::sleep(Duration::from_millis(600));
        stop.store(true, Ordering::Relaxed);
        let mut samples: Vec<Vec<Sample>> = handles
            .into_iter()
            .map(|h| h.join().expect("prober thread"))
            .collect();
        for (i, at, probe) in burst {
            let (ok, detail) = Prober::outcome(probe);
            samples[i].push((at, ok, detail));
        }
        samples
    });
    let mut wrong = Vec::new();
    for (p, samples) in probers.iter().zip(&mut samples) {
        samples.sort_by_key(|(at, _, _)| *at);
        let phase = |at: Duration| usize::from(at >= killed_at) + usize::from(at >= synced_at);
        // (reached, not) by phase.
        let mut phases = [(0, 0); 3];
        for (at, ok, detail) in samples.iter() {
            let counts = &mut phases[phase(*at)];
            if *ok {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
            if *ok != p.allowed {
                wrong.push(format!("{} at {at:?}: {detail}", p.label));
            }
        }
        println!(
            "  {}: {} probes, (reached, not) before the kill, between kill and sync, after: {phases:?}",
            p.label,
            samples.len()
        );
        let [before, gap, after] = phases.map(|(reached, not)| reached + not);
        assert!(
            before >= 2 && gap >= 1 && after >= 2,
            "{}: too few probes in some phase: {phases:?}",
            p.label
        );
    }
    let node = agents[index].node.clone();
    assert!(
        wrong.is_empty(),
        "around the restart of agent {node} (killed at {killed_at:?}, the new one synced at {synced_at:?}), {} probes went the wrong way:\n{}\n{}",
        wrong.len(),
        wrong.join("\n"),
        logs(agents)
    );
}
