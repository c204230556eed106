//! The one program of every lab pod (see `integration::lab`).
//!
//! `labpod serve [PORT...]` answers on TCP and UDP at `[::]:PORT` (both families; default 80
//! and 81), prints `ready` once every socket is bound, and exits when its stdin closes, so a
//! lab that dies without cleaning up leaves no server behind.
//!
//! `labpod probe [--timeout-ms N] [ADDR PROTO PORT]...` tries every target at once, one thread
//! each, and prints `ADDR PROTO PORT ok` or `ADDR PROTO PORT fail REASON` per target, in the
//! order given. Without targets on the command line it reads one per line from stdin, where a
//! fourth field may name the UDP source port to use (`0` or absent: any).
//!
//! `labpod send FROM ADDR PORT COUNT` sends COUNT UDP datagrams to ADDR:PORT from source
//! address FROM, which must be an address of the pod (tests forging a source add the victim's
//! address to the attacker's `eth0` first). Nothing is awaited: the answer goes to FROM.
//!
//! `labpod advertise [--vlan0] IFACE [TARGET [FROM]]` sends one ICMPv6 message to all nodes on
//! IFACE, from FROM or else IFACE's link-local address: without TARGET a router advertisement
//! (router lifetime 1800 s, no options), as a rogue router would; with TARGET an unsolicited
//! neighbour advertisement that TARGET is at IFACE's link-layer address, overriding what
//! neighbours hold. With `--vlan0` the frame carries a VLAN tag of ID 0 (built whole and
//! written on a packet socket: this kernel has no VLAN devices).
//!
//! `labpod connrate [--seconds S] [--parallel P] ADDR PORT` opens TCP connections to a
//! `labpod serve` port one after another, from P threads, for S seconds (default 5 and 1):
//! connect, read the reply to end of stream, close. It prints `connections N failures F
//! seconds T`. The server closes first, so TIME_WAIT sockets pile up on its side and this
//! client never runs out of ephemeral ports.

#![forbid(unsafe_code)]

