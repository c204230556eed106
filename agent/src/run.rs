//! `agent run`: the reconcile loop, over the Kubernetes API or a snapshot file.
//!
//! ```text
//! API watches -> Update -> Batch (coalesced a few ms) -> Compiler (incremental) -\
//! or: snapshot changed? -> load -> Compiler (from scratch) -----------------------+
//! every second: veth discovery -> guard (bridge table) ----------------------------+-> diff
//!     against what is installed -> one transaction for both tables -> Health, sd_notify
//!     (a policy change: the next ruleset epoch, cleared from conntrack marks first; after a
//!     whole table: fast path on once conntrack holds no epoch, see `ruleset::epoch`)
//!     (a change that brings, takes or moves no local pod: the last second's guard, with the
//!     pods' egress isolation worked out again; no discovery on the way to the transaction)
//! every second, and before every delta: nf_tables generation moved? -> notifications show
//!     only other tables' transactions? done; else fingerprint our tables -> restore (whole
//!     tables) if changed
//! after a change: Findings (unenforceable fields) -> logged once; from the API, every second:
//!     those this node reports -> Recorder (queue, never waits) -> Kubernetes Events
//! ```
//! Nothing is written before the first complete state (all three lists, or a snapshot that
//! loads). The first sync replaces any tables of ours in one transaction; later ones write the
//! delta. A failed sync is retried as a full replace, with backoff; until one lands the kernel
//! keeps its previous rules (fail static).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use ruleset::epoch::{self, Epoch};
use ruleset::guard::{guard_table, veths_delta, with_veths, Guard, INPUT_VETHS};
use ruleset::ir::{Mac, Set, Table, TableFamily, TABLE_NAME};
use ruleset::{diff, Compiler, Delta, Options};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::cli::RunArgs;
use crate::conntrack::{self, Which};
use crate::events::{Findings, Recorder};
use crate::health::{self, Checked, Health, KernelCounts, SyncKind};
use crate::kube_source::{self, Batch, Mirror, Source, Update};
use crate::links::LinkWatch;
use crate::netlink::{Change, Monitor, Named, Sent, TableImage, WriteError, Writer};
use crate::notify::Notifier;
use crate::{dump, manifests, node, veth};

/// How often the agent looks for new veths, checks that its tables are as it left them and
/// tells systemd it is alive.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A watchdog ping may go this much early, so that a tick's jitter never stretches the
/// interval between two pings past half the timeout.
const PING_SLACK: Duration = Duration::from_millis(20);
/// How long a burst of API events is gathered into one transaction. A lone change waits this
/// long at most; a deploy of 1,000 pods becomes a handful of transactions, not 1,000.
const COALESCE: Duration = Duration::from_millis(10);
/// Longest wait between retries of a failed sync.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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
        epoch: Epoch::first(args.ct_mark_bits),
    };
    if args.ct_mark_bits.is_off() {
        tracing::info!("established-connection fast path off: every packet is evaluated");
    } else {
        tracing::info!(
            bits = format!("{:#010x}", args.ct_mark_bits.mask()),
            "established connections skip evaluation until the next change; ruleset epoch in these ct mark bits"
        );
    }
    if !options.isolate_unprogrammed.is_empty() {
        tracing::info!(
            cidrs = ?options.isolate_unprogrammed,
            "addresses in these CIDRs stay isolated until a known pod holds them"
        );
    }
    let health = Health::new(CHECK_EVERY * 10);
    serve_health(args, &health)?;
    let signals = Signals {
        terminate: signal(SignalKind::terminate())?,
        interrupt: signal(SignalKind::interrupt())?,
    };
    // Without it the agent reads its tables back after every other table's transaction.
    let monitor = match Monitor::new(writer.port()) {
        Ok(monitor) => Some(monitor),
        Err(err) => {
            tracing::warn!(%err, "cannot subscribe to nf_tables notifications; our tables are read back after every other transaction");
            None
        }
    };
    let mut kernel = Kernel {
        writer,
        monitor,
        installed: None,
        guards: Guards::with_state(&args.state_dir),
        health,
        notifier: Notifier::from_env(),
        last_check: Instant::now(),
        last_ping: Instant::now(),
        ready: false,
        retry: None,
        epoch: options.epoch,
        fresh: Fresh::default(),
        replaced_unknown: false,
    };
    // Without it a new veth is listed at the next check, within a second.
    let links = match LinkWatch::new() {
        Ok(links) => Some(links),
        Err(err) => {
            tracing::warn!(%err, "cannot subscribe to link reports; new veths are looked for once a second");
            None
        }
    };
    kernel.health.set_link_reports(links.is_some());
    let result = match &args.manifests {
        Some(path) => from_snapshot(args, path, &options, &mut kernel, signals, links).await,
        None => from_api(args, &options, &mut kernel, signals, links).await,
    };
    if let Err(err) = kernel.notifier.stopping() {
        tracing::warn!(%err, "sd_notify STOPPING");
    }
    tracing::info!("stopping; the rules stay in the kernel");
    result
}

/// The health endpoint runs on a thread of its own, so that it answers while a long sync
/// (the first one of a big cluster) holds the reconcile loop.
fn serve_health(args: &RunArgs, health: &Health) -> anyhow::Result<()> {
    let (bound, outcome) = std::sync::mpsc::channel();
    let (addr, health) = (args.health_addr, health.clone());
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = bound.send(Err(anyhow::Error::from(err)));
                    return;
                }
            };
            runtime.block_on(async move {
                match health::bind(addr).await {
                    Ok(endpoint) => {
                        let _ = bound.send(Ok(endpoint.local_addr()));
                        endpoint.serve(health).await;
                    }
                    Err(err) => {
                        let _ = bound.send(Err(err.into()));
                    }
                }
            });
        })?;
    let address = outcome
        .recv()
        .context("the health endpoint's thread ended before binding")??;
    tracing::info!(%address, "serving /healthz, /readyz and /metrics");
    Ok(())
}

struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    async fn any(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Returns when [`LinkWatch`] reports a veth changed; never without one (or once it failed).
async fn veth_change(links: &mut Option<LinkWatch>, health: &Health) {
    if let Some(watch) = links {
        match watch.changed().await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(%err, "link reports failed; new veths are looked for once a second");
                health.set_link_reports(false);
                *links = None;
            }
        }
    }
    std::future::pending().await
}

