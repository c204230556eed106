//! `agent run` fed by the stand-in API server, in the two-node lab: one agent per node watches
//! the stand-in (listening in node-a's namespace, on its wire address) and the kernel must allow
//! exactly what `Tracer` says of the cluster the stand-in holds, after every change made
//! through the API and through faults: connections cut during a change, a compacted history
//! (410 and a relist), the stand-in down while the cluster changes (fail static, then
//! convergence), objects that do not deserialize, and an agent killed with SIGKILL and started
//! again while probes run.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use integration::agents::{
    agent_binary, check_matrix, lab_for, marks, rulesets_changed, wait_change, wait_for,
    wait_synced, Agent, Delivery, StandIn,
};
use integration::apiserver::Verb;
use integration::lab::{Lab, Protocol};
use integration::probers::{restart_under_probes, Prober};
use integration::{netns, objects};
use ruleset::model::NetworkPolicy;
use ruleset::Cluster;
use serde_json::json;

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");
/// Node `i` of the lab is `NODES[i]` to the cluster.
const NODES: [&str; 2] = ["node-a", "node-b"];
/// CoreDNS listens on UDP and TCP 53; the other ports are the example's policies'.
const SERVICES: [(Protocol, u16); 5] = [
    (Protocol::Tcp, 8080),
    (Protocol::Tcp, 9090),
    (Protocol::Tcp, 5432),
    (Protocol::Tcp, 53),
    (Protocol::Udp, 53),
];
/// An upper bound for waiting, never a measure of speed; an outage makes the watches back off
/// for seconds.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// After a fault, the awaited line may come from a batch that holds only part of the change
/// (a relist comes kind by kind): how long the rest gets to land.
const SETTLE: Duration = Duration::from_millis(300);
/// One lab at a time: the two tests would otherwise share two cores between two labs' probes.
static ONE_LAB: Mutex<()> = Mutex::new(());

fn three_tier() -> Cluster {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-tier.yaml");
    agent::manifests::load(&path).expect("three-tier example")
}

fn policy(cluster: &Cluster, name: &str) -> NetworkPolicy {
    cluster
        .policies()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no policy {name}"))
        .clone()
}

/// One test's lab of the three-tier example, the stand-in in node-a's namespace holding it,
/// and one synced agent per node watching it. Fields drop in order: the agents before the
/// stand-in and the lab, the lock last.
struct World {
    agents: Vec<Agent>,
    api: StandIn,
    lab: Lab,
    original: Cluster,
    t0: Instant,
    _one: MutexGuard<'static, ()>,
}

impl World {
    /// `None` when the test must skip (not root).
    fn start(test: &str) -> Option<World> {
        if netns::skip_unless_root(test) {
            return None;
        }
        let one = ONE_LAB.lock().unwrap_or_else(PoisonError::into_inner);
        let t0 = Instant::now();
        agent_binary(Path::new(LABPOD));
        let original = three_tier();
        let lab = lab_for(Path::new(LABPOD), &original, &NODES, &SERVICES);
        let api = StandIn::start(&lab, 0, &original);
        let mut agents = start_agents(&lab, &api);
        let took = wait_synced(&mut agents, SYNC_TIMEOUT);
        println!(
            "{test}: lab of {} pods, stand-in at {} in node-a's namespace, agents synced {took:?} after start",
            lab.pods().len(),
            api.server.url(),
        );
        Some(World {
            agents,
            api,
            lab,
            original,
            t0,
            _one: one,
        })
    }

    /// Checks the matrix against the cluster the stand-in holds; returns the cells checked.
    fn check(&mut self, step: &str) -> usize {
        let (cells, _) = check_matrix(
            &self.lab,
            &mut self.agents,
            &SERVICES,
            step,
            &self.api.cluster,
            self.t0,
        );
        cells.len()
    }

