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

/// Runs `f` on a new thread inside a new, empty network namespace. The namespace belongs to
/// that thread alone (and to the processes it starts) and vanishes when it ends, panic or not.
#[allow(dead_code, reason = "not every test file enters a namespace")]
pub fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            f()
        });
        match thread.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
