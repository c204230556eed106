//! What one transaction sends, as plain data: the messages for a whole table or for a delta,
//! in an order the kernel accepts, with the bytes `nft` itself would put in set keys, element
//! flags and user data (so that `nft list` prints the result exactly as it prints what it
//! loaded itself). Nothing here touches libnftnl; [`super::sys`] turns each [`Op`] into one
//! netlink message.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::net::IpAddr;

use nftnl_sys::libc;
use ruleset::diff::Delta;
use ruleset::ir::{
    AddrField, Chain, Element, Family, Hook, Map, MapEntry, Match, Rule, Set, SetKey, Table,
    TableFamily, Verdict,
};

use super::element::{
    addr_bytes, datatype, element_specs, encoded_size, fits, interval_elements, key_bytes,
    key_type, plain_element, ElementSpec,
};
use super::expr::{
    addr_len, addr_payload, arp_sender, dport, ether_destination, ether_source, nd_target, reg,
    Expr, Exprs, CT_DIRECTION_REPLY, CT_STATE_RELATED, IP6_NEXTHDR_OFFSET, IPPROTO_ICMPV6,
    LOOPBACK_IFINDEX, PACKET_HOST,
};
use super::udata::{self, tlv};
use super::WriteError;

/// Longest comment `nft` accepts (`NFTNL_UDATA_COMMENT_MAXLEN`); the compiler cuts to it too.
const COMMENT_MAX: usize = 128;

/// Room for the elements of one message: the element list is one netlink attribute, whose
/// length is 16 bits. Kept below 64 KiB so an estimate off by a few bytes still fits.
const ELEMENT_BYTES_PER_MESSAGE: usize = 60_000;

/// The `NFPROTO_*` number of a table family, as messages carry it.
pub(super) fn nfproto(family: TableFamily) -> u32 {
    match family {
        TableFamily::Inet => libc::NFPROTO_INET as u32,
        TableFamily::Bridge => libc::NFPROTO_BRIDGE as u32,
    }
}

/// Where `priority filter` is in a family: base chain priorities in the IR are relative to it.
fn filter_priority(family: TableFamily) -> i32 {
    match family {
        TableFamily::Inet => 0,
        TableFamily::Bridge => -200,
    }
}

/// The kernel's name template for an anonymous set; it picks the number.
const ANONYMOUS_SET: &str = "__set%d";

/// One netlink message and the object it is about, as error messages name it.
pub(super) struct Message {
    pub op: Op,
    pub object: String,
    /// `NFPROTO_*` of the table the message is about.
    pub family: u32,
}

/// What one message asks of the kernel, about an object in the message's table.
pub(super) enum Op {
    AddTable {
        table: CString,
        udata: Option<Vec<u8>>,
    },
    DeleteTable {
        table: CString,
    },
    AddChain {
        table: CString,
        name: CString,
        hook: Option<BaseHook>,
        udata: Option<Vec<u8>>,
    },
    DeleteChain {
        table: CString,
        name: CString,
    },
    /// Deletes every rule of a chain.
    FlushChain {
        table: CString,
        name: CString,
    },
    AddSet(SetSpec),
    DeleteSet {
        table: CString,
        name: CString,
    },
    AddElements(ElementList),
    DeleteElements(ElementList),
    AddRule {
        table: CString,
        chain: CString,
        exprs: Vec<Expr>,
        udata: Option<Vec<u8>>,
    },
}

/// Hook and priority of a base chain; its type is always `filter` and its policy `accept`.
pub(super) struct BaseHook {
    pub hooknum: u32,
    pub priority: i32,
}

pub(super) struct SetSpec {
    pub table: CString,
    pub name: CString,
    /// Names the set to the rules and elements of the same batch.
    pub id: u32,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    /// A map to verdicts (`type ... : verdict`).
    pub verdict_map: bool,
    /// Number of elements, given for anonymous sets as nft does.
    pub size: Option<u32>,
    pub udata: Vec<u8>,
}

pub(super) struct ElementList {
    pub table: CString,
    pub set: CString,
    /// The set's id when it is created in the same batch.
    pub set_id: Option<u32>,
    pub elements: Vec<ElementSpec>,
}

