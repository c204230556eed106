//! The agent's Kubernetes source against the stand-in API server: lists in pages, watches,
//! reconnects, 410 relists, an outage, and objects that do not deserialize. Each check compares
//! the source's state, and the table kept up to date by its deltas, with a fresh compile of the
//! cluster the server holds.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::kube_source::{self, Batch, Kind, Mirror, Source, Update, WatchConfig};
use integration::apiserver::{ApiServer, Resource, Settings, Verb};
use integration::objects;
use ruleset::ir::Table;
use ruleset::model::{
    ContainerPort, LabelSelector, Labels, Namespace, NetworkPolicy, Peer, Pod, PolicyPort,
    PolicyRule, PortRef, NAMESPACE_NAME_LABEL,
};
use ruleset::{Cluster, Compiler};
use serde_json::json;
use tracing_subscriber::util::SubscriberInitExt;

const NODE: &str = "node-a";
/// An upper bound for waiting, never a measure of speed.
const WAIT: Duration = Duration::from_secs(90);

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What the server holds, as model objects.
#[derive(Default, Clone)]
struct World {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<(String, String), Pod>,
    policies: BTreeMap<(String, String), NetworkPolicy>,
}

impl World {
    fn sample(pods: usize) -> Self {
        let mut world = World::default();
        for (i, name) in ["shop", "billing", "ops", "kube-system", "dev"]
            .iter()
            .enumerate()
        {
            world.namespaces.insert(
                name.to_string(),
                Namespace {
                    name: name.to_string(),
                    labels: labels(&[("team", &format!("t{}", i % 2))]),
                },
            );
        }
        let namespaces: Vec<String> = world.namespaces.keys().cloned().collect();
        for i in 0..pods {
            let namespace = namespaces[i % namespaces.len()].clone();
            let app = ["web", "api", "db"][i % 3];
            let pod = Pod {
                namespace: namespace.clone(),
                name: format!("{app}-{i}"),
                node: Some(if i % 2 == 0 { NODE } else { "node-b" }.into()),
                labels: labels(&[("app", app)]),
                ips: vec![format!("10.1.{}.{}", i / 200, 1 + i % 200).parse().unwrap()],
                host_network: false,
                phase: Some("Running".into()),
                ports: vec![ContainerPort {
                    name: Some("http".into()),
                    protocol: "TCP".into(),
                    port: 8080,
                }],
            };
            world.pods.insert((namespace, pod.name.clone()), pod);
        }
        for namespace in ["shop", "billing"] {
            world.add_policy(deny(namespace));
            world.add_policy(allow_web(namespace));
        }
        world
    }

    fn add_policy(&mut self, policy: NetworkPolicy) {
        self.policies
            .insert((policy.namespace.clone(), policy.name.clone()), policy);
    }

    fn cluster(&self) -> Cluster {
        Cluster::from_objects(
            self.namespaces.values().cloned(),
            self.pods.values().cloned(),
            self.policies.values().cloned(),
        )
    }

    fn serve(&self, server: &ApiServer) {
        for ns in self.namespaces.values() {
            server.put(objects::namespace(ns)).unwrap();
        }
        for pod in self.pods.values() {
            server.put(objects::pod(pod)).unwrap();
        }
        for policy in self.policies.values() {
            server.put(objects::network_policy(policy)).unwrap();
        }
    }

    fn put_pod(&mut self, server: &ApiServer, pod: Pod) {
        server.put(objects::pod(&pod)).unwrap();
        self.pods
            .insert((pod.namespace.clone(), pod.name.clone()), pod);
    }

    fn delete_pod(&mut self, server: &ApiServer, namespace: &str, name: &str) {
        assert!(server.delete(Resource::Pods, namespace, name));
        self.pods.remove(&(namespace.to_string(), name.to_string()));
    }

    fn put_policy(&mut self, server: &ApiServer, policy: NetworkPolicy) {
        server.put(objects::network_policy(&policy)).unwrap();
        self.add_policy(policy);
    }

