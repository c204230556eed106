//! Reading our tables back: the nf_tables generation (bumped by every committed transaction,
//! ours or anyone's) and a fingerprint of everything a table holds, so the agent can tell a
//! transaction that touched its tables from one that only touched kube-proxy's or Flannel's.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hasher};
use std::io;

use ruleset::ir::TableFamily;

use super::{
    netlink_messages, nul_terminated, plan, request, u32_at, until_nul, Named, WriteError, Writer,
    HEADER, NLMSG_ERROR,
};

const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;
pub(super) const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP: u16 = 0x300;
/// `NFTA_*_TABLE` is attribute 1 of chains, rules, sets and element lists alike.
const ATTR_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(super) const NFTA_GEN_ID: u16 = 1;
/// The netlink and nfgenmsg headers: the part of a reply that varies with sequence number,
/// port and generation, not with what the table holds.
const HEADERS: usize = HEADER + 4;
/// Empty reads tolerated while a reply is still being produced.
const PATIENCE: usize = 1000;

/// A previous read of a table, and what deltas changed in it since.
pub type Reuse<'a> = (&'a TableImage, &'a Named<'a>);

/// A table as read back: a hash of its chains and sets (their definitions), of each chain's
/// rules by chain name, and the sum of each set's element hashes by set name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableImage {
    objects: u64,
    rules: BTreeMap<Vec<u8>, u64>,
    sets: BTreeMap<Vec<u8>, u64>,
}

impl TableImage {
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        hasher.write_u64(self.objects);
        for (chain, hash) in &self.rules {
            hasher.write(chain);
            hasher.write_u64(*hash);
        }
        for (set, sum) in &self.sets {
            hasher.write(set);
            hasher.write_u64(*sum);
        }
        hasher.finish()
    }
}

