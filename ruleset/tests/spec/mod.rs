//! The spec oracle: NetworkPolicy (networking.k8s.io/v1) semantics as kubernetes.io documents
//! them, on `ruleset::model` data only. It shares no code with the compiler (`selector`,
//! `policy`, `compile`), so that it can judge them: `tests/oracle.rs` checks compiled rulesets
//! against it, and `integration/tests/conformance.rs` checks real packets against it.
//!
//! Test code only, included with `mod` by those two tests; no part of the library.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ruleset::model::{
    IpBlock, LabelSelector, Labels, Namespace, NetworkPolicy, Peer, Pod, PolicyPort, PolicyRule,
    PortRef, SelectorRequirement,
};

/// The label the API server puts on every namespace.
const NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn policy_type(self) -> &'static str {
        match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        }
    }
}

/// Who stands behind one end of a connection, as NetworkPolicy sees it.
#[derive(Clone, Copy, Debug)]
pub enum Party<'a> {
    /// A pod NetworkPolicy applies to.
    Pod(&'a Pod),
    /// A hostNetwork pod: traffic of its node.
    Node(&'a str),
    /// Anything else: outside the cluster.
    Outside,
}

/// One end of a connection: who, and the address the packet carries.
#[derive(Clone, Copy, Debug)]
pub struct End<'a> {
    pub party: Party<'a>,
    pub addr: IpAddr,
}

pub struct World<'a> {
    pods: &'a [Pod],
    policies: &'a [NetworkPolicy],
    /// Labels of the Namespace objects that exist, as written.
    namespace_objects: BTreeMap<&'a str, &'a Labels>,
}

/// Whether NetworkPolicy applies to a pod at all: it has an address of its own and has
/// not terminated.
pub fn enforceable(pod: &Pod) -> bool {
    !pod.host_network
        && !pod.ips.is_empty()
        && !matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed"))
}

impl<'a> World<'a> {
    pub fn new(
        namespaces: &'a [Namespace],
        pods: &'a [Pod],
        policies: &'a [NetworkPolicy],
    ) -> Self {
        Self {
            pods,
            policies,
            namespace_objects: namespaces
                .iter()
                .map(|ns| (ns.name.as_str(), &ns.labels))
                .collect(),
        }
    }

    /// Who an address stands for when only the address is known.
    pub fn party_of(&self, addr: IpAddr) -> Party<'a> {
        match self
            .pods
            .iter()
            .find(|p| enforceable(p) && p.ips.contains(&addr))
        {
            Some(pod) => Party::Pod(pod),
            None => Party::Outside,
        }
    }

    /// Namespace labels as selectors see them: the name label is always there, even
    /// when the Namespace object is not.
    fn namespace_labels(&self, namespace: &str) -> Labels {
        let mut labels = self
            .namespace_objects
            .get(namespace)
            .map(|l| (*l).clone())
            .unwrap_or_default();
        if !labels.contains_key(NAME_LABEL) {
            labels.insert(NAME_LABEL.to_string(), namespace.to_string());
        }
        labels
    }

    /// Whether the connection's first packet is allowed.
    pub fn allows(&self, src: End<'_>, dst: End<'_>, protocol: &str, port: u16) -> bool {
        if let (Party::Pod(s), Party::Pod(d)) = (src.party, dst.party) {
            if same_pod(s, d) {
                return true;
            }
        }
        if let (Party::Node(node), Party::Pod(d)) = (src.party, dst.party) {
            if d.node.as_deref() == Some(node) {
                // A node always reaches its own pods.
                return true;
            }
        }
        let egress_ok = match src.party {
            Party::Pod(s) => self.direction_allows(
                s,
                Direction::Egress,
                dst,
                named_port_owner(dst),
                protocol,
                port,
            ),
            _ => true,
        };
        let ingress_ok = match dst.party {
            Party::Pod(d) => {
                self.direction_allows(d, Direction::Ingress, src, Some(d), protocol, port)
            }
            _ => true,
        };
        egress_ok && ingress_ok
    }

    /// The policies of `pod`'s namespace that select it and isolate it in `direction`.
    fn isolating_policies(
        &self,
        pod: &Pod,
        direction: Direction,
    ) -> impl Iterator<Item = &'a NetworkPolicy> + '_ {
        let (namespace, labels) = (pod.namespace.clone(), pod.labels.clone());
        self.policies.iter().filter(move |p| {
            p.namespace == namespace
                && has_policy_type(p, direction)
                && selector_matches(&p.pod_selector, &labels)
        })
    }

    /// One direction of one pod: not isolated allows everything; isolated allows what some
    /// rule of some isolating policy allows. `peer` is the other end; `port_owner` the pod
    /// whose container ports give named ports their numbers (the destination).
    fn direction_allows(
        &self,
        pod: &Pod,
        direction: Direction,
        peer: End<'_>,
        port_owner: Option<&Pod>,
        protocol: &str,
        port: u16,
    ) -> bool {
        let mut isolated = false;
        for policy in self.isolating_policies(pod, direction) {
            isolated = true;
            let rules = match direction {
                Direction::Ingress => &policy.ingress,
                Direction::Egress => &policy.egress,
            };
            if rules.iter().any(|rule| {
                self.rule_allows(&policy.namespace, rule, peer, port_owner, protocol, port)
            }) {
                return true;
            }
        }
        !isolated
    }

    /// A rule allows when (no peers or some peer matches) and (no ports or some port
    /// matches).
    fn rule_allows(
        &self,
        policy_namespace: &str,
        rule: &PolicyRule,
        peer: End<'_>,
        port_owner: Option<&Pod>,
        protocol: &str,
        port: u16,
    ) -> bool {
        let peer_ok = rule.peers.is_empty()
            || rule
                .peers
                .iter()
                .any(|p| self.peer_matches(policy_namespace, p, peer));
        let port_ok = rule.ports.is_empty()
            || rule
                .ports
                .iter()
                .any(|p| port_matches(p, port_owner, protocol, port));
        peer_ok && port_ok
    }

    fn peer_matches(&self, policy_namespace: &str, peer: &Peer, end: End<'_>) -> bool {
        if let Some(block) = &peer.ip_block {
            return in_ip_block(block, end.addr);
        }
        let Party::Pod(pod) = end.party else {
            // Selectors pick pods; nothing else.
            return false;
        };
        let namespace_ok = match &peer.namespace_selector {
            None => pod.namespace == policy_namespace,
            Some(selector) => selector_matches(selector, &self.namespace_labels(&pod.namespace)),
        };
        let pod_ok = peer
            .pod_selector
            .as_ref()
            .is_none_or(|selector| selector_matches(selector, &pod.labels));
        namespace_ok && pod_ok
    }
}

