#!/usr/bin/env bash
# Creates interop/.venv with the pinned requirements (PyPI only), by the same
# script that sets up the JAX reference. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/../reference/setup.sh" "$here"
