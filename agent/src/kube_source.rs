//! The Kubernetes API as the cluster source: three watches, each object turned into the
//! compiler's model the moment it is read.
//!
//! ```text
//! API server -list/watch-> watcher (backoff) -> Entry<K> (key + model, or why not) -> Update (mpsc)
//!   until Pods, Namespaces and NetworkPolicies are all listed: Mirror (a Cluster) -> Compiler::new
//!   then: Batch (last word per object; a relist becomes applies and deletes) -> Compiler -> Delta
//! ```
//!
//! A watch that fails keeps the last state (fail static) and reconnects with backoff. After an
//! expired resourceVersion (410 Gone) or a reconnect, the watcher lists again; the listing
//! arrives as one [`Update::Listed`] once complete, so no partial state is ever applied, and
//! whatever is not in it is deleted. An object that does not deserialize or convert is logged
//! and skipped; it never fails the page it came in.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config};
use ruleset::cluster::with_name_label;
use ruleset::model::{Namespace, NetworkPolicy, Pod, NAMESPACE_NAME_LABEL};
use ruleset::{diff, Cluster, Compiler, Delta};
use serde::de::{DeserializeOwned, Deserializer};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::convert;

pub use kube::runtime::watcher::Config as WatchConfig;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no API server configuration (in-cluster or KUBECONFIG): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the API server named by `kubeconfig`, or else the in-cluster configuration,
/// or else `KUBECONFIG` / `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, SourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| SourceError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(err)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// The kinds watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Namespace,
    NetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Pod, Kind::Namespace, Kind::NetworkPolicy];
}

/// `namespace/name` of a namespaced object; the namespace is empty for a Namespace.
pub type Key = (String, String);

/// One change the API server reported, in the compiler's terms.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    ApplyPod(Pod),
    DeletePod {
        namespace: String,
        name: String,
    },
    ApplyNamespace(Namespace),
    DeleteNamespace {
        name: String,
    },
    ApplyPolicy(NetworkPolicy),
    DeletePolicy {
        namespace: String,
        name: String,
    },
    /// A complete list of one kind (first list or relist): objects not in it are gone.
    Listed(Listing),
    /// The watch of one kind failed; it reconnects with backoff while the last state stays.
    Interrupted {
        kind: Kind,
        error: String,
    },
}

