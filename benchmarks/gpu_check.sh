#!/usr/bin/env bash
# Device check for a machine with an NVIDIA GPU, JAX with CUDA, no network:
# build in place, run the GPU tests (GPU bits == CPU bits) and the GPU
# benchmark. Sized to finish within 8 minutes (not yet run on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
pip install --no-build-isolation --no-deps -e . 2>&1 | tail -1
python -c "import jax, jaxjpeg.lowering as l; print(jax.devices()); assert l.cuda_available()"
python -m pytest -q tests/gpu tests/test_ops.py
python benchmarks/gpu_decode.py
python benchmarks/lowering_throughput.py --quick
echo "gpu_check done in $((SECONDS - start)) s"
