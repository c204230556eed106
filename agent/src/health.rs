//! What the agent tells people and probes: `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! ```text
//! reconcile loop --beat, record_sync, set_*--> Health (shared state) <--read-- HTTP server
//! ```
//! The loop only writes numbers into [`Health`]; the server renders them at each request, so
//! a scrape never waits on the kernel or the snapshot. Every label value comes from the code
//! (sync kinds, object kinds, the version): no pod or policy name ever becomes a label.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ruleset::epoch::Epoch;
use ruleset::ir::Table;
use tokio::net::TcpListener;

/// What a sync wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// Both tables replaced in one transaction (the first sync, a retry).
    Full,
    /// Only what changed since the last sync.
    Delta,
    /// The anti-spoofing table following veths that came or went.
    Veths,
    /// Our tables put back after someone else changed them.
    Restore,
}

impl SyncKind {
    const ALL: [SyncKind; 4] = [Self::Full, Self::Delta, Self::Veths, Self::Restore];

    fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Delta => "delta",
            Self::Veths => "veths",
            Self::Restore => "restore",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What became of an Event the agent meant to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventOutcome {
    /// A new Event.
    Created,
    /// A count more on the series of the same finding's recent Event.
    Aggregated,
    /// The API server refused it or did not answer.
    Failed,
    /// Not sent: too many were waiting.
    Dropped,
}

impl EventOutcome {
    const ALL: [EventOutcome; 4] = [Self::Created, Self::Aggregated, Self::Failed, Self::Dropped];

    fn label(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Aggregated => "aggregated",
            Self::Failed => "failed",
            Self::Dropped => "dropped",
        }
    }
}

/// How the agent found out that its tables were as it left them, or not, after the nf_tables
/// generation moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// nf_tables' notifications showed only other tables' transactions.
    Notifications,
    /// The tables were read back and compared.
    ReadBack,
}

impl Checked {
    const ALL: [Checked; 2] = [Self::Notifications, Self::ReadBack];

    fn label(self) -> &'static str {
        match self {
            Self::Notifications => "notifications",
            Self::ReadBack => "read_back",
        }
    }
}

/// Upper bounds of the sync duration histogram, in seconds: 100 µs to 10 s.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Clone, Copy, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is above the highest bound.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let slot = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        self.counts[slot] += 1;
        self.sum += seconds;
    }
}

/// Objects in the kernel, as `nft list ruleset` would count them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    pub rules: u64,
    /// Sets and maps (a map is a set with values to nf_tables).
    pub sets: u64,
    /// Set and map elements.
    pub elements: u64,
    pub chains: u64,
}

impl KernelCounts {
    /// The counts of the tables the agent installed.
    pub fn of<'a>(tables: impl IntoIterator<Item = &'a Table>) -> Self {
        let mut counts = Self::default();
        for t in tables {
            counts.rules += t.rule_count() as u64;
            counts.sets += (t.sets.len() + t.maps.len()) as u64;
            counts.elements += t.element_count() as u64;
            counts.chains += t.chains.len() as u64;
        }
        counts
    }
}

struct State {
    last_beat: Instant,
    ready: bool,
    last_success: Option<Instant>,
    last_failed: bool,
    /// Per kind, [succeeded, failed].
    syncs: [[u64; 2]; SyncKind::ALL.len()],
    durations: [Histogram; SyncKind::ALL.len()],
    objects: BTreeMap<&'static str, u64>,
    local_pods: u64,
    kernel: KernelCounts,
    unenforceable: u64,
    events: [u64; EventOutcome::ALL.len()],
    checks: [u64; Checked::ALL.len()],
    /// The installed ruleset's epoch, and 1 while its fast path is on.
    epoch: u64,
    fast_path: u64,
    /// 1 while the agent follows the veths on the kernel's link reports.
    link_reports: u64,
}

/// The agent's health, shared by the loop (which writes) and the HTTP server (which reads).
/// Clones share one state.
#[derive(Clone)]
pub struct Health {
    state: Arc<Mutex<State>>,
    stale_after: Duration,
}

