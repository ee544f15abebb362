"""Tests of the container format (jaxjpeg/format.py, spec in docs/format.md)."""

import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxjpeg import format as fmt
from jaxjpeg.format import ContainerReader, ContainerWriter, FormatError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PREAMBLE = struct.Struct("<8sIIQQI24sI")  # written out here, independently of format.py


def reference_crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def write_small(path, metadata=None) -> dict:
    blobs = {"weights": np.arange(24, dtype=np.float32).reshape(4, 6).tobytes(),
             "": b"", "tile/0.jpg": b"\xff\xd8" + bytes(range(70)) + b"\xff\xd9", "x": b"z"}
    with ContainerWriter(path, metadata or {"tree": ["a", {"b": 1}], "name": "smäll"}) as w:
        for name, data in blobs.items():
            w.add_blob(name, data)
    return blobs


def build_raw(path, header, *, payload=b"", version=1, flags=0, reserved=bytes(24),
              header_offset=None, header_length=None, header_crc=None, trailing=b""):
    """Writes a container byte by byte from the spec, with valid checksums unless overridden."""
    if not isinstance(header, bytes):
        header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    start = 64 + len(payload) + (-len(payload) % 64)
    offset = start if header_offset is None else header_offset
    length = len(header) if header_length is None else header_length
    crc = fmt.crc32c(header) if header_crc is None else header_crc
    body = PREAMBLE.pack(b"\x89JAXJPG\n", version, flags, offset, length, crc, reserved, 0)[:60]
    data = body + struct.pack("<I", fmt.crc32c(body)) + payload
    data += bytes(start - len(data)) + header + trailing
    pathlib.Path(path).write_bytes(data)


def header_with(blobs, metadata=None) -> dict:
    return {"blobs": blobs, "metadata": metadata or {}}


def expect_format_error(path, match=None, **kwargs):
    with pytest.raises(FormatError, match=match) as info:
        with ContainerReader(path, **kwargs) as reader:
            for name in reader.blob_names:
                reader.read_blob(name)
    assert str(path) in str(info.value)
    return info.value


def temp_files(path):
    return sorted(pathlib.Path(path).parent.glob(pathlib.Path(path).name + ".tmp-*"))


# ----------------------------------------------------------------------------- crc32c


