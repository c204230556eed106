//! The anti-spoofing guard: table `bridge nftpol`, which drops what a local pod sends from its
//! veth with a source address that is not the pod's own, and, pod to pod on the node, IP to a
//! pod's veth at an address that is not the pod's (broadcast, multicast, link-local).
//!
//! Policy rules match pods by address, so a pod that forged another pod's address (or an
//! address an ipBlock allows) would pass them. Bridged and routed pod traffic alike enters the
//! node through the pod's veth, a port of the CNI bridge (`cni0`, `cbr0`), where the bridge
//! family's prerouting hook sees every frame before `br_netfilter` hands it to the inet hooks.
//!
//! | object | kind | what it does |
//! | --- | --- | --- |
//! | `prerouting` | base chain, bridge hook prerouting, priority filter, policy accept | IPv4 from a guarded veth, its pod's link-layer address and its pod's own address is accepted (one lookup, the common case); other VLAN-tagged frames from any veth not in `elsewhere` are dropped; anything else from a guarded veth with a link-layer address that is not its pod's is dropped; router and neighbour advertisements and redirects from a guarded veth go to `neighbour`; IPv6 from the pod's own address is accepted; anything else from a guarded veth goes to `guard`; from any other veth not in `elsewhere` (a pod not guarded yet, or not matched to its veth; by kind, whatever its name), frames from a guarded pod's link-layer address, IP and ARP from a guarded pod's address, and neighbour advertisements for one, are dropped; and from a veth on one of the pods' bridges (`ports`), IP from outside the bridges' subnets (`bridgenets4`/`bridgenets6`) is dropped |
//! | `forward` | base chain, bridge hook forward, priority filter, policy accept | between two ports (pod to pod on this node): a frame to a guarded pod's MAC by another port (a flood: the bridge forgot the MAC) is dropped; ARP and neighbour discovery are accepted, then IP leaving by a guarded veth to an address that is not its pod's (broadcast, multicast, link-local), and IPv6 entering from a guarded veth with a link-local source, is dropped |
//! | `veths` | set of `ifname` | host-side veths of local pods |
//! | `elsewhere` | set of `ifname` | the veths on other bridges (`docker0`, a secondary network's), which the rules for other veths leave alone |
//! | `isolated` | set of `ifname` | the veths of local pods that a policy isolates for egress |
//! | `src4`/`src6` | set of `ifname . addr` | each veth with its pod's addresses |
//! | `macs` | set of `ifname . ether_addr` | each veth with its pod's link-layer address (none for a pod whose address another veth's pod has too) |
//! | `own4` | set of `iface_index . ether_addr . ipv4_addr` | the elements of `macs` and `src4` joined, the veth by its interface index: the common case in one lookup, on a key of 16 bytes rather than 28 |
//! | `guardedmacs` | set of `ether_addr` | the link-layer addresses of the guarded pods (shared ones included), which `prerouting` drops from any other veth |
//! | `guarded4`/`guarded6` | set of `addr` | the addresses in `src4`/`src6`, which `prerouting` drops from any other veth, and the contested addresses ([`Guard::contested`]), which no veth may send from |
//! | `targets6` | set of `typeof @th,64,128` | the addresses of `guarded6`, keyed on a neighbour advertisement's target |
//! | `target6` | set of `typeof iifname . @th,64,128` | each veth with the IPv6 addresses its pod may advertise (the elements of `src6`, keyed on the advertisement's target) |
//! | `ports` | set of `ifname` | the veths on the guarded pods' bridges ([`Guard::ports`] and the pods' own) |
//! | `bridgenets4`/`bridgenets6` | interval sets | the subnets of those bridges' own addresses ([`Guard::bridges`]), out of which their pods' addresses come; the whole family for a bridge with no subnet of it; and (IPv6) `::` and `fe80::/10` |
//! | `linklocal6` | interval set | `::` and `fe80::/10`: sources of IPv6 neighbour discovery and DAD; between pods, of nothing else; from a pod isolated for egress, of nothing else but MLD reports and done messages |
//! | `neighbour` | regular chain | neighbour discovery behind an extension header, router advertisements and redirects are dropped, and neighbour advertisements whose target is neither link-local nor in `target6`; the rest returns |
//! | `guard` | regular chain | ARP from the pod's own addresses and ARP probes are accepted; from IPv6 link-local sources, neighbour discovery and MLD reports and done messages are accepted, anything else from an `isolated` veth is dropped and the rest is accepted; everything else is dropped. No verdict here returns: a guarded veth's frames never meet the rules for other veths |
//!
//! A pod is no router: its router advertisements and redirects are dropped. Receivers accept
//! them only from a link-local source, so without this a pod could make itself the default
//! router of every pod on the bridge that accepts advertisements.
//!
//! A pod's frames also come from its own link-layer address (its end of the veth, as discovery
//! reads it): the bridge learns from each frame's source address which port that address is
//! behind, so one frame from a neighbour's would send the neighbour's traffic from the node to
//! this pod's port, where a packet socket reads it. When two veths' pods have the same address
//! (one set it with CAP_NET_ADMIN), neither's frames are taken: both pods are cut off until one
//! gives it back, rather than one of them taking the other's traffic. The bridge also learns
//! from frames to its reserved group addresses, which never meet these chains; the agent sets
//! the bridge's `no_linklocal_learn` for those (`agent::veth::stop_link_local_learning`). Outside
//! these tables, the agent also pins each guarded pod's MAC to its veth in the bridge's
//! forwarding database (`agent::veth::pin_macs`), so that the bridge never floods the node's
//! frames for it to every port.
//!
//! Likewise for IP addresses: when the pods of two veths carry one pod's addresses (one put a
//! neighbour's on its interface), the agent keeps the pod on the veth it had; when it cannot
//! tell which that was, the addresses are [`Guard::contested`]: in `guarded4`/`guarded6` with
//! no veth of their own, so no veth's frames from them are taken.
//!
//! ARP and IPv6 neighbour discovery are held to the same rule as IP: a pod announcing another
//! pod's address (`arp saddr ip`, or the target of a neighbour advertisement) would poison the
//! node's and its neighbours' caches and receive that pod's traffic. An advertisement is checked
//! before its source, since one sent from the pod's own address may still name a neighbour's.
//! nft 1.0.6 has no name for the target field, so `target6` is keyed on the raw payload (`nft
//! list` shows its addresses as 128-bit numbers); link-local targets are not checked.
//!
//! A frame to one of the bridge's reserved group addresses (01:80:c2:00:00:0x) meets neither
//! chain: the bridge hands it to the node's IP stack as received by the veth itself. That is the
//! one way from a veth to the node that is not through the bridge, and `inet nftpol`'s `input`
//! closes it: it drops anything from the veths of [`INPUT_VETHS`], which [`veths_delta`] keeps
//! equal to the veths on the guarded pods' bridges ([`Guard::ports`]). Only unicast from no local pod is accepted before that drop: a
//! reserved group address is a multicast one, so such a frame is never unicast.
//!
//! A veth not in `veths` (a pod the agent was not told of yet, a pod not matched to its veth,
//! a veth that is no bridge port) is not checked against its own pod: its pod is still enforced
//! by address in `inet nftpol`. Unless it is known to be on another bridge (`elsewhere`), it
//! sends no tagged frames, no IP or ARP from a guarded pod's address (which only that pod's
//! veth carries), no neighbour advertisement for one or behind an extension header, and no
//! router advertisement or redirect. These rules go by the interface's
//! kind, so they hold from the moment a veth appears, and while no agent runs; the agent lists
//! a veth of another bridge when the kernel reports it, or within a second, while it runs. If it is a port of
//! a guarded pod's bridge ([`Guard::ports`]), it sends nothing straight to the node either.
//! On a guarded pod's bridge, once the agent lists it in `ports` (when the kernel reports it on
//! the bridge, or within a second; while the agent runs), it sends IP from no address outside the bridges' subnets
//! either: not a remote pod's, nor one an ipBlock admits, which would pass the policies of the
//! pod it reaches and escape its own pod's egress rules. (What it sends from another address
//! of the bridges' subnets, an unguarded neighbour's, is not checked. By name, not kind: a
//! veth of another bridge, `docker0`'s, sends from that bridge's subnet, and must not lose its
//! first moments. `meta ibrname`, the bridge a frame came through, would do without the list,
//! but needs `CONFIG_NFT_BRIDGE_META`, which the kernel here lacks.) A port that is no veth (an
//! uplink) is not touched.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::compile::{comment, Compiler};
use crate::diff::Delta;
use crate::ir::{
    AddrField, BaseChain, Chain, Element, Family, Hook, IfName, Mac, Match, Protocol, Rule, SetKey,
    Table, TableFamily, Verdict, ETHERTYPE_VLAN, MLD_LISTENER_TYPES, ND_NEIGHBOR_ADVERT, ND_TYPES,
    ROUTER_ND_TYPES, TABLE_NAME, VXLAN_PORTS,
};
use crate::policy::{int_addr, net_range};

