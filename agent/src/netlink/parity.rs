//! The batch the writer sends for a whole table, next to the one `nft -f` sends for the same
//! table rendered as text (as `nft --debug=mnl -c` prints it): after the writer's two leading
//! table messages they must be the same messages with the same attributes, byte for byte,
//! including the user data that no listing shows. Only header flags and sequence numbers may
//! differ (the writer asks for acknowledgements), and the order of a message's top-level
//! attributes, which the kernel does not look at.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use ruleset::epoch::{CtMarkBits, Epoch};
use ruleset::guard::{guard_table, Guard, GuardedPod};
use ruleset::ir::{IfName, Table};
use ruleset::Compiler;

use super::{plan, sys};

/// One message as a list of lines: type, generic header, then each attribute with its data.
type Tokens = Vec<String>;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// What `nft` sends to check `text`, in a network namespace of its own.
fn nft_batch(text: &str) -> Vec<Tokens> {
    let mut child = Command::new("unshare")
        .args(["--net", "nft", "--debug=mnl", "-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unshare nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to nft");
    let out = child.wait_with_output().expect("wait for nft");
    assert!(
        out.status.success(),
        "nft -c refused the rendered table:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut messages: Vec<Tokens> = Vec::new();
    for raw in dump.lines() {
        let line = strip_colours(raw);
        let cells: Vec<&str> = line
            .split('|')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        if line.contains("type | flags") {
            let kind: u16 = cells.first().and_then(|c| c.parse().ok()).expect("type");
            messages.push(vec![format!("type {kind}")]);
        } else if let Some(message) = messages.last_mut() {
            if line.contains("extra header") || line.contains("|      data      |") {
                message.push(format!("bytes {}", cells.first().expect("bytes")));
            } else if line.contains("|len |flags| type|") {
                let len: u16 = cells[0].parse().expect("attribute length");
                let kind: u16 = cells[2].parse().expect("attribute type");
                let nested = cells[1].contains('N');
                message.push(format!("attr {kind} len {len} nested {nested}"));
            }
        }
    }
    // The cache requests come first; the batch starts at NFNL_MSG_BATCH_BEGIN (16).
    let begin = messages
        .iter()
        .position(|m| m[0] == "type 16")
        .expect("a batch");
    messages.split_off(begin + 1)
}

fn strip_colours(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The writer's batch, tokenised like `nft`'s dump, without batch start and end.
fn writer_batch(bytes: &[u8]) -> Vec<Tokens> {
    let mut messages = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let (message, tail) = rest.split_at(len);
        rest = &tail[(len.next_multiple_of(4) - len).min(tail.len())..];
        if kind == 16 || kind == 17 {
            continue;
        }
        let mut tokens = vec![format!("type {kind}"), hex(&message[16..20])];
        attributes(&message[20..], &mut tokens);
        messages.push(tokens);
    }
    messages
}

fn attributes(mut data: &[u8], tokens: &mut Tokens) {
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]);
        let kind = u16::from_ne_bytes([data[2], data[3]]);
        let nested = kind & 0x8000 != 0;
        tokens.push(format!("attr {} len {len} nested {nested}", kind & 0x3fff));
        let end = usize::from(len).next_multiple_of(4).min(data.len());
        let payload = &data[4..end];
        if nested {
            attributes(payload, tokens);
        } else {
            for row in payload.chunks(4) {
                tokens.push(hex(row));
            }
        }
        data = &data[end..];
    }
}

fn hex(bytes: &[u8]) -> String {
    let cells: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("bytes {}", cells.join(" "))
}

/// Top-level attributes (each with what follows it up to the next one at its level) sorted
/// by type; nested lists keep their order.
fn canonical(message: &Tokens) -> Tokens {
    let mut out = message[..2.min(message.len())].to_vec();
    let mut groups: Vec<Tokens> = Vec::new();
    let mut rest = &message[out.len()..];
    while let Some(first) = rest.first() {
        let span = span(rest);
        groups.push(rest[..span].to_vec());
        rest = &rest[span..];
        let _ = first;
    }
    groups.sort_by_key(|g| {
        g.first()
            .and_then(|t| t.split(' ').nth(1))
            .and_then(|n| n.parse::<u16>().ok())
    });
    out.extend(groups.into_iter().flatten());
    out
}

/// How many tokens the attribute at the start of `tokens` takes, children and data included.
fn span(tokens: &[String]) -> usize {
    let Some(head) = tokens.first() else {
        return 0;
    };
    let parts: Vec<&str> = head.split(' ').collect();
    let len: usize = parts.get(3).and_then(|l| l.parse().ok()).unwrap_or(4);
    let nested = parts.get(5) == Some(&"true");
    let mut bytes = 4;
    let mut taken = 1;
    let payload_end = len.next_multiple_of(4);
    while bytes < payload_end && taken < tokens.len() {
        if nested {
            let child = span(&tokens[taken..]);
            let child_len: usize = tokens[taken]
                .split(' ')
                .nth(3)
                .and_then(|l| l.parse().ok())
                .unwrap_or(4);
            bytes += child_len.next_multiple_of(4);
            taken += child;
        } else {
            bytes += 4;
            taken += 1;
        }
    }
    taken
}

