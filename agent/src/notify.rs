//! systemd's notification protocol (`Type=notify`): readiness, watchdog pings, stopping.
//!
//! One datagram per message to the socket named by `$NOTIFY_SOCKET`, a path or, after `@`, an
//! abstract name. Outside systemd the variable is unset and every call does nothing.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where to tell systemd how the agent is doing, if anywhere.
pub struct Notifier {
    socket: Option<SocketAddr>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        let notifier = Self::from_vars(socket.as_deref(), usec.as_deref(), pid.as_deref());
        if socket.is_some() && notifier.socket.is_none() {
            tracing::warn!(
                ?socket,
                "NOTIFY_SOCKET is neither an absolute path nor an abstract name; not notifying"
            );
        }
        notifier
    }

    /// `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` as given.
    pub fn from_vars(socket: Option<&OsStr>, usec: Option<&str>, pid: Option<&str>) -> Self {
        let socket = socket.and_then(|s| {
            let bytes = s.as_bytes();
            match bytes.first() {
                Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).ok(),
                Some(b'/') => SocketAddr::from_pathname(s).ok(),
                _ => None,
            }
        });
        // The watchdog is meant for WATCHDOG_PID only, when set (it is not inherited usefully).
        let ours = pid.is_none_or(|pid| pid.trim().parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(Duration::from_micros);
        Self { socket, watchdog }
    }

    /// The node's ruleset is in place: units ordered after the agent may start.
    pub fn ready(&self) -> io::Result<()> {
        self.send("READY=1")
    }

    /// The loop is alive; send at least every [`Notifier::watchdog_interval`].
    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1")
    }

    /// The agent is shutting down (its rules stay).
    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1")
    }

    /// A one-line status for `systemctl status`.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}", status.replace('\n', " ")))
    }

    /// How often to send [`Notifier::watchdog`]: half the watchdog timeout, as systemd
    /// advises. `None` when systemd watches no watchdog for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    fn send(&self, message: &str) -> io::Result<()> {
        let Some(addr) = &self.socket else {
            return Ok(());
        };
        let socket = UnixDatagram::unbound()?;
        let sent = socket.send_to_addr(message.as_bytes(), addr)?;
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "notification truncated",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::expect_used,
        clippy::unwrap_used,
        reason = "a test fails by panicking"
    )]

    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::from_vars(Some(path.as_os_str()), None, None);
        notifier.ready().unwrap();
        notifier.watchdog().unwrap();
        notifier.status("synced\n12 rules").unwrap();
        notifier.stopping().unwrap();
        assert_eq!(received(&listener), "READY=1");
        assert_eq!(received(&listener), "WATCHDOG=1");
        assert_eq!(received(&listener), "STATUS=synced 12 rules");
        assert_eq!(received(&listener), "STOPPING=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("nftpol-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let var = format!("@{name}");
        Notifier::from_vars(Some(OsStr::new(&var)), None, None)
            .ready()
            .unwrap();
        assert_eq!(received(&listener), "READY=1");
    }

    #[test]
    fn outside_systemd_nothing_is_sent_and_nothing_fails() {
        for socket in [
            None,
            Some(OsStr::new("relative/path")),
            Some(OsStr::new("")),
        ] {
            let notifier = Notifier::from_vars(socket, None, None);
            notifier.ready().unwrap();
            notifier.watchdog().unwrap();
            assert_eq!(notifier.watchdog_interval(), None);
        }
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_this_process_only() {
        let me = std::process::id().to_string();
        let other = (std::process::id() + 1).to_string();
        let interval = |usec, pid| Notifier::from_vars(None, usec, pid).watchdog_interval();
        assert_eq!(
            interval(Some("30000000"), None),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval(Some("30000000"), Some(&me)),
            Some(Duration::from_secs(15))
        );
        assert_eq!(interval(Some("30000000"), Some(&other)), None);
        assert_eq!(interval(Some("0"), None), None);
        assert_eq!(interval(Some("soon"), None), None);
        assert_eq!(interval(None, None), None);
    }
}
