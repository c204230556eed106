//! A Flannel-style cluster in network namespaces, so that real packets cross real rulesets.
//!
//! ```text
//! wire    br0 ── n<i> ┄┄ eth0 of node i: 192.168.100.<i+1>/24, fd00:100::<i+1>/64
//! node i  flannel.1 (VXLAN 1 over IPv4) and flannel-v6.1 (VXLAN 1 over IPv6), port 8472,
//!         static routes, neighbours and fdb entries for every other node, as flanneld writes;
//!         cni0 bridge 10.244.<i+1>.1/24, fd00:10:244:<i+1>::1/64 ── veth<8 hex> ┄┄ eth0 of a pod
//! pod     eth0 10.244.<i+1>.<k>/24, fd00:10:244:<i+1>::<k in hex>/64, default routes via cni0;
//!         runs `labpod serve` (TCP and UDP, both families)
//! ```
//!
//! Namespaces are named `np<pid hex>x<counter>-<role>`: unique per lab, and naming the process
//! that made them, so a new lab removes what a killed run left behind and nothing else.
//! Dropping a [`Lab`] kills its servers and deletes its namespaces, whether the test passed,
//! failed or panicked; a lab that fails half-built is dropped the same way.

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::thread;

pub use ruleset::ir::{Family, Protocol};

/// Pods and node bridges use this MTU, as Flannel's VXLAN backend does.
const POD_MTU: u32 = 1450;
/// UDP probes take their source ports from here on, one fresh port per probe, so that no
/// probe rides on a conntrack entry an earlier probe left (UDP entries live up to 120 s).
/// The range stays clear of every port a lab pod serves.
const SPORT_FIRST: u32 = 33_000;
const SPORT_SPAN: u32 = 27_000;
/// Ports every lab pod serves.
const DEFAULT_PORTS: [u16; 2] = [80, 81];
const PROBE_TIMEOUT_MS: u32 = 1000;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
pub enum LabError {
    /// A program could not be started.
    Spawn { command: String, source: io::Error },
    /// A command ran and failed.
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    /// The kernel is not set up as the lab needs.
    Kernel(String),
    /// The lab was asked for something it cannot build or probe.
    Invalid(String),
    /// A lab pod's program misbehaved.
    Labpod { netns: String, detail: String },
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabError::Spawn { command, source } => write!(f, "cannot run `{command}`: {source}"),
            LabError::Command {
                command,
                status,
                stderr,
            } => write!(f, "`{command}` failed ({status}): {}", stderr.trim_end()),
            LabError::Kernel(detail) => write!(f, "kernel: {detail}"),
            LabError::Invalid(detail) => write!(f, "{detail}"),
            LabError::Labpod { netns, detail } => write!(f, "labpod in {netns}: {detail}"),
        }
    }
}

impl std::error::Error for LabError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LabError::Spawn { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A pod of the lab: its namespace and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    /// Index of its node.
    pub node: usize,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    /// The host end of the pod's veth, on its node's `cni0`.
    pub fn veth(&self) -> String {
        format!("veth{:08x}", fnv1a(self.netns.as_bytes()))
    }

    /// The link-layer address of the pod's `eth0`: fixed, locally administered, from its node
    /// and host number.
    pub fn mac(&self) -> [u8; 6] {
        let [_, _, subnet, host] = self.ipv4.octets();
        [0x0e, 0x70, 0x6f, 0x64, subnet, host]
    }

    pub fn addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.ipv4),
            Family::V6 => IpAddr::V6(self.ipv6),
        }
    }
}

/// Where a probe goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// What one probe found: `ok` when the server's reply came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub ok: bool,
    /// `ok`, or why not: `timeout` (dropped somewhere), `refused`, ...
    pub detail: String,
}

/// One cell of [`Lab::matrix`]: pod `from` probed `target`, an address of pod `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub from: usize,
    pub to: usize,
    pub target: Target,
    pub outcome: ProbeOutcome,
}

pub struct Lab {
    prefix: String,
    labpod: PathBuf,
    wire: String,
    nodes: Vec<String>,
    pods: Vec<Pod>,
    /// Every namespace made so far, in order of creation, for Drop.
    namespaces: Vec<String>,
    servers: Vec<Child>,
    next_sport: AtomicU32,
}

impl Lab {
    /// The directory for node `node`'s agent to keep its state in (`--state-dir`): one per
    /// node and run, kept while the lab stands (so a restarted agent finds it), removed with it.
    pub fn state_dir(&self, node: usize) -> PathBuf {
        std::env::temp_dir().join(format!("{}-state-{node}", self.prefix))
    }

