"""Damaged, truncated and hostile checkpoints fail with clear errors; saves are atomic.

Findings these tests pin down:
* With verify=True (the default) every single-byte change to the file is
  detected (FormatError), except in the zero padding between 64-byte-aligned
  blobs, which no checksum covers and nothing reads: there the restore gives
  exactly the original weights.
* With verify=False the header is still checked, but blob bytes are not: a
  flipped byte in a JPEG tile either raises JpegError or decodes to *changed*
  weights, all still inside the leaf's affine range (finite, bounded). The
  process never crashes (checked in a child process).
* A SIGKILL during save leaves the previous checkpoint at the path intact; the
  killed save's "<name>.tmp-<random>" file stays behind until the next save
  to that path removes it (no live writer holds its lock), never at the path.
"""

import json
import os
import signal
import re
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

import jax
import jaxjpeg
from jaxjpeg import _native, cli
from jaxjpeg import checkpoint_reader as ckr
from jaxjpeg import format as fmt
from jaxjpeg import layout

SCRIPTS = Path(__file__).parent / "scripts"
DETECTED = (jaxjpeg.FormatError, jaxjpeg.JpegError)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small checkpoint: a JPEG leaf (one tile), a raw float leaf, an int leaf."""
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(64, 64)).astype(np.float32),
            "b": rng.normal(size=(16,)).astype(np.float32),
            "n": np.int32(7)}
    path = tmp_path_factory.mktemp("small") / "small.jjpg"
    jaxjpeg.save(path, tree)
    with ckr.Checkpoint(path) as c:
        assert [l.kind for l in c.leaves] == ["raw", "raw", "jpeg"]  # b, n, w
    restored = {k: np.asarray(v) for k, v in jaxjpeg.restore(path).items()}
    return path, path.read_bytes(), restored


def covered_bytes(path) -> np.ndarray:
    """True for every byte a checksum covers: preamble, blobs, header."""
    with fmt.ContainerReader(path) as r:
        covered = np.zeros(r.file_size, bool)
        covered[:fmt.PREAMBLE_SIZE] = True
        for name in r.blob_names:
            info = r.blob_info(name)
            covered[info.offset:info.offset + info.length] = True
        end = max(i.offset + i.length for i in map(r.blob_info, r.blob_names))
        header_offset = -(-end // fmt.ALIGNMENT) * fmt.ALIGNMENT
        covered[header_offset:] = True
    return covered


def restore_outcome(path, original, **kwargs):
    """"detected", "exact" (same weights) or "WRONG" (silently different)."""
    try:
        got = jaxjpeg.restore(path, **kwargs)
    except DETECTED:
        return "detected"
    same = all(np.array_equal(np.asarray(got[k]), v) for k, v in original.items())
    return "exact" if same else "WRONG"


def test_every_single_byte_change_is_detected(small, tmp_path):
    path, data, original = small
    covered = covered_bytes(path)
    bad = tmp_path / "bad.jjpg"
    outcomes = {}
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        bad.write_bytes(damaged)
        outcomes[position] = restore_outcome(bad, original)
    wrong = [p for p, o in outcomes.items() if o == "WRONG"]
    assert not wrong, f"silently wrong weights after flipping bytes {wrong[:20]}"
    undetected = [p for p, o in outcomes.items() if o == "exact"]
    assert not covered[undetected].any(), "a flip in checksummed bytes went unnoticed"
    assert sum(o == "detected" for o in outcomes.values()) == covered.sum()


def test_single_byte_changes_in_a_multi_tile_checkpoint(tmp_path):
    """A sample of payload bytes (every 97th) and every header byte of a bigger file."""
    rng = np.random.default_rng(1)
    tree = {"w": rng.normal(size=(600, 700)).astype(np.float32),
            "conv": rng.normal(size=(3, 3, 32, 64)).astype(np.float32)}
    path = tmp_path / "big.jjpg"
    jaxjpeg.save(path, tree)
    original = {k: np.asarray(v) for k, v in jaxjpeg.restore(path).items()}
    data = path.read_bytes()
    covered = covered_bytes(path)
    with fmt.ContainerReader(path) as r:
        header_start = max(i.offset + i.length for i in map(r.blob_info, r.blob_names))
    positions = sorted(set(range(0, header_start, 97)) | set(range(header_start, len(data)))
                       | set(range(64)))
    bad = tmp_path / "bad.jjpg"
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        bad.write_bytes(damaged)
        outcome = restore_outcome(bad, original)
        assert outcome != "WRONG", position
        assert outcome == "detected" or not covered[position], position


def test_truncation_at_every_length(small, tmp_path):
    path, data, _ = small
    bad = tmp_path / "short.jjpg"
    for length in range(len(data)):
        bad.write_bytes(data[:length])
        with pytest.raises(jaxjpeg.FormatError):
            jaxjpeg.restore(bad)
    bad.write_bytes(data + b"\0")  # and one byte too many
    with pytest.raises(jaxjpeg.FormatError, match="unexpected bytes"):
        jaxjpeg.restore(bad)


def test_verify_false_never_crashes(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "verify_false_flips.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = report["counts"]
    assert sum(counts.values()) == report["tile_bytes"]
    # Flips in the JPEG header and many in the entropy-coded data are caught by
    # the decoder (JpegError) or, where they move a marker, by the check of the
    # interval index against the tile's markers (FormatError); the rest decode
    # to other, but bounded, values.
    assert counts["error"] > 0 and report["errors"] == ["FormatError", "JpegError"]
    assert report["in_range"]


# ---------------------------------------------------------------- hostile metadata


def rewrite(src, dst, edit_meta=None, edit_blobs=None):
    """Copies a checkpoint, editing its metadata and blobs; checksums stay valid."""
    with fmt.ContainerReader(src) as r:
        meta = json.loads(json.dumps(r.metadata))
        blobs = {n: bytes(r.read_blob(n)) for n in r.blob_names}
    if edit_meta:
        meta = edit_meta(meta) or meta
    if edit_blobs:
        edit_blobs(blobs)
    with fmt.ContainerWriter(dst) as w:
        for name, data in blobs.items():
            w.add_blob(name, data)
        w.set_metadata(meta)
    return dst


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A checkpoint with a 2 x 2-tile JPEG leaf (leaf index 1) and a raw one (index 0)."""
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("tiled") / "tiled.jjpg"
    jaxjpeg.save(path, {"w": rng.normal(size=(96, 80)).astype(np.float32),
                        "b": rng.normal(size=(80,)).astype(np.float32)}, tile_shape=(48, 40),
                 restart_interval=8)   # several intervals a tile (30 blocks)
    with ckr.Checkpoint(path) as c:
        assert [l.kind for l in c.leaves] == ["raw", "jpeg"]
        assert len(c.leaves[1].tiles) == 4
    return path


def jpeg_leaf(meta):
    return meta["leaves"][1]


def set_in(getter, key, value):
    def edit(meta):
        getter(meta)[key] = value
    return edit


def tile_edit(k, column, value):
    def edit(meta):
        jpeg_leaf(meta)["tiles"][k][column] = value
    return edit


def swap_tile_origin(meta):  # two tiles on the same spot: equal area, a gap elsewhere
    tiles = jpeg_leaf(meta)["tiles"]
    tiles[1][:2] = tiles[0][:2]


def drop_leaves(meta):
    del meta["leaves"]


def leaves_not_list(meta):
    meta["leaves"] = 5


def nested_paths(meta):
    meta["leaves"][0]["path"] = meta["leaves"][1]["path"] + [["key", "x"]]


def duplicate_paths(meta):
    meta["leaves"][0]["path"] = meta["leaves"][1]["path"]


def blob_renamer(old, new):
    def edit(blobs):
        blobs[new] = blobs.pop(old)
    return edit


