//! The netlink writer against the real kernel, each test in throwaway network namespaces.
//!
//! The reference is `nft` itself: the same table, rendered as text and loaded with `nft -f` into
//! another fresh namespace, must list exactly like what the writer built: the text listing, the
//! JSON listing without handles, and the bytecode (`nft --debug=netlink list`: expressions,
//! registers, element keys, flags and user data) without handles. After a delta, sets and
//! chains it created list after the older ones, so those comparisons sort them by name first.
//! (`src/netlink/parity.rs` compares the messages themselves with the ones `nft` sends.)

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use agent::netlink::{Change, Sent, WriteError, Writer};
use ruleset::ir::{
    AddrField, BaseChain, Chain, Element, Family, Hook, Map, MapEntry, Match, Protocol, Rule, Set,
    SetKey, Table, TableFamily, Verdict,
};
use ruleset::{Compiler, Delta};

mod common;

use common::{in_netns, skip_unless_root};

const TABLE: &str = "nftpol";

/// Runs `nft` in the calling thread's network namespace; its stdout, or a panic with stderr.
fn nft(args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(input.unwrap_or_default().as_bytes())
        .expect("write to nft");
    drop(stdin);
    let out = child.wait_with_output().expect("wait for nft");
    assert!(
        out.status.success(),
        "nft {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("nft prints UTF-8")
}

/// Everything `nft` can say about one table, with kernel-assigned handles taken out.
#[derive(Debug, PartialEq, Eq)]
struct Listing {
    text: String,
    json: String,
    bytecode: String,
}

fn listing(table: &str) -> Listing {
    let text = nft(&["list", "table", "inet", table], None);
    let mut json: serde_json::Value =
        serde_json::from_str(&nft(&["-j", "list", "table", "inet", table], None)).expect("JSON");
    strip_handles(&mut json);
    let bytecode = normalise_bytecode(
        &nft(&["--debug=netlink", "list", "table", "inet", table], None),
        table,
    );
    Listing {
        text,
        json: serde_json::to_string_pretty(&json).expect("JSON prints"),
        bytecode,
    }
}

fn strip_handles(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("handle");
            map.remove("metainfo");
            map.values_mut().for_each(strip_handles);
        }
        serde_json::Value::Array(items) => {
            items.retain(|i| i.get("metainfo").is_none());
            items.iter_mut().for_each(strip_handles);
        }
        _ => {}
    }
}

/// Drops handle and position from each rule header (`inet nftpol forward 12 11`), and sorts the element
/// lines of each set, which a hash set lists in an order of its own.
fn normalise_bytecode(raw: &str, table: &str) -> String {
    let header = format!("inet {table} ");
    let mut out: Vec<String> = Vec::new();
    let mut elements: Vec<String> = Vec::new();
    for line in raw.lines() {
        if line.starts_with("\telement ") {
            elements.push(line.to_string());
            continue;
        }
        elements.sort();
        out.append(&mut elements);
        match line.strip_prefix(&header) {
            Some(rest) if !rest.starts_with('@') => {
                let chain = rest.split(' ').next().unwrap_or_default();
                out.push(format!("{header}{chain}"));
            }
            _ => out.push(line.to_string()),
        }
    }
    elements.sort();
    out.append(&mut elements);
    out.join("\n")
}

/// A listing with its sets, maps and chains in name order instead of creation order (the
/// rules of each chain keep theirs).
fn canonical(listing: &Listing) -> Listing {
    let mut json: serde_json::Value = serde_json::from_str(&listing.json).expect("JSON");
    if let Some(items) = json.get_mut("nftables").and_then(|v| v.as_array_mut()) {
        items.sort_by_key(|item| {
            let (kind, body) = item
                .as_object()
                .and_then(|o| o.iter().next())
                .map(|(k, v)| (k.clone(), v.clone()))
                .unwrap_or_default();
            let name = body.get(if kind == "rule" { "chain" } else { "name" });
            (kind, name.map(ToString::to_string))
        });
    }
    let (bytecode, text) = listing
        .bytecode
        .split_once("\ntable ")
        .unwrap_or((&listing.bytecode, ""));
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in bytecode.lines() {
        match blocks.last_mut() {
            Some(block) if !line.starts_with("inet ") => block.push(line),
            _ => blocks.push(vec![line]),
        }
    }
    blocks.sort_by_key(|b| b.first().copied());
    Listing {
        text: sorted_blocks(&listing.text),
        json: serde_json::to_string_pretty(&json).expect("JSON prints"),
        bytecode: format!(
            "{}\n{}",
            blocks.concat().join("\n"),
            sorted_blocks(&format!("table {text}"))
        ),
    }
}

