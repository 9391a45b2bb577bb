#!/usr/bin/env bash
# The GPU checks of the asynchronous save and of the write speed (issue
# "On the GPU"), as one call of the lent GPU machine (the `device` tool):
#   1. build the extension against that machine's torch (a CUDA build);
#   2. the tests that need CUDA: test_cuda.py, test_distributed_cuda.py
#      and the GPU cases of test_async_save.py;
#   3. gpu_async_bench.py: an ~8 GiB bf16 Llama-shaped model on the GPU,
#      AdamW between saves, our full and bounded staging against
#      dcp.async_save with DefaultStager's pinned, shared-memory staging
#      (FileSystemWriter and HuggingFaceStorageWriter) and our synchronous
#      save, one fresh process each, medians of 5 saves, on a tmpfs;
#   4. disk_speed_bench.py: dd (direct, buffered) against our single-file,
#      sharded and 1/2/4/8-thread saves of 8 GiB, to the local disk and
#      to the tmpfs.
# Each stage has its own limit and the script goes on after a stage fails,
# so that one call brings back what it can. At most 8 files come back:
# device.log, pytest.log, gpu_async.json, gpu_async.png, disk_local.json,
# disk_tmpfs.json.
#
# TSS_DEVICE_DRY=1: the same stages on this CPU machine, shrunk (a tiny
# model on the CPU, 256 MiB writes, no tmpfs mount needed), so that a typo
# costs no device time:
#   TSS_DEVICE_DRY=1 PYTHON=.venv/bin/python OUT=/tmp/dry bash benchmarks/device_async.sh
#
# That machine reaches no package registry, and nlohmann_json is a Debian
# package here: copy its headers into an ignored folder and carry it:
#   mkdir -p .device/include && cp -r /usr/include/nlohmann .device/include/
#   echo /.device/ >> .git/info/exclude
# then run `bash benchmarks/device_async.sh` with carry [".device"] and
# timeout_s 560.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/device-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# A relative interpreter path must survive the cd's below.
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
DRY="${TSS_DEVICE_DRY:-0}"
START=$SECONDS
BUDGET="${TSS_DEVICE_BUDGET_S:-540}"

exec > >(tee -a "$OUT/device.log") 2>&1
MIN_STAGE_S=20
# shellcheck source=benchmarks/device_stages.sh
source "$ROOT/benchmarks/device_stages.sh"

say "$(date -u +%Y-%m-%dT%H:%MZ) machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, dry run: $DRY"
nvidia-smi -L 2>&1 | head -2
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
df -h /tmp /dev/shm | sed 's/^/  /'

# 1. Build against this machine's torch.
[ -d "$ROOT/.device/include" ] && export CPLUS_INCLUDE_PATH="$ROOT/.device/include"
export MAX_JOBS="$(nproc)"
stage 240 "$PY" -m pip install -q --no-build-isolation --no-deps --no-cache-dir "$ROOT" \
  > "$OUT/build.log" 2>&1
if ! (cd /tmp && "$PY" -c 'import trinity_stream_saver._C'); then
  tail -40 "$OUT/build.log"
  say "the extension did not build; nothing else can run"
  exit 1
fi
rm -f "$OUT/build.log"

# 2. The tests that need CUDA (skipped on a machine without it).
(cd "$ROOT/tests" && stage 120 "$PY" -m pytest -q -p no:cacheprovider -rs \
  test_cuda.py test_distributed_cuda.py test_async_save.py -k "cuda or gpu or pinned" \
  > "$OUT/pytest.log" 2>&1)
tail -8 "$OUT/pytest.log"

# A tmpfs of our own, so that the size of /dev/shm does not matter.
SHM=/mnt/tss-tmpfs
mkdir -p "$SHM" 2>/dev/null
mount -t tmpfs -o size=40g tmpfs "$SHM" 2>/dev/null || SHM=/dev/shm
LOCAL="${TSS_DEVICE_DISK:-/tmp/tss-disk-bench}"

if [ "$DRY" = 1 ]; then
  GPU_ARGS=(--dry-run --saves 2)
  DISK_ARGS=(--mib 256 --tensors 16 --rounds 1)
else
  GPU_ARGS=(--saves 5)
  DISK_ARGS=(--mib 8192 --tensors 64 --rounds 1)
fi

# 3. The asynchronous save of a GPU model against DCP's pinned staging.
stage 260 "$PY" "$ROOT/benchmarks/gpu_async_bench.py" --dir "$SHM/gpu-async" "${GPU_ARGS[@]}" \
  --method-timeout 90 --json "$OUT/gpu_async.json" --plot "$OUT/gpu_async.png"

# 4. Write speed against the device's own: the local disk, then the tmpfs.
stage 90 "$PY" "$ROOT/benchmarks/disk_speed_bench.py" --dir "$LOCAL" "${DISK_ARGS[@]}" \
  --json "$OUT/disk_local.json"
rm -rf "$LOCAL"
stage 60 "$PY" "$ROOT/benchmarks/disk_speed_bench.py" --dir "$SHM/disk" "${DISK_ARGS[@]}" \
  --json "$OUT/disk_tmpfs.json"

umount "$SHM" 2>/dev/null
say "done"
