//! nf_tables change notifications (netlink group `NFNLGRP_NFTABLES`), so that a transaction
//! on other tables (kube-proxy's, Flannel's) is known to have left ours alone without reading
//! ours back.
//!
//! The kernel reports each committed transaction as one message per object it changed, each
//! naming the object's family and table, then `NEWGEN` with the generation the transaction
//! made and the port of the socket that sent it; transactions are reported one after another.
//! [`Monitor::untouched`] only ever vouches for a run of generations: every one of them
//! reported, none from the agent's own socket (its commits are accounted for by the caller),
//! none naming one of our tables. Anything short of that (a notification lost to a full
//! socket buffer, a transaction not reported yet, a message it cannot read) answers `false`,
//! and the caller reads the tables back as it would without a monitor.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use ruleset::ir::TABLE_NAME;

use super::readback::{attributes, NFTA_GEN_ID, NFT_MSG_NEWGEN};
use super::{netlink_messages, sys, u32_at, until_nul, Writer, HEADER};

/// `NFNLGRP_NFTABLES`: nf_tables' change notifications.
const GROUP: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// The families of our tables: `NFPROTO_INET` and `NFPROTO_BRIDGE`.
const OUR_FAMILIES: [u8; 2] = [1, 7];
/// `NFTA_*_TABLE` (or `NFTA_TABLE_NAME`): attribute 1 of every object message.
const ATTR_TABLE: u16 = 1;
/// Room for the notifications of a burst of other transactions (kube-proxy's syncs come a
/// second apart at most). A forced size needs CAP_NET_ADMIN, which the agent has.
const RECEIVE_BUFFER: usize = 4 << 20;
/// A datagram holds one notification skb, at most a page or two.
const DATAGRAM: usize = 1 << 16;
/// How long to wait for the report of a transaction whose generation is already visible:
/// the kernel bumps the generation before it walks the transaction's objects to report them.
const LAG: Duration = Duration::from_millis(20);
/// Transactions kept unasked for; beyond that the oldest are dropped, as if lost.
const KEEP: usize = 4096;

/// What the reports so far say about a run of generations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Yes,
    No,
    /// So far so good, but not every transaction of the run was reported yet.
    NotYet,
}

/// A reported transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Transaction {
    generation: u32,
    /// Sent from the writer's socket.
    ours: bool,
    /// One of its objects is in one of our tables (or named no table).
    touches_ours: bool,
}

/// What a batch of notifications says, independent of the socket they came from.
#[derive(Debug, Default)]
struct Log {
    /// The writer's port: transactions from it are the agent's.
    writer: u32,
    transactions: VecDeque<Transaction>,
    /// The transaction being reported touches our tables so far.
    pending: bool,
    /// Something was lost or unreadable since the last answer.
    lost: bool,
    /// Transactions up to this generation may have been reported in part (the socket joined
    /// the group while they were): taken as touching ours.
    partial_upto: Option<u32>,
}

impl Log {
    fn new(writer: u32) -> Self {
        Log {
            writer,
            ..Log::default()
        }
    }

