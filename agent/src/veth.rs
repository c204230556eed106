//! Which host-side veth carries each local pod's addresses, asked of the kernel itself.
//!
//! ```text
//! RTM_GETLINK dump ─> veths: name, ifindex, bridge (IFLA_MASTER, if a bridge), peer (IFLA_LINK_NETNSID, IFLA_LINK)
//!   per distinct peer netns id: RTM_GETADDR dumps with IFA_TARGET_NETNSID ─> the peer's addresses,
//!     RTM_GETLINK dump with IFLA_TARGET_NETNSID ─> the peer's link-layer address
//!   veths still unresolved (no netns id, dump failed):
//!     bridge neighbours (RTM_GETNEIGH: IP -> MAC) ⋈ bridge fdb (AF_BRIDGE: MAC -> port)
//! ─> Discovery: IP -> veth; an address two veths claim goes to neither; a MAC two veths' peers
//!    have is marked shared
//! Discovery + the compiler's local pods + each pod's veth last time ─> guarded_pods: each pod's
//!   veth, by the addresses on it, if a bridge port; a pod whose addresses two veths carry keeps
//!   its veth of last time, or else is contested (its addresses sent from neither)
//! Discovery + guard ─> link_local_learners: the guarded pods' bridges without no_linklocal_learn
//!   ─> stop_link_local_learning (RTM_NEWLINK, IFLA_BR_MULTI_BOOLOPT)
//! guarded pods + what is pinned ─> PinPlan ─> pin_macs (RTM_NEWNEIGH/RTM_DELNEIGH AF_BRIDGE):
//!   each guarded pod's MAC pinned to its veth, a static fdb entry, where the fdb has it nowhere else
//! ```
//!
//! Those two are the only changes made here, both to the bridges of guarded pods.
//!
//! Nothing here trusts interface names: a veth is what IFLA_INFO_KIND says, its pod is whatever
//! sits at the other end.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    BridgeBooleanOptionFlags, BridgeBooleanOptions, InfoBridge, InfoData, InfoKind, LinkAttribute,
    LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use ruleset::guard::{Guard, GuardedPod, PodBridge};
use ruleset::ir::{IfName, Mac};
use ruleset::Compiler;

/// A veth's host side and the addresses found behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veth {
    pub name: String,
    pub index: u32,
    /// The bridge it is a port of (`cni0`, `cbr0`), if any; `None` also when its master is no
    /// bridge (a bond, say).
    pub bridge: Option<String>,
    /// The peer's netns id as seen from here (IFLA_LINK_NETNSID); `None` when the kernel gave
    /// none (same namespace, or it could not allocate one).
    pub peer_netns_id: Option<i32>,
    /// The peer's ifindex inside its own namespace (IFLA_LINK).
    pub peer_index: Option<u32>,
    /// How `addresses` were found; every address of one veth comes from one method.
    pub method: Method,
    /// The peer's addresses, sorted, IPv6 link-local left out, and without any address that
    /// another veth claims too (see [`Discovery::conflicts`]).
    pub addresses: Vec<IpAddr>,
    /// The peer's link-layer address, which the pod's frames carry: read from the peer's
    /// namespace, or, from the bridge tables, the one MAC behind the port (`None` when there
    /// are several, or none).
    pub mac: Option<Mac>,
}

/// How a veth's addresses were learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Read from the peer's own namespace: every address the pod holds.
    PeerNamespace,
    /// Inferred from the bridge's neighbour table joined with its fdb: only addresses the node
    /// has talked to recently, so possibly incomplete.
    BridgeTables,
    /// Neither worked (no netns id or a failed dump, and no bridge or failed bridge dumps);
    /// [`Discovery::failures`] says why.
    Unknown,
}

/// One netlink request, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Every link of this namespace.
    Links,
    /// One family's addresses in this namespace: the node's own, the bridges' among them.
    Addresses { family: Family },
    /// One family's addresses in the namespace this one knows as `netns_id`. One dump per
    /// family: AF_UNSPEC would hand the request to every family that dumps addresses, not all
    /// of which honour IFA_TARGET_NETNSID.
    PeerAddresses { netns_id: i32, family: Family },
    /// The links of the namespace this one knows as `netns_id`.
    PeerLinks { netns_id: i32 },
    /// The IPv4 and IPv6 neighbour tables (ARP, NDP).
    Neighbours,
    /// The bridges' forwarding databases.
    BridgeFdb,
    /// Setting `no_linklocal_learn` on a bridge.
    NoLinkLocalLearn { bridge: u32 },
    /// Pinning a MAC to a bridge port: a static fdb entry.
    PinMac { port: u32, mac: Mac },
    /// Removing such an entry.
    UnpinMac { port: u32, mac: Mac },
}

/// The address family of a peer-address dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Links => f.write_str("RTM_GETLINK dump"),
            Self::Addresses { family } => {
                let family = match family {
                    Family::Ipv4 => "AF_INET",
                    Family::Ipv6 => "AF_INET6",
                };
                write!(f, "RTM_GETADDR {family} dump (the node's own addresses)")
            }
            Self::PeerAddresses { netns_id, family } => {
                let family = match family {
                    Family::Ipv4 => "AF_INET",
                    Family::Ipv6 => "AF_INET6",
                };
                write!(
                    f,
                    "RTM_GETADDR {family} dump in the peer namespace (IFA_TARGET_NETNSID {netns_id})"
                )
            }
            Self::PeerLinks { netns_id } => write!(
                f,
                "RTM_GETLINK dump in the peer namespace (IFLA_TARGET_NETNSID {netns_id})"
            ),
            Self::Neighbours => f.write_str("RTM_GETNEIGH dump (IPv4/IPv6 neighbours)"),
            Self::BridgeFdb => f.write_str("RTM_GETNEIGH AF_BRIDGE dump (bridge fdb)"),
            Self::NoLinkLocalLearn { bridge } => write!(
                f,
                "RTM_NEWLINK setting no_linklocal_learn on bridge ifindex {bridge}"
            ),
            Self::PinMac { port, mac } => write!(
                f,
                "RTM_NEWNEIGH AF_BRIDGE pinning {} to port ifindex {port} (static)",
                ruleset::render::mac_text(mac)
            ),
            Self::UnpinMac { port, mac } => write!(
                f,
                "RTM_DELNEIGH AF_BRIDGE unpinning {} from port ifindex {port}",
                ruleset::render::mac_text(mac)
            ),
        }
    }
}

/// A failed netlink exchange, naming the request.
#[derive(Debug, thiserror::Error)]
pub enum VethError {
    #[error("opening a NETLINK_ROUTE socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{request}: talking to the kernel: {source}")]
    Io {
        request: Request,
        #[source]
        source: io::Error,
    },
    #[error("{request}: the kernel refused: {source}")]
    Refused {
        request: Request,
        #[source]
        source: io::Error,
    },
    #[error("{request}: cannot decode the reply: {source}")]
    Decode {
        request: Request,
        #[source]
        source: netlink_packet_core::DecodeError,
    },
    #[error("{request}: a {len}-byte reply does not fit the {capacity}-byte buffer")]
    Truncated {
        request: Request,
        len: usize,
        capacity: usize,
    },
    #[error("{request}: interrupted by concurrent changes {attempts} times in a row")]
    Interrupted { request: Request, attempts: u32 },
    #[error("{request}: the reply is for netns id {got:?}: the target netns id was not honoured")]
    WrongNamespace { request: Request, got: Option<i32> },
}

impl VethError {
    /// The request that failed; `None` when no socket could be opened.
    pub fn request(&self) -> Option<Request> {
        match self {
            Self::Socket(_) => None,
            Self::Io { request, .. }
            | Self::Refused { request, .. }
            | Self::Decode { request, .. }
            | Self::Truncated { request, .. }
            | Self::Interrupted { request, .. }
            | Self::WrongNamespace { request, .. } => Some(*request),
        }
    }
}

/// What the kernel said about the node's veths, joined.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Sorted by name.
    veths: Vec<Veth>,
    /// Address -> index into `veths`.
    owners: BTreeMap<IpAddr, usize>,
    conflicts: BTreeMap<IpAddr, Vec<String>>,
    /// Bridges (name -> ifindex) that learn MACs from frames to their reserved group
    /// addresses.
    learning_bridges: BTreeMap<String, u32>,
    /// Each bridge's own MAC and its ports' (name -> MACs): the node's, not any pod's.
    node_macs: BTreeMap<String, BTreeSet<Mac>>,
    /// Each bridge's own subnets (name -> subnets), link-local ones left out.
    bridge_nets: BTreeMap<String, Vec<IpNet>>,
    failures: Vec<VethError>,
}

impl Discovery {
    pub fn veths(&self) -> &[Veth] {
        &self.veths
    }

    /// The veth behind which `ip` lives; `None` for unknown and conflicting addresses.
    pub fn interface_of(&self, ip: IpAddr) -> Option<&Veth> {
        self.owners.get(&ip).and_then(|&i| self.veths.get(i))
    }

    /// Every address with its veth, in address order (conflicts left out).
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, &Veth)> + '_ {
        self.owners
            .iter()
            .filter_map(|(ip, &i)| Some((*ip, self.veths.get(i)?)))
    }

    /// Addresses that more than one veth claims, with the claimants' names. They map to none:
    /// the kernel cannot tell the pod that owns the address from one that forged or kept it
    /// (an IP reused while the old pod's sandbox lingers). [`guarded_pods`] keeps a pod on the
    /// veth it was found on before, if that is one of them; otherwise the guard drops the
    /// address from all of them.
    pub fn conflicts(&self) -> &BTreeMap<IpAddr, Vec<String>> {
        &self.conflicts
    }

    /// The other veths on `veth`'s bridge whose peers have its peer's link-layer address. The
    /// bridge cannot tell their frames apart (it learns one port per address), nor can the
    /// kernel tell the pod that owns the address from one that took it, so none of their
    /// frames is its pod's. (On another bridge, or on none, the same MAC confuses nothing.)
    ///
    /// The bridge itself is named too when the MAC is one of the node's on it (the bridge's or
    /// a port's own): the bridge would hand frames to it to the node, and pinning it to the
    /// pod's veth ([`pin_macs`]) would move the node's entry to the pod.
    pub fn sharing_mac(&self, veth: &Veth) -> Vec<&str> {
        let node = self
            .node_macs
            .iter()
            .filter(|(bridge, macs)| {
                veth.bridge.as_ref() == Some(*bridge) && veth.mac.is_some_and(|m| macs.contains(&m))
            })
            .map(|(bridge, _)| bridge.as_str());
        let pods = self
            .veths
            .iter()
            .filter(|v| {
                v.name != veth.name
                    && v.bridge.is_some()
                    && v.bridge == veth.bridge
                    && v.mac.is_some()
                    && v.mac == veth.mac
            })
            .map(|v| v.name.as_str());
        node.chain(pods).collect()
    }

    /// The subnets of bridge `name`'s own addresses (none if the address dump failed).
    pub fn bridge_nets(&self, name: &str) -> &[IpNet] {
        self.bridge_nets.get(name).map_or(&[], Vec::as_slice)
    }

    /// Whether bridge `name` learns MACs from frames to its reserved group addresses.
    pub fn learns_link_local(&self, bridge: &str) -> bool {
        self.learning_bridges.contains_key(bridge)
    }

    /// Dumps that failed without failing the discovery: peer-address dumps (their veths fell
    /// back to the bridge tables) and bridge-table dumps (their veths are [`Method::Unknown`]).
    pub fn failures(&self) -> &[VethError] {
        &self.failures
    }
}

/// What the agent logs for a guarded pod whose link-layer address another veth's pod has too.
pub const SHARED_MAC: &str = "another veth's pod, or the node on the bridge, has this pod's \
     link-layer address (MAC); the guard drops every frame from the pods that have it until \
     one gives it back";