def test_crc32c_known_vectors():
    crc = fmt.crc32c
    assert crc(b"123456789") == 0xE3069283
    assert crc(b"") == 0
    assert crc(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc(b"\xff" * 32) == 0x62A8AB43
    assert crc(bytes(range(32))) == 0x46DD794E
    assert crc(b"", 0x1234) == 0x1234


@pytest.mark.parametrize("size", [1, 7, 8, 255, 256, 511, 512, 4097, 70001])
def test_crc32c_matches_bitwise_reference_and_chains(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert fmt.crc32c(data, 0xDEADBEEF) == reference_crc32c(data, 0xDEADBEEF)
    for start in range(min(9, size)):  # every alignment of the 8-byte steps
        assert fmt.crc32c(data[start:], 7) == reference_crc32c(data[start:], 7)
    cut = size // 3
    assert fmt.crc32c(data[cut:], fmt.crc32c(data[:cut])) == fmt.crc32c(data)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_many_blobs_and_arrays(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((33, 17)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "i8": rng.integers(-128, 128, (3, 4, 5), dtype=np.int8),
        "bool": rng.integers(0, 2, 9).astype(bool),
        "scalar": np.array(3.5, np.float64),
        "empty_array": np.zeros((0, 4), np.float32),
    }
    raw = {f"blob {i} \N{SNOWMAN}": rng.integers(0, 256, n, dtype=np.uint8).tobytes()
           for i, n in enumerate([0, 1, 63, 64, 65, 127, 128, 1000, 0, 4096, 5])}
    raw.update({"": b"", "a/b\\c\"d\x00": b"name with odd characters"})
    metadata = {"tree": {"layers": [{"w": [4, 8]}, None, True]}, "ünï": "cödé", "pi": 3.25}
    path = tmp_path / "ckpt.jjc"
    with ContainerWriter(path) as w:
        for name, data in raw.items():
            w.add_blob(name, memoryview(data) if len(data) % 2 else data)
        for name, array in arrays.items():
            w.add_blob(name, array)
        w.set_metadata(metadata)  # after the blobs: the header is written at close
    assert temp_files(path) == []
    with ContainerReader(path) as reader:
        assert reader.metadata == metadata
        assert reader.blob_names == tuple(raw) + tuple(arrays)
        for name, data in raw.items():
            assert reader.read_blob(name) == data
        for name, array in arrays.items():
            restored = np.frombuffer(reader.read_blob(name), array.dtype).reshape(array.shape)
            np.testing.assert_array_equal(restored, array)
        infos = [reader.blob_info(name) for name in reader.blob_names]
        assert all(info.offset % (64 if info.length >= 4096 else 8) == 0 for info in infos)
        assert reader.verify() == [(name, True) for name in reader.blob_names]


def test_a_blob_given_as_pieces_is_written_as_their_join(tmp_path):
    """A coder's parts (fmt.BlobParts) are written back to back, never joined:
    the same file as the joined bytes, in a container and in a distributed
    save's region alike."""
    from jaxjpeg import distributed_save

    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (0, 1, 4095, 70000, 3)]
    pieces = fmt.BlobParts(parts[:-1]) + parts[-1]
    joined = b"".join(parts)
    assert len(pieces) == len(joined) and bytes(pieces) == joined
    assert fmt.contiguous(pieces) == joined and fmt.contiguous(joined) is joined
    files = []
    for blob in (pieces, joined):
        files.append(tmp_path / f"{len(files)}.jjc")
        with ContainerWriter(files[-1]) as w:
            w.add_blob("head", b"12345")
            w.add_blob("coded", blob)
            w.add_blob("tail", b"6")
    assert files[0].read_bytes() == files[1].read_bytes()
    with ContainerReader(files[0]) as reader:
        assert reader.read_blob("coded") == joined
    stored = [([("head", b"12345"), ("coded", blob), ("tail", b"6")], None, None, None)
              for blob in (pieces, joined)]
    regions = [distributed_save._region([one]) for one in stored]
    assert regions[0][1:] == regions[1][1:]   # the blob table and the region's size

    def written(placed, size):
        out = bytearray(size)
        for offset, view in placed:
            out[offset:offset + len(view)] = view
        return bytes(out)

    assert written(regions[0][0], regions[0][2]) == written(regions[1][0], regions[1][2])


def test_read_blob_into_aligned_buffer_reads_only_its_range(tmp_path, monkeypatch):
    path = tmp_path / "c"
    blobs = write_small(path)
    with ContainerReader(path) as reader:
        requested = []
        real_preadv = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: requested.append(
            (off, sum(len(b) for b in bufs))) or real_preadv(fd, bufs, off))
        out = np.empty(len(blobs["tile/0.jpg"]), np.uint8)
        reader.read_blob("tile/0.jpg", out=out)
        info = reader.blob_info("tile/0.jpg")
        assert requested == [(info.offset, info.length)]
        assert out.tobytes() == blobs["tile/0.jpg"]


def test_metadata_is_copied_when_set(tmp_path):
    metadata = {"shapes": [[1, 2]]}
    with ContainerWriter(tmp_path / "c", metadata) as w:
        metadata["shapes"].append([3])
    with ContainerReader(tmp_path / "c") as reader:
        assert reader.metadata == {"shapes": [[1, 2]]}


def test_read_range_is_bounded_to_the_file(tmp_path):
    path = tmp_path / "c"
    write_small(path)
    size = path.stat().st_size
    with ContainerReader(path) as reader:
        assert reader.read_range(0, 8) == b"\x89JAXJPG\n"
        assert reader.read_range(size, 0) == b""
        assert reader.read_range(np.int64(1), 3) == b"JAX"
        for offset, length in [(size - 1, 2), (-1, 1), (0, -1), (2**63, 2**63)]:
            with pytest.raises(ValueError):
                reader.read_range(offset, length)
    with pytest.raises(ValueError, match="closed"):
        reader.read_blob("x")


@pytest.mark.parametrize("bad_call, error", [
    (lambda w: w.add_blob("x", b"2"), ValueError),  # duplicate of the first "x"
    (lambda w: w.add_blob(3, b""), TypeError),
    (lambda w: w.add_blob("\ud800", b""), UnicodeEncodeError),
    (lambda w: w.add_blob("t", np.zeros((4, 4))[:, ::2]), ValueError),
    (lambda w: w.add_blob("o", np.array([object()])), TypeError),
    (lambda w: w.set_metadata({"v": float("nan")}), ValueError),
    (lambda w: w.set_metadata([1]), TypeError),
])
def test_writer_rejects_bad_input_and_leaves_nothing(tmp_path, bad_call, error):
    path = tmp_path / "c"
    with pytest.raises(error):
        with ContainerWriter(path) as w:
            w.add_blob("x", b"1")
            bad_call(w)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- atomicity


def test_exception_inside_with_keeps_previous_file(tmp_path):
    path = tmp_path / "c"
    blobs = write_small(path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with ContainerWriter(path, {"new": 1}) as w:
            w.add_blob("big", np.ones(2**20, np.uint8))
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert temp_files(path) == []
    with ContainerReader(path) as reader:
        assert reader.read_blob("x") == blobs["x"]


def test_successful_write_replaces_previous_file(tmp_path):
    path = tmp_path / "c"
    write_small(path)
    with ContainerWriter(path, {"generation": 2}) as w:
        w.add_blob("only", b"new")
    with ContainerReader(path) as reader:
        assert reader.metadata == {"generation": 2} and reader.blob_names == ("only",)
    assert temp_files(path) == []


KILLED_WRITER = r"""
import os, signal, sys
import numpy as np
from jaxjpeg.format import ContainerWriter

path, mode = sys.argv[1], sys.argv[2]
real_replace = os.replace
def replace_then_die(src, dst):
    if mode == "after_rename":
        real_replace(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
block = np.full(8 * 2**20, 7, np.uint8)
with ContainerWriter(path, {"generation": 2}) as w:
    for i in range(4 if mode != "during_blobs" else 10**6):
        w.add_blob(f"block{i}", block)
        if i == 3:
            print("writing", flush=True)
"""


@pytest.mark.parametrize("mode", ["during_blobs", "before_rename", "after_rename"])
def test_sigkilled_writer_leaves_old_or_new_file_never_half(tmp_path, mode):
    path = tmp_path / "c"
    old_blobs = write_small(path, {"generation": 1})
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), mode],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n"
    if mode == "during_blobs":
        child.kill()
    assert child.wait(timeout=60) == -signal.SIGKILL
    child.stdout.close()
    with ContainerReader(path) as reader:
        if mode == "after_rename":
            assert reader.metadata == {"generation": 2}
            assert all(ok for _, ok in reader.verify()) and len(reader.blob_names) == 4
        else:
            assert reader.metadata == {"generation": 1}
            assert {n: bytes(reader.read_blob(n)) for n in reader.blob_names} == old_blobs
    assert len(temp_files(path)) == (0 if mode == "after_rename" else 1)


