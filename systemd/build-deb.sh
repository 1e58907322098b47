#!/usr/bin/env bash
# Builds the Debian package: target/debian/mxgate_<version>_<arch>.deb
#   cargo install cargo-deb    # once
#   systemd/build-deb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin mxgate
mkdir -p target/assets
bin=target/release/mxgate
"$bin" man | gzip -9n > target/assets/mxgate.1.gz
"$bin" man run | gzip -9n > target/assets/mxgate-run.1.gz
"$bin" man check | gzip -9n > target/assets/mxgate-check.1.gz
"$bin" man load | gzip -9n > target/assets/mxgate-load.1.gz
"$bin" man demo | gzip -9n > target/assets/mxgate-demo.1.gz
"$bin" man status | gzip -9n > target/assets/mxgate-status.1.gz
"$bin" man mxgate.toml | gzip -9n > target/assets/mxgate.toml.5.gz
"$bin" completions bash > target/assets/mxgate.bash
"$bin" completions zsh > target/assets/_mxgate
"$bin" completions fish > target/assets/mxgate.fish
cargo deb --no-build "$@"