use std::io::{self, BufRead, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: labpod serve [PORT...]
       labpod probe [--timeout-ms N] [ADDR tcp|udp PORT]...   (or targets on stdin: ADDR PROTO PORT [UDP-SOURCE-PORT];
           an IPv6 link-local ADDR as fe80::1%eth0)
       labpod send FROM ADDR PORT COUNT   (UDP; ADDR may be broadcast, or fe80::1%eth0, ff02::1%eth0)
       labpod advertise [--vlan0] IFACE [TARGET [FROM]]
       labpod rawudp [--source-mac SRC] IFACE MAC FROM ADDR PORT COUNT   (UDP in a frame to MAC, whatever ADDR is,
           from link-layer address SRC or else IFACE's)
       labpod arp [--vlan0] IFACE SENDER TARGET   (a broadcast ARP request for TARGET from SENDER at IFACE's MAC)
       labpod vxlan ADDR PORT VNI MAC FROM TO TO_PORT COUNT   (to ADDR:PORT, VXLAN carrying UDP FROM -> TO:TO_PORT to MAC)
       labpod ipip ADDR FROM TO TO_PORT COUNT   (to IPv4 ADDR, IP-in-IP carrying UDP FROM -> TO:TO_PORT)
       labpod connrate [--seconds S] [--parallel P] ADDR PORT";

/// A lost UDP datagram is sent again this often until the timeout.
const UDP_RESEND: Duration = Duration::from_millis(250);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.split_first() {
        Some((mode, rest)) if mode == "serve" => serve(rest),
        Some((mode, rest)) if mode == "probe" => probe(rest),
        Some((mode, rest)) if mode == "connrate" => connrate(rest),
        Some((mode, rest)) if mode == "send" => send(rest),
        Some((mode, rest)) if mode == "advertise" => advertise(rest),
        Some((mode, rest)) if mode == "rawudp" => rawudp(rest),
        Some((mode, rest)) if mode == "arp" => arp(rest),
        Some((mode, rest)) if mode == "vxlan" => vxlan(rest),
        Some((mode, rest)) if mode == "ipip" => ipip(rest),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("labpod: {err}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: &[String]) -> Result<(), String> {
    let mut ports = args
        .iter()
        .map(|a| parse_port(a))
        .collect::<Result<Vec<u16>, String>>()?;
    if ports.is_empty() {
        ports = vec![80, 81];
    }
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        // [::] with the default bindv6only=0 takes IPv4 too, as v4-mapped addresses.
        let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let tcp = TcpListener::bind(any).map_err(|e| format!("tcp port {port}: {e}"))?;
        let udp = UdpSocket::bind(any).map_err(|e| format!("udp port {port}: {e}"))?;
        thread::spawn(move || answer_tcp(&tcp, port));
        thread::spawn(move || answer_udp(&udp, port));
    }
    let mut stdout = io::stdout();
    writeln!(stdout, "ready")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    let mut stdin = io::stdin();
    let mut buf = [0u8; 256];
    while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
    Ok(())
}

fn answer_tcp(listener: &TcpListener, port: u16) {
    let reply = format!("labpod tcp {port}\n");
    for mut stream in listener.incoming().flatten() {
        // A client that went away is its own problem; keep serving the others.
        let _ = stream.write_all(reply.as_bytes());
    }
}

fn answer_udp(socket: &UdpSocket, port: u16) {
    let reply = format!("labpod udp {port}\n");
    let mut buf = [0u8; 1500];
    loop {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(reply.as_bytes(), peer);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

struct Target {
    text: String,
    addr: IpAddr,
    /// The interface index of an IPv6 link-local target (`ADDR%IFACE`), else 0.
    scope: u32,
    proto: Proto,
    port: u16,
    udp_sport: u16,
}

fn probe(args: &[String]) -> Result<(), String> {
    let mut timeout = Duration::from_millis(1000);
    let mut rest = args;
    if let Some((flag, after)) = rest.split_first() {
        if flag == "--timeout-ms" {
            let (value, after) = after.split_first().ok_or("--timeout-ms needs a value")?;
            let ms = value
                .parse()
                .map_err(|_| format!("bad --timeout-ms {value:?}"))?;
            timeout = Duration::from_millis(ms);
            rest = after;
        }
    }
    let targets = if rest.is_empty() {
        let mut targets = Vec::new();
        for line in io::stdin().lock().lines() {
            let line = line.map_err(|e| format!("stdin: {e}"))?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields.is_empty() {
                targets.push(parse_target(&fields)?);
            }
        }
        targets
    } else {
        if rest.len() % 3 != 0 {
            return Err(format!("targets come as ADDR PROTO PORT triples\n{USAGE}"));
        }
        rest.chunks(3)
            .map(|t| parse_target(&t.iter().map(String::as_str).collect::<Vec<_>>()))
            .collect::<Result<_, _>>()?
    };

    let results: Vec<Result<(), String>> = thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| s.spawn(move || probe_one(t, timeout)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("prober thread panicked".into()))
            })
            .collect()
    });
    let mut out = io::stdout().lock();
    for (target, result) in targets.iter().zip(results) {
        let line = match result {
            Ok(()) => format!("{} ok", target.text),
            Err(reason) => format!("{} fail {reason}", target.text),
        };
        writeln!(out, "{line}").map_err(|e| format!("stdout: {e}"))?;
    }
    out.flush().map_err(|e| format!("stdout: {e}"))
}

fn connrate(args: &[String]) -> Result<(), String> {
    let mut seconds = 5.0f64;
    let mut parallel = 1usize;
    let mut rest = args;
    while let Some((flag, after)) = rest.split_first() {
        let value = |after: &[String]| -> Result<String, String> {
            after
                .first()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--seconds" => {
                let v = value(after)?;
                seconds = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && s.is_finite())
                    .ok_or_else(|| format!("bad --seconds {v:?}"))?;
            }
            "--parallel" => {
                let v = value(after)?;
                parallel = v
                    .parse()
                    .ok()
                    .filter(|&p| (1..=64).contains(&p))
                    .ok_or_else(|| format!("bad --parallel {v:?}: 1 to 64"))?;
            }
            _ => break,
        }
        rest = &after[1..];
    }
    let [addr, port] = rest else {
        return Err(format!("connrate wants ADDR PORT\n{USAGE}"));
    };
    let addr: IpAddr = addr.parse().map_err(|_| format!("bad address {addr:?}"))?;
    let dst = SocketAddr::new(addr, parse_port(port)?);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let counts: Vec<(u64, u64)> = thread::scope(|s| {
        let handles: Vec<_> = (0..parallel)
            .map(|_| s.spawn(move || connect_until(dst, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or((0, 1)))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (ok, failed) = counts.iter().fold((0, 0), |(o, f), (a, b)| (o + a, f + b));
    println!("connections {ok} failures {failed} seconds {elapsed:.3}");
    Ok(())
}

/// Connect, read to end of stream, close, until `deadline`: (completed, failed).
fn connect_until(dst: SocketAddr, deadline: Instant) -> (u64, u64) {
    let timeout = Duration::from_secs(1);
    let (mut ok, mut failed) = (0, 0);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        let exchanged = TcpStream::connect_timeout(&dst, timeout).and_then(|mut stream| {
            stream.set_read_timeout(Some(timeout))?;
            while stream.read(&mut buf)? > 0 {}
            Ok(())
        });
        match exchanged {
            Ok(()) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    (ok, failed)
}

fn parse_target(fields: &[&str]) -> Result<Target, String> {
    let (addr, proto, port, sport) = match fields {
        [a, p, n] => (a, p, n, "0"),
        [a, p, n, s] => (a, p, n, *s),
        _ => {
            return Err(format!(
                "bad target {fields:?}: want ADDR PROTO PORT [SPORT]"
            ))
        }
    };
    let text = format!("{addr} {proto} {port}");
    let proto = match *proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        other => return Err(format!("bad protocol {other:?}: tcp or udp")),
    };
    let (addr, scope) = scoped(addr)?;
    Ok(Target {
        text,
        addr,
        scope,
        proto,
        port: parse_port(port)?,
        udp_sport: sport
            .parse()
            .map_err(|_| format!("bad source port {sport:?}"))?,
    })
}

fn send(args: &[String]) -> Result<(), String> {
    let [from, addr, port, count] = args else {
        return Err(USAGE.to_string());
    };
    let from: IpAddr = from.parse().map_err(|_| format!("bad address {from:?}"))?;
    let (addr, scope) = scoped(addr)?;
    let dst = socket_addr(addr, parse_port(port)?, scope);
    let count: u32 = count.parse().map_err(|_| format!("bad count {count:?}"))?;
    let socket =
        UdpSocket::bind(SocketAddr::new(from, 0)).map_err(|e| format!("bind {from}: {e}"))?;
    // Broadcast is refused without it, and nothing else minds it.
    socket
        .set_broadcast(true)
        .map_err(|e| format!("SO_BROADCAST: {e}"))?;
    for n in 0..count {
        socket
            .send_to(format!("labpod send {n}\n").as_bytes(), dst)
            .map_err(|e| format!("send to {dst}: {e}"))?;
        thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// UDP datagrams from `FROM` to `ADDR` in Ethernet frames to `MAC`, written on `IFACE`'s packet
/// socket: a unicast frame can carry a broadcast or multicast destination address.
fn rawudp(args: &[String]) -> Result<(), String> {
    let (source, args) = match args {
        [flag, source, rest @ ..] if flag == "--source-mac" => (Some(source), rest),
        _ => (None, args),
    };
    let [iface, mac, from, addr, port, count] = args else {
        return Err(USAGE.to_string());
    };
    let dst_mac = parse_mac(mac).ok_or_else(|| format!("bad MAC {mac:?}"))?;
    let src_mac = match source {
        Some(text) => parse_mac(text).ok_or_else(|| format!("bad MAC {text:?}"))?,
        None => mac_of(iface)?,
    };
    let from: IpAddr = from.parse().map_err(|_| format!("bad address {from:?}"))?;
    let addr: IpAddr = addr.parse().map_err(|_| format!("bad address {addr:?}"))?;
    let port = parse_port(port)?;
    let count: u32 = count.parse().map_err(|_| format!("bad count {count:?}"))?;
    for n in 0..count {
        let payload = format!("labpod rawudp {n}\n");
        let frame = udp_frame(dst_mac, src_mac, from, addr, port, payload.as_bytes())?;
        send_frame(iface, &frame)?;
        thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// One ARP request, broadcast on `IFACE`, asking for `TARGET` as `SENDER` at `IFACE`'s own
/// link-layer address, whatever addresses the pod holds: whoever holds `TARGET` learns that
/// `SENDER` is here. With `--vlan0`, in a frame with a VLAN tag of ID 0.
fn arp(args: &[String]) -> Result<(), String> {
    let (vlan0, args) = match args {
        [flag, rest @ ..] if flag == "--vlan0" => (true, rest),
        _ => (false, args),
    };
    let [iface, sender, target] = args else {
        return Err(USAGE.to_string());
    };
    let parse = |text: &String| -> Result<Ipv4Addr, String> {
        text.parse()
            .map_err(|_| format!("bad IPv4 address {text:?}"))
    };
    let (sender, target) = (parse(sender)?, parse(target)?);
    let mac = mac_of(iface)?;
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    if vlan0 {
        frame.extend_from_slice(&[0x81, 0x00, 0, 0]);
    }
    // ARP, Ethernet and IPv4, 6- and 4-byte addresses, a request.
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&sender.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target.octets());
    send_frame(iface, &frame)
}

/// Datagrams to UDP `ADDR PORT` (`fe80::1%eth0` for a link-local one; from the source address
/// this pod's kernel picks), each
/// a VXLAN packet (VNI `VNI`) carrying an Ethernet frame to `MAC` with a UDP datagram from
/// `FROM` to `TO` port `TO_PORT`: what a node's VXLAN device would take for a packet from
/// another node.
fn vxlan(args: &[String]) -> Result<(), String> {
    let [addr, port, vni, mac, from, to, to_port, count] = args else {
        return Err(USAGE.to_string());
    };
    let (addr, scope) = scoped(addr)?;
    let port = parse_port(port)?;
    let vni: u32 = vni
        .parse()
        .ok()
        .filter(|v| *v < 1 << 24)
        .ok_or_else(|| format!("bad VNI {vni:?}"))?;
    let mac = parse_mac(mac).ok_or_else(|| format!("bad MAC {mac:?}"))?;
    let from: IpAddr = from.parse().map_err(|_| format!("bad address {from:?}"))?;
    let to: IpAddr = to.parse().map_err(|_| format!("bad address {to:?}"))?;
    let to_port = parse_port(to_port)?;
    let count: u32 = count.parse().map_err(|_| format!("bad count {count:?}"))?;
    let any = if addr.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    let socket = UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
    // A locally administered source MAC: the receiving device does not look at it.
    let src_mac = [0x0e, 0, 0, 0, 0, 0x01];
    for n in 0..count {
        let payload = format!("labpod vxlan {n}\n");
        let mut packet = vec![0x08, 0, 0, 0];
        packet.extend_from_slice(&(vni << 8).to_be_bytes());
        packet.extend(udp_frame(
            mac,
            src_mac,
            from,
            to,
            to_port,
            payload.as_bytes(),
        )?);
        socket
            .send_to(&packet, socket_addr(addr, port, scope))
            .map_err(|e| format!("send to {addr} port {port}: {e}"))?;
        thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// IP-in-IP packets to `ADDR` (IPv4), each carrying a UDP datagram from `FROM` to `TO` port
/// `TO_PORT`: what a node's `ipip` device would take for a packet from another node. Needs
/// CAP_NET_RAW; the kernel writes the outer header, from the address it picks.
fn ipip(args: &[String]) -> Result<(), String> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    /// IPv4 in IP (`ipencap`).
    const IPPROTO_IPIP: i32 = 4;
    let [addr, from, to, to_port, count] = args else {
        return Err(USAGE.to_string());
    };
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("bad IPv4 address {addr:?}"))?;
    let from: Ipv4Addr = from
        .parse()
        .map_err(|_| format!("bad IPv4 address {from:?}"))?;
    let to: Ipv4Addr = to.parse().map_err(|_| format!("bad IPv4 address {to:?}"))?;
    let to_port = parse_port(to_port)?;
    let count: u32 = count.parse().map_err(|_| format!("bad count {count:?}"))?;
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(IPPROTO_IPIP)))
        .map_err(|e| format!("raw IP-in-IP socket: {e}"))?;
    let target = SockAddr::from(SocketAddr::from((addr, 0)));
    for n in 0..count {
        let payload = format!("labpod ipip {n}\n");
        let (_, packet) = udp_packet(from.into(), to.into(), to_port, payload.as_bytes())?;
        socket
            .send_to(&packet, &target)
            .map_err(|e| format!("send to {addr}: {e}"))?;
        thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// An Ethernet frame from `src_mac` to `dst_mac` holding a UDP datagram from `from` (source
/// port 40000) to `to` port `port`.
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    from: IpAddr,
    to: IpAddr,
    port: u16,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let (ethertype, packet) = udp_packet(from, to, port, payload)?;
    let mut frame = dst_mac.to_vec();
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ethertype);
    frame.extend_from_slice(&packet);
    Ok(frame)
}

/// An IP packet holding a UDP datagram from `from` (source port 40000) to `to` port `port`,
/// with the Ethernet type that announces it.
fn udp_packet(
    from: IpAddr,
    to: IpAddr,
    port: u16,
    payload: &[u8],
) -> Result<([u8; 2], Vec<u8>), String> {
    const UDP: u8 = 17;
    let length = u16::try_from(8 + payload.len()).map_err(|_| "too long".to_string())?;
    let mut udp = Vec::with_capacity(usize::from(length));
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&length.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let (ethertype, mut packet) = match (from, to) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            // The UDP checksum is optional over IPv4: 0, none.
            let total = length + 20;
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, UDP, 0, 0]);
            ip.extend_from_slice(&from.octets());
            ip.extend_from_slice(&to.octets());
            let sum = checksum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            ([0x08, 0x00], ip)
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            // Over IPv6 a UDP checksum of 0 would mean none, which is not allowed.
            let sum = match checksum6(from, to, UDP, &udp) {
                0 => 0xffff,
                sum => sum,
            };
            udp[6..8].copy_from_slice(&sum.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&length.to_be_bytes());
            ip.extend_from_slice(&[UDP, 64]);
            ip.extend_from_slice(&from.octets());
            ip.extend_from_slice(&to.octets());
            ([0x86, 0xdd], ip)
        }
        _ => return Err(format!("{from} and {to} are of different families")),
    };
    packet.extend_from_slice(&udp);
    Ok((ethertype, packet))
}

