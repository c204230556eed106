//! The cluster as the compiler sees it: plain data, close to the Kubernetes API shapes, with
//! only the fields NetworkPolicy semantics need. Values are kept as written (strings for
//! protocols, CIDRs and operators) so that the compiler, not the caller, decides what is valid
//! and can name the offending field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// A label map (`metadata.labels`, `matchLabels`): key/value pairs sorted by key, keys unique.
///
/// A sorted vector rather than a `BTreeMap`: objects carry a handful of labels, and a
/// `BTreeMap` allocates a whole node (11 slots, ~560 bytes) for even one of them, which over
/// 150,000 pods is ~80 MB of the agent's memory. Built like a map (from pairs, a later
/// duplicate key replacing the earlier one), it compares, orders, hashes, prints and
/// (de)serializes as the map it replaces.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub const fn new() -> Self {
        Labels(Vec::new())
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.position(key).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`, returning the value it replaces.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.position(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &String)> + Clone {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &String> + Clone {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        let mut pairs: Vec<(String, String)> = pairs.into_iter().collect();
        // Stable: pairs with the same key stay in input order, and the last one's value is
        // carried into the one `dedup_by` keeps, as inserting them into a map would.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        pairs.shrink_to_fit();
        Labels(pairs)
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Labels(map.into_iter().collect())
    }
}

impl std::ops::Index<&str> for Labels {
    type Output = String;

    /// Panics when `key` is absent, as indexing a map does.
    fn index(&self, key: &str) -> &String {
        match self.get(key) {
            Some(value) => value,
            None => panic!("no label {key:?}"),
        }
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl serde::Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Labels, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = map.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                Ok(pairs.into_iter().collect())
            }
        }
        deserializer.deserialize_map(Pairs)
    }
}

/// The label every namespace carries (the API server sets it since Kubernetes 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    pub labels: Labels,
    /// `status.podIPs` (or `status.podIP` when the list is absent).
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// `status.phase` as written (`Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`).
    pub phase: Option<String>,
    /// Container ports of all containers, for named-port resolution.
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    /// Whether NetworkPolicy applies to this pod at all, as a target or as a peer: it has an
    /// address of its own and has not terminated.
    pub fn is_enforceable(&self) -> bool {
        !self.host_network
            && !self.ips.is_empty()
            && !matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// Resolves a named port as NetworkPolicy does: the container port with that name and
    /// protocol.
    pub fn named_port(&self, name: &str, protocol: &str) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name) && p.protocol == protocol)
            .and_then(|p| u16::try_from(p.port).ok())
            .filter(|&port| port != 0)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ContainerPort {
    pub name: Option<String>,
    /// `TCP` (the API default), `UDP` or `SCTP`.
    pub protocol: String,
    pub port: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid` when the API server gave one. No effect on enforcement: it names the
    /// object in the Events the agent records about it (`kubectl describe` matches on it).
    pub uid: Option<String>,
    pub pod_selector: LabelSelector,
    /// As written; empty means "absent" and is defaulted as the API server does.
    pub policy_types: Vec<String>,
    pub ingress: Vec<PolicyRule>,
    pub egress: Vec<PolicyRule>,
}