/// Messages for one table in a batch, with the sets it creates (by name, their batch ids).
pub(super) struct Plan {
    family: TableFamily,
    table: CString,
    table_name: String,
    messages: Vec<Message>,
    next_set_id: u32,
    new_sets: BTreeMap<String, u32>,
}

/// Delete the table if it exists, then create it whole: adding the table first (without
/// `NLM_F_EXCL`, so an existing one is left as it is) makes the delete valid either way.
pub(super) fn replace(table: &Table) -> Result<Vec<Message>, WriteError> {
    let mut plan = Plan::new(table.family, &table.name)?;
    let object = plan.table_object();
    plan.push(
        Op::AddTable {
            table: plan.table.clone(),
            udata: None,
        },
        format!("{object} (added if absent, to be deleted)"),
    );
    plan.push(
        Op::DeleteTable {
            table: plan.table.clone(),
        },
        format!("{object} (deletion of the old one)"),
    );
    let udata = comment(udata::COMMENT, &table.comment, false, &object)?;
    plan.push(
        Op::AddTable {
            table: plan.table.clone(),
            udata,
        },
        object,
    );
    // The order nft uses for the rendered text: chains, then sets and maps, then rules.
    let chains: Vec<&Chain> = table
        .chains
        .values()
        .filter(|c| c.base.is_none())
        .chain(table.chains.values().filter(|c| c.base.is_some()))
        .collect();
    for chain in &chains {
        plan.add_chain(chain)?;
    }
    for set in table.sets.values() {
        plan.add_set(set, &Edits::default())?;
    }
    for map in table.maps.values() {
        plan.add_map(map)?;
    }
    for chain in &chains {
        plan.add_rules(chain)?;
    }
    Ok(plan.messages)
}

/// The delta in an order whose every step is valid: new chains exist before anything jumps to
/// them, rules that use a set are gone before the set is, and map entries leave a chain
/// before it is deleted.
pub(super) fn apply(
    family: TableFamily,
    table_name: &str,
    delta: &Delta,
) -> Result<Vec<Message>, WriteError> {
    let mut plan = Plan::new(family, table_name)?;
    for chain in &delta.add_chains {
        plan.add_chain(chain)?;
    }
    for name in delta
        .replace_chains
        .iter()
        .map(|c| &c.name)
        .chain(&delta.delete_chains)
    {
        let object = format!("rules of chain {name} (flush)");
        let op = Op::FlushChain {
            table: plan.table.clone(),
            name: cstring(name, &object)?,
        };
        plan.push(op, object);
    }
    // Before the additions: a set whose type changed is deleted and added under one name.
    for name in &delta.delete_sets {
        let object = format!("set {name} (deletion)");
        let op = Op::DeleteSet {
            table: plan.table.clone(),
            name: cstring(name, &object)?,
        };
        plan.push(op, object);
    }
    for set in &delta.add_sets {
        // Element changes to a set created here are folded into it, as `Table::apply` does.
        let edits = Edits {
            remove: delta.remove_elements.get(&set.name),
            add: delta.add_elements.get(&set.name),
        };
        plan.add_set(set, &edits)?;
    }
    for chain in delta.add_chains.iter().chain(&delta.replace_chains) {
        plan.add_rules(chain)?;
    }
    for (map, keys) in &delta.remove_map_entries {
        let elements = keys
            .iter()
            .map(|ip| plain_element(addr_bytes(*ip)))
            .collect();
        plan.push_elements(map, "entries of map", elements, true)?;
    }
    for (map, entries) in &delta.add_map_entries {
        let elements = entries
            .iter()
            .map(|(ip, entry)| map_element(*ip, entry))
            .collect::<Result<_, _>>()?;
        plan.push_elements(map, "entries of map", elements, false)?;
    }
    // Element changes of sets this delta deletes or creates are not sent on their own.
    let whole = |name: &String| {
        delta.delete_sets.contains(name) || delta.add_sets.iter().any(|s| &s.name == name)
    };
    for (set, elements) in delta.remove_elements.iter().filter(|(n, _)| !whole(n)) {
        let specs = elements.iter().flat_map(element_specs).collect();
        plan.push_elements(set, "elements of set", specs, true)?;
    }
    for (set, elements) in delta.add_elements.iter().filter(|(n, _)| !whole(n)) {
        let specs = elements.iter().flat_map(element_specs).collect();
        plan.push_elements(set, "elements of set", specs, false)?;
    }
    for name in &delta.delete_chains {
        let object = format!("chain {name} (deletion)");
        let op = Op::DeleteChain {
            table: plan.table.clone(),
            name: cstring(name, &object)?,
        };
        plan.push(op, object);
    }
    Ok(plan.messages)
}

