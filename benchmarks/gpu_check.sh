#!/usr/bin/env bash
# Device check for a machine with an NVIDIA GPU, JAX with CUDA and no network,
# prepared to run in one go within 5 minutes: the steps' limits, each with
# its 2 s of grace before a kill, add up to 300 s at most (`--limits` prints
# them and runs nothing; tests/test_gpu_check_script.py holds the sum to
# 300). Ran on an H200 in 63 s (docs/gpu_h200.md).
#   bash benchmarks/gpu_check.sh [--limits]
# Each step has its own time limit and a failing step does not stop the
# others; the summary at the end lists every step's exit code. Optional tools
# are used when present: wheels put in benchmarks/wheels/ (e.g.
# nvidia-nvimgcodec-cu13, nvidia-nvcomp-cu13, nvidia-cuda-cuobjdump) are
# installed offline first; compute-sanitizer and ncu when on PATH.
set -uo pipefail
cd "$(dirname "$0")/.."
# Each step is its own process and a killed one may linger: none takes 75%
# of the GPU's memory up front (a second JAX process then fails to start).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# The interpreter that has JAX with CUDA: `python`, else `python3` (the H200
# machine had only python3); pip through it, so both are the same install.
export py=$(command -v python || command -v python3)  # read by the bash -c step too
limits_only=0
[[ "${1:-}" == "--limits" ]] && limits_only=1
start=$SECONDS
total_limit=0  # with each step's grace
kill_grace=2
summary=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  total_limit=$((total_limit + limit + kill_grace))
  if ((limits_only)); then
    echo "$name: ${limit}s + ${kill_grace}s"
    return
  fi
  echo "=== $name (limit ${limit}s, at $((SECONDS - start))s)"
  timeout --kill-after="$kill_grace" "$limit" "$@"
  local rc=$?
  summary+=("$name: rc=$rc")
}

have() { ((limits_only)) || command -v "$1" >/dev/null; }

if ((limits_only)) || compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
  step "offline wheels" 13 "$py" -m pip install -q --no-index --no-deps benchmarks/wheels/*.whl
fi
# Only the H200's architecture (sm_90, the one the register gate reads): a
# third of the default three-architecture build; with line information for
# Nsight Compute's source counters (the machine code is the same).
step build 90 "$py" -m pip install -q --no-build-isolation --no-deps -e . \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90-real -Ccmake.define.CMAKE_CUDA_FLAGS=-lineinfo
# The CUDA module loads and sees the GPU; then GPU bits == CPU bits == the
# kernels' CPU harness (mixed kinds, staged and simple warps, corrupt status
# and NaN, destuff on damaged interval ends, out-of-order starts, hostile
# block-map hints, restore, jit, CUDA graphs) and the register/stack gate.
# The CPU-only tests of the harness and the destuff pass run in CI.
step "gpu tests" 40 bash -c '"$py" -c "import jax, jaxjpeg.lowering as l; print(jax.devices()); assert l.cuda_available()" &&
  JAXJPEG_REQUIRE_CUDA_BUILD=1 "$py" -m pytest -q -rfE --tb=short tests/gpu tests/test_cuda_resources.py'
# float32 output of 1, 2 and 4 GB at the default rate, restart intervals
# 1-16 and other rates (1 GB each), a device-to-device copy of each size
# beside it, nvJPEG and nvCOMP on the same data when importable.
step throughput 40 "$py" benchmarks/gpu_decode.py --gb 1,2,4 --repeats 5
if have compute-sanitizer; then
  step memcheck 18 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$py" tests/gpu/corrupt_streams.py 4
else
  summary+=("memcheck: compute-sanitizer not on PATH, skipped")
fi
if have ncu; then
  # The destuff, table and decode kernels of one call (the default rate's
  # tiles are 12-bit: the 8-bit kernel's blocks return at once).
  step "nsight compute" 35 ncu --clock-control none --kernel-name regex:"DestuffKernel|BuildTablesKernel|DecodeKernel" --launch-count 4 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SourceCounters \
    "$py" benchmarks/gpu_decode.py --single --gb 1
else
  summary+=("nsight compute: ncu not on PATH, skipped")
fi
# Time to params on the GPU: jaxjpeg restore vs Orbax on the same tree (7 s
# on the H200), then a Flax ResNet-50, whose conv kernels the decoder writes
# in their own layout, against the same file restored with XLA transposes.
step "vs orbax" 22 "$py" benchmarks/checkpoint_vs_orbax.py --repeats 2
step "vs orbax, flax cnn" 22 "$py" benchmarks/checkpoint_vs_orbax.py --repeats 2 --model cnn \
  --xla-transposes
if ((limits_only)); then
  echo "total: ${total_limit}s"
  exit 0
fi
echo "=== summary after $((SECONDS - start)) s (limits with grace: ${total_limit} s)"
printf '  %s\n' "${summary[@]}"
