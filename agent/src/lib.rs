//! The nftpol node agent: cluster sources and subcommands.
//!
//! ```text
//! manifests (file or directory) -> Cluster -> ruleset::Compiler -> nft text (dump-ruleset)
//!                                          -> ruleset::Tracer   -> verdict and why (trace)
//!                                          -> diff -> netlink::Writer -> kernel (run)
//! sync that changes the table -> next ruleset epoch -> conntrack: clear it from marks first
//! kernel links, addresses, bridge tables -> veth::discover -> pod IP -> host-side veth
//! link reports (a veth new, gone, on a bridge) -> links::LinkWatch -> veth::discover now
//! API server (list/watch) -> kube_source: Update -> Mirror / Batch -> Compiler -> Delta
//! Compiler::diagnostics -> events::Findings -> log once; API: events::Recorder -> Events
//! the loop's syncs and counts -> health::Health -> /healthz, /readyz, /metrics (HTTP)
//!                                                -> notify (systemd READY=1, WATCHDOG=1)
//! ```

pub mod cli;
pub mod conntrack;
pub mod convert;
pub mod dump;
pub mod events;
pub mod health;
pub mod kube_source;
pub mod links;
pub mod manifests;
pub mod netlink;
pub mod node;
pub mod notify;
pub mod run;
pub mod trace;
pub mod veth;
