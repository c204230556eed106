//! The compiled ruleset against an oracle written from the Kubernetes NetworkPolicy spec
//! (networking.k8s.io/v1), on random small clusters.
//!
//! The oracle (module [`spec`], `tests/spec/mod.rs`, shared with the integration crate's
//! conformance test) reads only the plain data in `ruleset::model` and decides
//! every connection from the spec alone: its own label selector matching, policyTypes
//! defaulting, isolation, peers (pod, namespace and ipBlock with `except`) and ports (numbers,
//! ranges, protocol-only entries and named ports). Nothing of the compiler (`selector`,
//! `policy`, `compile`) is used by it.
//!
//! Properties, 4,096 cases each (`PROPTEST_CASES` overrides), on clusters of 2-4 namespaces
//! (some without a Namespace object), 2 nodes, 3-8 pods and 0-4 policies; together about 4 s
//! in release on 2 cores:
//!
//! 1. `verdicts_match_the_spec`: every ordered pair of endpoints (enforceable pods, hostNetwork
//!    pods, addresses of terminated pods and three addresses outside the cluster) sharing an
//!    address family, with at least one enforceable pod among the two, is traced with
//!    [`Tracer`] for TCP 80, TCP 81, UDP 53, UDP 80 and SCTP 80, and the verdict of the IR must
//!    equal the oracle's. That is about 210 connections per case on average (up to about 550),
//!    so about 850,000 connections per run.
//! 2. `incremental_updates_equal_a_full_compile`: 1-5 pod changes (relabel, new address,
//!    termination, deletion, a new pod) applied through [`Compiler::apply_pod`] /
//!    [`Compiler::delete_pod`] on both nodes; after each, the table must equal a fresh
//!    [`Compiler::new`] of the same cluster, and the returned [`Delta`] applied to the table
//!    before the step must give the table after it.
//!
//! `oracle_follows_the_spec_on_known_cases` checks the oracle itself on a hand-written cluster.
//!
//! Failing cases are not written to a regressions file; proptest prints the shrunk case.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use proptest::sample::{select, subsequence, Index};
use proptest::test_runner::TestCaseError;

use ruleset::ir::Protocol;
use ruleset::model::{
    ContainerPort, IpBlock, LabelSelector, Labels, Namespace, NetworkPolicy, Peer, Pod, PolicyPort,
    PolicyRule, PortRef, SelectorRequirement,
};
use ruleset::{Cluster, Compiler, Delta, Endpoint, Tracer};

mod spec;

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

const NODES: [&str; 2] = ["n1", "n2"];
const NAMESPACES: [&str; 4] = ["ns0", "ns1", "ns2", "ns3"];

/// Keys and values selectors may use; pod labels take only `a` and `b`, so `c` selects none.
type Vocabulary = &'static [(&'static str, &'static [&'static str])];
const POD_VOCABULARY: Vocabulary = &[("app", &["a", "b", "c"]), ("team", &["a", "b", "c"])];
const NAMESPACE_VOCABULARY: Vocabulary = &[
    ("team", &["a", "b"]),
    ("env", &["a", "b"]),
    ("kubernetes.io/metadata.name", &["ns0", "ns1", "ns2"]),
];

/// Last octets of initial pod addresses: both sides of 10.0.0.0/25 and inside and around
/// 10.0.0.16/28. Addresses 160-199 are handed out by mutations; 200 stays outside.
fn initial_octets() -> Vec<u8> {
    (1..=40).chain(120..=150).collect()
}

const IP_BLOCKS: &[(&str, &[&str])] = &[
    ("10.0.0.0/25", &[]),
    ("10.0.0.128/25", &[]),
    ("10.0.0.0/24", &["10.0.0.16/28"]),
    ("0.0.0.0/0", &[]),
    ("0.0.0.0/0", &["10.0.0.0/24", "192.168.0.0/16"]),
    ("192.168.0.0/24", &[]),
    ("172.16.0.0/12", &[]),
    ("fd00::/64", &[]),
    ("fd00::/64", &["fd00::/121"]),
    ("::/0", &[]),
];

