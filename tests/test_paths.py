"""Leaf paths: one uniqueness rule for writer and reader, caps on depth and
length, and checks linear in the number and length of paths (issue 9,
defects 2, 3 and the ["key", 0] / ["index", 0] case of 13)."""

import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import checkpoint_reader as ckr
from jaxjpeg import format as fmt
from jaxjpeg import layout


def key(*names):
    return [["key", n] for n in names]


@pytest.mark.parametrize("paths, clash", [
    ([key("a"), key("b")], None),
    ([key("a", "b"), key("a", "c")], None),
    ([key("a"), key("a")], "a"),
    ([key("a"), key("a", "b")], "a/b"),
    ([key("a", "b"), key("a")], "a"),
    ([key("a/b"), key("a", "b")], "a/b"),          # collide once joined
    ([key("a/b"), key("a", "c")], None),           # "a/b" and "a/c" differ
    ([key(0), [["index", 0]]], "0"),               # one slot, two kinds
    ([[["key", 0], ["key", "x"]], [["index", 0], ["key", "y"]]], "0/y"),
    ([[["attr", "w"]], [["key", "w"], ["key", "z"]]], "w/z"),
    ([[], key("a")], "a"),                          # the empty path stands alone
    ([key("a"), []], ""),
    ([[]], None),
    ([key("ab"), key("a", "b")], None),             # prefixes count only at '/'
    # found by review: one Python dict key (True == 1), so restore kept one leaf
    ([key(True), key(1)], "1"),
    ([key(False), key(0, "x")], "0/x"),
    ([key(1), key("b")], "b"),                      # int and str keys: jax cannot sort them
    ([key(0), key(1), key(2)], None),
    ([[["index", 0]], [["index", 1]]], None),
])
def test_path_rule(paths, clash):
    assert layout.path_clash(paths) == clash


def test_save_refuses_key_and_kind_clashes_before_writing(tmp_path):
    path = tmp_path / "c.jjpg"
    with pytest.raises(ValueError, match="collides"):
        jaxjpeg.save(path, {"a/b": np.zeros(2), "a": {"b": np.ones(2)}})
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_too_deep_and_too_long_paths(tmp_path):
    deep = np.zeros(2)
    for _ in range(layout.MAX_PATH_DEPTH + 1):
        deep = {"k": deep}
    with pytest.raises(ValueError, match="keys deep"):
        jaxjpeg.save(tmp_path / "deep.jjpg", deep)
    with pytest.raises(ValueError, match="characters long"):
        jaxjpeg.save(tmp_path / "long.jjpg", {"x" * (layout.MAX_PATH_CHARS + 1): np.zeros(2)})
    very_deep = np.zeros(2)
    for _ in range(1500):  # past Python's recursion limit: a clear error, not RecursionError
        very_deep = {"k": very_deep}
    with pytest.raises(ValueError, match="nested too deeply"):
        jaxjpeg.save(tmp_path / "deeper.jjpg", very_deep)
    assert list(tmp_path.iterdir()) == []


def test_paths_at_the_caps_round_trip(tmp_path):
    deep = np.arange(3, dtype=np.int32)
    for _ in range(layout.MAX_PATH_DEPTH):
        deep = {"k": deep}
    long_name = "y" * layout.MAX_PATH_CHARS
    path = tmp_path / "c.jjpg"
    jaxjpeg.save(path, deep)
    restored = jaxjpeg.restore(path)
    for _ in range(layout.MAX_PATH_DEPTH):
        restored = restored["k"]
    np.testing.assert_array_equal(np.asarray(restored), np.arange(3))
    jaxjpeg.save(path, {long_name: np.ones(2, np.int8)})
    assert list(jaxjpeg.restore(path)) == [long_name]


def _raw_checkpoint(path, paths):
    """A checkpoint of one-byte raw leaves at the given key paths, written
    directly (the writer would refuse hostile paths); checksums are valid."""
    leaves = [{"path": p, "shape": [], "dtype": "int8", "kind": "raw"} for p in paths]
    with fmt.ContainerWriter(path) as w:
        for i in range(len(paths)):
            w.add_blob(f"leaf{i}/raw", b"\x01")
        w.set_metadata({"format": "jaxjpeg-checkpoint", "version": 1, "leaves": leaves})
    return path


