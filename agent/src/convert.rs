//! Kubernetes API objects to the compiler's model, keeping only what NetworkPolicy needs.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use ruleset::model::{
    ContainerPort, IpBlock, LabelSelector, Namespace, NetworkPolicy, Peer, Pod, PolicyPort,
    PolicyRule, PortRef, SelectorRequirement,
};

/// A namespaced object's namespace: absent or empty is `default`, as kubectl reads a manifest.
pub fn namespace_of(namespace: Option<&str>) -> String {
    namespace
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default")
        .to_string()
}

pub fn namespace(ns: core::Namespace) -> Namespace {
    Namespace {
        name: ns.metadata.name.unwrap_or_default(),
        labels: ns.metadata.labels.unwrap_or_default().into(),
    }
}

pub fn pod(pod: core::Pod) -> Pod {
    let namespace = namespace_of(pod.metadata.namespace.as_deref());
    let name = pod.metadata.name.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    let spec = pod.spec.unwrap_or_default();
    let mut written: Vec<String> = status
        .pod_ips
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.ip)
        .collect();
    if written.is_empty() {
        written.extend(status.pod_ip);
    }
    let ips = written
        .iter()
        .filter_map(|ip| match ip.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::warn!(pod = %format!("{namespace}/{name}"), ip = %ip, "status.podIPs: not an IP address; ignored");
                None
            }
        })
        .collect();
    let ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| ContainerPort {
            name: p.name.clone(),
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            port: p.container_port,
        })
        .collect();
    Pod {
        namespace,
        name,
        node: spec.node_name,
        labels: pod.metadata.labels.unwrap_or_default().into(),
        ips,
        host_network: spec.host_network.unwrap_or(false),
        phase: status.phase,
        ports,
    }
}

pub fn network_policy(policy: net::NetworkPolicy) -> NetworkPolicy {
    let spec = policy.spec.unwrap_or_default();
    NetworkPolicy {
        namespace: namespace_of(policy.metadata.namespace.as_deref()),
        name: policy.metadata.name.unwrap_or_default(),
        uid: policy.metadata.uid,
        pod_selector: spec.pod_selector.map(selector).unwrap_or_default(),
        policy_types: spec.policy_types.unwrap_or_default(),
        ingress: spec
            .ingress
            .unwrap_or_default()
            .into_iter()
            .map(|r| rule(r.from, r.ports))
            .collect(),
        egress: spec
            .egress
            .unwrap_or_default()
            .into_iter()
            .map(|r| rule(r.to, r.ports))
            .collect(),
    }
}

fn rule(
    peers: Option<Vec<net::NetworkPolicyPeer>>,
    ports: Option<Vec<net::NetworkPolicyPort>>,
) -> PolicyRule {
    PolicyRule {
        peers: peers
            .unwrap_or_default()
            .into_iter()
            .map(|p| Peer {
                pod_selector: p.pod_selector.map(selector),
                namespace_selector: p.namespace_selector.map(selector),
                ip_block: p.ip_block.map(|b| IpBlock {
                    cidr: b.cidr,
                    except: b.except.unwrap_or_default(),
                }),
            })
            .collect(),
        ports: ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| PolicyPort {
                protocol: p.protocol,
                port: p.port.map(|port| match port {
                    IntOrString::Int(n) => PortRef::Number(n),
                    IntOrString::String(s) => PortRef::Name(s),
                }),
                end_port: p.end_port,
            })
            .collect(),
    }
}

fn selector(s: meta::LabelSelector) -> LabelSelector {
    LabelSelector {
        match_labels: s.match_labels.unwrap_or_default().into(),
        match_expressions: s
            .match_expressions
            .unwrap_or_default()
            .into_iter()
            .map(|e| SelectorRequirement {
                key: e.key,
                operator: e.operator,
                values: e.values.unwrap_or_default(),
            })
            .collect(),
    }
}