/// Every object of one kind, at one resourceVersion.
#[derive(Clone, Debug, PartialEq)]
pub struct Listing {
    /// Objects new or changed since the watch last sent them (all of them on a first list).
    pub objects: ListedObjects,
    /// Objects listed as the watch last sent them: whatever was known of them stays.
    pub unchanged: BTreeSet<Key>,
    /// Objects that exist but could not be read: whatever was known of them stays.
    pub unreadable: BTreeSet<Key>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ListedObjects {
    Pods(Vec<Pod>),
    Namespaces(Vec<Namespace>),
    Policies(Vec<NetworkPolicy>),
}

impl Listing {
    pub fn kind(&self) -> Kind {
        match self.objects {
            ListedObjects::Pods(_) => Kind::Pod,
            ListedObjects::Namespaces(_) => Kind::Namespace,
            ListedObjects::Policies(_) => Kind::NetworkPolicy,
        }
    }
}

/// A Kubernetes type the source watches, with its conversion to the model.
pub trait Watched:
    k8s_openapi::Resource + DeserializeOwned + Clone + Debug + Send + Sync + 'static
{
    type Model: Clone + Debug + Hash + Send + Sync + 'static;
    const WATCHED: Kind;
    fn convert(self) -> Self::Model;
    /// `namespace/name` as the cluster index keys the model.
    fn key(model: &Self::Model) -> Key;
    fn apply(model: Self::Model) -> Update;
    fn delete(key: Key) -> Update;
    fn listed(models: Vec<Self::Model>) -> ListedObjects;
}

impl Watched for core::Pod {
    type Model = Pod;
    const WATCHED: Kind = Kind::Pod;
    fn convert(self) -> Pod {
        convert::pod(self)
    }
    fn key(pod: &Pod) -> Key {
        (pod.namespace.clone(), pod.name.clone())
    }
    fn apply(model: Pod) -> Update {
        Update::ApplyPod(model)
    }
    fn delete((namespace, name): Key) -> Update {
        Update::DeletePod { namespace, name }
    }
    fn listed(models: Vec<Pod>) -> ListedObjects {
        ListedObjects::Pods(models)
    }
}

impl Watched for core::Namespace {
    type Model = Namespace;
    const WATCHED: Kind = Kind::Namespace;
    fn convert(self) -> Namespace {
        convert::namespace(self)
    }
    fn key(ns: &Namespace) -> Key {
        (String::new(), ns.name.clone())
    }
    fn apply(model: Namespace) -> Update {
        Update::ApplyNamespace(model)
    }
    fn delete((_, name): Key) -> Update {
        Update::DeleteNamespace { name }
    }
    fn listed(models: Vec<Namespace>) -> ListedObjects {
        ListedObjects::Namespaces(models)
    }
}

impl Watched for net::NetworkPolicy {
    type Model = NetworkPolicy;
    const WATCHED: Kind = Kind::NetworkPolicy;
    fn convert(self) -> NetworkPolicy {
        convert::network_policy(self)
    }
    fn key(policy: &NetworkPolicy) -> Key {
        (policy.namespace.clone(), policy.name.clone())
    }
    fn apply(model: NetworkPolicy) -> Update {
        Update::ApplyPolicy(model)
    }
    fn delete((namespace, name): Key) -> Update {
        Update::DeletePolicy { namespace, name }
    }
    fn listed(models: Vec<NetworkPolicy>) -> ListedObjects {
        ListedObjects::Policies(models)
    }
}

/// What the watcher carries for one object: the metadata it needs (name, namespace,
/// resourceVersion) and the converted model, or why there is none. Deserializing never fails,
/// so one bad object cannot fail a list page or a watch line.
#[derive(Clone, Debug)]
pub struct Entry<K: Watched> {
    metadata: ObjectMeta,
    model: Result<K::Model, String>,
    kind: PhantomData<K>,
}

impl<K: Watched> Entry<K> {
    /// Reads one object as the API server sent it.
    pub fn from_value(value: Value) -> Self {
        let meta = value.get("metadata");
        let text = |field: &str| {
            meta.and_then(|m| m.get(field))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let metadata = ObjectMeta {
            name: text("name"),
            namespace: text("namespace"),
            resource_version: text("resourceVersion"),
            ..ObjectMeta::default()
        };
        let model = serde_path_to_error::deserialize::<_, K>(value)
            .map(K::convert)
            .map_err(|err| format!("field {}: {}", err.path(), err.inner()));
        Self {
            metadata,
            model,
            kind: PhantomData,
        }
    }

    /// `namespace/name` as the model keys it; `None` without a name.
    pub fn key(&self) -> Option<Key> {
        let name = self.metadata.name.clone()?;
        let namespace = match K::WATCHED {
            Kind::Namespace => String::new(),
            // As convert.rs keys the model.
            _ => convert::namespace_of(self.metadata.namespace.as_deref()),
        };
        Some((namespace, name))
    }

    /// The model, or `None` after logging why the object is skipped.
    pub fn into_model(self) -> Option<K::Model> {
        let object = self.describe();
        match self.model {
            Ok(model) => Some(model),
            Err(reason) => {
                tracing::warn!(
                    kind = K::KIND,
                    %object,
                    %reason,
                    "object does not deserialize; skipped"
                );
                None
            }
        }
    }

    fn describe(&self) -> String {
        match (&self.metadata.namespace, &self.metadata.name) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            (None, Some(name)) => name.clone(),
            (_, None) => "(no name)".into(),
        }
    }
}

impl<'de, K: Watched> Deserialize<'de> for Entry<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(Self::from_value)
    }
}

