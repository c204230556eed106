//! nftpol's test bench: synthetic clusters for benchmarks, and the tests under `tests/` that
//! load real rulesets into throwaway network namespaces.

pub mod lab;
pub mod netns;
pub mod synthetic;
