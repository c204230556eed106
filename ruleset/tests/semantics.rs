//! One test per NetworkPolicy semantic point, each a small cluster and the connections whose
//! verdict the point decides. Verdicts come from evaluating the compiled IR.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::net::IpAddr;

use ruleset::eval::{evaluate, CtState, Decision, Packet, L4};
use ruleset::ir::{Hook, Protocol};
use ruleset::model::{
    ContainerPort, IpBlock, LabelSelector, Namespace, NetworkPolicy, Peer, Pod, PolicyPort,
    PolicyRule, PortRef, SelectorRequirement,
};
use ruleset::{Cluster, Compiler, Endpoint, Tracer};

// ---------------------------------------------------------------- builders

fn ns(name: &str, labels: &[(&str, &str)]) -> Namespace {
    Namespace {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

struct PodBuilder(Pod);

fn pod(namespace: &str, name: &str, ip: &str) -> PodBuilder {
    PodBuilder(Pod {
        namespace: namespace.into(),
        name: name.into(),
        node: Some("n1".into()),
        ips: vec![ip.parse().expect("test IP")],
        phase: Some("Running".into()),
        ..Pod::default()
    })
}

impl PodBuilder {
    fn labels(mut self, labels: &[(&str, &str)]) -> Self {
        self.0.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self
    }
    fn node(mut self, node: &str) -> Self {
        self.0.node = Some(node.into());
        self
    }
    fn ip(mut self, ip: &str) -> Self {
        self.0.ips.push(ip.parse().expect("test IP"));
        self
    }
    fn port(mut self, name: &str, protocol: &str, port: i32) -> Self {
        self.0.ports.push(ContainerPort {
            name: Some(name.into()),
            protocol: protocol.into(),
            port,
        });
        self
    }
    fn host_network(mut self) -> Self {
        self.0.host_network = true;
        self
    }
    fn phase(mut self, phase: &str) -> Self {
        self.0.phase = Some(phase.into());
        self
    }
}

struct PolicyBuilder(NetworkPolicy);

fn policy(namespace: &str, name: &str) -> PolicyBuilder {
    PolicyBuilder(NetworkPolicy {
        namespace: namespace.into(),
        name: name.into(),
        ..NetworkPolicy::default()
    })
}

impl PolicyBuilder {
    fn select(mut self, labels: &[(&str, &str)]) -> Self {
        self.0.pod_selector = sel(labels);
        self
    }
    fn types(mut self, types: &[&str]) -> Self {
        self.0.policy_types = types.iter().map(|t| t.to_string()).collect();
        self
    }
    fn ingress(mut self, peers: Vec<Peer>, ports: Vec<PolicyPort>) -> Self {
        self.0.ingress.push(PolicyRule { peers, ports });
        self
    }
    fn egress(mut self, peers: Vec<Peer>, ports: Vec<PolicyPort>) -> Self {
        self.0.egress.push(PolicyRule { peers, ports });
        self
    }
}

fn sel(labels: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..LabelSelector::default()
    }
}

fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelector {
    LabelSelector {
        match_expressions: vec![SelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }],
        ..LabelSelector::default()
    }
}

fn pods(labels: &[(&str, &str)]) -> Peer {
    Peer {
        pod_selector: Some(sel(labels)),
        ..Peer::default()
    }
}

fn namespaces(labels: &[(&str, &str)]) -> Peer {
    Peer {
        namespace_selector: Some(sel(labels)),
        ..Peer::default()
    }
}

fn block(cidr: &str, except: &[&str]) -> Peer {
    Peer {
        ip_block: Some(IpBlock {
            cidr: cidr.into(),
            except: except.iter().map(|e| e.to_string()).collect(),
        }),
        ..Peer::default()
    }
}

fn tcp(port: i32) -> PolicyPort {
    PolicyPort {
        protocol: None,
        port: Some(PortRef::Number(port)),
        end_port: None,
    }
}

fn port(protocol: &str, port: Option<PortRef>, end_port: Option<i32>) -> PolicyPort {
    PolicyPort {
        protocol: Some(protocol.into()),
        port,
        end_port,
    }
}

fn named(name: &str) -> PolicyPort {
    PolicyPort {
        protocol: None,
        port: Some(PortRef::Name(name.into())),
        end_port: None,
    }
}

fn cluster(
    namespaces: Vec<Namespace>,
    pods: Vec<PodBuilder>,
    policies: Vec<PolicyBuilder>,
) -> Cluster {
    Cluster::from_objects(
        namespaces,
        pods.into_iter().map(|p| p.0),
        policies.into_iter().map(|p| p.0),
    )
}

fn endpoint(text: &str) -> Endpoint {
    text.parse().expect("test endpoint")
}

/// Asserts each `(from, to, protocol, port, allowed)`.
fn check(cluster: Cluster, cases: &[(&str, &str, Protocol, u16, bool)]) {
    let mut tracer = Tracer::new(cluster);
    for (from, to, protocol, port, want) in cases {
        let trace = tracer
            .trace(&endpoint(from), &endpoint(to), *protocol, *port)
            .expect("trace");
        assert_eq!(
            trace.allowed, *want,
            "{from} -> {to} {protocol:?}/{port}:\n{trace}"
        );
    }
}

use Protocol::{Sctp, Tcp, Udp};

// ---------------------------------------------------------------- selecting pods

#[test]
fn pod_selector_match_labels_selects_only_matching_pods() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "db", "10.0.0.1").labels(&[("app", "db")]),
            pod("a", "web", "10.0.0.2").labels(&[("app", "web")]),
            pod("a", "client", "10.0.0.3"),
        ],
        vec![policy("a", "deny-db").select(&[("app", "db")])],
    );
    check(
        c,
        &[
            ("a/client", "a/db", Tcp, 80, false),
            ("a/client", "a/web", Tcp, 80, true),
        ],
    );
}

#[test]
fn pod_selector_match_expressions() {
    for (selector, db_isolated, web_isolated) in [
        (expr("app", "In", &["db", "cache"]), true, false),
        (expr("app", "NotIn", &["db"]), false, true),
        (expr("tier", "Exists", &[]), true, false),
        (expr("tier", "DoesNotExist", &[]), false, true),
    ] {
        let mut p = policy("a", "p");
        p.0.pod_selector = selector;
        let c = cluster(
            vec![],
            vec![
                pod("a", "db", "10.0.0.1").labels(&[("app", "db"), ("tier", "data")]),
                pod("a", "web", "10.0.0.2").labels(&[("app", "web")]),
                pod("b", "client", "10.0.0.3"),
            ],
            vec![p],
        );
        check(
            c,
            &[
                ("b/client", "a/db", Tcp, 80, !db_isolated),
                ("b/client", "a/web", Tcp, 80, !web_isolated),
            ],
        );
    }
}

