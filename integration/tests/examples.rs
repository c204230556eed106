//! Every example snapshot, compiled for each of its nodes: the rendered text matches the
//! reviewed golden file, and the real `nft -c` accepts it.
//!
//! After an intended change to the output: `UPDATE_GOLDEN=1 cargo test -p integration --test
//! examples`, then review the diff of `integration/tests/golden/`.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::fs;
use std::path::Path;

use integration::netns;
use ruleset::Compiler;

const NODES: [&str; 2] = ["node-a", "node-b"];

fn rendered() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for file in integration::example_snapshots() {
        let cluster = agent::manifests::load(&file).expect("example loads");
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("name")
            .to_string();
        for node in NODES {
            let compiler = Compiler::new(cluster.clone(), node);
            assert!(
                compiler.diagnostics().is_empty(),
                "{stem}: examples must be valid: {:?}",
                compiler.diagnostics()
            );
            out.push((
                format!("{stem}.{node}.nft"),
                ruleset::render(compiler.table()),
            ));
        }
    }
    out
}

#[test]
fn rendered_examples_match_golden_files() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (name, text) in rendered() {
        let path = golden.join(&name);
        if update {
            fs::write(&path, &text).expect("write golden");
            continue;
        }
        let want = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            want == text,
            "{name} differs from its golden file; rerun with UPDATE_GOLDEN=1 and review.\n{text}"
        );
    }
}

#[test]
fn nft_accepts_every_rendered_example() {
    if netns::skip_unless_root("nft_accepts_every_rendered_example") {
        return;
    }
    for (name, text) in rendered() {
        if let Err(err) = netns::nft_check(&text) {
            panic!("nft -c rejected {name}:\n{err}\n{text}");
        }
    }
}

#[test]
fn nft_rejects_a_broken_ruleset() {
    // The check above is only worth something if nft -c really refuses bad input.
    if netns::skip_unless_root("nft_rejects_a_broken_ruleset") {
        return;
    }
    let broken = "table inet nftpol {\n\tchain c {\n\t\tip saddr @missing accept\n\t}\n}\n";
    assert!(netns::nft_check(broken).is_err());
}
