#!/usr/bin/env bash
# The exhaustion scenario of the issue "Trust under exhaustion", at its full size: the real
# binary under `prlimit --nofile=512:512`, max_connections 20, max_queued 2000, queue_timeout
# 60s, 20 sessions held, 3,000 silent clients from distinct 127.x sources, then the 20 holders
# quit together. tests/exhaustion_scenario.rs does the work and asserts; this runs it ROUNDS
# times with 3,000 clients and prints each round's figures (backend_unavailable, the new
# client's wait for its 421 at exhaustion, waiters served). docs/operations.md quotes them.
#
#   benches/exhaustion.sh              # 5 rounds
#   ROUNDS=10 CLIENTS=5000 benches/exhaustion.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)"
rounds="${ROUNDS:-5}"
for round in $(seq 1 "$rounds"); do
    MXGATE_EXHAUSTION_CLIENTS="${CLIENTS:-3000}" \
        cargo test --release --quiet --test exhaustion_scenario -- --nocapture 2>&1 |
        sed -n "s/^figures: /round $round: /p"
done
