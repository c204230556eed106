//! The conformance suite: NetworkPolicy scenarios in the shape of the upstream e2e model,
//! enforced by real `agent run` processes and checked with real packets against the spec oracle
//! (`ruleset/tests/spec/mod.rs`), not against the compiler's own reading.
//!
//! ```text
//! namespaces x, y, z (labels ns=x, ns=y, ns=z); pods a, b, c in each (label pod=a, ...),
//! spread over the lab's two nodes, dual-stack, serving TCP and UDP 80 and 81 under the
//! container port names serve-<port>-<tcp|udp>, and `web` (TCP 80 on a and b, TCP 81 on c)
//!
//! per scenario step: edit the cluster -> hand it to the agents' source:
//!     snapshot  write the snapshot file (rename); both agents poll it
//!     API       put and delete the objects that changed in the API stand-in; both agents watch it
//!   -> wait until both agents took all of it -> probe every pod from every pod, itself included,
//!   on TCP/UDP 80/81, IPv4 and IPv6 -> every cell must be what the oracle says
//! ```
//!
//! Each source runs every scenario; the scenarios are split over two tests per source, each
//! with its own lab and agents, so that they run side by side. A failing cell names the
//! source, scenario, step, source and destination pods, service and family, with the oracle's
//! verdict, what the probe saw and the agents' logs; every scenario runs before the test
//! fails. Where `Tracer` (the compiler's reading) disagrees with the kernel, that is reported
//! and fails the test too.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

#[path = "../../ruleset/tests/spec/mod.rs"]
#[allow(
    dead_code,
    reason = "shared with ruleset/tests/oracle.rs, which uses parts this test does not"
)]
mod spec;

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::agents::{
    agent_binary, assert_enforceable, logs, marks, rulesets_changed, wait_change, wait_synced,
    Agent, Delivery, StandIn,
};
use integration::apiserver::Resource;
use integration::lab::{compare_with_trace, Cell, Family, Lab, Protocol};
use integration::{netns, objects};
use ruleset::model::{
    ContainerPort, IpBlock, LabelSelector, Labels, Namespace, NetworkPolicy, Peer, Pod, PolicyPort,
    PolicyRule, PortRef, SelectorRequirement,
};
use ruleset::Cluster;
use serde_json::json;

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");
/// Node `i` of the lab is `NODES[i]` to the cluster.
const NODES: [&str; 2] = ["node-a", "node-b"];
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const POD_NAMES: [&str; 3] = ["a", "b", "c"];
const SERVICES: [(Protocol, u16); 4] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 81),
    (Protocol::Udp, 80),
    (Protocol::Udp, 81),
];
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the agents look at the snapshot; the default 200 ms would add up over the steps.
const POLL_MS: &str = "50";

// ------------------------------------------------------------------------------------ model

/// The cluster as the oracle and the agents both see it.
#[derive(Clone, Debug)]
struct State {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<NetworkPolicy>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Lab node `node`'s pod CIDR in `family`.
fn node_cidr(node: usize, family: Family) -> String {
    match family {
        Family::V4 => format!("10.244.{}.0/24", node + 1),
        Family::V6 => format!("fd00:10:244:{}::/64", node + 1),
    }
}

/// A pod of the model, with the addresses the lab gives host `host` on node `node`.
fn make_pod(namespace: &str, name: &str, node: usize, host: u8, pod_label: &str) -> Pod {
    let subnet = node + 1;
    let named = |name: &str, protocol: &str, port: i32| ContainerPort {
        name: Some(name.into()),
        protocol: protocol.into(),
        port,
    };
    // `web` has a different number on pod c, so that a named port resolves per pod.
    let web = if name == "c" { 81 } else { 80 };
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        node: Some(NODES[node].into()),
        labels: labels(&[("pod", pod_label)]),
        ips: vec![
            format!("10.244.{subnet}.{host}").parse().unwrap(),
            format!("fd00:10:244:{subnet}::{host:x}").parse().unwrap(),
        ],
        host_network: false,
        phase: Some("Running".into()),
        ports: vec![
            named("serve-80-tcp", "TCP", 80),
            named("serve-81-tcp", "TCP", 81),
            named("serve-80-udp", "UDP", 80),
            named("serve-81-udp", "UDP", 81),
            named("web", "TCP", web),
        ],
    }
}

impl State {
    /// x, y, z with pods a, b, c each, alternating between the nodes; no policies.
    fn base() -> State {
        let namespaces = NAMESPACES
            .iter()
            .map(|ns| Namespace {
                name: ns.to_string(),
                labels: labels(&[("ns", ns)]),
            })
            .collect();
        let mut pods = Vec::new();
        for (i, (ns, name)) in NAMESPACES
            .iter()
            .flat_map(|ns| POD_NAMES.iter().map(move |p| (ns, p)))
            .enumerate()
        {
            let host = 10 + u8::try_from(i).unwrap();
            pods.push(make_pod(ns, name, i % NODES.len(), host, name));
        }
        State {
            namespaces,
            pods,
            policies: Vec::new(),
        }
    }

    /// Adds `policy`, or replaces the one of the same namespace and name.
    fn apply(&mut self, policy: NetworkPolicy) {
        self.policies
            .retain(|p| !(p.namespace == policy.namespace && p.name == policy.name));
        self.policies.push(policy);
    }

    fn delete_policy(&mut self, namespace: &str, name: &str) {
        let before = self.policies.len();
        self.policies
            .retain(|p| !(p.namespace == namespace && p.name == name));
        assert_eq!(before, self.policies.len() + 1, "policy {namespace}/{name}");
    }