/// The connections tried between every pair of endpoints.
const PROBES: [(Protocol, &str, u16); 5] = [
    (Protocol::Tcp, "TCP", 80),
    (Protocol::Tcp, "TCP", 81),
    (Protocol::Udp, "UDP", 53),
    (Protocol::Udp, "UDP", 80),
    (Protocol::Sctp, "SCTP", 80),
];

/// Addresses of no pod.
fn outside_addresses() -> [IpAddr; 3] {
    [
        "10.0.0.200".parse().unwrap(),
        "172.16.0.1".parse().unwrap(),
        "fd00::ffff".parse().unwrap(),
    ]
}

fn v4(octet: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, octet))
}

fn v6(octet: u8) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(octet)))
}

fn node_address(node: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 168, 0, node as u8 + 1))
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Running,
    HostNetwork,
    /// Terminated, with this phase.
    Terminated(&'static str),
    /// Pending, no address yet.
    Pending,
}

#[derive(Clone, Copy, Debug)]
enum Stack {
    V4,
    Dual,
    /// Dual-stack with the IPv6 address listed first.
    DualV6First,
    V6,
}

#[derive(Clone, Debug)]
struct PodDraft {
    namespace: usize,
    node: usize,
    labels: Labels,
    kind: Kind,
    stack: Stack,
    ports: Vec<ContainerPort>,
}

