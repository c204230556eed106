//! What turns one table into another: the unit the agent writes in one transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::ir::{Chain, Element, MapEntry, Set, Table};

/// Changes to a table. Sets and chains are added whole; existing ones change element by
/// element or (chains) have their rules replaced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub add_sets: Vec<Set>,
    pub delete_sets: Vec<String>,
    pub add_chains: Vec<Chain>,
    pub replace_chains: Vec<Chain>,
    pub delete_chains: Vec<String>,
    pub add_elements: BTreeMap<String, BTreeSet<Element>>,
    pub remove_elements: BTreeMap<String, BTreeSet<Element>>,
    /// New or changed verdict map entries (a changed one is also in `remove_map_entries`).
    pub add_map_entries: BTreeMap<String, BTreeMap<IpAddr, MapEntry>>,
    pub remove_map_entries: BTreeMap<String, BTreeSet<IpAddr>>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self == &Delta::default()
    }

    pub fn add_element(&mut self, set: &str, element: Element) {
        if !take(&mut self.remove_elements, set, &element) {
            self.add_elements
                .entry(set.to_string())
                .or_default()
                .insert(element);
        }
    }

    pub fn remove_element(&mut self, set: &str, element: Element) {
        if !take(&mut self.add_elements, set, &element) {
            self.remove_elements
                .entry(set.to_string())
                .or_default()
                .insert(element);
        }
    }

    pub fn add_map_entry(&mut self, map: &str, key: IpAddr, entry: MapEntry) {
        self.add_map_entries
            .entry(map.to_string())
            .or_default()
            .insert(key, entry);
    }

    pub fn remove_map_entry(&mut self, map: &str, key: IpAddr) {
        self.remove_map_entries
            .entry(map.to_string())
            .or_default()
            .insert(key);
    }

    /// Number of objects and elements touched, as a size for logs and metrics.
    pub fn size(&self) -> usize {
        let count =
            |m: &BTreeMap<String, BTreeSet<Element>>| m.values().map(BTreeSet::len).sum::<usize>();
        self.add_sets.len()
            + self.delete_sets.len()
            + self.add_chains.len()
            + self.replace_chains.len()
            + self.delete_chains.len()
            + count(&self.add_elements)
            + count(&self.remove_elements)
            + self
                .add_map_entries
                .values()
                .map(BTreeMap::len)
                .sum::<usize>()
            + self
                .remove_map_entries
                .values()
                .map(BTreeSet::len)
                .sum::<usize>()
    }
}

/// Removes `element` from `set`'s entry in `from`; whether it was there.
fn take(from: &mut BTreeMap<String, BTreeSet<Element>>, set: &str, element: &Element) -> bool {
    let Some(elements) = from.get_mut(set) else {
        return false;
    };
    let taken = elements.remove(element);
    if elements.is_empty() {
        from.remove(set);
    }
    taken
}

/// The changes that turn `old` into `new`.
pub fn diff(old: &Table, new: &Table) -> Delta {
    let mut delta = Delta::default();
    for (name, set) in &new.sets {
        match old.sets.get(name) {
            Some(was) if was.key == set.key && was.interval == set.interval => {
                for e in set.elements.difference(&was.elements) {
                    delta.add_element(name, *e);
                }
                for e in was.elements.difference(&set.elements) {
                    delta.remove_element(name, *e);
                }
            }
            Some(_) => {
                delta.delete_sets.push(name.clone());
                delta.add_sets.push(set.clone());
            }
            None => delta.add_sets.push(set.clone()),
        }
    }
    delta.delete_sets.extend(
        old.sets
            .keys()
            .filter(|n| !new.sets.contains_key(*n))
            .cloned(),
    );
    for (name, map) in &new.maps {
        let was = old.maps.get(name).map(|m| &m.elements);
        for (ip, entry) in &map.elements {
            match was.and_then(|w| w.get(ip)) {
                Some(e) if e == entry => {}
                Some(_) => {
                    delta.remove_map_entry(name, *ip);
                    delta.add_map_entry(name, *ip, entry.clone());
                }
                None => delta.add_map_entry(name, *ip, entry.clone()),
            }
        }
        for ip in was.into_iter().flat_map(|w| w.keys()) {
            if !map.elements.contains_key(ip) {
                delta.remove_map_entry(name, *ip);
            }
        }
    }
    for (name, chain) in &new.chains {
        match old.chains.get(name) {
            Some(was) if was == chain => {}
            Some(_) => delta.replace_chains.push(chain.clone()),
            None => delta.add_chains.push(chain.clone()),
        }
    }
    delta.delete_chains.extend(
        old.chains
            .keys()
            .filter(|n| !new.chains.contains_key(*n))
            .cloned(),
    );
    delta
}

impl Table {
    /// Applies a delta as the kernel would apply the same transaction.
    pub fn apply(&mut self, delta: &Delta) {
        for name in &delta.delete_chains {
            self.chains.remove(name);
        }
        for name in &delta.delete_sets {
            self.sets.remove(name);
        }
        for set in &delta.add_sets {
            self.sets.insert(set.name.clone(), set.clone());
        }
        for chain in delta.add_chains.iter().chain(&delta.replace_chains) {
            self.chains.insert(chain.name.clone(), chain.clone());
        }
        for (name, elements) in &delta.remove_elements {
            if let Some(set) = self.sets.get_mut(name) {
                set.elements.retain(|e| !elements.contains(e));
            }
        }
        for (name, elements) in &delta.add_elements {
            if let Some(set) = self.sets.get_mut(name) {
                set.elements.extend(elements.iter().copied());
            }
        }
        for (name, keys) in &delta.remove_map_entries {
            if let Some(map) = self.maps.get_mut(name) {
                map.elements.retain(|k, _| !keys.contains(k));
            }
        }
        for (name, entries) in &delta.add_map_entries {
            if let Some(map) = self.maps.get_mut(name) {
                map.elements
                    .extend(entries.iter().map(|(k, v)| (*k, v.clone())));
            }
        }
    }
}
