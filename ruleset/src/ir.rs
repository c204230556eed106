//! The desired ruleset as owned data: one table of sets, verdict maps and chains.
//! [`crate::render`] prints it as `nft -f` text; the agent turns it into a netlink batch.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// Name of the one table the agent owns. Nothing outside it is ever touched.
pub const TABLE_NAME: &str = "nftpol";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub family: TableFamily,
    pub name: String,
    pub comment: String,
    pub sets: BTreeMap<String, Set>,
    pub maps: BTreeMap<String, Map>,
    pub chains: BTreeMap<String, Chain>,
}

/// The nf_tables family of a table: `inet` for policy, `bridge` for the anti-spoofing guard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableFamily {
    #[default]
    Inet,
    Bridge,
}

impl TableFamily {
    pub fn nft_name(self) -> &'static str {
        match self {
            TableFamily::Inet => "inet",
            TableFamily::Bridge => "bridge",
        }
    }
}

/// An interface name as the kernel compares it: at most 15 bytes, NUL-padded to 16.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfName([u8; IfName::SIZE]);

impl IfName {
    /// `IFNAMSIZ`, the terminating NUL included.
    pub const SIZE: usize = 16;

    /// `None` for a name the kernel would not accept: empty, longer than 15 bytes, or with a
    /// NUL, `/` or whitespace in it.
    pub fn new(name: &str) -> Option<Self> {
        let bytes = name.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() < Self::SIZE
            && !bytes
                .iter()
                .any(|b| *b == 0 || *b == b'/' || b.is_ascii_whitespace());
        if !valid {
            return None;
        }
        let mut padded = [0; Self::SIZE];
        padded[..bytes.len()].copy_from_slice(bytes);
        Some(IfName(padded))
    }

    pub fn bytes(&self) -> [u8; Self::SIZE] {
        self.0
    }

    pub fn as_str(&self) -> &str {
        let len = self.0.iter().position(|b| *b == 0).unwrap_or(Self::SIZE);
        // `new` takes its bytes from a `str` and cuts nothing.
        std::str::from_utf8(&self.0[..len]).unwrap_or("?")
    }
}

impl std::fmt::Debug for IfName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::fmt::Display for IfName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// Suffix used in set and map names (`4` or `6`).
    pub fn digit(self) -> char {
        match self {
            Family::V4 => '4',
            Family::V6 => '6',
        }
    }

    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn nft_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// IANA protocol number, as the kernel compares it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The Kubernetes spelling.
    pub fn k8s_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// The type of a set's or map's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKey {
    /// An address (`ipv4_addr` / `ipv6_addr`).
    Addr(Family),
    /// Source and destination address, concatenated.
    AddrPair(Family),
    /// Destination address, layer-4 protocol and destination port, concatenated.
    AddrProtoPort(Family),
    /// An input interface name (`ifname`).
    Iface,
    /// Input interface name and source address, concatenated.
    IfaceAddr(Family),
    /// Input interface name and the target address of an IPv6 neighbour advertisement,
    /// concatenated (`typeof iifname . @th,64,128`: nft 1.0.6 has no name for the field).
    /// Elements are [`Element::IfaceAddr`] with IPv6 addresses.
    IfaceNdTarget,
    /// The target address of an IPv6 neighbour advertisement alone (`typeof @th,64,128`).
    /// Elements are [`Element::Addr`] with IPv6 addresses.
    NdTarget,
    /// A link-layer address (`ether_addr`).
    Mac,
    /// Input interface name and source link-layer address, concatenated.
    IfaceMac,
    /// Input interface index (`iface_index`), source link-layer address and source address,
    /// concatenated: a shorter key than the name's, read without copying the name.
    IndexMacAddr(Family),
}

