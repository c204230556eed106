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

use integration::lab::{compare_with_trace, Family, Lab, Protocol, Target};
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