# ----------------------------------------------------------------------------- damage


def metadata_region(path) -> list[int]:
    """Byte positions of the preamble and the header (everything but the payload)."""
    with ContainerReader(path) as reader:
        header_offset = struct.unpack_from("<Q", reader.read_range(16, 8))[0]
    return list(range(64)) + list(range(header_offset, path.stat().st_size))


@pytest.mark.parametrize("change", [lambda b: b ^ 0xFF, lambda b: (b + 1) & 0xFF],
                         ids=["xor", "plus1"])
def test_every_preamble_and_header_byte_change_is_refused(tmp_path, change):
    path = tmp_path / "c"
    write_small(path)
    original = path.read_bytes()
    positions = metadata_region(path)
    assert len(positions) > 200
    for position in positions:
        damaged = bytearray(original)
        damaged[position] = change(damaged[position])
        path.write_bytes(damaged)
        expect_format_error(path)


@pytest.mark.parametrize("change", [lambda b: b ^ 0xFF, lambda b: (b + 1) & 0xFF],
                         ids=["xor", "plus1"])
def test_every_blob_byte_change_is_caught_on_read(tmp_path, change):
    path = tmp_path / "c"
    write_small(path)
    original = path.read_bytes()
    with ContainerReader(path) as reader:
        infos = {name: reader.blob_info(name) for name in reader.blob_names}
    for name, info in infos.items():
        for position in range(info.offset, info.offset + info.length):
            damaged = bytearray(original)
            damaged[position] = change(damaged[position])
            path.write_bytes(damaged)
            with ContainerReader(path) as reader:
                with pytest.raises(FormatError, match="checksum mismatch"):
                    reader.read_blob(name)
                assert reader.read_blob(name, verify=False)[position - info.offset] != \
                    original[position]
                assert [n for n, ok in reader.verify() if not ok] == [name]


def test_every_truncation_and_any_appended_byte_are_refused(tmp_path):
    path = tmp_path / "c"
    write_small(path)
    original = path.read_bytes()
    for size in range(len(original)):
        path.write_bytes(original[:size])
        expect_format_error(path)
    path.write_bytes(original + b"\0")
    expect_format_error(path, match="after the header")


def test_verify_header_false_skips_only_the_header_checksum(tmp_path):
    path = tmp_path / "c"
    write_small(path, {"name": "aaaa"})
    data = path.read_bytes()
    _, _, flags, offset, _, crc, _, _ = PREAMBLE.unpack(data[:64])
    header = zlib.compress(zlib.decompress(data[offset:]).replace(b'"aaaa"', b'"bbbb"'))
    body = PREAMBLE.pack(b"\x89JAXJPG\n", fmt.FORMAT_VERSION, flags, offset, len(header), crc, bytes(24), 0)[:60]
    path.write_bytes(body + struct.pack("<I", fmt.crc32c(body)) + data[64:offset] + header)
    expect_format_error(path, match="header checksum")
    with ContainerReader(path, verify_header=False) as reader:
        assert reader.metadata == {"name": "bbbb"}