/// The guard's set of the addresses of `family` that guarded pods send from.
fn guarded_set(family: Family) -> String {
    format!("guarded{}", family.digit())
}

/// The set of `inet nftpol` whose veths its `input` chain drops everything from (what a bridge
/// hands to the node as received by the port itself). The compiler leaves it empty; on the
/// node, [`veths_delta`] fills it with the veths on the guarded pods' bridges (`ports`).
pub const INPUT_VETHS: &str = "veths";

/// What brings `table`'s [`INPUT_VETHS`] set to the ports of `guard`.
pub fn veths_delta(table: &Table, guard: &Guard) -> Delta {
    let want: BTreeSet<Element> = guard.all_ports().map(Element::Iface).collect();
    let mut delta = Delta::default();
    if let Some(set) = table.sets.get(INPUT_VETHS) {
        for element in set.elements.difference(&want) {
            delta.remove_element(INPUT_VETHS, *element);
        }
        for element in want.difference(&set.elements) {
            delta.add_element(INPUT_VETHS, *element);
        }
    }
    delta
}

/// A copy of the policy table `table` whose [`INPUT_VETHS`] set lists the ports of `guard`.
pub fn with_veths(table: &Table, guard: &Guard) -> Table {
    let mut table = table.clone();
    table.apply(&veths_delta(&table, guard));
    table
}

