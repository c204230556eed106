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
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use integration::agents::{
    agent_binary, check_matrix, lab_for, marks, rulesets_changed, wait_change, wait_for,
    wait_synced, Agent, Delivery,
};
use integration::lab::{compare_with_trace, Lab, Protocol};
use integration::netns;
use integration::probers::{restart_under_probes, Prober};
use ruleset::trace::Outcome;
use ruleset::Cluster;

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

// --------------------------------------------------------------------------------- snapshot

/// Writes `text` to a new file `name` in `dir` and loads it as the tests' reference cluster.
fn version(dir: &Path, name: &str, text: &str) -> (PathBuf, Cluster) {
    let path = dir.join(name);
    fs::write(&path, text).expect("write snapshot version");
    let cluster = agent::manifests::load(&path).expect("snapshot version loads");
    (path, cluster)
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

/// Lab, snapshot and one synced agent per node, on the three-tier example.
struct Setup {
    scratch: tempfile::TempDir,
    original_text: String,
    original: Cluster,
    snapshot: PathBuf,
    lab: Lab,
}

fn setup(bridge_nf_off: bool) -> Setup {
    let scratch = tempfile::tempdir().expect("scratch dir");
    let original_text = three_tier();
    let (_, original) = version(scratch.path(), "original.yaml", &original_text);
    let snapshot = scratch.path().join("snapshot.yaml");
    fs::write(&snapshot, &original_text).expect("write snapshot");
    let lab = lab_for(Path::new(LABPOD), &original, &NODES, &SERVICES);
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
    Agent::start_each(Path::new(LABPOD), lab, &NODES, snapshot, &[])
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
    } = setup(true);
    let modified_text = without_policy(&original_text, DROPPED_POLICY);
    let (_, modified) = version(scratch.path(), "modified.yaml", &modified_text);
    let (swap_target, _) = version(scratch.path(), "swapped.yaml", &modified_text);
    println!(
        "lab of {} pods on {} nodes built at {:?} (bridge-nf-call-* set to 0 before the agents start)",
        lab.pods().len(),
        NODES.len(),
        t0.elapsed()
    );

    // Declared after the lab: dropped, and so killed, before the lab goes.
    let mut agents = start_agents(&lab, &snapshot);
    let took = wait_synced(&mut agents, SYNC_TIMEOUT);
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
    let (cells, before_change) = check_matrix(
        &lab,
        &mut agents,
        &SERVICES,
        "start (original)",
        &original,
        t0,
    );

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

    let changed = rulesets_changed(&NODES, &original, &modified);
    println!("  nodes whose ruleset changes without {DROPPED_POLICY}: {changed:?}");
    assert!(changed.iter().any(|c| *c));

    let before = marks(&agents);
    replace_by_rename(&snapshot, &modified_text);
    let took = wait_change(
        &mut agents,
        &before,
        &changed,
        Delivery::Whole,
        "after rename-replace",
        SYNC_TIMEOUT,
    );
    println!("  rename-replace (without {DROPPED_POLICY}) picked up in {took:?}");
    check_matrix(
        &lab,
        &mut agents,
        &SERVICES,
        "after rename-replace",
        &modified,
        t0,
    );

    let before = marks(&agents);
    fs::write(&snapshot, &original_text).expect("write in place");
    let took = wait_change(
        &mut agents,
        &before,
        &changed,
        Delivery::Whole,
        "after in-place write",
        SYNC_TIMEOUT,
    );
    println!("  in-place write (original) picked up in {took:?}");
    check_matrix(
        &lab,
        &mut agents,
        &SERVICES,
        "after in-place write",
        &original,
        t0,
    );

    let before = marks(&agents);
    swap_symlink(&snapshot, &swap_target);
    let took = wait_change(
        &mut agents,
        &before,
        &changed,
        Delivery::Whole,
        "after symlink swap",
        SYNC_TIMEOUT,
    );
    println!("  symlink swap (without {DROPPED_POLICY}) picked up in {took:?}");
    check_matrix(
        &lab,
        &mut agents,
        &SERVICES,
        "after symlink swap",
        &modified,
        t0,
    );

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
        &SERVICES,
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
        &SERVICES,
        "after SIGTERM (rules left in place)",
        &modified,
        t0,
    );
    println!(
        "agent_run_enforces_and_follows_the_snapshot: done in {:?}",
        t0.elapsed()
    );
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
    } = setup(false);
    println!(
        "lab of {} pods built at {:?}",
        lab.pods().len(),
        t0.elapsed()
    );
    let mut agents = start_agents(&lab, &snapshot);
    let took = wait_synced(&mut agents, SYNC_TIMEOUT);
    println!("  agents synced {took:?} after start");
    check_matrix(&lab, &mut agents, &SERVICES, "start", &original, t0);

    let database = lab.pod("shop/database-0").expect("lab pod");
    // ingress-nginx has no policies: only node-b's ingress rules for the database deny this
    // one, so a gap on node-b would let it through. frontend-1 is also denied on node-a;
    // backend-2 is allowed, both ends on node-b.
    let mut probers = Vec::new();
    for (from, allowed) in [
        ("ingress-nginx/ingress-nginx-controller", false),
        ("shop/frontend-1", false),
        ("shop/backend-2", true),
    ] {
        let (prober, trace) = Prober::tcp(
            Path::new(LABPOD),
            lab.pod(from).expect("lab pod"),
            database,
            5432,
            &original,
        );
        assert_eq!(trace.allowed, allowed, "{}: {trace}", prober.label);
        if from.starts_with("ingress-nginx/") {
            assert!(
                matches!(trace.egress, Outcome::NotIsolated),
                "{}: {trace}",
                prober.label
            );
        }
        probers.push(prober);
    }
    let restart = || Agent::start(Path::new(LABPOD), &lab, 1, NODES[1], &snapshot, &[]);
    restart_under_probes(&mut agents, 1, restart, &probers, SYNC_TIMEOUT, t0);
    check_matrix(
        &lab,
        &mut agents,
        &SERVICES,
        "after the restart",
        &original,
        t0,
    );
    println!("agent_restart_keeps_enforcing: done in {:?}", t0.elapsed());
}