/// `nft list` text with the table's sets, maps and chains sorted.
fn sorted_blocks(text: &str) -> String {
    let mut head = Vec::new();
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    let mut open = false;
    for line in text.lines().filter(|l| !l.is_empty()) {
        if ["\tset ", "\tmap ", "\tchain "]
            .iter()
            .any(|p| line.starts_with(p))
        {
            blocks.push(vec![line]);
            open = true;
        } else if open {
            if let Some(block) = blocks.last_mut() {
                block.push(line);
            }
            open = line != "\t}";
        } else {
            head.push(line);
        }
    }
    blocks.sort();
    let tail = head.split_off(
        head.len()
            .min(head.iter().position(|l| *l == "}").unwrap_or(head.len())),
    );
    [head, blocks.concat(), tail].concat().join("\n")
}

/// The first lines where two listings part, with a little context.
fn difference(what: &str, writer: &str, reference: &str) -> Option<String> {
    if writer == reference {
        return None;
    }
    let (a, b): (Vec<&str>, Vec<&str>) = (writer.lines().collect(), reference.lines().collect());
    let at = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let from = at.saturating_sub(3);
    Some(format!(
        "{what} differs at line {}:\n--- writer\n{}\n--- nft -f\n{}\n",
        at + 1,
        a.get(from..(at + 4).min(a.len()))
            .unwrap_or_default()
            .join("\n"),
        b.get(from..(at + 4).min(b.len()))
            .unwrap_or_default()
            .join("\n"),
    ))
}

fn differences(writer: &Listing, reference: &Listing) -> Vec<String> {
    [
        difference("text listing", &writer.text, &reference.text),
        difference("JSON listing", &writer.json, &reference.json),
        difference("bytecode", &writer.bytecode, &reference.bytecode),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// What `nft -f` builds from the rendered text of `table`, in a namespace of its own.
fn reference(table: &Table) -> Listing {
    let text = ruleset::render(table);
    in_netns(|| {
        nft(&["-f", "-"], Some(&text));
        listing(&table.name)
    })
}

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the five examples, found {files:?}"
    );
    files
}

fn compile(example: &str, node: &str) -> Compiler {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../integration/examples")
        .join(example);
    let cluster = agent::manifests::load(&path).expect("example loads");
    Compiler::new(cluster, node)
}

