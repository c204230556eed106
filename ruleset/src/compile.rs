//! From cluster state to the [`Table`] one node enforces, and from one pod change to a [`Delta`].
//!
//! A full compile and an incremental pod update run the same code: every local pod address is
//! dispatched by [`Compiler::refresh_local_ip`], and every peer set learns an address's
//! membership through [`Compiler::refresh_membership`]. A full compile is those steps for every
//! address; a pod change is those steps for the pod's old and new addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hasher;
use std::net::IpAddr;

use fnv::FnvHasher;
use ipnet::IpNet;

use crate::cluster::Cluster;
use crate::diff::{diff, Delta};
use crate::epoch::{self, Epoch};
use crate::ir::{
    AddrField, BaseChain, Chain, Element, Family, Hook, Map, MapEntry, Match, Protocol, Rule, Set,
    SetKey, Table, Verdict, IPPROTO_IPIP, ND_TYPES, TABLE_NAME, VXLAN_PORTS,
};
use crate::model::{Namespace, NetworkPolicy, Pod};
use crate::policy::{
    resolve, Diagnostic, Direction, NamespaceScope, PeerMatch, Peers, PortMatch, Ports,
    ResolvedPolicy,
};

/// Longest comment `nft` accepts.
const COMMENT_MAX: usize = 128;

/// What an operator chooses per node beyond upstream NetworkPolicy; the default adds nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// The node's pod CIDRs. With any, forwarded traffic to or from an address in them that no
    /// known local pod holds is dropped, and such an address's traffic to the node (but for
    /// replies, related packets and neighbour discovery; the node's own, on `lo`, passes), so a
    /// new pod is unreachable (and cannot send from its address) until its rules are in place.
    /// Off (empty) by default, as upstream NetworkPolicy leaves pods that no policy selects
    /// open.
    pub isolate_unprogrammed: Vec<IpNet>,
    /// The ruleset epoch stamped on allowed connections and, with its fast path on, trusted
    /// for their later packets (see [`crate::epoch`]). Default: epoch 1 in the top byte.
    pub epoch: Epoch,
}

/// The compiled ruleset of one node, kept up to date as the cluster changes.
#[derive(Clone, Debug)]
pub struct Compiler {
    node: String,
    options: Options,
    cluster: Cluster,
    /// Valid parts of every policy, by namespace, in name order.
    policies: BTreeMap<String, Vec<ResolvedPolicy>>,
    diagnostics: Vec<Diagnostic>,
    table: Table,
    /// What each set of peer addresses stands for, so a pod change can update it.
    set_defs: BTreeMap<String, SetDef>,
    /// Sets each pod chain refers to; a set lives while some chain refers to it.
    chain_sets: BTreeMap<String, BTreeSet<String>>,
    /// The (namespace, name) of each local pod ([`Compiler::local_pods`]), kept with each pod
    /// change: finding them among 150,000 pods takes ~3 ms, which several steps of every sync
    /// would pay.
    local: BTreeSet<(String, String)>,
}

/// What a peer set holds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SetDef {
    /// Addresses of the pods a pod peer selects.
    Pods { family: Family, peer: PeerMatch },
    /// The ranges of an ipBlock peer (fixed).
    Block { family: Family, peer: PeerMatch },
    /// `address . protocol . port` of every pod the peer (or, with `None`, any peer) covers
    /// whose containers name the port: egress named ports resolve per destination pod.
    NamedPort {
        family: Family,
        peer: Option<PeerMatch>,
        protocol: Protocol,
        name: String,
    },
}

impl SetDef {
    fn family(&self) -> Family {
        match self {
            SetDef::Pods { family, .. }
            | SetDef::Block { family, .. }
            | SetDef::NamedPort { family, .. } => *family,
        }
    }
}

impl Compiler {
    /// Compiles the ruleset of `node` from scratch.
    pub fn new(cluster: Cluster, node: &str) -> Self {
        Self::with_options(cluster, node, Options::default())
    }