#[test]
fn empty_pod_selector_selects_every_pod_of_its_namespace_only() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "x", "10.0.0.1"),
            pod("a", "y", "10.0.0.2"),
            pod("b", "z", "10.0.0.3"),
        ],
        vec![policy("a", "deny-all")],
    );
    check(
        c,
        &[
            ("b/z", "a/x", Tcp, 80, false),
            ("b/z", "a/y", Tcp, 80, false),
            ("a/x", "b/z", Tcp, 80, true),
        ],
    );
}

// ---------------------------------------------------------------- policyTypes

#[test]
fn policy_types_absent_means_ingress_plus_egress_when_egress_rules_exist() {
    let members = || vec![pod("a", "x", "10.0.0.1"), pod("a", "y", "10.0.0.2")];
    // No egress rules: only ingress isolated.
    check(
        cluster(
            vec![],
            members(),
            vec![policy("a", "p")
                .select(&[])
                .ingress(vec![pods(&[])], vec![tcp(80)])],
        ),
        &[
            ("a/x", "a/y", Tcp, 80, true),
            ("a/x", "a/y", Tcp, 81, false),
        ],
    );
    // Egress rules present: egress isolated too, so x may only send to port 53.
    check(
        cluster(
            vec![],
            members(),
            vec![policy("a", "p")
                .ingress(vec![], vec![])
                .egress(vec![], vec![port("UDP", Some(PortRef::Number(53)), None)])],
        ),
        &[
            ("a/x", "a/y", Tcp, 80, false),
            ("a/x", "a/y", Udp, 53, true),
            ("10.9.9.9", "a/y", Tcp, 80, true),
        ],
    );
}

#[test]
fn policy_types_as_written() {
    let members = || vec![pod("a", "x", "10.0.0.1"), pod("b", "y", "10.0.0.2")];
    // Egress only: ingress stays open even though ingress rules are written.
    check(
        cluster(
            vec![],
            members(),
            vec![policy("a", "p")
                .types(&["Egress"])
                .ingress(vec![pods(&[("no", "one")])], vec![])],
        ),
        &[
            ("b/y", "a/x", Tcp, 80, true),
            ("a/x", "b/y", Tcp, 80, false),
        ],
    );
    // Ingress only: egress rules are ignored.
    check(
        cluster(
            vec![],
            members(),
            vec![policy("a", "p")
                .types(&["Ingress"])
                .egress(vec![pods(&[("no", "one")])], vec![])],
        ),
        &[
            ("b/y", "a/x", Tcp, 80, false),
            ("a/x", "b/y", Tcp, 80, true),
        ],
    );
}

// ---------------------------------------------------------------- isolation and union

#[test]
fn policies_add_up() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "db", "10.0.0.1").labels(&[("app", "db")]),
            pod("a", "x", "10.0.0.2"),
            pod("a", "y", "10.0.0.3"),
        ],
        vec![
            policy("a", "from-x")
                .select(&[("app", "db")])
                .ingress(vec![pods(&[])], vec![tcp(80)]),
            policy("a", "from-all-81")
                .select(&[("app", "db")])
                .ingress(vec![], vec![tcp(81)]),
        ],
    );
    check(
        c,
        &[
            ("a/x", "a/db", Tcp, 80, true),
            ("a/x", "a/db", Tcp, 81, true),
            ("10.9.9.9", "a/db", Tcp, 81, true),
            ("10.9.9.9", "a/db", Tcp, 80, false),
            ("a/y", "a/db", Tcp, 82, false),
        ],
    );
}

#[test]
fn connection_needs_egress_of_source_and_ingress_of_destination() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "x", "10.0.0.1"),
            pod("b", "y", "10.0.0.2").node("n2"),
        ],
        vec![
            policy("a", "x-out")
                .types(&["Egress"])
                .egress(vec![], vec![tcp(80), tcp(81)]),
            policy("b", "y-in").ingress(vec![namespaces(&[])], vec![tcp(81), tcp(82)]),
        ],
    );
    check(
        c,
        &[
            ("a/x", "b/y", Tcp, 80, false), // ingress of y refuses
            ("a/x", "b/y", Tcp, 81, true),
            ("a/x", "b/y", Tcp, 82, false), // egress of x refuses
        ],
    );
}

// ---------------------------------------------------------------- peers

#[test]
fn pod_selector_peer_means_the_policy_namespace() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "db", "10.0.0.1"),
            pod("a", "web", "10.0.0.2").labels(&[("app", "web")]),
            pod("b", "web", "10.0.0.3").labels(&[("app", "web")]),
        ],
        vec![policy("a", "p").ingress(vec![pods(&[("app", "web")])], vec![])],
    );
    check(
        c,
        &[
            ("a/web", "a/db", Tcp, 80, true),
            ("b/web", "a/db", Tcp, 80, false),
        ],
    );
}

#[test]
fn namespace_selector_alone_means_every_pod_there() {
    let c = cluster(
        vec![ns("mon", &[("purpose", "monitoring")]), ns("other", &[])],
        vec![
            pod("a", "db", "10.0.0.1"),
            pod("mon", "prom", "10.0.0.2"),
            pod("other", "x", "10.0.0.3"),
            pod("a", "y", "10.0.0.4"),
        ],
        vec![policy("a", "p").ingress(vec![namespaces(&[("purpose", "monitoring")])], vec![])],
    );
    check(
        c,
        &[
            ("mon/prom", "a/db", Tcp, 80, true),
            ("other/x", "a/db", Tcp, 80, false),
            ("a/y", "a/db", Tcp, 80, false),
        ],
    );
}

#[test]
fn namespace_name_label_is_always_there() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "db", "10.0.0.1"),
            pod("b", "x", "10.0.0.2"),
            pod("c", "y", "10.0.0.3"),
        ],
        vec![policy("a", "p").ingress(
            vec![namespaces(&[("kubernetes.io/metadata.name", "b")])],
            vec![],
        )],
    );
    check(
        c,
        &[
            ("b/x", "a/db", Tcp, 80, true),
            ("c/y", "a/db", Tcp, 80, false),
        ],
    );
}