    /// A lab holding a snapshot's pods: the node named `nodes[i]` is lab node `i` (its pod CIDR
    /// 10.244.<i+1>.0/24) and each pod keeps the host part of its IPv4 address. Every pod serves
    /// its containerPorts and `ports`. hostNetwork pods are left out: they are their nodes.
    pub fn for_cluster(
        labpod: impl Into<PathBuf>,
        cluster: &ruleset::Cluster,
        nodes: &[&str],
        ports: &[u16],
    ) -> Result<Lab, LabError> {
        let mut lab = Lab::new(labpod, nodes.len())?;
        for pod in cluster.pods().filter(|p| !p.host_network) {
            let who = format!("{}/{}", pod.namespace, pod.name);
            let node = nodes
                .iter()
                .position(|n| pod.node.as_deref() == Some(*n))
                .ok_or_else(|| LabError::Invalid(format!("{who} runs on no lab node")))?;
            let ipv4 = pod
                .ips
                .iter()
                .find_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .ok_or_else(|| LabError::Invalid(format!("{who} has no IPv4 address")))?;
            let [a, b, subnet, host] = ipv4.octets();
            if (a, b, usize::from(subnet)) != (10, 244, node + 1) {
                return Err(LabError::Invalid(format!(
                    "{who} {ipv4} is outside its node's pod CIDR"
                )));
            }
            // A port nobody listens on would read as "fail" where the policies allow it.
            let mut serving: Vec<u16> = pod
                .ports
                .iter()
                .filter_map(|p| u16::try_from(p.port).ok())
                .chain(ports.iter().copied())
                .collect();
            serving.sort_unstable();
            serving.dedup();
            lab.add_pod_serving(node, &who, host, &serving)?;
        }
        Ok(lab)
    }

    /// One line for a probed cell: pods, address, service and what the probe saw.
    pub fn describe(&self, cell: &Cell) -> String {
        let name = |i: usize| self.pods.get(i).map_or("?", |p| p.name.as_str());
        format!(
            "{} -> {} {} {} {}: {}",
            name(cell.from),
            name(cell.to),
            cell.target.addr,
            cell.target.protocol.k8s_name(),
            cell.target.port,
            cell.outcome.detail
        )
    }
    /// Builds the wire and `nodes` nodes, with no pods yet. `labpod` is the path of the
    /// `labpod` binary (in tests: `env!("CARGO_BIN_EXE_labpod")`).
    pub fn new(labpod: impl Into<PathBuf>, nodes: usize) -> Result<Lab, LabError> {
        if !(1..=200).contains(&nodes) {
            return Err(LabError::Invalid(format!(
                "a lab has 1 to 200 nodes, not {nodes}"
            )));
        }
        sweep_stale();
        let prefix = format!(
            "np{:x}x{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            wire: format!("{prefix}-wire"),
            prefix,
            labpod: labpod.into(),
            nodes: Vec::new(),
            pods: Vec::new(),
            namespaces: Vec::new(),
            servers: Vec::new(),
            next_sport: AtomicU32::new(0),
        };
        // On error `lab` drops here and removes whatever was made.
        lab.build(nodes)?;
        Ok(lab)
    }

    fn build(&mut self, nodes: usize) -> Result<(), LabError> {
        let wire = self.wire.clone();
        self.add_netns(&wire)?;
        for i in 0..nodes {
            let ns = format!("{}-n{i}", self.prefix);
            self.add_netns(&ns)?;
            self.nodes.push(ns);
        }

        let mut links = vec![
            "link add br0 type bridge mcast_snooping 0".to_string(),
            "link set br0 up".to_string(),
        ];
        for (i, ns) in self.nodes.iter().enumerate() {
            links.push(format!("link add n{i} type veth peer name eth0 netns {ns}"));
            links.push(format!("link set n{i} master br0 up"));
        }
        ip_batch(&wire, &links)?;

        for (i, ns) in self.nodes.iter().enumerate() {
            ip_batch(ns, &node_links(i))?;
        }
        for (i, ns) in self.nodes.iter().enumerate() {
            let others = || (0..nodes).filter(move |&j| j != i);
            let routes: Vec<String> = others().flat_map(flannel_routes).collect();
            let fdb: Vec<String> = others().flat_map(flannel_fdb).collect();
            if !routes.is_empty() {
                ip_batch(ns, &routes)?;
                run("bridge", &["-n", ns, "-batch", "-"], Some(&fdb.join("\n")))?;
            }
            // Forwarding last: it also applies to every interface that exists by now.
            exec(
                ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            )?;
            check_bridge_netfilter(ns)?;
        }
        Ok(())
    }

