//! Node-local pods in a two-node lab with one `agent run` per node:
//!
//! - anti-spoofing: a pod that puts another pod's addresses on its interface and sends from them
//!   reaches a server that admits the other pod while no agent runs, and is dropped at its own
//!   veth once the agents run (cross-node and same-node, IPv4 and IPv6), while the real pod's
//!   packets still arrive; so is a pod the agent does not know (not in the snapshot) sending
//!   from a remote pod's addresses, outside its bridge's subnets, while it still reaches an
//!   open pod from its own;
//! - link-layer addresses: a pod (guarded, or one the agent does not know) that sends one frame
//!   from a neighbour's MAC moves that MAC to its own bridge port, and the node's traffic to the
//!   neighbour with it, while no agent runs, and cannot once the agent runs; a pod that sets
//!   its interface to the neighbour's MAC cuts both off (with a warning naming both) until it
//!   gives it back;
//! - addresses on two veths: a pod the agent does not know that puts a guarded pod's addresses
//!   on its interface too reaches the node from them while no agent runs; once the agent runs,
//!   the guarded pod keeps its veth and the stranger's datagrams are dropped, also after the
//!   agent restarts (its state directory says which veth the pod was on); an agent started
//!   afresh while both have the addresses takes them from neither (both cut off, warned naming both
//!   veths) until the stranger gives them back; a guarded pod that removes its own addresses
//!   and takes a remote pod's still sends from none but its own;
//! - floods: once the bridge forgets a pod's MAC, frames another pod sends it are flooded to
//!   every port while no agent runs, and reach no third pod once the agent runs; frames the
//!   node sends it (the bridge made to forget at once) reach every other pod while no agent
//!   runs, and none once the agent has pinned the pod's MAC to its veth, a pin that another
//!   pod taking the MAC does not move; a pod that takes the bridge's own MAC gets no pin (which
//!   would move the bridge's entry to the pod);
//! - ARP: a pod that announces another pod's IPv4 address in ARP (the kernel does so when it
//!   sends from a borrowed address) takes that address over in the node's neighbour table while
//!   no agent runs, and cannot once the agent runs;
//! - neighbour advertisements: the same for a pod advertising another pod's IPv6 address;
//! - router advertisements: a pod that advertises itself as a router becomes its neighbours'
//!   default router while no agent runs, and does not once the agent runs; neighbour discovery
//!   still works;
//! - link-local, broadcast and multicast: a pod reaches a pod that a policy isolates on the same
//!   bridge at its IPv6 link-local address, and with IPv4 broadcast and IPv4 and IPv6 multicast
//!   datagrams (as the kernel sends them, and in unicast frames to the pod's MAC), while no
//!   agent runs, and cannot once the agent runs; pod addresses and neighbour discovery work as
//!   before;
//! - link-local to the node: a pod that a policy isolates for egress reaches a service of its
//!   node at the node's link-local address while no agent runs, and cannot once the agent runs;
//!   a pod whose egress is open still can, and neighbour discovery works as before;
//! - reserved group addresses: frames from a pod to 01:80:c2:00:00:03 and :0e, which the bridge
//!   hands to the node as received by the veth, reach the node with a forged IPv4 source and a
//!   link-local IPv6 one while no agent runs, and do not once the agent runs;
//! - VXLAN: a pod wraps a datagram "from" a pod of another node in VXLAN and sends it to its own
//!   node's port 8472; the pod it names, which admits only that node's pods, receives it while
//!   no agent runs, and does not once the agent runs;
//! - IP-in-IP: a pod's IP-in-IP packets to its node and to a pod beside it arrive while no agent
//!   runs (this kernel has no IP-in-IP device to unwrap them), and are dropped once it runs,
//!   with no policy in place;
//! - `dump-ruleset --guard`, run in the node's namespace, prints the anti-spoofing table for the
//!   veths found there, and `nft -c` takes the output;
//! - `--isolate-unprogrammed`: a pod that is not in the snapshot yet is reachable, and reaches
//!   its node, without the agents; with them it is unreachable and cannot reach its node (a known
//!   pod beside it can), while the node still reaches it and its own addresses in the pod CIDR;
//!   both work once the snapshot lists it.
//!
//! Whether a datagram arrived is read from a counter in the receiving namespace (the server
//! pod's, or the node's), so the verdict does not depend on a reply that a forged source would
//! never get.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::agents::{agent_binary, wait_for, Agent};
use integration::lab::{Lab, Pod, Protocol, Target};
use integration::netns;

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");
const NODES: [&str; 2] = ["node-a", "node-b"];
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
const SENT: u64 = 5;

fn exec(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .expect("ip netns exec runs");
    assert!(
        out.status.success(),
        "{args:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod of the snapshot, with the lab pod's addresses.
fn pod_yaml(pod: &Pod, app: &str) -> String {
    let (namespace, name) = pod.name.split_once('/').expect("ns/name");
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  namespace: {namespace}\n  name: {name}\n  labels:\n    app: {app}\n\
         spec:\n  nodeName: {}\n  containers:\n  - name: c\n    image: x\n\
         status:\n  phase: Running\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: {}\n",
        NODES[pod.node], pod.ipv4, pod.ipv4, pod.ipv6
    )
}

fn snapshot(pods: &[(&Pod, &str)], policies: &str) -> String {
    let mut docs = vec!["apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bank\n".to_string()];
    docs.extend(pods.iter().map(|(pod, app)| pod_yaml(pod, app)));
    if !policies.is_empty() {
        docs.push(policies.to_string());
    }
    docs.join("---\n")
}

fn write_snapshot(path: &Path, text: &str) {
    let new = path.with_extension("new");
    fs::write(&new, text).expect("write snapshot");
    fs::rename(&new, path).expect("rename snapshot");
}

fn start_agents(lab: &Lab, snapshot: &Path, extra: &[&[&str]; 2]) -> Vec<Agent> {
    let mut agents: Vec<Agent> = (0..NODES.len())
        .map(|i| Agent::start(Path::new(LABPOD), lab, i, NODES[i], snapshot, extra[i]))
        .collect();
    wait_for(&mut agents, "a first `synced`", SYNC_TIMEOUT, |_, a| {
        a.synced() >= 1
    });
    agents
}

/// Packets counted by name in `netns`'s input hook: by default those from each source address to
/// UDP port 80.
struct Counter<'a> {
    netns: &'a str,
}