impl<K: Watched> k8s_openapi::Resource for Entry<K> {
    const API_VERSION: &'static str = K::API_VERSION;
    const GROUP: &'static str = K::GROUP;
    const KIND: &'static str = K::KIND;
    const VERSION: &'static str = K::VERSION;
    const URL_PATH_SEGMENT: &'static str = K::URL_PATH_SEGMENT;
    type Scope = K::Scope;
}

impl<K: Watched> k8s_openapi::Metadata for Entry<K> {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Lists the whole cluster once (for `dump-ruleset` and `trace`): all three kinds, complete.
pub async fn list_once(kubeconfig: Option<&Path>) -> Result<Cluster, SourceError> {
    let mut source = Source::start(client(kubeconfig).await?);
    let mut mirror = Mirror::new();
    while !mirror.ready() {
        match source.recv().await {
            Some(Update::Interrupted { kind, error }) => {
                tracing::warn!(?kind, %error, "listing interrupted; retrying");
            }
            Some(update) => {
                mirror.apply(update);
            }
            None => break,
        }
    }
    Ok(mirror.into_cluster())
}

/// How many updates may wait for the reconcile loop before the watches pause.
const CHANNEL_DEPTH: usize = 4096;

/// The three watches, running as tasks on the current runtime; dropped, they stop.
pub struct Source {
    updates: mpsc::Receiver<Update>,
    tasks: Vec<JoinHandle<()>>,
}

impl Source {
    /// Starts watching Pods in all namespaces, Namespaces and NetworkPolicies.
    pub fn start(client: Client) -> Self {
        Self::with_config(client, WatchConfig::default())
    }

    /// As [`Source::start`], with the watcher's page size, timeout and the like set.
    pub fn with_config(client: Client, config: WatchConfig) -> Self {
        let (tx, updates) = mpsc::channel(CHANNEL_DEPTH);
        let tasks = vec![
            tokio::spawn(watch::<core::Pod>(
                client.clone(),
                config.clone(),
                tx.clone(),
            )),
            tokio::spawn(watch::<core::Namespace>(
                client.clone(),
                config.clone(),
                tx.clone(),
            )),
            tokio::spawn(watch::<net::NetworkPolicy>(client, config, tx)),
        ];
        Self { updates, tasks }
    }

    /// The next update; `None` once every watch has stopped.
    pub async fn recv(&mut self) -> Option<Update> {
        self.updates.recv().await
    }

    /// An update that is already waiting, if any.
    pub fn try_recv(&mut self) -> Option<Update> {
        self.updates.try_recv().ok()
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn watch<K: Watched>(client: Client, config: watcher::Config, tx: mpsc::Sender<Update>) {
    let api: Api<Entry<K>> = Api::all(client);
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    let mut lister = Lister::<K>::new();
    while let Some(event) = events.next().await {
        let update = match event {
            Ok(Event::Init) => {
                lister.init();
                None
            }
            Ok(Event::InitApply(entry)) => {
                lister.init_apply(entry);
                None
            }
            Ok(Event::InitDone) => Some(lister.init_done()),
            Ok(Event::Apply(entry)) => lister.apply(entry),
            Ok(Event::Delete(entry)) => lister.delete(&entry),
            Err(err) => {
                tracing::warn!(kind = K::KIND, %err, "watch interrupted; the last state stays, reconnecting");
                Some(Update::Interrupted {
                    kind: K::WATCHED,
                    error: err.to_string(),
                })
            }
        };
        if let Some(update) = update {
            if tx.send(update).await.is_err() {
                return;
            }
        }
    }
}

/// One watch's list in progress, and a fingerprint of each object as the watch last sent it,
/// so that a relist (after 410 Gone or a reconnect) passes an object unchanged since by key
/// instead of sending a second copy of the whole cluster to the reconcile loop.
struct Lister<K: Watched> {
    /// Random keys: whoever writes an object cannot aim for a collision.
    hasher: RandomState,
    /// Fingerprint of the model last sent, by fingerprint of its key. Two keys that collide
    /// only cost a full copy of one of them at the next relist.
    sent: HashMap<u64, u64>,
    /// Objects of a list in progress, held until it is complete.
    listing: Option<PendingList<K>>,
}

struct PendingList<K: Watched> {
    changed: Vec<K::Model>,
    unchanged: BTreeSet<Key>,
    unreadable: BTreeSet<Key>,
    /// `Lister::sent` once this list is complete (what it does not hold is deleted).
    sent: HashMap<u64, u64>,
}

impl<K: Watched> Default for PendingList<K> {
    fn default() -> Self {
        Self {
            changed: Vec::new(),
            unchanged: BTreeSet::new(),
            unreadable: BTreeSet::new(),
            sent: HashMap::new(),
        }
    }
}

impl<K: Watched> Lister<K> {
    fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            sent: HashMap::new(),
            listing: None,
        }
    }

