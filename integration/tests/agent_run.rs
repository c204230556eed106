//! `agent run` in a two-node Flannel-style lab (`integration::lab`): one agent per node
//! namespace, started on the three-tier example. The kernel must allow exactly what `Tracer`
//! says for the snapshot the agents last read successfully, through rename-replace, in-place
//! and symlink-swap changes of the snapshot and a snapshot that does not parse; SIGTERM leaves
//! the rules in place; and restarting an agent opens no gap, neither for a forbidden
//! connection nor for an allowed one.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use integration::agents::{agent_binary, logs, wait_for, Agent};
use integration::lab::{compare_with_trace, Cell, Family, Lab, Pod, Protocol};
use integration::netns;
use ruleset::trace::Outcome;
use ruleset::{Cluster, Compiler, Endpoint, Tracer};

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");
/// Node `i` of the lab is `NODES[i]` to the snapshot.
const NODES: [&str; 2] = ["node-a", "node-b"];
/// CoreDNS listens on UDP and TCP 53; the other ports are the example's policies'.
const SERVICES: [(Protocol, u16); 5] = [
    (Protocol::Tcp, 8080),
    (Protocol::Tcp, 9090),
    (Protocol::Tcp, 5432),
    (Protocol::Tcp, 53),
    (Protocol::Udp, 53),
];
/// The policy the modified snapshot leaves out: without it backend -> database:5432 is denied.
const DROPPED_POLICY: &str = "database-allow-backend";
/// YAML that does not parse.
const BROKEN: &str = "apiVersion: v1\nkind: Pod\nmetadata: [unclosed\n  name: x\n";
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits for one more `synced` line from every agent than `before` counted.
fn wait_synced(agents: &mut [Agent], before: &[usize], what: &str) -> Duration {
    wait_for(agents, &format!("`synced` {what}"), SYNC_TIMEOUT, |i, a| {
        a.synced() > before[i]
    })
}

/// Counts of `synced` and of change-seen lines, taken before a change.
fn counts(agents: &[Agent]) -> Vec<(usize, usize)> {
    agents.iter().map(|a| (a.synced(), a.seen())).collect()
}

/// Whether node `NODES[i]`'s compiled ruleset differs between `old` and `new`.
fn rulesets_changed(old: &Cluster, new: &Cluster) -> Vec<bool> {
    NODES
        .iter()
        .map(|node| {
            let render = |c: &Cluster| ruleset::render(Compiler::new(c.clone(), node).table());
            render(old) != render(new)
        })
        .collect()
}

/// After a change of the snapshot: waits until every agent whose node's ruleset changes
/// logged one more `synced`, and every other agent one more line saying it saw the change.
fn wait_change(
    agents: &mut [Agent],
    before: &[(usize, usize)],
    changed: &[bool],
    what: &str,
) -> Duration {
    let expect: Vec<String> = NODES
        .iter()
        .zip(changed)
        .map(|(n, c)| {
            format!(
                "{n}: {}",
                if *c {
                    "`synced` (its ruleset changes)"
                } else {
                    "`synced` or `ruleset did not` (its ruleset stays)"
                }
            )
        })
        .collect();
    wait_for(
        agents,
        &format!("{} {what}", expect.join(", ")),
        SYNC_TIMEOUT,
        |i, a| {
            if changed[i] {
                a.synced() > before[i].0
            } else {
                a.seen() > before[i].1
            }
        },
    )
}

// --------------------------------------------------------------------------------- snapshot

/// A scratch directory for snapshots, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("nftpol-agent-run-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to a new file `name` and loads it as the tests' reference cluster.
    fn version(&self, name: &str, text: &str) -> (PathBuf, Cluster) {
        let path = self.path(name);
        fs::write(&path, text).expect("write snapshot version");
        let cluster = agent::manifests::load(&path).expect("snapshot version loads");
        (path, cluster)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn three_tier() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-tier.yaml");
    fs::read_to_string(path).expect("three-tier example")
}

/// `text` without the YAML document of NetworkPolicy `name`.
fn without_policy(text: &str, name: &str) -> String {
    let docs: Vec<&str> = text.split("\n---\n").collect();
    let marker = format!("\n  name: {name}\n");
    let kept: Vec<&str> = docs
        .iter()
        .copied()
        .filter(|d| !(d.contains("kind: NetworkPolicy") && d.contains(&marker)))
        .collect();
    assert_eq!(kept.len() + 1, docs.len(), "policy {name} found once");
    kept.join("\n---\n")
}

