"""Sharded safetensors checkpoints as Hugging Face writes them, for tests."""

import json
import os


def write_sharded(folder, tensors: dict, shards: int = 3, *, index: bool = True,
                  metadata: dict | None = None):
    """``tensors`` spread over ``shards`` files named as transformers names
    them (each with ``metadata`` as its ``__metadata__``), plus
    model.safetensors.index.json unless ``index`` is False; returns ``folder``."""
    from safetensors import numpy as safetensors_numpy

    os.makedirs(folder, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        safetensors_numpy.save_file(part, os.path.join(folder, file), metadata=metadata)
        weight_map.update({n: file for n in part})
    if index:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return folder
