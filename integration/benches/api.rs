//! `agent run` fed by the API stand-in (`integration::agents::StandIn`) in the network-namespace
//! lab (needs root):
//!
//! - `memory`: the 150,000-pod synthetic cluster (2,000 namespaces, 10,000 policies) served by
//!   the stand-in, one agent for `node-0` (110 local pods): its RSS and peak RSS after the first
//!   sync, in steady state, and after a relist forced by 410 Gone (the stand-in compacts its
//!   history while the watches are cut, with one local pod relabelled meanwhile).
//! - `latency`: two lab nodes with a client and a server pod; the client is relabelled at the
//!   stand-in so that the server's ingress policy admits it or no longer does, and real
//!   connections time the change (the probes of `integration::measure`); the node's agent's
//!   own time from the write to its `synced` log line comes beside it.
//! - `churn`: on the 150,000-pod cluster, 1,000 pods created and then deleted at the stand-in,
//!   in one burst and at 100 per second: the agent's CPU time (utime + stime), transactions
//!   (`nftpol_syncs_total`) and the time until it has taken every change (its log read every
//!   20 ms, so convergence is late by up to that).
//!
//! With `NFTPOL_API_OTHERS_MS=N`, a stand-in for kube-proxy commits one element to a table of
//! its own in the agent's node every N ms throughout `churn` (and its idle phase), as a busy
//! node's other writers do; the agent's `nftpol_table_checks_total` says how it looked at its
//! tables after them.
//!
//! The stand-in runs in this process, so the RSS figures are the agent's alone.
//! `cargo bench -p integration --bench api [-- memory|latency|churn]`; `NFTPOL_API_SAMPLES`:
//! latency samples per direction (default 100). Figures are printed with the load average
//! (the machine may be shared); nothing is asserted about speed or size.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark whose fixture is wrong should stop loudly"
)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use integration::agents::{
    agent_binary, http_get_in, logs, marks, rulesets_changed, wait_change, wait_synced, Agent,
    Delivery, Mark, StandIn,
};
use integration::apiserver::{ApiServer, Resource};
use integration::lab::Lab;
use integration::measure::{
    cpu_time, env_or, loadavg, log_time_of_day, metric_sum, seconds_after, summary, time_of_day,
    until_verdict, wants, Jitter, Memory,
};
use integration::netns;
use integration::objects;
use integration::synthetic::{self, LARGE, LOCAL_NODE};
use ruleset::model::{
    ContainerPort, LabelSelector, Labels, Namespace, NetworkPolicy, Peer, Pod, PolicyPort,
    PolicyRule, PortRef,
};
use ruleset::Cluster;

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");
/// Where each agent serves /metrics, inside its node's namespace.
const HEALTH: &str = "127.0.0.1:9743";
/// Waits for the 150,000-pod cluster: listing it takes the agent tens of seconds.
const LARGE_WAIT: Duration = Duration::from_secs(900);

fn main() {
    if netns::skip_unless_root("bench api") {
        return;
    }
    println!("load average at start: {}", loadavg());
    agent_binary(Path::new(LABPOD));
    if wants("latency") {
        latency();
    }
    if wants("memory") || wants("churn") {
        let mut world = Large::start();
        if wants("memory") {
            world.memory();
        }
        if wants("churn") {
            world.churn();
        }
    }
    println!("load average at end: {}", loadavg());
}

fn metrics(agent: &Agent) -> String {
    http_get_in(&agent.netns, HEALTH, "/metrics").expect("GET /metrics")
}

fn syncs(agent: &Agent) -> f64 {
    metric_sum(&metrics(agent), "nftpol_syncs_total")
}

/// Another writer of nf_tables in a node: one element added to `table inet others` every
/// `ms` milliseconds, until dropped.
struct Others(std::process::Child);

impl Others {
    fn start(netns: &str, ms: &str) -> Others {
        let ms: u64 = ms
            .parse()
            .expect("NFTPOL_API_OTHERS_MS is a number of milliseconds");
        let script = format!(
            "nft add table inet others && nft add set inet others s '{{ type ipv4_addr; }}' || exit 1
             i=0; while :; do
                 nft add element inet others s \"{{ 10.$((i / 65536 % 256)).$((i / 256 % 256)).$((i % 256)) }}\" || exit 1
                 i=$((i + 1)); sleep {}
             done",
            ms as f64 / 1e3
        );
        println!("  another writer commits to table inet others every {ms} ms");
        Others(
            std::process::Command::new("ip")
                .args(["netns", "exec", netns, "bash", "-c", &script])
                .spawn()
                .expect("start the other writer"),
        )
    }
}