/// What the agent logs for each pod [`guarded_pods`] reports missing.
pub const UNGUARDED: &str =
    "no bridge port carries this pod's addresses; it is enforced by address, without anti-spoofing";

/// What the agent logs for a guarded pod whose addresses another veth's pod puts on its
/// interface too (one with CAP_NET_ADMIN), naming the other veths.
pub const CLAIMED: &str = "another veth's pod carries this pod's address too; the pod keeps \
     the veth it had, and the other's frames from the address are dropped";

/// What the agent logs for each pod [`guarded_pods`] reports contested, naming the veths.
pub const CONTESTED: &str = "more than one veth's pod carries this pod's addresses and none \
     is known to be its own; no frame from the addresses is taken until one veth has them";

/// The veth a pod was last found on (name and ifindex: an index alone may come back, on a
/// veth moved in from a pod's namespace), and the discovery that found it there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Binding {
    pub name: String,
    pub index: u32,
    pub found: u64,
    /// The pod's addresses then. A pod of the same name at none of them is another pod (one
    /// recreated under its name, as a StatefulSet does, whose old sandbox may still be
    /// there), which the binding does not hold. None known (a history saved before they were
    /// kept): the binding holds whatever the pod's addresses.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl Binding {
    /// Whether this is the binding of the pod at `ips`, not of an earlier pod of its name.
    fn holds(&self, ips: &[IpAddr]) -> bool {
        self.ips.is_empty() || self.ips.iter().any(|ip| ips.contains(ip))
    }
}

/// What the agent keeps from one discovery to the next: when it first saw each veth, and
/// which veth each local pod was on.
#[derive(Debug, Default)]
pub struct History {
    /// Discoveries observed so far.
    tick: u64,
    /// Each veth present (name, ifindex), with the discovery it was first seen in.
    seen: BTreeMap<(String, u32), u64>,
    /// Each local pod's veth, as [`guarded_pods`] last gave it ([`PodVeths::bound`]).
    pub bindings: BTreeMap<String, Binding>,
}

impl History {
    /// Notes discovery `d`: the veths new in it are first seen now, those gone are forgotten.
    pub fn observe(&mut self, d: &Discovery) {
        self.tick += 1;
        let now: BTreeSet<(String, u32)> = d
            .veths()
            .iter()
            .map(|v| (v.name.clone(), v.index))
            .collect();
        self.seen.retain(|veth, _| now.contains(veth));
        for veth in now {
            self.seen.entry(veth).or_insert(self.tick);
        }
    }

    /// The history as saved: with the network namespace it belongs to (the inode of
    /// `/proc/self/ns/net`), since ifindexes and veth names mean nothing in another.
    pub fn saved(&self, netns: u64) -> SavedHistory {
        SavedHistory {
            netns,
            tick: self.tick,
            seen: self
                .seen
                .iter()
                .map(|((name, index), first)| (name.clone(), *index, *first))
                .collect(),
            bindings: self.bindings.clone(),
        }
    }

    /// The history `saved` holds, if it belongs to network namespace `netns`.
    pub fn restore(saved: SavedHistory, netns: u64) -> Option<History> {
        (saved.netns == netns).then(|| History {
            tick: saved.tick,
            seen: saved
                .seen
                .into_iter()
                .map(|(name, index, first)| ((name, index), first))
                .collect(),
            bindings: saved.bindings,
        })
    }

    /// Whether `veth` was first seen after discovery `tick`.
    fn new_since(&self, veth: &Veth, tick: u64) -> bool {
        self.seen
            .get(&(veth.name.clone(), veth.index))
            .is_none_or(|first| *first > tick)
    }
}

/// A [`History`] as the agent keeps it across restarts ([`History::saved`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedHistory {
    /// The inode of the network namespace the history was taken in.
    pub netns: u64,
    tick: u64,
    /// Each veth seen, with the discovery that first saw it: (name, ifindex, tick).
    seen: Vec<(String, u32, u64)>,
    bindings: BTreeMap<String, Binding>,
}

impl SavedHistory {
    /// The same without the discovery count, which moves every second: what tells whether
    /// anything worth writing changed.
    pub fn without_tick(&self) -> SavedHistory {
        SavedHistory {
            tick: 0,
            ..self.clone()
        }
    }
}

/// Which veth each of the compiler's local pods was found on, as [`guarded_pods`] tells it.
#[derive(Debug, Default)]
pub struct PodVeths {
    /// The guarded pods, by `namespace/name`.
    pub found: Vec<(String, GuardedPod)>,
    /// The pods no bridge-port veth was found for, or whose veth's link-layer address is not
    /// known: enforced by address only.
    pub missing: BTreeSet<String>,
    /// The pods whose addresses more than one veth's pod carries, none of them known to be the
    /// pod's own, with those veths: their addresses are sent from no veth.
    pub contested: BTreeMap<String, Vec<String>>,
    /// Guarded pods whose addresses other veths' pods carry too, with those veths.
    pub claimed: BTreeMap<String, Vec<String>>,
    /// Each guarded pod's veth: what the next call is given as `bound` (with the bindings of
    /// the pods not found this time, that are still the node's).
    pub bound: BTreeMap<String, Binding>,
    /// The addresses of the contested pods.
    addresses: Vec<IpAddr>,
}

impl PodVeths {
    /// The guarded pods alone.
    pub fn pods(&self) -> Vec<GuardedPod> {
        self.found.iter().map(|(_, pod)| pod.clone()).collect()
    }
}

/// Which of `compiler`'s local pods sends from which veth of `discovery` (none when discovery
/// failed). A veth belongs to the pod whose addresses it alone carries.
///
/// A pod stays on the veth `history` says it was found on before while that veth is there,
/// whatever addresses its pod holds now: a pod with CAP_NET_ADMIN can neither take a
/// neighbour's addresses (and veth) by putting them on its interface, nor shed its own guard
/// by removing its own. When that veth is gone (the pod's sandbox was recreated), the pod
/// moves only to a veth first seen since, and one that carries no other known pod's address:
/// a veth that was there before is another pod's, whatever addresses it holds.
///
/// When the kernel cannot tell the pod's own veth from others that carry its addresses (no
/// veth of its own known, as after a restart, and several veths carry them; or its veth gone
/// and only older veths carry them), the pod is contested, and its addresses go to
/// [`Guard::contested`], sent from none of them, rather than to a veth that may be the thief's.
/// A pod whose veth is no bridge port is not guarded: the guard's chains never see its frames,
/// and `input`'s drop of what comes straight from a guarded veth would take all its traffic to
/// the node.
pub fn guarded_pods(
    compiler: &Compiler,
    discovery: Option<&Discovery>,
    history: &History,
) -> PodVeths {
    // Every address each veth carries, those claimed by two veths included.
    let mut carried: BTreeMap<&str, BTreeSet<IpAddr>> = BTreeMap::new();
    // The veths that are bridge ports, whose frames the guard's hooks see.
    let mut bridged: BTreeSet<&str> = BTreeSet::new();
    if let Some(d) = discovery {
        for v in d.veths() {
            carried.entry(&v.name).or_default().extend(&v.addresses);
            if v.bridge.is_some() {
                bridged.insert(&v.name);
            }
        }
        for (ip, names) in d.conflicts() {
            for name in names {
                carried.entry(name).or_default().insert(*ip);
            }
        }
    }
    let owner: BTreeMap<IpAddr, String> = compiler
        .local_pods()
        .flat_map(|p| {
            p.ips
                .iter()
                .map(move |ip| (*ip, format!("{}/{}", p.namespace, p.name)))
        })
        .collect();
    // A veth belongs to the pod whose addresses it alone carries. An address on two veths
    // (a pod that took a neighbour's address too) proves nothing by itself: it goes to the
    // veth no other pod owns.
    let mut veth_owner: BTreeMap<&str, &str> = BTreeMap::new();
    if let Some(d) = discovery {
        for v in d.veths() {
            let owners: BTreeSet<&str> = v
                .addresses
                .iter()
                .filter_map(|ip| owner.get(ip).map(String::as_str))
                .collect();
            if let [only] = owners.into_iter().collect::<Vec<_>>().as_slice() {
                veth_owner.insert(&v.name, only);
            }
        }
    }
    let veth_named = |name: &str| discovery.and_then(|d| d.veths().iter().find(|v| v.name == name));
    // The veths the pods of the history are on, that are still there: each is its pod's alone.
    let held: BTreeMap<&str, &str> = history
        .bindings
        .iter()
        .filter(|(_, b)| veth_named(&b.name).is_some_and(|v| v.index == b.index))
        .map(|(id, b)| (b.name.as_str(), id.as_str()))
        .collect();
    let mut result = PodVeths::default();
    for pod in compiler.local_pods() {
        let id = format!("{}/{}", pod.namespace, pod.name);
        let owned: Vec<&str> = veth_owner
            .iter()
            .filter(|(_, o)| **o == id)
            .map(|(name, _)| *name)
            .collect();
        let candidates: Vec<&str> = if owned.is_empty() {
            carried
                .iter()
                .filter(|(name, ips)| {
                    !veth_owner.contains_key(*name) && pod.ips.iter().any(|ip| ips.contains(ip))
                })
                .map(|(name, _)| *name)
                .collect()
        } else {
            owned
        };
        // Not a veth another pod is on.
        let candidates: Vec<&str> = candidates
            .into_iter()
            .filter(|name| held.get(name).is_none_or(|o| *o == id))
            .collect();
        // Whether another veth's pod carries one of this pod's addresses too. (Two veths with
        // different addresses of one pod are no conflict, and leave the pod unguarded.)
        let conflicted =
            discovery.is_some_and(|d| pod.ips.iter().any(|ip| d.conflicts().contains_key(ip)));
        let prior = history.bindings.get(&id).filter(|b| b.holds(&pod.ips));
        let recorded = prior.and_then(|b| veth_named(&b.name).filter(|v| v.index == b.index));
        // With its veth gone, only a veth first seen since, and no other known pod's, can be
        // the pod's.
        let fresh: Vec<&str> = candidates
            .iter()
            .copied()
            .filter(|name| {
                let others = carried.get(name).is_some_and(|ips| {
                    ips.iter().any(|ip| owner.get(ip).is_some_and(|o| *o != id))
                });
                let new = prior.is_none_or(|b| {
                    veth_named(name).is_some_and(|v| history.new_since(v, b.found))
                });
                new && (prior.is_none() || !others)
            })
            .collect();
        let chosen = match (recorded, fresh.as_slice()) {
            (Some(v), _) => Some(v.name.as_str()),
            (None, [name]) => Some(*name),
            _ => None,
        };
        // Only veths that were there before carry the addresses of a pod whose veth is gone.
        let stale = prior.is_some()
            && recorded.is_none()
            && fresh.is_empty()
            && carried
                .values()
                .any(|ips| pod.ips.iter().any(|ip| ips.contains(ip)));
        let veth = chosen
            .filter(|name| bridged.contains(name))
            .and_then(|name| {
                let v = veth_named(name)?;
                let shared = discovery.is_some_and(|d| !d.sharing_mac(v).is_empty());
                Some((IfName::new(name)?, v.mac?, shared, v.index))
            });
        let others = |mine: Option<&str>| -> Vec<String> {
            carried
                .iter()
                .filter(|(name, ips)| {
                    Some(**name) != mine && pod.ips.iter().any(|ip| ips.contains(ip))
                })
                .map(|(name, _)| name.to_string())
                .collect()
        };
        match veth {
            Some((veth, mac, shared, index)) => {
                let claimants = others(Some(veth.as_str()));
                if !claimants.is_empty() {
                    result.claimed.insert(id.clone(), claimants);
                }
                result.bound.insert(
                    id.clone(),
                    Binding {
                        name: veth.as_str().to_string(),
                        index,
                        found: history.tick,
                        ips: pod.ips.clone(),
                    },
                );
                result.found.push((
                    id,
                    GuardedPod::new(compiler, veth, index, pod.ips.clone(), mac, shared),
                ));
            }
            None if (conflicted && candidates.len() > 1) || stale => {
                if let Some(binding) = prior {
                    result.bound.insert(id.clone(), binding.clone());
                }
                result.addresses.extend(&pod.ips);
                result.contested.insert(id, others(None));
            }
            None => {
                if let Some(binding) = prior {
                    result.bound.insert(id.clone(), binding.clone());
                }
                result.missing.insert(id);
            }
        }
    }
    result
}