#[test]
fn both_selectors_in_one_peer_and_and_separate_peers_or() {
    let nss = || vec![ns("mon", &[("purpose", "monitoring")]), ns("dev", &[])];
    let pods_ = || {
        vec![
            pod("a", "db", "10.0.0.1"),
            pod("mon", "prom", "10.0.0.2").labels(&[("app", "prom")]),
            pod("mon", "other", "10.0.0.3"),
            pod("dev", "prom", "10.0.0.4").labels(&[("app", "prom")]),
        ]
    };
    let and_peer = Peer {
        pod_selector: Some(sel(&[("app", "prom")])),
        namespace_selector: Some(sel(&[("purpose", "monitoring")])),
        ip_block: None,
    };
    check(
        cluster(
            nss(),
            pods_(),
            vec![policy("a", "and").ingress(vec![and_peer], vec![])],
        ),
        &[
            ("mon/prom", "a/db", Tcp, 80, true),
            ("mon/other", "a/db", Tcp, 80, false),
            ("dev/prom", "a/db", Tcp, 80, false),
        ],
    );
    // Separate peers: a pod labelled app=prom in the policy's own namespace, OR any pod in mon.
    let mut pods_or = pods_();
    pods_or.push(pod("a", "prom", "10.0.0.5").labels(&[("app", "prom")]));
    check(
        cluster(
            nss(),
            pods_or,
            vec![policy("a", "or").ingress(
                vec![
                    pods(&[("app", "prom")]),
                    namespaces(&[("purpose", "monitoring")]),
                ],
                vec![],
            )],
        ),
        &[
            ("mon/prom", "a/db", Tcp, 80, true),
            ("mon/other", "a/db", Tcp, 80, true),
            ("a/prom", "a/db", Tcp, 80, true),
            ("dev/prom", "a/db", Tcp, 80, false),
        ],
    );
}

#[test]
fn ip_block_with_except_ipv4_and_ipv6() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "db", "10.0.0.1").ip("fd00::1"),
            pod("a", "in", "10.1.0.5"),
            pod("a", "out", "10.1.2.5"),
        ],
        vec![policy("a", "p").select(&[]).ingress(
            vec![
                block("10.1.0.0/16", &["10.1.2.0/24"]),
                block("fd00::/64", &["fd00::ff00/120"]),
            ],
            vec![],
        )],
    );
    check(
        c,
        &[
            ("a/in", "a/db", Tcp, 80, true),
            ("a/out", "a/db", Tcp, 80, false),
            ("10.1.255.1", "a/db", Tcp, 80, true),
            ("10.2.0.1", "a/db", Tcp, 80, false),
            ("fd00::77", "fd00::1", Tcp, 80, true),
            ("fd00::ff01", "fd00::1", Tcp, 80, false),
        ],
    );
}

#[test]
fn empty_peers_mean_everyone_and_empty_rules_mean_no_one() {
    let pods_ = || {
        vec![
            pod("a", "db", "10.0.0.1").labels(&[("app", "db")]),
            pod("b", "x", "10.0.0.2"),
        ]
    };
    check(
        cluster(
            vec![],
            pods_(),
            vec![policy("a", "all")
                .select(&[("app", "db")])
                .ingress(vec![], vec![tcp(80)])],
        ),
        &[
            ("b/x", "a/db", Tcp, 80, true),
            ("192.0.2.1", "a/db", Tcp, 80, true),
            ("b/x", "a/db", Tcp, 81, false),
        ],
    );
    check(
        cluster(
            vec![],
            pods_(),
            vec![policy("a", "none").select(&[("app", "db")])],
        ),
        &[
            ("b/x", "a/db", Tcp, 80, false),
            ("192.0.2.1", "a/db", Tcp, 80, false),
        ],
    );
}

// ---------------------------------------------------------------- ports

#[test]
fn ports_numbers_ranges_and_protocols() {
    let c = cluster(
        vec![],
        vec![pod("a", "db", "10.0.0.1"), pod("a", "x", "10.0.0.2")],
        vec![policy("a", "p").ingress(
            vec![],
            vec![
                tcp(80),
                port("UDP", Some(PortRef::Number(53)), None),
                port("TCP", Some(PortRef::Number(30000)), Some(30100)),
                port("SCTP", None, None),
            ],
        )],
    );
    check(
        c,
        &[
            ("a/x", "a/db", Tcp, 80, true),
            ("a/x", "a/db", Udp, 80, false),
            ("a/x", "a/db", Udp, 53, true),
            ("a/x", "a/db", Tcp, 53, false),
            ("a/x", "a/db", Tcp, 30000, true),
            ("a/x", "a/db", Tcp, 30100, true),
            ("a/x", "a/db", Tcp, 30101, false),
            ("a/x", "a/db", Sctp, 9, true),
        ],
    );
}

#[test]
fn no_ports_means_every_port_and_protocol() {
    let c = cluster(
        vec![],
        vec![pod("a", "db", "10.0.0.1"), pod("a", "x", "10.0.0.2")],
        vec![policy("a", "p").ingress(vec![pods(&[])], vec![])],
    );
    check(
        c,
        &[
            ("a/x", "a/db", Tcp, 1, true),
            ("a/x", "a/db", Udp, 65535, true),
            ("a/x", "a/db", Sctp, 7, true),
        ],
    );
}

#[test]
fn ingress_named_port_resolves_on_the_selected_pod() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "web1", "10.0.0.1")
                .labels(&[("app", "web")])
                .port("http", "TCP", 8080),
            pod("a", "web2", "10.0.0.2")
                .labels(&[("app", "web")])
                .port("http", "TCP", 8081),
            pod("a", "web3", "10.0.0.3")
                .labels(&[("app", "web")])
                .port("http", "UDP", 8080),
            pod("a", "client", "10.0.0.4"),
        ],
        vec![policy("a", "p")
            .select(&[("app", "web")])
            .ingress(vec![], vec![named("http")])],
    );
    check(
        c,
        &[
            ("a/client", "a/web1", Tcp, 8080, true),
            ("a/client", "a/web1", Tcp, 8081, false),
            ("a/client", "a/web2", Tcp, 8081, true),
            ("a/client", "a/web2", Tcp, 8080, false),
            // Named TCP, but web3 names a UDP port: nothing matches.
            ("a/client", "a/web3", Tcp, 8080, false),
            ("a/client", "a/web3", Udp, 8080, false),
        ],
    );
}

