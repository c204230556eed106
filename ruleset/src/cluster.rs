//! The cluster index: every namespace with its labels, pods and policies, plus an address index.
//! Each mutation reports whether anything changed so callers skip no-op recompiles.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::model::{Labels, Namespace, NetworkPolicy, Pod, NAMESPACE_NAME_LABEL};

#[derive(Clone, Debug, Default)]
pub struct Cluster {
    namespaces: BTreeMap<String, NamespaceState>,
    /// Enforceable pods by address.
    by_ip: HashMap<IpAddr, Owners>,
    /// How many pods and policies there are, kept with each change: counting them means
    /// walking 150,000 pods (~0.5 ms), which the agent's metrics would do at every change.
    pod_count: usize,
    policy_count: usize,
}

/// A pod's (namespace, name).
type PodKey = (String, String);

/// The enforceable pods holding one address. Almost every address has one owner, kept inline:
/// a set per address would cost a B-tree node (over 500 bytes) for each of 150,000 pods.
#[derive(Clone, Debug)]
enum Owners {
    One(PodKey),
    /// Two or more, in (namespace, name) order.
    Many(BTreeSet<PodKey>),
}

impl Owners {
    fn insert(&mut self, key: PodKey) {
        match self {
            Owners::One(one) if *one == key => {}
            Owners::One(one) => {
                let one = std::mem::take(one);
                *self = Owners::Many(BTreeSet::from([one, key]));
            }
            Owners::Many(many) => {
                many.insert(key);
            }
        }
    }