/// The snapshot source: polls the file or directory and compiles every new version whole.
async fn from_snapshot(
    args: &RunArgs,
    path: &std::path::Path,
    options: &Options,
    kernel: &mut Kernel,
    mut signals: Signals,
    mut links: Option<LinkWatch>,
) -> anyhow::Result<()> {
    let mut ticker =
        tokio::time::interval(kernel.tick_period(Duration::from_millis(args.poll_ms.max(10))));
    let health = kernel.health.clone();
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<manifests::Fingerprint> = None;
    let mut compiler: Option<Compiler> = None;
    let mut findings = Findings::default();
    let mut unreadable_reported = false;
    loop {
        tokio::select! {
            () = signals.any() => return Ok(()),
            () = veth_change(&mut links, &health) => {
                kernel.veths_changed(compiler.as_ref());
                continue;
            }
            _ = ticker.tick() => {}
        }
        kernel.tick(compiler.as_ref());
        let stamp = match manifests::fingerprint(path) {
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
        let cluster = match manifests::load(path) {
            Ok(cluster) => cluster,
            Err(err) => {
                tracing::error!(%err, "snapshot does not load; the last good rules stay in force");
                continue;
            }
        };
        let next = Compiler::with_options(cluster, &args.node, options.clone());
        dump::summary(&next);
        findings.update(&next);
        kernel.health.set_unenforceable(findings.len());
        kernel.count_objects(&next);
        match kernel.sync(&next, false) {
            Synced::Written | Synced::Unchanged => {}
            // Try again at the next tick even if the snapshot stays the same.
            Synced::Failed => seen = None,
        }
        compiler = Some(next);
    }
}

/// The Kubernetes API source: three watches; the first sync once all three lists are in, then
/// incremental batches.
async fn from_api(
    args: &RunArgs,
    options: &Options,
    kernel: &mut Kernel,
    mut signals: Signals,
    mut links: Option<LinkWatch>,
) -> anyhow::Result<()> {
    let client = kube_source::client(args.kubeconfig.as_deref()).await?;
    let mut source = Source::start(client.clone());
    let mut recorder = Recorder::start(client, &args.node, kernel.health.clone());
    let mut findings = Findings::default();
    let mut ticker = tokio::time::interval(kernel.tick_period(CHECK_EVERY));
    let health = kernel.health.clone();
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut mirror = Mirror::new();
    let started = Instant::now();
    tracing::info!(
        "listing pods, namespaces and network policies; nothing is written until all three are in"
    );
    while !mirror.ready() {
        tokio::select! {
            () = signals.any() => return Ok(()),
            _ = ticker.tick() => kernel.tick(None),
            update = source.recv() => match update {
                Some(update) => {
                    log_interruption(&update);
                    mirror.apply(update);
                }
                None => anyhow::bail!("the watches stopped before the first list completed"),
            },
        }
    }
    let mut compiler = Compiler::with_options(mirror.into_cluster(), &args.node, options.clone());
    tracing::info!(
        millis = started.elapsed().as_millis() as u64,
        "initial lists complete"
    );
    dump::summary(&compiler);
    findings.update(&compiler);
    kernel.health.set_unenforceable(findings.len());
    kernel.count_objects(&compiler);
    kernel.sync(&compiler, false);
    recorder.record(findings.due(&compiler));

    loop {
        let first = tokio::select! {
            () = signals.any() => return Ok(()),
            () = veth_change(&mut links, &health) => {
                kernel.veths_changed(Some(&compiler));
                continue;
            }
            _ = ticker.tick() => {
                kernel.tick(Some(&compiler));
                recorder.record(findings.due(&compiler));
                continue;
            }
            update = source.recv() => match update {
                Some(update) => update,
                None => anyhow::bail!("the watches stopped"),
            },
        };
        let mut batch = Batch::new();
        log_interruption(&first);
        batch.push(first, compiler.cluster());
        let deadline = tokio::time::Instant::now() + COALESCE;
        while let Ok(Some(update)) = tokio::time::timeout_at(deadline, source.recv()).await {
            log_interruption(&update);
            batch.push(update, compiler.cluster());
        }
        let objects = batch.len();
        let policy_or_namespace = !batch.pods_only();
        let pod_namespaces = batch.pod_namespaces();
        let started = Instant::now();
        batch.apply(&mut compiler);
        if policy_or_namespace {
            dump::summary(&compiler);
            findings.update(&compiler);
            kernel.health.set_unenforceable(findings.len());
        } else {
            findings.pods_changed(pod_namespaces);
        }
        kernel.count_objects(&compiler);
        tracing::debug!(
            objects,
            micros = started.elapsed().as_micros() as u64,
            "applied a batch of changes"
        );
        kernel.sync(&compiler, false);
    }
}

fn log_interruption(update: &Update) {
    if let Update::Interrupted { kind, error } = update {
        tracing::warn!(?kind, %error, "watch interrupted; reconnecting, the rules stay as they are");
    }
}

/// What the agent put in the kernel, and the ways it tells people.
struct Kernel {
    writer: Writer,
    /// nf_tables' notifications: when they show that the transactions since our tables were
    /// last known as left touched only other tables, the tables need not be read back.
    monitor: Option<Monitor>,
    installed: Option<Installed>,
    guards: Guards,
    health: Health,
    notifier: Notifier,
    last_check: Instant,
    /// When systemd last heard WATCHDOG=1.
    last_ping: Instant,
    /// Whether a sync has landed since start-up (readiness).
    ready: bool,
    /// After a failed sync: when to try again, and the wait after that.
    retry: Option<(Instant, Duration)>,
    /// The ruleset epoch of the installed table.
    epoch: Epoch,
    /// The epoch values after `epoch` known to be in no connection's mark ([`Fresh`]). The
    /// walk of conntrack that frees them takes 10 ms and more whatever the number of
    /// connections (ctnetlink visits every bucket of the host's table), so it is done after a
    /// sync rather than between a change and its transaction, and once for many changes.
    fresh: Fresh,
    /// The last transaction of ours wrote the tables whole over rules whose epoch the agent
    /// does not know: a previous run's, or rules changed behind its back. A packet those rules
    /// were evaluating as it returned may stamp their value after a walk of conntrack, and that
    /// value may be the installed one; so no value is trusted until another transaction of
    /// ours has gone by ([`IN_FLIGHT`]).
    replaced_unknown: bool,
}

/// Epoch values before the installed one that a walk of conntrack does not count as freed: a
/// packet still evaluated by the previous ruleset as the transaction replacing it returned may
/// stamp that ruleset's value after the walk. Packets of the ruleset before that one finished
/// a whole sync earlier (the assumption clearing one value ahead always made: with a two-bit
/// mask, that value was in force two changes before).
const IN_FLIGHT: u32 = 1;

/// How many epoch values after the installed one no connection's mark holds. A walk of
/// conntrack that clears every value but the installed one and the [`IN_FLIGHT`] before it
/// frees the rest at once; each change of the policy table then takes the next value without
/// a walk of its own until they are used up. Nothing stamps a value ahead of the installed
/// one: only the rules in force stamp, with theirs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Fresh {
    ahead: u32,
}

impl Fresh {
    /// After a walk that cleared every value but the installed one and the [`IN_FLIGHT`]
    /// before it, of `values` in all.
    fn after_walk(values: u32) -> Fresh {
        Fresh {
            ahead: values.saturating_sub(1 + IN_FLIGHT),
        }
    }

    /// Takes the value after the installed one if it is free.
    fn take(&mut self) -> bool {
        let free = self.ahead > 0;
        self.ahead = self.ahead.saturating_sub(1);
        free
    }
}

/// The marks a walk after installing `epoch` leaves alone: its value and the [`IN_FLIGHT`]
/// before it.
fn recent_marks(epoch: Epoch) -> [u32; 1 + IN_FLIGHT as usize] {
    let values = epoch.bits().max_epoch();
    let shift = epoch.bits().mask().trailing_zeros();
    // `values` is three or more (two bits at least), more than `IN_FLIGHT` steps back.
    std::array::from_fn(|back| {
        let value = (epoch.value() - 1 + values - back as u32) % values + 1;
        value << shift
    })
}

