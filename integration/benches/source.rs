//! The Kubernetes source on the 150,000-pod synthetic cluster, served by the stand-in API
//! server: time to the first complete state, the heap the source's state takes, and the heap
//! its listing needs at the peak.
//!
//! `cargo bench -p integration --bench source` prints one summary line. The stand-in runs in
//! the same process; its share is measured before the source starts and left out.

#![allow(
    clippy::expect_used,
    reason = "a benchmark whose fixture is wrong should stop loudly"
)]

use std::time::{Duration, Instant};

use agent::kube_source::{self, Mirror, Source, WatchConfig};
use integration::apiserver::{ApiServer, Settings};
use integration::objects;
use integration::synthetic::{self, LARGE};
use peak_alloc::PeakAlloc;
use ruleset::Cluster;

#[global_allocator]
static HEAP: PeakAlloc = PeakAlloc;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

async fn measure() {
    let server = ApiServer::start(Settings::default())
        .await
        .expect("stand-in starts");
    let (served, direct_heap) = {
        let before = HEAP.current_usage();
        let cluster = synthetic::cluster(&LARGE);
        let direct = HEAP.current_usage() - before;
        let mut served = 0;
        for object in objects::all(&cluster) {
            server.put(object).expect("a served kind");
            served += 1;
        }
        (served, direct)
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).expect("kubeconfig written");

    let baseline = HEAP.current_usage();
    HEAP.reset_peak_usage();
    let started = Instant::now();
    let client = kube_source::client(Some(&path))
        .await
        .expect("client for the stand-in");
    let mut source = Source::with_config(client, WatchConfig::default());
    let mut mirror = Mirror::new();
    while !mirror.ready() {
        let update = tokio::time::timeout(Duration::from_secs(600), source.recv())
            .await
            .expect("lists complete")
            .expect("watches running");
        mirror.apply(update);
    }
    let to_ready = started.elapsed();
    let peak = HEAP.peak_usage() - baseline;
    drop(source);
    let cluster: Cluster = mirror.into_cluster();
    let held = HEAP.current_usage() - baseline;
    println!(
        "source: {served} objects listed in {:.2} s; state held {:.1} MiB heap \
         (the same cluster built directly: {:.1} MiB); peak during listing {:.1} MiB above the \
         stand-in's; process peak RSS {:.1} MiB; pods {}",
        to_ready.as_secs_f64(),
        mib(held),
        mib(direct_heap),
        mib(peak),
        rss_kib("VmHWM:") as f64 / 1024.0,
        cluster.pods().count(),
    );
}

fn main() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(measure());
}
