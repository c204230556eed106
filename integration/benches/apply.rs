//! Writing the 150,000-pod synthetic cluster's node ruleset into the kernel, and single-pod
//! deltas after it, in a network namespace of the benchmark's own (needs root).
//!
//! `cargo bench -p integration --bench apply` prints the initial transaction's time and size,
//! then the median and p99 of 1,000 individually timed pod-change transactions (remote relabel,
//! each with its compile), the median and p99 of what `agent run` adds around each such
//! transaction (copying, comparing and diffing the whole table), and criterion's statistics.

#![allow(
    clippy::expect_used,
    reason = "a benchmark whose fixture is wrong should stop loudly"
)]

use std::time::Instant;

use agent::netlink::{Named, Writer};
use criterion::{criterion_group, criterion_main, Criterion};
use integration::netns;
use integration::synthetic::{self, LARGE, LOCAL_NODE};
use ruleset::diff::diff;
use ruleset::epoch::{self, CtMarkBits, Epoch};
use ruleset::ir::{TableFamily, TABLE_NAME};
use ruleset::model::Pod;
use ruleset::Compiler;

fn relabel(pod: &Pod, flip: bool) -> Pod {
    let mut p = pod.clone();
    p.labels.insert(
        "app".into(),
        if flip { "worker" } else { "frontend" }.into(),
    );
    p
}

fn benches(c: &mut Criterion) {
    if netns::skip_unless_root("bench apply") {
        return;
    }
    // Only this process's network namespace sees the tables written here.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("unshare the network namespace");
    let mut compiler = Compiler::new(synthetic::cluster(&LARGE), LOCAL_NODE);
    let mut writer = Writer::new().expect("netlink socket");
    let started = Instant::now();
    let sent = writer
        .replace_table(compiler.table())
        .expect("initial apply");
    println!(
        "initial apply: {:.0} ms, {} messages, {} KiB ({} elements, {} rules)",
        started.elapsed().as_secs_f64() * 1e3,
        sent.messages,
        sent.bytes / 1024,
        compiler.table().element_count(),
        compiler.table().rule_count()
    );

    // A remote frontend whose relabel changes peer sets.
    let pod = (0..LARGE.pods)
        .map(|i| synthetic::pod(&LARGE, i, synthetic::app_of(i)))
        .filter(|p| p.node.as_deref() != Some(LOCAL_NODE) && p.labels["app"] == "frontend")
        .find(|p| {
            let changed = !compiler.apply_pod(relabel(p, true)).is_empty();
            compiler.apply_pod(p.clone());
            changed
        })
        .expect("a frontend whose relabel matters");
    writer.replace_table(compiler.table()).expect("resync");

    let mut micros: Vec<f64> = (0..1_000)
        .map(|i| {
            let started = Instant::now();
            let delta = compiler.apply_pod(relabel(&pod, i % 2 == 0));
            writer.apply_delta(TABLE_NAME, &delta).expect("delta");
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    println!(
        "pod change compiled and applied, 1,000 changes: median {:.0} us, p99 {:.0} us",
        micros[500], micros[990]
    );

    // The table work `agent run` adds around each transaction (`Kernel::sync` in
    // agent/src/run.rs): it copies the compiled table, stamps the installed epoch and compares
    // with what it installed, stamps the next epoch and diffs, and keeps the copy for next time.
    // The compiler's own delta is not used. Not timed here: veth discovery, the generation
    // query, and for a policy change the conntrack marks freed for the next epoch.
    let bits = CtMarkBits::new(0xff00_0000).expect("mask");
    let mut epoch = Epoch::first(bits);
    let mut installed = compiler.table().clone();
    epoch::apply(&mut installed, epoch);
    let mut around: Vec<[f64; 3]> = (0..1_000)
        .map(|i| {
            compiler.apply_pod(relabel(&pod, i % 2 == 0));
            let started = Instant::now();
            let mut table = compiler.table().clone();
            epoch::apply(&mut table, epoch);
            let changed = table != installed;
            epoch = epoch.next();
            epoch::apply(&mut table, epoch);
            let copied = started.elapsed();
            let delta = diff(&installed, &table);
            let diffed = started.elapsed();
            assert!(
                changed && !delta.is_empty(),
                "the relabel changes the table"
            );
            installed = table.clone();
            [copied, diffed, started.elapsed()].map(|d| d.as_secs_f64() * 1e6)
        })
        .collect();
    let percentiles = |k: usize, around: &mut Vec<[f64; 3]>| {
        around.sort_by(|a, b| a[k].total_cmp(&b[k]));
        (around[500][k], around[990][k])
    };
    let (copy, diffing, all) = (
        percentiles(0, &mut around),
        percentiles(1, &mut around),
        percentiles(2, &mut around),
    );
    // After each transaction the agent reads its tables back for a fingerprint, to notice
    // changes made behind its back; enforcement does not wait for it.
    let mut readback: Vec<f64> = (0..100)
        .map(|_| {
            let started = Instant::now();
            writer
                .table_fingerprint(TableFamily::Inet, TABLE_NAME)
                .expect("fingerprint")
                .expect("the table is there");
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    readback.sort_by(f64::total_cmp);
    println!(
        "reading the table back whole for its fingerprint, 100 reads: median {:.1} ms, p99 {:.1} ms",
        readback[50], readback[99]
    );
    // What the agent does after a delta instead: read again only the sets the delta named.
    writer
        .replace_table(compiler.table())
        .expect("resync before the reads after deltas");
    let mut image = writer
        .table_image(TableFamily::Inet, TABLE_NAME, None)
        .expect("read back")
        .expect("the table is there");
    let mut after_delta: Vec<f64> = (0..100)
        .map(|i| {
            let delta = compiler.apply_pod(relabel(&pod, i % 2 == 0));
            writer.apply_delta(TABLE_NAME, &delta).expect("delta");
            let named = Named::by(&delta);
            let started = Instant::now();
            image = writer
                .table_image(TableFamily::Inet, TABLE_NAME, Some((&image, &named)))
                .expect("read back")
                .expect("the table is there");
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    after_delta.sort_by(f64::total_cmp);
    println!(
        "reading it back after a pod change (the sets and chains the delta named, the rest from the last read), 100 changes: median {:.1} ms, p99 {:.1} ms",
        after_delta[50], after_delta[99]
    );
    println!(
        "the agent's work around each transaction, 1,000 changes: copy, stamp and compare median {:.0} us (p99 {:.0}); with the diff {:.0} us ({:.0}), before the transaction; with the copy it keeps {:.0} us ({:.0})",
        copy.0, copy.1, diffing.0, diffing.1, all.0, all.1
    );

    let mut group = c.benchmark_group("apply");
    group.sample_size(10);
    group.bench_function("initial_150k_pods_node_110_pods", |b| {
        b.iter(|| writer.replace_table(compiler.table()).expect("replace"))
    });
    let mut flip = false;
    group.bench_function("remote_pod_change", |b| {
        b.iter(|| {
            flip = !flip;
            let delta = compiler.apply_pod(relabel(&pod, flip));
            writer.apply_delta(TABLE_NAME, &delta).expect("delta")
        })
    });
    group.finish();
}

criterion_group!(apply, benches);
criterion_main!(apply);
