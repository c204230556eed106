//! Why is this connection allowed or denied? Compiles the rulesets of the nodes the connection
//! touches and evaluates them; the answer comes from the IR, never from a second reading of the
//! policies.
//!
//! The packet is evaluated as the first of a new connection: the established-connection fast
//! path (see [`crate::epoch`]) never applies, so the answer is what the policies say now, which
//! is also what an established connection gets at its next packet after any change.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use crate::cluster::Cluster;
use crate::compile::Compiler;
use crate::eval::{evaluate, CtState, Decision, Evaluation, Packet, L4};
use crate::ir::{Family, Hook, Protocol, Rule, Table, Verdict};
use crate::model::Pod;
use crate::render::rule_text;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Pod { namespace: String, name: String },
    Address(IpAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    /// `namespace/pod` or an IP address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse() {
            return Ok(Endpoint::Address(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Endpoint::Pod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!("{s:?} is neither NAMESPACE/POD nor an IP address")),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("pod {0} is not in the snapshot")]
    UnknownPod(String),
    #[error("pod {0} has no address (not started yet?)")]
    NoAddress(String),
    #[error("{from} and {to} have no address family in common")]
    NoCommonFamily { from: String, to: String },
}

/// One end of the connection as the trace resolved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Party {
    /// A pod NetworkPolicy applies to.
    Pod { pod: String, node: Option<String> },
    /// A hostNetwork pod: it is its node, not a pod, to NetworkPolicy.
    HostNetwork { pod: String, node: Option<String> },
    /// An address that is no pod: outside the cluster.
    Outside,
}

/// What one direction (egress of the source, ingress of the destination) decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint is no pod, so no policy of this side applies.
    NotAPod,
    /// Traffic from a pod's own node is always allowed.
    FromOwnNode,
    NotIsolated,
    /// Allowed before any policy chain: replies, neighbour discovery, a pod to itself.
    AllowedByBase {
        rule: Rule,
    },
    Allowed {
        chain: String,
        isolation: String,
        rule: Rule,
    },
    Denied {
        chain: String,
        isolation: String,
        rule: Rule,
    },
    /// The other direction dropped the packet first on the same node.
    NotReached,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub allowed: bool,
    pub protocol: Protocol,
    pub port: u16,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub from: Party,
    pub to: Party,
    pub egress: Outcome,
    pub ingress: Outcome,
}

/// Compiles node rulesets on demand and traces connections through them.
pub struct Tracer {
    cluster: Cluster,
    tables: HashMap<String, Table>,
}

impl Tracer {
    pub fn new(cluster: Cluster) -> Self {
        Self {
            cluster,
            tables: HashMap::new(),
        }
    }

    fn table(&mut self, node: &str) -> &Table {
        let cluster = &self.cluster;
        self.tables
            .entry(node.to_string())
            .or_insert_with(|| Compiler::new(cluster.clone(), node).table().clone())
    }

    pub fn trace(
        &mut self,
        from: &Endpoint,
        to: &Endpoint,
        protocol: Protocol,
        port: u16,
    ) -> Result<Trace, TraceError> {
        let (from_party, from_ips) = self.resolve(from)?;
        let (to_party, to_ips) = self.resolve(to)?;
        let (src, dst) = Family::BOTH
            .iter()
            .find_map(|f| {
                let s = from_ips.iter().find(|ip| Family::of(ip) == *f)?;
                let d = to_ips.iter().find(|ip| Family::of(ip) == *f)?;
                Some((*s, *d))
            })
            .ok_or_else(|| TraceError::NoCommonFamily {
                from: describe(from),
                to: describe(to),
            })?;
        let packet = Packet {
            src,
            dst,
            l4: L4::Transport {
                protocol,
                dport: port,
            },
            ct: CtState::New,
        };

        let src_node = match &from_party {
            Party::Pod { node, .. } => node.clone(),
            _ => None,
        };
        let dst_node = match &to_party {
            Party::Pod { node, .. } => node.clone(),
            _ => None,
        };
        let from_own_node = matches!(
            (&from_party, &dst_node),
            (Party::HostNetwork { node: Some(a), .. }, Some(b)) if a == b
        );

        let mut evaluate_on = |node: &Option<String>| {
            node.as_ref()
                .map(|n| evaluate(self.table(n), Hook::Forward, &packet))
        };
        let src_eval = evaluate_on(&src_node);
        let dst_eval = if from_own_node || src_node == dst_node {
            None
        } else {
            evaluate_on(&dst_node)
        };

        let src_table = src_node.as_ref().and_then(|n| self.tables.get(n));
        let dst_table = dst_node.as_ref().and_then(|n| self.tables.get(n));
        let egress = match (&src_eval, src_table) {
            (Some(ev), Some(table)) => side(ev, table, "egress", Verdict::Return),
            _ => Outcome::NotAPod,
        };
        let ingress = if from_own_node {
            Outcome::FromOwnNode
        } else {
            match (dst_table, &dst_eval, &src_eval) {
                (None, _, _) => Outcome::NotAPod,
                (Some(table), Some(ev), _) | (Some(table), None, Some(ev)) => {
                    let outcome = side(ev, table, "ingress", Verdict::Return);
                    let egress_dropped = matches!(egress, Outcome::Denied { .. });
                    if dst_eval.is_none() && egress_dropped && outcome == Outcome::NotIsolated {
                        Outcome::NotReached
                    } else {
                        outcome
                    }
                }
                (Some(_), None, None) => Outcome::NotIsolated,
            }
        };
        let allowed = [&src_eval, &dst_eval]
            .into_iter()
            .flatten()
            .all(|ev| ev.decision == Decision::Accept);
        Ok(Trace {
            allowed,
            protocol,
            port,
            src,
            dst,
            from: from_party,
            to: to_party,
            egress,
            ingress,
        })
    }

