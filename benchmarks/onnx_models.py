"""Any ONNX model through jaxjpeg: its float initializers saved at byte targets,
restored, swapped back into the graph and run, against int8 / int4 at equal size.

    python benchmarks/onnx_models.py                     # the packaged models below
    python benchmarks/onnx_models.py model.onnx [...]     # your own
        [--ratios 4,6,8] [--inputs 8]

A check of the general case beside ``benchmarks/real_models.py``: models this
repository never tuned on, each with its own graph layout (PyTorch and Paddle
exports fold BatchNorm into the convolutions, which spreads output channels up
to 80x). Default models, shipped inside their PyPI packages (installed on
demand, never a test dependency; nothing is downloaded at run time):
NudeNet's YOLOv8n detector (``nudenet``), Magika's file-type classifier
(``magika``) and Silero VAD (``silero-vad``).

Inputs are made from each graph input's type and shape: images from
scikit-learn's sample photos (``--inputs`` crops), byte sequences from this
file's own bytes, audio from a synthetic chirp in noise, recurrent state zeros.
Per output: relative L2 error and cosine against float32, and for a
(batch, classes) output the top-1 agreement. Ratios are all-in against float32
(file bytes for jaxjpeg, the baseline's bits_used / 8 otherwise).
Exit status 2 when a package is missing (the pip command is printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import baselines  # noqa: E402

# (package, path inside it, pip requirement)
PACKAGED = (("nudenet", "320n.onnx", "nudenet"),
            ("magika", "models/standard_v3_3/model.onnx", "magika"),
            ("silero_vad", "data/silero_vad_op18_ifless.onnx", "silero-vad"))
SAMPLE_RATE = 16000


def packaged_models() -> list[str]:
    """Paths of the default models; SystemExit(2) with the pip command if missing."""
    missing = [pip for pkg, _, pip in PACKAGED if importlib.util.find_spec(pkg) is None]
    missing += [m for m in ("onnx", "onnxruntime", "sklearn", "PIL")
                if importlib.util.find_spec(m) is None]
    if missing:
        names = {"sklearn": "scikit-learn", "PIL": "pillow"}
        print("missing Python packages; install them with:\n    pip install "
              + " ".join(names.get(m, m) for m in missing), file=sys.stderr)
        raise SystemExit(2)
    return [str(Path(importlib.util.find_spec(pkg).origin).parent / rel)
            for pkg, rel, _ in PACKAGED]


class OnnxCase:
    """One model: its float initializers (graph order), inputs and float32 outputs."""

    def __init__(self, path: str, n_inputs: int):
        import onnx
        from onnx import numpy_helper

        self.name = Path(path).name
        self.proto = onnx.load(path)
        self.weights = {init.name: numpy_helper.to_array(init)
                        for init in self.proto.graph.initializer
                        if init.data_type == onnx.TensorProto.FLOAT and np.prod(init.dims) > 1}
        self.feeds = [_feeds(self._session(), k) for k in range(n_inputs)]
        self.reference = self.run(self.weights)

    def _session(self, proto=None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession((proto or self.proto).SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])

    def run(self, weights: dict) -> list[np.ndarray]:
        """Every output, stacked over the inputs."""
        import onnx
        from onnx import numpy_helper

        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        for init in proto.graph.initializer:
            if init.name in weights:
                init.CopyFrom(numpy_helper.from_array(
                    np.asarray(weights[init.name], np.float32), init.name))
        session = self._session(proto)
        outs = [session.run(None, feed) for feed in self.feeds]
        return [np.stack([o[i] for o in outs]) for i in range(len(outs[0]))]

    def metrics(self, outs: list[np.ndarray]) -> str:
        parts = []
        for ref, out in zip(self.reference, outs):
            r, o = ref.astype(np.float64), out.astype(np.float64)
            rel = np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)
            cos = float(np.sum(r * o) / max(np.linalg.norm(r) * np.linalg.norm(o), 1e-30))
            part = f"err {rel:.4f} cos {cos:.5f}"
            flat_r, flat_o = r.reshape(len(r), -1), o.reshape(len(o), -1)
            if 1 < flat_r.shape[1] <= 100_000 and r.ndim <= 3:
                part += f" top1 {np.mean(flat_r.argmax(1) == flat_o.argmax(1)):.2f}"
            parts.append(part)
        return " | ".join(parts)


def _feeds(session, k: int) -> dict:
    """Input ``k`` of the run, from each graph input's type and shape."""
    rng = np.random.default_rng(k)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        if "int" in inp.type and not shape:                      # a sample rate
            feeds[inp.name] = np.array(SAMPLE_RATE, np.int64)
        elif "int" in inp.type:                                  # bytes
            data = np.frombuffer(Path(__file__).read_bytes(), np.uint8)
            n = shape[-1] or 2048
            start = (k * 997) % max(1, len(data) - n)
            feeds[inp.name] = data[start:start + n].reshape([1] * (len(shape) - 1) + [n]).astype(
                np.int64 if "64" in inp.type else np.int32)
        elif len(shape) == 4:                                    # an image, NCHW
            feeds[inp.name] = _photo_crop(shape[2] or 320, shape[3] or 320, k)
        elif inp.name == "state" or len(shape) == 3:             # recurrent state
            feeds[inp.name] = np.zeros([d or 1 for d in shape], np.float32)
        else:                                                    # audio
            n = shape[-1] or 576
            t = (np.arange(n) + 4096 * k) / SAMPLE_RATE
            voice = np.sin(2 * np.pi * (180 + 40 * k) * t) * np.sin(2 * np.pi * 3 * t)
            feeds[inp.name] = (0.3 * voice + 0.05 * rng.standard_normal(n)).astype(
                np.float32)[None]
    return feeds