#[test]
fn egress_named_port_resolves_on_each_destination() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "client", "10.0.0.9"),
            pod("b", "web1", "10.0.0.1").port("http", "TCP", 8080),
            pod("b", "web2", "10.0.0.2").port("http", "TCP", 8081),
            pod("b", "bare", "10.0.0.3"),
        ],
        vec![policy("a", "p")
            .types(&["Egress"])
            .egress(vec![namespaces(&[])], vec![named("http")])],
    );
    check(
        c,
        &[
            ("a/client", "b/web1", Tcp, 8080, true),
            ("a/client", "b/web1", Tcp, 8081, false),
            ("a/client", "b/web2", Tcp, 8081, true),
            ("a/client", "b/web2", Tcp, 8080, false),
            ("a/client", "b/bare", Tcp, 8080, false),
            // Outside the cluster nothing names a port.
            ("a/client", "192.0.2.1", Tcp, 8080, false),
        ],
    );
}

// ---------------------------------------------------------------- who counts

#[test]
fn host_network_pods_are_neither_targets_nor_peers() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "hostpod", "192.168.0.10")
                .node("n2")
                .host_network(),
            pod("a", "db", "10.0.0.1"),
            pod("a", "x", "10.0.0.2"),
        ],
        vec![policy("a", "p")
            .select(&[])
            .ingress(vec![pods(&[])], vec![])],
    );
    check(
        c,
        &[
            // From another node, a hostNetwork pod is that node, not a pod peer.
            ("a/hostpod", "a/db", Tcp, 80, false),
            ("a/x", "a/db", Tcp, 80, true),
            // Not a target: nothing isolates it.
            ("10.9.9.9", "a/hostpod", Tcp, 80, true),
        ],
    );
}

#[test]
fn pods_without_address_or_terminated_are_ignored() {
    let mut no_ip = pod("a", "pending", "10.0.0.3").labels(&[("app", "x")]);
    no_ip.0.ips.clear();
    let c = cluster(
        vec![],
        vec![
            pod("a", "db", "10.0.0.1"),
            pod("a", "done", "10.0.0.2")
                .labels(&[("app", "x")])
                .phase("Succeeded"),
            no_ip,
            pod("a", "failed", "10.0.0.4")
                .labels(&[("app", "x")])
                .phase("Failed"),
        ],
        vec![policy("a", "p").ingress(vec![pods(&[("app", "x")])], vec![])],
    );
    let compiler = Compiler::new(c.clone(), "n1");
    let peer_elements: usize = compiler
        .table()
        .sets
        .values()
        .filter(|s| s.name.starts_with("pods"))
        .map(|s| s.elements.len())
        .sum();
    assert_eq!(peer_elements, 0, "terminated pods must not be peers");
    // A reused address of a finished pod is outside the cluster now.
    check(c, &[("10.0.0.2", "a/db", Tcp, 80, false)]);
}

#[test]
fn the_node_reaches_its_pods_and_a_pod_reaches_itself() {
    let c = cluster(
        vec![],
        vec![
            pod("kube-system", "proxy", "192.168.0.10").host_network(),
            pod("a", "db", "10.0.0.1"),
        ],
        vec![policy("a", "deny").types(&["Ingress", "Egress"])],
    );
    check(
        c,
        &[
            ("kube-system/proxy", "a/db", Tcp, 80, true),
            ("192.168.0.10", "a/db", Tcp, 80, true),
            ("a/db", "a/db", Tcp, 80, true),
        ],
    );
}

// ---------------------------------------------------------------- per node, families, state

#[test]
fn only_local_pods_get_chains_but_peer_sets_span_the_cluster() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "db", "10.0.0.1").labels(&[("app", "db")]),
            pod("a", "web-far", "10.0.1.1")
                .labels(&[("app", "web")])
                .node("n2"),
            pod("a", "db-far", "10.0.1.2")
                .labels(&[("app", "db")])
                .node("n2"),
        ],
        vec![policy("a", "p")
            .select(&[("app", "db")])
            .ingress(vec![pods(&[("app", "web")])], vec![])],
    );
    let compiler = Compiler::new(c, "n1");
    let table = compiler.table();
    let ingress4 = &table.maps["ingress4"].elements;
    assert_eq!(
        ingress4.keys().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.0.0.1"]
    );
    let peers: Vec<String> = table
        .sets
        .values()
        .filter(|s| s.name.starts_with("pods4"))
        .flat_map(|s| s.elements.iter().map(|e| format!("{e:?}")))
        .collect();
    assert_eq!(peers, ["Addr(10.0.1.1)"]);
}

#[test]
fn dual_stack_pods_are_enforced_in_both_families() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "db", "10.0.0.1").ip("fd00::1"),
            pod("a", "web", "10.0.0.2")
                .ip("fd00::2")
                .labels(&[("app", "web")]),
            pod("a", "x", "10.0.0.3").ip("fd00::3"),
        ],
        vec![policy("a", "p").ingress(vec![pods(&[("app", "web")])], vec![])],
    );
    check(
        c,
        &[
            ("fd00::2", "fd00::1", Tcp, 80, true),
            ("fd00::3", "fd00::1", Tcp, 80, false),
            ("10.0.0.2", "10.0.0.1", Tcp, 80, true),
            ("10.0.0.3", "10.0.0.1", Tcp, 80, false),
        ],
    );
}

fn packet(src: &str, dst: &str, l4: L4, ct: CtState) -> Packet {
    let ip = |s: &str| s.parse::<IpAddr>().expect("test IP");
    Packet {
        src: ip(src),
        dst: ip(dst),
        l4,
        ct,
    }
}

