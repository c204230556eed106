//! Clearing the epoch bits of conntrack marks over ctnetlink, so that an epoch value is free
//! before the ruleset uses it again (see `ruleset::epoch`).
//!
//! ```text
//! dump (IPCTNL_MSG_CT_GET, optionally filtered by mark & mask == value)
//!   -> original tuple (and zone) of every entry whose bits are set
//!   -> update each (IPCTNL_MSG_CT_NEW without NLM_F_CREATE): CTA_MARK 0 under CTA_MARK_MASK
//! ```
//! The kernel applies `mark = (mark & ~mask) ^ 0` to each entry: the other bits of the mark
//! stay as they are. An entry that ends between the dump and its update is no error.

use std::io;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_MARK: u16 = 8;
const CTA_ZONE: u16 = 18;
const CTA_MARK_MASK: u16 = 21;
const NLA_TYPE_MASK: u16 = 0x3fff;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const AF_UNSPEC: u8 = 0;
const ENOENT: i32 = 2;

const RECEIVE_BUFFER: usize = 256 * 1024;
/// recv(2) flag: return the datagram's real length even when it did not fit.
const MSG_TRUNC: i32 = 0x20;
/// Tries of a dump the kernel marks as interrupted by concurrent changes.
const DUMP_ATTEMPTS: u32 = 3;
/// Updates sent before their acknowledgements are read.
const UPDATES_IN_FLIGHT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("ctnetlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("ctnetlink {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("ctnetlink dump interrupted by concurrent changes {0} times")]
    Interrupted(u32),
    #[error("ctnetlink reply of {0} bytes did not fit the buffer")]
    Truncated(usize),
    #[error("ctnetlink reply malformed")]
    Malformed,
}

/// Which connections to clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// Those whose bits of the mask hold this value (in place, as in the mark).
    Value(u32),
    /// Every connection with any bit of the mask set.
    Any,
    /// Every connection with any bit of the mask set, but not holding one of these values (in
    /// place, as in the mark).
    AnyBut([u32; 2]),
}

/// Clears the bits of `mask` in the mark of the connections `which` selects; how many were
/// updated.
pub fn clear(mask: u32, which: Which) -> Result<usize, ConntrackError> {
    let mut ct = Ctnl::open()?;
    let entries = ct.dump(mask, which)?;
    ct.update(&entries, mask)?;
    Ok(entries.len())
}

/// One tracked connection as an update needs to name it.
struct Entry {
    family: u8,
    /// Attributes copied as the dump gave them: the original tuple, and the zone if any.
    key: Vec<u8>,
}

struct Ctnl {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Ctnl {
    fn open() -> Result<Self, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Socket)?;
        socket.bind_auto().map_err(ConntrackError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(ConntrackError::Socket)?;
        Ok(Ctnl {
            socket,
            sequence: 0,
            buffer: Vec::with_capacity(RECEIVE_BUFFER),
        })
    }

    fn dump(&mut self, mask: u32, which: Which) -> Result<Vec<Entry>, ConntrackError> {
        for _ in 0..DUMP_ATTEMPTS {
            if let Some(entries) = self.dump_once(mask, which)? {
                return Ok(entries);
            }
        }
        Err(ConntrackError::Interrupted(DUMP_ATTEMPTS))
    }

