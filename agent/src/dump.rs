//! `agent dump-ruleset`

use anyhow::Context;
use ruleset::guard::{guard_table, with_veths};
use ruleset::{Cluster, Compiler};

use crate::cli::{DumpArgs, SourceArgs};
use crate::{kube_source, manifests, veth};

pub fn run(args: &DumpArgs) -> anyhow::Result<()> {
    let cluster = load(&args.source)?;
    let compiler = Compiler::new(cluster, &args.node);
    report(&compiler);
    if !args.guard {
        print!("{}", ruleset::render(compiler.table()));
        return Ok(());
    }
    let discovery = veth::discover().context("listing this host's veths")?;
    // One look at the kernel: no veth was found before, so a pod whose addresses two veths
    // carry is contested.
    let mut history = veth::History::default();
    history.observe(&discovery);
    let found = veth::guarded_pods(&compiler, Some(&discovery), &history);
    for pod in &found.missing {
        tracing::warn!(%pod, "{}", veth::UNGUARDED);
    }
    for (pod, with) in &found.contested {
        tracing::warn!(%pod, with = %with.join(","), "{}", veth::CONTESTED);
    }
    for (id, pod) in found.found.iter().filter(|(_, p)| p.mac_shared) {
        veth::warn_shared_mac(Some(&discovery), id, pod);
    }
    let guard = veth::guard(Some(&discovery), &found);
    print!(
        "{}\n{}",
        ruleset::render(&with_veths(compiler.table(), &guard)),
        ruleset::render(&guard_table(compiler.node(), &guard))
    );
    Ok(())
}

/// The cluster from the snapshot given, or else listed once from the Kubernetes API.
pub fn load(source: &SourceArgs) -> anyhow::Result<Cluster> {
    if let Some(path) = &source.manifests {
        return manifests::load(path).with_context(|| format!("loading {}", path.display()));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cluster = runtime
        .block_on(kube_source::list_once(source.kubeconfig.as_deref()))
        .context("listing the cluster from the Kubernetes API")?;
    Ok(cluster)
}

/// Warnings for what cannot be enforced as written, and a one-line summary, on stderr.
pub fn report(compiler: &Compiler) {
    for d in compiler.diagnostics() {
        tracing::warn!("{d}");
    }
    summary(compiler);
}

/// What was compiled for the node, in one line (a warning when it has no pod).
pub fn summary(compiler: &Compiler) {
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
