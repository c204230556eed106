//! Bad input never opens traffic. A policy with unenforceable peers and ports mixed among valid
//! ones must allow exactly what it allows with those entries taken out, where a rule left with
//! no peers or no ports by that allows nothing (it never widens to "everyone"). Compiling never
//! panics, and every diagnostic names the policy and a `spec.` field.
//!
//! 256 cases, each checking 20 connections (4 sources x 5 destination ports) into two pods.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use proptest::prelude::*;
use ruleset::ir::Protocol;
use ruleset::model::{
    ContainerPort, IpBlock, LabelSelector, NetworkPolicy, Peer, Pod, PolicyPort, PolicyRule,
    PortRef, SelectorRequirement,
};
use ruleset::{Cluster, Compiler, Endpoint, Tracer};

#[derive(Clone, Debug)]
enum Entry<T> {
    Good(T),
    Bad(T),
}

fn selector(key: &str, value: &str) -> LabelSelector {
    LabelSelector {
        match_labels: [(key.to_string(), value.to_string())].into(),
        ..LabelSelector::default()
    }
}

fn good_peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        Just(Peer {
            pod_selector: Some(selector("app", "client")),
            ..Peer::default()
        }),
        Just(Peer {
            namespace_selector: Some(LabelSelector::default()),
            ..Peer::default()
        }),
        Just(Peer {
            ip_block: Some(IpBlock {
                cidr: "10.0.0.0/24".into(),
                except: vec!["10.0.0.128/25".into()]
            }),
            ..Peer::default()
        }),
    ]
}

fn bad_peer() -> impl Strategy<Value = Peer> {
    let block = |cidr: &str, except: &[&str]| Peer {
        ip_block: Some(IpBlock {
            cidr: cidr.into(),
            except: except.iter().map(|e| e.to_string()).collect(),
        }),
        ..Peer::default()
    };
    prop_oneof![
        Just(block("10.0.0.0/33", &[])),
        Just(block("not-a-cidr", &[])),
        Just(block("10.0.0.0/24", &["10.9.0.0/16"])),
        Just(block("10.0.0.0/24", &["10.0.0.0/24"])),
        Just(block("10.0.0.0/24", &["fd00::/64"])),
        Just(Peer::default()),
        Just(Peer {
            pod_selector: Some(selector("app", "client")),
            ip_block: Some(IpBlock {
                cidr: "0.0.0.0/0".into(),
                except: vec![]
            }),
            ..Peer::default()
        }),
        "[A-Za-z]{0,8}"
            .prop_filter("not an operator", |op| ![
                "In",
                "NotIn",
                "Exists",
                "DoesNotExist"
            ]
            .contains(&op.as_str()))
            .prop_map(|op| Peer {
                pod_selector: Some(LabelSelector {
                    match_expressions: vec![SelectorRequirement {
                        key: "app".into(),
                        operator: op,
                        values: vec!["client".into()]
                    }],
                    ..LabelSelector::default()
                }),
                ..Peer::default()
            }),
    ]
}

fn good_port() -> impl Strategy<Value = PolicyPort> {
    let port = |protocol: Option<&str>, port: Option<PortRef>, end_port: Option<i32>| PolicyPort {
        protocol: protocol.map(String::from),
        port,
        end_port,
    };
    prop_oneof![
        Just(port(None, Some(PortRef::Number(80)), None)),
        Just(port(Some("UDP"), Some(PortRef::Number(53)), None)),
        Just(port(Some("TCP"), Some(PortRef::Number(8000)), Some(8100))),
        Just(port(None, Some(PortRef::Name("http".into())), None)),
    ]
}

fn bad_port() -> impl Strategy<Value = PolicyPort> {
    prop_oneof![
        "[a-z]{1,6}"
            .prop_filter("not a protocol", |p| !["TCP", "UDP", "SCTP"]
                .contains(&p.as_str()))
            .prop_map(|p| PolicyPort {
                protocol: Some(p),
                port: Some(PortRef::Number(80)),
                end_port: None,
            }),
        (any::<i32>().prop_filter("not a port", |n| !(1..=65535).contains(n))).prop_map(|n| {
            PolicyPort {
                protocol: None,
                port: Some(PortRef::Number(n)),
                end_port: None,
            }
        }),
        (2..65535i32).prop_map(|n| PolicyPort {
            protocol: None,
            port: Some(PortRef::Number(n)),
            end_port: Some(n - 1)
        }),
        Just(PolicyPort {
            protocol: None,
            port: Some(PortRef::Name("http".into())),
            end_port: Some(90)
        }),
        Just(PolicyPort {
            protocol: None,
            port: None,
            end_port: Some(90)
        }),
        Just(PolicyPort {
            protocol: None,
            port: Some(PortRef::Name("Not_A_Name".into())),
            end_port: None
        }),
    ]
}

