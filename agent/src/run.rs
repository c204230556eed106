//! `agent run`: the reconcile loop over a snapshot source.
//!
//! ```text
//! snapshot changed? -> load -> Compiler (node) -> diff against what is installed -> Writer
//! ```
//! The first sync replaces any table of ours in one transaction; later ones write the delta.
//! A sync that fails is retried as a full replace; a snapshot that does not load changes nothing.

use std::time::{Duration, Instant};

use anyhow::Context;
use ruleset::ir::TABLE_NAME;
use ruleset::{diff, Compiler};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::RunArgs;
use crate::netlink::Writer;
use crate::{dump, manifests, node};

pub async fn run(args: &RunArgs) -> anyhow::Result<()> {
    node::check_privileges()?;
    node::enable_bridge_netfilter();
    let mut writer = Writer::new().context("opening the nf_tables netlink socket")?;
    if node::check_nf_tables(&mut writer)? {
        tracing::info!(
            "table inet {TABLE_NAME} is in place from an earlier run; the first sync replaces it"
        );
    }
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut ticker = tokio::time::interval(Duration::from_millis(args.poll_ms.max(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut seen: Option<manifests::Fingerprint> = None;
    let mut installed: Option<Compiler> = None;
    let mut last_check = Instant::now();
    let mut unreadable_reported = false;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = ticker.tick() => {}
        }
        if last_check.elapsed() >= TABLE_CHECK {
            last_check = Instant::now();
            restore_if_removed(&mut writer, installed.as_ref());
        }
        let stamp = match manifests::fingerprint(&args.manifests) {
            Ok(stamp) => Some(stamp),
            Err(err) => {
                // Once per unreadable stretch, including a wrong path at start-up.
                if seen.is_some() || !unreadable_reported {
                    tracing::error!(%err, "snapshot unreadable; the last good rules stay in force");
                    unreadable_reported = true;
                }
                seen = None;
                continue;
            }
        };
        unreadable_reported = false;
        if stamp == seen {
            continue;
        }
        seen = stamp;
        let cluster = match manifests::load(&args.manifests) {
            Ok(cluster) => cluster,
            Err(err) => {
                tracing::error!(%err, "snapshot does not load; the last good rules stay in force");
                continue;
            }
        };
        let next = Compiler::new(cluster, &args.node);
        dump::report(&next);
        if sync(&mut writer, installed.as_ref(), &next) {
            installed = Some(next);
        } else {
            // Try again at the next tick even if the snapshot stays the same.
            seen = None;
        }
    }
    tracing::info!("stopping; the rules stay in the kernel");
    Ok(())
}

/// How often the agent checks that its table is still in the kernel.
const TABLE_CHECK: Duration = Duration::from_secs(1);

/// Puts the installed table back when someone removed it (`nft flush ruleset`).
fn restore_if_removed(writer: &mut Writer, installed: Option<&Compiler>) {
    let Some(installed) = installed else {
        return;
    };
    match writer.table_exists(TABLE_NAME) {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                "table inet {TABLE_NAME} was removed behind the agent's back; restoring it"
            );
            sync(writer, None, installed);
        }
        Err(err) => tracing::error!(%err, "cannot check that table inet {TABLE_NAME} is in place"),
    }
}

/// Writes `next` over what `installed` put in the kernel; whether the kernel now holds `next`.
fn sync(writer: &mut Writer, installed: Option<&Compiler>, next: &Compiler) -> bool {
    let started = Instant::now();
    let attempt = match installed {
        None => writer
            .replace_table(next.table())
            .map(|sent| ("full", sent)),
        Some(prev) => {
            let delta = diff(prev.table(), next.table());
            if delta.is_empty() {
                tracing::info!("snapshot changed; the ruleset did not");
                return true;
            }
            writer
                .apply_delta(TABLE_NAME, &delta)
                .map(|sent| ("delta", sent))
        }
    };
    let result = match attempt {
        Ok(done) => Ok(done),
        Err(err) => {
            tracing::error!(%err, "sync failed; retrying as a full replace");
            writer
                .replace_table(next.table())
                .map(|sent| ("full", sent))
        }
    };
    match result {
        Ok((kind, sent)) => {
            tracing::info!(
                kind,
                messages = sent.messages,
                micros = started.elapsed().as_micros() as u64,
                "synced"
            );
            true
        }
        Err(err) => {
            tracing::error!(%err, "sync failed; the kernel keeps its previous rules");
            false
        }
    }
}