impl<'a> Counter<'a> {
    fn install(server: &'a Pod, sources: &[&Pod]) -> Counter<'a> {
        let addrs: Vec<String> = sources
            .iter()
            .flat_map(|s| [s.ipv4.to_string(), s.ipv6.to_string()])
            .collect();
        Counter::at(&server.netns, -10, &addrs)
    }

    /// Counts datagrams to UDP port 80 in `netns`'s input hook at `priority` (after `inet
    /// nftpol`'s when above 0).
    fn at(netns: &'a str, priority: i32, sources: &[String]) -> Counter<'a> {
        let counted: Vec<(String, String)> = sources
            .iter()
            .map(|addr| {
                let family = if addr.contains(':') { "ip6" } else { "ip" };
                (addr.clone(), format!("{family} saddr {addr} udp dport 80"))
            })
            .collect();
        Counter::matching(netns, priority, &counted)
    }

    /// Counts what each `(name, match)` matches in `netns`'s input hook at `priority`.
    fn matching(netns: &'a str, priority: i32, counted: &[(String, String)]) -> Counter<'a> {
        let mut rules = String::new();
        for (name, matches) in counted {
            rules.push_str(&format!("\t\t{matches} counter comment \"{name}\"\n"));
        }
        let text = format!(
            "table inet observe {{\n\tchain seen {{\n\t\ttype filter hook input priority {priority}; policy accept;\n{rules}\t}}\n}}\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft runs");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "counter table loads");
        Counter { netns }
    }

    fn packets(&self, source: &str) -> u64 {
        let listing = exec(
            self.netns,
            &["nft", "list", "chain", "inet", "observe", "seen"],
        );
        let line = listing
            .lines()
            .find(|l| l.contains(&format!("comment \"{source}\"")))
            .unwrap_or_else(|| panic!("no counter for {source}:\n{listing}"));
        let after = line.split("packets ").nth(1).expect("packets");
        after
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .expect("a count")
    }
}

/// Gives `attacker` the addresses of `victim` as extra addresses.
fn borrow_addresses(attacker: &Pod, victim: &Pod) {
    exec(
        &attacker.netns,
        &[
            "ip",
            "addr",
            "add",
            &format!("{}/32", victim.ipv4),
            "dev",
            "eth0",
        ],
    );
    exec(
        &attacker.netns,
        &[
            "ip",
            "addr",
            "add",
            &format!("{}/128", victim.ipv6),
            "dev",
            "eth0",
            "nodad",
        ],
    );
}

/// How many packets each `(counter, name)` counted while `send` ran, waiting 100 ms after it
/// for the last ones in flight.
fn arrivals<const N: usize>(counted: [(&Counter, &str); N], send: impl FnOnce()) -> [u64; N] {
    let before = counted.map(|(counter, name)| counter.packets(name));
    send();
    std::thread::sleep(Duration::from_millis(100));
    let mut counts = counted.map(|(counter, name)| counter.packets(name));
    for (count, before) in counts.iter_mut().zip(before) {
        *count -= before;
    }
    counts
}

/// Sends `SENT` datagrams from `from` (an address of `sender`) to UDP 80 of `to`; how many the
/// counter saw arrive, per family.
fn delivered(sender: &Pod, as_of: &Pod, to: &Pod, counter: &Counter) -> [u64; 2] {
    let pairs = [
        (as_of.ipv4.to_string(), to.ipv4.to_string()),
        (as_of.ipv6.to_string(), to.ipv6.to_string()),
    ];
    pairs.map(|(from, dst)| {
        let [count] = arrivals([(counter, &from)], || {
            exec(
                &sender.netns,
                &[LABPOD, "send", &from, &dst, "80", &SENT.to_string()],
            );
        });
        count
    })
}

/// Probes TCP 80 from each of `from` to `to` in both families until all pass (IPv6 neighbour
/// discovery and the nodes' routes settle in the first second or so of a lab).
fn warm_up(lab: &Lab, from: &[&Pod], to: &Pod) {
    let targets: Vec<Target> = [to.ipv4.to_string(), to.ipv6.to_string()]
        .iter()
        .map(|a| Target {
            addr: a.parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        })
        .collect();
    for pod in from {
        let mut last = Vec::new();
        for _ in 0..50 {
            last = lab.probe(pod, &targets).expect("probe");
            if last.iter().all(|ok| *ok) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            last,
            [true, true],
            "{} reaches {} before any rule",
            pod.name,
            to.name
        );
    }
}

const VAULT_POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  namespace: bank\n  name: vault-from-teller\n\
spec:\n  podSelector:\n    matchLabels:\n      app: vault\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: teller\n    ports:\n    - protocol: UDP\n      port: 80\n    - protocol: TCP\n      port: 80\n";

#[test]
fn a_pod_cannot_send_from_another_pods_address() {
    if netns::skip_unless_root("a_pod_cannot_send_from_another_pods_address") {
        return;
    }
    agent_binary(Path::new(LABPOD));
    let scratch = tempfile::tempdir().expect("scratch dir");
    let mut lab = Lab::new(LABPOD, NODES.len()).expect("lab");
    let teller = lab.add_pod(0, "bank/teller", 10).expect("pod");
    let mallory = lab.add_pod(0, "bank/mallory", 11).expect("pod");
    let vault = lab.add_pod(1, "bank/vault", 20).expect("pod");
    let eve = lab.add_pod(1, "bank/eve", 21).expect("pod");
    // Not in the snapshot: the agent does not guard its veth.
    let stranger = lab.add_pod(1, "bank/stranger", 22).expect("pod");
    warm_up(&lab, &[&teller, &mallory, &eve, &stranger], &vault);
    let counter = Counter::install(&vault, &[&teller]);
    let at_eve = Counter::install(&eve, &[&stranger]);
    borrow_addresses(&mallory, &teller);
    borrow_addresses(&eve, &teller);
    borrow_addresses(&stranger, &teller);

    // No agent: forged datagrams arrive, across nodes (mallory) and on the vault's node (eve).
    assert_eq!(
        delivered(&mallory, &teller, &vault, &counter),
        [SENT; 2],
        "control, cross-node"
    );
    assert_eq!(
        delivered(&eve, &teller, &vault, &counter),
        [SENT; 2],
        "control, same node"
    );
    assert_eq!(
        delivered(&stranger, &teller, &vault, &counter),
        [SENT; 2],
        "control, a pod the agent does not know"
    );

    let path = scratch.path().join("snapshot.yaml");
    let pods = [
        (&teller, "teller"),
        (&mallory, "mallory"),
        (&vault, "vault"),
        (&eve, "eve"),
    ];
    write_snapshot(&path, &snapshot(&pods, VAULT_POLICY));
    let mut agents = start_agents(&lab, &path, &[&[], &[]]);
    for (i, node) in NODES.iter().enumerate() {
        let veths = exec(
            lab.node_netns(i).unwrap(),
            &["nft", "list", "set", "bridge", "nftpol", "veths"],
        );
        if veths.matches("\"veth").count() != 2 {
            let logs: Vec<String> = agents.iter_mut().map(Agent::describe).collect();
            panic!("{node} guards its two pods:\n{veths}\n{}", logs.join("\n"));
        }
    }

    let forged_cross = delivered(&mallory, &teller, &vault, &counter);
    let forged_local = delivered(&eve, &teller, &vault, &counter);
    let forged_unknown = delivered(&stranger, &teller, &vault, &counter);
    let unknown_own = delivered(&stranger, &stranger, &eve, &at_eve);
    let genuine = delivered(&teller, &teller, &vault, &counter);
    let allowed = lab
        .probe(
            &teller,
            &[Target {
                addr: vault.ipv4.into(),
                protocol: Protocol::Tcp,
                port: 80,
            }],
        )
        .expect("probe");
    let own_address = lab
        .probe(
            &mallory,
            &[Target {
                addr: vault.ipv4.into(),
                protocol: Protocol::Tcp,
                port: 80,
            }],
        )
        .expect("probe");
    let logs: Vec<String> = agents.iter_mut().map(Agent::describe).collect();
    println!(
        "forged cross-node {forged_cross:?}, forged same-node {forged_local:?}, forged by an unknown pod {forged_unknown:?}, its own {unknown_own:?}, genuine {genuine:?} (of {SENT} per family)"
    );
    assert_eq!(
        forged_cross,
        [0, 0],
        "forged across nodes\n{}",
        logs.join("\n")
    );
    assert_eq!(
        forged_local,
        [0, 0],
        "forged on the same node\n{}",
        logs.join("\n")
    );
    assert_eq!(
        forged_unknown,
        [0, 0],
        "forged by a pod the agent does not know, from outside its bridge's subnets\n{}",
        logs.join("\n")
    );
    assert_eq!(
        unknown_own,
        [SENT; 2],
        "that pod, from its own addresses, to an open pod\n{}",
        logs.join("\n")
    );
    assert_eq!(genuine, [SENT; 2], "the real teller\n{}", logs.join("\n"));
    assert_eq!(allowed, [true], "teller -> vault TCP 80 is allowed");
    assert_eq!(own_address, [false], "mallory -> vault TCP 80 is not");
}

/// The link-layer address of `device` in `netns`.
fn link_address(netns: &str, device: &str) -> String {
    exec(netns, &["cat", &format!("/sys/class/net/{device}/address")])
        .trim()
        .to_string()
}

/// Has `netns` hold `addr` at `mac` on `dev`, in neighbour state `state`.
fn set_neighbour(netns: &str, dev: &str, addr: &str, mac: &str, state: &str) {
    exec(
        netns,
        &[
            "ip", "neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", state,
        ],
    );
}

/// The link-layer address `node`'s cni0 holds for `addr`, if any.
fn neighbour(lab: &Lab, node: usize, addr: &str) -> Option<String> {
    let out = exec(
        lab.node_netns(node).unwrap(),
        &["ip", "neigh", "show", "to", addr, "dev", "cni0"],
    );
    out.split_whitespace()
        .skip_while(|word| *word != "lladdr")
        .nth(1)
        .map(str::to_string)
}

/// `attacker` sends from `victim`'s IPv4 address to an address behind the node with an empty
/// neighbour cache, so its kernel first asks for the gateway in ARP with the victim's address as
/// sender; returns the link-layer address the node then holds for the victim.
fn arp_claim(lab: &Lab, attacker: &Pod, victim: &Pod) -> Option<String> {
    let victim_v4 = victim.ipv4.to_string();
    exec(
        lab.node_netns(attacker.node).unwrap(),
        &["ip", "neigh", "flush", "dev", "cni0"],
    );
    exec(&attacker.netns, &["ip", "neigh", "flush", "dev", "eth0"]);
    exec(
        &attacker.netns,
        &[LABPOD, "send", &victim_v4, "192.0.2.1", "80", "1"],
    );
    std::thread::sleep(Duration::from_millis(200));
    neighbour(lab, attacker.node, &victim_v4)
}

/// A one-node lab with pods `bank/teller` and `bank/mallory`, and a scratch directory; `None`
/// (the test skips) unless root.
fn teller_and_mallory(test: &str) -> Option<(tempfile::TempDir, Lab, Pod, Pod)> {
    if netns::skip_unless_root(test) {
        return None;
    }
    agent_binary(Path::new(LABPOD));
    let scratch = tempfile::tempdir().expect("scratch dir");
    let mut lab = Lab::new(LABPOD, 1).expect("lab");
    let teller = lab.add_pod(0, "bank/teller", 10).expect("pod");
    let mallory = lab.add_pod(0, "bank/mallory", 11).expect("pod");
    Some((scratch, lab, teller, mallory))
}

/// One agent on node 0 of `lab` for `pods` (each labelled `app` with its name) and `policies`,
/// from a snapshot in `scratch`, once its guard lists every pod's veth.
fn guard_node_a(lab: &Lab, scratch: &Path, pods: &[&Pod], policies: &str) -> Agent {
    let path = scratch.join("snapshot.yaml");
    let labelled: Vec<(&Pod, &str)> = pods
        .iter()
        .map(|pod| (*pod, pod.name.split_once('/').map_or("", |(_, name)| name)))
        .collect();
    write_snapshot(&path, &snapshot(&labelled, policies));
    let mut agent = Agent::start(Path::new(LABPOD), lab, 0, NODES[0], &path, &[]);
    wait_for(
        std::slice::from_mut(&mut agent),
        "the guard of every veth",
        SYNC_TIMEOUT,
        |_, a| {
            a.synced() >= 1
                && exec(
                    lab.node_netns(0).unwrap(),
                    &["nft", "list", "set", "bridge", "nftpol", "veths"],
                )
                .matches("\"veth")
                .count()
                    == pods.len()
        },
    );
    agent
}

/// The IPv6 link-local address of `iface` in `netns` once duplicate address detection is done
/// with it: the kernel does not send from a tentative address (and picks another source).
fn link_local(netns: &str, iface: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = exec(
            netns,
            &[
                "ip",
                "-6",
                "-o",
                "addr",
                "show",
                "dev",
                iface,
                "scope",
                "link",
                "-tentative",
            ],
        );
        let addr = out
            .split_whitespace()
            .skip_while(|word| *word != "inet6")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next());
        if let Some(addr) = addr {
            return addr.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{iface} in {netns} has no usable link-local address after 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `labpod advertise` on `eth0`, the frame tagged VLAN 0 when `vlan0`: receivers take that tag
/// for none, but `ether type` sees it.
fn labpod_advertise(vlan0: bool, rest: &[&str]) -> Vec<String> {
    [LABPOD, "advertise"]
        .into_iter()
        .chain(vlan0.then_some("--vlan0"))
        .chain(["eth0"])
        .chain(rest.iter().copied())
        .map(str::to_string)
        .collect()
}

/// `attacker` advertises itself as a router; returns the default routes `victim` then holds
/// from advertisements (after forgetting earlier ones).
fn advertise(attacker: &Pod, vlan0: bool, victim: &Pod) -> String {
    exec(
        &victim.netns,
        &["ip", "-6", "route", "flush", "proto", "ra"],
    );
    let command = labpod_advertise(vlan0, &[]);
    exec(
        &attacker.netns,
        &command.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    std::thread::sleep(Duration::from_millis(200));
    exec(
        &victim.netns,
        &["ip", "-6", "route", "show", "default", "proto", "ra"],
    )
    .trim()
    .to_string()
}

#[test]
fn a_pod_cannot_advertise_itself_as_a_router() {
    let Some((scratch, lab, teller, mallory)) =
        teller_and_mallory("a_pod_cannot_advertise_itself_as_a_router")
    else {
        return;
    };
    // Untagged, and tagged (the tag hides the frame from the `ether type` of `icmpv6 type`).
    let router = format!("default via {} ", link_local(&mallory.netns, "eth0"));
    let tags = [false, true];

    // No agent: teller takes mallory for a router.
    for vlan0 in tags {
        let learnt = advertise(&mallory, vlan0, &teller);
        assert!(
            learnt.starts_with(&router),
            "control: without the agent, {} learns a default route from {}'s advertisement (tagged: {vlan0}), got {learnt:?}",
            teller.name,
            mallory.name
        );
    }

    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], "");
    let learnt = tags.map(|vlan0| advertise(&mallory, vlan0, &teller));
    println!(
        "with the agent: teller's routes from advertisements, untagged and tagged: {learnt:?}"
    );
    assert_eq!(
        learnt,
        [""; 2],
        "the agent lets {}'s router advertisement through\n{}",
        mallory.name,
        agent.describe()
    );
    // Neighbour discovery itself still passes: from empty neighbour caches, teller reaches
    // mallory over IPv6.
    for pod in [&teller, &mallory] {
        exec(&pod.netns, &["ip", "neigh", "flush", "dev", "eth0"]);
    }
    let reached = lab
        .probe(
            &teller,
            &[Target {
                addr: mallory.ipv6.into(),
                protocol: Protocol::Tcp,
                port: 80,
            }],
        )
        .unwrap();
    assert_eq!(reached, [true], "teller -> mallory over IPv6, no policy");
}

#[test]
fn a_pod_cannot_claim_another_pods_address_in_arp() {
    let Some((scratch, lab, teller, mallory)) =
        teller_and_mallory("a_pod_cannot_claim_another_pods_address_in_arp")
    else {
        return;
    };
    let mallory_mac = link_address(&mallory.netns, "eth0");
    borrow_addresses(&mallory, &teller);

    // No agent: the node believes mallory's claim.
    let claimed = arp_claim(&lab, &mallory, &teller);
    assert_eq!(
        claimed.as_deref(),
        Some(mallory_mac.as_str()),
        "control: without the agent, the node takes {}'s ARP claim to {}",
        mallory.name,
        teller.ipv4
    );

    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], "");
    let claimed = arp_claim(&lab, &mallory, &teller);
    let genuine = arp_claim(&lab, &teller, &teller);
    println!("with the agent: the node holds {claimed:?} for teller after mallory's claim, {genuine:?} after teller's own ARP");
    assert_ne!(
        claimed.as_deref(),
        Some(mallory_mac.as_str()),
        "the agent lets {}'s ARP claim to {} through\n{}",
        mallory.name,
        teller.ipv4,
        agent.describe()
    );
    let teller_mac = link_address(&teller.netns, "eth0");
    assert_eq!(
        genuine.as_deref(),
        Some(teller_mac.as_str()),
        "teller's own ARP still passes"
    );
}

