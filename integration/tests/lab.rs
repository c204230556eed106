//! Real packets in a two-node Flannel-style lab (`integration::lab`): with no rules every pod
//! reaches every other, and with the compiled example rulesets loaded the kernel allows
//! exactly the connections `Tracer` says it allows.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use integration::lab::{compare_with_trace, networking_tables, Family, Lab, Protocol, Target};
use integration::netns;
use ruleset::Compiler;

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");

#[test]
fn open_lab_connects_everything() {
    if netns::skip_unless_root("open_lab_connects_everything") {
        return;
    }
    let started = Instant::now();
    let mut lab = Lab::new(LABPOD, 2).expect("lab");
    for (node, name, host) in [(0, "a1", 11), (0, "a2", 12), (1, "b1", 11), (1, "b2", 12)] {
        lab.add_pod(node, name, host).expect("pod");
    }
    let built = started.elapsed();

    let cells = lab
        .matrix(&[(Protocol::Tcp, 80), (Protocol::Udp, 80)], &Family::BOTH)
        .expect("matrix");
    assert_eq!(cells.len(), 4 * 3 * 2 * 2);
    let failed: Vec<String> = cells
        .iter()
        .filter(|c| !c.outcome.ok)
        .map(|c| lab.describe(c))
        .collect();

    // The prober can fail too: nobody serves port 82.
    let a1 = &lab.pods()[0];
    let b1 = &lab.pods()[2];
    let closed = [Protocol::Tcp, Protocol::Udp].map(|protocol| Target {
        addr: IpAddr::V4(b1.ipv4),
        protocol,
        port: 82,
    });
    let closed = lab.probe(a1, &closed).expect("probe");

    println!(
        "open_lab_connects_everything: {} cells, {} ok; lab built in {built:?}, all done in {:?}",
        cells.len(),
        cells.len() - failed.len(),
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "unreachable with no rules:\n{}",
        failed.join("\n")
    );
    assert_eq!(closed, [false, false], "a closed port answered");
}

#[test]
fn compiled_example_rulesets_match_trace() {
    if netns::skip_unless_root("compiled_example_rulesets_match_trace") {
        return;
    }
    // CoreDNS listens on UDP and TCP 53; the other ports are the example's policies'.
    check_example(
        "three-tier",
        &[
            (Protocol::Tcp, 8080),
            (Protocol::Tcp, 9090),
            (Protocol::Tcp, 5432),
            (Protocol::Tcp, 53),
            (Protocol::Udp, 53),
        ],
        &[Family::V4],
    );
}

#[test]
fn compiled_dual_stack_rulesets_match_trace() {
    if netns::skip_unless_root("compiled_dual_stack_rulesets_match_trace") {
        return;
    }
    // The same policies over both families, and an IPv6-only ipBlock on TCP 81.
    check_example(
        "dual-stack",
        &[
            (Protocol::Tcp, 80),
            (Protocol::Tcp, 81),
            (Protocol::Tcp, 9000),
            (Protocol::Udp, 80),
        ],
        &Family::BOTH,
    );
}

/// Plays `integration/examples/<name>.yaml` in a two-node lab (node-a is node 0, node-b node
/// 1; hostNetwork pods are their nodes and are left out) with each node's compiled ruleset
/// loaded, probes `services` between every ordered pair of pods over `families`, and asserts
/// that every probe reached exactly where `Tracer` says the connection is allowed.
fn check_example(name: &str, services: &[(Protocol, u16)], families: &[Family]) {
    const NODES: [&str; 2] = ["node-a", "node-b"];
    let started = Instant::now();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.yaml"));
    let cluster = agent::manifests::load(&example).expect("example loads");

    let ports: Vec<u16> = services.iter().map(|(_, port)| *port).collect();
    let lab = Lab::for_cluster(LABPOD, &cluster, &NODES, &ports).expect("lab");
    for made in lab.pods() {
        let (namespace, name) = made.name.split_once('/').expect("ns/name");
        let pod = cluster.pod(namespace, name).expect("example pod");
        for family in families {
            let addr = made.addr(*family);
            assert!(
                pod.ips.contains(&addr) || *family == Family::V4,
                "{}: the lab gave it {addr}, the example {:?}",
                made.name,
                pod.ips
            );
        }
    }
    for (index, node) in NODES.iter().enumerate() {
        let compiler = Compiler::new(cluster.clone(), node);
        assert!(
            compiler.diagnostics().is_empty(),
            "{node}: {:?}",
            compiler.diagnostics()
        );
        lab.nft(index, &ruleset::render(compiler.table()))
            .expect("ruleset loads");
    }
    let built = started.elapsed();

    let cells = lab.matrix(services, families).expect("matrix");
    let comparison = compare_with_trace(&lab, &cells, &cluster).expect("trace the cells");
    let allowed = comparison.traces.iter().filter(|t| t.allowed).count();
    let (failures, disagreements) = (comparison.failures, comparison.disagreements);
    let pods = lab.pods().len();
    println!(
        "{name}: {} cells checked ({pods} pods, {} ordered pairs x {} families x {} services; {allowed} allowed, {} denied; probes failing by {failures:?}), {} disagreements; lab built in {built:?}, all done in {:?}",
        cells.len(),
        pods * (pods - 1),
        families.len(),
        services.len(),
        cells.len() - allowed,
        disagreements.len(),
        started.elapsed()
    );
    assert_eq!(
        cells.len(),
        pods * (pods - 1) * families.len() * services.len()
    );
    assert!(
        allowed > 0 && allowed < cells.len(),
        "{name} should both allow and deny"
    );
    assert!(
        disagreements.is_empty(),
        "the kernel and Tracer disagree on {} cells:\n{}",
        disagreements.len(),
        disagreements.join("\n\n")
    );
}

