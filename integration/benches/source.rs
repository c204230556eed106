//! The Kubernetes source on the 150,000-pod synthetic cluster, served by the stand-in API
//! server: time to the first complete state, the heap the source's state takes, and the heap
//! its listing needs at the peak; then a relist after 410 Gone and the cost of applying it.
//!
//! `cargo bench -p integration --bench source` prints two summary lines. The stand-in runs in
//! the same process; its share is measured before the source starts and left out.

#![allow(
    clippy::expect_used,
    reason = "a benchmark whose fixture is wrong should stop loudly"
)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use agent::kube_source::{self, Batch, Kind, Mirror, Source, Update, WatchConfig};
use integration::apiserver::{ApiServer, Settings};
use integration::objects;
use integration::synthetic::{self, LARGE, LOCAL_NODE};
use peak_alloc::PeakAlloc;
use ruleset::Compiler;

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
    let held = HEAP.current_usage() - baseline;
    let objects = mirror.cluster().pods().count();

    // A relist after 410: one pod changes while the watches are cut, the history is gone.
    let mut compiler = Compiler::new(mirror.into_cluster(), LOCAL_NODE);
    server.drop_connections();
    // Pod 0 runs on the local node; as an `api` pod it takes another chain.
    let pod = synthetic::pod(&LARGE, 0, "api");
    server.put(objects::pod(&pod)).expect("a served kind");
    server.compact();
    let before_relist = HEAP.current_usage();
    HEAP.reset_peak_usage();
    let relist_started = Instant::now();
    let mut relisted = BTreeSet::new();
    let mut batch = Batch::new();
    while relisted.len() < Kind::ALL.len() {
        let update = tokio::time::timeout(Duration::from_secs(600), source.recv())
            .await
            .expect("relists complete")
            .expect("watches running");
        if let Update::Listed(listing) = &update {
            relisted.insert(listing.kind());
        }
        batch.push(update, compiler.cluster());
    }
    let listed_in = relist_started.elapsed();
    let applied = Instant::now();
    let delta = batch.apply(&mut compiler);
    let applied_in = applied.elapsed();
    let relist_peak = HEAP.peak_usage() - before_relist;
    drop(source);
    println!(
        "source: {served} objects listed in {:.2} s; state held {:.1} MiB heap \
         (the same cluster built directly: {:.1} MiB); peak during listing {:.1} MiB above the \
         stand-in's; process peak RSS {:.1} MiB; pods {objects}",
        to_ready.as_secs_f64(),
        mib(held),
        mib(direct_heap),
        mib(peak),
        rss_kib("VmHWM:") as f64 / 1024.0,
    );
    println!(
        "relist after 410: listed again in {:.2} s, batch applied in {:.1} ms, delta of {} \
         changes (one local pod relabelled); peak {:.1} MiB above the compiled state",
        listed_in.as_secs_f64(),
        applied_in.as_secs_f64() * 1e3,
        delta.size(),
        mib(relist_peak),
    );
}

fn main() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(measure());
}