fn labels_from(pairs: Vec<(&str, &str)>) -> Labels {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod_labels() -> impl Strategy<Value = Labels> {
    prop::collection::vec(
        (select(&["app", "team"][..]), select(&["a", "b"][..])),
        0..=2,
    )
    .prop_map(labels_from)
}

fn namespace_labels() -> impl Strategy<Value = Labels> {
    prop::collection::vec(
        (select(&["team", "env"][..]), select(&["a", "b"][..])),
        0..=2,
    )
    .prop_map(labels_from)
}

fn container_ports() -> impl Strategy<Value = Vec<ContainerPort>> {
    let http = prop::option::weighted(
        0.7,
        (
            prop_oneof![4 => Just("TCP"), 1 => Just("UDP")],
            select(&[80, 81][..]),
        ),
    );
    (http, any::<bool>(), any::<bool>()).prop_map(|(http, dns, unnamed)| {
        let mut ports = Vec::new();
        if let Some((protocol, port)) = http {
            ports.push(ContainerPort {
                name: Some("http".into()),
                protocol: protocol.into(),
                port,
            });
        }
        if dns {
            ports.push(ContainerPort {
                name: Some("dns".into()),
                protocol: "UDP".into(),
                port: 53,
            });
        }
        if unnamed {
            ports.push(ContainerPort {
                name: None,
                protocol: "TCP".into(),
                port: 8080,
            });
        }
        ports
    })
}

fn pod_draft() -> impl Strategy<Value = PodDraft> {
    let kind = prop_oneof![
        12 => Just(Kind::Running),
        2 => Just(Kind::HostNetwork),
        1 => Just(Kind::Terminated("Failed")),
        1 => Just(Kind::Terminated("Succeeded")),
        1 => Just(Kind::Pending),
    ];
    let stack = prop_oneof![
        6 => Just(Stack::V4),
        2 => Just(Stack::Dual),
        1 => Just(Stack::DualV6First),
        1 => Just(Stack::V6),
    ];
    (
        0..4usize,
        0..2usize,
        pod_labels(),
        kind,
        stack,
        container_ports(),
    )
        .prop_map(|(namespace, node, labels, kind, stack, ports)| PodDraft {
            namespace,
            node,
            labels,
            kind,
            stack,
            ports,
        })
}

fn addresses(stack: Stack, octet: u8) -> Vec<IpAddr> {
    match stack {
        Stack::V4 => vec![v4(octet)],
        Stack::Dual => vec![v4(octet), v6(octet)],
        Stack::DualV6First => vec![v6(octet), v4(octet)],
        Stack::V6 => vec![v6(octet)],
    }
}

/// A pod from a draft; `octet` picks its addresses (unique per pod).
fn make_pod(draft: &PodDraft, name: String, namespace_count: usize, octet: u8) -> Pod {
    let (ips, host_network, phase) = match draft.kind {
        Kind::Running => (addresses(draft.stack, octet), false, "Running"),
        Kind::HostNetwork => (vec![node_address(draft.node)], true, "Running"),
        Kind::Terminated(phase) => (addresses(draft.stack, octet), false, phase),
        Kind::Pending => (Vec::new(), false, "Pending"),
    };
    Pod {
        namespace: NAMESPACES[draft.namespace % namespace_count].to_string(),
        name,
        node: Some(NODES[draft.node].to_string()),
        labels: draft.labels.clone(),
        ips,
        host_network,
        phase: Some(phase.to_string()),
        ports: draft.ports.clone(),
    }
}

fn requirement(vocabulary: Vocabulary) -> impl Strategy<Value = SelectorRequirement> {
    select(vocabulary).prop_flat_map(|(key, values)| {
        (
            select(&["In", "NotIn", "Exists", "DoesNotExist"][..]),
            subsequence(values.to_vec(), 1..=2),
        )
            .prop_map(move |(operator, values)| SelectorRequirement {
                key: key.to_string(),
                operator: operator.to_string(),
                values: match operator {
                    "In" | "NotIn" => values.iter().map(|v| v.to_string()).collect(),
                    _ => Vec::new(),
                },
            })
    })
}

fn selector(vocabulary: Vocabulary) -> impl Strategy<Value = LabelSelector> {
    let label = select(vocabulary).prop_flat_map(|(key, values)| (Just(key), select(values)));
    // Mostly short selectors, so that they select something.
    let expressions = prop_oneof![
        3 => prop::collection::vec(requirement(vocabulary), 0..=1),
        1 => prop::collection::vec(requirement(vocabulary), 2..=2),
    ];
    (prop::collection::vec(label, 0..=1), expressions).prop_map(|(labels, match_expressions)| {
        LabelSelector {
            match_labels: labels_from(labels),
            match_expressions,
        }
    })
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        selector(POD_VOCABULARY).prop_map(|s| Peer {
            pod_selector: Some(s),
            ..Peer::default()
        }),
        selector(NAMESPACE_VOCABULARY).prop_map(|s| Peer {
            namespace_selector: Some(s),
            ..Peer::default()
        }),
        (selector(POD_VOCABULARY), selector(NAMESPACE_VOCABULARY)).prop_map(|(p, n)| Peer {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ip_block: None,
        }),
        select(IP_BLOCKS).prop_map(|(cidr, except)| Peer {
            ip_block: Some(IpBlock {
                cidr: cidr.to_string(),
                except: except.iter().map(|e| e.to_string()).collect(),
            }),
            ..Peer::default()
        }),
    ]
}

fn policy_port() -> impl Strategy<Value = PolicyPort> {
    let protocol = || select(&[None, Some("TCP"), Some("UDP"), Some("SCTP")][..]);
    let entry = |protocol: Option<&str>, port: Option<PortRef>, end_port: Option<i32>| PolicyPort {
        protocol: protocol.map(str::to_string),
        port,
        end_port,
    };
    prop_oneof![
        (protocol(), select(&[80, 81, 53][..])).prop_map(move |(p, n)| entry(
            p,
            Some(PortRef::Number(n)),
            None
        )),
        (protocol(), select(&[(80, 81), (53, 81), (81, 81)][..]))
            .prop_map(move |(p, (lo, hi))| entry(p, Some(PortRef::Number(lo)), Some(hi))),
        (protocol(), select(&["http", "dns"][..])).prop_map(move |(p, n)| entry(
            p,
            Some(PortRef::Name(n.to_string())),
            None
        )),
        protocol().prop_map(move |p| entry(p, None, None)),
    ]
}

fn rule() -> impl Strategy<Value = PolicyRule> {
    (
        prop::collection::vec(peer(), 0..=2),
        prop::collection::vec(policy_port(), 0..=2),
    )
        .prop_map(|(peers, ports)| PolicyRule { peers, ports })
}

