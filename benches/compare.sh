#!/usr/bin/env bash
# Compare mxgate (splice and copy) with HAProxy and nginx in one run, against the same backends
# and load generators. Writes docs/benchmarks.md and docs/benchmarks.svg.
#
#   sudo apt-get install -y haproxy nginx libnginx-mod-stream iperf3 postfix
#   benches/compare.sh            # full run: 3 rounds, about 15 minutes
#   ROUNDS=5 benches/compare.sh   # more rounds, a tighter median
#   QUICK=1 benches/compare.sh    # one short round, for a smoke test
#   MXBIN_BEFORE=/path/to/older/mxgate benches/compare.sh   # also measure an older build
#                                 # beside this one, as "mxgate-before", in the same run
# Refusals beside Postfix postscreen's 421 (a private Postfix instance; needs root):
#   benches/refusals.py. Benches are not run by CI, so their tools are installed by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)"
cargo build --release --bin mxgate --example netload
exec python3 benches/compare.py