impl Health {
    /// `/healthz` fails once the loop has not called [`Health::beat`] for `stale_after`; give
    /// it a few of the loop's periods.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                last_beat: Instant::now(),
                ready: false,
                last_success: None,
                last_failed: false,
                syncs: [[0; 2]; SyncKind::ALL.len()],
                durations: [Histogram::default(); SyncKind::ALL.len()],
                objects: BTreeMap::new(),
                local_pods: 0,
                kernel: KernelCounts::default(),
                unenforceable: 0,
                events: [0; EventOutcome::ALL.len()],
                checks: [0; Checked::ALL.len()],
                epoch: 0,
                fast_path: 0,
                link_reports: 0,
            })),
            stale_after,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave these counters half-written in a way that matters.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The loop is alive: call it at every tick.
    pub fn beat(&self) {
        self.lock().last_beat = Instant::now();
    }

    /// A sync was attempted: what kind, how long it took, and whether the kernel took it.
    pub fn record_sync(&self, kind: SyncKind, duration: Duration, ok: bool) {
        let mut s = self.lock();
        s.syncs[kind.index()][usize::from(!ok)] += 1;
        s.durations[kind.index()].observe(duration.as_secs_f64());
        s.last_failed = !ok;
        if ok {
            s.last_success = Some(Instant::now());
        }
    }

    /// How many objects of a kind (`pods`, `namespaces`, `networkpolicies`) the agent knows.
    pub fn set_objects(&self, kind: &'static str, n: usize) {
        self.lock().objects.insert(kind, n as u64);
    }

    /// How many pods on this node the ruleset enforces.
    pub fn set_local_pods(&self, n: usize) {
        self.lock().local_pods = n as u64;
    }

    /// The epoch of the ruleset now in the kernel, with whether its fast path is on.
    pub fn set_epoch(&self, epoch: Epoch) {
        let mut s = self.lock();
        s.epoch = u64::from(epoch.value());
        s.fast_path = u64::from(epoch.fast_path_rule().is_some());
    }

    /// Whether the agent follows the veths on the kernel's link reports, or only looks once a
    /// second (it could not subscribe, or the subscription failed).
    pub fn set_link_reports(&self, on: bool) {
        self.lock().link_reports = u64::from(on);
    }

    /// How many fields of policies the agent cannot enforce as written.
    pub fn set_unenforceable(&self, n: usize) {
        self.lock().unenforceable = n as u64;
    }

    /// An Event about an unenforceable policy was recorded, or not.
    pub fn record_event(&self, outcome: EventOutcome) {
        self.lock().events[outcome as usize] += 1;
    }

    /// The agent looked at whether its tables are as it left them, and how.
    pub fn record_check(&self, how: Checked) {
        self.lock().checks[how as usize] += 1;
    }

    /// What the agent's tables hold in the kernel after the last successful sync.
    pub fn set_kernel(&self, counts: KernelCounts) {
        self.lock().kernel = counts;
    }

    /// The first sync succeeded: the node's ruleset is in place.
    pub fn mark_ready(&self) {
        self.lock().ready = true;
    }

    /// `/healthz`: whether the loop beat recently.
    fn liveness(&self) -> (StatusCode, String) {
        let since = self.lock().last_beat.elapsed();
        if since > self.stale_after {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "stalled: the reconcile loop has not run for {:.1}s\n",
                    since.as_secs_f64()
                ),
            )
        } else {
            (StatusCode::OK, "ok\n".to_owned())
        }
    }

    /// `/readyz`: ready once the first sync succeeded, and while the last sync did not fail.
    /// A quiet cluster syncs rarely, so the age of the last sync says nothing by itself; a
    /// failed sync does: the kernel then enforces an outdated ruleset until a retry succeeds.
    fn readiness(&self) -> (StatusCode, String) {
        let s = self.lock();
        if !s.ready {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the first sync has not succeeded yet\n".to_owned(),
            )
        } else if s.last_failed {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the last sync failed; the kernel keeps the previous rules\n".to_owned(),
            )
        } else {
            (StatusCode::OK, "ready\n".to_owned())
        }
    }

    /// `/metrics` in the Prometheus text format (0.0.4).
    pub fn metrics(&self) -> String {
        let s = self.lock();
        let mut out = String::new();
        family(
            &mut out,
            "nftpol_build_info",
            "gauge",
            "The agent's version, as a label; always 1.",
        );
        sample(
            &mut out,
            "nftpol_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        family(
            &mut out,
            "nftpol_syncs_total",
            "counter",
            "Transactions the agent sent to nf_tables, by kind and result.",
        );
        for kind in SyncKind::ALL {
            for (i, result) in ["ok", "error"].into_iter().enumerate() {
                sample(
                    &mut out,
                    "nftpol_syncs_total",
                    &[("kind", kind.label()), ("result", result)],
                    s.syncs[kind.index()][i],
                );
            }
        }
        family(
            &mut out,
            "nftpol_sync_failures_total",
            "counter",
            "Syncs the kernel refused; it kept its previous rules.",
        );
        let failures: u64 = s.syncs.iter().map(|[_, failed]| failed).sum();
        sample(&mut out, "nftpol_sync_failures_total", &[], failures);
        family(
            &mut out,
            "nftpol_sync_duration_seconds",
            "histogram",
            "Time from diffing to the kernel's acknowledgement, by kind.",
        );
        for kind in SyncKind::ALL {
            let h = &s.durations[kind.index()];
            let mut cumulative = 0;
            for (bound, count) in BUCKETS.iter().zip(h.counts) {
                cumulative += count;
                sample(
                    &mut out,
                    "nftpol_sync_duration_seconds_bucket",
                    &[("kind", kind.label()), ("le", &bound.to_string())],
                    cumulative,
                );
            }
            let total: u64 = h.counts.iter().sum();
            let labels = [("kind", kind.label())];
            sample(
                &mut out,
                "nftpol_sync_duration_seconds_bucket",
                &[("kind", kind.label()), ("le", "+Inf")],
                total,
            );
            sample(&mut out, "nftpol_sync_duration_seconds_sum", &labels, h.sum);
            sample(
                &mut out,
                "nftpol_sync_duration_seconds_count",
                &labels,
                total,
            );
        }
        family(
            &mut out,
            "nftpol_seconds_since_last_sync",
            "gauge",
            "Seconds since the last successful sync (absent before the first).",
        );
        if let Some(at) = s.last_success {
            sample(
                &mut out,
                "nftpol_seconds_since_last_sync",
                &[],
                at.elapsed().as_secs_f64(),
            );
        }
        family(
            &mut out,
            "nftpol_watched_objects",
            "gauge",
            "Cluster objects the agent knows, by kind.",
        );
        for (kind, n) in &s.objects {
            sample(&mut out, "nftpol_watched_objects", &[("kind", kind)], *n);
        }
        let gauges = [
            (
                "nftpol_local_pods",
                "Pods on this node the ruleset enforces.",
                s.local_pods,
            ),
            (
                "nftpol_unenforceable_fields",
                "Fields of NetworkPolicies the agent cannot enforce as written; the pods they select stay isolated.",
                s.unenforceable,
            ),
            (
                "nftpol_kernel_rules",
                "Rules in the agent's tables.",
                s.kernel.rules,
            ),
            (
                "nftpol_kernel_chains",
                "Chains in the agent's tables.",
                s.kernel.chains,
            ),
            (
                "nftpol_kernel_sets",
                "Sets and maps in the agent's tables.",
                s.kernel.sets,
            ),
            (
                "nftpol_kernel_elements",
                "Set and map elements in the agent's tables.",
                s.kernel.elements,
            ),
            (
                "nftpol_ruleset_epoch",
                "Epoch of the ruleset in the kernel, stamped into the conntrack mark of the connections it allows.",
                s.epoch,
            ),
            (
                "nftpol_fast_path",
                "1 while later packets of connections the current ruleset allowed skip its rules \
                 (the conntrack-mark fast path); 0 after start-up or a full replace until old \
                 marks are cleared, or with --ct-mark-bits 0.",
                s.fast_path,
            ),
            (
                "nftpol_link_reports",
                "1 while the agent looks at the veths as soon as the kernel reports one new, gone \
                 or joining a bridge; 0 when it looks only once a second (the subscription to \
                 link reports failed: see the log).",
                s.link_reports,
            ),
        ];
        for (name, help, value) in gauges {
            family(&mut out, name, "gauge", help);
            sample(&mut out, name, &[], value);
        }
        family(
            &mut out,
            "nftpol_events_total",
            "counter",
            "Kubernetes Events about unenforceable policies, by result: created, aggregated into \
             a recent one's series, failed (refused or unanswered), dropped (too many waiting).",
        );
        for outcome in EventOutcome::ALL {
            sample(
                &mut out,
                "nftpol_events_total",
                &[("result", outcome.label())],
                s.events[outcome as usize],
            );
        }
        family(
            &mut out,
            "nftpol_table_checks_total",
            "counter",
            "Looks at whether the agent's tables are as it left them after another transaction, by \
             how they were answered: from nf_tables' notifications (only other tables changed), \
             or by reading the tables back.",
        );
        for how in Checked::ALL {
            sample(
                &mut out,
                "nftpol_table_checks_total",
                &[("by", how.label())],
                s.checks[how as usize],
            );
        }
        family(
            &mut out,
            "nftpol_ready",
            "gauge",
            "1 while /readyz answers 200.",
        );
        drop(s);
        let ready = u8::from(self.readiness().0 == StatusCode::OK);
        sample(&mut out, "nftpol_ready", &[], ready);
        out
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n".into());
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match request.uri().path() {
            "/healthz" => {
                let (status, body) = self.liveness();
                text(status, body)
            }
            "/readyz" => {
                let (status, body) = self.readiness();
                text(status, body)
            }
            "/metrics" => {
                let mut response = text(StatusCode::OK, self.metrics());
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /healthz, /readyz or /metrics\n".into(),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push_str("=\"");
            for c in value.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Binding the health endpoint failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for /healthz, /readyz and /metrics")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// A bound health endpoint, not serving yet.
pub struct Endpoint {
    listener: TcpListener,
    addr: SocketAddr,
}

/// Listens on `addr` (port 0 picks a free port; [`Endpoint::local_addr`] says which).
pub async fn bind(addr: SocketAddr) -> Result<Endpoint, BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    Ok(Endpoint { listener, addr })
}

/// How long a client may take to send its request head; a slow one holds no connection longer.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

impl Endpoint {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers requests until the runtime stops; spawn it. Each connection is its own task.
    pub async fn serve(self, health: Health) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    tracing::warn!(%err, addr = %self.addr, "health endpoint cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let health = health.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let response = health.respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::debug!(%err, "health connection ended");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::expect_used,
        clippy::unwrap_used,
        reason = "a test fails by panicking"
    )]

    use super::*;
    use ruleset::epoch::CtMarkBits;

    #[test]
    fn histogram_counts_cumulatively_with_an_inf_bucket() {
        let health = Health::new(Duration::from_secs(3));
        health.record_sync(SyncKind::Delta, Duration::from_micros(50), true);
        health.record_sync(SyncKind::Delta, Duration::from_millis(3), true);
        health.record_sync(SyncKind::Delta, Duration::from_secs(60), false);
        let m = health.metrics();
        for line in [
            "nftpol_sync_duration_seconds_bucket{kind=\"delta\",le=\"0.0001\"} 1",
            "nftpol_sync_duration_seconds_bucket{kind=\"delta\",le=\"0.0025\"} 1",
            "nftpol_sync_duration_seconds_bucket{kind=\"delta\",le=\"0.005\"} 2",
            "nftpol_sync_duration_seconds_bucket{kind=\"delta\",le=\"10\"} 2",
            "nftpol_sync_duration_seconds_bucket{kind=\"delta\",le=\"+Inf\"} 3",
            "nftpol_sync_duration_seconds_count{kind=\"delta\"} 3",
            "nftpol_syncs_total{kind=\"delta\",result=\"ok\"} 2",
            "nftpol_syncs_total{kind=\"delta\",result=\"error\"} 1",
            "nftpol_sync_failures_total 1",
        ] {
            assert!(m.lines().any(|l| l == line), "no {line:?} in\n{m}");
        }
    }

    #[test]
    fn events_and_unenforceable_fields_are_counted() {
        let health = Health::new(Duration::from_secs(3));
        health.record_event(EventOutcome::Created);
        health.record_event(EventOutcome::Failed);
        health.record_event(EventOutcome::Failed);
        health.set_unenforceable(3);
        let epoch = Epoch::first(CtMarkBits::new(0xff00_0000).unwrap());
        health.set_epoch(epoch.next().with_fast_path());
        assert!(health
            .metrics()
            .lines()
            .any(|l| l == "nftpol_link_reports 0"));
        health.set_link_reports(true);
        let m = health.metrics();
        for line in [
            "nftpol_events_total{result=\"created\"} 1",
            "nftpol_events_total{result=\"aggregated\"} 0",
            "nftpol_events_total{result=\"failed\"} 2",
            "nftpol_events_total{result=\"dropped\"} 0",
            "nftpol_unenforceable_fields 3",
            "nftpol_ruleset_epoch 2",
            "nftpol_fast_path 1",
            "nftpol_link_reports 1",
        ] {
            assert!(m.lines().any(|l| l == line), "no {line:?} in\n{m}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("k", "a\"b\\c\nd")], 1);
        assert_eq!(out, "m{k=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn liveness_fails_when_the_loop_stops_beating() {
        let health = Health::new(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(health.liveness().0, StatusCode::SERVICE_UNAVAILABLE);
        let health = Health::new(Duration::from_secs(60));
        health.beat();
        assert_eq!(health.liveness().0, StatusCode::OK);
    }

    #[test]
    fn readiness_follows_the_last_sync_once_ready() {
        let health = Health::new(Duration::from_secs(3));
        assert_eq!(health.readiness().0, StatusCode::SERVICE_UNAVAILABLE);
        health.record_sync(SyncKind::Full, Duration::from_millis(1), true);
        health.mark_ready();
        assert_eq!(health.readiness().0, StatusCode::OK);
        health.record_sync(SyncKind::Delta, Duration::from_millis(1), false);
        let (status, body) = health.readiness();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("last sync failed"), "{body}");
        health.record_sync(SyncKind::Full, Duration::from_millis(1), true);
        assert_eq!(health.readiness().0, StatusCode::OK);
    }
}