impl Writer {
    /// The current nf_tables generation of this network namespace.
    pub fn generation(&mut self) -> Result<u32, WriteError> {
        let seq = self.next_query_seq();
        let mut generation = None;
        self.query(
            &request(NFT_MSG_GETGEN, 0, 0, seq, &[]),
            seq,
            "generation",
            |m| {
                if kind(m) == nft(NFT_MSG_NEWGEN) {
                    generation = attributes(&m[HEADERS..])
                        .find(|(kind, _)| *kind == NFTA_GEN_ID)
                        .and_then(|(_, v)| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)));
                    return true;
                }
                false
            },
        )?;
        generation.ok_or_else(|| WriteError::Unanswered {
            missing: 1,
            expected: 1,
            first: "query for the nf_tables generation".into(),
        })
    }

    /// A fingerprint of the chains, rules, sets and elements of `table <family> <name>`;
    /// `None` when the table is absent. Equal fingerprints mean the kernel holds the same
    /// objects with the same contents and handles.
    pub fn table_fingerprint(
        &mut self,
        family: TableFamily,
        name: &str,
    ) -> Result<Option<u64>, WriteError> {
        Ok(self
            .table_image(family, name, None)?
            .map(|image| image.fingerprint()))
    }

    /// What [`Writer::table_fingerprint`] is made of, read from the kernel. With `reuse`, what
    /// the previous image holds and the deltas since do not name is taken from it rather than
    /// dumped again: the elements of a named set, the rules of a chain. Right for a table
    /// changed since that image only by those deltas. (An anonymous set, a rule's own, is
    /// always dumped: a replaced chain makes new ones, whose names the kernel may give again.)
    pub fn table_image(
        &mut self,
        family: TableFamily,
        name: &str,
        reuse: Option<Reuse<'_>>,
    ) -> Result<Option<TableImage>, WriteError> {
        if !self.has_table(family, name)? {
            return Ok(None);
        }
        let nfproto = plan::nfproto(family) as u8;
        let table = nul_terminated(name);
        let mut hasher = DefaultHasher::new();
        let mut chain_names = Vec::new();
        let mut set_names = Vec::new();
        for (kind, what, attr, names) in [
            (
                NFT_MSG_GETCHAIN,
                "chains",
                NFTA_CHAIN_NAME,
                &mut chain_names,
            ),
            (NFT_MSG_GETSET, "sets", NFTA_SET_NAME, &mut set_names),
        ] {
            let seq = self.next_query_seq();
            let req = request(kind, NLM_F_DUMP, nfproto, seq, &[(ATTR_TABLE, &table)]);
            self.dump(&req, seq, what, |payload| {
                hasher.write(payload);
                if let Some((_, name)) = attributes(payload).find(|(k, _)| *k == attr) {
                    names.push(name.to_vec());
                }
            })?;
        }
        let text = |name: &[u8]| String::from_utf8_lossy(until_nul(name)).into_owned();
        let mut kept_rules = BTreeMap::new();
        let mut to_read = Vec::new();
        for chain in &chain_names {
            let kept = reuse.and_then(|(previous, named)| {
                (!named.chains.contains(text(chain).as_str()))
                    .then(|| previous.rules.get(chain).copied())
                    .flatten()
            });
            match kept {
                Some(hash) => {
                    kept_rules.insert(chain.clone(), hash);
                }
                None => to_read.push(chain.clone()),
            }
        }
        // Every chain read has an entry, rules or not; those kept come from the previous image.
        let mut rules: BTreeMap<Vec<u8>, DefaultHasher> = to_read
            .iter()
            .map(|chain| (chain.clone(), DefaultHasher::new()))
            .collect();
        // No chain to take from the previous image: one dump of every rule.
        let dumps: Vec<Option<Vec<u8>>> = if kept_rules.is_empty() {
            vec![None]
        } else {
            to_read.into_iter().map(Some).collect()
        };
        for chain in dumps {
            let seq = self.next_query_seq();
            let mut attrs: Vec<(u16, &[u8])> = vec![(ATTR_TABLE, &table)];
            if let Some(chain) = &chain {
                attrs.push((NFTA_RULE_CHAIN, chain));
            }
            let req = request(NFT_MSG_GETRULE, NLM_F_DUMP, nfproto, seq, &attrs);
            self.dump(&req, seq, "rules", |payload| {
                let chain = attributes(payload)
                    .find(|(k, _)| *k == NFTA_RULE_CHAIN)
                    .map(|(_, chain)| chain.to_vec())
                    .unwrap_or_default();
                rules.entry(chain).or_default().write(payload);
            })?;
        }
        let mut rules: BTreeMap<Vec<u8>, u64> = rules
            .into_iter()
            .map(|(chain, hasher)| (chain, hasher.finish()))
            .collect();
        rules.extend(kept_rules);
        let mut sets = BTreeMap::new();
        for set in set_names {
            let name = text(&set);
            let kept = reuse.and_then(|(previous, named)| {
                (!name.starts_with("__") && !named.sets.contains(name.as_str()))
                    .then(|| previous.sets.get(&set).copied())
                    .flatten()
            });
            let sum = match kept {
                Some(sum) => sum,
                None => self.element_sum(nfproto, &table, &set)?,
            };
            sets.insert(set, sum);
        }
        Ok(Some(TableImage {
            objects: hasher.finish(),
            rules,
            sets,
        }))
    }

    /// The elements of one set, hashed one by one and summed: a hash set lists its elements in
    /// bucket order, which changes when the kernel resizes the table in the background.
    fn element_sum(&mut self, nfproto: u8, table: &[u8], set: &[u8]) -> Result<u64, WriteError> {
        let seq = self.next_query_seq();
        let req = request(
            NFT_MSG_GETSETELEM,
            NLM_F_DUMP,
            nfproto,
            seq,
            &[(ATTR_TABLE, table), (NFTA_SET_ELEM_LIST_SET, set)],
        );
        let mut elements = 0u64;
        self.dump(&req, seq, "set elements", |payload| {
            for (kind, list) in attributes(payload) {
                if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
                    continue;
                }
                for (_, element) in attributes(list) {
                    let mut one = DefaultHasher::new();
                    one.write(element);
                    elements = elements.wrapping_add(one.finish());
                }
            }
        })?;
        Ok(elements)
    }

    /// Runs a dump request, giving each reply's payload (after the headers) to `each`.
    fn dump(
        &mut self,
        req: &[u8],
        seq: u32,
        what: &str,
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), WriteError> {
        self.query(req, seq, what, |m| match kind(m) {
            NLMSG_DONE => true,
            _ => {
                each(m.get(HEADERS..).unwrap_or_default());
                false
            }
        })
    }

    /// Sends `req` and hands every reply with sequence number `seq` to `reply` until it says
    /// the answer is complete. An error reply ends the query with that error.
    fn query(
        &mut self,
        req: &[u8],
        seq: u32,
        what: &str,
        mut reply: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), WriteError> {
        while self.socket.recv().map_err(WriteError::Socket)?.is_some() {}
        self.socket.send(req).map_err(|source| WriteError::Send {
            messages: 1,
            bytes: req.len(),
            source,
        })?;
        let mut idle = 0;
        loop {
            let Some(datagram) = self.socket.recv().map_err(WriteError::Receive)? else {
                // A dump is produced as it is read; give the kernel a moment between parts.
                idle += 1;
                if idle > PATIENCE {
                    return Err(WriteError::Unanswered {
                        missing: 1,
                        expected: 1,
                        first: format!("query for {what}"),
                    });
                }
                std::thread::yield_now();
                continue;
            };
            idle = 0;
            for message in netlink_messages(datagram).filter(|m| m.seq == seq) {
                if message.kind == NLMSG_ERROR {
                    let errno =
                        u32_at(message.bytes, HEADER).map_or(0, |e| (e as i32).saturating_neg());
                    if errno == 0 {
                        continue;
                    }
                    return Err(WriteError::Refused {
                        object: format!("query for {what}"),
                        error: io::Error::from_raw_os_error(errno),
                        others: 0,
                    });
                }
                if reply(message.bytes) {
                    return Ok(());
                }
            }
        }
    }
}

/// The netlink type of a reply.
fn kind(message: &[u8]) -> u16 {
    message
        .get(4..6)
        .map_or(0, |b| u16::from_ne_bytes([b[0], b[1]]))
}

/// The netlink type of an nf_tables reply of message type `msg`.
const fn nft(msg: u16) -> u16 {
    (10 << 8) | msg
}

/// The top-level netlink attributes of a payload: `(type, value)`.
pub(super) fn attributes(mut payload: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(payload.get(..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(payload.get(2..4)?.try_into().ok()?) & 0x3fff;
        let value = payload.get(4..len)?;
        payload = payload.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, value))
    })
}
