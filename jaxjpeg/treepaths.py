"""Pytree key paths as the checkpoint records them, and back to nested containers."""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Sequence

import jax

def key_record(key) -> list:
    if isinstance(key, jax.tree_util.DictKey):
        return ["key", key.key if isinstance(key.key, (int, str)) else str(key.key)]
    if isinstance(key, jax.tree_util.SequenceKey):
        return ["index", key.idx]
    if isinstance(key, jax.tree_util.GetAttrKey):
        return ["attr", key.name]
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return ["flat", key.key]
    return ["key", str(key)]


# TensorFlow's names of a variable's value: its op's output 0 (Keras 2's
# ``model.weights``, its h5 files: ``bn/moving_mean:0``), or its entry in an
# object-based checkpoint (``bn/moving_mean/.ATTRIBUTES/VARIABLE_VALUE``).
_TF_VALUE = re.compile(r"(:\d+|/\.ATTRIBUTES/VARIABLE_VALUE)$")


def variable_name(path: str) -> str:
    """``path`` less a last key ``value`` and TensorFlow's value suffixes
    (``:0``, ``/.ATTRIBUTES/VARIABLE_VALUE``): Flax NNX keeps a variable's
    array in its ``value`` (``nnx.state(model)`` has paths such as
    ``conv1/kernel/value``), which names the leaf by the key before it;
    Keras 2 names it ``conv1/kernel:0`` (its BatchNorms went unseen, its
    LSTMs half found)."""
    path = _TF_VALUE.sub("", path) or path
    head, _, last = path.rpartition("/")
    return head if last == "value" and head else path


def path_string(records: Sequence[Sequence]) -> str:
    """The slash-separated form users match patterns against."""
    return "/".join(str(value) for _, value in records)


def leaves_with_paths(tree) -> list[tuple[list, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [([key_record(k) for k in path], leaf) for path, leaf in leaves]


class _Node(dict):
    """A subtree being nested (a leaf may be a dict too)."""


def nest(entries: list[tuple[list, Any]]):
    """Rebuilds nested dicts/lists from recorded paths (restore without
    target); ValueError where two entries take one place (two leaves, or a
    leaf and a subtree: an npz of members "a" and "a/b" lost one or raised
    an IndexError, found by review)."""
    if len(entries) == 1 and not entries[0][0]:
        return entries[0][1]
    root = _Node()
    for records, value in entries:
        node = root
        for kind, key in records[:-1]:
            node = node.setdefault((kind, key), _Node())
            if type(node) is not _Node:
                break
        last = tuple(records[-1]) if records else None
        if type(node) is not _Node or last is None or last in node:
            raise ValueError(f"{path_string(records)!r:.200} is taken twice: by two leaves, "
                             "or by a leaf and a subtree")
        node[last] = value
    return _materialize(root)


def _materialize(node):
    if type(node) is not _Node:
        return node
    if node and all(kind == "index" for kind, _ in node):
        keys = sorted(node, key=lambda k: k[1])
        if [k[1] for k in keys] == list(range(len(keys))):
            return [_materialize(node[k]) for k in keys]
        # A subset of a sequence (partial restore) keeps its indices as keys.
        return {k[1]: _materialize(node[k]) for k in keys}
    return {key: _materialize(value) for (_, key), value in node.items()}


def glob_escape(name: str) -> str:
    """A glob that matches ``name`` alone (``[``, ``*`` and ``?`` taken as themselves)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def matching(pattern: str, names) -> list[str]:
    """The names ``pattern`` selects: the one it spells exactly if there is
    one (tree keys may hold glob characters: ``layers[0]/w`` is a leaf's
    name, and as a glob would select ``layers0/w`` instead), else those it
    matches as a glob."""
    names = list(names)
    if pattern in names:
        return [pattern]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def first_names(names: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names``, comma-separated, and ", ..." where
    there are more (for messages naming leaves)."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