/// The guard for the pods [`guarded_pods`] found: them, the contested addresses, and the veths
/// of `discovery` that are bridge ports, in two lists: those on a bridge one of the pods' veths
/// is a port of (the pods' own, and those of pods the agent does not guard), and those on other
/// bridges (`docker0`, a secondary network's).
pub fn guard(discovery: Option<&Discovery>, found: &PodVeths) -> Guard {
    let pods = found.pods();
    let contested = found.addresses.clone();
    let Some(d) = discovery else {
        return Guard {
            contested,
            ..pods.into()
        };
    };
    // The contested pods' bridges too: with no pod guarded there, their veths are still no
    // other network's.
    let claimants: BTreeSet<&str> = found
        .contested
        .values()
        .flatten()
        .map(String::as_str)
        .collect();
    let bridges: BTreeSet<&str> = d
        .veths()
        .iter()
        .filter(|v| {
            pods.iter().any(|p| p.veth.as_str() == v.name) || claimants.contains(v.name.as_str())
        })
        .filter_map(|v| v.bridge.as_deref())
        .collect();
    let (ours, others): (Vec<&Veth>, Vec<&Veth>) = d
        .veths()
        .iter()
        .filter(|v| v.bridge.is_some())
        .partition(|v| v.bridge.as_deref().is_some_and(|b| bridges.contains(b)));
    let names = |veths: Vec<&Veth>| veths.iter().filter_map(|v| IfName::new(&v.name)).collect();
    let bridges = bridges
        .into_iter()
        .filter_map(|name| {
            Some(PodBridge {
                name: IfName::new(name)?,
                nets: d.bridge_nets(name).to_vec(),
            })
        })
        .collect();
    Guard {
        ports: names(ours),
        elsewhere: names(others),
        pods,
        contested,
        bridges,
    }
}

/// Logs that guarded pod `id`'s MAC is shared ([`SHARED_MAC`]), naming the other veths on its
/// bridge that have it.
pub fn warn_shared_mac(discovery: Option<&Discovery>, id: &str, pod: &GuardedPod) {
    let with = discovery
        .and_then(|d| {
            let v = d.veths().iter().find(|v| v.name == pod.veth.as_str())?;
            Some(d.sharing_mac(v).join(","))
        })
        .unwrap_or_default();
    let mac = ruleset::render::mac_text(&pod.mac);
    tracing::warn!(pod = %id, veth = %pod.veth, %mac, %with, "{SHARED_MAC}");
}

/// The bridges of `guard`'s pods that still learn MACs from frames to their reserved group
/// addresses (01:80:c2:00:00:0x), with their ifindex. The bridge learns from such a frame
/// before any of its netfilter hooks (for LLDP's :0e) or before its prerouting hook, so the
/// guard's check of each frame's source MAC never sees it: one frame would move a neighbour's
/// MAC, and the node's traffic for the neighbour, to the sender's port.
pub fn link_local_learners(discovery: &Discovery, guard: &Guard) -> Vec<(String, u32)> {
    let bridges: BTreeSet<&str> = discovery
        .veths()
        .iter()
        .filter(|v| guard.pods.iter().any(|p| p.veth.as_str() == v.name))
        .filter_map(|v| v.bridge.as_deref())
        .collect();
    bridges
        .into_iter()
        .filter_map(|b| Some((b.to_string(), *discovery.learning_bridges.get(b)?)))
        .collect()
}

/// Stops bridge `index` learning MACs from frames to its reserved group addresses
/// (`no_linklocal_learn`, the one bridge option it changes; nothing else learns less: a pod's
/// ordinary frames teach the bridge where it is). In the calling thread's network namespace.
pub fn stop_link_local_learning(index: u32) -> Result<(), VethError> {
    let flag = BridgeBooleanOptionFlags::NoLinkLocalLearn;
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Bridge),
        LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::MultiBoolOpt(
            BridgeBooleanOptions {
                value: flag,
                mask: flag,
            },
        )])),
    ]));
    // RTM_NEWLINK on an existing ifindex changes the link's kind-specific options; RTM_SETLINK
    // would acknowledge and ignore them.
    Rtnl::open()?.acknowledged(
        Request::NoLinkLocalLearn { bridge: index },
        &RouteNetlinkMessage::NewLink(link),
        0,
    )
}

/// What [`pin_macs`] is to do, given what is pinned (port ifindex, MAC): pin each guarded
/// pod's MAC to its veth (every time, so that a pin removed behind the agent's back is back at
/// the next discovery), keep the pin of a pod whose MAC another veth's pod has too (a second
/// pin would move it), and unpin the rest, on veths still there and still bridge ports (the
/// kernel drops a port's entries with the port, and a veth taken out of its bridge has none).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PinPlan {
    pub pins: Vec<(u32, Mac)>,
    pub unpins: Vec<(u32, Mac)>,
    /// Pins left as they are.
    pub kept: Vec<(u32, Mac)>,
}

impl PinPlan {
    pub fn new(pinned: &BTreeSet<(u32, Mac)>, found: &PodVeths, discovery: &Discovery) -> Self {
        let mut plan = Self::default();
        for (id, pod) in &found.found {
            let Some(port) = found.bound.get(id).map(|b| b.index) else {
                continue;
            };
            if !pod.mac_shared {
                plan.pins.push((port, pod.mac));
            } else if pinned.contains(&(port, pod.mac)) {
                plan.kept.push((port, pod.mac));
            }
        }
        plan.unpins = pinned
            .iter()
            .copied()
            .filter(|pin| !plan.pins.contains(pin) && !plan.kept.contains(pin))
            .filter(|(port, _)| {
                discovery
                    .veths()
                    .iter()
                    .any(|v| v.index == *port && v.bridge.is_some())
            })
            .collect();
        plan
    }
}

/// What [`pin_macs`] did not do.
#[derive(Debug, Default)]
pub struct PinFailures {
    /// Requests the kernel refused or could not be made.
    pub errors: Vec<VethError>,
    /// Pins not made because the bridge has the MAC elsewhere: behind another port, or as one
    /// of its own (a local entry); pinning would move that entry to the pod's port.
    pub elsewhere: Vec<(u32, Mac)>,
}

/// Pins each `(port, mac)` of `pins` in the forwarding database of the port's bridge, and
/// removes each pin of `unpins` (one already gone is no failure). In the calling thread's
/// network namespace.
///
/// A pinned entry is static, so the bridge never forgets it: frames to the MAC are never
/// flooded to every port, as they are once a learned entry has aged out (the node's own
/// included, which no hook of the bridge can stop short of one on every frame the node sends).
/// The kernel drops a port's entries with the port. Adding an entry moves one the bridge has
/// for the MAC, whatever its port or kind, so the forwarding database is read first: a MAC is
/// pinned only where the bridge has it on the pod's own port or nowhere (then with
/// NLM_F_EXCL, so that one learned meanwhile is left alone). Pins are not sticky: should the
/// bridge learn the MAC behind another port, it moves, and is not pinned again while there.
pub fn pin_macs(pins: &[(u32, Mac)], unpins: &[(u32, Mac)]) -> PinFailures {
    let mut failures = PinFailures::default();
    let mut rtnl = match Rtnl::open() {
        Ok(rtnl) => rtnl,
        Err(err) => {
            failures.errors.push(err);
            return failures;
        }
    };
    // Where the bridges have each MAC: (port, whether it is a local entry).
    let mut fdb: BTreeMap<Mac, Vec<(u32, bool)>> = BTreeMap::new();
    if !pins.is_empty() {
        let mut ask = NeighbourMessage::default();
        ask.header.family = AddressFamily::Bridge;
        match rtnl.dump(Request::BridgeFdb, &RouteNetlinkMessage::GetNeighbour(ask)) {
            Ok(entries) => {
                for (port, mac, local) in entries.iter().filter_map(fdb_state_of) {
                    fdb.entry(mac).or_default().push((port, local));
                }
            }
            Err(err) => {
                failures.errors.push(err);
                return failures;
            }
        }
    }
    let entry = |port: u32, mac: &Mac| {
        let mut entry = NeighbourMessage::default();
        entry.header.family = AddressFamily::Bridge;
        entry.header.ifindex = port;
        entry.header.state = NeighbourState::Noarp;
        entry.header.flags = NeighbourFlags::Controller;
        entry
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        entry
    };
    for (port, mac) in pins {
        let flags = match fdb.get(mac).map(Vec::as_slice) {
            None | Some([]) => NLM_F_CREATE | NLM_F_EXCL,
            Some(entries) if entries.iter().all(|(p, local)| p == port && !local) => NLM_F_REPLACE,
            Some(_) => {
                failures.elsewhere.push((*port, *mac));
                continue;
            }
        };
        let request = Request::PinMac {
            port: *port,
            mac: *mac,
        };
        match rtnl.acknowledged(
            request,
            &RouteNetlinkMessage::NewNeighbour(entry(*port, mac)),
            flags,
        ) {
            // Learned between the dump and now: left alone, looked at again next time.
            Err(VethError::Refused { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists =>
            {
                failures.elsewhere.push((*port, *mac));
            }
            Err(err) => failures.errors.push(err),
            Ok(()) => {}
        }
    }
    for (port, mac) in unpins {
        match rtnl.acknowledged(
            Request::UnpinMac {
                port: *port,
                mac: *mac,
            },
            &RouteNetlinkMessage::DelNeighbour(entry(*port, mac)),
            0,
        ) {
            Err(VethError::Refused { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(err) => failures.errors.push(err),
            Ok(()) => {}
        }
    }
    failures
}

/// A bridge fdb entry's port, MAC, and whether it is one of the bridge's own (local).
fn fdb_state_of(message: &RouteNetlinkMessage) -> Option<(u32, Mac, bool)> {
    let RouteNetlinkMessage::NewNeighbour(n) = message else {
        return None;
    };
    if n.header.family != AddressFamily::Bridge {
        return None;
    }
    let mac = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(lladdr) => Mac::try_from(&lladdr[..]).ok(),
        _ => None,
    })?;
    Some((
        n.header.ifindex,
        mac,
        n.header.state == NeighbourState::Permanent,
    ))
}

/// Asks the kernel, in the calling thread's network namespace: a few milliseconds of blocking
/// netlink dumps. Fails only when the link dump does; later dumps that fail are reported in
/// [`Discovery::failures`] and leave their veths to the fallback or [`Method::Unknown`].
pub fn discover() -> Result<Discovery, VethError> {
    let mut rtnl = Rtnl::open()?;
    let links = parse_links(rtnl.dump(Request::Links, &get_links())?);
    let netns_ids: BTreeSet<i32> = links
        .iter()
        .filter_map(|l| l.veth.as_ref()?.netns_id)
        .collect();
    let peers: BTreeMap<i32, Result<PeerSide, VethError>> = netns_ids
        .into_iter()
        .map(|netns_id| (netns_id, peer_side(&mut rtnl, netns_id)))
        .collect();
    let needs_tables = links.iter().any(|l| match &l.veth {
        Some(peer) => l.master.is_some() && !peer.resolved_by(&peers),
        None => false,
    });
    let tables = needs_tables.then(|| bridge_tables(&mut rtnl));
    let bridges: BTreeMap<u32, String> = links
        .iter()
        .filter(|l| l.is_bridge)
        .map(|l| (l.index, l.name.clone()))
        .collect();
    let own = own_addresses(&mut rtnl);
    let mut discovery = assemble(links, peers, tables);
    match own {
        Ok(addresses) => discovery.bridge_nets = nets_of(&bridges, addresses),
        Err(err) => discovery.failures.push(err),
    }
    Ok(discovery)
}

/// This namespace's own addresses with their prefixes, by interface index, link-local ones
/// left out.
fn own_addresses(rtnl: &mut Rtnl) -> Result<Vec<(u32, IpNet)>, VethError> {
    let mut found = Vec::new();
    for (family, af) in [
        (Family::Ipv4, AddressFamily::Inet),
        (Family::Ipv6, AddressFamily::Inet6),
    ] {
        let mut ask = AddressMessage::default();
        ask.header.family = af;
        let replies = rtnl.dump(
            Request::Addresses { family },
            &RouteNetlinkMessage::GetAddress(ask),
        )?;
        found.extend(replies.iter().filter_map(address_of));
    }
    Ok(found)
}

/// An address of this namespace: its interface, and the address with its prefix length.
fn address_of(message: &RouteNetlinkMessage) -> Option<(u32, IpNet)> {
    let RouteNetlinkMessage::NewAddress(address) = message else {
        return None;
    };
    let ip = own_address(address).1.filter(|ip| is_pod_address(*ip))?;
    let net = IpNet::new(ip, address.header.prefix_len).ok()?;
    Some((address.header.index, net))
}

/// The subnets of each bridge of `bridges` (index -> name), from the namespace's addresses.
fn nets_of(
    bridges: &BTreeMap<u32, String>,
    addresses: Vec<(u32, IpNet)>,
) -> BTreeMap<String, Vec<IpNet>> {
    let mut nets: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
    for (index, net) in addresses {
        if let Some(name) = bridges.get(&index) {
            nets.entry(name.clone()).or_default().push(net.trunc());
        }
    }
    nets
}

/// A link as the join needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    index: u32,
    name: String,
    master: Option<u32>,
    /// Set for veths only.
    veth: Option<Peer>,
    /// A bridge (`cni0`, `cbr0`), whose ports' frames meet the bridge hooks.
    is_bridge: bool,
    /// For a bridge: whether it learns MACs from frames to its reserved group addresses
    /// (`no_linklocal_learn` off, the kernel's default).
    learns_link_local: bool,
    /// Its own link-layer address (IFLA_ADDRESS).
    mac: Option<Mac>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Peer {
    netns_id: Option<i32>,
    index: Option<u32>,
}

impl Peer {
    fn resolved_by(&self, peers: &BTreeMap<i32, Result<PeerSide, VethError>>) -> bool {
        matches!((self.netns_id, self.index), (Some(id), Some(_)) if matches!(peers.get(&id), Some(Ok(_))))
    }
}

/// What a peer namespace holds: its interfaces' addresses and link-layer addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PeerSide {
    addresses: Vec<PeerAddress>,
    /// Interface index -> link-layer address.
    macs: BTreeMap<u32, Mac>,
}

/// An address on interface `index` of some peer namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerAddress {
    index: u32,
    ip: IpAddr,
}

