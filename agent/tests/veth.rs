//! Veth discovery against the real kernel. Each test's thread unshares a network namespace that
//! plays the node: a `cni0` bridge, pods in named namespaces of their own (`ip netns add`, a
//! prefix unique to the run, deleted on drop, panic or not), joined by veth pairs whose host
//! side is `veth<8 hex>` and whose pod side is `eth0`.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test fails by panicking"
)]

use std::io::Write;
use std::net::{IpAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agent::veth::{discover, Discovery, Method};

mod common;

use common::{in_netns, skip_unless_root};

/// Runs `ip` (or `bridge`) in the calling thread's network namespace; panics with its stderr.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &str) {
    run("ip", &args.split_whitespace().collect::<Vec<_>>());
}

fn mac_bytes(s: &str) -> [u8; 6] {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("six bytes")
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A node's pods: named namespaces, removed when this is dropped.
struct Lab {
    prefix: String,
    pods: Vec<String>,
}

impl Lab {
    /// A lab with a `cni0` bridge (10.244.0.1/24, fd00:244::1/64) in the calling thread's
    /// namespace.
    fn new() -> Self {
        static RUN: AtomicU32 = AtomicU32::new(0);
        let lab = Self {
            prefix: format!(
                "nftpol-veth-{}-{}",
                std::process::id(),
                RUN.fetch_add(1, Ordering::Relaxed)
            ),
            pods: Vec::new(),
        };
        // A fixed MAC: a bridge that takes its lowest port's changes it as pods come and go.
        ip("link add cni0 address 02:00:00:00:00:01 type bridge mcast_snooping 0");
        ip("addr add 10.244.0.1/24 dev cni0");
        ip("addr add fd00:244::1/64 dev cni0 nodad");
        ip("link set cni0 up");
        lab
    }

    /// A pod namespace joined by `host` (in this namespace) to its `eth0`, which holds
    /// `addresses`; `host` is enslaved to `bridge` when given. The pod's MAC is `mac`.
    fn pod(&mut self, host: &str, bridge: Option<&str>, mac: &str, addresses: &[&str]) -> String {
        let netns = format!("{}-{}", self.prefix, self.pods.len());
        ip(&format!("netns add {netns}"));
        self.pods.push(netns.clone());
        ip(&format!(
            "link add {host} type veth peer name eth0 address {mac} netns {netns}"
        ));
        if let Some(bridge) = bridge {
            ip(&format!("link set {host} master {bridge}"));
        }
        ip(&format!("link set {host} up"));
        ip(&format!("-n {netns} link set lo up"));
        ip(&format!("-n {netns} link set eth0 up"));
        for a in addresses {
            let nodad = if a.contains(':') { " nodad" } else { "" };
            ip(&format!("-n {netns} addr add {a} dev eth0{nodad}"));
        }
        netns
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for netns in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", netns]).output();
        }
    }
}

/// Sends one UDP datagram from inside `netns`, from `from` to `to`: the node learns the pod's
/// neighbour entry and the bridge its MAC, as they would from a real pod's first packet.
fn send_from_pod(netns: &str, from: &str, to: &str) {
    let (netns, from, to) = (netns.to_string(), from.to_string(), to.to_string());
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{netns}")).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let socket = UdpSocket::bind((addr(&from), 0)).expect("bind in the pod");
        socket.send_to(b"hello", (addr(&to), 9)).expect("send");
    })
    .join()
    .expect("sender thread");
}

/// Runs `program -batch -` on `commands`, one per line.
fn batch(program: &str, commands: &str) {
    let mut child = Command::new(program)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{program} -batch failed");
}

/// Prints the min, median and max of `runs` timed calls of `f`.
fn measure(label: &str, runs: usize, mut f: impl FnMut()) {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    times.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{label}, {runs} runs: min {:.2} ms, median {:.2} ms, max {:.2} ms",
        ms(times[0]),
        ms(times[runs / 2]),
        ms(times[runs - 1])
    );
}