def _photo_crop(height: int, width: int, k: int) -> np.ndarray:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photo = load_sample_image(("china.jpg", "flower.jpg")[k % 2])
    rng = np.random.default_rng(k)
    side = int(min(photo.shape[:2]) * rng.uniform(0.5, 1.0))
    y = rng.integers(0, photo.shape[0] - side + 1)
    x = rng.integers(0, photo.shape[1] - side + 1)
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((width, height))
    return (np.asarray(crop, np.float32) / 255).transpose(2, 0, 1)[None]


def _flax_view(w: np.ndarray) -> np.ndarray:
    """Output channels last, as the baselines expect (ONNX keeps them first in
    convolution kernels; MatMul weights are (in, out) already)."""
    return np.moveaxis(w, 0, -1) if w.ndim >= 3 else w


def baseline(case: OnnxCase, quantizer) -> tuple[dict, int]:
    out, bits = {}, 0
    for name, w in case.weights.items():
        if w.ndim < 2:
            out[name], b = w, 32 * w.size
        else:
            q, b = quantizer(_flax_view(w))
            out[name] = np.moveaxis(q, -1, 0) if w.ndim >= 3 else q
        bits += b
    return out, bits


def jaxjpeg_run(case: OnnxCase, workdir: str, **kwargs) -> tuple[dict, int]:
    import jaxjpeg

    path = os.path.join(workdir, "model.jjpg")
    jaxjpeg.save(path, case.weights, progress=False, **kwargs)
    restored = jaxjpeg.restore(path)
    return {k: np.asarray(v) for k, v in restored.items()}, os.path.getsize(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="ONNX files (default: the packaged models)")
    p.add_argument("--ratios", default="4,6,8", help="jaxjpeg target_ratio values")
    p.add_argument("--inputs", type=int, default=8, help="inputs per model")
    args = p.parse_args(argv)
    paths = args.models or packaged_models()
    ratios = [float(r) for r in args.ratios.split(",") if r]
    with tempfile.TemporaryDirectory() as workdir:
        for path in paths:
            case = OnnxCase(path, args.inputs)
            fp32 = sum(w.nbytes for w in case.weights.values())
            print(f"\n{case.name}: {sum(w.size for w in case.weights.values()):,} float weights "
                  f"in {len(case.weights)} initializers, {args.inputs} inputs")
            rows = []
            for label, quantizer in (("int8 per-channel", baselines.int8_per_channel),
                                     ("int4 g128", baselines.int4_group)):
                weights, bits = baseline(case, quantizer)
                rows.append((label, fp32 * 8 / bits, case.metrics(case.run(weights))))
                weights, nbytes = jaxjpeg_run(case, workdir, target_bytes=bits // 8)
                rows.append((f"jaxjpeg at {label}'s size", fp32 / nbytes,
                             case.metrics(case.run(weights))))
            for ratio in ratios:
                weights, nbytes = jaxjpeg_run(case, workdir, target_ratio=ratio)
                rows.append((f"jaxjpeg target_ratio={ratio:g}", fp32 / nbytes,
                             case.metrics(case.run(weights))))
            for label, ratio, metrics in rows:
                print(f"  {label:34s} {ratio:6.2f}x  {metrics}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