    fn dump_once(&mut self, mask: u32, which: Which) -> Result<Option<Vec<Entry>>, ConntrackError> {
        let mut attributes = Vec::new();
        if let Which::Value(value) = which {
            attribute(&mut attributes, CTA_MARK, &value.to_be_bytes());
            attribute(&mut attributes, CTA_MARK_MASK, &mask.to_be_bytes());
        }
        let sequence = self.send(
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            AF_UNSPEC,
            &attributes,
            "dump",
        )?;
        let mut entries = Vec::new();
        let mut interrupted = false;
        loop {
            let len = self.receive("dump")?;
            for (kind, flags, seq, payload) in messages(&self.buffer[..len]) {
                if seq != sequence {
                    continue;
                }
                interrupted |= flags & NLM_F_DUMP_INTR != 0;
                match kind {
                    NLMSG_DONE => return Ok((!interrupted).then_some(entries)),
                    NLMSG_ERROR => match error_code(payload) {
                        Some(0) => {}
                        Some(code) => {
                            return Err(ConntrackError::Io {
                                what: "dump",
                                source: io::Error::from_raw_os_error(-code),
                            })
                        }
                        None => return Err(ConntrackError::Malformed),
                    },
                    _ => {
                        if let Some((entry, mark)) = entry(payload, mask) {
                            let kept = matches!(which, Which::AnyBut(keep) if keep.contains(&mark));
                            if !kept {
                                entries.push(entry);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Sends the updates in rounds, reading every acknowledgement; a connection gone since
    /// the dump (ENOENT) is fine.
    fn update(&mut self, entries: &[Entry], mask: u32) -> Result<(), ConntrackError> {
        for round in entries.chunks(UPDATES_IN_FLIGHT) {
            let mut pending = Vec::with_capacity(round.len());
            for e in round {
                let mut attributes = e.key.clone();
                attribute(&mut attributes, CTA_MARK, &0u32.to_be_bytes());
                attribute(&mut attributes, CTA_MARK_MASK, &mask.to_be_bytes());
                pending.push(self.send(
                    IPCTNL_MSG_CT_NEW,
                    NLM_F_REQUEST | NLM_F_ACK,
                    e.family,
                    &attributes,
                    "update",
                )?);
            }
            while !pending.is_empty() {
                let len = self.receive("update")?;
                for (kind, _, seq, payload) in messages(&self.buffer[..len]) {
                    if kind != NLMSG_ERROR {
                        continue;
                    }
                    let Some(at) = pending.iter().position(|s| *s == seq) else {
                        continue;
                    };
                    pending.swap_remove(at);
                    match error_code(payload) {
                        Some(0) => {}
                        Some(code) if -code == ENOENT => {}
                        Some(code) => {
                            return Err(ConntrackError::Io {
                                what: "update",
                                source: io::Error::from_raw_os_error(-code),
                            })
                        }
                        None => return Err(ConntrackError::Malformed),
                    }
                }
            }
        }
        Ok(())
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        family: u8,
        attributes: &[u8],
        what: &'static str,
    ) -> Result<u32, ConntrackError> {
        self.sequence = self.sequence.wrapping_add(1);
        let length = 16 + 4 + attributes.len();
        let mut bytes = Vec::with_capacity(length);
        bytes.extend_from_slice(&(length as u32).to_ne_bytes());
        bytes.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&self.sequence.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, resource id 0.
        bytes.extend_from_slice(&[family, 0, 0, 0]);
        bytes.extend_from_slice(attributes);
        self.socket
            .send(&bytes, 0)
            .map_err(|source| ConntrackError::Io { what, source })?;
        Ok(self.sequence)
    }

    fn receive(&mut self, what: &'static str) -> Result<usize, ConntrackError> {
        self.buffer.clear();
        let len = self
            .socket
            .recv(&mut self.buffer, MSG_TRUNC)
            .map_err(|source| ConntrackError::Io { what, source })?;
        if len > self.buffer.len() {
            return Err(ConntrackError::Truncated(len));
        }
        Ok(len)
    }
}

/// Appends one netlink attribute, padded to four bytes.
fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The messages in a datagram: type, flags, sequence and payload.
fn messages(mut bytes: &[u8]) -> impl Iterator<Item = (u16, u16, u32, &[u8])> {
    std::iter::from_fn(move || {
        let header = bytes.get(..16)?;
        let length = u32::from_ne_bytes(header[0..4].try_into().ok()?) as usize;
        if length < 16 || length > bytes.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(header[4..6].try_into().ok()?);
        let flags = u16::from_ne_bytes(header[6..8].try_into().ok()?);
        let sequence = u32::from_ne_bytes(header[8..12].try_into().ok()?);
        let payload = &bytes[16..length];
        bytes = bytes.get(length.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, flags, sequence, payload))
    })
}

/// The error code of an NLMSG_ERROR payload (0 for an acknowledgement).
fn error_code(payload: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

/// The attributes of a payload after its `skip`-byte header: type (flags stripped) and the
/// whole attribute, header included.
fn attributes(payload: &[u8], skip: usize) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    let mut rest = payload.get(skip..).unwrap_or(&[]);
    std::iter::from_fn(move || {
        let length = u16::from_ne_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(rest.get(2..4)?.try_into().ok()?) & NLA_TYPE_MASK;
        if length < 4 || length > rest.len() {
            return None;
        }
        let (whole, value) = (&rest[..length], &rest[4..length]);
        rest = rest.get(length.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, whole, value))
    })
}

/// The entry a dumped connection is, with the bits of `mask` in its mark, when any of them is
/// set.
fn entry(payload: &[u8], mask: u32) -> Option<(Entry, u32)> {
    let family = *payload.first()?;
    let mut key = Vec::new();
    let mut mark = 0;
    for (kind, whole, value) in attributes(payload, 4) {
        match kind {
            CTA_TUPLE_ORIG | CTA_ZONE => {
                key.extend_from_slice(whole);
                key.resize(key.len().next_multiple_of(4), 0);
            }
            CTA_MARK => mark = u32::from_be_bytes(value.try_into().ok()?),
            _ => {}
        }
    }
    (mark & mask != 0 && !key.is_empty()).then_some((Entry { family, key }, mark & mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_keeps_its_tuple_and_zone_and_needs_bits_of_the_mask() {
        let mut payload = vec![2, 0, 0, 0];
        attribute(
            &mut payload,
            CTA_TUPLE_ORIG | 0x8000,
            &[1, 2, 3, 4, 5, 6, 7, 8],
        );
        attribute(&mut payload, CTA_MARK, &0x0300_0010u32.to_be_bytes());
        attribute(&mut payload, CTA_ZONE, &7u16.to_be_bytes());
        let (e, mark) = entry(&payload, 0xff00_0000).expect("marked");
        assert_eq!(mark, 0x0300_0000);
        assert_eq!(e.family, 2);
        assert_eq!(e.key.len(), 12 + 8);
        assert!(entry(&payload, 0x00ff_0000).is_none());
    }
}
