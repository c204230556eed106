//! nftpol's test bench: synthetic clusters for benchmarks, the tests under `tests/` that
//! load real rulesets into throwaway network namespaces (`lab`) and run real agents in them
//! (`agents`, `probers`), and a stand-in API server (`apiserver`, fed through `objects`) that
//! the agent's Kubernetes source lists and watches; `measure` holds what benchmarks read
//! (percentiles, load average, `/proc`, `/metrics`, the moment a connection's verdict flips).

#![forbid(unsafe_code)]

pub mod agents;
pub mod apiserver;
pub mod lab;
pub mod measure;
pub mod netns;
pub mod objects;
pub mod probers;
pub mod synthetic;

use std::path::{Path, PathBuf};

/// The workspace's root directory (where `packaging/`, `agent/` and `integration/` are).
pub fn workspace() -> &'static Path {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // integration/ is a member of the workspace, so it always has a parent.
    manifest_dir.parent().unwrap_or(manifest_dir)
}

/// A text file's contents; a missing or unreadable file fails the test, naming the path.
pub fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The example snapshots the README points to (`integration/examples/*.yaml`), in name order.
pub fn example_snapshots() -> Vec<PathBuf> {
    let dir = workspace().join("integration/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the five examples, found {files:?}"
    );
    files
}