impl Drop for Others {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ------------------------------------------------------------------- the large cluster

/// The 150,000-pod cluster at the stand-in and one agent for its `node-0`, in a one-node lab.
struct Large {
    // Dropped in this order: the agent, the stand-in, then the lab's namespaces.
    agents: Vec<Agent>,
    stand_in: StandIn,
    _lab: Lab,
}

impl Large {
    fn start() -> Large {
        let lab = Lab::new(LABPOD, 1).expect("lab");
        let started = Instant::now();
        let cluster = synthetic::cluster(&LARGE);
        let stand_in = StandIn::start(&lab, 0, &cluster);
        println!(
            "\nlarge cluster: {} pods, {} namespaces, {} policies, built and served by the stand-in in {:.1} s; agent for {LOCAL_NODE} ({} local pods)",
            cluster.pods().count(),
            cluster.namespace_names().count(),
            cluster.policies().count(),
            started.elapsed().as_secs_f64(),
            LARGE.local_pods,
        );
        drop(cluster);
        let mut agents = vec![Agent::start_api(
            Path::new(LABPOD),
            &lab,
            0,
            LOCAL_NODE,
            &stand_in.kubeconfig(),
            &["--health-addr", HEALTH],
        )];
        let took = wait_synced(&mut agents, LARGE_WAIT);
        let agent = &agents[0];
        let memory = Memory::of(agent.pid());
        // The kernel's counts are set once the first sync is read back, just after its log line.
        let mut text = metrics(agent);
        for _ in 0..50 {
            if metric_sum(&text, "nftpol_kernel_rules") > 0.0 {
                break;
            }
            thread::sleep(Duration::from_millis(20));
            text = metrics(agent);
        }
        println!(
            "  first sync {:.1} s after start: {memory} (load {})",
            took.as_secs_f64(),
            loadavg()
        );
        println!(
            "  the agent watches {} objects; {} rules, {} sets, {} elements in the kernel",
            metric_sum(&text, "nftpol_watched_objects"),
            metric_sum(&text, "nftpol_kernel_rules"),
            metric_sum(&text, "nftpol_kernel_sets"),
            metric_sum(&text, "nftpol_kernel_elements"),
        );
        Large {
            agents,
            stand_in,
            _lab: lab,
        }
    }

    fn pid(&self) -> u32 {
        self.agents[0].pid()
    }

    fn memory(&mut self) {
        println!("\nmemory: agent for {LOCAL_NODE} on the 150,000-pod cluster");
        thread::sleep(Duration::from_secs(10));
        println!(
            "  steady state, 10 s later: {} (load {})",
            Memory::of(self.pid()),
            loadavg()
        );
        // A relist after 410: pod 0 (local to node-0) relabelled while the watches are cut,
        // and the history gone, so every watch that resumes must list again.
        let before = marks(&self.agents);
        self.stand_in
            .server
            .put_unseen_and_compact(objects::pod(&synthetic::pod(&LARGE, 0, "api")))
            .expect("a served kind");
        let took = wait_change(
            &mut self.agents,
            &before,
            &[true],
            Delivery::Objects(1),
            "the relist",
            LARGE_WAIT,
        );
        println!(
            "  after a relist forced by 410 Gone (synced {:.1} s after the write): {} (load {})",
            took.as_secs_f64(),
            Memory::of(self.pid()),
            loadavg()
        );
        thread::sleep(Duration::from_secs(10));
        println!(
            "  10 s after the relist: {} (load {})",
            Memory::of(self.pid()),
            loadavg()
        );
        let errors = self.agents[0].errors();
        assert_eq!(errors, 0, "agent errors\n{}", logs(&mut self.agents));
    }