#[derive(Clone, Debug)]
struct PolicyDraft {
    namespace: usize,
    pod_selector: LabelSelector,
    policy_types: Vec<String>,
    ingress: Vec<PolicyRule>,
    egress: Vec<PolicyRule>,
}

fn policy_draft() -> impl Strategy<Value = PolicyDraft> {
    let types: &[&[&str]] = &[&[], &["Ingress"], &["Egress"], &["Ingress", "Egress"]];
    (
        0..4usize,
        selector(POD_VOCABULARY),
        select(types),
        prop::collection::vec(rule(), 0..=2),
        prop::collection::vec(rule(), 0..=2),
    )
        .prop_map(
            |(namespace, pod_selector, types, ingress, egress)| PolicyDraft {
                namespace,
                pod_selector,
                policy_types: types.iter().map(|t| t.to_string()).collect(),
                ingress,
                egress,
            },
        )
}

/// A whole cluster as plain objects.
#[derive(Clone, Debug)]
struct Scenario {
    /// How many of `NAMESPACES` are in use.
    namespace_count: usize,
    /// The Namespace objects that exist (some namespaces have pods but no object).
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<NetworkPolicy>,
}

impl Scenario {
    fn cluster(&self) -> Cluster {
        Cluster::from_objects(
            self.namespaces.clone(),
            self.pods.clone(),
            self.policies.clone(),
        )
    }
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(
            (prop::bool::weighted(0.8), namespace_labels()),
            2..=NAMESPACES.len(),
        ),
        prop::collection::vec(pod_draft(), 3..=8),
        subsequence(initial_octets(), 8),
        prop::collection::vec(policy_draft(), 0..=4),
    )
        .prop_map(|(namespaces, pods, octets, policies)| {
            let namespace_count = namespaces.len();
            let namespaces = namespaces
                .into_iter()
                .zip(NAMESPACES)
                .filter(|((exists, _), _)| *exists)
                .map(|((_, labels), name)| Namespace {
                    name: name.to_string(),
                    labels,
                })
                .collect();
            let pods = pods
                .iter()
                .zip(octets)
                .enumerate()
                .map(|(i, (draft, octet))| {
                    make_pod(draft, format!("pod{i}"), namespace_count, octet)
                })
                .collect();
            let policies = policies
                .into_iter()
                .enumerate()
                .map(|(i, d)| NetworkPolicy {
                    namespace: NAMESPACES[d.namespace % namespace_count].to_string(),
                    name: format!("p{i}"),
                    uid: None,
                    pod_selector: d.pod_selector,
                    policy_types: d.policy_types,
                    ingress: d.ingress,
                    egress: d.egress,
                })
                .collect();
            Scenario {
                namespace_count,
                namespaces,
                pods,
                policies,
            }
        })
}

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

fn show_labels(labels: &Labels) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", pairs.join(","))
}

fn show_endpoint(endpoint: &Endpoint) -> String {
    match endpoint {
        Endpoint::Pod { namespace, name } => format!("{namespace}/{name}"),
        Endpoint::Address(ip) => ip.to_string(),
    }
}

