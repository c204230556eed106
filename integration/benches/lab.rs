//! Live enforcement in the network-namespace lab (`integration::lab`; needs root):
//!
//! - `latency`: one `agent run` per node of a two-node lab; the snapshot is replaced by rename
//!   so that one cross-node cell flips (policy `bench/server-allow-client`, client -> server
//!   TCP 80, added or removed), and the time from just before the rename until real
//!   connections see the new verdict is taken, at `--poll-ms` 200 (the default) and 20.
//! - `connrate`: new TCP connections per second from a pod on one node to a pod on another,
//!   with the 150,000-pod synthetic cluster's rulesets in both nodes versus without, in rounds
//!   rotating eight modes (a ninth below): nftpol alone, nftpol without its established-connection fast path,
//!   conntrack only, bare (no table), and the node's own networking tables (Flannel- and
//!   kube-proxy-like, `lab::networking_tables`) without and with nftpol, and with only its
//!   policy table or only its anti-spoofing guard (to tell their costs apart). A real node
//!   without a policy agent is `networking`: conntrack on, NAT and filter chains in place.
//! - `veths`: one `agent run` in a one-node lab as pods are added to its bridge: how long after
//!   a pod's creation starts the agent lists its veth (it follows the kernel's link reports),
//!   one pod at a time; and what a burst of 100 pods in about a second costs it in CPU.
//!
//! `cargo bench -p integration --bench lab [-- latency|connrate|veths]`. Environment:
//! `NFTPOL_LAB_SAMPLES` (latency samples per direction and poll interval, default 100),
//! `NFTPOL_LAB_CLIENT_NODE` (connrate: 0 puts the client beside the server, default 1),
//! `NFTPOL_LAB_ROUNDS` and `NFTPOL_LAB_SECONDS` (connrate rounds per mode, default 10, and
//! seconds per run, default 3), `NFTPOL_LAB_MODES` (connrate modes to run, by key, comma
//! separated: `rules,rules-slow,conntrack,bare,networking,networking-rules,networking-policy,
//! networking-guard,networking-extra`, all by default; a
//! single mode run long is what a profiler wants), `NFTPOL_LAB_THREADS` (connrate client
//! threads, one pass each, comma separated, default `1,2`: one or two keep the CPUs partly
//! idle, so the rate is bound by each connection's latency; more threads than CPUs saturate
//! them, so it is bound by CPU). Figures are printed; nothing is asserted about speed. A ratio
//! between two modes is printed twice: of their medians, and as the median of the per-round
//! ratios with the interval that holds the true median at 95% whatever the spread
//! (`measure::median_interval`).
//!
//! To measure a ruleset written by hand against the same lab, before building it into the
//! compiler: `NFTPOL_LAB_DUMP=DIR` writes what the nftpol modes load, per node, as
//! `rules-{node}.nft` and `guard-{node}.nft`; `NFTPOL_LAB_EXTRA=FILE` (`{node}` in it replaced by
//! the node's index, 0 or 1) adds the mode `networking-extra`: the networking tables and the
//! `table` blocks of that file, deleted by name after each run; `{server-veth}`,
//! `{client-veth}` and `{intruder-veth}` in it stand for those pods' veths, whose names change
//! with each run. Its probes must show the lab's policy enforced when `NFTPOL_LAB_EXTRA_ENFORCES`
//! is set, and everything reaching otherwise.

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
use std::time::{Duration, Instant, SystemTime};

