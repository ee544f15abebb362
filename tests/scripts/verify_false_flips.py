"""restore(verify=False) over a checkpoint with each payload byte of its JPEG
tile flipped in turn (run by tests/test_checkpoint_corruption.py in a child
process, so that a crash fails the test instead of killing pytest).

    python tests/scripts/verify_false_flips.py WORKDIR

Prints one JSON line: outcome counts ("error", "exact", "changed"), whether
every decoded value stayed inside the leaf's affine range, and the errors seen.
"""

import json
import os
import shutil
import sys

import numpy as np

import jaxjpeg
from jaxjpeg import checkpoint_reader as ckr

work = sys.argv[1]
rng = np.random.default_rng(0)
path = os.path.join(work, "small.jjpg")
jaxjpeg.save(path, {"w": rng.normal(size=(64, 64)).astype(np.float32)})
reference = np.asarray(jaxjpeg.restore(path)["w"])
with ckr.Checkpoint(path) as c:
    (leaf,) = c.leaves
    scale, offset = c.read_affine(leaf)
    tile = c.reader.blob_info("leaf0/tile0.jpg")
# every value a decode can produce lies in [offset, offset + 255 * scale] per row
low = offset[:, None] - 1e-6
high = (offset + 255 * scale)[:, None] + 1e-6

original = open(path, "rb").read()
bad = os.path.join(work, "bad.jjpg")
counts = {"error": 0, "exact": 0, "changed": 0}
errors, in_range = set(), True
for position in range(tile.offset, tile.offset + tile.length):
    data = bytearray(original)
    data[position] ^= 0xFF
    with open(bad, "wb") as f:
        f.write(data)
    try:
        value = np.asarray(jaxjpeg.restore(bad, verify=False)["w"])
    except (jaxjpeg.JpegError, jaxjpeg.FormatError) as e:
        counts["error"] += 1
        errors.add(type(e).__name__)
        continue
    if np.array_equal(value, reference):
        counts["exact"] += 1
    else:
        counts["changed"] += 1
        in_range &= bool(np.all((value >= low) & (value <= high)))
shutil.copy(path, bad)
print(json.dumps({"counts": counts, "tile_bytes": tile.length, "in_range": in_range,
                  "errors": sorted(errors)}))
