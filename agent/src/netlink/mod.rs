//! Writes the compiled table into the kernel over nf_tables netlink, one transaction per call.
//!
//! ```text
//! ir::Table --plan::replace--> messages (delete the old table, create the new one whole)
//! diff::Delta --plan::apply--> messages (new objects, flushed chains, elements, deletions)
//!     messages --sys::encode--> one nf_tables batch --send--> kernel
//!     kernel --one acknowledgement per message--> Ok(Sent) or the refused object
//! ```
//!
//! A batch lands whole or not at all: the kernel checks every message before it commits, and
//! on any error it rolls the batch back. Every message asks for an acknowledgement, and an
//! error names the object whose message was refused. What the kernel holds afterwards is what
//! `nft -f` makes of [`ruleset::render()`]'s text for the same table, down to the user data that
//! `nft list` prints comments and set types from.

mod element;
mod expr;
mod monitor;
#[cfg(test)]
mod parity;
mod plan;
mod readback;
mod sys;
mod udata;

use std::collections::BTreeMap;
use std::io;

use ruleset::diff::Delta;
use ruleset::ir::{Table, TableFamily};

pub use monitor::Monitor;
pub use readback::{Reuse, TableImage};

/// Why a table or delta did not reach the kernel. Except after `Receive` and `Unanswered`,
/// the kernel's ruleset is as it was.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The IR holds something no message can carry (a NUL byte, an overlong comment, an
    /// element of the wrong shape for its set).
    #[error("{object}: {reason}")]
    Invalid { object: String, reason: String },
    #[error("cannot build the netlink message for {object}: too large, or out of memory")]
    Unencodable { object: String },
    #[error("nf_tables netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("sending a batch of {messages} messages ({bytes} bytes): {source}")]
    Send {
        messages: usize,
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("reading the kernel's replies: {0}; the batch may or may not have been applied")]
    Receive(#[source] io::Error),
    /// The kernel rejected the batch and rolled it back.
    #[error("the kernel refused {object}: {error}{}", more_refused(*.others))]
    Refused {
        object: String,
        error: io::Error,
        /// Further messages of the same batch that were refused too.
        others: usize,
    },
    /// Another transaction was committed while the agent read its tables back, or between its
    /// own commit and that reading: what was read cannot be told apart from it.
    #[error("another nf_tables transaction came while our tables were read back")]
    Moved,
    #[error("no reply to {missing} of {expected} messages (the first: {first}); the batch may or may not have been applied")]
    Unanswered {
        missing: usize,
        expected: usize,
        first: String,
    },
}

impl WriteError {
    /// The kernel refused a [`Writer::commit_at`] batch because something was committed
    /// since the generation it named (`ERESTART`); nothing of the batch was applied.
    pub fn is_stale(&self) -> bool {
        matches!(self, WriteError::Refused { error, .. }
            if error.raw_os_error() == Some(nftnl_sys::libc::ERESTART))
    }
}

fn more_refused(others: usize) -> String {
    match others {
        0 => String::new(),
        n => format!(" (and {n} later messages of the batch)"),
    }
}

/// Size of a batch the kernel accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Object messages, not counting the batch start and end.
    pub messages: usize,
    pub bytes: usize,
}

/// One table's part of a transaction.
#[derive(Clone, Copy, Debug)]
pub enum Change<'a> {
    /// Create the table, or replace the one in the kernel, whole.
    Replace(&'a Table),
    /// Apply a delta to the table in the kernel.
    Delta {
        family: TableFamily,
        table: &'a str,
        delta: &'a Delta,
    },
}

/// What deltas changed in one table, by name: what a read-back after them must read again
/// ([`Writer::table_image`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Named<'a> {
    /// Sets (and maps) created, deleted, or with elements added or removed.
    pub sets: std::collections::BTreeSet<&'a str>,
    /// Chains created, replaced or deleted.
    pub chains: std::collections::BTreeSet<&'a str>,
}

