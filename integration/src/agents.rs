//! `agent run` processes in lab nodes, for tests and benchmarks: start one per node, fed by a
//! snapshot file or by the API stand-in ([`StandIn`]); read its log, wait until it took a
//! change of the cluster, signal it; hold the kernel against `Tracer` ([`check_matrix`]).
//! Failures panic: this is test support.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test support: a failure fails the test by panicking"
)]

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use ruleset::{Cluster, Compiler};

use crate::apiserver::{ApiServer, Resource, Settings, Verb};
use crate::lab::{compare_with_trace, Cell, Family, Lab, Protocol};
use crate::objects;

/// The agent's log filter: `info`, and for the API source the reconcile loop's debug line
/// `applied a batch of changes objects=N`, which [`Delivery::Objects`] counts.
const LOG_LEVEL: &str = "info";
const API_LOG_LEVEL: &str = "info,agent::run=debug";

/// The `agent` binary of this build: `<target>/<profile>/agent`, beside `labpod` (pass
/// `env!("CARGO_BIN_EXE_labpod")`). The integration crate only has the agent's library as a
/// dependency, so cargo need not have built the binary, and one left by an older build may
/// lack a newer subcommand: unless it is newer than every source of the agent and the
/// compiler (as after `cargo test --workspace --bins`, which CI runs), `cargo build` it, once
/// per process. (Building `-p agent` alone unifies dependency features differently from a
/// workspace build and would rebuild half the dependency tree for nothing.)
pub fn agent_binary(labpod: &Path) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile_dir = labpod.parent().expect("labpod has a directory");
            let target_dir = profile_dir.parent().expect("the profile has a target dir");
            let bin = profile_dir.join("agent");
            let workspace = crate::workspace();
            let sources = [
                "agent/src",
                "ruleset/src",
                "agent/Cargo.toml",
                "ruleset/Cargo.toml",
                "Cargo.lock",
            ];
            let newest_source = sources
                .iter()
                .map(|s| newest(&workspace.join(s)))
                .max()
                .flatten();
            let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
            if let (Some(built), Some(source)) = (built, newest_source) {
                if built >= source {
                    return bin;
                }
            }
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .current_dir(workspace)
                .env("CARGO_TARGET_DIR", target_dir)
                .args(["build", "-q", "-p", "agent", "--bin", "agent"]);
            match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") => {}
                Some("release") => {
                    build.arg("--release");
                }
                Some(other) => {
                    build.args(["--profile", other]);
                }
                None if cfg!(not(debug_assertions)) => {
                    build.arg("--release");
                }
                None => {}
            }
            let started = Instant::now();
            let status = build.status().expect("cargo runs");
            assert!(
                status.success(),
                "`cargo build -p agent --bin agent` failed"
            );
            assert!(bin.is_file(), "cargo built no {}", bin.display());
            println!(
                "agent binary {} ready in {:?}",
                bin.display(),
                started.elapsed()
            );
            bin
        })
        .clone()
}

/// The latest modification time of `path` or anything under it.
fn newest(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    let own = meta.modified().ok();
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| newest(&entry.path()))
        .chain(own)
        .max()
}

/// One `agent run` in a node namespace, its stderr collected line by line. Dropping it kills
/// the agent if it still runs, so a failing test leaves no agent behind: keep agents in a
/// variable declared after the lab, so that they drop before the lab removes the namespaces.
pub struct Agent {
    pub node: String,
    pub netns: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    exited: Option<ExitStatus>,
}

impl Agent {
    /// Starts `agent run --manifests snapshot --node node` in lab node `index`'s namespace,
    /// with `extra` arguments after those.
    pub fn start(
        labpod: &Path,
        lab: &Lab,
        index: usize,
        node: &str,
        snapshot: &Path,
        extra: &[&str],
    ) -> Agent {
        let source = [OsStr::new("--manifests"), snapshot.as_os_str()];
        Agent::spawn(labpod, lab, index, node, LOG_LEVEL, &source, extra)
    }

