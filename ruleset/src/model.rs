//! The cluster as the compiler sees it: plain data, close to the Kubernetes API shapes, with
//! only the fields NetworkPolicy semantics need. Values are kept as written (strings for
//! protocols, CIDRs and operators) so that the compiler, not the caller, decides what is valid
//! and can name the offending field.

use std::collections::BTreeMap;
use std::net::IpAddr;

pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries (the API server sets it since Kubernetes 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    pub labels: Labels,
    /// `status.podIPs` (or `status.podIP` when the list is absent).
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// `status.phase` as written (`Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`).
    pub phase: Option<String>,
    /// Container ports of all containers, for named-port resolution.
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    /// Whether NetworkPolicy applies to this pod at all, as a target or as a peer: it has an
    /// address of its own and has not terminated.
    pub fn is_enforceable(&self) -> bool {
        !self.host_network
            && !self.ips.is_empty()
            && !matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// Resolves a named port as NetworkPolicy does: the container port with that name and
    /// protocol.
    pub fn named_port(&self, name: &str, protocol: &str) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name) && p.protocol == protocol)
            .and_then(|p| u16::try_from(p.port).ok())
            .filter(|&port| port != 0)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ContainerPort {
    pub name: Option<String>,
    /// `TCP` (the API default), `UDP` or `SCTP`.
    pub protocol: String,
    pub port: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid` when the API server gave one. No effect on enforcement: it names the
    /// object in the Events the agent records about it (`kubectl describe` matches on it).
    pub uid: Option<String>,
    pub pod_selector: LabelSelector,
    /// As written; empty means "absent" and is defaulted as the API server does.
    pub policy_types: Vec<String>,
    pub ingress: Vec<PolicyRule>,
    pub egress: Vec<PolicyRule>,
}

/// One entry of `spec.ingress` (peers are its `from`) or `spec.egress` (peers are its `to`).
/// An empty peer list means every address; an empty port list means every port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyRule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PolicyPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    pub pod_selector: Option<LabelSelector>,
    pub namespace_selector: Option<LabelSelector>,
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpBlock {
    pub cidr: String,
    pub except: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyPort {
    /// `None` means TCP.
    pub protocol: Option<String>,
    pub port: Option<PortRef>,
    pub end_port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortRef {
    Number(i32),
    Name(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: String,
    pub values: Vec<String>,
}