impl<'a> Named<'a> {
    pub fn by(delta: &'a Delta) -> Named<'a> {
        let mut named = Named::default();
        named.add(delta);
        named
    }

    pub fn add(&mut self, delta: &'a Delta) {
        let sets = &mut self.sets;
        sets.extend(delta.add_sets.iter().map(|set| set.name.as_str()));
        sets.extend(delta.delete_sets.iter().map(String::as_str));
        sets.extend(delta.add_elements.keys().map(String::as_str));
        sets.extend(delta.remove_elements.keys().map(String::as_str));
        sets.extend(delta.add_map_entries.keys().map(String::as_str));
        sets.extend(delta.remove_map_entries.keys().map(String::as_str));
        let chains = &mut self.chains;
        chains.extend(delta.add_chains.iter().map(|chain| chain.name.as_str()));
        chains.extend(delta.replace_chains.iter().map(|chain| chain.name.as_str()));
        chains.extend(delta.delete_chains.iter().map(String::as_str));
    }
}

/// A netlink socket to nf_tables in the network namespace of the thread that opened it.
pub struct Writer {
    socket: sys::Socket,
    /// Sequence numbers of queries, counting down from the top, far from batches' numbers.
    query_seq: u32,
}

impl Writer {
    pub fn new() -> Result<Writer, WriteError> {
        let socket = sys::Socket::open().map_err(WriteError::Socket)?;
        Ok(Writer {
            socket,
            query_seq: u32::MAX,
        })
    }

    /// The port of the socket this writer commits through, as nf_tables' notifications of its
    /// transactions carry it.
    pub fn port(&self) -> u32 {
        self.socket.port()
    }

    /// Replaces `table <family> <table.name>`, or creates it, in one transaction: no packet
    /// ever sees the table missing or half built. Other tables are not touched.
    pub fn replace_table(&mut self, table: &Table) -> Result<Sent, WriteError> {
        self.commit(&[Change::Replace(table)])
    }

    /// Applies `delta` to the existing `table inet <table>` in one transaction. A replaced
    /// chain gets its rules replaced; its comment and hook stay as they were (chain names
    /// already change with what shapes a chain).
    pub fn apply_delta(&mut self, table: &str, delta: &Delta) -> Result<Sent, WriteError> {
        self.commit(&[Change::Delta {
            family: TableFamily::Inet,
            table,
            delta,
        }])
    }

