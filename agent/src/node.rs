//! What the node must provide: privileges, and bridged traffic passing the inet hooks.

use std::fs;

use ruleset::ir::TABLE_NAME;

use crate::netlink::{WriteError, Writer};

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

/// Refuses to go on when the kernel has no nf_tables; says whether a table of ours is already
/// in place (an earlier run's, which the first sync replaces in one transaction).
pub fn check_nf_tables(writer: &mut Writer) -> anyhow::Result<bool> {
    match writer.table_exists(TABLE_NAME) {
        Ok(exists) => Ok(exists),
        Err(WriteError::Refused { error, .. }) if lacks_nf_tables(error.raw_os_error()) => {
            anyhow::bail!(
                "the kernel has no nf_tables ({error}): nftpol needs CONFIG_NF_TABLES and \
                 CONFIG_NF_TABLES_INET (modprobe nf_tables)"
            )
        }
        Err(err) => Err(anyhow::Error::new(err).context("asking nf_tables for our table")),
    }
}

/// What nfnetlink answers a request for a subsystem that is not there.
fn lacks_nf_tables(errno: Option<i32>) -> bool {
    const EINVAL: i32 = 22;
    const EPROTONOSUPPORT: i32 = 93;
    const EOPNOTSUPP: i32 = 95;
    const EAFNOSUPPORT: i32 = 97;
    matches!(
        errno,
        Some(EINVAL | EPROTONOSUPPORT | EOPNOTSUPP | EAFNOSUPPORT)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_subsystem_answers_mean_no_nf_tables() {
        for errno in [22, 93, 95, 97] {
            assert!(lacks_nf_tables(Some(errno)), "{errno}");
        }
        for errno in [None, Some(1), Some(2), Some(16)] {
            assert!(!lacks_nf_tables(errno), "{errno:?}");
        }
    }
}
