//! The kernel's reports of link changes (`RTNLGRP_LINK`), so that the agent looks at the veths
//! as soon as one appears, goes or joins a bridge, instead of at its next once-a-second check.
//!
//! Until the agent has listed a new veth on a pod bridge, the guard holds it only to the rules
//! that go by an interface's kind (`ruleset::guard`): it may send from an address outside the
//! bridge's subnets, and straight to the node. A CNI plugin attaches the veth to the bridge
//! before the pod's containers start, so a report of that attachment lets the agent list the
//! veth before the pod can send.

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

/// How long the agent lets link reports gather before it looks at the veths: a CNI ADD makes
/// several, and a node starting a hundred pods at once would otherwise cost a discovery per
/// veth (measured in a one-node lab: 100 pods in a second cost the agent 0.7 s of CPU with a
/// look per report, 0.11-0.13 s with this wait).
pub const SETTLE: Duration = Duration::from_millis(30);

/// The link reports of the agent's network namespace, read by a thread of their own (a
/// blocking socket: no unsafe registration with tokio's reactor).
pub struct LinkWatch {
    changes: mpsc::Receiver<io::Result<()>>,
    /// When the first report not yet acted on came.
    pending: Option<Instant>,
}

impl LinkWatch {
    /// Subscribes, and starts the thread that reads the reports.
    pub fn new() -> io::Result<LinkWatch> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.add_membership(libc::RTNLGRP_LINK)?;
        // One change pending is enough: the agent looks at every veth when it takes it.
        let (tx, changes) = mpsc::channel(1);
        std::thread::Builder::new()
            .name("link-reports".into())
            .spawn(move || read_reports(&socket, &tx))?;
        Ok(LinkWatch {
            changes,
            pending: None,
        })
    }

    /// Returns [`SETTLE`] after a report said a veth appeared, went or changed (joined a bridge,
    /// came up), or reports were lost (the socket's buffer overflowed), with the reports that
    /// came meanwhile taken too; an error once the socket failed. Cancel-safe: a report taken
    /// before the wait is kept for the next call.
    pub async fn changed(&mut self) -> io::Result<()> {
        let since = match self.pending {
            Some(since) => since,
            None => {
                match self.changes.recv().await {
                    Some(result) => result?,
                    None => return Err(io::Error::other("the link report thread stopped")),
                }
                *self.pending.insert(Instant::now())
            }
        };
        tokio::time::sleep_until((since + SETTLE).into()).await;
        self.pending = None;
        while let Ok(result) = self.changes.try_recv() {
            result?;
        }
        Ok(())
    }
}

/// Reads `socket` until it fails or the receiving end is gone, telling `tx` of each change.
fn read_reports(socket: &Socket, tx: &mpsc::Sender<io::Result<()>>) {
    let mut buffer = Vec::with_capacity(DATAGRAM);
    loop {
        buffer.clear();
        match socket.recv(&mut buffer, 0) {
            Ok(_) if !reports_a_veth(&buffer) => continue,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(err) => {
                // On a thread of its own, not the runtime's: waiting here is fine.
                let _ = tx.blocking_send(Err(err));
                return;
            }
        }
        match tx.try_send(Ok(())) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// Whether a datagram of link reports names a veth (new, changed or gone). One that does not
/// parse counts as naming one: looking again costs a discovery, missing one a second.
pub fn reports_a_veth(datagram: &[u8]) -> bool {
    let mut rest = datagram;
    while !rest.is_empty() {
        let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest) else {
            return true;
        };
        let size = message.header.length as usize;
        if size == 0 {
            return true;
        }
        if let NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link),
        ) = &message.payload
        {
            if is_veth(link) {
                return true;
            }
        }
        rest = rest.get(size.next_multiple_of(4)..).unwrap_or_default();
    }
    false
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

    fn report(kind: InfoKind, gone: bool) -> Vec<u8> {
        let mut link = LinkMessage::default();
        link.header.index = 7;
        link.attributes = vec![
            LinkAttribute::IfName("veth0a1b2c3d".into()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]),
        ];
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
    fn a_veth_report_counts_and_others_do_not() {
        assert!(reports_a_veth(&report(InfoKind::Veth, false)));
        assert!(reports_a_veth(&report(InfoKind::Veth, true)));
        assert!(!reports_a_veth(&report(InfoKind::Bridge, false)));
        assert!(!reports_a_veth(&report(InfoKind::Vxlan, true)));
        // Several in one datagram: the veth's after a bridge's.
        let mut both = report(InfoKind::Bridge, false);
        both.extend(report(InfoKind::Veth, false));
        assert!(reports_a_veth(&both));
        let mut neither = report(InfoKind::Bridge, false);
        neither.extend(report(InfoKind::Vxlan, false));
        assert!(!reports_a_veth(&neither));
        // What does not parse is taken as a change.
        assert!(reports_a_veth(&[1, 2, 3]));
        assert!(!reports_a_veth(&[]));
    }
}
