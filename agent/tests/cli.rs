//! The `agent` binary as an operator runs it: exit codes, first lines, messages.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../integration/examples")
        .join(name)
}

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("NODE_NAME")
        .output()
        .expect("run agent")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_and_help_with_examples() {
    let out = agent(&["--version"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("agent "));
    for sub in ["run", "dump-ruleset", "trace"] {
        let out = agent(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help");
        let help = text(&out.stdout);
        assert!(
            help.contains("Example"),
            "{sub} --help shows no example:\n{help}"
        );
        assert!(help.contains(&format!("agent {sub} --manifests")), "{help}");
    }
}

#[test]
fn dump_ruleset_prints_the_table() {
    let path = example("three-tier.yaml");
    let out = agent(&[
        "dump-ruleset",
        "--manifests",
        path.to_str().unwrap(),
        "--node",
        "node-a",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("table inet nftpol {"), "{stdout}");
    assert!(
        stdout.contains("comment \"shop/"),
        "rules name their policy"
    );
}

#[test]
fn trace_first_line_is_the_verdict() {
    let path = example("three-tier.yaml");
    let path = path.to_str().unwrap();
    for (from, to, port, verdict) in [
        (
            "ingress-nginx/ingress-nginx-controller",
            "shop/frontend-2",
            "8080",
            "ALLOWED",
        ),
        ("shop/frontend-1", "shop/database-0", "5432", "DENIED"),
        ("shop/backend-2", "shop/database-0", "5432", "ALLOWED"),
    ] {
        let out = agent(&[
            "trace",
            "--manifests",
            path,
            "--from",
            from,
            "--to",
            to,
            "--port",
            port,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert_eq!(
            stdout.lines().next(),
            Some(verdict),
            "{from} -> {to}:{port}\n{stdout}"
        );
        assert!(
            stdout.contains("egress  of") && stdout.contains("ingress of"),
            "{stdout}"
        );
    }
}

#[test]
fn trace_rejects_unknown_pods_and_bad_endpoints() {
    let path = example("three-tier.yaml");
    let path = path.to_str().unwrap();
    let out = agent(&[
        "trace",
        "--manifests",
        path,
        "--from",
        "shop/nope",
        "--to",
        "shop/database-0",
        "--port",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("shop/nope"),
        "{}",
        text(&out.stderr)
    );
    let out = agent(&[
        "trace",
        "--manifests",
        path,
        "--from",
        "nonsense",
        "--to",
        "shop/database-0",
        "--port",
        "1",
    ]);
    assert!(!out.status.success());
}

#[test]
fn malformed_yaml_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: [x\n",
    )
    .unwrap();
    let out = agent(&[
        "dump-ruleset",
        "--manifests",
        file.to_str().unwrap(),
        "--node",
        "n",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("broken.yaml:"), "{stderr}");
    assert!(stderr.contains("malformed YAML"), "{stderr}");
    assert!(out.stdout.is_empty(), "no ruleset from a broken snapshot");
}

#[test]
fn unenforceable_policy_warns_with_field_and_stays_closed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.yaml");
    std::fs::write(
        &file,
        r#"
apiVersion: v1
kind: Pod
metadata: {namespace: edge, name: api}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {namespace: edge, name: client}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.1.6}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: edge, name: api-https}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.1.0.0/16]}}]
"#,
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = agent(&["dump-ruleset", "--manifests", path, "--node", "n1"]);
    assert!(out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("networkpolicy edge/api-https: spec.ingress[0].from[0].ipBlock.except[0]"),
        "{stderr}"
    );
    let out = agent(&[
        "trace",
        "--manifests",
        path,
        "--from",
        "edge/client",
        "--to",
        "edge/api",
        "--port",
        "443",
    ]);
    assert_eq!(text(&out.stdout).lines().next(), Some("DENIED"));
}

#[test]
fn run_refuses_to_start_without_cap_net_admin() {
    if common::skip_unless_root("run_refuses_to_start_without_cap_net_admin") {
        return;
    }
    let path = example("three-tier.yaml");
    let out = Command::new("setpriv")
        .args(["--bounding-set=-net_admin", "--inh-caps=-net_admin"])
        .arg(env!("CARGO_BIN_EXE_agent"))
        .args([
            "run",
            "--manifests",
            path.to_str().unwrap(),
            "--node",
            "node-a",
        ])
        .output()
        .expect("run setpriv");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("missing CAP_NET_ADMIN"), "{stderr}");
}

/// Runs `script` with `bash` in a new network namespace, with `$AGENT`, `$NFTPOL_STATE_DIR`
/// (`dir`), `$LOG` (the agent's log, in `dir`) and `env` set; fails unless it succeeds and
/// prints `done`. Its stdout and the agent's log.
fn run_script(script: &str, dir: &Path, env: &[(&str, &std::ffi::OsStr)]) -> (String, String) {
    let log = dir.join("agent.log");
    let out = Command::new("unshare")
        .args(["--net", "bash", "-c", script])
        .env("AGENT", env!("CARGO_BIN_EXE_agent"))
        .env("NFTPOL_STATE_DIR", dir)
        .env("LOG", &log)
        .envs(env.iter().copied())
        .output()
        .expect("run unshare");
    let stdout = text(&out.stdout);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "done"),
        "{stdout}\n{}\n{log}",
        text(&out.stderr)
    );
    (stdout, log)
}