    fn add_netns(&mut self, name: &str) -> Result<(), LabError> {
        run("ip", &["netns", "add", name], None)?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    /// The namespace of node `index`.
    pub fn node_netns(&self, index: usize) -> Option<&str> {
        self.nodes.get(index).map(String::as_str)
    }

    /// Node `index`'s IPv4 address on the wire, which every other node reaches.
    pub fn node_ipv4(&self, index: usize) -> Option<Ipv4Addr> {
        self.nodes.get(index).map(|_| wire_ipv4(index))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod named `namespace/name`.
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// Adds a pod on node `node` with addresses 10.244.<node+1>.<host> and
    /// fd00:10:244:<node+1>::<host in hex> (10.244.1.10 goes with fd00:10:244:1::a, as in
    /// the dual-stack example), serving TCP and UDP 80 and 81.
    pub fn add_pod(&mut self, node: usize, name: &str, host: u8) -> Result<Pod, LabError> {
        self.add_pod_serving(node, name, host, &[])
    }

    /// Like [`Lab::add_pod`], and the pod also serves TCP and UDP on each of `ports`.
    pub fn add_pod_serving(
        &mut self,
        node: usize,
        name: &str,
        host: u8,
        ports: &[u16],
    ) -> Result<Pod, LabError> {
        let node_ns = self
            .nodes
            .get(node)
            .cloned()
            .ok_or_else(|| LabError::Invalid(format!("pod {name}: no node {node}")))?;
        if !(2..=254).contains(&host) {
            return Err(LabError::Invalid(format!(
                "pod {name}: host part {host} is not in 2..=254 (1 is cni0)"
            )));
        }
        if let Some(other) = self
            .pods
            .iter()
            .find(|p| p.name == name || (p.node == node && p.ipv4.octets()[3] == host))
        {
            return Err(LabError::Invalid(format!(
                "pod {name} (node {node}, host {host}) clashes with pod {} ({})",
                other.name, other.ipv4
            )));
        }
        let subnet = node + 1;
        let pod = Pod {
            name: name.to_string(),
            node,
            netns: format!("{}-p{}-{}", self.prefix, self.pods.len(), sanitize(name)),
            ipv4: Ipv4Addr::new(10, 244, octet(subnet)?, host),
            ipv6: v6(&format!("fd00:10:244:{subnet}::{host:x}"))?,
        };
        self.add_netns(&pod.netns)?;
        let veth = pod.veth();
        ip_batch(
            &node_ns,
            &[
                format!(
                    "link add {veth} mtu {POD_MTU} type veth peer name eth0 mtu {POD_MTU} address {} netns {}",
                    pod.mac().map(|b| format!("{b:02x}")).join(":"),
                    pod.netns
                ),
                format!("link set {veth} master cni0 up"),
            ],
        )?;
        ip_batch(
            &pod.netns,
            &[
                "link set lo up".to_string(),
                format!("addr add {}/24 dev eth0", pod.ipv4),
                format!("addr add {}/64 dev eth0 nodad", pod.ipv6),
                "link set eth0 up".to_string(),
                format!("route add default via 10.244.{subnet}.1 dev eth0"),
                format!("route add ::/0 via fd00:10:244:{subnet}::1 dev eth0"),
            ],
        )?;
        self.start_server(&pod.netns, ports)?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Runs `labpod serve` in node `node`'s own namespace too (TCP and UDP 80 and 81), as a
    /// service of the node itself (the kubelet's, say) that pods can try to reach.
    pub fn serve_on_node(&mut self, node: usize) -> Result<(), LabError> {
        let netns = self
            .nodes
            .get(node)
            .cloned()
            .ok_or_else(|| LabError::Invalid(format!("no node {node}")))?;
        self.start_server(&netns, &[])
    }

    fn start_server(&mut self, netns: &str, ports: &[u16]) -> Result<(), LabError> {
        let mut all: Vec<u16> = DEFAULT_PORTS.iter().chain(ports).copied().collect();
        all.sort_unstable();
        all.dedup();
        let ports: Vec<String> = all.iter().map(u16::to_string).collect();
        let mut args = vec!["netns", "exec", netns, self.labpod_path()?, "serve"];
        args.extend(ports.iter().map(String::as_str));
        let command = format!("ip {}", args.join(" "));
        let child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| LabError::Spawn {
                command: command.clone(),
                source,
            })?;
        // Kept before waiting, so that Drop kills it whatever happens next; its stdin stays
        // open as long as the Child is kept.
        self.servers.push(child);
        let stdout = self
            .servers
            .last_mut()
            .and_then(|c| c.stdout.take())
            .ok_or_else(|| LabError::Labpod {
                netns: netns.to_string(),
                detail: "no stdout".into(),
            })?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| LabError::Labpod {
                netns: netns.to_string(),
                detail: format!("reading its ready line: {e}"),
            })?;
        if line.trim() != "ready" {
            return Err(LabError::Labpod {
                netns: netns.to_string(),
                detail: format!("`{command}` did not start (said {line:?})"),
            });
        }
        Ok(())
    }

    fn labpod_path(&self) -> Result<&str, LabError> {
        self.labpod
            .to_str()
            .ok_or_else(|| LabError::Invalid(format!("labpod path {:?} is not UTF-8", self.labpod)))
    }

    /// Loads `text` with `nft -f -` into node `node`.
    pub fn nft(&self, node: usize, text: &str) -> Result<(), LabError> {
        let ns = self
            .node_netns(node)
            .ok_or_else(|| LabError::Invalid(format!("no node {node}")))?;
        exec_with_input(ns, &["nft", "-f", "-"], text).map(drop)
    }

    /// Probes every target from `from`, all at once; true where the server answered.
    pub fn probe(&self, from: &Pod, targets: &[Target]) -> Result<Vec<bool>, LabError> {
        Ok(self
            .probe_outcomes(from, targets)?
            .into_iter()
            .map(|o| o.ok)
            .collect())
    }

    /// Like [`Lab::probe`], with the reason of each failure.
    pub fn probe_outcomes(
        &self,
        from: &Pod,
        targets: &[Target],
    ) -> Result<Vec<ProbeOutcome>, LabError> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let count = u32::try_from(targets.len())
            .ok()
            .filter(|&n| n < SPORT_SPAN)
            .ok_or_else(|| LabError::Invalid(format!("{} targets at once", targets.len())))?;
        let base = self.next_sport.fetch_add(count, Ordering::Relaxed);
        let mut input = String::new();
        for (i, t) in (0u32..).zip(targets) {
            let proto = match t.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => {
                    return Err(LabError::Invalid(
                        "SCTP cannot be probed: this kernel has no SCTP".into(),
                    ))
                }
            };
            let sport = SPORT_FIRST + base.wrapping_add(i) % SPORT_SPAN;
            input.push_str(&format!("{} {proto} {} {sport}\n", t.addr, t.port));
        }
        let timeout = PROBE_TIMEOUT_MS.to_string();
        let out = exec_with_input(
            &from.netns,
            &[self.labpod_path()?, "probe", "--timeout-ms", &timeout],
            &input,
        )?;
        let lines: Vec<&str> = out.lines().collect();
        if lines.len() != targets.len() {
            return Err(LabError::Labpod {
                netns: from.netns.clone(),
                detail: format!(
                    "{} targets, {} result lines:\n{out}",
                    targets.len(),
                    lines.len()
                ),
            });
        }
        lines
            .iter()
            .zip(input.lines())
            .map(|(line, asked)| {
                let asked: Vec<&str> = asked.split_whitespace().take(3).collect();
                let mut fields = line.splitn(5, ' ');
                let echoed: Vec<&str> = fields.by_ref().take(3).collect();
                let verdict = fields.next();
                let reason = fields.next().unwrap_or("");
                match verdict {
                    Some("ok") if echoed == asked => Ok(ProbeOutcome {
                        ok: true,
                        detail: "ok".into(),
                    }),
                    Some("fail") if echoed == asked => Ok(ProbeOutcome {
                        ok: false,
                        detail: reason.to_string(),
                    }),
                    _ => Err(LabError::Labpod {
                        netns: from.netns.clone(),
                        detail: format!("result {line:?} does not answer {asked:?}"),
                    }),
                }
            })
            .collect()
    }

    /// Probes, for every ordered pair of distinct pods, each `(protocol, port)` at the
    /// destination's address of each family. Sources probe concurrently.
    pub fn matrix(
        &self,
        services: &[(Protocol, u16)],
        families: &[Family],
    ) -> Result<Vec<Cell>, LabError> {
        let all: Vec<usize> = (0..self.pods.len()).collect();
        self.probe_pairs(&all, services, families, false)
    }

    /// Like [`Lab::matrix`], among the pods at indices `pods` only, and each of them also
    /// probes its own addresses.
    pub fn matrix_among(
        &self,
        pods: &[usize],
        services: &[(Protocol, u16)],
        families: &[Family],
    ) -> Result<Vec<Cell>, LabError> {
        if let Some(bad) = pods.iter().find(|&&i| i >= self.pods.len()) {
            return Err(LabError::Invalid(format!("no lab pod {bad}")));
        }
        self.probe_pairs(pods, services, families, true)
    }

    fn probe_pairs(
        &self,
        pods: &[usize],
        services: &[(Protocol, u16)],
        families: &[Family],
        with_self: bool,
    ) -> Result<Vec<Cell>, LabError> {
        let plans: Vec<(usize, Vec<(usize, Target)>)> = pods
            .iter()
            .map(|&from| {
                let mut plan = Vec::new();
                for &to in pods.iter().filter(|&&to| with_self || to != from) {
                    for &family in families {
                        for &(protocol, port) in services {
                            let addr = self.pods[to].addr(family);
                            plan.push((
                                to,
                                Target {
                                    addr,
                                    protocol,
                                    port,
                                },
                            ));
                        }
                    }
                }
                (from, plan)
            })
            .collect();
        let results: Vec<Result<Vec<ProbeOutcome>, LabError>> = thread::scope(|s| {
            let handles: Vec<_> = plans
                .iter()
                .map(|(from, plan)| {
                    let pod = &self.pods[*from];
                    s.spawn(move || {
                        let targets: Vec<Target> = plan.iter().map(|(_, t)| *t).collect();
                        self.probe_outcomes(pod, &targets)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(LabError::Invalid("a prober panicked".into())))
                })
                .collect()
        });
        let mut cells = Vec::new();
        for ((from, plan), result) in plans.into_iter().zip(results) {
            for ((to, target), outcome) in plan.into_iter().zip(result?) {
                cells.push(Cell {
                    from,
                    to,
                    target,
                    outcome,
                });
            }
        }
        Ok(cells)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in 0..self.nodes.len() {
            let _ = std::fs::remove_dir_all(self.state_dir(node));
        }
        for server in &mut self.servers {
            // Already gone is fine; anything else is reported by `ip netns del` below.
            let _ = server.kill();
            let _ = server.wait();
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(err) = run("ip", &["netns", "del", ns], None) {
                eprintln!("lab: cannot remove namespace {ns}: {err}");
            }
        }
    }
}