#[test]
fn replies_related_packets_and_neighbour_discovery_pass_isolation() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "db", "10.0.0.1").ip("fd00::1"),
            pod("a", "x", "10.0.0.2").ip("fd00::2"),
        ],
        vec![policy("a", "deny").types(&["Ingress", "Egress"])],
    );
    let compiler = Compiler::new(c, "n1");
    let t = compiler.table();
    let web = L4::Transport {
        protocol: Tcp,
        dport: 80,
    };
    let decide = |p: Packet| evaluate(t, Hook::Forward, &p).decision;
    assert_eq!(
        decide(packet("10.0.0.2", "10.0.0.1", web, CtState::New)),
        Decision::Drop
    );
    assert_eq!(
        decide(packet("10.0.0.2", "10.0.0.1", web, CtState::Reply)),
        Decision::Accept
    );
    assert_eq!(
        decide(packet("10.0.0.2", "10.0.0.1", web, CtState::Related)),
        Decision::Accept
    );
    assert_eq!(
        decide(packet(
            "fd00::2",
            "fd00::1",
            L4::Icmpv6 { kind: 135 },
            CtState::New
        )),
        Decision::Accept
    );
    // Echo requests are not neighbour discovery.
    assert_eq!(
        decide(packet(
            "fd00::2",
            "fd00::1",
            L4::Icmpv6 { kind: 128 },
            CtState::New
        )),
        Decision::Drop
    );
    // Egress to the node itself (input hook) is isolated too.
    assert_eq!(
        evaluate(
            t,
            Hook::Input,
            &packet("10.0.0.2", "192.168.0.1", web, CtState::New)
        )
        .decision,
        Decision::Drop
    );
    let at_input = |p: Packet| evaluate(t, Hook::Input, &p);
    // Its replies to connections the node opened (kubelet probes) pass.
    assert_eq!(
        at_input(packet("10.0.0.2", "192.168.0.1", web, CtState::Reply)).decision,
        Decision::Accept
    );
    // What comes unicast from no local pod (another node's overlay packets, say) is let
    // through by one rule, not the whole chain.
    let overlay = L4::Transport {
        protocol: Udp,
        dport: 8472,
    };
    for from in ["192.168.0.2", "fd00::9"] {
        let to = if from.contains(':') {
            "fd00::1"
        } else {
            "192.168.0.1"
        };
        let seen = at_input(packet(from, to, overlay, CtState::New));
        assert_eq!(seen.decision, Decision::Accept, "{from}");
        assert_eq!(seen.steps.len(), 1, "{from}: {:?}", seen.steps);
        assert_eq!(
            seen.last_rule_in("input")
                .and_then(|r| r.comment.as_deref()),
            Some("unicast to this node, not from a local pod"),
            "{from}"
        );
    }
}

// ---------------------------------------------------------------- failing closed

#[test]
fn broken_policy_fails_closed_and_says_where() {
    let c = cluster(
        vec![],
        vec![pod("a", "db", "10.0.0.1"), pod("a", "x", "10.0.0.2")],
        vec![
            policy("a", "bad").ingress(
                vec![
                    block("10.0.0.0/33", &[]),
                    block("10.0.0.0/24", &["10.1.0.0/16"]),
                ],
                vec![tcp(80)],
            ),
            policy("a", "bad-ports").ingress(
                vec![],
                vec![
                    port("ICMP", None, None),
                    port("TCP", Some(PortRef::Number(90)), Some(80)),
                ],
            ),
        ],
    );
    let compiler = Compiler::new(c.clone(), "n1");
    let fields: Vec<String> = compiler
        .diagnostics()
        .iter()
        .map(|d| format!("{} {}", d.policy, d.field))
        .collect();
    assert_eq!(
        fields,
        [
            "a/bad spec.ingress[0].from[0].ipBlock.cidr",
            "a/bad spec.ingress[0].from[1].ipBlock.except[0]",
            "a/bad-ports spec.ingress[0].ports[0].protocol",
            "a/bad-ports spec.ingress[0].ports[1].endPort",
        ]
    );
    // The pods stay isolated and nothing the broken parts meant is allowed.
    check(
        c,
        &[
            ("a/x", "a/db", Tcp, 80, false),
            ("a/x", "a/db", Tcp, 85, false),
        ],
    );
}

#[test]
fn broken_pod_selector_isolates_the_superset_and_allows_nothing() {
    let mut p = policy("a", "bad").ingress(vec![], vec![]);
    p.0.pod_selector = LabelSelector {
        match_labels: [("app".to_string(), "db".to_string())].into(),
        match_expressions: vec![SelectorRequirement {
            key: "x".into(),
            operator: "Equals".into(),
            values: vec!["y".into()],
        }],
    };
    let c = cluster(
        vec![],
        vec![
            pod("a", "db", "10.0.0.1").labels(&[("app", "db")]),
            pod("a", "web", "10.0.0.2"),
        ],
        vec![p],
    );
    check(
        c,
        &[
            ("a/web", "a/db", Tcp, 80, false),
            ("a/db", "a/web", Tcp, 80, true),
        ],
    );
}

#[test]
fn unprogrammed_local_addresses_are_isolated_only_when_asked() {
    let new_pod = || pod("default", "new", "10.244.1.9");
    let c = cluster(
        vec![ns("default", &[])],
        vec![
            pod("default", "old", "10.244.1.5"),
            pod("default", "far", "10.244.2.5").node("n2"),
        ],
        vec![],
    );
    let syn = |src: &str, dst: &str| {
        packet(
            src,
            dst,
            L4::Transport {
                protocol: Protocol::Tcp,
                dport: 80,
            },
            CtState::New,
        )
    };
    let verdict = |compiler: &Compiler, src: &str, dst: &str| {
        evaluate(compiler.table(), Hook::Forward, &syn(src, dst)).decision
    };
    // Off by default: an address no pod holds is as open as any unselected pod.
    let plain = Compiler::new(c.clone(), "n1");
    assert_eq!(
        verdict(&plain, "10.244.2.5", "10.244.1.9"),
        Decision::Accept
    );

    let options = ruleset::Options {
        isolate_unprogrammed: vec!["10.244.1.0/24".parse().unwrap()],
        ..ruleset::Options::default()
    };
    let mut compiler = Compiler::with_options(c.clone(), "n1", options.clone());
    for (src, dst, want, why) in [
        (
            "10.244.2.5",
            "10.244.1.9",
            Decision::Drop,
            "to an unknown local address",
        ),
        (
            "10.244.1.9",
            "10.244.2.5",
            Decision::Drop,
            "from an unknown local address",
        ),
        (
            "10.244.2.5",
            "10.244.1.5",
            Decision::Accept,
            "to a known pod no policy selects",
        ),
        (
            "10.244.1.5",
            "10.244.2.5",
            Decision::Accept,
            "from a known pod",
        ),
        (
            "10.244.2.5",
            "10.244.3.7",
            Decision::Accept,
            "outside the node's pod CIDR",
        ),
    ] {
        assert_eq!(verdict(&compiler, src, dst), want, "{why}: {src} -> {dst}");
    }
    // Replies of connections the node itself opened are never held up.
    let reply = packet(
        "10.244.1.9",
        "10.244.2.5",
        L4::Transport {
            protocol: Protocol::Tcp,
            dport: 80,
        },
        CtState::Reply,
    );
    assert_eq!(
        evaluate(compiler.table(), Hook::Forward, &reply).decision,
        Decision::Accept
    );
    // To the node itself: an unknown local address may only answer; known pods, other nodes'
    // overlay packets and addresses outside the CIDR pass as without the option.
    let to_node = |compiler: &Compiler, src: &str, ct: CtState| {
        let l4 = L4::Transport {
            protocol: Protocol::Tcp,
            dport: 10250,
        };
        evaluate(
            compiler.table(),
            Hook::Input,
            &packet(src, "10.244.1.1", l4, ct),
        )
    };
    // The node's own addresses in the CIDR (the bridge's) are no pod's: what it sends itself
    // from them, on `lo`, is accepted before the drop.
    let input = &compiler.table().chains["input"].rules;
    let position = |wanted: &str| {
        input
            .iter()
            .position(|r| r.comment.as_deref() == Some(wanted))
            .unwrap_or_else(|| panic!("no rule {wanted:?} in input"))
    };
    assert!(
        position("the node to itself") < position("from a local pod address not yet programmed")
    );
    assert_eq!(
        input[position("the node to itself")].matches,
        [ruleset::ir::Match::IifLoopback]
    );
    let seen = to_node(&compiler, "10.244.1.9", CtState::New);
    assert_eq!(seen.decision, Decision::Drop, "{:?}", seen.steps);
    assert_eq!(
        seen.last_rule_in("input")
            .and_then(|r| r.comment.as_deref()),
        Some("from a local pod address not yet programmed")
    );
    assert_eq!(
        to_node(&plain, "10.244.1.9", CtState::New).decision,
        Decision::Accept,
        "without the option, an unknown local address reaches the node"
    );
    for (src, ct) in [
        ("10.244.1.9", CtState::Reply),
        ("10.244.1.9", CtState::Related),
        ("10.244.1.5", CtState::New),
        ("192.168.0.2", CtState::New),
        ("10.244.3.7", CtState::New),
    ] {
        for (with, c) in [("with", &compiler), ("without", &plain)] {
            assert_eq!(
                to_node(c, src, ct).decision,
                Decision::Accept,
                "{src} {ct:?} to the node, {with} the option"
            );
        }
    }

    // The pod's arrival is a delta that opens exactly its address, like a full compile.
    let delta = compiler.apply_pod(new_pod().0);
    assert!(delta.add_elements.contains_key("known4"), "{delta:?}");
    assert_eq!(
        verdict(&compiler, "10.244.2.5", "10.244.1.9"),
        Decision::Accept
    );
    let mut with_new = c;
    with_new.apply_pod(new_pod().0);
    assert_eq!(
        compiler.table(),
        Compiler::with_options(with_new, "n1", options).table()
    );
    // And its deletion closes it again.
    compiler.delete_pod("default", "new");
    assert_eq!(
        verdict(&compiler, "10.244.2.5", "10.244.1.9"),
        Decision::Drop
    );
}