    /// Starts `agent run --kubeconfig kubeconfig --node node` (the API source) in lab node
    /// `index`'s namespace, with `extra` arguments after those.
    pub fn start_api(
        labpod: &Path,
        lab: &Lab,
        index: usize,
        node: &str,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Agent {
        let source = [OsStr::new("--kubeconfig"), kubeconfig.as_os_str()];
        Agent::spawn(labpod, lab, index, node, API_LOG_LEVEL, &source, extra)
    }

    /// [`Agent::start`] in every lab node, node `i` named `nodes[i]`.
    pub fn start_each(
        labpod: &Path,
        lab: &Lab,
        nodes: &[&str],
        snapshot: &Path,
        extra: &[&str],
    ) -> Vec<Agent> {
        (0..nodes.len())
            .map(|i| Agent::start(labpod, lab, i, nodes[i], snapshot, extra))
            .collect()
    }

    /// [`Agent::start_api`] in every lab node, node `i` named `nodes[i]`.
    pub fn start_each_api(
        labpod: &Path,
        lab: &Lab,
        nodes: &[&str],
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Vec<Agent> {
        (0..nodes.len())
            .map(|i| Agent::start_api(labpod, lab, i, nodes[i], kubeconfig, extra))
            .collect()
    }

    fn spawn(
        labpod: &Path,
        lab: &Lab,
        index: usize,
        node: &str,
        log_level: &str,
        source: &[&OsStr],
        extra: &[&str],
    ) -> Agent {
        let netns = lab.node_netns(index).expect("node").to_string();
        // The node's own state directory, unless the test names one: never the host's
        // /run/nftpol, which agents of other tests' nodes would share.
        let state = if extra.contains(&"--state-dir") {
            Vec::new()
        } else {
            vec![OsString::from("--state-dir"), lab.state_dir(index).into()]
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns])
            .arg(agent_binary(labpod))
            .args(["--log-level", log_level, "run"])
            .args(source)
            .args(["--node", node])
            .args(state)
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec agent run starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Agent {
            node: node.to_string(),
            netns,
            child,
            log,
            exited: None,
        }
    }

    /// SIGKILL, without waiting.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// `synced` lines of the reconcile loop (not the veth follower's, nor error lines).
    pub fn synced(&self) -> usize {
        self.mark().synced
    }

    /// The `synced` lines of the reconcile loop, in order: the `n`th one logged is the
    /// (`n` + 1)th counted by [`Agent::mark`].
    pub fn synced_lines(&self) -> Vec<String> {
        self.lines().into_iter().filter(|l| is_synced(l)).collect()
    }

    /// The API source's `applied a batch of changes` lines, in order ([`Mark::batches`]).
    pub fn batch_lines(&self) -> Vec<String> {
        self.lines().into_iter().filter(|l| is_batch(l)).collect()
    }

    /// Where the log (in the text format) stands now, to wait for what a change brings.
    pub fn mark(&self) -> Mark {
        let mut mark = Mark::default();
        for line in self.lines().iter().filter(|l| !l.contains("ERROR")) {
            if is_synced(line) {
                mark.synced += 1;
                mark.taken += 1;
            } else if line.contains("ruleset did not") {
                mark.taken += 1;
            } else if is_batch(line) {
                mark.batches += 1;
                mark.objects += line
                    .split_once("objects=")
                    .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|n| n.parse::<usize>().ok())
                    .expect("`applied a batch` names its objects");
            }
        }
        mark
    }

    pub fn errors(&self) -> usize {
        self.count("ERROR")
    }

    /// Lines that contain `text`.
    pub fn count(&self, text: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(text)).count()
    }

    /// None while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    pub fn describe(&mut self) -> String {
        let state = match self.exit_status() {
            None => "running".to_string(),
            Some(status) => format!("exited: {status}"),
        };
        let lines = self.lines();
        let tail = lines.len().saturating_sub(40);
        format!(
            "agent {} (pid {}, {state}), stderr{}:\n    {}",
            self.node,
            self.child.id(),
            if tail > 0 { " (last 40 lines)" } else { "" },
            lines[tail..].join("\n    ")
        )
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {} failed", self.child.id());
    }

    /// Waits up to `timeout` for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A `synced` line of the reconcile loop (not the veth follower's, nor an error line).
fn is_synced(line: &str) -> bool {
    line.contains("synced") && !line.contains("veths") && !line.contains("ERROR")
}

