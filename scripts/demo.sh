#!/usr/bin/env bash
# Shows the main job on a fresh machine: compile the three-tier example for one node, print
# the nftables ruleset, have the kernel validate it, and trace two connections.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -q -p agent
agent=target/release/agent
example=integration/examples/three-tier.yaml
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "agent dump-ruleset --manifests $example --node node-a"
"$agent" dump-ruleset --manifests "$example" --node node-a | tee /tmp/nftpol-demo.nft

if [ "$(id -u)" -eq 0 ]; then
    say "the kernel checks it (nft -c, in a throwaway network namespace)"
    unshare --net nft -c -f /tmp/nftpol-demo.nft && echo "accepted by nft -c"
fi

say "agent trace: ingress controller -> frontend, TCP 8080"
"$agent" trace --manifests "$example" --from ingress-nginx/ingress-nginx-controller --to shop/frontend-2 --port 8080

say "agent trace: frontend -> database, TCP 5432"
"$agent" trace --manifests "$example" --from shop/frontend-1 --to shop/database-0 --port 5432