#[test]
fn the_writer_builds_what_nft_builds_for_every_example() {
    if skip_unless_root("the_writer_builds_what_nft_builds_for_every_example") {
        return;
    }
    let mut failures = Vec::new();
    for file in examples() {
        let cluster = agent::manifests::load(&file).expect("example loads");
        let stem = file.file_stem().and_then(|s| s.to_str()).expect("name");
        for node in ["node-a", "node-b"] {
            let compiler = Compiler::new(cluster.clone(), node);
            let table = compiler.table();
            let (sent, written) = in_netns(|| {
                let sent = Writer::new()
                    .and_then(|mut w| w.replace_table(table))
                    .unwrap_or_else(|e| panic!("{stem} {node}: {e}"));
                (sent, listing(TABLE))
            });
            eprintln!(
                "{stem} {node}: {} messages, {} bytes for {} rules and {} elements",
                sent.messages,
                sent.bytes,
                table.rule_count(),
                table.element_count()
            );
            for d in differences(&written, &reference(table)) {
                failures.push(format!("{stem} {node}: {d}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn ip(text: &str) -> std::net::IpAddr {
    text.parse().expect("address")
}

fn set(name: &str, key: SetKey, interval: bool, elements: &[Element]) -> (String, Set) {
    let set = Set {
        name: name.into(),
        key,
        interval,
        comment: format!("{name} of \"the\" edge cases"),
        elements: elements.iter().copied().collect(),
    };
    (name.into(), set)
}

fn rule(matches: Vec<Match>, verdict: Verdict, comment: Option<&str>) -> Rule {
    Rule {
        matches,
        verdict,
        comment: comment.map(String::from),
    }
}

/// What the examples do not show: IPv6 ranges up to the last address, single addresses and a
/// zero start in interval sets, IPv6 concatenations, port ranges, one ICMPv6 type, quotes and
/// empty comments, negative and positive priorities.
fn edge_cases() -> Table {
    let last6 = ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
    let sets = [
        set(
            "cidr6",
            SetKey::Addr(Family::V6),
            true,
            &[
                Element::Addr(ip("2001:db8::1")),
                Element::Range(ip("fd00::"), ip("fd00::ffff")),
                Element::Range(ip("fe80::"), last6),
            ],
        ),
        set(
            "cidr4",
            SetKey::Addr(Family::V4),
            true,
            &[
                Element::Range(ip("0.0.0.0"), ip("9.255.255.255")),
                Element::Addr(ip("10.1.1.1")),
                Element::Range(ip("10.1.1.2"), ip("10.1.1.200")),
            ],
        ),
        set(
            "nport6",
            SetKey::AddrProtoPort(Family::V6),
            false,
            &[
                Element::AddrProtoPort(ip("fd00::1"), Protocol::Udp, 53),
                Element::AddrProtoPort(ip("fd00::2"), Protocol::Sctp, 5000),
                Element::AddrProtoPort(ip("fd00::2"), Protocol::Tcp, 65535),
            ],
        ),
        set(
            "pair6",
            SetKey::AddrPair(Family::V6),
            false,
            &[Element::AddrPair(ip("fd00::1"), ip("fd00::1"))],
        ),
    ];
    let pod_rules = vec![
        rule(vec![Match::Icmpv6Type(vec![135])], Verdict::Accept, None),
        rule(
            vec![Match::DestinationPortInSet {
                family: Family::V6,
                set: "nport6".into(),
            }],
            Verdict::Return,
            Some("named \"port\""),
        ),
        rule(
            vec![
                Match::Protocol(Protocol::Udp),
                Match::DestinationPort(1000, 2000),
            ],
            Verdict::Accept,
            Some(""),
        ),
        rule(vec![Match::Protocol(Protocol::Sctp)], Verdict::Accept, None),
        rule(
            vec![Match::AddrPairInSet {
                family: Family::V6,
                set: "pair6".into(),
            }],
            Verdict::Drop,
            None,
        ),
        rule(
            vec![
                Match::AddrInSet {
                    family: Family::V4,
                    field: AddrField::Destination,
                    set: "cidr4".into(),
                },
                Match::Protocol(Protocol::Tcp),
                Match::DestinationPort(0, 65535),
            ],
            Verdict::Accept,
            None,
        ),
        rule(
            vec![Match::AddrInSet {
                family: Family::V6,
                field: AddrField::Source,
                set: "cidr6".into(),
            }],
            Verdict::Drop,
            Some(&"x".repeat(128)),
        ),
    ];
    let chain = |name: &str, base: Option<BaseChain>, rules: Vec<Rule>| {
        (
            name.to_string(),
            Chain {
                name: name.into(),
                base,
                comment: String::new(),
                rules,
            },
        )
    };
    let dispatch = rule(
        vec![Match::CtReply, Match::CtRelated],
        Verdict::Vmap {
            family: Family::V6,
            field: AddrField::Destination,
            map: "ingress6".into(),
        },
        None,
    );
    Table {
        family: TableFamily::Inet,
        name: TABLE.into(),
        comment: "edge \"cases\"".into(),
        sets: sets.into_iter().collect(),
        maps: [(
            "ingress6".to_string(),
            Map {
                name: "ingress6".into(),
                family: Family::V6,
                comment: String::new(),
                elements: [(
                    ip("fd00::1"),
                    MapEntry {
                        chain: "pod".into(),
                        comment: String::new(),
                    },
                )]
                .into(),
            },
        )]
        .into(),
        chains: [
            chain("pod", None, pod_rules),
            chain(
                "input",
                Some(BaseChain {
                    hook: Hook::Input,
                    priority: -5,
                }),
                vec![dispatch.clone()],
            ),
            chain(
                "forward",
                Some(BaseChain {
                    hook: Hook::Forward,
                    priority: 10,
                }),
                vec![dispatch],
            ),
        ]
        .into(),
    }
}

#[test]
fn the_writer_builds_what_nft_builds_for_edge_cases() {
    if skip_unless_root("the_writer_builds_what_nft_builds_for_edge_cases") {
        return;
    }
    let table = edge_cases();
    let written = in_netns(|| {
        Writer::new().unwrap().replace_table(&table).unwrap();
        listing(TABLE)
    });
    let diffs = differences(&written, &reference(&table));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn deltas_to_intervals_concatenations_maps_and_rules_match_a_full_replace() {
    if skip_unless_root("deltas_to_intervals_concatenations_maps_and_rules_match_a_full_replace") {
        return;
    }
    let old = edge_cases();
    let mut new = old.clone();
    let cidr6 = new.sets.get_mut("cidr6").expect("cidr6");
    cidr6
        .elements
        .remove(&Element::Range(ip("fd00::"), ip("fd00::ffff")));
    cidr6.elements.remove(&Element::Range(
        ip("fe80::"),
        ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ));
    cidr6
        .elements
        .insert(Element::Range(ip("fd01::"), ip("fd01::ff")));
    cidr6.elements.insert(Element::Range(
        ip("ff00::"),
        ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
    ));
    let nport6 = new.sets.get_mut("nport6").expect("nport6");
    nport6
        .elements
        .remove(&Element::AddrProtoPort(ip("fd00::1"), Protocol::Udp, 53));
    nport6
        .elements
        .insert(Element::AddrProtoPort(ip("fd00::3"), Protocol::Tcp, 8080));
    let map = new.maps.get_mut("ingress6").expect("ingress6");
    map.elements.clear();
    map.elements.insert(
        ip("fd00::2"),
        MapEntry {
            chain: "pod".into(),
            comment: "other/pod".into(),
        },
    );
    new.chains.get_mut("pod").expect("pod").rules.remove(0);
    let delta = ruleset::diff(&old, &new);

    let written = in_netns(|| {
        let mut writer = Writer::new().unwrap();
        writer.replace_table(&old).unwrap();
        let sent = writer.apply_delta(TABLE, &delta).unwrap();
        eprintln!(
            "delta of {} changes: {} messages",
            delta.size(),
            sent.messages
        );
        listing(TABLE)
    });
    let diffs = differences(&canonical(&written), &canonical(&reference(&new)));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn a_large_table_goes_in_one_batch_with_every_reply_read() {
    if skip_unless_root("a_large_table_goes_in_one_batch_with_every_reply_read") {
        return;
    }
    let mut table = edge_cases();
    let many: Vec<Element> = (0..50_000u32)
        .map(|n| Element::Addr(std::net::Ipv4Addr::from(0x0a00_0000 + n).into()))
        .collect();
    table
        .sets
        .extend([set("many", SetKey::Addr(Family::V4), false, &many)]);
    let pod = table.chains.get_mut("pod").expect("pod");
    let template = pod.rules.clone();
    for _ in 0..500 {
        pod.rules.extend(template.iter().cloned());
    }
    let rules = table.rule_count();
    let (sent, listed_rules, listed_elements) = in_netns(|| {
        let mut writer = Writer::new().unwrap();
        writer.replace_table(&table).unwrap();
        let sent = writer.replace_table(&table).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&nft(&["-j", "list", "table", "inet", TABLE], None)).unwrap();
        let items = json["nftables"].as_array().unwrap().clone();
        let rules = items.iter().filter(|i| i.get("rule").is_some()).count();
        let elements = items
            .iter()
            .filter_map(|i| i.get("set"))
            .find(|s| s["name"] == "many")
            .and_then(|s| s["elem"].as_array().map(Vec::len))
            .unwrap_or(0);
        (sent, rules, elements)
    });
    eprintln!(
        "large table: {} messages, {} bytes",
        sent.messages, sent.bytes
    );
    assert_eq!((listed_rules, listed_elements), (rules, 50_000));
}

#[test]
fn replacing_twice_leaves_one_table_holding_the_second() {
    if skip_unless_root("replacing_twice_leaves_one_table_holding_the_second") {
        return;
    }
    let first = compile("three-tier.yaml", "node-a");
    let second = compile("three-tier.yaml", "node-b");
    let (tables, written) = in_netns(|| {
        let mut writer = Writer::new().unwrap();
        writer.replace_table(first.table()).unwrap();
        writer.replace_table(first.table()).unwrap();
        writer.replace_table(second.table()).unwrap();
        (nft(&["list", "tables"], None), listing(TABLE))
    });
    assert_eq!(tables, "table inet nftpol\n");
    let diffs = differences(&written, &reference(second.table()));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn replacing_leaves_other_tables_alone() {
    if skip_unless_root("replacing_leaves_other_tables_alone") {
        return;
    }
    let others = "table inet other {\n\tchain c {\n\t\ttype filter hook input priority 10; policy accept;\n\t\ttcp dport 22 accept\n\t}\n}\n\
                  table ip nftpol {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 10.0.0.1 }\n\t}\n\tchain c {\n\t\tip saddr @s drop\n\t}\n}\n";
    let table = compile("ipblock-except.yaml", "node-a");
    let (before, after, ours) = in_netns(|| {
        nft(&["-f", "-"], Some(others));
        let before = nft(&["list", "ruleset"], None);
        let mut writer = Writer::new().unwrap();
        writer.replace_table(table.table()).unwrap();
        writer.replace_table(table.table()).unwrap();
        let after = [
            nft(&["list", "table", "inet", "other"], None),
            nft(&["list", "table", "ip", "nftpol"], None),
        ]
        .concat();
        (before, after, listing(TABLE))
    });
    assert_eq!(before, after, "the other tables changed");
    let diffs = differences(&ours, &reference(table.table()));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// A pod's labels changed to `app=<app>`; the delta the compiler reports.
fn relabel(compiler: &mut Compiler, name: &str, app: &str) -> Delta {
    let mut pod = compiler
        .cluster()
        .pod("shop", name)
        .cloned()
        .expect("pod exists");
    pod.labels.insert("app".into(), app.into());
    let delta = compiler.apply_pod(pod);
    assert!(!delta.is_empty());
    delta
}

#[test]
fn pod_deltas_give_the_same_table_as_a_full_replace_in_far_fewer_messages() {
    if skip_unless_root("pod_deltas_give_the_same_table_as_a_full_replace_in_far_fewer_messages") {
        return;
    }
    let mut compiler = compile("three-tier.yaml", "node-a");
    let initial = compiler.table().clone();
    // The only frontend of node-a turned backend joins the backend chains and leaves the
    // frontend chains and their sets unused; turned database, it needs new chains and sets.
    let to_backend = relabel(&mut compiler, "frontend-1", "backend");
    let after_first = compiler.table().clone();
    let to_database = relabel(&mut compiler, "frontend-1", "database");
    let after_second = compiler.table().clone();
    for (delta, what) in [
        (to_backend.delete_chains.len(), "delete chains"),
        (to_backend.delete_sets.len(), "delete sets"),
        (to_database.add_chains.len(), "add chains"),
        (to_database.add_sets.len(), "add sets"),
    ] {
        assert!(
            delta > 0,
            "the changes should {what}: {to_backend:?} {to_database:?}"
        );
    }

    let (full, deltas, listings) = in_netns(|| {
        let mut writer = Writer::new().unwrap();
        let full = writer.replace_table(&initial).unwrap();
        let first = writer.apply_delta(TABLE, &to_backend).unwrap();
        let after_first = listing(TABLE);
        let second = writer.apply_delta(TABLE, &to_database).unwrap();
        (full, [first, second], [after_first, listing(TABLE)])
    });
    let full_after: Vec<Sent> = [&after_first, &after_second]
        .iter()
        .map(|t| in_netns(|| Writer::new().unwrap().replace_table(t).unwrap()))
        .collect();
    for (i, (delta_sent, full_sent)) in deltas.iter().zip(&full_after).enumerate() {
        eprintln!(
            "change {}: delta batch {} messages ({} bytes), full replace {} messages ({} bytes); first full load {} messages",
            i + 1,
            delta_sent.messages,
            delta_sent.bytes,
            full_sent.messages,
            full_sent.bytes,
            full.messages
        );
        assert!(
            delta_sent.messages * 3 < full_sent.messages,
            "a pod change should be a small batch"
        );
    }
    // Objects a delta creates list after the older ones: compare in a fixed order.
    for (listing, table) in listings.iter().zip([&after_first, &after_second]) {
        let diffs = differences(&canonical(listing), &canonical(&reference(table)));
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    }
}

#[test]
fn a_batch_at_a_stale_generation_is_refused_whole() {
    if skip_unless_root("a_batch_at_a_stale_generation_is_refused_whole") {
        return;
    }
    let mut compiler = compile("three-tier.yaml", "node-a");
    let initial = compiler.table().clone();
    let delta = relabel(&mut compiler, "frontend-1", "backend");
    let (stale, current) = in_netns(|| {
        let mut writer = Writer::new().unwrap();
        writer.replace_table(&initial).unwrap();
        let before = listing(TABLE);
        let seen = writer.generation().unwrap();
        // Someone else commits: another table.
        nft(&["add table inet other"], None);
        let change = Change::Delta {
            family: TableFamily::Inet,
            table: TABLE,
            delta: &delta,
        };
        let stale = writer.commit_at(&[change], seen);
        let untouched = listing(TABLE) == before;
        let now = writer.generation().unwrap();
        let current = writer.commit_at(&[change], now).map(|_| listing(TABLE));
        ((stale, untouched), current)
    });
    let (stale, untouched) = stale;
    match &stale {
        Err(err) => assert!(err.is_stale(), "refused, but not as stale: {err}"),
        Ok(_) => panic!("a batch at a generation since moved was applied"),
    }
    assert!(untouched, "the refused batch changed the table");
    let listed = current.expect("the same batch at the current generation");
    let diffs = differences(
        &canonical(&listed),
        &canonical(&reference(compiler.table())),
    );
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn a_whole_table_is_checked_at_the_generation_read_when_sent() {
    if skip_unless_root("a_whole_table_is_checked_at_the_generation_read_when_sent") {
        return;
    }
    let table = compile("three-tier.yaml", "node-a").table().clone();
    let (checked, after, listed) = in_netns(|| {
        let mut writer = Writer::new().unwrap();
        // Transactions before the commit do not refuse it: the generation is read when sent.
        nft(&["add table inet other"], None);
        let checked = writer.commit_at_latest(&[Change::Replace(&table)], 1);
        let after = writer.generation().unwrap();
        (checked, after, listing(TABLE))
    });
    let (sent, at) = checked.expect("committed at the generation just read");
    assert!(sent.messages > 0);
    assert_eq!(
        after,
        at.wrapping_add(1).max(1),
        "ours is the one commit since"
    );
    let diffs = differences(&canonical(&listed), &canonical(&reference(&table)));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn a_refused_object_fails_the_whole_batch_and_is_named() {
    if skip_unless_root("a_refused_object_fails_the_whole_batch_and_is_named") {
        return;
    }
    let good = compile("three-tier.yaml", "node-a").table().clone();
    let mut bad = good.clone();
    let chain = bad
        .chains
        .values_mut()
        .find(|c| c.name.starts_with("ing_"))
        .expect("an ingress chain");
    chain.rules.insert(
        0,
        Rule {
            matches: vec![Match::AddrInSet {
                family: Family::V4,
                field: AddrField::Source,
                set: "no_such_set".into(),
            }],
            verdict: Verdict::Accept,
            comment: None,
        },
    );
    let chain_name = chain.name.clone();
    // Removing pods from a set that exists next to adding to one that does not.
    let mut bad_delta = Delta::default();
    bad_delta.remove_element(
        "self4",
        Element::AddrPair(
            "10.244.1.20".parse().unwrap(),
            "10.244.1.20".parse().unwrap(),
        ),
    );
    bad_delta.add_element("no_such_set", Element::Addr("10.9.9.9".parse().unwrap()));

    let (before, replace_error, delta_error, after) = in_netns(|| {
        let mut writer = Writer::new().unwrap();
        writer.replace_table(&good).unwrap();
        let before = listing(TABLE);
        let replace_error = writer.replace_table(&bad).unwrap_err();
        let delta_error = writer.apply_delta(TABLE, &bad_delta).unwrap_err();
        (before, replace_error, delta_error, listing(TABLE))
    });
    eprintln!("replace_table: {replace_error}\napply_delta: {delta_error}");
    assert!(
        matches!(&replace_error, WriteError::Refused { object, .. } if *object == format!("rule 1 of chain {chain_name}")),
        "{replace_error:?}"
    );
    assert!(
        matches!(&delta_error, WriteError::Refused { object, .. } if object == "elements of set no_such_set"),
        "{delta_error:?}"
    );
    assert_eq!(before, after, "a refused batch must change nothing");
}

/// The read-back the agent uses to notice tampering: the generation moves with every
/// transaction, the fingerprint only with what is in our table.
#[test]
fn the_fingerprint_follows_our_table_and_ignores_others() {
    if skip_unless_root("the_fingerprint_follows_our_table_and_ignores_others") {
        return;
    }
    let compiler = compile("three-tier.yaml", "node-a");
    let guard = ruleset::guard::guard_table(
        "node-a",
        &vec![ruleset::guard::GuardedPod {
            veth: ruleset::ir::IfName::new("veth00aa11bb").unwrap(),
            index: 40,
            ips: vec![ip("10.244.1.20")],
            mac: [2, 0, 0, 0, 0, 20],
            mac_shared: false,
            egress_isolated: false,
        }]
        .into(),
    );
    let outcome = in_netns(|| {
        let mut writer = Writer::new().unwrap();
        let mut seen = Vec::new();
        let mut look = |writer: &mut Writer, step: &str| {
            let generation = writer.generation().unwrap();
            let inet = writer.table_fingerprint(TableFamily::Inet, TABLE).unwrap();
            let bridge = writer
                .table_fingerprint(TableFamily::Bridge, TABLE)
                .unwrap();
            seen.push((step.to_string(), generation, inet, bridge));
        };
        look(&mut writer, "empty");
        writer
            .commit(&[Change::Replace(compiler.table()), Change::Replace(&guard)])
            .unwrap();
        look(&mut writer, "installed");
        look(&mut writer, "unchanged");
        nft(&["add table inet other"], None);
        look(&mut writer, "another table added");
        nft(
            &["add element inet nftpol self4 { 10.9.9.9 . 10.9.9.9 }"],
            None,
        );
        look(&mut writer, "element added");
        nft(
            &["delete element inet nftpol self4 { 10.9.9.9 . 10.9.9.9 }"],
            None,
        );
        look(&mut writer, "element removed again");
        nft(&["add rule inet nftpol forward accept"], None);
        look(&mut writer, "rule appended");
        writer.replace_table(compiler.table()).unwrap();
        look(&mut writer, "replaced");
        nft(&["flush chain bridge nftpol guard"], None);
        look(&mut writer, "bridge chain flushed");
        nft(&["flush ruleset"], None);
        look(&mut writer, "flushed");
        seen
    });
    let at = |step: &str| {
        outcome
            .iter()
            .find(|(s, ..)| s == step)
            .map(|(_, g, i, b)| (*g, *i, *b))
            .unwrap()
    };
    let (g0, i0, b0) = at("empty");
    assert_eq!((i0, b0), (None, None), "no tables yet");
    let (g1, i1, b1) = at("installed");
    assert!(g1 > g0, "a commit moves the generation");
    assert!(i1.is_some() && b1.is_some());
    assert_eq!(at("unchanged"), (g1, i1, b1), "reading changes nothing");
    let (g2, i2, b2) = at("another table added");
    assert!(g2 > g1);
    assert_eq!((i2, b2), (i1, b1), "another table does not change ours");
    let (_, i3, _) = at("element added");
    assert_ne!(i3, i1, "an element added behind our back shows");
    let (_, i4, _) = at("element removed again");
    assert_eq!(i4, i1, "and the same content gives the same fingerprint");
    let (_, i5, _) = at("rule appended");
    assert_ne!(i5, i1, "a rule appended shows");
    let (_, i6, b6) = at("replaced");
    assert!(i6.is_some());
    let (_, i7, b7) = at("bridge chain flushed");
    assert_eq!(i7, i6);
    assert_ne!(b7, b6, "a flushed bridge chain shows");
    assert_eq!(at("flushed").1, None, "a removed table reads as absent");
}

/// Whether `nft get element` finds `addr` in set `set` of `bridge nftpol`.
fn bridge_set_holds(set: &str, addr: &str) -> bool {
    Command::new("nft")
        .args([
            "get",
            "element",
            "bridge",
            TABLE,
            set,
            &format!("{{ {addr} }}"),
        ])
        .output()
        .expect("run nft")
        .status
        .success()
}

#[test]
fn the_guards_bridge_subnets_follow_the_bridges_by_delta() {
    use ruleset::guard::{guard_table, Guard, PodBridge};
    use ruleset::ir::IfName;

    if skip_unless_root("the_guards_bridge_subnets_follow_the_bridges_by_delta") {
        return;
    }
    let bridge = |nets: &[&str]| Guard {
        bridges: vec![PodBridge {
            name: IfName::new("cni0").unwrap(),
            nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
        }],
        ..Guard::default()
    };
    // No bridge yet (no pod on the node): every address; then the first pod's bridge; then
    // its address changes; then it has none of IPv4.
    let steps = [
        Guard::default(),
        bridge(&["10.244.1.1/24", "fd00:10:244:1::1/64"]),
        bridge(&["10.244.7.1/24", "fd00:10:244:1::1/64"]),
        bridge(&["fd00:10:244:1::1/64"]),
    ];
    let checks = [
        ("bridgenets4", "10.244.1.5"),
        ("bridgenets4", "10.244.7.5"),
        ("bridgenets4", "192.0.2.1"),
        ("bridgenets6", "fd00:10:244:1::5"),
        ("bridgenets6", "fd00:10:244:2::5"),
        ("bridgenets6", "fe80::1"),
    ];
    let expected = [
        [true, true, true, true, true, true],
        [true, false, false, true, false, true],
        [false, true, false, true, false, true],
        [true, true, true, true, false, true],
    ];
    let seen = in_netns(|| {
        let mut writer = Writer::new().unwrap();
        let mut table = guard_table("n1", &steps[0]);
        writer.replace_table(&table).unwrap();
        let mut seen = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            if i > 0 {
                let next = guard_table("n1", step);
                let delta = ruleset::diff(&table, &next);
                let change = Change::Delta {
                    family: TableFamily::Bridge,
                    table: TABLE,
                    delta: &delta,
                };
                writer.commit(&[change]).unwrap();
                table = next;
            }
            seen.push(checks.map(|(set, addr)| bridge_set_holds(set, addr)));
        }
        seen
    });
    assert_eq!(seen, expected, "{checks:?}");
}

/// The notification monitor against the real kernel: other tables' transactions are vouched
/// for, one touching ours is not, even when another process forges the report of its
/// generation first, and the agent's own commit counts as its own.
#[test]
fn the_monitor_vouches_only_for_the_kernels_reports_of_other_tables() {
    use agent::netlink::Monitor;
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

    if skip_unless_root("the_monitor_vouches_only_for_the_kernels_reports_of_other_tables") {
        return;
    }
    in_netns(|| {
        let mut writer = Writer::new().expect("writer");
        writer
            .replace_table(&Table {
                name: TABLE.into(),
                ..Table::default()
            })
            .expect("our table");
        let mut monitor = Monitor::new(writer.port()).expect("monitor");
        nft(&["add", "table", "inet", "other"], None);
        let start = writer.generation().expect("generation");
        for i in 0..5 {
            nft(&["add", "chain", "inet", "other", &format!("c{i}")], None);
        }
        let now = writer.generation().expect("generation");
        assert_eq!(now, start + 5);
        assert!(monitor.untouched(start, now), "five of another table's");

        // Someone reports the next generation as another table's, then takes it for ours.
        let forger = Socket::new(NETLINK_NETFILTER).expect("socket");
        let mut newgen = vec![0u8; 16];
        newgen[4..6].copy_from_slice(&((10u16 << 8) | 15).to_ne_bytes());
        newgen[12..16].copy_from_slice(&77u32.to_ne_bytes());
        newgen.extend_from_slice(&[0, 0, 0, 0]);
        newgen.extend_from_slice(&8u16.to_ne_bytes());
        newgen.extend_from_slice(&1u16.to_ne_bytes());
        newgen.extend_from_slice(&(now + 1).to_be_bytes());
        let len = newgen.len() as u32;
        newgen[0..4].copy_from_slice(&len.to_ne_bytes());
        forger
            .send_to(&newgen, &SocketAddr::new(0, 1 << 6), 0)
            .expect("send to group 7");
        nft(&["add", "chain", "inet", TABLE, "stray"], None);
        let tampered = writer.generation().expect("generation");
        assert_eq!(tampered, now + 1);
        assert!(!monitor.untouched(now, tampered), "a change to ours");

        // The agent's own commit, then another table's: vouched for after the own one.
        writer
            .replace_table(&Table {
                name: TABLE.into(),
                ..Table::default()
            })
            .expect("our table again");
        let ours = writer.generation().expect("generation");
        nft(&["add", "chain", "inet", "other", "after"], None);
        let later = writer.generation().expect("generation");
        assert!(
            monitor.untouched_after_own(ours, later),
            "after our own commit"
        );
        // Another's commit is not the agent's.
        nft(&["add", "chain", "inet", "other", "last"], None);
        let last = writer.generation().expect("generation");
        assert!(!monitor.untouched_after_own(later, last));
    });
}

/// A read-back after a delta reads again only the sets and chains the delta names (and the
/// anonymous sets): what it gives is what reading everything gives, and taking everything from
/// the old read instead would not be.
#[test]
fn a_read_back_after_a_delta_reuses_what_it_did_not_name() {
    use agent::netlink::Named;
    use ruleset::epoch::{self, CtMarkBits, Epoch};
    use ruleset::guard::{guard_table, GuardedPod};
    use ruleset::ir::IfName;

    if skip_unless_root("a_read_back_after_a_delta_reuses_what_it_did_not_name") {
        return;
    }
    let mut compiler = compile("three-tier.yaml", "node-a");
    let initial = compiler.table().clone();
    // New chains and sets, elements in and out, then back: every kind of delta.
    let mut deltas: Vec<Delta> = [
        ("frontend-1", "backend"),
        ("frontend-1", "database"),
        ("backend-1", "frontend"),
        ("frontend-1", "frontend"),
    ]
    .iter()
    .map(|(pod, app)| relabel(&mut compiler, pod, app))
    .collect();
    // A new epoch replaces `forward`'s rules, the rest untouched.
    let second = Epoch::first(CtMarkBits::default()).next();
    let mut stamped = compiler.table().clone();
    epoch::apply(&mut stamped, second);
    let mut next = stamped.clone();
    epoch::apply(&mut next, second.next());
    deltas.push(ruleset::diff(compiler.table(), &stamped));
    deltas.push(ruleset::diff(&stamped, &next));
    for delta in &deltas[4..] {
        assert!(delta.add_elements.is_empty() && !delta.replace_chains.is_empty());
    }
    in_netns(|| {
        let mut writer = Writer::new().unwrap();
        writer.replace_table(&initial).unwrap();
        let mut image = writer
            .table_image(TableFamily::Inet, TABLE, None)
            .unwrap()
            .unwrap();
        for (i, delta) in deltas.iter().enumerate() {
            writer.apply_delta(TABLE, delta).unwrap();
            let named = Named::by(delta);
            assert!(named != Named::default(), "delta {i} changes something");
            let reused = writer
                .table_image(TableFamily::Inet, TABLE, Some((&image, &named)))
                .unwrap()
                .unwrap();
            let full = writer
                .table_image(TableFamily::Inet, TABLE, None)
                .unwrap()
                .unwrap();
            assert_eq!(reused, full, "delta {i}");
            let stale = writer
                .table_image(TableFamily::Inet, TABLE, Some((&image, &Named::default())))
                .unwrap()
                .unwrap();
            assert_ne!(stale, full, "delta {i}: the old read of what it changed");
            image = reused;
        }

        // The anti-spoofing table: a second guarded pod comes.
        let pod = |veth: &str, index: u32, ip: &str, last: u8| {
            GuardedPod::new(
                &compiler,
                IfName::new(veth).unwrap(),
                index,
                vec![self::ip(ip)],
                [0x0e, 0, 0, 0, 0, last],
                false,
            )
        };
        let one = guard_table("node-a", &vec![pod("veth0a", 5, "10.244.1.20", 1)].into());
        let two = guard_table(
            "node-a",
            &vec![
                pod("veth0a", 5, "10.244.1.20", 1),
                pod("veth0b", 6, "10.244.1.30", 2),
            ]
            .into(),
        );
        writer.replace_table(&one).unwrap();
        let before = writer
            .table_image(TableFamily::Bridge, TABLE, None)
            .unwrap()
            .unwrap();
        let delta = ruleset::diff(&one, &two);
        writer
            .commit(&[Change::Delta {
                family: TableFamily::Bridge,
                table: TABLE,
                delta: &delta,
            }])
            .unwrap();
        let named = Named::by(&delta);
        let reused = writer
            .table_image(TableFamily::Bridge, TABLE, Some((&before, &named)))
            .unwrap()
            .unwrap();
        let full = writer
            .table_image(TableFamily::Bridge, TABLE, None)
            .unwrap()
            .unwrap();
        assert_eq!(reused, full, "the guard's delta");
        assert_ne!(before, full, "the guard changed");
    });
}