    fn init(&mut self) {
        self.listing = Some(PendingList::default());
    }

    fn init_apply(&mut self, entry: Entry<K>) {
        let listing = self.listing.get_or_insert_with(PendingList::default);
        let entry_key = entry.key();
        match entry.into_model() {
            Some(model) => {
                let key = K::key(&model);
                let at = self.hasher.hash_one(&key);
                let fingerprint = self.hasher.hash_one(&model);
                listing.sent.insert(at, fingerprint);
                if self.sent.get(&at) == Some(&fingerprint) {
                    listing.unchanged.insert(key);
                } else {
                    listing.changed.push(model);
                }
            }
            None => {
                // The receiver keeps what it had, which is what was sent.
                if let Some(key) = entry_key {
                    let at = self.hasher.hash_one(&key);
                    if let Some(&fingerprint) = self.sent.get(&at) {
                        listing.sent.insert(at, fingerprint);
                    }
                    listing.unreadable.insert(key);
                }
            }
        }
    }

    fn init_done(&mut self) -> Update {
        let listing = self.listing.take().unwrap_or_default();
        tracing::info!(
            kind = K::KIND,
            objects = listing.changed.len() + listing.unchanged.len(),
            changed = listing.changed.len(),
            "listed"
        );
        self.sent = listing.sent;
        Update::Listed(Listing {
            objects: K::listed(listing.changed),
            unchanged: listing.unchanged,
            unreadable: listing.unreadable,
        })
    }

    fn apply(&mut self, entry: Entry<K>) -> Option<Update> {
        let model = entry.into_model()?;
        let at = self.hasher.hash_one(K::key(&model));
        self.sent.insert(at, self.hasher.hash_one(&model));
        Some(K::apply(model))
    }

    fn delete(&mut self, entry: &Entry<K>) -> Option<Update> {
        let key = entry.key()?;
        self.sent.remove(&self.hasher.hash_one(&key));
        Some(K::delete(key))
    }
}

/// The cluster as listed so far, before the first sync.
#[derive(Debug, Default)]
pub struct Mirror {
    cluster: Cluster,
    listed: BTreeSet<Kind>,
}

impl Mirror {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one update; whether the cluster changed.
    pub fn apply(&mut self, update: Update) -> bool {
        if let Update::Listed(listing) = &update {
            self.listed.insert(listing.kind());
        }
        let mut batch = Batch::default();
        batch.push(update, &self.cluster);
        batch.apply_to_cluster(&mut self.cluster)
    }