/// The tables of the node's own networking, with no policy agent: what Flannel (its
/// masquerading of pod traffic leaving the cluster network) and kube-proxy in nftables mode
/// (service DNAT, its filter checks on new connections, masquerading of marked packets) put in
/// node `node`'s namespace, in their own tables, for both families, as `nft -f` text. The
/// services (the API server on node 0's wire address, a DNS service with a pod on each
/// node, one service without endpoints) are never the lab's pod-to-pod traffic: that crosses
/// these tables as on a real node, tracked, and neither translated nor masqueraded.
pub fn networking_tables(node: usize, nodes: usize) -> String {
    let mut out = String::new();
    for family in [Family::V4, Family::V6] {
        let (nf, cluster, own, multicast, apiserver) = match family {
            Family::V4 => (
                "ip",
                "10.244.0.0/16".to_string(),
                format!("10.244.{}.0/24", node + 1),
                "224.0.0.0/4",
                "192.168.100.1",
            ),
            Family::V6 => (
                "ip6",
                "fd00:10:244::/56".to_string(),
                format!("fd00:10:244:{}::/64", node + 1),
                "ff00::/8",
                "fd00:100::1",
            ),
        };
        let flannel = format!("flannel-ipv{}", if family == Family::V4 { 4 } else { 6 });
        out += &format!(
            "table {nf} {flannel} {{
	comment \"like Flannel's: masquerade pod traffic leaving the cluster network\"
	chain postrtg {{
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return
		{nf} saddr {own} {nf} daddr {cluster} return
		{nf} saddr {cluster} {nf} daddr {own} return
		{nf} saddr != {cluster} {nf} daddr {own} return
		{nf} saddr {cluster} {nf} daddr != {multicast} masquerade fully-random
		{nf} saddr != {cluster} {nf} daddr {cluster} masquerade fully-random
	}}
	chain forward-pods {{
		type filter hook forward priority filter; policy accept;
		{nf} saddr {cluster} accept
		{nf} daddr {cluster} accept
	}}
}}
"
        );
        let service = |i: u8| match family {
            Family::V4 => format!("10.96.0.{i}"),
            Family::V6 => format!("fd00:10:96::{i:x}"),
        };
        let at = |addr: &str, port: u16| match family {
            Family::V4 => format!("{addr}:{port}"),
            Family::V6 => format!("[{addr}]:{port}"),
        };
        let addr_type = if family == Family::V4 {
            "ipv4_addr"
        } else {
            "ipv6_addr"
        };
        let loopback = if family == Family::V4 {
            "127.0.0.0/8"
        } else {
            "::1"
        };
        // The DNS service's endpoints: one address on each node's pod network, never a lab pod.
        let dns: Vec<String> = (0..nodes.max(1))
            .map(|i| match family {
                Family::V4 => format!("10.244.{}.250", i + 1),
                Family::V6 => format!("fd00:10:244:{}::fa", i + 1),
            })
            .collect();
        let mut endpoints = String::new();
        let mut services = String::new();
        for (name, proto, port) in [("dns-tcp", "tcp", 53u16), ("dns-udp", "udp", 53)] {
            let picks: Vec<String> = dns
                .iter()
                .enumerate()
                .map(|(k, _)| format!("{k} : goto endpoint-{name}-{k}"))
                .collect();
            services += &format!(
                "	chain service-{name} {{
		{nf} daddr {} {proto} dport {port} {nf} saddr != {cluster} jump mark-for-masquerade
		numgen random mod {} vmap {{ {} }}
	}}
