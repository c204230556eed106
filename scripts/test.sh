#!/usr/bin/env bash
# Everything CI checks: formatting, lints, that the benchmarks build, and every test
# (network-namespace ones included when run as root). Ends with a total line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo bench --workspace --locked --no-run
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked --release --lib --bins --tests 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
