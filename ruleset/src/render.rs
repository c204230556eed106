//! `nft -f` text for a table: deterministic, and in an order `nft` can load in one pass (sets,
//! then the pod chains that use them, then the maps that jump to those, then the base chains).

use std::fmt::{self, Write};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};

use crate::ir::{
    AddrField, Chain, Element, Family, Mac, Map, Match, Rule, Set, SetKey, Table, Verdict,
};

/// The whole table as `nft -f` input. Loading it needs the table to be absent or empty.
pub fn render(table: &Table) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_table(&mut out, table);
    out
}

fn write_table(out: &mut String, table: &Table) -> fmt::Result {
    writeln!(out, "table {} {} {{", table.family.nft_name(), table.name)?;
    if !table.comment.is_empty() {
        writeln!(out, "\tcomment {}", quote(&table.comment))?;
    }
    for set in table.sets.values() {
        write_set(out, set)?;
    }
    for chain in table.chains.values().filter(|c| c.base.is_none()) {
        write_chain(out, chain)?;
    }
    for map in table.maps.values() {
        write_map(out, map)?;
    }
    for chain in table.chains.values().filter(|c| c.base.is_some()) {
        write_chain(out, chain)?;
    }
    writeln!(out, "}}")
}

fn write_set(out: &mut String, set: &Set) -> fmt::Result {
    writeln!(out, "\tset {} {{", set.name)?;
    writeln!(out, "\t\t{}", key_type(set.key))?;
    if set.interval {
        writeln!(out, "\t\tflags interval")?;
    }
    if !set.comment.is_empty() {
        writeln!(out, "\t\tcomment {}", quote(&set.comment))?;
    }
    if !set.elements.is_empty() {
        let elements: Vec<String> = set
            .elements
            .iter()
            .map(|e| match (set.key, e) {
                // A raw payload key takes a number: the address's 128 bits in hex.
                (SetKey::IfaceNdTarget, Element::IfaceAddr(name, IpAddr::V6(ip))) => {
                    format!("{} . {:#034x}", quote(name.as_str()), u128::from(*ip))
                }
                (SetKey::NdTarget, Element::Addr(IpAddr::V6(ip))) => {
                    format!("{:#034x}", u128::from(*ip))
                }
                _ => element(e),
            })
            .collect();
        writeln!(out, "\t\telements = {{ {} }}", elements.join(", "))?;
    }
    writeln!(out, "\t}}")
}

fn write_map(out: &mut String, map: &Map) -> fmt::Result {
    writeln!(out, "\tmap {} {{", map.name)?;
    writeln!(out, "\t\t{} : verdict", key_type(SetKey::Addr(map.family)))?;
    if !map.comment.is_empty() {
        writeln!(out, "\t\tcomment {}", quote(&map.comment))?;
    }
    if !map.elements.is_empty() {
        let elements: Vec<String> = map
            .elements
            .iter()
            .map(|(ip, e)| format!("{ip} comment {} : jump {}", quote(&e.comment), e.chain))
            .collect();
        writeln!(
            out,
            "\t\telements = {{ {} }}",
            elements.join(",\n\t\t\t     ")
        )?;
    }
    writeln!(out, "\t}}")
}

fn write_chain(out: &mut String, chain: &Chain) -> fmt::Result {
    writeln!(out, "\tchain {} {{", chain.name)?;
    if let Some(base) = chain.base {
        writeln!(
            out,
            "\t\ttype filter hook {} priority {}; policy accept;",
            base.hook.nft_name(),
            priority(base.priority)
        )?;
    }
    if !chain.comment.is_empty() {
        writeln!(out, "\t\tcomment {}", quote(&chain.comment))?;
    }
    for rule in &chain.rules {
        writeln!(out, "\t\t{}", rule_text(rule))?;
    }
    writeln!(out, "\t}}")
}

/// One rule as `nft` prints it, comment included.
pub fn rule_text(rule: &Rule) -> String {
    let mut parts: Vec<String> = rule.matches.iter().map(match_text).collect();
    parts.push(verdict_text(&rule.verdict));
    if let Some(c) = &rule.comment {
        parts.push(format!("comment {}", quote(c)));
    }
    parts.join(" ")
}

