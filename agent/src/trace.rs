//! `agent trace`

use anyhow::Context;
use ruleset::{policy, Tracer};

use crate::cli::TraceArgs;
use crate::manifests;

pub fn run(args: &TraceArgs) -> anyhow::Result<()> {
    let cluster = manifests::load(&args.manifests)
        .with_context(|| format!("loading {}", args.manifests.display()))?;
    let mut diagnostics = Vec::new();
    for p in cluster.policies() {
        policy::resolve(p, &mut diagnostics);
    }
    for d in &diagnostics {
        tracing::warn!("{d}");
    }
    let trace =
        Tracer::new(cluster).trace(&args.from, &args.to, args.protocol.into(), args.port)?;
    println!("{trace}");
    Ok(())
}