    fn churn(&mut self) {
        const PODS: usize = 1_000;
        println!(
            "\nchurn: {PODS} pods created, then deleted, at the stand-in; agent for {LOCAL_NODE} on the 150,000-pod cluster"
        );
        // New pods beyond the cluster's, one in each of namespaces 0..1000, on other nodes:
        // they enter the peer sets of the local pods' policies.
        let pods: Vec<Pod> = (0..PODS)
            .map(|i| synthetic::pod(&LARGE, LARGE.pods + i, synthetic::app_of(i)))
            .collect();
        let _others = std::env::var("NFTPOL_API_OTHERS_MS")
            .ok()
            .map(|ms| Others::start(&self.agents[0].netns, &ms));
        let idle_from = cpu_time(self.pid());
        thread::sleep(Duration::from_secs(10));
        println!(
            "  idle for 10 s: {:.2} s CPU (load {})",
            (cpu_time(self.pid()) - idle_from).as_secs_f64(),
            loadavg()
        );
        for pace in [None, Some(Duration::from_millis(10))] {
            let name = match pace {
                None => "one burst".to_string(),
                Some(gap) => format!("{:.0}/s", 1.0 / gap.as_secs_f64()),
            };
            self.phase(&format!("create, {name}"), &pods, pace, |server, pod| {
                server.put(objects::pod(pod)).expect("a served kind");
            });
            self.phase(&format!("delete, {name}"), &pods, pace, |server, pod| {
                assert!(server.delete(Resource::Pods, &pod.namespace, &pod.name));
            });
        }
        let text = metrics(&self.agents[0]);
        println!(
            "  the agent looked at its tables after other transactions: {} times by notifications, {} by reading them back; {} whole writes since start-up",
            metric_sum(&text, "nftpol_table_checks_total{by=\"notifications\"}"),
            metric_sum(&text, "nftpol_table_checks_total{by=\"read_back\"}"),
            metric_sum(&text, "nftpol_syncs_total{kind=\"full\",result=\"ok\"}"),
        );
        let errors = self.agents[0].errors();
        assert_eq!(errors, 0, "agent errors\n{}", logs(&mut self.agents));
    }

    /// Writes `pods` one by one, `pace` apart or back to back, and prints what taking them
    /// cost the agent.
    fn phase(
        &mut self,
        what: &str,
        pods: &[Pod],
        pace: Option<Duration>,
        write: impl Fn(&ApiServer, &Pod),
    ) {
        let pid = self.pid();
        let before: Vec<Mark> = marks(&self.agents);
        let syncs_before = syncs(&self.agents[0]);
        let cpu_before = cpu_time(pid);
        let started = Instant::now();
        for (i, pod) in pods.iter().enumerate() {
            if let Some(gap) = pace {
                let due = started + gap * i as u32;
                thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            write(&self.stand_in.server, pod);
        }
        let written = started.elapsed();
        let after_last = wait_change(
            &mut self.agents,
            &before,
            &[false],
            Delivery::Objects(pods.len()),
            what,
            LARGE_WAIT,
        );
        let converged = started.elapsed();
        let cpu = cpu_time(pid) - cpu_before;
        let now = self.agents[0].mark();
        println!(
            "  {what}: written in {:.2} s; every change taken {:.2} s after the first write ({:.2} s after the last); agent CPU {:.2} s; {} transactions; {} batches: {} synced, {} unchanged; {} (load {})",
            written.as_secs_f64(),
            converged.as_secs_f64(),
            after_last.as_secs_f64(),
            cpu.as_secs_f64(),
            syncs(&self.agents[0]) - syncs_before,
            now.batches - before[0].batches,
            now.synced - before[0].synced,
            (now.taken - before[0].taken) - (now.synced - before[0].synced),
            Memory::of(pid),
            loadavg()
        );
    }
}

// ---------------------------------------------------------------------------------- latency

/// Node `i` of the lab is `NODES[i]`.
const NODES: [&str; 2] = ["node-a", "node-b"];
const SERVER_PORT: u16 = 80;

fn labels(app: &str) -> Labels {
    [("app".to_string(), app.to_string())].into_iter().collect()
}

fn selector(app: &str) -> LabelSelector {
    LabelSelector {
        match_labels: labels(app),
        ..LabelSelector::default()
    }
}

fn lab_pod(name: &str, node: usize, app: &str, ports: &[u16]) -> Pod {
    Pod {
        namespace: "bench".into(),
        name: name.into(),
        node: Some(NODES[node].into()),
        labels: labels(app),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 244, node as u8 + 1, 10))],
        host_network: false,
        phase: Some("Running".into()),
        ports: ports
            .iter()
            .map(|&port| ContainerPort {
                name: None,
                protocol: "TCP".into(),
                port: i32::from(port),
            })
            .collect(),
    }
}

/// The server denies all ingress but from `app=client` on its port; the client's label says
/// whether it is let in.
fn latency_cluster(client_app: &str) -> Cluster {
    let policy = |name: &str, ingress| NetworkPolicy {
        namespace: "bench".into(),
        name: name.into(),
        uid: None,
        pod_selector: selector("server"),
        policy_types: vec!["Ingress".into()],
        ingress,
        egress: vec![],
    };
    Cluster::from_objects(
        [Namespace {
            name: "bench".into(),
            labels: Labels::new(),
        }],
        [
            lab_pod("client", 0, client_app, &[]),
            lab_pod("server", 1, "server", &[SERVER_PORT]),
        ],
        [
            policy("server-deny-ingress", vec![]),
            policy(
                "server-allow-client",
                vec![PolicyRule {
                    peers: vec![Peer {
                        pod_selector: Some(selector("client")),
                        ..Peer::default()
                    }],
                    ports: vec![PolicyPort {
                        protocol: Some("TCP".into()),
                        port: Some(PortRef::Number(i32::from(SERVER_PORT))),
                        end_port: None,
                    }],
                }],
            ),
        ],
    )
}