/// `sender` advertises that `target` is at its link-layer address, overriding, from its
/// link-local address or from `from`, tagged VLAN 0 when `vlan0`; returns the link-layer
/// address `sender`'s node then holds for `target`.
fn nd_claim(
    lab: &Lab,
    sender: &Pod,
    vlan0: bool,
    target: &str,
    from: Option<&str>,
) -> Option<String> {
    let mut rest = vec![target];
    rest.extend(from);
    let command = labpod_advertise(vlan0, &rest);
    exec(
        &sender.netns,
        &command.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    std::thread::sleep(Duration::from_millis(200));
    neighbour(lab, sender.node, target)
}

#[test]
fn a_pod_cannot_claim_another_pods_address_in_neighbour_advertisements() {
    let Some((scratch, lab, teller, mallory)) =
        teller_and_mallory("a_pod_cannot_claim_another_pods_address_in_neighbour_advertisements")
    else {
        return;
    };
    let (teller_mac, mallory_mac) = (
        link_address(&teller.netns, "eth0"),
        link_address(&mallory.netns, "eth0"),
    );
    let teller_v6 = teller.ipv6.to_string();
    // Advertisements only update entries the node already has: it talks to teller first.
    exec(
        lab.node_netns(0).unwrap(),
        &[LABPOD, "probe", &teller_v6, "tcp", "80"],
    );
    assert_eq!(
        neighbour(&lab, 0, &teller_v6).as_deref(),
        Some(teller_mac.as_str()),
        "the node has resolved teller's IPv6 address"
    );

    let mallory_v6 = mallory.ipv6.to_string();
    link_local(&mallory.netns, "eth0");
    link_local(&teller.netns, "eth0");
    // Mallory claims teller's address from its link-local address, as the kernel sends
    // neighbour discovery, from its own pod address, which the guard lets through as a
    // source, and from that in a frame tagged VLAN 0. After each, the entry is set to
    // mallory's by hand and teller advertises itself.
    let claims = || {
        [
            (false, None),
            (false, Some(mallory_v6.as_str())),
            (true, Some(mallory_v6.as_str())),
        ]
        .map(|(vlan0, from)| {
            let claimed = nd_claim(&lab, &mallory, vlan0, &teller_v6, from);
            set_neighbour(
                lab.node_netns(0).unwrap(),
                "cni0",
                &teller_v6,
                &mallory_mac,
                "stale",
            );
            let genuine = nd_claim(&lab, &teller, false, &teller_v6, None);
            (claimed, genuine)
        })
    };
    // No agent: the node believes mallory, and teller puts it right again.
    let mallory_wins = (Some(mallory_mac.clone()), Some(teller_mac.clone()));
    assert_eq!(
        claims(),
        [mallory_wins.clone(), mallory_wins.clone(), mallory_wins],
        "control: without the agent, the node takes {}'s advertisements for {teller_v6} \
         (from its link-local address, its own address, tagged), and teller's own after each",
        mallory.name
    );

    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], "");
    let with_agent = claims();
    println!(
        "with the agent: after each of mallory's advertisements, then teller's own, the node holds {with_agent:?}"
    );
    let teller_holds = (Some(teller_mac.clone()), Some(teller_mac.clone()));
    assert_eq!(
        with_agent,
        [teller_holds.clone(), teller_holds.clone(), teller_holds],
        "the agent lets {}'s advertisement for {teller_v6} through, or stops teller's own\n{}",
        mallory.name,
        agent.describe()
    );
}

#[test]
fn unprogrammed_pods_stay_isolated_until_the_snapshot_lists_them() {
    if netns::skip_unless_root("unprogrammed_pods_stay_isolated_until_the_snapshot_lists_them") {
        return;
    }
    agent_binary(Path::new(LABPOD));
    let scratch = tempfile::tempdir().expect("scratch dir");
    let mut lab = Lab::new(LABPOD, NODES.len()).expect("lab");
    let client = lab.add_pod(0, "bank/client", 10).expect("pod");
    let known = lab.add_pod(1, "bank/known", 20).expect("pod");
    let newcomer = lab.add_pod(1, "bank/newcomer", 21).expect("pod");
    let to = |pod: &Pod| -> Vec<Target> {
        [pod.ipv4.to_string(), pod.ipv6.to_string()]
            .iter()
            .map(|a| Target {
                addr: a.parse().unwrap(),
                protocol: Protocol::Tcp,
                port: 80,
            })
            .collect()
    };
    warm_up(&lab, &[&client], &newcomer);
    warm_up(&lab, &[&newcomer], &client);
    warm_up(&lab, &[&client], &known);
    // A service of node-b, where the newcomer runs, at its addresses on the pod network.
    lab.serve_on_node(1)
        .expect("a server in node-b's namespace");
    let node_b = ["10.244.2.1", "fd00:10:244:2::1"];
    for addr in node_b {
        assert!(
            reaches(&newcomer, addr),
            "control: without the agent, the newcomer reaches its node at {addr}"
        );
    }

    let path = scratch.path().join("snapshot.yaml");
    write_snapshot(
        &path,
        &snapshot(&[(&client, "client"), (&known, "known")], ""),
    );
    let mut agents = start_agents(
        &lab,
        &path,
        &[
            &["--isolate-unprogrammed", "10.244.1.0/24,fd00:10:244:1::/64"],
            &["--isolate-unprogrammed", "10.244.2.0/24,fd00:10:244:2::/64"],
        ],
    );
    let before = lab.probe(&client, &to(&newcomer)).unwrap();
    let out = lab.probe(&newcomer, &to(&client)).unwrap();
    let known_ok = lab.probe(&client, &to(&known)).unwrap();
    assert_eq!(before, [false, false], "the newcomer is isolated");
    assert_eq!(out, [false, false], "and cannot send");
    // The node still reaches it (the kubelet's probes), and so gets its replies; and it
    // reaches its own addresses on the pod network, which no pod holds.
    let node_b_netns = lab.node_netns(1).unwrap().to_string();
    let own = node_b.map(String::from);
    for addr in [newcomer.ipv4.to_string(), newcomer.ipv6.to_string()]
        .into_iter()
        .chain(own)
    {
        assert!(
            reaches_from(&node_b_netns, &addr),
            "node-b does not reach {addr}\n{}",
            agents[1].describe()
        );
    }
    for addr in node_b {
        assert!(
            !reaches(&newcomer, addr),
            "the newcomer reaches its node at {addr}\n{}",
            agents[1].describe()
        );
        assert!(
            reaches(&known, addr),
            "a known pod no policy selects reaches its node at {addr}\n{}",
            agents[1].describe()
        );
    }
    assert_eq!(
        known_ok,
        [true, true],
        "a known pod no policy selects stays open"
    );

    let synced: Vec<usize> = agents.iter().map(Agent::synced).collect();
    write_snapshot(
        &path,
        &snapshot(
            &[
                (&client, "client"),
                (&known, "known"),
                (&newcomer, "newcomer"),
            ],
            "",
        ),
    );
    wait_for(
        &mut agents,
        "node-b's `synced` for the newcomer",
        SYNC_TIMEOUT,
        |i, a| i == 0 || a.synced() > synced[i],
    );
    let after = lab.probe(&client, &to(&newcomer)).unwrap();
    assert_eq!(after, [true, true], "listed, the newcomer is reachable");
    for addr in node_b {
        assert!(
            reaches(&newcomer, addr),
            "listed, the newcomer reaches its node at {addr}\n{}",
            agents[1].describe()
        );
    }
}