use agent::netlink::Writer;
use integration::agents::{agent_binary, logs, marks, wait_change, wait_synced, Agent, Delivery};
use integration::lab::{networking_tables, Lab, Pod, Protocol, Target, NETWORKING_TABLES_DELETE};
use integration::measure::{
    cpu_time, enter_netns, env_or, loadavg, log_time_of_day, median_interval, pct, seconds_after,
    summary, time_of_day, until_verdict, wants, Jitter, CONNECT_TIMEOUT, GAP, STAGGER,
};
use integration::netns;
use integration::synthetic::{self, LARGE};
use ruleset::epoch::{self, CtMarkBits, Epoch};
use ruleset::guard::{guard_table, GuardedPod};
use ruleset::ir::{IfName, Table, TABLE_NAME};
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
    if wants("veths") {
        veths();
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
        let mut agents = Agent::start_each(
            Path::new(LABPOD),
            &lab,
            &NODES,
            &snapshot,
            &["--poll-ms", &poll],
        );
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
            let (seen, ms) = until_verdict(allow, &client.netns, dst, flip);
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
    let threads: Vec<usize> = match std::env::var("NFTPOL_LAB_THREADS") {
        Ok(list) => list
            .split(',')
            .map(|item| {
                let count = item.trim().parse().ok().filter(|&count| count > 0);
                count
                    .unwrap_or_else(|| panic!("NFTPOL_LAB_THREADS: {item:?} is not a thread count"))
            })
            .collect(),
        Err(std::env::VarError::NotPresent) => vec![1, 2],
        Err(err) => panic!("NFTPOL_LAB_THREADS: {err}"),
    };
    // Lab node i is synthetic node-i: the server on node-0 (the 110-pod node the compile
    // benchmark uses), client and intruder on node-1 (or node-0, below).
    let mut lab = Lab::new(LABPOD, 2).expect("lab");
    let server = lab
        .add_pod_serving(0, "server", 10, &[SERVER_PORT])
        .expect("server");
    // NFTPOL_LAB_CLIENT_NODE=0 puts client and intruder beside the server: same-node traffic,
    // bridged from port to port, which meets the guard's `forward` chain.
    let client_node = env_or("NFTPOL_LAB_CLIENT_NODE", 1).min(1);
    let client = lab.add_pod(client_node, "client", 12).expect("client");
    let intruder = lab.add_pod(client_node, "intruder", 11).expect("intruder");

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
    let modes = Mode::chosen();
    let setups: Vec<NodeSetup> = nodes
        .iter()
        .zip(&compilers)
        .enumerate()
        .map(|(i, (netns, c))| {
            let mut slow = c.table().clone();
            epoch::apply(&mut slow, Epoch::first(CtMarkBits::off()));
            let guarded: Vec<GuardedPod> = [&server, &client, &intruder]
                .into_iter()
                .filter(|p| p.node == i)
                .map(|p| {
                    let index = ip_netns_exec(
                        netns,
                        &["cat", &format!("/sys/class/net/{}/ifindex", p.veth())],
                    );
                    GuardedPod::new(
                        c,
                        IfName::new(&p.veth()).expect("veth name"),
                        index.trim().parse().expect("ifindex"),
                        vec![IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6)],
                        p.mac(),
                        false,
                    )
                })
                .collect();
            NodeSetup {
                netns: netns.clone(),
                rules: c.table().clone(),
                slow,
                guard: guard_table(&format!("node-{i}"), &guarded.into()),
                networking: networking_tables(i, nodes.len()),
                extra: if modes.contains(&Mode::NetworkingExtra) {
                    let text = fs::read_to_string(extra_path(i))
                        .expect("NFTPOL_LAB_EXTRA names a readable file");
                    // Veth names change with each run's prefix.
                    [
                        ("server", &server),
                        ("client", &client),
                        ("intruder", &intruder),
                    ]
                    .into_iter()
                    .fold(text, |text, (role, pod)| {
                        text.replace(&format!("{{{role}-veth}}"), &pod.veth())
                    })
                } else {
                    String::new()
                },
            }
        })
        .collect();
    drop(compilers);
    if let Ok(dir) = std::env::var("NFTPOL_LAB_DUMP") {
        for (i, setup) in setups.iter().enumerate() {
            for (name, table) in [("rules", &setup.rules), ("guard", &setup.guard)] {
                let path = Path::new(&dir).join(format!("{name}-{i}.nft"));
                fs::write(&path, ruleset::render(table))
                    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            }
        }
        println!("  rules and guards written to {dir}");
    }
    for setup in &setups {
        ip_netns_exec(
            &setup.netns,
            &["nft", "delete", "table", "inet", TABLE_NAME],
        );
    }
    for &mode in &modes {
        for setup in &setups {
            mode.install(setup);
        }
        if mode == Mode::NetworkingExtra {
            // Whatever the extra tables are meant to do, they say: NFTPOL_LAB_EXTRA_ENFORCES=1
            // when they enforce the lab's policy as the compiled rulesets do.
            check(std::env::var_os("NFTPOL_LAB_EXTRA_ENFORCES").is_some());
        } else {
            check(mode.has_rules());
        }
        for setup in &setups {
            mode.remove(setup);
        }
    }
    println!("  the same probes pass in every mode with nftpol, all reach in the others");

    println!(
        "  {rounds} rounds of {seconds} s per mode, the order rotating each round; conntrack flushed in both nodes before each run;"
    );
    println!("  modes:");
    for &mode in &modes {
        println!("    {:<22} {}", mode.name(), mode.describe());
    }
    println!(
        "  each connection: connect, read the server's line to end of stream (the server closes first), close; no sysctl tuned"
    );
    let mut current: Option<Mode> = None;
    for &parallel in &threads {
        // Per mode, one rate per round, in round order.
        let mut rates: [Vec<f64>; MODES] = Default::default();
        for round in 0..rounds {
            let mut order = modes.clone();
            order.rotate_left(round % modes.len());
            for mode in order {
                if current != Some(mode) {
                    for setup in &setups {
                        if let Some(was) = current {
                            was.remove(setup);
                        }
                        mode.install(setup);
                    }
                    current = Some(mode);
                }
                for setup in &setups {
                    flush_conntrack(&setup.netns);
                }
                let rate = connrate_run(&client, &server, seconds, parallel);
                rates[mode as usize].push(rate);
            }
        }
        // Only for modes that ran: a median of nothing is not a number.
        let median_of = |m: Mode| median(&rates[m as usize]);
        println!(
            "\n  {parallel} client thread(s), connections per second (load average after: {}):",
            loadavg()
        );
        for &mode in &modes {
            println!(
                "    {:<22} median {:>5.0}  (runs: {})",
                mode.name(),
                median_of(mode),
                joined(&rates[mode as usize], 0)
            );
        }
        // Ratios only between modes that ran (`NFTPOL_LAB_MODES`).
        let ran = |m: Mode| !rates[m as usize].is_empty();
        let ratio = |a: Mode, b: Mode| median_of(a) / median_of(b) * 100.0;
        for (label, a, b) in [
            ("nftpol alone / bare", Mode::Rules, Mode::Bare),
            (
                "flannel-like + nftpol / flannel-like",
                Mode::NetworkingRules,
                Mode::Networking,
            ),
            (
                "flannel-like + policy / flannel-like",
                Mode::NetworkingPolicy,
                Mode::Networking,
            ),
            (
                "flannel-like + guard / flannel-like",
                Mode::NetworkingGuard,
                Mode::Networking,
            ),
            (
                "flannel-like + extra / flannel-like",
                Mode::NetworkingExtra,
                Mode::Networking,
            ),
        ] {
            if !(ran(a) && ran(b)) {
                continue;
            }
            let per_round: Vec<f64> = rates[a as usize]
                .iter()
                .zip(&rates[b as usize])
                .map(|(x, y)| x / y * 100.0)
                .collect();
            let interval = match median_interval(&per_round, 0.95) {
                Some((lo, hi)) => format!("95% interval {lo:.1}-{hi:.1}"),
                None => "too few rounds for a 95% interval".to_string(),
            };
            println!(
                "    {label}: {:.1}% of medians, {:.1}% median of rounds ({interval}; per round: {} %)",
                ratio(a, b),
                median(&per_round),
                joined(&per_round, 1)
            );
        }
        let others: Vec<String> = [
            (
                "nftpol with / without fast path",
                Mode::Rules,
                Mode::RulesNoFastPath,
            ),
            ("conntrack only / bare", Mode::Conntrack, Mode::Bare),
            ("flannel-like / bare", Mode::Networking, Mode::Bare),
        ]
        .into_iter()
        .filter(|&(_, a, b)| ran(a) && ran(b))
        .map(|(label, a, b)| format!("{label}: {:.1}%", ratio(a, b)))
        .collect();
        if !others.is_empty() {
            println!("    {}", others.join("; "));
        }
        println!(
            "    conntrack entries now: node-0 {}, node-1 {}",
            conntrack_count(&nodes[0]),
            conntrack_count(&nodes[1])
        );
    }
    if let Some(was) = current {
        for setup in &setups {
            was.remove(setup);
        }
    }
}