fn advertise(args: &[String]) -> Result<(), String> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let (vlan0, args) = match args {
        [flag, rest @ ..] if flag == "--vlan0" => (true, rest),
        _ => (false, args),
    };
    let v6 = |text: &String| -> Result<Ipv6Addr, String> {
        text.parse()
            .map_err(|_| format!("bad IPv6 address {text:?}"))
    };
    let (iface, target, from) = match args {
        [iface] => (iface, None, None),
        [iface, target] => (iface, Some(v6(target)?), None),
        [iface, target, from] => (iface, Some(v6(target)?), Some(v6(from)?)),
        _ => return Err(USAGE.to_string()),
    };
    let mac = mac_of(iface)?;
    // Type, code 0, checksum (filled in below, or by the kernel), then the type's fields.
    let mut message = match target {
        None => {
            // Current hop limit 64, no flags, router lifetime 1800 s, reachable time and
            // retransmit timer unspecified.
            let mut m = vec![134, 0, 0, 0, 64, 0];
            m.extend_from_slice(&1800u16.to_be_bytes());
            m.extend_from_slice(&[0; 8]);
            m
        }
        Some(target) => {
            // Override flag only (an unsolicited advertisement is not solicited), the target,
            // and the target link-layer address option (type 2, one 8-byte unit).
            let mut m = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
            m.extend_from_slice(&target.octets());
            m.extend_from_slice(&[2, 1]);
            m.extend_from_slice(&mac);
            m
        }
    };
    if vlan0 {
        let from = match from {
            Some(from) => from,
            None => link_local(iface)?,
        };
        return send_vlan0(iface, mac, from, &mut message);
    }
    let index = ifindex(iface)?;
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .map_err(|e| format!("raw ICMPv6 socket: {e}"))?;
    // Receivers drop neighbour discovery that crossed a router: the hop limit must be 255.
    socket
        .set_multicast_hops_v6(255)
        .and_then(|()| socket.set_multicast_if_v6(index))
        .map_err(|e| format!("socket options: {e}"))?;
    if let Some(from) = from {
        let at = SockAddr::from(std::net::SocketAddrV6::new(from, 0, 0, 0));
        socket.bind(&at).map_err(|e| format!("bind {from}: {e}"))?;
    }
    let to = SockAddr::from(std::net::SocketAddrV6::new(ALL_NODES, 0, 0, index));
    socket
        .send_to(&message, &to)
        .map_err(|e| format!("send to {ALL_NODES}%{iface}: {e}"))?;
    Ok(())
}