/// Writes `text` beside `path` and renames it over `path`.
fn replace_by_rename(path: &Path, text: &str) {
    let new = path.with_extension("yaml.new");
    fs::write(&new, text).expect("write new snapshot");
    fs::rename(&new, path).expect("rename over the snapshot");
}

/// Makes `path` a symlink to `target`, atomically: a new link renamed over it.
fn swap_symlink(path: &Path, target: &Path) {
    let new = path.with_extension("yaml.link");
    let _ = fs::remove_file(&new);
    std::os::unix::fs::symlink(target, &new).expect("symlink");
    fs::rename(&new, path).expect("rename the symlink over the snapshot");
}

// -------------------------------------------------------------------------------------- lab

/// A two-node lab with the snapshot's pods, whose rulesets compile without complaint.
fn lab_for(cluster: &Cluster) -> Lab {
    let ports: Vec<u16> = SERVICES.iter().map(|(_, port)| *port).collect();
    let lab = Lab::for_cluster(LABPOD, cluster, &NODES, &ports).expect("lab");
    for node in NODES {
        let compiler = Compiler::new(cluster.clone(), node);
        assert!(
            compiler.diagnostics().is_empty(),
            "{node}: {:?}",
            compiler.diagnostics()
        );
    }
    lab
}

fn pod<'a>(lab: &'a Lab, name: &str) -> &'a Pod {
    lab.pods()
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no lab pod {name}"))
}

fn node_exec(lab: &Lab, index: usize, command: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", lab.node_netns(index).expect("node")])
        .args(command)
        .output()
        .expect("ip netns exec runs")
}