",
                service(10),
                dns.len(),
                picks.join(", ")
            );
            for (k, addr) in dns.iter().enumerate() {
                endpoints += &format!(
                    "	chain endpoint-{name}-{k} {{
		{nf} saddr {addr} jump mark-for-masquerade
		meta l4proto {proto} dnat to {}
	}}
",
                    at(addr, port)
                );
            }
        }
        out += &format!(
            "table {nf} kube-proxy {{
	comment \"like kube-proxy's in nftables mode\"
	set cluster-ips {{
		type {addr_type}
		elements = {{ {}, {}, {} }}
	}}
	chain reject-chain {{
		reject
	}}
	map no-endpoint-services {{
		type {addr_type} . inet_proto . inet_service : verdict
		elements = {{ {} . tcp . 80 : goto reject-chain }}
	}}
	map service-nodeports {{
		type inet_proto . inet_service : verdict
	}}
	chain mark-for-masquerade {{
		meta mark set meta mark | 0x00004000
	}}
	chain masquerading {{
		meta mark & 0x00004000 == 0x00000000 return
		meta mark set meta mark ^ 0x00004000
		masquerade fully-random
	}}
	chain service-kubernetes {{
		{nf} daddr {} tcp dport 443 {nf} saddr != {cluster} jump mark-for-masquerade
		goto endpoint-kubernetes
	}}
	chain endpoint-kubernetes {{
		{nf} saddr {apiserver} jump mark-for-masquerade
		meta l4proto tcp dnat to {}
	}}
{endpoints}{services}	map service-ips {{
		type {addr_type} . inet_proto . inet_service : verdict
		elements = {{ {} . tcp . 443 : goto service-kubernetes, {} . tcp . 53 : goto service-dns-tcp, {} . udp . 53 : goto service-dns-udp }}
	}}
	chain services {{
		{nf} daddr . meta l4proto . th dport vmap @service-ips
		fib daddr type local {nf} daddr != {loopback} meta l4proto . th dport vmap @service-nodeports
	}}
	chain service-endpoints-check {{
		{nf} daddr . meta l4proto . th dport vmap @no-endpoint-services
	}}
	chain cluster-ips-check {{
		{nf} daddr @cluster-ips reject comment \"no such port on a ClusterIP\"
	}}
	chain filter-forward {{
		type filter hook forward priority -110; policy accept;
		ct state new jump service-endpoints-check
		ct state new jump cluster-ips-check
	}}
	chain filter-input {{
		type filter hook input priority -110; policy accept;
		ct state new jump service-endpoints-check
	}}
	chain filter-output {{
		type filter hook output priority -110; policy accept;
		ct state new jump service-endpoints-check
	}}
	chain nat-prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}}
	chain nat-output {{
		type nat hook output priority -100; policy accept;
		jump services
	}}
	chain nat-postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		jump masquerading
	}}
}}
",
            service(1),
            service(10),
            service(100),
            service(100),
            service(1),
            at(apiserver, 6443),
            service(1),
            service(10),
            service(10),
        );
    }
    out
}