    /// Deletes a namespace with everything in it, as the namespace controller does.
    fn delete_namespace(&mut self, server: &ApiServer, name: &str) {
        let pods: Vec<_> = self
            .pods
            .keys()
            .filter(|(ns, _)| ns == name)
            .cloned()
            .collect();
        for (ns, pod) in pods {
            self.delete_pod(server, &ns, &pod);
        }
        let policies: Vec<_> = self
            .policies
            .keys()
            .filter(|(ns, _)| ns == name)
            .cloned()
            .collect();
        for (ns, policy) in policies {
            assert!(server.delete(Resource::NetworkPolicies, &ns, &policy));
            self.policies.remove(&(ns, policy));
        }
        assert!(server.delete(Resource::Namespaces, "", name));
        self.namespaces.remove(name);
    }
}

fn deny(namespace: &str) -> NetworkPolicy {
    NetworkPolicy {
        namespace: namespace.into(),
        name: "default-deny".into(),
        policy_types: vec!["Ingress".into(), "Egress".into()],
        ..NetworkPolicy::default()
    }
}

fn allow_web(namespace: &str) -> NetworkPolicy {
    NetworkPolicy {
        namespace: namespace.into(),
        name: "web-from-team".into(),
        uid: None,
        pod_selector: LabelSelector {
            match_labels: labels(&[("app", "web")]),
            ..LabelSelector::default()
        },
        policy_types: vec!["Ingress".into()],
        ingress: vec![PolicyRule {
            peers: vec![Peer {
                namespace_selector: Some(LabelSelector {
                    match_labels: labels(&[("team", "t0")]),
                    ..LabelSelector::default()
                }),
                pod_selector: Some(LabelSelector::default()),
                ip_block: None,
            }],
            ports: vec![PolicyPort {
                protocol: Some("TCP".into()),
                port: Some(PortRef::Name("http".into())),
                end_port: None,
            }],
        }],
        egress: vec![],
    }
}

/// What two cluster indexes hold, in a comparable form. Namespaces known only by name (no
/// object, or a deleted one) carry no labels of their own and are left out.
fn view(cluster: &Cluster) -> (Vec<Pod>, Vec<NetworkPolicy>, BTreeMap<String, Labels>) {
    let namespaces = cluster
        .namespace_names()
        .map(|name| (name.to_string(), cluster.namespace_labels(name).clone()))
        .filter(|(_, labels)| labels.keys().any(|k| k != NAMESPACE_NAME_LABEL))
        .collect();
    (
        cluster.pods().cloned().collect(),
        cluster.policies().cloned().collect(),
        namespaces,
    )
}

/// The agent side: the source, and what the reconcile loop keeps.
struct Agent {
    source: Source,
    mirror: Option<Mirror>,
    compiler: Option<Compiler>,
    /// The table as the kernel would hold it: the first compile plus every delta since.
    installed: Option<Table>,
    /// Kinds listed when the first compile happened.
    listed_at_first_sync: BTreeSet<Kind>,
    listed: BTreeSet<Kind>,
    interruptions: usize,
    errors: Vec<String>,
    /// Pods that exist throughout a test: the agent must never lose them, even for a moment.
    survivors: Vec<(String, String)>,
    _kubeconfig: tempfile::TempDir,
}

impl Agent {
    async fn start(server: &ApiServer, page_size: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        server.write_kubeconfig(&path).unwrap();
        let client = kube_source::client(Some(&path)).await.unwrap();
        Agent {
            source: Source::with_config(client, WatchConfig::default().page_size(page_size)),
            mirror: Some(Mirror::new()),
            compiler: None,
            installed: None,
            listed_at_first_sync: BTreeSet::new(),
            listed: BTreeSet::new(),
            interruptions: 0,
            errors: Vec::new(),
            survivors: Vec::new(),
            _kubeconfig: dir,
        }
    }

