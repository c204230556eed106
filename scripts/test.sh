#!/usr/bin/env bash
# Everything CI checks: formatting, lints, every test (network-namespace ones included when
# run as root), and that the benchmarks build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --release
cargo bench --workspace --locked --no-run