/// `nft` commands removing what [`networking_tables`] loads.
pub const NETWORKING_TABLES_DELETE: &str = "delete table ip flannel-ipv4
delete table ip6 flannel-ipv6
delete table ip kube-proxy
delete table ip6 kube-proxy
";

/// Node `node`'s underlay address on the wire.
fn wire_ipv4(node: usize) -> Ipv4Addr {
    // A lab has at most 200 nodes.
    Ipv4Addr::new(192, 168, 100, u8::try_from(node + 1).unwrap_or(u8::MAX))
}

/// Node `i`'s underlay, bridge and VXLAN devices, as Flannel's VXLAN backend makes them.
fn node_links(i: usize) -> Vec<String> {
    let n = i + 1;
    vec![
        "link set lo up".into(),
        format!("addr add {}/24 dev eth0", wire_ipv4(i)),
        format!("addr add fd00:100::{n}/64 dev eth0 nodad"),
        "link set eth0 up".into(),
        // A MAC of its own: a bridge without one takes its lowest port's, so adding a pod can
        // change it, and pods would send to the old one until IPv6 neighbour discovery noticed
        // (IPv4 is told at once by gratuitous ARP).
        format!(
            "link add cni0 address {} type bridge mcast_snooping 0",
            bridge_mac(i)
        ),
        format!("addr add 10.244.{n}.1/24 dev cni0"),
        format!("addr add fd00:10:244:{n}::1/64 dev cni0 nodad"),
        "link set cni0 up".into(),
        format!(
            "link add flannel.1 address {} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning",
            vtep_mac(i, Family::V4),
            wire_ipv4(i)
        ),
        format!("addr add 10.244.{n}.0/32 dev flannel.1"),
        "link set flannel.1 up".into(),
        format!(
            "link add flannel-v6.1 address {} type vxlan id 1 local fd00:100::{n} dev eth0 dstport 8472 nolearning",
            vtep_mac(i, Family::V6)
        ),
        format!("addr add fd00:10:244:{n}::/128 dev flannel-v6.1 nodad"),
        "link set flannel-v6.1 up".into(),
    ]
}

