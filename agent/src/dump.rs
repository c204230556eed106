//! `agent dump-ruleset`

use anyhow::Context;
use ruleset::Compiler;

use crate::cli::DumpArgs;
use crate::manifests;

pub fn run(args: &DumpArgs) -> anyhow::Result<()> {
    let cluster = manifests::load(&args.manifests)
        .with_context(|| format!("loading {}", args.manifests.display()))?;
    let compiler = Compiler::new(cluster, &args.node);
    report(&compiler);
    print!("{}", ruleset::render(compiler.table()));
    Ok(())
}

/// Warnings for what cannot be enforced as written, and a one-line summary, on stderr.
pub fn report(compiler: &Compiler) {
    for d in compiler.diagnostics() {
        tracing::warn!("{d}");
    }
    let node = compiler.node();
    let local = compiler.local_pods().count();
    if local == 0 {
        tracing::warn!(
            node,
            "no enforceable pod of the snapshot runs on this node; is the node name right?"
        );
    }
    let table = compiler.table();
    tracing::info!(
        node,
        local_pods = local,
        chains = table.chains.len(),
        rules = table.rule_count(),
        sets = table.sets.len(),
        elements = table.element_count(),
        "compiled"
    );
}
