//! `agent run`: the reconcile loop over a snapshot source.
//!
//! ```text
//! snapshot changed? -> load -> Compiler (node) --------------------------\
//! every second: veth discovery -> guard (bridge table) -------------------+-> diff against
//!                                                                          what is installed
//!                                                                          -> one transaction
//! every second: nf_tables generation moved? -> fingerprint our tables -> restore if changed
//! ```
//! The first sync replaces any tables of ours in one transaction; later ones write the delta.
//! A sync that fails is retried as a full replace; a snapshot that does not load changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use ruleset::guard::{guard_table, GuardedPod};
use ruleset::ir::{IfName, Table, TableFamily, TABLE_NAME};
use ruleset::{diff, Compiler, Options};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::RunArgs;
use crate::netlink::{Change, WriteError, Writer};
use crate::{dump, manifests, node, veth};

pub async fn run(args: &RunArgs) -> anyhow::Result<()> {
    node::check_privileges()?;
    node::enable_bridge_netfilter();
    let mut writer = Writer::new().context("opening the nf_tables netlink socket")?;
    if node::check_nf_tables(&mut writer)? {
        tracing::info!(
            "table inet {TABLE_NAME} is in place from an earlier run; the first sync replaces it"
        );
    }
    let options = Options {
        isolate_unprogrammed: args.isolate_unprogrammed.clone(),
    };
    if !options.isolate_unprogrammed.is_empty() {
        tracing::info!(
            cidrs = ?options.isolate_unprogrammed,
            "addresses in these CIDRs stay isolated until a known pod holds them"
        );
    }
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut ticker = tokio::time::interval(Duration::from_millis(args.poll_ms.max(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut seen: Option<manifests::Fingerprint> = None;
    let mut installed: Option<Installed> = None;
    let mut guards = Guards::default();
    let mut last_check = Instant::now();
    let mut unreadable_reported = false;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = ticker.tick() => {}
        }
        if last_check.elapsed() >= CHECK_EVERY {
            last_check = Instant::now();
            if let Some(current) = installed.as_mut() {
                follow_veths(&mut writer, current, &mut guards);
                restore_if_changed(&mut writer, current);
            }
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
        let compiler = Compiler::with_options(cluster, &args.node, options.clone());
        dump::report(&compiler);
        let guard = guards.table(&compiler);
        match sync(&mut writer, installed.as_ref(), &compiler, &guard) {
            Synced::Written(baseline) => {
                installed = Some(Installed {
                    compiler,
                    guard,
                    baseline,
                })
            }
            Synced::Unchanged => {
                let baseline = installed.and_then(|i| i.baseline);
                installed = Some(Installed {
                    compiler,
                    guard,
                    baseline,
                });
            }
            // Try again at the next tick even if the snapshot stays the same.
            Synced::Failed => seen = None,
        }
    }
    tracing::info!("stopping; the rules stay in the kernel");
    Ok(())
}

/// How often the agent looks for new veths and checks that its tables are as it left them.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the agent last put in the kernel.
struct Installed {
    compiler: Compiler,
    guard: Table,
    /// The generation and our tables' fingerprints right after that; `None` when reading them
    /// back failed, which makes the next check restore the tables.
    baseline: Option<Baseline>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Baseline {
    generation: u32,
    inet: Option<u64>,
    bridge: Option<u64>,
}

fn read_baseline(writer: &mut Writer) -> Result<Baseline, WriteError> {
    Ok(Baseline {
        generation: writer.generation()?,
        inet: writer.table_fingerprint(TableFamily::Inet, TABLE_NAME)?,
        bridge: writer.table_fingerprint(TableFamily::Bridge, TABLE_NAME)?,
    })
}

/// The anti-spoofing side: which local pod sends from which veth, found in the kernel.
#[derive(Default)]
struct Guards {
    /// Pods already warned about, so a missing veth is reported once, not every second.
    warned: BTreeSet<String>,
    /// Whether the last discovery failed (reported once per failing stretch).
    failing: bool,
}

impl Guards {
    /// The guard table for the local pods of `compiler`, as the kernel's veths show them now.
    fn table(&mut self, compiler: &Compiler) -> Table {
        let discovery = match veth::discover() {
            Ok(discovery) => {
                self.failing = false;
                Some(discovery)
            }
            Err(err) => {
                if !self.failing {
                    tracing::warn!(%err, "cannot list veths; pods are enforced by address only");
                }
                self.failing = true;
                None
            }
        };
        // Every address each veth carries, those claimed by two veths included.
        let mut carried: BTreeMap<&str, BTreeSet<IpAddr>> = BTreeMap::new();
        if let Some(d) = &discovery {
            for v in d.veths() {
                carried.entry(&v.name).or_default().extend(&v.addresses);
            }
            for (ip, names) in d.conflicts() {
                for name in names {
                    carried.entry(name).or_default().insert(*ip);
                }
            }
        }
        let owner: BTreeMap<IpAddr, String> = compiler
            .local_pods()
            .flat_map(|p| {
                p.ips
                    .iter()
                    .map(move |ip| (*ip, format!("{}/{}", p.namespace, p.name)))
            })
            .collect();
        // A veth belongs to the pod whose addresses it alone carries. An address on two veths
        // (a pod that took a neighbour's address too) proves nothing by itself: it goes to the
        // veth no other pod owns.
        let mut veth_owner: BTreeMap<&str, &str> = BTreeMap::new();
        if let Some(d) = &discovery {
            for v in d.veths() {
                let owners: BTreeSet<&str> = v
                    .addresses
                    .iter()
                    .filter_map(|ip| owner.get(ip).map(String::as_str))
                    .collect();
                if let [only] = owners.into_iter().collect::<Vec<_>>().as_slice() {
                    veth_owner.insert(&v.name, only);
                }
            }
        }
        let mut pods = Vec::new();
        let mut missing = BTreeSet::new();
        for pod in compiler.local_pods() {
            let id = format!("{}/{}", pod.namespace, pod.name);
            let owned: Vec<&str> = veth_owner
                .iter()
                .filter(|(_, o)| **o == id)
                .map(|(name, _)| *name)
                .collect();
            let candidates: Vec<&str> = if owned.is_empty() {
                carried
                    .iter()
                    .filter(|(name, ips)| {
                        !veth_owner.contains_key(*name) && pod.ips.iter().any(|ip| ips.contains(ip))
                    })
                    .map(|(name, _)| *name)
                    .collect()
            } else {
                owned
            };
            let found = match candidates.as_slice() {
                [name] => IfName::new(name),
                _ => None,
            };
            match found {
                Some(veth) => {
                    if self.warned.remove(&id) {
                        tracing::info!(pod = %id, %veth, "veth found; anti-spoofing on");
                    }
                    pods.push(GuardedPod {
                        veth,
                        ips: pod.ips.clone(),
                    });
                }
                None => {
                    missing.insert(id);
                }
            }
        }
        for id in &missing {
            if self.warned.insert(id.clone()) {
                tracing::warn!(
                    pod = %id,
                    "no veth carries this pod's addresses; it is enforced by address, without anti-spoofing"
                );
            }
        }
        self.warned.retain(|id| missing.contains(id));
        guard_table(compiler.node(), &pods)
    }
}

/// Brings the guard table in step with the veths in the kernel (pods come and go between
/// snapshot changes, and a veth appears only once the pod's sandbox is up).
fn follow_veths(writer: &mut Writer, installed: &mut Installed, guards: &mut Guards) {
    let guard = guards.table(&installed.compiler);
    let delta = diff(&installed.guard, &guard);
    if delta.is_empty() {
        return;
    }
    let change = Change::Delta {
        family: TableFamily::Bridge,
        table: TABLE_NAME,
        delta: &delta,
    };
    match writer.commit(&[change]) {
        Ok(sent) => {
            tracing::info!(
                kind = "veths",
                messages = sent.messages,
                guarded = guard.sets.get("veths").map_or(0, |s| s.elements.len()),
                "synced"
            );
            installed.guard = guard;
            installed.baseline = read_baseline(writer).ok();
        }
        Err(err) => tracing::error!(%err, "updating the anti-spoofing table failed; retrying"),
    }
}

/// Puts our tables back when anyone else changed or removed them (`nft flush ruleset`, a
/// stray `nft delete element`). The generation moves with every transaction in the
/// namespace; only when it moved are our tables read back and compared.
fn restore_if_changed(writer: &mut Writer, installed: &mut Installed) {
    let generation = match writer.generation() {
        Ok(generation) => generation,
        Err(err) => {
            tracing::error!(%err, "cannot read the nf_tables generation");
            return;
        }
    };
    if installed
        .baseline
        .is_some_and(|b| b.generation == generation)
    {
        return;
    }
    let now = match read_baseline(writer) {
        Ok(now) => now,
        Err(err) => {
            tracing::error!(%err, "cannot read our tables back");
            return;
        }
    };
    if let Some(baseline) = installed.baseline.as_mut() {
        if (baseline.inet, baseline.bridge) == (now.inet, now.bridge) {
            // Another table changed; ours are as we left them.
            baseline.generation = now.generation;
            return;
        }
    }
    for (family, was, is) in [
        ("inet", installed.baseline.and_then(|b| b.inet), now.inet),
        (
            "bridge",
            installed.baseline.and_then(|b| b.bridge),
            now.bridge,
        ),
    ] {
        match is {
            None => tracing::warn!(
                "table {family} {TABLE_NAME} was removed behind the agent's back; restoring it"
            ),
            Some(_) if was != is => tracing::warn!(
                "table {family} {TABLE_NAME} was changed behind the agent's back; restoring it"
            ),
            Some(_) => {}
        }
    }
    if let Synced::Written(baseline) = sync(writer, None, &installed.compiler, &installed.guard) {
        installed.baseline = baseline;
    }
}

/// What a sync did.
enum Synced {
    /// The kernel holds the new tables; the baseline read right after, if it could be read.
    Written(Option<Baseline>),
    /// Nothing to write: the tables are the same.
    Unchanged,
    /// The kernel keeps its previous rules.
    Failed,
}

/// Writes `compiler`'s table and `guard` over what `installed` put in the kernel (everything,
/// when `None`), in one transaction.
fn sync(
    writer: &mut Writer,
    installed: Option<&Installed>,
    compiler: &Compiler,
    guard: &Table,
) -> Synced {
    let started = Instant::now();
    let full = [Change::Replace(compiler.table()), Change::Replace(guard)];
    let attempt = match installed {
        None => writer.commit(&full).map(|sent| ("full", sent)),
        Some(prev) => {
            let policy = diff(prev.compiler.table(), compiler.table());
            let spoof = diff(&prev.guard, guard);
            if policy.is_empty() && spoof.is_empty() {
                tracing::info!("snapshot changed; the ruleset did not");
                return Synced::Unchanged;
            }
            let changes: Vec<Change> =
                [(TableFamily::Inet, &policy), (TableFamily::Bridge, &spoof)]
                    .into_iter()
                    .filter(|(_, delta)| !delta.is_empty())
                    .map(|(family, delta)| Change::Delta {
                        family,
                        table: TABLE_NAME,
                        delta,
                    })
                    .collect();
            writer.commit(&changes).map(|sent| ("delta", sent))
        }
    };
    let result = match attempt {
        Ok(done) => Ok(done),
        Err(err) => {
            tracing::error!(%err, "sync failed; retrying as a full replace");
            writer.commit(&full).map(|sent| ("full", sent))
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
            match read_baseline(writer) {
                Ok(baseline) => Synced::Written(Some(baseline)),
                Err(err) => {
                    tracing::error!(%err, "cannot read our tables back after the sync");
                    Synced::Written(None)
                }
            }
        }
        Err(err) => {
            tracing::error!(%err, "sync failed; the kernel keeps its previous rules");
            Synced::Failed
        }
    }
}
