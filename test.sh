#!/usr/bin/env bash
# Every test of the project: the Rust tests, each Rosetta track's own tests
# (tracks/*/run test), then parity against the JAX reference for Rust and every
# track (installing the pinned Python packages and toolchains on first use).
set -euo pipefail
cd "$(dirname "$0")"
cargo test --release
for run in tracks/*/run; do
  if [ -x "$run" ]; then "$run" test; fi
done
reference/parity