/// What a node's guard is built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guard {
    /// The local pods whose veths the agent found.
    pub pods: Vec<GuardedPod>,
    /// Every veth that is a port of those pods' bridges: theirs, and those of pods the agent
    /// does not guard (not told of yet, or not matched to a veth).
    pub ports: Vec<IfName>,
    /// The veths that are ports of other bridges (`docker0`, a secondary network's), which
    /// the guard leaves alone.
    pub elsewhere: Vec<IfName>,
    /// Addresses of local pods that the pods of more than one veth carry, none of them known
    /// to be the pod's own (one took a neighbour's addresses with CAP_NET_ADMIN): sent from
    /// no veth, like a guarded pod's from any veth but its own.
    pub contested: Vec<IpAddr>,
    /// The bridges whose ports `ports` are, with the subnets of their own addresses.
    pub bridges: Vec<PodBridge>,
}

/// A bridge of the guarded pods (`cni0`, `cbr0`), with the subnets of its own addresses: the
/// pods' gateway, whose subnet the CNI hands its pods' addresses out of (Flannel's and
/// kubenet's `host-local` ranges are the node's pod CIDR, the bridge's subnet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodBridge {
    pub name: IfName,
    /// The subnets of the bridge's addresses, link-local ones left out. A family with none
    /// here (or only a host route, /32 or /128, which says nothing of the pods') is not
    /// checked on this bridge.
    pub nets: Vec<IpNet>,
}

/// The set of the addresses of `family` that veths on the pods' bridges may send from.
fn bridge_nets_set(family: Family) -> String {
    format!("bridgenets{}", family.digit())
}