/// `labpod probe` from `from` to `addr` (`fe80::1%eth0` for a link-local one) on TCP 80: did
/// it connect and get the server's reply?
fn reaches(from: &Pod, addr: &str) -> bool {
    reaches_from(&from.netns, addr)
}

/// The same from any namespace (a node's).
fn reaches_from(netns: &str, addr: &str) -> bool {
    let out = exec(
        netns,
        &[LABPOD, "probe", "--timeout-ms", "1000", addr, "tcp", "80"],
    );
    out.trim_end().ends_with(" ok")
}

const TELLER_ISOLATED: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  namespace: bank\n  name: teller-deny-ingress\n\
    spec:\n  podSelector:\n    matchLabels:\n      app: teller\n  policyTypes:\n  - Ingress\n";

#[test]
fn a_pod_cannot_reach_an_isolated_pod_over_link_local_broadcast_or_multicast() {
    let Some((scratch, lab, teller, mallory)) = teller_and_mallory(
        "a_pod_cannot_reach_an_isolated_pod_over_link_local_broadcast_or_multicast",
    ) else {
        return;
    };
    let teller_ll = format!("{}%eth0", link_local(&teller.netns, "eth0"));
    let mallory_ll = format!("{}%eth0", link_local(&mallory.netns, "eth0"));
    let counter = Counter::install(&teller, &[&mallory]);
    let (mallory_v4, mallory_v6) = (mallory.ipv4.to_string(), mallory.ipv6.to_string());
    let teller_mac = link_address(&teller.netns, "eth0");
    let [a, b, c, _] = teller.ipv4.octets();
    let subnet_broadcast = format!("{a}.{b}.{c}.255");
    let sent = SENT.to_string();
    // Datagrams from mallory's pod addresses to no pod address: as its kernel sends them
    // (IPv4 broadcast, the /24's broadcast and all-hosts multicast, IPv6 all-nodes
    // multicast), and in unicast frames to teller's MAC, which teller's kernel takes as well;
    // how many reached teller's input, per family.
    let flooded = || {
        arrivals([(&counter, &mallory_v4), (&counter, &mallory_v6)], || {
            for (from, to) in [
                (&mallory_v4, "255.255.255.255"),
                (&mallory_v4, subnet_broadcast.as_str()),
                (&mallory_v4, "224.0.0.1"),
                (&mallory_v6, "ff02::1%eth0"),
            ] {
                exec(&mallory.netns, &[LABPOD, "send", from, to, "80", &sent]);
            }
            for (from, to) in [
                (&mallory_v4, "255.255.255.255"),
                (&mallory_v4, "224.0.0.1"),
                (&mallory_v6, "ff02::1"),
            ] {
                exec(
                    &mallory.netns,
                    &[LABPOD, "rawudp", "eth0", &teller_mac, from, to, "80", &sent],
                );
            }
        })
    };
    assert!(
        reaches(&mallory, &teller_ll),
        "control: without the agent, mallory reaches teller at {teller_ll}"
    );
    assert_eq!(
        flooded(),
        [5 * SENT, 2 * SENT],
        "control: without the agent, teller receives mallory's broadcast and multicast (IPv4, IPv6)"
    );

    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], TELLER_ISOLATED);
    assert!(
        !reaches(&mallory, &teller.ipv6.to_string()),
        "teller is isolated for ingress: mallory reaches its pod address\n{}",
        agent.describe()
    );
    assert!(
        !reaches(&mallory, &teller_ll),
        "mallory reaches isolated teller at its link-local address {teller_ll}\n{}",
        agent.describe()
    );
    assert!(
        !reaches(&teller, &mallory_ll),
        "teller reaches mallory at its link-local address {mallory_ll}\n{}",
        agent.describe()
    );
    assert_eq!(
        flooded(),
        [0, 0],
        "isolated teller receives mallory's broadcast and multicast (IPv4, IPv6)\n{}",
        agent.describe()
    );
    // Pod addresses and the neighbour discovery under them still work: from empty neighbour
    // caches, teller reaches mallory, whom no policy isolates, in both families.
    for pod in [&teller, &mallory] {
        exec(&pod.netns, &["ip", "neigh", "flush", "dev", "eth0"]);
    }
    for addr in [mallory_v4.as_str(), mallory_v6.as_str()] {
        assert!(
            reaches(&teller, addr),
            "teller -> mallory at {addr}\n{}",
            agent.describe()
        );
    }
}

const MALLORY_NO_EGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  namespace: bank\n  name: mallory-deny-egress\n\
    spec:\n  podSelector:\n    matchLabels:\n      app: mallory\n  policyTypes:\n  - Egress\n";

#[test]
fn a_pod_isolated_for_egress_cannot_reach_its_node_from_its_link_local_address() {
    let Some((scratch, mut lab, teller, mallory)) = teller_and_mallory(
        "a_pod_isolated_for_egress_cannot_reach_its_node_from_its_link_local_address",
    ) else {
        return;
    };
    lab.serve_on_node(0)
        .expect("a server in node-a's namespace");
    let node = lab.node_netns(0).unwrap().to_string();
    let node_ll = format!("{}%eth0", link_local(&node, "cni0"));
    let node_v6 = "fd00:10:244:1::1";
    for pod in [&teller, &mallory] {
        assert!(
            reaches(pod, &node_ll),
            "control: without the agent, {} reaches its node at {node_ll}",
            pod.name
        );
    }

    let mut agent = guard_node_a(
        &lab,
        scratch.path(),
        &[&teller, &mallory],
        MALLORY_NO_EGRESS,
    );
    assert!(
        !reaches(&mallory, node_v6),
        "isolated for egress, mallory reaches its node at {node_v6}\n{}",
        agent.describe()
    );
    // From its link-local address, which its egress rules cannot see.
    assert!(
        !reaches(&mallory, &node_ll),
        "isolated for egress, mallory reaches its node at {node_ll}\n{}",
        agent.describe()
    );
    assert!(
        reaches(&teller, &node_ll),
        "teller, whose egress is open, reaches its node at {node_ll}\n{}",
        agent.describe()
    );
    // Mallory's ingress is open, and the neighbour discovery its answers need passes: from
    // empty neighbour caches, teller reaches it in both families.
    for (netns, dev) in [
        (teller.netns.as_str(), "eth0"),
        (mallory.netns.as_str(), "eth0"),
        (node.as_str(), "cni0"),
    ] {
        exec(netns, &["ip", "neigh", "flush", "dev", dev]);
    }
    for addr in [mallory.ipv4.to_string(), mallory.ipv6.to_string()] {
        assert!(
            reaches(&teller, &addr),
            "teller -> mallory at {addr}\n{}",
            agent.describe()
        );
    }
}

#[test]
fn dump_ruleset_on_the_node_prints_the_guard_for_its_veths() {
    let Some((scratch, lab, teller, mallory)) =
        teller_and_mallory("dump_ruleset_on_the_node_prints_the_guard_for_its_veths")
    else {
        return;
    };
    let agent = agent_binary(Path::new(LABPOD));
    let path = scratch.path().join("snapshot.yaml");
    write_snapshot(
        &path,
        &snapshot(
            &[(&teller, "teller"), (&mallory, "mallory")],
            MALLORY_NO_EGRESS,
        ),
    );
    let node = lab.node_netns(0).unwrap();
    let text = exec(
        node,
        &[
            agent.to_str().unwrap(),
            "dump-ruleset",
            "--manifests",
            path.to_str().unwrap(),
            "--node",
            NODES[0],
            "--guard",
        ],
    );
    assert!(text.starts_with("table inet nftpol {"), "{text}");
    let guard = &text[text
        .find("table bridge nftpol {")
        .expect("the guard table follows")..];
    for pod in [&teller, &mallory] {
        for addr in [pod.ipv4.to_string(), pod.ipv6.to_string()] {
            let pair = format!("\"{}\" . {addr}", pod.veth());
            assert!(guard.contains(&pair), "{pair} in\n{guard}");
        }
    }
    let isolated = guard
        .split("set isolated {")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("set isolated");
    assert!(
        isolated.contains(&mallory.veth()) && !isolated.contains(&teller.veth()),
        "only mallory is isolated for egress: {isolated}"
    );
    let file = scratch.path().join("dump.nft");
    fs::write(&file, &text).expect("write the dump");
    exec(node, &["nft", "-c", "-f", file.to_str().unwrap()]);
}