/// `values` with `decimals` digits after the point, separated by spaces.
fn joined(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

const CT_ONLY_TABLE: &str = "nftpol_ct_only";
const MODES: usize = 9;

/// What one node namespace gets in each mode.
struct NodeSetup {
    netns: String,
    /// The compiled table, fast path on (epoch 1; conntrack is flushed before every run).
    rules: Table,
    /// The same without the epoch rules.
    slow: Table,
    /// The anti-spoofing table `bridge nftpol` for the lab pods on the node, as the agent
    /// installs it beside `rules`.
    guard: Table,
    /// `lab::networking_tables` for the node.
    networking: String,
    /// What `NFTPOL_LAB_EXTRA` names for the node, if the extra mode runs.
    extra: String,
}

/// `NFTPOL_LAB_EXTRA` with `{node}` replaced by `node`.
fn extra_path(node: usize) -> PathBuf {
    let template = std::env::var("NFTPOL_LAB_EXTRA").unwrap_or_default();
    PathBuf::from(template.replace("{node}", &node.to_string()))
}

fn flush_conntrack(netns: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "conntrack", "-F"])
        .output()
        .expect("conntrack -F runs");
    assert!(out.status.success(), "conntrack -F in {netns}: {out:?}");
}

fn nft_text(netns: &str, text: &str) {
    let path = std::env::temp_dir().join(format!(
        "nftpol-bench-lab-{}-{}.nft",
        std::process::id(),
        netns
    ));
    fs::write(&path, text).expect("write nft file");
    ip_netns_exec(netns, &["nft", "-f", path.to_str().expect("utf-8 path")]);
    let _ = fs::remove_file(&path);
}