/// Element changes a delta makes to one set.
#[derive(Default)]
struct Edits<'a> {
    remove: Option<&'a BTreeSet<Element>>,
    add: Option<&'a BTreeSet<Element>>,
}

impl Plan {
    fn new(family: TableFamily, table_name: &str) -> Result<Self, WriteError> {
        let object = format!("table {} {table_name}", family.nft_name());
        Ok(Plan {
            family,
            table: cstring(table_name, &object)?,
            table_name: table_name.to_string(),
            messages: Vec::new(),
            next_set_id: 1,
            new_sets: BTreeMap::new(),
        })
    }

    fn table_object(&self) -> String {
        format!("table {} {}", self.family.nft_name(), self.table_name)
    }

    fn push(&mut self, op: Op, object: String) {
        let family = nfproto(self.family);
        self.messages.push(Message { op, object, family });
    }

    fn set_id(&mut self) -> u32 {
        let id = self.next_set_id;
        self.next_set_id += 1;
        id
    }

    fn add_chain(&mut self, chain: &Chain) -> Result<(), WriteError> {
        let object = format!("chain {}", chain.name);
        // The bridge family numbers its prerouting hook as inet does (`NF_BR_PRE_ROUTING`).
        let hook = chain.base.map(|base| BaseHook {
            hooknum: match base.hook {
                Hook::Forward => libc::NF_INET_FORWARD as u32,
                Hook::Input => libc::NF_INET_LOCAL_IN as u32,
                Hook::Prerouting => libc::NF_INET_PRE_ROUTING as u32,
            },
            priority: filter_priority(self.family) + base.priority,
        });
        let op = Op::AddChain {
            table: self.table.clone(),
            name: cstring(&chain.name, &object)?,
            hook,
            udata: comment(udata::COMMENT, &chain.comment, false, &object)?,
        };
        self.push(op, object);
        Ok(())
    }

    fn add_set(&mut self, set: &Set, edits: &Edits) -> Result<(), WriteError> {
        let object = format!("set {}", set.name);
        let mut elements: Vec<Element> = set
            .elements
            .iter()
            .filter(|e| edits.remove.is_none_or(|r| !r.contains(e)))
            .copied()
            .collect();
        if let Some(add) = edits.add {
            elements.extend(add.iter().filter(|e| !set.elements.contains(e)));
            elements.sort();
        }
        for element in &elements {
            if !fits(set.key, set.interval, element) {
                return Err(WriteError::Invalid {
                    object: format!("element {element:?} of set {}", set.name),
                    reason: format!("does not fit the set's key {:?}", set.key),
                });
            }
        }
        let (key_type, key_len) = key_type(set.key);
        let mut data = match set.key {
            SetKey::Addr(_) | SetKey::Mac => {
                tlv(udata::SET_KEYBYTEORDER, &udata::BIG_ENDIAN.to_ne_bytes())
            }
            SetKey::Iface => tlv(udata::SET_KEYBYTEORDER, &udata::HOST_ENDIAN.to_ne_bytes()),
            SetKey::AddrPair(_)
            | SetKey::AddrProtoPort(_)
            | SetKey::IfaceAddr(_)
            | SetKey::IfaceMac
            | SetKey::IndexMacAddr(_) => {
                let mut data = tlv(udata::SET_KEYBYTEORDER, &udata::NO_BYTEORDER.to_ne_bytes());
                let mut typeof_key = tlv(udata::TYPEOF_EXPR, &udata::EXPR_CONCAT.to_ne_bytes());
                typeof_key.extend(tlv(udata::TYPEOF_DATA, &[]));
                data.extend(tlv(udata::SET_KEY_TYPEOF, &typeof_key));
                data
            }
            SetKey::IfaceNdTarget => {
                let mut data = tlv(udata::SET_KEYBYTEORDER, &udata::NO_BYTEORDER.to_ne_bytes());
                data.extend(tlv(
                    udata::SET_KEY_TYPEOF,
                    &udata::typeof_iifname_nd_target(),
                ));
                data
            }
            SetKey::NdTarget => {
                let mut data = tlv(udata::SET_KEYBYTEORDER, &udata::BIG_ENDIAN.to_ne_bytes());
                data.extend(tlv(udata::SET_KEY_TYPEOF, &udata::typeof_nd_target()));
                data
            }
        };
        data.extend(comment(udata::SET_COMMENT, &set.comment, false, &object)?.unwrap_or_default());
        let id = self.set_id();
        let op = Op::AddSet(SetSpec {
            table: self.table.clone(),
            name: cstring(&set.name, &object)?,
            id,
            flags: if set.interval {
                libc::NFT_SET_INTERVAL as u32
            } else {
                0
            },
            key_type,
            key_len,
            verdict_map: false,
            size: None,
            udata: data,
        });
        self.push(op, object);
        self.new_sets.insert(set.name.clone(), id);
        let specs = if set.interval {
            // A single address in an interval set is the range of just that address; ranges go
            // in address order (the IR's order puts single addresses first).
            let mut ranges: Vec<Element> = elements
                .iter()
                .map(|e| match e {
                    Element::Addr(ip) => Element::Range(*ip, *ip),
                    other => *other,
                })
                .collect();
            ranges.sort();
            interval_elements(&ranges)
        } else {
            elements
                .iter()
                .map(|e| plain_element(key_bytes(e)))
                .collect()
        };
        self.push_elements(&set.name, "elements of set", specs, false)
    }