def as_version(path, version):
    """Rewrites a container the way ``version`` (1 or 2) stored it: every blob
    at a multiple of 64; version 1's header as plain JSON."""
    data = path.read_bytes()
    _, stored, flags, offset, _, _, _, _ = PREAMBLE.unpack(data[:64])
    assert (stored, flags) == (3, fmt.FLAG_DEFLATED_HEADER)
    header = json.loads(zlib.decompress(data[offset:]))
    payload = b""
    for name, entry in sorted(header["blobs"].items(), key=lambda kv: kv[1]["offset"]):
        payload += bytes(-len(payload) % 64)
        blob = data[entry["offset"]:entry["offset"] + entry["length"]]
        entry["offset"] = 64 + len(payload)
        payload += blob
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if version == 1:
        build_raw(path, text, payload=payload, version=1)
    else:
        build_raw(path, zlib.compress(text), payload=payload, version=2,
                  flags=fmt.FLAG_DEFLATED_HEADER)


def test_version_2_files_still_read(tmp_path):
    path = tmp_path / "c"
    blobs = write_small(path, {"name": "v2"})
    as_version(path, 2)
    with ContainerReader(path) as reader:
        assert reader.version == 2 and reader.metadata == {"name": "v2"}
        assert {n: bytes(reader.read_blob(n)) for n in reader.blob_names} == blobs
        assert [n for n, ok in reader.verify() if not ok] == []


