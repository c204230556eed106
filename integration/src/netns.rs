//! Throwaway network namespaces for tests that need the real kernel.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Whether this process runs as root (needed for network namespaces and nf_tables).
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

/// Runs `f` on a thread of its own inside the network namespace at `netns` (a
/// `/run/netns/<name>` path): sockets it makes stay in that namespace.
pub fn inside<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let namespace = std::fs::File::open(netns)?;
                nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)?;
                f()
            })
            .join()
            .map_err(|_| std::io::Error::other("the thread in the network namespace panicked"))?
    })
}

/// Runs `nft -c -f -` on `text` in a fresh network namespace that vanishes with the process:
/// the kernel validates the whole ruleset and nothing is applied anywhere.
pub fn nft_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("unshare")
        .args(["--net", "nft", "-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run unshare/nft: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(text.as_bytes())
        .map_err(|e| format!("writing to nft: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