    /// Makes every change, to one table or several, in one transaction: all land or none.
    pub fn commit(&mut self, changes: &[Change<'_>]) -> Result<Sent, WriteError> {
        self.commit_checked(changes, None)
    }

    /// [`Writer::commit`], but only if the nf_tables generation is still `generation`
    /// (nothing was committed since): the batch start carries it, as `nft` sends it, and the
    /// kernel refuses the whole batch otherwise ([`WriteError::is_stale`]). For deltas worked
    /// out against what the caller last found in the kernel.
    pub fn commit_at(
        &mut self,
        changes: &[Change<'_>],
        generation: u32,
    ) -> Result<Sent, WriteError> {
        self.commit_checked(changes, Some(generation))
    }

    /// [`Writer::commit_at`] the generation read just before sending, so that another
    /// transaction between the reading and the kernel's check is unlikely: the batch is
    /// planned and encoded first, once. A stale refusal is sent again, at most `attempts`
    /// times in all. Returns what was sent and the generation it was checked at.
    pub fn commit_at_latest(
        &mut self,
        changes: &[Change<'_>],
        attempts: usize,
    ) -> Result<(Sent, u32), WriteError> {
        let messages = plan_all(changes)?;
        let encoded = encode(&messages)?;
        let mut tries = 0;
        loop {
            tries += 1;
            let generation = self.generation()?;
            if messages.is_empty() {
                return Ok((Sent::default(), generation));
            }
            let mut bytes = encoded.bytes.clone();
            with_generation(&mut bytes, generation)?;
            match self.transmit(&messages, &encoded, &bytes) {
                Err(err) if err.is_stale() && tries < attempts => continue,
                result => return result.map(|sent| (sent, generation)),
            }
        }
    }

    fn commit_checked(
        &mut self,
        changes: &[Change<'_>],
        generation: Option<u32>,
    ) -> Result<Sent, WriteError> {
        let messages = plan_all(changes)?;
        self.send(&messages, generation)
    }

    /// Whether `table inet <name>` is in the kernel: how the agent notices that its table was
    /// removed behind its back (`nft flush ruleset`, `nft delete table`).
    pub fn table_exists(&mut self, name: &str) -> Result<bool, WriteError> {
        self.has_table(TableFamily::Inet, name)
    }

    /// Whether `table <family> <name>` is in the kernel.
    pub fn has_table(&mut self, family: TableFamily, name: &str) -> Result<bool, WriteError> {
        const NEWTABLE: u16 = 10 << 8;
        const SEQ: u32 = u32::MAX;
        if name.contains('\0') {
            return Ok(false);
        }
        while self.socket.recv().map_err(WriteError::Socket)?.is_some() {}
        self.socket
            .send(&get_table_request(family, name, SEQ))
            .map_err(|source| WriteError::Send {
                messages: 1,
                bytes: 0,
                source,
            })?;
        let (mut found, mut answered) = (false, false);
        while let Some(datagram) = self.socket.recv().map_err(WriteError::Receive)? {
            for message in netlink_messages(datagram).filter(|m| m.seq == SEQ) {
                if message.kind == NEWTABLE {
                    found = true;
                } else if message.kind == NLMSG_ERROR {
                    answered = true;
                    let errno =
                        u32_at(message.bytes, HEADER).map_or(0, |e| (e as i32).saturating_neg());
                    let error = io::Error::from_raw_os_error(errno);
                    if errno != 0 && error.kind() != io::ErrorKind::NotFound {
                        return Err(WriteError::Refused {
                            object: format!("query for table {} {name}", family.nft_name()),
                            error,
                            others: 0,
                        });
                    }
                }
            }
        }
        if !answered {
            return Err(WriteError::Unanswered {
                missing: 1,
                expected: 1,
                first: format!("query for table {} {name}", family.nft_name()),
            });
        }
        Ok(found)
    }

    fn next_query_seq(&mut self) -> u32 {
        self.query_seq = self.query_seq.checked_sub(1).unwrap_or(u32::MAX - 1);
        if self.query_seq < u32::MAX / 2 {
            self.query_seq = u32::MAX - 1;
        }
        self.query_seq
    }

    fn send(
        &mut self,
        messages: &[plan::Message],
        generation: Option<u32>,
    ) -> Result<Sent, WriteError> {
        if messages.is_empty() {
            return Ok(Sent::default());
        }
        let mut encoded = encode(messages)?;
        if let Some(generation) = generation {
            with_generation(&mut encoded.bytes, generation)?;
        }
        self.transmit(messages, &encoded, &encoded.bytes)
    }

    /// Sends `bytes` (`encoded`, or it with the batch start amended) and reads every
    /// acknowledgement.
    fn transmit(
        &mut self,
        messages: &[plan::Message],
        encoded: &sys::Encoded,
        bytes: &[u8],
    ) -> Result<Sent, WriteError> {
        let batch = Sequence::new(encoded.seqs.clone(), u32_at(bytes, 8), messages.len());
        let sent = Sent {
            messages: messages.len(),
            bytes: bytes.len(),
        };
        // Replies left over from an earlier batch that failed half way would be misread.
        while self.socket.recv().map_err(WriteError::Socket)?.is_some() {}
        self.socket
            .reserve(bytes.len(), encoded.seqs.len())
            .map_err(WriteError::Socket)?;
        self.socket.send(bytes).map_err(|source| WriteError::Send {
            messages: sent.messages,
            bytes: sent.bytes,
            source,
        })?;
        let mut answers: BTreeMap<u32, i32> = BTreeMap::new();
        while let Some(datagram) = self.socket.recv().map_err(WriteError::Receive)? {
            for (seq, errno) in acknowledgements(datagram) {
                if batch.answers(seq) {
                    answers.insert(seq, errno);
                }
            }
        }
        let describe = |seq: u32| batch.describe(seq, messages);
        let mut refused = answers.iter().filter(|(_, errno)| **errno != 0);
        if let Some((seq, errno)) = refused.next() {
            return Err(WriteError::Refused {
                object: describe(*seq),
                error: io::Error::from_raw_os_error(*errno),
                others: refused.count(),
            });
        }
        let missing: Vec<u32> = batch
            .messages
            .clone()
            .filter(|s| !answers.contains_key(s))
            .collect();
        if let Some(first) = missing.first() {
            return Err(WriteError::Unanswered {
                missing: missing.len(),
                expected: messages.len(),
                first: describe(*first),
            });
        }
        Ok(sent)
    }
}

/// Every change's messages, in order.
fn plan_all(changes: &[Change<'_>]) -> Result<Vec<plan::Message>, WriteError> {
    let mut messages = Vec::new();
    for change in changes {
        messages.extend(match change {
            Change::Replace(table) => plan::replace(table)?,
            Change::Delta {
                family,
                table,
                delta,
            } => plan::apply(*family, table, delta)?,
        });
    }
    Ok(messages)
}

/// The batch framing `messages`, naming the one that could not be built.
fn encode(messages: &[plan::Message]) -> Result<sys::Encoded, WriteError> {
    sys::encode(messages.iter()).map_err(|sys::Unencodable(i)| WriteError::Unencodable {
        object: messages
            .get(i)
            .map_or_else(String::new, |m| m.object.clone()),
    })
}

/// Which sequence number went to which message of a batch.
struct Sequence {
    /// Every message that asks for an acknowledgement.
    acked: std::ops::Range<u32>,
    /// The batch start's own number.
    start: Option<u32>,
    /// The object messages.
    messages: std::ops::Range<u32>,
}

impl Sequence {
    /// `acked` holds the object messages, and the batch start and end when the kernel
    /// acknowledges those too; `start` is the number the batch start carries.
    fn new(acked: std::ops::Range<u32>, start: Option<u32>, count: usize) -> Sequence {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        let framed = acked.len() > count as usize;
        let first = if framed { acked.start + 1 } else { acked.start };
        Sequence {
            acked,
            start,
            messages: first..first.saturating_add(count),
        }
    }

    /// Whether an acknowledgement numbered `seq` is for this batch. Before Linux 6.10 the
    /// batch start carries 0 and asks for none, but a refusal of it (a stale generation)
    /// still comes, numbered 0.
    fn answers(&self, seq: u32) -> bool {
        self.acked.contains(&seq) || Some(seq) == self.start
    }

    fn describe(&self, seq: u32, messages: &[plan::Message]) -> String {
        if seq < self.messages.start {
            return "the batch start".into();
        }
        if seq >= self.messages.end {
            return "the batch end".into();
        }
        let index = (seq - self.messages.start) as usize;
        messages
            .get(index)
            .map_or_else(|| format!("message {seq}"), |m| m.object.clone())
    }
}

/// Adds `NFNL_BATCH_GENID` to the batch start at the head of `batch`, which must be the bare
/// header libnftnl writes; [`WriteError::Unencodable`] when it is not.
fn with_generation(batch: &mut Vec<u8>, generation: u32) -> Result<(), WriteError> {
    const NFNL_MSG_BATCH_BEGIN: u16 = 16;
    const NFNL_BATCH_GENID: u16 = 1;
    const BARE: usize = HEADER + 4;
    let bare = u32_at(batch, 0) == Some(BARE as u32)
        && batch.get(4..6) == Some(&NFNL_MSG_BATCH_BEGIN.to_ne_bytes()[..]);
    if !bare {
        return Err(WriteError::Unencodable {
            object: "the batch start".into(),
        });
    }
    let mut attribute = Vec::with_capacity(8);
    attribute.extend_from_slice(&8u16.to_ne_bytes());
    attribute.extend_from_slice(&NFNL_BATCH_GENID.to_ne_bytes());
    attribute.extend_from_slice(&generation.to_be_bytes());
    batch.splice(BARE..BARE, attribute);
    batch[0..4].copy_from_slice(&((BARE + 8) as u32).to_ne_bytes());
    Ok(())
}

/// `(sequence number, errno)` of each acknowledgement (`NLMSG_ERROR`) in a datagram; errno 0
/// means accepted.
fn acknowledgements(datagram: &[u8]) -> Vec<(u32, i32)> {
    netlink_messages(datagram)
        .filter(|m| m.kind == NLMSG_ERROR)
        .filter_map(|m| Some((m.seq, (u32_at(m.bytes, HEADER)? as i32).saturating_neg())))
        .collect()
}

const NLMSG_ERROR: u16 = 2;
const HEADER: usize = 16;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One netlink message of a datagram: its type, sequence number and bytes (header included).
struct NetlinkMessage<'a> {
    kind: u16,
    seq: u32,
    bytes: &'a [u8],
}

/// The messages of a datagram, stopping at the first malformed length.
fn netlink_messages(datagram: &[u8]) -> impl Iterator<Item = NetlinkMessage<'_>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        let len = u32_at(rest, 0)? as usize;
        if len < HEADER || len > rest.len() {
            return None;
        }
        let (message, tail) = rest.split_at(len);
        rest = tail
            .get(len.next_multiple_of(4) - len..)
            .unwrap_or_default();
        Some(NetlinkMessage {
            kind: u16::from_ne_bytes([message[4], message[5]]),
            seq: u32_at(message, 8)?,
            bytes: message,
        })
    })
}

/// A `NFT_MSG_GETTABLE` request for `table <family> <name>`, asking for an acknowledgement.
fn get_table_request(family: TableFamily, name: &str, seq: u32) -> Vec<u8> {
    const NFT_MSG_GETTABLE: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NFTA_TABLE_NAME: u16 = 1;
    request(
        NFT_MSG_GETTABLE,
        NLM_F_ACK,
        plan::nfproto(family) as u8,
        seq,
        &[(NFTA_TABLE_NAME, &nul_terminated(name))],
    )
}

/// An nf_tables request: netlink header, `nfgenmsg` and attributes.
fn request(kind: u16, flags: u16, nfproto: u8, seq: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NLM_F_REQUEST: u16 = 1;
    let mut msg = Vec::new();
    msg.extend(0u32.to_ne_bytes());
    msg.extend(((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
    msg.extend((NLM_F_REQUEST | flags).to_ne_bytes());
    msg.extend(seq.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    // nfgenmsg: family, version, resource id (big endian).
    msg.extend([nfproto, 0, 0, 0]);
    for (kind, value) in attrs {
        let len = 4 + value.len();
        msg.extend((len as u16).to_ne_bytes());
        msg.extend(kind.to_ne_bytes());
        msg.extend(*value);
        msg.resize(msg.len() + (len.next_multiple_of(4) - len), 0);
    }
    let total = msg.len() as u32;
    msg[..4].copy_from_slice(&total.to_ne_bytes());
    msg
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// A name attribute as the kernel sends it, without its terminating NUL.
fn until_nul(attribute: &[u8]) -> &[u8] {
    attribute.split(|b| *b == 0).next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(seq: u32, error: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(36u32.to_ne_bytes());
        m.extend(2u16.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(7u32.to_ne_bytes());
        m.extend(error.to_ne_bytes());
        m.extend([0; 16]);
        m
    }

    #[test]
    fn acknowledgements_are_read_by_sequence_number() {
        let datagram = [ack(3, 0), ack(4, -2)].concat();
        assert_eq!(acknowledgements(&datagram), [(3, 0), (4, 2)]);
        assert_eq!(acknowledgements(&datagram[..40]), [(3, 0)]);
    }

    #[test]
    fn sequence_numbers_map_back_to_messages() {
        let framed = Sequence::new(1..6, Some(1), 3);
        assert_eq!(framed.messages, 2..5);
        let bare = Sequence::new(1..4, Some(0), 3);
        assert_eq!(bare.messages, 1..4);
        assert_eq!(framed.describe(1, &[]), "the batch start");
        assert_eq!(framed.describe(5, &[]), "the batch end");
    }

    #[test]
    fn a_refused_batch_start_is_ours_on_kernels_that_do_not_ack_it() {
        let bare = Sequence::new(1..4, Some(0), 3);
        assert!(bare.answers(0));
        assert!(bare.answers(3));
        assert!(!bare.answers(4));
        assert_eq!(bare.describe(0, &[]), "the batch start");
        let framed = Sequence::new(1..6, Some(1), 3);
        assert!(!framed.answers(0));
    }

    #[test]
    fn a_batch_start_names_its_own_sequence_number() {
        let message = plan::Message {
            object: "table inet t".into(),
            family: 1,
            op: plan::Op::DeleteTable {
                table: std::ffi::CString::new("t").expect("no NUL"),
            },
        };
        let encoded = sys::encode([&message].into_iter()).expect("encodes");
        let start = u32_at(&encoded.bytes, 8).expect("a batch start");
        let batch = Sequence::new(encoded.seqs.clone(), Some(start), 1);
        assert!(batch.answers(start));
        assert_eq!(batch.describe(start, &[message]), "the batch start");
    }
}
