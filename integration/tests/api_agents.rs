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

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use integration::agents::{agent_binary, logs, wait_for, Agent};
use integration::apiserver::{ApiServer, Resource, Settings, Verb};
use integration::lab::{compare_with_trace, Family, Lab, Pod, Protocol};
use integration::{netns, objects};
use ruleset::model::NetworkPolicy;
use ruleset::{Cluster, Compiler, Endpoint, Tracer};
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
/// Node-a's address on the lab's wire: the stand-in listens there, node-b routes to it.
const API_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
/// An upper bound for waiting, never a measure of speed; an outage makes the watches back off
/// for seconds.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// After the awaited line, how long a change split over two batches gets to land whole.
const SETTLE: Duration = Duration::from_millis(300);
/// One lab at a time: the two tests would otherwise share two cores between two labs' probes.
static ONE_LAB: Mutex<()> = Mutex::new(());

// ------------------------------------------------------------------------------ agent logs

/// `synced` lines of transactions from the reconcile loop (not the veth follower's).
fn synced(agent: &Agent) -> usize {
    agent
        .lines()
        .iter()
        .filter(|l| l.contains("synced") && !l.contains("ERROR") && !l.contains("veths"))
        .count()
}

/// Lines saying the agent handled a batch: `synced`, or `the ruleset did not` change.
fn seen(agent: &Agent) -> usize {
    agent
        .lines()
        .iter()
        .filter(|l| {
            ((l.contains("synced") && !l.contains("veths")) || l.contains("ruleset did not"))
                && !l.contains("ERROR")
        })
        .count()
}

fn count(agent: &Agent, text: &str) -> usize {
    agent.lines().iter().filter(|l| l.contains(text)).count()
}

fn counts(agents: &[Agent]) -> Vec<(usize, usize)> {
    agents.iter().map(|a| (synced(a), seen(a))).collect()
}

/// Whether node `NODES[i]`'s compiled ruleset differs between `old` and `new`.
fn rulesets_changed(old: &Cluster, new: &Cluster) -> Vec<bool> {
    NODES
        .iter()
        .map(|node| {
            let render = |c: &Cluster| ruleset::render(Compiler::new(c.clone(), node).table());
            render(old) != render(new)
        })
        .collect()
}

/// Waits until every agent whose node's ruleset changes logged one more `synced`, and every
/// other one more line saying it handled a batch; then lets stragglers land.
fn wait_change(
    agents: &mut [Agent],
    before: &[(usize, usize)],
    changed: &[bool],
    what: &str,
) -> Duration {
    let took = wait_for(
        agents,
        &format!("`synced` where {changed:?}, else a handled batch, {what}"),
        SYNC_TIMEOUT,
        |i, a| {
            if changed[i] {
                synced(a) > before[i].0
            } else {
                seen(a) > before[i].1
            }
        },
    );
    thread::sleep(SETTLE);
    took
}

// ------------------------------------------------------------------------------ the world

/// The stand-in on a runtime of its own thread, and the cluster it holds as the model.
struct Api {
    server: ApiServer,
    runtime: tokio::runtime::Handle,
    /// Ends the runtime's thread when dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
    cluster: Cluster,
    kubeconfig: PathBuf,
}

impl Api {
    /// Starts the stand-in in `netns` and puts every object of `cluster` into it.
    fn start(netns: &str, cluster: &Cluster, tag: &str) -> Api {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        thread::spawn(move || {
            let _ = runtime.block_on(stopped);
        });
        let path = PathBuf::from("/run/netns").join(netns);
        let server = handle
            .block_on(ApiServer::start_in(
                Settings::default(),
                Some(&path),
                SocketAddr::new(IpAddr::V4(API_ADDR), 0),
            ))
            .expect("the stand-in starts in node-a's namespace");
        let kubeconfig = std::env::temp_dir().join(format!(
            "nftpol-api-agents-{}-{tag}.kubeconfig",
            std::process::id()
        ));
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        for object in objects::all(cluster) {
            server.put(object).expect("a served kind");
        }
        Api {
            server,
            runtime: handle,
            _stop: stop,
            cluster: cluster.clone(),
            kubeconfig,
        }
    }

    fn put_policy(&mut self, policy: &NetworkPolicy) {
        self.cluster.apply_policy(policy.clone());
        self.server.put(objects::network_policy(policy)).unwrap();
    }

    fn delete_policy(&mut self, namespace: &str, name: &str) {
        assert!(self.cluster.delete_policy(namespace, name));
        assert!(self
            .server
            .delete(Resource::NetworkPolicies, namespace, name));
    }

