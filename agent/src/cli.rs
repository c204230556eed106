//! Command-line interface.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "agent",
    version,
    about = "nftpol: enforces Kubernetes NetworkPolicy on Flannel and kubenet nodes with nftables",
    after_help = "Examples:\n  \
        agent dump-ruleset --manifests integration/examples/three-tier.yaml --node node-a\n  \
        agent trace --manifests integration/examples/three-tier.yaml --from shop/frontend-1 --to shop/database-0 --port 5432"
)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace or a tracing directive); RUST_LOG wins.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Log lines as plain text, or as one JSON object per line for a log collector.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    Run(RunArgs),
    DumpRuleset(DumpArgs),
    Trace(TraceArgs),
}

/// Enforce NetworkPolicy on this node: install the ruleset and keep it in step with the
/// snapshot.
///
/// Installs table `inet nftpol` (policy) and table `bridge nftpol` (anti-spoofing on the local
/// pods' veths) in one transaction, replacing tables left by an earlier run in the same
/// transaction, then polls the snapshot and applies only what changed. A snapshot that does not
/// load leaves the last good rules in force. Tables changed or removed by anyone else are put
/// back within seconds. On SIGTERM or SIGINT the agent exits and the rules stay. Needs
/// CAP_NET_ADMIN. A policy field it cannot enforce is logged once; from the API, one node also
/// records it as a Warning Event (reason Unenforceable) on the policy.
#[derive(Args)]
#[command(after_help = "Example:\n  \
    agent run --manifests /etc/nftpol/snapshot.yaml --node \"$(hostname)\"")]
pub struct RunArgs {
    /// A cluster snapshot: a YAML or JSON file, or a directory of them. Edits, replacement by
    /// rename and symlink swaps (ConfigMap volumes) are all picked up.
    /// Without it, the agent watches the Kubernetes API.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API (default: in-cluster configuration, then $KUBECONFIG, then
    /// ~/.kube/config).
    #[arg(
        long,
        value_name = "PATH",
        env = "KUBECONFIG",
        conflicts_with = "manifests"
    )]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as pods' `spec.nodeName` gives it.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// How often to look at the snapshot for changes.
    #[arg(long, value_name = "MILLISECONDS", default_value = "200")]
    pub poll_ms: u64,
    /// This node's pod CIDRs. Given, forwarded traffic to or from an address in them that no
    /// pod the agent knows holds is dropped, and such an address's traffic to the node (its
    /// replies and ICMP errors pass), so a new pod is unreachable until its rules are in place.
    /// Off by default.
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    pub isolate_unprogrammed: Vec<ipnet::IpNet>,
    /// The bits of the conntrack mark holding the ruleset epoch, for the established-
    /// connection fast path: one contiguous run of at least two bits, 0 to turn it off. The
    /// other bits of the mark are left as they are.
    #[arg(long, value_name = "MASK", default_value = "0xff000000", value_parser = parse_ct_mark_bits)]
    pub ct_mark_bits: ruleset::epoch::CtMarkBits,
    /// Where to answer /healthz, /readyz and /metrics over HTTP: ADDRESS:PORT, `[V6]:PORT` or
    /// V6:PORT (the last colon starts the port). Loopback by default.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9743", value_parser = parse_health_addr)]
    pub health_addr: SocketAddr,
    /// Where to keep which veth each local pod was found on, so that a restarted agent still
    /// knows (a pod keeps its veth while it exists, whatever addresses it puts on its
    /// interface): file `veths.json` in this directory, written when that changes. Use a
    /// tmpfs such as /run (a reboot starts afresh); an empty value keeps it in memory only.
    #[arg(
        long,
        value_name = "DIR",
        env = "NFTPOL_STATE_DIR",
        default_value = "/run/nftpol"
    )]
    pub state_dir: PathBuf,
}

/// A mask in hexadecimal (`0x...`) or decimal.
fn parse_ct_mark_bits(s: &str) -> Result<ruleset::epoch::CtMarkBits, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    let mask = parsed.map_err(|_| format!("{s:?} is not a 32-bit mask (e.g. 0xff000000)"))?;
    ruleset::epoch::CtMarkBits::new(mask)
}

/// `ADDRESS:PORT`, with or without brackets around an IPv6 address: Kubernetes' `status.hostIP`
/// gives a bare IPv6 address, which a manifest can only follow with `:PORT`.
fn parse_health_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let bad = || format!("{s:?} is not ADDRESS:PORT (e.g. 127.0.0.1:9743 or [::1]:9743)");
    let (ip, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(ip, port))
}