    fn add_map(&mut self, map: &Map) -> Result<(), WriteError> {
        let object = format!("map {}", map.name);
        let (key_type, key_len) = key_type(SetKey::Addr(map.family));
        let mut data = tlv(udata::SET_KEYBYTEORDER, &udata::BIG_ENDIAN.to_ne_bytes());
        data.extend(tlv(
            udata::SET_DATABYTEORDER,
            &udata::NO_BYTEORDER.to_ne_bytes(),
        ));
        data.extend(tlv(udata::SET_DATA_INTERVAL, &0u32.to_ne_bytes()));
        data.extend(comment(udata::SET_COMMENT, &map.comment, false, &object)?.unwrap_or_default());
        let id = self.set_id();
        let op = Op::AddSet(SetSpec {
            table: self.table.clone(),
            name: cstring(&map.name, &object)?,
            id,
            flags: libc::NFT_SET_MAP as u32,
            key_type,
            key_len,
            verdict_map: true,
            size: None,
            udata: data,
        });
        self.push(op, object);
        self.new_sets.insert(map.name.clone(), id);
        for ip in map.elements.keys() {
            if Family::of(ip) != map.family {
                return Err(WriteError::Invalid {
                    object: format!("entry {ip} of map {}", map.name),
                    reason: format!("the map holds {:?} addresses", map.family),
                });
            }
        }
        let elements = map
            .elements
            .iter()
            .map(|(ip, entry)| map_element(*ip, entry))
            .collect::<Result<_, _>>()?;
        self.push_elements(&map.name, "entries of map", elements, false)
    }