    /// Whether all three initial lists are complete: only then may anything be programmed.
    pub fn ready(&self) -> bool {
        Kind::ALL.iter().all(|kind| self.listed.contains(kind))
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn into_cluster(self) -> Cluster {
        self.cluster
    }
}

/// Pod batches above this size recompile the node once instead of pod by pod.
const REBUILD_ABOVE_PODS: usize = 1000;

/// Updates waiting to be applied, reduced to the last word on each object. A listing becomes
/// an apply for each listed object and a delete for each known one it no longer has.
#[derive(Debug, Default)]
pub struct Batch {
    pods: BTreeMap<Key, Option<Pod>>,
    namespaces: BTreeMap<String, Option<Namespace>>,
    policies: BTreeMap<Key, Option<NetworkPolicy>>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an update; `current` is the cluster the batch will be applied to (a listing needs
    /// it to know what was deleted).
    pub fn push(&mut self, update: Update, current: &Cluster) {
        match update {
            Update::ApplyPod(pod) => {
                self.pods
                    .insert((pod.namespace.clone(), pod.name.clone()), Some(pod));
            }
            Update::DeletePod { namespace, name } => {
                self.pods.insert((namespace, name), None);
            }
            Update::ApplyNamespace(ns) => {
                self.namespaces.insert(ns.name.clone(), Some(ns));
            }
            Update::DeleteNamespace { name } => {
                self.namespaces.insert(name, None);
            }
            Update::ApplyPolicy(policy) => {
                self.policies.insert(
                    (policy.namespace.clone(), policy.name.clone()),
                    Some(policy),
                );
            }
            Update::DeletePolicy { namespace, name } => {
                self.policies.insert((namespace, name), None);
            }
            Update::Listed(Listing {
                objects,
                unchanged,
                unreadable,
            }) => match objects {
                ListedObjects::Pods(pods) => {
                    let known = current
                        .pods()
                        .map(|p| (p.namespace.clone(), p.name.clone()));
                    relist(
                        &mut self.pods,
                        known,
                        [&unchanged, &unreadable],
                        pods,
                        |p| (p.namespace.clone(), p.name.clone()),
                    );
                }
                ListedObjects::Namespaces(namespaces) => {
                    let mut pending = std::mem::take(&mut self.namespaces)
                        .into_iter()
                        .map(|(name, ns)| ((String::new(), name), ns))
                        .collect();
                    let known = current
                        .namespace_names()
                        .map(|name| (String::new(), name.to_string()));
                    relist(
                        &mut pending,
                        known,
                        [&unchanged, &unreadable],
                        namespaces,
                        |ns| (String::new(), ns.name.clone()),
                    );
                    self.namespaces = pending
                        .into_iter()
                        .map(|((_, name), ns)| (name, ns))
                        .collect();
                }
                ListedObjects::Policies(policies) => {
                    let known = current
                        .policies()
                        .map(|p| (p.namespace.clone(), p.name.clone()));
                    relist(
                        &mut self.policies,
                        known,
                        [&unchanged, &unreadable],
                        policies,
                        |p| (p.namespace.clone(), p.name.clone()),
                    );
                }
            },
            Update::Interrupted { .. } => {}
        }
    }

    /// Whether only pods change (no namespace or policy).
    pub fn pods_only(&self) -> bool {
        self.namespaces.is_empty() && self.policies.is_empty()
    }

    /// The namespaces of the pods the batch changes.
    pub fn pod_namespaces(&self) -> BTreeSet<String> {
        self.pods
            .keys()
            .map(|(namespace, _)| namespace.clone())
            .collect()
    }

    /// Number of objects the batch touches.
    pub fn len(&self) -> usize {
        self.pods.len() + self.namespaces.len() + self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the batch to a compiled node; the changes to its table, as one delta.
    ///
    /// Pod changes update the table incrementally; namespace and policy changes (or many
    /// pods) recompile the node once for the whole batch.
    pub fn apply(mut self, compiler: &mut Compiler) -> Delta {
        self.drop_no_ops(compiler.cluster());
        if self.is_empty() {
            return Delta::default();
        }
        let pods_only = self.namespaces.is_empty() && self.policies.is_empty();
        if pods_only && self.pods.len() == 1 {
            let mut delta = Delta::default();
            for ((namespace, name), pod) in self.pods {
                delta = match pod {
                    Some(pod) => compiler.apply_pod(pod),
                    None => compiler.delete_pod(&namespace, &name),
                };
            }
            return delta;
        }
        if pods_only && self.pods.len() <= REBUILD_ABOVE_PODS {
            let before = compiler.table().clone();
            for ((namespace, name), pod) in self.pods {
                match pod {
                    Some(pod) => compiler.apply_pod(pod),
                    None => compiler.delete_pod(&namespace, &name),
                };
            }
            return diff(&before, compiler.table());
        }
        let node = compiler.node().to_string();
        let options = compiler.options().clone();
        let placeholder = Compiler::new(Cluster::new(), &node);
        let (mut cluster, before) = std::mem::replace(compiler, placeholder).into_parts();
        self.apply_to_cluster(&mut cluster);
        *compiler = Compiler::with_options(cluster, &node, options);
        diff(&before, compiler.table())
    }

    /// Applies the batch to a cluster index; whether anything changed.
    pub fn apply_to_cluster(self, cluster: &mut Cluster) -> bool {
        let mut changed = false;
        for (name, ns) in self.namespaces {
            changed |= match ns {
                Some(ns) => cluster.apply_namespace(ns),
                None => cluster.delete_namespace(&name),
            };
        }
        for ((namespace, name), policy) in self.policies {
            changed |= match policy {
                Some(policy) => cluster.apply_policy(policy),
                None => cluster.delete_policy(&namespace, &name),
            };
        }
        for ((namespace, name), pod) in self.pods {
            changed |= match pod {
                Some(pod) => cluster.apply_pod(pod).is_some(),
                None => cluster.delete_pod(&namespace, &name).is_some(),
            };
        }
        changed
    }

    /// Forgets changes that would leave `current` as it is, so an unchanged relist costs no
    /// recompile.
    fn drop_no_ops(&mut self, current: &Cluster) {
        self.pods
            .retain(|(namespace, name), pod| current.pod(namespace, name) != pod.as_ref());
        self.policies.retain(|(namespace, name), policy| {
            current.policies_in(namespace).find(|p| &p.name == name) != policy.as_ref()
        });
        self.namespaces.retain(|name, ns| {
            let have = current.namespace_labels(name);
            match ns {
                Some(ns) => *have != with_name_label(name, ns.labels.clone()),
                None => have.keys().any(|key| key != NAMESPACE_NAME_LABEL),
            }
        });
    }
}

/// Puts a complete listing into `pending`: every listed object applied, every other known or
/// pending one deleted, except those in `kept` (listed unchanged, or unreadable).
fn relist<T>(
    pending: &mut BTreeMap<Key, Option<T>>,
    known: impl Iterator<Item = Key>,
    kept: [&BTreeSet<Key>; 2],
    listed: Vec<T>,
    key: impl Fn(&T) -> Key,
) {
    let listed: BTreeMap<Key, T> = listed.into_iter().map(|t| (key(&t), t)).collect();
    let gone: Vec<Key> = known
        .chain(pending.keys().cloned())
        .filter(|k| !listed.contains_key(k) && !kept.iter().any(|set| set.contains(k)))
        .collect();
    for k in gone {
        pending.insert(k, None);
    }
    for (k, t) in listed {
        pending.insert(k, Some(t));
    }
}

#[cfg(test)]
mod tests {
    use ruleset::model::Labels;

    use super::*;

    fn pod(name: &str, ip: &str, app: &str) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: name.into(),
            node: Some("node-a".into()),
            labels: [("app".to_string(), app.to_string())].into(),
            ips: vec![ip.parse().unwrap()],
            phase: Some("Running".into()),
            ..Pod::default()
        }
    }

