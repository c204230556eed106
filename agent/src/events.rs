//! What the agent cannot enforce as written, told once per change: in its log, and as Kubernetes
//! Events on the NetworkPolicy (`kubectl describe networkpolicy`, `kubectl get events`).
//!
//! ```text
//! Compiler::diagnostics -> Findings: a new one logged once (warn), a resolved one once (info)
//!   API source, at most once a tick: findings whose policy elects this node, not yet handed on
//!   -> Recorder: bounded queue, never waits (full: dropped and counted)
//!   -> its task: rate limit -> PATCH the series of the same finding recorded in the last
//!      minutes, or POST a new events.k8s.io/v1 Event -> /metrics; failures logged, rate-limited
//! ```
//!
//! Of every agent that sees a finding, one reports it: among the nodes running a pod that the
//! policy selects (as enforced: a broken selector selects its superset), the node ranked
//! highest for that policy by rendezvous hashing. Every agent watches the same pods, so they
//! agree without talking, and a policy selecting pods on thousands of nodes still yields one
//! Event. A policy that selects no running pod is reported by no node until it does; every
//! agent logs it all the same.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::Hasher;
use std::time::{Duration, Instant};

use fnv::FnvHasher;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::Resource as _;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use ruleset::{Cluster, Compiler, Diagnostic};
use tokio::sync::mpsc;

use crate::health::{EventOutcome, Health};

/// `reportingController` of every Event the agent records.
pub const REPORTING_CONTROLLER: &str = "nftpol.io/agent";
/// `reason`: why (stable, for `--field-selector reason=Unenforceable` and alerts).
pub const REASON: &str = "Unenforceable";
/// `action`: what the agent did about it.
pub const ACTION: &str = "FailClosed";

/// Limits the API server puts on an Event's fields, in bytes.
const NOTE_MAX: usize = 1024;
const INSTANCE_MAX: usize = 128;
const NAME_MAX: usize = 253;

/// One part of one NetworkPolicy object that cannot be enforced as written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Finding {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    /// Path of the field, e.g. `spec.ingress[0].from[1].ipBlock.except[0]`.
    pub field: String,
    /// What is wrong with it and what the compiler did instead.
    pub reason: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "networkpolicy {}/{}: {}: {}",
            self.namespace, self.name, self.field, self.reason
        )
    }
}

impl Finding {
    /// The finding a diagnostic reports, with the uid the policy has in `cluster`.
    pub fn new(diagnostic: &Diagnostic, cluster: &Cluster) -> Self {
        let (namespace, name) = diagnostic
            .policy
            .split_once('/')
            .unwrap_or(("", &diagnostic.policy));
        let uid = cluster
            .policies_in(namespace)
            .find(|p| p.name == name)
            .and_then(|p| p.uid.clone());
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid,
            field: diagnostic.field.clone(),
            reason: diagnostic.reason.clone(),
        }
    }

    /// The Event's message: the field, what is wrong, what the agent does about it.
    pub fn note(&self) -> String {
        let note = format!(
            "{}: {}. Failing closed: the pods this policy selects stay isolated, and this part \
             allows no traffic until the field is fixed.",
            self.field, self.reason
        );
        truncate(note, NOTE_MAX)
    }

    /// A new events.k8s.io/v1 Event about this finding, reported by node `instance`.
    pub fn event(&self, instance: &str, now: Timestamp) -> Event {
        Event {
            metadata: ObjectMeta {
                name: Some(event_name(&self.name, now)),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".into()),
            reason: Some(REASON.into()),
            action: Some(ACTION.into()),
            note: Some(self.note()),
            regarding: Some(ObjectReference {
                api_version: Some(NetworkPolicy::API_VERSION.into()),
                kind: Some(NetworkPolicy::KIND.into()),
                namespace: Some(self.namespace.clone()),
                name: Some(self.name.clone()),
                uid: self.uid.clone(),
                field_path: Some(self.field.clone()),
                ..ObjectReference::default()
            }),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(truncate(instance.to_string(), INSTANCE_MAX)),
            ..Event::default()
        }
    }
}

/// `text` cut to at most `max` bytes, on a character boundary, marked with `...` when cut.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str("...");
    text
}

/// `<policy>.<nanoseconds in hex>`, as client-go names events, kept a valid object name.
fn event_name(policy: &str, now: Timestamp) -> String {
    let suffix = format!(".{:x}", now.as_nanosecond());
    let mut stem = policy;
    if stem.len() + suffix.len() > NAME_MAX {
        // Object names are ASCII; a cut name must still end in a letter or digit.
        stem = stem[..NAME_MAX - suffix.len()].trim_end_matches(['-', '.']);
    }
    format!("{stem}{suffix}")
}

