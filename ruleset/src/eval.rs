//! Runs a packet through a table as the kernel runs it through the same rules: base chain,
//! verdict-map jumps, returns and the chain policy. It reads only the IR, so what it says is
//! what the rendered ruleset does.

use std::net::IpAddr;

use crate::ir::{
    AddrField, Chain, Element, Family, Hook, Match, Protocol, Rule, Table, Verdict, IPPROTO_ICMPV6,
};

/// A packet as it reaches a hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub ct: CtState,
}

/// What connection tracking knows of the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// First packet of a connection, or a later one in the original direction of a
    /// connection no ruleset epoch has been stamped on: evaluated in full, as `trace` does.
    New,
    /// A reply in an established connection.
    Reply,
    /// Related to a tracked connection (an ICMP error about it).
    Related,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Transport { protocol: Protocol, dport: u16 },
    Icmpv6 { kind: u8 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Accept,
    Drop,
}

/// What happened on the way, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A rule matched and its verdict applied.
    Rule { chain: String, rule: Rule },
    /// A verdict map held the address and jumped to `chain`.
    MapHit {
        map: String,
        key: IpAddr,
        chain: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub decision: Decision,
    pub steps: Vec<Step>,
}

impl Evaluation {
    /// The chain a map named `map` jumped to, if any.
    pub fn map_hit(&self, map_prefix: &str) -> Option<&str> {
        self.steps.iter().find_map(|s| match s {
            Step::MapHit { map, chain, .. } if map.starts_with(map_prefix) => Some(chain.as_str()),
            _ => None,
        })
    }

    /// The last rule that matched in `chain`.
    pub fn last_rule_in(&self, chain_name: &str) -> Option<&Rule> {
        self.steps.iter().rev().find_map(|s| match s {
            Step::Rule { chain, rule } if chain == chain_name => Some(rule),
            _ => None,
        })
    }
}

/// Jumps deeper than this are a loop; the kernel refuses such rulesets, so we stop too.
const MAX_DEPTH: usize = 16;

/// The verdict of `table` on a new packet at `hook`. A table without that hook accepts.
pub fn evaluate(table: &Table, hook: Hook, packet: &Packet) -> Evaluation {
    let mut steps = Vec::new();
    let base = table
        .chains
        .values()
        .find(|c| c.base.is_some_and(|b| b.hook == hook));
    let decision = match base {
        Some(chain) => run(table, chain, packet, &mut steps, 0).unwrap_or(Decision::Accept),
        None => Decision::Accept,
    };
    Evaluation { decision, steps }
}

/// `Some` when a rule ended evaluation; `None` when the chain returned or ran out.
fn run(
    table: &Table,
    chain: &Chain,
    packet: &Packet,
    steps: &mut Vec<Step>,
    depth: usize,
) -> Option<Decision> {
    if depth > MAX_DEPTH {
        return Some(Decision::Drop);
    }
    for rule in &chain.rules {
        if !rule.matches.iter().all(|m| matches(table, m, packet)) {
            continue;
        }
        let step = Step::Rule {
            chain: chain.name.clone(),
            rule: rule.clone(),
        };
        match &rule.verdict {
            Verdict::Accept | Verdict::StampAccept { .. } => {
                steps.push(step);
                return Some(Decision::Accept);
            }
            Verdict::Drop => {
                steps.push(step);
                return Some(Decision::Drop);
            }
            Verdict::Return => {
                steps.push(step);
                return None;
            }
            Verdict::Vmap { family, field, map } => {
                let Some(key) = address(packet, *family, *field) else {
                    continue;
                };
                let Some(entry) = table.maps.get(map).and_then(|m| m.elements.get(&key)) else {
                    continue;
                };
                steps.push(Step::MapHit {
                    map: map.clone(),
                    key,
                    chain: entry.chain.clone(),
                });
                let target = table.chains.get(&entry.chain)?;
                if let Some(decision) = run(table, target, packet, steps, depth + 1) {
                    return Some(decision);
                }
            }
            Verdict::Jump(name) => {
                steps.push(step);
                let target = table.chains.get(name)?;
                if let Some(decision) = run(table, target, packet, steps, depth + 1) {
                    return Some(decision);
                }
            }
        }
    }
    None
}