/// What the node namespaces hold during a connrate run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Rules = 0,
    RulesNoFastPath = 1,
    Conntrack = 2,
    Bare = 3,
    Networking = 4,
    NetworkingRules = 5,
    NetworkingPolicy = 6,
    NetworkingGuard = 7,
    NetworkingExtra = 8,
}

impl Mode {
    const ALL: [Mode; MODES] = [
        Mode::Rules,
        Mode::RulesNoFastPath,
        Mode::Conntrack,
        Mode::Bare,
        Mode::Networking,
        Mode::NetworkingRules,
        Mode::NetworkingPolicy,
        Mode::NetworkingGuard,
        Mode::NetworkingExtra,
    ];

    /// `NFTPOL_LAB_MODES`, or all of them (the extra mode only when `NFTPOL_LAB_EXTRA` names
    /// its tables).
    fn chosen() -> Vec<Mode> {
        let extra = std::env::var_os("NFTPOL_LAB_EXTRA").is_some();
        let Ok(keys) = std::env::var("NFTPOL_LAB_MODES") else {
            return Mode::ALL
                .into_iter()
                .filter(|&m| extra || m != Mode::NetworkingExtra)
                .collect();
        };
        let modes: Vec<Mode> = keys
            .split(',')
            .map(|key| {
                Mode::ALL
                    .into_iter()
                    .find(|m| m.key() == key.trim())
                    .unwrap_or_else(|| panic!("NFTPOL_LAB_MODES: no mode {key:?}"))
            })
            .collect();
        assert!(!modes.is_empty(), "NFTPOL_LAB_MODES names no mode");
        assert!(
            extra || !modes.contains(&Mode::NetworkingExtra),
            "mode networking-extra needs NFTPOL_LAB_EXTRA, the file of its tables"
        );
        modes
    }

