//! The kernel's reports of link changes (`RTNLGRP_LINK`), so that the agent looks at the veths
//! as soon as one appears, goes or joins a bridge, instead of at its next once-a-second check.
//!
//! Until the agent has listed a new veth on a pod bridge, the guard holds it only to the rules
//! that go by an interface's kind (`ruleset::guard`): it may send from an address outside the
//! bridge's subnets, and straight to the node. A CNI plugin attaches the veth to the bridge
//! before it gives the pod its addresses and returns, and the pod's containers start after
//! that; so the agent acts on a report of that attachment at once, unless it looked less than
//! [`SETTLE`] ago, and lists the veth before the pod can send.

use std::io;
use std::time::{Duration, Instant};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use nftnl_sys::libc;
use tokio::sync::mpsc;

/// The largest datagram read; a link report is a few kilobytes at most.
const DATAGRAM: usize = 1 << 16;

/// The least time between two looks at the veths that reports prompt, and how long other
/// reports gather before one: a CNI ADD makes several reports, and a node starting a hundred
/// pods at once would otherwise cost a discovery per report (measured in a one-node lab: 100
/// pods in a second cost the agent 0.7 s of CPU with a look per report, 0.2 s with this bound).
pub const SETTLE: Duration = Duration::from_millis(30);

/// What a datagram of link reports tells the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// A veth on a bridge (joining one, or changing while on one), or reports were lost: looked
    /// at now, unless the last look was less than [`SETTLE`] ago.
    OnBridge,
    /// Another veth report (new, gone, off a bridge), or one that does not parse: looked at
    /// [`SETTLE`] after it.
    Veth,
}

/// When to look at the veths, from the reports taken and the last look, never twice within
/// [`SETTLE`]. A report on a bridge brings the look forward, to list the veth as the bridge's
/// port at once, and asks for another [`SETTLE`] after it, for what the pod's namespace does
/// meanwhile (its addresses, which the node's link reports do not show); other reports are
/// looked at [`SETTLE`] after the first of them.
#[derive(Debug, Default)]
struct Schedule {
    /// The look a report on a bridge brings forward.
    soon: Option<Instant>,
    /// [`SETTLE`] after the first report not yet looked at.
    settled: Option<Instant>,
    /// [`SETTLE`] after the last report on a bridge: the look for its pod's addresses.
    follow: Option<Instant>,
    /// When the last look was.
    last: Option<Instant>,
}

impl Schedule {
    /// A report taken at `now`, not yet looked at.
    fn report(&mut self, report: Report, now: Instant) {
        self.settled.get_or_insert(now + SETTLE);
        if report == Report::OnBridge {
            let earliest = self.last.map_or(now, |last| (last + SETTLE).max(now));
            self.soon = Some(self.soon.map_or(earliest, |soon| soon.min(earliest)));
            self.follow_up(now);
        }
    }

    /// A report taken at `now`, just before a look that sees it: a report on a bridge still
    /// asks for the look after, for its pod's addresses.
    fn seen(&mut self, report: Report, now: Instant) {
        if report == Report::OnBridge {
            self.follow_up(now);
        }
    }

    fn follow_up(&mut self, now: Instant) {
        let at = now + SETTLE;
        self.follow = Some(self.follow.map_or(at, |follow| follow.max(at)));
    }

    /// No sooner than [`SETTLE`] after the last look.
    fn due(&self) -> Option<Instant> {
        let after_last = |at: Instant| self.last.map_or(at, |last| at.max(last + SETTLE));
        [
            self.soon,
            self.settled.map(after_last),
            self.follow.map(after_last),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The agent looks at `now`: a report taken before is seen.
    fn looked(&mut self, now: Instant) {
        self.soon = None;
        self.settled = self.settled.filter(|settled| *settled > now);
        self.follow = self.follow.filter(|follow| *follow > now);
        self.last = Some(now);
    }
}

/// The link reports of the agent's network namespace, read by a thread of their own (a
/// blocking socket: no unsafe registration with tokio's reactor).
pub struct LinkWatch {
    /// One channel for each kind of [`Report`], so that one kind never crowds out the other;
    /// a pending report of a kind is enough, as the agent looks at every veth when it takes it.
    on_bridge: mpsc::Receiver<io::Result<()>>,
    veth: mpsc::Receiver<io::Result<()>>,
    schedule: Schedule,
    /// An error taken while the agent was about to look, returned at the next call.
    failed: Option<io::Error>,
}

impl LinkWatch {
    /// Subscribes, and starts the thread that reads the reports.
    pub fn new() -> io::Result<LinkWatch> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.add_membership(libc::RTNLGRP_LINK)?;
        let (on_bridge_tx, on_bridge) = mpsc::channel(1);
        let (veth_tx, veth) = mpsc::channel(1);
        std::thread::Builder::new()
            .name("link-reports".into())
            .spawn(move || read_reports(&socket, &on_bridge_tx, &veth_tx))?;
        Ok(LinkWatch {
            on_bridge,
            veth,
            schedule: Schedule::default(),
            failed: None,
        })
    }

    /// Returns when the agent should look at the veths, by the [`Schedule`] of the reports
    /// taken, with the reports that came meanwhile taken too; an error once the socket failed.
    /// Cancel-safe: what a cancelled call took stays in the schedule.
    pub async fn changed(&mut self) -> io::Result<()> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        loop {
            let due = self.schedule.due();
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()),
                    if due.is_some() => break,
                taken = self.on_bridge.recv() => {
                    taken.ok_or_else(stopped)??;
                    self.schedule.report(Report::OnBridge, Instant::now());
                }
                taken = self.veth.recv() => {
                    taken.ok_or_else(stopped)??;
                    self.schedule.report(Report::Veth, Instant::now());
                }
            }
        }
        let now = Instant::now();
        self.schedule.looked(now);
        // Reports already here are seen by the look the caller is about to make.
        for (channel, report) in [
            (&mut self.on_bridge, Report::OnBridge),
            (&mut self.veth, Report::Veth),
        ] {
            while let Ok(taken) = channel.try_recv() {
                match taken {
                    Ok(()) => self.schedule.seen(report, now),
                    Err(err) => self.failed = Some(err),
                }
            }
        }
        Ok(())
    }
}

