//! nftpol's test bench: synthetic clusters for benchmarks, and the tests under `tests/` that
//! load real rulesets into throwaway network namespaces.

#![forbid(unsafe_code)]

pub mod agents;
pub mod apiserver;
pub mod lab;
pub mod netns;
pub mod objects;
pub mod synthetic;
