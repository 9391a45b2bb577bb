#!/usr/bin/env bash
# The side-by-side benchmark: sets the project up (scripts/setup.sh), then
# runs benchmarks/bench.py, which writes a table, benchmarks/results.png and
# benchmarks/results.json. Extra arguments go to bench.py (try --help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TSS_VENV:-$ROOT/.venv}"

"$ROOT/scripts/setup.sh"
exec "$VENV/bin/python" "$ROOT/benchmarks/bench.py" "$@"