    /// Takes in one datagram of notifications.
    fn read(&mut self, datagram: &[u8]) {
        for message in netlink_messages(datagram) {
            if message.kind >> 8 != NFNL_SUBSYS_NFTABLES {
                continue;
            }
            let payload = message.bytes.get(HEADER + 4..).unwrap_or_default();
            if message.kind & 0xff == NFT_MSG_NEWGEN {
                let generation = attributes(payload)
                    .find(|(kind, _)| *kind == NFTA_GEN_ID)
                    .and_then(|(_, v)| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)));
                let Some(generation) = generation else {
                    self.lost = true;
                    continue;
                };
                let port = u32_at(message.bytes, 12).unwrap_or(0);
                let partial = self
                    .partial_upto
                    .is_some_and(|upto| !is_after(generation, upto));
                if !partial {
                    self.partial_upto = None;
                }
                self.transactions.push_back(Transaction {
                    generation,
                    ours: port == self.writer,
                    touches_ours: std::mem::take(&mut self.pending) || partial,
                });
                if self.transactions.len() > KEEP {
                    self.transactions.pop_front();
                    self.lost = true;
                }
                continue;
            }
            let family = message.bytes.get(HEADER).copied();
            let table = attributes(payload)
                .find(|(kind, _)| *kind == ATTR_TABLE)
                .map(|(_, name)| until_nul(name));
            let ours = match (family, table) {
                (Some(family), Some(table)) => {
                    OUR_FAMILIES.contains(&family) && table == TABLE_NAME.as_bytes()
                }
                // A message whose family or table cannot be read might be about ours.
                _ => true,
            };
            self.pending |= ours;
        }
    }

    /// Whether every transaction after generation `since` up to `now` was reported, none of
    /// them the agent's and none touching our tables. Forgets what it no longer needs, and a
    /// loss once it has answered for it.
    fn untouched(&mut self, since: u32, now: u32) -> bool {
        if since == now {
            return true;
        }
        self.forget_upto(since);
        if std::mem::take(&mut self.lost) {
            // What was lost may belong to any transaction reported so far, or to one whose
            // report is still to come: the caller reads our tables back, and asks again only
            // about later generations.
            self.transactions.clear();
            self.pending = true;
            return false;
        }
        self.answer(since, now) == Answer::Yes
    }

    /// [`Log::untouched`] for the run after the agent's own commit that made generation
    /// `ours`: that transaction must have been reported as the agent's (a batch whose every
    /// message changed nothing commits nothing, and another transaction may then hold the
    /// generation the agent expected).
    fn untouched_after_own(&mut self, ours: u32, now: u32) -> bool {
        let reported_as_ours = self
            .transactions
            .iter()
            .any(|t| t.generation == ours && t.ours && !self.lost);
        reported_as_ours && self.untouched(ours, now)
    }

    /// What the transactions reported so far say about `since` up to `now`, `since` before
    /// `now`.
    fn answer(&self, since: u32, now: u32) -> Answer {
        let mut expected = next_generation(since);
        for t in self
            .transactions
            .iter()
            .filter(|t| is_after(t.generation, since))
        {
            if is_after(t.generation, now) {
                break;
            }
            if t.generation != expected || t.ours || t.touches_ours {
                return Answer::No;
            }
            if t.generation == now {
                return Answer::Yes;
            }
            expected = next_generation(expected);
        }
        if self.lost {
            Answer::No
        } else {
            Answer::NotYet
        }
    }

    /// Forgets the transactions up to generation `known`.
    fn forget_upto(&mut self, known: u32) {
        self.transactions.retain(|t| is_after(t.generation, known));
    }
}

/// The generation after `generation`: the kernel counts up and skips 0.
fn next_generation(generation: u32) -> u32 {
    generation.wrapping_add(1).max(1)
}

/// Whether `a` comes after `b`, allowing for the counter wrapping.
fn is_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// A socket subscribed to nf_tables' notifications in the agent's network namespace.
pub struct Monitor {
    socket: Socket,
    buffer: Vec<u8>,
    log: Log,
    joined: bool,
}

impl Monitor {
    /// Subscribes; `writer` is the port of the socket the agent commits through.
    pub fn new(writer: u32) -> io::Result<Monitor> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.set_non_blocking(true)?;
        if sys::force_receive_buffer(socket.as_raw_fd(), RECEIVE_BUFFER).is_err() {
            socket.set_rx_buf_sz(RECEIVE_BUFFER)?;
        }
        socket.add_membership(GROUP)?;
        Ok(Monitor {
            socket,
            buffer: Vec::with_capacity(DATAGRAM),
            log: Log::new(writer),
            joined: true,
        })
    }

    /// Whether nf_tables reported every transaction after generation `since` up to `now` (the
    /// current one), and none of them touched our tables or came from the agent. `false`
    /// means "not known": read the tables back.
    pub fn untouched(&mut self, since: u32, now: u32) -> bool {
        self.wait_for(since, now);
        self.log.untouched(since, now)
    }

    /// [`Monitor::untouched`] after the agent's own commit that made generation `ours`, which
    /// must have been reported as the agent's.
    pub fn untouched_after_own(&mut self, ours: u32, now: u32) -> bool {
        self.wait_for(ours, now);
        self.log.untouched_after_own(ours, now)
    }

    /// Reads the reports, for up to [`LAG`] while they fall short of `now`.
    fn wait_for(&mut self, since: u32, now: u32) {
        if since == now || !self.joined {
            if !self.joined {
                // Nothing is reported while away: never vouch.
                self.log.lost = true;
            }
            return;
        }
        self.drain();
        let deadline = Instant::now() + LAG;
        while self.log.answer(since, now) == Answer::NotYet && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
            self.drain();
        }
    }

    /// Takes in what was reported and forgets transactions up to `known`, a generation at which
    /// our tables are known as left: the agent's own commits are reported too, and nothing else
    /// would read them off the socket while no other table changes.
    pub fn settle(&mut self, known: u32) {
        self.drain();
        self.log.forget_upto(known);
    }

    /// Leaves the group for a write of our tables whole: its report (one message per element,
    /// tens of thousands on a large cluster) would cost the kernel and this socket for nothing,
    /// as the tables are read back after such a write anyway. Transactions committed while
    /// away are missed, so the caller must read back before asking again; see
    /// [`Monitor::rejoin`].
    pub fn leave(&mut self) {
        if self.joined && self.socket.drop_membership(GROUP).is_ok() {
            self.joined = false;
        }
    }

    /// Joins again after [`Monitor::leave`], before the tables are read back. A transaction
    /// whose report was under way as the socket joined may have been reported in part: every
    /// transaction up to the generation read just after joining is taken as touching ours
    /// (all that follow are reported whole); without that generation, none until the tables
    /// are read back.
    pub fn rejoin(&mut self, writer: &mut Writer) {
        if self.joined {
            return;
        }
        if let Err(err) = self.socket.add_membership(GROUP) {
            tracing::warn!(%err, "cannot rejoin nf_tables notifications; reading our tables back instead");
            return;
        }
        self.joined = true;
        match writer.generation() {
            Ok(generation) => self.log.partial_upto = Some(generation),
            // Reports from before the write may still be queued: the next one is no marker
            // of where the partial one ends. Vouch for nothing until a read-back.
            Err(_) => self.log.lost = true,
        }
    }

    /// Reads every queued datagram. Only the kernel's count: with CAP_NET_ADMIN any process
    /// may send to the group, and a forged `NEWGEN` would vouch for a transaction that
    /// touched our tables.
    fn drain(&mut self) {
        loop {
            self.buffer.clear();
            match self.socket.recv_from(&mut self.buffer, MSG_TRUNC) {
                Ok((len, _)) if len > self.buffer.len() => self.log.lost = true,
                Ok((_, from)) if from.port_number() != 0 => {
                    tracing::warn!(
                        port = from.port_number(),
                        "a process sent to nf_tables' notification group; vouching for nothing until our tables are read back"
                    );
                    self.log.lost = true;
                }
                Ok(_) => self.log.read(&self.buffer),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                // ENOBUFS: the socket's buffer overflowed and notifications were dropped.
                // Anything else: nothing more to read now.
                Err(err) => {
                    self.log.lost = true;
                    if err.raw_os_error() != Some(ENOBUFS) {
                        return;
                    }
                }
            }
        }
    }
}

