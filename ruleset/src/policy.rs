//! Validation: a written NetworkPolicy becomes a [`ResolvedPolicy`] plus diagnostics.
//!
//! Whatever cannot be enforced as written fails closed: the policy still isolates the pods it
//! (at most) selects, and the broken selector, peer or port contributes no allow.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::ir::Protocol;
use crate::model::{IpBlock, NetworkPolicy, Peer, PolicyPort, PolicyRule, PortRef};
use crate::selector::Selector;

/// A problem with one field of one policy, and what the compiler did about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// `namespace/name` of the NetworkPolicy.
    pub policy: String,
    /// Path of the field, e.g. `spec.ingress[0].from[1].ipBlock.except[0]`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "networkpolicy {}: {}: {}",
            self.policy, self.field, self.reason
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedPolicy {
    pub namespace: String,
    pub name: String,
    /// Pods isolated by this policy (a superset when the written selector is broken).
    pub selector: Selector,
    /// `Some` when the policy isolates for ingress; the rules that allow.
    pub ingress: Option<Vec<ResolvedRule>>,
    pub egress: Option<Vec<ResolvedRule>>,
}

impl ResolvedPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn rules(&self, direction: Direction) -> Option<&[ResolvedRule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    fn peers_field(self) -> &'static str {
        match self {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        }
    }
}

/// One rule: it allows a connection when some peer AND some port match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRule {
    /// Index in `spec.ingress` / `spec.egress`.
    pub index: usize,
    pub peers: Peers,
    pub ports: Ports,
}