    fn put_pod(&mut self, pod: &ruleset::model::Pod) {
        self.cluster.apply_pod(pod.clone());
        self.server.put(objects::pod(pod)).unwrap();
    }

    fn delete_pod(&mut self, namespace: &str, name: &str) {
        assert!(self.cluster.delete_pod(namespace, name).is_some());
        assert!(self.server.delete(Resource::Pods, namespace, name));
    }

    fn requests(&self, verb: Verb) -> usize {
        Resource::ALL
            .into_iter()
            .map(|r| self.server.requests(r, verb))
            .sum()
    }

    fn lists(&self) -> usize {
        self.requests(Verb::List)
    }

    fn watches(&self) -> usize {
        self.requests(Verb::Watch)
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

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

fn lab_for(cluster: &Cluster) -> Lab {
    let ports: Vec<u16> = SERVICES.iter().map(|(_, port)| *port).collect();
    let lab = Lab::for_cluster(LABPOD, cluster, &NODES, &ports).expect("lab");
    for node in NODES {
        let compiler = Compiler::new(cluster.clone(), node);
        assert!(
            compiler.diagnostics().is_empty(),
            "{node}: {:?}",
            compiler.diagnostics()
        );
    }
    lab
}

fn start_agents(lab: &Lab, api: &Api) -> Vec<Agent> {
    (0..NODES.len())
        .map(|i| Agent::start_api(Path::new(LABPOD), lab, i, NODES[i], &api.kubeconfig, &[]))
        .collect()
}

fn lab_pod<'a>(lab: &'a Lab, name: &str) -> &'a Pod {
    lab.pods()
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no lab pod {name}"))
}

/// Probes every pair of lab pods the cluster still holds and asserts that the kernel allows
/// exactly what `Tracer` says of `cluster`; returns the cells checked.
fn check_matrix(
    lab: &Lab,
    agents: &mut [Agent],
    step: &str,
    cluster: &Cluster,
    t0: Instant,
) -> usize {
    let started = Instant::now();
    let present: Vec<usize> = lab
        .pods()
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            let (namespace, name) = p.name.split_once('/').expect("namespace/name");
            cluster.pod(namespace, name).is_some()
        })
        .map(|(i, _)| i)
        .collect();
    let cells = if present.len() == lab.pods().len() {
        lab.matrix(&SERVICES, &[Family::V4]).expect("matrix")
    } else {
        lab.matrix_among(&present, &SERVICES, &[Family::V4])
            .expect("matrix")
    };
    let comparison = compare_with_trace(lab, &cells, cluster).expect("trace the cells");
    let allowed = comparison.traces.iter().filter(|t| t.allowed).count();
    println!(
        "  {step}: {} cells checked among {} pods ({allowed} allowed, {} denied), {} disagreements; matrix in {:?}, at {:?}",
        cells.len(),
        present.len(),
        cells.len() - allowed,
        comparison.disagreements.len(),
        started.elapsed(),
        t0.elapsed()
    );
    assert!(
        comparison.disagreements.is_empty(),
        "{step}: the kernel and Tracer disagree on {} of {} cells:\n{}\n\n{}",
        comparison.disagreements.len(),
        cells.len(),
        comparison.disagreements.join("\n\n"),
        logs(agents)
    );
    cells.len()
}

/// A change made through the API.
type Change = Box<dyn FnOnce(&mut Api)>;

/// Makes a change through the API, waits for the agents to take it and checks the matrix.
fn step(
    lab: &Lab,
    api: &mut Api,
    agents: &mut [Agent],
    what: &str,
    t0: Instant,
    change: impl FnOnce(&mut Api),
) -> usize {
    let old = api.cluster.clone();
    let before = counts(agents);
    change(api);
    let changed = rulesets_changed(&old, &api.cluster);
    let took = wait_change(agents, &before, &changed, what);
    println!("  {what}: rulesets changed on {changed:?}; taken in {took:?}");
    check_matrix(lab, agents, what, &api.cluster, t0)
}

// ------------------------------------------------------------------------------ tests