const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// `iface`'s IPv6 link-local address, from `/proc/net/if_inet6`.
fn link_local(iface: &str) -> Result<Ipv6Addr, String> {
    let table = std::fs::read_to_string("/proc/net/if_inet6")
        .map_err(|e| format!("/proc/net/if_inet6: {e}"))?;
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Address, index, prefix length, scope (0x20: link), flags (0x40: tentative, 0x08:
            // duplicate), name.
            let usable = |flags: &str| u8::from_str_radix(flags, 16).is_ok_and(|f| f & 0x48 == 0);
            match fields[..] {
                [addr, _, _, "20", flags, name] if name == iface && usable(flags) => {
                    u128::from_str_radix(addr, 16).ok()
                }
                _ => None,
            }
        })
        .map(Ipv6Addr::from)
        .next()
        .ok_or_else(|| format!("{iface} has no link-local address"))
}

/// Sends ICMPv6 `message` from `from` to all nodes as one Ethernet frame with a VLAN tag of ID
/// 0 (which receivers take for no tag), written whole on `iface`'s packet socket.
fn send_vlan0(iface: &str, mac: [u8; 6], from: Ipv6Addr, message: &mut [u8]) -> Result<(), String> {
    const ICMPV6: u8 = 58;
    let length = u16::try_from(message.len()).map_err(|_| "message too long".to_string())?;
    let sum = checksum6(from, ALL_NODES, ICMPV6, message);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    // Ethernet to 33:33:00:00:00:01, the tag (type 802.1Q, ID 0), then IPv6 with hop limit 255.
    let mut frame = vec![0x33, 0x33, 0, 0, 0, 1];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x81, 0x00, 0, 0, 0x86, 0xdd]);
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&[ICMPV6, 255]);
    frame.extend_from_slice(&from.octets());
    frame.extend_from_slice(&ALL_NODES.octets());
    frame.extend_from_slice(message);
    send_frame(iface, &frame)
}