fn match_text(m: &Match) -> String {
    match m {
        Match::CtRelated => "ct state related".into(),
        Match::CtReply => "ct direction reply".into(),
        Match::CtMarkEpoch { mask, value } => format!("ct mark & {mask:#010x} == {value:#010x}"),
        Match::Icmpv6Type(types) => {
            let names: Vec<String> = types.iter().map(|t| icmpv6_name(*t)).collect();
            format!("icmpv6 type {{ {} }}", names.join(", "))
        }
        Match::AddrInSet { family, field, set } => format!("{} @{set}", addr(*family, *field)),
        Match::AddrPairInSet { family, set } => format!(
            "{} . {} @{set}",
            addr(*family, AddrField::Source),
            addr(*family, AddrField::Destination)
        ),
        Match::DestinationPortInSet { family, set } => format!(
            "{} . meta l4proto . th dport @{set}",
            addr(*family, AddrField::Destination)
        ),
        Match::Protocol(p) => format!("meta l4proto {}", p.nft_name()),
        Match::L4Proto(number) => format!("meta l4proto {number}"),
        Match::DestinationPort(lo, hi) if lo == hi => format!("th dport {lo}"),
        Match::DestinationPort(lo, hi) => format!("th dport {lo}-{hi}"),
        Match::AddrNotInSet { family, field, set } => {
            format!("{} != @{set}", addr(*family, *field))
        }
        Match::Arp => "ether type arp".into(),
        Match::ArpSender(addr) => format!("arp saddr ip {addr}"),
        Match::IifnameArpSenderInSet { set } => format!("iifname . arp saddr ip @{set}"),
        Match::ArpSenderInSet { set } => format!("arp saddr ip @{set}"),
        Match::IifkindVeth => "meta iifkind \"veth\"".to_string(),
        Match::IifnameNotInSet { set } => format!("iifname != @{set}"),
        Match::NdTargetInSet { set } => format!("{ND_TARGET} @{set}"),
        Match::IifnameInSet { set } => format!("iifname @{set}"),
        Match::IifnameNdTargetNotInSet { set } => format!("iifname . {ND_TARGET} != @{set}"),
        Match::NdTargetNotLinkLocal => "@th,64,16 & 0xffc0 != 0xfe80".to_string(),
        Match::EtherType(0x8100) => "ether type 8021q".to_string(),
        Match::EtherType(0x88a8) => "ether type 8021ad".to_string(),
        Match::EtherType(other) => format!("ether type {other:#06x}"),
        Match::Icmpv6NotNextHeader => "ip6 nexthdr != ipv6-icmp".to_string(),
        Match::PktTypeHost => "meta pkttype host".to_string(),
        Match::IifLoopback => "iif \"lo\"".to_string(),
        Match::OifnameInSet { set } => format!("oifname @{set}"),
        Match::OifnameDestinationNotInSet { family, set } => {
            format!(
                "oifname . {} != @{set}",
                addr(*family, AddrField::Destination)
            )
        }
        Match::IifnameSourceInSet { family, set } => {
            format!("iifname . {} @{set}", addr(*family, AddrField::Source))
        }
        Match::IifEtherSourceInSet { family, set } => {
            format!(
                "iif . ether saddr . {} @{set}",
                addr(*family, AddrField::Source)
            )
        }
        Match::IifnameEtherNotInSet { set } => format!("iifname . ether saddr != @{set}"),
        Match::EtherSourceInSet { set } => format!("ether saddr @{set}"),
        Match::EtherDestInSet { set } => format!("ether daddr @{set}"),
        Match::OifnameEtherDestNotInSet { set } => format!("oifname . ether daddr != @{set}"),
    }
}

fn verdict_text(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Return => "return".into(),
        Verdict::Vmap { family, field, map } => format!("{} vmap @{map}", addr(*family, *field)),
        Verdict::Jump(chain) => format!("jump {chain}"),
        Verdict::StampAccept { mask, value } => {
            format!(
                "ct mark set ct mark & {:#010x} | {value:#010x} accept",
                !mask
            )
        }
    }
}