    fn pod_mut(&mut self, namespace: &str, name: &str) -> &mut Pod {
        self.pods
            .iter_mut()
            .find(|p| p.namespace == namespace && p.name == name)
            .unwrap_or_else(|| panic!("no pod {namespace}/{name}"))
    }

    fn relabel_pod(&mut self, namespace: &str, name: &str, pod_label: &str) {
        self.pod_mut(namespace, name).labels = labels(&[("pod", pod_label)]);
    }

    fn relabel_namespace(&mut self, namespace: &str, ns_label: &str) {
        let ns = self
            .namespaces
            .iter_mut()
            .find(|n| n.name == namespace)
            .unwrap_or_else(|| panic!("no namespace {namespace}"));
        ns.labels = labels(&[("ns", ns_label)]);
    }

    fn delete_pod(&mut self, namespace: &str, name: &str) {
        let before = self.pods.len();
        self.pods
            .retain(|p| !(p.namespace == namespace && p.name == name));
        assert_eq!(before, self.pods.len() + 1, "pod {namespace}/{name}");
    }

    /// The one address of pod `namespace/name` in `family`, as a host CIDR.
    fn host_cidr(&self, namespace: &str, name: &str, family: Family) -> String {
        let pod = self
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .unwrap_or_else(|| panic!("no pod {namespace}/{name}"));
        let ip = pod
            .ips
            .iter()
            .find(|ip| Family::of(ip) == family)
            .expect("dual-stack pod");
        let bits = if family == Family::V4 { 32 } else { 128 };
        format!("{ip}/{bits}")
    }

    fn cluster(&self) -> Cluster {
        Cluster::from_objects(
            self.namespaces.clone(),
            self.pods.clone(),
            self.policies.clone(),
        )
    }
}

// ------------------------------------------------------------------- policy building blocks

/// `matchLabels` of the given pairs; no pairs selects everything.
fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        ..LabelSelector::default()
    }
}