#[test]
fn a_pod_cannot_reach_its_node_past_the_bridge_with_a_reserved_group_address() {
    let Some((scratch, lab, teller, mallory)) = teller_and_mallory(
        "a_pod_cannot_reach_its_node_past_the_bridge_with_a_reserved_group_address",
    ) else {
        return;
    };
    let node = lab.node_netns(0).unwrap();
    // A forged IPv4 source, and mallory's link-local one, which its egress rules cannot see.
    let forged = "10.244.1.77".to_string();
    let link_local = link_local(&mallory.netns, "eth0");
    let counter = Counter::at(node, 10, &[forged.clone(), link_local.clone()]);
    let sent = SENT.to_string();
    // Frames to the bridge's reserved group addresses: one the bridge takes through its input
    // hook, and LLDP's, through none; both reach the node's IP stack as if from the veth.
    let sneaked = || {
        arrivals([(&counter, &forged), (&counter, &link_local)], || {
            for mac in ["01:80:c2:00:00:03", "01:80:c2:00:00:0e"] {
                for (from, to) in [
                    (forged.as_str(), "10.244.1.1"),
                    (link_local.as_str(), "fd00:10:244:1::1"),
                ] {
                    exec(
                        &mallory.netns,
                        &[LABPOD, "rawudp", "eth0", mac, from, to, "80", &sent],
                    );
                }
            }
        })
    };
    assert_eq!(
        sneaked(),
        [2 * SENT, 2 * SENT],
        "control: without the agent, the node takes mallory's datagrams (forged IPv4, link-local IPv6)"
    );

    let mut agent = guard_node_a(
        &lab,
        scratch.path(),
        &[&teller, &mallory],
        MALLORY_NO_EGRESS,
    );
    assert_eq!(
        sneaked(),
        [0, 0],
        "the node takes mallory's datagrams to a reserved group address (forged IPv4, link-local IPv6)\n{}",
        agent.describe()
    );
    // The pods still reach their node the usual way: teller, whose egress is open.
    let mut lab = lab;
    lab.serve_on_node(0)
        .expect("a server in node-a's namespace");
    for addr in ["10.244.1.1", "fd00:10:244:1::1"] {
        assert!(
            reaches(&teller, addr),
            "teller reaches its node at {addr}\n{}",
            agent.describe()
        );
    }
}

#[test]
fn a_pod_cannot_send_ip_in_ip() {
    let Some((scratch, lab, teller, mallory)) = teller_and_mallory("a_pod_cannot_send_ip_in_ip")
    else {
        return;
    };
    let node = lab.node_netns(0).unwrap();
    // No policy at all: nothing but the tunnel rules stands between mallory and its targets.
    // This kernel has no IP-in-IP device to unwrap the packets; the counters see them arrive,
    // at the node after `inet nftpol`'s input chain, at teller before any.
    // Plain UDP from mallory is counted too: the agent must stop the tunnel, not mallory.
    let counted = [
        (
            "ipip".to_string(),
            format!("ip saddr {} ip protocol 4", mallory.ipv4),
        ),
        (
            "udp".to_string(),
            format!("ip saddr {} udp dport 80", mallory.ipv4),
        ),
    ];
    let at_node = Counter::matching(node, 10, &counted);
    let at_teller = Counter::matching(&teller.netns, -10, &counted);
    let sent = SENT.to_string();
    let own = mallory.ipv4.to_string();
    let plain = || {
        arrivals([(&at_node, "udp"), (&at_teller, "udp")], || {
            for addr in ["10.244.1.1".to_string(), teller.ipv4.to_string()] {
                exec(&mallory.netns, &[LABPOD, "send", &own, &addr, "80", &sent]);
            }
        })
    };
    let wrapped = || {
        arrivals([(&at_node, "ipip"), (&at_teller, "ipip")], || {
            for addr in ["10.244.1.1", "192.168.100.1", &teller.ipv4.to_string()] {
                exec(
                    &mallory.netns,
                    &[
                        LABPOD,
                        "ipip",
                        addr,
                        "10.244.2.50",
                        &teller.ipv4.to_string(),
                        "80",
                        &sent,
                    ],
                );
            }
        })
    };
    assert_eq!(
        wrapped(),
        [2 * SENT, SENT],
        "control: without the agent, the node and teller receive mallory's IP-in-IP"
    );

    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], "");
    assert_eq!(
        wrapped(),
        [0, 0],
        "mallory's IP-in-IP reaches its node or teller\n{}",
        agent.describe()
    );
    assert_eq!(
        plain(),
        [SENT, SENT],
        "mallory's plain datagrams no longer reach its node and teller\n{}",
        agent.describe()
    );
}

/// [`teller_and_mallory`] and `bank/stranger`, which is in no snapshot: a pod the agent has
/// not been told of yet, or one whose veth it did not match.
fn with_a_stranger(test: &str) -> Option<(tempfile::TempDir, Lab, Pod, Pod, Pod)> {
    let (scratch, mut lab, teller, mallory) = teller_and_mallory(test)?;
    let stranger = lab.add_pod(0, "bank/stranger", 12).expect("pod");
    Some((scratch, lab, teller, mallory, stranger))
}

#[test]
fn a_pod_the_agent_does_not_guard_cannot_send_as_one_it_does() {
    let Some((scratch, mut lab, teller, mallory, stranger)) =
        with_a_stranger("a_pod_the_agent_does_not_guard_cannot_send_as_one_it_does")
    else {
        return;
    };
    // The stranger's raw frames go to the node's own address, through cni0 and past it (LLDP's
    // reserved group address, which the bridge hands up as received by the veth).
    let node = lab.node_netns(0).unwrap().to_string();
    let node = node.as_str();
    let cni0 = link_address(node, "cni0");
    let sources = [
        teller.ipv4.to_string(),
        teller.ipv6.to_string(),
        stranger.ipv4.to_string(),
        stranger.ipv6.to_string(),
    ];
    let counter = Counter::at(node, 10, &sources);
    let sent = SENT.to_string();
    // `sender`'s datagrams from `as_of`'s addresses in frames to `mac`.
    let sent_by = |sender: &Pod, as_of: &Pod, mac: &str| {
        let from = [as_of.ipv4.to_string(), as_of.ipv6.to_string()];
        arrivals([(&counter, &from[0]), (&counter, &from[1])], || {
            for (from, to) in from.iter().zip(["10.244.1.1", "fd00:10:244:1::1"]) {
                exec(
                    &sender.netns,
                    &[LABPOD, "rawudp", "eth0", mac, from, to, "80", &sent],
                );
            }
        })
    };
    let sent_as = |as_of: &Pod, mac: &str| sent_by(&stranger, as_of, mac);
    const LLDP: &str = "01:80:c2:00:00:0e";
    assert_eq!(
        [sent_as(&teller, &cni0), sent_as(&teller, LLDP)],
        [[SENT, SENT]; 2],
        "control: without the agent, the node takes the stranger's datagrams as teller's (through cni0, past it)"
    );
    // An ARP request to the node as `as_of`, untagged and with a VLAN tag of ID 0 (which the
    // node takes for none): what the node then holds for that address after each.
    let stranger_mac = link_address(&stranger.netns, "eth0");
    let claim = |as_of: &Pod| {
        let addr = as_of.ipv4.to_string();
        [&[][..], &["--vlan0"][..]].map(|flag| {
            exec(node, &["ip", "neigh", "flush", "dev", "cni0"]);
            let mut args = vec![LABPOD, "arp"];
            args.extend(flag);
            args.extend(["eth0", &addr, "10.244.1.1"]);
            exec(&stranger.netns, &args);
            std::thread::sleep(Duration::from_millis(200));
            neighbour(&lab, 0, &addr)
        })
    };
    let stranger_at = Some(stranger_mac.clone());
    assert_eq!(
        claim(&teller),
        [stranger_at.clone(), stranger_at.clone()],
        "control: without the agent, the node takes the stranger's ARP for teller's address (untagged, tagged)"
    );
    // The same in IPv6: a neighbour advertisement for teller's address, from the stranger's
    // link-local address, over the entry the node holds for teller.
    let teller_v6 = teller.ipv6.to_string();
    let teller_mac = link_address(&teller.netns, "eth0");
    link_local(&stranger.netns, "eth0");
    let advertised = || {
        set_neighbour(node, "cni0", &teller_v6, &teller_mac, "stale");
        nd_claim(&lab, &stranger, false, &teller_v6, None)
    };
    assert_eq!(
        advertised(),
        stranger_at,
        "control: without the agent, the node takes the stranger's advertisement for teller's IPv6 address"
    );
    // And a router advertisement: teller takes the stranger for its router.
    let router = format!("default via {} ", link_local(&stranger.netns, "eth0"));
    let learnt = advertise(&stranger, false, &teller);
    assert!(
        learnt.starts_with(&router),
        "control: without the agent, teller learns a default route from the stranger, got {learnt:?}"
    );

    // No policy: teller's egress is open, so `inet nftpol` lets its address through.
    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], "");
    assert_eq!(
        [sent_as(&teller, &cni0), sent_as(&teller, LLDP)],
        [[0, 0]; 2],
        "the node takes the stranger's datagrams as teller's (through cni0, past it)\n{}",
        agent.describe()
    );
    // From its own addresses, through cni0 as before; past it, not at all.
    assert_eq!(
        [sent_as(&stranger, &cni0), sent_as(&stranger, LLDP)],
        [[SENT, SENT], [0, 0]],
        "the stranger's datagrams from its own addresses (through cni0, past it)\n{}",
        agent.describe()
    );
    let claimed = claim(&teller);
    assert!(
        !claimed.contains(&stranger_at),
        "the node takes the stranger's ARP for teller's address (untagged, tagged): {claimed:?}\n{}",
        agent.describe()
    );
    assert_eq!(
        claim(&stranger)[0],
        stranger_at,
        "the node no longer takes the stranger's ARP for its own address\n{}",
        agent.describe()
    );
    assert_eq!(
        advertised(),
        Some(teller_mac.clone()),
        "the node takes the stranger's advertisement for teller's IPv6 address\n{}",
        agent.describe()
    );
    assert_eq!(
        advertise(&stranger, false, &teller),
        "",
        "teller takes the stranger for its router\n{}",
        agent.describe()
    );

    // With the agent gone (its tables stay), a pod that starts now is in no list at all, but
    // its veth is still a veth: it cannot send as teller either.
    drop(agent);
    let latecomer = lab.add_pod(0, "bank/latecomer", 13).expect("pod");
    let late = sent_by(&latecomer, &teller, &cni0);
    assert_eq!(
        late,
        [0, 0],
        "with no agent running, the node takes a new pod's datagrams as teller's"
    );
}