/// `Any` when the rule lists no peers; otherwise the valid peers with their indexes (possibly
/// none, when every written peer was invalid: then the rule allows nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    Any,
    Listed(Vec<(usize, PeerMatch)>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    Any,
    Listed(Vec<(usize, PortMatch)>),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerMatch {
    Pods {
        namespaces: NamespaceScope,
        pods: Selector,
    },
    /// Addresses of one family: the CIDR with its exceptions already removed, as inclusive
    /// address ranges.
    Block {
        cidr: IpNet,
        except: Vec<IpNet>,
        ranges: Vec<(IpAddr, IpAddr)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NamespaceScope {
    /// The policy's own namespace (no `namespaceSelector`).
    Same(String),
    Matching(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    /// Every port of the protocol.
    Protocol(Protocol),
    Range(Protocol, u16, u16),
    Named(Protocol, String),
}

impl PortMatch {
    pub fn protocol(&self) -> Protocol {
        match self {
            PortMatch::Protocol(p) | PortMatch::Range(p, _, _) | PortMatch::Named(p, _) => *p,
        }
    }
}

/// Validates every field of a policy; never fails, but reports what it could not enforce.
pub fn resolve(policy: &NetworkPolicy, diagnostics: &mut Vec<Diagnostic>) -> ResolvedPolicy {
    let mut report = |field: String, reason: String| {
        diagnostics.push(Diagnostic {
            policy: format!("{}/{}", policy.namespace, policy.name),
            field,
            reason,
        })
    };

    let (selector, selector_ok) = match Selector::parse(&policy.pod_selector) {
        Ok(s) => (s, true),
        Err((err, superset)) => {
            report(
                format!("spec.podSelector.{}", err.field),
                format!(
                    "{}; the policy isolates every pod it could select and allows nothing",
                    err.reason
                ),
            );
            (superset, false)
        }
    };

    let (mut ingress, mut egress) = (false, false);
    if policy.policy_types.is_empty() {
        ingress = true;
        egress = !policy.egress.is_empty();
    }
    for (i, t) in policy.policy_types.iter().enumerate() {
        match t.as_str() {
            "Ingress" => ingress = true,
            "Egress" => egress = true,
            other => {
                report(
                    format!("spec.policyTypes[{i}]"),
                    format!(
                        "unknown policy type {other:?} (expected Ingress or Egress); \
                         isolating both directions"
                    ),
                );
                ingress = true;
                egress = true;
            }
        }
    }

    let mut rules = |direction: Direction, written: &[PolicyRule]| -> Vec<ResolvedRule> {
        if !selector_ok {
            return Vec::new();
        }
        written
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let base = format!("spec.{}[{index}]", direction.as_str());
                resolve_rule(policy, direction, index, rule, &base, &mut report)
            })
            .collect()
    };
    let ingress = ingress.then(|| rules(Direction::Ingress, &policy.ingress));
    let egress = egress.then(|| rules(Direction::Egress, &policy.egress));

    ResolvedPolicy {
        namespace: policy.namespace.clone(),
        name: policy.name.clone(),
        selector,
        ingress,
        egress,
    }
}

fn resolve_rule(
    policy: &NetworkPolicy,
    direction: Direction,
    index: usize,
    rule: &PolicyRule,
    base: &str,
    report: &mut impl FnMut(String, String),
) -> ResolvedRule {
    let peers = if rule.peers.is_empty() {
        Peers::Any
    } else {
        Peers::Listed(
            rule.peers
                .iter()
                .enumerate()
                .filter_map(|(i, peer)| {
                    let field = format!("{base}.{}[{i}]", direction.peers_field());
                    match resolve_peer(&policy.namespace, peer) {
                        Ok(m) => Some((i, m)),
                        Err((sub, reason)) => {
                            report(
                                format!("{field}{sub}"),
                                format!("{reason}; this peer allows nothing"),
                            );
                            None
                        }
                    }
                })
                .collect(),
        )
    };
    let ports = if rule.ports.is_empty() {
        Ports::Any
    } else {
        Ports::Listed(
            rule.ports
                .iter()
                .enumerate()
                .filter_map(|(i, port)| match resolve_port(port) {
                    Ok(m) => Some((i, m)),
                    Err((sub, reason)) => {
                        report(
                            format!("{base}.ports[{i}].{sub}"),
                            format!("{reason}; this port allows nothing"),
                        );
                        None
                    }
                })
                .collect(),
        )
    };
    ResolvedRule {
        index,
        peers,
        ports,
    }
}

/// On error: the sub-field path (starting with `.` or empty) and the reason.
fn resolve_peer(namespace: &str, peer: &Peer) -> Result<PeerMatch, (String, String)> {
    match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err((
            String::new(),
            "ipBlock cannot be combined with podSelector or namespaceSelector".into(),
        )),
        (Some(block), None, None) => resolve_ip_block(block),
        (None, None, None) => Err((
            String::new(),
            "a peer must set podSelector, namespaceSelector or ipBlock".into(),
        )),
        (None, pods, namespaces) => {
            let parse = |field: &str, s: &crate::model::LabelSelector| {
                Selector::parse(s)
                    .map_err(|(err, _)| (format!(".{field}.{}", err.field), err.reason))
            };
            let pods = match pods {
                Some(s) => parse("podSelector", s)?,
                None => Selector::everything(),
            };
            let namespaces = match namespaces {
                Some(s) => NamespaceScope::Matching(parse("namespaceSelector", s)?),
                None => NamespaceScope::Same(namespace.to_string()),
            };
            Ok(PeerMatch::Pods { namespaces, pods })
        }
    }
}

fn resolve_ip_block(block: &IpBlock) -> Result<PeerMatch, (String, String)> {
    let cidr: IpNet = block.cidr.trim().parse().map_err(|_| {
        (
            ".ipBlock.cidr".to_string(),
            format!("{:?} is not a CIDR", block.cidr),
        )
    })?;
    let cidr = cidr.trunc();
    let mut ranges = vec![net_range(&cidr)];
    let mut excepts = Vec::new();
    for (i, text) in block.except.iter().enumerate() {
        let field = format!(".ipBlock.except[{i}]");
        let except: IpNet = text
            .trim()
            .parse()
            .map_err(|_| (field.clone(), format!("{text:?} is not a CIDR")))?;
        let except = except.trunc();
        if !(cidr.contains(&except) && except.prefix_len() > cidr.prefix_len()) {
            return Err((
                field,
                format!("{except} is not a strict subset of cidr {cidr}"),
            ));
        }
        excepts.push(except);
        let (lo, hi) = net_range(&except);
        ranges = ranges
            .into_iter()
            .flat_map(|(a, b)| {
                if hi < a || lo > b {
                    return vec![(a, b)];
                }
                // Overlapping: keep what lies below and above the exception.
                let below = (lo > a).then(|| (a, lo - 1));
                let above = (hi < b).then(|| (hi + 1, b));
                below.into_iter().chain(above).collect()
            })
            .collect();
    }
    let v4 = matches!(cidr, IpNet::V4(_));
    let ranges = ranges
        .into_iter()
        .map(|(a, b)| (int_addr(a, v4), int_addr(b, v4)))
        .collect();
    Ok(PeerMatch::Block {
        cidr,
        except: excepts,
        ranges,
    })
}

/// First and last address of a network as integers.
pub(crate) fn net_range(net: &IpNet) -> (u128, u128) {
    (addr_int(net.network()), addr_int(net.broadcast()))
}

fn addr_int(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub(crate) fn int_addr(n: u128, v4: bool) -> IpAddr {
    match u32::try_from(n) {
        Ok(n) if v4 => IpAddr::V4(n.into()),
        _ => IpAddr::V6(n.into()),
    }
}

/// On error: the sub-field name and the reason.
fn resolve_port(port: &PolicyPort) -> Result<PortMatch, (String, String)> {
    let protocol = match port.protocol.as_deref() {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            return Err((
                "protocol".into(),
                format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)"),
            ))
        }
    };
    let number = |n: i32, field: &str| {
        u16::try_from(n)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| (field.to_string(), format!("{n} is not a port (1-65535)")))
    };
    match (&port.port, port.end_port) {
        (None, None) => Ok(PortMatch::Protocol(protocol)),
        (None, Some(_)) => Err(("endPort".into(), "endPort requires port".into())),
        (Some(PortRef::Number(n)), end) => {
            let start = number(*n, "port")?;
            let end = match end {
                None => start,
                Some(e) => {
                    let end = number(e, "endPort")?;
                    if end < start {
                        return Err((
                            "endPort".into(),
                            format!("endPort {end} is below port {start}"),
                        ));
                    }
                    end
                }
            };
            Ok(PortMatch::Range(protocol, start, end))
        }
        (Some(PortRef::Name(_)), Some(_)) => Err((
            "endPort".into(),
            "endPort cannot be used with a named port".into(),
        )),
        (Some(PortRef::Name(name)), None) => {
            if is_port_name(name) {
                Ok(PortMatch::Named(protocol, name.clone()))
            } else {
                Err((
                    "port".into(),
                    format!("{name:?} is neither a port number nor a valid port name"),
                ))
            }
        }
    }
}

