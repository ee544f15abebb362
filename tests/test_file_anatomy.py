"""benchmarks/file_anatomy.py: its parts add up to the file, each where it belongs."""

import sys
from pathlib import Path

import numpy as np

import jaxjpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import file_anatomy  # noqa: E402


def test_the_parts_add_up_to_the_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tree = {"w": (rng.standard_normal((300, 200)) * 0.05).astype(np.float32),
            "b": rng.standard_normal(200).astype(np.float32),
            "step": np.int32(3)}
    path = tmp_path / "a.jjpg"
    report = jaxjpeg.save(path, tree, target_ratio=6, progress=False)
    parts, rate, leaves = file_anatomy.anatomy(str(path))
    assert sum(parts.values()) == report.file_bytes
    assert parts["tiles"] == sum(len(tile) for tile in _tile_bytes(path))
    assert parts["raw leaves"] > 0 and parts["maps"] > 0 and parts["header"] > 0
    assert parts["padding"] >= 0 and rate["target_ratio"] == 6.0 and len(leaves) == 3
    file_anatomy.main([str(path)])
    assert "off it" in capsys.readouterr().out


def _tile_bytes(path):
    from jaxjpeg import format as fmt
    with fmt.ContainerReader(path) as reader:
        return [bytes(reader.read_blob(n)) for n in reader.blob_names if n.endswith(".jpg")]
