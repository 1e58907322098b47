#!/usr/bin/env bash
# A longer soak against a release build: tests/soak.sh [MINUTES] (default 10).
# Mixes a single-source flood, a backend that dies and comes back, resets mid-transfer and
# integrity checks, then checks that RSS, descriptors and gauges are back to baseline, and
# prints a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK_MINUTES="${1:-10}" cargo test --release --test soak -- --ignored --nocapture
