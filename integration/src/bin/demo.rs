//! The live demo behind `scripts/demo.sh`: a two-node Flannel-style lab running a snapshot's
//! pods, the connectivity matrix with no policy enforced, then one `agent run` per node and
//! the matrix again. Everything is removed on exit.
//!
//! `demo AGENT LABPOD SNAPSHOT` (as root).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use integration::lab::{Cell, Family, Lab, Protocol};
use integration::netns;
use ruleset::Cluster;

const NODES: [&str; 2] = ["node-a", "node-b"];

/// Agents started in the lab's nodes, stopped before the lab goes.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [agent, labpod, snapshot] = args.as_slice() else {
        return Err("usage: demo AGENT LABPOD SNAPSHOT".into());
    };
    if !netns::is_root() {
        return Err("the lab needs root (network namespaces)".into());
    }
    let cluster = agent::manifests::load(&PathBuf::from(snapshot)).map_err(|e| e.to_string())?;
    // Each destination is probed on the ports it serves (UDP for 53, TCP otherwise).
    let services: BTreeSet<(Protocol, u16)> = cluster
        .pods()
        .filter(|p| !p.host_network)
        .flat_map(|p| p.ports.iter())
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let protocol = if p.protocol == "UDP" {
                Protocol::Udp
            } else {
                Protocol::Tcp
            };
            Some((protocol, port))
        })
        .collect();
    let services: Vec<(Protocol, u16)> = services.into_iter().collect();
    let ports: Vec<u16> = services.iter().map(|(_, p)| *p).collect();

    println!("building a 2-node lab (cni0 bridges joined by VXLAN) with the snapshot's pods...");
    let lab = Lab::for_cluster(labpod, &cluster, &NODES, &ports).map_err(|e| e.to_string())?;
    println!("\nwith no policy enforced (what Flannel alone does):");
    print_matrix(&lab, &cluster, &services)?;

    let mut agents = Agents(Vec::new());
    let (synced, wait) = mpsc::channel();
    for (index, node) in NODES.iter().enumerate() {
        let netns = lab.node_netns(index).ok_or("no such node")?;
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                agent,
                "run",
                "--manifests",
                snapshot,
                "--node",
                node,
            ])
            .arg("--state-dir")
            .arg(lab.state_dir(index))
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the agent: {e}"))?;
        let stderr = child.stderr.take().ok_or("no agent stderr")?;
        let synced = synced.clone();
        let node = node.to_string();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("synced") {
                    println!("  {node}: {}", line.trim());
                    let _ = synced.send(());
                }
            }
        });
        agents.0.push(child);
    }
    println!("\nstarting `agent run --manifests {snapshot} --node NODE` in each node...");
    for _ in NODES {
        wait.recv_timeout(Duration::from_secs(20))
            .map_err(|_| "an agent did not sync within 20 s".to_string())?;
    }
    println!("\nwith nftpol enforcing the snapshot's NetworkPolicies:");
    print_matrix(&lab, &cluster, &services)?;
    println!("\n(try: agent trace --manifests {snapshot} --from NS/POD --to NS/POD --port N)");
    drop(agents);
    println!("cleaning up the lab...");
    Ok(())
}

/// Rows are sources, columns destinations; a cell lists the ports of the destination's own
/// containers the source reached, `-` when none.
fn print_matrix(lab: &Lab, cluster: &Cluster, services: &[(Protocol, u16)]) -> Result<(), String> {
    let pods = lab.pods();
    let serving: Vec<BTreeSet<u16>> = pods
        .iter()
        .map(|lab_pod| {
            let (ns, name) = lab_pod.name.split_once('/').unwrap_or_default();
            cluster
                .pod(ns, name)
                .into_iter()
                .flat_map(|p| p.ports.iter().filter_map(|c| u16::try_from(c.port).ok()))
                .collect()
        })
        .collect();
    let cells: Vec<Cell> = lab
        .matrix(services, &[Family::V4])
        .map_err(|e| e.to_string())?;
    // Column-sized names: the head and the tail, which tells replicas apart.
    let short = |name: &str| {
        let name: Vec<char> = name.rsplit('/').next().unwrap_or(name).chars().collect();
        if name.len() <= 12 {
            name.into_iter().collect::<String>()
        } else {
            let head: String = name[..7].iter().collect();
            let tail: String = name[name.len() - 4..].iter().collect();
            format!("{head}~{tail}")
        }
    };
    print!("{:>14}", "from \\ to");
    for p in pods {
        print!(" {:>12}", short(&p.name));
    }
    println!();
    for (from, src) in pods.iter().enumerate() {
        print!("{:>14}", short(&src.name));
        for (to, own) in serving.iter().enumerate() {
            let reached: BTreeSet<String> = cells
                .iter()
                .filter(|c| {
                    c.from == from && c.to == to && c.outcome.ok && own.contains(&c.target.port)
                })
                .map(|c| c.target.port.to_string())
                .collect();
            let text = match (from == to, reached.is_empty()) {
                (true, _) => ".".to_string(),
                (false, true) => "-".to_string(),
                (false, false) => reached.into_iter().collect::<Vec<_>>().join(","),
            };
            print!(" {text:>12}");
        }
        println!();
    }
    Ok(())
}