fn stopped() -> io::Error {
    io::Error::other("the link report thread stopped")
}

/// Reads `socket` until it fails or the receiving end is gone, telling the channel of each
/// [`Report`] kind.
fn read_reports(
    socket: &Socket,
    on_bridge: &mpsc::Sender<io::Result<()>>,
    veth: &mpsc::Sender<io::Result<()>>,
) {
    let mut buffer = Vec::with_capacity(DATAGRAM);
    loop {
        buffer.clear();
        let tx = match socket.recv_from(&mut buffer, 0) {
            // Not the kernel's: another process with CAP_NET_ADMIN can send here too.
            Ok((_, sender)) if sender.port_number() != 0 => continue,
            Ok(_) => match classify(&buffer) {
                None => continue,
                Some(Report::OnBridge) => on_bridge,
                Some(Report::Veth) => veth,
            },
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            // Lost reports may have told of a veth joining a bridge.
            Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => on_bridge,
            Err(err) => {
                // On a thread of its own, not the runtime's: waiting here is fine.
                let _ = veth.blocking_send(Err(err));
                return;
            }
        };
        match tx.try_send(Ok(())) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// What a datagram of link reports says of veths: the strongest [`Report`] of its messages,
/// `None` when it names none. One that does not parse counts as a veth's: looking again costs a
/// discovery, missing one a second.
pub fn classify(datagram: &[u8]) -> Option<Report> {
    let mut found = None;
    let mut rest = datagram;
    while !rest.is_empty() {
        let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest) else {
            return found.or(Some(Report::Veth));
        };
        let size = message.header.length as usize;
        if size == 0 {
            return found.or(Some(Report::Veth));
        }
        match &message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) if is_veth(link) => {
                if on_bridge(link) {
                    return Some(Report::OnBridge);
                }
                found = Some(Report::Veth);
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) if is_veth(link) => {
                found = Some(Report::Veth);
            }
            _ => {}
        }
        rest = rest.get(size.next_multiple_of(4)..).unwrap_or_default();
    }
    found
}

fn on_bridge(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|attribute| matches!(attribute, LinkAttribute::Controller(_)))
}