    fn resolve(&self, endpoint: &Endpoint) -> Result<(Party, Vec<IpAddr>), TraceError> {
        let pod = match endpoint {
            Endpoint::Pod { namespace, name } => self
                .cluster
                .pod(namespace, name)
                .ok_or_else(|| TraceError::UnknownPod(describe(endpoint)))?,
            Endpoint::Address(ip) => {
                let host_network = || {
                    self.cluster
                        .pods()
                        .find(|p| p.host_network && p.ips.contains(ip))
                };
                match self.cluster.pods_with_ip(*ip).next().or_else(host_network) {
                    Some(pod) => pod,
                    None => return Ok((Party::Outside, vec![*ip])),
                }
            }
        };
        let key = format!("{}/{}", pod.namespace, pod.name);
        let ips = match endpoint {
            Endpoint::Address(ip) => vec![*ip],
            Endpoint::Pod { .. } => pod.ips.clone(),
        };
        if pod.host_network && !ips.is_empty() {
            return Ok((
                Party::HostNetwork {
                    pod: key,
                    node: pod.node.clone(),
                },
                ips,
            ));
        }
        if !Pod::is_enforceable(pod) {
            return Err(TraceError::NoAddress(key));
        }
        Ok((
            Party::Pod {
                pod: key,
                node: pod.node.clone(),
            },
            ips,
        ))
    }
}

/// What `ev` says about one direction: the chain its dispatch map chose and the rule that
/// decided there, or the base rule that decided before any dispatch.
fn side(ev: &Evaluation, table: &Table, direction: &str, allow: Verdict) -> Outcome {
    if let Some(chain) = ev.map_hit(direction) {
        let isolation = table
            .chains
            .get(chain)
            .map(|c| c.comment.clone())
            .unwrap_or_default();
        return match ev.last_rule_in(chain) {
            Some(rule) if rule.verdict == allow => Outcome::Allowed {
                chain: chain.to_string(),
                isolation,
                rule: rule.clone(),
            },
            Some(rule) => Outcome::Denied {
                chain: chain.to_string(),
                isolation,
                rule: rule.clone(),
            },
            None => Outcome::NotIsolated,
        };
    }
    match ev.steps.last() {
        Some(crate::eval::Step::Rule { chain, rule })
            if rule.verdict == Verdict::Accept
                && table.chains.get(chain).is_some_and(|c| c.base.is_some()) =>
        {
            Outcome::AllowedByBase { rule: rule.clone() }
        }
        _ => Outcome::NotIsolated,
    }
}

fn describe(endpoint: &Endpoint) -> String {
    match endpoint {
        Endpoint::Pod { namespace, name } => format!("{namespace}/{name}"),
        Endpoint::Address(ip) => ip.to_string(),
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", if self.allowed { "ALLOWED" } else { "DENIED" })?;
        writeln!(
            f,
            "connection: {} {} -> {} port {}",
            self.protocol.k8s_name(),
            self.src,
            self.dst,
            self.port
        )?;
        writeln!(
            f,
            "egress  of {}: {}",
            party(&self.from),
            outcome(&self.egress)
        )?;
        write!(
            f,
            "ingress of {}: {}",
            party(&self.to),
            outcome(&self.ingress)
        )
    }
}

fn party(p: &Party) -> String {
    let node = |n: &Option<String>| n.as_deref().unwrap_or("no node").to_string();
    match p {
        Party::Pod { pod, node: n } => format!("pod {pod} (node {})", node(n)),
        Party::HostNetwork { pod, node: n } => {
            format!("hostNetwork pod {pod} (node {})", node(n))
        }
        Party::Outside => "an address outside the cluster".into(),
    }
}

fn outcome(o: &Outcome) -> String {
    let origin = |r: &Rule| r.comment.clone().unwrap_or_default();
    match o {
        Outcome::NotAPod => "not a pod, no policy applies".into(),
        Outcome::FromOwnNode => "from the pod's own node, always allowed".into(),
        Outcome::NotIsolated => "not isolated, no policy selects it in this direction".into(),
        Outcome::NotReached => "not reached, the egress side dropped the packet".into(),
        Outcome::AllowedByBase { rule } => {
            format!("allowed by {}\n    rule: {}", origin(rule), rule_text(rule))
        }
        Outcome::Allowed {
            chain,
            isolation,
            rule,
        } => format!(
            "{isolation} (chain {chain}); allowed by {}\n    rule: {}",
            origin(rule),
            rule_text(rule)
        ),
        Outcome::Denied {
            chain,
            isolation,
            rule,
        } => format!(
            "{isolation} (chain {chain}); no rule allows it\n    rule: {}",
            rule_text(rule)
        ),
    }
}