fn all() -> LabelSelector {
    LabelSelector::default()
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

/// A policy in `namespace` selecting `select`, with no rules and no policyTypes yet.
fn policy(namespace: &str, name: &str, select: LabelSelector) -> NetworkPolicy {
    NetworkPolicy {
        namespace: namespace.into(),
        name: name.into(),
        pod_selector: select,
        ..NetworkPolicy::default()
    }
}

trait Build {
    fn types(self, types: &[&str]) -> Self;
    fn ingress(self, rule: PolicyRule) -> Self;
    fn egress(self, rule: PolicyRule) -> Self;
}

impl Build for NetworkPolicy {
    fn types(mut self, types: &[&str]) -> Self {
        self.policy_types = types.iter().map(|t| t.to_string()).collect();
        self
    }
    fn ingress(mut self, rule: PolicyRule) -> Self {
        self.ingress.push(rule);
        self
    }
    fn egress(mut self, rule: PolicyRule) -> Self {
        self.egress.push(rule);
        self
    }
}

fn rule(peers: Vec<Peer>, ports: Vec<PolicyPort>) -> PolicyRule {
    PolicyRule { peers, ports }
}

/// Pods of the policy's own namespace.
fn pods(select: LabelSelector) -> Peer {
    Peer {
        pod_selector: Some(select),
        ..Peer::default()
    }
}

/// Every pod of the selected namespaces.
fn namespaces(select: LabelSelector) -> Peer {
    Peer {
        namespace_selector: Some(select),
        ..Peer::default()
    }
}

/// The selected pods of the selected namespaces (both must match).
fn pods_in(namespaces: LabelSelector, pods: LabelSelector) -> Peer {
    Peer {
        pod_selector: Some(pods),
        namespace_selector: Some(namespaces),
        ..Peer::default()
    }
}

fn block(cidr: &str, except: &[String]) -> Peer {
    Peer {
        ip_block: Some(IpBlock {
            cidr: cidr.into(),
            except: except.to_vec(),
        }),
        ..Peer::default()
    }
}

fn port(protocol: Option<&str>, port: Option<PortRef>, end_port: Option<i32>) -> PolicyPort {
    PolicyPort {
        protocol: protocol.map(str::to_string),
        port,
        end_port,
    }
}

fn tcp(n: i32) -> PolicyPort {
    port(Some("TCP"), Some(PortRef::Number(n)), None)
}

fn udp(n: i32) -> PolicyPort {
    port(Some("UDP"), Some(PortRef::Number(n)), None)
}

fn named(protocol: Option<&str>, name: &str) -> PolicyPort {
    port(protocol, Some(PortRef::Name(name.into())), None)
}

// ---------------------------------------------------------------------------------- scenarios

type Edit = fn(&mut State);

/// A scenario starts from [`State::base`]; each step edits the state the previous one left.
struct Scenario {
    name: &'static str,
    steps: Vec<(&'static str, Edit)>,
}

fn one(name: &'static str, edit: Edit) -> Scenario {
    Scenario {
        name,
        steps: vec![("in place", edit)],
    }
}

fn steps(name: &'static str, steps: Vec<(&'static str, Edit)>) -> Scenario {
    Scenario { name, steps }
}

const INGRESS: &[&str] = &["Ingress"];
const EGRESS: &[&str] = &["Egress"];
const BOTH: &[&str] = &["Ingress", "Egress"];

/// Isolation, policyTypes, peers, egress and policies adding up.
fn isolation_and_peer_scenarios() -> Vec<Scenario> {
    vec![
        one("no policies: everything open", |_| {}),
        one("deny all ingress in x (policyTypes Ingress)", |s| {
            s.apply(policy("x", "deny", all()).types(INGRESS));
        }),
        one("deny all ingress in x (policyTypes inferred)", |s| {
            s.apply(policy("x", "deny", all()));
        }),
        one("deny all egress in x", |s| {
            s.apply(policy("x", "deny", all()).types(EGRESS));
        }),
        one("deny all ingress and egress in x", |s| {
            s.apply(policy("x", "deny", all()).types(BOTH));
        }),
        one("deny all ingress in every namespace", |s| {
            for ns in NAMESPACES {
                s.apply(policy(ns, "deny", all()).types(INGRESS));
            }
        }),
        one(
            "deny all both ways in every namespace: pods reach only themselves",
            |s| {
                for ns in NAMESPACES {
                    s.apply(policy(ns, "deny", all()).types(BOTH));
                }
            },
        ),
        one("an empty ingress rule allows everything", |s| {
            s.apply(policy("x", "open", all()).ingress(rule(vec![], vec![])));
        }),
        one("egress open by an empty rule, ingress denied", |s| {
            s.apply(
                policy("x", "egress-open", all())
                    .types(BOTH)
                    .egress(rule(vec![], vec![])),
            );
        }),
        one("x/a ingress from pods b of x", |s| {
            s.apply(
                policy("x", "a-from-b", sel(&[("pod", "a")]))
                    .ingress(rule(vec![pods(sel(&[("pod", "b")]))], vec![])),
            );
        }),
        one("x/a ingress from namespace y", |s| {
            s.apply(
                policy("x", "a-from-y", sel(&[("pod", "a")]))
                    .ingress(rule(vec![namespaces(sel(&[("ns", "y")]))], vec![])),
            );
        }),
        one("x/a ingress from pods b of namespace y (AND)", |s| {
            s.apply(
                policy("x", "a-from-y-b", sel(&[("pod", "a")])).ingress(rule(
                    vec![pods_in(sel(&[("ns", "y")]), sel(&[("pod", "b")]))],
                    vec![],
                )),
            );
        }),
        one("x/a ingress from namespace y or pods b of x (OR)", |s| {
            s.apply(
                policy("x", "a-from-y-or-b", sel(&[("pod", "a")])).ingress(rule(
                    vec![namespaces(sel(&[("ns", "y")])), pods(sel(&[("pod", "b")]))],
                    vec![],
                )),
            );
        }),
        one("x ingress from pods c of every namespace", |s| {
            s.apply(
                policy("x", "from-any-c", all())
                    .ingress(rule(vec![pods_in(all(), sel(&[("pod", "c")]))], vec![])),
            );
        }),
        one("x ingress from namespaces NotIn [y]", |s| {
            s.apply(
                policy("x", "not-y", all())
                    .ingress(rule(vec![namespaces(expr("ns", "NotIn", &["y"]))], vec![])),
            );
        }),
        one("x ingress from kubernetes.io/metadata.name=z", |s| {
            s.apply(policy("x", "by-name", all()).ingress(rule(
                vec![namespaces(sel(&[("kubernetes.io/metadata.name", "z")]))],
                vec![],
            )));
        }),
        one(
            "pods In [a, b] of x, ingress from pods NotIn [a] of x",
            |s| {
                s.apply(
                    policy("x", "exprs", expr("pod", "In", &["a", "b"]))
                        .ingress(rule(vec![pods(expr("pod", "NotIn", &["a"]))], vec![])),
                );
            },
        ),
        one(
            "x/a ingress from namespaces where ns DoesNotExist: none match",
            |s| {
                s.apply(policy("x", "nothing", sel(&[("pod", "a")])).ingress(rule(
                    vec![namespaces(expr("ns", "DoesNotExist", &[]))],
                    vec![],
                )));
            },
        ),
        one("a policy in y selects only pods of y", |s| {
            s.apply(
                policy("y", "a-from-b", sel(&[("pod", "a")]))
                    .ingress(rule(vec![pods(sel(&[("pod", "b")]))], vec![])),
            );
        }),
        one("x/a egress to namespace y only", |s| {
            s.apply(
                policy("x", "to-y", sel(&[("pod", "a")]))
                    .types(EGRESS)
                    .egress(rule(vec![namespaces(sel(&[("ns", "y")]))], vec![])),
            );
        }),
        one("x egress to pods c of x on TCP 80", |s| {
            s.apply(
                policy("x", "to-c-80", all())
                    .types(EGRESS)
                    .egress(rule(vec![pods(sel(&[("pod", "c")]))], vec![tcp(80)])),
            );
        }),
        one("x egress on UDP 81 to anywhere", |s| {
            s.apply(
                policy("x", "udp-81", all())
                    .types(EGRESS)
                    .egress(rule(vec![], vec![udp(81)])),
            );
        }),
        one(
            "x/a egress on named port web, resolved per destination",
            |s| {
                s.apply(
                    policy("x", "web", sel(&[("pod", "a")]))
                        .types(EGRESS)
                        .egress(rule(vec![], vec![named(Some("TCP"), "web")])),
                );
            },
        ),
        one(
            "x/a egress to y, y ingress only from z: both ends must allow",
            |s| {
                s.apply(
                    policy("x", "to-y", sel(&[("pod", "a")]))
                        .types(EGRESS)
                        .egress(rule(vec![namespaces(sel(&[("ns", "y")]))], vec![])),
                );
                s.apply(
                    policy("y", "from-z", all())
                        .ingress(rule(vec![namespaces(sel(&[("ns", "z")]))], vec![])),
                );
            },
        ),
        one(
            "policyTypes inferred from egress rules: x/a isolated both ways",
            |s| {
                s.apply(
                    policy("x", "inferred", sel(&[("pod", "a")]))
                        .egress(rule(vec![namespaces(sel(&[("ns", "z")]))], vec![])),
                );
            },
        ),
        one("policyTypes [Egress]: the ingress rules are ignored", |s| {
            s.apply(
                policy("x", "egress-only", all())
                    .types(EGRESS)
                    .ingress(rule(vec![namespaces(sel(&[("ns", "y")]))], vec![])),
            );
        }),
        one("policyTypes [Ingress]: the egress rules are ignored", |s| {
            s.apply(
                policy("x", "ingress-only", all())
                    .types(INGRESS)
                    .ingress(rule(vec![pods(sel(&[("pod", "b")]))], vec![]))
                    .egress(rule(vec![namespaces(sel(&[("ns", "z")]))], vec![udp(80)])),
            );
        }),
        one(
            "two policies on x/a add up: from pods b, from namespace y",
            |s| {
                s.apply(
                    policy("x", "from-b", sel(&[("pod", "a")]))
                        .ingress(rule(vec![pods(sel(&[("pod", "b")]))], vec![])),
                );
                s.apply(
                    policy("x", "from-y", sel(&[("pod", "a")]))
                        .ingress(rule(vec![namespaces(sel(&[("ns", "y")]))], vec![])),
                );
            },
        ),
        one("deny all in x plus an allow from z on TCP 80", |s| {
            s.apply(policy("x", "deny", all()).types(BOTH));
            s.apply(
                policy("x", "from-z", all())
                    .ingress(rule(vec![namespaces(sel(&[("ns", "z")]))], vec![tcp(80)])),
            );
        }),
        one("policies in every namespace at once", |s| {
            s.apply(
                policy("x", "from-y", all())
                    .ingress(rule(vec![namespaces(sel(&[("ns", "y")]))], vec![])),
            );
            s.apply(
                policy("y", "to-z", all())
                    .types(EGRESS)
                    .egress(rule(vec![namespaces(sel(&[("ns", "z")]))], vec![])),
            );
            s.apply(
                policy("z", "c-only", sel(&[("pod", "c")]))
                    .types(BOTH)
                    .ingress(rule(
                        vec![pods_in(all(), sel(&[("pod", "a")]))],
                        vec![udp(81)],
                    ))
                    .egress(rule(vec![pods(all())], vec![])),
            );
        }),
    ]
}

/// Ports, ipBlock with the lab's real pod CIDRs, and clusters that change between steps.
fn port_block_and_change_scenarios() -> Vec<Scenario> {
    vec![
        one("x ingress on port 80, protocol defaulted to TCP", |s| {
            s.apply(policy("x", "port-80", all()).ingress(rule(
                vec![],
                vec![port(None, Some(PortRef::Number(80)), None)],
            )));
        }),
        one("x ingress on UDP 81", |s| {
            s.apply(policy("x", "udp-81", all()).ingress(rule(vec![], vec![udp(81)])));
        }),
        one("x ingress on all of UDP (protocol without port)", |s| {
            s.apply(
                policy("x", "all-udp", all())
                    .ingress(rule(vec![], vec![port(Some("UDP"), None, None)])),
            );
        }),
        one("x ingress on TCP 80 to endPort 81", |s| {
            s.apply(policy("x", "range", all()).ingress(rule(
                vec![],
                vec![port(Some("TCP"), Some(PortRef::Number(80)), Some(81))],
            )));
        }),
        one("x ingress on UDP 81 to endPort 90", |s| {
            s.apply(policy("x", "range", all()).ingress(rule(
                vec![],
                vec![port(Some("UDP"), Some(PortRef::Number(81)), Some(90))],
            )));
        }),
        one(
            "x ingress on named port serve-81-tcp (protocol defaulted)",
            |s| {
                s.apply(
                    policy("x", "named", all())
                        .ingress(rule(vec![], vec![named(None, "serve-81-tcp")])),
                );
            },
        ),
        one("x ingress on named port serve-80-udp", |s| {
            s.apply(
                policy("x", "named", all())
                    .ingress(rule(vec![], vec![named(Some("UDP"), "serve-80-udp")])),
            );
        }),
        one("x ingress on serve-80-tcp as UDP: no such port", |s| {
            s.apply(
                policy("x", "named", all())
                    .ingress(rule(vec![], vec![named(Some("UDP"), "serve-80-tcp")])),
            );
        }),
        one("x ingress on named port web: 80 on a and b, 81 on c", |s| {
            s.apply(policy("x", "web", all()).ingress(rule(vec![], vec![named(None, "web")])));
        }),
        one("x/b ingress from namespace z on TCP 81 only", |s| {
            s.apply(
                policy("x", "z-81", sel(&[("pod", "b")]))
                    .ingress(rule(vec![namespaces(sel(&[("ns", "z")]))], vec![tcp(81)])),
            );
        }),
        one(
            "x/a ingress: from pods b on TCP 80, or from namespace z on UDP 81",
            |s| {
                s.apply(
                    policy("x", "two-rules", sel(&[("pod", "a")]))
                        .ingress(rule(vec![pods(sel(&[("pod", "b")]))], vec![tcp(80)]))
                        .ingress(rule(vec![namespaces(sel(&[("ns", "z")]))], vec![udp(81)])),
                );
            },
        ),
        one(
            "x ingress on TCP 81 or UDP 80 (two ports in one rule)",
            |s| {
                s.apply(
                    policy("x", "two-ports", all()).ingress(rule(vec![], vec![tcp(81), udp(80)])),
                );
            },
        ),
        one("x egress to namespace z on UDP 80 to endPort 81", |s| {
            s.apply(policy("x", "range", all()).types(EGRESS).egress(rule(
                vec![namespaces(sel(&[("ns", "z")]))],
                vec![port(Some("UDP"), Some(PortRef::Number(80)), Some(81))],
            )));
        }),
        one(
            "x egress denied by one policy, allowed to y on TCP 80 by another",
            |s| {
                s.apply(policy("x", "deny", all()).types(EGRESS));
                s.apply(
                    policy("x", "to-y-80", all())
                        .types(EGRESS)
                        .egress(rule(vec![namespaces(sel(&[("ns", "y")]))], vec![tcp(80)])),
                );
            },
        ),
        one("x ingress from 10.244.0.0/16 except node-b's pods", |s| {
            s.apply(policy("x", "v4", all()).ingress(rule(
                vec![block("10.244.0.0/16", &[node_cidr(1, Family::V4)])],
                vec![],
            )));
        }),
        one(
            "x ingress from fd00:10:244::/48 except node-a's pods",
            |s| {
                s.apply(policy("x", "v6", all()).ingress(rule(
                    vec![block("fd00:10:244::/48", &[node_cidr(0, Family::V6)])],
                    vec![],
                )));
            },
        ),
        one(
            "x ingress from all pod addresses except y/b's, both families",
            |s| {
                let v4 = s.host_cidr("y", "b", Family::V4);
                let v6 = s.host_cidr("y", "b", Family::V6);
                s.apply(policy("x", "dual", all()).ingress(rule(
                    vec![
                        block("10.244.0.0/16", &[v4]),
                        block("fd00:10:244::/48", &[v6]),
                    ],
                    vec![],
                )));
            },
        ),
        one("x egress to node-a's pods except z/c, both families", |s| {
            let v4 = s.host_cidr("z", "c", Family::V4);
            let v6 = s.host_cidr("z", "c", Family::V6);
            s.apply(policy("x", "to-node-a", all()).types(EGRESS).egress(rule(
                vec![
                    block(&node_cidr(0, Family::V4), &[v4]),
                    block(&node_cidr(0, Family::V6), &[v6]),
                ],
                vec![],
            )));
        }),
        one("x/c ingress from blocks outside the cluster only", |s| {
            s.apply(policy("x", "outside", sel(&[("pod", "c")])).ingress(rule(
                vec![block("192.0.2.0/24", &[]), block("2001:db8::/32", &[])],
                vec![],
            )));
        }),
        one("x ingress from every pod address on UDP 80 only", |s| {
            s.apply(policy("x", "udp-80", all()).ingress(rule(
                vec![block("10.244.0.0/16", &[]), block("fd00:10:244::/48", &[])],
                vec![udp(80)],
            )));
        }),
        one(
            "y/b egress to 10.244.0.0/16 except x/a, IPv6 anywhere except node-b",
            |s| {
                let v4 = s.host_cidr("x", "a", Family::V4);
                s.apply(
                    policy("y", "mixed", sel(&[("pod", "b")]))
                        .types(EGRESS)
                        .egress(rule(
                            vec![
                                block("10.244.0.0/16", &[v4]),
                                block("::/0", &[node_cidr(1, Family::V6)]),
                            ],
                            vec![],
                        )),
                );
            },
        ),
        steps(
            "policy update",
            vec![
                ("x/a from pods b", |s| {
                    s.apply(
                        policy("x", "a", sel(&[("pod", "a")]))
                            .ingress(rule(vec![pods(sel(&[("pod", "b")]))], vec![])),
                    );
                }),
                ("now from pods c", |s| {
                    s.apply(
                        policy("x", "a", sel(&[("pod", "a")]))
                            .ingress(rule(vec![pods(sel(&[("pod", "c")]))], vec![])),
                    );
                }),
                ("now from pods c on UDP 81 only", |s| {
                    s.apply(
                        policy("x", "a", sel(&[("pod", "a")]))
                            .ingress(rule(vec![pods(sel(&[("pod", "c")]))], vec![udp(81)])),
                    );
                }),
                ("now selecting every pod of x", |s| {
                    s.apply(
                        policy("x", "a", all())
                            .ingress(rule(vec![pods(sel(&[("pod", "c")]))], vec![udp(81)])),
                    );
                }),
            ],
        ),
        steps(
            "policy delete",
            vec![
                ("deny all in x, allow from y", |s| {
                    s.apply(policy("x", "deny", all()).types(BOTH));
                    s.apply(
                        policy("x", "from-y", all())
                            .ingress(rule(vec![namespaces(sel(&[("ns", "y")]))], vec![])),
                    );
                }),
                ("deny deleted", |s| s.delete_policy("x", "deny")),
                ("allow deleted too", |s| s.delete_policy("x", "from-y")),
            ],
        ),
        steps(
            "pod relabel",
            vec![
                ("x/a ingress from pods b", |s| {
                    s.apply(
                        policy("x", "a-from-b", sel(&[("pod", "a")]))
                            .ingress(rule(vec![pods(sel(&[("pod", "b")]))], vec![])),
                    );
                }),
                ("x/c relabelled pod=b", |s| s.relabel_pod("x", "c", "b")),
                ("x/b relabelled pod=q", |s| s.relabel_pod("x", "b", "q")),
                ("x/a relabelled pod=q: no longer selected", |s| {
                    s.relabel_pod("x", "a", "q");
                }),
                ("x/b relabelled pod=a: now selected", |s| {
                    s.relabel_pod("x", "b", "a");
                }),
            ],
        ),
        steps(
            "namespace relabel",
            vec![
                ("x ingress from namespaces ns=y", |s| {
                    s.apply(
                        policy("x", "from-y", all())
                            .ingress(rule(vec![namespaces(sel(&[("ns", "y")]))], vec![])),
                    );
                }),
                ("z relabelled ns=y", |s| s.relabel_namespace("z", "y")),
                ("y relabelled ns=q", |s| s.relabel_namespace("y", "q")),
            ],
        ),
        steps(
            "pods added after the policy",
            vec![
                ("x ingress only from pods a of any namespace", |s| {
                    s.apply(
                        policy("x", "from-a", all())
                            .ingress(rule(vec![pods_in(all(), sel(&[("pod", "a")]))], vec![])),
                    );
                }),
                ("x/d added on node-b: selected, so isolated", |s| {
                    s.pods.push(make_pod("x", "d", 1, 30, "d"));
                }),
                ("z/d added on node-a with pod=a: a peer", |s| {
                    s.pods.push(make_pod("z", "d", 0, 31, "a"));
                }),
                ("x/d deleted", |s| s.delete_pod("x", "d")),
            ],
        ),
    ]
}

// ------------------------------------------------------------------------------------ runner

/// How the cluster reaches the agents.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// A snapshot file (`--manifests`), replaced whole by rename at each step.
    Snapshot,
    /// The API stand-in (`--kubeconfig`) in node-a's namespace: at each step, the puts and
    /// deletes of the objects that changed.
    Api,
}