/// The route and permanent neighbour flanneld writes on every other node for node `j`.
fn flannel_routes(j: usize) -> Vec<String> {
    let n = j + 1;
    vec![
        format!("route add 10.244.{n}.0/24 via 10.244.{n}.0 dev flannel.1 onlink"),
        format!(
            "neigh add 10.244.{n}.0 lladdr {} dev flannel.1 nud permanent",
            vtep_mac(j, Family::V4)
        ),
        format!("route add fd00:10:244:{n}::/64 via fd00:10:244:{n}:: dev flannel-v6.1 onlink"),
        format!(
            "neigh add fd00:10:244:{n}:: lladdr {} dev flannel-v6.1 nud permanent",
            vtep_mac(j, Family::V6)
        ),
    ]
}

/// The fdb entries that send frames for node `j`'s VTEPs to its underlay addresses.
fn flannel_fdb(j: usize) -> Vec<String> {
    let n = j + 1;
    vec![
        format!(
            "fdb add {} dev flannel.1 dst {}",
            vtep_mac(j, Family::V4),
            wire_ipv4(j)
        ),
        format!(
            "fdb add {} dev flannel-v6.1 dst fd00:100::{n}",
            vtep_mac(j, Family::V6)
        ),
    ]
}

/// A fixed, locally administered MAC for node `node`'s cni0.
fn bridge_mac(node: usize) -> String {
    format!("0e:6e:63:6e:{:02x}:00", node % 256)
}

/// A fixed, locally administered MAC per node and family, so no node has to be asked.
fn vtep_mac(node: usize, family: Family) -> String {
    format!("0e:6e:66:6c:{:02x}:0{}", node % 256, family.digit())
}

fn check_bridge_netfilter(ns: &str) -> Result<(), LabError> {
    let out = exec(
        ns,
        &[
            "sysctl",
            "-n",
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
        ],
    )?;
    if out.split_whitespace().eq(["1", "1"]) {
        Ok(())
    } else {
        Err(LabError::Kernel(format!(
            "bridge-nf-call-iptables/ip6tables in {ns} are {:?}, not 1 1: bridged pod traffic would bypass the inet hooks",
            out.trim()
        )))
    }
}

fn octet(n: usize) -> Result<u8, LabError> {
    u8::try_from(n).map_err(|_| LabError::Invalid(format!("{n} does not fit an address octet")))
}

fn v6(text: &str) -> Result<Ipv6Addr, LabError> {
    text.parse()
        .map_err(|_| LabError::Invalid(format!("{text} is no IPv6 address")))
}

/// A pod name as part of a namespace name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// The host end of a pod's veth is `veth` + 8 hex digits of this, like CNI plugins do.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The pid encoded in a lab namespace name (`np<pid hex>x<counter>-...`), if it is one.
fn lab_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("np")?;
    let (pid, rest) = rest.split_once('x')?;
    let (counter, _) = rest.split_once('-')?;
    let lower_hex = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(pid) || counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    u32::from_str_radix(pid, 16).ok()
}

/// Removes lab namespaces whose creating process no longer exists: what a killed run left.
/// Namespaces of live processes, this one included, and every other name are left alone.
/// Once per process is enough: nothing this process made can be stale.
fn sweep_stale() {
    static SWEPT: Once = Once::new();
    SWEPT.call_once(|| {
        let own = std::process::id();
        for name in netns_names() {
            let Some(pid) = lab_owner(&name) else {
                continue;
            };
            if pid == own || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            match run("ip", &["netns", "del", &name], None) {
                Ok(_) => eprintln!("lab: removed {name}, left by exited process {pid}"),
                // Another run sweeping at the same moment may have been first.
                Err(_) if !netns_names().contains(&name) => {}
                Err(err) => eprintln!("lab: cannot remove stale {name}: {err}"),
            }
        }
    });
}