fn is_batch(line: &str) -> bool {
    line.contains("applied a batch of changes") && !line.contains("ERROR")
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn logs(agents: &mut [Agent]) -> String {
    agents
        .iter_mut()
        .map(Agent::describe)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `done` holds for every agent, failing when one exits or at `timeout`.
pub fn wait_for(
    agents: &mut [Agent],
    what: &str,
    timeout: Duration,
    done: impl Fn(usize, &Agent) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = true;
        for (i, agent) in agents.iter_mut().enumerate() {
            if let Some(status) = agent.exit_status() {
                let node = agent.node.clone();
                panic!(
                    "waiting for {what}: agent {node} exited ({status})\n{}",
                    logs(agents)
                );
            }
            all &= done(i, agent);
        }
        if all {
            return started.elapsed();
        }
        if started.elapsed() > timeout {
            panic!("no {what} within {timeout:?}\n{}", logs(agents));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------------- taking a change

/// Waits for every agent's first `synced`.
pub fn wait_synced(agents: &mut [Agent], timeout: Duration) -> Duration {
    wait_for(agents, "`synced` at start", timeout, |_, a| a.synced() > 0)
}

/// Counts from an agent's log at one moment ([`Agent::mark`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    /// `synced` lines of the reconcile loop.
    pub synced: usize,
    /// Changes of the cluster taken: `synced`, or, when the node's ruleset came out the same,
    /// the agent's `the cluster changed; this node's ruleset did not`.
    pub taken: usize,
    /// Batches of API changes applied (the API source's debug lines), and the objects in them.
    pub batches: usize,
    pub objects: usize,
}

pub fn marks(agents: &[Agent]) -> Vec<Mark> {
    agents.iter().map(Agent::mark).collect()
}

/// How a change of the cluster reaches the agents, and so what shows they took all of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In one piece (a snapshot file replaced whole): one more change taken.
    Whole,
    /// As this many object writes through the API, which an agent may take in several
    /// batches: batches applied that hold at least as many objects, and every one of them
    /// taken (synced, or the ruleset found the same).
    Objects(usize),
}

/// Waits until every agent took a change made after `before` was marked: each one whose node's
/// ruleset changes (`changed[i]`) has also logged one more `synced`.
pub fn wait_change(
    agents: &mut [Agent],
    before: &[Mark],
    changed: &[bool],
    delivery: Delivery,
    what: &str,
    timeout: Duration,
) -> Duration {
    wait_for(
        agents,
        &format!("the agents to take {what} ({delivery:?}; rulesets change: {changed:?})"),
        timeout,
        |i, a| {
            let (now, then) = (a.mark(), before[i]);
            let synced = !changed[i] || now.synced > then.synced;
            let whole = match delivery {
                Delivery::Whole => now.taken > then.taken,
                Delivery::Objects(n) => {
                    now.objects >= then.objects + n
                        && now.taken - then.taken >= now.batches - then.batches
                }
            };
            synced && whole
        },
    )
}

/// Whether node `nodes[i]`'s policy table differs between `old` and `new`: then its agent
/// must write. (It may also write when only its anti-spoofing table changes.)
pub fn rulesets_changed(nodes: &[&str], old: &Cluster, new: &Cluster) -> Vec<bool> {
    nodes
        .iter()
        .map(|node| {
            let old = Compiler::new(old.clone(), node);
            let new = Compiler::new(new.clone(), node);
            !ruleset::diff(old.table(), new.table()).is_empty()
        })
        .collect()
}

// ------------------------------------------------------------------------ kernel vs Tracer

/// A lab with `cluster`'s pods on `nodes`, serving `services` besides their containerPorts,
/// for a cluster whose rulesets compile without complaint.
pub fn lab_for(
    labpod: &Path,
    cluster: &Cluster,
    nodes: &[&str],
    services: &[(Protocol, u16)],
) -> Lab {
    assert_enforceable(cluster, nodes, "the lab's cluster");
    let ports: Vec<u16> = services.iter().map(|(_, port)| *port).collect();
    Lab::for_cluster(labpod, cluster, nodes, &ports).expect("lab")
}

/// `cluster` compiles without diagnostics for every one of `nodes`: nothing in it is left
/// unenforced, so the kernel can be held to `Tracer` or to the spec on every cell.
pub fn assert_enforceable(cluster: &Cluster, nodes: &[&str], what: &str) {
    for node in nodes {
        let compiler = Compiler::new(cluster.clone(), node);
        assert!(
            compiler.diagnostics().is_empty(),
            "{what}: {node}: {:?}",
            compiler.diagnostics()
        );
    }
}

/// Probes `services` over IPv4 between every two lab pods that `cluster` holds and asserts
/// that the kernel allows exactly what `Tracer` says of `cluster`; returns the cells and
/// Tracer's verdicts on them.
pub fn check_matrix(
    lab: &Lab,
    agents: &mut [Agent],
    services: &[(Protocol, u16)],
    step: &str,
    cluster: &Cluster,
    since: Instant,
) -> (Vec<Cell>, Vec<bool>) {
    let started = Instant::now();
    let present: Vec<usize> = (0..lab.pods().len())
        .filter(|&i| {
            let (namespace, name) = lab.pods()[i].name.split_once('/').expect("namespace/name");
            cluster.pod(namespace, name).is_some()
        })
        .collect();
    let cells = if present.len() == lab.pods().len() {
        let cells = lab.matrix(services, &[Family::V4]).expect("matrix");
        let pods = present.len();
        assert_eq!(cells.len(), pods * (pods - 1) * services.len());
        cells
    } else {
        lab.matrix_among(&present, services, &[Family::V4])
            .expect("matrix")
    };
    let comparison = compare_with_trace(lab, &cells, cluster).expect("trace the cells");
    let allowed = comparison.traces.iter().filter(|t| t.allowed).count();
    println!(
        "  {step}: {} cells checked among {} pods ({allowed} allowed, {} denied; probes failing by {:?}), {} disagreements; matrix in {:?}, at {:?}",
        cells.len(),
        present.len(),
        cells.len() - allowed,
        comparison.failures,
        comparison.disagreements.len(),
        started.elapsed(),
        since.elapsed()
    );
    assert!(
        comparison.disagreements.is_empty(),
        "{step}: the kernel and Tracer disagree on {} of {} cells:\n{}\n\n{}",
        comparison.disagreements.len(),
        cells.len(),
        comparison.disagreements.join("\n\n"),
        logs(agents)
    );
    let verdicts = comparison.traces.iter().map(|t| t.allowed).collect();
    (cells, verdicts)
}

// ------------------------------------------------------------------------------ health

/// GET `path` from the agent's health endpoint at `addr` inside lab namespace `netns` (a
/// name under `/run/netns`): the whole HTTP/1.1 response, status line first.
pub fn http_get_in(netns: &str, addr: &str, path: &str) -> std::io::Result<String> {
    let netns = PathBuf::from("/run/netns").join(netns);
    crate::netns::inside(&netns, || {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
}

// ------------------------------------------------------------------------------ stand-in

/// The API stand-in on a runtime thread of its own, listening in a lab node's namespace on
/// that node's wire address (so agents on every node reach it), with a kubeconfig for them;
/// and the cluster it holds, as the model.
pub struct StandIn {
    pub server: ApiServer,
    /// The stand-in's runtime, for its async calls (`restart`).
    pub runtime: tokio::runtime::Handle,
    /// Ends the runtime's thread when dropped, after the server.
    _stop: tokio::sync::oneshot::Sender<()>,
    pub cluster: Cluster,
    dir: tempfile::TempDir,
}

impl StandIn {
    /// Starts the stand-in in lab node `node`'s namespace, holding every object of `cluster`.
    pub fn start(lab: &Lab, node: usize, cluster: &Cluster) -> StandIn {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        thread::spawn(move || {
            let _ = runtime.block_on(stopped);
        });
        let netns = PathBuf::from("/run/netns").join(lab.node_netns(node).expect("node"));
        let addr = SocketAddr::new(IpAddr::V4(lab.node_ipv4(node).expect("node")), 0);
        let server = handle
            .block_on(ApiServer::start_in(Settings::default(), Some(&netns), addr))
            .expect("the stand-in starts in the node's namespace");
        let dir = tempfile::tempdir().expect("scratch dir");
        server
            .write_kubeconfig(&dir.path().join("kubeconfig"))
            .expect("kubeconfig");
        let mut stand_in = StandIn {
            server,
            runtime: handle,
            _stop: stop,
            cluster: Cluster::new(),
            dir,
        };
        stand_in.publish(cluster);
        stand_in
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Makes the stand-in hold `next`: the puts and deletes of the objects that differ.
    /// Returns how many writes that took.
    pub fn publish(&mut self, next: &Cluster) -> usize {
        let writes = objects::changes(&self.cluster, next);
        for write in &writes {
            write.to(&self.server);
        }
        self.cluster = next.clone();
        writes.len()
    }

    /// Edits the model and writes what changed; returns how many writes that took.
    pub fn change(&mut self, edit: impl FnOnce(&mut Cluster)) -> usize {
        let mut next = self.cluster.clone();
        edit(&mut next);
        self.publish(&next)
    }

    /// Requests of `verb` served so far, over all resources.
    pub fn requests(&self, verb: Verb) -> usize {
        Resource::ALL
            .into_iter()
            .map(|r| self.server.requests(r, verb))
            .sum()
    }
}