fn addr(family: Family, field: AddrField) -> &'static str {
    match (family, field) {
        (Family::V4, AddrField::Source) => "ip saddr",
        (Family::V4, AddrField::Destination) => "ip daddr",
        (Family::V6, AddrField::Source) => "ip6 saddr",
        (Family::V6, AddrField::Destination) => "ip6 daddr",
    }
}

/// The declaration of a set's or map's key: `type ...`, or `typeof ...` where nft has no type.
fn key_type(key: SetKey) -> &'static str {
    match key {
        SetKey::Addr(Family::V4) => "type ipv4_addr",
        SetKey::Addr(Family::V6) => "type ipv6_addr",
        SetKey::AddrPair(Family::V4) => "type ipv4_addr . ipv4_addr",
        SetKey::AddrPair(Family::V6) => "type ipv6_addr . ipv6_addr",
        SetKey::AddrProtoPort(Family::V4) => "type ipv4_addr . inet_proto . inet_service",
        SetKey::AddrProtoPort(Family::V6) => "type ipv6_addr . inet_proto . inet_service",
        SetKey::Iface => "type ifname",
        SetKey::IfaceAddr(Family::V4) => "type ifname . ipv4_addr",
        SetKey::IfaceAddr(Family::V6) => "type ifname . ipv6_addr",
        // nft 1.0.6 has no name for the field: the key is declared by the expressions.
        SetKey::IfaceNdTarget => "typeof iifname . @th,64,128",
        SetKey::NdTarget => "typeof @th,64,128",
        SetKey::Mac => "type ether_addr",
        SetKey::IfaceMac => "type ifname . ether_addr",
        SetKey::IndexMacAddr(Family::V4) => "type iface_index . ether_addr . ipv4_addr",
        SetKey::IndexMacAddr(Family::V6) => "type iface_index . ether_addr . ipv6_addr",
    }
}

/// The target address of a neighbour advertisement: 16 bytes at byte 8 of the ICMPv6 header.
const ND_TARGET: &str = "@th,64,128";

fn element(e: &Element) -> String {
    match e {
        Element::Addr(ip) => ip.to_string(),
        Element::Range(lo, hi) => range(*lo, *hi),
        Element::AddrPair(a, b) => format!("{a} . {b}"),
        Element::AddrProtoPort(ip, proto, port) => format!("{ip} . {} . {port}", proto.nft_name()),
        Element::Iface(name) => quote(name.as_str()),
        Element::IfaceAddr(name, ip) => format!("{} . {ip}", quote(name.as_str())),
        Element::Mac(mac) => mac_text(mac),
        Element::IfaceMac(name, mac) => format!("{} . {}", quote(name.as_str()), mac_text(mac)),
        // By number: a name would have to exist where the text is loaded.
        Element::IndexMacAddr(index, mac, ip) => format!("{index} . {} . {ip}", mac_text(mac)),
    }
}

/// A link-layer address as nft writes it: `02:00:5e:10:00:01`.
pub fn mac_text(mac: &Mac) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A range as a prefix when it is exactly one, as `nft` prints it back.
fn range(lo: IpAddr, hi: IpAddr) -> String {
    let nets: Vec<IpNet> = match (lo, hi) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            Ipv4Subnets::new(a, b, 0).map(IpNet::V4).take(2).collect()
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            Ipv6Subnets::new(a, b, 0).map(IpNet::V6).take(2).collect()
        }
        _ => Vec::new(),
    };
    match nets.as_slice() {
        [net] => net.to_string(),
        _ => format!("{lo}-{hi}"),
    }
}

fn icmpv6_name(t: u8) -> String {
    match t {
        131 => "mld-listener-report".into(),
        132 => "mld-listener-done".into(),
        133 => "nd-router-solicit".into(),
        134 => "nd-router-advert".into(),
        135 => "nd-neighbor-solicit".into(),
        136 => "nd-neighbor-advert".into(),
        137 => "nd-redirect".into(),
        143 => "mld2-listener-report".into(),
        other => other.to_string(),
    }
}

fn priority(p: i32) -> String {
    match p {
        0 => "filter".into(),
        p if p > 0 => format!("filter + {p}"),
        p => format!("filter - {}", -p),
    }
}

/// A quoted nft string. nft strings cannot escape quotes, so they become apostrophes.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "'"))
}
