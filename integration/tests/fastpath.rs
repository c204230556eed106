//! The established-connection fast path with `agent run` in a two-node lab: a UDP flow (one
//! source port, so one conntrack entry) from a pod on node-a to a pod on node-b, whose ingress
//! the agents enforce. The flow's entry carries the ruleset epoch in its ct mark; it keeps
//! working across a change that does not concern it, is cut at its next packet by a change
//! that denies it, and stays cut while the epochs wrap around to the value its mark still
//! holds (two bits: three epochs).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::agents::{
    http_get_in, lab_for, marks, rulesets_changed, wait_change, wait_for, wait_synced, Agent,
    Delivery,
};
use integration::lab::Lab;
use integration::netns;
use ruleset::Cluster;

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");
const NODES: [&str; 2] = ["node-a", "node-b"];
/// Two bits: epochs 1, 2 and 3.
const BITS: u32 = 0x3000_0000;
const SERVER: &str = "10.244.2.10";
/// The flow's client source port, the same for every packet.
const SPORT: u16 = 40_123;
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// The agents' default health address, inside each node's namespace.
const HEALTH: &str = "127.0.0.1:9743";

const BASE: &str = "apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Namespace
    metadata: {name: fp, labels: {kubernetes.io/metadata.name: fp}}
  - apiVersion: v1
    kind: Pod
    metadata: {namespace: fp, name: client, labels: {app: client}}
    spec: {nodeName: node-a, containers: [{name: c, image: x}]}
    status: {phase: Running, podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}]}
  - apiVersion: v1
    kind: Pod
    metadata: {namespace: fp, name: server, labels: {app: server}}
    spec: {nodeName: node-b, containers: [{name: s, image: x}]}
    status: {phase: Running, podIP: 10.244.2.10, podIPs: [{ip: 10.244.2.10}]}
  - apiVersion: v1
    kind: Pod
    metadata: {namespace: fp, name: other, labels: {app: other}}
    spec: {nodeName: node-a, containers: [{name: o, image: x}]}
    status: {phase: Running, podIP: 10.244.1.11, podIPs: [{ip: 10.244.1.11}]}
";

/// Admits the client to the server on UDP 80: the flow.
const ALLOW_CLIENT: &str = "  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {namespace: fp, name: allow-client}
    spec:
      podSelector: {matchLabels: {app: server}}
      ingress:
        - from: [{podSelector: {matchLabels: {app: client}}}]
          ports: [{protocol: UDP, port: 80}]
";

/// Isolates the server too and admits `other` on TCP 81: a change of node-b's ruleset that
/// does not concern the flow. `n` names it, so that each version differs.
fn unrelated(n: usize) -> String {
    format!(
        "  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {{namespace: fp, name: other-{n}}}
    spec:
      podSelector: {{matchLabels: {{app: server}}}}
      ingress:
        - from: [{{podSelector: {{matchLabels: {{app: other}}}}}}]
          ports: [{{protocol: TCP, port: 81}}]
"
    )
}

fn cluster(text: &str, dir: &Path) -> Cluster {
    let path = dir.join("version.yaml");
    fs::write(&path, text).expect("write version");
    agent::manifests::load(&path).expect("version loads")
}

/// Replaces the snapshot with `text` and waits until both agents took it.
fn change(agents: &mut [Agent], snapshot: &Path, scratch: &Path, old: &str, text: &str) {
    let changed = rulesets_changed(&NODES, &cluster(old, scratch), &cluster(text, scratch));
    assert!(changed[1], "node-b's ruleset must change");
    let before = marks(agents);
    let new = snapshot.with_extension("yaml.new");
    fs::write(&new, text).expect("write snapshot");
    fs::rename(&new, snapshot).expect("rename snapshot");
    wait_change(
        agents,
        &before,
        &changed,
        Delivery::Whole,
        "a snapshot change",
        SYNC_TIMEOUT,
    );
}

/// One UDP exchange of the flow: whether the server's reply came back.
fn flow(lab: &Lab) -> bool {
    let client = lab.pod("fp/client").expect("client pod");
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.netns,
            LABPOD,
            "probe",
            "--timeout-ms",
            "600",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("labpod probe runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{SERVER} udp 80 {SPORT}\n").as_bytes())
        .expect("target");
    let out = child.wait_with_output().expect("labpod probe ends");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim_end().ends_with(" ok")
}