fn bridge_nf(lab: &Lab, index: usize) -> String {
    let out = node_exec(
        lab,
        index,
        &[
            "sysctl",
            "-n",
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
        ],
    );
    assert!(out.status.success(), "sysctl: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Probes the whole matrix and asserts that the kernel allows exactly what `Tracer` says of
/// `cluster`; returns the cells and Tracer's verdicts on them.
fn check_matrix(
    lab: &Lab,
    agents: &mut [Agent],
    step: &str,
    cluster: &Cluster,
    since: Instant,
) -> (Vec<Cell>, Vec<bool>) {
    let started = Instant::now();
    let cells = lab.matrix(&SERVICES, &[Family::V4]).expect("matrix");
    let comparison = compare_with_trace(lab, &cells, cluster).expect("trace the cells");
    let traces = comparison.traces;
    let pods = lab.pods().len();
    assert_eq!(cells.len(), pods * (pods - 1) * SERVICES.len());
    let (failures, disagreements) = (comparison.failures, comparison.disagreements);
    let allowed = traces.iter().filter(|t| t.allowed).count();
    println!(
        "  {step}: {} cells checked ({allowed} allowed, {} denied; probes failing by {failures:?}), {} disagreements; matrix in {:?}, at {:?}",
        cells.len(),
        cells.len() - allowed,
        disagreements.len(),
        started.elapsed(),
        since.elapsed()
    );
    assert!(
        disagreements.is_empty(),
        "{step}: the kernel and Tracer disagree on {} of {} cells:\n{}\n\n{}",
        disagreements.len(),
        cells.len(),
        disagreements.join("\n\n"),
        logs(agents)
    );
    let verdicts = traces.iter().map(|t| t.allowed).collect();
    (cells, verdicts)
}

/// Lab, snapshot and one synced agent per node, on the three-tier example.
struct Setup {
    scratch: Scratch,
    original_text: String,
    original: Cluster,
    snapshot: PathBuf,
    lab: Lab,
}

fn setup(tag: &str, bridge_nf_off: bool) -> Setup {
    let scratch = Scratch::new(tag);
    let original_text = three_tier();
    let (_, original) = scratch.version("original.yaml", &original_text);
    let snapshot = scratch.path("snapshot.yaml");
    fs::write(&snapshot, &original_text).expect("write snapshot");
    let lab = lab_for(&original);
    if bridge_nf_off {
        for index in 0..NODES.len() {
            let out = node_exec(
                &lab,
                index,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.bridge.bridge-nf-call-iptables=0",
                    "net.bridge.bridge-nf-call-ip6tables=0",
                ],
            );
            assert!(out.status.success(), "sysctl: {out:?}");
            assert_eq!(bridge_nf(&lab, index), "0 0");
        }
    }
    Setup {
        scratch,
        original_text,
        original,
        snapshot,
        lab,
    }
}

fn start_agents(lab: &Lab, snapshot: &Path) -> Vec<Agent> {
    (0..NODES.len())
        .map(|i| Agent::start(Path::new(LABPOD), lab, i, NODES[i], snapshot, &[]))
        .collect()
}

// ------------------------------------------------------------------------------------ tests

#[test]
fn agent_run_enforces_and_follows_the_snapshot() {
    if netns::skip_unless_root("agent_run_enforces_and_follows_the_snapshot") {
        return;
    }
    let t0 = Instant::now();
    agent_binary(Path::new(LABPOD));
    let Setup {
        scratch,
        original_text,
        original,
        snapshot,
        lab,
    } = setup("follow", true);
    let modified_text = without_policy(&original_text, DROPPED_POLICY);
    let (_, modified) = scratch.version("modified.yaml", &modified_text);
    let (swap_target, _) = scratch.version("swapped.yaml", &modified_text);
    println!(
        "lab of {} pods on {} nodes built at {:?} (bridge-nf-call-* set to 0 before the agents start)",
        lab.pods().len(),
        NODES.len(),
        t0.elapsed()
    );

    // Declared after the lab: dropped, and so killed, before the lab goes.
    let mut agents = start_agents(&lab, &snapshot);
    let took = wait_synced(&mut agents, &[0, 0], "at start");
    println!("  agents synced {took:?} after start");
    for (index, agent) in agents.iter_mut().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(1);
        while bridge_nf(&lab, index) != "1 1" && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let now = bridge_nf(&lab, index);
        assert_eq!(
            now,
            "1 1",
            "bridge-nf-call-iptables/ip6tables not set to 1 by the agent\n{}",
            agent.describe()
        );
    }
    let (cells, before_change) = check_matrix(&lab, &mut agents, "start (original)", &original, t0);

    // The change must matter, or the following steps prove nothing.
    let flipped: Vec<String> = cells
        .iter()
        .zip(
            compare_with_trace(&lab, &cells, &modified)
                .expect("trace the cells")
                .traces,
        )
        .zip(&before_change)
        .filter(|((_, t), was)| t.allowed != **was)
        .map(|((c, t), _)| {
            format!(
                "{} -> {} {} {}: now {}",
                lab.pods()[c.from].name,
                lab.pods()[c.to].name,
                c.target.protocol.k8s_name(),
                c.target.port,
                if t.allowed { "allowed" } else { "denied" }
            )
        })
        .collect();
    println!(
        "  without {DROPPED_POLICY}, {} cells change verdict: {flipped:?}",
        flipped.len()
    );
    assert!(
        !flipped.is_empty(),
        "dropping {DROPPED_POLICY} changes nothing"
    );

    let changed = rulesets_changed(&original, &modified);
    println!("  nodes whose ruleset changes without {DROPPED_POLICY}: {changed:?}");
    assert!(changed.iter().any(|c| *c));

    let before = counts(&agents);
    replace_by_rename(&snapshot, &modified_text);
    let took = wait_change(&mut agents, &before, &changed, "after rename-replace");
    println!("  rename-replace (without {DROPPED_POLICY}) picked up in {took:?}");
    check_matrix(&lab, &mut agents, "after rename-replace", &modified, t0);

    let before = counts(&agents);
    fs::write(&snapshot, &original_text).expect("write in place");
    let took = wait_change(&mut agents, &before, &changed, "after in-place write");
    println!("  in-place write (original) picked up in {took:?}");
    check_matrix(&lab, &mut agents, "after in-place write", &original, t0);

    let before = counts(&agents);
    swap_symlink(&snapshot, &swap_target);
    let took = wait_change(&mut agents, &before, &changed, "after symlink swap");
    println!("  symlink swap (without {DROPPED_POLICY}) picked up in {took:?}");
    check_matrix(&lab, &mut agents, "after symlink swap", &modified, t0);

    // Written through the symlink into its target: what the agent reads changes, the link not.
    let errors: Vec<usize> = agents.iter().map(Agent::errors).collect();
    fs::write(&snapshot, BROKEN).expect("write broken snapshot in place");
    let took = wait_for(
        &mut agents,
        "ERROR line for the broken snapshot",
        Duration::from_secs(5),
        |i, a| a.errors() > errors[i],
    );
    thread::sleep(Duration::from_secs(1));
    for agent in &mut agents {
        assert!(
            agent.exit_status().is_none(),
            "the broken snapshot stopped the agent\n{}",
            agent.describe()
        );
    }
    println!("  broken snapshot logged as an error in {took:?}; both agents still run");
    check_matrix(
        &lab,
        &mut agents,
        "with a broken snapshot (last good: without the policy)",
        &modified,
        t0,
    );

    for agent in &agents {
        agent.signal("-TERM");
    }
    for agent in &mut agents {
        let started = Instant::now();
        let status = agent.wait_exit(Duration::from_secs(5));
        let took = started.elapsed();
        let description = agent.describe();
        let status = status.unwrap_or_else(|| {
            panic!(
                "agent {} still runs 5 s after SIGTERM\n{description}",
                agent.node
            )
        });
        assert_eq!(
            status.code(),
            Some(0),
            "agent {} after SIGTERM: {status}\n{description}",
            agent.node
        );
        let listed = Command::new("ip")
            .args(["netns", "exec", &agent.netns])
            .args(["nft", "list", "table", "inet", "nftpol"])
            .output()
            .expect("nft runs");
        assert!(
            listed.status.success(),
            "agent {} left no table inet nftpol after SIGTERM: {}",
            agent.node,
            String::from_utf8_lossy(&listed.stderr)
        );
        println!(
            "  agent {} exited 0 {took:?} after SIGTERM; table inet nftpol still listed ({} lines)",
            agent.node,
            String::from_utf8_lossy(&listed.stdout).lines().count()
        );
    }
    check_matrix(
        &lab,
        &mut agents,
        "after SIGTERM (rules left in place)",
        &modified,
        t0,
    );
    println!(
        "agent_run_enforces_and_follows_the_snapshot: done in {:?}",
        t0.elapsed()
    );
}