#[test]
fn a_new_pods_veth_is_held_to_its_bridges_subnets_as_soon_as_it_joins() {
    let Some((scratch, mut lab, teller, mallory)) =
        teller_and_mallory("a_new_pods_veth_is_held_to_its_bridges_subnets_as_soon_as_it_joins")
    else {
        return;
    };
    // From outside cni0's subnets (a node-b pod's addresses, which an ipBlock might admit),
    // raw frames to the node through cni0.
    let node = lab.node_netns(0).unwrap().to_string();
    let cni0 = link_address(&node, "cni0");
    let outside = ["10.244.2.77", "fd00:10:244:2::77"].map(String::from);
    let counter = Counter::at(&node, 10, &outside);
    let sent = SENT.to_string();
    let from_outside = |sender: &Pod| {
        arrivals([(&counter, &outside[0]), (&counter, &outside[1])], || {
            for (from, to) in outside.iter().zip(["10.244.1.1", "fd00:10:244:1::1"]) {
                exec(
                    &sender.netns,
                    &[LABPOD, "rawudp", "eth0", &cni0, from, to, "80", &sent],
                );
            }
        })
    };
    assert_eq!(
        from_outside(&mallory),
        [SENT, SENT],
        "control: without the agent, the node takes datagrams from outside cni0's subnets"
    );

    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], "");
    let by_report = |agent: &Agent| agent.count("by=\"link report\"");
    let before = by_report(&agent);
    // A pod the snapshot does not list yet: its veth is only a port of cni0.
    let newcomer = lab.add_pod(0, "bank/newcomer", 14).expect("pod");
    wait_for(
        std::slice::from_mut(&mut agent),
        "the veths followed on a link report",
        SYNC_TIMEOUT,
        |_, a| by_report(a) > before,
    );
    assert_eq!(
        from_outside(&newcomer),
        [0, 0],
        "the node takes a new pod's datagrams from outside cni0's subnets\n{}",
        agent.describe()
    );
}

const TELLER_FROM_NODE_B: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  namespace: bank\n  name: teller-from-node-b\n\
    spec:\n  podSelector:\n    matchLabels:\n      app: teller\n  ingress:\n  - from:\n    - ipBlock:\n        cidr: 10.244.2.0/24\n";

#[test]
fn a_pod_cannot_forge_its_way_past_a_policy_through_its_nodes_vxlan_device() {
    let Some((scratch, lab, teller, mallory)) = teller_and_mallory(
        "a_pod_cannot_forge_its_way_past_a_policy_through_its_nodes_vxlan_device",
    ) else {
        return;
    };
    let node = lab.node_netns(0).unwrap();
    let (vtep, vtep6) = (
        link_address(node, "flannel.1"),
        link_address(node, "flannel-v6.1"),
    );
    let node_ll = format!("{}%eth0", link_local(node, "cni0"));
    // Teller admits only node-b's pods; mallory, beside it, wraps a datagram from one of them in
    // VXLAN and sends it to its node's VXLAN port as a datagram (no raw socket needed): from
    // its own address to the node's pod-network and underlay addresses, and from its
    // link-local address to the node's, to the IPv6 VXLAN device.
    let forged = "10.244.2.50".to_string();
    let own = mallory.ipv4.to_string();
    let counter = Counter::at(&teller.netns, -10, &[forged.clone(), own.clone()]);
    let sent = SENT.to_string();
    let wrapped = || {
        arrivals([(&counter, &forged)], || {
            for (addr, vtep) in [
                ("10.244.1.1", &vtep),
                ("192.168.100.1", &vtep),
                (node_ll.as_str(), &vtep6),
            ] {
                exec(
                    &mallory.netns,
                    &[
                        LABPOD,
                        "vxlan",
                        addr,
                        "8472",
                        "1",
                        vtep,
                        &forged,
                        &teller.ipv4.to_string(),
                        "80",
                        &sent,
                    ],
                );
            }
        })
    };
    assert_eq!(
        wrapped(),
        [3 * SENT],
        "control: without the agent, teller receives the datagrams unwrapped by node-a"
    );

    let mut agent = guard_node_a(
        &lab,
        scratch.path(),
        &[&teller, &mallory],
        TELLER_FROM_NODE_B,
    );
    let own_sent = arrivals([(&counter, &own)], || {
        exec(
            &mallory.netns,
            &[LABPOD, "send", &own, &teller.ipv4.to_string(), "80", &sent],
        );
    });
    assert_eq!(
        own_sent,
        [0],
        "teller admits only node-b's pods, yet mallory's own datagrams arrive\n{}",
        agent.describe()
    );
    assert_eq!(
        wrapped(),
        [0],
        "mallory's datagrams, wrapped in VXLAN as if from node-b, reach teller\n{}",
        agent.describe()
    );
}

/// The bridge port `node`'s cni0 sends frames for `mac` to, if it learned one.
fn fdb_port(lab: &Lab, node: usize, mac: &str) -> Option<String> {
    let out = exec(
        lab.node_netns(node).unwrap(),
        &["bridge", "fdb", "show", "br", "cni0"],
    );
    out.lines()
        .filter(|line| line.starts_with(mac) && !line.contains("permanent"))
        .find_map(|line| {
            line.split_whitespace()
                .skip_while(|word| *word != "dev")
                .nth(1)
                .map(str::to_string)
        })
}

/// The veth of the pod at `mac` in `node`'s guard (set `macs`), if any.
fn bound_to(lab: &Lab, node: usize, mac: &str) -> Option<String> {
    let out = exec(
        lab.node_netns(node).unwrap(),
        &["nft", "list", "set", "bridge", "nftpol", "macs"],
    );
    let elements = out.split_once("elements = {")?.1;
    elements
        .split(',')
        .find(|element| element.contains(mac))
        .and_then(|element| element.split('"').nth(1).map(str::to_string))
}

#[test]
fn a_pod_cannot_take_another_pods_link_layer_address() {
    let Some((scratch, lab, teller, mallory, stranger)) =
        with_a_stranger("a_pod_cannot_take_another_pods_link_layer_address")
    else {
        return;
    };
    let node = lab.node_netns(0).unwrap().to_string();
    let node = node.as_str();
    let teller_mac = link_address(&teller.netns, "eth0");
    let mallory_mac = link_address(&mallory.netns, "eth0");
    let counter = Counter::at(&teller.netns, 10, &["10.244.1.1".to_string()]);
    // The node knows teller's MAC and does not ask for it again (teller's answer would move the
    // address back).
    set_neighbour(
        node,
        "cni0",
        &teller.ipv4.to_string(),
        &teller_mac,
        "permanent",
    );
    // One datagram from `pod`'s own address to the node, from its interface's MAC.
    let speak = |pod: &Pod| {
        let from = pod.ipv4.to_string();
        exec(
            &pod.netns,
            &[LABPOD, "send", &from, "10.244.1.1", "80", "1"],
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // The bridge learns from every frame which port a link-layer address is behind: teller
    // speaks, then `attacker` sends one frame to `to` from its own IPv4 address but teller's
    // MAC (a packet socket needs no more than CAP_NET_RAW), and the node sends teller five
    // datagrams straight away. Returns how many reached teller, and the port the bridge then sends
    // teller's frames to.
    let take = |attacker: &Pod, to: &str| {
        speak(&teller);
        assert_eq!(fdb_port(&lab, 0, &teller_mac), Some(teller.veth()));
        let [reached] = arrivals([(&counter, "10.244.1.1")], || {
            exec(
                &attacker.netns,
                &[
                    LABPOD,
                    "rawudp",
                    "--source-mac",
                    &teller_mac,
                    "eth0",
                    to,
                    &attacker.ipv4.to_string(),
                    "10.244.1.1",
                    "80",
                    "1",
                ],
            );
            exec(
                node,
                &[
                    LABPOD,
                    "send",
                    "10.244.1.1",
                    &teller.ipv4.to_string(),
                    "80",
                    &SENT.to_string(),
                ],
            );
        });
        (reached, fdb_port(&lab, 0, &teller_mac))
    };
    // Broadcast, and two of the bridge's reserved group addresses: from a frame to LLDP's
    // (:0e) the bridge learns before any of its netfilter hooks, from one to :03 (802.1X)
    // after its input hook but not its prerouting hook.
    const TO: [&str; 3] = [
        "ff:ff:ff:ff:ff:ff",
        "01:80:c2:00:00:03",
        "01:80:c2:00:00:0e",
    ];
    let kept = (SENT, Some(teller.veth()));
    // Without the agent the attacker's port gets teller's frames, unless teller happens to
    // send something meanwhile (a fresh interface sends router solicitations and MLD reports
    // for some seconds), which moves the address back: up to five tries.
    for (attacker, to) in [(&mallory, TO[0]), (&stranger, TO[0]), (&mallory, TO[2])] {
        let tries: Vec<(u64, Option<String>)> = (0..5).map(|_| take(attacker, to)).collect();
        assert!(
            tries.iter().any(|(reached, _)| *reached == 0),
            "control: without the agent, a frame to {to} from teller's MAC sent by {} takes teller's traffic from the node; datagrams that reached teller, and the port of teller's MAC after: {tries:?}",
            attacker.name
        );
    }

    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], "");
    // The agent stops the bridge learning from frames to its reserved group addresses.
    wait_for(
        std::slice::from_mut(&mut agent),
        "no_linklocal_learn on cni0",
        SYNC_TIMEOUT,
        |_, _| exec(node, &["ip", "-d", "link", "show", "cni0"]).contains("no_linklocal_learn 1"),
    );
    for attacker in [&mallory, &stranger] {
        for to in TO {
            assert_eq!(
                [take(attacker, to), take(attacker, to)],
                [kept.clone(), kept.clone()],
                "with the agent, {} takes teller's MAC with a frame to {to}\n{}",
                attacker.name,
                agent.describe()
            );
        }
    }
    assert_eq!(
        agent.count("set no_linklocal_learn"),
        1,
        "{}",
        agent.describe()
    );

    // With CAP_NET_ADMIN mallory can make teller's MAC its own. Once the agent sees two pods
    // with one MAC, it takes neither's frames: teller's traffic stays where it was, and teller
    // cannot send until mallory gives the address back.
    // Mallory's interface to `mac`, once the guard binds teller's MAC to `veth`.
    let mallory_at = |agent: &mut Agent, mac: &str, veth: Option<String>| {
        exec(
            &mallory.netns,
            &["ip", "link", "set", "dev", "eth0", "address", mac],
        );
        wait_for(
            std::slice::from_mut(agent),
            &format!("teller's MAC bound to {veth:?}"),
            SYNC_TIMEOUT,
            |_, _| bound_to(&lab, 0, &teller_mac) == veth,
        );
    };
    mallory_at(&mut agent, &teller_mac, None);
    // The agent says so, for both pods.
    let warned: Vec<String> = agent
        .lines()
        .into_iter()
        .filter(|line| line.contains("has this pod's link-layer address"))
        .collect();
    for (pod, with) in [(&teller, &mallory), (&mallory, &teller)] {
        assert!(
            warned
                .iter()
                .any(|line| line.contains(&pod.name) && line.contains(&with.veth())),
            "no warning for {} naming {}'s veth: {warned:#?}",
            pod.name,
            with.name
        );
    }
    speak(&mallory);
    let port = fdb_port(&lab, 0, &teller_mac);
    assert_ne!(
        port,
        Some(mallory.veth()),
        "mallory took teller's MAC as its own\n{}",
        agent.describe()
    );
    mallory_at(&mut agent, &mallory_mac, Some(teller.veth()));
    assert_eq!(
        take(&mallory, TO[0]),
        kept,
        "once mallory gave the address back\n{}",
        agent.describe()
    );
    assert!(
        reaches(&teller, &mallory.ipv4.to_string()) && reaches(&mallory, &teller.ipv4.to_string()),
        "teller and mallory reach each other again"
    );
}

