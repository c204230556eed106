//! What reporting unenforceable policies costs the reconcile loop on the 150,000-pod synthetic
//! cluster, with 1,000 broken policies (one per namespace, each selecting every pod in it):
//! taking the findings after a policy change, then the once-a-tick look for those this node
//! reports (the election among the nodes running selected pods) after that change (all are
//! looked at) and after pods of one namespace changed (its findings only).
//!
//! `cargo bench -p integration --bench findings` prints how many findings node-0 reports and
//! criterion's figures.

#![allow(
    clippy::expect_used,
    reason = "a benchmark whose fixture is wrong should stop loudly"
)]

use agent::events::Findings;
use criterion::{criterion_group, criterion_main, Criterion};
use integration::synthetic::{self, LARGE, LOCAL_NODE};
use ruleset::model::{IpBlock, NetworkPolicy, Peer, PolicyRule};
use ruleset::Compiler;

const BROKEN: usize = 1_000;

fn broken(namespace: String) -> NetworkPolicy {
    NetworkPolicy {
        namespace,
        name: "broken".into(),
        ingress: vec![PolicyRule {
            peers: vec![Peer {
                ip_block: Some(IpBlock {
                    cidr: "10.0.0.0/24".into(),
                    except: vec!["10.1.0.0/25".into()],
                }),
                ..Peer::default()
            }],
            ports: vec![],
        }],
        ..NetworkPolicy::default()
    }
}

fn benches(c: &mut Criterion) {
    let mut cluster = synthetic::cluster(&LARGE);
    let namespaces: Vec<String> = cluster
        .namespace_names()
        .filter(|n| n.starts_with("ns-"))
        .take(BROKEN)
        .map(str::to_string)
        .collect();
    for namespace in namespaces {
        cluster.apply_policy(broken(namespace));
    }
    let compiler = Compiler::new(cluster, LOCAL_NODE);
    assert_eq!(compiler.diagnostics().len(), BROKEN);

    let mut findings = Findings::default();
    findings.update(&compiler);
    let reported = findings.due(&compiler).len();
    println!(
        "{BROKEN} broken policies over {} pods: {reported} reported by {LOCAL_NODE}, the rest \
         looked at again when pods of their namespace change",
        compiler.cluster().pods().count()
    );

    let mut group = c.benchmark_group("findings");
    group.bench_function("update_1000_unchanged", |b| {
        b.iter(|| findings.update(&compiler))
    });
    group.bench_function("due_after_policy_change_1000", |b| {
        b.iter(|| {
            findings.update(&compiler);
            findings.due(&compiler)
        })
    });
    group.bench_function("due_after_pod_change_in_one_namespace", |b| {
        b.iter(|| {
            findings.pods_changed(["ns-0001".to_string()]);
            findings.due(&compiler)
        })
    });
    group.finish();
}

criterion_group!(findings, benches);
criterion_main!(findings);
