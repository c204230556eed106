//! Synthetic clusters of realistic shape for benchmarks: many namespaces, each with a default
//! deny, DNS egress, same-namespace traffic, cross-namespace traffic by label, and either an
//! ipBlock or a named port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ruleset::model::{
    ContainerPort, IpBlock, LabelSelector, Labels, Namespace, NetworkPolicy, Peer, Pod, PolicyPort,
    PolicyRule, PortRef,
};
use ruleset::Cluster;

/// Size of a synthetic cluster.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub pods: usize,
    pub nodes: usize,
    pub namespaces: usize,
    /// Policies per namespace: 1 to 5 of the shapes above, in that order.
    pub policies_per_namespace: usize,
    /// Pods placed on [`LOCAL_NODE`].
    pub local_pods: usize,
}

/// The target: 150,000 pods, 5,000 nodes, 2,000 namespaces, 10,000 policies, 110 pods
/// on the node being compiled.
pub const LARGE: Shape = Shape {
    pods: 150_000,
    nodes: 5_000,
    namespaces: 2_000,
    policies_per_namespace: 5,
    local_pods: 110,
};

pub const LOCAL_NODE: &str = "node-0";

const APPS: [&str; 5] = ["frontend", "api", "worker", "db", "cache"];

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..LabelSelector::default()
    }
}

fn namespace_name(i: usize) -> String {
    format!("ns-{i:04}")
}

/// The pod at `index`, with labels chosen by `app`.
pub fn pod(shape: &Shape, index: usize, app: &str) -> Pod {
    let namespace = namespace_name(index % shape.namespaces);
    // Every (pods / local_pods)-th pod runs on the local node, spread over namespaces.
    let stride = (shape.pods / shape.local_pods.max(1)).max(1);
    let node = if index % stride == 0 && index / stride < shape.local_pods {
        LOCAL_NODE.to_string()
    } else {
        format!("node-{}", 1 + index % (shape.nodes - 1).max(1))
    };
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + index as u32);
    let mut ips = vec![IpAddr::V4(v4)];
    if index % 10 == 0 {
        ips.push(IpAddr::V6(Ipv6Addr::from(
            0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + index as u128,
        )));
    }
    let mut ports = vec![
        ContainerPort {
            name: Some("http".into()),
            protocol: "TCP".into(),
            port: 8080,
        },
        ContainerPort {
            name: Some("metrics".into()),
            protocol: "TCP".into(),
            port: 9090,
        },
    ];
    if app == "db" {
        ports.push(ContainerPort {
            name: Some("pg".into()),
            protocol: "TCP".into(),
            port: 5432 + (index % 3) as i32,
        });
    }
    Pod {
        name: format!("{app}-{index}"),
        namespace,
        node: Some(node),
        labels: labels(&[
            ("app", app.to_string()),
            ("pod-template-hash", format!("{:x}", index % 7919)),
        ]),
        ips,
        host_network: false,
        phase: Some("Running".into()),
        ports,
    }
}

pub fn app_of(index: usize) -> &'static str {
    APPS[(index / 7) % APPS.len()]
}

fn policies(shape: &Shape, i: usize) -> Vec<NetworkPolicy> {
    let namespace = namespace_name(i);
    let make = |name: &str, select: LabelSelector, types: &[&str], ingress, egress| NetworkPolicy {
        namespace: namespace.clone(),
        name: name.into(),
        uid: None,
        pod_selector: select,
        policy_types: types.iter().map(|t| t.to_string()).collect(),
        ingress,
        egress,
    };
    let tcp = |port: PortRef| PolicyPort {
        protocol: Some("TCP".into()),
        port: Some(port),
        end_port: None,
    };
    let all = [
        make(
            "default-deny",
            selector(&[]),
            &["Ingress", "Egress"],
            vec![],
            vec![],
        ),
        make(
            "allow-dns",
            selector(&[]),
            &["Egress"],
            vec![],
            vec![PolicyRule {
                peers: vec![Peer {
                    namespace_selector: Some(selector(&[(
                        "kubernetes.io/metadata.name",
                        "kube-system",
                    )])),
                    pod_selector: Some(selector(&[("k8s-app", "kube-dns")])),
                    ip_block: None,
                }],
                ports: ["UDP", "TCP"]
                    .iter()
                    .map(|p| PolicyPort {
                        protocol: Some(p.to_string()),
                        port: Some(PortRef::Number(53)),
                        end_port: None,
                    })
                    .collect(),
            }],
        ),
        make(
            "same-namespace",
            selector(&[]),
            &["Ingress", "Egress"],
            vec![PolicyRule {
                peers: vec![Peer {
                    pod_selector: Some(selector(&[])),
                    ..Peer::default()
                }],
                ports: vec![],
            }],
            vec![PolicyRule {
                peers: vec![Peer {
                    pod_selector: Some(selector(&[])),
                    ..Peer::default()
                }],
                ports: vec![],
            }],
        ),
        make(
            "api-from-team-frontends",
            selector(&[("app", "api")]),
            &["Ingress"],
            vec![PolicyRule {
                peers: vec![Peer {
                    namespace_selector: Some(selector(&[("team", &format!("team-{}", i % 50))])),
                    pod_selector: Some(selector(&[("app", "frontend")])),
                    ip_block: None,
                }],
                ports: vec![tcp(PortRef::Number(8080))],
            }],
            vec![],
        ),
        if i % 2 == 0 {
            make(
                "https-from-corporate",
                selector(&[("app", "frontend")]),
                &["Ingress"],
                vec![PolicyRule {
                    peers: vec![Peer {
                        ip_block: Some(IpBlock {
                            cidr: "10.0.0.0/8".into(),
                            except: vec!["10.64.0.0/10".into(), "10.3.0.0/16".into()],
                        }),
                        ..Peer::default()
                    }],
                    ports: vec![tcp(PortRef::Number(443))],
                }],
                vec![],
            )
        } else {
            make(
                "workers-to-prod-db",
                selector(&[("app", "worker")]),
                &["Egress"],
                vec![],
                vec![PolicyRule {
                    peers: vec![Peer {
                        namespace_selector: Some(selector(&[("env", "prod")])),
                        pod_selector: Some(selector(&[("app", "db")])),
                        ip_block: None,
                    }],
                    ports: vec![tcp(PortRef::Name("pg".into()))],
                }],
            )
        },
    ];
    all.into_iter().take(shape.policies_per_namespace).collect()
}

/// Builds the cluster; deterministic for a shape.
pub fn cluster(shape: &Shape) -> Cluster {
    let envs = ["prod", "staging", "dev"];
    let namespaces = (0..shape.namespaces).map(|i| Namespace {
        name: namespace_name(i),
        labels: labels(&[
            ("team", format!("team-{}", i % 50)),
            ("env", envs[i % envs.len()].to_string()),
        ]),
    });
    let dns = (0..2).map(|i| Pod {
        namespace: "kube-system".into(),
        name: format!("coredns-{i}"),
        node: Some(format!("node-{}", i + 1)),
        labels: labels(&[("k8s-app", "kube-dns".to_string())]),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10 + i as u8))],
        phase: Some("Running".into()),
        ..Pod::default()
    });
    let pods = (0..shape.pods).map(|i| pod(shape, i, app_of(i))).chain(dns);
    let policies = (0..shape.namespaces).flat_map(|i| policies(shape, i));
    Cluster::from_objects(namespaces, pods, policies)
}