def test_small_blobs_are_packed_and_large_ones_stay_64_aligned(tmp_path):
    """Defect (issue 8, all-in size): every blob started at a multiple of 64;
    the hundreds of small blobs of a CNN (BatchNorm vectors, row maps,
    interval indexes) left 16 KB of padding in EfficientNet-lite1 at 8x
    (0.6% of the file). Version 3 packs blobs under 4 KiB at multiples of 8."""
    path = tmp_path / "c"
    sizes = [3, 100, 4095, 4096, 5, 10000, 1]
    with ContainerWriter(path) as w:
        for i, n in enumerate(sizes):
            w.add_blob(f"b{i}", bytes([i + 1]) * n)
    with ContainerReader(path) as reader:
        assert reader.version == 3
        infos = [reader.blob_info(f"b{i}") for i in range(len(sizes))]
    offsets = [info.offset for info in infos]
    expected, position = [], 64
    for n in sizes:
        align = 64 if n >= 4096 else 8
        expected.append(-(-position // align) * align)
        position = expected[-1] + n
    assert offsets == expected
    padding = sum(b.offset - (a.offset + a.length) for a, b in zip(infos, infos[1:]))
    assert padding < 64 + 7 * len(sizes)


@pytest.mark.parametrize("version, offset, ok", [
    (3, 72, True), (3, 68, False), (2, 72, False), (2, 128, True), (1, 72, False)])
def test_blob_alignment_follows_the_files_version(tmp_path, version, offset, ok):
    """Version 3 readers take blobs at multiples of 8; a version 1 or 2 file
    (all blobs at multiples of 64) with an 8-aligned blob is refused."""
    piece = b"payload!"
    payload = bytes(offset - 64) + piece
    header = header_with({"a": {"offset": offset, "length": len(piece),
                                "crc32c": fmt.crc32c(piece)}})
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if version == 1:
        build_raw(tmp_path / "c", text, payload=payload, version=1)
    else:
        build_raw(tmp_path / "c", zlib.compress(text), payload=payload, version=version,
                  flags=fmt.FLAG_DEFLATED_HEADER)
    if ok:
        with ContainerReader(tmp_path / "c") as reader:
            assert bytes(reader.read_blob("a")) == piece
    else:
        expect_format_error(tmp_path / "c", match=f"not a multiple of {8 if version == 3 else 64}")


def test_version_1_files_still_read(tmp_path):
    path = tmp_path / "c"
    blobs = write_small(path, {"name": "old"})
    as_version(path, 1)
    with ContainerReader(path) as reader:
        assert reader.metadata == {"name": "old"}
        assert {n: bytes(reader.read_blob(n)) for n in reader.blob_names} == blobs
        assert [n for n, ok in reader.verify() if not ok] == []


def test_the_header_is_stored_deflated(tmp_path):
    """Defect (issue 8, all-in size): a header of a few hundred leaves' records
    was 76 KB of plain JSON, 2.8% of EfficientNet-lite1 at 8x."""
    path = tmp_path / "c"
    names = {f"params/block{i}/conv/kernel": b"w" * 100 for i in range(300)}
    with ContainerWriter(path, {"leaves": [{"path": n, "shape": [3, 3, 64, 64]} for n in names]}) as w:
        for name, data in names.items():
            w.add_blob(name, data)
    data = path.read_bytes()
    _, version, flags, offset, length, _, _, _ = PREAMBLE.unpack(data[:64])
    assert (version, flags) == (3, fmt.FLAG_DEFLATED_HEADER)
    assert length < len(zlib.decompress(data[offset:])) / 4


@pytest.mark.parametrize("header, kwargs, match", [
    (zlib.compress(b"{" * 5000), dict(max_header_bytes=4096), "inflates past the limit"),
    (zlib.compress(json.dumps(header_with({})).encode())[:-3], {}, "truncated"),
    (zlib.compress(json.dumps(header_with({})).encode()) + b"x", {}, "after its end"),
    (b"not a zlib stream", {}, "does not inflate"),
    (zlib.compress(b"[1, 2]"), {}, "keys"),
])
def test_hostile_deflated_headers_are_refused(tmp_path, header, kwargs, match):
    build_raw(tmp_path / "c", header, version=2, flags=fmt.FLAG_DEFLATED_HEADER)
    expect_format_error(tmp_path / "c", match=match, **kwargs)


def test_a_header_that_deflates_far_past_its_size_still_reads(tmp_path):
    """Found by review: with the inflation capped at 128x its deflated size
    (for a while in session 45), a 12,000-leaf tree of 4,000-character paths
    that earlier writers had written (deflated 180x) was refused."""
    metadata = {"names": ["layers/" * 240 + f"{i}" for i in range(30000)]}
    write_small(tmp_path / "c", metadata)
    data = (tmp_path / "c").read_bytes()
    _, _, flags, _, length, _, _, _ = PREAMBLE.unpack(data[:64])
    assert flags == fmt.FLAG_DEFLATED_HEADER and len(zlib.decompress(data[-length:])) > 200 * length
    with ContainerReader(tmp_path / "c") as reader:
        assert reader.metadata == metadata


def test_a_huge_header_limit_still_inflates(tmp_path):
    path = tmp_path / "c"
    write_small(path, {"name": "x"})
    with ContainerReader(path, max_header_bytes=2**64) as reader:
        assert reader.metadata == {"name": "x"}


def test_version_1_defines_no_flags(tmp_path):
    build_raw(tmp_path / "c", zlib.compress(json.dumps(header_with({})).encode()), version=1,
              flags=fmt.FLAG_DEFLATED_HEADER)
    expect_format_error(tmp_path / "c", match="unknown flags")

# ----------------------------------------------------------------------------- hostile files


def test_unknown_version_is_refused_with_both_versions_named(tmp_path):
    build_raw(tmp_path / "c", header_with({}), version=7)
    expect_format_error(tmp_path / "c", match=r"version 7.*reads versions 1, 2, 3")


def test_huge_header_length_allocates_nothing(tmp_path):
    path = tmp_path / "c"
    for length in [2**64 - 1, 2**40, 300 * 2**20]:
        build_raw(path, header_with({}), header_length=length)
        tracemalloc.start()
        try:
            expect_format_error(path, match="header length")
            expect_format_error(path, max_header_bytes=2**64, match="truncated")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20


def entry(offset=64, length=4, crc=None):
    return {"offset": offset, "length": length,
            "crc32c": fmt.crc32c(b"abcd"[:length] if isinstance(length, int) else b"")
            if crc is None else crc}


@pytest.mark.parametrize("blobs, match", [
    ({"a": entry(offset=2**62)}, "past the payload end"),
    ({"a": entry(length=2**62)}, "past the payload end"),
    ({"a": entry(length=65)}, "past the payload end"),  # runs into the header
    ({"a": entry(offset=0)}, "multiple of 64"),  # over the preamble
    ({"a": entry(offset=65, length=1)}, "multiple of 64"),
    ({"a": entry(offset=-64)}, "unsigned integers"),
    ({"a": entry(offset=64.0)}, "unsigned integers"),
    ({"a": entry(offset="64")}, "unsigned integers"),
    ({"a": entry(offset=None)}, "unsigned integers"),
    ({"a": entry(offset=True)}, "unsigned integers"),
    ({"a": entry(length=-1)}, "unsigned integers"),
    ({"a": entry(length=4.5)}, "unsigned integers"),
    ({"a": entry(crc=2**32)}, "unsigned integers"),
    ({"a": entry(crc=-1)}, "unsigned integers"),
    ({"a": entry(), "b": entry(offset=64, length=2)}, "overlap"),
    ({"a": {"offset": 64, "length": 4}}, "keys"),
    ({"a": dict(entry(), extra=1)}, "keys"),
    ({"a": [64, 4, 0]}, "keys"),
])
def test_hostile_blob_tables_are_refused(tmp_path, blobs, match):
    path = tmp_path / "c"
    build_raw(path, header_with(blobs), payload=b"abcd")
    expect_format_error(path, match=match)


@pytest.mark.parametrize("header, match", [
    (b'{"blobs":{"a":{"crc32c":0,"length":0,"offset":64},"a":{"crc32c":0,"length":0,'
     b'"offset":64}},"metadata":{}}', "duplicate key 'a'"),
    (b'{"blobs":{},"metadata":{"k":1,"k":2}}', "duplicate key 'k'"),
    (b'{"blobs":{},"metadata":{"v":NaN}}', "non-finite"),
    (b'{"blobs":{},"metadata":{"v":-Infinity}}', "non-finite"),
    # found by review: a number overflowing to inf was read back as inf
    (b'{"blobs":{},"metadata":{"v":1e999}}', "overflows"),
    (b'{"blobs":{},"metadata":{"v":-1.5e400}}', "overflows"),
    (b'{"blobs":{},"metadata":{"v":"\xff"}}', "not valid JSON"),
    (b'{"blobs":{},"metadata":{}', "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),
    (b'{"blobs":{},"metadata":{"n":' + b"9" * 5000 + b"}}", "not valid JSON"),
    (b"[]", "keys"),
    (b'{"blobs":{}}', "keys"),
    (b'{"blobs":{},"metadata":{},"more":1}', "keys"),
    (b'{"blobs":[],"metadata":{}}', "'blobs' must be an object"),
    (b'{"blobs":{},"metadata":[]}', "'metadata' must be an object"),
])
def test_hostile_header_json_is_refused(tmp_path, header, match):
    build_raw(tmp_path / "c", header)
    expect_format_error(tmp_path / "c", match=match)


@pytest.mark.parametrize("fields, match", [
    (dict(flags=1), "unknown flags"),
    (dict(reserved=b"\1" + bytes(23)), "reserved"),
    (dict(header_offset=0), "multiple of 64"),
    (dict(header_offset=96), "multiple of 64"),
    (dict(header_offset=2**63), "truncated"),
    (dict(header_offset=128), "truncated"),
    (dict(header_crc=0), "header checksum"),
    (dict(trailing=b"x" * 64), "after the header"),
])
def test_hostile_preamble_fields_are_refused(tmp_path, fields, match):
    build_raw(tmp_path / "c", header_with({}), **fields)
    expect_format_error(tmp_path / "c", match=match)


def test_not_a_container_is_refused(tmp_path):
    (tmp_path / "c").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    expect_format_error(tmp_path / "c", match="bad magic")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=8)


@st.composite
def blob_tables(draw):
    """(blob table, payload, valid): a table laid out correctly over the payload
    (aligned, disjoint, right checksums), then, half of the time, one entry
    damaged or replaced by arbitrary JSON."""
    pieces = draw(st.lists(st.binary(max_size=100), max_size=4))
    names = draw(st.lists(st.text(max_size=3), min_size=len(pieces), max_size=len(pieces),
                          unique=True))
    payload, table = b"", {}
    for name, piece in zip(names, pieces):
        payload += bytes(-len(payload) % 64)
        table[name] = {"offset": 64 + len(payload), "length": len(piece),
                       "crc32c": fmt.crc32c(piece)}
        payload += piece
    valid = not table or draw(st.booleans())
    if not valid:
        name = draw(st.sampled_from(sorted(table)))
        table[name] = draw(st.one_of(
            json_values,
            st.fixed_dictionaries({"offset": st.sampled_from([0, 64, 128, 65, -1, 2**64]),
                                   "length": st.integers(-1, 100),
                                   "crc32c": st.integers(-1, 2**32)})))
    return table, payload, valid


@settings(max_examples=300, deadline=None)
@given(case=blob_tables())
def test_arbitrary_headers_never_crash_the_reader(tmp_path_factory, case):
    """Valid tables open and read back every blob exactly; damaged ones raise
    FormatError (at open, or a checksum mismatch at read), nothing else."""
    table, payload, valid = case
    path = tmp_path_factory.mktemp("fuzz") / "c"
    build_raw(path, header_with(table), payload=payload)
    if valid:
        with ContainerReader(path) as reader:
            assert sorted(reader.blob_names) == sorted(table)
            for name, entry in table.items():
                start = entry["offset"] - 64
                assert bytes(reader.read_blob(name)) == payload[start:start + entry["length"]]
        return
    try:
        with ContainerReader(path) as reader:
            for name in reader.blob_names:
                info = reader.blob_info(name)
                assert info.offset % 64 == 0 and info.offset + info.length <= path.stat().st_size
                try:
                    assert len(reader.read_blob(name)) == info.length
                except FormatError as e:
                    assert "checksum mismatch" in str(e)
    except FormatError:
        pass


def test_failed_blob_write_abandons_the_save(tmp_path, monkeypatch):
    path = tmp_path / "c"
    writer = ContainerWriter(path)
    writer.add_blob("a", b"1")
    with pytest.raises(ValueError, match="duplicate"):  # refused before writing: still usable
        writer.add_blob("a", b"2")
    monkeypatch.setattr(fmt, "crc32c", lambda *args: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        writer.add_blob("b", b"2")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="closed"):
        writer.close()



# ----------------------------------------------------------------------------- issue 9


def build(path, blobs: dict):
    with ContainerWriter(path) as w:
        for name, data in blobs.items():
            w.add_blob(name, data)


def _header_file(path, header: bytes):
    """A container whose header is these bytes, checksums valid."""
    path.write_bytes(fmt._pack_preamble(64, len(header), fmt.crc32c(header)) + header)
    return path


def test_header_amplification_is_refused_before_parsing(tmp_path):
    """Defect 11: a 100 MB header of '{}' took 2.5 GB to parse (~6.5 GB at the
    256 MiB cap). This 20 MB one is schema-valid (the '{}' sit in metadata)
    and used to open; it is refused from a count of its bytes."""
    body = b",".join([b"{}"] * (10 * 2**20))
    path = _header_file(tmp_path / "amp", b'{"blobs":{},"metadata":{"x":[' + body + b"]}}")
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="JSON values"):
            ContainerReader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * path.stat().st_size, peak  # the header's bytes, not a parse of them


def test_header_token_limit_leaves_real_headers_alone(tmp_path):
    """A legitimate header well inside the limit still opens."""
    meta = {"x": [[i, i] for i in range(200000)]}
    with ContainerWriter(tmp_path / "ok") as w:
        w.set_metadata(meta)
    with ContainerReader(tmp_path / "ok") as r:
        assert len(r.metadata["x"]) == 200000


def test_save_through_a_symlink_replaces_the_file_not_the_link(tmp_path):
    """Defect 12: saving through a symlink replaced the link with a file."""
    real = tmp_path / "real" / "c"
    real.parent.mkdir()
    build(real, {"a": b"old"})
    link = tmp_path / "link"
    link.symlink_to(real)
    build(link, {"a": b"new"})
    assert link.is_symlink() and os.readlink(link) == str(real)
    with ContainerReader(real) as r:
        assert bytes(r.read_blob("a")) == b"new"
    assert sorted(os.listdir(real.parent)) == ["c"] and sorted(os.listdir(tmp_path)) == [
        "link", "real"]


def test_resave_keeps_the_file_mode(tmp_path):
    """Defect 12: re-saving a 0600 file left it 0644."""
    path = tmp_path / "c"
    build(path, {"a": b"1"})
    os.chmod(path, 0o600)
    build(path, {"a": b"2"})
    assert (path.stat().st_mode & 0o777) == 0o600
    os.chmod(path, 0o640)
    build(path, {"a": b"3"})
    assert (path.stat().st_mode & 0o777) == 0o640


def test_long_basenames_save(tmp_path):
    """Defect 12: a 250-character name failed: the '.tmp-<hex>' suffix made the
    temporary file's name longer than the file system allows."""
    path = tmp_path / ("n" * 250)
    build(path, {"a": b"1"})
    with ContainerReader(path) as r:
        assert bytes(r.read_blob("a")) == b"1"
    assert os.listdir(tmp_path) == ["n" * 250]


def test_missing_directory_error_names_the_users_path(tmp_path):
    """Defect 12: the error named the temporary file, not the path given."""
    path = tmp_path / "no" / "such" / "c"
    with pytest.raises(FileNotFoundError) as info:
        ContainerWriter(path)
    assert info.value.filename == str(path) and "tmp-" not in str(info.value)
    assert "does not exist" in str(info.value)


def test_a_parent_that_is_a_file_is_named_so(tmp_path):
    """Found by review: a parent that is a file was said not to exist."""
    (tmp_path / "m.npz").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is not a directory") as info:
        ContainerWriter(tmp_path / "m.npz" / "c")
    assert info.value.filename == str(tmp_path / "m.npz" / "c")


def test_save_into_a_directory_without_read_permission(tmp_path):
    """Defect 12: in a write-and-search-only directory the file was replaced
    and then save raised from the directory fsync. Root ignores permissions,
    so as root the child runs without the capabilities that bypass them."""
    import shutil
    directory = tmp_path / "noread"
    directory.mkdir()
    os.chmod(directory, 0o333)  # write + search, no read
    script = ("import sys; from jaxjpeg.format import ContainerWriter, ContainerReader\n"
              "p = sys.argv[1] + '/c'\n"
              "for v in (b'1', b'2'):\n"
              "    with ContainerWriter(p) as w: w.add_blob('a', v)\n"
              "print(bytes(ContainerReader(p).read_blob('a')).decode())\n")
    argv = [sys.executable, "-c", script, str(directory)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        argv = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", *argv]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == "2"
    finally:
        os.chmod(directory, 0o700)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    """Defect 12: a SIGKILLed save left '<name>.tmp-*' behind forever. The next
    save removes temp files no live writer holds (a live writer holds a lock
    on its own; young files are left alone)."""
    import fcntl
    path = tmp_path / "c"
    stale = tmp_path / "c.tmp-0123456789abcdef"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / "c.tmp-fedcba9876543210"
    live.write_bytes(b"being written")
    young = tmp_path / "c.tmp-00000000000000aa"
    young.write_bytes(b"just created")
    other = tmp_path / "d.tmp-0123456789abcdef"
    other.write_bytes(b"another file's")
    for p in (stale, live, other):
        os.utime(p, (1, 1))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        build(path, {"a": b"1"})
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == sorted(["c", live.name, young.name, other.name])


def test_read_blob_into_a_buffer_checks_the_checksum(tmp_path):
    """read_blob(out=...) is how restore reads tiles; it must verify like the
    plain read does (and verify=False must not)."""
    path = tmp_path / "c"
    build(path, {"a": bytes(range(200)), "b": b"x" * 100})
    with ContainerReader(path) as r:
        info = r.blob_info("a")
    data = bytearray(path.read_bytes())
    data[info.offset + 17] ^= 1
    path.write_bytes(data)
    with ContainerReader(path) as r:
        out = np.zeros(info.length, np.uint8)
        with pytest.raises(FormatError, match="checksum mismatch"):
            r.read_blob("a", out=out)
        r.read_blob("a", out=out, verify=False)
        assert out[17] == 17 ^ 1
        good = np.zeros(100, np.uint8)
        assert bytes(r.read_blob("b", out=good)) == b"x" * 100


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_reads_in_parallel_after_the_parent_did(tmp_path):
    """The shared read threads, once READ_CONCURRENCY of them existed in the
    parent, were counted in a forked child that has none: its first parallel
    read (a prefetch, a large blob in pieces) waited forever."""
    import threading
    import time

    path = tmp_path / "c.bin"
    rng = np.random.default_rng(0)
    blobs = {f"b{i}": rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes() for i in range(8)}
    with fmt.ContainerWriter(path, {"format": "test"}) as w:
        for name, data in blobs.items():
            w.add_blob(name, data)
    barrier = threading.Barrier(fmt.READ_CONCURRENCY + 1)
    started = [fmt._io_pool().submit(barrier.wait) for _ in range(fmt.READ_CONCURRENCY)]
    barrier.wait()
    [f.result() for f in started]   # the pool has all its threads
    pid = os.fork()
    if pid == 0:
        try:
            with fmt.ContainerReader(path) as r, r.prefetch(list(blobs)):
                ok = all(bytes(r.read_blob(n)) == d for n, d in blobs.items())
            os._exit(0 if ok else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's parallel read hung")


@pytest.mark.parametrize("metadata", [{1: 2}, {"a": {1.5: 0}}, {1: "a", "1": "b"},
                                      {"a": [{2: 3}]}])
def test_metadata_keys_that_are_not_strings_are_refused(tmp_path, metadata):
    """Found by review: json wrote {1: 2} as {"1": 2} (read back changed) and
    mixed keys failed json's sort with an unrelated TypeError."""
    with pytest.raises(TypeError, match="keys must be str"):
        with fmt.ContainerWriter(tmp_path / "c", metadata=metadata):
            pass
    assert not os.listdir(tmp_path)


def _with_header_text(src, dst, edit_text):
    """A copy of ``src`` whose deflated header is ``edit_text`` of its ASCII
    JSON (escapes left as typed); checksums valid."""
    import struct
    data = open(src, "rb").read()
    offset, length = struct.unpack_from("<QQ", data, 16)
    text = json.dumps(json.loads(zlib.decompress(data[offset:offset + length])),
                      sort_keys=True, separators=(",", ":"))
    header = zlib.compress(edit_text(text).encode("ascii"), 6)
    preamble = fmt._pack_preamble(offset, len(header), fmt.crc32c(header),
                                  fmt.FLAG_DEFLATED_HEADER)
    open(dst, "wb").write(preamble + data[len(preamble):offset] + header)
    return dst


def test_a_header_with_a_lone_surrogate_is_refused(tmp_path, capsys):
    """Found by review: a leaf path escaping "\\ud800" (text UTF-8 cannot
    encode) restored, and inspect then died with a traceback; a surrogate
    pair (one character) is text and reads."""
    import jaxjpeg
    from jaxjpeg import cli
    src = tmp_path / "s.jjpg"
    jaxjpeg.save(src, {"w": np.arange(64, dtype=np.float32)})
    pair = _with_header_text(src, tmp_path / "p.jjpg",
                             lambda t: t.replace('"w"]', '"w\\ud83d\\ude00"]'))
    assert list(jaxjpeg.restore(pair)) == ["w\U0001F600"]
    lone = _with_header_text(src, tmp_path / "l.jjpg", lambda t: t.replace('"w"]', '"w\\ud800"]'))
    with pytest.raises(fmt.FormatError, match="lone UTF-16 surrogate"):
        jaxjpeg.restore(lone)
    assert cli.main(["inspect", str(lone)]) == cli.EXIT_DAMAGED
    err = capsys.readouterr().err
    assert err.startswith("jaxjpeg: error: ") and err.count("\n") == 1, err


def test_a_signal_as_the_temporary_file_appears_leaves_none(tmp_path, monkeypatch):
    """A flaky CLI test (SIGHUP just as the temporary file appeared) left it:
    a signal between its creation and the writer's knowing it is now held
    until the writer can remove the file."""
    real = fmt.create_temp_file

    def create_then_signal(*args):
        made = real(*args)
        os.kill(os.getpid(), signal.SIGINT)
        return made

    monkeypatch.setattr(fmt, "create_temp_file", create_then_signal)
    with pytest.raises(KeyboardInterrupt):
        fmt.ContainerWriter(tmp_path / "c.jjpg")
    assert not list(tmp_path.iterdir())