def _open_error(path):
    tracemalloc.start()
    try:
        with pytest.raises(jaxjpeg.FormatError) as info:
            jaxjpeg.restore(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(info.value), peak


def test_a_32000_key_path_is_refused_in_bounded_memory(tmp_path):
    """Defect 2: opening built every prefix of every path (a 384 KB file took
    4 GB and 27 s); now the depth cap refuses it after one pass."""
    path = _raw_checkpoint(tmp_path / "deep.jjpg", [key(*["k"] * 32000)])
    message, peak = _open_error(path)
    assert "keys deep" in message
    assert peak < 64 * 2**20, peak


def test_a_path_past_the_length_cap_is_refused(tmp_path):
    path = _raw_checkpoint(tmp_path / "long.jjpg", [key("z" * (layout.MAX_PATH_CHARS + 10))])
    message, _ = _open_error(path)
    assert "characters long" in message


@pytest.mark.parametrize("paths", [
    [key(0), [["index", 0]]],
    [[["key", 0], ["key", "x"]], [["index", 0], ["key", "y"]]],
    [[["attr", "w"]], [["key", "w"]]],
    [[], key("a")],
])
def test_reader_refuses_paths_that_would_nest_into_one_slot(tmp_path, paths):
    """Before: ["key", 0] and ["index", 0] both opened and one leaf was dropped."""
    path = _raw_checkpoint(tmp_path / "c.jjpg", paths)
    message, _ = _open_error(path)
    assert "repeats or nests" in message


def test_path_checks_are_linear_in_leaf_count():
    """Defect 3: the writer's check used list.count per leaf (20k leaves took
    21 s). 200k paths through the writer's and the reader's rule must finish
    in a child process within a minute (linear: about a second; the old
    quadratic check needed hours). A guard against hangs, not a timing."""
    script = textwrap.dedent("""
        from jaxjpeg import checkpoint, layout
        entries = [([["key", "layer%d" % i], ["key", "kernel"]], None) for i in range(200000)]
        checkpoint._check_paths(entries)
        assert layout.path_clash(r for r, _ in entries) is None
        entries.append(([["key", "layer7"], ["key", "kernel"]], None))
        assert layout.path_clash(r for r, _ in entries) == "layer7/kernel"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_checkpoint_with_20k_leaves_opens(tmp_path):
    """Defect 3's reader side: 20k leaves, every path checked."""
    paths = [key(f"layer{i}", "bias") for i in range(20000)]
    path = _raw_checkpoint(tmp_path / "many.jjpg", paths)
    tracemalloc.start()
    try:
        with ckr.Checkpoint(path) as c:
            assert len(c.leaves) == 20000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 2**20, peak


def test_a_key_utf8_cannot_encode_is_refused_before_coding(tmp_path, monkeypatch, capsys):
    """Found by review: a key holding a lone UTF-16 surrogate was coded
    whole, then failed writing the header with a bare UnicodeEncodeError
    (`compress` of a safetensors file so named: exit 2, naming no leaf)."""
    from jaxjpeg import cli
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    source = tmp_path / "s.safetensors"
    safetensors_numpy.save_file({"w": np.ones((64, 64), np.float32)}, str(source))
    data = source.read_bytes()   # the header's name escaped as JSON does: "w\ud800"
    size = int.from_bytes(data[:8], "little")
    header = data[8:8 + size].replace(b'"w"', b'"w\\ud800"')
    header += b" " * (-len(header) % 8)
    source.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + size:])
    monkeypatch.setattr(jaxjpeg.codec, "encode_tensor", None)   # never reached
    with pytest.raises(layout.Unstorable, match="not text UTF-8 can encode"):
        jaxjpeg.save(tmp_path / "a.jjpg", {"a\udcff": np.ones((64, 64), np.float32)})
    assert cli.main(["compress", str(source), str(tmp_path / "b.jjpg")]) == cli.EXIT_DAMAGED
    err = capsys.readouterr().err
    assert "'w\\ud800' is not text UTF-8 can encode" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_paths_beyond_the_header_limit_are_refused_before_coding(tmp_path, monkeypatch):
    """Found by review: a tree whose paths alone exceed the header limit
    readers accept (200,000 leaves of 1,400-character paths) was coded whole,
    55 s, before the writer refused its header. The limit is lowered here so
    that 300 leaves of 4,000-character paths cross it."""
    monkeypatch.setattr(fmt, "DEFAULT_MAX_HEADER_BYTES", 2**20)
    tree = {f"{i:04d}" + "x" * 3996: np.ones(4, np.float32) for i in range(300)}
    coded = []

    def encoder(path, array):
        coded.append(path)
        return jaxjpeg.codec.encode_tensor(jaxjpeg.codec.prepare(array), quant_step=1.0)

    with pytest.raises(layout.Unstorable, match="paths alone take .* bytes of header"):
        jaxjpeg.save(tmp_path / "a.jjpg", tree, encoder=encoder)
    assert coded == [] and list(tmp_path.iterdir()) == []
    small = dict(list(tree.items())[:200])   # 0.8 MB of paths: saved and read back
    jaxjpeg.save(tmp_path / "b.jjpg", small)
    assert sorted(jaxjpeg.restore(tmp_path / "b.jjpg")) == sorted(small)