#[test]
fn agents_follow_the_api() {
    if netns::skip_unless_root("agents_follow_the_api") {
        return;
    }
    let _one = ONE_LAB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let t0 = Instant::now();
    agent_binary(Path::new(LABPOD));
    let original = three_tier();
    let lab = lab_for(&original);
    let mut api = Api::start(lab.node_netns(0).unwrap(), &original, "follow");
    println!(
        "lab of {} pods built, stand-in at {} in node-a's namespace, at {:?}",
        lab.pods().len(),
        api.server.url(),
        t0.elapsed()
    );
    let mut agents = start_agents(&lab, &api);
    let took = wait_for(&mut agents, "`synced` at start", SYNC_TIMEOUT, |_, a| {
        synced(a) > 0
    });
    println!("  agents synced {took:?} after start");
    let mut cells = check_matrix(&lab, &mut agents, "start", &api.cluster, t0);

    let steps: Vec<(&str, Change)> = vec![
        (
            "delete policy shop/database-allow-backend",
            Box::new(|api: &mut Api| api.delete_policy("shop", "database-allow-backend")),
        ),
        (
            "relabel shop/backend-1 app=backend -> app=legacy",
            Box::new(|api: &mut Api| {
                let mut pod = api.cluster.pod("shop", "backend-1").unwrap().clone();
                pod.labels.insert("app".into(), "legacy".into());
                api.put_pod(&pod);
            }),
        ),
        (
            "add policy shop/database-allow-backend",
            Box::new(|api: &mut Api| {
                api.put_policy(&policy(&three_tier(), "database-allow-backend"));
            }),
        ),
        (
            "delete kube-system's pods",
            Box::new(|api: &mut Api| {
                let names: Vec<String> = api
                    .cluster
                    .pods_in("kube-system")
                    .map(|p| p.name.clone())
                    .collect();
                for name in names {
                    api.delete_pod("kube-system", &name);
                }
            }),
        ),
        (
            "put kube-system's pods back, shop/backend-1 relabelled back",
            Box::new(|api: &mut Api| {
                let original = three_tier();
                for pod in original.pods_in("kube-system") {
                    api.put_pod(pod);
                }
                api.put_pod(original.pod("shop", "backend-1").unwrap());
            }),
        ),
    ];
    let mut per_step = vec![("start".to_string(), cells)];
    for (what, change) in steps {
        let n = step(&lab, &mut api, &mut agents, what, t0, change);
        cells += n;
        per_step.push((what.to_string(), n));
    }
    assert_eq!(
        rulesets_changed(&original, &api.cluster),
        [false, false],
        "the last step restores the original cluster"
    );
    for agent in &mut agents {
        assert_eq!(agent.errors(), 0, "{}", agent.describe());
    }
    println!(
        "agents_follow_the_api: {cells} cells checked over {} steps {per_step:?}; done in {:?}",
        per_step.len(),
        t0.elapsed()
    );
}