fn address(packet: &Packet, family: Family, field: AddrField) -> Option<IpAddr> {
    let ip = match field {
        AddrField::Source => packet.src,
        AddrField::Destination => packet.dst,
    };
    (Family::of(&ip) == family).then_some(ip)
}

fn matches(table: &Table, m: &Match, packet: &Packet) -> bool {
    let in_set = |set: &str, element: Element| {
        table
            .sets
            .get(set)
            .is_some_and(|s| s.elements.contains(&element))
    };
    match m {
        Match::CtRelated => packet.ct == CtState::Related,
        Match::CtReply => packet.ct == CtState::Reply,
        // A new connection's mark holds no epoch (0 is never one): the fast path is for
        // packets a full evaluation already let through.
        Match::CtMarkEpoch { .. } => false,
        Match::Icmpv6Type(types) => {
            matches!(packet.l4, L4::Icmpv6 { kind } if types.contains(&kind))
                && Family::of(&packet.src) == Family::V6
        }
        Match::AddrInSet { family, field, set } => {
            address(packet, *family, *field).is_some_and(|ip| addr_in_set(table, set, ip))
        }
        Match::AddrNotInSet { family, field, set } => {
            address(packet, *family, *field).is_some_and(|ip| !addr_in_set(table, set, ip))
        }
        Match::AddrPairInSet { family, set } => {
            Family::of(&packet.src) == *family
                && in_set(set, Element::AddrPair(packet.src, packet.dst))
        }
        Match::DestinationPortInSet { family, set } => match packet.l4 {
            L4::Transport { protocol, dport } => {
                Family::of(&packet.dst) == *family
                    && in_set(set, Element::AddrProtoPort(packet.dst, protocol, dport))
            }
            L4::Icmpv6 { .. } => false,
        },
        Match::Protocol(p) => matches!(packet.l4, L4::Transport { protocol, .. } if protocol == *p),
        Match::L4Proto(number) => match packet.l4 {
            L4::Transport { protocol, .. } => protocol.number() == *number,
            L4::Icmpv6 { .. } => *number == IPPROTO_ICMPV6,
        },
        Match::DestinationPort(lo, hi) => {
            matches!(packet.l4, L4::Transport { dport, .. } if (*lo..=*hi).contains(&dport))
        }
        // A `Packet` is IP and carries no interface: these belong to the bridge guard table,
        // which policy evaluation does not walk.
        Match::Arp
        | Match::ArpSender(_)
        | Match::IifnameArpSenderInSet { .. }
        | Match::ArpSenderInSet { .. }
        | Match::IifkindVeth
        | Match::IifnameNotInSet { .. }
        | Match::NdTargetInSet { .. }
        | Match::IifnameInSet { .. }
        | Match::OifnameInSet { .. }
        | Match::OifnameDestinationNotInSet { .. }
        | Match::IifnameSourceInSet { .. }
        | Match::IifEtherSourceInSet { .. }
        | Match::IifnameEtherNotInSet { .. }
        | Match::EtherSourceInSet { .. }
        | Match::EtherDestInSet { .. }
        | Match::OifnameEtherDestNotInSet { .. }
        | Match::IifnameNdTargetNotInSet { .. }
        | Match::NdTargetNotLinkLocal
        | Match::EtherType(_) => false,
        // What the evaluator models is ICMPv6 without extension headers.
        Match::Icmpv6NotNextHeader => false,
        // ... and unicast: a `Packet` is addressed to its destination, not to a group.
        Match::PktTypeHost => true,
        // ... from a pod or another host, not from the node to itself.
        Match::IifLoopback => false,
    }
}

/// Whether `ip` is in the set `set`, or a key of the map `set` (a lookup without a verdict).
fn addr_in_set(table: &Table, set: &str, ip: IpAddr) -> bool {
    if let Some(map) = table.maps.get(set) {
        return map.elements.contains_key(&ip);
    }
    table.sets.get(set).is_some_and(|s| {
        if s.interval {
            s.elements
                .iter()
                .any(|e| matches!(e, Element::Range(lo, hi) if (lo..=hi).contains(&&ip)))
        } else {
            s.elements.contains(&Element::Addr(ip))
        }
    })
}