#[test]
fn the_guard_table_pairs_each_veth_with_its_pods_addresses() {
    use ruleset::guard::{guard_table, Guard, GuardedPod, PodBridge};
    use ruleset::ir::{Element, IfName, Match, TableFamily, Verdict};

    let veth = IfName::new("veth0a1b2c3d").unwrap();
    let open = IfName::new("veth0a1b2c3e").unwrap();
    // A veth on the same bridge whose pod the agent does not guard, and one on another bridge.
    let stranger = IfName::new("veth0a1b2c3f").unwrap();
    let docker = IfName::new("veth0d0c4e55").unwrap();
    // A pod whose link-layer address another veth's pod has taken too.
    let cloned = IfName::new("veth0a1b2c40").unwrap();
    let ips: Vec<IpAddr> = vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()];
    let cloned_ip: IpAddr = "10.244.1.7".parse().unwrap();
    let (mac, open_mac, cloned_mac) = ([2, 0, 0, 0, 0, 5], [2, 0, 0, 0, 0, 6], [2, 0, 0, 0, 0, 7]);
    // The addresses of a pod whose addresses two veths' pods carry, neither known its own.
    let contested: Vec<IpAddr> = vec!["10.244.1.9".parse().unwrap(), "fd00::9".parse().unwrap()];
    let table = guard_table(
        "n1",
        &Guard {
            pods: vec![
                GuardedPod {
                    veth,
                    index: 21,
                    ips: ips.clone(),
                    mac,
                    mac_shared: false,
                    egress_isolated: true,
                },
                GuardedPod {
                    veth: open,
                    index: 22,
                    ips: Vec::new(),
                    mac: open_mac,
                    mac_shared: false,
                    egress_isolated: false,
                },
                GuardedPod {
                    veth: cloned,
                    index: 23,
                    ips: vec![cloned_ip],
                    mac: cloned_mac,
                    mac_shared: true,
                    egress_isolated: false,
                },
            ],
            ports: vec![stranger],
            elsewhere: vec![docker],
            contested: contested.clone(),
            // Two bridges: one with a subnet of each family (and a host route, which says
            // nothing of its pods'), one with only an IPv4 subnet, which overlaps the first's.
            bridges: vec![
                PodBridge {
                    name: IfName::new("cni0").unwrap(),
                    nets: ["10.244.1.1/24", "10.244.1.200/32", "fd00::1/64"]
                        .map(|n| n.parse().unwrap())
                        .to_vec(),
                },
                PodBridge {
                    name: IfName::new("cbr0").unwrap(),
                    nets: vec!["10.244.0.1/23".parse().unwrap()],
                },
            ],
        },
    );
    assert_eq!(table.family, TableFamily::Bridge);
    let range = |lo: &str, hi: &str| Element::Range(lo.parse().unwrap(), hi.parse().unwrap());
    // Every veth on the pods' bridges, guarded or not; none on other bridges.
    assert_eq!(
        table.sets["ports"].elements.iter().collect::<Vec<_>>(),
        [
            &Element::Iface(veth),
            &Element::Iface(open),
            &Element::Iface(stranger),
            &Element::Iface(cloned)
        ]
    );
    // The bridges' subnets, joined where they overlap.
    assert_eq!(
        table.sets["bridgenets4"]
            .elements
            .iter()
            .collect::<Vec<_>>(),
        [&range("10.244.0.0", "10.244.1.255")]
    );
    // A bridge with no IPv6 subnet does not limit IPv6: every address.
    assert_eq!(
        table.sets["bridgenets6"]
            .elements
            .iter()
            .collect::<Vec<_>>(),
        [&range("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")]
    );
    let one_bridge = guard_table(
        "n1",
        &Guard {
            bridges: vec![PodBridge {
                name: IfName::new("cni0").unwrap(),
                nets: vec!["fd00::1/64".parse().unwrap()],
            }],
            ..Guard::default()
        },
    );
    assert_eq!(
        one_bridge.sets["bridgenets4"]
            .elements
            .iter()
            .collect::<Vec<_>>(),
        [&range("0.0.0.0", "255.255.255.255")],
        "a bridge with no IPv4 subnet does not limit IPv4"
    );
    assert_eq!(
        one_bridge.sets["bridgenets6"]
            .elements
            .iter()
            .collect::<Vec<_>>(),
        [
            &range("::", "::"),
            &range("fd00::", "fd00::ffff:ffff:ffff:ffff"),
            &range("fe80::", "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
        ],
        "the bridge's subnet, and the sources of neighbour discovery"
    );
    assert_eq!(
        table.sets["veths"].elements.iter().collect::<Vec<_>>(),
        [
            &Element::Iface(veth),
            &Element::Iface(open),
            &Element::Iface(cloned)
        ]
    );
    // Each veth with its pod's link-layer address, but not one whose address another veth's
    // pod has too: nothing from that veth is its pod's.
    assert_eq!(
        table.sets["macs"].elements.iter().collect::<Vec<_>>(),
        [
            &Element::IfaceMac(veth, mac),
            &Element::IfaceMac(open, open_mac)
        ]
    );
    assert_eq!(
        table.sets["own4"].elements.iter().collect::<Vec<_>>(),
        [&Element::IndexMacAddr(21, mac, ips[0])]
    );
    // No other veth sends from any of them, the shared one included.
    assert_eq!(
        table.sets["guardedmacs"].elements.len(),
        3,
        "{:?}",
        table.sets["guardedmacs"]
    );
    assert!(table.sets["guardedmacs"]
        .elements
        .contains(&Element::Mac(cloned_mac)));
    assert_eq!(
        table.sets["elsewhere"].elements.iter().collect::<Vec<_>>(),
        [&Element::Iface(docker)],
        "only the veths on other bridges"
    );
    assert_eq!(
        table.sets["isolated"].elements.iter().collect::<Vec<_>>(),
        [&Element::Iface(veth)],
        "only the veth of the pod isolated for egress"
    );
    assert!(table.sets["src4"]
        .elements
        .contains(&Element::IfaceAddr(veth, ips[0])));
    assert!(table.sets["src6"]
        .elements
        .contains(&Element::IfaceAddr(veth, ips[1])));
    assert_eq!(
        table.sets["src4"].elements.len() + table.sets["src6"].elements.len(),
        3
    );
    // The contested addresses are sent from no veth: in no veth's own sets, and dropped from
    // every other veth like a guarded pod's.
    assert_eq!(
        table.sets["guarded4"].elements.iter().collect::<Vec<_>>(),
        [
            &Element::Addr(ips[0]),
            &Element::Addr(cloned_ip),
            &Element::Addr(contested[0])
        ]
    );
    assert_eq!(
        table.sets["guarded6"].elements.iter().collect::<Vec<_>>(),
        [&Element::Addr(ips[1]), &Element::Addr(contested[1])]
    );
    assert_eq!(
        table.sets["targets6"].elements.iter().collect::<Vec<_>>(),
        [&Element::Addr(ips[1]), &Element::Addr(contested[1])]
    );
    // Tagged frames are dropped from every veth on the bridge (the drops below read past one
    // tag, or none), and from any other veth a guarded pod's address, after every rule for
    // the guarded ones;
    // a veth's own ARP is accepted in `guard`, so that it does not come back to meet them.
    assert!(table.chains["guard"].rules.iter().any(|r| r.matches
        == [Match::IifnameArpSenderInSet { set: "src4".into() }]
        && r.verdict == Verdict::Accept));
    // No verdict of `guard` returns: after the jump, `prerouting`'s rules are for other veths,
    // and the one for a guarded pod's link-layer address would drop the pod's own ARP probes
    // and link-local traffic.
    assert!(
        table.chains["guard"]
            .rules
            .iter()
            .all(|r| r.verdict != Verdict::Return),
        "{:#?}",
        table.chains["guard"].rules
    );
    // Nor its neighbour discovery, whose advertisements name its own address.
    assert!(table.chains["guard"].rules.iter().any(|r| matches!(
        r.matches.first(),
        Some(Match::Icmpv6Type(types)) if types.contains(&136)
    ) && r.verdict == Verdict::Accept));
    let prerouting: Vec<String> = table.chains["prerouting"]
        .rules
        .iter()
        .map(ruleset::render::rule_text)
        .collect();
    // IPv4 from the pod's own link-layer and IP address first, in one lookup keyed on the
    // veth's index; past the tagged drops, nothing from a guarded veth with another link-layer
    // address goes on.
    assert!(
        prerouting[0].starts_with("iif . ether saddr . ip saddr @own4 accept"),
        "{prerouting:#?}"
    );
    for (i, tag) in ["8021q", "8021ad"].into_iter().enumerate() {
        assert!(
            prerouting[i + 1].starts_with(&format!(
                "ether type {tag} meta iifkind \"veth\" iifname != @elsewhere drop"
            )),
            "{prerouting:#?}"
        );
    }
    assert!(
        prerouting[3].starts_with("iifname @veths iifname . ether saddr != @macs drop"),
        "{prerouting:#?}"
    );
    let last_for_veths = prerouting
        .iter()
        .rposition(|r| r.contains("@veths") || r.contains("@src"))
        .expect("rules for the veths");
    assert_eq!(
        prerouting[last_for_veths + 1..],
        [
            "meta iifkind \"veth\" iifname != @elsewhere ether saddr @guardedmacs drop comment \"a guarded pod's link-layer address from another veth\"",
            "icmpv6 type { nd-router-advert, nd-redirect } meta iifkind \"veth\" iifname != @elsewhere drop comment \"router advertisement or redirect from another veth: a pod is no router\"",
            "icmpv6 type { nd-neighbor-advert } meta iifkind \"veth\" iifname != @elsewhere ip6 nexthdr != ipv6-icmp drop comment \"neighbour advertisement behind an extension header from another veth\"",
            "meta iifkind \"veth\" iifname != @elsewhere ip saddr @guarded4 drop comment \"a guarded pod's address from another veth\"",
            "meta iifkind \"veth\" iifname != @elsewhere ip6 saddr @guarded6 drop comment \"a guarded pod's address from another veth\"",
            "meta iifkind \"veth\" iifname != @elsewhere arp saddr ip @guarded4 drop comment \"ARP claiming a guarded pod's address from another veth\"",
            "icmpv6 type { nd-neighbor-advert } meta iifkind \"veth\" iifname != @elsewhere @th,64,128 @targets6 drop comment \"neighbour advertisement for a guarded pod's address from another veth\"",
            "iifname @ports ip saddr != @bridgenets4 drop comment \"an address outside the bridge's subnets from another veth\"",
            "iifname @ports ip6 saddr != @bridgenets6 drop comment \"an address outside the bridge's subnets from another veth\"",
        ],
        "{prerouting:#?}"
    );
    // Between pods, a frame to a guarded pod's MAC leaves only by its veth: no flood of a MAC
    // the bridge forgot reaches the others.
    let first = ruleset::render::rule_text(&table.chains["forward"].rules[0]);
    assert!(
        first.starts_with("ether daddr @guardedmacs oifname . ether daddr != @macs drop"),
        "{first}"
    );
    let text = ruleset::render(&table);
    assert!(text.starts_with("table bridge nftpol {"), "{text}");
    assert!(text.contains("iifname @veths jump guard"), "{text}");
    assert!(
        text.contains("ip6 saddr @linklocal6 iifname @isolated drop"),
        "{text}"
    );
    assert!(
        text.contains("ip6 saddr @linklocal6 meta l4proto udp th dport 8472 drop"),
        "{text}"
    );
    for bad in ["", "a/b", "has space", "sixteen-chars-xx"] {
        assert!(
            IfName::new(bad).is_none(),
            "{bad:?} is not an interface name"
        );
    }
    assert_eq!(
        IfName::new("fifteen-chars-x").unwrap().as_str(),
        "fifteen-chars-x"
    );
}

