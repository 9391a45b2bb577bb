#!/usr/bin/env bash
# Installs everything this project needs on a fresh machine and builds it:
# Debian packages (compiler, nlohmann_json, GoogleTest), a virtual
# environment with the pinned Python packages, and the extension itself.
# Safe to re-run: each step is skipped when already done.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TSS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

log() { printf '== %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_debian_packages() {
  # strace: the durability tests watch the order of fsync and rename.
  local packages=(g++ nlohmann-json3-dev libgtest-dev strace)
  local missing=()
  for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
      missing+=("$package")
  done
  if [ "${#missing[@]}" -eq 0 ]; then return; fi
  log "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

create_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha256"
  local wanted
  wanted="$(sha256sum "$ROOT/requirements-dev.txt" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    log "installing Python packages (requirements-dev.txt)"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/requirements-dev.txt"
    echo "$wanted" >"$stamp"
  fi
}

# Builds against the venv's torch (hence --no-build-isolation) and installs
# the package; skipped when the sources have not changed since.
install_extension() {
  local stamp="$VENV/.extension.sha256"
  local wanted
  wanted="$(cd "$ROOT" && find setup.py pyproject.toml csrc include python -type f \
    -not -path '*/__pycache__/*' | sort | xargs cat | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ] &&
    (cd / && "$VENV/bin/python" -c "import trinity_stream_saver" 2>/dev/null); then
    return
  fi
  log "building and installing trinity_stream_saver (a minute or two)"
  (cd "$ROOT" && MAX_JOBS="$(nproc)" "$VENV/bin/pip" install -q --disable-pip-version-check \
    --no-build-isolation --no-deps .)
  echo "$wanted" >"$stamp"
}

install_debian_packages
create_venv
install_extension
