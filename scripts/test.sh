#!/usr/bin/env bash
# Runs every test: sets the project up (scripts/setup.sh), builds and runs
# the C++ GoogleTest suite, then the Python suite. Exits non-zero if any
# test fails. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TSS_VENV:-$ROOT/.venv}"
BUILD="$ROOT/build-cmake"

"$ROOT/scripts/setup.sh"

echo "== C++ tests (GoogleTest)"
"$VENV/bin/cmake" -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
  -DCMAKE_PREFIX_PATH="$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -DCMAKE_POLICY_VERSION_MINIMUM=3.5 >/dev/null
"$VENV/bin/cmake" --build "$BUILD" -j "$(nproc)"
"$VENV/bin/ctest" --test-dir "$BUILD" --output-on-failure -j "$(nproc)"

echo "== Python tests (pytest)"
# Run from the tests directory against the installed package, not the
# source tree, so that what is tested is what users get.
cd "$ROOT/tests"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" .