    /// Compiles the ruleset of `node` from scratch, with `options`.
    pub fn with_options(cluster: Cluster, node: &str, options: Options) -> Self {
        let mut diagnostics = Vec::new();
        let mut policies: BTreeMap<String, Vec<ResolvedPolicy>> = BTreeMap::new();
        for policy in cluster.policies() {
            policies
                .entry(policy.namespace.clone())
                .or_default()
                .push(resolve(policy, &mut diagnostics));
        }
        let local = cluster
            .pods()
            .filter(|p| is_local(node, p))
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .collect();
        let mut compiler = Self {
            node: node.to_string(),
            table: base_table(node, &options),
            options,
            cluster,
            policies,
            diagnostics,
            set_defs: BTreeMap::new(),
            chain_sets: BTreeMap::new(),
            local,
        };
        let local_ips: BTreeSet<IpAddr> = compiler
            .local_pods()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        let mut ignored = Delta::default();
        for ip in local_ips {
            compiler.refresh_local_ip(ip, &mut ignored);
        }
        compiler
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The cluster and the table, for a caller that changes many objects and recompiles once.
    pub fn into_parts(self) -> (Cluster, Table) {
        (self.cluster, self.table)
    }

    /// Whether a policy isolates the local pod at `ip` for egress: its egress goes to a chain.
    pub fn isolates_egress(&self, ip: IpAddr) -> bool {
        self.table
            .maps
            .get(&dispatch_map(Direction::Egress, Family::of(&ip)))
            .is_some_and(|map| map.elements.contains_key(&ip))
    }

    /// The pods this node enforces policy for.
    pub fn local_pods(&self) -> impl Iterator<Item = &Pod> {
        self.local
            .iter()
            .filter_map(|(namespace, name)| self.cluster.pod(namespace, name))
    }

    /// What could not be enforced as written, for every policy in the cluster.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }

    /// The resolved policies of a namespace, in name order.
    pub fn policies_in(&self, namespace: &str) -> &[ResolvedPolicy] {
        self.policies.get(namespace).map_or(&[], Vec::as_slice)
    }

    /// Adds or replaces a pod; returns what changed in the table.
    pub fn apply_pod(&mut self, pod: Pod) -> Delta {
        match self.cluster.apply_pod(pod.clone()) {
            None => Delta::default(),
            Some(old) => {
                let key = (pod.namespace.clone(), pod.name.clone());
                if self.is_local(&pod) {
                    self.local.insert(key);
                } else {
                    self.local.remove(&key);
                }
                self.pod_changed(old.as_ref(), Some(&pod))
            }
        }
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Delta {
        match self.cluster.delete_pod(namespace, name) {
            None => Delta::default(),
            Some(old) => {
                self.local
                    .remove(&(old.namespace.clone(), old.name.clone()));
                self.pod_changed(Some(&old), None)
            }
        }
    }

    /// Namespace and policy changes recompile the node and diff against the old table.
    pub fn apply_namespace(&mut self, ns: Namespace) -> Delta {
        if self.cluster.apply_namespace(ns) {
            self.rebuild()
        } else {
            Delta::default()
        }
    }

    pub fn delete_namespace(&mut self, name: &str) -> Delta {
        if self.cluster.delete_namespace(name) {
            self.rebuild()
        } else {
            Delta::default()
        }
    }

    pub fn apply_policy(&mut self, policy: NetworkPolicy) -> Delta {
        if self.cluster.apply_policy(policy) {
            self.rebuild()
        } else {
            Delta::default()
        }
    }

    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> Delta {
        if self.cluster.delete_policy(namespace, name) {
            self.rebuild()
        } else {
            Delta::default()
        }
    }

    fn rebuild(&mut self) -> Delta {
        let cluster = std::mem::take(&mut self.cluster);
        let fresh = Self::with_options(cluster, &self.node, self.options.clone());
        let delta = diff(&self.table, &fresh.table);
        *self = fresh;
        delta
    }

    fn is_local(&self, pod: &Pod) -> bool {
        is_local(&self.node, pod)
    }

    fn pod_changed(&mut self, old: Option<&Pod>, new: Option<&Pod>) -> Delta {
        let mut delta = Delta::default();
        let ips: BTreeSet<IpAddr> = old
            .into_iter()
            .chain(new)
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        let on_node = |p: &Pod| p.node.as_deref() == Some(self.node.as_str());
        if old.is_some_and(on_node) || new.is_some_and(on_node) {
            for ip in &ips {
                self.refresh_local_ip(*ip, &mut delta);
            }
            self.collect_garbage(&mut delta);
        }
        for ip in ips {
            self.refresh_membership(ip, &mut delta);
        }
        delta
    }

    /// Points the dispatch maps and the self set at whichever local pod owns `ip` now.
    fn refresh_local_ip(&mut self, ip: IpAddr, delta: &mut Delta) {
        let family = Family::of(&ip);
        let owner = self
            .cluster
            .pods_with_ip(ip)
            .find(|p| self.is_local(p))
            .cloned();
        for direction in [Direction::Ingress, Direction::Egress] {
            let want = owner.as_ref().and_then(|pod| {
                let chain = self.ensure_chain(direction, pod, delta)?;
                Some(MapEntry {
                    chain,
                    comment: comment(format!("{}/{}", pod.namespace, pod.name)),
                })
            });
            let map_name = dispatch_map(direction, family);
            let Some(map) = self.table.maps.get_mut(&map_name) else {
                continue;
            };
            let have = map.elements.get(&ip);
            if have == want.as_ref() {
                continue;
            }
            if have.is_some() {
                map.elements.remove(&ip);
                delta.remove_map_entry(&map_name, ip);
            }
            if let Some(entry) = want {
                map.elements.insert(ip, entry.clone());
                delta.add_map_entry(&map_name, ip, entry);
            }
        }
        self.set_member(
            &self_set(family),
            Element::AddrPair(ip, ip),
            owner.is_some(),
            delta,
        );
        self.set_member(
            &known_set(family),
            Element::Addr(ip),
            owner.is_some(),
            delta,
        );
    }

    /// The chain holding the rules for `pod` in one direction, built on first use; `None` when
    /// no policy isolates the pod in that direction.
    fn ensure_chain(
        &mut self,
        direction: Direction,
        pod: &Pod,
        delta: &mut Delta,
    ) -> Option<String> {
        let selecting: Vec<&ResolvedPolicy> = self
            .policies_in(&pod.namespace)
            .iter()
            .filter(|p| p.rules(direction).is_some() && p.selector.matches(&pod.labels))
            .collect();
        if selecting.is_empty() {
            return None;
        }
        let name = chain_name(direction, pod, &selecting);
        if self.table.chains.contains_key(&name) {
            return Some(name);
        }
        let (chain, defs) = build_chain(&name, direction, pod, &selecting);
        let set_names: BTreeSet<String> = defs.iter().map(|(n, _)| n.clone()).collect();
        for (set_name, def) in defs {
            if !self.set_defs.contains_key(&set_name) {
                let set = self.make_set(&set_name, &def);
                delta.add_sets.push(set.clone());
                self.table.sets.insert(set_name.clone(), set);
                self.set_defs.insert(set_name, def);
            }
        }
        self.chain_sets.insert(name.clone(), set_names);
        delta.add_chains.push(chain.clone());
        self.table.chains.insert(name.clone(), chain);
        Some(name)
    }

    /// Drops pod chains no map refers to any more, then sets no chain refers to.
    fn collect_garbage(&mut self, delta: &mut Delta) {
        let used: BTreeSet<&String> = self
            .table
            .maps
            .values()
            .flat_map(|m| m.elements.values().map(|e| &e.chain))
            .collect();
        let unused: Vec<String> = self
            .chain_sets
            .keys()
            .filter(|c| !used.contains(c))
            .cloned()
            .collect();
        for chain in unused {
            self.chain_sets.remove(&chain);
            self.table.chains.remove(&chain);
            delta.delete_chains.push(chain);
        }
        let used: BTreeSet<&String> = self.chain_sets.values().flatten().collect();
        let unused: Vec<String> = self
            .set_defs
            .keys()
            .filter(|s| !used.contains(s))
            .cloned()
            .collect();
        for set in unused {
            self.set_defs.remove(&set);
            self.table.sets.remove(&set);
            delta.delete_sets.push(set);
        }
    }

    /// Brings every peer set up to date for one address.
    fn refresh_membership(&mut self, ip: IpAddr, delta: &mut Delta) {
        let family = Family::of(&ip);
        let owners: Vec<&Pod> = self.cluster.pods_with_ip(ip).collect();
        let mut changes: Vec<(String, BTreeSet<Element>, BTreeSet<Element>)> = Vec::new();
        for (name, def) in &self.set_defs {
            if def.family() != family {
                continue;
            }
            let want: BTreeSet<Element> = owners
                .iter()
                .flat_map(|pod| elements_for(&self.cluster, def, pod, ip))
                .collect();
            let Some(set) = self.table.sets.get(name) else {
                continue;
            };
            let have: BTreeSet<Element> = match def {
                SetDef::Block { .. } => continue,
                SetDef::Pods { .. } => set
                    .elements
                    .get(&Element::Addr(ip))
                    .into_iter()
                    .copied()
                    .collect(),
                SetDef::NamedPort { .. } => set
                    .elements
                    .range(
                        Element::AddrProtoPort(ip, Protocol::Tcp, 0)
                            ..=Element::AddrProtoPort(ip, Protocol::Sctp, u16::MAX),
                    )
                    .copied()
                    .collect(),
            };
            if want != have {
                changes.push((name.clone(), have, want));
            }
        }
        for (name, have, want) in changes {
            for e in have.difference(&want) {
                self.set_member(&name, *e, false, delta);
            }
            for e in want.difference(&have) {
                self.set_member(&name, *e, true, delta);
            }
        }
    }

    fn set_member(&mut self, set: &str, element: Element, present: bool, delta: &mut Delta) {
        let Some(s) = self.table.sets.get_mut(set) else {
            return;
        };
        if present && s.elements.insert(element) {
            delta.add_element(set, element);
        } else if !present && s.elements.remove(&element) {
            delta.remove_element(set, element);
        }
    }

    /// A new set, filled from the whole cluster.
    fn make_set(&self, name: &str, def: &SetDef) -> Set {
        let family = def.family();
        let (key, interval, comment_text) = match def {
            SetDef::Pods { peer, .. } => (SetKey::Addr(family), false, describe_peer(peer)),
            SetDef::Block { peer, .. } => (SetKey::Addr(family), true, describe_peer(peer)),
            SetDef::NamedPort {
                peer,
                protocol,
                name,
                ..
            } => (
                SetKey::AddrProtoPort(family),
                false,
                format!(
                    "port {name}/{} of {}",
                    protocol.k8s_name(),
                    match peer {
                        None => "any pod".to_string(),
                        Some(p @ PeerMatch::Block { .. }) =>
                            format!("pods in {}", describe_peer(p)),
                        Some(p) => describe_peer(p),
                    }
                ),
            ),
        };
        let elements = match def {
            SetDef::Block {
                peer: PeerMatch::Block { ranges, .. },
                ..
            } => ranges
                .iter()
                .map(|(lo, hi)| Element::Range(*lo, *hi))
                .collect(),
            SetDef::Block { .. } => BTreeSet::new(),
            SetDef::Pods { peer, .. }
            | SetDef::NamedPort {
                peer: Some(peer), ..
            } => self
                .candidates(peer)
                .flat_map(|pod| {
                    pod.ips
                        .iter()
                        .flat_map(|ip| elements_for(&self.cluster, def, pod, *ip))
                })
                .collect(),
            SetDef::NamedPort { peer: None, .. } => self
                .cluster
                .pods()
                .flat_map(|pod| {
                    pod.ips
                        .iter()
                        .flat_map(|ip| elements_for(&self.cluster, def, pod, *ip))
                })
                .collect(),
        };
        Set {
            name: name.to_string(),
            key,
            interval,
            comment: comment(comment_text),
            elements,
        }
    }

    /// Pods a peer could select, narrowed by namespace first so a full compile does not test
    /// every pod against every peer.
    fn candidates<'a>(&'a self, peer: &'a PeerMatch) -> Box<dyn Iterator<Item = &'a Pod> + 'a> {
        match peer {
            PeerMatch::Pods {
                namespaces: NamespaceScope::Same(ns),
                ..
            } => Box::new(self.cluster.pods_in(ns)),
            PeerMatch::Pods {
                namespaces: NamespaceScope::Matching(sel),
                ..
            } => Box::new(
                self.cluster
                    .namespace_names()
                    .filter(move |ns| sel.matches(self.cluster.namespace_labels(ns)))
                    .flat_map(move |ns| self.cluster.pods_in(ns)),
            ),
            PeerMatch::Block { .. } => Box::new(self.cluster.pods()),
        }
    }
}

/// Whether `node` enforces policy for `pod`: an enforceable pod scheduled there.
fn is_local(node: &str, pod: &Pod) -> bool {
    pod.is_enforceable() && pod.node.as_deref() == Some(node)
}

/// The element `pod`, holding `ip`, contributes to a set, if any.
fn elements_for(cluster: &Cluster, def: &SetDef, pod: &Pod, ip: IpAddr) -> Option<Element> {
    if !pod.is_enforceable() || Family::of(&ip) != def.family() {
        return None;
    }
    match def {
        SetDef::Block { .. } => None,
        SetDef::Pods { peer, .. } => {
            peer_covers(cluster, peer, pod, ip).then_some(Element::Addr(ip))
        }
        SetDef::NamedPort {
            peer,
            protocol,
            name,
            ..
        } => {
            if !peer
                .as_ref()
                .is_none_or(|p| peer_covers(cluster, p, pod, ip))
            {
                return None;
            }
            let port = pod.named_port(name, protocol.k8s_name())?;
            Some(Element::AddrProtoPort(ip, *protocol, port))
        }
    }
}

fn peer_covers(cluster: &Cluster, peer: &PeerMatch, pod: &Pod, ip: IpAddr) -> bool {
    match peer {
        PeerMatch::Pods { namespaces, pods } => {
            let ns_ok = match namespaces {
                NamespaceScope::Same(ns) => *ns == pod.namespace,
                NamespaceScope::Matching(sel) => {
                    sel.matches(cluster.namespace_labels(&pod.namespace))
                }
            };
            ns_ok && pods.matches(&pod.labels)
        }
        PeerMatch::Block { ranges, .. } => ranges.iter().any(|(lo, hi)| (lo..=hi).contains(&&ip)),
    }
}

fn describe_peer(peer: &PeerMatch) -> String {
    match peer {
        PeerMatch::Pods {
            namespaces: NamespaceScope::Same(ns),
            pods,
        } => format!("pods {pods} in namespace {ns}"),
        PeerMatch::Pods {
            namespaces: NamespaceScope::Matching(sel),
            pods,
        } => format!("pods {pods} in namespaces {sel}"),
        PeerMatch::Block { cidr, except, .. } if except.is_empty() => format!("ipBlock {cidr}"),
        PeerMatch::Block { cidr, except, .. } => {
            let except: Vec<String> = except.iter().map(ToString::to_string).collect();
            format!("ipBlock {cidr} except {}", except.join(", "))
        }
    }
}

fn dispatch_map(direction: Direction, family: Family) -> String {
    format!("{}{}", direction.as_str(), family.digit())
}

/// The set of every local pod's addresses the agent knows.
fn known_set(family: Family) -> String {
    format!("known{}", family.digit())
}

/// The set of local pod addresses paired with themselves (a pod reaching itself).
fn self_set(family: Family) -> String {
    format!("self{}", family.digit())
}

fn fnv(text: &str) -> u64 {
    let mut h = FnvHasher::default();
    h.write(text.as_bytes());
    h.finish()
}

/// Named for what decides its rules: the namespace, the policies selecting the pod, and (for
/// ingress) the numbers the pod gives the named ports those policies use. Pods sharing all
/// three share the chain, so pod churn changes map elements, not chains.
fn chain_name(direction: Direction, pod: &Pod, selecting: &[&ResolvedPolicy]) -> String {
    let mut signature = String::new();
    for policy in selecting {
        signature.push_str(&policy.name);
        signature.push('\n');
    }
    if direction == Direction::Ingress {
        let named: BTreeSet<(Protocol, &str)> = selecting
            .iter()
            .flat_map(|p| p.rules(direction).unwrap_or_default())
            .filter_map(|r| match &r.ports {
                Ports::Listed(ports) => Some(ports),
                Ports::Any => None,
            })
            .flatten()
            .filter_map(|(_, m)| match m {
                PortMatch::Named(proto, name) => Some((*proto, name.as_str())),
                _ => None,
            })
            .collect();
        for (proto, name) in named {
            let resolved = pod.named_port(name, proto.k8s_name());
            signature.push_str(&format!("{name}/{}={resolved:?}\n", proto.k8s_name()));
        }
    }
    let prefix = match direction {
        Direction::Ingress => "ing",
        Direction::Egress => "egr",
    };
    format!("{prefix}_{}_{:016x}", pod.namespace, fnv(&signature))
}

/// The rules of one pod chain, with the sets they refer to.
fn build_chain(
    name: &str,
    direction: Direction,
    pod: &Pod,
    selecting: &[&ResolvedPolicy],
) -> (Chain, Vec<(String, SetDef)>) {
    let (field, allow, peers_word) = match direction {
        // Ingress returns too: `forward` stamps the connection once both sides passed.
        Direction::Ingress => (AddrField::Source, Verdict::Return, "from"),
        Direction::Egress => (AddrField::Destination, Verdict::Return, "to"),
    };
    let mut rules = Vec::new();
    let mut defs: Vec<(String, SetDef)> = Vec::new();
    let mut set_for = |def: SetDef| -> String {
        let (prefix, canonical) = match &def {
            SetDef::Pods { peer, .. } => ("pods", describe_peer(peer)),
            SetDef::Block { peer, .. } => ("cidr", describe_peer(peer)),
            SetDef::NamedPort {
                peer,
                protocol,
                name,
                ..
            } => ("nport", format!("{name}/{protocol:?} {:?}", peer)),
        };
        let name = format!("{prefix}{}_{:016x}", def.family().digit(), fnv(&canonical));
        if !defs.iter().any(|(n, _)| *n == name) {
            defs.push((name.clone(), def));
        }
        name
    };

    for policy in selecting {
        let written_rules = policy.rules(direction).unwrap_or_default();
        for rule in written_rules {
            let peers: Vec<(Option<usize>, Option<&PeerMatch>)> = match &rule.peers {
                Peers::Any => vec![(None, None)],
                Peers::Listed(list) => list.iter().map(|(i, p)| (Some(*i), Some(p))).collect(),
            };
            let ports: Vec<(Option<usize>, Option<&PortMatch>)> = match &rule.ports {
                Ports::Any => vec![(None, None)],
                Ports::Listed(list) => list.iter().map(|(i, p)| (Some(*i), Some(p))).collect(),
            };
            for (peer_index, peer) in &peers {
                for (port_index, port) in &ports {
                    let mut origin =
                        format!("{} {}[{}]", policy.key(), direction.as_str(), rule.index);
                    if let Some(i) = peer_index {
                        origin.push_str(&format!(" {peers_word}[{i}]"));
                    }
                    if let Some(i) = port_index {
                        origin.push_str(&format!(" ports[{i}]"));
                    }
                    for matches in rule_matches(direction, field, pod, *peer, *port, &mut set_for) {
                        rules.push(Rule {
                            matches,
                            verdict: allow.clone(),
                            comment: Some(comment(origin.clone())),
                        });
                    }
                }
            }
        }
    }
    let names: Vec<&str> = selecting.iter().map(|p| p.name.as_str()).collect();
    let isolation = format!(
        "{} {} isolated by {}",
        pod.namespace,
        direction.as_str(),
        names.join(", ")
    );
    rules.push(Rule {
        matches: Vec::new(),
        verdict: Verdict::Drop,
        comment: Some(comment(format!("{isolation}: nothing allowed it"))),
    });
    let chain = Chain {
        name: name.to_string(),
        base: None,
        comment: comment(isolation),
        rules,
    };
    (chain, defs)
}

/// The match lists (one rule each) for one peer and one port of a rule; none when the pair can
/// match nothing (an ingress named port the pod does not have).
fn rule_matches(
    direction: Direction,
    field: AddrField,
    pod: &Pod,
    peer: Option<&PeerMatch>,
    port: Option<&PortMatch>,
    set_for: &mut impl FnMut(SetDef) -> String,
) -> Vec<Vec<Match>> {
    let peer_families: Vec<Family> = match peer {
        Some(PeerMatch::Block { cidr, .. }) => vec![Family::of_net(cidr)],
        _ => Family::BOTH.to_vec(),
    };
    let port_matches = match port {
        None => Vec::new(),
        Some(PortMatch::Protocol(p)) => vec![Match::Protocol(*p)],
        Some(PortMatch::Range(p, lo, hi)) => {
            vec![Match::Protocol(*p), Match::DestinationPort(*lo, *hi)]
        }
        Some(PortMatch::Named(p, name)) if direction == Direction::Egress => {
            // The destination decides the number: one concatenated set holds the peer's
            // addresses with their numbers, and stands for the peer match too.
            return peer_families
                .into_iter()
                .map(|family| {
                    let set = set_for(SetDef::NamedPort {
                        family,
                        peer: peer.cloned(),
                        protocol: *p,
                        name: name.clone(),
                    });
                    vec![Match::DestinationPortInSet { family, set }]
                })
                .collect();
        }
        Some(PortMatch::Named(p, name)) => match pod.named_port(name, p.k8s_name()) {
            Some(n) => vec![Match::Protocol(*p), Match::DestinationPort(n, n)],
            None => return Vec::new(),
        },
    };
    let Some(peer) = peer else {
        return vec![port_matches];
    };
    peer_families
        .into_iter()
        .map(|family| {
            let def = match peer {
                PeerMatch::Block { .. } => SetDef::Block {
                    family,
                    peer: peer.clone(),
                },
                PeerMatch::Pods { .. } => SetDef::Pods {
                    family,
                    peer: peer.clone(),
                },
            };
            let mut matches = vec![Match::AddrInSet {
                family,
                field,
                set: set_for(def),
            }];
            matches.extend(port_matches.iter().cloned());
            matches
        })
        .collect()
}

/// The fixed part: base chains, dispatch maps, self and known sets, and with
/// [`Options::isolate_unprogrammed`] the pod CIDR sets and the rules isolating unknown local
/// addresses.
fn base_table(node: &str, options: &Options) -> Table {
    let mut table = Table {
        name: TABLE_NAME.to_string(),
        comment: comment(format!("NetworkPolicy for node {node}, managed by nftpol")),
        ..Table::default()
    };
    for family in Family::BOTH {
        for direction in [Direction::Ingress, Direction::Egress] {
            let name = dispatch_map(direction, family);
            table.maps.insert(
                name.clone(),
                Map {
                    name,
                    family,
                    comment: format!("local pod address to its {} chain", direction.as_str()),
                    elements: BTreeMap::new(),
                },
            );
        }
        for (name, key, text) in [
            (
                self_set(family),
                SetKey::AddrPair(family),
                "local pod to itself",
            ),
            (
                known_set(family),
                SetKey::Addr(family),
                "addresses of local pods the agent knows",
            ),
        ] {
            table.add_set(&name, key, false, text, BTreeSet::new());
        }
    }
    let rule = |matches: Vec<Match>, verdict: Verdict, text: &str| Rule {
        matches,
        verdict,
        comment: Some(text.to_string()),
    };
    let vmap = |family, field, direction| Verdict::Vmap {
        family,
        field,
        map: dispatch_map(direction, family),
    };
    let common = || {
        vec![
            rule(
                vec![Match::CtReply],
                Verdict::Accept,
                "reply in an allowed connection",
            ),
            rule(
                vec![Match::CtRelated],
                Verdict::Accept,
                "related to an allowed connection",
            ),
            rule(
                vec![Match::Icmpv6Type(ND_TYPES.to_vec())],
                Verdict::Accept,
                "IPv6 neighbour discovery",
            ),
        ]
    };
    // A pod has no business sending the overlay's own packets: a VXLAN datagram that a node's
    // Flannel device takes is decapsulated and its inner packet routed as if from another
    // node, from whatever source the pod wrote into it, past anti-spoofing and any policy that
    // admits that source. So is an IP-in-IP packet, with Flannel's `ipip` backend. Calico
    // drops both from its workloads too.
    let tunnel = |source: Option<Match>| -> Vec<Rule> {
        let vxlan = VXLAN_PORTS.map(|port| {
            (
                vec![
                    Match::Protocol(Protocol::Udp),
                    Match::DestinationPort(port, port),
                ],
                "VXLAN from a local pod: an overlay packet of its own making",
            )
        });
        let ipip = (
            vec![Match::L4Proto(IPPROTO_IPIP)],
            "IP-in-IP from a local pod: an overlay packet of its own making",
        );
        vxlan
            .into_iter()
            .chain([ipip])
            .map(|(mut matches, text)| {
                matches.extend(source.clone());
                rule(matches, Verdict::Drop, text)
            })
            .collect()
    };
    let from_local = |family: Family| {
        Some(Match::AddrInSet {
            family,
            field: AddrField::Source,
            set: known_set(family),
        })
    };
    let mut forward = common();
    for family in Family::BOTH {
        forward.extend(tunnel(from_local(family)));
    }
    // `--isolate-unprogrammed`: the families it names pod CIDRs of, each in set `podcidr4/6`.
    let podcidr = |family: Family| format!("podcidr{}", family.digit());
    let mut isolating: BTreeSet<Family> = BTreeSet::new();
    // What comes from (or goes to) an address in the pod CIDRs that no known pod holds.
    let unprogrammed = |family: Family, field: AddrField, text: &str| {
        rule(
            vec![
                Match::AddrInSet {
                    family,
                    field,
                    set: podcidr(family),
                },
                Match::AddrNotInSet {
                    family,
                    field,
                    set: known_set(family),
                },
            ],
            Verdict::Drop,
            text,
        )
    };
    for family in Family::BOTH {
        let cidrs: BTreeSet<Element> = options
            .isolate_unprogrammed
            .iter()
            .filter(|net| Family::of_net(net) == family)
            .map(|net| Element::Range(net.network(), net.broadcast()))
            .collect();
        if cidrs.is_empty() {
            continue;
        }
        isolating.insert(family);
        table.add_set(
            &podcidr(family),
            SetKey::Addr(family),
            true,
            "pod CIDRs of this node",
            cidrs,
        );
        forward.push(unprogrammed(
            family,
            AddrField::Destination,
            "to a local pod address not yet programmed",
        ));
        forward.push(unprogrammed(
            family,
            AddrField::Source,
            "from a local pod address not yet programmed",
        ));
    }
    for family in Family::BOTH {
        forward.push(rule(
            vec![Match::AddrPairInSet {
                family,
                set: self_set(family),
            }],
            Verdict::Accept,
            "a pod reaching itself",
        ));
    }
    for family in Family::BOTH {
        forward.push(rule(
            Vec::new(),
            vmap(family, AddrField::Source, Direction::Egress),
            "egress of local pods",
        ));
    }
    for family in Family::BOTH {
        forward.push(rule(
            Vec::new(),
            vmap(family, AddrField::Destination, Direction::Ingress),
            "ingress of local pods",
        ));
    }
    // A bridge takes every frame its ports receive, but hands one for a reserved group address
    // (01:80:c2:00:00:0x, LLDP's among them) to the node as received by the port itself, past
    // the bridge's prerouting and forward hooks where the guard's chains are: from a pod with
    // CAP_NET_RAW, UDP or ICMP to the node from any source address. Nothing else reaches the
    // node from a veth that is a bridge port.
    let name = crate::guard::INPUT_VETHS;
    table.add_set(
        name,
        SetKey::Iface,
        false,
        "veths on local pods' bridges (filled in on the node)",
        BTreeSet::new(),
    );
    // Most of what reaches the node (the overlay's own packets, above all) is unicast from no
    // local pod: one lookup lets it through, instead of the whole chain. What a bridge hands
    // up as received by a port is never unicast (a reserved group address is a multicast
    // one), so it still meets the drop below; unicast from a veth comes through the bridge, as
    // received by the bridge, and past the guard's chains. (A veth that is no bridge port is
    // not listed: the guard's chains would never see its frames.)
    let not_from = |family: Family, set: String| Match::AddrNotInSet {
        family,
        field: AddrField::Source,
        set,
    };
    // From no local pod: not a known pod's address, nor (`--isolate-unprogrammed`) in the
    // node's pod CIDRs, where a pod the agent does not know yet sends from.
    let not_local = |family: Family| -> (Vec<Match>, &str) {
        let mut matches = vec![not_from(family, known_set(family))];
        if isolating.contains(&family) {
            matches.push(not_from(family, podcidr(family)));
            (matches, "not from a local pod nor the node's pod CIDRs")
        } else {
            (matches, "not from a local pod")
        }
    };
    let mut input: Vec<Rule> = Family::BOTH
        .into_iter()
        .map(|family| {
            let (matches, text) = not_local(family);
            rule(
                [Match::PktTypeHost].into_iter().chain(matches).collect(),
                Verdict::Accept,
                &format!("unicast to this node, {text}"),
            )
        })
        .collect();
    input.push(rule(
        vec![Match::IifnameInSet { set: name.into() }],
        Verdict::Drop,
        "IP straight from a local pod's veth, past the bridge: a frame to a reserved group address",
    ));
    for family in Family::BOTH {
        let (matches, text) = not_local(family);
        input.push(rule(matches, Verdict::Accept, text));
    }
    // Past those, everything is from a local pod (or an address in the node's pod CIDRs).
    input.extend(tunnel(None));
    input.extend(common());
    // Replies (to the kubelet's probes, say) and ICMP errors are past; the rest from an
    // address no pod holds yet waits for the agent to know the pod. The node's own addresses
    // on the pod network (the bridge's, the overlay device's) are in the pod CIDRs too: what
    // the node sends itself from them comes in on `lo`.
    if !isolating.is_empty() {
        input.push(rule(
            vec![Match::IifLoopback],
            Verdict::Accept,
            "the node to itself",
        ));
    }
    for family in &isolating {
        input.push(unprogrammed(
            *family,
            AddrField::Source,
            "from a local pod address not yet programmed",
        ));
    }
    for family in Family::BOTH {
        input.push(rule(
            vec![not_from(family, dispatch_map(Direction::Egress, family))],
            Verdict::Accept,
            "from a local pod whose egress is open",
        ));
    }
    for family in Family::BOTH {
        input.push(rule(
            Vec::new(),
            vmap(family, AddrField::Source, Direction::Egress),
            "egress of local pods to this node",
        ));
    }
    for (name, hook, rules, text) in [
        (
            "forward",
            Hook::Forward,
            forward,
            "pod traffic routed or bridged through this node",
        ),
        ("input", Hook::Input, input, "pod traffic to this node"),
    ] {
        table.chains.insert(
            name.to_string(),
            Chain {
                name: name.to_string(),
                base: Some(BaseChain { hook, priority: 0 }),
                comment: text.to_string(),
                rules,
            },
        );
    }
    // The first rule of `forward` and its last: the epoch's.
    epoch::apply(&mut table, options.epoch);
    table
}

/// Cuts a comment to what `nft` accepts, on a character boundary.
pub(crate) fn comment(mut text: String) -> String {
    if text.len() > COMMENT_MAX {
        let mut end = COMMENT_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(namespace: &str, name: &str, node: &str, ip: &str) -> Pod {
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            node: Some(node.into()),
            ips: vec![ip.parse().unwrap()],
            phase: Some("Running".into()),
            ..Pod::default()
        }
    }

    fn listed(c: &Compiler) -> Vec<String> {
        c.local_pods()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    }

    /// The local pods as a walk of the whole cluster finds them.
    fn scanned(c: &Compiler) -> Vec<String> {
        c.cluster()
            .pods()
            .filter(|p| is_local(c.node(), p))
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    }

    #[test]
    fn the_local_pods_follow_every_change() {
        let mut cluster = Cluster::default();
        cluster.apply_pod(pod("b", "x", "n1", "10.0.0.1"));
        cluster.apply_pod(pod("a", "y", "n2", "10.0.0.2"));
        let mut c = Compiler::new(cluster, "n1");
        let check = |c: &Compiler, want: &[&str]| {
            assert_eq!(listed(c), want);
            assert_eq!(listed(c), scanned(c));
        };
        check(&c, &["b/x"]);
        c.apply_pod(pod("a", "z", "n1", "10.0.0.3"));
        check(&c, &["a/z", "b/x"]);
        c.apply_pod(pod("b", "x", "n2", "10.0.0.1"));
        check(&c, &["a/z"]);
        c.apply_pod(pod("a", "y", "n1", "10.0.0.2"));
        check(&c, &["a/y", "a/z"]);
        c.apply_pod(Pod {
            phase: Some("Succeeded".into()),
            ..pod("a", "z", "n1", "10.0.0.3")
        });
        check(&c, &["a/y"]);
        c.apply_pod(Pod {
            host_network: true,
            ..pod("c", "h", "n1", "10.0.0.4")
        });
        check(&c, &["a/y"]);
        c.delete_pod("b", "x");
        c.delete_pod("a", "z");
        check(&c, &["a/y"]);
        c.apply_policy(NetworkPolicy {
            namespace: "a".into(),
            name: "deny".into(),
            ..NetworkPolicy::default()
        });
        check(&c, &["a/y"]);
        c.delete_pod("a", "y");
        check(&c, &[]);
    }
}
