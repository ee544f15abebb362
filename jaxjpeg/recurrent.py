"""The leaves of recurrent cells (LSTM, GRU, ...), found from their paths.

A recurrent cell's matrices act once per time step, so their coding error
compounds along the sequence: coded at the default step (about 4 bits a
weight), Resemblyzer's 3-layer LSTM speaker encoder lost its function (mean
cosine to the float32 embeddings 0.50; int4 round-to-nearest 0.47, int8
0.98), and the hidden-to-hidden matrices alone coded 8x finer only reached
0.91: the input matrices of the cell matter as much. So the default save
codes every weight matrix of a recurrent cell :data:`RECURRENT_STEP_FACTOR`
finer (docs/real_models.md, session 23). Found by name, in the layouts the
frameworks write:

* PyTorch ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` and their cells:
  ``weight_ih_l0``, ``weight_hh_l1_reverse``, ``weight_ih``, ``weight_hh``;
  those names joined by ``_`` or shortened to ``w_ih`` / ``w_hh``, where
  both halves are there (g2p_en's GRUs ``enc_w_ih`` / ``enc_w_hh``, found
  by review: phonemes as float32's 0.877 at the default save, 0.963 so);
* Keras: ``recurrent_kernel`` and the ``kernel`` beside it;
* Flax (linen and NNX): a module whose child modules carry a cell's gate
  names, each with a ``kernel`` (LSTM ``ii if ig io hi hf hg ho``, NNX
  ``if_``; GRU ``ir iz in hr hz hn``; MGU ``if in hf hn``; SimpleCell ``i h``;
  NNX's fused cells ``dense_i dense_h``);
* ONNX ``LSTM`` / ``GRU`` nodes, whose initializers carry names the
  exporter makes up (torch ``onnx::LSTM_462``, tf2onnx ``R0__31``): by their
  shapes, ``W`` (D, gH, I), ``R`` (D, gH, H) and ``B`` (D, 2gH) for D
  directions and g gates (found by review: a tf2onnx seq2seq LSTM's default
  save kept ``R`` at relative error 0.090; as a cell's, 0.011); torch's
  ``onnx::RNN_N`` and cells without ``B`` by those names.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Iterable, Mapping

from jaxjpeg.treepaths import variable_name

# About int8's fidelity, 3 more bits a weight: Resemblyzer at the default
# save, mean cosine 0.50 -> 0.97 (int8 per channel 0.98), 7.8x -> 4.6x.
RECURRENT_STEP_FACTOR = 1 / 8

# weight_hr: the projection of nn.LSTM(proj_size > 0), applied every step
_TORCH_WEIGHT = re.compile(r"(^|[./])weight_(ih|hh|hr)(_l\d+)?(_reverse)?$")
# The same names shortened or joined by "_" (g2p_en's numpy checkpoint:
# enc_w_ih beside enc_w_hh), taken with their other half only.
_JOINED_WEIGHT = re.compile(r"(^|[./_])(weight|w)_(ih|hh)(_l\d+)?(_reverse)?$")
# A module is a cell when its children with a kernel include all of one
# signature's hidden-to-hidden gates and all of one's input gates; then every
# gate child of it is coded as a recurrent weight.
# ({"hh"}, {"ih"}): flax's ConvLSTMCell.
_CELL_SIGNATURES = ({"hi", "hf", "hg", "ho"}, {"hr", "hz", "hn"}, {"hf", "hn"}, {"h"},
                    {"dense_h"}, {"hh"})
_CELL_INPUTS = ({"ii", "if", "ig", "io"}, {"ii", "if_", "ig", "io"}, {"ir", "iz", "in"},
                {"if", "in"}, {"i"}, {"dense_i"}, {"ih"})
_GATES = set().union(*_CELL_SIGNATURES, *_CELL_INPUTS)
# Gates per ONNX node: LSTM, GRU. (An RNN node's one gate, (D, H, H) beside
# (D, 2H), is what a vmapped or scanned stack of two square layers holds:
# found by review, a twin critic's and a scanned transformer's kernels.)
_ONNX_GATE_COUNTS = (4, 3)
# Framework parameter names: an ONNX recurrent node's W and R are tensors its
# exporter made, named ``onnx::LSTM_461`` or ``R0__31``, never these.
_LAYER_PARAMETER = re.compile(r"(^|[./])(kernel|weight|bias|scale|embedding)$")
# torch's exporter names them after the node: an RNN's one gate and a cell
# without biases are found by that name (review: nn.RNN's went unfound).
_TORCH_ONNX_NODE = re.compile(r"onnx::(LSTM|GRU|RNN)_\d+$")


def recurrent_leaves(names: Iterable[str],
                     shapes: Mapping[str, tuple] | None = None) -> set[str]:
    """The names (slash-separated leaf paths) among ``names`` that are the
    weight matrices of recurrent cells; NNX states' paths (``.../kernel/value``)
    too (found by review: an ``nnx.state`` model's cells went unfound and
    were coded 8x coarser). ``shapes`` (name -> shape) finds ONNX's."""
    originals = {variable_name(name): name for name in names}
    found = {originals[name] for name in _recurrent_variables(list(originals))}
    return found | _onnx_recurrent(shapes or {})