/// A node as Flannel and kube-proxy leave it (`lab::networking_tables`): pods still reach each
/// other across nodes in both families, and conntrack tracks those connections untranslated:
/// pod-to-pod traffic is neither DNATed nor masqueraded.
#[test]
fn networking_tables_keep_pod_traffic_tracked_and_untranslated() {
    if netns::skip_unless_root("networking_tables_keep_pod_traffic_tracked_and_untranslated") {
        return;
    }
    let mut lab = Lab::new(LABPOD, 2).expect("lab");
    let a = lab.add_pod(0, "a", 11).expect("pod");
    let b = lab.add_pod(1, "b", 11).expect("pod");
    for node in 0..2 {
        lab.nft(node, &networking_tables(node, 2))
            .expect("networking tables load");
        let listed = node_exec(&lab, node, &["nft", "list", "tables"]);
        for table in [
            "ip flannel-ipv4",
            "ip6 flannel-ipv6",
            "ip kube-proxy",
            "ip6 kube-proxy",
        ] {
            assert!(listed.contains(table), "{table} not loaded: {listed}");
        }
    }
    let cells = lab
        .matrix(&[(Protocol::Tcp, 80), (Protocol::Udp, 80)], &Family::BOTH)
        .expect("matrix");
    let failed: Vec<String> = cells
        .iter()
        .filter(|c| !c.outcome.ok)
        .map(|c| lab.describe(c))
        .collect();
    assert!(failed.is_empty(), "unreachable:\n{}", failed.join("\n"));

    for family in Family::BOTH {
        let (from, to) = (a.addr(family), b.addr(family));
        for node in 0..2 {
            let entries = tracked(&lab, node, from, to);
            assert!(
                !entries.is_empty(),
                "node {node} tracks no connection {from} -> {to}"
            );
            for e in &entries {
                assert_eq!(
                    (e.reply_src, e.reply_dst),
                    (e.orig_dst, e.orig_src),
                    "node {node}: {from} -> {to} translated: {}",
                    e.line
                );
            }
        }
    }
    println!(
        "networking tables: {} cells reach; conntrack tracks pod-to-pod connections untranslated on both nodes, both families",
        cells.len()
    );
}

/// The addresses of one conntrack entry, as `conntrack -L` prints them.
struct Tracked {
    line: String,
    orig_src: IpAddr,
    orig_dst: IpAddr,
    reply_src: IpAddr,
    reply_dst: IpAddr,
}

/// The conntrack entries in node `node` whose original direction is `from` -> `to`.
fn tracked(lab: &Lab, node: usize, from: IpAddr, to: IpAddr) -> Vec<Tracked> {
    let family = if from.is_ipv4() { "ipv4" } else { "ipv6" };
    let from_text = from.to_string();
    let to_text = to.to_string();
    let listing = node_exec(
        lab,
        node,
        &[
            "conntrack",
            "-L",
            "-f",
            family,
            "-s",
            &from_text,
            "-d",
            &to_text,
        ],
    );
    listing
        .lines()
        .filter_map(|line| {
            let field = |key: &str, nth: usize| -> Option<IpAddr> {
                line.split_whitespace()
                    .filter_map(|w| w.strip_prefix(key))
                    .nth(nth)?
                    .parse()
                    .ok()
            };
            Some(Tracked {
                line: line.to_string(),
                orig_src: field("src=", 0)?,
                orig_dst: field("dst=", 0)?,
                reply_src: field("src=", 1)?,
                reply_dst: field("dst=", 1)?,
            })
        })
        .collect()
}

fn node_exec(lab: &Lab, node: usize, command: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", lab.node_netns(node).expect("node")])
        .args(command)
        .output()
        .expect("ip netns exec runs");
    assert!(out.status.success(), "{command:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