    /// Makes a change through the API (`change` says how it reaches the agents), waits for
    /// the agents to take it and checks the matrix.
    fn step(&mut self, what: &str, change: impl FnOnce(&mut StandIn) -> Delivery) -> usize {
        let old = self.api.cluster.clone();
        let before = marks(&self.agents);
        let delivery = change(&mut self.api);
        let changed = rulesets_changed(&NODES, &old, &self.api.cluster);
        let took = wait_change(
            &mut self.agents,
            &before,
            &changed,
            delivery,
            what,
            SYNC_TIMEOUT,
        );
        if delivery == Delivery::Whole {
            thread::sleep(SETTLE);
        }
        println!("  {what}: rulesets changed on {changed:?}; taken in {took:?}");
        self.check(what)
    }
}

fn start_agents(lab: &Lab, api: &StandIn) -> Vec<Agent> {
    Agent::start_each_api(Path::new(LABPOD), lab, &NODES, &api.kubeconfig(), &[])
}

/// An edit of the cluster the stand-in holds.
type Edit = fn(&mut Cluster);

/// A change made through the API, as object writes.
fn writes(api: &mut StandIn, edit: impl FnOnce(&mut Cluster)) -> Delivery {
    Delivery::Objects(api.change(edit))
}

// ------------------------------------------------------------------------------ tests

#[test]
fn agents_follow_the_api() {
    let Some(mut w) = World::start("agents_follow_the_api") else {
        return;
    };
    let mut cells = w.check("start");

    let steps: Vec<(&str, Edit)> = vec![
        ("delete policy shop/database-allow-backend", |c| {
            assert!(c.delete_policy("shop", "database-allow-backend"));
        }),
        ("relabel shop/backend-1 app=backend -> app=legacy", |c| {
            let mut pod = c.pod("shop", "backend-1").unwrap().clone();
            pod.labels.insert("app".into(), "legacy".into());
            c.apply_pod(pod);
        }),
        ("add policy shop/database-allow-backend", |c| {
            c.apply_policy(policy(&three_tier(), "database-allow-backend"));
        }),
        ("delete kube-system's pods", |c| {
            let names: Vec<String> = c.pods_in("kube-system").map(|p| p.name.clone()).collect();
            for name in names {
                c.delete_pod("kube-system", &name).unwrap();
            }
        }),
        (
            "put kube-system's pods back, shop/backend-1 relabelled back",
            |c| {
                let original = three_tier();
                for pod in original.pods_in("kube-system") {
                    c.apply_pod(pod.clone());
                }
                c.apply_pod(original.pod("shop", "backend-1").unwrap().clone());
            },
        ),
    ];
    let mut per_step = vec![("start".to_string(), cells)];
    for (what, edit) in steps {
        let n = w.step(what, |api| writes(api, edit));
        cells += n;
        per_step.push((what.to_string(), n));
    }
    assert_eq!(
        rulesets_changed(&NODES, &w.original, &w.api.cluster),
        [false, false],
        "the last step restores the original cluster"
    );
    for agent in &mut w.agents {
        assert_eq!(agent.errors(), 0, "{}", agent.describe());
    }
    println!(
        "agents_follow_the_api: {cells} cells checked over {} steps {per_step:?}; done in {:?}",
        per_step.len(),
        w.t0.elapsed()
    );
}