    fn listed_pods(pods: Vec<Pod>) -> Update {
        Update::Listed(Listing {
            objects: ListedObjects::Pods(pods),
            unchanged: BTreeSet::new(),
            unreadable: BTreeSet::new(),
        })
    }

    #[test]
    fn bad_object_is_an_entry_without_model() {
        let entry = Entry::<core::Pod>::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "broken", "namespace": "shop", "resourceVersion": "7"},
            "spec": {"containers": "not a list"},
        }));
        assert_eq!(entry.key(), Some(("shop".into(), "broken".into())));
        assert!(entry
            .model
            .as_ref()
            .is_err_and(|e| e.contains("spec.containers")));
        assert_eq!(entry.into_model(), None);
    }

    #[test]
    fn ready_only_after_all_three_lists() {
        let mut mirror = Mirror::new();
        mirror.apply(listed_pods(vec![pod("a", "10.0.0.1", "web")]));
        mirror.apply(Update::Listed(Listing {
            objects: ListedObjects::Namespaces(vec![]),
            unchanged: BTreeSet::new(),
            unreadable: BTreeSet::new(),
        }));
        assert!(!mirror.ready());
        mirror.apply(Update::Listed(Listing {
            objects: ListedObjects::Policies(vec![]),
            unchanged: BTreeSet::new(),
            unreadable: BTreeSet::new(),
        }));
        assert!(mirror.ready());
    }

    #[test]
    fn relist_deletes_what_vanished_and_keeps_unreadable() {
        let mut mirror = Mirror::new();
        for name in ["a", "b", "c"] {
            mirror.apply(Update::ApplyPod(pod(name, "10.0.0.1", "web")));
        }
        let mut unreadable = BTreeSet::new();
        unreadable.insert(("shop".to_string(), "c".to_string()));
        mirror.apply(Update::Listed(Listing {
            objects: ListedObjects::Pods(vec![pod("a", "10.0.0.2", "web")]),
            unchanged: BTreeSet::new(),
            unreadable,
        }));
        let names: Vec<_> = mirror.cluster().pods().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(
            mirror.cluster().pod("shop", "a").unwrap().ips,
            ["10.0.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn batch_delta_turns_old_table_into_new() {
        let policy = NetworkPolicy {
            namespace: "shop".into(),
            name: "deny".into(),
            policy_types: vec!["Ingress".into()],
            ..NetworkPolicy::default()
        };
        let mut mirror = Mirror::new();
        mirror.apply(Update::ApplyPolicy(policy));
        mirror.apply(Update::ApplyPod(pod("a", "10.0.0.1", "web")));
        let mut compiler = Compiler::new(mirror.into_cluster(), "node-a");
        let mut installed = compiler.table().clone();

        let mut batch = Batch::new();
        batch.push(
            Update::ApplyPod(pod("b", "10.0.0.2", "db")),
            compiler.cluster(),
        );
        batch.push(
            Update::ApplyPod(pod("c", "10.0.0.3", "db")),
            compiler.cluster(),
        );
        batch.push(
            Update::ApplyPod(pod("a", "10.0.0.1", "web")),
            compiler.cluster(),
        );
        assert_eq!(batch.len(), 3);
        installed.apply(&batch.apply(&mut compiler));
        assert_eq!(&installed, compiler.table());

        let mut batch = Batch::new();
        batch.push(
            listed_pods(vec![pod("b", "10.0.0.2", "db")]),
            compiler.cluster(),
        );
        batch.push(
            Update::DeletePolicy {
                namespace: "shop".into(),
                name: "deny".into(),
            },
            compiler.cluster(),
        );
        installed.apply(&batch.apply(&mut compiler));
        assert_eq!(&installed, compiler.table());
        assert_eq!(compiler.cluster().pods().count(), 1);
        assert_eq!(compiler.cluster().policies().count(), 0);
        let fresh = Compiler::new(
            Cluster::from_objects([], [pod("b", "10.0.0.2", "db")], []),
            "node-a",
        );
        assert_eq!(compiler.table(), fresh.table());
    }

    #[test]
    fn unchanged_relist_is_no_change() {
        let compiler = Compiler::new(
            Cluster::from_objects(
                [Namespace {
                    name: "shop".into(),
                    labels: Labels::new(),
                }],
                [pod("a", "10.0.0.1", "web")],
                [],
            ),
            "node-a",
        );
        let mut batch = Batch::new();
        batch.push(
            listed_pods(vec![pod("a", "10.0.0.1", "web")]),
            compiler.cluster(),
        );
        batch.push(
            Update::Listed(Listing {
                objects: ListedObjects::Namespaces(vec![Namespace {
                    name: "shop".into(),
                    labels: Labels::new(),
                }]),
                unchanged: BTreeSet::new(),
                unreadable: BTreeSet::new(),
            }),
            compiler.cluster(),
        );
        batch.drop_no_ops(compiler.cluster());
        assert!(batch.is_empty());
    }

    #[test]
    fn relist_keeps_what_is_listed_unchanged_and_deletes_the_rest() {
        let mut mirror = Mirror::new();
        for name in ["a", "b", "c"] {
            mirror.apply(Update::ApplyPod(pod(name, "10.0.0.1", "web")));
        }
        mirror.apply(Update::Listed(Listing {
            objects: ListedObjects::Pods(vec![pod("d", "10.0.0.4", "db")]),
            unchanged: [("shop".to_string(), "a".to_string())].into(),
            unreadable: [("shop".to_string(), "c".to_string())].into(),
        }));
        let names: Vec<_> = mirror.cluster().pods().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "c", "d"]);
        assert_eq!(
            mirror.cluster().pod("shop", "a"),
            Some(&pod("a", "10.0.0.1", "web"))
        );
    }

    /// A Pod as the API server sends it.
    fn pod_json(name: &str, ip: &str, app: &str) -> Entry<core::Pod> {
        Entry::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
    }

    /// The changed pods' names and the unchanged ones' of a listing.
    fn split(update: Update) -> (Vec<String>, Vec<String>) {
        let Update::Listed(Listing {
            objects: ListedObjects::Pods(changed),
            unchanged,
            unreadable,
        }) = update
        else {
            panic!("not a pod listing: {update:?}");
        };
        assert!(unreadable.is_empty());
        (
            changed.into_iter().map(|p| p.name).collect(),
            unchanged.into_iter().map(|(_, name)| name).collect(),
        )
    }

    fn list(lister: &mut Lister<core::Pod>, pods: &[(&str, &str, &str)]) -> Update {
        lister.init();
        for (name, ip, app) in pods {
            lister.init_apply(pod_json(name, ip, app));
        }
        lister.init_done()
    }

    #[test]
    fn a_relist_sends_only_what_changed_since_the_watch_sent_it() {
        let mut lister = Lister::<core::Pod>::new();
        let first = list(
            &mut lister,
            &[("a", "10.0.0.1", "web"), ("b", "10.0.0.2", "web")],
        );
        assert_eq!(split(first), (vec!["a".into(), "b".into()], vec![]));

        // Watched changes count as sent: b's new labels, and c, which is then deleted.
        assert!(lister.apply(pod_json("b", "10.0.0.2", "db")).is_some());
        assert!(lister.apply(pod_json("c", "10.0.0.3", "web")).is_some());
        assert_eq!(
            lister.delete(&pod_json("c", "10.0.0.3", "web")),
            Some(Update::DeletePod {
                namespace: "shop".into(),
                name: "c".into()
            })
        );

        let relist = list(
            &mut lister,
            &[
                ("a", "10.0.0.1", "web"),
                ("b", "10.0.0.2", "db"),
                ("c", "10.0.0.3", "web"),
                ("d", "10.0.0.4", "web"),
            ],
        );
        assert_eq!(
            split(relist),
            (vec!["c".into(), "d".into()], vec!["a".into(), "b".into()])
        );

        // A changed address is sent whole, and so is an object left out of a list after.
        let moved = list(
            &mut lister,
            &[("a", "10.0.0.9", "web"), ("c", "10.0.0.3", "web")],
        );
        assert_eq!(split(moved), (vec!["a".into()], vec!["c".into()]));
        let again = list(
            &mut lister,
            &[
                ("a", "10.0.0.9", "web"),
                ("b", "10.0.0.2", "db"),
                ("c", "10.0.0.3", "web"),
            ],
        );
        assert_eq!(
            split(again),
            (vec!["b".into()], vec!["a".into(), "c".into()])
        );
    }
}
