//! What the node must provide: privileges, and bridged traffic passing the inet hooks.

use std::fs;

/// CAP_NET_ADMIN's bit in the capability sets of /proc/self/status.
const CAP_NET_ADMIN: u32 = 12;

/// Refuses to go on without CAP_NET_ADMIN, saying what is missing.
pub fn check_privileges() -> anyhow::Result<()> {
    let status = fs::read_to_string("/proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & (1 << CAP_NET_ADMIN) == 0 {
        anyhow::bail!(
            "missing CAP_NET_ADMIN: nftpol programs nf_tables; run it as root or grant the \
             capability (systemd: AmbientCapabilities=CAP_NET_ADMIN; Kubernetes: \
             securityContext.capabilities.add: [NET_ADMIN])"
        );
    }
    Ok(())
}

/// Bridged pod-to-pod traffic reaches the inet hooks only with these on; turn them on and say so.
pub fn enable_bridge_netfilter() {
    for family in ["iptables", "ip6tables"] {
        let path = format!("/proc/sys/net/bridge/bridge-nf-call-{family}");
        match fs::read_to_string(&path) {
            Err(_) => tracing::warn!(
                %path,
                "br_netfilter is not loaded: traffic between pods on the same bridge bypasses the \
                 rules (modprobe br_netfilter)"
            ),
            Ok(v) if v.trim() == "1" => {}
            Ok(_) => match fs::write(&path, "1") {
                Ok(()) => tracing::info!(%path, "set to 1 so bridged pod traffic is filtered"),
                Err(err) => {
                    tracing::warn!(%path, %err, "cannot enable; bridged pod traffic is not filtered")
                }
            },
        }
    }
}
