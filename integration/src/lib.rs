//! nftpol's test bench: synthetic clusters for benchmarks, the tests under `tests/` that
//! load real rulesets into throwaway network namespaces (`lab`) and run real agents in them
//! (`agents`, `probers`), and a stand-in API server (`apiserver`, fed through `objects`) that
//! the agent's Kubernetes source lists and watches; `measure` holds what benchmarks read
//! (percentiles, load average, `/proc`, `/metrics`, the moment a connection's verdict flips).

#![forbid(unsafe_code)]

pub mod agents;
pub mod apiserver;
pub mod lab;
pub mod measure;
pub mod netns;
pub mod objects;
pub mod probers;
pub mod synthetic;