/// The elements of [`bridge_nets_set`]: the bridges' subnets of `family`, the whole family
/// for a bridge with none (or when no bridge is known), and (IPv6) the unspecified and
/// link-local sources of neighbour discovery. Merged, as an interval set holds no two ranges
/// that overlap.
fn bridge_nets(bridges: &[PodBridge], family: Family) -> BTreeSet<Element> {
    let whole = |family: Family| match family {
        Family::V4 => IpNet::from(Ipv4Net::default()),
        Family::V6 => IpNet::from(Ipv6Net::default()),
    };
    let mut nets: Vec<IpNet> = Vec::new();
    if bridges.is_empty() {
        nets.push(whole(family));
    }
    for bridge in bridges {
        let own: Vec<IpNet> = bridge
            .nets
            .iter()
            .filter(|net| Family::of_net(net) == family && net.prefix_len() < net.max_prefix_len())
            .map(IpNet::trunc)
            .collect();
        if own.is_empty() {
            nets.push(whole(family));
        }
        nets.extend(own);
    }
    if family == Family::V6 && !bridges.is_empty() {
        nets.extend(link_local_sources());
    }
    let mut ranges: Vec<(u128, u128)> = nets.iter().map(net_range).collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::new();
    for (lo, hi) in ranges {
        match merged.last_mut() {
            Some((_, end)) if lo <= end.saturating_add(1) => *end = (*end).max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    let v4 = family == Family::V4;
    merged
        .into_iter()
        .map(|(lo, hi)| Element::Range(int_addr(lo, v4), int_addr(hi, v4)))
        .collect()
}

/// `::/128` and `fe80::/10`: the sources of IPv6 neighbour discovery and DAD.
fn link_local_sources() -> [IpNet; 2] {
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0);
    [
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128)),
        IpNet::V6(Ipv6Net::new_assert(link_local, 10)),
    ]
}

impl From<Vec<GuardedPod>> for Guard {
    /// `pods`, with no veth on their bridges but theirs and none on other bridges.
    fn from(pods: Vec<GuardedPod>) -> Self {
        Self {
            pods,
            ..Self::default()
        }
    }
}

impl Guard {
    /// The guarded pods' veths and the other ports, each once.
    fn all_ports(&self) -> impl Iterator<Item = IfName> + '_ {
        let all: BTreeSet<IfName> = self
            .pods
            .iter()
            .map(|p| p.veth)
            .chain(self.ports.iter().copied())
            .collect();
        all.into_iter()
    }
}

/// A local pod whose host-side veth the agent found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardedPod {
    pub veth: IfName,
    /// The veth's interface index, which keys the common case's lookup (`own4`).
    pub index: u32,
    /// Every address the pod may send from.
    pub ips: Vec<IpAddr>,
    /// The link-layer address of the pod's end of the veth, which its frames carry.
    pub mac: Mac,
    /// Whether another veth's far end has `mac` too (a pod that took its neighbour's): then
    /// neither can tell its frames from the other's, and no frame from the veth is the pod's.
    pub mac_shared: bool,
    /// Whether a policy isolates the pod for egress: then it sends from its link-local
    /// address nothing but neighbour discovery and MLD reports and done messages.
    pub egress_isolated: bool,
}

impl GuardedPod {
    /// The local pod at `ips` behind `veth` (interface `index`), whose frames come from `mac`
    /// (shared with another veth if `mac_shared`), isolated for egress as `compiler`'s
    /// policies say.
    pub fn new(
        compiler: &Compiler,
        veth: IfName,
        index: u32,
        ips: Vec<IpAddr>,
        mac: Mac,
        mac_shared: bool,
    ) -> Self {
        let mut pod = Self {
            veth,
            index,
            ips,
            mac,
            mac_shared,
            egress_isolated: false,
        };
        pod.follow_policies(compiler);
        pod
    }

    /// Whether the pod is isolated for egress, as `compiler`'s policies say now.
    pub fn follow_policies(&mut self, compiler: &Compiler) {
        self.egress_isolated = self.ips.iter().any(|ip| compiler.isolates_egress(*ip));
    }
}