#[derive(Debug, Default)]
struct BridgeTables {
    neighbours: Vec<Neighbour>,
    fdb: Vec<FdbEntry>,
}

/// A neighbour entry: `ip` is at `mac`, reached through interface `dev` (a bridge, for pods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Neighbour {
    dev: u32,
    ip: IpAddr,
    mac: [u8; 6],
}

/// A bridge fdb entry: frames for `mac` leave bridge `bridge` through port `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FdbEntry {
    bridge: u32,
    port: u32,
    mac: [u8; 6],
}

fn get_links() -> RouteNetlinkMessage {
    RouteNetlinkMessage::GetLink(LinkMessage::default())
}

fn parse_links(messages: Vec<RouteNetlinkMessage>) -> Vec<Link> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => link_of(&link),
            _ => None,
        })
        .collect()
}

fn link_of(link: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut master = None;
    let mut is_veth = false;
    let mut is_bridge = false;
    let mut learns_link_local = true;
    let mut mac = None;
    let mut peer = Peer {
        netns_id: None,
        index: None,
    };
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(bytes) => mac = Mac::try_from(&bytes[..]).ok(),
            LinkAttribute::Controller(m) if *m != 0 => master = Some(*m),
            LinkAttribute::Link(i) if *i != 0 => peer.index = Some(*i),
            // Negative: the kernel could not allocate an id (NETNSA_NSID_NOT_ASSIGNED).
            LinkAttribute::LinkNetNsId(id) if *id >= 0 => peer.netns_id = Some(*id),
            LinkAttribute::LinkInfo(infos) => {
                is_veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                is_bridge = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
                let options = infos.iter().flat_map(|info| match info {
                    LinkInfo::Data(InfoData::Bridge(options)) => options.as_slice(),
                    _ => &[],
                });
                for option in options {
                    if let InfoBridge::MultiBoolOpt(flags) = option {
                        learns_link_local = !flags
                            .value
                            .contains(BridgeBooleanOptionFlags::NoLinkLocalLearn);
                    }
                }
            }
            _ => {}
        }
    }
    Some(Link {
        index: link.header.index,
        name: name?,
        master,
        veth: is_veth.then_some(peer),
        is_bridge,
        learns_link_local,
        mac,
    })
}

/// The addresses and link-layer addresses of the namespace this one knows as `netns_id`.
fn peer_side(rtnl: &mut Rtnl, netns_id: i32) -> Result<PeerSide, VethError> {
    let addresses = peer_addresses(rtnl, netns_id)?;
    let request = Request::PeerLinks { netns_id };
    let mut ask = LinkMessage::default();
    ask.attributes.push(LinkAttribute::IfNetnsId(netns_id));
    let links = rtnl.dump(request, &RouteNetlinkMessage::GetLink(ask))?;
    Ok(PeerSide {
        addresses,
        macs: parse_peer_links(request, netns_id, links)?,
    })
}

/// Each interface's link-layer address; refuses replies that do not carry the namespace asked
/// for, as [`parse_peer_addresses`] does.
fn parse_peer_links(
    request: Request,
    netns_id: i32,
    messages: Vec<RouteNetlinkMessage>,
) -> Result<BTreeMap<u32, Mac>, VethError> {
    let mut macs = BTreeMap::new();
    for message in messages {
        let RouteNetlinkMessage::NewLink(link) = message else {
            continue;
        };
        let mut target = None;
        let mut mac = None;
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::IfNetnsId(id) => target = Some(*id),
                LinkAttribute::Address(bytes) => mac = Mac::try_from(&bytes[..]).ok(),
                _ => {}
            }
        }
        if target != Some(netns_id) {
            return Err(VethError::WrongNamespace {
                request,
                got: target,
            });
        }
        if let Some(mac) = mac {
            macs.insert(link.header.index, mac);
        }
    }
    Ok(macs)
}

fn peer_addresses(rtnl: &mut Rtnl, netns_id: i32) -> Result<Vec<PeerAddress>, VethError> {
    let mut found = Vec::new();
    for (family, af) in [
        (Family::Ipv4, AddressFamily::Inet),
        (Family::Ipv6, AddressFamily::Inet6),
    ] {
        let request = Request::PeerAddresses { netns_id, family };
        let mut ask = AddressMessage::default();
        ask.header.family = af;
        ask.attributes
            .push(AddressAttribute::TargetNetNsId(netns_id));
        let replies = rtnl.dump(request, &RouteNetlinkMessage::GetAddress(ask))?;
        found.extend(parse_peer_addresses(request, netns_id, replies)?);
    }
    Ok(found)
}

/// Keeps usable addresses; refuses replies that do not carry the namespace asked for, which a
/// kernel ignoring IFA_TARGET_NETNSID would send (the node's own addresses).
fn parse_peer_addresses(
    request: Request,
    netns_id: i32,
    messages: Vec<RouteNetlinkMessage>,
) -> Result<Vec<PeerAddress>, VethError> {
    let mut found = Vec::new();
    for message in messages {
        let RouteNetlinkMessage::NewAddress(address) = message else {
            continue;
        };
        if !matches!(
            address.header.family,
            AddressFamily::Inet | AddressFamily::Inet6
        ) {
            continue;
        }
        let (target, ip) = own_address(&address);
        if target != Some(netns_id) {
            return Err(VethError::WrongNamespace {
                request,
                got: target,
            });
        }
        if let Some(ip) = ip.filter(|ip| is_pod_address(*ip)) {
            found.push(PeerAddress {
                index: address.header.index,
                ip,
            });
        }
    }
    Ok(found)
}

/// An address message's target namespace (IFA_TARGET_NETNSID, if the kernel sent one) and the
/// interface's own address: IFA_LOCAL; IFA_ADDRESS is that too unless the link is
/// point-to-point, and IPv6 sends only IFA_ADDRESS.
fn own_address(address: &AddressMessage) -> (Option<i32>, Option<IpAddr>) {
    let mut target = None;
    let mut local = None;
    let mut peer = None;
    for attribute in &address.attributes {
        match attribute {
            AddressAttribute::TargetNetNsId(id) => target = Some(*id),
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => peer = Some(*ip),
            _ => {}
        }
    }
    (target, local.or(peer))
}

/// What a pod can source packets from beyond its own link: not link-local, loopback or
/// multicast.
fn is_pod_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_multicast() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback()
                && !v6.is_multicast()
                && !v6.is_unspecified()
                && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

fn bridge_tables(rtnl: &mut Rtnl) -> Result<BridgeTables, VethError> {
    let neighbours = rtnl.dump(
        Request::Neighbours,
        &RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
    )?;
    let mut ask = NeighbourMessage::default();
    ask.header.family = AddressFamily::Bridge;
    let fdb = rtnl.dump(Request::BridgeFdb, &RouteNetlinkMessage::GetNeighbour(ask))?;
    Ok(BridgeTables {
        neighbours: neighbours.iter().filter_map(neighbour_of).collect(),
        fdb: fdb.iter().filter_map(fdb_entry_of).collect(),
    })
}

fn neighbour_of(message: &RouteNetlinkMessage) -> Option<Neighbour> {
    let RouteNetlinkMessage::NewNeighbour(n) = message else {
        return None;
    };
    // Entries without a usable MAC (incomplete, failed) or not learned from the wire (noarp).
    if !matches!(
        n.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    ) {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for attribute in &n.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some((*v4).into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some((*v6).into()),
            NeighbourAttribute::LinkLayerAddress(lladdr) => {
                mac = <[u8; 6]>::try_from(&lladdr[..]).ok()
            }
            _ => {}
        }
    }
    Some(Neighbour {
        dev: n.header.ifindex,
        ip: ip.filter(|ip| is_pod_address(*ip))?,
        mac: mac?,
    })
}

fn fdb_entry_of(message: &RouteNetlinkMessage) -> Option<FdbEntry> {
    let RouteNetlinkMessage::NewNeighbour(n) = message else {
        return None;
    };
    // A permanent entry is one of the bridge's own addresses (a port's MAC), not a pod's.
    if n.header.family != AddressFamily::Bridge || n.header.state == NeighbourState::Permanent {
        return None;
    }
    let mut bridge = None;
    let mut mac = None;
    for attribute in &n.attributes {
        match attribute {
            NeighbourAttribute::Controller(m) if *m != 0 => bridge = Some(*m),
            NeighbourAttribute::LinkLayerAddress(lladdr) => {
                mac = <[u8; 6]>::try_from(&lladdr[..]).ok()
            }
            _ => {}
        }
    }
    Some(FdbEntry {
        bridge: bridge?,
        port: n.header.ifindex,
        mac: mac?,
    })
}