/// Polls `cond` (a shell test) every 100 ms for up to 10 s.
const WAIT_FOR: &str = "wait_for() { i=0; until eval \"$1\"; do i=$((i+1)); [ $i -ge 100 ] && return 1; sleep 0.1; done; }";

#[test]
fn run_installs_restores_after_tampering_and_leaves_rules_on_sigterm() {
    if common::skip_unless_root("run_installs_restores_after_tampering_and_leaves_rules_on_sigterm")
    {
        return;
    }
    let path = example("three-tier.yaml");
    let script = format!(
        r#"{WAIT_FOR}
        "$AGENT" run --manifests "{manifests}" --node node-a 2>"$LOG" &
        pid=$!
        trap 'kill -KILL $pid 2>/dev/null' EXIT
        wait_for 'nft list table inet nftpol >/dev/null 2>&1' || {{ echo never-installed; exit 1; }}
        # Settled: a flush during the transactions that follow the first one is restored too,
        # but logged as a read-back that another transaction overlapped.
        wait_for 'grep -q "fast path on" "$LOG"' || {{ echo fast-path-never-on; exit 1; }}
        nft flush ruleset
        nft list tables | grep -q nftpol && {{ echo flush-failed; exit 1; }}
        wait_for 'nft list table inet nftpol >/dev/null 2>&1' || {{ echo never-restored; exit 1; }}
        nft list table bridge nftpol >/dev/null || {{ echo no-guard-table; exit 1; }}
        nft add table inet other
        sleep 1.5
        nft add element inet nftpol self4 '{{ 10.9.9.9 . 10.9.9.9 }}'
        wait_for '! nft list set inet nftpol self4 | grep -q 10.9.9.9' || {{ echo never-repaired; exit 1; }}
        nft list table inet other >/dev/null || {{ echo other-table-touched; exit 1; }}
        kill -TERM $pid
        wait $pid; echo "exit=$?"
        nft list table inet nftpol | grep -c 'comment "shop/'
        echo done"#,
        manifests = path.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let (stdout, log) = run_script(&script, dir.path(), &[]);
    assert!(stdout.contains("exit=0"), "{stdout}\n{log}");
    let rules: usize = stdout
        .lines()
        .rev()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert!(rules > 0, "the rules stay after SIGTERM:\n{stdout}");
    assert!(log.contains("removed behind the agent's back"), "{log}");
    assert!(
        log.contains("table inet nftpol was changed behind the agent's back"),
        "{log}"
    );
    // Install, restore after the flush, repair after the element; another table's change
    // caused nothing.
    assert_eq!(log.matches("synced").count(), 3, "{log}");
}

/// Other tables' transactions (kube-proxy's, every second or so) are vouched for by nf_tables'
/// notifications, without reading the agent's tables back, even as they come between the
/// agent's own; a transaction that touches ours still gets them read back and repaired, even
/// when it changes another table as well.
#[test]
fn run_tells_other_tables_transactions_from_tampering_by_notifications() {
    if common::skip_unless_root(
        "run_tells_other_tables_transactions_from_tampering_by_notifications",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = example("three-tier.yaml");
    let snapshot = dir.path().join("snapshot.yaml");
    std::fs::copy(&base, &snapshot).unwrap();
    // Another writer commits every 20 ms or so while the snapshot flips node-a's ruleset ten
    // times (a delta each).
    let script = format!(
        r#"{WAIT_FOR}
        ip link set lo up
        metrics() {{ exec 3<>/dev/tcp/127.0.0.1/9743 || return 1; printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3; cat <&3; exec 3<&-; }}
        "$AGENT" run --manifests "$SNAPSHOT" --node node-a --poll-ms 20 2>"$LOG" &
        pid=$!
        trap 'kill -KILL $pid $other 2>/dev/null' EXIT
        wait_for 'grep -q "fast path on" "$LOG"' || {{ echo fast-path-never-on; exit 1; }}
        nft add table inet other
        (i=0; while [ $i -lt 150 ]; do nft add chain inet other c$i; i=$((i+1)); sleep 0.01; done) &
        other=$!
        for i in 1 2 3 4 5 6 7 8 9 10; do
            if [ $((i % 2)) = 1 ]; then cat "$BASE" - >"$SNAPSHOT.new" <<<"$ANOTHER"; else cp "$BASE" "$SNAPSHOT.new"; fi
            mv "$SNAPSHOT.new" "$SNAPSHOT"
            sleep 0.15
        done
        wait $other
        sleep 1.5
        echo "== others"; metrics
        nft -f - <<'EOT'
add chain inet other last
add element inet nftpol self4 {{ 10.9.9.9 . 10.9.9.9 }}
EOT
        wait_for '! nft list set inet nftpol self4 | grep -q 10.9.9.9' || {{ echo never-repaired; exit 1; }}
        nft list chain inet other last >/dev/null || {{ echo other-table-touched; exit 1; }}
        echo "== tampered"; metrics
        echo done"#
    );
    let (stdout, log) = run_script(
        &script,
        dir.path(),
        &[
            ("SNAPSHOT", snapshot.as_os_str()),
            ("BASE", base.as_os_str()),
            ("ANOTHER", ANOTHER_BACKEND.as_ref()),
        ],
    );
    let checks = |part: &str, by: &str| -> u64 {
        let line = format!("nftpol_table_checks_total{{by=\"{by}\"}} ");
        part.lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line:?} in\n{part}"))
    };
    let (others, tampered) = stdout
        .split_once("== tampered")
        .unwrap_or_else(|| panic!("{stdout}"));
    // 151 transactions over 1.5 s and more, between ten of the agent's: every look at its
    // tables answered by notifications, none written whole after the first.
    assert!(checks(others, "notifications") >= 1, "{others}\n{log}");
    assert_eq!(checks(others, "read_back"), 0, "{others}\n{log}");
    let (before, _) = log
        .split_once("table inet nftpol was changed behind the agent's back")
        .unwrap_or_else(|| panic!("no warning about the change\n{log}"));
    let synced = |kind: &str| {
        before
            .lines()
            .filter(|l| l.contains("synced") && l.contains(kind))
            .count()
    };
    assert_eq!(synced("kind=Full"), 1, "{log}");
    assert!(synced("kind=Delta") >= 5, "{log}");
    assert!(checks(tampered, "read_back") >= 1, "{tampered}\n{log}");
}

/// A pod that node-a's frontend may send to: a change to node-a's ruleset.
const ANOTHER_BACKEND: &str = "---
apiVersion: v1
kind: Pod
metadata:
  namespace: shop
  name: backend-3
  labels:
    app: backend
spec:
  nodeName: node-b
  containers:
    - name: backend
      image: backend
status:
  phase: Running
  podIP: 10.244.2.31
";

#[test]
fn run_repairs_a_tampered_table_when_a_change_comes_before_its_check() {
    if common::skip_unless_root("run_repairs_a_tampered_table_when_a_change_comes_before_its_check")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snapshot.yaml");
    std::fs::copy(example("three-tier.yaml"), &snapshot).unwrap();
    // frontend-1's egress dispatch goes, so it would send anywhere; the snapshot changes at
    // once, and the agent (polling it every 20 ms) writes a delta well before its
    // once-a-second look at its tables.
    let script = format!(
        r#"{WAIT_FOR}
        "$AGENT" run --manifests "$SNAPSHOT" --node node-a --poll-ms 20 2>"$LOG" &
        pid=$!
        trap 'kill -KILL $pid 2>/dev/null' EXIT
        egress() {{ nft list map inet nftpol egress4 2>/dev/null | grep -q 10.244.1.20; }}
        wait_for egress || {{ echo never-installed; exit 1; }}
        # After the fast path is on, the agent writes nothing by itself.
        wait_for 'grep -q "fast path on" "$LOG"' || {{ echo fast-path-never-on; exit 1; }}
        nft delete element inet nftpol egress4 '{{ 10.244.1.20 }}'
        cp "$SNAPSHOT" "$SNAPSHOT.new"
        printf '%s' "$ANOTHER" >>"$SNAPSHOT.new"
        mv "$SNAPSHOT.new" "$SNAPSHOT"
        wait_for 'nft list ruleset | grep -q 10.244.2.31' || {{ echo change-never-applied; exit 1; }}
        wait_for egress || {{ echo never-repaired; exit 1; }}
        echo done"#
    );
    let (_, log) = run_script(
        &script,
        dir.path(),
        &[
            ("SNAPSHOT", snapshot.as_os_str()),
            ("ANOTHER", ANOTHER_BACKEND.as_ref()),
        ],
    );
    // No delta went over the changed table: the first sync after the warning is a whole one,
    // and none before it (the start-up sync aside) is a delta.
    let (before, after) = log
        .split_once("table inet nftpol was changed behind the agent's back")
        .unwrap_or_else(|| panic!("no warning about the change\n{log}"));
    let syncs = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("synced"))
            .map(str::to_string)
            .collect()
    };
    assert!(
        syncs(after).first().is_some_and(|l| l.contains("Full")),
        "the sync after the warning is not a whole one\n{log}"
    );
    assert!(
        !syncs(before).iter().any(|l| l.contains("Delta")),
        "a delta was written over the changed table before the repair\n{log}"
    );
}

#[test]
fn run_says_so_when_the_snapshot_is_missing() {
    if common::skip_unless_root("run_says_so_when_the_snapshot_is_missing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("unshare")
        .args([
            "--net",
            "timeout",
            "--signal=TERM",
            "1",
            env!("CARGO_BIN_EXE_agent"),
        ])
        .env("NFTPOL_STATE_DIR", dir.path())
        .args([
            "run",
            "--manifests",
            "/nonexistent/snap.yaml",
            "--node",
            "n1",
        ])
        .output()
        .expect("run unshare");
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("snapshot unreadable").count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/snap.yaml"), "{stderr}");
}