#[test]
fn input_accepts_only_unicast_before_it_drops_what_comes_straight_from_a_veth() {
    use ruleset::guard::{veths_delta, Guard, GuardedPod, INPUT_VETHS};
    use ruleset::ir::{Element, IfName, Match, Verdict};

    let compiler = Compiler::new(Cluster::default(), "n1");
    let rules = &compiler.table().chains["input"].rules;
    let drop = rules
        .iter()
        .position(|r| {
            r.matches
                == [Match::IifnameInSet {
                    set: INPUT_VETHS.into(),
                }]
        })
        .expect("input drops what comes from a listed veth");
    assert_eq!(rules[drop].verdict, Verdict::Drop);
    // What a bridge hands up from a port is group-addressed: before the drop, only unicast
    // may be let through (the overlay's, which skips the veth lookup).
    assert!(drop > 0, "the overlay's unicast skips the veth lookup");
    for rule in &rules[..drop] {
        assert_eq!(
            rule.matches.first(),
            Some(&Match::PktTypeHost),
            "{rule:?} comes before the drop"
        );
        assert_eq!(rule.verdict, Verdict::Accept, "{rule:?}");
    }
    assert!(compiler.table().sets[INPUT_VETHS].elements.is_empty());

    let pod = |name: &str| GuardedPod {
        veth: IfName::new(name).unwrap(),
        index: 7,
        ips: Vec::new(),
        mac: [2, 0, 0, 0, 0, 1],
        mac_shared: false,
        egress_isolated: false,
    };
    let (a, b) = (pod("veth0000000a"), pod("veth0000000b"));
    let mut table = compiler.table().clone();
    table.apply(&veths_delta(&table, &vec![a.clone()].into()));
    let listed = |table: &ruleset::ir::Table| -> Vec<Element> {
        table.sets[INPUT_VETHS].elements.iter().copied().collect()
    };
    assert_eq!(listed(&table), [Element::Iface(a.veth)]);
    let delta = veths_delta(&table, &vec![b.clone()].into());
    assert_eq!(delta.size(), 2, "one veth out, one in: {delta:?}");
    table.apply(&delta);
    assert_eq!(listed(&table), [Element::Iface(b.veth)]);
    assert!(veths_delta(&table, &vec![b.clone()].into()).is_empty());
    // The other veths on the pods' bridges too: nothing reaches the node straight from them
    // either.
    let other = IfName::new("veth0000000c").unwrap();
    let both = Guard {
        pods: vec![b.clone()],
        ports: vec![other, b.veth],
        ..Guard::default()
    };
    table.apply(&veths_delta(&table, &both));
    assert_eq!(
        listed(&table),
        [Element::Iface(b.veth), Element::Iface(other)]
    );
}

