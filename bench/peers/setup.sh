#!/usr/bin/env bash
# Creates bench/peers/.venv with the pinned peer requirements (PyPI only), by
# the same script that sets up the JAX reference. Idempotent. The
# torch.compile peer builds the C++ that Inductor generates, so it needs a C++
# compiler (g++) and Python's headers on this machine; nothing is fetched at
# run time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v "${CXX:-g++}" >/dev/null; then
  echo "bench/peers: torch.compile needs a C++ compiler: install g++ (or set CXX)" >&2
  exit 1
fi
exec "$here/../../reference/setup.sh" "$here"