/// The join, free of I/O: veths, their peers' addresses per netns id, and the bridge tables
/// when some veth needed them.
fn assemble(
    links: Vec<Link>,
    peers: BTreeMap<i32, Result<PeerSide, VethError>>,
    tables: Option<Result<BridgeTables, VethError>>,
) -> Discovery {
    let names: BTreeMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
    let bridges: BTreeSet<u32> = links
        .iter()
        .filter(|l| l.is_bridge)
        .map(|l| l.index)
        .collect();
    let mut failures = Vec::new();
    let mut peers_ok = BTreeMap::new();
    for (netns_id, result) in peers {
        match result {
            Ok(addresses) => {
                peers_ok.insert(netns_id, addresses);
            }
            Err(err) => failures.push(err),
        }
    }
    let tables = match tables {
        Some(Ok(tables)) => Some(tables),
        Some(Err(err)) => {
            failures.push(err);
            None
        }
        None => None,
    };

    let mut veths: Vec<Veth> = links
        .iter()
        .filter_map(|link| {
            let peer = link.veth.as_ref()?;
            let from_peer = match (peer.netns_id, peer.index) {
                (Some(id), Some(index)) => peers_ok.get(&id).map(|side: &PeerSide| {
                    let addresses = side
                        .addresses
                        .iter()
                        .filter(|a| a.index == index)
                        .map(|a| a.ip)
                        .collect::<Vec<_>>();
                    (addresses, side.macs.get(&index).copied())
                }),
                _ => None,
            };
            let (method, (mut addresses, mac)) = match (from_peer, &tables, link.master) {
                (Some(found), _, _) => (Method::PeerNamespace, found),
                (None, Some(tables), Some(bridge)) => (
                    Method::BridgeTables,
                    behind_port(tables, bridge, link.index),
                ),
                _ => (Method::Unknown, (Vec::new(), None)),
            };
            addresses.sort();
            addresses.dedup();
            Some(Veth {
                name: link.name.clone(),
                index: link.index,
                bridge: link.master.filter(|m| bridges.contains(m)).map(|m| {
                    names
                        .get(&m)
                        .map_or_else(|| format!("#{m}"), |n| n.to_string())
                }),
                peer_netns_id: peer.netns_id,
                peer_index: peer.index,
                method,
                addresses,
                mac,
            })
        })
        .collect();
    veths.sort_by(|a, b| a.name.cmp(&b.name));

    let mut claims: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
    for (i, veth) in veths.iter().enumerate() {
        for ip in &veth.addresses {
            claims.entry(*ip).or_default().push(i);
        }
    }
    let mut owners = BTreeMap::new();
    let mut conflicts = BTreeMap::new();
    for (ip, claimants) in claims {
        if let [only] = claimants[..] {
            owners.insert(ip, only);
        } else {
            conflicts.insert(
                ip,
                claimants.iter().map(|&i| veths[i].name.clone()).collect(),
            );
        }
    }
    for veth in &mut veths {
        veth.addresses.retain(|ip| !conflicts.contains_key(ip));
    }
    let learning_bridges = links
        .iter()
        .filter(|l| l.is_bridge && l.learns_link_local)
        .map(|l| (l.name.clone(), l.index))
        .collect();
    // The node's own MACs on each bridge: the bridge's and its ports' (the local entries of its
    // forwarding database).
    let mut node_macs: BTreeMap<String, BTreeSet<Mac>> = BTreeMap::new();
    for bridge in links.iter().filter(|l| l.is_bridge) {
        let ports = links.iter().filter(|l| l.master == Some(bridge.index));
        node_macs.insert(
            bridge.name.clone(),
            std::iter::once(bridge)
                .chain(ports)
                .filter_map(|l| l.mac)
                .collect(),
        );
    }
    Discovery {
        veths,
        owners,
        conflicts,
        learning_bridges,
        node_macs,
        bridge_nets: BTreeMap::new(),
        failures,
    }
}

/// Addresses whose MAC the bridge forwards through `port`, per the bridge's own neighbours,
/// and that MAC if they all have the same one.
fn behind_port(tables: &BridgeTables, bridge: u32, port: u32) -> (Vec<IpAddr>, Option<Mac>) {
    let macs: BTreeSet<[u8; 6]> = tables
        .fdb
        .iter()
        .filter(|e| e.bridge == bridge && e.port == port)
        .map(|e| e.mac)
        .collect();
    let behind: Vec<&Neighbour> = tables
        .neighbours
        .iter()
        .filter(|n| n.dev == bridge && macs.contains(&n.mac))
        .collect();
    let used: BTreeSet<Mac> = behind.iter().map(|n| n.mac).collect();
    let mac = match used.into_iter().collect::<Vec<_>>()[..] {
        [only] => Some(only),
        _ => None,
    };
    (behind.iter().map(|n| n.ip).collect(), mac)
}

/// A NETLINK_ROUTE socket for dumps, with strict checking on: without it the kernel ignores
/// IFA_TARGET_NETNSID and answers with this namespace's addresses.
struct Rtnl {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

/// The kernel sends dump replies in datagrams of at most 32 KiB.
const RECEIVE_BUFFER: usize = 64 * 1024;
/// recv(2) flag: return the datagram's real length even when it did not fit.
const MSG_TRUNC: i32 = 0x20;
/// Tries of a dump the kernel marks as interrupted by concurrent changes.
const DUMP_ATTEMPTS: u32 = 3;

impl Rtnl {
    fn open() -> Result<Self, VethError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(VethError::Socket)?;
        socket.bind_auto().map_err(VethError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(VethError::Socket)?;
        socket
            .set_netlink_get_strict_chk(true)
            .map_err(VethError::Socket)?;
        Ok(Self {
            socket,
            sequence: 0,
            buffer: Vec::with_capacity(RECEIVE_BUFFER),
        })
    }

