//! `agent run` processes in lab nodes, for tests and benchmarks: start one per node, read
//! its log, wait for it to sync, signal it. Failures panic: this is test support.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test support: a failure fails the test by panicking"
)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::lab::Lab;

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
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("integration/ is in the workspace");
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
        Agent::spawn(labpod, lab, index, node, &source, extra)
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
        Agent::spawn(labpod, lab, index, node, &source, extra)
    }

    fn spawn(
        labpod: &Path,
        lab: &Lab,
        index: usize,
        node: &str,
        source: &[&OsStr],
        extra: &[&str],
    ) -> Agent {
        let netns = lab.node_netns(index).expect("node").to_string();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns])
            .arg(agent_binary(labpod))
            .args(["--log-level", "info", "run"])
            .args(source)
            .args(["--node", node])
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

    /// Lines that say the agent synced (an error line naming the word does not count).
    pub fn synced(&self) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.contains("synced") && !l.contains("ERROR"))
            .count()
    }

    /// Lines that say the agent read a changed snapshot: `synced`, or, when the node's ruleset
    /// came out the same, the agent's `the cluster changed; this node's ruleset did not`.
    pub fn seen(&self) -> usize {
        self.lines()
            .iter()
            .filter(|l| {
                (l.contains("synced") || l.contains("ruleset did not")) && !l.contains("ERROR")
            })
            .count()
    }

    pub fn errors(&self) -> usize {
        self.lines().iter().filter(|l| l.contains("ERROR")).count()
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
