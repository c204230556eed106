//! Live enforcement in the network-namespace lab (`integration::lab`; needs root):
//!
//! - `latency`: one `agent run` per node of a two-node lab; the snapshot is replaced by rename
//!   so that one cross-node cell flips (policy `bench/server-allow-client`, client -> server
//!   TCP 80, added or removed), and the time from just before the rename until real
//!   connections see the new verdict is taken, at `--poll-ms` 200 (the default) and 20.
//! - `connrate`: new TCP connections per second from a pod on one node to a pod on another,
//!   with the 150,000-pod synthetic cluster's rulesets in both nodes versus no table at all,
//!   alternating, in rounds.
//!
//! `cargo bench -p integration --bench lab [-- latency|connrate]`. Environment:
//! `NFTPOL_LAB_SAMPLES` (latency samples per direction and poll interval, default 100),
//! `NFTPOL_LAB_ROUNDS` and `NFTPOL_LAB_SECONDS` (connrate rounds per mode, default 10, and
//! seconds per run, default 3). Figures are printed; nothing is asserted about speed.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark whose fixture is wrong should stop loudly"
)]

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use agent::netlink::Writer;
use integration::agents::{agent_binary, logs, marks, wait_change, wait_synced, Agent, Delivery};
use integration::lab::{Lab, Pod, Protocol, Target};
use integration::measure::{
    enter_netns, env_or, loadavg, pct, summary, until_allowed, until_denied, wants, Jitter,
    CONNECT_TIMEOUT, GAP, STAGGER,
};
use integration::netns;
use integration::synthetic::{self, LARGE};
use ruleset::ir::{Table, TABLE_NAME};
use ruleset::model::{
    ContainerPort, LabelSelector, NetworkPolicy, Peer, PolicyPort, PolicyRule, PortRef,
};
use ruleset::{Compiler, Endpoint, Tracer};

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");

fn main() {
    if netns::skip_unless_root("bench lab") {
        return;
    }
    println!("load average at start: {}", loadavg());
    if wants("latency") {
        latency();
    }
    if wants("connrate") {
        connrate();
    }
    println!("load average at end: {}", loadavg());
}

// ---------------------------------------------------------------------------------- latency

/// Node `i` of the lab is `NODES[i]` to the snapshot.
const NODES: [&str; 2] = ["node-a", "node-b"];

const SNAPSHOT: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: bench
  labels:
    kubernetes.io/metadata.name: bench
---
apiVersion: v1
kind: Pod
metadata:
  namespace: bench
  name: client
  labels:
    app: client
spec:
  nodeName: node-a
  containers:
    - name: client
      image: labpod
status:
  phase: Running
  podIP: 10.244.1.10
  podIPs:
    - ip: 10.244.1.10
---
apiVersion: v1
kind: Pod
metadata:
  namespace: bench
  name: server
  labels:
    app: server
spec:
  nodeName: node-b
  containers:
    - name: server
      image: labpod
      ports:
        - containerPort: 80
          protocol: TCP
status:
  phase: Running
  podIP: 10.244.2.10
  podIPs:
    - ip: 10.244.2.10
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  namespace: bench
  name: server-deny-ingress
spec:
  podSelector:
    matchLabels:
      app: server
  policyTypes: [Ingress]
";

const ALLOW_POLICY: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  namespace: bench
  name: server-allow-client
spec:
  podSelector:
    matchLabels:
      app: server
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector:
            matchLabels:
              app: client
      ports:
        - protocol: TCP
          port: 80
";

fn snapshot_text(allow: bool) -> String {
    if allow {
        format!("{SNAPSHOT}{ALLOW_POLICY}")
    } else {
        SNAPSHOT.to_string()
    }
}

/// Writes `text` beside `path` and renames it over `path`.
fn replace_by_rename(path: &Path, text: &str) {
    let new = path.with_extension("yaml.new");
    fs::write(&new, text).expect("write new snapshot");
    fs::rename(&new, path).expect("rename over the snapshot");
}