/// An IANA service name, as Kubernetes validates container port names.
fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LabelSelector;

    fn policy_with_ingress(rule: PolicyRule) -> NetworkPolicy {
        NetworkPolicy {
            namespace: "ns".into(),
            name: "p".into(),
            ingress: vec![rule],
            ..NetworkPolicy::default()
        }
    }

    fn block(cidr: &str, except: &[&str]) -> Result<PeerMatch, (String, String)> {
        resolve_ip_block(&IpBlock {
            cidr: cidr.into(),
            except: except.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn nets(m: PeerMatch) -> Vec<String> {
        match m {
            PeerMatch::Block { ranges, .. } => {
                ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect()
            }
            other => panic!("not a block: {other:?}"),
        }
    }

    #[test]
    fn except_is_subtracted() {
        assert_eq!(
            nets(block("10.0.0.0/24", &["10.0.0.128/25"]).unwrap()),
            ["10.0.0.0-10.0.0.127"]
        );
        assert_eq!(
            nets(block("10.0.0.0/24", &["10.0.0.64/26", "10.0.0.0/28"]).unwrap()),
            ["10.0.0.16-10.0.0.63", "10.0.0.128-10.0.0.255"]
        );
        assert_eq!(
            nets(block("fd00::/64", &["fd00::/65"]).unwrap()),
            ["fd00::8000:0:0:0-fd00::ffff:ffff:ffff:ffff"]
        );
        assert_eq!(
            nets(block("0.0.0.0/0", &[]).unwrap()),
            ["0.0.0.0-255.255.255.255"]
        );
    }

    #[test]
    fn bad_blocks_name_the_field() {
        assert_eq!(block("10.0.0.0/33", &[]).unwrap_err().0, ".ipBlock.cidr");
        assert_eq!(
            block("10.0.0.0/24", &["10.1.0.0/25"]).unwrap_err().0,
            ".ipBlock.except[0]"
        );
        assert_eq!(
            block("10.0.0.0/24", &["10.0.0.0/24"]).unwrap_err().0,
            ".ipBlock.except[0]"
        );
        assert_eq!(
            block("10.0.0.0/24", &["fd00::/64"]).unwrap_err().0,
            ".ipBlock.except[0]"
        );
    }

    #[test]
    fn policy_types_default_as_the_api_server_does() {
        let mut diags = Vec::new();
        let mut p = policy_with_ingress(PolicyRule::default());
        let r = resolve(&p, &mut diags);
        assert!(r.ingress.is_some() && r.egress.is_none());
        p.egress = vec![PolicyRule::default()];
        let r = resolve(&p, &mut diags);
        assert!(r.ingress.is_some() && r.egress.is_some());
        p.policy_types = vec!["Egress".into()];
        let r = resolve(&p, &mut diags);
        assert!(r.ingress.is_none() && r.egress.is_some());
        assert!(diags.is_empty());
    }

    #[test]
    fn unknown_policy_type_isolates_both_ways() {
        let mut diags = Vec::new();
        let p = NetworkPolicy {
            policy_types: vec!["Ingres".into()],
            ..policy_with_ingress(PolicyRule::default())
        };
        let r = resolve(&p, &mut diags);
        assert!(r.ingress.is_some() && r.egress.is_some());
        assert_eq!(diags[0].field, "spec.policyTypes[0]");
    }

    #[test]
    fn ports_are_validated() {
        let port = |protocol: Option<&str>, port: Option<PortRef>, end_port: Option<i32>| {
            resolve_port(&PolicyPort {
                protocol: protocol.map(String::from),
                port,
                end_port,
            })
        };
        assert_eq!(
            port(None, Some(PortRef::Number(80)), None),
            Ok(PortMatch::Range(Protocol::Tcp, 80, 80))
        );
        assert_eq!(
            port(Some("UDP"), Some(PortRef::Number(80)), Some(90)),
            Ok(PortMatch::Range(Protocol::Udp, 80, 90))
        );
        assert_eq!(
            port(Some("SCTP"), None, None),
            Ok(PortMatch::Protocol(Protocol::Sctp))
        );
        assert_eq!(
            port(None, Some(PortRef::Name("http".into())), None),
            Ok(PortMatch::Named(Protocol::Tcp, "http".into()))
        );
        let field = |r: Result<PortMatch, (String, String)>| r.unwrap_err().0;
        assert_eq!(field(port(Some("ICMP"), None, None)), "protocol");
        assert_eq!(field(port(Some("tcp"), None, None)), "protocol");
        assert_eq!(
            field(port(None, Some(PortRef::Number(90)), Some(80))),
            "endPort"
        );
        assert_eq!(
            field(port(None, Some(PortRef::Name("http".into())), Some(80))),
            "endPort"
        );
        assert_eq!(field(port(None, None, Some(80))), "endPort");
        assert_eq!(field(port(None, Some(PortRef::Number(0)), None)), "port");
        assert_eq!(
            field(port(None, Some(PortRef::Number(70000)), None)),
            "port"
        );
        assert_eq!(
            field(port(None, Some(PortRef::Name("Not_A_Name".into())), None)),
            "port"
        );
    }

    #[test]
    fn broken_peer_is_dropped_with_a_diagnostic_naming_it() {
        let rule = PolicyRule {
            peers: vec![
                Peer {
                    ip_block: Some(IpBlock {
                        cidr: "nonsense".into(),
                        except: vec![],
                    }),
                    ..Peer::default()
                },
                Peer {
                    pod_selector: Some(LabelSelector::default()),
                    ..Peer::default()
                },
            ],
            ports: vec![],
        };
        let mut diags = Vec::new();
        let r = resolve(&policy_with_ingress(rule), &mut diags);
        let rules = r.ingress.unwrap();
        match &rules[0].peers {
            Peers::Listed(peers) => assert_eq!(peers.len(), 1),
            Peers::Any => panic!("a broken peer must not widen to any"),
        }
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].field, "spec.ingress[0].from[0].ipBlock.cidr");
        assert_eq!(diags[0].policy, "ns/p");
    }
}
