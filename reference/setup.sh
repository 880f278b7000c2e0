#!/usr/bin/env bash
# Creates DIR/.venv with DIR/requirements.txt (PyPI only; DIR defaults to
# reference/). Idempotent: a venv whose recorded requirements match is kept.
set -euo pipefail
here="${1:-$(cd "$(dirname "$0")" && pwd)}"
venv="$here/.venv"
stamp="$venv/.requirements"
if [ -f "$stamp" ] && cmp -s "$stamp" "$here/requirements.txt"; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
cp "$here/requirements.txt" "$stamp"