/// Where `dump-ruleset` and `trace` read the cluster from.
#[derive(Args)]
pub struct SourceArgs {
    /// A cluster snapshot: a YAML or JSON file, or a directory of them (multi-document YAML
    /// and `kind: List` both work). Without it, the cluster is listed from the Kubernetes API.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API (default: in-cluster configuration, then $KUBECONFIG, then
    /// ~/.kube/config).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

/// Print the nftables ruleset one node enforces, as `nft -f` text.
///
/// Every rule is commented with the policy (namespace/name) and rule it comes from. Policies
/// that cannot be enforced as written are reported on stderr with the field and the reason;
/// the pods they select stay isolated.
#[derive(Args)]
#[command(after_help = "Example:\n  \
    agent dump-ruleset --manifests integration/examples/three-tier.yaml --node node-a\n  \
    kubectl get pods,namespaces,networkpolicies -A -o yaml > snap.yaml && \\\n    \
    agent dump-ruleset --manifests snap.yaml --node \"$(hostname)\" | nft -c -f -\n  \
    agent dump-ruleset --node \"$NODE_NAME\"   # from the API, with the in-cluster or ~/.kube/config credentials\n  \
    agent dump-ruleset --node \"$NODE_NAME\" --guard   # on that node: its pods' veths too")]
pub struct DumpArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// The node whose pods the ruleset protects (`spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Also print the anti-spoofing table `bridge nftpol` as the agent would write it now, for
    /// the veths this host's kernel shows, and list them in the policy table's set `veths`
    /// (run it on that node, as root).
    #[arg(long)]
    pub guard: bool,
}

/// Say whether a connection is allowed, and which policy rule decided each direction.
///
/// The first line is ALLOWED or DENIED. Then, for the egress of the source and the ingress of
/// the destination: whether that pod is isolated, and the rule that allowed the connection or
/// the drop that ended it. The answer is computed by running the packet through the same
/// compiled rulesets `dump-ruleset` prints, for the nodes of both ends.
#[derive(Args)]
#[command(after_help = "Examples:\n  \
    agent trace --manifests integration/examples/three-tier.yaml --from shop/backend-1 --to shop/database-0 --port 5432\n  \
    agent trace --manifests snap.yaml --from 203.0.113.9 --to edge/api --port 443\n  \
    agent trace --manifests snap.yaml --from shop/frontend-1 --to kube-system/coredns-0 --port 53 --protocol UDP")]
pub struct TraceArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Source: NAMESPACE/POD, or an IP address (an address that is no pod is outside the cluster).
    #[arg(long, value_name = "NS/POD|IP")]
    pub from: ruleset::Endpoint,
    /// Destination: NAMESPACE/POD or an IP address.
    #[arg(long, value_name = "NS/POD|IP")]
    pub to: ruleset::Endpoint,
    /// Destination port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    #[arg(long, value_enum, default_value = "TCP", ignore_case = true)]
    pub protocol: ProtocolArg,
}

#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum ProtocolArg {
    Tcp,
    Udp,
    Sctp,
}

impl From<ProtocolArg> for ruleset::ir::Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Tcp => Self::Tcp,
            ProtocolArg::Udp => Self::Udp,
            ProtocolArg::Sctp => Self::Sctp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_mark_bits_take_hex_or_decimal_and_refuse_what_cannot_hold_epochs() {
        let mask = |s: &str| parse_ct_mark_bits(s).map(|b| b.mask());
        assert_eq!(mask("0xff000000"), Ok(0xff00_0000));
        assert_eq!(mask("0X0000FF00"), Ok(0x0000_ff00));
        assert_eq!(mask("48"), Ok(0x30));
        assert_eq!(mask("0"), Ok(0));
        for bad in ["0x01000000", "0xf0f00000", "0x1ffffffff", "-1", "top", ""] {
            assert!(parse_ct_mark_bits(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn health_addr_takes_v4_and_v6_with_or_without_brackets() {
        let ok = |s: &str| parse_health_addr(s).map(|a| a.to_string());
        assert_eq!(ok("127.0.0.1:9743").as_deref(), Ok("127.0.0.1:9743"));
        assert_eq!(ok("[::1]:9743").as_deref(), Ok("[::1]:9743"));
        assert_eq!(ok("fd00::1:9743").as_deref(), Ok("[fd00::1]:9743"));
        assert_eq!(ok("0.0.0.0:0").as_deref(), Ok("0.0.0.0:0"));
        for bad in [
            "localhost:9743",
            "127.0.0.1",
            "[::1]",
            "::1",
            "1.2.3.4:99999",
            "",
        ] {
            assert!(parse_health_addr(bad).is_err(), "{bad}");
        }
    }
}