    fn key(self) -> &'static str {
        match self {
            Mode::Rules => "rules",
            Mode::RulesNoFastPath => "rules-slow",
            Mode::Conntrack => "conntrack",
            Mode::Bare => "bare",
            Mode::Networking => "networking",
            Mode::NetworkingRules => "networking-rules",
            Mode::NetworkingPolicy => "networking-policy",
            Mode::NetworkingGuard => "networking-guard",
            Mode::NetworkingExtra => "networking-extra",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Rules => "nftpol alone",
            Mode::RulesNoFastPath => "nftpol, no fast path",
            Mode::Conntrack => "conntrack only",
            Mode::Bare => "bare",
            Mode::Networking => "flannel-like",
            Mode::NetworkingRules => "flannel-like + nftpol",
            Mode::NetworkingPolicy => "flannel-like + policy",
            Mode::NetworkingGuard => "flannel-like + guard",
            Mode::NetworkingExtra => "flannel-like + extra",
        }
    }

    fn describe(self) -> String {
        match self {
            Mode::Rules => {
                "the compiled rulesets and the lab pods' anti-spoofing guard in both nodes, nothing else".into()
            }
            Mode::RulesNoFastPath => {
                "the same without the epoch rules: every packet evaluated in full".into()
            }
            Mode::Conntrack => format!(
                "table inet {CT_ONLY_TABLE}: the forward hook and the rulesets' two ct state rules"
            ),
            Mode::Bare => "no table in the namespace: no conntrack hooks either".into(),
            Mode::Networking => {
                "Flannel's masquerade and kube-proxy's NAT and filter tables, as a node without a policy agent".into()
            }
            Mode::NetworkingRules => "those and the compiled rulesets".into(),
            Mode::NetworkingPolicy => "those and the policy table alone (no anti-spoofing guard)".into(),
            Mode::NetworkingGuard => "those and the anti-spoofing guard alone (no policy table)".into(),
            Mode::NetworkingExtra => format!(
                "those and the tables in {} (`NFTPOL_LAB_EXTRA`, {{node}} the node's index)",
                extra_path(0).display()
            ),
        }
    }

    fn has_rules(self) -> bool {
        matches!(
            self,
            Mode::Rules | Mode::RulesNoFastPath | Mode::NetworkingRules | Mode::NetworkingPolicy
        )
    }

    fn has_guard(self) -> bool {
        matches!(
            self,
            Mode::Rules | Mode::RulesNoFastPath | Mode::NetworkingRules | Mode::NetworkingGuard
        )
    }

    fn has_networking(self) -> bool {
        matches!(
            self,
            Mode::Networking
                | Mode::NetworkingRules
                | Mode::NetworkingPolicy
                | Mode::NetworkingGuard
                | Mode::NetworkingExtra
        )
    }

    /// The networking tables, then the policy table, then the guard: what the mode has.
    fn install(self, setup: &NodeSetup) {
        let netns = setup.netns.as_str();
        if self == Mode::Conntrack {
            nft_text(
                netns,
                &format!(
                    "table inet {CT_ONLY_TABLE} {{\n\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tct direction reply accept\n\t\tct state related accept\n\t}}\n}}\n"
                ),
            );
        }
        if self.has_networking() {
            nft_text(netns, &setup.networking);
        }
        if self == Mode::RulesNoFastPath {
            install(netns, &setup.slow);
        } else if self.has_rules() {
            install(netns, &setup.rules);
        }
        if self.has_guard() {
            install(netns, &setup.guard);
        }
        if self == Mode::NetworkingExtra {
            nft_text(netns, &setup.extra);
        }
    }

    fn remove(self, setup: &NodeSetup) {
        let netns = setup.netns.as_str();
        if self.has_rules() {
            ip_netns_exec(netns, &["nft", "delete", "table", "inet", TABLE_NAME]);
        }
        if self.has_guard() {
            ip_netns_exec(netns, &["nft", "delete", "table", "bridge", TABLE_NAME]);
        }
        if self == Mode::Conntrack {
            ip_netns_exec(netns, &["nft", "delete", "table", "inet", CT_ONLY_TABLE]);
        }
        if self == Mode::NetworkingExtra {
            let deletes: String = setup
                .extra
                .lines()
                .filter_map(|line| line.strip_prefix("table "))
                .map(|rest| format!("delete table {}\n", rest.trim_end_matches(['{', ' '])))
                .collect();
            nft_text(netns, &deletes);
        }
        if self.has_networking() {
            nft_text(netns, NETWORKING_TABLES_DELETE);
        }
    }
}