/// The cluster in a few lines per object, for failure messages.
fn describe(scenario: &Scenario) -> String {
    let mut out = String::new();
    for name in &NAMESPACES[..scenario.namespace_count] {
        match scenario.namespaces.iter().find(|n| n.name == *name) {
            Some(ns) => writeln!(out, "namespace {name} {}", show_labels(&ns.labels)),
            None => writeln!(out, "namespace {name} (no object)"),
        }
        .unwrap();
    }
    for pod in &scenario.pods {
        let ports: Vec<String> = pod
            .ports
            .iter()
            .map(|p| {
                format!(
                    "{}/{}/{}",
                    p.name.as_deref().unwrap_or("-"),
                    p.protocol,
                    p.port
                )
            })
            .collect();
        writeln!(
            out,
            "pod {}/{} node {} {} ips {:?}{} phase {} ports [{}]",
            pod.namespace,
            pod.name,
            pod.node.as_deref().unwrap_or("-"),
            show_labels(&pod.labels),
            pod.ips,
            if pod.host_network { " hostNetwork" } else { "" },
            pod.phase.as_deref().unwrap_or("-"),
            ports.join(" ")
        )
        .unwrap();
    }
    for policy in &scenario.policies {
        writeln!(out, "policy {policy:?}").unwrap();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Property 1: verdicts
// ---------------------------------------------------------------------------------------------

/// One end as the tracer is asked about it and as the oracle sees it.
struct Probe<'a> {
    endpoint: Endpoint,
    party: spec::Party<'a>,
    ips: Vec<IpAddr>,
}

fn probes<'a>(scenario: &'a Scenario, world: &spec::World<'a>) -> Vec<Probe<'a>> {
    let mut out = Vec::new();
    for pod in &scenario.pods {
        let endpoint = Endpoint::Pod {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        };
        if spec::enforceable(pod) {
            out.push(Probe {
                endpoint,
                party: spec::Party::Pod(pod),
                ips: pod.ips.clone(),
            });
        } else if pod.host_network && !pod.ips.is_empty() {
            let node = pod.node.as_deref().unwrap_or_default();
            out.push(Probe {
                endpoint,
                party: spec::Party::Node(node),
                ips: pod.ips.clone(),
            });
        } else {
            // A terminated pod is no endpoint, but its old address may still send or receive.
            for ip in &pod.ips {
                out.push(Probe {
                    endpoint: Endpoint::Address(*ip),
                    party: world.party_of(*ip),
                    ips: vec![*ip],
                });
            }
        }
    }
    for ip in outside_addresses() {
        out.push(Probe {
            endpoint: Endpoint::Address(ip),
            party: world.party_of(ip),
            ips: vec![ip],
        });
    }
    out
}

fn is_pod(party: &spec::Party<'_>) -> bool {
    matches!(party, spec::Party::Pod(_))
}

fn share_family(a: &[IpAddr], b: &[IpAddr]) -> bool {
    a.iter()
        .any(|x| b.iter().any(|y| x.is_ipv4() == y.is_ipv4()))
}

/// Traces every connection among the scenario's endpoints; returns how many were checked.
fn check_verdicts(scenario: &Scenario) -> Result<usize, TestCaseError> {
    let world = spec::World::new(&scenario.namespaces, &scenario.pods, &scenario.policies);
    let mut tracer = Tracer::new(scenario.cluster());
    let ends = probes(scenario, &world);
    let mut checked = 0;
    for from in &ends {
        for to in &ends {
            if !(is_pod(&from.party) || is_pod(&to.party)) || !share_family(&from.ips, &to.ips) {
                continue;
            }
            for (protocol, protocol_name, port) in PROBES {
                let connection = format!(
                    "{} -> {} {protocol_name} {port}",
                    show_endpoint(&from.endpoint),
                    show_endpoint(&to.endpoint)
                );
                let trace = match tracer.trace(&from.endpoint, &to.endpoint, protocol, port) {
                    Ok(trace) => trace,
                    Err(err) => {
                        return Err(TestCaseError::fail(format!(
                            "trace of {connection} failed: {err}\ncluster:\n{}",
                            describe(scenario)
                        )))
                    }
                };
                prop_assert!(
                    from.ips.contains(&trace.src) && to.ips.contains(&trace.dst),
                    "trace of {connection} used addresses {} -> {} of neither end",
                    trace.src,
                    trace.dst
                );
                let src = spec::End {
                    party: from.party,
                    addr: trace.src,
                };
                let dst = spec::End {
                    party: to.party,
                    addr: trace.dst,
                };
                let expected = world.allows(src, dst, protocol_name, port);
                prop_assert_eq!(
                    trace.allowed,
                    expected,
                    "\nconnection {}\nthe spec says {}, the ruleset says:\n{}\ncluster:\n{}",
                    connection,
                    if expected { "ALLOWED" } else { "DENIED" },
                    trace,
                    describe(scenario)
                );
                checked += 1;
            }
        }
    }
    Ok(checked)
}

// ---------------------------------------------------------------------------------------------
// Property 2: incremental updates
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Mutation {
    Relabel(Index, Labels),
    /// A fresh address (of the pod's families; IPv4 for a pod that had none), now Running.
    NewAddress(Index),
    Terminate(Index),
    Delete(Index),
    Add(PodDraft),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), pod_labels()).prop_map(|(i, l)| Mutation::Relabel(i, l)),
        any::<Index>().prop_map(Mutation::NewAddress),
        any::<Index>().prop_map(Mutation::Terminate),
        any::<Index>().prop_map(Mutation::Delete),
        pod_draft().prop_map(Mutation::Add),
    ]
}