fn same_pod(a: &Pod, b: &Pod) -> bool {
    a.namespace == b.namespace && a.name == b.name
}

/// Egress named ports take their numbers from the destination, when it is a pod.
fn named_port_owner<'a>(dst: End<'a>) -> Option<&'a Pod> {
    match dst.party {
        Party::Pod(pod) => Some(pod),
        _ => None,
    }
}

/// policyTypes as written, or when absent: Ingress always, Egress when there are egress
/// rules.
fn has_policy_type(policy: &NetworkPolicy, direction: Direction) -> bool {
    if policy.policy_types.is_empty() {
        match direction {
            Direction::Ingress => true,
            Direction::Egress => !policy.egress.is_empty(),
        }
    } else {
        policy
            .policy_types
            .iter()
            .any(|t| t == direction.policy_type())
    }
}

/// matchLabels and matchExpressions, all ANDed; an empty selector matches everything.
pub fn selector_matches(selector: &LabelSelector, labels: &Labels) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
        && selector
            .match_expressions
            .iter()
            .all(|req| requirement_holds(req, labels))
}

fn requirement_holds(req: &SelectorRequirement, labels: &Labels) -> bool {
    let value = labels.get(&req.key);
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| req.values.contains(v)),
        "NotIn" => value.is_none_or(|v| !req.values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        other => panic!("the oracle was given an invalid operator {other:?}"),
    }
}

/// In the CIDR and in none of its exceptions.
fn in_ip_block(block: &IpBlock, addr: IpAddr) -> bool {
    in_cidr(&block.cidr, addr) && !block.except.iter().any(|e| in_cidr(e, addr))
}

fn in_cidr(cidr: &str, addr: IpAddr) -> bool {
    let (network, prefix) = cidr.split_once('/').expect("CIDR without a prefix length");
    let network: IpAddr = network.parse().expect("CIDR with a bad address");
    let prefix: u32 = prefix.parse().expect("CIDR with a bad prefix length");
    let (net_bits, addr_bits, width) = match (network, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (u128::from(u32::from(n)), u128::from(u32::from(a)), 32),
        (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
        // An address never matches a block of the other family.
        _ => return false,
    };
    // Equal in the first `prefix` bits; a shift by the whole width means no bits compared.
    (net_bits ^ addr_bits)
        .checked_shr(width - prefix)
        .unwrap_or(0)
        == 0
}

/// One entry of `ports`: protocol (TCP when absent), then no port (the whole protocol), a
/// number or range, or a name the destination pod gives a container port of that protocol.
fn port_matches(entry: &PolicyPort, port_owner: Option<&Pod>, protocol: &str, port: u16) -> bool {
    let entry_protocol = entry.protocol.as_deref().unwrap_or("TCP");
    if entry_protocol != protocol {
        return false;
    }
    let port = i32::from(port);
    match &entry.port {
        None => true,
        Some(PortRef::Number(first)) => {
            let last = entry.end_port.unwrap_or(*first);
            (*first..=last).contains(&port)
        }
        Some(PortRef::Name(name)) => port_owner
            .and_then(|pod| container_port_number(pod, name, entry_protocol))
            .is_some_and(|number| number == port),
    }
}

/// The number of the container port with this name and protocol.
fn container_port_number(pod: &Pod, name: &str, protocol: &str) -> Option<i32> {
    pod.ports
        .iter()
        .find(|p| p.name.as_deref() == Some(name) && p.protocol == protocol)
        .map(|p| p.port)
}