#[test]
fn a_local_pod_cannot_send_vxlan_even_where_its_egress_is_open() {
    let c = cluster(
        vec![],
        vec![
            pod("a", "open", "10.0.0.1").ip("fd00::1"),
            pod("b", "far", "10.0.1.1").ip("fd00:1::1").node("n2"),
        ],
        vec![],
    );
    let compiler = Compiler::new(c, "n1");
    let t = compiler.table();
    for port in [4789, 8472] {
        let vxlan = L4::Transport {
            protocol: Udp,
            dport: port,
        };
        for (hook, from, to) in [
            (Hook::Forward, "10.0.0.1", "192.168.0.2"),
            (Hook::Forward, "fd00::1", "fd00:100::2"),
            (Hook::Forward, "10.0.0.1", "10.0.1.1"),
            (Hook::Input, "10.0.0.1", "192.168.0.1"),
            (Hook::Input, "fd00::1", "fd00:100::1"),
        ] {
            let seen = evaluate(t, hook, &packet(from, to, vxlan, CtState::New));
            assert_eq!(
                seen.decision,
                Decision::Drop,
                "{hook:?} {from} -> {to}:{port}"
            );
            let rule = seen.last_rule_in(if hook == Hook::Input {
                "input"
            } else {
                "forward"
            });
            assert!(
                rule.and_then(|r| r.comment.as_deref())
                    .is_some_and(|c| c.starts_with("VXLAN from a local pod")),
                "{hook:?} {from} -> {to}:{port}: {rule:?}"
            );
        }
        // Another node's overlay packets, and a remote pod's datagrams to that port, pass.
        assert_eq!(
            evaluate(
                t,
                Hook::Input,
                &packet("192.168.0.2", "192.168.0.1", vxlan, CtState::New)
            )
            .decision,
            Decision::Accept
        );
        assert_eq!(
            evaluate(
                t,
                Hook::Forward,
                &packet("10.0.1.1", "10.0.0.1", vxlan, CtState::New)
            )
            .decision,
            Decision::Accept
        );
    }
    // The open pod's other traffic to the node and beyond passes.
    let dns = L4::Transport {
        protocol: Udp,
        dport: 53,
    };
    assert_eq!(
        evaluate(
            t,
            Hook::Input,
            &packet("10.0.0.1", "192.168.0.1", dns, CtState::New)
        )
        .decision,
        Decision::Accept
    );
    assert_eq!(
        evaluate(
            t,
            Hook::Forward,
            &packet("10.0.0.1", "192.168.0.2", dns, CtState::New)
        )
        .decision,
        Decision::Accept
    );
}