/// recv(2) flag: return the datagram's real length even when it did not fit.
const MSG_TRUNC: i32 = 0x20;
const ENOBUFS: i32 = 105;

#[cfg(test)]
mod tests {
    use super::*;

    const WRITER: u32 = 4242;
    const KUBE_PROXY: u32 = 77;

    /// One notification: netlink header, nfgenmsg, attributes.
    fn message(msg: u16, family: u8, port: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut out = vec![0; HEADER];
        out[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        out[12..16].copy_from_slice(&port.to_ne_bytes());
        out.extend_from_slice(&[family, 0, 0, 0]);
        for (kind, value) in attrs {
            out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(value);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        let len = out.len() as u32;
        out[0..4].copy_from_slice(&len.to_ne_bytes());
        out
    }

    /// A set element change in `family` table `table`.
    fn element(family: u8, table: &str, port: u32) -> Vec<u8> {
        let name = format!("{table}\0");
        message(
            12,
            family,
            port,
            &[(ATTR_TABLE, name.as_bytes()), (2, b"s\0")],
        )
    }

    fn newgen(generation: u32, port: u32) -> Vec<u8> {
        message(
            NFT_MSG_NEWGEN,
            0,
            port,
            &[(NFTA_GEN_ID, &generation.to_be_bytes())],
        )
    }

    fn log_of(datagrams: &[Vec<u8>]) -> Log {
        let mut log = Log::new(WRITER);
        for d in datagrams {
            log.read(d);
        }
        log
    }

    #[test]
    fn other_tables_transactions_leave_ours_untouched() {
        let mut log = log_of(&[
            element(1, "kube-proxy", KUBE_PROXY),
            newgen(11, KUBE_PROXY),
            [element(2, "nat", 9), newgen(12, 9)].concat(),
            // Our table's name in another family is another table.
            element(2, TABLE_NAME, 9),
            newgen(13, 9),
        ]);
        assert!(log.untouched(10, 13));
    }

    #[test]
    fn a_change_to_either_of_our_tables_is_not_vouched_for() {
        for family in OUR_FAMILIES {
            let mut log = log_of(&[
                newgen(11, KUBE_PROXY),
                element(family, TABLE_NAME, 1234),
                newgen(12, 1234),
                newgen(13, KUBE_PROXY),
            ]);
            assert!(log.untouched(10, 11), "before the change");
            assert!(!log.untouched(11, 13), "family {family}");
        }
        // A table deleted by `nft flush ruleset`.
        let name = format!("{TABLE_NAME}\0");
        let mut log = log_of(&[message(2, 1, 99, &[(1, name.as_bytes())]), newgen(11, 99)]);
        assert!(!log.untouched(10, 11));
    }

    #[test]
    fn a_message_without_a_table_counts_as_touching_ours() {
        let mut log = log_of(&[message(12, 1, 99, &[]), newgen(11, 99)]);
        assert!(!log.untouched(10, 11));
    }

    #[test]
    fn the_agents_own_transactions_are_not_vouched_for() {
        let mut log = log_of(&[element(2, "other", WRITER), newgen(11, WRITER)]);
        assert!(!log.untouched(10, 11));
    }

    #[test]
    fn a_missing_or_unreported_generation_is_not_known() {
        let mut log = log_of(&[newgen(11, KUBE_PROXY), newgen(13, KUBE_PROXY)]);
        assert!(!log.untouched(10, 13), "12 missing");
        let mut log = log_of(&[newgen(11, KUBE_PROXY)]);
        assert_eq!(log.answer(10, 12), Answer::NotYet);
        assert!(!log.untouched(10, 12), "12 not reported yet");
        log.read(&newgen(12, KUBE_PROXY));
        assert_eq!(log.answer(10, 12), Answer::Yes);
        assert!(log.untouched(10, 12));
        // Known already: no use waiting for the rest.
        let log = log_of(&[element(1, TABLE_NAME, 5), newgen(11, 5)]);
        assert_eq!(log.answer(10, 12), Answer::No);
    }

    #[test]
    fn a_loss_is_answered_once_and_taints_the_transaction_in_progress() {
        let mut log = log_of(&[newgen(11, KUBE_PROXY)]);
        log.lost = true;
        assert!(!log.untouched(10, 11));
        // The report under way when the loss came may have lost its message about our table.
        log.read(&newgen(12, KUBE_PROXY));
        assert!(!log.untouched(11, 12));
        // Later transactions are vouched for again (the caller read back at 12).
        log.read(&newgen(13, KUBE_PROXY));
        assert!(log.untouched(12, 13));
    }

    #[test]
    fn transactions_possibly_reported_in_part_are_not_vouched_for() {
        // Joined again while generation 12's report was under way (12 read just after).
        let mut log = log_of(&[newgen(11, KUBE_PROXY)]);
        log.partial_upto = Some(12);
        log.read(&newgen(12, KUBE_PROXY));
        assert!(!log.untouched(11, 12));
        // 13 began its report after the socket joined: reported whole.
        log.read(&newgen(13, KUBE_PROXY));
        assert!(log.untouched(12, 13));
        assert_eq!(log.partial_upto, None);
    }

    #[test]
    fn nothing_happened_between_equal_generations() {
        let mut log = log_of(&[]);
        assert!(log.untouched(7, 7));
        assert!(!log.untouched(7, 8));
    }

    #[test]
    fn the_agents_own_commits_are_forgotten_as_they_are_settled() {
        let mut log = Log::new(WRITER);
        for generation in 1..=3 * KEEP as u32 {
            log.read(&[element(1, TABLE_NAME, WRITER), newgen(generation, WRITER)].concat());
            if generation % 100 == 0 {
                log.forget_upto(generation);
            }
        }
        assert!(!log.lost);
        let last = 3 * KEEP as u32;
        log.read(&newgen(last + 1, KUBE_PROXY));
        assert!(log.untouched(last, last + 1));
        // Unsettled, they would overflow what is kept: a loss.
        let mut log = Log::new(WRITER);
        for generation in 1..=KEEP as u32 + 1 {
            log.read(&newgen(generation, WRITER));
        }
        assert!(log.lost);
    }

    #[test]
    fn after_its_own_commit_the_agent_needs_that_commit_reported_as_its() {
        let mut log = log_of(&[
            element(1, TABLE_NAME, WRITER),
            newgen(11, WRITER),
            newgen(12, KUBE_PROXY),
        ]);
        assert!(log.untouched_after_own(11, 12));
        // Its batch changed nothing and committed nothing: 11 is someone else's, which
        // touched our table.
        let mut log = log_of(&[
            element(1, TABLE_NAME, 5),
            newgen(11, 5),
            newgen(12, KUBE_PROXY),
        ]);
        assert!(!log.untouched_after_own(11, 12));
        assert!(!log.untouched_after_own(11, 11));
    }

    #[test]
    fn generations_wrap_past_zero() {
        let mut log = log_of(&[newgen(u32::MAX, KUBE_PROXY), newgen(1, KUBE_PROXY)]);
        assert!(log.untouched(u32::MAX - 1, 1));
        assert!(is_after(1, u32::MAX));
        assert_eq!(next_generation(u32::MAX), 1);
    }

    #[test]
    fn answered_transactions_are_forgotten() {
        let mut log = log_of(&[newgen(11, KUBE_PROXY), newgen(12, KUBE_PROXY)]);
        assert!(log.untouched(10, 12));
        log.read(&newgen(13, KUBE_PROXY));
        assert!(log.untouched(12, 13));
        assert_eq!(log.transactions.len(), 1, "{:?}", log.transactions);
    }
}