/// The epoch bits of the flow's conntrack entry on node-b (`None`: no entry).
fn flow_mark(lab: &Lab) -> Option<u32> {
    let out = Command::new("ip")
        .args(["netns", "exec", lab.node_netns(1).expect("node-b")])
        .args([
            "conntrack",
            "-L",
            "-p",
            "udp",
            "--sport",
            &SPORT.to_string(),
        ])
        .output()
        .expect("conntrack runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains(&format!("dst={SERVER}")))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("mark="))
                .and_then(|m| m.parse::<u32>().ok())
        })
        .map(|mark| mark & BITS)
}

#[test]
fn established_flow_survives_unrelated_changes_and_is_cut_by_a_deny_across_epoch_wraps() {
    if netns::skip_unless_root(
        "established_flow_survives_unrelated_changes_and_is_cut_by_a_deny_across_epoch_wraps",
    ) {
        return;
    }
    let scratch = tempfile::tempdir().expect("scratch dir");
    let allowed = format!("{BASE}{ALLOW_CLIENT}");
    let base = cluster(&allowed, scratch.path());
    let lab = lab_for(Path::new(LABPOD), &base, &NODES, &[]);
    let snapshot = scratch.path().join("snapshot.yaml");
    fs::write(&snapshot, &allowed).expect("write snapshot");
    let bits = format!("{BITS:#010x}");
    let mut agents = Agent::start_each(
        Path::new(LABPOD),
        &lab,
        &NODES,
        &snapshot,
        &["--ct-mark-bits", &bits],
    );
    wait_synced(&mut agents, SYNC_TIMEOUT);
    wait_for(&mut agents, "the fast path on", SYNC_TIMEOUT, |_, a| {
        a.count("established-connection fast path on") > 0
    });

    assert!(flow(&lab), "the allowed flow does not pass");
    assert!(flow(&lab), "the allowed flow does not pass twice");
    let stamped = flow_mark(&lab).expect("the flow is tracked on node-b");
    assert_ne!(stamped, 0, "node-b did not stamp the flow with its epoch");
    // node-b's /metrics says the same: the epoch in the mark, and the fast path on; and that
    // it follows the veths on link reports.
    let metrics = http_get_in(lab.node_netns(1).expect("node-b"), HEALTH, "/metrics")
        .expect("GET /metrics from node-b's agent");
    for line in [
        format!("nftpol_ruleset_epoch {}", stamped >> BITS.trailing_zeros()),
        "nftpol_fast_path 1".to_string(),
        "nftpol_link_reports 1".to_string(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in node-b's metrics\n{metrics}"
        );
    }

    // A change that does not concern the flow: a new epoch, the flow evaluated again, passes.
    let with_other = format!("{allowed}{}", unrelated(0));
    change(
        &mut agents,
        &snapshot,
        scratch.path(),
        &allowed,
        &with_other,
    );
    assert!(flow(&lab), "an unrelated change cut the established flow");
    let restamped = flow_mark(&lab).expect("still tracked");
    assert_ne!(
        restamped, stamped,
        "the flow was not evaluated again under the new epoch"
    );

    // A change that denies it: cut at its next packet, though its entry is established.
    let denied = format!("{BASE}{}", unrelated(0));
    change(&mut agents, &snapshot, scratch.path(), &with_other, &denied);
    assert!(
        !flow(&lab),
        "a denying change did not cut the established flow"
    );
    let stale = flow_mark(&lab).expect("the denied flow's entry stays");

    // The epochs come round again (three values); a mark the flow kept from when it was
    // allowed must never match the epoch in force.
    let mut previous = denied;
    for n in 1..=4 {
        let next = format!("{BASE}{}", unrelated(n));
        change(&mut agents, &snapshot, scratch.path(), &previous, &next);
        assert!(
            !flow(&lab),
            "after {n} more change(s) the denied flow passed (its mark held {stale:#x})"
        );
        previous = next;
    }
    println!(
        "fast path: flow stamped {stamped:#x}, restamped {restamped:#x} after an unrelated change, cut by the deny (mark then {stale:#x}) and still cut through 4 more changes, every epoch value in force again"
    );
    assert_eq!(
        agents.iter().map(Agent::errors).sum::<usize>(),
        0,
        "{}",
        integration::agents::logs(&mut agents)
    );
}