def _onnx_recurrent(shapes: Mapping[str, tuple]) -> set[str]:
    """The ``W`` and ``R`` of ONNX recurrent nodes: an ``R`` is a (D, gH, H)
    leaf beside a ``W``, another (D, gH, I) leaf, and a (D, 2gH) bias, which
    only torch's node names (_TORCH_ONNX_NODE) stand in for: a 3-D leaf
    alone, e.g. (1, 4H, H), is no evidence."""
    shapes = {name: tuple(shape) for name, shape in shapes.items()
              if not _LAYER_PARAMETER.search(variable_name(name))}
    biases = {s for s in shapes.values() if len(s) == 2}
    matrices = Counter(s[:2] for s in shapes.values() if len(s) == 3)
    cells = set()   # (D, gH) of the R's found
    for name, shape in shapes.items():
        if len(shape) == 3 and shape[0] in (1, 2) and shape[2] > 0:
            directions, rows, hidden = shape
            named = _TORCH_ONNX_NODE.search(name) is not None
            gates = _ONNX_GATE_COUNTS + ((1,) if named else ())
            if (matrices[directions, rows] >= 2
                    and (named or (directions, 2 * rows) in biases)
                    and any(rows == g * hidden for g in gates)):
                cells.add((directions, rows))
    return {name for name, shape in shapes.items()
            if len(shape) == 3 and shape[:2] in cells}


def _recurrent_variables(names: list) -> set[str]:
    present = set(names)
    found = {n for n in names if _TORCH_WEIGHT.search(n) or _other_half(n) in present}
    gates: dict[str, set[str]] = defaultdict(set)   # module path -> children with a kernel
    for name in names:
        parent, _, key = name.rpartition("/")
        if key.startswith("recurrent_kernel"):
            found.add(name)
            beside = f"{parent}/kernel" if parent else "kernel"
            if beside in present:
                found.add(beside)
        if key == "kernel" and parent:
            module, _, child = parent.rpartition("/")
            gates[module].add(child)
    for module, children in gates.items():
        if _is_cell(children):
            prefix = f"{module}/" if module else ""
            found.update(f"{prefix}{child}/kernel" for child in children if child in _GATES)
    return found


def _other_half(name: str) -> str | None:
    """The hidden-to-hidden matrix's name for an input matrix's (``w_ih``),
    and the other way, when ``name`` is one of _JOINED_WEIGHT's."""
    match = _JOINED_WEIGHT.search(name)
    if match is None:
        return None
    other = "hh" if match.group(3) == "ih" else "ih"
    return name[:match.start(3)] + other + name[match.end(3):]


def _is_cell(children: set[str]) -> bool:
    """Both halves of one cell: its hidden-to-hidden gates and its input gates."""
    hidden = any(signature <= children for signature in _CELL_SIGNATURES)
    return hidden and any(inputs <= children for inputs in _CELL_INPUTS)
