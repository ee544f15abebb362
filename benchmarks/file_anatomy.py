"""Where the bytes of a jaxjpeg file go: tiles, leaves stored without JPEG,
maps, interval index, column scales, side lists, header and padding, and how
far the file is from the byte target it was saved for.

Under a byte target every byte not spent on the tiles is taken from the
weights; this is the measurement that found a 76 KB header, 99 KB of maps
and 2.2% of the target unspent in an 8x EfficientNet-lite1 file.

    python benchmarks/file_anatomy.py FILE [FILE ...]
"""

from __future__ import annotations

import argparse
import collections
import re

from jaxjpeg import format as fmt

# Blob name (layout.py) -> what it holds.
_KINDS = (("tiles", r"leaf\d+/tile\d+\.jpg"), ("raw leaves", r"leaf\d+/raw"),
          ("maps", r"leaf\d+/affine"), ("interval index", r"leaf\d+/intervals"),
          ("column scales", r"leaf\d+/col_scale"), ("side lists", r"leaf\d+/outliers"))


def anatomy(path: str) -> tuple[dict, dict, list]:
    """({part: bytes}, rate record, leaf records) of one jaxjpeg file."""
    with fmt.ContainerReader(path) as reader:
        parts = collections.Counter()
        for name in reader.blob_names:
            kind = next((k for k, pattern in _KINDS if re.fullmatch(pattern, name)), "other")
            parts[kind] += reader.blob_info(name).length
        infos = [reader.blob_info(name) for name in reader.blob_names]
        header_offset = fmt._align_up(max((i.offset + i.length for i in infos),
                                          default=fmt.PREAMBLE_SIZE))
        parts["header"] = reader.file_size - header_offset
        parts["preamble"] = fmt.PREAMBLE_SIZE
        parts["padding"] = reader.file_size - sum(parts.values())
        metadata = reader.metadata
    return dict(parts), metadata.get("rate", {}), metadata.get("leaves", [])


def _weights(leaves: list) -> int:
    total = 0
    for leaf in leaves:
        size = 1
        for d in leaf["shape"]:
            size *= d
        total += size
    return total


def report(path: str) -> None:
    parts, rate, leaves = anatomy(path)
    size = sum(parts.values())
    weights = _weights(leaves)
    print(f"{path}: {size:,} bytes, {len(leaves)} leaves, {weights:,} weights, rate {rate}")
    for part, nbytes in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:15s} {nbytes:12,d}  {100 * nbytes / size:5.1f}%  "
              f"{8 * nbytes / max(weights, 1):6.3f} bits/weight")
    target = None
    if "target_ratio" in rate:
        target = 4 * weights / rate["target_ratio"]
    elif "bits_per_weight" in rate:
        target = rate["bits_per_weight"] * weights / 8
    elif "target_bytes" in rate:
        target = rate["target_bytes"]
    if target:
        print(f"  target {target:,.0f} bytes: the file is {100 * (size / target - 1):+.2f}% "
              f"off it ({target - size:+,.0f} bytes unspent)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    for path in p.parse_args(argv).files:
        report(path)


if __name__ == "__main__":
    main()