// ------------------------------------------------------------------------------------ veths

fn veths() {
    const SINGLES: u8 = 20;
    const BURST: u8 = 100;
    let dir = tempfile::tempdir().expect("scratch dir");
    let mut lab = Lab::new(LABPOD, 1).expect("lab");
    let first = lab.add_pod(0, "bench/first", 2).expect("pod");
    let snapshot = dir.path().join("snapshot.yaml");
    fs::write(
        &snapshot,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: first, namespace: bench}}\nspec: {{nodeName: {}}}\nstatus: {{podIP: {}}}\n",
            NODES[0], first.ipv4
        ),
    )
    .expect("write snapshot");
    agent_binary(Path::new(LABPOD));
    let mut agents = vec![Agent::start(
        Path::new(LABPOD),
        &lab,
        0,
        NODES[0],
        &snapshot,
        &[],
    )];
    wait_synced(&mut agents, Duration::from_secs(10));
    thread::sleep(Duration::from_secs(1));
    let agent = &agents[0];
    // The veths' syncs (by a link report, or by the once-a-second check), by log time.
    let followed_by = |agent: &Agent, by: &str| -> Vec<f64> {
        agent
            .lines()
            .iter()
            .filter(|l| l.contains("kind=\"veths\"") && l.contains(by))
            .filter_map(|l| log_time_of_day(l))
            .collect()
    };
    let followed = |agent: &Agent| followed_by(agent, "by=");
    let on_reports = |agent: &Agent| followed_by(agent, "by=\"link report\"").len();
    println!("\nveths: one `agent run` in a one-node lab; pods added to cni0 while it runs");
    let mut delays = Vec::new();
    let reports = on_reports(agent);
    for i in 0..SINGLES {
        let before = followed(agent).len();
        let started = time_of_day(SystemTime::now());
        lab.add_pod(0, &format!("bench/single-{i}"), 10 + i)
            .expect("pod");
        let give_up = Instant::now() + Duration::from_secs(3);
        while followed(agent).len() == before && Instant::now() < give_up {
            thread::sleep(Duration::from_millis(10));
        }
        if let Some(at) = followed(agent).get(before) {
            delays.push(seconds_after(started, *at) * 1000.0);
        }
        thread::sleep(Duration::from_millis(200));
    }
    println!(
        "  one pod at a time ({SINGLES}, 200 ms apart): veth listed after the pod's creation began: {} ({} on a link report, the rest at the check)",
        summary(&delays, "ms"),
        on_reports(agent) - reports
    );
    let cpu = cpu_time(agent.pid());
    let syncs = on_reports(agent);
    let started = Instant::now();
    for i in 0..BURST {
        lab.add_pod(0, &format!("bench/burst-{i}"), 100 + i)
            .expect("pod");
    }
    let took = started.elapsed();
    thread::sleep(Duration::from_secs(2));
    println!(
        "  a burst of {BURST} pods, added in {:.2} s: agent CPU {:.2} s over that and 2 s after, {} syncs on link reports",
        took.as_secs_f64(),
        (cpu_time(agent.pid()) - cpu).as_secs_f64(),
        on_reports(agent) - syncs
    );
    let errors = agents[0].errors();
    assert_eq!(errors, 0, "agent errors\n{}", logs(&mut agents));
}