/// The node that reports the findings of policy `namespace/name`: of the nodes running an
/// enforceable pod the policy selects, the one ranked highest for it. `None` when it selects
/// no such pod.
pub fn reporter<'a>(compiler: &'a Compiler, namespace: &str, name: &str) -> Option<&'a str> {
    let policy = compiler
        .policies_in(namespace)
        .iter()
        .find(|p| p.name == name)?;
    let key = format!("{namespace}/{name}");
    compiler
        .cluster()
        .pods_in(namespace)
        .filter(|p| p.is_enforceable() && policy.selector.matches(&p.labels))
        .filter_map(|p| p.node.as_deref())
        .max_by_key(|node| (rank(&key, node), *node))
}

/// Rendezvous score of `node` for `policy`: FNV-1a (a fixed algorithm, so agents of different
/// builds agree) with a final mix, as FNV alone spreads similar names poorly.
fn rank(policy: &str, node: &str) -> u64 {
    let mut hasher = FnvHasher::default();
    hasher.write(policy.as_bytes());
    hasher.write(&[0]);
    hasher.write(node.as_bytes());
    // The splitmix64 finalizer.
    let mut x = hasher.finish();
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The current findings, and which ones this node has reported.
#[derive(Debug, Default)]
pub struct Findings {
    /// Each current finding, and whether it went to the recorder. A finding that goes away
    /// and comes back is reported again.
    current: BTreeMap<Finding, bool>,
    /// What changed since [`Findings::due`] last looked: the findings themselves (all are
    /// looked at), or pods in these namespaces (a policy's reporter depends only on the pods
    /// of its own namespace).
    changed: Changed,
}

#[derive(Debug, Default)]
struct Changed {
    all: bool,
    namespaces: BTreeSet<String>,
}

impl Findings {
    /// Takes the compiler's diagnostics after a change of policies or namespaces: a finding
    /// that is new is logged as a warning, one that went away as resolved; the rest are
    /// already known and say nothing.
    pub fn update(&mut self, compiler: &Compiler) {
        let now: BTreeSet<Finding> = compiler
            .diagnostics()
            .iter()
            .map(|d| Finding::new(d, compiler.cluster()))
            .collect();
        self.current.retain(|finding, _| {
            let stays = now.contains(finding);
            if !stays {
                tracing::info!("{finding}: resolved");
            }
            stays
        });
        for finding in now {
            if let Entry::Vacant(new) = self.current.entry(finding) {
                tracing::warn!("{}", new.key());
                new.insert(false);
            }
        }
        self.changed.all = true;
    }

    /// Pods of these namespaces changed: the node that reports a policy there may be another
    /// one now.
    pub fn pods_changed(&mut self, namespaces: impl IntoIterator<Item = String>) {
        self.changed.namespaces.extend(namespaces);
    }

    /// How many fields of policies cannot be enforced as written.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// The findings this node reports and has not reported yet, now marked as reported.
    /// Only those whose policy or pods changed since the last call are looked at, so calling
    /// it every tick costs nothing in a quiet cluster.
    pub fn due(&mut self, compiler: &Compiler) -> Vec<Finding> {
        let changed = std::mem::take(&mut self.changed);
        let mut elected: HashMap<(String, String), bool> = HashMap::new();
        let mut due = Vec::new();
        for (finding, reported) in &mut self.current {
            if *reported || !(changed.all || changed.namespaces.contains(&finding.namespace)) {
                continue;
            }
            let here = *elected
                .entry((finding.namespace.clone(), finding.name.clone()))
                .or_insert_with(|| {
                    reporter(compiler, &finding.namespace, &finding.name) == Some(compiler.node())
                });
            if here {
                *reported = true;
                due.push(finding.clone());
            }
        }
        due
    }
}

/// Logs a recurring failure at most once per period, saying how many went unlogged.
#[derive(Debug)]
struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(occurrences left unlogged since the last log)` when this one is to be logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A token bucket: `burst` posts at once, then one per `every`.
#[derive(Debug)]
struct RateLimit {
    burst: f64,
    every: Duration,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    fn new(burst: u32, every: Duration, now: Instant) -> Self {
        Self {
            burst: f64::from(burst),
            every,
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes a token; how long to wait before using it.
    fn take(&mut self, now: Instant) -> Duration {
        let earned =
            now.saturating_duration_since(self.at).as_secs_f64() / self.every.as_secs_f64();
        self.tokens = (self.tokens + earned).min(self.burst) - 1.0;
        self.at = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            self.every.mul_f64(-self.tokens)
        }
    }
}

/// Findings waiting to be posted; beyond this, new ones are dropped.
const QUEUE: usize = 256;
/// Posts at once after a quiet spell, then one per [`POST_EVERY`].
const BURST: u32 = 25;
const POST_EVERY: Duration = Duration::from_secs(1);
/// A post that takes longer failed.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// The same finding again within this long becomes a count on the first Event (its series),
/// as client-go and kube-rs aggregate.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// Findings remembered for series at most; the oldest go first.
const SERIES_MAX: usize = 4096;
/// Failures and drops are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Records Events from a task of its own: the reconcile loop hands findings over and never
/// waits for the API server.
pub struct Recorder {
    queue: mpsc::Sender<Finding>,
    health: Health,
    drops: Throttle,
}

impl Recorder {
    /// Starts the recording task on the current runtime; it ends when the recorder is dropped.
    /// `node` is the reporting instance.
    pub fn start(client: Client, node: &str, health: Health) -> Self {
        let (queue, findings) = mpsc::channel(QUEUE);
        tokio::spawn(post_all(client, node.to_string(), findings, health.clone()));
        Self {
            queue,
            health,
            drops: Throttle::new(LOG_EVERY),
        }
    }

    /// Queues an Event for each finding, without waiting; a full queue drops it.
    pub fn record(&mut self, findings: Vec<Finding>) {
        for finding in findings {
            if let Err(err) = self.queue.try_send(finding) {
                self.health.record_event(EventOutcome::Dropped);
                if let Some(unlogged) = self.drops.allow(Instant::now()) {
                    let finding = err.into_inner();
                    tracing::warn!(
                        %finding,
                        unlogged,
                        "too many Events waiting for the API server; this one is dropped (the log has it)"
                    );
                }
            }
        }
    }
}

/// What was recorded of each finding lately, for series.
#[derive(Debug, Default)]
struct Series {
    seen: BTreeMap<Finding, Seen>,
}

#[derive(Clone, Debug)]
struct Seen {
    /// The Event's name.
    name: String,
    count: i32,
    at: Instant,
}

impl Series {
    fn forget_before(&mut self, now: Instant) {
        self.seen
            .retain(|_, s| now.duration_since(s.at) < SERIES_WINDOW);
        while self.seen.len() >= SERIES_MAX {
            let oldest = self
                .seen
                .iter()
                .min_by_key(|(_, s)| s.at)
                .map(|(f, _)| f.clone());
            match oldest {
                Some(f) => self.seen.remove(&f),
                None => break,
            };
        }
    }
}

async fn post_all(
    client: Client,
    instance: String,
    mut findings: mpsc::Receiver<Finding>,
    health: Health,
) {
    let mut series = Series::default();
    let mut limit = RateLimit::new(BURST, POST_EVERY, Instant::now());
    let mut failures = Throttle::new(LOG_EVERY);
    while let Some(finding) = findings.recv().await {
        let wait = limit.take(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let outcome = tokio::time::timeout(
            POST_TIMEOUT,
            post(&client, &instance, &mut series, &finding),
        )
        .await;
        let error = match outcome {
            Ok(Ok(outcome)) => {
                health.record_event(outcome);
                tracing::info!(%finding, ?outcome, "recorded a Kubernetes Event");
                continue;
            }
            Ok(Err(kube::Error::Api(status))) => format!(
                "the API server answered {} {}: {}",
                status.code, status.reason, status.message
            ),
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {POST_TIMEOUT:?}"),
        };
        health.record_event(EventOutcome::Failed);
        if let Some(unlogged) = failures.allow(Instant::now()) {
            tracing::warn!(
                %finding,
                %error,
                unlogged,
                "cannot record a Kubernetes Event; dropped (the log has the finding)"
            );
        }
    }
}

/// Records one finding: a count more on its Event when it was recorded lately, else a new one.
async fn post(
    client: &Client,
    instance: &str,
    series: &mut Series,
    finding: &Finding,
) -> Result<EventOutcome, kube::Error> {
    let (now, at) = (Timestamp::now(), Instant::now());
    series.forget_before(at);
    let events: Api<Event> = Api::namespaced(client.clone(), &finding.namespace);
    if let Some(seen) = series.seen.get_mut(finding) {
        let count = seen.count + 1;
        let patch = serde_json::json!({
            "series": EventSeries { count, last_observed_time: MicroTime(now) },
        });
        match events
            .patch(&seen.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                seen.count = count;
                seen.at = at;
                return Ok(EventOutcome::Aggregated);
            }
            // Gone from the server (expired or deleted): record it anew.
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err),
        }
    }
    let event = finding.event(instance, now);
    let created = events.create(&PostParams::default(), &event).await?;
    let name = created
        .metadata
        .name
        .or(event.metadata.name)
        .unwrap_or_default();
    series
        .seen
        .insert(finding.clone(), Seen { name, count: 1, at });
    Ok(EventOutcome::Created)
}

#[cfg(test)]
mod tests {
    use ruleset::model::{IpBlock, LabelSelector, NetworkPolicy, Peer, Pod, PolicyRule};

    use super::*;

    fn pod(name: &str, node: &str, app: &str, ip: &str) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: name.into(),
            node: Some(node.into()),
            labels: [("app".to_string(), app.to_string())].into(),
            ips: vec![ip.parse().unwrap()],
            phase: Some("Running".into()),
            ..Pod::default()
        }
    }

    /// A policy on app=`app` whose first ingress peer has an except outside its cidr.
    fn broken(name: &str, app: &str) -> NetworkPolicy {
        NetworkPolicy {
            namespace: "shop".into(),
            name: name.into(),
            uid: Some(format!("uid-{name}")),
            pod_selector: LabelSelector {
                match_labels: [("app".to_string(), app.to_string())].into(),
                ..LabelSelector::default()
            },
            ingress: vec![PolicyRule {
                peers: vec![Peer {
                    ip_block: Some(IpBlock {
                        cidr: "10.0.0.0/24".into(),
                        except: vec!["10.1.0.0/25".into()],
                    }),
                    ..Peer::default()
                }],
                ports: vec![],
            }],
            ..NetworkPolicy::default()
        }
    }

    fn compiler(node: &str, pods: Vec<Pod>, policies: Vec<NetworkPolicy>) -> Compiler {
        Compiler::new(Cluster::from_objects([], pods, policies), node)
    }

    #[test]
    fn the_event_names_the_policy_the_field_and_what_the_agent_does() {
        let c = compiler("node-a", vec![], vec![broken("web", "web")]);
        let finding = Finding::new(&c.diagnostics()[0], c.cluster());
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let event = finding.event("node-a", now);
        let regarding = event.regarding.as_ref().unwrap();
        assert_eq!(regarding.kind.as_deref(), Some("NetworkPolicy"));
        assert_eq!(
            regarding.api_version.as_deref(),
            Some("networking.k8s.io/v1")
        );
        assert_eq!(regarding.namespace.as_deref(), Some("shop"));
        assert_eq!(regarding.name.as_deref(), Some("web"));
        assert_eq!(regarding.uid.as_deref(), Some("uid-web"));
        let field = "spec.ingress[0].from[0].ipBlock.except[0]";
        assert_eq!(regarding.field_path.as_deref(), Some(field));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reason.as_deref(), Some(REASON));
        assert_eq!(event.action.as_deref(), Some(ACTION));
        assert_eq!(
            event.reporting_controller.as_deref(),
            Some(REPORTING_CONTROLLER)
        );
        assert_eq!(event.reporting_instance.as_deref(), Some("node-a"));
        assert_eq!(event.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(
            event.metadata.name.as_deref(),
            Some(format!("web.{:x}", 1_700_000_000_000_000_000_i128).as_str())
        );
        assert!(event.series.is_none());
        let note = event.note.unwrap();
        assert!(
            note.starts_with(&format!(
                "{field}: 10.1.0.0/25 is not a strict subset of cidr 10.0.0.0/24"
            )),
            "{note}"
        );
        assert!(note.contains("stay isolated"), "{note}");
    }

    #[test]
    fn long_values_are_cut_to_what_the_api_server_takes() {
        let finding = Finding {
            namespace: "shop".into(),
            name: "p".repeat(NAME_MAX),
            uid: None,
            field: "spec.ingress[0].from[0].ipBlock.cidr".into(),
            reason: format!("{:?} is not a CIDR", "é".repeat(2000)),
        };
        let event = finding.event(&"n".repeat(300), Timestamp::now());
        let note = event.note.unwrap();
        assert!(
            note.len() <= NOTE_MAX && note.ends_with("..."),
            "{}",
            note.len()
        );
        assert_eq!(event.reporting_instance.unwrap().len(), INSTANCE_MAX);
        let name = event.metadata.name.unwrap();
        assert!(name.len() <= NAME_MAX && name.starts_with("ppp"), "{name}");
        // Cut where the name had a separator: the separator goes too.
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let cut = event_name(&format!("{}-.bbbb", "a".repeat(234)), now);
        assert_eq!(
            cut,
            format!("{}.{:x}", "a".repeat(234), now.as_nanosecond())
        );
    }

    #[test]
    fn one_node_reports_a_policy_and_only_a_node_running_a_pod_it_selects() {
        let nodes: Vec<String> = (0..50).map(|i| format!("node-{i}")).collect();
        let pods: Vec<Pod> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| pod(&format!("web-{i}"), n, "web", &format!("10.1.0.{}", i + 1)))
            .chain([pod("db-0", "node-db", "db", "10.1.1.1")])
            .collect();
        let policies = vec![
            broken("web", "web"),
            broken("db", "db"),
            broken("none", "x"),
        ];
        let elected: Vec<&str> = nodes
            .iter()
            .map(String::as_str)
            .chain(["node-db", "node-idle"])
            .filter(|node| {
                let c = compiler(node, pods.clone(), policies.clone());
                reporter(&c, "shop", "web") == Some(*node)
            })
            .collect();
        assert_eq!(elected.len(), 1, "{elected:?}");
        assert!(nodes.iter().any(|n| n == elected[0]));
        let c = compiler("node-db", pods.clone(), policies.clone());
        assert_eq!(reporter(&c, "shop", "db"), Some("node-db"));
        assert_eq!(reporter(&c, "shop", "none"), None);
        // Policies spread over the nodes.
        let reporters: BTreeSet<String> = (0..20)
            .filter_map(|i| {
                let name = format!("p{i}");
                let c = compiler("node-0", pods.clone(), vec![broken(&name, "web")]);
                reporter(&c, "shop", &name).map(str::to_string)
            })
            .collect();
        assert!(reporters.len() > 5, "{reporters:?}");
    }

    #[test]
    fn findings_are_due_once_each_on_the_elected_node() {
        let pods = vec![pod("web-0", "node-a", "web", "10.1.0.1")];
        let mut findings = Findings::default();
        let mut policy = broken("web", "web");
        let c = compiler("node-a", pods.clone(), vec![policy.clone()]);
        findings.update(&c);
        let due = findings.due(&c);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].field, "spec.ingress[0].from[0].ipBlock.except[0]");
        // The same finding after a resync or a pod change: nothing new.
        findings.update(&c);
        assert!(findings.due(&c).is_empty());
        findings.pods_changed(["shop".to_string()]);
        assert!(findings.due(&c).is_empty());
        // A second problem: only it is due.
        policy.ingress[0].peers.push(Peer::default());
        let c = compiler("node-a", pods.clone(), vec![policy.clone()]);
        findings.update(&c);
        let due = findings.due(&c);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].field, "spec.ingress[0].from[1]");
        assert_eq!(findings.len(), 2);
        // Fixed: nothing due, nothing left.
        policy.ingress.clear();
        let c = compiler("node-a", pods.clone(), vec![policy]);
        findings.update(&c);
        assert!(findings.due(&c).is_empty());
        assert!(findings.is_empty());
        // Node-b does not report what node-a does, until node-b runs the pod the policy selects.
        let mut other = Findings::default();
        let b = compiler("node-b", pods, vec![broken("web", "web")]);
        other.update(&b);
        assert!(other.due(&b).is_empty());
        let moved = vec![pod("web-0", "node-b", "web", "10.1.0.1")];
        let b = compiler("node-b", moved, vec![broken("web", "web")]);
        // Pods of another namespace changed: not looked at again.
        other.pods_changed(["billing".to_string()]);
        assert!(other.due(&b).is_empty());
        other.pods_changed(["shop".to_string()]);
        assert_eq!(other.due(&b).len(), 1);
    }

    #[test]
    fn throttle_logs_once_per_period_and_counts_the_rest() {
        let start = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(60));
        assert_eq!(t.allow(start), Some(0));
        assert_eq!(t.allow(start + Duration::from_secs(1)), None);
        assert_eq!(t.allow(start + Duration::from_secs(2)), None);
        assert_eq!(t.allow(start + Duration::from_secs(61)), Some(2));
    }

    #[test]
    fn rate_limit_allows_a_burst_then_spaces_posts() {
        let start = Instant::now();
        let mut limit = RateLimit::new(2, Duration::from_secs(1), start);
        assert_eq!(limit.take(start), Duration::ZERO);
        assert_eq!(limit.take(start), Duration::ZERO);
        assert_eq!(limit.take(start), Duration::from_secs(1));
        assert_eq!(limit.take(start), Duration::from_secs(2));
        // Ten quiet seconds refill the burst, no more.
        let later = start + Duration::from_secs(12);
        assert_eq!(limit.take(later), Duration::ZERO);
        assert_eq!(limit.take(later), Duration::ZERO);
        assert_eq!(limit.take(later), Duration::from_secs(1));
    }
}