/// What a mutation does to the pod list: the pod to apply, or the one to delete.
enum Change {
    Apply(Pod),
    Delete(String, String),
}

struct Mutator {
    next_octet: u8,
    added: usize,
}

impl Mutator {
    fn fresh_octet(&mut self) -> u8 {
        let octet = self.next_octet;
        self.next_octet += 1;
        octet
    }

    /// The change `mutation` makes to `pods`, and `pods` updated; `None` when there is no pod to
    /// change.
    fn change(
        &mut self,
        mutation: &Mutation,
        pods: &mut Vec<Pod>,
        namespace_count: usize,
    ) -> Option<Change> {
        if let Mutation::Add(draft) = mutation {
            self.added += 1;
            let octet = self.fresh_octet();
            let pod = make_pod(draft, format!("new{}", self.added), namespace_count, octet);
            pods.push(pod.clone());
            return Some(Change::Apply(pod));
        }
        if pods.is_empty() {
            return None;
        }
        let (Mutation::Relabel(i, _)
        | Mutation::NewAddress(i)
        | Mutation::Terminate(i)
        | Mutation::Delete(i)) = mutation
        else {
            unreachable!()
        };
        let at = i.index(pods.len());
        let pod = &mut pods[at];
        match mutation {
            Mutation::Relabel(_, labels) => pod.labels = labels.clone(),
            Mutation::NewAddress(_) => {
                let octet = self.fresh_octet();
                pod.ips = if pod.host_network {
                    vec![IpAddr::V4(Ipv4Addr::new(192, 168, 1, octet))]
                } else {
                    let v4 = pod.ips.iter().any(IpAddr::is_ipv4) || pod.ips.is_empty();
                    let v6 = pod.ips.iter().any(IpAddr::is_ipv6);
                    let mut ips = Vec::new();
                    if v4 {
                        ips.push(self::v4(octet));
                    }
                    if v6 {
                        ips.push(self::v6(octet));
                    }
                    ips
                };
                pod.phase = Some("Running".into());
            }
            Mutation::Terminate(_) => pod.phase = Some("Failed".into()),
            Mutation::Delete(_) => {
                let pod = pods.remove(at);
                return Some(Change::Delete(pod.namespace, pod.name));
            }
            Mutation::Add(_) => unreachable!(),
        }
        Some(Change::Apply(pods[at].clone()))
    }
}

fn check_incremental(scenario: &Scenario, mutations: &[Mutation]) -> Result<(), TestCaseError> {
    let mut state = scenario.clone();
    let mut compilers: Vec<Compiler> = NODES
        .iter()
        .map(|node| Compiler::new(state.cluster(), node))
        .collect();
    let mut mutator = Mutator {
        next_octet: 160,
        added: 0,
    };
    for (step, mutation) in mutations.iter().enumerate() {
        let Some(change) = mutator.change(mutation, &mut state.pods, state.namespace_count) else {
            continue;
        };
        let cluster = state.cluster();
        for compiler in &mut compilers {
            let before = compiler.table().clone();
            let delta: Delta = match &change {
                Change::Apply(pod) => compiler.apply_pod(pod.clone()),
                Change::Delete(namespace, name) => compiler.delete_pod(namespace, name),
            };
            let node = compiler.node().to_string();
            let full = Compiler::new(cluster.clone(), &node);
            prop_assert!(
                compiler.table() == full.table(),
                "\nafter step {step} ({mutation:?}) on node {node}, the incremental table \
                 differs from a full compile\nincremental:\n{}\nfull:\n{}\ncluster:\n{}",
                ruleset::render(compiler.table()),
                ruleset::render(full.table()),
                describe(&state)
            );
            let mut patched = before;
            patched.apply(&delta);
            prop_assert!(
                &patched == compiler.table(),
                "\nafter step {step} ({mutation:?}) on node {node}, the delta applied to the old \
                 table does not give the new one\ndelta: {delta:?}\npatched:\n{}\nnew:\n{}\n\
                 cluster:\n{}",
                ruleset::render(&patched),
                ruleset::render(compiler.table()),
                describe(&state)
            );
        }
    }
    Ok(())
}