#[test]
fn agents_ride_out_api_faults() {
    let Some(mut w) = World::start("agents_ride_out_api_faults") else {
        return;
    };
    let mut per_step = vec![("start", w.check("start"))];

    // (a) Every connection cut as the change is made: the watches resume from where they were.
    let watches = w.api.requests(Verb::Watch);
    let n = w.step(
        "(a) connections dropped, policy database-allow-backend deleted",
        |api| {
            api.server.drop_connections();
            api.change(|c| assert!(c.delete_policy("shop", "database-allow-backend")));
            Delivery::Whole
        },
    );
    per_step.push(("(a) drop_connections", n));
    // Every watch comes back, if not all before the step's change reached both agents.
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while w.api.requests(Verb::Watch) - watches < 3 * NODES.len() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let rewatches = w.api.requests(Verb::Watch) - watches;
    println!("  (a) {rewatches} watch requests after the cut");
    assert!(
        rewatches >= 3 * NODES.len(),
        "{rewatches} watch requests after the cut"
    );

    // (b) A policy added while every watch is cut, and the history compacted at once: the
    // watches resume from a compacted version, get 410 and must list again to see it.
    let lists = w.api.requests(Verb::List);
    let n = w.step(
        "(b) connections dropped, history compacted (410), policy database-allow-backend added",
        |api| {
            let added = policy(&three_tier(), "database-allow-backend");
            api.cluster.apply_policy(added.clone());
            api.server
                .put_unseen_and_compact(objects::network_policy(&added))
                .unwrap();
            Delivery::Whole
        },
    );
    per_step.push(("(b) compact + 410 relist", n));
    let relists = w.api.requests(Verb::List) - lists;
    println!("  (b) {relists} list requests after the compaction");
    assert!(relists >= 2, "no relist after 410: {relists} list requests");

    // (c) The stand-in down: the rules stay; the cluster changes meanwhile; then it is back.
    w.api.server.stop();
    thread::sleep(Duration::from_millis(500));
    let n = w.check("(c) stand-in stopped (fail static)");
    per_step.push(("(c) stopped", n));
    let n = w.step(
        "(c) policy frontend-allow-ingress-nginx deleted while down, stand-in restarted",
        |api| {
            api.change(|c| {
                assert!(c.delete_policy("shop", "frontend-allow-ingress-nginx"));
            });
            api.runtime
                .block_on(api.server.restart())
                .expect("the stand-in restarts");
            Delivery::Whole
        },
    );
    per_step.push(("(c) restarted", n));

    // (d) Objects that do not deserialize are skipped; the rest keeps flowing.
    let skipped: Vec<usize> = w
        .agents
        .iter()
        .map(|a| a.count("does not deserialize; skipped"))
        .collect();
    w.api
        .server
        .put(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"podSelector": {}, "ingress": "everything"},
        }))
        .unwrap();
    w.api
        .server
        .put(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "broken", "namespace": "shop", "labels": {"app": "database"}},
            "spec": {"containers": "main", "nodeName": "node-b"},
            "status": {"podIP": "10.244.2.99"},
        }))
        .unwrap();
    let took = wait_for(
        &mut w.agents,
        "two `skipped` warnings",
        SYNC_TIMEOUT,
        |i, a| a.count("does not deserialize; skipped") >= skipped[i] + 2,
    );
    println!("  (d) the malformed policy and pod logged and skipped within {took:?}");
    let n = w.step(
        "(d) after the malformed objects, policy frontend-allow-ingress-nginx added",
        |api| {
            writes(api, |c| {
                c.apply_policy(policy(&three_tier(), "frontend-allow-ingress-nginx"));
            })
        },
    );
    per_step.push(("(d) malformed objects", n));
    assert_eq!(
        rulesets_changed(&NODES, &w.original, &w.api.cluster),
        [false, false]
    );

    // (e) SIGKILL node-b's agent and start another on the API while probes run: no probe of
    // a forbidden or an allowed connection may go the wrong way.
    let database = w.lab.pod("shop/database-0").expect("lab pod");
    let probers: Vec<Prober> = [
        "ingress-nginx/ingress-nginx-controller",
        "shop/frontend-1",
        "shop/backend-2",
    ]
    .into_iter()
    .map(|from| {
        Prober::tcp(
            Path::new(LABPOD),
            w.lab.pod(from).expect("lab pod"),
            database,
            5432,
            &w.api.cluster,
        )
        .0
    })
    .collect();
    let verdicts: Vec<bool> = probers.iter().map(|p| p.allowed).collect();
    assert_eq!(verdicts, [false, false, true], "one allowed, two forbidden");
    let kubeconfig = w.api.kubeconfig();
    let restart = || Agent::start_api(Path::new(LABPOD), &w.lab, 1, NODES[1], &kubeconfig, &[]);
    restart_under_probes(&mut w.agents, 1, restart, &probers, SYNC_TIMEOUT, w.t0);
    let n = w.check("(e) after the restart");
    per_step.push(("(e) SIGKILL + restart", n));
    for agent in &mut w.agents {
        assert!(agent.exit_status().is_none(), "{}", agent.describe());
    }
    let cells: usize = per_step.iter().map(|(_, n)| n).sum();
    println!(
        "agents_ride_out_api_faults: {cells} cells checked {per_step:?}; done in {:?}",
        w.t0.elapsed()
    );
}
