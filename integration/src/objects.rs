//! The compiler's model written back as Kubernetes API objects (JSON), so a test can serve a
//! cluster it also compiles directly. `agent::convert` reads each one back to the same value.
//! [`changes`] turns an edit of a cluster into the stand-in's puts and deletes.

#![allow(
    clippy::expect_used,
    reason = "test support: a failure fails the test by panicking"
)]

use std::collections::{HashMap, HashSet};

use crate::apiserver::{ApiServer, Resource};
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
    let mut metadata = json!({"name": policy.name, "namespace": policy.namespace});
    if let Some(uid) = &policy.uid {
        metadata["uid"] = json!(uid);
    }
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
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

/// One write to the API stand-in.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Create or replace this object.
    Put(Value),
    /// Delete the object of this resource, namespace (empty for a Namespace) and name.
    Delete(Resource, String, String),
}

impl Write {
    pub fn to(&self, server: &ApiServer) {
        match self {
            Write::Put(object) => {
                server
                    .put(object.clone())
                    .expect("a kind the stand-in serves");
            }
            Write::Delete(resource, namespace, name) => {
                assert!(
                    server.delete(*resource, namespace, name),
                    "the stand-in holds no {resource:?} {namespace}/{name}"
                );
            }
        }
    }
}

/// The writes that take a stand-in holding `old` to `new`: a put of every object that is new
/// or different, then a delete of every object gone (policies, then pods, then namespaces).
pub fn changes(old: &Cluster, new: &Cluster) -> Vec<Write> {
    let key = |object: &Value| {
        let text = |field: &str| {
            object["metadata"][field]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let resource = Resource::of(object).expect("a kind the stand-in serves");
        (resource, text("namespace"), text("name"))
    };
    let before: HashMap<_, Value> = all(old).map(|o| (key(&o), o)).collect();
    let after: Vec<Value> = all(new).collect();
    let kept: HashSet<_> = after.iter().map(key).collect();
    let mut writes: Vec<Write> = after
        .into_iter()
        .filter(|o| before.get(&key(o)) != Some(o))
        .map(Write::Put)
        .collect();
    let mut gone: Vec<Write> = all(old)
        .map(|o| key(&o))
        .filter(|k| !kept.contains(k))
        .map(|(resource, namespace, name)| Write::Delete(resource, namespace, name))
        .collect();
    gone.reverse();
    writes.extend(gone);
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruleset::model::Labels;

    fn pod(namespace: &str, name: &str, app: &str) -> Pod {
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            node: Some("node-a".into()),
            labels: Labels::from([("app".to_string(), app.to_string())]),
            ips: vec!["10.244.1.10".parse().unwrap()],
            host_network: false,
            phase: Some("Running".into()),
            ports: Vec::new(),
        }
    }

    fn policy(namespace: &str, name: &str) -> NetworkPolicy {
        NetworkPolicy {
            namespace: namespace.into(),
            name: name.into(),
            ..NetworkPolicy::default()
        }
    }

    fn namespace(name: &str, team: &str) -> Namespace {
        Namespace {
            name: name.into(),
            labels: Labels::from([("team".to_string(), team.to_string())]),
        }
    }

    /// The objects a stand-in holds after `writes`, starting from those of `cluster`.
    fn replay(cluster: &Cluster, writes: &[Write]) -> HashMap<(String, String, String), Value> {
        let key = |o: &Value| {
            let text = |f: &str| o["metadata"][f].as_str().unwrap_or_default().to_string();
            (
                o["kind"].as_str().unwrap().to_string(),
                text("namespace"),
                text("name"),
            )
        };
        let mut objects: HashMap<_, _> = all(cluster).map(|o| (key(&o), o)).collect();
        for write in writes {
            match write {
                Write::Put(o) => {
                    objects.insert(key(o), o.clone());
                }
                Write::Delete(resource, namespace, name) => {
                    let kind = match resource {
                        Resource::Pods => "Pod",
                        Resource::Namespaces => "Namespace",
                        Resource::NetworkPolicies => "NetworkPolicy",
                    };
                    let gone = objects.remove(&(kind.into(), namespace.clone(), name.clone()));
                    assert!(gone.is_some(), "{write:?} deletes nothing");
                }
            }
        }
        objects
    }

    #[test]
    fn changes_write_exactly_what_differs() {
        let old = Cluster::from_objects(
            [namespace("shop", "a"), namespace("ops", "b")],
            [
                pod("shop", "web", "web"),
                pod("shop", "db", "db"),
                pod("ops", "mon", "mon"),
            ],
            [policy("shop", "deny"), policy("ops", "deny")],
        );
        let new = Cluster::from_objects(
            [namespace("shop", "c"), namespace("ops", "b")],
            [
                pod("shop", "web", "web"),
                pod("shop", "db", "cache"),
                pod("shop", "new", "x"),
            ],
            [policy("shop", "deny"), policy("shop", "allow")],
        );
        let writes = changes(&old, &new);
        let want: HashMap<_, _> = replay(&new, &[]);
        assert_eq!(replay(&old, &writes), want);
        // Namespace shop relabelled, pod db relabelled, pod new, policy allow; pod mon and
        // policy ops/deny deleted (namespace ops stays: the index keeps it).
        let summary: Vec<String> = writes
            .iter()
            .map(|w| match w {
                Write::Put(o) => format!("put {} {}", o["kind"], o["metadata"]["name"]),
                Write::Delete(r, ns, name) => format!("delete {r:?} {ns}/{name}"),
            })
            .collect();
        assert_eq!(
            summary,
            [
                r#"put "Namespace" "shop""#,
                r#"put "Pod" "db""#,
                r#"put "Pod" "new""#,
                r#"put "NetworkPolicy" "allow""#,
                "delete NetworkPolicies ops/deny",
                "delete Pods ops/mon",
            ]
        );
        assert!(changes(&new, &new).is_empty());
    }
}