/// The guard table of `node`.
pub fn guard_table(node: &str, guard: &Guard) -> Table {
    let pods = &guard.pods;
    let mut table = Table {
        family: TableFamily::Bridge,
        name: TABLE_NAME.to_string(),
        comment: comment(format!(
            "anti-spoofing for the pods of node {node}, managed by nftpol"
        )),
        ..Table::default()
    };
    table.add_set(
        "veths",
        SetKey::Iface,
        false,
        "host-side veths of local pods",
        pods.iter().map(|p| Element::Iface(p.veth)).collect(),
    );
    table.add_set(
        "elsewhere",
        SetKey::Iface,
        false,
        "veths on other bridges, left alone",
        guard.elsewhere.iter().map(|v| Element::Iface(*v)).collect(),
    );
    for family in Family::BOTH {
        let elements = pods
            .iter()
            .flat_map(|p| p.ips.iter().map(|ip| (p.veth, *ip)))
            .filter(|(_, ip)| Family::of(ip) == family)
            .map(|(veth, ip)| Element::IfaceAddr(veth, ip))
            .collect();
        table.add_set(
            &format!("src{}", family.digit()),
            SetKey::IfaceAddr(family),
            false,
            "each veth with its pod's addresses",
            elements,
        );
        let addresses = pods
            .iter()
            .flat_map(|p| p.ips.iter())
            .chain(&guard.contested)
            .filter(|ip| Family::of(ip) == family)
            .map(|ip| Element::Addr(*ip))
            .collect();
        table.add_set(
            &guarded_set(family),
            SetKey::Addr(family),
            false,
            "the addresses of the pods on veths: sent from those veths only (contested ones from none)",
            addresses,
        );
    }
    // A pod's frames come from its own link-layer address too: the bridge learns from each
    // frame's source which port an address is behind, so a frame from a neighbour's would take
    // the neighbour's traffic from the node to this pod's port.
    let bound = || pods.iter().filter(|p| !p.mac_shared);
    table.add_set(
        "macs",
        SetKey::IfaceMac,
        false,
        "each veth with its pod's link-layer address",
        bound().map(|p| Element::IfaceMac(p.veth, p.mac)).collect(),
    );
    table.add_set(
        "own4",
        SetKey::IndexMacAddr(Family::V4),
        false,
        "each veth (by interface index) with its pod's link-layer address and IPv4 addresses",
        bound()
            .flat_map(|p| p.ips.iter().map(move |ip| (p, *ip)))
            .filter(|(_, ip)| ip.is_ipv4())
            .map(|(p, ip)| Element::IndexMacAddr(p.index, p.mac, ip))
            .collect(),
    );
    table.add_set(
        "guardedmacs",
        SetKey::Mac,
        false,
        "the link-layer addresses of the pods on veths: sent from those veths only",
        pods.iter().map(|p| Element::Mac(p.mac)).collect(),
    );
    table.add_set(
        "isolated",
        SetKey::Iface,
        false,
        "veths of local pods isolated for egress",
        pods.iter()
            .filter(|p| p.egress_isolated)
            .map(|p| Element::Iface(p.veth))
            .collect(),
    );
    let guarded6 = table.sets[&guarded_set(Family::V6)].elements.clone();
    table.add_set(
        "targets6",
        SetKey::NdTarget,
        false,
        "the addresses of guarded6, as the target of a neighbour advertisement",
        guarded6,
    );
    table.add_set(
        "target6",
        SetKey::IfaceNdTarget,
        false,
        "each veth with the IPv6 addresses its pod may advertise",
        pods.iter()
            .flat_map(|p| p.ips.iter().map(|ip| (p.veth, *ip)))
            .filter(|(_, ip)| ip.is_ipv6())
            .map(|(veth, ip)| Element::IfaceAddr(veth, ip))
            .collect(),
    );
    table.add_set(
        "linklocal6",
        SetKey::Addr(Family::V6),
        true,
        "unspecified and link-local sources: neighbour discovery",
        link_local_sources()
            .iter()
            .map(|net| Element::Range(net.network(), net.broadcast()))
            .collect(),
    );
    table.add_set(
        "ports",
        SetKey::Iface,
        false,
        "veths on the bridges of local pods' veths",
        guard.all_ports().map(Element::Iface).collect(),
    );
    for family in Family::BOTH {
        table.add_set(
            &bridge_nets_set(family),
            SetKey::Addr(family),
            true,
            "the subnets of those bridges' addresses, which their pods' addresses are in",
            bridge_nets(&guard.bridges, family),
        );
    }
    let from_veth = || Match::IifnameInSet {
        set: "veths".into(),
    };
    let rule = |matches, verdict, comment: &str| Rule {
        matches,
        verdict,
        comment: Some(comment.to_string()),
    };
    let mut guard = vec![
        // Every verdict here is final (accept or drop, never return): what `prerouting` does
        // after the jump is meant for other veths, and would drop a guarded pod's own frames
        // (its ARP, its link-local traffic) by its own addresses and link-layer address.
        rule(
            vec![Match::IifnameArpSenderInSet { set: "src4".into() }],
            Verdict::Accept,
            "ARP from the pod's own address",
        ),
        rule(
            vec![Match::ArpSender(Ipv4Addr::UNSPECIFIED)],
            Verdict::Accept,
            "ARP probe: address conflict detection",
        ),
        rule(
            vec![Match::Arp],
            Verdict::Drop,
            "ARP claiming an address that is not the pod's",
        ),
    ];
    let link_local_source = || Match::AddrInSet {
        family: Family::V6,
        field: AddrField::Source,
        set: "linklocal6".into(),
    };
    let mut signalling = ND_TYPES.to_vec();
    signalling.extend(MLD_LISTENER_TYPES);
    signalling.sort_unstable();
    // A pod's egress rules see it by its pod addresses: from its link-local address it would
    // reach its node (`input` cannot tell which pod sent), past its egress isolation.
    guard.extend([
        rule(
            vec![Match::Icmpv6Type(signalling), link_local_source()],
            Verdict::Accept,
            "IPv6 neighbour discovery, MLD reports and done messages",
        ),
        rule(
            vec![
                link_local_source(),
                Match::IifnameInSet {
                    set: "isolated".into(),
                },
            ],
            Verdict::Drop,
            "from the link-local address of a pod isolated for egress",
        ),
    ]);
    // `inet nftpol` drops VXLAN from local pods by their pod addresses, which a link-local
    // source is not.
    guard.extend(VXLAN_PORTS.map(|port| {
        rule(
            vec![
                link_local_source(),
                Match::Protocol(Protocol::Udp),
                Match::DestinationPort(port, port),
            ],
            Verdict::Drop,
            "VXLAN from a pod's link-local address: an overlay packet of its own making",
        )
    }));
    guard.push(rule(
        vec![link_local_source()],
        Verdict::Accept,
        "from the link-local address of a pod whose egress is open",
    ));
    guard.push(rule(
        Vec::new(),
        Verdict::Drop,
        "a source address that is not the pod's",
    ));
    // Neighbour discovery that speaks for others, checked before the source address: an
    // advertisement from the pod's own address may still claim a neighbour's.
    let neighbour = vec![
        // A fragment header would keep the target out of the first fragment, where the rule
        // below could not read it; neighbour discovery is never fragmented (RFC 6980).
        rule(
            vec![Match::Icmpv6NotNextHeader],
            Verdict::Drop,
            "neighbour discovery behind an extension header",
        ),
        rule(
            vec![Match::Icmpv6Type(ROUTER_ND_TYPES.to_vec())],
            Verdict::Drop,
            "router advertisement or redirect: a pod is no router",
        ),
        rule(
            vec![
                Match::Icmpv6Type(vec![ND_NEIGHBOR_ADVERT]),
                Match::NdTargetNotLinkLocal,
                Match::IifnameNdTargetNotInSet {
                    set: "target6".into(),
                },
            ],
            Verdict::Drop,
            "neighbour advertisement for an address that is not the pod's",
        ),
    ];
    let mut spoken: Vec<u8> = ROUTER_ND_TYPES.to_vec();
    spoken.push(ND_NEIGHBOR_ADVERT);
    // In number order, as the writer sends the set and nft keeps the text's order.
    spoken.sort_unstable();
    // IPv4's own-address check is the first rule, with the link-layer address in its key.
    let own_address6 = rule(
        vec![Match::IifnameSourceInSet {
            family: Family::V6,
            set: "src6".into(),
        }],
        Verdict::Accept,
        "from a local pod's veth, from the pod's own address",
    );
    // IPv6 only, so IPv4 is accepted before it; ahead of the IPv6 source check, since an
    // advertisement sent from the pod's own address may still speak for a neighbour.
    let advertisements = rule(
        vec![Match::Icmpv6Type(spoken), from_veth()],
        Verdict::Jump("neighbour".into()),
        "neighbour discovery from a local pod's veth that speaks for others",
    );
    // The checks above read the Ethernet type as on the wire, the source checks read the
    // protocol past any VLAN tag: a tagged frame would meet only the latter, and receivers take
    // a tag of ID 0 for none. Pods send untagged frames. (IPv4 from the pod's own address is
    // accepted before this, tagged or not: its source is checked, and nothing else is.)
    // The same for every veth but those on other bridges (`elsewhere`): the drops of a
    // guarded pod's address from other veths below read the protocol past one tag at most
    // (ARP's and advertisements', none). By kind, not by a list of the pods' veths, so a veth
    // that appeared since the agent last looked (or while no agent runs) is held to them too.
    // Each drop for such a veth: `before`, then the veth test, then `after`.
    let from_pods_veth = |before: Option<Match>, after: Option<Match>, comment: &str| {
        let veth = [
            Match::IifkindVeth,
            Match::IifnameNotInSet {
                set: "elsewhere".into(),
            },
        ];
        let matches = before.into_iter().chain(veth).chain(after).collect();
        rule(matches, Verdict::Drop, comment)
    };
    let tagged = ETHERTYPE_VLAN.map(|tag| {
        from_pods_veth(
            Some(Match::EtherType(tag)),
            None,
            "a tagged frame from a pod's veth",
        )
    });
    // IPv4 from the pod's own link-layer and IP address in one lookup: the common case.
    let mut prerouting = vec![rule(
        vec![Match::IifEtherSourceInSet {
            family: Family::V4,
            set: "own4".into(),
        }],
        Verdict::Accept,
        "from a local pod's veth, from the pod's own link-layer and IPv4 address",
    )];
    prerouting.extend(tagged);
    prerouting.extend([
        // Everything after this rule from a guarded veth comes from its pod's link-layer
        // address.
        rule(
            vec![
                from_veth(),
                Match::IifnameEtherNotInSet { set: "macs".into() },
            ],
            Verdict::Drop,
            "from a local pod's veth, from a link-layer address that is not the pod's",
        ),
        advertisements,
        own_address6,
        rule(
            vec![from_veth()],
            Verdict::Jump("guard".into()),
            "anything else from a local pod's veth",
        ),
    ]);
    // From any other pod's veth: a pod the agent was not told of yet, or whose veth it did
    // not match, can send what it likes, but not as a guarded pod; nor neighbour discovery that
    // only a router sends, or an advertisement that could hide its target (RFC 6980: neighbour
    // discovery is never fragmented, and a first fragment can keep the target out of the
    // target rule). (Last, so a guarded pod's own frames never meet these with its own
    // address: they were accepted or judged above.)
    let advert = || Some(Match::Icmpv6Type(vec![ND_NEIGHBOR_ADVERT]));
    let from_guarded = |family: Family| {
        Some(Match::AddrInSet {
            family,
            field: AddrField::Source,
            set: guarded_set(family),
        })
    };
    let as_guarded = "a guarded pod's address from another veth";
    prerouting.extend([
        from_pods_veth(
            None,
            Some(Match::EtherSourceInSet {
                set: "guardedmacs".into(),
            }),
            "a guarded pod's link-layer address from another veth",
        ),
        from_pods_veth(
            Some(Match::Icmpv6Type(ROUTER_ND_TYPES.to_vec())),
            None,
            "router advertisement or redirect from another veth: a pod is no router",
        ),
        from_pods_veth(
            advert(),
            Some(Match::Icmpv6NotNextHeader),
            "neighbour advertisement behind an extension header from another veth",
        ),
        from_pods_veth(None, from_guarded(Family::V4), as_guarded),
        from_pods_veth(None, from_guarded(Family::V6), as_guarded),
        from_pods_veth(
            None,
            Some(Match::ArpSenderInSet {
                set: guarded_set(Family::V4),
            }),
            "ARP claiming a guarded pod's address from another veth",
        ),
        from_pods_veth(
            advert(),
            Some(Match::NdTargetInSet {
                set: "targets6".into(),
            }),
            "neighbour advertisement for a guarded pod's address from another veth",
        ),
    ]);
    // Nor from outside its bridge's subnets: a remote pod's address, or one an ipBlock
    // admits, would pass the policies of the pod it reaches, and its own pod's egress rules,
    // which see it by its pod address, would never see it.
    prerouting.extend(Family::BOTH.map(|family| {
        rule(
            vec![
                Match::IifnameInSet {
                    set: "ports".into(),
                },
                Match::AddrNotInSet {
                    family,
                    field: AddrField::Source,
                    set: bridge_nets_set(family),
                },
            ],
            Verdict::Drop,
            "an address outside the bridge's subnets from another veth",
        )
    }));
    // Between two ports: pod to pod on this node. Policies see pods by their pod addresses;
    // IP to any other address (broadcast, multicast, link-local, whatever the frame's
    // Ethernet destination) would pass the inet table untouched, past any isolation. Pod to
    // pod, nothing else is needed: a routed CNI (Calico, Cilium) never carries it, and neither
    // does Flannel's overlay between nodes. ARP and neighbour discovery, whose claims
    // `prerouting` checks, are let through first; what is left of link-local is a pod sending from
    // its link-local address to a neighbour's pod address, past its own egress isolation.
    let to_veth = || Match::OifnameInSet {
        set: "veths".into(),
    };
    let not_to_pod = |family: Family| Match::OifnameDestinationNotInSet {
        family,
        set: format!("src{}", family.digit()),
    };
    // Between pods, a frame to a guarded pod's MAC leaves only by that pod's veth. The bridge
    // floods a frame to a MAC it has forgotten (a pod quiet for its ageing time, 300 s by
    // default, or one whose MAC another pod shares, whose frames are all dropped) to every
    // port, where a neighbour's packet socket would read it. (The node's own frames, which
    // meet the bridge's output hook instead, are not checked: a chain there cost every packet
    // routed to a pod several points of connection rate.)
    let to_its_pod = rule(
        vec![
            Match::EtherDestInSet {
                set: "guardedmacs".into(),
            },
            Match::OifnameEtherDestNotInSet { set: "macs".into() },
        ],
        Verdict::Drop,
        "to a guarded pod's MAC by another port: a flood",
    );
    let forward = vec![
        to_its_pod,
        rule(
            vec![Match::Arp],
            Verdict::Accept,
            "ARP, its sender checked on entry",
        ),
        rule(
            vec![Match::Icmpv6Type(ND_TYPES.to_vec())],
            Verdict::Accept,
            "neighbour discovery, advertisements checked on entry",
        ),
        rule(
            vec![not_to_pod(Family::V4), to_veth()],
            Verdict::Drop,
            "to a local pod's veth, to an address that is not the pod's",
        ),
        rule(
            vec![not_to_pod(Family::V6), to_veth()],
            Verdict::Drop,
            "to a local pod's veth, to an address that is not the pod's",
        ),
        rule(
            vec![link_local_source(), from_veth()],
            Verdict::Drop,
            "from a local pod's link-local address",
        ),
    ];
    table.chains = [
        Chain {
            name: "forward".into(),
            base: Some(BaseChain {
                hook: Hook::Forward,
                priority: 0,
            }),
            comment: "frames from one bridge port to another: pod to pod on this node".into(),
            rules: forward,
        },
        Chain {
            name: "prerouting".into(),
            base: Some(BaseChain {
                hook: Hook::Prerouting,
                priority: 0,
            }),
            comment: "frames entering the bridge".into(),
            rules: prerouting,
        },
        Chain {
            name: "guard".into(),
            base: None,
            comment: "drop forged source addresses".into(),
            rules: guard,
        },
        Chain {
            name: "neighbour".into(),
            base: None,
            comment: "drop router advertisements, redirects and neighbour advertisements for others' addresses".into(),
            rules: neighbour,
        },
    ]
    .into_iter()
    .map(|c| (c.name.clone(), c))
    .collect();
    table
}
