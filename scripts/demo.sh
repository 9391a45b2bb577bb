#!/usr/bin/env bash
# The main job on a built-in default: sets the project up (scripts/setup.sh),
# then streams a synthetic ~1 GiB model and compares it with the other ways
# of saving it. Extra arguments go to benchmarks/demo.py (try --help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TSS_VENV:-$ROOT/.venv}"

"$ROOT/scripts/setup.sh"
exec "$VENV/bin/python" "$ROOT/benchmarks/demo.py" "$@"