/// One entry of `spec.ingress` (peers are its `from`) or `spec.egress` (peers are its `to`).
/// An empty peer list means every address; an empty port list means every port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyRule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PolicyPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    pub pod_selector: Option<LabelSelector>,
    pub namespace_selector: Option<LabelSelector>,
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpBlock {
    pub cidr: String,
    pub except: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyPort {
    /// `None` means TCP.
    pub protocol: Option<String>,
    pub port: Option<PortRef>,
    pub end_port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortRef {
    Number(i32),
    Name(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: String,
    pub values: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The map the type replaces, built from the same pairs.
    fn map(list: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs(list).into_iter().collect()
    }

    #[test]
    fn built_like_a_map_sorted_and_last_duplicate_wins() {
        let input = [
            ("b", "1"),
            ("a", "2"),
            ("c", "3"),
            ("a", "4"),
            ("b", "5"),
            ("a", "6"),
        ];
        let labels: Labels = pairs(&input).into_iter().collect();
        let want = map(&input);
        assert_eq!(
            labels.iter().collect::<Vec<_>>(),
            want.iter().collect::<Vec<_>>()
        );
        assert_eq!(labels.get("a").map(String::as_str), Some("6"));
        assert_eq!(labels.len(), 3);
        assert_eq!(Labels::from(want.clone()), labels);
        let array: [(String, String); 3] = pairs(&[("y", "1"), ("x", "2"), ("y", "3")])
            .try_into()
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(
            format!("{:?}", Labels::from(array)),
            r#"{"x": "2", "y": "3"}"#
        );
        assert_eq!(format!("{labels:?}"), format!("{want:?}"));
    }

    #[test]
    fn get_insert_and_absent_keys() {
        let mut labels = Labels::new();
        assert!(labels.is_empty());
        assert_eq!(labels.get("app"), None);
        assert_eq!(labels.insert("tier".into(), "db".into()), None);
        assert_eq!(labels.insert("app".into(), "pay".into()), None);
        assert_eq!(labels.insert("zone".into(), "a".into()), None);
        assert_eq!(
            labels.insert("app".into(), "web".into()),
            Some("pay".into())
        );
        assert_eq!(labels.keys().collect::<Vec<_>>(), ["app", "tier", "zone"]);
        assert_eq!(labels["app"], "web");
        assert!(labels.contains_key("zone") && !labels.contains_key("zon"));
        for absent in ["", "a", "apq", "tiers", "zzz"] {
            assert_eq!(labels.get(absent), None, "{absent}");
        }
    }

    #[test]
    fn orders_and_compares_as_the_map() {
        let cases: [&[(&str, &str)]; 5] = [
            &[],
            &[("a", "1")],
            &[("a", "1"), ("b", "0")],
            &[("a", "2")],
            &[("b", "0")],
        ];
        for x in cases {
            for y in cases {
                let (lx, ly): (Labels, Labels) = (
                    pairs(x).into_iter().collect(),
                    pairs(y).into_iter().collect(),
                );
                assert_eq!(lx.cmp(&ly), map(x).cmp(&map(y)), "{x:?} {y:?}");
                assert_eq!(lx == ly, map(x) == map(y), "{x:?} {y:?}");
            }
        }
    }

    #[test]
    fn serde_as_the_map() {
        let labels: Labels = pairs(&[("tier", "db"), ("app", "pay")])
            .into_iter()
            .collect();
        let json = serde_json::to_string(&labels).unwrap_or_default();
        assert_eq!(json, r#"{"app":"pay","tier":"db"}"#);
        assert_eq!(
            serde_json::from_str::<Labels>(&json).ok(),
            Some(labels.clone())
        );
        let yaml = serde_yaml_ng::to_string(&labels).unwrap_or_default();
        assert_eq!(yaml, "app: pay\ntier: db\n");
        assert_eq!(serde_yaml_ng::from_str::<Labels>(&yaml).ok(), Some(labels));

        // Duplicate keys, wrong shapes and non-string values: whatever the map did (accept,
        // last value winning, or reject), this does too.
        let json_docs = [
            r#"{"a":"1","b":"2","a":"3"}"#,
            r#"{"a":1}"#,
            r#"["a"]"#,
            "{}",
            "null",
        ];
        for doc in json_docs {
            let ours = serde_json::from_str::<Labels>(doc).map_err(|e| e.to_string());
            let theirs = serde_json::from_str::<BTreeMap<String, String>>(doc);
            assert_eq!(
                ours,
                theirs.map(Labels::from).map_err(|e| e.to_string()),
                "{doc}"
            );
        }
        let last_wins = |r: Result<Labels, _>| r.ok().and_then(|l: Labels| l.get("a").cloned());
        assert_eq!(
            last_wins(serde_json::from_str(json_docs[0])),
            Some("3".into())
        );
        let yaml_docs = [
            "a: 1\nb: x\na: 3\n",
            "a: x\na: y\n",
            "a: [1]\n",
            "{}\n",
            "- a\n",
        ];
        for doc in yaml_docs {
            let ours = serde_yaml_ng::from_str::<Labels>(doc).map_err(|e| e.to_string());
            let theirs = serde_yaml_ng::from_str::<BTreeMap<String, String>>(doc);
            assert_eq!(
                ours,
                theirs.map(Labels::from).map_err(|e| e.to_string()),
                "{doc}"
            );
        }
    }
}