/// What the agent last put in the kernel.
struct Installed {
    policy: Table,
    guard: Table,
    /// The generation and our tables' fingerprints right after that; `None` when reading them
    /// back failed, which makes the next check restore the tables.
    baseline: Option<Baseline>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Baseline {
    generation: u32,
    inet: Option<TableImage>,
    bridge: Option<TableImage>,
}

/// Our tables as read back, at the generation reached when they were read. Nothing is known
/// ([`WriteError::Moved`]) when a transaction that might have changed them came while they
/// were read, or, after a checked commit, after `expected`, the generation that commit left
/// (the images would take its change for ours): any transaction at all without a `monitor`,
/// with one any it does not vouch for ([`Monitor::untouched`]).
///
/// `after`: the commit was a delta checked at the generation of `previous`, whose images then
/// still held, and `changes` were its changes: a set none of them names is as in `previous`,
/// and its elements are not read again ([`Writer::table_image`]).
fn read_baseline(
    writer: &mut Writer,
    monitor: Option<&mut Monitor>,
    expected: Option<u32>,
    after: Option<(&Baseline, &[Change<'_>])>,
) -> Result<Baseline, WriteError> {
    let before = writer.generation()?;
    let mut image = |family: TableFamily, previous: Option<&TableImage>| {
        let touched = after.map(|(_, changes)| Touched::by(changes, family));
        match (previous, touched) {
            (Some(previous), Some(Touched::Named(named))) => {
                writer.table_image(family, TABLE_NAME, Some((previous, &named)))
            }
            _ => writer.table_image(family, TABLE_NAME, None),
        }
    };
    let previous = after.map(|(b, _)| b);
    let inet = image(TableFamily::Inet, previous.and_then(|b| b.inet.as_ref()))?;
    let bridge = image(
        TableFamily::Bridge,
        previous.and_then(|b| b.bridge.as_ref()),
    )?;
    let generation = writer.generation()?;
    let known = match (expected, monitor) {
        (Some(ours), _) if ours == generation => true,
        (None, _) if before == generation => true,
        (Some(ours), Some(monitor)) => monitor.untouched_after_own(ours, generation),
        (None, Some(monitor)) => monitor.untouched(before, generation),
        (_, None) => false,
    };
    if !known {
        return Err(WriteError::Moved);
    }
    Ok(Baseline {
        generation,
        inet,
        bridge,
    })
}

/// What a batch of changes did to one of our tables.
enum Touched<'a> {
    /// Wrote it whole.
    Whole,
    /// Changed at most these sets (and maps) and chains.
    Named(Named<'a>),
}

impl<'a> Touched<'a> {
    fn by(changes: &'a [Change<'a>], family: TableFamily) -> Touched<'a> {
        let mut named = Named::default();
        for change in changes {
            match *change {
                Change::Replace(table) if table.family == family => return Touched::Whole,
                Change::Delta {
                    family: f, delta, ..
                } if f == family => named.add(delta),
                _ => {}
            }
        }
        Touched::Named(named)
    }
}

/// The generation a batch checked at `generation` leaves: the next one (the kernel counts up
/// and skips 0), or the same when the batch was empty and so not sent.
fn generation_after(generation: u32, sent: Sent) -> u32 {
    if sent.messages == 0 {
        generation
    } else {
        generation.wrapping_add(1).max(1)
    }
}

/// A delta that was not sent because our tables are not as the agent left them, or were never
/// read back: the next check writes them whole, and the delta's work follows from there.
fn waits_for_restore(err: &WriteError) -> bool {
    err.is_stale() || matches!(err, WriteError::Moved)
}

/// How often the loop ticks: `wanted`, or every `watchdog` interval (half systemd's timeout)
/// when that is shorter, so a `WatchdogSec=` under two seconds is still honoured; never more
/// often than every 10 ms.
fn tick_period(wanted: Duration, watchdog: Option<Duration>) -> Duration {
    watchdog
        .map_or(wanted, |interval| wanted.min(interval))
        .max(Duration::from_millis(10))
}

/// What a sync did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Synced {
    Written,
    /// Nothing to write: the tables are the same.
    Unchanged,
    /// The kernel keeps its previous rules.
    Failed,
}

impl Kernel {
    /// How often to call [`Kernel::tick`]: see [`tick_period`].
    fn tick_period(&self, wanted: Duration) -> Duration {
        tick_period(wanted, self.notifier.watchdog_interval())
    }

    /// The once-a-tick work: liveness, a due retry, the systemd watchdog when due, and every
    /// second the veths and the tables' integrity.
    fn tick(&mut self, compiler: Option<&Compiler>) {
        self.health.beat();
        if let (Some(compiler), Some((at, _))) = (compiler, self.retry) {
            if Instant::now() >= at {
                self.sync(compiler, true);
            }
        }
        if let Some(interval) = self.notifier.watchdog_interval() {
            if self.last_ping.elapsed() >= interval.saturating_sub(PING_SLACK) {
                self.last_ping = Instant::now();
                if let Err(err) = self.notifier.watchdog() {
                    tracing::warn!(%err, "sd_notify WATCHDOG");
                }
            }
        }
        if self.last_check.elapsed() < CHECK_EVERY {
            return;
        }
        self.last_check = Instant::now();
        if let Some(compiler) = compiler {
            if self.installed.is_some() && self.retry.is_none() {
                // First: the two after it write deltas against what the agent installed, and
                // not while a repair waits to be retried (their read-back would take the
                // change for the agent's own).
                self.restore_if_changed(compiler);
                if self.retry.is_some() {
                    return;
                }
                self.enable_fast_path();
                self.follow_veths(compiler, "check");
            }
        }
    }

    /// A veth appeared, went or joined a bridge ([`LinkWatch`]): follows the veths now rather
    /// than at the next check, unless a repair is due (the check does that first).
    fn veths_changed(&mut self, compiler: Option<&Compiler>) {
        if let Some(compiler) = compiler {
            if self.installed.is_some() && self.retry.is_none() {
                self.follow_veths(compiler, "link report");
            }
        }
    }

    fn count_objects(&self, compiler: &Compiler) {
        let cluster = compiler.cluster();
        self.health.set_objects("pods", cluster.pod_count());
        self.health
            .set_objects("namespaces", cluster.namespace_count());
        self.health
            .set_objects("networkpolicies", cluster.policy_count());
        self.health.set_local_pods(compiler.local_pods().count());
    }

    /// Writes `compiler`'s table and the guard for its pods over what is installed, in one
    /// transaction: the delta, or both tables whole when nothing is installed yet, when
    /// `full`, or when the delta fails.
    fn sync(&mut self, compiler: &Compiler, full: bool) -> Synced {
        // A delta is worked out against what the agent installed: if the kernel no longer
        // holds that, the tables go whole. Otherwise the change behind our back would stay,
        // and the fingerprint read after this transaction would take it as ours.
        // (A read-back that another transaction overlapped says nothing; one more look.)
        let asked_full = full;
        let full = full
            || (self.installed.is_some()
                && self.tables_as_left().or_else(|| self.tables_as_left()) != Some(true));
        let found = if asked_full {
            self.guards.guard(compiler)
        } else {
            self.guards.for_change(compiler)
        };
        let guard = guard_table(compiler.node(), &found);
        let started = Instant::now();
        let mut policy = with_veths(compiler.table(), &found);
        // A change of the policy table moves to the next epoch, so no connection skips the
        // new rules; a whole table (start-up, or one changed behind our back) comes without
        // the fast path, which `enable_fast_path` turns on once conntrack holds no old epoch.
        // (Equality, not a diff: the delta is worked out once, below, for the epoch it carries.)
        let changed = match self.installed.as_ref().filter(|_| !full) {
            None => None,
            Some(prev) => {
                epoch::apply(&mut policy, self.epoch);
                Some((policy_changed(&prev.policy, &policy), prev.guard != guard))
            }
        };
        let mut next = match changed {
            // A whole table (start-up, a restore): no value is known free until
            // `enable_fast_path` clears them all.
            None => {
                self.fresh = Fresh::default();
                self.epoch.next().without_fast_path()
            }
            Some((false, false)) => {
                tracing::info!("the cluster changed; this node's ruleset did not");
                return Synced::Unchanged;
            }
            Some((false, true)) => self.epoch,
            Some((true, _)) => self.free_next_epoch(),
        };
        epoch::apply(&mut policy, next);
        let policy = &policy;
        let whole = [Change::Replace(policy), Change::Replace(&guard)];
        let delta_pair = self
            .installed
            .as_ref()
            .filter(|_| !full)
            .map(|prev| (diff(&prev.policy, policy), diff(&prev.guard, &guard)));
        let changes = delta_pair
            .as_ref()
            .map(|(policy_delta, guard_delta)| deltas(policy_delta, guard_delta));
        let (kind, attempt) = match &changes {
            None => (SyncKind::Full, self.commit_whole(&whole)),
            Some(changes) => (SyncKind::Delta, self.commit_delta(changes)),
        };
        self.health
            .record_sync(kind, started.elapsed(), attempt.is_ok());
        let mut fallback = None;
        let (kind, result) = match attempt {
            Ok(sent) => (kind, Ok(sent)),
            Err(err) if kind == SyncKind::Delta => {
                if err.is_stale() {
                    tracing::info!(
                        "our tables changed while the delta was prepared; writing them whole"
                    );
                } else {
                    tracing::error!(%err, "sync failed; retrying as a full replace");
                }
                // Like any whole table, without the fast path: what it replaces may not be
                // what the agent installed.
                next = next.without_fast_path();
                self.fresh = Fresh::default();
                let mut off = policy.clone();
                epoch::apply(&mut off, next);
                let off = &*fallback.insert(off);
                let again = Instant::now();
                let result = self.commit_whole(&[Change::Replace(off), Change::Replace(&guard)]);
                self.health
                    .record_sync(SyncKind::Full, again.elapsed(), result.is_ok());
                (SyncKind::Full, result)
            }
            Err(err) => (kind, Err(err)),
        };
        let policy = fallback.as_ref().unwrap_or(policy);
        match result {
            Ok((sent, expected)) => {
                tracing::info!(
                    kind = ?kind,
                    messages = sent.messages,
                    micros = started.elapsed().as_micros() as u64,
                    "synced"
                );
                let read = match (kind, &changes) {
                    (SyncKind::Delta, Some(changes)) => self.read_after_delta(expected, changes),
                    _ => read_baseline(&mut self.writer, self.monitor.as_mut(), expected, None),
                };
                let baseline = match read {
                    Ok(baseline) => Some(baseline),
                    Err(WriteError::Moved) => {
                        tracing::warn!("another transaction came right after the sync; the next check writes our tables whole");
                        None
                    }
                    Err(err) => {
                        tracing::error!(%err, "cannot read our tables back after the sync");
                        None
                    }
                };
                self.health.set_kernel(KernelCounts::of([policy, &guard]));
                self.installed = Some(Installed {
                    policy: policy.clone(),
                    guard,
                    baseline,
                });
                self.epoch = next;
                self.health.set_epoch(next);
                self.retry = None;
                self.enable_fast_path();
                self.clear_ahead();
                if !self.ready {
                    self.ready = true;
                    self.health.mark_ready();
                    if let Err(err) = self.notifier.ready() {
                        tracing::warn!(%err, "sd_notify READY");
                    }
                }
                Synced::Written
            }
            Err(err) => {
                let wait = self.retry.map_or(Duration::from_millis(200), |(_, w)| {
                    (w * 2).min(MAX_BACKOFF)
                });
                tracing::error!(%err, retry_in = ?wait, "sync failed; the kernel keeps its previous rules");
                self.retry = Some((Instant::now() + wait, wait));
                Synced::Failed
            }
        }
    }