    /// Element messages for one set, split so that each fits in one netlink message.
    fn push_elements(
        &mut self,
        set: &str,
        what: &str,
        elements: Vec<ElementSpec>,
        delete: bool,
    ) -> Result<(), WriteError> {
        if elements.is_empty() {
            return Ok(());
        }
        let object = format!("{what} {set}");
        let set_c = cstring(set, &object)?;
        let mut chunks: Vec<Vec<ElementSpec>> = vec![Vec::new()];
        let mut bytes = 0;
        for element in elements {
            let size = encoded_size(&element);
            if bytes + size > ELEMENT_BYTES_PER_MESSAGE && bytes > 0 {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            if let Some(chunk) = chunks.last_mut() {
                chunk.push(element);
            }
        }
        let count = chunks.len();
        let verb = if delete { " (deletion)" } else { "" };
        for (i, elements) in chunks.into_iter().enumerate() {
            let list = ElementList {
                table: self.table.clone(),
                set: set_c.clone(),
                set_id: self.new_sets.get(set).copied(),
                elements,
            };
            let object = if count == 1 {
                format!("{object}{verb}")
            } else {
                format!("{object}{verb}, message {} of {count}", i + 1)
            };
            let op = if delete {
                Op::DeleteElements(list)
            } else {
                Op::AddElements(list)
            };
            self.push(op, object);
        }
        Ok(())
    }

    fn add_rules(&mut self, chain: &Chain) -> Result<(), WriteError> {
        for (i, rule) in chain.rules.iter().enumerate() {
            self.add_rule(&chain.name, i + 1, rule)?;
        }
        Ok(())
    }

    fn add_rule(&mut self, chain: &str, number: usize, rule: &Rule) -> Result<(), WriteError> {
        let object = format!("rule {number} of chain {chain}");
        let mut exprs = Exprs::new(self.family);
        for m in &rule.matches {
            match m {
                Match::CtRelated => exprs.ct_state(CT_STATE_RELATED),
                Match::CtReply => {
                    exprs.push(Expr::Ct {
                        key: libc::NFT_CT_DIRECTION as u32,
                        dreg: reg(0),
                    });
                    exprs.cmp(libc::NFT_CMP_EQ, vec![CT_DIRECTION_REPLY]);
                }
                Match::CtMarkEpoch { mask, value } => {
                    exprs.ct_mark(*mask, 0);
                    exprs.cmp(libc::NFT_CMP_EQ, value.to_ne_bytes().to_vec());
                }
                Match::Icmpv6Type(types) => {
                    let mut types = types.clone();
                    types.sort_unstable();
                    types.dedup();
                    exprs.icmpv6();
                    exprs.meta(libc::NFT_META_L4PROTO, reg(0));
                    exprs.cmp(libc::NFT_CMP_EQ, vec![IPPROTO_ICMPV6]);
                    exprs.push(Expr::Payload {
                        base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
                        offset: 0,
                        len: 1,
                        dreg: reg(0),
                    });
                    match types.as_slice() {
                        [] => {
                            return Err(WriteError::Invalid {
                                object,
                                reason: "an ICMPv6 type match lists no type".into(),
                            })
                        }
                        // nft turns a one-element set into a comparison.
                        [one] => exprs.cmp(libc::NFT_CMP_EQ, vec![*one]),
                        _ => {
                            let (set, set_id) = self.icmpv6_set(&object, &types)?;
                            exprs.push(Expr::Lookup {
                                sreg: reg(0),
                                dreg: None,
                                set,
                                set_id: Some(set_id),
                                invert: false,
                            });
                        }
                    }
                }
                Match::AddrInSet { family, field, set } => {
                    exprs.family(*family);
                    exprs.push(addr_payload(*family, *field, 0));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::AddrNotInSet { family, field, set } => {
                    exprs.family(*family);
                    exprs.push(addr_payload(*family, *field, 0));
                    exprs.push(self.lookup_absent(set, &object)?);
                }
                Match::Arp => exprs.arp(),
                Match::ArpSender(addr) => {
                    exprs.arp();
                    exprs.push(arp_sender(reg(0)));
                    exprs.cmp(libc::NFT_CMP_EQ, addr.octets().to_vec());
                }
                Match::IifkindVeth => exprs.iifkind_veth(),
                Match::IifnameNotInSet { set } => {
                    exprs.meta(libc::NFT_META_IIFNAME, reg(0));
                    exprs.push(self.lookup_absent(set, &object)?);
                }
                Match::ArpSenderInSet { set } => {
                    exprs.arp();
                    exprs.push(arp_sender(reg(0)));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::IifnameArpSenderInSet { set } => {
                    exprs.arp();
                    exprs.meta(libc::NFT_META_IIFNAME, reg(0));
                    exprs.push(arp_sender(reg(4)));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::IifnameInSet { set } => {
                    exprs.meta(libc::NFT_META_IIFNAME, reg(0));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::OifnameInSet { set } => {
                    exprs.meta(libc::NFT_META_OIFNAME, reg(0));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::OifnameDestinationNotInSet { family, set } => {
                    exprs.family(*family);
                    exprs.meta(libc::NFT_META_OIFNAME, reg(0));
                    exprs.push(addr_payload(*family, AddrField::Destination, 4));
                    exprs.push(self.lookup_absent(set, &object)?);
                }
                Match::NdTargetInSet { set } => {
                    exprs.push(nd_target(reg(0)));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::IifnameNdTargetNotInSet { set } => {
                    exprs.meta(libc::NFT_META_IIFNAME, reg(0));
                    exprs.push(nd_target(reg(4)));
                    exprs.push(self.lookup_absent(set, &object)?);
                }
                Match::NdTargetNotLinkLocal => exprs.nd_target_not_link_local(),
                Match::EtherType(ethertype) => exprs.ether_type(*ethertype),
                Match::IifLoopback => {
                    exprs.meta(libc::NFT_META_IIF, reg(0));
                    exprs.cmp(libc::NFT_CMP_EQ, LOOPBACK_IFINDEX.to_ne_bytes().to_vec());
                }
                Match::PktTypeHost => {
                    exprs.meta(libc::NFT_META_PKTTYPE, reg(0));
                    exprs.cmp(libc::NFT_CMP_EQ, vec![PACKET_HOST]);
                }
                Match::Icmpv6NotNextHeader => {
                    exprs.family(Family::V6);
                    exprs.push(Expr::Payload {
                        base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
                        offset: IP6_NEXTHDR_OFFSET,
                        len: 1,
                        dreg: reg(0),
                    });
                    exprs.cmp(libc::NFT_CMP_NEQ, vec![IPPROTO_ICMPV6]);
                }
                Match::IifnameSourceInSet { family, set } => {
                    exprs.family(*family);
                    exprs.meta(libc::NFT_META_IIFNAME, reg(0));
                    exprs.push(addr_payload(*family, AddrField::Source, 4));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::IifEtherSourceInSet { family, set } => {
                    exprs.family(*family);
                    exprs.meta(libc::NFT_META_IIF, reg(0));
                    exprs.push(ether_source(reg(1)));
                    exprs.push(addr_payload(*family, AddrField::Source, 3));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::IifnameEtherNotInSet { set } => {
                    exprs.meta(libc::NFT_META_IIFNAME, reg(0));
                    exprs.push(ether_source(reg(4)));
                    exprs.push(self.lookup_absent(set, &object)?);
                }
                Match::EtherSourceInSet { set } => {
                    exprs.push(ether_source(reg(0)));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::EtherDestInSet { set } => {
                    exprs.push(ether_destination(reg(0)));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::OifnameEtherDestNotInSet { set } => {
                    exprs.meta(libc::NFT_META_OIFNAME, reg(0));
                    exprs.push(ether_destination(reg(4)));
                    exprs.push(self.lookup_absent(set, &object)?);
                }
                Match::AddrPairInSet { family, set } => {
                    exprs.family(*family);
                    exprs.push(addr_payload(*family, AddrField::Source, 0));
                    exprs.push(addr_payload(
                        *family,
                        AddrField::Destination,
                        addr_len(*family) / 4,
                    ));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::DestinationPortInSet { family, set } => {
                    let words = addr_len(*family) / 4;
                    exprs.family(*family);
                    exprs.push(addr_payload(*family, AddrField::Destination, 0));
                    exprs.meta(libc::NFT_META_L4PROTO, reg(words));
                    exprs.push(dport(reg(words + 1)));
                    exprs.push(self.lookup(set, &object, None)?);
                }
                Match::Protocol(p) => {
                    exprs.meta(libc::NFT_META_L4PROTO, reg(0));
                    exprs.cmp(libc::NFT_CMP_EQ, vec![p.number()]);
                }
                Match::L4Proto(number) => {
                    exprs.meta(libc::NFT_META_L4PROTO, reg(0));
                    exprs.cmp(libc::NFT_CMP_EQ, vec![*number]);
                }
                Match::DestinationPort(lo, hi) => {
                    exprs.push(dport(reg(0)));
                    if lo == hi {
                        exprs.cmp(libc::NFT_CMP_EQ, lo.to_be_bytes().to_vec());
                    } else {
                        exprs.cmp(libc::NFT_CMP_GTE, lo.to_be_bytes().to_vec());
                        exprs.cmp(libc::NFT_CMP_LTE, hi.to_be_bytes().to_vec());
                    }
                }
            }
        }
        match &rule.verdict {
            Verdict::Accept => exprs.push(Expr::Verdict(libc::NF_ACCEPT)),
            Verdict::Drop => exprs.push(Expr::Verdict(libc::NF_DROP)),
            Verdict::Return => exprs.push(Expr::Verdict(libc::NFT_RETURN)),
            Verdict::Vmap { family, field, map } => {
                exprs.family(*family);
                exprs.push(addr_payload(*family, *field, 0));
                let verdict = Some(libc::NFT_REG_VERDICT as u32);
                exprs.push(self.lookup(map, &object, verdict)?);
            }
            Verdict::Jump(target) => exprs.push(Expr::Jump(cstring(target, &object)?)),
            Verdict::StampAccept { mask, value } => {
                exprs.ct_mark(!mask, *value);
                exprs.push(Expr::CtSet {
                    key: libc::NFT_CT_MARK as u32,
                    sreg: reg(0),
                });
                exprs.push(Expr::Verdict(libc::NF_ACCEPT));
            }
        }
        let udata = match &rule.comment {
            Some(text) => comment(udata::COMMENT, text, true, &object)?,
            None => None,
        };
        let op = Op::AddRule {
            table: self.table.clone(),
            chain: cstring(chain, &object)?,
            exprs: exprs.list,
            udata,
        };
        self.push(op, object);
        Ok(())
    }

    fn lookup(&self, set: &str, object: &str, dreg: Option<u32>) -> Result<Expr, WriteError> {
        Ok(Expr::Lookup {
            sreg: reg(0),
            dreg,
            invert: false,
            set: cstring(set, object)?,
            set_id: self.new_sets.get(set).copied(),
        })
    }

    /// `!= @set`: a lookup that matches when the key is not in `set`.
    fn lookup_absent(&self, set: &str, object: &str) -> Result<Expr, WriteError> {
        let mut lookup = self.lookup(set, object, None)?;
        if let Expr::Lookup { invert, .. } = &mut lookup {
            *invert = true;
        }
        Ok(lookup)
    }

    /// The anonymous constant set of `icmpv6 type { ... }`, as nft builds it for the rule.
    fn icmpv6_set(&mut self, rule: &str, types: &[u8]) -> Result<(CString, u32), WriteError> {
        let object = format!("ICMPv6 type set of {rule}");
        let name = cstring(ANONYMOUS_SET, &object)?;
        let id = self.set_id();
        let mut payload = tlv(udata::TYPEOF_EXPR, &udata::PAYLOAD_ICMPV6.to_ne_bytes());
        payload.extend(tlv(
            udata::TYPEOF_DATA,
            &udata::PAYLOAD_ICMPV6_TYPE.to_ne_bytes(),
        ));
        let mut typeof_key = tlv(udata::TYPEOF_EXPR, &udata::EXPR_PAYLOAD.to_ne_bytes());
        typeof_key.extend(tlv(udata::TYPEOF_DATA, &payload));
        let mut data = tlv(udata::SET_KEYBYTEORDER, &udata::BIG_ENDIAN.to_ne_bytes());
        data.extend(tlv(udata::SET_KEY_TYPEOF, &typeof_key));
        let op = Op::AddSet(SetSpec {
            table: self.table.clone(),
            name: name.clone(),
            id,
            flags: (libc::NFT_SET_ANONYMOUS | libc::NFT_SET_CONSTANT) as u32,
            key_type: datatype::ICMPV6_TYPE,
            key_len: 1,
            verdict_map: false,
            size: u32::try_from(types.len()).ok(),
            udata: data,
        });
        self.push(op, object.clone());
        let list = ElementList {
            table: self.table.clone(),
            set: name.clone(),
            set_id: Some(id),
            elements: types.iter().map(|t| plain_element(vec![*t])).collect(),
        };
        self.push(Op::AddElements(list), format!("elements of the {object}"));
        Ok((name, id))
    }
}

/// A verdict map element: the address, `jump <chain>` and the pod's name as comment.
fn map_element(ip: IpAddr, entry: &MapEntry) -> Result<ElementSpec, WriteError> {
    let object = format!("map entry {ip}");
    Ok(ElementSpec {
        jump: Some(cstring(&entry.chain, &object)?),
        udata: comment(udata::COMMENT, &entry.comment, true, &object)?,
        ..plain_element(addr_bytes(ip))
    })
}

/// A comment as nft stores it: NUL-terminated, with double quotes turned into apostrophes as
/// the renderer does (nft cannot print them back). Empty comments are left out unless `always`.
fn comment(
    kind: u8,
    text: &str,
    always: bool,
    object: &str,
) -> Result<Option<Vec<u8>>, WriteError> {
    if text.is_empty() && !always {
        return Ok(None);
    }
    let text = text.replace('"', "'");
    if text.len() > COMMENT_MAX {
        return Err(WriteError::Invalid {
            object: object.to_string(),
            reason: format!(
                "comment of {} bytes; nft accepts at most {COMMENT_MAX}",
                text.len()
            ),
        });
    }
    let text = cstring(&text, object)?;
    Ok(Some(tlv(kind, text.as_bytes_with_nul())))
}

/// A name or comment as a C string; names are at most what the kernel accepts
/// (`NFT_NAME_MAXLEN`, 256 bytes with the NUL).
fn cstring(text: &str, object: &str) -> Result<CString, WriteError> {
    let invalid = |reason: String| WriteError::Invalid {
        object: object.to_string(),
        reason,
    };
    if text.len() > 255 {
        return Err(invalid(format!(
            "{} bytes long; nf_tables names and comments take at most 255",
            text.len()
        )));
    }
    CString::new(text).map_err(|_| invalid(format!("{text:?} contains a NUL byte")))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ruleset::ir::BaseChain;

    use super::*;

    #[test]
    fn large_sets_split_into_messages_that_fit() {
        let elements: BTreeSet<Element> = (0..20_000u32)
            .map(|n| Element::Addr(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))))
            .collect();
        let table = Table {
            name: "t".into(),
            sets: [(
                "s".to_string(),
                Set {
                    name: "s".into(),
                    key: SetKey::Addr(Family::V4),
                    interval: false,
                    comment: String::new(),
                    elements,
                },
            )]
            .into(),
            ..Table::default()
        };
        let messages = replace(&table).unwrap();
        let lists: Vec<&ElementList> = messages
            .iter()
            .filter_map(|m| match &m.op {
                Op::AddElements(l) => Some(l),
                _ => None,
            })
            .collect();
        assert!(lists.len() > 1);
        assert_eq!(
            lists.iter().map(|l| l.elements.len()).sum::<usize>(),
            20_000
        );
        for list in lists {
            let bytes: usize = list.elements.iter().map(encoded_size).sum();
            assert!(bytes <= ELEMENT_BYTES_PER_MESSAGE);
        }
    }

    #[test]
    fn a_delta_flushes_before_deleting_sets_and_deletes_chains_last() {
        let chain = Chain {
            name: "c".into(),
            base: Some(BaseChain {
                hook: Hook::Input,
                priority: 0,
            }),
            comment: String::new(),
            rules: vec![Rule {
                matches: vec![],
                verdict: Verdict::Drop,
                comment: None,
            }],
        };
        let delta = Delta {
            replace_chains: vec![chain],
            delete_sets: vec!["old".into()],
            delete_chains: vec!["gone".into()],
            ..Delta::default()
        };
        let objects: Vec<String> = apply(TableFamily::Inet, "t", &delta)
            .unwrap()
            .into_iter()
            .map(|m| m.object)
            .collect();
        assert_eq!(
            objects,
            [
                "rules of chain c (flush)",
                "rules of chain gone (flush)",
                "set old (deletion)",
                "rule 1 of chain c",
                "chain gone (deletion)",
            ]
        );
    }

    #[test]
    fn overlong_comments_and_nul_bytes_are_refused_with_the_object() {
        let err = comment(0, &"x".repeat(129), false, "chain c").unwrap_err();
        assert!(err.to_string().starts_with("chain c: comment of 129 bytes"));
        assert!(cstring("a\0b", "set a").is_err());
        assert_eq!(
            comment(0, "say \"hi\"", false, "rule").unwrap().unwrap()[2..],
            *b"say 'hi'\0"
        );
    }
}