#[test]
fn agents_ride_out_api_faults() {
    if netns::skip_unless_root("agents_ride_out_api_faults") {
        return;
    }
    let _one = ONE_LAB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let t0 = Instant::now();
    agent_binary(Path::new(LABPOD));
    let original = three_tier();
    let lab = lab_for(&original);
    let mut api = Api::start(lab.node_netns(0).unwrap(), &original, "faults");
    let mut agents = start_agents(&lab, &api);
    wait_for(&mut agents, "`synced` at start", SYNC_TIMEOUT, |_, a| {
        synced(a) > 0
    });
    let mut per_step = vec![(
        "start",
        check_matrix(&lab, &mut agents, "start", &api.cluster, t0),
    )];

    // (a) Every connection cut as the change is made: the watches resume from where they were.
    let watches = api.watches();
    let n = step(
        &lab,
        &mut api,
        &mut agents,
        "(a) connections dropped, policy database-allow-backend deleted",
        t0,
        |api| {
            api.server.drop_connections();
            api.delete_policy("shop", "database-allow-backend");
        },
    );
    per_step.push(("(a) drop_connections", n));
    // Every watch comes back, if not all before the step's change reached both agents.
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while api.watches() - watches < 3 * NODES.len() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let rewatches = api.watches() - watches;
    println!("  (a) {rewatches} watch requests after the cut");
    assert!(
        rewatches >= 3 * NODES.len(),
        "{rewatches} watch requests after the cut"
    );

    // (b) A policy added while every watch is cut, and the history compacted at once: the
    // watches resume from a compacted version, get 410 and must list again to see it.
    let lists = api.lists();
    let n = step(
        &lab,
        &mut api,
        &mut agents,
        "(b) connections dropped, history compacted (410), policy database-allow-backend added",
        t0,
        |api| {
            let added = policy(&three_tier(), "database-allow-backend");
            api.cluster.apply_policy(added.clone());
            api.server
                .put_unseen_and_compact(objects::network_policy(&added))
                .unwrap();
        },
    );
    per_step.push(("(b) compact + 410 relist", n));
    let relists = api.lists() - lists;
    println!("  (b) {relists} list requests after the compaction");
    assert!(relists >= 2, "no relist after 410: {relists} list requests");

    // (c) The stand-in down: the rules stay; the cluster changes meanwhile; then it is back.
    api.server.stop();
    thread::sleep(Duration::from_millis(500));
    let n = check_matrix(
        &lab,
        &mut agents,
        "(c) stand-in stopped (fail static)",
        &api.cluster,
        t0,
    );
    per_step.push(("(c) stopped", n));
    let n = step(
        &lab,
        &mut api,
        &mut agents,
        "(c) policy frontend-allow-ingress-nginx deleted while down, stand-in restarted",
        t0,
        |api| {
            api.delete_policy("shop", "frontend-allow-ingress-nginx");
            api.runtime
                .block_on(api.server.restart())
                .expect("the stand-in restarts");
        },
    );
    per_step.push(("(c) restarted", n));

    // (d) Objects that do not deserialize are skipped; the rest keeps flowing.
    let skipped: Vec<usize> = agents
        .iter()
        .map(|a| count(a, "does not deserialize; skipped"))
        .collect();
    api.server
        .put(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": {"podSelector": {}, "ingress": "everything"},
        }))
        .unwrap();
    api.server
        .put(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "broken", "namespace": "shop", "labels": {"app": "database"}},
            "spec": {"containers": "main", "nodeName": "node-b"},
            "status": {"podIP": "10.244.2.99"},
        }))
        .unwrap();
    let took = wait_for(
        &mut agents,
        "two `skipped` warnings",
        SYNC_TIMEOUT,
        |i, a| count(a, "does not deserialize; skipped") >= skipped[i] + 2,
    );
    println!("  (d) the malformed policy and pod logged and skipped within {took:?}");
    let n = step(
        &lab,
        &mut api,
        &mut agents,
        "(d) after the malformed objects, policy frontend-allow-ingress-nginx added",
        t0,
        |api| api.put_policy(&policy(&three_tier(), "frontend-allow-ingress-nginx")),
    );
    per_step.push(("(d) malformed objects", n));
    assert_eq!(rulesets_changed(&original, &api.cluster), [false, false]);

    // (e) SIGKILL node-b's agent and start another while probes run.
    let n = kill_and_restart(&lab, &api, &mut agents, t0);
    per_step.push(("(e) SIGKILL + restart", n));
    for agent in &mut agents {
        assert!(agent.exit_status().is_none(), "{}", agent.describe());
    }
    let cells: usize = per_step.iter().map(|(_, n)| n).sum();
    println!(
        "agents_ride_out_api_faults: {cells} cells checked {per_step:?}; done in {:?}",
        t0.elapsed()
    );
}

// ------------------------------------------------------------------------------ probers

/// One connection probed over and over from a pod's namespace.
struct Prober<'a> {
    label: &'static str,
    from: &'a Pod,
    to: IpAddr,
    port: u16,
    allowed: bool,
}

/// One probe: when it started (from the test's start), whether it reached, and the reason.
type Sample = (Duration, bool, String);

impl Prober<'_> {
    fn spawn(&self) -> Child {
        let timeout = if self.allowed { "1000" } else { "250" };
        Command::new("ip")
            .args(["netns", "exec", &self.from.netns, LABPOD, "probe"])
            .args(["--timeout-ms", timeout])
            .args([self.to.to_string(), "tcp".into(), self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("labpod probe starts")
    }

    fn outcome(probe: Child) -> (bool, String) {
        let out = probe.wait_with_output().expect("labpod probe ends");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            (text.ends_with(" ok"), text)
        } else {
            (false, format!("probe failed ({})", out.status))
        }
    }

    fn run(&self, stop: &AtomicBool, t0: Instant) -> Vec<Sample> {
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let at = t0.elapsed();
            let (ok, detail) = Prober::outcome(self.spawn());
            samples.push((at, ok, detail));
            thread::sleep(Duration::from_millis(50));
        }
        samples
    }
}

