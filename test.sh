#!/usr/bin/env bash
# Every test of the project: the Rust tests, then parity against the JAX
# reference (which installs its own pinned Python packages into
# reference/.venv on first use).
set -euo pipefail
cd "$(dirname "$0")"
cargo test --release
reference/parity