    /// Takes the next update and whatever else is waiting, and applies them as one batch.
    async fn step(&mut self) {
        let mut updates = vec![self.source.recv().await.expect("the watches stopped")];
        while let Some(update) = self.source.try_recv() {
            updates.push(update);
        }
        for update in &updates {
            match update {
                Update::Listed(listing) => {
                    self.listed.insert(listing.kind());
                }
                Update::Interrupted { error, .. } => {
                    self.interruptions += 1;
                    self.errors.push(error.clone());
                }
                _ => {}
            }
        }
        if let Some(compiler) = &mut self.compiler {
            let mut batch = Batch::new();
            for update in updates {
                batch.push(update, compiler.cluster());
            }
            let delta = batch.apply(compiler);
            let installed = self.installed.as_mut().unwrap();
            installed.apply(&delta);
            assert_eq!(installed, compiler.table(), "the delta missed something");
            for (namespace, name) in &self.survivors {
                assert!(
                    compiler.cluster().pod(namespace, name).is_some(),
                    "{namespace}/{name} went missing for a while"
                );
            }
            return;
        }
        let mirror = self.mirror.as_mut().unwrap();
        for update in updates {
            mirror.apply(update);
        }
        if mirror.ready() {
            let cluster = self.mirror.take().unwrap().into_cluster();
            let compiler = Compiler::new(cluster, NODE);
            self.installed = Some(compiler.table().clone());
            self.compiler = Some(compiler);
            self.listed_at_first_sync = self.listed.clone();
        }
    }

    fn matches(&self, world: &World) -> bool {
        let Some(compiler) = &self.compiler else {
            return false;
        };
        let expected = world.cluster();
        view(compiler.cluster()) == view(&expected)
            && compiler.table() == Compiler::new(expected, NODE).table()
    }

    async fn converge(&mut self, world: &World) {
        let done = tokio::time::timeout(WAIT, async {
            while !self.matches(world) {
                self.step().await;
            }
        })
        .await;
        assert!(
            done.is_ok(),
            "the source did not converge on the server's state"
        );
    }

    fn cluster(&self) -> &Cluster {
        self.compiler.as_ref().unwrap().cluster()
    }
}