/// Frames to `mac` that `netns`'s `eth0` receives, whoever they are for (a netdev ingress
/// counter: a pod's IP stack drops what is not addressed to it before any inet hook).
struct FramesTo<'a> {
    netns: &'a str,
}

impl<'a> FramesTo<'a> {
    fn install(netns: &'a str, mac: &str) -> FramesTo<'a> {
        let text = format!(
            "table netdev observe {{\n\tchain seen {{\n\t\ttype filter hook ingress device \"eth0\" priority 0; policy accept;\n\t\tether daddr {mac} udp dport 80 counter\n\t}}\n}}\n"
        );
        exec(netns, &["nft", &text]);
        FramesTo { netns }
    }

    fn count(&self) -> u64 {
        let listing = exec(
            self.netns,
            &["nft", "list", "chain", "netdev", "observe", "seen"],
        );
        let after = listing.split("packets ").nth(1).expect("a counter");
        after
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .expect("a count")
    }
}

#[test]
fn a_pod_does_not_receive_what_a_neighbour_sends_a_pod_the_bridge_forgot() {
    let Some((scratch, lab, teller, mallory, stranger)) =
        with_a_stranger("a_pod_does_not_receive_what_a_neighbour_sends_a_pod_the_bridge_forgot")
    else {
        return;
    };
    let node = lab.node_netns(0).unwrap().to_string();
    let node = node.as_str();
    let teller_mac = link_address(&teller.netns, "eth0");
    let teller_v4 = teller.ipv4.to_string();
    let mallory_v4 = mallory.ipv4.to_string();
    // Mallory knows teller's MAC, so its datagrams to teller go out unicast.
    set_neighbour(&mallory.netns, "eth0", &teller_v4, &teller_mac, "permanent");
    let seen = FramesTo::install(&stranger.netns, &teller_mac);
    let counter = Counter::at(&teller.netns, 10, std::slice::from_ref(&mallory_v4));
    // The bridge forgets teller's MAC, as it does when teller has sent nothing for its ageing
    // time; then mallory sends teller five datagrams. Returns how many teller got, and how many
    // frames to teller's MAC the stranger received (until teller's echo of the first teaches
    // the bridge again).
    let forgotten = || {
        exec(
            &teller.netns,
            &[LABPOD, "send", &teller_v4, "10.244.1.1", "80", "1"],
        );
        std::thread::sleep(Duration::from_millis(50));
        exec(
            node,
            &[
                "bridge",
                "fdb",
                "del",
                &teller_mac,
                "dev",
                &teller.veth(),
                "master",
            ],
        );
        let before = seen.count();
        let [got] = arrivals([(&counter, mallory_v4.as_str())], || {
            exec(
                &mallory.netns,
                &[
                    LABPOD,
                    "send",
                    &mallory_v4,
                    &teller_v4,
                    "80",
                    &SENT.to_string(),
                ],
            );
        });
        (got, seen.count() - before)
    };
    let (got, flooded) = forgotten();
    assert!(
        got == SENT && flooded > 0,
        "control: without the agent, the bridge floods mallory's frames to teller's forgotten MAC to the stranger's port too: teller got {got}, the stranger {flooded}"
    );

    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], "");
    assert_eq!(
        [forgotten(), forgotten()],
        [(SENT, 0), (SENT, 0)],
        "with the agent, frames to teller's MAC leave only by teller's veth\n{}",
        agent.describe()
    );
}

/// Takes back from `attacker` the addresses [`borrow_addresses`] gave it of `victim`.
fn return_addresses(attacker: &Pod, victim: &Pod) {
    for addr in [
        format!("{}/32", victim.ipv4),
        format!("{}/128", victim.ipv6),
    ] {
        exec(
            &attacker.netns,
            &["ip", "addr", "del", &addr, "dev", "eth0"],
        );
    }
}

/// The veths the guard of node 0 binds pods to.
fn guarded_veths(lab: &Lab) -> String {
    exec(
        lab.node_netns(0).unwrap(),
        &["nft", "list", "set", "bridge", "nftpol", "veths"],
    )
}

