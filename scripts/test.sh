#!/usr/bin/env bash
# Runs every test: sets the project up (scripts/setup.sh), builds and runs
# the C++ GoogleTest suite (plainly and under ASan+UBSan), installs the C++
# package, then runs the Python suite. Exits non-zero if any test fails.
# Extra arguments go to pytest.
#
# --quick (first argument): set up, then only the Python tests not marked
# slow, for everyday work; the full run stays the check before landing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TSS_VENV:-$ROOT/.venv}"

QUICK=0
if [ "${1:-}" = "--quick" ]; then
  QUICK=1
  shift
fi

"$ROOT/scripts/setup.sh"

# Runs pytest from the tests directory against the installed package, not
# the source tree, so that what is tested is what users get.
python_tests() {
  cd "$ROOT/tests"
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" .
}

if [ "$QUICK" -eq 1 ]; then
  echo "== Python tests not marked slow (pytest -m 'not slow')"
  python_tests -m "not slow" "$@"
  exit
fi

# Configures the CMake project in build directory $1 with the options that
# follow.
cmake_configure() {
  local build="$1"
  shift
  "$VENV/bin/cmake" -S "$ROOT" -B "$build" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
    -DCMAKE_PREFIX_PATH="$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    -DCMAKE_POLICY_VERSION_MINIMUM=3.5 "$@" >/dev/null
}

# Builds the C++ tests in build directory $1 with the CMake options that
# follow, and runs them.
cpp_tests() {
  local build="$1"
  shift
  cmake_configure "$build" "$@"
  "$VENV/bin/cmake" --build "$build" -j "$(nproc)"
  "$VENV/bin/ctest" --test-dir "$build" --output-on-failure -j "$(nproc)"
}

echo "== C++ tests (GoogleTest)"
cpp_tests "$ROOT/build-cmake" -DCMAKE_BUILD_TYPE=Release

echo "== C++ package: installed from the Release build"
# tests/test_cpp_package.py builds examples/cpp against this installation,
# as a project outside this repository would. The install rules do not
# depend on BUILD_TESTING, so the library just tested is the one installed:
# no third build.
"$VENV/bin/cmake" --install "$ROOT/build-cmake" --prefix "$ROOT/build-cmake/prefix" >/dev/null
export TSS_INSTALL_PREFIX="$ROOT/build-cmake/prefix"

echo "== C++ tests under AddressSanitizer and UndefinedBehaviorSanitizer"
cpp_tests "$ROOT/build-asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSTREAM_SAVER_SANITIZE=ON

echo "== Python tests (pytest)"
python_tests "$@"
