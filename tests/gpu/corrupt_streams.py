"""Decodes damaged payloads on the GPU, for compute-sanitizer (memcheck)
in benchmarks/gpu_check.sh: every read and write of the kernels must stay in
bounds whatever the bytes say. Not a pytest file (it needs the sanitizer
around the whole process). Damage that still decodes is legal (a changed
byte inside the data), so the count of unreported cases is printed, not
judged; the sanitizer's exit code is the verdict.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu/corrupt_streams.py [cases]
"""

import sys

import jax
import ml_dtypes
import numpy as np

import jaxjpeg
from jaxjpeg import codec, ops


def main(cases=24):
    rng = np.random.default_rng(0)
    encs, dtypes = [], []
    for k in range(12):
        x = (rng.standard_normal((int(rng.integers(5, 120)), int(rng.integers(9, 300)))) * 0.05)
        encs.append(jaxjpeg.encode_tensor(x.astype(np.float32), bits=12 if k % 3 == 1 else 8,
                                          quant_step=2 + k % 5, restart_interval=k % 5,
                                          tile_shape=(32, 64)))
        dtypes.append([np.float32, ml_dtypes.bfloat16, np.float16][k % 3])
    plan = codec.build_plan(encs, dtypes)
    decode = ops.plan_decoder(plan.output_shapes, tuple(np.dtype(d).name for d in plan.output_dtypes),
                              plan.output_shapes)
    gpu = jax.devices("gpu")[0]
    silent = 0
    for case in range(cases):
        payload = plan.payload.copy()
        n = 1 + case % 40
        payload[rng.integers(0, payload.size, n)] = rng.choice([0x00, 0xFF, 0xD0, 0xD9], n)
        if case % 4 == 3:  # a run of 0xFF (markers everywhere)
            at = int(rng.integers(0, payload.size - 64))
            payload[at:at + 64] = 0xFF
        operands = list(ops.plan_operands(plan))
        operands[0] = payload
        if case % 6 == 5:  # hostile block map hints: a tile search from anywhere
            hints = plan.block_map.copy()
            hints[:, 0] = rng.integers(-(2 ** 31), 2 ** 31 - 1, len(hints))
            operands[ops.OPERAND_NAMES.index("block_map")] = hints.reshape(-1)
        if case % 8 == 7:  # starts out of order: the destuff kernel refuses the plan
            starts = plan.interval_starts.copy()
            starts[int(rng.integers(1, len(starts) - 1))] = int(rng.integers(0, payload.size))
            operands[1] = starts.view(np.int32)
        status, outputs = decode(*jax.device_put(tuple(operands), gpu))
        jax.block_until_ready(outputs)
        silent += int(np.asarray(status).reshape(-1)[0]) == int(jaxjpeg._native.PLAN_OK)
    print(f"{cases} damaged payloads decoded; {silent} reported no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 24))