def read_starts(blob) -> np.ndarray:
    """The fixture's interval index (four tiles alike) as one array of starts."""
    deltas = layout.inflate_planes(blob, "<u2", len(zlib.decompress(blob)) // 2)
    return np.concatenate([np.cumsum(d) for d in np.split(deltas.astype(np.int64), 4)])


def write_starts(starts) -> bytes:
    """Starts back as the file stores them (differences wrap as uint16 would)."""
    tiles = np.split(starts, 4) if len(starts) % 4 == 0 else [starts]
    deltas = np.concatenate([np.diff(s, prepend=0) for s in tiles])
    return layout.deflate_planes((deltas % 2**16).astype("<u2"))


def interval_index(transform):
    def edit(blobs):
        blobs["leaf1/intervals"] = write_starts(transform(read_starts(blobs["leaf1/intervals"])))
    return edit


def _bump_last(s):
    s[-1] += 100000
    return s


def _reverse_first_tile(s):
    s[1], s[2] = s[2], s[1]
    return s


def _first_tile_one_interval(meta):  # index count agrees, tile needs more intervals
    leaf = jpeg_leaf(meta)
    leaf["tiles"][0][4] = 1


HOSTILE_META = {
    "unknown format": (set_in(lambda m: m, "format", "other-format"),
                       "not a jaxjpeg checkpoint .*format 'other-format'"),
    "unknown version": (set_in(lambda m: m, "version", 99), "version 99"),
    "missing leaves": (drop_leaves, "leaves"),
    "leaves not a list": (leaves_not_list, "leaves"),
    "huge shape": (set_in(jpeg_leaf, "shape", [2**40, 2**40]), "implausible shape"),
    "huge raw shape": (set_in(lambda m: m["leaves"][0], "shape", [2**31, 2**20]),
                       "implausible shape"),
    "enormous int shape": (set_in(jpeg_leaf, "shape", [10**400, 1]), "implausible shape"),
    "negative shape": (set_in(jpeg_leaf, "shape", [-96, -80]), "implausible shape"),
    "shape not a list": (set_in(jpeg_leaf, "shape", "96x80"), "malformed"),
    # found by review: an empty leaf's other sides unbounded (numpy failed later, verify with
    # a traceback), and shapes not of whole numbers (16.7 read as 16, "16" as (1, 6))
    "empty with a side past int64": (set_in(lambda m: m["leaves"][0], "shape", [0, 2**70]),
                                     "implausible shape"),
    "empty with sides past numpy": (set_in(lambda m: m["leaves"][0], "shape",
                                           [0, 2**40, 2**40]), "implausible shape"),
    "fractional shape": (set_in(lambda m: m["leaves"][0], "shape", [16.7, 5]), "whole numbers"),
    "shape a string of digits": (set_in(lambda m: m["leaves"][0], "shape", "80"),
                                 "whole numbers"),
    "bool in shape": (set_in(lambda m: m["leaves"][0], "shape", [True, 80]), "whole numbers"),
    "bad dtype": (set_in(jpeg_leaf, "dtype", "no-such-type"), "unknown dtype"),
    "object dtype": (set_in(lambda m: m["leaves"][0], "dtype", "object"), "unsupported dtype"),
    "long double dtype": (set_in(lambda m: m["leaves"][0], "dtype", "float128"),
                          "unsupported dtype"),
    "int dtype jpeg": (set_in(jpeg_leaf, "dtype", "int32"), "bad kind"),
    "unknown kind": (set_in(jpeg_leaf, "kind", "zip"), "bad kind"),
    "bits 16": (set_in(jpeg_leaf, "bits", 16), "bad sample precision 16"),
    # found by review: numbers of the wrong type read as others (512.5 as 512,
    # true as version 1), and 71 axes failing deep in numpy (verify: a traceback)
    "bits 8.0": (set_in(jpeg_leaf, "bits", 8.0), "bad sample precision 8.0"),
    "fractional tile side": (tile_edit(0, 2, 48.5), "not a whole number"),
    "fractional restart interval": (set_in(jpeg_leaf, "restart_interval", 32.7),
                                    "not a whole number"),
    "version true": (set_in(lambda m: m, "version", True), "version True"),
    "version 2.0": (set_in(lambda m: m, "version", 2.0), "version 2.0"),
    "71 axes": (set_in(jpeg_leaf, "shape", [96, 80] + [1] * 69), "71 axes"),
    "no tiles": (set_in(jpeg_leaf, "tiles", []), "bad tile records"),
    "short tile record": (set_in(jpeg_leaf, "tiles", [[0, 0, 96, 80]]), "bad tile records"),
    "negative restart interval": (set_in(jpeg_leaf, "restart_interval", -1), "restart interval"),
    "tile outside": (tile_edit(3, 0, 90), "tile outside"),
    "tile negative origin": (tile_edit(0, 1, -8), "tile outside"),
    "tile too tall": (tile_edit(0, 2, 70000), "tile outside"),
    "tiles do not cover": (set_in(jpeg_leaf, "shape", [96, 96]), "do not cover"),
    "overlapping tiles": (swap_tile_origin, "do not cover"),
    "too few intervals": (_first_tile_one_interval, "restart intervals"),
    "malformed path": (set_in(jpeg_leaf, "path", "w"), "malformed path"),
    "path of wrong kind": (set_in(jpeg_leaf, "path", [["index", "w"]]), "malformed path"),
    "nested paths": (nested_paths, "nest"),
    "duplicate paths": (duplicate_paths, "repeat"),
    # found by review: jax could not sort the dict restore nested these into
    "flat index beside str keys": (set_in(lambda m: m["leaves"][0], "path", [["flat", 7]]),
                                   "repeats or nests"),
}

def _shift_interval_start(shift, k=0, interval=2):
    def edit(blobs):
        starts = read_starts(blobs["leaf1/intervals"])
        per_tile = len(starts) // 4
        starts[k * per_tile + interval] += shift
        blobs["leaf1/intervals"] = write_starts(starts)
    return edit


HOSTILE_BLOBS = {
    "interval index out of range": (interval_index(_bump_last), "index out of range"),
    "interval index not increasing": (interval_index(_reverse_first_tile), "index out of range"),
    "interval index wrong size": (interval_index(lambda s: s[:-1]), "wrong size"),
    "affine wrong size": (lambda b: b.update({"leaf1/affine": b["leaf1/affine"][:-8]}),
                          "affine map (does not inflate|inflates to the wrong size)"),
    "affine one offset short": (lambda b: b.update({"leaf1/affine": layout.deflate_planes(
        layout.inflate_planes(b["leaf1/affine"], "<f2", 97)[:-1])}),
        "affine map inflates to the wrong size"),
    "raw wrong size": (lambda b: b.update({"leaf0/raw": b["leaf0/raw"] + b"\0" * 4}),
                       "expected"),
    "missing tile blob": (blob_renamer("leaf1/tile2.jpg", "other"), "missing blob"),
    "missing raw blob": (blob_renamer("leaf0/raw", "other"), "missing blob"),
    # Valid JPEGs in the wrong places: the index no longer fits them (their
    # sizes, or where their markers sit).
    "tiles swapped": (lambda b: b.update({"leaf1/tile0.jpg": b["leaf1/tile3.jpg"],
                                          "leaf1/tile3.jpg": b["leaf1/tile0.jpg"]}),
                      "index out of range|restart markers"),
    "interval start shifted": (_shift_interval_start(3, k=1), "restart markers"),
}


def assert_clear_error(path, match):
    tracemalloc.start()
    try:
        with pytest.raises(DETECTED, match=match):
            jaxjpeg.restore(path)
        with pytest.raises(DETECTED, match=match):
            jaxjpeg.restore(path, verify=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"refusing a hostile file took {peak} bytes"


@pytest.mark.parametrize("case", sorted(HOSTILE_META))
def test_hostile_metadata(tiled, tmp_path, case):
    edit, match = HOSTILE_META[case]
    assert_clear_error(rewrite(tiled, tmp_path / "hostile.jjpg", edit_meta=edit), match)


def test_header_number_overflowing_to_infinity(tiled, tmp_path):
    """1e400 is valid JSON that parses as inf; ContainerWriter cannot write it, so
    the header text is edited and its checksum and the preamble recomputed.
    Refused as the header is parsed (it was as a malformed shape, later)."""
    data = tiled.read_bytes()
    with fmt.ContainerReader(tiled) as r:
        end = max(i.offset + i.length for i in map(r.blob_info, r.blob_names))
    header_offset = -(-end // fmt.ALIGNMENT) * fmt.ALIGNMENT
    header = zlib.decompress(data[header_offset:])
    assert header.count(b'"shape":[96,80]') == 1
    header = zlib.compress(header.replace(b'"shape":[96,80]', b'"shape":[1e400,80]'))
    path = tmp_path / "inf.jjpg"
    path.write_bytes(fmt._pack_preamble(header_offset, len(header), fmt.crc32c(header),
                                        fmt.FLAG_DEFLATED_HEADER)
                     + data[fmt.PREAMBLE_SIZE:header_offset] + header)
    assert_clear_error(path, "1e400 overflows")


@pytest.mark.parametrize("case", sorted(HOSTILE_BLOBS))
def test_hostile_blobs(tiled, tmp_path, case):
    edit, match = HOSTILE_BLOBS[case]
    assert_clear_error(rewrite(tiled, tmp_path / "hostile.jjpg", edit_blobs=edit), match)


def _affine_value(index, value):
    """An edit setting value ``index`` of the leaf's float16 maps (0: the
    shared scale, then the rows' offsets)."""
    def edit(blobs):
        maps = layout.inflate_planes(blobs["leaf1/affine"], "<f2", 97).copy()
        maps[index] = value
        blobs["leaf1/affine"] = layout.deflate_planes(maps)
    return edit


@pytest.mark.parametrize("index, value", [(5, np.nan), (5, np.inf), (0, -np.inf)])
def test_maps_that_restore_values_beyond_float32_are_refused(tiled, tmp_path, capsys,
                                                            index, value):
    """Found by review: a NaN or infinite row map (checksums intact)
    restored rows of NaN and inf without a word on every read path, and
    verify passed; a writer keeps such values in the side list."""
    path = rewrite(tiled, tmp_path / "maps.jjpg", edit_blobs=_affine_value(index, value))
    match = "row maps or column scales that restore values beyond float32"
    assert_clear_error(path, match)
    with pytest.raises(DETECTED, match=match):
        jaxjpeg.open(path).get("w")
    with pytest.raises(DETECTED, match=match):
        jax.jit(jaxjpeg.decode)(jaxjpeg.load(path))
    assert cli.main(["verify", str(path)]) == cli.EXIT_DAMAGED
    assert match in capsys.readouterr().out


def test_maps_of_rows_near_float32s_limit_are_read(tmp_path, monkeypatch):
    """Review of the check above: bounding each row by |scale| * top +
    |offset| refused files a writer without side lists (version 1) wrote,
    rows of values up to 1.2e38, which restore finite."""
    from jaxjpeg import views
    monkeypatch.setattr(views, "extreme_limit", lambda dtype: float("inf"))
    w = (np.random.default_rng(0).uniform(-1, 1, (256, 256)) * 1.2e38).astype(np.float32)
    jaxjpeg.save(tmp_path / "big.jjpg", {"w": w})
    with ckr.Checkpoint(tmp_path / "big.jjpg") as c:
        assert c.leaves[0].kind == "jpeg"
    assert np.all(np.isfinite(jaxjpeg.restore(tmp_path / "big.jjpg")["w"]))
    assert cli.main(["verify", str(tmp_path / "big.jjpg")]) == 0
    # rows of +-2e38: their ends are finite, but the decoder's sample * scale,
    # formed first, is not (review of the bound by the ends alone: 13,271 inf)
    jaxjpeg.save(tmp_path / "over.jjpg", {"w": w * np.float32(2e38 / 1.2e38)})
    assert_clear_error(tmp_path / "over.jjpg", "restore values beyond float32")


def test_a_row_ending_at_float32s_largest_value_is_refused(tmp_path):
    """Review: a row whose exact end is float32's largest value passed the
    check, but the decoder's two float32 roundings (4095 * scale lands
    halfway, then the offset) made it inf."""
    src = tmp_path / "src.jjpg"
    jaxjpeg.save(src, {"w": np.random.default_rng(0).standard_normal((64, 64))
                       .astype(np.float32)}, bits=12)
    with ckr.Checkpoint(src) as c:
        leaf = c.leaves[0]
        assert leaf.kind == "jpeg" and leaf.bits == 12
    rows = leaf.matrix_shape[0]
    scale, offset = np.float32(8193 * 2.0 ** 103), np.float32(4095 * 2.0 ** 103)
    assert 4095 * float(scale) + float(offset) == float(np.finfo(np.float32).max)

    def float32_maps(meta):
        meta["leaves"][0]["affine"] = "float32"
        meta["leaves"][0].pop("affine_layout", None)

    def maps(blobs):
        blobs["leaf0/affine"] = np.stack([np.full(rows, scale), np.full(rows, offset)]).astype(
            "<f4").tobytes()
    path = rewrite(src, tmp_path / "edge.jjpg", edit_meta=float32_maps, edit_blobs=maps)
    assert_clear_error(path, "restore values beyond float32")


def test_unchanged_rewrite_restores_identically(tiled, tmp_path):
    """The rewriting helper itself changes nothing when asked to change nothing."""
    copy = rewrite(tiled, tmp_path / "copy.jjpg")
    a, b = jaxjpeg.restore(tiled), jaxjpeg.restore(copy)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.jjpg"
    with fmt.ContainerWriter(path) as w:
        w.add_blob("x", b"hello")
        w.set_metadata({"something": "else"})
    with pytest.raises(jaxjpeg.FormatError, match="not a jaxjpeg checkpoint"):
        jaxjpeg.restore(path)
    (tmp_path / "text.jjpg").write_bytes(b"not a container at all" * 10)
    with pytest.raises(jaxjpeg.FormatError, match="magic"):
        jaxjpeg.restore(tmp_path / "text.jjpg")


# ---------------------------------------------------------------- atomic save


def test_sigkill_mid_save_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "ckpt.jjpg"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "save_loop.py"), str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        lines = []

        def wait_for(prefix):
            while True:
                line = proc.stdout.readline()
                assert line, f"save loop exited early: {lines}"
                lines.append(line.strip())
                if line.startswith(prefix):
                    return time.monotonic()

        start = wait_for("begin 0")
        save_seconds = wait_for("saved 0") - start
        wait_for("begin 1")
        # kill at a point inside the save, once a temporary file is being written
        deadline = time.monotonic() + 10 * save_seconds + 5
        while not list(tmp_path.glob("ckpt.jjpg.tmp-*")):
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.005)
        time.sleep(save_seconds / 4)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        lines += proc.stdout.read().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The kill lands inside save 1, or, on a slow machine, inside a later one
    # (found in session 29: the lines after the kill were split on spaces, so
    # "saved 1" went unseen and the file's step 1 failed the test).
    saved = [int(line.split()[1]) for line in lines if line.startswith("saved ")]
    begun = [int(line.split()[1]) for line in lines if line.startswith("begin ")]
    assert max(begun) > max(saved), "the save finished before the kill; nothing was tested"
    leftovers = list(tmp_path.glob("ckpt.jjpg.tmp-*"))
    assert leftovers, "the killed save left no temporary file: was it killed mid-save?"
    with fmt.ContainerReader(path) as r:
        assert all(ok for _, ok in r.verify())
    restored = jaxjpeg.restore(path)
    assert int(restored["step"]) == max(saved)   # the last save that finished
    assert restored["embedding"].shape == (4096, 2048)
    rng = np.random.default_rng(0)
    first = rng.normal(size=(1024, 1024)).astype(np.float32)  # layer0/kernel, as the script made it
    err = np.sqrt(np.mean((np.asarray(restored["layer0"]["kernel"]) - first) ** 2))
    assert 0 < err < 0.1
    # the path still takes new saves, which remove the dead writer's temp file
    # (once it is older than a few seconds: a writer may not hold its lock yet)
    for leftover in leftovers:
        os.utime(leftover, (1, 1))
    jaxjpeg.save(path, {"step": np.int64(5)})
    assert int(jaxjpeg.restore(path)["step"]) == 5
    assert not list(tmp_path.glob("ckpt.jjpg.tmp-*"))


# ---------------------------------------------------------------- issue 9: defects 8, 9


def _corrupt_interval(blobs, tile="leaf1/tile1.jpg", interval=1, fill=0xFE):
    """Overwrites one restart interval's entropy-coded bytes (markers kept):
    the index still fits the tile, the decoder must refuse the data."""
    data = bytearray(blobs[tile])
    starts = _native.inspect(bytes(data))["interval_starts"]
    a, b = int(starts[interval]), int(starts[interval + 1]) - 2
    data[a:b] = bytes([fill]) * (b - a)
    blobs[tile] = bytes(data)


@pytest.fixture(scope="module")
def corrupt_stream(tiled, tmp_path_factory):
    """The tiled checkpoint with one corrupt interval in a JPEG tile; every
    checksum recomputed (rewrite), so only decoding can find the damage."""
    return rewrite(tiled, tmp_path_factory.mktemp("corrupt") / "c.jjpg",
                   edit_blobs=_corrupt_interval)


def test_corrupt_stream_is_always_a_jpeg_error(corrupt_stream):
    """Defect 8: the status was read outside the error conversion, so with
    asynchronous dispatch 2-5% of such restores raised JaxRuntimeError."""
    for _ in range(60):
        with pytest.raises(jaxjpeg.JpegError, match="restart interval"):
            jaxjpeg.restore(corrupt_stream)


def test_decode_of_a_corrupt_loaded_payload_is_a_jpeg_error(corrupt_stream):
    """Defect 8: jaxjpeg.decode outside jit raised a plain ValueError."""
    loaded = jaxjpeg.load(corrupt_stream)
    for _ in range(20):
        with pytest.raises(jaxjpeg.JpegError, match="restart interval"):
            jaxjpeg.decode(loaded)


@pytest.mark.parametrize("shift", [3, -3, 1])
def test_interval_index_off_the_tiles_markers_is_refused(tiled, tmp_path, shift):
    """Defect 9: an interval start shifted by 3 bytes restored other weights
    (max error 4.1) without a word; restore now checks every start against
    the tile's own restart markers."""
    path = rewrite(tiled, tmp_path / "shifted.jjpg", edit_blobs=_shift_interval_start(shift))
    with pytest.raises(jaxjpeg.FormatError, match="restart markers"):
        jaxjpeg.restore(path)
    with pytest.raises(jaxjpeg.FormatError, match="restart markers"):
        jaxjpeg.load(path)
    assert cli.main(["verify", str(path)]) == 1


def test_verify_decodes_what_it_vouches_for(corrupt_stream, tiled, capsys):
    """Defect 9: verify checked checksums and headers only, so it said OK for
    files that do not restore (969 of 1,943 fuzzed files)."""
    assert cli.main(["verify", str(tiled)]) == 0
    assert "tiles decoded" in capsys.readouterr().out
    assert cli.main(["verify", str(corrupt_stream)]) == 1
    out = capsys.readouterr().out
    assert "BAD w: " in out and "restart interval" in out


def test_verify_of_a_truncated_file_reports_damage(tiled, tmp_path, capsys):
    """Defect 13: a truncated file exited 2, as a usage error does; damage is 1."""
    short = tmp_path / "short.jjpg"
    short.write_bytes(tiled.read_bytes()[:-10])
    assert cli.main(["verify", str(short)]) == 1
    assert "BAD container: " in capsys.readouterr().out
    assert cli.main(["verify", str(tmp_path / "missing.jjpg")]) == cli.EXIT_IO  # issue 10


@pytest.mark.parametrize("byte", [2, 255])
def test_bool_leaf_bytes_other_than_0_and_1_are_refused(tmp_path, byte):
    """Defect 13: raw bool bytes 2 and 255 restored as values unequal to True."""
    path = tmp_path / "b.jjpg"
    jaxjpeg.save(path, {"mask": np.array([True, False, True])})
    bad = rewrite(path, tmp_path / "bad.jjpg",
                  edit_blobs=lambda b: b.update({"leaf0/raw": bytes([1, 0, byte])}))
    assert_clear_error(bad, "bool but holds bytes other than 0 and 1")
    assert cli.main(["verify", str(bad)]) == 1
    np.testing.assert_array_equal(np.asarray(jaxjpeg.restore(path)["mask"]), [True, False, True])


# ----------------------------------------------------------------------------- interval index

def test_the_interval_index_is_stored_as_deflated_uint16_differences(tiled):
    """Issue 8 (all-in size): uint32 offsets were 1.6% of EfficientNet-lite1 at
    8x; differences fit uint16, and deflated take less than uint16 does."""
    with ckr.Checkpoint(tiled) as c:
        leaf = c.leaves[1]
        assert leaf.interval_encoding == layout.DELTA_INDEX
        blob = c.reader.read_blob(layout.intervals_blob(1))
        assert len(blob) < 2 * sum(t[4] + 1 for t in leaf.tiles)
        starts = c.read_interval_index(leaf)
        for k, piece in enumerate(starts):   # every start sits where the tile's markers are
            c.check_interval_index(leaf, k, c.reader.read_blob(layout.tile_blob(1, k)), piece)


def test_a_uint32_interval_index_of_older_files_still_restores(tiled, tmp_path):
    with ckr.Checkpoint(tiled) as c:
        starts = np.concatenate(c.read_interval_index(c.leaves[1]))

    def as_offsets(meta):
        del jpeg_leaf(meta)["intervals"]
    old = rewrite(tiled, tmp_path / "old.jjpg", edit_meta=as_offsets,
                  edit_blobs=lambda b: b.update({"leaf1/intervals":
                                                 starts.astype(np.uint32).tobytes()}))
    with ckr.Checkpoint(old) as c:
        assert c.leaves[1].interval_encoding is None
    np.testing.assert_array_equal(jaxjpeg.restore(old)["w"], jaxjpeg.restore(tiled)["w"])


def test_an_index_too_wide_for_uint16_is_stored_as_uint32_offsets(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(512, 512)).astype(np.float32)
    path = tmp_path / "wide.jjpg"
    jaxjpeg.save(path, {"w": w}, restart_interval=0, quality=100)
    with ckr.Checkpoint(path) as c:
        leaf = c.leaves[0]
        assert c.tile_size(leaf, 0) > 2**16   # one interval, longer than uint16 counts
        assert leaf.interval_encoding is None
    error = np.asarray(jaxjpeg.restore(path)["w"]) - w
    assert np.sqrt(np.mean(error ** 2)) < 0.03   # of a unit normal: decoded, not garbage


def test_an_unknown_interval_index_encoding_is_refused(tiled, tmp_path):
    edit = set_in(jpeg_leaf, "intervals", "uint8-deltas")
    assert_clear_error(rewrite(tiled, tmp_path / "bad.jjpg", edit_meta=edit),
                       "interval index encoding")


# ----------------------------------------------------------------------------- deflated side data

@pytest.mark.parametrize("dtype", ["<u2", "<f2", "<f4", "<u4"])
def test_deflated_planes_round_trip(dtype):
    values = np.random.default_rng(4).integers(0, 3000, 1001).astype(dtype)
    data = layout.deflate_planes(values)
    np.testing.assert_array_equal(layout.inflate_planes(data, dtype, 1001), values)
    for count in (1000, 1002):
        with pytest.raises(ValueError, match="wrong size"):
            layout.inflate_planes(data, dtype, count)


def _planes_at_level(values: np.ndarray, level: int = layout.DEFLATE_LEVEL) -> bytes:
    planes = values.view(np.uint8).reshape(-1, values.dtype.itemsize)
    return zlib.compress(np.ascontiguousarray(planes.T).tobytes(), level)


@pytest.mark.parametrize("size", [20_000, 300_000, 3_000_000])
def test_float_noise_planes_are_not_string_matched(size):
    """String matching costs more bits than it saves on float weights'
    planes (and zlib's level 6 took 8x the time of Huffman coding alone):
    a byte target measuring every moment's exact size spent 60% of its time
    there."""
    values = np.random.default_rng(1).normal(0, 0.02, size).astype("<f4")
    data = layout.deflate_planes(values)
    assert len(data) < 0.99 * len(_planes_at_level(values))
    np.testing.assert_array_equal(layout.inflate_planes(data, "<f4", size), values)


def _rows_of_one_row(rng, shape, rows):
    table = rng.normal(0, 1, shape).astype("<f4")
    table[rows] = table.mean(axis=0)
    return table.reshape(-1)


def _smooth_int8(rng):
    walk = np.cumsum(rng.standard_normal((256, 4096)), axis=1) * 0.3
    return np.clip(np.round(walk), -127, 127).astype(np.int8).reshape(-1)


@pytest.mark.parametrize("kind", ["mask", "table", "ramp", "half_zero_bytes", "two_regions",
                                  "tail_rows", "middle_rows", "period_32000", "smooth_int8",
                                  "grey_rgba"])
def test_planes_with_repeats_are_still_matched(kind):
    """Where matching pays (masks of two values, repeating rows, smooth or
    partly constant bytes), the planes deflate no larger than level 6 did
    (but for each plane's flush: a few bytes). Found by review: judged on a
    piece or two of each plane, an embedding whose last quarter of rows is
    its mean row (resized with mean rows) took 27% more, one with rows
    1000-8999 so 23%; rows of a random walk quantized to int8 (3-7 byte
    repeats) 1.5x; grey RGBA pixels (planes copying each other) 2.9x."""
    rng = np.random.default_rng(2)
    values = {
        "smooth_int8": lambda: _smooth_int8(rng),
        "grey_rgba": lambda: rng.integers(0, 256, 20_000).astype("<u4") * 0x010101 + (255 << 24),
        "tail_rows": lambda: _rows_of_one_row(rng, (8192, 256), slice(6144, None)),
        "middle_rows": lambda: _rows_of_one_row(rng, (32000, 64), slice(1000, 9000)),
        "period_32000": lambda: np.tile(rng.normal(0, 1, 32000), 32).astype("<f4"),
        "mask": lambda: np.where(rng.random(400_000) < 0.5, 0, -1e9).astype("<f4"),
        "table": lambda: np.tile(rng.integers(0, 1 << 30, 16384), 30).astype("<i4"),
        "ramp": lambda: (np.arange(500_000) // 7).astype("<u4"),
        "half_zero_bytes": lambda: rng.normal(0, 1, 300_000).astype(np.float16).astype("<f4"),
        "two_regions": lambda: np.concatenate([rng.normal(0, 1, 200_000).astype("<f4"),
                                               np.zeros(200_000, "<f4")]),
    }[kind]()
    data = layout.deflate_planes(values)
    assert len(data) <= 1.002 * len(_planes_at_level(values)) + 32
    np.testing.assert_array_equal(layout.inflate_planes(data, values.dtype, values.size), values)


def _plane_kinds(rng):
    floats = rng.normal(0, 0.02, 300_000).astype("<f4").view(np.uint8).reshape(-1, 4).T
    return {
        "empty": np.zeros(0, np.uint8), "one": np.array([7], np.uint8),
        "two runs": np.array([5, 5, 5, 5, 9, 9, 9], np.uint8),
        "zeros": np.zeros(200_000, np.uint8),
        "noise": rng.integers(0, 256, 200_000, dtype=np.uint8),
        "high noise": rng.integers(144, 256, 70_000, dtype=np.uint8),   # 9-bit static codes
        "three values": rng.integers(0, 3, 200_000, dtype=np.uint8),
        "mantissa plane": np.ascontiguousarray(floats[1]),
        "exponent plane": np.ascontiguousarray(floats[3]),
        "regions": np.concatenate([np.zeros(70_000, np.uint8),
                                   rng.integers(0, 256, 70_000, dtype=np.uint8),
                                   np.full(100_000, 9, np.uint8)]),
        "chunk edges": rng.integers(0, 2, (1 << 15) + 1, dtype=np.uint8),
        "stored pieces": rng.integers(0, 256, 3 * 65_535 + 2, dtype=np.uint8),
    }


def _zlib_runs(data: np.ndarray, last: bool) -> bytes:
    packer = zlib.compressobj(layout.DEFLATE_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, 8, zlib.Z_RLE)
    return packer.compress(data) + packer.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


@pytest.mark.parametrize("last", [False, True])
def test_runs_deflate_to_what_zlib_inflates(last):
    """A plane's runs and Huffman codes (xla_ops/deflate_runs.h, written in
    place of zlib's Z_RLE: 3-6x faster) inflate back with zlib, end on a
    sync flush unless last, and take the bytes counted without writing them;
    no more than zlib's Z_RLE takes, but for a block header or two. Found
    while writing it: the static code's 9-bit literals were off by two codes
    (its two unsent symbols left out of the canonical count)."""
    from jaxjpeg import _native

    for kind, data in _plane_kinds(np.random.default_rng(8)).items():
        stream = _native.run_deflate(data, last)
        assert len(stream) == _native.run_deflated_size(data, last), kind
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        assert inflater.decompress(stream) == data.tobytes(), kind
        assert inflater.eof == last and not inflater.unused_data, kind
        if not last:
            assert stream.endswith(b"\x00\x00\xff\xff"), kind
        assert len(stream) <= 1.001 * len(_zlib_runs(data, last)) + 48, kind


def test_runs_of_every_length_deflate_back():
    """Runs 1 to 700 bytes long (every length code, its extra bits, runs
    longer than one match) between bytes that end them."""
    from jaxjpeg import _native

    data = np.concatenate([np.full(n, n % 251, np.uint8) for n in range(1, 701)])
    for last in (False, True):
        stream = _native.run_deflate(data, last)
        assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(stream) == data.tobytes()
        assert len(stream) < data.size / 20
    with pytest.raises(ValueError, match="contiguous"):
        _native.run_deflate(data[::2], True)


@pytest.mark.parametrize("level", [1, layout.DEFLATE_LEVEL])
def test_planes_are_counted_at_the_size_they_deflate_to(level):
    """layout.deflated_planes_size, which a byte target counts exact leaves
    by, is the length deflate_planes writes, on every path: one zlib call
    (tiny), the smaller of one stream and a stream a plane, planes apart,
    matched or not."""
    rng = np.random.default_rng(9)
    cases = [rng.normal(0, 1, 1000).astype("<f4"), rng.normal(0, 1, 20_000).astype("<f4"),
             rng.normal(0, 1, 300_000).astype("<f4"), rng.integers(0, 3, 200_000).astype("<u2"),
             np.where(rng.random(300_000) < 0.5, 0, -1e9).astype("<f4"),
             np.tile(rng.integers(0, 1 << 30, 16384), 10).astype("<i4"),
             rng.integers(0, 256, 50_000).astype(np.uint8),
             rng.integers(-8, 8, 2 * layout.PIECE_BYTES + 5).astype("<i2")]   # in pieces
    for values in cases:
        assert layout.deflated_planes_size(values, level) == len(
            layout.deflate_planes(values, level))


def _in_pieces():
    """Two byte planes of 3 pieces each, deflated."""
    values = np.random.default_rng(4).integers(-8, 8, 2 * layout.PIECE_BYTES + 5).astype("<i2")
    packed, pieces = layout.deflate_planes_in_pieces(values)
    return values, packed, pieces


def test_long_planes_are_deflated_in_pieces_any_inflater_reads_whole(monkeypatch):
    """A plane longer than layout.PIECE_BYTES is deflated a piece at a time,
    each piece a deflate stream of its own whose start is returned: restore
    inflates them at once, one core or several, and the bytes are still one
    zlib stream (files' readers before the pieces read them whole)."""
    from jaxjpeg import threads

    values, packed, pieces = _in_pieces()
    assert packed == layout.deflate_planes(values)
    assert pieces.bytes == layout.PIECE_BYTES and len(pieces.starts) == 6
    planes = values.view(np.uint8).reshape(-1, 2).T.tobytes()
    assert zlib.decompress(packed) == planes
    for got in (layout.inflate_planes(packed, "<i2", values.size, pieces),
                layout.inflate_planes(packed, "<i2", values.size)):
        np.testing.assert_array_equal(got, values)
    monkeypatch.setattr(threads, "cores", lambda: 1)
    np.testing.assert_array_equal(layout.inflate_planes(packed, "<i2", values.size, pieces),
                                  values)
    assert layout.deflate_planes_in_pieces(values[:layout.PIECE_BYTES])[1] is None


def test_a_piece_inflates_only_into_its_own_writable_bytes():
    """Into C-contiguous bytes, or a byte plane of wider values (bytes a
    positive stride apart), returning their Adler-32; nothing else."""
    from jaxjpeg import _native

    data = np.arange(5000, dtype=np.uint8) % 7
    stream = _native.run_deflate(data, True)
    out = np.empty(data.size, np.uint8)
    assert _native.inflate_piece_into(stream, out, True) == zlib.adler32(data.tobytes())
    np.testing.assert_array_equal(out, data)
    values = np.zeros((data.size, 4), np.uint8)   # plane 2 of 4-byte values
    assert _native.inflate_piece_into(stream, values[:, 2], True) == zlib.adler32(data.tobytes())
    np.testing.assert_array_equal(values[:, 2], data)
    assert not values[:, [0, 1, 3]].any()
    read_only = np.empty(data.size, np.uint8)
    read_only.flags.writeable = False
    buffer = np.zeros(2 * len(stream) + data.size, np.uint8)
    buffer[:len(stream)] = np.frombuffer(stream, np.uint8)
    spread = np.zeros(4 * data.size + len(stream), np.uint8)   # data inside the plane's span
    spread[1:1 + len(stream)] = np.frombuffer(stream, np.uint8)
    for target, source, words in ((read_only, stream, "read-only|not writable"),
                                  (buffer[len(stream) // 2:][:data.size], buffer[:len(stream)],
                                   "overlaps"),
                                  (spread[::4][:data.size], spread[1:1 + len(stream)], "overlaps"),
                                  (out[::-1], stream, "positive stride"),
                                  (values.T[:, :2], stream, "contiguous"),
                                  (np.empty(data.size + 1, np.uint8), stream, "does not inflate")):
        with pytest.raises(ValueError, match=words):
            _native.inflate_piece_into(source, target, True)


def test_adler32s_combine_as_zlib_combines_them():
    rng = np.random.default_rng(0)
    for size in (0, 1, 5, 65_521, 65_522, 300_000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        for cut in {0, size // 3, size}:
            head, tail = data[:cut], data[cut:]
            assert layout.adler32_combine(zlib.adler32(head), zlib.adler32(tail),
                                          len(tail)) == zlib.adler32(data)


@pytest.mark.parametrize("record, words", [
    ([1, 2], "bad 'pieces'"), ({"bytes": 4}, "bad 'pieces'"),
    ({"bytes": 4, "starts": [2], "more": 1}, "bad 'pieces'"),
    ({"bytes": True, "starts": [2]}, "bad 'pieces'"), ({"bytes": 0, "starts": [2]}, "bad 'pieces'"),
    ({"bytes": 4, "starts": []}, "bad 'pieces'"), ({"bytes": 4, "starts": [2, 2]}, "bad 'pieces'"),
    ({"bytes": 4, "starts": [2, 1.5]}, "bad 'pieces'"), ({"bytes": 4, "starts": "2"}, "bad 'pieces'"),
])
def test_malformed_pieces_are_refused(record, words):
    with pytest.raises(ValueError, match=words):
        layout.Pieces.from_record(record)


def _shifted(pieces, k, by):
    starts = list(pieces.starts)
    starts[k] += by
    return layout.Pieces(pieces.bytes, tuple(starts))


@pytest.mark.parametrize("edit, words", [
    (lambda p, d: (layout.Pieces(p.bytes, p.starts[:-1]), d), "holds 5 pieces, expected 6"),
    (lambda p, d: (layout.Pieces(p.bytes // 2, p.starts), d), "holds 6 pieces, expected 10"),
    (lambda p, d: (layout.Pieces(p.bytes * 4, p.starts), d), "holds 6 pieces, expected 2"),
    (lambda p, d: (_shifted(p, 0, 1), d), "bad header or piece start"),
    (lambda p, d: (_shifted(p, 5, len(d)), d), "bad header or piece start"),
    (lambda p, d: (_shifted(p, 3, 1), d), "does not inflate|wrong size"),
    (lambda p, d: (_shifted(p, 3, -1), d), "does not inflate|wrong size"),
    (lambda p, d: (p, d[:1] + bytes([d[1] ^ 0x20]) + d[2:]), "bad header"),
    (lambda p, d: (p, d[:-1] + bytes([d[-1] ^ 1])), "bad checksum"),
    (lambda p, d: (p, d[:-4]), "does not inflate|wrong size|bad header"),
    # (found by review: a piece cut inside a block inflated, its values right)
    (lambda p, d: (layout.Pieces(p.bytes, (2, *(s + 1 for s in p.starts[1:]))),
                   d[:p.starts[1]] + b"\x00" + d[p.starts[1]:]), "does not inflate"),
    (lambda p, d: (p, d[:p.starts[4] - 6] + bytes([d[p.starts[4] - 6] ^ 0x10])
                   + d[p.starts[4] - 5:]), "does not inflate|wrong size|checksum"),
])
def test_hostile_pieces_are_refused(edit, words):
    values, packed, pieces = _in_pieces()
    pieces, packed = edit(pieces, packed)
    with pytest.raises(ValueError, match=words):
        layout.inflate_planes(packed, "<i2", values.size, pieces)


def test_pieces_are_refused_where_the_whole_stream_is():
    """Found by review: bit flips in a sync flush's empty stored block left
    a piece ending inside a block, which inflated piece by piece (the
    values right) where zlib refuses the whole stream."""
    values, packed, pieces = _in_pieces()
    for at in range(pieces.starts[1] - 6, pieces.starts[1]):
        for bit in range(8):
            edited = bytearray(packed)
            edited[at] ^= 1 << bit
            try:
                zlib.decompress(edited)
                whole = True
            except zlib.error:
                whole = False
            try:
                got = layout.inflate_planes(edited, "<i2", values.size, pieces)
            except ValueError:
                assert not whole, (at, bit)
                continue
            assert whole, (at, bit)
            np.testing.assert_array_equal(got, values)


@pytest.mark.parametrize("edit, words", [
    (lambda r: r.update(pieces={"bytes": 1}), "bad 'pieces'"),
    (lambda r: r.update(pieces={"bytes": r["pieces"]["bytes"], "starts": r["pieces"]["starts"][1:]}),
     "pieces, expected"),
    (lambda r: r.update(deflated=False), "'pieces' of a leaf not deflated"),
    (lambda r: r.update(pieces={"bytes": r["pieces"]["bytes"] // 2,
                                "starts": r["pieces"]["starts"]}), "pieces, expected"),
])
def test_a_leaf_deflated_in_pieces_restores_and_refuses_hostile_pieces(tmp_path, edit, words):
    codes = np.random.default_rng(0).integers(-8, 8, ((5 << 20) // 64, 64)).astype(np.int8)
    src = tmp_path / "s.jjpg"
    jaxjpeg.save(src, {"codes": codes})
    np.testing.assert_array_equal(np.asarray(jaxjpeg.restore(src)["codes"]), codes)
    with fmt.ContainerReader(src) as r:
        (record,) = r.metadata["leaves"]
    assert record["deflated"] and len(record["pieces"]["starts"]) == 3

    def hostile(meta):
        edit(meta["leaves"][0])
    assert_clear_error(rewrite(src, tmp_path / "h.jjpg", edit_meta=hostile), words)


def test_repeats_are_counted_past_runs_and_within_the_window():
    """The matcher the planes are judged by (xla_ops/repeats.h) counts
    copies 2 to 32,768 bytes back, not runs of one byte (Z_RLE codes them),
    matches of 4-7 bytes apart from longer ones."""
    from jaxjpeg import _native

    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    assert _native.repeats(noise) == ((0, 0), (0, 0))
    assert _native.repeats(np.zeros(1 << 20, np.uint8)) == ((0, 0), (0, 0))
    for period, counted in ((2, True), (32_000, True), (32_768, True), (40_000, False)):
        data = np.tile(rng.integers(0, 256, period, dtype=np.uint8), 200_000 // period + 2)
        (short, shorts), (long, longs) = _native.repeats(data)
        assert (long > 0.9 * (data.size - period)) == counted, period
        assert long + short <= data.size and 8 * longs <= long and 4 * shorts <= short
    motifs = rng.integers(0, 256, (64, 5), dtype=np.uint8)[rng.integers(0, 64, 50_000)]
    (short, shorts), (long, longs) = _native.repeats(motifs.reshape(-1))
    assert short > 0.5 * motifs.size and long < 0.2 * motifs.size
    assert _native.repeats(np.arange(3, dtype=np.uint8)) == ((0, 0), (0, 0))
    with pytest.raises(ValueError, match="contiguous"):
        _native.repeats(noise[::2])


def test_skewed_planes_count_short_repeats_on_a_piece():
    """Skewed bytes (4-bit codes held in int8, a float's exponent plane)
    repeat 4-7 bytes by chance all over: their short matches are counted on
    the trial's piece, their long ones over the whole plane (layout.
    _CHANCE_SHARE). Short motifs that pay are still matched (200 motifs of
    5 codes: the dependence of a byte on the one before, 0.02, once gated
    this, and their planes were run-coded at 1.25x level 6's bytes), and so
    are copied stretches."""
    from jaxjpeg import _native

    rng = np.random.default_rng(6)
    codes = rng.integers(-8, 8, 1 << 20).astype(np.int8).view(np.uint8)
    (short, shorts), _ = _native.repeats(codes)
    assert short > 0.4 * codes.size   # chance repeats, by the full count
    assert _native.repeats(codes, long_only=True)[0] == (0, 0)
    run = _native.run_deflated_size(codes, False)
    assert not layout._repeats_pay(codes, run)

    motifs = rng.integers(0, 12, (200, 5)).astype(np.int8)
    copied = codes.copy()   # every other 20,000 bytes repeat the 20,000 before
    for at in range(20_000, copied.size - 20_000, 40_000):
        copied[at:at + 20_000] = copied[at - 20_000:at]
    (long_bytes, longs) = _native.repeats(copied, long_only=True)[1]
    assert long_bytes > 0.4 * copied.size and 8 * longs <= long_bytes
    for values in (motifs[rng.integers(0, 200, 1 << 18)].reshape(-1), copied.view(np.int8)):
        plane = values.view(np.uint8)
        assert layout._repeats_pay(plane, _native.run_deflated_size(plane, False))
        data = layout.deflate_planes(values)
        assert len(data) <= 1.002 * len(_planes_at_level(values)) + 32
        np.testing.assert_array_equal(layout.inflate_planes(data, values.dtype, values.size),
                                      values)


@pytest.mark.parametrize("kind", ["smooth", "random"])
def test_inflating_planes_peaks_near_the_values_size(kind):
    """Found by review: a deflated raw leaf of 320 MB peaked at ~3.3x its
    size on restore (inflated whole, then transposed); inflated a piece at a
    time from the whole input, each call copied the input it left unread
    (2.7x, and time quadratic in the size: review)."""
    values = (np.arange(8_000_000, dtype="<u4") // 1000 if kind == "smooth"   # deflates ~100x
              else np.random.default_rng(0).integers(0, 2**32, 8_000_000, dtype="<u4"))
    data = layout.deflate_planes(values)
    tracemalloc.start()
    try:
        restored = layout.inflate_planes(data, "<u4", values.size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(restored, values)
    assert peak < 1.25 * values.nbytes, peak / values.nbytes
    for cut in (1, len(data) // 2):   # streams that end early, or carry bytes after their end
        with pytest.raises(ValueError, match="wrong size"):
            layout.inflate_planes(data[:-cut], "<u4", values.size)
    with pytest.raises(ValueError, match="wrong size"):
        layout.inflate_planes(data + b"x", "<u4", values.size)


def test_inflating_planes_never_inflates_past_the_count():
    bomb = zlib.compress(bytes(2**26))   # 64 MiB of zeros in ~65 KB
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="wrong size"):
            layout.inflate_planes(bomb, "<u2", 10)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


def test_maps_with_one_scale_are_stored_once_and_deflated(tiled):
    """Issue 8 (all-in size): [2, rows] float16 maps were 3.7% of
    EfficientNet-lite1 at 8x, yet every row had the same scale."""
    with ckr.Checkpoint(tiled) as c:
        leaf = c.leaves[1]
        assert leaf.affine_layout == layout.SHARED_SCALE
        rows = leaf.matrix_shape[0]
        assert len(c.reader.read_blob(layout.affine_blob(1))) < 2 * rows
        scale, offset = c.read_affine(leaf)
        assert scale.shape == offset.shape == (rows,) and np.all(scale == scale[0])
        assert len(np.unique(offset)) > 1


def test_maps_of_older_files_still_restore(tiled, tmp_path):
    with ckr.Checkpoint(tiled) as c:
        scale, offset = c.read_affine(c.leaves[1])
    maps = np.stack([scale, offset]).astype(np.float16)
    assert np.array_equal(maps.astype(np.float32), np.stack([scale, offset]))

    def as_rows(meta):
        del jpeg_leaf(meta)["affine_layout"]
    old = rewrite(tiled, tmp_path / "old.jjpg", edit_meta=as_rows,
                  edit_blobs=lambda b: b.update({"leaf1/affine": maps.tobytes()}))
    np.testing.assert_array_equal(jaxjpeg.restore(old)["w"], jaxjpeg.restore(tiled)["w"])


def test_an_unknown_affine_layout_is_refused(tiled, tmp_path):
    edit = set_in(jpeg_leaf, "affine_layout", "zstd-shared-scale")
    assert_clear_error(rewrite(tiled, tmp_path / "bad.jjpg", edit_meta=edit), "affine layout")


def test_significands_round_to_nearest_and_never_to_infinity():
    from jaxjpeg.checkpoint import _round_significand

    rng = np.random.default_rng(6)
    words = np.concatenate([rng.integers(0, 2**32, 200000, dtype=np.uint64),
                            [0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0x7FC00000, 0, 1, 0x3F800000]])
    values = words.astype(np.uint32).view(np.float32)
    rounded = _round_significand(values, 8)
    finite = np.isfinite(values)
    assert np.array_equal(np.isfinite(rounded), finite)
    assert np.array_equal(np.isnan(rounded), np.isnan(values))
    assert np.all(rounded.view(np.uint32)[finite] & (2**15 - 1) == 0)   # 15 low bits dropped
    # within half a unit of the 8th significand bit, and no sign flips
    exact, got = values[finite].astype(np.float64), rounded[finite].astype(np.float64)
    normal = np.abs(exact) >= 2.0 ** -126
    unit = 2.0 ** (np.floor(np.log2(np.abs(exact[normal]))) - 8)   # of 8 stored bits
    largest = np.abs(exact[normal]) >= 2.0 ** 127 * (2 - 2.0 ** -9)  # round down instead
    assert np.all(np.abs(got[normal] - exact[normal]) <= np.where(largest, 1, 0.5) * unit)
    assert np.all(got * exact >= 0)


def test_deflated_float16_leaves_refuse_a_short_stream(tmp_path):
    tree = {"k": np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32),
            "b": np.linspace(0.5, 1.5, 200).astype(np.float32)}
    path = tmp_path / "h.jjpg"
    jaxjpeg.save(path, tree, target_ratio=6, progress=False)
    with ckr.Checkpoint(path) as c:
        leaf = next(l for l in c.leaves if l.path == "b")
        assert leaf.deflated
    index = leaf.index
    short = rewrite(path, tmp_path / "short.jjpg", edit_blobs=lambda b: b.update({
        f"leaf{index}/raw": layout.deflate_planes(np.ones(199, "<f2"))}))
    assert_clear_error(short, "inflates to the wrong size")
    bad = rewrite(path, tmp_path / "bad.jjpg",
                  edit_meta=set_in(lambda m: m["leaves"][index], "deflated", "yes"))
    assert_clear_error(bad, "bad 'deflated'")


def test_verify_checks_side_lists_as_restore_does(tmp_path, capsys):
    """Found by review: a side list whose positions repeat passed verify
    (exit 0) while restore refused the file."""
    from jaxjpeg import cli, layout
    x = (0.05 * np.random.default_rng(4).standard_normal((128, 256))).astype(np.float32)
    x[1, 2], x[7, 9] = 40.0, -40.0
    src = tmp_path / "s.jjpg"
    jaxjpeg.save(src, {"w": x})

    def repeat_first(blobs):
        name = layout.outliers_blob(0)
        count = 2
        index = np.frombuffer(blobs[name][:4 * count], np.uint32).copy()
        index[1] = index[0]
        blobs[name] = index.tobytes() + blobs[name][4 * count:]

    bad = rewrite(src, tmp_path / "bad.jjpg", edit_blobs=repeat_first)
    with pytest.raises(fmt.FormatError, match="outlier positions"):
        jaxjpeg.restore(bad)
    assert cli.main(["verify", str(bad)]) == 1
    assert "outlier positions" in capsys.readouterr().out


def test_decode_errors_name_the_leaf_and_tile(corrupt_stream, tmp_path):
    """Found by review: a damaged interval was named by its number in the
    decode plan (12 from restore, 0 from get for the same damage), and not
    its leaf or tile; now every restore path names the tile's own interval."""
    want = rf"restart interval 1 of w tile 1 in {re.escape(str(corrupt_stream))}"
    with pytest.raises(jaxjpeg.JpegError, match=want):
        jaxjpeg.restore(corrupt_stream)
    with jaxjpeg.open(corrupt_stream) as f:
        with pytest.raises(jaxjpeg.JpegError, match=want):
            f.get("w")
        with pytest.raises(jaxjpeg.JpegError, match=want):
            f.get_slice("w")[:, 40:]
    with pytest.raises(jaxjpeg.JpegError, match=want):   # an eager decode of a loaded tree
        jaxjpeg.decode(jaxjpeg.load(corrupt_stream))


def test_a_failure_status_is_named_once_whatever_its_interval(tmp_path):
    """Found by review: where a decode returns a failure status (the CUDA
    path), check_status named it and jpeg_errors named it again, matching
    "interval 12 of ..." as "1": two labels, the first of the wrong tile."""
    from jaxjpeg import checkpoint_restore

    path = tmp_path / "r.jjpg"
    jaxjpeg.save(path, {"w": np.random.default_rng(0).normal(size=(128, 160)).astype(np.float32)},
                 tile_shape=(64, 80), restart_interval=4, quality=90)
    labels = jaxjpeg.load(path)["w"].labels
    status = np.array([_native.pack_plan_status(52, 1)], np.int32)   # tile 2's interval 12
    with pytest.raises(jaxjpeg.JpegError) as caught:
        checkpoint_restore._check(status, labels)
    assert str(caught.value).count(" of ") == 1, caught.value
    assert f"restart interval 12 of w tile 2 in {path}:" in str(caught.value), caught.value


def test_a_damaged_blob_is_named_by_its_leaf(tiled, tmp_path):
    """Found by review: a flipped byte in a tile was "blob 'leaf1/tile2.jpg'
    checksum mismatch", naming no leaf a user knows; every reader now says
    the leaf and which part of it."""
    damaged = tmp_path / "d.jjpg"
    data = bytearray(tiled.read_bytes())
    with fmt.ContainerReader(tiled) as r:
        tile = r.blob_info("leaf1/tile2.jpg")
        raw = r.blob_info("leaf0/raw")
    data[tile.offset + tile.length // 2] ^= 0xFF
    data[raw.offset] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(fmt.FormatError, match=r"w tile 2: .*checksum mismatch"):
        jaxjpeg.restore(damaged, paths=["w"])
    with pytest.raises(fmt.FormatError, match=r"b its values: .*checksum mismatch"):
        jaxjpeg.restore(damaged, paths=["b"])
    with jaxjpeg.open(damaged) as f, pytest.raises(fmt.FormatError, match="w tile 2"):
        f.get("w")
    import contextlib
    import io
    from jaxjpeg.cli import main   # (review: verify and extract still named blobs)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["verify", str(damaged)]) == 1
    assert "BAD w: blob leaf1/tile2.jpg: checksum mismatch" in out.getvalue(), out.getvalue()
    assert "BAD b: blob leaf0/raw: checksum mismatch" in out.getvalue(), out.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["extract", str(damaged), str(tmp_path / "tiles")]) == 1
    assert "w tile 2: " in err.getvalue(), err.getvalue()


def test_a_tile_whose_header_is_not_its_records_names_its_leaf(tmp_path):
    """Found by review: a tile whose frame header was edited (checksums
    recomputed) failed restore with "tile header says ..." naming no leaf,
    tile or file (decode failures name them)."""
    src = tmp_path / "s.jjpg"
    rng = np.random.default_rng(0)
    jaxjpeg.save(src, {"a": rng.normal(size=(32, 144)).astype(np.float32),
                       "b": rng.normal(size=(64, 96)).astype(np.float32)})

    def edit(blobs):   # the SOF0 frame's height: 8 rows fewer
        tile = blobs["leaf1/tile0.jpg"]
        sof = tile.index(b"\xff\xc0")
        height = int.from_bytes(tile[sof + 5:sof + 7], "big")
        blobs["leaf1/tile0.jpg"] = (tile[:sof + 5] + (height - 8).to_bytes(2, "big")
                                    + tile[sof + 7:])
    bad = rewrite(src, tmp_path / "bad.jjpg", edit_blobs=edit)
    with pytest.raises(jaxjpeg.JpegError, match=r"^b tile 0 in .*bad\.jjpg: tile header says"):
        jaxjpeg.restore(bad)
    with jaxjpeg.open(bad) as f, pytest.raises(jaxjpeg.JpegError, match=r"^b tile 0 in "):
        f.get("b")