fn is_veth(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|attribute| {
        matches!(attribute, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkHeader;

    fn report(kind: InfoKind, gone: bool, master: Option<u32>) -> Vec<u8> {
        let mut link = LinkMessage::default();
        link.header.index = 7;
        link.attributes = vec![
            LinkAttribute::IfName("veth0a1b2c3d".into()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]),
        ];
        link.attributes
            .extend(master.map(LinkAttribute::Controller));
        let inner = if gone {
            RouteNetlinkMessage::DelLink(link)
        } else {
            RouteNetlinkMessage::NewLink(link)
        };
        let mut message = NetlinkMessage::new(NetlinkHeader::default(), inner.into());
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    #[test]
    fn veth_reports_count_and_a_veth_on_a_bridge_most() {
        use Report::{OnBridge, Veth};
        assert_eq!(classify(&report(InfoKind::Veth, false, None)), Some(Veth));
        assert_eq!(
            classify(&report(InfoKind::Veth, false, Some(3))),
            Some(OnBridge)
        );
        // A veth gone is cleaned up after, even from a bridge.
        assert_eq!(classify(&report(InfoKind::Veth, true, Some(3))), Some(Veth));
        assert_eq!(classify(&report(InfoKind::Bridge, false, None)), None);
        assert_eq!(classify(&report(InfoKind::Vxlan, true, None)), None);
        // A bridge's own port, if it is no veth, is not ours.
        assert_eq!(classify(&report(InfoKind::Vxlan, false, Some(3))), None);
        // Several in one datagram: the veth's after a bridge's, the strongest of two veths'.
        let mut both = report(InfoKind::Bridge, false, None);
        both.extend(report(InfoKind::Veth, false, None));
        assert_eq!(classify(&both), Some(Veth));
        both.extend(report(InfoKind::Veth, false, Some(3)));
        assert_eq!(classify(&both), Some(OnBridge));
        let mut neither = report(InfoKind::Bridge, false, None);
        neither.extend(report(InfoKind::Vxlan, false, None));
        assert_eq!(classify(&neither), None);
        // What does not parse is taken as a change.
        assert_eq!(classify(&[1, 2, 3]), Some(Veth));
        assert_eq!(classify(&[]), None);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_veth_joining_a_bridge_is_looked_at_once_and_again_when_settled() {
        let t = Instant::now();
        let mut schedule = Schedule::default();
        assert_eq!(schedule.due(), None);
        // A CNI ADD: the veth appears, then joins the bridge 2 ms later.
        schedule.report(Report::Veth, t);
        assert_eq!(schedule.due(), Some(t + SETTLE));
        schedule.report(Report::OnBridge, t + ms(2));
        assert_eq!(schedule.due(), Some(t + ms(2)));
        schedule.looked(t + ms(2));
        // Another look comes for the pod's addresses, SETTLE after the report on the bridge.
        assert_eq!(schedule.due(), Some(t + ms(32)));
        schedule.looked(t + ms(32));
        assert_eq!(schedule.due(), None);
        // Had the veth come up on the bridge 3 ms later, before that look: the look stays where
        // it was (none sooner than SETTLE after the last), and one more comes SETTLE after it.
        let mut schedule = Schedule::default();
        schedule.report(Report::Veth, t);
        schedule.report(Report::OnBridge, t + ms(2));
        schedule.looked(t + ms(2));
        schedule.report(Report::OnBridge, t + ms(5));
        assert_eq!(schedule.due(), Some(t + ms(32)));
        schedule.looked(t + ms(32));
        assert_eq!(schedule.due(), Some(t + ms(62)));
        schedule.looked(t + ms(62));
        assert_eq!(schedule.due(), None);
    }

    #[test]
    fn a_burst_of_reports_costs_a_look_per_settle_at_most() {
        let t = Instant::now();
        let mut schedule = Schedule::default();
        let mut looks = Vec::new();
        // A report on a bridge every millisecond for a second; the agent looks when due.
        for now in (0..1000).map(|n| t + ms(n)) {
            if schedule.due().is_some_and(|due| due <= now) {
                schedule.looked(now);
                looks.push(now);
            }
            schedule.report(Report::OnBridge, now);
        }
        assert_eq!(looks.first(), Some(&(t + ms(1))));
        for pair in looks.windows(2) {
            assert!(pair[1] - pair[0] >= SETTLE, "{:?}", pair[1] - pair[0]);
        }
        assert!(looks.len() >= 30, "{}", looks.len());
        // Nothing is left unseen: the last report is looked at.
        assert!(schedule.due().is_some());
    }

    #[test]
    fn every_pod_joining_a_bridge_gets_a_look_after_it_for_its_addresses() {
        let t = Instant::now();
        let mut schedule = Schedule::default();
        // Pod a's veth joins and is looked at at once; pod b's joins 27 ms later.
        schedule.report(Report::OnBridge, t + ms(2));
        schedule.looked(t + ms(2));
        schedule.report(Report::OnBridge, t + ms(29));
        assert_eq!(schedule.due(), Some(t + ms(32)));
        schedule.looked(t + ms(32));
        // b's addresses may come after that look: one more, SETTLE after b's report.
        assert_eq!(schedule.due(), Some(t + ms(62)));
        schedule.looked(t + ms(62));
        assert_eq!(schedule.due(), None);
        // A report on a bridge taken just before a look (the caller was busy) is seen by it,
        // and still asks for the look after.
        schedule.seen(Report::OnBridge, t + ms(500));
        assert_eq!(schedule.due(), Some(t + ms(530)));
        schedule.seen(Report::Veth, t + ms(500));
        assert_eq!(schedule.due(), Some(t + ms(530)));
    }

    #[test]
    fn reports_off_the_bridge_wait_and_a_late_one_does_not_put_the_look_off() {
        let t = Instant::now();
        let mut schedule = Schedule::default();
        schedule.report(Report::Veth, t);
        schedule.report(Report::Veth, t + ms(20));
        assert_eq!(schedule.due(), Some(t + SETTLE));
        schedule.looked(t + SETTLE);
        assert_eq!(schedule.due(), None);
        // Long after: a report on a bridge is looked at at once.
        schedule.report(Report::OnBridge, t + ms(500));
        assert_eq!(schedule.due(), Some(t + ms(500)));
    }
}
