//! What the agent's kernel tests share.

/// Whether this process runs as root (network namespaces, nf_tables, dropping capabilities).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Says loudly that a kernel test is skipped, and returns true, when not root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("\n!!!!! SKIPPED {test}: needs root for network namespaces and nf_tables !!!!!\n");
    true
}
