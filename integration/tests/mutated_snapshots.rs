//! Bad input never crashes the agent: the README's example snapshots, with values swapped for
//! hostile ones (wrong types, out-of-range ports, broken CIDRs, a map where a list goes), go
//! through everything `agent run --manifests` and `agent trace` do with a snapshot (parse,
//! convert, compile for each node, render, diff against the unchanged snapshot's ruleset,
//! trace between pods). Each either loads, with any policy it cannot enforce named by object
//! and field, or is refused with an error naming the file and, for an invalid object, its
//! kind, name and field.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::fs;
use std::path::Path;

use agent::manifests::{self, ManifestError};
use proptest::prelude::*;
use ruleset::ir::Protocol;
use ruleset::{diff, render, Compiler, Endpoint, Tracer};
use serde_yaml_ng::{Mapping, Value};

fn documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).expect("read example");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("example parses"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Every position in `value` that holds something, as the keys and indices leading to it.
fn positions(value: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(at.clone());
    match value {
        Value::Mapping(map) => {
            for (key, child) in map {
                at.push(Step::Key(key.clone()));
                positions(child, at, out);
                at.pop();
            }
        }
        Value::Sequence(items) => {
            for (i, child) in items.iter().enumerate() {
                at.push(Step::Index(i));
                positions(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum Step {
    Key(Value),
    Index(usize),
}

fn at_mut<'a>(value: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(value, |v, step| match (step, v) {
        (Step::Key(k), Value::Mapping(m)) => m.get_mut(k).expect("key"),
        (Step::Index(i), Value::Sequence(s)) => &mut s[*i],
        _ => unreachable!("positions are taken from the same value"),
    })
}

/// What a position's value is replaced with: the kinds of mistake a hand-written or
/// generated manifest makes, and values at and past every limit the API server would check.
fn hostile() -> impl Strategy<Value = Value> {
    prop_oneof![
        hostile_string().prop_map(Value::String),
        hostile_number().prop_map(|n| Value::Number(n.into())),
        Just(Value::Null),
        Just(Value::Bool(true)),
        Just(Value::Number(1.5.into())),
        Just(Value::Sequence(vec![])),
        Just(Value::Mapping(Mapping::new())),
        Just(Value::Sequence(vec![Value::Null])),
    ]
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "",
        "-",
        "TCP",
        "tcp",
        "ICMP",
        "SCTP",
        "http",
        "a-very-long-port-name-over-15",
        "0.0.0.0/0",
        "::/0",
        "10.0.0.0/33",
        "10.0.0.1/8",
        "300.1.1.1/24",
        "fd00::/129",
        "10.244.1.0/24",
        "In",
        "NotIn",
        "Exists",
        "DoesNotExist",
        "Gt",
        "Ingress",
        "Egress",
        "Both",
        "node-a",
        "node-b",
        "Running",
        "Succeeded",
        "Failed",
        "a/b",
        "x=y",
        "\u{0}",
        "ünïcödé",
    ])
    .prop_map(String::from)
}

fn hostile_number() -> impl Strategy<Value = i64> {
    prop::sample::select(vec![
        -1i64,
        0,
        1,
        53,
        80,
        65535,
        65536,
        i64::from(i32::MAX),
        i64::MIN,
    ])
}

/// One change to a document: replace what is at a position, with anything or with a value of
/// the same type (which gets past decoding to the compiler more often), or remove it from its
/// parent.
#[derive(Clone, Debug)]
enum Change {
    Replace(prop::sample::Index, Value),
    Retype(prop::sample::Index, String, i64),
    Remove(prop::sample::Index),
}

fn change() -> impl Strategy<Value = Change> {
    let at = any::<prop::sample::Index>;
    prop_oneof![
        2 => (at(), hostile()).prop_map(|(i, v)| Change::Replace(i, v)),
        2 => (at(), hostile_string(), hostile_number())
            .prop_map(|(i, s, n)| Change::Retype(i, s, n)),
        1 => at().prop_map(Change::Remove),
    ]
}

fn apply(docs: &mut [Value], document: prop::sample::Index, change: &Change) {
    let doc = document.get_mut(docs);
    let mut all: Vec<Vec<Step>> = Vec::new();
    positions(doc, &mut Vec::new(), &mut all);
    match change {
        Change::Replace(i, v) => *at_mut(doc, i.get::<Vec<Step>>(&all)) = v.clone(),
        Change::Retype(i, s, n) => {
            let target = at_mut(doc, i.get::<Vec<Step>>(&all));
            match target {
                Value::String(_) => *target = Value::String(s.clone()),
                Value::Number(_) => *target = Value::Number((*n).into()),
                _ => {}
            }
        }
        Change::Remove(i) => {
            let path = i.get::<Vec<Step>>(&all);
            let Some((last, parent)) = path.split_last() else {
                return;
            };
            match (last, at_mut(doc, parent)) {
                (Step::Key(k), Value::Mapping(m)) => {
                    m.remove(k);
                }
                (Step::Index(i), Value::Sequence(s)) => {
                    s.remove(*i);
                }
                _ => unreachable!(),
            }
        }
    }
}

fn write(docs: &[Value], path: &Path) {
    let text = docs
        .iter()
        .map(|d| serde_yaml_ng::to_string(d).expect("serialize"))
        .collect::<Vec<_>>()
        .join("---\n");
    fs::write(path, text).expect("write snapshot");
}

fn text(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// How an error should name a document's object: `namespace/name` (`name` for a Namespace),
/// `(unnamed)` for the name when it has none; `None` for a list, whose items share a document.
fn expected_name(doc: &Value) -> Option<String> {
    let kind = text(doc.get("kind"));
    if kind.is_some_and(|k| k.ends_with("List")) {
        return None;
    }
    let meta = doc.get("metadata");
    let name = text(meta.and_then(|m| m.get("name"))).unwrap_or("(unnamed)");
    if kind == Some("Namespace") {
        return Some(name.to_string());
    }
    let namespace = agent::convert::namespace_of(text(meta.and_then(|m| m.get("namespace"))));
    Some(format!("{namespace}/{name}"))
}

/// Everything the agent does with a loaded snapshot; panics are what the test looks for.
fn exercise(before: &ruleset::Cluster, after: ruleset::Cluster) {
    let mut nodes: Vec<String> = after.pods().filter_map(|p| p.node.clone()).collect();
    nodes.extend(["node-a".to_string(), "no-such-node".to_string()]);
    nodes.sort();
    nodes.dedup();
    for node in &nodes {
        let old = Compiler::new(before.clone(), node);
        let new = Compiler::new(after.clone(), node);
        for d in new.diagnostics() {
            // Named by object and field.
            assert!(
                d.policy
                    .split_once('/')
                    .is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty()),
                "diagnostic without its policy: {d}"
            );
            assert!(
                d.field.starts_with("spec"),
                "diagnostic without its field: {d}"
            );
        }
        let text = render(new.table());
        assert!(text.contains("table inet nftpol"), "{text}");
        let _ = diff(old.table(), new.table());
        let _ = diff(new.table(), old.table());
    }
    let pods: Vec<Endpoint> = after
        .pods()
        .take(6)
        .map(|p| Endpoint::Pod {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        })
        .collect();
    let mut tracer = Tracer::new(after);
    for from in &pods {
        for to in &pods {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                // An error (a pod without an address, say) is an answer too.
                let _ = tracer.trace(from, to, protocol, 80);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn hostile_values_in_a_snapshot_never_crash_the_agent(
        example in any::<prop::sample::Index>(),
        changes in prop::collection::vec((any::<prop::sample::Index>(), change()), 1..5),
    ) {
        let files = integration::example_snapshots();
        let file = example.get(&files);
        let mut docs = documents(file);
        let before = manifests::load(file).expect("the example loads");
        for (document, change) in &changes {
            apply(&mut docs, *document, change);
        }
        let dir = tempfile::tempdir().expect("scratch dir");
        let path = dir.path().join("snapshot.yaml");
        write(&docs, &path);
        match manifests::load(&path) {
            Ok(after) => exercise(&before, after),
            Err(err) => {
                let shown = err.to_string();
                prop_assert!(shown.contains(&*path.to_string_lossy()), "{shown}");
                if let ManifestError::Object(object) = &err {
                    prop_assert!(!object.field.is_empty(), "{shown}");
                    let named = expected_name(&docs[object.document - 1]);
                    prop_assert!(named.is_none_or(|name| name == object.name), "{shown}");
                }
            }
        }
    }
}
