//! The packaged unit under a real systemd: `packaging/systemd/nftpol-agent.service` and its
//! environment file, installed where `packaging/README.md` puts them, run by systemd as PID 1
//! of a PID and mount namespace inside lab node-a's network namespace, with the unit's whole
//! sandbox (capability bounding set, read-only system, system call filter, ...). The agent
//! watches the API stand-in.
//!
//! Checked: systemd holds the unit in `activating` while the API server cannot be reached
//! (READY=1 waits for the first sync) and calls it active once the ruleset is in place; the
//! sandboxed agent enforces the policies (the matrix against `Tracer`, node-b's agent run
//! plainly); a short watchdog never kills it; `systemctl
//! stop` ends it cleanly with the rules left in force; `systemctl start` brings it back.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use integration::agents::{
    agent_binary, check_matrix, http_get_in, lab_for, wait_synced, Agent, StandIn,
};
use integration::lab::{Lab, Protocol};
use integration::netns;
use integration::{read_text, workspace};
use ruleset::Cluster;

const LABPOD: &str = env!("CARGO_BIN_EXE_labpod");
const NODES: [&str; 2] = ["node-a", "node-b"];
const SERVICES: [(Protocol, u16); 3] = [
    (Protocol::Tcp, 8080),
    (Protocol::Tcp, 5432),
    (Protocol::Udp, 53),
];
const UNIT: &str = "nftpol-agent.service";
const SYSTEMD: &str = "/lib/systemd/systemd";
/// The packaged environment file's health address.
const HEALTH: &str = "127.0.0.1:9743";
/// The watchdog the test gives the unit: short, so that a missing ping shows within seconds.
const WATCHDOG: Duration = Duration::from_secs(3);
/// An upper bound for waiting, never a measure of speed: the watches back off for seconds
/// after the API server was unreachable.
const TIMEOUT: Duration = Duration::from_secs(60);

/// What the test adds to the packaged unit, in a drop-in.
const DROP_IN: &str = "\
# Test only. This systemd runs nothing but the agent: no sysinit.target and the rest of a boot.
[Unit]
DefaultDependencies=no
[Service]
WatchdogSec=3s
# No journald here: the agent's log in a file the test shows when it fails.
StandardOutput=append:/run/nftpol-agent.log
StandardError=inherit
";

/// The unit systemd starts as its default: nothing, so the test starts the agent itself.
const IDLE_TARGET: &str = "\
[Unit]
Description=nothing but what the test starts
DefaultDependencies=no
";

/// Runs as the namespace's PID 1-to-be: puts the staged files where the packaging README
/// installs them, on layers that vanish with the mount namespace, and becomes systemd.
const BOOT: &str = r#"set -eu
stage=$1
mount --make-rprivate /
mount -t tmpfs nftpol-test "$stage/layers"
for dir in /etc /usr/local; do
    layer="$stage/layers/$(echo "$dir" | tr / _)"
    mkdir -p "$layer/upper" "$layer/work"
    mount -t overlay overlay -o "lowerdir=$dir,upperdir=$layer/upper,workdir=$layer/work" "$dir"
done
mount -t tmpfs tmpfs /run
mkdir -p /etc/nftpol /etc/systemd/system/nftpol-agent.service.d /usr/local/bin
cp "$stage/nftpol-agent.service" "$stage/nftpol-idle.target" /etc/systemd/system/
cp "$stage/test.conf" /etc/systemd/system/nftpol-agent.service.d/
cp "$stage/nftpol-agent.env" "$stage/kubeconfig" /etc/nftpol/
cp "$stage/agent" /usr/local/bin/agent
exec /lib/systemd/systemd --system --unit=nftpol-idle.target
"#;

/// systemd as PID 1 of its own PID and mount namespaces, in a lab node's network namespace.
/// Dropping it kills that PID 1, and with it everything it runs.
struct Systemd {
    boot: Child,
    /// systemd's PID (in the initial PID namespace); 0 until it is found.
    pid: u32,
    _stage: tempfile::TempDir,
}