impl SetKey {
    /// The address family of the key's address; `None` for a key without one.
    pub fn family(self) -> Option<Family> {
        match self {
            SetKey::Addr(f)
            | SetKey::AddrPair(f)
            | SetKey::AddrProtoPort(f)
            | SetKey::IfaceAddr(f)
            | SetKey::IndexMacAddr(f) => Some(f),
            SetKey::IfaceNdTarget | SetKey::NdTarget => Some(Family::V6),
            SetKey::Iface | SetKey::Mac | SetKey::IfaceMac => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub key: SetKey,
    /// Interval set: elements are prefixes.
    pub interval: bool,
    pub comment: String,
    pub elements: BTreeSet<Element>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    Addr(IpAddr),
    /// An inclusive address range, in interval sets.
    Range(IpAddr, IpAddr),
    AddrPair(IpAddr, IpAddr),
    AddrProtoPort(IpAddr, Protocol, u16),
    Iface(IfName),
    IfaceAddr(IfName, IpAddr),
    Mac(Mac),
    IfaceMac(IfName, Mac),
    /// An interface index, a link-layer address and an address.
    IndexMacAddr(u32, Mac, IpAddr),
}

/// A link-layer (Ethernet) address.
pub type Mac = [u8; 6];

/// A verdict map from an address to the chain holding that pod's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Map {
    pub name: String,
    pub family: Family,
    pub comment: String,
    pub elements: BTreeMap<IpAddr, MapEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Chain jumped to.
    pub chain: String,
    /// `namespace/name` of the pod owning the address.
    pub comment: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub base: Option<BaseChain>,
    pub comment: String,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub hook: Hook,
    /// Relative to the `filter` priority (0).
    pub priority: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Forward,
    Input,
    Prerouting,
}

impl Hook {
    pub fn nft_name(self) -> &'static str {
        match self {
            Hook::Forward => "forward",
            Hook::Input => "input",
            Hook::Prerouting => "prerouting",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// All must match (AND).
    pub matches: Vec<Match>,
    pub verdict: Verdict,
    pub comment: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddrField {
    Source,
    Destination,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// `ct state related`
    CtRelated,
    /// `ct direction reply`: a packet in the reply direction of a tracked connection. Its
    /// state is established or related (conntrack has no other for replies), and the
    /// original direction was let through.
    CtReply,
    /// `ct mark & mask == value`: a packet of a connection this ruleset already let through
    /// (see [`crate::epoch`]).
    CtMarkEpoch { mask: u32, value: u32 },
    /// `icmpv6 type { ... }`, by type number.
    Icmpv6Type(Vec<u8>),
    /// `ip saddr @set` and friends; the family is the set's.
    AddrInSet {
        family: Family,
        field: AddrField,
        set: String,
    },
    /// `ip saddr . ip daddr @set`
    AddrPairInSet { family: Family, set: String },
    /// `ip daddr . meta l4proto . th dport @set`
    DestinationPortInSet { family: Family, set: String },
    /// `meta l4proto tcp`
    Protocol(Protocol),
    /// `meta l4proto 4`: by number, for what a policy cannot name ([`IPPROTO_IPIP`]).
    L4Proto(u8),
    /// `th dport 80` or `th dport 80-90`; always after a [`Match::Protocol`].
    DestinationPort(u16, u16),
    /// `ip daddr != @set` and friends.
    AddrNotInSet {
        family: Family,
        field: AddrField,
        set: String,
    },
    /// `ether type arp` (bridge tables).
    Arp,
    /// `arp saddr ip 0.0.0.0` (bridge tables): the sender address of an ARP packet.
    ArpSender(Ipv4Addr),
    /// `iifname . arp saddr ip @set` (bridge tables).
    IifnameArpSenderInSet { set: String },
    /// `arp saddr ip @set` (bridge tables).
    ArpSenderInSet { set: String },
    /// `meta iifkind "veth"`: the input interface is a veth, whatever its name.
    IifkindVeth,
    /// `@th,64,128 @set`: the target address of a neighbour advertisement is in `set`.
    NdTargetInSet { set: String },
    /// `iifname @set`.
    IifnameInSet { set: String },
    /// `iifname != @set`.
    IifnameNotInSet { set: String },
    /// `oifname @set` (bridge tables: the port a frame leaves by).
    OifnameInSet { set: String },
    /// `oifname . ip daddr != @set` (bridge tables): the destination is not an address of the
    /// pod behind the port the frame leaves by.
    OifnameDestinationNotInSet { family: Family, set: String },
    /// `iifname . ip saddr @set` (bridge tables).
    IifnameSourceInSet { family: Family, set: String },
    /// `iif . ether saddr . ip saddr @set` (bridge tables): interface index, link-layer source
    /// and source address together.
    IifEtherSourceInSet { family: Family, set: String },
    /// `iifname . ether saddr != @set` (bridge tables): the frame's link-layer source is not
    /// the one of the pod behind the interface.
    IifnameEtherNotInSet { set: String },
    /// `ether saddr @set` (bridge tables).
    EtherSourceInSet { set: String },
    /// `ether daddr @set` (bridge tables).
    EtherDestInSet { set: String },
    /// `oifname . ether daddr != @set` (bridge tables): the frame leaves by a port that is not
    /// the one of the pod at its destination MAC.
    OifnameEtherDestNotInSet { set: String },
    /// `iifname . @th,64,128 != @set` (bridge tables): the target of a neighbour advertisement
    /// (after `icmpv6 type nd-neighbor-advert`) is not one the interface's pod may claim.
    IifnameNdTargetNotInSet { set: String },
    /// `@th,64,16 & 0xffc0 != 0xfe80` (bridge tables): the target of a neighbour advertisement
    /// is not link-local.
    NdTargetNotLinkLocal,
    /// `ether type 8021q` (bridge tables): the Ethernet header's type, as on the wire (a VLAN
    /// tag shows as its own type).
    EtherType(u16),
    /// `ip6 nexthdr != ipv6-icmp`: an extension header (a fragment, say) comes before ICMPv6.
    Icmpv6NotNextHeader,
    /// `iif "lo"`: the node to itself (loopback is interface 1 in every network namespace).
    IifLoopback,
    /// `meta pkttype host`: the frame was addressed to the receiving interface's own MAC
    /// (unicast), not to a group or broadcast address.
    PktTypeHost,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    /// Back to the calling chain: this direction allows the packet.
    Return,
    /// `ip saddr vmap @map` / `ip daddr vmap @map`.
    Vmap {
        family: Family,
        field: AddrField,
        map: String,
    },
    /// `jump <chain>`.
    Jump(String),
    /// `ct mark set ct mark & ~mask | value accept`: accept, stamping the connection with the
    /// ruleset epoch and keeping the mark's other bits.
    StampAccept {
        mask: u32,
        value: u32,
    },
}

/// ICMPv6 neighbour discovery: router solicit/advert, neighbour solicit/advert, redirect.
pub const ND_TYPES: [u8; 5] = [133, 134, 135, 136, 137];

/// ICMPv6 multicast listener discovery as a listener sends it: report and done (MLDv1), and
/// report (MLDv2). Queries are a router's.
pub const MLD_LISTENER_TYPES: [u8; 3] = [131, 132, 143];

/// UDP ports of VXLAN: the IANA's, and the Linux kernel's default, which Flannel uses.
pub const VXLAN_PORTS: [u16; 2] = [4789, 8472];

/// IPv4 in IP (`ipencap`), Flannel's `ipip` backend.
pub const IPPROTO_IPIP: u8 = 4;

/// ICMPv6's protocol number.
pub const IPPROTO_ICMPV6: u8 = 58;

/// ICMPv6 router advertisement and redirect: what only a router sends.
pub const ROUTER_ND_TYPES: [u8; 2] = [134, 137];

/// ICMPv6 neighbour advertisement.
pub const ND_NEIGHBOR_ADVERT: u8 = 136;

/// The Ethernet types of a VLAN tag (802.1Q) and a service tag (802.1ad).
pub const ETHERTYPE_VLAN: [u16; 2] = [0x8100, 0x88a8];

impl Table {
    /// Adds (or replaces) the named set `name`.
    pub fn add_set(
        &mut self,
        name: &str,
        key: SetKey,
        interval: bool,
        comment: &str,
        elements: BTreeSet<Element>,
    ) {
        self.sets.insert(
            name.to_string(),
            Set {
                name: name.to_string(),
                key,
                interval,
                comment: comment.to_string(),
                elements,
            },
        );
    }

    /// Number of rules in all chains.
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(|c| c.rules.len()).sum()
    }

    /// Number of set and map elements.
    pub fn element_count(&self) -> usize {
        self.sets.values().map(|s| s.elements.len()).sum::<usize>()
            + self.maps.values().map(|m| m.elements.len()).sum::<usize>()
    }
}
