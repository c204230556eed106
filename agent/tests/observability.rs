//! What the agent tells people: JSON logs, and the health endpoint as a probe or Prometheus
//! sees it.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent::health::{self, Checked, Health, KernelCounts, SyncKind};

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/examples/three-tier.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["--log-format", "json", "dump-ruleset", "--manifests"])
        .arg(&example)
        .args(["--node", "node-a"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let compiled = lines
        .iter()
        .find(|l| l["fields"]["message"] == "compiled")
        .unwrap_or_else(|| panic!("no \"compiled\" line in\n{stderr}"));
    assert_eq!(compiled["level"], "INFO");
    assert_eq!(compiled["fields"]["node"], "node-a");
    assert!(compiled["fields"]["rules"].as_u64().unwrap() > 0);
    // The ruleset itself still goes to stdout as nft text.
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .starts_with("table inet nftpol"));
}

#[test]
fn bind_error_names_the_address() {
    let rt = runtime();
    let taken = rt
        .block_on(health::bind("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let addr = taken.local_addr();
    let err = rt.block_on(health::bind(addr)).err().unwrap();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Serves `health` on a free loopback port from a thread of its own, like the agent's runtime.
fn start(health: &Health) -> SocketAddr {
    let health = health.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = runtime();
        rt.block_on(async move {
            let endpoint = health::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            tx.send(endpoint.local_addr()).unwrap();
            endpoint.serve(health).await;
        });
    });
    rx.recv().unwrap()
}

/// The status code and body of GET `path`.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

#[test]
fn probes_and_metrics_over_http() {
    let health = Health::new(Duration::from_secs(60));
    let addr = start(&health);
    health.beat();

    assert_eq!(get(addr, "/healthz").0, 200);
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("first sync"), "{body}");
    assert_eq!(get(addr, "/nope").0, 404);

    let (_, before) = get(addr, "/metrics");
    assert!(
        !before.contains("\nnftpol_seconds_since_last_sync "),
        "no age before the first sync:\n{before}"
    );

    health.record_sync(SyncKind::Full, Duration::from_millis(20), true);
    health.record_sync(SyncKind::Delta, Duration::from_micros(300), true);
    health.record_sync(SyncKind::Delta, Duration::from_micros(400), false);
    health.record_sync(SyncKind::Delta, Duration::from_micros(500), true);
    health.set_objects("pods", 12);
    health.set_objects("namespaces", 3);
    health.set_objects("networkpolicies", 5);
    health.set_local_pods(4);
    health.set_kernel(KernelCounts {
        rules: 40,
        sets: 7,
        elements: 25,
        chains: 9,
    });
    health.record_check(Checked::Notifications);
    health.record_check(Checked::Notifications);
    health.record_check(Checked::ReadBack);
    health.mark_ready();
    assert_eq!(get(addr, "/readyz").0, 200);

    let (status, metrics) = get(addr, "/metrics");
    assert_eq!(status, 200);
    for line in [
        "nftpol_syncs_total{kind=\"full\",result=\"ok\"} 1",
        "nftpol_syncs_total{kind=\"delta\",result=\"ok\"} 2",
        "nftpol_syncs_total{kind=\"delta\",result=\"error\"} 1",
        "nftpol_syncs_total{kind=\"veths\",result=\"ok\"} 0",
        "nftpol_sync_failures_total 1",
        "nftpol_sync_duration_seconds_bucket{kind=\"delta\",le=\"0.0001\"} 0",
        "nftpol_sync_duration_seconds_bucket{kind=\"delta\",le=\"0.0005\"} 3",
        "nftpol_sync_duration_seconds_bucket{kind=\"full\",le=\"0.01\"} 0",
        "nftpol_sync_duration_seconds_bucket{kind=\"full\",le=\"0.025\"} 1",
        "nftpol_sync_duration_seconds_bucket{kind=\"full\",le=\"+Inf\"} 1",
        "nftpol_sync_duration_seconds_count{kind=\"delta\"} 3",
        "nftpol_watched_objects{kind=\"pods\"} 12",
        "nftpol_watched_objects{kind=\"namespaces\"} 3",
        "nftpol_watched_objects{kind=\"networkpolicies\"} 5",
        "nftpol_local_pods 4",
        "nftpol_kernel_rules 40",
        "nftpol_kernel_sets 7",
        "nftpol_kernel_elements 25",
        "nftpol_kernel_chains 9",
        "nftpol_ready 1",
        "nftpol_table_checks_total{by=\"notifications\"} 2",
        "nftpol_table_checks_total{by=\"read_back\"} 1",
        &format!(
            "nftpol_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    let since = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nftpol_seconds_since_last_sync "))
        .unwrap_or_else(|| panic!("no age of the last sync in\n{metrics}"));
    assert!(since.parse::<f64>().unwrap() < 60.0, "{since}");

    // Every sample belongs to a declared family, and every label is one the code names.
    let mut families = Vec::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.push(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| families.iter().any(|d| d == f))
            .unwrap_or(name);
        assert!(families.iter().any(|f| f == family), "undeclared {line:?}");
        if let Some((_, labels)) = line.split_once('{') {
            let labels = labels.split_once('}').unwrap().0;
            for pair in labels.split(',') {
                let (key, value) = pair.split_once('=').unwrap();
                let value = value.trim_matches('"');
                let allowed: &[&str] = match key {
                    "kind" => &[
                        "full",
                        "delta",
                        "veths",
                        "restore",
                        "pods",
                        "namespaces",
                        "networkpolicies",
                    ],
                    "result" => &["ok", "error", "created", "aggregated", "failed", "dropped"],
                    "by" => &["notifications", "read_back"],
                    "le" => &[],
                    "version" => &[env!("CARGO_PKG_VERSION")],
                    other => panic!("unexpected label {other} in {line:?}"),
                };
                assert!(
                    key == "le" || allowed.contains(&value),
                    "unbounded label value in {line:?}"
                );
            }
        }
    }

    // A failed sync after readiness makes /readyz fail until a sync succeeds again.
    health.record_sync(SyncKind::Restore, Duration::from_millis(1), false);
    assert_eq!(get(addr, "/readyz").0, 503);
    health.record_sync(SyncKind::Restore, Duration::from_millis(1), true);
    assert_eq!(get(addr, "/readyz").0, 200);
}

#[test]
fn healthz_fails_when_the_loop_stops_beating() {
    let health = Health::new(Duration::from_millis(200));
    let addr = start(&health);
    health.beat();
    assert_eq!(get(addr, "/healthz").0, 200);
    std::thread::sleep(Duration::from_millis(400));
    let (status, body) = get(addr, "/healthz");
    assert_eq!(status, 503);
    assert!(body.contains("has not run"), "{body}");
}