impl Systemd {
    /// Stages the packaged unit and environment file (with `node`'s name), the kubeconfig and
    /// the agent, boots systemd and waits until `systemctl` reaches it.
    fn boot(netns: &str, node: &str, kubeconfig: &Path) -> Systemd {
        let stage = tempfile::tempdir().expect("stage");
        let put = |name: &str, text: &str| fs::write(stage.path().join(name), text).unwrap();
        let packaging = workspace().join("packaging/systemd");
        put(UNIT, &read_text(&packaging.join(UNIT)));
        let env = read_text(&packaging.join("nftpol-agent.env"));
        put("nftpol-agent.env", &format!("{env}\nNODE_NAME={node}\n"));
        put("test.conf", DROP_IN);
        put("nftpol-idle.target", IDLE_TARGET);
        fs::copy(kubeconfig, stage.path().join("kubeconfig")).unwrap();
        fs::copy(agent_binary(Path::new(LABPOD)), stage.path().join("agent")).unwrap();
        fs::create_dir(stage.path().join("layers")).unwrap();

        let boot = Command::new("ip")
            .args(["netns", "exec", netns])
            .args([
                "unshare",
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--mount-proc",
            ])
            .args(["sh", "-c", BOOT, "boot"])
            .arg(stage.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ip netns exec unshare systemd");
        let mut systemd = Systemd {
            boot,
            pid: 0,
            _stage: stage,
        };
        // `ip netns exec` execs unshare, whose one child becomes systemd.
        let children = format!("/proc/{0}/task/{0}/children", systemd.boot.id());
        let started = Instant::now();
        while systemd.pid == 0 {
            let pid = fs::read_to_string(&children)
                .ok()
                .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()));
            let comm = pid.and_then(|p: u32| fs::read_to_string(format!("/proc/{p}/comm")).ok());
            match (pid, comm.as_deref().map(str::trim)) {
                (Some(pid), Some("systemd")) => systemd.pid = pid,
                _ => {
                    assert!(started.elapsed() < TIMEOUT, "systemd did not start");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
        while !systemd
            .systemctl(&["show", "--property=Version"])
            .status
            .success()
        {
            assert!(systemd.boot.try_wait().unwrap().is_none(), "systemd exited");
            assert!(
                started.elapsed() < TIMEOUT,
                "systemctl cannot reach systemd"
            );
            thread::sleep(Duration::from_millis(100));
        }
        systemd
    }

    fn systemctl(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "--mount", "--pid", "--"])
            .args(["timeout", "90", "systemctl", "--no-pager"])
            .args(args)
            .output()
            .expect("nsenter systemctl")
    }

    /// Runs `systemctl args`, which must succeed.
    fn must(&self, args: &[&str]) {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {args:?}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.describe()
        );
    }

    /// A property of the agent's unit.
    fn show(&self, property: &str) -> String {
        let out = self.systemctl(&["show", "--value", &format!("--property={property}"), UNIT]);
        assert!(out.status.success(), "systemctl show {property}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The unit's state, restarts and the agent's log, for a failure message.
    fn describe(&self) -> String {
        let status = self.systemctl(&["status", UNIT]);
        let log = fs::read_to_string(format!("/proc/{}/root/run/nftpol-agent.log", self.pid))
            .unwrap_or_else(|e| format!("(no log: {e})"));
        format!(
            "{}\n--- agent log\n{log}",
            String::from_utf8_lossy(&status.stdout)
        )
    }

    /// Waits until the unit's ActiveState is `state`.
    fn wait_state(&self, state: &str) -> Duration {
        let started = Instant::now();
        while self.show("ActiveState") != state {
            assert!(
                started.elapsed() < TIMEOUT,
                "{UNIT} not {state} after {TIMEOUT:?}\n{}",
                self.describe()
            );
            thread::sleep(Duration::from_millis(50));
        }
        started.elapsed()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // The kernel kills every process of a PID namespace when its PID 1 dies.
        if self.pid == 0 {
            let _ = self.boot.kill();
        } else {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
        }
        let _ = self.boot.wait();
    }
}

/// Both of the agent's tables in `netns`, without counters; `None` when it has none.
fn ruleset(netns: &str) -> Option<String> {
    let mut text = String::new();
    for table in [["inet", "nftpol"], ["bridge", "nftpol"]] {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "nft",
                "--stateless",
                "list",
                "table",
            ])
            .args(table)
            .output()
            .expect("nft");
        if !out.status.success() {
            return None;
        }
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    Some(text)
}

/// The HTTP status of GET `path` on the packaged health address in `netns`.
fn health(netns: &str, path: &str) -> u16 {
    let response = http_get_in(netns, HEALTH, path).expect("health endpoint");
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"))
}