    /// Removes `key`; whether no owner is left.
    fn remove(&mut self, key: &PodKey) -> bool {
        match self {
            Owners::One(one) => one == key,
            Owners::Many(many) => {
                many.remove(key);
                if many.len() == 1 {
                    if let Some(last) = many.pop_first() {
                        *self = Owners::One(last);
                    }
                    return false;
                }
                many.is_empty()
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = &PodKey> {
        let (one, many) = match self {
            Owners::One(one) => (Some(one), None),
            Owners::Many(many) => (None, Some(many)),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

#[derive(Clone, Debug, Default)]
struct NamespaceState {
    /// Whether the Namespace object itself has been seen (pods and policies may come first).
    seen: bool,
    /// The object's labels plus the name label the API server always adds.
    labels: Labels,
    pods: BTreeMap<String, Pod>,
    policies: BTreeMap<String, NetworkPolicy>,
}

impl Cluster {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds an index from whole lists, as after an initial list or a manifest load.
    pub fn from_objects(
        namespaces: impl IntoIterator<Item = Namespace>,
        pods: impl IntoIterator<Item = Pod>,
        policies: impl IntoIterator<Item = NetworkPolicy>,
    ) -> Self {
        let mut cluster = Self::new();
        for ns in namespaces {
            cluster.apply_namespace(ns);
        }
        for pod in pods {
            cluster.apply_pod(pod);
        }
        for policy in policies {
            cluster.apply_policy(policy);
        }
        cluster
    }

    pub fn apply_namespace(&mut self, ns: Namespace) -> bool {
        let labels = with_name_label(&ns.name, ns.labels);
        let state = self.state(&ns.name);
        if state.seen && state.labels == labels {
            return false;
        }
        let changed = state.labels != labels;
        state.seen = true;
        state.labels = labels;
        changed
    }

    /// Forgets the Namespace object's labels; its pods and policies stay until deleted.
    pub fn delete_namespace(&mut self, name: &str) -> bool {
        match self.namespaces.get_mut(name) {
            Some(state) if state.seen => {
                state.seen = false;
                let labels = with_name_label(name, Labels::new());
                let changed = state.labels != labels;
                state.labels = labels;
                changed
            }
            _ => false,
        }
    }

    fn state(&mut self, namespace: &str) -> &mut NamespaceState {
        self.namespaces
            .entry(namespace.to_string())
            .or_insert_with(|| NamespaceState {
                labels: with_name_label(namespace, Labels::new()),
                ..NamespaceState::default()
            })
    }

    /// Inserts or replaces a pod; returns the previous version when something changed.
    pub fn apply_pod(&mut self, pod: Pod) -> Option<Option<Pod>> {
        let state = self.state(&pod.namespace);
        if state.pods.get(&pod.name) == Some(&pod) {
            return None;
        }
        let old = state.pods.insert(pod.name.clone(), pod.clone());
        match &old {
            Some(old) => Self::unindex(&mut self.by_ip, old),
            None => self.pod_count += 1,
        }
        Self::index(&mut self.by_ip, &pod);
        Some(old)
    }

    /// Removes a pod; returns it when it was there.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Option<Pod> {
        let old = self.namespaces.get_mut(namespace)?.pods.remove(name)?;
        Self::unindex(&mut self.by_ip, &old);
        self.pod_count -= 1;
        Some(old)
    }

    pub fn apply_policy(&mut self, policy: NetworkPolicy) -> bool {
        let state = self.state(&policy.namespace);
        if state.policies.get(&policy.name) == Some(&policy) {
            return false;
        }
        if state.policies.insert(policy.name.clone(), policy).is_none() {
            self.policy_count += 1;
        }
        true
    }

    pub fn delete_policy(&mut self, namespace: &str, name: &str) -> bool {
        let removed = self
            .namespaces
            .get_mut(namespace)
            .is_some_and(|state| state.policies.remove(name).is_some());
        if removed {
            self.policy_count -= 1;
        }
        removed
    }

    /// How many pods there are, whatever their phase or node.
    pub fn pod_count(&self) -> usize {
        self.pod_count
    }

    pub fn policy_count(&self) -> usize {
        self.policy_count
    }

    /// How many namespaces have an object, pods or policies.
    pub fn namespace_count(&self) -> usize {
        self.namespaces.len()
    }

    fn index(by_ip: &mut HashMap<IpAddr, Owners>, pod: &Pod) {
        if pod.is_enforceable() {
            for ip in &pod.ips {
                let key = (pod.namespace.clone(), pod.name.clone());
                match by_ip.entry(*ip) {
                    Entry::Occupied(mut owners) => owners.get_mut().insert(key),
                    Entry::Vacant(slot) => {
                        slot.insert(Owners::One(key));
                    }
                }
            }
        }
    }

    fn unindex(by_ip: &mut HashMap<IpAddr, Owners>, pod: &Pod) {
        let key = (pod.namespace.clone(), pod.name.clone());
        for ip in &pod.ips {
            if by_ip.get_mut(ip).is_some_and(|owners| owners.remove(&key)) {
                by_ip.remove(ip);
            }
        }
    }

    /// Namespace labels as selectors see them, name label included. Empty for a namespace the
    /// index has never heard of (it has no pods, so nothing asks).
    pub fn namespace_labels(&self, name: &str) -> &Labels {
        static NONE: Labels = Labels::new();
        self.namespaces.get(name).map_or(&NONE, |s| &s.labels)
    }

    /// Names of all namespaces that have an object, pods or policies.
    pub fn namespace_names(&self) -> impl Iterator<Item = &str> {
        self.namespaces.keys().map(String::as_str)
    }

    pub fn pods_in(&self, namespace: &str) -> impl Iterator<Item = &Pod> {
        self.namespaces
            .get(namespace)
            .into_iter()
            .flat_map(|s| s.pods.values())
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.namespaces.values().flat_map(|s| s.pods.values())
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.namespaces.get(namespace)?.pods.get(name)
    }

    pub fn policies_in(&self, namespace: &str) -> impl Iterator<Item = &NetworkPolicy> {
        self.namespaces
            .get(namespace)
            .into_iter()
            .flat_map(|s| s.policies.values())
    }

    pub fn policies(&self) -> impl Iterator<Item = &NetworkPolicy> {
        self.namespaces.values().flat_map(|s| s.policies.values())
    }

    /// Enforceable pods holding an address, in (namespace, name) order.
    pub fn pods_with_ip(&self, ip: IpAddr) -> impl Iterator<Item = &Pod> {
        self.by_ip
            .get(&ip)
            .into_iter()
            .flat_map(Owners::iter)
            .filter_map(|(ns, name)| self.pod(ns, name))
    }
}

/// A namespace's labels as the index keeps them: with `kubernetes.io/metadata.name`, which the
/// API server sets on every namespace, filled in when absent.
pub fn with_name_label(name: &str, mut labels: Labels) -> Labels {
    if !labels.contains_key(NAMESPACE_NAME_LABEL) {
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str) -> Pod {
        Pod {
            namespace: "ns".into(),
            name: name.into(),
            ips: vec![ip.parse().unwrap()],
            ..Pod::default()
        }
    }

    #[test]
    fn apply_reports_changes_only() {
        let mut c = Cluster::new();
        assert_eq!(c.apply_pod(pod("a", "10.0.0.1")), Some(None));
        assert_eq!(c.apply_pod(pod("a", "10.0.0.1")), None);
        assert!(c.apply_pod(pod("a", "10.0.0.2")).is_some());
        assert_eq!(c.pods_with_ip("10.0.0.1".parse().unwrap()).count(), 0);
        assert_eq!(c.pods_with_ip("10.0.0.2".parse().unwrap()).count(), 1);
        assert!(c.delete_pod("ns", "a").is_some());
        assert!(c.delete_pod("ns", "a").is_none());
        assert_eq!(c.pods_with_ip("10.0.0.2".parse().unwrap()).count(), 0);
    }

    #[test]
    fn the_counts_follow_every_change() {
        let mut c = Cluster::new();
        let policy = |namespace: &str, name: &str| NetworkPolicy {
            namespace: namespace.into(),
            name: name.into(),
            ..NetworkPolicy::default()
        };
        let counted = |c: &Cluster| (c.pod_count(), c.policy_count(), c.namespace_count());
        let walked = |c: &Cluster| {
            (
                c.pods().count(),
                c.policies().count(),
                c.namespace_names().count(),
            )
        };
        c.apply_pod(pod("a", "10.0.0.1"));
        c.apply_pod(pod("a", "10.0.0.2"));
        c.apply_pod(pod("b", "10.0.0.3"));
        c.apply_policy(policy("ns", "p"));
        c.apply_policy(policy("ns", "p"));
        c.apply_policy(policy("other", "q"));
        assert_eq!(counted(&c), (2, 2, 2));
        assert_eq!(counted(&c), walked(&c));
        c.delete_pod("ns", "a");
        c.delete_pod("ns", "a");
        c.delete_pod("nowhere", "b");
        c.delete_policy("ns", "p");
        c.delete_policy("ns", "p");
        c.delete_namespace("other");
        assert_eq!(counted(&c), (1, 1, 2));
        assert_eq!(counted(&c), walked(&c));
    }

    #[test]
    fn namespace_name_label_is_synthesized() {
        let mut c = Cluster::new();
        c.apply_pod(pod("a", "10.0.0.1"));
        assert_eq!(
            c.namespace_labels("ns").get(NAMESPACE_NAME_LABEL),
            Some(&"ns".to_string())
        );
        c.apply_namespace(Namespace {
            name: "prod".into(),
            labels: Labels::new(),
        });
        assert_eq!(
            c.namespace_labels("prod").get(NAMESPACE_NAME_LABEL),
            Some(&"prod".to_string())
        );
    }

    #[test]
    fn shared_address_keeps_other_owner() {
        let mut c = Cluster::new();
        c.apply_pod(pod("a", "10.0.0.1"));
        c.apply_pod(pod("b", "10.0.0.1"));
        c.delete_pod("ns", "a");
        let owners: Vec<_> = c
            .pods_with_ip("10.0.0.1".parse().unwrap())
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(owners, ["b"]);
    }

    fn owners(c: &Cluster, ip: &str) -> Vec<String> {
        c.pods_with_ip(ip.parse().unwrap())
            .map(|p| p.name.clone())
            .collect()
    }

    #[test]
    fn owners_of_an_address_come_in_name_order_as_they_come_and_go() {
        let mut c = Cluster::new();
        for name in ["c", "a", "b"] {
            c.apply_pod(pod(name, "10.0.0.1"));
        }
        // Applying an owner again adds no second entry.
        c.apply_pod(pod("a", "10.0.0.1"));
        assert_eq!(owners(&c, "10.0.0.1"), ["a", "b", "c"]);
        c.delete_pod("ns", "b");
        assert_eq!(owners(&c, "10.0.0.1"), ["a", "c"]);
        c.delete_pod("ns", "a");
        assert_eq!(owners(&c, "10.0.0.1"), ["c"]);
        // A finished pod on the address was never indexed: deleting it removes nobody.
        c.apply_pod(Pod {
            phase: Some("Succeeded".into()),
            ..pod("d", "10.0.0.1")
        });
        assert_eq!(owners(&c, "10.0.0.1"), ["c"]);
        c.delete_pod("ns", "d");
        assert_eq!(owners(&c, "10.0.0.1"), ["c"]);
        c.apply_pod(pod("e", "10.0.0.1"));
        assert_eq!(owners(&c, "10.0.0.1"), ["c", "e"]);
        c.delete_pod("ns", "c");
        c.delete_pod("ns", "e");
        assert!(owners(&c, "10.0.0.1").is_empty());
        assert!(c.by_ip.is_empty());
    }
}
