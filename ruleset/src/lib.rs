//! The nftpol policy compiler: Kubernetes NetworkPolicy in, the nftables ruleset of one node out.
//!
//! ```text
//! model (Pods, Namespaces, NetworkPolicies as plain data)
//!   -> Cluster (index by namespace, by address)
//!   -> policy::resolve (validate; Diagnostics name object and field; broken parts allow nothing)
//!   -> Compiler (one node) -> ir::Table -> render (nft -f text)
//!                                       -> eval / trace (what the kernel would decide)
//!                                       -> diff (Delta: the one transaction to apply)
//! ```
//!
//! No I/O, no async, no Kubernetes client, no netlink: those live in the agent.
//!
//! # The ruleset layout
//!
//! Two tables: `inet nftpol`, below, and the anti-spoofing table `bridge nftpol` ([`guard`]);
//! nothing else in the kernel is touched.
//!
//! | object | kind | what it does |
//! | --- | --- | --- |
//! | `forward` | base chain, hook forward, priority filter, policy accept | pod traffic routed or bridged through the node |
//! | `input` | base chain, hook input, priority filter, policy accept | pod traffic to the node itself (egress only); first, unicast that no local pod sent is accepted (the overlay's datagrams: one lookup, two with `--isolate-unprogrammed`), then anything straight from a listed veth (never unicast) is dropped, then what no local pod sent is accepted, VXLAN and IP-in-IP from local pods dropped; past the three rules below (and, with `--isolate-unprogrammed`, an accept of what arrives on `lo`, then a drop of what comes from an address in the node's pod CIDRs that no known pod holds; the accepts before them leave those addresses out), what local pods with open egress sent is accepted |
//! | `veths` | set of `ifname` | the veths on the guarded pods' bridges (the guard's `ports`), filled in on the node ([`guard::veths_delta`]): a bridge hands the node a frame for a reserved group address as received by the port, past the guard's chains |
//! | `ingress4`/`ingress6` | verdict map, pod address -> `jump ing_*` | ingress dispatch of local, ingress-isolated pods |
//! | `egress4`/`egress6` | verdict map, pod address -> `jump egr_*` | egress dispatch of local, egress-isolated pods |
//! | `self4`/`self6` | set of `addr . addr` | a local pod reaching itself (hairpin) |
//! | `known4`/`known6` | set of addresses | every local pod's addresses: `forward` and `input` drop VXLAN (UDP 4789, 8472) and IP-in-IP (protocol 4) from them, and `--isolate-unprogrammed` drops what is in the node's pod CIDRs (`podcidr4`/`podcidr6`) but not here |
//! | `ing_<ns>_<hash>` | regular chain | the ingress rules of every local pod sharing namespace, selecting policies and named-port numbers; allowed packets `return` (to `forward`, which stamps and accepts them), the rest `drop` |
//! | `egr_<ns>_<hash>` | regular chain | likewise for egress; allowed packets `return` so ingress is checked next |
//! | `pods4_<hash>`/`pods6_<hash>` | set of addresses | pods one pod peer (namespace scope + pod selector) selects, cluster-wide |
//! | `cidr4_<hash>`/`cidr6_<hash>` | interval set | an ipBlock with its `except` already subtracted |
//! | `nport4_<hash>`/`nport6_<hash>` | set of `addr . l4proto . port` | egress named ports: each destination pod with the number it gives the name |
//!
//! Both base chains have the same three rules (in `input`, after the VXLAN and IP-in-IP drops;
//! in `forward`, at the top, and those drops follow them): packets `related` to a tracked
//! connection (ICMP errors) and replies (`established`, direction reply) are accepted, then IPv6
//! neighbour discovery. Every other packet is evaluated, with one shortcut in `forward`
//! ([`epoch`]): its second rule, between the reply and related accepts, accepts a later
//! original-direction packet of an established connection whose ct mark carries the current
//! ruleset epoch, which its last rule stamped when a full evaluation let the connection
//! through. Every change of the table moves to a new epoch, so when a policy
//! change stops allowing a connection, its next packet is evaluated again and dropped.
//!
//! In `forward`, after the self sets, the source address is looked up in `egress4/6` and the
//! destination in `ingress4/6`. A connection needs both: the egress chain of a local source
//! returns on allow, then the ingress chain of a local destination accepts or drops. Remote
//! ends are checked by the agent on their own node. A packet both sides let through reaches
//! the end of `forward`, which stamps the epoch and accepts it. Traffic the node itself originates never
//! passes `forward` (it leaves through `output`, which has no chain here), so the node always
//! reaches its pods.
//!
//! Per packet, the cost is a fixed number of map lookups plus the rules of the one chain a pod
//! maps to; each rule is one set lookup plus port matches. It does not grow with the number of
//! policies or pods in the cluster. Pod churn changes map and set elements only: a pod joins
//! the chain its siblings already use.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod compile;
pub mod diff;
pub mod epoch;
pub mod eval;
pub mod guard;
pub mod ir;
pub mod model;
pub mod policy;
pub mod render;
pub mod selector;
pub mod trace;

pub use cluster::Cluster;
pub use compile::{Compiler, Options};
pub use diff::{diff, Delta};
pub use policy::Diagnostic;
pub use render::render;
pub use trace::{Endpoint, Trace, Tracer};