fn veth<'a>(d: &'a Discovery, name: &str) -> &'a agent::veth::Veth {
    d.veths()
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("{name} not discovered: {d:#?}"))
}

fn owner(d: &Discovery, ip: &str) -> Option<String> {
    d.interface_of(addr(ip)).map(|v| v.name.clone())
}

#[test]
fn each_pod_address_maps_to_its_host_veth() {
    if skip_unless_root("each_pod_address_maps_to_its_host_veth") {
        return;
    }
    in_netns(|| {
        let mut lab = Lab::new();
        let pods = [
            (
                "veth0a1b2c3d",
                "02:00:00:00:00:02",
                "10.244.0.2",
                "fd00:244::2",
            ),
            (
                "veth1f2e3d4c",
                "02:00:00:00:00:03",
                "10.244.0.3",
                "fd00:244::3",
            ),
            (
                "veth99aa88bb",
                "02:00:00:00:00:04",
                "10.244.0.4",
                "fd00:244::4",
            ),
        ];
        for (host, mac, v4, v6) in pods {
            lab.pod(
                host,
                Some("cni0"),
                mac,
                &[&format!("{v4}/24"), &format!("{v6}/64")],
            );
        }
        lab.pod("vethdeadbeef", Some("cni0"), "02:00:00:00:00:05", &[]);
        lab.pod(
            "veth0000cafe",
            None,
            "02:00:00:00:00:06",
            &["10.250.0.2/32"],
        );
        ip("link add flannel.1 type vxlan id 1 dstport 8472 nolearning");
        ip("addr add 10.99.0.1/32 dev flannel.1");
        ip("link set flannel.1 up");
        // Both ends here: no peer namespace, no bridge, so nothing to learn.
        ip("link add vethloca type veth peer name vethlocb");
        ip("addr add 10.98.0.1/32 dev vethlocb");

        let d = discover().expect("discover");

        let mut names: Vec<&str> = d.veths().iter().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "veth0000cafe",
                "veth0a1b2c3d",
                "veth1f2e3d4c",
                "veth99aa88bb",
                "vethdeadbeef",
                "vethloca",
                "vethlocb"
            ],
            "veths only: no bridge, no vxlan"
        );
        let mut netns_ids = Vec::new();
        for (host, mac, v4, v6) in pods {
            assert_eq!(owner(&d, v4).as_deref(), Some(host), "{v4}");
            assert_eq!(owner(&d, v6).as_deref(), Some(host), "{v6}");
            let v = veth(&d, host);
            assert_eq!(
                v.mac,
                Some(mac_bytes(mac)),
                "{host}: its peer's link-layer address"
            );
            assert!(d.sharing_mac(v).is_empty());
            assert_eq!(v.bridge.as_deref(), Some("cni0"));
            assert_eq!(v.method, Method::PeerNamespace);
            assert_eq!(v.addresses, [addr(v4), addr(v6)], "no fe80:: address");
            netns_ids.push(v.peer_netns_id.expect("the kernel assigns a netns id"));
        }
        netns_ids.sort_unstable();
        netns_ids.dedup();
        assert_eq!(netns_ids.len(), 3, "one netns id per pod namespace");

        let bare = veth(&d, "vethdeadbeef");
        assert!(bare.addresses.is_empty(), "{bare:?}");
        assert_eq!(bare.method, Method::PeerNamespace);

        let unbridged = veth(&d, "veth0000cafe");
        assert_eq!(unbridged.bridge, None);
        assert_eq!(owner(&d, "10.250.0.2").as_deref(), Some("veth0000cafe"));

        let local = veth(&d, "vethloca");
        assert_eq!((local.peer_netns_id, local.method), (None, Method::Unknown));

        assert_eq!(owner(&d, "10.99.0.1"), None, "flannel.1's address");
        assert_eq!(owner(&d, "10.98.0.1"), None, "a node-local veth's address");
        assert_eq!(owner(&d, "10.244.0.1"), None, "the bridge's own address");
        // The bridge's own subnets (link-local left out), which its pods' addresses are in;
        // nothing for a device that is no bridge.
        assert_eq!(
            d.bridge_nets("cni0")
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.244.0.0/24", "fd00:244::/64"]
        );
        assert!(d.bridge_nets("flannel.1").is_empty());
        assert_eq!(d.addresses().count(), 7);
        assert!(d.conflicts().is_empty());
        assert!(d.failures().is_empty(), "{:?}", d.failures());

        // The guarded pods' bridge learns from frames to its reserved group addresses until
        // the agent stops it.
        let v = veth(&d, "veth0a1b2c3d");
        let guard = ruleset::guard::Guard::from(vec![ruleset::guard::GuardedPod {
            veth: ruleset::ir::IfName::new(&v.name).unwrap(),
            index: v.index,
            ips: v.addresses.clone(),
            mac: v.mac.unwrap(),
            mac_shared: false,
            egress_isolated: false,
        }]);
        let learners = agent::veth::link_local_learners(&d, &guard);
        assert_eq!(
            learners.iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(),
            ["cni0"]
        );
        assert!(d.learns_link_local("cni0"));
        agent::veth::stop_link_local_learning(learners[0].1).expect("set no_linklocal_learn");
        let d = discover().expect("discover");
        assert!(!d.learns_link_local("cni0"));
        assert!(agent::veth::link_local_learners(&d, &guard).is_empty());
        let shown = Command::new("ip")
            .args(["-d", "link", "show", "cni0"])
            .output()
            .expect("ip runs");
        assert!(String::from_utf8_lossy(&shown.stdout).contains("no_linklocal_learn 1"));

        // A guarded pod's MAC pinned to its veth: static, pinned again without complaint, and
        // unpinned (twice: the second finds nothing, which is no failure).
        let pin = (v.index, v.mac.unwrap());
        let entry = |mac: &str| {
            let shown = Command::new("bridge")
                .args(["fdb", "show", "br", "cni0"])
                .output()
                .expect("bridge runs");
            String::from_utf8_lossy(&shown.stdout)
                .lines()
                .find(|line| line.starts_with(mac))
                .map(str::to_string)
        };
        for _ in 0..2 {
            let failures = agent::veth::pin_macs(&[pin], &[]);
            assert!(
                failures.errors.is_empty() && failures.elsewhere.is_empty(),
                "{failures:?}"
            );
            let line = entry("02:00:00:00:00:02").expect("the pinned entry");
            assert!(
                line.contains(&format!("dev {} ", v.name)) && line.contains("static"),
                "{line}"
            );
        }
        for _ in 0..2 {
            let failures = agent::veth::pin_macs(&[], &[pin]);
            assert!(failures.errors.is_empty(), "{failures:?}");
            assert_eq!(entry("02:00:00:00:00:02"), None);
        }
        // A MAC the bridge has behind another port, or as its own (cni0's): not pinned, and
        // its entry stays where it was.
        run(
            "bridge",
            &[
                "fdb",
                "replace",
                "02:00:00:00:00:03",
                "dev",
                "veth1f2e3d4c",
                "master",
                "static",
            ],
        );
        for mac in ["02:00:00:00:00:03", "02:00:00:00:00:01"] {
            let before = entry(mac).expect("an entry");
            let failures = agent::veth::pin_macs(&[(v.index, mac_bytes(mac))], &[]);
            assert_eq!(
                failures.elsewhere,
                [(v.index, mac_bytes(mac))],
                "{failures:?}"
            );
            assert_eq!(entry(mac), Some(before));
        }
    });
}

