#!/usr/bin/env bash
# Compare mxgate (splice and copy) with HAProxy and nginx in one run, against the same backends
# and load generators. Writes docs/benchmarks.md and docs/benchmarks.svg.
#
#   sudo apt-get install -y haproxy nginx libnginx-mod-stream iperf3 postfix
#   benches/compare.sh            # full run, a few minutes
#   QUICK=1 benches/compare.sh    # shorter run, for a smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)"
cargo build --release --bin mxgate --example netload
exec python3 benches/compare.py