#[test]
fn the_packaged_unit_runs_under_systemd() {
    let test = "the_packaged_unit_runs_under_systemd";
    if netns::skip_unless_root(test) {
        return;
    }
    assert!(
        Path::new(SYSTEMD).is_file(),
        "{SYSTEMD} is missing: scripts/setup.sh installs the systemd package"
    );
    let t0 = Instant::now();
    let cluster: Cluster =
        agent::manifests::load(&workspace().join("integration/examples/three-tier.yaml"))
            .expect("three-tier example");
    let lab: Lab = lab_for(Path::new(LABPOD), &cluster, &NODES, &SERVICES);
    let mut api = StandIn::start(&lab, 0, &cluster);
    let netns = lab.node_netns(0).unwrap().to_string();

    // The API server unreachable: the agent runs, systemd waits for its READY=1.
    api.server.stop();
    let systemd = Systemd::boot(&netns, NODES[0], &api.kubeconfig());
    systemd.must(&["start", "--no-block", UNIT]);
    let waiting = Instant::now();
    while waiting.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            (
                systemd.show("ActiveState").as_str(),
                systemd.show("SubState").as_str()
            ),
            ("activating", "start"),
            "{}",
            systemd.describe()
        );
        thread::sleep(Duration::from_millis(200));
    }
    let main_pid = systemd.show("MainPID");
    assert_ne!(
        main_pid,
        "0",
        "the agent is running\n{}",
        systemd.describe()
    );
    assert_eq!(systemd.show("NRestarts"), "0", "{}", systemd.describe());
    assert_eq!(
        ruleset(&netns),
        None,
        "nothing is programmed before the lists"
    );
    assert_eq!(health(&netns, "/readyz"), 503);

    // The API server back: the first sync, then systemd calls the unit active.
    api.runtime
        .block_on(api.server.restart())
        .expect("the stand-in restarts");
    let took = systemd.wait_state("active");
    let active_at = Instant::now();
    println!("{test}: active {took:?} after the stand-in came back");
    assert_eq!(systemd.show("MainPID"), main_pid, "the same process");
    assert!(
        ruleset(&netns).is_some(),
        "active with its ruleset in place"
    );
    assert_eq!(health(&netns, "/readyz"), 200);

    // The sandboxed agent enforces: node-b's agent runs plainly beside it.
    let mut others = vec![Agent::start_api(
        Path::new(LABPOD),
        &lab,
        1,
        NODES[1],
        &api.kubeconfig(),
        &[],
    )];
    wait_synced(&mut others, TIMEOUT);
    let (cells, _) = check_matrix(&lab, &mut others, &SERVICES, "under systemd", &cluster, t0);
    println!("{test}: {} cells as Tracer says", cells.len());

    // With a 3 s watchdog, the same process still runs after more than twice that: systemd
    // kills a unit whose pings stop.
    if let Some(rest) = (2 * WATCHDOG).checked_sub(active_at.elapsed()) {
        thread::sleep(rest + Duration::from_millis(500));
    }
    assert_eq!(
        systemd.show("ActiveState"),
        "active",
        "{}",
        systemd.describe()
    );
    assert_eq!(systemd.show("MainPID"), main_pid, "{}", systemd.describe());
    assert_eq!(systemd.show("NRestarts"), "0", "{}", systemd.describe());

    // systemctl stop: SIGTERM, a clean exit, the rules stay in force.
    let before = ruleset(&netns).unwrap();
    systemd.must(&["stop", UNIT]);
    assert_eq!(systemd.show("ActiveState"), "inactive");
    assert_eq!(systemd.show("Result"), "success", "{}", systemd.describe());
    assert_eq!(
        systemd.show("ExecMainStatus"),
        "0",
        "{}",
        systemd.describe()
    );
    assert_eq!(
        ruleset(&netns).as_deref(),
        Some(before.as_str()),
        "the rules stay after a stop"
    );

    // systemctl start returns once the agent is ready: it takes over its own tables.
    systemd.must(&["start", UNIT]);
    assert_eq!(systemd.show("ActiveState"), "active");
    assert_ne!(systemd.show("MainPID"), main_pid, "a new process");
    assert_eq!(health(&netns, "/readyz"), 200);
    assert_eq!(ruleset(&netns).as_deref(), Some(before.as_str()));
}