    /// Our tables read back after the kernel took a delta of `changes` ([`read_baseline`]):
    /// the sets the delta did not name are as the last read found them.
    fn read_after_delta(
        &mut self,
        expected: Option<u32>,
        changes: &[Change<'_>],
    ) -> Result<Baseline, WriteError> {
        let previous = self.installed.as_ref().and_then(|i| i.baseline.as_ref());
        read_baseline(
            &mut self.writer,
            self.monitor.as_mut(),
            expected,
            previous.map(|b| (b, changes)),
        )
    }

    /// The epoch after the current one, in no connection's mark: free since the last walk
    /// ([`Fresh`]), or cleared first. Nothing stamps that value until the transaction
    /// installing it: the rules in force stamp the current one. When the clearing fails, the
    /// new epoch comes without the fast path.
    fn free_next_epoch(&mut self) -> Epoch {
        let next = self.epoch.next();
        if next.bits().is_off() {
            return next;
        }
        // No walk can free a value yet (and none is known free after a whole write);
        // `enable_fast_path` follows this transaction.
        if self.replaced_unknown {
            return next.without_fast_path();
        }
        if self.fresh.take() {
            return next;
        }
        match clear_epoch(next) {
            Ok(cleared) => {
                if cleared > 0 {
                    tracing::debug!(
                        cleared,
                        epoch = next.value(),
                        "epoch cleared from conntrack marks"
                    );
                }
                next
            }
            Err(err) => {
                tracing::warn!(%err, "cannot clear the next epoch from conntrack marks; fast path off until that works");
                next.without_fast_path()
            }
        }
    }

    /// When no value after the installed epoch is known free, walks conntrack once to free
    /// them all ([`Fresh`]); on failure the next change clears its value itself. Called after
    /// every sync.
    fn clear_ahead(&mut self) {
        let bits = self.epoch.bits();
        // Without the fast path, `enable_fast_path` clears them all anyway.
        if bits.is_off() || !self.epoch.fast_path() || self.fresh.ahead > 0 {
            return;
        }
        match conntrack::clear(bits.mask(), Which::AnyBut(recent_marks(self.epoch))) {
            Ok(cleared) => {
                self.fresh = Fresh::after_walk(bits.max_epoch());
                tracing::debug!(
                    cleared,
                    free = self.fresh.ahead,
                    "epochs cleared from conntrack marks ahead of the next changes"
                );
            }
            Err(err) => {
                tracing::debug!(%err, "cannot clear epochs ahead; the next change clears its own");
            }
        }
    }

    /// Turns the fast path on for the installed epoch once every connection's epoch bits are
    /// cleared: a mark left from an earlier run or an earlier cycle of epochs could otherwise
    /// carry it. Marks stamped meanwhile come from the rules in force, so they may stay
    /// trusted; the transaction replaces only the epoch's rules.
    fn enable_fast_path(&mut self) {
        if self.epoch.fast_path() || self.epoch.bits().is_off() {
            return;
        }
        // Without a baseline the deltas below would not be sent: no conntrack walk for nothing.
        let read_back = |kernel: &Self| {
            kernel
                .installed
                .as_ref()
                .is_some_and(|i| i.baseline.is_some())
        };
        if !read_back(self) {
            return;
        }
        // The rules the whole table replaced may still stamp their value, perhaps the installed
        // one, after the walk below: move to the next value first, still without the fast path.
        if self.replaced_unknown {
            if let Err(err) = self.commit_epoch(self.epoch.next().without_fast_path()) {
                self.fast_path_failed(&err);
                return;
            }
            if !read_back(self) {
                return;
            }
        }
        if let Err(err) = conntrack::clear(self.epoch.bits().mask(), Which::Any) {
            tracing::warn!(%err, "cannot clear epochs from conntrack marks; fast path off, retrying");
            return;
        }
        // Every epoch is clear now but for what the rules in force stamp, and the value of the
        // rules they replaced. None is known free until a walk after the transaction below.
        self.fresh = Fresh::default();
        let on = self.epoch.with_fast_path();
        match self.commit_epoch(on) {
            Ok(()) => {
                tracing::info!(epoch = on.value(), "established-connection fast path on");
                self.clear_ahead();
            }
            Err(err) => self.fast_path_failed(&err),
        }
    }

    fn fast_path_failed(&self, err: &WriteError) {
        if waits_for_restore(err) {
            // The next tick's check writes the tables whole; the fast path follows.
            tracing::info!("our tables changed; the fast path waits for them to be restored");
        } else {
            tracing::warn!(%err, "turning the fast path on failed; retrying");
        }
    }

    /// Puts `epoch`'s rules in the installed policy table, as a delta of its own.
    fn commit_epoch(&mut self, epoch: Epoch) -> Result<(), WriteError> {
        let Some(installed) = self.installed.as_ref() else {
            return Err(WriteError::Moved);
        };
        let mut policy = installed.policy.clone();
        epoch::apply(&mut policy, epoch);
        let delta = diff(&installed.policy, &policy);
        let changes = [Change::Delta {
            family: TableFamily::Inet,
            table: TABLE_NAME,
            delta: &delta,
        }];
        let (_, expected) = self.commit_delta(&changes)?;
        let baseline = self.read_after_delta(expected, &changes).ok();
        if let Some(installed) = self.installed.as_mut() {
            installed.policy = policy;
            installed.baseline = baseline;
        }
        self.epoch = epoch;
        self.health.set_epoch(epoch);
        Ok(())
    }

    /// Brings the guard table, and the veths the policy table's `input` drops from, in step
    /// with the veths in the kernel (pods come and go between changes, and a veth appears only
    /// once the pod's sandbox is up).
    fn follow_veths(&mut self, compiler: &Compiler, by: &str) {
        let Some(installed) = self.installed.as_ref() else {
            return;
        };
        let found = self.guards.guard(compiler);
        let guard = guard_table(compiler.node(), &found);
        let guard_delta = diff(&installed.guard, &guard);
        let veths = veths_delta(&installed.policy, &found);
        let changes = deltas(&veths, &guard_delta);
        if changes.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = self.commit_delta(&changes);
        self.health
            .record_sync(SyncKind::Veths, started.elapsed(), result.is_ok());
        match result {
            Ok((sent, expected)) => {
                tracing::info!(
                    kind = "veths",
                    by,
                    messages = sent.messages,
                    guarded = guard.sets.get("veths").map_or(0, |s| s.elements.len()),
                    "synced"
                );
                let baseline = self.read_after_delta(expected, &changes).ok();
                if let Some(installed) = self.installed.as_mut() {
                    installed.policy.apply(&veths);
                    installed.guard = guard;
                    installed.baseline = baseline;
                }
            }
            Err(err) if waits_for_restore(&err) => {
                tracing::info!("our tables changed; the veths follow once they are restored");
            }
            Err(err) => tracing::error!(%err, "updating the anti-spoofing table failed; retrying"),
        }
    }

    /// Commits `changes`, deltas worked out against what the agent installed, only while the
    /// kernel holds that: the batch names the generation at which the tables were last found
    /// as left, and the kernel refuses it if anything was committed since. Then the tables are
    /// looked at again: as left (another table changed), the delta is sent again; changed,
    /// the refusal is returned and the caller writes them whole, or waits for the check that
    /// will ([`WriteError::Moved`] when the tables were never read back, so nothing is sent).
    /// On success, also the generation the kernel should be at now, for [`read_baseline`].
    fn commit_delta(&mut self, changes: &[Change<'_>]) -> Result<(Sent, Option<u32>), WriteError> {
        let mut attempts = 0;
        loop {
            // Never read back (the read overlapped another transaction, or failed): nothing to
            // hold the delta to. The next check writes the tables whole.
            let Some(generation) = self
                .installed
                .as_ref()
                .and_then(|i| i.baseline.as_ref())
                .map(|b| b.generation)
            else {
                return Err(WriteError::Moved);
            };
            match self.writer.commit_at(changes, generation) {
                Err(err) if err.is_stale() && attempts < 2 => {
                    attempts += 1;
                    if self.tables_as_left() != Some(true) {
                        return Err(err);
                    }
                }
                result => {
                    // An empty batch is not sent: no transaction went by.
                    if result.as_ref().is_ok_and(|sent| sent.messages > 0) {
                        self.replaced_unknown = false;
                    }
                    return result.map(|sent| (sent, Some(generation_after(generation, sent))));
                }
            }
        }
    }

    /// Writes our tables whole, in a batch that names the generation read just before it is
    /// sent, so that the read-back after it can tell whether another transaction came after
    /// ours (and might have changed them). A whole table does not depend on what it replaces:
    /// a batch refused as stale is sent again, and after three refusals it goes unchecked,
    /// with no generation to expect, rather than not at all.
    ///
    /// The notification monitor sits out the write (see [`Monitor::leave`]); every caller reads
    /// the tables back right after.
    fn commit_whole(&mut self, changes: &[Change<'_>]) -> Result<(Sent, Option<u32>), WriteError> {
        if let Some(monitor) = self.monitor.as_mut() {
            monitor.leave();
        }
        let result = match self.writer.commit_at_latest(changes, 3) {
            Err(err) if err.is_stale() => self.writer.commit(changes).map(|sent| (sent, None)),
            result => result.map(|(sent, at)| (sent, Some(generation_after(at, sent)))),
        };
        if let Some(monitor) = self.monitor.as_mut() {
            monitor.rejoin(&mut self.writer);
        }
        if result.is_ok() {
            self.replaced_unknown = true;
        }
        result
    }

    /// Puts our tables back when anyone else changed or removed them (`nft flush ruleset`, a
    /// stray `nft delete element`).
    fn restore_if_changed(&mut self, compiler: &Compiler) {
        // Not read back after the last write (the read failed, or another transaction came
        // in between): there is nothing to compare with, and a whole write needs nothing. Until
        // then no delta lands, so waiting for a read-back that keeps failing would leave new
        // veths unguarded.
        if self
            .installed
            .as_ref()
            .is_some_and(|i| i.baseline.is_none())
        {
            tracing::warn!(
                "our tables were not read back after the last write; writing them whole"
            );
            self.sync(compiler, true);
        } else if self.tables_as_left() == Some(false) {
            self.sync(compiler, true);
        }
    }

    /// Whether our tables are as the last transaction left them: `Some(true)` when the
    /// nf_tables generation has not moved since, or has but only for other tables;
    /// `Some(false)` (with a warning naming the table) when ours changed or went; `None` when
    /// nothing is installed or the kernel could not be asked. The generation moves with every
    /// transaction in the namespace; only when it moved are our tables read back.
    fn tables_as_left(&mut self) -> Option<bool> {
        let installed = self.installed.as_mut()?;
        let generation = match self.writer.generation() {
            Ok(generation) => generation,
            Err(err) => {
                tracing::error!(%err, "cannot read the nf_tables generation");
                return None;
            }
        };
        if installed
            .baseline
            .as_ref()
            .is_some_and(|b| b.generation == generation)
        {
            if let Some(monitor) = self.monitor.as_mut() {
                monitor.settle(generation);
            }
            return Some(true);
        }
        // Other tables' transactions, all reported and none touching ours: no need to look.
        if let (Some(monitor), Some(baseline)) =
            (self.monitor.as_mut(), installed.baseline.as_mut())
        {
            if monitor.untouched(baseline.generation, generation) {
                baseline.generation = generation;
                self.health.record_check(Checked::Notifications);
                return Some(true);
            }
        }
        self.health.record_check(Checked::ReadBack);
        let now = match read_baseline(&mut self.writer, self.monitor.as_mut(), None, None) {
            Ok(now) => now,
            Err(WriteError::Moved) => {
                tracing::info!("another transaction came while our tables were read back; looking again at the next check");
                return None;
            }
            Err(err) => {
                tracing::error!(%err, "cannot read our tables back");
                return None;
            }
        };
        if let Some(baseline) = installed.baseline.as_mut() {
            if (&baseline.inet, &baseline.bridge) == (&now.inet, &now.bridge) {
                // Another table changed; ours are as we left them.
                baseline.generation = now.generation;
                return Some(true);
            }
        }
        let was = installed.baseline.as_ref();
        for (family, was, is) in [
            ("inet", was.and_then(|b| b.inet.as_ref()), now.inet.as_ref()),
            (
                "bridge",
                was.and_then(|b| b.bridge.as_ref()),
                now.bridge.as_ref(),
            ),
        ] {
            match (installed.baseline.is_some(), is) {
                (_, None) => tracing::warn!(
                    "table {family} {TABLE_NAME} was removed behind the agent's back; restoring it"
                ),
                (false, Some(_)) => tracing::warn!(
                    "table {family} {TABLE_NAME} could not be read back after the last sync; writing it whole"
                ),
                (true, Some(_)) if was != is => tracing::warn!(
                    "table {family} {TABLE_NAME} was changed behind the agent's back; restoring it"
                ),
                (true, Some(_)) => {}
            }
        }
        Some(false)
    }
}

/// Whether the policy table changed in more than the veths its `input` drops from, which
/// change with the guard's and decide no connection's fate: only then the epoch moves on.
fn policy_changed(before: &Table, after: &Table) -> bool {
    fn rest(table: &Table) -> impl Iterator<Item = (&String, &Set)> {
        table
            .sets
            .iter()
            .filter(|(name, _)| name.as_str() != INPUT_VETHS)
    }
    before.chains != after.chains
        || before.maps != after.maps
        || before.comment != after.comment
        || !rest(before).eq(rest(after))
}

/// The non-empty ones of a delta of the policy table and one of the guard, as changes.
fn deltas<'a>(policy: &'a Delta, guard: &'a Delta) -> Vec<Change<'a>> {
    [(TableFamily::Inet, policy), (TableFamily::Bridge, guard)]
        .into_iter()
        .filter(|(_, delta)| !delta.is_empty())
        .map(|(family, delta)| Change::Delta {
            family,
            table: TABLE_NAME,
            delta,
        })
        .collect()
}

/// The anti-spoofing side: which local pod sends from which veth, found in the kernel.
#[derive(Default)]
struct Guards {
    /// Pods already warned about, so a missing veth is reported once, not every second.
    warned: BTreeSet<String>,
    /// Pods already warned about for a link-layer address another veth's pod has too.
    shared: BTreeSet<String>,
    /// Pods already warned about for addresses other veths' pods carry too, with those veths.
    claimed: BTreeMap<String, Vec<String>>,
    /// When each veth was first seen, and each local pod's veth as last found: a pod keeps it
    /// while it is there, and moves only to a veth first seen since.
    history: veth::History,
    /// Bridges already warned about for failing to set `no_linklocal_learn` on.
    unlearned: BTreeSet<String>,
    /// The MACs pinned to their pods' veths (bridge port ifindex, MAC).
    pinned: BTreeSet<(u32, Mac)>,
    /// Failures to pin or unpin, and pins not made (a MAC the bridge has elsewhere), already
    /// warned about.
    unpinned: BTreeSet<String>,
    /// Whether the last discovery failed (reported once per failing stretch).
    failing: bool,
    /// The veths last found on other bridges, kept while discovery fails: without them, the
    /// guard would take them for pods' and drop their tagged frames.
    elsewhere: Vec<ruleset::ir::IfName>,
    /// Where `history` is kept across restarts, if anywhere.
    saved: Option<SavedState>,
    /// The guard the last discovery gave, for a change that brings, takes and moves no local
    /// pod ([`Guards::for_change`]).
    last: Option<LastGuard>,
}

/// A guard as a discovery gave it, with when, and for which local pods.
struct LastGuard {
    at: Instant,
    pods: LocalPods,
    guard: Guard,
}

/// Each local pod (`namespace/name`) with its addresses: what, of the cluster, decides which
/// veth is whose.
type LocalPods = BTreeMap<String, Vec<std::net::IpAddr>>;

fn local_pods(compiler: &Compiler) -> LocalPods {
    compiler
        .local_pods()
        .map(|p| (format!("{}/{}", p.namespace, p.name), p.ips.clone()))
        .collect()
}

impl LastGuard {
    /// This guard under `compiler`'s policies, if it is younger than a check's interval and
    /// `compiler` has the same local pods at the same addresses: then only which pods are
    /// isolated for egress can differ, and a discovery now would find what the next check
    /// will.
    fn reuse(&self, compiler: &Compiler, now: Instant) -> Option<Guard> {
        if now.saturating_duration_since(self.at) >= CHECK_EVERY
            || local_pods(compiler) != self.pods
        {
            return None;
        }
        let mut guard = self.guard.clone();
        for pod in &mut guard.pods {
            pod.follow_policies(compiler);
        }
        Some(guard)
    }
}

/// The file that keeps the veth history across restarts (`--state-dir`).
struct SavedState {
    path: std::path::PathBuf,
    /// The inode of this network namespace, which the file must name to be taken.
    netns: u64,
    /// The history last written, without the discovery count (which moves every second):
    /// nothing is written while the veths and bindings stay the same.
    written: Option<veth::SavedHistory>,
    /// Whether the last write failed (warned once per failing stretch).
    failing: bool,
}

/// Clears `epoch`'s value from every connection's mark; how many had it.
fn clear_epoch(epoch: Epoch) -> Result<usize, conntrack::ConntrackError> {
    conntrack::clear(epoch.bits().mask(), Which::Value(epoch.mark()))
}

/// The file in `--state-dir` that holds the veth history.
pub const STATE_FILE: &str = "veths.json";

/// The inode of the calling thread's network namespace.
fn netns_inode() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// Writes `text` to `path` whole: a reader sees the old file or the new one, never a part.
fn write_whole(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}

impl Guards {
    /// Guards that keep their veth history in `dir` ([`STATE_FILE`]), starting from what an
    /// earlier run in this network namespace left there; in memory only if `dir` is empty.
    fn with_state(dir: &std::path::Path) -> Guards {
        let mut guards = Guards::default();
        if dir.as_os_str().is_empty() {
            return guards;
        }
        let netns = match netns_inode() {
            Ok(netns) => netns,
            Err(err) => {
                tracing::warn!(%err, "cannot tell this network namespace; the veth history is kept in memory only");
                return guards;
            }
        };
        let path = dir.join(STATE_FILE);
        let shown = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => match serde_json::from_str::<veth::SavedHistory>(&text) {
                Ok(saved) => match veth::History::restore(saved, netns) {
                    Some(history) => {
                        tracing::info!(path = %shown, pods = history.bindings.len(), "restored which veth each local pod was found on");
                        guards.history = history;
                    }
                    None => {
                        tracing::info!(path = %shown, "the veth history there is another network namespace's; starting afresh")
                    }
                },
                Err(err) => {
                    tracing::warn!(path = %shown, %err, "the veth history there does not parse; starting afresh")
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %shown, %err, "cannot read the veth history; starting afresh")
            }
        }
        guards.saved = Some(SavedState {
            path,
            netns,
            written: None,
            failing: false,
        });
        guards
    }

    /// Writes the veth history to its file if its veths or bindings changed.
    fn save_history(&mut self) {
        let Some(state) = self.saved.as_mut() else {
            return;
        };
        let saved = self.history.saved(state.netns);
        let key = saved.without_tick();
        if state.written.as_ref() == Some(&key) {
            return;
        }
        let written = serde_json::to_string(&saved)
            .map_err(std::io::Error::from)
            .and_then(|text| write_whole(&state.path, &text));
        match written {
            Ok(()) => {
                if state.failing {
                    tracing::info!(path = %state.path.display(), "veth history written again");
                }
                state.failing = false;
                state.written = Some(key);
            }
            Err(err) => {
                if !state.failing {
                    tracing::warn!(path = %state.path.display(), %err, "cannot write the veth history; a restarted agent would not know which veth each pod was on");
                }
                state.failing = true;
            }
        }
    }

    /// The local pods of `compiler` and their veths, and the other veths on their bridges, as
    /// the kernel shows them now.
    fn guard(&mut self, compiler: &Compiler) -> Guard {
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
        if let Some(d) = &discovery {
            self.history.observe(d);
        }
        let found = veth::guarded_pods(compiler, discovery.as_ref(), &self.history);
        // Without a discovery nothing is known of claims or veths: what was stands.
        if discovery.is_some() {
            self.warn_claims(&found);
            self.history.bindings.clone_from(&found.bound);
            self.save_history();
        }
        let missing = &found.missing;
        for (id, pod) in &found.found {
            if self.warned.remove(id) {
                tracing::info!(pod = %id, veth = %pod.veth, "veth found; anti-spoofing on");
            }
            if pod.mac_shared && self.shared.insert(id.clone()) {
                veth::warn_shared_mac(discovery.as_ref(), id, pod);
            } else if !pod.mac_shared && self.shared.remove(id) {
                tracing::info!(pod = %id, veth = %pod.veth, "link-layer address no longer shared; the pod sends again");
            }
        }
        self.shared.retain(|id| {
            found
                .found
                .iter()
                .any(|(found, pod)| found == id && pod.mac_shared)
        });
        for id in missing {
            if self.warned.insert(id.clone()) {
                tracing::warn!(pod = %id, "{}", veth::UNGUARDED);
            }
        }
        self.warned.retain(|id| missing.contains(id));
        let mut guard = veth::guard(discovery.as_ref(), &found);
        if let Some(d) = &discovery {
            self.elsewhere.clone_from(&guard.elsewhere);
            self.stop_link_local_learning(d, &guard);
            self.pin_macs(d, &found);
            self.last = Some(LastGuard {
                at: Instant::now(),
                pods: local_pods(compiler),
                guard: guard.clone(),
            });
        } else {
            guard.elsewhere.clone_from(&self.elsewhere);
            self.last = None;
        }
        guard
    }

    /// The guard for a change of the cluster: the last discovery's when the change brings,
    /// takes and moves no local pod (a policy or label change, which would otherwise wait
    /// ~7 ms for the discovery and pins of 110 veths), else [`Guards::guard`]. A veth that
    /// came or went since the last discovery is found by the next check, as between changes.
    fn for_change(&mut self, compiler: &Compiler) -> Guard {
        let reused = self
            .last
            .as_ref()
            .and_then(|last| last.reuse(compiler, Instant::now()));
        reused.unwrap_or_else(|| self.guard(compiler))
    }

    /// Warns of each pod whose addresses other veths' pods carry too ([`veth::CLAIMED`]) or
    /// that is contested ([`veth::CONTESTED`]), naming the veths, once per change of them; says
    /// when a contest ends.
    fn warn_claims(&mut self, found: &veth::PodVeths) {
        let now: BTreeMap<String, Vec<String>> = found
            .claimed
            .iter()
            .chain(&found.contested)
            .map(|(id, with)| (id.clone(), with.clone()))
            .collect();
        for (id, with) in &now {
            if self.claimed.get(id) == Some(with) {
                continue;
            }
            let with = with.join(",");
            match found.found.iter().find(|(found, _)| found == id) {
                Some((_, pod)) => {
                    tracing::warn!(pod = %id, veth = %pod.veth, %with, "{}", veth::CLAIMED);
                }
                None => tracing::warn!(pod = %id, %with, "{}", veth::CONTESTED),
            }
        }
        for id in self.claimed.keys().filter(|id| !now.contains_key(*id)) {
            tracing::info!(pod = %id, "no other veth's pod carries this pod's addresses now");
        }
        self.claimed = now;
    }

    /// Pins the guarded pods' MACs to their veths and unpins the rest, as [`veth::PinPlan`]
    /// says. Failures are warned about once each; a failed unpin is tried again.
    fn pin_macs(&mut self, discovery: &veth::Discovery, found: &veth::PodVeths) {
        let veth::PinPlan { pins, unpins, kept } =
            veth::PinPlan::new(&self.pinned, found, discovery);
        let failed = veth::pin_macs(&pins, &unpins);
        let mut now: BTreeSet<String> = BTreeSet::new();
        for err in &failed.errors {
            let text = err.to_string();
            if !self.unpinned.contains(&text) {
                tracing::warn!(%err, "cannot pin or unpin a pod's MAC on its veth: frames to a guarded pod are flooded to every port whenever the bridge forgets its MAC");
            }
            now.insert(text);
        }
        for (port, mac) in &failed.elsewhere {
            let text = format!("elsewhere {port} {mac:?}");
            if !self.unpinned.contains(&text) {
                let veth = discovery.veths().iter().find(|v| v.index == *port);
                tracing::warn!(
                    veth = veth.map_or("?", |v| v.name.as_str()),
                    mac = %ruleset::render::mac_text(mac),
                    "not pinned: the bridge has this pod's MAC behind another port or as its own, and a pin would move it here"
                );
            }
            now.insert(text);
        }
        self.unpinned = now;
        // What is pinned now, as far as the agent knows: an unpin that failed is tried again.
        let still: Vec<(u32, Mac)> = unpins
            .into_iter()
            .filter(|(port, mac)| {
                let asked = veth::Request::UnpinMac {
                    port: *port,
                    mac: *mac,
                };
                failed
                    .errors
                    .iter()
                    .any(|err| err.request().is_none_or(|request| request == asked))
            })
            .collect();
        let made: Vec<(u32, Mac)> = pins
            .iter()
            .filter(|pin| !failed.elsewhere.contains(pin))
            .copied()
            .collect();
        let first = self.pinned.is_empty() && !made.is_empty();
        self.pinned = made.iter().chain(&kept).chain(&still).copied().collect();
        if first {
            tracing::info!(
                pods = made.len(),
                "pinned the guarded pods' MACs to their veths (static bridge fdb entries): the bridge does not forget them, so never floods frames for them to every port"
            );
        }
    }

    /// Sets `no_linklocal_learn` on the guarded pods' bridges that lack it, saying so (see
    /// [`veth::link_local_learners`]); a failure is reported once per bridge.
    fn stop_link_local_learning(&mut self, discovery: &veth::Discovery, guard: &Guard) {
        for (bridge, index) in veth::link_local_learners(discovery, guard) {
            match veth::stop_link_local_learning(index) {
                Ok(()) => {
                    self.unlearned.remove(&bridge);
                    tracing::info!(
                        %bridge,
                        "set no_linklocal_learn: a frame to a reserved group address \
                         (01:80:c2:00:00:0x) no longer teaches the bridge where a MAC is, so no \
                         pod can move a neighbour's MAC to its port that way"
                    );
                }
                Err(err) => {
                    if self.unlearned.insert(bridge.clone()) {
                        tracing::warn!(%bridge, %err, "cannot set no_linklocal_learn: a pod can move a neighbour's MAC to its port with a frame to a reserved group address");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruleset::guard::GuardedPod;

    #[test]
    fn a_change_without_new_pods_reuses_the_last_discovery_for_a_second() {
        use ruleset::model::{Namespace, NetworkPolicy, Pod};
        let pod = |name: &str, ip: &str| Pod {
            namespace: "x".into(),
            name: name.into(),
            node: Some("n1".into()),
            ips: vec![ip.parse().unwrap()],
            phase: Some("Running".into()),
            ..Pod::default()
        };
        let mut cluster = ruleset::Cluster::default();
        cluster.apply_namespace(Namespace {
            name: "x".into(),
            ..Namespace::default()
        });
        cluster.apply_pod(pod("a", "10.244.1.5"));
        let open = Compiler::new(cluster.clone(), "n1");
        let found = GuardedPod::new(
            &open,
            ruleset::ir::IfName::new("veth0000000a").unwrap(),
            12,
            vec!["10.244.1.5".parse().unwrap()],
            [2, 0, 0, 0, 0, 10],
            false,
        );
        assert!(!found.egress_isolated);
        let at = Instant::now();
        let last = LastGuard {
            at,
            pods: local_pods(&open),
            guard: vec![found].into(),
        };
        // A policy isolating the pod for egress: the same veth, now isolated.
        let mut isolating = cluster.clone();
        isolating.apply_policy(NetworkPolicy {
            namespace: "x".into(),
            name: "deny-egress".into(),
            policy_types: vec!["Egress".into()],
            ..NetworkPolicy::default()
        });
        let isolating = Compiler::new(isolating, "n1");
        let reused = last.reuse(&isolating, at).expect("same pods, just now");
        assert_eq!(reused.pods.len(), 1);
        assert_eq!(reused.pods[0].index, 12);
        assert!(reused.pods[0].egress_isolated);
        assert_eq!(last.reuse(&open, at), Some(last.guard.clone()));
        // Not once a check is due, nor for a pod added, moved to another address or gone.
        assert_eq!(last.reuse(&isolating, at + CHECK_EVERY), None);
        let mut added = cluster.clone();
        added.apply_pod(pod("b", "10.244.1.6"));
        assert_eq!(last.reuse(&Compiler::new(added, "n1"), at), None);
        let mut moved = cluster.clone();
        moved.apply_pod(pod("a", "10.244.1.7"));
        assert_eq!(last.reuse(&Compiler::new(moved, "n1"), at), None);
        assert_eq!(
            last.reuse(&Compiler::new(ruleset::Cluster::default(), "n1"), at),
            None
        );
    }

    #[test]
    fn a_change_of_the_veths_alone_keeps_the_epoch() {
        let compiler = Compiler::new(ruleset::Cluster::default(), "n1");
        let before = compiler.table().clone();
        let pod = GuardedPod {
            veth: ruleset::ir::IfName::new("veth0000000a").unwrap(),
            index: 10,
            ips: Vec::new(),
            mac: [2, 0, 0, 0, 0, 10],
            mac_shared: false,
            egress_isolated: false,
        };
        let veths = with_veths(&before, &vec![pod].into());
        assert_ne!(before, veths);
        assert!(!policy_changed(&before, &veths));
        let mut known = before.clone();
        if let Some(set) = known.sets.get_mut("known4") {
            set.elements
                .insert(ruleset::ir::Element::Addr("10.0.0.1".parse().unwrap()));
        }
        assert!(policy_changed(&before, &known));
    }

    #[test]
    fn the_loop_ticks_often_enough_for_a_short_watchdog() {
        let ms = Duration::from_millis;
        // No watchdog, or a long one: the source's own period.
        assert_eq!(tick_period(ms(200), None), ms(200));
        assert_eq!(tick_period(CHECK_EVERY, Some(ms(15_000))), CHECK_EVERY);
        // WatchdogSec=1s: pings every 500 ms, so the API source's 1 s tick must shorten.
        assert_eq!(tick_period(CHECK_EVERY, Some(ms(500))), ms(500));
        assert_eq!(tick_period(ms(200), Some(ms(500))), ms(200));
        // A silly WATCHDOG_USEC never makes the loop spin.
        assert_eq!(tick_period(CHECK_EVERY, Some(Duration::ZERO)), ms(10));
    }

    #[test]
    fn recent_marks_are_the_installed_value_and_those_before_it_wrapping() {
        let bits = ruleset::epoch::CtMarkBits::new(0x0000_0030).unwrap();
        let first = Epoch::first(bits);
        assert_eq!(recent_marks(first), [0x10, 0x30]);
        assert_eq!(recent_marks(first.next().next()), [0x30, 0x20]);
        let wide = Epoch::first(ruleset::epoch::CtMarkBits::default());
        assert_eq!(recent_marks(wide), [0x0100_0000, 0xff00_0000]);
    }

    /// conntrack's epoch bits as the agent's steps leave them, and the agent's choices as
    /// `Kernel` makes them (`sync`, `free_next_epoch`, `clear_ahead`, `enable_fast_path`).
    struct EpochModel {
        shift: u32,
        values: u32,
        /// Values some connection's mark may hold, stamped by rules other than those in force.
        held: BTreeSet<u32>,
        /// The value the rules the last transaction replaced may still stamp.
        replaced: Option<u32>,
        installed: Epoch,
        fresh: Fresh,
        replaced_unknown: bool,
    }

    impl EpochModel {
        /// A previous run's rules in force, stamping `previous`; any value in some mark.
        fn after_run(bits: ruleset::epoch::CtMarkBits, previous: u32) -> Self {
            let values = bits.max_epoch();
            let mut installed = Epoch::first(bits);
            while installed.value() != previous {
                installed = installed.next();
            }
            EpochModel {
                shift: bits.mask().trailing_zeros(),
                values,
                held: (1..=values).collect(),
                replaced: None,
                installed,
                fresh: Fresh::default(),
                replaced_unknown: false,
            }
        }

        /// A transaction installing `to`. The marks its rules stamp from now on are trusted
        /// by `to` alone; those of the replaced rules are another ruleset's, unless `to` only
        /// turns the fast path on for the same value (and the same policy).
        fn commit(&mut self, to: Epoch, whole: bool) -> Result<(), String> {
            let from = self.installed.value();
            if from != to.value() {
                self.held.insert(from);
            }
            if to.fast_path() && self.held.contains(&to.value()) {
                return Err(format!(
                    "{} trusted while another ruleset's marks may hold it",
                    to.value()
                ));
            }
            self.replaced = Some(from);
            self.installed = to;
            self.replaced_unknown = whole;
            Ok(())
        }

        /// A walk of conntrack clearing every value but `keep`; the replaced rules may stamp
        /// theirs again after it.
        fn walk(&mut self, keep: &[u32]) {
            let shift = self.shift;
            self.held.retain(|v| keep.contains(&(v << shift)));
            self.held.extend(self.replaced);
        }

        /// `sync` writing the tables whole at start-up, over the previous run's: the agent
        /// starts from `Epoch::first`, whatever the kernel holds.
        fn start(&mut self) -> Result<(), String> {
            self.fresh = Fresh::default();
            let first = Epoch::first(self.installed.bits());
            self.commit(first.next().without_fast_path(), true)
        }

        /// `sync` writing the tables whole over rules changed behind the agent's back, which
        /// stamp `stamping`.
        fn restore(&mut self, stamping: u32) -> Result<(), String> {
            self.held.insert(stamping);
            self.fresh = Fresh::default();
            self.commit(self.installed.next().without_fast_path(), true)?;
            self.replaced = Some(stamping);
            Ok(())
        }

        /// `sync` with a change of the policy table (`free_next_epoch`), then `clear_ahead`.
        fn change(&mut self, walk_fails: bool) -> Result<(), String> {
            let next = self.installed.next();
            let next = if self.replaced_unknown {
                next.without_fast_path()
            } else if self.fresh.take() {
                next
            } else {
                // clear_epoch: a walk of its own.
                self.held.remove(&next.value());
                self.held.extend(self.replaced);
                next
            };
            self.commit(next, false)?;
            self.clear_ahead(walk_fails);
            Ok(())
        }

        fn clear_ahead(&mut self, fails: bool) {
            if self.installed.fast_path() && self.fresh.ahead == 0 && !fails {
                self.walk(&recent_marks(self.installed));
                self.fresh = Fresh::after_walk(self.values);
            }
        }

        /// `enable_fast_path`; `bump` false leaves out the move to the next value.
        fn enable_fast_path(&mut self, bump: bool, bump_fails: bool) -> Result<(), String> {
            if self.installed.fast_path() {
                return Ok(());
            }
            if self.replaced_unknown && bump {
                if bump_fails {
                    return Ok(());
                }
                self.commit(self.installed.next().without_fast_path(), false)?;
            }
            self.walk(&[]);
            self.fresh = Fresh::default();
            self.commit(self.installed.with_fast_path(), false)?;
            self.clear_ahead(false);
            Ok(())
        }
    }

    /// Runs the agent from start-up over a previous run that stamped `previous`: the whole
    /// table, the fast path turned on (or, when `late`, a change first), changes with every
    /// fifth walk failing; then the same after restoring the tables over rules someone else
    /// wrote that stamp `tampered` (`None`: the value the restore installs). `bump` says, per
    /// phase, whether `enable_fast_path` moves to the next value first. How many changes took a
    /// value known free.
    fn run_epochs(
        bits: ruleset::epoch::CtMarkBits,
        previous: u32,
        tampered: Option<u32>,
        bump: [bool; 2],
        late: bool,
    ) -> Result<u32, String> {
        let mut model = EpochModel::after_run(bits, previous);
        let mut taken_free = 0;
        for (phase, bump) in ["start-up", "restore"].into_iter().zip(bump) {
            if phase == "start-up" {
                model.start()?;
            } else {
                let stamping = tampered.unwrap_or(model.installed.next().value());
                model.restore(stamping)?;
            }
            let in_phase = |err| format!("{phase}: {err}");
            model.enable_fast_path(bump, late).map_err(in_phase)?;
            if late {
                model.change(false).map_err(in_phase)?;
                model.enable_fast_path(bump, false).map_err(in_phase)?;
            }
            if !model.installed.fast_path() {
                return Err(format!("{phase}: the fast path never came on"));
            }
            for step in 0..3 * model.values + 20 {
                taken_free += u32::from(model.fresh.ahead > 0);
                model
                    .change(step % 5 == 4)
                    .map_err(|err| format!("{phase}, change {step}: {err}"))?;
            }
        }
        Ok(taken_free)
    }

    /// conntrack under the worst the kernel may do: after a walk, the rules the last
    /// transaction replaced stamp their value again. From start-up over every value a previous
    /// run may have left, and after a restore over rules stamping any value, through changes
    /// over three wraps with one walk in five failing: no value is trusted while another
    /// ruleset's marks may hold it, neither when the fast path comes on nor when a change makes
    /// a value current, for every width of the mask.
    #[test]
    fn a_value_made_current_is_in_no_mark() {
        for mask in [0x0000_0030, 0x0000_0070, 0x0000_00f0, 0xff00_0000] {
            let bits = ruleset::epoch::CtMarkBits::new(mask).unwrap();
            let values = 1..=bits.max_epoch().min(9);
            for previous in values.clone() {
                let tampered = values.clone().map(Some).chain([None]);
                for (tampered, late) in tampered.flat_map(|t| [(t, false), (t, true)]) {
                    let case = format!(
                        "mask {mask:#x}, previous run {previous}, tampered {tampered:?}, late {late}"
                    );
                    match run_epochs(bits, previous, tampered, [true; 2], late) {
                        Ok(taken_free) => assert!(taken_free > 0, "{case}: never a free value"),
                        Err(err) => panic!("{case}: {err}"),
                    }
                }
            }
            // Without the move to the next value, a previous run that stamped the first value
            // installed, or rules changed behind the agent's back that stamp the value the
            // restore installs, have their late stamps trusted.
            let first = Epoch::first(bits).next().value();
            for late in [false, true] {
                let err = run_epochs(bits, first, None, [false, true], late).unwrap_err();
                assert!(
                    err.starts_with("start-up: ") && err.contains("trusted"),
                    "mask {mask:#x}: {err}"
                );
                let err = run_epochs(bits, 1, None, [true, false], late).unwrap_err();
                assert!(
                    err.starts_with("restore: ") && err.contains("trusted"),
                    "mask {mask:#x}: {err}"
                );
            }
        }
    }

    #[test]
    fn the_generation_after_a_commit_skips_zero() {
        let sent = Sent {
            messages: 3,
            bytes: 100,
        };
        assert_eq!(generation_after(7, sent), 8);
        assert_eq!(generation_after(u32::MAX, sent), 1);
        // An empty batch is not sent: the generation stays where it was checked.
        assert_eq!(generation_after(7, Sent::default()), 7);
    }
}