#[test]
fn the_batch_for_every_example_is_the_one_nft_sends() {
    if !is_root() {
        eprintln!("\n!!!!! SKIPPED the_batch_for_every_example_is_the_one_nft_sends: nft -c needs root !!!!!\n");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5);
    let mut failures = Vec::new();
    for file in files {
        let cluster = crate::manifests::load(&file).expect("example loads");
        for node in ["node-a", "node-b"] {
            let table = Compiler::new(cluster.clone(), node).table().clone();
            failures.extend(differences(&table, &format!("{} {node}", file.display())));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The other shapes the agent writes: the isolation of unprogrammed addresses, and the
/// anti-spoofing guard in the bridge family (its `meta protocol`, `ifname` keys, inverted
/// lookups and jumps).
#[test]
fn the_batch_for_guard_and_isolation_tables_is_the_one_nft_sends() {
    if !is_root() {
        eprintln!("\n!!!!! SKIPPED the_batch_for_guard_and_isolation_tables_is_the_one_nft_sends: nft -c needs root !!!!!\n");
        return;
    }
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/examples/dual-stack.yaml");
    let cluster = crate::manifests::load(&file).expect("example loads");
    let options = ruleset::Options {
        isolate_unprogrammed: vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ],
        // Another bit field, an epoch past the first, and the stamp without the fast path.
        epoch: Epoch::first(CtMarkBits::new(0x0000_ff00).unwrap())
            .next()
            .next()
            .without_fast_path(),
    };
    let isolating = Compiler::with_options(cluster.clone(), "node-a", options);
    assert!(isolating.table().sets.contains_key("known6"));
    let mut failures = differences(isolating.table(), "isolation");
    let mut fast = isolating.table().clone();
    ruleset::epoch::apply(&mut fast, isolating.options().epoch.with_fast_path());
    failures.extend(differences(&fast, "fast path in another bit field"));
    let pods: Vec<GuardedPod> = isolating
        .local_pods()
        .enumerate()
        .map(|(i, pod)| GuardedPod {
            veth: IfName::new(&format!("veth{i:08x}")).unwrap(),
            index: 100 + i as u32,
            ips: pod.ips.clone(),
            mac: [2, 0, 0, 0, 0, i as u8],
            // One whose link-layer address another veth's pod has too: no binding.
            mac_shared: i == 1,
            egress_isolated: i % 2 == 0,
        })
        .collect();
    assert!(!pods.is_empty());
    let guard = Guard {
        pods,
        ports: vec![IfName::new("vethffffffff").unwrap()],
        elsewhere: vec![IfName::new("vethdocker0").unwrap()],
        contested: vec!["10.244.1.99".parse().unwrap(), "fd00::99".parse().unwrap()],
        bridges: vec![
            ruleset::guard::PodBridge {
                name: IfName::new("cni0").unwrap(),
                nets: vec![
                    "10.244.1.1/24".parse().unwrap(),
                    "fd00::1/64".parse().unwrap(),
                ],
            },
            ruleset::guard::PodBridge {
                name: IfName::new("cbr0").unwrap(),
                nets: vec!["10.244.9.1/24".parse().unwrap()],
            },
        ],
    };
    failures.extend(differences(&guard_table("node-a", &guard), "guard"));
    let with_veths = ruleset::guard::with_veths(isolating.table(), &guard);
    assert!(!with_veths.sets[ruleset::guard::INPUT_VETHS]
        .elements
        .is_empty());
    failures.extend(differences(&with_veths, "policy table with veths"));
    failures.extend(differences(
        &guard_table("node-a", &Guard::default()),
        "empty guard",
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Where the writer's batch for `table` differs from nft's.
fn differences(table: &Table, label: &str) -> Vec<String> {
    let messages = plan::replace(table).expect("plan");
    let encoded = sys::encode(messages.iter()).expect("encode");
    let ours = writer_batch(&encoded.bytes);
    let theirs = nft_batch(&ruleset::render(table));
    assert_eq!(ours.len(), theirs.len() + 2, "{label}: message count");
    let mut failures = Vec::new();
    for ((mine, nfts), message) in ours[2..].iter().zip(&theirs).zip(&messages[2..]) {
        if canonical(mine) != canonical(nfts) {
            failures.push(format!(
                "{label}: {}:\nwriter: {:#?}\nnft:    {:#?}",
                message.object,
                canonical(mine),
                canonical(nfts)
            ));
        }
    }
    failures
}