/// The agent's `micros=` figure from a `synced` log line.
fn synced_micros(line: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("micros="))
        .and_then(|m| m.parse().ok())
}

fn latency() {
    let samples = env_or("NFTPOL_LAB_SAMPLES", 100);
    let dir = std::env::temp_dir().join(format!("nftpol-bench-lab-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch dir");
    let snapshot: PathBuf = dir.join("snapshot.yaml");
    fs::write(&snapshot, snapshot_text(false)).expect("write snapshot");
    let cluster = agent::manifests::load(&snapshot).expect("snapshot loads");
    let lab = Lab::for_cluster(LABPOD, &cluster, &NODES, &[]).expect("lab");
    let pod = |name: &str| lab.pods().iter().find(|p| p.name == name).expect("pod");
    let client = pod("bench/client").clone();
    let dst = SocketAddr::new(IpAddr::V4(pod("bench/server").ipv4), 80);
    agent_binary(Path::new(LABPOD));

    println!(
        "\nlatency: snapshot rename -> kernel enforces, client {} (node-a) -> server {dst} (node-b) TCP",
        client.ipv4
    );
    println!(
        "  deny->allow: {STAGGER} probers, connect timeout {CONNECT_TIMEOUT:?}, an attempt every {:?}; time of the first completed connect",
        CONNECT_TIMEOUT / STAGGER
    );
    println!(
        "  allow->deny: one prober, connect + reply + close, {GAP:?} apart; start of the first probe whose connect or reply does not come within {CONNECT_TIMEOUT:?}, confirmed by the next"
    );
    println!(
        "  rename moments uniform over the poll period; {samples} samples per direction and poll interval"
    );
    for poll_ms in [200u64, 20] {
        let mut jitter = Jitter::new();
        fs::write(&snapshot, snapshot_text(false)).expect("reset snapshot");
        let poll = poll_ms.to_string();
        let mut agents: Vec<Agent> = (0..NODES.len())
            .map(|i| {
                Agent::start(
                    Path::new(LABPOD),
                    &lab,
                    i,
                    NODES[i],
                    &snapshot,
                    &["--poll-ms", &poll],
                )
            })
            .collect();
        wait_synced(&mut agents, Duration::from_secs(10));
        let initial = agents[1].synced();
        let mut to_allow = Vec::new();
        let mut to_deny = Vec::new();
        let mut attempts = [0u32; 2];
        for i in 0..2 * samples {
            let allow = i % 2 == 0;
            let before = marks(&agents);
            let text = snapshot_text(allow);
            let flip = || {
                thread::sleep(jitter.below(Duration::from_millis(poll_ms)));
                let t0 = Instant::now();
                replace_by_rename(&snapshot, &text);
                t0
            };
            let (seen, t0) = if allow {
                until_allowed(&client.netns, dst, flip)
            } else {
                until_denied(&client.netns, dst, flip)
            };
            let ms = seen.at.saturating_duration_since(t0).as_secs_f64() * 1e3;
            if allow {
                to_allow.push(ms);
                attempts[0] += seen.attempts;
            } else {
                to_deny.push(ms);
                attempts[1] += seen.attempts;
            }
            // node-b's ruleset changes; node-a's does not, but it reads the snapshot too.
            wait_change(
                &mut agents,
                &before,
                &[false, true],
                Delivery::Whole,
                "the change",
                Duration::from_secs(10),
            );
        }
        let errors: usize = agents.iter().map(Agent::errors).sum();
        assert_eq!(errors, 0, "agent errors\n{}", logs(&mut agents));
        let micros: Vec<f64> = agents[1]
            .lines()
            .iter()
            .filter(|l| l.contains("synced"))
            .skip(initial)
            .filter_map(|l| synced_micros(l))
            .collect();
        println!("\n  --poll-ms {poll_ms}:");
        println!(
            "    deny->allow {} ({:.1} connects per sample)",
            summary(&to_allow, "ms"),
            f64::from(attempts[0]) / to_allow.len() as f64
        );
        println!(
            "    allow->deny {} ({:.1} connects per sample)",
            summary(&to_deny, "ms"),
            f64::from(attempts[1]) / to_deny.len() as f64
        );
        let micros_ms: Vec<f64> = micros.iter().map(|m| m / 1e3).collect();
        println!(
            "    node-b agent `synced` (diff + netlink transaction; not reading or compiling the snapshot): {}",
            summary(&micros_ms, "ms")
        );
    }
    let _ = fs::remove_dir_all(&dir);
}

// --------------------------------------------------------------------------------- connrate

/// The server's port: a containerPort (`http`) of the synthetic pods, which
/// `api-from-team-frontends` admits.
const SERVER_PORT: u16 = 8080;

fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..LabelSelector::default()
    }
}