#[test]
fn a_pod_cannot_take_a_guarded_pods_address_nor_shed_its_own_guard() {
    let Some((scratch, lab, teller, mallory, stranger)) =
        with_a_stranger("a_pod_cannot_take_a_guarded_pods_address_nor_shed_its_own_guard")
    else {
        return;
    };
    let node = lab.node_netns(0).unwrap().to_string();
    let from = [teller.ipv4.to_string(), teller.ipv6.to_string()];
    // An address of a pod of another node, which some policy may admit.
    const REMOTE: &str = "10.244.2.50";
    let counter = Counter::at(
        &node,
        10,
        &[from[0].clone(), from[1].clone(), REMOTE.into()],
    );
    // Datagrams from REMOTE that mallory sends the node and the node receives, once it has
    // the address (as its only one when `alone`, with a route and neighbour to the node).
    let as_remote = |alone: bool| {
        if alone {
            exec(
                &mallory.netns,
                &["ip", "addr", "flush", "dev", "eth0", "scope", "global"],
            );
        }
        exec(
            &mallory.netns,
            &["ip", "addr", "add", &format!("{REMOTE}/32"), "dev", "eth0"],
        );
        exec(
            &mallory.netns,
            &["ip", "route", "replace", "10.244.1.1/32", "dev", "eth0"],
        );
        let cni0 = link_address(&node, "cni0");
        set_neighbour(&mallory.netns, "eth0", "10.244.1.1", &cni0, "permanent");
        // A discovery or two, should the agent run.
        std::thread::sleep(Duration::from_millis(2_500));
        let [got] = arrivals([(&counter, REMOTE)], || {
            exec(
                &mallory.netns,
                &[
                    LABPOD,
                    "send",
                    REMOTE,
                    "10.244.1.1",
                    "80",
                    &SENT.to_string(),
                ],
            );
        });
        got
    };
    assert_eq!(
        as_remote(false),
        SENT,
        "control: without the agent, the node takes mallory's datagrams from {REMOTE}"
    );
    exec(
        &mallory.netns,
        &["ip", "addr", "del", &format!("{REMOTE}/32"), "dev", "eth0"],
    );
    // Datagrams from teller's addresses that `sender` sends the node and the node receives.
    let as_teller = |sender: &Pod| {
        arrivals([(&counter, &from[0]), (&counter, &from[1])], || {
            for (from, to) in from.iter().zip(["10.244.1.1", "fd00:10:244:1::1"]) {
                exec(
                    &sender.netns,
                    &[LABPOD, "send", from, to, "80", &SENT.to_string()],
                );
            }
        })
    };
    // The stranger is a pod the agent has not been told of (a new one, before the snapshot
    // lists it); with CAP_NET_ADMIN it puts teller's addresses on its interface as well.
    borrow_addresses(&stranger, &teller);
    assert_eq!(
        as_teller(&stranger),
        [SENT; 2],
        "control: without the agent, the node takes the stranger's datagrams as teller's"
    );
    return_addresses(&stranger, &teller);

    // The agent found teller on its veth before the stranger claimed its addresses: teller
    // keeps the veth, and the stranger's datagrams from them are dropped.
    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], "");
    borrow_addresses(&stranger, &teller);
    let names_stranger = |a: &Agent| {
        a.lines()
            .into_iter()
            .find(|line| line.contains(&teller.name) && line.contains(&stranger.veth()))
    };
    wait_for(
        std::slice::from_mut(&mut agent),
        "a warning naming teller and the stranger's veth",
        SYNC_TIMEOUT,
        |_, a| names_stranger(a).is_some(),
    );
    assert_eq!(
        [as_teller(&stranger), as_teller(&teller)],
        [[0, 0], [SENT; 2]],
        "datagrams from teller's addresses, sent by the stranger and by teller, once the stranger claims them\n{}",
        agent.describe()
    );
    assert!(
        guarded_veths(&lab).contains(&teller.veth()),
        "teller keeps its veth\n{}",
        agent.describe()
    );
    let warning = names_stranger(&agent).unwrap_or_default();
    assert!(
        warning.contains("carries this pod's address too"),
        "the warning says teller keeps its veth: {warning}"
    );

    // A restarted agent reads from its state directory which veth teller was on: teller
    // keeps it, and the stranger's datagrams from its addresses stay dropped.
    drop(agent);
    let snapshot = scratch.path().join("snapshot.yaml");
    let mut agent = Agent::start(Path::new(LABPOD), &lab, 0, NODES[0], &snapshot, &[]);
    wait_for(
        std::slice::from_mut(&mut agent),
        "a first sync with the veth history restored",
        SYNC_TIMEOUT,
        |_, a| {
            a.synced() >= 1
                && a.lines()
                    .iter()
                    .any(|line| line.contains("restored which veth each local pod was found on"))
        },
    );
    assert_eq!(
        [as_teller(&stranger), as_teller(&teller)],
        [[0, 0], [SENT; 2]],
        "datagrams from teller's addresses, sent by the stranger and by teller, after a restart that kept the agent's state\n{}",
        agent.describe()
    );
    assert!(
        guarded_veths(&lab).contains(&teller.veth()),
        "teller keeps its veth across the restart\n{}",
        agent.describe()
    );

    // An agent started afresh (its state lost, or a node it never ran on) has not seen which
    // veth had the addresses first: neither is taken to be teller's, and nothing from teller's
    // addresses gets through until one veth has them.
    drop(agent);
    let fresh = scratch.path().join("fresh-state");
    let fresh = fresh.to_str().expect("a UTF-8 path");
    let mut agent = Agent::start(
        Path::new(LABPOD),
        &lab,
        0,
        NODES[0],
        &snapshot,
        &["--state-dir", fresh],
    );
    let contested = "none is known to be its own";
    wait_for(
        std::slice::from_mut(&mut agent),
        "a warning that two veths claim teller's addresses",
        SYNC_TIMEOUT,
        |_, a| {
            a.synced() >= 1
                && a.lines().iter().any(|line| {
                    line.contains(contested)
                        && line.contains(&teller.name)
                        && line.contains(&teller.veth())
                        && line.contains(&stranger.veth())
                })
        },
    );
    assert_eq!(
        [as_teller(&stranger), as_teller(&teller)],
        [[0, 0], [0, 0]],
        "datagrams from teller's addresses, sent by the stranger and by teller, after a restart while both claim them\n{}",
        agent.describe()
    );

    // Once the stranger gives the addresses back, teller has its veth again.
    return_addresses(&stranger, &teller);
    wait_for(
        std::slice::from_mut(&mut agent),
        "teller's veth in the guard",
        SYNC_TIMEOUT,
        |_, _| guarded_veths(&lab).contains(&teller.veth()),
    );
    assert_eq!(
        as_teller(&teller),
        [SENT; 2],
        "teller's datagrams once the stranger gave its addresses back\n{}",
        agent.describe()
    );
    assert!(
        reaches(&mallory, &teller.ipv4.to_string()),
        "mallory reaches teller again"
    );

    // Mallory, guarded, removes its own addresses (CAP_NET_ADMIN) and takes a remote pod's:
    // its veth is still its own, so it sends from no address but its own.
    assert_eq!(
        as_remote(true),
        0,
        "mallory's datagrams from {REMOTE} once it removed its own addresses\n{}",
        agent.describe()
    );
    assert!(
        guarded_veths(&lab).contains(&mallory.veth()),
        "mallory keeps its veth\n{}",
        agent.describe()
    );
}

#[test]
fn a_pod_does_not_receive_what_the_node_sends_a_pod_the_bridge_forgot() {
    let Some((scratch, lab, teller, mallory, stranger)) =
        with_a_stranger("a_pod_does_not_receive_what_the_node_sends_a_pod_the_bridge_forgot")
    else {
        return;
    };
    let node = lab.node_netns(0).unwrap().to_string();
    let node = node.as_str();
    let teller_mac = link_address(&teller.netns, "eth0");
    let teller_v4 = teller.ipv4.to_string();
    // The node knows teller's MAC, so its datagrams to teller go out unicast.
    set_neighbour(node, "cni0", &teller_v4, &teller_mac, "permanent");
    let seen = [&mallory, &stranger].map(|pod| FramesTo::install(&pod.netns, &teller_mac));
    let counter = Counter::at(&teller.netns, 10, &["10.244.1.1".to_string()]);
    // A bridge that ages what it learns at once: it forgets teller's MAC as soon as it learns
    // it, as it does after teller has sent nothing for the ageing time (300 s by default).
    exec(
        node,
        &[
            "ip",
            "link",
            "set",
            "cni0",
            "type",
            "bridge",
            "ageing_time",
            "0",
        ],
    );
    // Teller speaks, the bridge forgets, and the node sends teller five datagrams. Returns how
    // many teller got, and how many frames to teller's MAC mallory and the stranger received.
    let forgotten = || {
        exec(
            &teller.netns,
            &[LABPOD, "send", &teller_v4, "10.244.1.1", "80", "1"],
        );
        std::thread::sleep(Duration::from_millis(100));
        let before = seen.each_ref().map(FramesTo::count);
        let [got] = arrivals([(&counter, "10.244.1.1")], || {
            exec(
                node,
                &[
                    LABPOD,
                    "send",
                    "10.244.1.1",
                    &teller_v4,
                    "80",
                    &SENT.to_string(),
                ],
            );
        });
        let after = seen.each_ref().map(FramesTo::count);
        (got, [after[0] - before[0], after[1] - before[1]])
    };
    let (got, flooded) = forgotten();
    assert!(
        got == SENT && flooded == [SENT; 2],
        "control: without the agent, the bridge floods the node's frames to teller's forgotten MAC to every port: teller got {got}, mallory and the stranger {flooded:?}"
    );

    let mut agent = guard_node_a(&lab, scratch.path(), &[&teller, &mallory], "");
    // The agent pins teller's MAC to teller's veth: an entry that neither ages nor moves.
    let pinned = |lab: &Lab| {
        exec(
            lab.node_netns(0).unwrap(),
            &["bridge", "fdb", "show", "dev", &teller.veth()],
        )
        .lines()
        .any(|line| line.starts_with(&teller_mac) && line.contains("static"))
    };
    wait_for(
        std::slice::from_mut(&mut agent),
        "the agent saying it pinned the pods' MACs",
        SYNC_TIMEOUT,
        |_, a| a.count("pinned the guarded pods' MACs") == 1,
    );
    assert_eq!(
        [forgotten(), forgotten()],
        [(SENT, [0, 0]), (SENT, [0, 0])],
        "with the agent, the node's frames to teller's MAC leave only by teller's veth\n{}",
        agent.describe()
    );
    assert!(pinned(&lab), "teller's pin\n{}", agent.describe());
    // A pod whose MAC another veth's pod takes loses its pin no more than its port: the
    // bridge keeps sending teller's frames to teller, and mallory's frames from the MAC do not
    // move it.
    let mallory_mac = link_address(&mallory.netns, "eth0");
    exec(
        &mallory.netns,
        &["ip", "link", "set", "dev", "eth0", "address", &teller_mac],
    );
    wait_for(
        std::slice::from_mut(&mut agent),
        "a warning that mallory has teller's MAC",
        SYNC_TIMEOUT,
        |_, a| a.count("has this pod's link-layer address") >= 2,
    );
    assert!(pinned(&lab), "teller's pin stays\n{}", agent.describe());

    // Nor is the node's own MAC on the bridge pinned to a pod that takes it: that would move
    // the bridge's entry, and every pod's traffic to the node, to the pod's port, and
    // unpinning it would then leave the bridge without it.
    let cni0_mac = link_address(node, "cni0");
    let cni0_entry = || {
        exec(node, &["bridge", "fdb", "show", "br", "cni0"])
            .lines()
            .find(|line| line.starts_with(&cni0_mac))
            .map(str::to_string)
    };
    let own = cni0_entry().expect("cni0's own entry");
    exec(
        &mallory.netns,
        &["ip", "link", "set", "dev", "eth0", "address", &mallory_mac],
    );
    wait_for(
        std::slice::from_mut(&mut agent),
        "teller's MAC no longer shared",
        SYNC_TIMEOUT,
        |_, a| a.count("no longer shared") >= 2,
    );
    // Two discoveries with mallory at cni0's MAC, then mallory gives it back.
    exec(
        &mallory.netns,
        &["ip", "link", "set", "dev", "eth0", "address", &cni0_mac],
    );
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(
        cni0_entry().as_ref(),
        Some(&own),
        "cni0's entry while mallory has its MAC\n{}",
        agent.describe()
    );
    assert!(
        agent
            .lines()
            .iter()
            .any(|l| l.contains("has this pod's link-layer address")
                && l.contains(&mallory.name)
                && l.contains("with=cni0")),
        "a warning that mallory has cni0's MAC\n{}",
        agent.describe()
    );
    exec(
        &mallory.netns,
        &["ip", "link", "set", "dev", "eth0", "address", &mallory_mac],
    );
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(
        cni0_entry().as_ref(),
        Some(&own),
        "cni0's entry once mallory gave its MAC back\n{}",
        agent.describe()
    );
}