/// The Internet checksum of `data` (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The checksum of an upper-layer `message` (its checksum field 0) over IPv6: it covers a
/// pseudo-header of source, destination, length and next header, then the message.
fn checksum6(from: Ipv6Addr, to: Ipv6Addr, next_header: u8, message: &[u8]) -> u16 {
    let length = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut pseudo = Vec::with_capacity(40 + message.len());
    pseudo.extend_from_slice(&from.octets());
    pseudo.extend_from_slice(&to.octets());
    pseudo.extend_from_slice(&length.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, next_header]);
    pseudo.extend_from_slice(message);
    checksum(&pseudo)
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    text.split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<Vec<u8>>>()?
        .try_into()
        .ok()
}

/// `iface`'s own link-layer address.
fn mac_of(iface: &str) -> Result<[u8; 6], String> {
    parse_mac(&sysfs(iface, "address")?)
        .ok_or_else(|| format!("{iface}: unreadable link-layer address"))
}

/// `/sys/class/net/IFACE/FILE` of this namespace, trimmed.
fn sysfs(iface: &str, file: &str) -> Result<String, String> {
    let path = format!("/sys/class/net/{iface}/{file}");
    std::fs::read_to_string(&path)
        .map(|text| text.trim().to_string())
        .map_err(|e| format!("{path}: {e}"))
}