#[test]
fn an_address_on_two_pods_maps_to_neither() {
    if skip_unless_root("an_address_on_two_pods_maps_to_neither") {
        return;
    }
    in_netns(|| {
        let mut lab = Lab::new();
        lab.pod(
            "veth11111111",
            Some("cni0"),
            "02:00:00:00:00:02",
            &["10.244.0.2/24", "10.244.0.9/24"],
        );
        lab.pod(
            "veth22222222",
            Some("cni0"),
            "02:00:00:00:00:03",
            &["10.244.0.3/24", "10.244.0.9/24"],
        );
        // And one with the first one's link-layer address.
        lab.pod(
            "veth33333333",
            Some("cni0"),
            "02:00:00:00:00:02",
            &["10.244.0.5/24"],
        );

        let d = discover().expect("discover");
        assert_eq!(d.sharing_mac(veth(&d, "veth11111111")), ["veth33333333"]);
        assert!(d.sharing_mac(veth(&d, "veth22222222")).is_empty());

        assert_eq!(owner(&d, "10.244.0.9"), None);
        assert_eq!(
            d.conflicts().get(&addr("10.244.0.9")),
            Some(&vec![
                "veth11111111".to_string(),
                "veth22222222".to_string()
            ])
        );
        assert_eq!(owner(&d, "10.244.0.2").as_deref(), Some("veth11111111"));
        assert_eq!(owner(&d, "10.244.0.3").as_deref(), Some("veth22222222"));
        assert_eq!(veth(&d, "veth11111111").addresses, [addr("10.244.0.2")]);
    });
}

