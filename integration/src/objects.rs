//! The compiler's model written back as Kubernetes API objects (JSON), so a test can serve a
//! cluster it also compiles directly. `agent::convert` reads each one back to the same value.

use ruleset::model::{LabelSelector, Namespace, NetworkPolicy, Pod, PolicyRule, PortRef};
use ruleset::Cluster;
use serde_json::{json, Map, Value};

pub fn namespace(ns: &Namespace) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns.name, "labels": ns.labels},
    })
}

pub fn pod(pod: &Pod) -> Value {
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            let mut port = Map::new();
            if let Some(name) = &p.name {
                port.insert("name".into(), json!(name));
            }
            port.insert("protocol".into(), json!(p.protocol));
            port.insert("containerPort".into(), json!(p.port));
            Value::Object(port)
        })
        .collect();
    let mut spec = json!({
        "containers": [{"name": "main", "image": "example", "ports": ports}],
        "hostNetwork": pod.host_network,
    });
    if let Some(node) = &pod.node {
        spec["nodeName"] = json!(node);
    }
    let mut status = json!({
        "podIPs": pod.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
    });
    if let Some(ip) = pod.ips.first() {
        status["podIP"] = json!(ip.to_string());
    }
    if let Some(phase) = &pod.phase {
        status["phase"] = json!(phase);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
        "spec": spec,
        "status": status,
    })
}

pub fn network_policy(policy: &NetworkPolicy) -> Value {
    let rules = |rules: &[PolicyRule], peers: &str| -> Vec<Value> {
        rules
            .iter()
            .map(|rule| {
                let peer_list: Vec<Value> = rule
                    .peers
                    .iter()
                    .map(|peer| {
                        let mut out = Map::new();
                        if let Some(s) = &peer.pod_selector {
                            out.insert("podSelector".into(), selector(s));
                        }
                        if let Some(s) = &peer.namespace_selector {
                            out.insert("namespaceSelector".into(), selector(s));
                        }
                        if let Some(block) = &peer.ip_block {
                            out.insert(
                                "ipBlock".into(),
                                json!({"cidr": block.cidr, "except": block.except}),
                            );
                        }
                        Value::Object(out)
                    })
                    .collect();
                let ports: Vec<Value> = rule
                    .ports
                    .iter()
                    .map(|p| {
                        let mut out = Map::new();
                        if let Some(protocol) = &p.protocol {
                            out.insert("protocol".into(), json!(protocol));
                        }
                        match &p.port {
                            Some(PortRef::Number(n)) => {
                                out.insert("port".into(), json!(n));
                            }
                            Some(PortRef::Name(name)) => {
                                out.insert("port".into(), json!(name));
                            }
                            None => {}
                        }
                        if let Some(end) = p.end_port {
                            out.insert("endPort".into(), json!(end));
                        }
                        Value::Object(out)
                    })
                    .collect();
                json!({peers: peer_list, "ports": ports})
            })
            .collect()
    };
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": policy.name, "namespace": policy.namespace},
        "spec": {
            "podSelector": selector(&policy.pod_selector),
            "policyTypes": policy.policy_types,
            "ingress": rules(&policy.ingress, "from"),
            "egress": rules(&policy.egress, "to"),
        },
    })
}

fn selector(s: &LabelSelector) -> Value {
    json!({
        "matchLabels": s.match_labels,
        "matchExpressions": s.match_expressions.iter().map(|e| json!({
            "key": e.key, "operator": e.operator, "values": e.values,
        })).collect::<Vec<_>>(),
    })
}

/// Every object of a cluster index: its namespaces (with their labels), pods and policies.
pub fn all(cluster: &Cluster) -> impl Iterator<Item = Value> + '_ {
    let namespaces = cluster.namespace_names().map(|name| {
        namespace(&Namespace {
            name: name.to_string(),
            labels: cluster.namespace_labels(name).clone(),
        })
    });
    namespaces
        .chain(cluster.pods().map(pod))
        .chain(cluster.policies().map(network_policy))
}