/// Writes `frame` whole on `iface`'s packet socket.
fn send_frame(iface: &str, frame: &[u8]) -> Result<(), String> {
    let interface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface)
        .ok_or_else(|| format!("no interface {iface}"))?;
    let config = pnet_datalink::Config {
        promiscuous: false,
        ..pnet_datalink::Config::default()
    };
    let Ok(pnet_datalink::Channel::Ethernet(mut tx, _)) =
        pnet_datalink::channel(&interface, config)
    else {
        return Err(format!("no packet socket on {iface}"));
    };
    tx.send_to(frame, None)
        .ok_or_else(|| format!("nothing sent on {iface}"))?
        .map_err(|e| format!("send on {iface}: {e}"))
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("bad port {text:?}"))
}

/// `ADDR` or, for an IPv6 link-local unicast or multicast address, `ADDR%IFACE`: the address
/// and the interface's index (0 without one).
fn scoped(text: &str) -> Result<(IpAddr, u32), String> {
    let (addr, scope) = match text.split_once('%') {
        Some((addr, iface)) => (addr, ifindex(iface)?),
        None => (text, 0),
    };
    let addr = addr.parse().map_err(|_| format!("bad address {addr:?}"))?;
    Ok((addr, scope))
}

fn socket_addr(addr: IpAddr, port: u16, scope: u32) -> SocketAddr {
    match addr {
        IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, scope)),
        IpAddr::V4(_) => SocketAddr::new(addr, port),
    }
}