fn entries<T: Clone + std::fmt::Debug + 'static>(
    good: impl Strategy<Value = T> + 'static,
    bad: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Vec<Entry<T>>> {
    prop::collection::vec(
        prop_oneof![good.prop_map(Entry::Good), bad.prop_map(Entry::Bad)],
        0..3,
    )
}

/// One ingress rule as generated: peers and ports, each entry good or bad.
type WrittenRule = (Vec<Entry<Peer>>, Vec<Entry<PolicyPort>>);

fn rules() -> impl Strategy<Value = Vec<WrittenRule>> {
    prop::collection::vec(
        (
            entries(good_peer(), bad_peer()),
            entries(good_port(), bad_port()),
        ),
        0..3,
    )
}

/// The policy as written (`with_bad`) or with the bad entries taken out; a rule whose list
/// empties that way is dropped, since it allows nothing.
fn policy(rules: &[WrittenRule], with_bad: bool) -> NetworkPolicy {
    fn keep<T: Clone>(list: &[Entry<T>], with_bad: bool) -> Option<Vec<T>> {
        let kept: Vec<T> = list
            .iter()
            .filter_map(|e| match e {
                Entry::Good(v) => Some(v.clone()),
                Entry::Bad(v) => with_bad.then(|| v.clone()),
            })
            .collect();
        (list.is_empty() || !kept.is_empty()).then_some(kept)
    }
    let ingress = rules
        .iter()
        .filter_map(|(peers, ports)| {
            Some(PolicyRule {
                peers: keep(peers, with_bad)?,
                ports: keep(ports, with_bad)?,
            })
        })
        .collect();
    NetworkPolicy {
        namespace: "a".into(),
        name: "p".into(),
        pod_selector: selector("app", "server"),
        ingress,
        ..NetworkPolicy::default()
    }
}

fn pod(name: &str, ip: &str, app: &str, http: i32) -> Pod {
    Pod {
        namespace: "a".into(),
        name: name.into(),
        node: Some("n1".into()),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: vec![ip.parse().unwrap()],
        phase: Some("Running".into()),
        ports: vec![ContainerPort {
            name: Some("http".into()),
            protocol: "TCP".into(),
            port: http,
        }],
        ..Pod::default()
    }
}

fn verdicts(policy: NetworkPolicy) -> Vec<bool> {
    let pods = vec![
        pod("server1", "10.0.0.1", "server", 8080),
        pod("server2", "10.0.1.1", "server", 80),
        pod("client", "10.0.0.200", "client", 80),
        pod("other", "10.0.0.7", "other", 80),
    ];
    let mut tracer = Tracer::new(Cluster::from_objects(vec![], pods, vec![policy]));
    let sources = ["a/client", "a/other", "10.0.0.9", "10.0.0.130"];
    let ports = [
        (Protocol::Tcp, 80),
        (Protocol::Udp, 53),
        (Protocol::Tcp, 8050),
        (Protocol::Tcp, 8080),
        (Protocol::Sctp, 80),
    ];
    let mut out = Vec::new();
    for to in ["a/server1", "a/server2"] {
        for from in sources {
            for (protocol, port) in ports {
                let from: Endpoint = from.parse().unwrap();
                let to: Endpoint = to.parse().unwrap();
                out.push(tracer.trace(&from, &to, protocol, port).unwrap().allowed);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn bad_entries_allow_nothing(rules in rules()) {
        let written = policy(&rules, true);
        let mut diagnostics = Vec::new();
        ruleset::policy::resolve(&written, &mut diagnostics);
        let bad = rules.iter().flat_map(|(peers, ports)| {
            peers.iter().map(|e| matches!(e, Entry::Bad(_)))
                .chain(ports.iter().map(|e| matches!(e, Entry::Bad(_))))
        }).filter(|b| *b).count();
        prop_assert_eq!(diagnostics.len(), bad, "one diagnostic per bad entry: {:?}", diagnostics);
        for d in &diagnostics {
            prop_assert_eq!(&d.policy, "a/p");
            prop_assert!(d.field.starts_with("spec.ingress["), "{}", d);
        }
        prop_assert_eq!(verdicts(written.clone()), verdicts(policy(&rules, false)));
        // Rendering never fails either.
        let cluster = Cluster::from_objects(vec![], vec![pod("s", "10.0.0.1", "server", 80)], vec![written]);
        let text = ruleset::render(Compiler::new(cluster, "n1").table());
        let header = "table inet nftpol {";
        prop_assert!(text.starts_with(header), "{}", text);
    }
}