/// Without CAP_NET_ADMIN the kernel refuses IFA_TARGET_NETNSID (it needs the capability over
/// the peer namespace), while link, neighbour and fdb dumps stay open: every veth falls back to
/// the bridge tables, which know the pods that have sent something.
#[test]
fn without_net_admin_the_bridge_tables_stand_in() {
    if skip_unless_root("without_net_admin_the_bridge_tables_stand_in") {
        return;
    }
    in_netns(|| {
        let mut lab = Lab::new();
        let talker = lab.pod(
            "veth0a1b2c3d",
            Some("cni0"),
            "02:00:00:00:00:02",
            &["10.244.0.2/24", "fd00:244::2/64"],
        );
        lab.pod(
            "veth1f2e3d4c",
            Some("cni0"),
            "02:00:00:00:00:03",
            &["10.244.0.3/24"],
        );
        lab.pod(
            "veth99aa88bb",
            Some("cni0"),
            "02:00:00:00:00:04",
            &["10.244.0.4/24"],
        );
        run(
            "bridge",
            &[
                "fdb",
                "replace",
                "02:00:00:00:00:04",
                "dev",
                "veth99aa88bb",
                "master",
                "static",
            ],
        );
        // A pinned entry stands for a pod that has talked; added last, since a bridge whose MAC
        // changes flushes its neighbours, permanent ones too.
        ip("neigh replace 10.244.0.4 lladdr 02:00:00:00:00:04 dev cni0 nud permanent");
        send_from_pod(&talker, "10.244.0.2", "10.244.0.1");
        send_from_pod(&talker, "fd00:244::2", "fd00:244::1");

        caps::drop(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_NET_ADMIN,
        )
        .expect("drop CAP_NET_ADMIN from this thread");

        // The kernel learns from the datagrams asynchronously.
        let started = Instant::now();
        let d = loop {
            let d = discover().expect("discover");
            let learned = owner(&d, "10.244.0.2").is_some() && owner(&d, "fd00:244::2").is_some();
            if learned || started.elapsed() > Duration::from_secs(5) {
                break d;
            }
            std::thread::sleep(Duration::from_millis(50));
        };

        for v in d.veths() {
            assert_eq!(v.method, Method::BridgeTables, "{v:?}");
        }
        assert_eq!(owner(&d, "10.244.0.2").as_deref(), Some("veth0a1b2c3d"));
        assert_eq!(owner(&d, "fd00:244::2").as_deref(), Some("veth0a1b2c3d"));
        assert_eq!(owner(&d, "10.244.0.4").as_deref(), Some("veth99aa88bb"));
        // The MAC the node's neighbour entries give for the addresses behind the port.
        assert_eq!(
            veth(&d, "veth0a1b2c3d").mac,
            Some(mac_bytes("02:00:00:00:00:02"))
        );
        assert_eq!(
            veth(&d, "veth1f2e3d4c").mac,
            None,
            "a silent pod's MAC is not known"
        );
        assert_eq!(
            owner(&d, "10.244.0.3"),
            None,
            "a silent pod is not in the tables"
        );
        assert_eq!(owner(&d, "10.244.0.1"), None);
        assert_eq!(
            d.failures().len(),
            3,
            "one per peer namespace: {:?}",
            d.failures()
        );
        let failure = d.failures()[0].to_string();
        assert!(
            failure.contains("IFA_TARGET_NETNSID") && failure.contains("refused"),
            "{failure}"
        );
    });
}

