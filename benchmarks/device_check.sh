#!/usr/bin/env bash
# The checks that need the lent GPU machine (the `device` tool), as one
# script that fits its 15-minute lease:
#   1. build the extension against that machine's own torch (a CUDA build);
#   2. the tests that need CUDA (tests/test_cuda.py, the CUDA paths of
#      tests/test_distributed.py, the CUDA rejection test) and the overlap
#      and sharded suites beside them;
#   3. the real slow producer: the Llama-shaped model on the GPU, each
#      tensor copied into pinned memory with a non-blocking copy
#      (gpu_llama), overlap=True against in turn;
#   3b. the distributed save on 2 and 8 gloo ranks (CPU);
#   4. the model-shaped overlap scenarios (llama, moe, each as fast and
#      twice as fast as the writer) on a quiet 16-core machine;
#   5. an 8 GiB save on 16 cores against raw writing, if time is left.
# Each stage has its own time limit and the script goes on after a stage
# fails, so that one run brings back everything it can. Results go to $OUT
# (at most 8 files come back): device.log, pytest.log, a JSON per benchmark
# and a PNG for the producer benchmarks.
#
# That machine reaches no package registry, and nlohmann_json is a Debian
# package here: copy its headers into an ignored folder and carry it:
#   mkdir -p .device/include && cp -r /usr/include/nlohmann .device/include/
#   echo /.device/ >> .git/info/exclude
# then run: `bash benchmarks/device_check.sh` with carry [".device"].
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/device-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$SECONDS
BUDGET="${TSS_DEVICE_BUDGET_S:-500}"  # seconds this script may take in all
MIB="${TSS_DEVICE_MIB:-8192}"          # size of each benchmark's save

exec > >(tee -a "$OUT/device.log") 2>&1
# shellcheck source=benchmarks/device_stages.sh
source "$ROOT/benchmarks/device_stages.sh"

say "machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
nvidia-smi -L 2>&1 | head -2
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
df -h /tmp /dev/shm | sed 's/^/  /'
grep -E ' (/|/tmp|/dev/shm) ' /proc/mounts | sed 's/^/  mount: /'

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
say "built: $(cd /tmp && "$PY" -c 'import trinity_stream_saver as t; print(t.__file__)')"

# 2. Tests: the CUDA ones, and the suites beside them.
XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
(cd "$ROOT/tests" && stage 150 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -rs \
  test_cuda.py test_distributed_cuda.py test_distributed.py test_bad_input.py test_overlap.py \
  > "$OUT/pytest.log" 2>&1)
tail -15 "$OUT/pytest.log"

# A tmpfs of our own, so that the size of /dev/shm on that machine does not matter.
SHM=/mnt/tss-tmpfs
mkdir -p "$SHM"
mount -t tmpfs -o size=40g tmpfs "$SHM" 2>/dev/null || SHM=/dev/shm
BENCH=("$PY" "$ROOT/benchmarks/bench.py")

# 3. The Llama-shaped model on the GPU, pinned non-blocking copies.
stage 150 "${BENCH[@]}" --dir "$SHM" --rounds 3 --scenarios gpu_llama \
  --json "$OUT/gpu_llama.json" --plot "$OUT/gpu_llama.png"

# 3b. The distributed save with 2 and 8 gloo ranks on this machine's cores.
stage 150 "$PY" "$ROOT/benchmarks/distributed_bench.py" --dir "$SHM" --rounds 3 --ranks 2 \
  --json "$OUT/distributed_2.json"
stage 150 "$PY" "$ROOT/benchmarks/distributed_bench.py" --dir "$SHM" --rounds 2 --ranks 8 \
  --json "$OUT/distributed_8.json"

# 4. The model-shaped overlap scenarios on a quiet machine.
stage 200 "${BENCH[@]}" --dir "$SHM" --rounds 3 --scenarios llama,llama_2x,moe,moe_2x \
  --methods trinity_stream_saver,trinity_overlap,raw_os_write,raw_queue_thread \
  --json "$OUT/models.json" --plot /tmp/models.png

# 5. 8 GiB, 64 tensors of 128 MiB, in memory.
stage 150 "${BENCH[@]}" --dir "$SHM" --rounds 2 --scenarios large --large-mib "$MIB" \
  --large-tensor-mib 128 --methods trinity_stream_saver,trinity_overlap,raw_os_write \
  --json "$OUT/large_tmpfs.json" --plot /tmp/large_tmpfs.png

umount "$SHM" 2>/dev/null
say "done"
