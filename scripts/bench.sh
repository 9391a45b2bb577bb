#!/usr/bin/env bash
# The side-by-side benchmark: sets the project up (scripts/setup.sh), then
# runs benchmarks/bench.py, which writes tables, benchmarks/results.png and
# benchmarks/results.json. Extra arguments go to bench.py (try --help; e.g.
# --scenarios llama,llama_2x,moe,moe_2x for the model-shaped streams alone,
# --scale 0.1 --rounds 1 for a quick look).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TSS_VENV:-$ROOT/.venv}"

"$ROOT/scripts/setup.sh"
exec "$VENV/bin/python" "$ROOT/benchmarks/bench.py" "$@"