/// The lab pod as a pod of the synthetic cluster, labelled `app`, in `namespace`.
fn model_pod(lab_pod: &Pod, namespace: &str, app: &str) -> ruleset::model::Pod {
    ruleset::model::Pod {
        namespace: namespace.into(),
        name: format!("lab-{}", lab_pod.name),
        node: Some(format!("node-{}", lab_pod.node)),
        labels: [("app".to_string(), app.to_string())].into_iter().collect(),
        ips: vec![IpAddr::V4(lab_pod.ipv4)],
        host_network: false,
        phase: Some("Running".into()),
        ports: vec![ContainerPort {
            name: Some("http".into()),
            protocol: "TCP".into(),
            port: i32::from(SERVER_PORT),
        }],
    }
}

/// Runs `f` on a thread inside lab namespace `netns`.
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            enter_netns(netns);
            f()
        })
        .join()
        .expect("netns thread")
    })
}

fn install(netns: &str, table: &Table) -> Duration {
    in_netns(netns, || {
        let mut writer = Writer::new().expect("netlink socket");
        let started = Instant::now();
        writer.replace_table(table).expect("replace_table");
        started.elapsed()
    })
}

fn ip_netns_exec(netns: &str, command: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(command)
        .output()
        .expect("ip netns exec runs");
    assert!(
        out.status.success(),
        "{command:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn conntrack_count(netns: &str) -> String {
    ip_netns_exec(
        netns,
        &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
    )
    .trim()
    .to_string()
}

/// One `labpod connrate` run: connections per second.
fn connrate_run(from: &Pod, to: &Pod, seconds: usize, parallel: usize) -> f64 {
    let out = ip_netns_exec(
        &from.netns,
        &[
            LABPOD,
            "connrate",
            "--seconds",
            &seconds.to_string(),
            "--parallel",
            &parallel.to_string(),
            &to.ipv4.to_string(),
            &SERVER_PORT.to_string(),
        ],
    );
    let fields: Vec<&str> = out.split_whitespace().collect();
    let [_, count, _, failures, _, elapsed] = fields[..] else {
        panic!("connrate said {out:?}");
    };
    assert_eq!(failures, "0", "connrate failures: {out}");
    count.parse::<f64>().expect("count") / elapsed.parse::<f64>().expect("seconds")
}

fn connrate() {
    let rounds = env_or("NFTPOL_LAB_ROUNDS", 10);
    let seconds = env_or("NFTPOL_LAB_SECONDS", 3);
    // Lab node i is synthetic node-i: the server on node-0 (the 110-pod node the compile
    // benchmark uses), client and intruder on node-1.
    let mut lab = Lab::new(LABPOD, 2).expect("lab");
    let server = lab
        .add_pod_serving(0, "server", 10, &[SERVER_PORT])
        .expect("server");
    let client = lab.add_pod(1, "client", 10).expect("client");
    let intruder = lab.add_pod(1, "intruder", 11).expect("intruder");

    let started = Instant::now();
    let mut cluster = synthetic::cluster(&LARGE);
    // ns-0000 and ns-0050 are both team-0: the synthetic `api-from-team-frontends` admits the
    // client's app=frontend to the server's app=api on 8080, through its peer set; app=worker
    // in the same namespace is not admitted. Both sit under ns-0050's default deny, whose
    // egress this one policy opens towards team-0's api pods.
    cluster.apply_pod(model_pod(&server, "ns-0000", "api"));
    cluster.apply_pod(model_pod(&client, "ns-0050", "frontend"));
    cluster.apply_pod(model_pod(&intruder, "ns-0050", "worker"));
    cluster.apply_policy(NetworkPolicy {
        namespace: "ns-0050".into(),
        name: "egress-to-team-api".into(),
        uid: None,
        pod_selector: selector(&[]),
        policy_types: vec!["Egress".into()],
        ingress: vec![],
        egress: vec![PolicyRule {
            peers: vec![Peer {
                namespace_selector: Some(selector(&[("team", "team-0")])),
                pod_selector: Some(selector(&[("app", "api")])),
                ip_block: None,
            }],
            ports: vec![PolicyPort {
                protocol: Some("TCP".into()),
                port: Some(PortRef::Number(i32::from(SERVER_PORT))),
                end_port: None,
            }],
        }],
    });
    let pods = cluster.pods().count();
    let policies = cluster.policies().count();
    let mut tracer = Tracer::new(cluster.clone());
    let compilers: Vec<Compiler> = (0..2)
        .map(|i| Compiler::new(cluster.clone(), &format!("node-{i}")))
        .collect();
    drop(cluster);
    println!(
        "\nconnrate: synthetic cluster ({pods} pods, {policies} policies) plus the lab pods, built and compiled for node-0 and node-1 in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for (i, c) in compilers.iter().enumerate() {
        println!(
            "  node-{i}: {} local pods, {} set/map elements, {} rules, {} diagnostics",
            c.local_pods().count(),
            c.table().element_count(),
            c.table().rule_count(),
            c.diagnostics().len()
        );
    }
    for from in ["ns-0050/lab-client", "ns-0050/lab-intruder"] {
        let trace = tracer
            .trace(
                &from.parse::<Endpoint>().expect("endpoint"),
                &"ns-0000/lab-server".parse::<Endpoint>().expect("endpoint"),
                Protocol::Tcp,
                SERVER_PORT,
            )
            .expect("trace");
        println!(
            "  trace {from} -> ns-0000/lab-server TCP {SERVER_PORT}:\n    {}",
            trace.to_string().replace('\n', "\n    ")
        );
    }
    drop(tracer);

    let to_server = |port| Target {
        addr: IpAddr::V4(server.ipv4),
        protocol: Protocol::Tcp,
        port,
    };
    let check = |with_rules: bool| {
        let allowed = lab.probe(&client, &[to_server(SERVER_PORT), to_server(81)]);
        let intruder = lab.probe(&intruder, &[to_server(SERVER_PORT)]);
        let (allowed, intruder) = (allowed.expect("probe"), intruder.expect("probe"));
        let expected = if with_rules {
            (vec![true, false], vec![false])
        } else {
            (vec![true, true], vec![true])
        };
        assert_eq!(
            (allowed, intruder),
            expected,
            "client -> server {SERVER_PORT}, 81; intruder -> server {SERVER_PORT}, with rules: {with_rules}"
        );
    };
    let nodes: Vec<String> = (0..2)
        .map(|i| lab.node_netns(i).expect("node").to_string())
        .collect();
    check(false);
    for (netns, c) in nodes.iter().zip(&compilers) {
        let took = install(netns, c.table());
        println!(
            "  installed in {netns} in {:.0} ms",
            took.as_secs_f64() * 1e3
        );
    }
    check(true);
    println!(
        "  probes with the rules: client -> server {SERVER_PORT} reaches; client -> server 81 and intruder -> server {SERVER_PORT} do not (without: all reach)"
    );

    println!(
        "  {rounds} rounds of {seconds} s per mode, the order rotating each round; modes: the compiled rulesets in both nodes,"
    );
    println!(
        "  conntrack only (table inet {CT_ONLY_TABLE}: the forward hook and the rulesets' two ct state rules, nothing else), no table"
    );
    println!(
        "  (no table in a namespace: no conntrack hooks there either); each connection: connect, read the server's line to end of"
    );
    println!("  stream (the server closes first), close; no sysctl tuned");
    let mut current = Mode::Rules;
    for parallel in [1usize, 2] {
        let mut rates: [Vec<f64>; 3] = Default::default();
        let mut ratios = Vec::new();
        for round in 0..rounds {
            let mut order = Mode::ALL;
            order.rotate_left(round % Mode::ALL.len());
            let mut this_round = [0.0; 3];
            for mode in order {
                if mode != current {
                    for (netns, c) in nodes.iter().zip(&compilers) {
                        current.remove(netns);
                        mode.install(netns, c.table());
                    }
                    current = mode;
                }
                let rate = connrate_run(&client, &server, seconds, parallel);
                this_round[mode as usize] = rate;
                rates[mode as usize].push(rate);
            }
            ratios.push(
                this_round[Mode::Rules as usize] / this_round[Mode::NoTable as usize] * 100.0,
            );
        }
        let medians = rates.each_ref().map(|v| median(v));
        println!(
            "\n  {parallel} client thread(s), connections per second (load average after: {}):",
            loadavg()
        );
        for mode in Mode::ALL {
            println!(
                "    {:<15} median {:>5.0}  (runs: {})",
                mode.name(),
                medians[mode as usize],
                rates[mode as usize]
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        println!(
            "    rules / no table: {:.1}% of medians, {:.1}% median of rounds (per round: {} %); conntrack only / no table: {:.1}%",
            medians[Mode::Rules as usize] / medians[Mode::NoTable as usize] * 100.0,
            median(&ratios),
            ratios
                .iter()
                .map(|r| format!("{r:.1}"))
                .collect::<Vec<_>>()
                .join(" "),
            medians[Mode::Conntrack as usize] / medians[Mode::NoTable as usize] * 100.0,
        );
        println!(
            "    conntrack entries now: node-0 {}, node-1 {}",
            conntrack_count(&nodes[0]),
            conntrack_count(&nodes[1])
        );
    }
    for netns in &nodes {
        current.remove(netns);
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

const CT_ONLY_TABLE: &str = "nftpol_ct_only";

/// What the node namespaces hold during a connrate run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Rules = 0,
    Conntrack = 1,
    NoTable = 2,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Rules, Mode::Conntrack, Mode::NoTable];

    fn name(self) -> &'static str {
        match self {
            Mode::Rules => "rules",
            Mode::Conntrack => "conntrack only",
            Mode::NoTable => "no table",
        }
    }

    fn install(self, netns: &str, table: &Table) {
        match self {
            Mode::Rules => {
                install(netns, table);
            }
            Mode::Conntrack => {
                let text = format!(
                    "table inet {CT_ONLY_TABLE} {{\n\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tct state related accept\n\t\tct state established ct direction reply accept\n\t}}\n}}\n"
                );
                let path = std::env::temp_dir()
                    .join(format!("nftpol-bench-lab-{}-ct.nft", std::process::id()));
                fs::write(&path, text).expect("write nft file");
                ip_netns_exec(netns, &["nft", "-f", path.to_str().expect("utf-8 path")]);
                let _ = fs::remove_file(&path);
            }
            Mode::NoTable => {}
        }
    }

    fn remove(self, netns: &str) {
        match self {
            Mode::Rules => ip_netns_exec(netns, &["nft", "delete", "table", "inet", TABLE_NAME]),
            Mode::Conntrack => {
                ip_netns_exec(netns, &["nft", "delete", "table", "inet", CT_ONLY_TABLE])
            }
            Mode::NoTable => String::new(),
        };
    }
}
