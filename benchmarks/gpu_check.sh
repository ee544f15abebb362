#!/usr/bin/env bash
# Device check for a machine with an NVIDIA GPU, JAX with CUDA and no network,
# prepared to run in one go in about 5 minutes (the steps' limits add up to
# 9.7 minutes, 8.7 without offline wheels; not yet run on a GPU):
#   bash benchmarks/gpu_check.sh
# Each step has its own time limit and a failing step does not stop the
# others; the summary at the end lists every step's exit code. Optional tools
# are used when present: wheels put in benchmarks/wheels/ (e.g.
# nvidia-nvimgcodec-cu13, nvidia-nvcomp-cu13, nvidia-cuda-cuobjdump) are
# installed offline first; compute-sanitizer and ncu when on PATH.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
summary=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s, at $((SECONDS - start))s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  summary+=("$name: rc=$rc")
}

if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
  step "offline wheels" 60 pip install -q --no-index --no-deps benchmarks/wheels/*.whl
fi
step build 120 pip install -q --no-build-isolation --no-deps -e .
step "cuda module" 30 python -c "import jax, jaxjpeg.lowering as l; print(jax.devices()); assert l.cuda_available()"
# GPU bits == CPU bits (mixed kinds, corrupt status and NaN, restore, jit,
# CUDA graphs), the destuff kernel on damaged interval ends, out-of-order
# starts and hostile block-map hints, the CPU harness of the kernels, and
# the register/stack gate.
step "gpu tests" 100 python -m pytest -q -x tests/gpu tests/test_kernel_harness.py \
  tests/test_cuda_resources.py tests/test_destuff.py tests/test_plan_bounds.py
step throughput 100 python benchmarks/gpu_decode.py --gb 1,2,4
if command -v compute-sanitizer >/dev/null; then
  step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python tests/gpu/corrupt_streams.py 8
else
  summary+=("memcheck: compute-sanitizer not on PATH, skipped")
fi
if command -v ncu >/dev/null; then
  # The destuff kernel and the first decode kernel of one call.
  step "nsight compute" 50 ncu --kernel-name regex:"DestuffKernel|DecodeKernel" --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    python benchmarks/gpu_decode.py --quick
else
  summary+=("nsight compute: ncu not on PATH, skipped")
fi
# Time to params on the GPU: jaxjpeg restore vs Orbax on the same tree.
step "vs orbax" 60 python benchmarks/checkpoint_vs_orbax.py --quick --repeats 3
echo "=== summary after $((SECONDS - start)) s"
printf '  %s\n' "${summary[@]}"