/// `cases` unless `PROPTEST_CASES` says otherwise; failures are not persisted to a file.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(4096))]

    #[test]
    fn verdicts_match_the_spec(scenario in scenario()) {
        check_verdicts(&scenario)?;
    }
}

proptest! {
    #![proptest_config(config(4096))]

    #[test]
    fn incremental_updates_equal_a_full_compile(
        scenario in scenario(),
        mutations in prop::collection::vec(mutation(), 1..=5),
    ) {
        check_incremental(&scenario, &mutations)?;
    }
}

/// The oracle on hand-written cases, so that a wrong oracle does not pass unnoticed.
#[test]
fn oracle_follows_the_spec_on_known_cases() {
    let pod = |ns: &str, name: &str, labels: &[(&str, &str)], ip: &str| Pod {
        namespace: ns.into(),
        name: name.into(),
        node: Some("n1".into()),
        labels: labels_from(labels.to_vec()),
        ips: vec![ip.parse().unwrap()],
        phase: Some("Running".into()),
        ports: vec![ContainerPort {
            name: Some("http".into()),
            protocol: "TCP".into(),
            port: 81,
        }],
        ..Pod::default()
    };
    let pods = vec![
        pod("a", "web", &[("app", "web")], "10.0.0.1"),
        pod("a", "client", &[("app", "client")], "10.0.0.2"),
        pod("b", "other", &[("app", "client")], "10.0.0.3"),
    ];
    let selector = |k: &str, v: &str| LabelSelector {
        match_labels: labels_from(vec![(k, v)]),
        ..LabelSelector::default()
    };
    // Ingress to web: from app=client in the same namespace, on the named port http (81).
    let policies = vec![NetworkPolicy {
        namespace: "a".into(),
        name: "web".into(),
        pod_selector: selector("app", "web"),
        ingress: vec![PolicyRule {
            peers: vec![Peer {
                pod_selector: Some(selector("app", "client")),
                ..Peer::default()
            }],
            ports: vec![PolicyPort {
                protocol: None,
                port: Some(PortRef::Name("http".into())),
                end_port: None,
            }],
        }],
        ..NetworkPolicy::default()
    }];
    let namespaces = vec![Namespace {
        name: "b".into(),
        labels: Labels::new(),
    }];
    let world = spec::World::new(&namespaces, &pods, &policies);
    let end = |i: usize| spec::End {
        party: spec::Party::Pod(&pods[i]),
        addr: pods[i].ips[0],
    };
    let outside = spec::End {
        party: spec::Party::Outside,
        addr: "172.16.0.1".parse().unwrap(),
    };
    assert!(world.allows(end(1), end(0), "TCP", 81));
    assert!(!world.allows(end(1), end(0), "TCP", 80), "wrong port");
    assert!(!world.allows(end(1), end(0), "UDP", 81), "wrong protocol");
    assert!(!world.allows(end(2), end(0), "TCP", 81), "other namespace");
    assert!(!world.allows(outside, end(0), "TCP", 81), "outside");
    assert!(
        world.allows(end(0), end(0), "TCP", 80),
        "a pod reaches itself"
    );
    assert!(
        world.allows(end(0), end(1), "TCP", 80),
        "client is not isolated"
    );
    assert!(
        world.allows(end(0), outside, "UDP", 53),
        "no egress isolation"
    );
}