/// A source, running.
enum Feed {
    Snapshot {
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
    Api(StandIn),
}

impl Feed {
    /// Starts `source` holding `cluster`.
    fn start(source: Source, lab: &Lab, cluster: &Cluster) -> Feed {
        match source {
            Source::Snapshot => {
                let dir = tempfile::tempdir().expect("scratch dir");
                let path = dir.path().join("snapshot.json");
                write_snapshot(&path, cluster);
                Feed::Snapshot { path, _dir: dir }
            }
            Source::Api => {
                assert_reads_back(cluster);
                Feed::Api(StandIn::start(lab, 0, cluster))
            }
        }
    }

    /// The agent of lab node `node`, on this source.
    fn start_agent(&self, lab: &Lab, node: usize) -> Agent {
        let labpod = Path::new(LABPOD);
        match self {
            Feed::Snapshot { path, .. } => Agent::start(
                labpod,
                lab,
                node,
                NODES[node],
                path,
                &["--poll-ms", POLL_MS],
            ),
            Feed::Api(api) => {
                Agent::start_api(labpod, lab, node, NODES[node], &api.kubeconfig(), &[])
            }
        }
    }

    /// Hands `next` to the agents; returns how it reaches them.
    fn publish(&mut self, next: &Cluster) -> Delivery {
        match self {
            Feed::Snapshot { path, .. } => {
                write_snapshot(path, next);
                Delivery::Whole
            }
            Feed::Api(api) => {
                assert_reads_back(next);
                Delivery::Objects(api.publish(next))
            }
        }
    }
}

/// Writes `cluster`'s objects as the snapshot, one `kind: List` in JSON (YAML reads JSON), by
/// rename so that an agent never reads half of it; it must read back as `cluster`.
fn write_snapshot(path: &Path, cluster: &Cluster) {
    let items: Vec<_> = objects::all(cluster).collect();
    let list = json!({ "apiVersion": "v1", "kind": "List", "items": items });
    let new = path.with_extension("json.new");
    fs::write(&new, serde_json::to_string_pretty(&list).unwrap()).expect("write new snapshot");
    fs::rename(&new, path).expect("rename over the snapshot");
    let loaded = agent::manifests::load(path).expect("the snapshot loads");
    assert_same(&loaded, cluster, "the snapshot");
}

/// The objects the stand-in serves for `cluster`, converted as the agent's API source
/// converts them, must read back as `cluster`.
fn assert_reads_back(cluster: &Cluster) {
    let mut read = Cluster::new();
    for object in objects::all(cluster) {
        match Resource::of(&object).expect("a served kind") {
            Resource::Namespaces => {
                read.apply_namespace(agent::convert::namespace(
                    serde_json::from_value(object).expect("a Namespace"),
                ));
            }
            Resource::Pods => {
                read.apply_pod(agent::convert::pod(
                    serde_json::from_value(object).expect("a Pod"),
                ));
            }
            Resource::NetworkPolicies => {
                read.apply_policy(agent::convert::network_policy(
                    serde_json::from_value(object).expect("a NetworkPolicy"),
                ));
            }
        }
    }
    assert_same(&read, cluster, "the API objects");
}

/// What the agents read must be the cluster the oracle judges.
fn assert_same(read: &Cluster, expected: &Cluster, what: &str) {
    let pods = |c: &Cluster| c.pods().cloned().collect::<Vec<_>>();
    let policies = |c: &Cluster| c.policies().cloned().collect::<Vec<_>>();
    let namespaces = |c: &Cluster| {
        c.namespace_names()
            .map(|n| (n.to_string(), c.namespace_labels(n).clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(pods(read), pods(expected), "pods as the agents read {what}");
    assert_eq!(
        policies(read),
        policies(expected),
        "policies as the agents read {what}"
    );
    assert_eq!(
        namespaces(read),
        namespaces(expected),
        "namespaces as the agents read {what}"
    );
}

/// One cell where the kernel did not do what the oracle says.
struct Disagreement {
    scenario: String,
    text: String,
}

/// Running totals, per test.
#[derive(Default)]
struct Totals {
    scenarios: usize,
    steps: usize,
    cells: [usize; 2],
    allowed: usize,
    disagreements: Vec<Disagreement>,
    tracer: Vec<String>,
}

struct Run {
    source: Source,
    /// Before the feed and the lab: fields drop in order, and the agents must be gone before
    /// the lab's namespaces are.
    agents: Vec<Agent>,
    feed: Feed,
    lab: Lab,
    /// The cluster the agents last took.
    current: Cluster,
    totals: Totals,
}

impl Run {
    /// Lab of the base cluster, `source` holding it and one synced agent per node on it.
    fn start(source: Source) -> Run {
        let base = State::base();
        let cluster = base.cluster();
        let lab = Lab::for_cluster(LABPOD, &cluster, &NODES, &[]).expect("lab");
        for pod in &base.pods {
            check_lab_pod(&lab, pod);
        }
        let feed = Feed::start(source, &lab, &cluster);
        let mut agents: Vec<Agent> = (0..NODES.len())
            .map(|i| feed.start_agent(&lab, i))
            .collect();
        wait_synced(&mut agents, SYNC_TIMEOUT);
        Run {
            source,
            agents,
            feed,
            lab,
            current: cluster,
            totals: Totals::default(),
        }
    }

    /// Gives the lab every pod of `state` it lacks; returns the lab indices of `state`'s pods.
    fn lab_pods(&mut self, state: &State) -> Vec<usize> {
        let mut indices = Vec::new();
        for pod in &state.pods {
            let who = format!("{}/{}", pod.namespace, pod.name);
            if !self.lab.pods().iter().any(|p| p.name == who) {
                let node = NODES
                    .iter()
                    .position(|n| pod.node.as_deref() == Some(*n))
                    .expect("a lab node");
                let IpAddr::V4(v4) = pod.ips[0] else {
                    panic!("{who}: IPv4 first")
                };
                self.lab
                    .add_pod_serving(node, &who, v4.octets()[3], &[])
                    .expect("add a lab pod");
            }
            check_lab_pod(&self.lab, pod);
            let index = self.lab.pods().iter().position(|p| p.name == who).unwrap();
            indices.push(index);
        }
        indices
    }

    /// Hands `state` to the agents and waits until both took all of it.
    fn publish(&mut self, state: &State, what: &str) -> Delivery {
        let next = state.cluster();
        assert_enforceable(&next, &NODES, what);
        let changed = rulesets_changed(&NODES, &self.current, &next);
        let before = marks(&self.agents);
        let delivery = self.feed.publish(&next);
        wait_change(
            &mut self.agents,
            &before,
            &changed,
            delivery,
            what,
            SYNC_TIMEOUT,
        );
        self.current = next;
        delivery
    }

    /// Probes every cell among `state`'s pods and holds each against the oracle.
    fn check(&mut self, scenario: &str, state: &State, pods: &[usize]) -> String {
        let started = Instant::now();
        let cells = self
            .lab
            .matrix_among(pods, &SERVICES, &Family::BOTH)
            .expect("matrix");
        let world = spec::World::new(&state.namespaces, &state.pods, &state.policies);
        let mut wrong = Vec::new();
        let mut allowed = 0;
        for cell in &cells {
            let expected = oracle_allows(&world, &self.lab, cell);
            allowed += usize::from(expected);
            self.totals.cells[usize::from(cell.target.addr.is_ipv6())] += 1;
            if expected != cell.outcome.ok {
                wrong.push(format!(
                    "{}: the oracle says {}, the probe {}",
                    describe_cell(&self.lab, cell),
                    if expected { "ALLOWED" } else { "DENIED" },
                    if cell.outcome.ok {
                        "reached".to_string()
                    } else {
                        format!("did not reach ({})", cell.outcome.detail)
                    }
                ));
            }
        }
        self.totals.allowed += allowed;
        let tracer = compare_with_trace(&self.lab, &cells, &self.current).expect("trace");
        for d in &tracer.disagreements {
            self.totals
                .tracer
                .push(format!("{scenario}: Tracer vs kernel: {d}"));
        }
        if !wrong.is_empty() {
            eprintln!(
                "\nCONFORMANCE FAILURE ({:?} source) in {scenario}: {} of {} cells disagree with the oracle:\n  {}\n{}\n",
                self.source,
                wrong.len(),
                cells.len(),
                wrong.join("\n  "),
                logs(&mut self.agents)
            );
        }
        let line = format!(
            "{} cells ({allowed} allowed), {} disagreements, {} Tracer disagreements, probed in {:.1} s",
            cells.len(),
            wrong.len(),
            tracer.disagreements.len(),
            started.elapsed().as_secs_f64()
        );
        self.totals
            .disagreements
            .extend(wrong.into_iter().map(|text| Disagreement {
                scenario: scenario.to_string(),
                text,
            }));
        line
    }

    fn run(&mut self, scenario: &Scenario) {
        self.totals.scenarios += 1;
        let mut state = State::base();
        for (k, (what, edit)) in scenario.steps.iter().enumerate() {
            edit(&mut state);
            let label = format!("{} / step {} ({what})", scenario.name, k + 1);
            let pods = self.lab_pods(&state);
            let started = Instant::now();
            let delivery = self.publish(&state, &label);
            let took = started.elapsed();
            let line = self.check(&label, &state, &pods);
            self.totals.steps += 1;
            println!(
                "  [{:?}] {label}: agents took it ({delivery:?}) in {:.2} s; {line}",
                self.source,
                took.as_secs_f64()
            );
        }
    }

    /// Prints the summary; what failed, if anything, with the agents' logs.
    fn verdict(&mut self, test: &str, started: Instant) -> Option<String> {
        let t = &self.totals;
        let source = self.source;
        println!(
            "{test}: {source:?} source, {} scenarios, {} steps, {} cells checked (IPv4 {}, IPv6 {}; {} allowed), {} disagreements, {} Tracer disagreements, done at {:.1} s",
            t.scenarios,
            t.steps,
            t.cells[0] + t.cells[1],
            t.cells[0],
            t.cells[1],
            t.allowed,
            t.disagreements.len(),
            t.tracer.len(),
            started.elapsed().as_secs_f64()
        );
        if t.disagreements.is_empty() && t.tracer.is_empty() {
            return None;
        }
        let failing: std::collections::BTreeSet<&str> = t
            .disagreements
            .iter()
            .map(|d| d.scenario.as_str())
            .collect();
        let shown: Vec<String> = t
            .disagreements
            .iter()
            .take(100)
            .map(|d| format!("{}: {}", d.scenario, d.text))
            .collect();
        let text = format!(
            "{source:?} source: {} cells disagree with the oracle; steps with disagreements: {}\n  {}\nthe cells (first 100):\n  {}\nTracer and the kernel disagree on {} cells:\n  {}",
            t.disagreements.len(),
            failing.len(),
            failing.iter().copied().collect::<Vec<_>>().join("\n  "),
            shown.join("\n  "),
            t.tracer.len(),
            t.tracer.join("\n  "),
        );
        Some(format!("{text}\n{}", logs(&mut self.agents)))
    }
}

/// The lab pod must have the model's addresses, or the oracle would judge other addresses.
fn check_lab_pod(lab: &Lab, pod: &Pod) {
    let who = format!("{}/{}", pod.namespace, pod.name);
    let lab_pod = lab
        .pods()
        .iter()
        .find(|p| p.name == who)
        .unwrap_or_else(|| panic!("no lab pod {who}"));
    let lab_ips = [IpAddr::V4(lab_pod.ipv4), IpAddr::V6(lab_pod.ipv6)];
    assert_eq!(pod.ips, lab_ips, "{who}: model and lab addresses");
    assert_eq!(
        pod.node.as_deref(),
        Some(NODES[lab_pod.node]),
        "{who}: node"
    );
}

fn oracle_allows(world: &spec::World<'_>, lab: &Lab, cell: &Cell) -> bool {
    let src = lab.pods()[cell.from].addr(Family::of(&cell.target.addr));
    let dst = cell.target.addr;
    let end = |addr: IpAddr| {
        let party = world.party_of(addr);
        assert!(
            matches!(party, spec::Party::Pod(_)),
            "{addr} is no pod of the scenario"
        );
        spec::End { party, addr }
    };
    world.allows(
        end(src),
        end(dst),
        cell.target.protocol.k8s_name(),
        cell.target.port,
    )
}

/// `x/a -> y/b TCP 80 IPv6 (fd00:10:244:1::a -> fd00:10:244:2::e)`.
fn describe_cell(lab: &Lab, cell: &Cell) -> String {
    let family = Family::of(&cell.target.addr);
    let from = &lab.pods()[cell.from];
    format!(
        "{} -> {} {} {} {} ({} -> {})",
        from.name,
        lab.pods()[cell.to].name,
        cell.target.protocol.k8s_name(),
        cell.target.port,
        if family == Family::V4 { "IPv4" } else { "IPv6" },
        from.addr(family),
        cell.target.addr
    )
}

/// Runs `scenarios` once per source, side by side, each on a lab of its own with its own
/// agents; prints the summaries and fails on any disagreement of either.
fn conformance(test: &str, scenarios: &[Scenario]) {
    if netns::skip_unless_root(test) {
        return;
    }
    let started = Instant::now();
    agent_binary(Path::new(LABPOD));
    let runs: Vec<std::thread::Result<Run>> = std::thread::scope(|s| {
        let handles: Vec<_> = [Source::Snapshot, Source::Api]
            .into_iter()
            .map(|source| {
                s.spawn(move || {
                    let mut run = Run::start(source);
                    println!(
                        "{test}: lab of {} pods on {} nodes, agents on the {source:?} source synced, at {:.1} s",
                        run.lab.pods().len(),
                        NODES.len(),
                        started.elapsed().as_secs_f64()
                    );
                    for scenario in scenarios {
                        run.run(scenario);
                    }
                    run
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut failures = Vec::new();
    for run in runs {
        let mut run = run.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        failures.extend(run.verdict(test, started));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn conformance_isolation_and_peers() {
    conformance(
        "conformance_isolation_and_peers",
        &isolation_and_peer_scenarios(),
    );
}

#[test]
fn conformance_ports_blocks_and_changes() {
    conformance(
        "conformance_ports_blocks_and_changes",
        &port_block_and_change_scenarios(),
    );
}
