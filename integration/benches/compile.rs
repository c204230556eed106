//! Compile time, memory and incremental update cost on the 150,000-pod synthetic cluster.
//!
//! `cargo bench -p integration --bench compile` prints criterion's figures plus a summary line
//! with peak heap and the median/p99 of 1,000 individually timed pod label changes.

#![allow(
    clippy::expect_used,
    reason = "a benchmark whose fixture is wrong should stop loudly"
)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use integration::synthetic::{self, LARGE, LOCAL_NODE};
use peak_alloc::PeakAlloc;
use ruleset::model::Pod;
use ruleset::Compiler;

#[global_allocator]
static HEAP: PeakAlloc = PeakAlloc;

/// The same pod with its `app` label flipped between two values peer sets select on.
fn relabel(pod: &Pod, flip: bool) -> Pod {
    let mut p = pod.clone();
    let app = if flip { "worker" } else { "frontend" };
    p.labels.insert("app".into(), app.into());
    p
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn timed_changes(compiler: &mut Compiler, pod: &Pod) -> (f64, f64) {
    let mut micros: Vec<f64> = (0..1_000)
        .map(|i| {
            let next = relabel(pod, i % 2 == 0);
            let start = Instant::now();
            let delta = compiler.apply_pod(next);
            let elapsed = start.elapsed().as_secs_f64() * 1e6;
            assert!(!delta.is_empty(), "a relabel must change the ruleset");
            elapsed
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    (percentile(&micros, 0.5), percentile(&micros, 0.99))
}

fn benches(c: &mut Criterion) {
    let start = HEAP.current_usage_as_mb();
    let cluster = synthetic::cluster(&LARGE);
    let cluster_mb = HEAP.current_usage_as_mb() - start;
    let owned = cluster.clone();
    HEAP.reset_peak_usage();
    let before = HEAP.current_usage_as_mb();
    let started = Instant::now();
    let mut compiler = Compiler::new(owned, LOCAL_NODE);
    let first_compile = started.elapsed();
    let table = compiler.table();
    println!(
        "synthetic cluster: {} pods, {} policies; index {cluster_mb:.0} MB heap",
        cluster.pods().count(),
        cluster.policies().count()
    );
    println!(
        "node {LOCAL_NODE}: {} chains, {} rules, {} sets, {} elements; first compile {:.0} ms; \
         heap peak during compile {:.0} MB above the {before:.0} MB before it (process peak {:.0} MB)",
        table.chains.len(),
        table.rule_count(),
        table.sets.len(),
        table.element_count(),
        first_compile.as_secs_f64() * 1e3,
        HEAP.peak_usage_as_mb() - before,
        HEAP.peak_usage_as_mb(),
    );

    // Frontends whose relabel changes the ruleset: a remote one in a cross-namespace peer set,
    // and a local one whose selecting policies change.
    let mut changing = |local: bool| {
        (0..LARGE.pods)
            .map(|i| synthetic::pod(&LARGE, i, synthetic::app_of(i)))
            .filter(|p| {
                (p.node.as_deref() == Some(LOCAL_NODE)) == local && p.labels["app"] == "frontend"
            })
            .find(|p| {
                let changed = !compiler.apply_pod(relabel(p, true)).is_empty();
                compiler.apply_pod(p.clone());
                changed
            })
            .expect("a frontend whose relabel matters")
    };
    let remote = changing(false);
    let local = changing(true);
    for (what, pod) in [("remote", &remote), ("local", &local)] {
        let (p50, p99) = timed_changes(&mut compiler, pod);
        println!("{what} pod label change, 1,000 changes: median {p50:.1} us, p99 {p99:.1} us");
    }

    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("full_150k_pods_node_110_pods", |b| {
        b.iter_batched(
            || cluster.clone(),
            |cluster| Compiler::new(cluster, LOCAL_NODE),
            BatchSize::LargeInput,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("incremental");
    for (what, pod) in [
        ("remote_pod_label_change", &remote),
        ("local_pod_label_change", &local),
    ] {
        let mut flip = false;
        group.bench_function(what, |b| {
            b.iter(|| {
                flip = !flip;
                compiler.apply_pod(relabel(pod, flip))
            })
        });
    }
    group.finish();
}

criterion_group!(compile, benches);
criterion_main!(compile);