/// The index of interface `iface` of this namespace.
fn ifindex(iface: &str) -> Result<u32, String> {
    sysfs(iface, "ifindex")?
        .parse()
        .map_err(|_| format!("{iface}: ifindex is not a number"))
}

fn probe_one(target: &Target, timeout: Duration) -> Result<(), String> {
    let dst = socket_addr(target.addr, target.port, target.scope);
    let deadline = Instant::now() + timeout;
    match target.proto {
        Proto::Tcp => {
            // The kernel picks a fresh ephemeral port for every connect.
            let mut stream = TcpStream::connect_timeout(&dst, timeout).map_err(reason)?;
            stream
                .set_read_timeout(Some(remaining(deadline)))
                .map_err(reason)?;
            let mut buf = [0u8; 64];
            match stream.read(&mut buf) {
                Ok(0) => Err("closed without a reply".into()),
                Ok(_) => Ok(()),
                Err(e) => Err(reason(e)),
            }
        }
        Proto::Udp => {
            let local = match target.addr {
                IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, target.udp_sport)),
                IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, target.udp_sport)),
            };
            let socket = UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
            // Connected: only the target's reply is read, and ICMP errors surface as errors.
            socket.connect(dst).map_err(reason)?;
            let mut buf = [0u8; 64];
            loop {
                if Instant::now() >= deadline {
                    return Err("timeout".into());
                }
                socket.send(b"probe\n").map_err(reason)?;
                socket
                    .set_read_timeout(Some(remaining(deadline).min(UDP_RESEND)))
                    .map_err(reason)?;
                match socket.recv(&mut buf) {
                    Ok(_) => return Ok(()),
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => return Err(reason(e)),
                }
            }
        }
    }
}

/// Time left until `deadline`, never zero (a zero read timeout is an error).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

fn reason(e: io::Error) -> String {
    match e.kind() {
        _ if is_timeout(&e) => "timeout".into(),
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            format!("unreachable ({e})")
        }
        _ => e.to_string(),
    }
}