/// Sets the flag when dropped, so that prober threads stop even when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Kills node-b's agent with SIGKILL and starts another on the API while probers loop over
/// forbidden and allowed cells; no probe may go the wrong way. Returns the cells checked.
fn kill_and_restart(lab: &Lab, api: &Api, agents: &mut [Agent], t0: Instant) -> usize {
    let database = lab_pod(lab, "shop/database-0");
    let mut probers = vec![
        Prober {
            label: "ingress-nginx-controller -> database-0 TCP 5432",
            from: lab_pod(lab, "ingress-nginx/ingress-nginx-controller"),
            to: IpAddr::V4(database.ipv4),
            port: 5432,
            allowed: false,
        },
        Prober {
            label: "frontend-1 -> database-0 TCP 5432",
            from: lab_pod(lab, "shop/frontend-1"),
            to: IpAddr::V4(database.ipv4),
            port: 5432,
            allowed: false,
        },
        Prober {
            label: "backend-2 -> database-0 TCP 5432",
            from: lab_pod(lab, "shop/backend-2"),
            to: IpAddr::V4(database.ipv4),
            port: 5432,
            allowed: false,
        },
    ];
    let mut tracer = Tracer::new(api.cluster.clone());
    for p in &mut probers {
        p.allowed = tracer
            .trace(
                &Endpoint::Address(IpAddr::V4(p.from.ipv4)),
                &Endpoint::Address(p.to),
                Protocol::Tcp,
                p.port,
            )
            .expect("trace")
            .allowed;
    }
    let verdicts: Vec<bool> = probers.iter().map(|p| p.allowed).collect();
    assert_eq!(verdicts, [false, false, true], "one allowed, two forbidden");

    let stop = AtomicBool::new(false);
    let mut killed_at = Duration::ZERO;
    let mut synced_at = Duration::ZERO;
    let mut samples: Vec<Vec<Sample>> = thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let handles: Vec<_> = probers
            .iter()
            .map(|p| s.spawn(|| p.run(&stop, t0)))
            .collect();
        thread::sleep(Duration::from_millis(700));
        agents[1].kill();
        let status = agents[1].wait_exit(Duration::from_secs(5));
        killed_at = t0.elapsed();
        agents[1] = Agent::start_api(Path::new(LABPOD), lab, 1, NODES[1], &api.kubeconfig, &[]);
        let restarted = Instant::now();
        // Between the kill and 100 ms after `synced`, a probe of every cell every 10 ms.
        let mut burst: Vec<(usize, Duration, Child)> = Vec::new();
        let mut synced_now: Option<Instant> = None;
        while synced_now.is_none_or(|at| at.elapsed() < Duration::from_millis(100)) {
            if burst.len() < 600 {
                for (i, p) in probers.iter().enumerate() {
                    burst.push((i, t0.elapsed(), p.spawn()));
                }
            }
            if synced_now.is_none() && synced(&agents[1]) > 0 {
                synced_now = Some(Instant::now());
                synced_at = t0.elapsed();
            }
            if synced_now.is_none() {
                if let Some(status) = agents[1].exit_status() {
                    panic!("the new node-b agent exited ({status})\n{}", logs(agents));
                }
                assert!(
                    restarted.elapsed() < SYNC_TIMEOUT,
                    "the new node-b agent did not sync within {SYNC_TIMEOUT:?}\n{}",
                    logs(agents)
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        println!(
            "  (e) agent node-b killed with SIGKILL at {killed_at:?} ({status:?}); new one listed and synced {:?} after, at {synced_at:?}; {} burst probes",
            synced_at.saturating_sub(killed_at),
            burst.len()
        );
        thread::sleep(Duration::from_millis(600));
        stop.store(true, Ordering::Relaxed);
        let mut samples: Vec<Vec<Sample>> = handles
            .into_iter()
            .map(|h| h.join().expect("prober thread"))
            .collect();
        for (i, at, probe) in burst {
            let (ok, detail) = Prober::outcome(probe);
            samples[i].push((at, ok, detail));
        }
        samples
    });
    let mut wrong = Vec::new();
    for (p, samples) in probers.iter().zip(&mut samples) {
        samples.sort_by_key(|(at, _, _)| *at);
        let phase = |at: Duration| usize::from(at >= killed_at) + usize::from(at >= synced_at);
        let mut phases = [0; 3];
        for (at, ok, detail) in samples.iter() {
            phases[phase(*at)] += 1;
            if *ok != p.allowed {
                wrong.push(format!("{} at {at:?}: {detail}", p.label));
            }
        }
        println!(
            "  (e) {} ({}): {} probes; before the kill, between kill and sync, after: {phases:?}",
            p.label,
            if p.allowed { "allowed" } else { "forbidden" },
            samples.len()
        );
        assert!(
            phases[0] >= 2 && phases[1] >= 1 && phases[2] >= 2,
            "{}: too few probes in some phase: {phases:?}",
            p.label
        );
    }
    assert!(
        wrong.is_empty(),
        "around the restart of node-b's agent (killed at {killed_at:?}, new one synced at {synced_at:?}), {} probes went the wrong way:\n{}\n{}",
        wrong.len(),
        wrong.join("\n"),
        logs(agents)
    );
    check_matrix(lab, agents, "(e) after the restart", &api.cluster, t0)
}
