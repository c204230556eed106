#!/usr/bin/env bash
# The main job on a fresh machine (as root): a two-node Flannel-style lab in network namespaces
# runs the three-tier example's pods; the connectivity matrix is printed with no policy
# enforced, then with one `agent run` per node enforcing the example's NetworkPolicies. Then
# `agent trace` explains two connections and `agent dump-ruleset` shows the start of a node's
# rules. The lab is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -q -p agent -p integration --bins
bin=target/release
example=integration/examples/three-tier.yaml
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ "$(id -u)" -eq 0 ]; then
    say "live: a two-node lab, before and after the agents enforce $example"
    "$bin/demo" "$bin/agent" "$bin/labpod" "$example"
else
    say "skipping the live lab: it needs root (network namespaces)"
fi

say "agent trace: ingress controller -> frontend, TCP 8080"
"$bin/agent" trace --manifests "$example" --from ingress-nginx/ingress-nginx-controller --to shop/frontend-2 --port 8080

say "agent trace: frontend -> database, TCP 5432"
"$bin/agent" trace --manifests "$example" --from shop/frontend-1 --to shop/database-0 --port 5432

say "agent dump-ruleset --manifests $example --node node-a (first 30 lines)"
rules=$(mktemp)
trap 'rm -f "$rules"' EXIT
"$bin/agent" dump-ruleset --manifests "$example" --node node-a 2>/dev/null >"$rules"
head -n 30 "$rules"