fn netns_names() -> Vec<String> {
    run("ip", &["netns", "list"], None)
        .map(|list| {
            list.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn ip_batch(ns: &str, commands: &[String]) -> Result<(), LabError> {
    run("ip", &["-n", ns, "-batch", "-"], Some(&commands.join("\n"))).map(drop)
}

fn exec(ns: &str, command: &[&str]) -> Result<String, LabError> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(command);
    run("ip", &args, None)
}

fn exec_with_input(ns: &str, command: &[&str], input: &str) -> Result<String, LabError> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(command);
    run("ip", &args, Some(input))
}

/// Runs `program` to completion, feeding it `input`, and returns its stdout.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, LabError> {
    let mut command = format!("{program} {}", args.join(" "));
    if let Some(text) = input {
        let shown: String = text.chars().take(600).collect();
        command.push_str(&format!(" <<<\n{shown}"));
    }
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    // Written from a thread so that a child answering before it has read everything cannot
    // deadlock against us.
    let writer = match (input, child.stdin.take()) {
        (Some(text), Some(mut stdin)) => {
            let text = text.to_string();
            Some(thread::spawn(move || stdin.write_all(text.as_bytes())))
        }
        _ => None,
    };
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    let written = writer.map(|w| w.join());
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    match written {
        Some(Ok(Err(source))) => return Err(LabError::Spawn { command, source }),
        Some(Err(_)) => {
            return Err(LabError::Invalid(format!(
                "`{command}`: the stdin writer panicked"
            )))
        }
        _ => {}
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Probed cells held against what `Tracer` says of a snapshot.
pub struct Comparison {
    /// Tracer's verdict on each cell, in order.
    pub traces: Vec<ruleset::Trace>,
    /// One entry per cell where the kernel and Tracer disagree.
    pub disagreements: Vec<String>,
    /// How many probes failed, by reason.
    pub failures: std::collections::BTreeMap<String, usize>,
}

/// Traces every cell's connection through `cluster`'s compiled rulesets and lists where real
/// packets did otherwise. Every lab address must be a pod of `cluster`.
pub fn compare_with_trace(
    lab: &Lab,
    cells: &[Cell],
    cluster: &ruleset::Cluster,
) -> Result<Comparison, LabError> {
    use ruleset::trace::Party;
    use ruleset::Endpoint;
    let mut tracer = ruleset::Tracer::new(cluster.clone());
    let mut comparison = Comparison {
        traces: Vec::with_capacity(cells.len()),
        disagreements: Vec::new(),
        failures: Default::default(),
    };
    for cell in cells {
        let from = lab
            .pods
            .get(cell.from)
            .ok_or_else(|| LabError::Invalid(format!("no lab pod {}", cell.from)))?;
        let trace = tracer
            .trace(
                &Endpoint::Address(from.addr(Family::of(&cell.target.addr))),
                &Endpoint::Address(cell.target.addr),
                cell.target.protocol,
                cell.target.port,
            )
            .map_err(|e| LabError::Invalid(e.to_string()))?;
        if !matches!(trace.from, Party::Pod { .. }) || !matches!(trace.to, Party::Pod { .. }) {
            return Err(LabError::Invalid(format!(
                "the snapshot does not know lab address {} or {}",
                trace.src, trace.dst
            )));
        }
        if !cell.outcome.ok {
            *comparison
                .failures
                .entry(cell.outcome.detail.clone())
                .or_default() += 1;
        }
        if trace.allowed != cell.outcome.ok {
            let kernel = if cell.outcome.ok {
                "reached"
            } else {
                "did not reach"
            };
            comparison.disagreements.push(format!(
                "{}\n  kernel: {kernel}\n  trace: {trace}",
                lab.describe(cell)
            ));
        }
        comparison.traces.push(trace);
    }
    Ok(comparison)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_owner_reads_only_the_lab_scheme() {
        assert_eq!(lab_owner("np1a2bx0-wire"), Some(0x1a2b));
        assert_eq!(lab_owner("np1a2bx12-p3-frontend-1"), Some(0x1a2b));
        assert_eq!(lab_owner("np1A2Bx0-wire"), None);
        assert_eq!(lab_owner("npx0-wire"), None);
        assert_eq!(lab_owner("np1a2bx-wire"), None);
        assert_eq!(lab_owner("np1a2bx0"), None);
        assert_eq!(lab_owner("npod-x1-a"), None);
        assert_eq!(lab_owner("cni-1234"), None);
    }

    #[test]
    fn lab_macs_are_distinct() {
        let a = vtep_mac(0, Family::V4);
        assert_eq!(a, "0e:6e:66:6c:00:04");
        assert_ne!(a, vtep_mac(1, Family::V4));
        assert_ne!(a, vtep_mac(0, Family::V6));
        assert_ne!(bridge_mac(0), bridge_mac(1));
        assert!(![a, vtep_mac(0, Family::V6)].contains(&bridge_mac(0)));
    }
}