    /// One dump, retried while the kernel says a concurrent change interrupted it.
    fn dump(
        &mut self,
        request: Request,
        message: &RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, VethError> {
        for _ in 0..DUMP_ATTEMPTS {
            if let Some(replies) = self.dump_once(request, message)? {
                return Ok(replies);
            }
        }
        Err(VethError::Interrupted {
            request,
            attempts: DUMP_ATTEMPTS,
        })
    }

    /// Sends `message` as a request with `flags` too; its sequence number.
    fn send(
        &mut self,
        request: Request,
        message: &RouteNetlinkMessage,
        flags: u16,
    ) -> Result<u32, VethError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message.clone()));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket
            .send(&bytes, 0)
            .map_err(|source| VethError::Io { request, source })?;
        Ok(self.sequence)
    }

    /// One request that changes something, with `flags` too, and the kernel's
    /// acknowledgement of it.
    fn acknowledged(
        &mut self,
        request: Request,
        message: &RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), VethError> {
        let sequence = self.send(request, message, NLM_F_ACK | flags)?;
        let io = |source| VethError::Io { request, source };
        loop {
            self.buffer.clear();
            let len = self.socket.recv(&mut self.buffer, MSG_TRUNC).map_err(io)?;
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(
                &self.buffer[..len.min(self.buffer.len())],
            )
            .map_err(|source| VethError::Decode { request, source })?;
            if reply.header.sequence_number != sequence {
                continue;
            }
            if let NetlinkPayload::Error(error) = reply.payload {
                return match error.code {
                    None => Ok(()),
                    Some(_) => Err(VethError::Refused {
                        request,
                        source: error.to_io(),
                    }),
                };
            }
        }
    }

    /// The replies, or `None` when the dump was interrupted.
    fn dump_once(
        &mut self,
        request: Request,
        message: &RouteNetlinkMessage,
    ) -> Result<Option<Vec<RouteNetlinkMessage>>, VethError> {
        let sequence = self.send(request, message, NLM_F_DUMP)?;
        let io = |source| VethError::Io { request, source };

        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            self.buffer.clear();
            let len = self.socket.recv(&mut self.buffer, MSG_TRUNC).map_err(io)?;
            if len > self.buffer.len() {
                return Err(VethError::Truncated {
                    request,
                    len,
                    capacity: self.buffer.len(),
                });
            }
            let mut offset = 0;
            while offset < len {
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buffer[offset..len])
                        .map_err(|source| VethError::Decode { request, source })?;
                let size = reply.header.length as usize;
                if size == 0 {
                    break;
                }
                offset += (size + 3) & !3;
                // Leftovers of an earlier dump abandoned on an error.
                if reply.header.sequence_number != sequence {
                    continue;
                }
                interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
                match reply.payload {
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    NetlinkPayload::Done(done) => {
                        if done.code < 0 {
                            return Err(VethError::Refused {
                                request,
                                source: io::Error::from_raw_os_error(-done.code),
                            });
                        }
                        return Ok((!interrupted).then_some(replies));
                    }
                    NetlinkPayload::Error(error) if error.code.is_some() => {
                        return Err(VethError::Refused {
                            request,
                            source: error.to_io(),
                        });
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_history_comes_back_only_in_its_own_network_namespace() {
        let mut history = History {
            tick: 7,
            ..History::default()
        };
        history.seen.insert(("veth0a1b2c3d".into(), 12), 3);
        history.seen.insert(("veth0a1b2c3e".into(), 14), 6);
        history.bindings.insert(
            "bank/teller".into(),
            Binding {
                name: "veth0a1b2c3d".into(),
                index: 12,
                found: 3,
                ips: vec![ip("10.0.0.2")],
            },
        );
        let netns = 4_026_531_992;
        let text = serde_json::to_string(&history.saved(netns)).unwrap();
        let saved: SavedHistory = serde_json::from_str(&text).unwrap();
        let back = History::restore(saved.clone(), netns).expect("the same namespace");
        assert_eq!(
            (back.tick, &back.seen, &back.bindings),
            (history.tick, &history.seen, &history.bindings)
        );
        assert!(
            History::restore(saved.clone(), netns + 1).is_none(),
            "another namespace's ifindexes and names mean nothing here"
        );
        // What tells a write is due leaves the discovery count out.
        history.tick += 1;
        assert_eq!(
            history.saved(netns).without_tick(),
            saved.without_tick(),
            "a discovery that changed nothing"
        );
        history.seen.insert(("veth0a1b2c3f".into(), 15), 8);
        assert_ne!(history.saved(netns).without_tick(), saved.without_tick());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("bad address {s}"))
    }

    fn veth(index: u32, name: &str, master: Option<u32>, peer: Option<(i32, u32)>) -> Link {
        Link {
            index,
            name: name.into(),
            master,
            veth: Some(Peer {
                netns_id: peer.map(|p| p.0),
                index: peer.map(|p| p.1),
            }),
            is_bridge: false,
            learns_link_local: true,
            mac: None,
        }
    }

    fn bridge(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            master: None,
            veth: None,
            is_bridge: true,
            learns_link_local: true,
            mac: None,
        }
    }

    fn at(index: u32, s: &str) -> PeerAddress {
        PeerAddress { index, ip: ip(s) }
    }

    /// A peer namespace with `addresses`, each interface's link-layer address made of its
    /// first address's last four bytes, so that no two are alike.
    fn side(addresses: Vec<PeerAddress>) -> PeerSide {
        let mut macs = BTreeMap::new();
        for a in &addresses {
            let bytes = match a.ip {
                IpAddr::V4(v4) => v4.octets(),
                IpAddr::V6(v6) => {
                    let o = v6.octets();
                    [o[12], o[13], o[14], o[15]]
                }
            };
            macs.entry(a.index)
                .or_insert([2, bytes[0], bytes[1], bytes[2], bytes[3], 0]);
        }
        PeerSide { addresses, macs }
    }

    fn mac(last: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, last]
    }

    fn addresses_of<'a>(d: &'a Discovery, name: &str) -> (&'a [IpAddr], Method) {
        let v = d
            .veths()
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no veth {name}"));
        (&v.addresses, v.method)
    }

    /// A running pod `namespace/name` on node n1 at `ip`.
    fn running_pod(namespace: &str, name: &str, ip: &str) -> ruleset::model::Pod {
        ruleset::model::Pod {
            namespace: namespace.into(),
            name: name.into(),
            node: Some("n1".into()),
            ips: vec![super::tests::ip(ip)],
            phase: Some("Running".into()),
            ..ruleset::model::Pod::default()
        }
    }

    /// A compiler for node n1 with `pods` and nothing else.
    fn compiler_of(pods: impl IntoIterator<Item = ruleset::model::Pod>) -> Compiler {
        Compiler::new(ruleset::Cluster::from_objects([], pods, []), "n1")
    }

    #[test]
    fn only_a_bridge_port_guards_its_pod() {
        let pod = |name: &str, ip: &str| running_pod("shop", name, ip);
        let compiler = compiler_of([
            pod("bridged", "10.0.0.2"),
            pod("alone", "10.0.0.3"),
            pod("bonded", "10.0.0.4"),
        ]);
        let links = vec![
            bridge(1, "cni0"),
            // A master that is no bridge: the bridge hooks never see its ports' frames.
            Link {
                is_bridge: false,
                ..bridge(2, "bond0")
            },
            veth(5, "vetha", Some(1), Some((0, 2))),
            veth(6, "vethb", None, Some((1, 2))),
            veth(7, "vethc", Some(2), Some((2, 2))),
        ];
        let peers = BTreeMap::from([
            (0, Ok(side(vec![at(2, "10.0.0.2")]))),
            (1, Ok(side(vec![at(2, "10.0.0.3")]))),
            (2, Ok(side(vec![at(2, "10.0.0.4")]))),
        ]);
        let d = assemble(links, peers, None);
        assert_eq!(addresses_of(&d, "vethc").0, [ip("10.0.0.4")]);
        let veth_c = d.veths().iter().find(|v| v.name == "vethc").unwrap();
        assert_eq!(veth_c.bridge, None, "bond0 is no bridge");
        let PodVeths { found, missing, .. } =
            guarded_pods(&compiler, Some(&d), &History::default());
        let found: Vec<(&str, &str)> = found
            .iter()
            .map(|(id, p)| (id.as_str(), p.veth.as_str()))
            .collect();
        assert_eq!(found, [("shop/bridged", "vetha")]);
        assert_eq!(
            missing.into_iter().collect::<Vec<_>>(),
            ["shop/alone", "shop/bonded"]
        );
    }

    #[test]
    fn the_ports_are_every_veth_on_a_guarded_pods_bridge() {
        let compiler = compiler_of([running_pod("shop", "known", "10.0.0.2")]);
        let links = vec![
            bridge(1, "cni0"),
            bridge(2, "docker0"),
            veth(5, "vethknown", Some(1), Some((0, 2))),
            // A pod the agent was not told of, on the same bridge.
            veth(6, "vethstranger", Some(1), Some((1, 2))),
            // A container on another bridge, and a veth on none.
            veth(7, "vethdocker", Some(2), Some((2, 2))),
            veth(8, "vethalone", None, Some((3, 2))),
        ];
        let peers = BTreeMap::from([
            (0, Ok(side(vec![at(2, "10.0.0.2")]))),
            (1, Ok(side(vec![at(2, "10.0.0.9")]))),
            (2, Ok(side(vec![at(2, "172.17.0.2")]))),
            (3, Ok(side(vec![at(2, "10.0.0.10")]))),
        ]);
        let d = assemble(links, peers, None);
        let found = guarded_pods(&compiler, Some(&d), &History::default());
        let pods = found.pods();
        let names = |veths: &[IfName]| -> Vec<String> {
            veths.iter().map(|p| p.as_str().to_string()).collect()
        };
        let all = found;
        let found = guard(Some(&d), &all);
        assert_eq!(found.pods, pods);
        assert_eq!(names(&found.ports), ["vethknown", "vethstranger"]);
        assert_eq!(
            names(&found.elsewhere),
            ["vethdocker"],
            "vethalone is on no bridge"
        );
        let none = guard(Some(&d), &PodVeths::default());
        assert!(none.ports.is_empty(), "no guarded pod, no bridge of theirs");
        assert_eq!(none.elsewhere.len(), 3);
        assert_eq!(guard(None, &all), pods.into());
    }

    /// A history that has seen `d` once, and found each `(pod, veth, ifindex)` of `bindings`
    /// then (at addresses not recorded, as a history saved before they were kept).
    fn seen_once(d: &Discovery, bindings: &[(&str, &str, u32)]) -> History {
        let mut history = History::default();
        history.observe(d);
        history.bindings = bindings
            .iter()
            .map(|(pod, name, index)| (pod.to_string(), binding(name, *index, history.tick, &[])))
            .collect();
        history
    }

    fn binding(name: &str, index: u32, found: u64, ips: &[&str]) -> Binding {
        Binding {
            name: name.to_string(),
            index,
            found,
            ips: ips.iter().map(|s| ip(s)).collect(),
        }
    }

    /// Each pod found, with its veth's name.
    fn found_on(pods: &PodVeths) -> Vec<(String, String)> {
        pods.found
            .iter()
            .map(|(id, p)| (id.clone(), p.veth.as_str().to_string()))
            .collect()
    }

    fn pair(id: &str, veth: &str) -> (String, String) {
        (id.to_string(), veth.to_string())
    }

    #[test]
    fn a_pod_keeps_its_veth_when_another_claims_its_address_and_is_contested_without_one() {
        let compiler = compiler_of([
            running_pod("bank", "teller", "10.0.0.2"),
            running_pod("bank", "mallory", "10.0.0.3"),
        ]);
        // The stranger (a pod the agent has not been told of) has put teller's address on its
        // interface too.
        let links = vec![
            bridge(1, "cni0"),
            veth(5, "vethteller", Some(1), Some((0, 2))),
            veth(6, "vethmallory", Some(1), Some((1, 2))),
            veth(7, "vethstranger", Some(1), Some((2, 2))),
        ];
        let peers = BTreeMap::from([
            (0, Ok(side(vec![at(2, "10.0.0.2")]))),
            (1, Ok(side(vec![at(2, "10.0.0.3")]))),
            (2, Ok(side(vec![at(2, "10.0.0.9"), at(2, "10.0.0.2")]))),
        ]);
        let d = assemble(links, peers, None);

        // Found on vethteller before: teller keeps it, and the claim is reported.
        let before = seen_once(&d, &[("bank/teller", "vethteller", 5)]);
        let kept = guarded_pods(&compiler, Some(&d), &before);
        assert_eq!(
            found_on(&kept),
            [
                pair("bank/mallory", "vethmallory"),
                pair("bank/teller", "vethteller")
            ]
        );
        assert_eq!(
            kept.claimed,
            BTreeMap::from([("bank/teller".to_string(), vec!["vethstranger".to_string()])])
        );
        assert!(kept.contested.is_empty() && kept.missing.is_empty());
        assert_eq!(
            kept.bound.get("bank/teller"),
            Some(&binding("vethteller", 5, 1, &["10.0.0.2"]))
        );
        assert!(guard(Some(&d), &kept).contested.is_empty());

        // Nothing known before (a restarted agent), or a veth that is gone while both
        // claimants were there: contested, its address sent from neither veth. A binding is
        // kept until the pod is found again.
        // (Also a veth of that name at another ifindex: not the one teller was on.)
        for before in [
            History::default(),
            seen_once(&d, &[("bank/teller", "vethold", 4)]),
            seen_once(&d, &[("bank/teller", "vethteller", 4)]),
        ] {
            let contested = guarded_pods(&compiler, Some(&d), &before);
            assert_eq!(found_on(&contested), [pair("bank/mallory", "vethmallory")]);
            assert_eq!(
                contested.contested,
                BTreeMap::from([(
                    "bank/teller".to_string(),
                    vec!["vethstranger".to_string(), "vethteller".to_string()]
                )])
            );
            assert!(contested.missing.is_empty());
            assert_eq!(
                contested.bound.get("bank/teller"),
                before.bindings.get("bank/teller")
            );
            assert_eq!(guard(Some(&d), &contested).contested, [ip("10.0.0.2")]);
        }

        // Alone on its bridge, a contested pod's veths are still its bridge's ports, not
        // another network's the guard leaves alone.
        let alone = compiler_of([running_pod("bank", "teller", "10.0.0.2")]);
        let found = guarded_pods(&alone, Some(&d), &History::default());
        let g = guard(Some(&d), &found);
        assert!(g.pods.is_empty());
        assert_eq!(g.contested, [ip("10.0.0.2")]);
        assert!(g.elsewhere.is_empty(), "{:?}", g.elsewhere);
        assert_eq!(g.ports.len(), 3);
    }

    #[test]
    fn guarded_pods_macs_are_pinned_and_the_rest_unpinned_where_their_veths_remain() {
        let links = vec![
            bridge(1, "cni0"),
            veth(5, "vetha", Some(1), Some((0, 2))),
            veth(6, "vethb", Some(1), Some((1, 2))),
            veth(7, "vethc", Some(1), Some((2, 2))),
            veth(8, "vethd", Some(1), Some((3, 2))),
            veth(10, "vethe", Some(1), Some((4, 2))),
        ];
        let d = assemble(links, BTreeMap::new(), None);
        let pod = |veth: &str, index: u32, last: u8, shared: bool| GuardedPod {
            veth: IfName::new(veth).unwrap(),
            index,
            ips: Vec::new(),
            mac: mac(last),
            mac_shared: shared,
            egress_isolated: false,
        };
        // a changed its MAC from 1 to 2; c and d have one MAC, which c had first; e is no
        // longer guarded, and the veth of what was pinned on 9 is gone.
        let found = PodVeths {
            found: vec![
                ("x/a".into(), pod("vetha", 5, 2, false)),
                ("x/b".into(), pod("vethb", 6, 3, false)),
                ("x/c".into(), pod("vethc", 7, 4, true)),
                ("x/d".into(), pod("vethd", 8, 4, true)),
            ],
            bound: [("x/a", 5), ("x/b", 6), ("x/c", 7), ("x/d", 8)]
                .into_iter()
                .map(|(id, index)| (id.to_string(), binding("", index, 1, &[])))
                .collect(),
            ..PodVeths::default()
        };
        let pinned = BTreeSet::from([
            (5, mac(1)),
            (6, mac(3)),
            (7, mac(4)),
            (9, mac(9)),
            (10, mac(10)),
        ]);
        assert_eq!(
            PinPlan::new(&pinned, &found, &d),
            PinPlan {
                pins: vec![(5, mac(2)), (6, mac(3))],
                unpins: vec![(5, mac(1)), (10, mac(10))],
                kept: vec![(7, mac(4))],
            }
        );
        // Nothing pinned yet: the shared MAC is pinned to neither.
        let plan = PinPlan::new(&BTreeSet::new(), &found, &d);
        assert_eq!(plan.pins, [(5, mac(2)), (6, mac(3))]);
        assert!(plan.unpins.is_empty() && plan.kept.is_empty());
    }

    #[test]
    fn a_pod_with_one_of_the_nodes_macs_on_its_bridge_shares_it_and_is_not_pinned() {
        let compiler = compiler_of([
            running_pod("bank", "gateway", "10.0.0.2"),
            running_pod("bank", "portly", "10.0.0.3"),
            running_pod("bank", "honest", "10.0.0.4"),
        ]);
        // gateway's pod took cni0's MAC, portly's the MAC of honest's veth (host side).
        let links = vec![
            Link {
                mac: Some([2, 10, 0, 0, 2, 0]),
                ..bridge(1, "cni0")
            },
            veth(5, "vethgateway", Some(1), Some((0, 2))),
            veth(6, "vethportly", Some(1), Some((1, 2))),
            Link {
                mac: Some([2, 10, 0, 0, 3, 0]),
                ..veth(7, "vethhonest", Some(1), Some((2, 2)))
            },
        ];
        let peers = BTreeMap::from([
            (0, Ok(side(vec![at(2, "10.0.0.2")]))),
            (1, Ok(side(vec![at(2, "10.0.0.3")]))),
            (2, Ok(side(vec![at(2, "10.0.0.4")]))),
        ]);
        let d = assemble(links, peers, None);
        let sharers =
            |name: &str| d.sharing_mac(d.veths().iter().find(|v| v.name == name).unwrap());
        assert_eq!(sharers("vethgateway"), ["cni0"]);
        assert_eq!(sharers("vethportly"), ["cni0"]);
        assert!(sharers("vethhonest").is_empty());
        let found = guarded_pods(&compiler, Some(&d), &History::default());
        let shared: Vec<(&str, bool)> = found
            .found
            .iter()
            .map(|(id, p)| (id.as_str(), p.mac_shared))
            .collect();
        assert_eq!(
            shared,
            [
                ("bank/gateway", true),
                ("bank/honest", false),
                ("bank/portly", true)
            ]
        );
        // Only honest's MAC is pinned: a pin of the others would move the node's own entry.
        let plan = PinPlan::new(&BTreeSet::new(), &found, &d);
        assert_eq!(plan.pins, [(7, [2, 10, 0, 0, 4, 0])]);
    }

    #[test]
    fn two_veths_with_different_addresses_of_one_pod_are_no_contest() {
        let mut pod = running_pod("bank", "twofaced", "10.0.0.2");
        pod.ips.push(ip("fd00::2"));
        let compiler = compiler_of([pod]);
        let links = vec![
            bridge(1, "cni0"),
            veth(5, "vetha", Some(1), Some((0, 2))),
            veth(6, "vethb", Some(1), Some((1, 2))),
        ];
        let peers = BTreeMap::from([
            (0, Ok(side(vec![at(2, "10.0.0.2")]))),
            (1, Ok(side(vec![at(2, "fd00::2")]))),
        ]);
        let d = assemble(links, peers, None);
        let found = guarded_pods(&compiler, Some(&d), &History::default());
        assert!(found.found.is_empty() && found.contested.is_empty());
        assert_eq!(found.missing.iter().collect::<Vec<_>>(), ["bank/twofaced"]);
    }

    #[test]
    fn a_pod_recreated_under_its_name_at_other_addresses_leaves_the_old_veth() {
        let mut history = History::default();
        let mut discover = |compiler: &Compiler, links: Vec<Link>, peers: &[(i32, &str)]| {
            let peers = peers
                .iter()
                .map(|(id, addr)| (*id, Ok(side(vec![at(2, addr)]))))
                .collect();
            let d = assemble(links, peers, None);
            history.observe(&d);
            let found = guarded_pods(compiler, Some(&d), &history);
            history.bindings.clone_from(&found.bound);
            found
        };
        let old = || veth(4, "vethweb0old", Some(1), Some((0, 2)));
        let first = compiler_of([running_pod("db", "web-0", "10.0.0.2")]);
        let found = discover(&first, vec![bridge(1, "cni0"), old()], &[(0, "10.0.0.2")]);
        assert_eq!(found_on(&found), [pair("db/web-0", "vethweb0old")]);
        // Deleted (forcibly) and created again under its name at another address, on a new
        // veth, while its old sandbox is still being torn down: the new pod is on the new veth.
        let second = compiler_of([running_pod("db", "web-0", "10.0.0.9")]);
        let new = || veth(7, "vethweb0new", Some(1), Some((1, 2)));
        let found = discover(
            &second,
            vec![bridge(1, "cni0"), old(), new()],
            &[(0, "10.0.0.2"), (1, "10.0.0.9")],
        );
        assert_eq!(found_on(&found), [pair("db/web-0", "vethweb0new")]);
        assert!(found.contested.is_empty() && found.missing.is_empty());
        // The same pod at the same address stays where it was, whoever carries it.
        let found = discover(
            &second,
            vec![bridge(1, "cni0"), old(), new()],
            &[(0, "10.0.0.9"), (1, "10.0.0.9")],
        );
        assert_eq!(found_on(&found), [pair("db/web-0", "vethweb0new")]);
        // A binding saved before addresses were kept holds the pod at any address.
        let saved: Binding =
            serde_json::from_str(r#"{"name":"vethweb0old","index":4,"found":1}"#).unwrap();
        assert!(saved.ips.is_empty() && saved.holds(&[ip("10.0.0.9")]));
    }

    #[test]
    fn a_pod_keeps_its_veth_without_its_addresses_and_moves_only_to_a_newer_one() {
        let compiler = compiler_of([
            running_pod("bank", "teller", "10.0.0.2"),
            running_pod("bank", "mallory", "10.0.0.3"),
            running_pod("bank", "peddler", "10.0.0.5"),
        ]);
        let mut history = History::default();
        // One discovery of `links` with each peer namespace's addresses (and a MAC for each).
        let mut discover = |links: Vec<Link>, peers: &[(i32, &[&str])]| {
            let peers = peers
                .iter()
                .map(|(id, addrs)| {
                    let side = PeerSide {
                        addresses: addrs.iter().map(|a| at(2, a)).collect(),
                        macs: BTreeMap::from([(2, mac(*id as u8 + 1))]),
                    };
                    (*id, Ok(side))
                })
                .collect();
            let d = assemble(links, peers, None);
            history.observe(&d);
            let found = guarded_pods(&compiler, Some(&d), &history);
            history.bindings.clone_from(&found.bound);
            found
        };
        let teller = || veth(4, "vethteller", Some(1), Some((0, 2)));
        let mallory = || veth(6, "vethmallory", Some(1), Some((1, 2)));
        let both = [
            pair("bank/mallory", "vethmallory"),
            pair("bank/teller", "vethteller"),
        ];

        let found = discover(
            vec![bridge(1, "cni0"), teller(), mallory()],
            &[(0, &["10.0.0.2"]), (1, &["10.0.0.3"])],
        );
        assert_eq!(found_on(&found), both);
        // Mallory removes its own address: it keeps its veth, and so its guard.
        let found = discover(
            vec![bridge(1, "cni0"), teller(), mallory()],
            &[(0, &["10.0.0.2"]), (1, &[])],
        );
        assert_eq!(found_on(&found), both);
        // Teller's sandbox is being recreated (its veth gone) and mallory holds teller's
        // address: mallory's veth, there before, is not teller's: contested.
        let found = discover(vec![bridge(1, "cni0"), mallory()], &[(1, &["10.0.0.2"])]);
        assert_eq!(found_on(&found), [pair("bank/mallory", "vethmallory")]);
        assert_eq!(found.contested.keys().collect::<Vec<_>>(), ["bank/teller"]);
        // Nor is a new veth that carries another known pod's address teller's.
        let peddler = || veth(9, "vethpeddler", Some(1), Some((3, 2)));
        let found = discover(
            vec![bridge(1, "cni0"), mallory(), peddler()],
            &[(1, &[]), (3, &["10.0.0.5", "10.0.0.2"])],
        );
        assert_eq!(found.contested.keys().collect::<Vec<_>>(), ["bank/teller"]);
        // Teller's new veth (first seen since) comes up with the address: teller moves to it,
        // though mallory holds the address too.
        let found = discover(
            vec![
                bridge(1, "cni0"),
                mallory(),
                veth(8, "vethteller2", Some(1), Some((2, 2))),
            ],
            &[(1, &["10.0.0.2"]), (2, &["10.0.0.2"])],
        );
        assert_eq!(
            found_on(&found),
            [
                pair("bank/mallory", "vethmallory"),
                pair("bank/teller", "vethteller2")
            ]
        );
        assert!(found.contested.is_empty());
        assert_eq!(
            found.bound.get("bank/teller"),
            Some(&binding("vethteller2", 8, 5, &["10.0.0.2"]))
        );
        // Nor does a pod new to the agent get a veth another pod is on, whatever it carries.
        let newcomer = compiler_of([
            running_pod("bank", "mallory", "10.0.0.3"),
            running_pod("bank", "newcomer", "10.0.0.7"),
        ]);
        let d = assemble(
            vec![bridge(1, "cni0"), mallory()],
            BTreeMap::from([(1, Ok(side(vec![at(2, "10.0.0.7")])))]),
            None,
        );
        let found = guarded_pods(&newcomer, Some(&d), &history);
        assert_eq!(found_on(&found), [pair("bank/mallory", "vethmallory")]);
        assert!(found.missing.contains("bank/newcomer"));
        // Without the history mallory, holding no address of its own, would be any pod's.
        let d = assemble(
            vec![bridge(1, "cni0"), mallory()],
            BTreeMap::from([(
                1,
                Ok(PeerSide {
                    addresses: Vec::new(),
                    macs: BTreeMap::from([(2, mac(2))]),
                }),
            )]),
            None,
        );
        let unknown = guarded_pods(&compiler, Some(&d), &History::default());
        assert!(unknown.missing.contains("bank/mallory"));
    }

    #[test]
    fn peer_addresses_are_kept_only_on_the_peer_ifindex() {
        let links = vec![
            bridge(1, "cni0"),
            veth(5, "vetha", Some(1), Some((0, 2))),
            veth(6, "vethb", Some(1), Some((1, 2))),
        ];
        let peers = BTreeMap::from([
            (
                0,
                Ok(side(vec![
                    at(2, "10.0.0.2"),
                    at(1, "127.0.0.2"),
                    at(3, "10.9.9.9"),
                ])),
            ),
            (1, Ok(side(vec![at(2, "10.0.0.3"), at(2, "fd00::3")]))),
        ]);
        let d = assemble(links, peers, None);
        assert_eq!(d.veths().len(), 2, "the bridge is no veth");
        assert_eq!(d.interface_of(ip("10.0.0.2")).map(|v| v.index), Some(5));
        assert_eq!(d.interface_of(ip("fd00::3")).map(|v| v.index), Some(6));
        assert_eq!(d.interface_of(ip("10.9.9.9")), None);
        assert_eq!(d.veths()[0].bridge.as_deref(), Some("cni0"));
        assert_eq!(d.veths()[0].method, Method::PeerNamespace);
    }

    #[test]
    fn an_address_claimed_twice_maps_to_neither() {
        let links = vec![
            veth(5, "vetha", None, Some((0, 2))),
            veth(6, "vethb", None, Some((1, 2))),
        ];
        let peers = BTreeMap::from([
            (0, Ok(side(vec![at(2, "10.0.0.2"), at(2, "10.0.0.7")]))),
            (1, Ok(side(vec![at(2, "10.0.0.7")]))),
        ]);
        let d = assemble(links, peers, None);
        assert_eq!(d.interface_of(ip("10.0.0.7")), None);
        assert_eq!(
            d.conflicts().get(&ip("10.0.0.7")),
            Some(&vec!["vetha".to_string(), "vethb".to_string()])
        );
        assert_eq!(addresses_of(&d, "vetha").0, [ip("10.0.0.2")]);
        assert!(addresses_of(&d, "vethb").0.is_empty());
    }

    #[test]
    fn veths_without_peer_addresses_fall_back_to_the_bridge_tables() {
        let links = vec![
            bridge(1, "cni0"),
            veth(5, "vetha", Some(1), Some((0, 2))),
            veth(6, "vethb", Some(1), None),
            veth(7, "vethc", Some(1), Some((1, 2))),
            veth(8, "vethd", None, None),
        ];
        let peers = BTreeMap::from([
            (0, Ok(side(vec![at(2, "10.0.0.2")]))),
            (
                1,
                Err(VethError::Refused {
                    request: Request::PeerAddresses {
                        netns_id: 1,
                        family: Family::Ipv4,
                    },
                    source: io::Error::from_raw_os_error(1),
                }),
            ),
        ]);
        let tables = BridgeTables {
            neighbours: vec![
                Neighbour {
                    dev: 1,
                    ip: ip("10.0.0.3"),
                    mac: mac(3),
                },
                Neighbour {
                    dev: 1,
                    ip: ip("fd00::3"),
                    mac: mac(3),
                },
                Neighbour {
                    dev: 1,
                    ip: ip("10.0.0.4"),
                    mac: mac(4),
                },
                // Another device's neighbour with a MAC that vethb's port knows.
                Neighbour {
                    dev: 9,
                    ip: ip("192.0.2.1"),
                    mac: mac(3),
                },
                // vetha's pod, found by its peer namespace: the tables do not override that.
                Neighbour {
                    dev: 1,
                    ip: ip("10.0.0.5"),
                    mac: mac(5),
                },
            ],
            fdb: vec![
                FdbEntry {
                    bridge: 1,
                    port: 6,
                    mac: mac(3),
                },
                FdbEntry {
                    bridge: 1,
                    port: 7,
                    mac: mac(4),
                },
                FdbEntry {
                    bridge: 1,
                    port: 5,
                    mac: mac(5),
                },
            ],
        };
        let d = assemble(links, peers, Some(Ok(tables)));
        assert_eq!(
            addresses_of(&d, "vetha"),
            (&[ip("10.0.0.2")][..], Method::PeerNamespace)
        );
        assert_eq!(
            addresses_of(&d, "vethb"),
            (&[ip("10.0.0.3"), ip("fd00::3")][..], Method::BridgeTables)
        );
        assert_eq!(
            addresses_of(&d, "vethc"),
            (&[ip("10.0.0.4")][..], Method::BridgeTables)
        );
        assert_eq!(
            addresses_of(&d, "vethd"),
            (&[][..], Method::Unknown),
            "no bridge to ask"
        );
        assert_eq!(d.failures().len(), 1);
        assert_eq!(d.interface_of(ip("192.0.2.1")), None);
        assert_eq!(d.interface_of(ip("10.0.0.5")), None);
    }

    #[test]
    fn failed_bridge_dumps_leave_veths_unknown() {
        let links = vec![bridge(1, "cni0"), veth(6, "vethb", Some(1), None)];
        let tables = Err(VethError::Interrupted {
            request: Request::BridgeFdb,
            attempts: 3,
        });
        let d = assemble(links, BTreeMap::new(), Some(tables));
        assert_eq!(addresses_of(&d, "vethb"), (&[][..], Method::Unknown));
        assert_eq!(
            d.failures()[0].to_string(),
            "RTM_GETNEIGH AF_BRIDGE dump (bridge fdb): interrupted by concurrent changes 3 times in a row"
        );
    }

    #[test]
    fn only_addresses_a_pod_can_source_from_count() {
        for good in ["10.0.0.1", "fd00::1", "2001:db8::1", "fec0::1"] {
            assert!(is_pod_address(ip(good)), "{good}");
        }
        for bad in [
            "fe80::1",
            "febf::1",
            "::1",
            "127.0.0.1",
            "ff02::1",
            "224.0.0.1",
            "0.0.0.0",
        ] {
            assert!(!is_pod_address(ip(bad)), "{bad}");
        }
    }

    #[test]
    fn peer_address_replies_must_carry_the_namespace_asked_for() {
        let request = Request::PeerAddresses {
            netns_id: 4,
            family: Family::Ipv6,
        };
        let reply = |target: Option<i32>, attributes: Vec<AddressAttribute>| {
            let mut m = AddressMessage::default();
            m.header.family = AddressFamily::Inet6;
            m.header.index = 2;
            m.attributes = attributes;
            m.attributes
                .extend(target.map(AddressAttribute::TargetNetNsId));
            RouteNetlinkMessage::NewAddress(m)
        };
        let found = parse_peer_addresses(
            request,
            4,
            vec![
                reply(Some(4), vec![AddressAttribute::Address(ip("fd00::2"))]),
                reply(Some(4), vec![AddressAttribute::Address(ip("fe80::2"))]),
                reply(
                    Some(4),
                    vec![
                        AddressAttribute::Address(ip("10.1.0.1")),
                        AddressAttribute::Local(ip("10.0.0.2")),
                    ],
                ),
            ],
        )
        .map_err(|e| e.to_string());
        assert_eq!(found, Ok(vec![at(2, "fd00::2"), at(2, "10.0.0.2")]));
        let ignored = parse_peer_addresses(
            request,
            4,
            vec![reply(None, vec![AddressAttribute::Address(ip("fd00::2"))])],
        );
        assert!(matches!(
            ignored,
            Err(VethError::WrongNamespace { got: None, .. })
        ));
    }

    #[test]
    fn each_guarded_pod_gets_its_peers_link_layer_address_and_a_shared_one_binds_none() {
        let pod = |name: &str, ip: &str| running_pod("bank", name, ip);
        let compiler = compiler_of([
            pod("teller", "10.0.0.2"),
            pod("mallory", "10.0.0.3"),
            pod("clerk", "10.0.0.4"),
            pod("fallback", "10.0.0.5"),
            pod("twofaced", "10.0.0.6"),
        ]);
        let links = vec![
            bridge(1, "cni0"),
            veth(5, "vetha", Some(1), Some((0, 2))),
            veth(6, "vethb", Some(1), Some((1, 2))),
            veth(7, "vethc", Some(1), Some((2, 2))),
            // No peer namespace id: the bridge tables tell its pod and MAC.
            veth(8, "vethd", Some(1), None),
            veth(9, "vethe", Some(1), None),
            // A container on another bridge with clerk's MAC.
            bridge(2, "docker0"),
            veth(10, "vethf", Some(2), Some((3, 2))),
        ];
        let with_mac = |ip: &str, mac: [u8; 6]| PeerSide {
            addresses: vec![at(2, ip)],
            macs: BTreeMap::from([(2, mac)]),
        };
        // mallory took teller's link-layer address.
        let peers = BTreeMap::from([
            (0, Ok(with_mac("10.0.0.2", mac(2)))),
            (1, Ok(with_mac("10.0.0.3", mac(2)))),
            (2, Ok(with_mac("10.0.0.4", mac(4)))),
            (3, Ok(with_mac("172.17.0.2", mac(4)))),
        ]);
        let neighbour = |ip: &str, last: u8| Neighbour {
            dev: 1,
            ip: super::tests::ip(ip),
            mac: mac(last),
        };
        let fdb = |port: u32, last: u8| FdbEntry {
            bridge: 1,
            port,
            mac: mac(last),
        };
        // Behind vethe, two MACs: which one its pod's frames come from is not known.
        let tables = BridgeTables {
            neighbours: vec![
                neighbour("10.0.0.5", 5),
                neighbour("10.0.0.6", 6),
                neighbour("10.0.0.16", 16),
            ],
            fdb: vec![fdb(8, 5), fdb(9, 6), fdb(9, 16)],
        };
        let d = assemble(links, peers, Some(Ok(tables)));
        let mac_of = |name: &str| d.veths().iter().find(|v| v.name == name).unwrap().mac;
        assert_eq!(mac_of("vetha"), Some(mac(2)));
        assert_eq!(mac_of("vethd"), Some(mac(5)));
        assert_eq!(mac_of("vethe"), None);
        let names = |name: &str| d.sharing_mac(d.veths().iter().find(|v| v.name == name).unwrap());
        assert_eq!(names("vetha"), ["vethb"]);
        assert_eq!(names("vethb"), ["vetha"]);
        assert!(names("vethc").is_empty());
        assert!(
            names("vethf").is_empty(),
            "on another bridge, one MAC confuses nothing"
        );
        let PodVeths { found, missing, .. } =
            guarded_pods(&compiler, Some(&d), &History::default());
        let found: Vec<(&str, [u8; 6], bool)> = found
            .iter()
            .map(|(id, p)| (id.as_str(), p.mac, p.mac_shared))
            .collect();
        assert_eq!(
            found,
            [
                ("bank/clerk", mac(4), false),
                ("bank/fallback", mac(5), false),
                ("bank/mallory", mac(2), true),
                ("bank/teller", mac(2), true),
            ]
        );
        assert_eq!(
            missing.into_iter().collect::<Vec<_>>(),
            ["bank/twofaced"],
            "a pod whose frames' link-layer address is not known is not guarded"
        );
    }

    #[test]
    fn peer_link_replies_must_carry_the_namespace_asked_for() {
        let request = Request::PeerLinks { netns_id: 4 };
        let reply = |index: u32, target: Option<i32>, mac: Vec<u8>| {
            let mut m = LinkMessage::default();
            m.header.index = index;
            m.attributes = vec![LinkAttribute::Address(mac)];
            m.attributes.extend(target.map(LinkAttribute::IfNetnsId));
            RouteNetlinkMessage::NewLink(m)
        };
        let found = parse_peer_links(
            request,
            4,
            vec![
                reply(1, Some(4), vec![0; 6]),
                reply(2, Some(4), mac(9).to_vec()),
                // Not Ethernet: no link-layer address of six bytes.
                reply(3, Some(4), vec![1, 2, 3, 4]),
            ],
        )
        .map_err(|e| e.to_string());
        assert_eq!(found, Ok(BTreeMap::from([(1, [0; 6]), (2, mac(9))])));
        let ignored = parse_peer_links(request, 4, vec![reply(2, Some(5), mac(9).to_vec())]);
        assert!(matches!(
            ignored,
            Err(VethError::WrongNamespace { got: Some(5), .. })
        ));
    }

    #[test]
    fn links_parse_into_veths_with_their_peers() {
        let mut m = LinkMessage::default();
        m.header.index = 7;
        m.attributes = vec![
            LinkAttribute::IfName("veth0123abcd".into()),
            LinkAttribute::Controller(3),
            LinkAttribute::Link(2),
            LinkAttribute::LinkNetNsId(4),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        let mut unassigned = m.clone();
        unassigned.attributes[3] = LinkAttribute::LinkNetNsId(-1);
        let mut dummy = LinkMessage::default();
        dummy.header.index = 8;
        dummy.attributes = vec![
            LinkAttribute::IfName("dummy0".into()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Dummy)]),
        ];
        let mut cni0 = LinkMessage::default();
        cni0.header.index = 3;
        cni0.attributes = vec![
            LinkAttribute::IfName("cni0".into()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]),
        ];
        // A bridge that no longer learns from frames to its reserved group addresses.
        let mut cbr0 = LinkMessage::default();
        cbr0.header.index = 4;
        let flag = BridgeBooleanOptionFlags::NoLinkLocalLearn;
        cbr0.attributes = vec![
            LinkAttribute::IfName("cbr0".into()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Bridge),
                LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::MultiBoolOpt(
                    BridgeBooleanOptions {
                        value: flag,
                        mask: flag,
                    },
                )])),
            ]),
        ];
        let nameless = LinkMessage::default();
        let links = parse_links(
            [m, unassigned, dummy, cni0, cbr0, nameless]
                .into_iter()
                .map(RouteNetlinkMessage::NewLink)
                .collect(),
        );
        assert_eq!(
            links,
            vec![
                veth(7, "veth0123abcd", Some(3), Some((4, 2))),
                Link {
                    veth: Some(Peer {
                        netns_id: None,
                        index: Some(2)
                    }),
                    ..veth(7, "veth0123abcd", Some(3), None)
                },
                Link {
                    index: 8,
                    name: "dummy0".into(),
                    master: None,
                    veth: None,
                    is_bridge: false,
                    learns_link_local: true,
                    mac: None,
                },
                bridge(3, "cni0"),
                Link {
                    learns_link_local: false,
                    ..bridge(4, "cbr0")
                },
            ]
        );
    }
}
