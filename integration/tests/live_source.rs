//! `agent dump-ruleset` and `agent trace` without `--manifests`: they list the cluster from the
//! Kubernetes API (here the stand-in of `integration::apiserver`) and answer exactly as they do
//! for the same objects in a snapshot file. No root needed.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::path::Path;
use std::process::Command;

use integration::apiserver::{ApiServer, Settings};
use integration::objects;

const AGENT: &str = env!("CARGO_BIN_EXE_labpod");

/// The `agent` binary beside `labpod`, built if needed.
fn agent() -> std::path::PathBuf {
    integration::agents::agent_binary(Path::new(AGENT))
}

fn run(args: &[&str]) -> (String, String) {
    let out = Command::new(agent())
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("agent runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "agent {args:?}: {}",
        text(&out.stderr)
    );
    (text(&out.stdout), text(&out.stderr))
}

#[test]
fn dump_and_trace_read_the_api_as_they_read_a_snapshot() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-tier.yaml");
    let example = example.to_str().unwrap();
    let cluster = agent::manifests::load(Path::new(example)).expect("example loads");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    // The stand-in runs on a thread of its own until `stop` is dropped.
    let (ready, started) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let path = kubeconfig.clone();
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let server = ApiServer::start(Settings::default())
                .await
                .expect("stand-in starts");
            for object in objects::all(&cluster) {
                server.put(object).expect("a kind the stand-in serves");
            }
            server.write_kubeconfig(&path).unwrap();
            ready.send(()).unwrap();
            let _ = stopped.await;
        });
    });
    started.recv().expect("the stand-in is up");
    let kubeconfig = kubeconfig.to_str().unwrap();

    for node in ["node-a", "node-b"] {
        let (from_file, _) = run(&["dump-ruleset", "--manifests", example, "--node", node]);
        let (from_api, log) = run(&["dump-ruleset", "--kubeconfig", kubeconfig, "--node", node]);
        assert!(from_file.contains("table inet nftpol"), "{from_file}");
        assert_eq!(
            from_api, from_file,
            "{node}: the API gives the snapshot's ruleset\n{log}"
        );
    }
    let trace = [
        "trace",
        "--from",
        "shop/backend-1",
        "--to",
        "shop/database-0",
        "--port",
        "5432",
    ];
    let (from_file, _) = run(&[&trace[..], &["--manifests", example]].concat());
    let (from_api, _) = run(&[&trace[..], &["--kubeconfig", kubeconfig]].concat());
    assert!(from_file.starts_with("ALLOWED"), "{from_file}");
    assert_eq!(from_api, from_file);
    drop(stop);
    server.join().unwrap();
}