/// A full node (110 pods): every address is found by either method. Prints the times too
/// (`cargo test --release -p agent --test veth -- --nocapture discovery_time`); they are
/// reported, not asserted.
#[test]
fn discovery_time_with_110_veths() {
    if skip_unless_root("discovery_time_with_110_veths") {
        return;
    }
    const PODS: u32 = 110;
    const RUNS: usize = 10;
    in_netns(|| {
        let mut lab = Lab::new();
        let setup = Instant::now();
        for i in 0..PODS {
            let (hi, lo) = (i / 200, i % 200 + 2);
            lab.pod(
                &format!("veth{:08x}", 0x1000_0000 + i),
                Some("cni0"),
                &format!("02:00:00:00:{hi:02x}:{lo:02x}"),
                &[
                    &format!("10.244.{hi}.{lo}/16"),
                    &format!("fd00:244::{hi}:{lo}/64"),
                ],
            );
        }
        println!(
            "set up {PODS} pod namespaces in {:.1} s",
            setup.elapsed().as_secs_f64()
        );
        measure(
            &format!("discover() with {PODS} veths, peer namespaces"),
            RUNS,
            || {
                let d = discover().expect("discover");
                assert_eq!(d.addresses().count(), 2 * PODS as usize);
            },
        );

        let d = discover().expect("discover");
        let pins: Vec<(u32, [u8; 6])> = d
            .veths()
            .iter()
            .map(|v| (v.index, v.mac.expect("a MAC")))
            .collect();
        measure(
            &format!("pin_macs() of {PODS} veths, all pinned already but the first run"),
            RUNS,
            || {
                let failures = agent::veth::pin_macs(&pins, &[]);
                assert!(
                    failures.errors.is_empty() && failures.elsewhere.is_empty(),
                    "{failures:?}"
                );
            },
        );

        // The fallback's worst case: every pod in the neighbour table and the fdb.
        let (mut neighbours, mut fdb) = (String::new(), String::new());
        for i in 0..PODS {
            let (hi, lo) = (i / 200, i % 200 + 2);
            let mac = format!("02:00:00:00:{hi:02x}:{lo:02x}");
            for a in [format!("10.244.{hi}.{lo}"), format!("fd00:244::{hi}:{lo}")] {
                neighbours.push_str(&format!(
                    "neigh replace {a} lladdr {mac} dev cni0 nud permanent\n"
                ));
            }
            let host = format!("veth{:08x}", 0x1000_0000 + i);
            fdb.push_str(&format!("fdb replace {mac} dev {host} master static\n"));
        }
        batch("bridge", &fdb);
        batch("ip", &neighbours);
        caps::drop(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_NET_ADMIN,
        )
        .expect("drop CAP_NET_ADMIN from this thread");
        measure(
            &format!("discover() with {PODS} veths, bridge tables"),
            RUNS,
            || {
                let d = discover().expect("discover");
                assert_eq!(d.addresses().count(), 2 * PODS as usize);
            },
        );
    });
}