/// The `micros=` figure of an agent log line, in milliseconds.
fn micros_ms(line: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("micros="))
        .and_then(|m| m.parse::<f64>().ok())
        .map(|m| m / 1e3)
}

fn latency() {
    let samples = env_or("NFTPOL_API_SAMPLES", 100);
    let denied = latency_cluster("visitor");
    let allowed = latency_cluster("client");
    let changed = rulesets_changed(&NODES, &denied, &allowed);
    let lab = Lab::for_cluster(LABPOD, &denied, &NODES, &[]).expect("lab");
    let client = lab.pod("bench/client").expect("client").clone();
    let server = lab.pod("bench/server").expect("server");
    let dst = SocketAddr::new(IpAddr::V4(server.ipv4), SERVER_PORT);
    let mut stand_in = StandIn::start(&lab, 0, &denied);
    let mut agents = Agent::start_each_api(
        Path::new(LABPOD),
        &lab,
        &NODES,
        &stand_in.kubeconfig(),
        &["--health-addr", HEALTH],
    );
    wait_synced(&mut agents, Duration::from_secs(60));
    // The node whose ruleset the relabel changes: the server's.
    let node = changed.iter().position(|&c| c).expect("a ruleset changes");
    println!(
        "\nlatency: client {} (node-a) relabelled at the stand-in, app=visitor <-> app=client; server {dst} (node-b) admits app=client on TCP {SERVER_PORT}",
        client.ipv4
    );
    println!(
        "  the probes of integration::measure (until_allowed, until_denied); writes at moments uniform over 50 ms; {samples} samples per direction; rulesets change: {changed:?}"
    );
    let mut jitter = Jitter::new();
    let mut to_allow = Vec::new();
    let mut to_deny = Vec::new();
    let mut to_synced = Vec::new();
    let mut to_batch = Vec::new();
    let mut commit = Vec::new();
    for i in 0..2 * samples {
        let allow = i % 2 == 0;
        let next = if allow { &allowed } else { &denied };
        let before = marks(&agents);
        let mut wall = SystemTime::now();
        let flip = || {
            thread::sleep(jitter.below(Duration::from_millis(50)));
            let t0 = Instant::now();
            wall = SystemTime::now();
            assert_eq!(stand_in.publish(next), 1, "one write: the client pod");
            t0
        };
        let (_, ms) = until_verdict(allow, &client.netns, dst, flip);
        if allow {
            to_allow.push(ms);
        } else {
            to_deny.push(ms);
        }
        wait_change(
            &mut agents,
            &before,
            &changed,
            Delivery::Objects(1),
            "the relabel",
            Duration::from_secs(10),
        );
        let written = time_of_day(wall);
        let agent = &agents[node];
        let synced = &agent.synced_lines()[before[node].synced];
        let batch = &agent.batch_lines()[before[node].batches];
        to_synced.push(seconds_after(written, log_time_of_day(synced).expect("a time")) * 1e3);
        to_batch.push(seconds_after(written, log_time_of_day(batch).expect("a time")) * 1e3);
        commit.extend(micros_ms(synced));
    }
    let errors: usize = agents.iter().map(Agent::errors).sum();
    assert_eq!(errors, 0, "agent errors\n{}", logs(&mut agents));
    let both: Vec<f64> = to_allow.iter().chain(&to_deny).copied().collect();
    println!("  write at the stand-in -> real connections see the new verdict:");
    println!("    deny->allow {}", summary(&to_allow, "ms"));
    println!("    allow->deny {}", summary(&to_deny, "ms"));
    println!("    both        {}", summary(&both, "ms"));
    println!(
        "  {}'s agent, by its log's timestamps (text format, microseconds):",
        NODES[node]
    );
    println!(
        "    write -> batch applied (watch event, 10 ms coalescing, compile) {}",
        summary(&to_batch, "ms")
    );
    println!("    write -> `synced`       {}", summary(&to_synced, "ms"));
    println!(
        "    `synced` micros= (diff + netlink transaction) {}",
        summary(&commit, "ms")
    );
    println!("  load average: {}", loadavg());
}
