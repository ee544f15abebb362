"""PP-OCR recognizer and detector as shipped in the ``rapidocr`` wheel (ONNX files under
``rapidocr/models/``; the newest PP-OCR version found there is used, ``small`` preferred).

The compressed tree is every floating-point initializer of the ONNX graph, by name
(int64 shape constants stay as they are). Each initializer's *kind* comes from the node
that consumes it (Conv weight (O, I/g, kh, kw), ConvTranspose weight (I, O/g, kh, kw),
MatMul right operand (I, O), Gemm B, BatchNormalization, ...), which defines the Flax view.
Restored weights are written back into the graph and run with ONNX Runtime.

* Recognizer: rendered text lines (``data.TEXT_LINES``), greedy CTC decoding with the
  character list stored in the model's metadata; exact-match rate and character accuracy
  (1 - edit distance / length) against the float32 model's text and the ground truth, and
  the mean KL divergence of the per-time-step distributions.
* Detector: rendered pages; IoU of the text masks (probability > 0.3, the default
  threshold of rapidocr) against float32, pixel agreement and mean |p - p_fp32|.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from . import common, data

PACKAGES = ["onnx", "onnxruntime", "rapidocr", "PIL"]
THRESHOLD = 0.3


def model_file(task: str) -> tuple[Path, str]:
    """(path, note) of the newest PP-OCR ``task`` ("rec" or "det") model rapidocr ships."""
    import rapidocr

    folder = Path(rapidocr.__file__).resolve().parent / "models"
    found = []
    for path in folder.glob(f"*{task}*.onnx"):
        m = re.search(r"PP-?OCRv(\d+)", path.name, re.I)
        version = int(m.group(1)) if m else 0
        found.append((version, "small" in path.name, path))
    if not found:
        raise FileNotFoundError(f"no PP-OCR {task} model under {folder}")
    version, _, path = max(found)
    note = "" if version >= 6 else f"PP-OCRv6 absent: using PP-OCRv{version} ({path.name})"
    return path, note


def initializer_kinds(graph) -> dict:
    """Initializer name -> kind, from the first node that consumes it."""
    attrs = lambda node: {a.name: a for a in node.attribute}  # noqa: E731
    kinds = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in kinds or not name:
                continue
            op, a = node.op_type, attrs(node)
            if op == "Conv" and slot == 1:
                group = a["group"].i if "group" in a else 1
                kinds[name] = "dwconv" if group > 1 else "conv"
            elif op == "ConvTranspose" and slot == 1:
                kinds[name] = "convT"
            elif op == "Gemm" and slot == 1:
                kinds[name] = "linear" if ("transB" in a and a["transB"].i) else "matmul"
            elif op == "MatMul" and slot == 1:
                kinds[name] = "matmul"
            elif op in ("Conv", "ConvTranspose", "Gemm") and slot == 2:
                kinds[name] = "bias"
            elif op == "BatchNormalization" and slot >= 1:
                kinds[name] = "bn"
            else:
                kinds[name] = op.lower()
    return kinds


class OcrCase:
    def __init__(self, task: str, *, quick: bool = False, log=print):
        import onnx
        from onnx import numpy_helper

        self.task, self.family, self.log = task, task, log
        self.name = f"ocr_{task}"
        self.path, self.note = model_file(task)
        self.proto = onnx.load(str(self.path))
        self.native, self.dtypes = {}, {}
        for init in self.proto.graph.initializer:
            array = numpy_helper.to_array(init)
            if np.issubdtype(array.dtype, np.floating):
                self.native[init.name] = array.astype(np.float32)
                self.dtypes[init.name] = array.dtype
        self.kinds = {k: v for k, v in initializer_kinds(self.proto.graph).items()
                      if k in self.native}
        self.kinds.update({k: "other" for k in self.native if k not in self.kinds})
        if task == "rec":
            meta = {p.key: p.value for p in self.proto.metadata_props}
            self.characters = ["<blank>"] + meta["character"].splitlines() + [" "]
            self.texts = data.TEXT_LINES[:8] if quick else list(data.TEXT_LINES)
            self.inputs = data.rec_batch(self.texts)
        else:
            self.inputs = data.det_pages(1 if quick else 2)
        self._ref_text = None

    def layout_label(self, layout: str) -> str:
        return "onnx" if layout == "torch" else layout

    def describe(self) -> str:
        n = sum(v.size for v in self.native.values())
        what = (f"{len(self.texts)} rendered lines, input {tuple(self.inputs.shape)}"
                if self.task == "rec" else f"{len(self.inputs)} rendered pages "
                f"{self.inputs.shape[2]}x{self.inputs.shape[3]}")
        return (f"{self.path.name}: {n / 1e6:.2f} M float weights in {len(self.native)} "
                f"initializers, {what}" + (f" [{self.note}]" if self.note else ""))

    def run(self, weights: dict) -> np.ndarray:
        import onnxruntime as ort
        from onnx import numpy_helper

        for init in self.proto.graph.initializer:
            if init.name in weights:
                array = np.asarray(weights[init.name]).astype(self.dtypes[init.name])
                init.CopyFrom(numpy_helper.from_array(array, init.name))
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, os.cpu_count() or 1)
        options.log_severity_level = 3
        session = ort.InferenceSession(self.proto.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return session.run(None, {name: self.inputs})[0]

    def reference(self) -> np.ndarray:
        """Float32 outputs (computed each run: a few seconds, and the recognizer's
        distributions are large)."""
        ref = self.run(self.native)
        if self.task == "rec":
            self._ref_text = self.decode(ref)
        return ref

    def sensitivity(self):
        return None

    def input_covariances(self) -> dict:
        """Second moments of each ungrouped Conv's patches (features (I, kh, kw)) and
        each MatMul/Gemm's input rows over calibration inputs that are not the evaluation
        ones (other lines: data.calibration_lines; other pages: another seed):
        {initializer name: (n, n)}."""
        calib = (data.rec_batch(data.calibration_lines()) if self.task == "rec"
                 else data.det_pages(2, seed=11))
        return onnx_input_covariances(self.proto, self.native, calib)

    # ------------------------------------------------------------------ metrics

    def decode(self, probs: np.ndarray) -> list[str]:
        """Greedy CTC: best class per step, repeats merged, blanks (class 0) dropped."""
        texts = []
        for best in probs.argmax(axis=2):
            keep = np.ones(len(best), bool)
            keep[1:] = best[1:] != best[:-1]
            keep &= best != 0
            texts.append("".join(self.characters[i] for i in best[keep]))
        return texts

    def metrics(self, ref: np.ndarray, out: np.ndarray) -> dict:
        if self.task == "rec":
            texts = self.decode(out)
            ref_text = self._ref_text if self._ref_text is not None else self.decode(ref)
            exact_f32, char_f32 = common.text_metrics(ref_text, texts)
            exact_gt, char_gt = common.text_metrics(self.texts, texts)
            kl = []
            for p, q in zip(ref, out):  # (T, C) per line, keeps float64 temporaries small
                p = np.clip(p.astype(np.float64), 1e-30, None)
                q = np.clip(q.astype(np.float64), 1e-30, None)
                p /= p.sum(1, keepdims=True)
                q /= q.sum(1, keepdims=True)
                kl.append(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
            return dict(exact_f32=exact_f32, char_f32=char_f32, exact_gt=exact_gt,
                        char_gt=char_gt, kl=float(np.mean(kl)),
                        texts=texts if exact_gt < 1 else None)
        mask_ref, mask = ref > THRESHOLD, out > THRESHOLD
        union = np.logical_or(mask_ref, mask).sum()
        iou = float(np.logical_and(mask_ref, mask).sum() / union) if union else 1.0
        return dict(iou=iou, agree=float(np.mean(mask_ref == mask)),
                    mean_abs=float(np.mean(np.abs(out.astype(np.float64) - ref))),
                    text_fraction=float(mask.mean()))


def onnx_input_covariances(proto, weights: dict, inputs: np.ndarray) -> dict:
    """Runs ``proto`` on ``inputs`` with the data inputs of its ungrouped Conv and its
    MatMul/Gemm nodes (whose weight is an initializer) as extra outputs, and sums x xᵀ
    of what each weight multiplies."""
    import onnx
    import onnxruntime as ort

    consumers = {}
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) < 2 or node.input[1] not in weights:
            continue
        if node.op_type == "Conv" and attrs.get("group", 1) == 1 and \
                attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            consumers[node.input[1]] = (node.input[0], attrs)
        elif node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transA", 0)):
            consumers[node.input[1]] = (node.input[0], None)
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    known = {o.name for o in model.graph.output}
    for data_name in {d for d, _ in consumers.values()} - known:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(data_name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    sums = {}
    for i in range(len(inputs)):
        outs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: inputs[i:i + 1]})))
        for weight, (data_name, attrs) in consumers.items():
            x = outs[data_name].astype(np.float64)
            if attrs is not None:
                x = _patches(x, weights[weight].shape[2:], attrs)
            x = x.reshape(-1, x.shape[-1])
            sums[weight] = sums.get(weight, 0) + x.T @ x
    return sums


def _patches(x: np.ndarray, kernel, attrs) -> np.ndarray:
    """Conv input (N, C, H, W) -> patches (N, H', W', C * kh * kw), features (C, kh, kw)."""
    kh, kw = kernel
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, w = x.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, oh, ow, c, kh, kw), x.dtype)
    for i in range(kh):
        for j in range(kw):
            window = x[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            cols[..., i, j] = window.transpose(0, 2, 3, 1)
    return cols.reshape(n, oh, ow, c * kh * kw)