async fn server() -> ApiServer {
    ApiServer::start(Settings {
        bookmark_every: Duration::from_millis(200),
        ..Settings::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn first_sync_waits_for_all_three_paged_lists() {
    let server = server().await;
    let world = World::sample(60);
    world.serve(&server);
    let mut agent = Agent::start(&server, 7).await;
    agent.converge(&world).await;
    assert_eq!(agent.listed_at_first_sync, Kind::ALL.into_iter().collect());
    // 60 pods in pages of 7.
    assert!(server.requests(Resource::Pods, Verb::List) >= 9);
    assert_eq!(agent.cluster().pods().count(), 60);
}

#[tokio::test(flavor = "current_thread")]
async fn watched_changes_arrive_without_relisting() {
    let server = server().await;
    let mut world = World::sample(30);
    world.serve(&server);
    let mut agent = Agent::start(&server, 500).await;
    agent.converge(&world).await;
    let lists = list_count(&server);

    let mut pod = world.pods.values().next().unwrap().clone();
    pod.labels.insert("app".into(), "api".into());
    world.put_pod(&server, pod);
    agent.converge(&world).await;

    world.put_policy(&server, deny("ops"));
    agent.converge(&world).await;

    world.delete_namespace(&server, "billing");
    agent.converge(&world).await;
    assert!(agent.cluster().pods_in("billing").next().is_none());
    assert_eq!(list_count(&server), lists, "a change needed a relist");
}

fn list_count(server: &ApiServer) -> usize {
    Resource::ALL
        .into_iter()
        .map(|r| server.requests(r, Verb::List))
        .sum()
}

fn watch_count(server: &ApiServer) -> usize {
    Resource::ALL
        .into_iter()
        .map(|r| server.requests(r, Verb::Watch))
        .sum()
}

#[tokio::test(flavor = "current_thread")]
async fn dropped_connections_reconnect_and_catch_up() {
    let server = server().await;
    let mut world = World::sample(30);
    world.serve(&server);
    let mut agent = Agent::start(&server, 500).await;
    agent.converge(&world).await;
    let watches = watch_count(&server);

    server.drop_connections();
    let (namespace, name) = world.pods.keys().nth(3).cloned().unwrap();
    world.delete_pod(&server, &namespace, &name);
    world.put_policy(&server, deny("dev"));
    agent.converge(&world).await;
    assert!(watch_count(&server) > watches);
}

#[tokio::test(flavor = "current_thread")]
async fn expired_version_relists_and_deletes_what_vanished() {
    let server = server().await;
    let mut world = World::sample(40);
    world.serve(&server);
    let mut agent = Agent::start(&server, 5).await;
    agent.converge(&world).await;
    let lists = list_count(&server);
    let gone: Vec<_> = world.pods.keys().take(6).cloned().collect();
    agent.survivors = world.pods.keys().skip(6).cloned().collect();

    // While no watch is open, pods go and the history is compacted: resuming gets 410.
    server.drop_connections();
    for (namespace, name) in &gone {
        world.delete_pod(&server, namespace, name);
    }
    let mut pod = world.pods.values().last().unwrap().clone();
    pod.labels.insert("tier".into(), "gold".into());
    world.put_pod(&server, pod);
    server.delete(Resource::NetworkPolicies, "shop", "default-deny");
    world
        .policies
        .remove(&("shop".to_string(), "default-deny".to_string()));
    server.compact();

    agent.converge(&world).await;
    assert!(list_count(&server) > lists, "no relist after 410");
    assert!(
        agent
            .errors
            .iter()
            .any(|e| e.contains("too old resource version")),
        "no 410 seen: {:?}",
        agent.errors
    );
    for (namespace, name) in &gone {
        assert!(agent.cluster().pod(namespace, name).is_none());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn outage_keeps_the_last_state_then_converges() {
    let mut server = server().await;
    let mut world = World::sample(30);
    world.serve(&server);
    let mut agent = Agent::start(&server, 500).await;
    agent.converge(&world).await;
    agent.survivors = world.pods.keys().skip(2).cloned().collect();
    let before = view(agent.cluster());

    server.stop();
    let seen = agent.interruptions;
    let waited = tokio::time::timeout(WAIT, async {
        // Every kind fails at least twice: the stream broke, then reconnecting failed.
        while agent.interruptions < seen + 6 {
            agent.step().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the watches did not notice the outage");
    assert!(
        view(agent.cluster()) == before,
        "state changed while the server was down"
    );

    // The cluster moves on while the agent cannot see it.
    for (namespace, name) in world.pods.keys().take(2).cloned().collect::<Vec<_>>() {
        world.delete_pod(&server, &namespace, &name);
    }
    world.put_policy(&server, deny("kube-system"));
    server.compact();
    server.restart().await.unwrap();
    agent.converge(&world).await;
}

/// What the agent logs, for the test's own thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn malformed_objects_are_skipped() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _logging = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish()
        .set_default();
    let server = server().await;
    let mut world = World::sample(20);
    world.serve(&server);
    server
        .put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "broken-list", "namespace": "shop"},
            "spec": {"containers": "not a list"},
        }))
        .unwrap();
    server
        .put(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "broken", "namespace": "shop", "labels": 7},
            "spec": {"podSelector": {}},
        }))
        .unwrap();
    let mut agent = Agent::start(&server, 4).await;
    agent.converge(&world).await;

    server
        .put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "broken-watch", "namespace": "dev"},
            "status": {"podIPs": [{"ip": 5}]},
        }))
        .unwrap();
    let mut pod = world.pods.values().next().unwrap().clone();
    pod.labels.insert("after".into(), "broken".into());
    world.put_pod(&server, pod);
    agent.converge(&world).await;
    assert!(agent.cluster().pod("shop", "broken-list").is_none());
    assert!(agent.cluster().pod("dev", "broken-watch").is_none());
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    for (object, field) in [
        ("shop/broken-list", "spec.containers"),
        ("shop/broken", "metadata.labels"),
        ("dev/broken-watch", "status.podIPs"),
    ] {
        assert!(
            logged
                .lines()
                .any(|l| l.contains(&format!("object={object} ")) && l.contains(field)),
            "{object}: not logged with {field}:\n{logged}"
        );
    }
}