/// One connection probed over and over from a pod's namespace.
struct Prober<'a> {
    label: &'static str,
    from: &'a Pod,
    to: IpAddr,
    port: u16,
    allowed: bool,
    timeout_ms: u32,
}

/// One probe: when it started (from the test's start), whether it reached, and the reason.
type Sample = (Duration, bool, String);

impl Prober<'_> {
    /// Starts one probe.
    fn spawn(&self) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.from.netns, LABPOD, "probe"])
            .args(["--timeout-ms", &self.timeout_ms.to_string()])
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

#[test]
fn agent_restart_keeps_enforcing() {
    if netns::skip_unless_root("agent_restart_keeps_enforcing") {
        return;
    }
    let t0 = Instant::now();
    agent_binary(Path::new(LABPOD));
    let Setup {
        scratch: _scratch,
        original,
        snapshot,
        lab,
        ..
    } = setup("restart", false);
    println!(
        "lab of {} pods built at {:?}",
        lab.pods().len(),
        t0.elapsed()
    );
    let mut agents = start_agents(&lab, &snapshot);
    let took = wait_synced(&mut agents, &[0, 0], "at start");
    println!("  agents synced {took:?} after start");
    check_matrix(&lab, &mut agents, "start", &original, t0);

    let database = pod(&lab, "shop/database-0");
    // ingress-nginx has no policies: only node-b's ingress rules for the database deny this
    // one, so a gap on node-b would let it through. frontend-1 is also denied on node-a.
    let probers = [
        Prober {
            label: "ingress-nginx-controller -> database-0 TCP 5432 (forbidden, by node-b only)",
            from: pod(&lab, "ingress-nginx/ingress-nginx-controller"),
            to: IpAddr::V4(database.ipv4),
            port: 5432,
            allowed: false,
            timeout_ms: 250,
        },
        Prober {
            label: "frontend-1 -> database-0 TCP 5432 (forbidden)",
            from: pod(&lab, "shop/frontend-1"),
            to: IpAddr::V4(database.ipv4),
            port: 5432,
            allowed: false,
            timeout_ms: 250,
        },
        Prober {
            label: "backend-2 -> database-0 TCP 5432 (allowed, both ends on node-b)",
            from: pod(&lab, "shop/backend-2"),
            to: IpAddr::V4(database.ipv4),
            port: 5432,
            allowed: true,
            timeout_ms: 1000,
        },
    ];
    let mut tracer = Tracer::new(original.clone());
    for p in &probers {
        let trace = tracer
            .trace(
                &Endpoint::Address(IpAddr::V4(p.from.ipv4)),
                &Endpoint::Address(p.to),
                Protocol::Tcp,
                p.port,
            )
            .expect("trace");
        assert_eq!(trace.allowed, p.allowed, "{}: {trace}", p.label);
        if p.label.contains("node-b only") {
            assert!(
                matches!(trace.egress, Outcome::NotIsolated),
                "{}: {trace}",
                p.label
            );
        }
    }

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
        let agent = &mut agents[1];
        agent.kill();
        let status = agent.wait_exit(Duration::from_secs(5));
        killed_at = t0.elapsed();
        agents[1] = Agent::start(Path::new(LABPOD), &lab, 1, NODES[1], &snapshot, &[]);
        let restarted = Instant::now();
        // The loops above probe every ~300 ms (a denied probe waits out its timeout); the
        // agent starts and installs its table within tens of milliseconds. So, from the kill
        // until 100 ms after `synced`, also start a probe of every cell every 10 ms, without
        // waiting for it, to cover that window densely.
        let mut burst: Vec<(usize, Duration, Child)> = Vec::new();
        let mut synced: Option<Instant> = None;
        while synced.is_none_or(|at| at.elapsed() < Duration::from_millis(100)) {
            if burst.len() < 600 {
                for (i, p) in probers.iter().enumerate() {
                    burst.push((i, t0.elapsed(), p.spawn()));
                }
            }
            if synced.is_none() && agents[1].synced() > 0 {
                synced = Some(Instant::now());
                synced_at = t0.elapsed();
            }
            if synced.is_none() {
                if let Some(status) = agents[1].exit_status() {
                    panic!(
                        "the new node-b agent exited ({status})\n{}",
                        logs(&mut agents)
                    );
                }
                assert!(
                    restarted.elapsed() < SYNC_TIMEOUT,
                    "the new node-b agent did not sync within {SYNC_TIMEOUT:?}\n{}",
                    logs(&mut agents)
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        println!(
            "  agent node-b killed with SIGKILL at {killed_at:?} ({status:?}); new one synced {:?} after start, at {synced_at:?}; {} burst probes",
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
    for list in &mut samples {
        list.sort_by_key(|(at, _, _)| *at);
    }

    let mut wrong = Vec::new();
    for (p, samples) in probers.iter().zip(&samples) {
        let phase = |at: Duration| {
            if at < killed_at {
                0
            } else if at < synced_at {
                1
            } else {
                2
            }
        };
        let mut counts = [(0, 0); 3];
        for (at, ok, detail) in samples {
            let c = &mut counts[phase(*at)];
            if *ok {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
            if *ok != p.allowed {
                wrong.push(format!("{} at {at:?}: {detail}", p.label));
            }
        }
        println!(
            "  {}: {} probes (reached/not, by start time) before the kill {:?}, between kill and sync {:?}, after {:?}",
            p.label,
            samples.len(),
            counts[0],
            counts[1],
            counts[2]
        );
        assert!(
            counts[0].0 + counts[0].1 >= 2
                && counts[1].0 + counts[1].1 >= 1
                && counts[2].0 + counts[2].1 >= 2,
            "{}: too few probes in some phase: {counts:?}",
            p.label
        );
    }
    assert!(
        wrong.is_empty(),
        "around the restart of node-b's agent (killed at {killed_at:?}, new one synced at {synced_at:?}), {} probes went the wrong way:\n{}\n{}",
        wrong.len(),
        wrong.join("\n"),
        logs(&mut agents)
    );
    check_matrix(&lab, &mut agents, "after the restart", &original, t0);
    println!("agent_restart_keeps_enforcing: done in {:?}", t0.elapsed());
}
