//! `agent trace`

use ruleset::{policy, Tracer};

use crate::cli::TraceArgs;
use crate::dump;

pub fn run(args: &TraceArgs) -> anyhow::Result<()> {
    let cluster = dump::load(&args.source)?;
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
