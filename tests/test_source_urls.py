"""`jaxjpeg compress` and jaxjpeg.sources from URLs (issue 10): safetensors
(one file, or sharded with an index json), npz and Orbax sources read from
``memory://``, ``https://`` (a local server with Range support, which counts
what it serves) and ``file://``, one tensor at a time with ranged reads; the
result is the file a local source gives. Missing files, 404s and servers
ignoring ranges are clear errors with the documented exit codes."""

import io
import os

import ml_dtypes
import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import cli, sources
from hf_files import write_sharded
from range_server import RangeServer

fsspec = pytest.importorskip("fsspec")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

rng = np.random.default_rng(11)
TENSORS = {
    "embed.weight": (0.02 * rng.standard_normal((512, 256))).astype(np.float32),
    "layers.0.mlp.weight": (0.05 * rng.standard_normal((256, 384))).astype(ml_dtypes.bfloat16),
    "layers.0.norm.weight": np.ones(256, np.float16),
    "layers.1.attn.weight": (0.05 * rng.standard_normal((256, 256))).astype(np.float32),
    "steps": np.arange(9, dtype=np.int64),
}
NPZ_TENSORS = {k.replace(".", "/"): v for k, v in TENSORS.items()
               if v.dtype != ml_dtypes.bfloat16}   # npz names nest with "/"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _npz_bytes(compressed: bool) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **NPZ_TENSORS)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Local sources and what compressing each gives (the reference bytes)."""
    root = tmp_path_factory.mktemp("sources")
    safetensors_numpy.save_file(TENSORS, str(root / "one.safetensors"))
    write_sharded(root / "hf", TENSORS, 2, metadata={"format": "pt"})
    for compressed in (False, True):
        (root / f"t{int(compressed)}.npz").write_bytes(_npz_bytes(compressed))
    expected = {}
    for name in ("one.safetensors", "hf/model.safetensors.index.json", "t0.npz", "t1.npz"):
        out = root / (name.replace("/", "_") + ".jjpg")
        assert cli.main(["compress", str(root / name), str(out)]) == 0
        expected[name] = out.read_bytes()
    return root, expected


def _upload(fs, root, local_root, names):
    for name in names:
        fs.pipe(f"{root}/{name}", (local_root / name).read_bytes())


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def test_npz_sources_code_as_save_codes_their_arrays(local, tmp_path):
    """An npz (stored or deflated) compresses to what jaxjpeg.save gives for
    the same arrays, nested by the members' "/"."""
    root, _ = local
    nested = {}
    for key, value in NPZ_TENSORS.items():
        *parents, last = key.split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    jaxjpeg.save(tmp_path / "ref.jjpg", nested)
    want = _flat(jaxjpeg.restore(tmp_path / "ref.jjpg"))
    assert set(want) == set(NPZ_TENSORS)
    for name in ("t0.npz", "t1.npz"):
        got = _flat(jaxjpeg.restore(root / (name + ".jjpg")))
        assert set(got) == set(want)
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("name", ["one.safetensors", "hf/model.safetensors.index.json",
                                  "t0.npz", "t1.npz"])
def test_compress_from_memory_url_equals_local(local, memory_fs, tmp_path, capsys, name):
    root, expected = local
    fs, mem = memory_fs
    files = ([f"hf/{n}" for n in os.listdir(root / "hf")] if name.startswith("hf/") else [name])
    _upload(fs, mem, root, files)
    out = tmp_path / "m.jjpg"
    code, _, err = run(capsys, "compress", f"memory://{mem}/{name}", out)
    assert code == 0, err
    assert out.read_bytes() == expected[name]
    if name.startswith("hf/"):   # a folder of shards, listed by the store
        code, _, err = run(capsys, "compress", f"memory://{mem}/hf", tmp_path / "f.jjpg")
        assert code == 0, err
        assert (tmp_path / "f.jjpg").read_bytes() == expected[name]


def test_compress_writes_to_a_url(local, memory_fs, capsys):
    root, expected = local
    fs, mem = memory_fs
    code, _, err = run(capsys, "compress", root / "one.safetensors", f"memory://{mem}/o.jjpg")
    assert code == 0, err
    assert fs.cat_file(f"{mem}/o.jjpg") == expected["one.safetensors"]
    code, _, err = run(capsys, "compress", root / "one.safetensors", f"memory://{mem}/o.jjpg")
    assert code == 2 and "exists" in err


@pytest.mark.parametrize("name", ["hf/model.safetensors.index.json", "t0.npz", "t1.npz"])
def test_compress_over_http_reads_each_byte_once(local, tmp_path, capsys, name):
    """Every tensor is needed, so about every byte of the source is read, and
    none twice: no whole-file GET, no range read again."""
    root, expected = local
    path = root / name
    source_bytes = (sum(f.stat().st_size for f in path.parent.iterdir())
                    if name.startswith("hf/") else path.stat().st_size)
    with RangeServer(path.parent) as server:
        out = tmp_path / "h.jjpg"
        code, _, err = run(capsys, "compress", server.url(path.name), out)
        assert code == 0, err
        assert out.read_bytes() == expected[name]
        # headers and the zip directory read apart: a few hundred bytes each
        assert server.bytes_served <= source_bytes + 8192, (server.bytes_served, source_bytes)
        assert server.bytes_served >= source_bytes * 0.9


@pytest.mark.parametrize("name", ["one.safetensors", "t0.npz"])
def test_http_sources_from_servers_that_answer_403_or_part_of_a_range(local, tmp_path, capsys,
                                                                      name):
    """Found by review: a server answering 403 for files that are not there
    (S3 without list permission) failed the Orbax probe of every URL (exit
    3); one answering 64 KiB of each range read as a file that shrank; and a
    query string took the probe's "/_METADATA" into it."""
    root, expected = local
    with RangeServer(root) as server:
        server.missing_status, server.range_cap = 403, 65536
        for url in (server.url(name), server.url(name) + "?download=1"):
            out = tmp_path / "h.jjpg"
            code, _, err = run(capsys, "compress", "--force", url, out)
            assert code == 0, err
            assert out.read_bytes() == expected[name]


def test_an_index_url_with_a_query_reads_its_shards(local, tmp_path, capsys):
    """Found by review: "model.safetensors.index.json?download=true" was
    not taken as an index (its name tested with the query), exit 1."""
    root, expected = local
    with RangeServer(root / "hf") as server:
        out = tmp_path / "q.jjpg"
        url = server.url("model.safetensors.index.json") + "?download=true"
        code, _, err = run(capsys, "compress", url, out)
        assert code == 0, err
        assert out.read_bytes() == expected["hf/model.safetensors.index.json"]


def test_one_tensor_over_http_reads_about_its_bytes(local):
    """open_source reads headers only; one leaf's array() reads that tensor's
    bytes and nothing else."""
    root, _ = local
    with RangeServer(root) as server:
        with sources.open_source(server.url("one.safetensors")) as source:
            header = server.bytes_served
            assert header < 2048, header
            leaf = next(leaf for leaf in source.leaves if leaf.records == [["key", "embed.weight"]])
            server.reset()
            np.testing.assert_array_equal(leaf.array(), TENSORS["embed.weight"])
            assert server.bytes_served == TENSORS["embed.weight"].nbytes
        server.reset()
        with sources.open_source(server.url("t0.npz")) as source:
            assert server.bytes_served < 8192
            leaf = next(leaf for leaf in source.leaves
                        if leaf.records == [["key", "embed"], ["key", "weight"]])
            server.reset()
            np.testing.assert_array_equal(leaf.array(), NPZ_TENSORS["embed/weight"])
            # the whole member, its .npy header too: its CRC covers both
            import zipfile
            member = zipfile.ZipFile(root / "t0.npz").getinfo("embed/weight.npy")
            assert server.bytes_served == member.compress_size
            assert member.compress_size - NPZ_TENSORS["embed/weight"].nbytes <= 256


def test_a_large_tensor_over_http_is_read_in_parallel_pieces(tmp_path):
    from jaxjpeg.format import _READ_PIECE
    big = rng.standard_normal((1536, 1024)).astype(np.float32)   # 6 MiB
    safetensors_numpy.save_file({"big": big}, str(tmp_path / "big.safetensors"))
    with RangeServer(tmp_path) as server:
        with sources.open_source(server.url("big.safetensors")) as source:
            server.reset()
            np.testing.assert_array_equal(source.leaves[0].array(), big)
        assert server.bytes_served == big.nbytes
        assert len(server.ranges) == -(-big.nbytes // _READ_PIECE) >= 2
        assert max(end - start for start, end in server.ranges) <= _READ_PIECE


def test_file_url_sources(local, tmp_path, capsys):
    root, expected = local
    out = tmp_path / "f.jjpg"
    code, _, err = run(capsys, "compress", f"file://{root}/t1.npz", out)
    assert code == 0, err
    assert out.read_bytes() == expected["t1.npz"]


def test_orbax_source_from_file_url(tmp_path, capsys):
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = {"w": (0.05 * rng.standard_normal((128, 128))).astype(np.float32)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "std", tree)
    code, _, err = run(capsys, "compress", f"file://{tmp_path}/std", tmp_path / "o.jjpg")
    assert code == 0, err
    assert np.asarray(jaxjpeg.restore(tmp_path / "o.jjpg")["w"]).shape == (128, 128)


@pytest.fixture(scope="module")
def orbax_dirs(tmp_path_factory):
    """An Orbax StandardCheckpointer item (nested dicts, a list, a scalar) and
    a CheckpointManager step with two items; each compressed locally."""
    ocp = pytest.importorskip("orbax.checkpoint")
    root = tmp_path_factory.mktemp("orbax")
    tree = {"dense": {"kernel": (0.05 * rng.standard_normal((256, 128))).astype(np.float32),
                      "bias": np.zeros(128, np.float32)},
            "blocks": [(0.05 * rng.standard_normal((128, 128))).astype(np.float32),
                       np.ones((64,), np.float16)],
            "step": np.int32(3)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(root / "item", tree)
    with ocp.CheckpointManager(root / "manager") as manager:
        manager.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(tree["dense"]),
                                                extra=ocp.args.StandardSave(tree["blocks"])))
        manager.wait_until_finished()
    expected = {}
    for name, argv in (("item", [root / "item"]),
                       ("params", [root / "manager" / "5", "--item", "params"])):
        out = root / f"{name}.jjpg"
        assert cli.main(["compress", *map(str, argv), str(out)]) == 0
        expected[name] = out.read_bytes()
    return root, expected


def test_orbax_over_http_equals_local(orbax_dirs, tmp_path, capsys):
    """Orbax opens no web URLs: tensorstore's HTTP store reads the arrays,
    by ranges of their chunks; the file is the one a local source gives."""
    root, expected = orbax_dirs
    with RangeServer(root) as server:
        out = tmp_path / "i.jjpg"
        code, _, err = run(capsys, "compress", server.url("item"), out)
        assert code == 0, err
        assert out.read_bytes() == expected["item"]
        on_disk = sum(f.stat().st_size for f in (root / "item").rglob("*") if f.is_file())
        assert server.bytes_served <= on_disk, (server.bytes_served, on_disk)
        code, _, err = run(capsys, "compress", server.url("manager/5"), out, "--item",
                           "params", "--force")
        assert code == 0, err
        assert out.read_bytes() == expected["params"]
        code, _, err = run(capsys, "compress", server.url("manager/5"), out, "--item",
                           "nope", "--force")
        assert code == cli.EXIT_USAGE and "no Orbax item 'nope'" in err


def test_orbax_over_http_from_a_failing_server_is_an_io_error_not_a_hang(orbax_dirs, tmp_path,
                                                                      capsys):
    """Found by review: a server answering 500 for an Orbax item's arrays
    (its _METADATA read) had tensorstore retry each read for 9+ minutes.
    Now a few tries, then exit 3 naming the file and the status."""
    import threading

    root, _ = orbax_dirs
    result = {}
    with RangeServer(root) as server:
        server.failing = (r"/item/(d|manifest)", 500)
        worker = threading.Thread(target=lambda: result.update(
            answer=run(capsys, "compress", server.url("item"), tmp_path / "f.jjpg")), daemon=True)
        worker.start()
        worker.join(120)   # a hang guard, not a speed target: the retries take about 8 s
        assert not worker.is_alive(), "compress still retrying after 120 s"
    code, _, err = result["answer"]
    assert code == cli.EXIT_IO, err
    assert "cannot open" in err and "500" in err and server.url("item") in err
    assert not (tmp_path / "f.jjpg").exists()


def test_url_errors_have_their_exit_codes(local, memory_fs, tmp_path, capsys):
    root, _ = local
    fs, mem = memory_fs
    out = tmp_path / "o.jjpg"
    code, _, err = run(capsys, "compress", f"memory://{mem}/missing.safetensors", out)
    assert code == cli.EXIT_IO and "missing.safetensors" in err
    fs.pipe(f"{mem}/bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, _, err = run(capsys, "compress", f"memory://{mem}/bad.safetensors", out)
    assert code == cli.EXIT_DAMAGED and "not a valid safetensors file" in err
    fs.pipe(f"{mem}/orbax/_METADATA", b"{}")
    code, _, err = run(capsys, "compress", f"memory://{mem}/orbax", out)
    assert code == cli.EXIT_USAGE and "Orbax checkpoints are read from local paths" in err
    with RangeServer(root) as server:
        code, _, err = run(capsys, "compress", server.url("nope.safetensors"), out)
        assert code == cli.EXIT_IO and "nope.safetensors" in err
        code, _, err = run(capsys, "compress", server.url("hf"), out)   # no listing over HTTP
        assert code == cli.EXIT_IO
        server.fail_ranged_reads = True
        code, _, err = run(capsys, "compress", server.url("one.safetensors"), out)
        assert code == cli.EXIT_IO and "one.safetensors" in err
        server.fail_ranged_reads, server.ignore_ranges = False, True
        code, _, err = run(capsys, "compress", server.url("one.safetensors"), out)
        assert code == cli.EXIT_IO and "ignores ranged reads" in err, err
        # found by review: zipfile hid the failed read as "not a valid npz" (exit 1)
        for name in ("t0.npz", "t1.npz"):
            code, _, err = run(capsys, "compress", server.url(name), out)
            assert code == cli.EXIT_IO and "ignores ranged reads" in err, err
        server.ignore_ranges, server.status = False, 403   # found by review: "no such file"
        code, _, err = run(capsys, "compress", server.url("one.safetensors"), out)
        assert code == cli.EXIT_IO and "403" in err and "No such file" not in err, err
        server.status = None
        down = server.url("one.safetensors")
    # found by review: a server that is down was reported of ".../one.safetensors/_METADATA"
    code, _, err = run(capsys, "compress", down, out)
    assert code == cli.EXIT_IO and f"{down}: " in err and "_METADATA" not in err, err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("compressed", [False, True])
def test_a_damaged_npz_member_is_refused_as_damaged(tmp_path, capsys, compressed):
    """Found by review: a byte flipped in a stored (np.savez) member was
    compressed without a word, and damage a deflated member's inflater finds
    came out as a zlib.error traceback. Both exit 1, naming the member."""
    import struct
    import zipfile
    data = bytearray(_npz_bytes(compressed))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("embed/weight.npy")
    name_len, extra_len = struct.unpack("<2H", data[info.header_offset + 26:][:4])
    start = info.header_offset + 30 + name_len + extra_len   # the member's data
    for at in [*range(start, start + 48, 3), start + 2000, start + info.compress_size // 2]:
        damaged = bytearray(data)
        damaged[at] ^= 0x5A
        path = tmp_path / f"d{at}.npz"
        path.write_bytes(bytes(damaged))
        code, _, err = run(capsys, "compress", path, tmp_path / f"d{at}.jjpg")
        assert code == 1 and "damaged" in err and "Traceback" not in err, (at, err)
        assert not (tmp_path / f"d{at}.jjpg").exists()


def test_an_npz_cut_at_its_start_is_damaged_over_http_as_on_disk(tmp_path, capsys):
    """Found by review: an npz missing its first byte (its first member's
    local header then at offset -1) was refused as damaged from disk (exit
    1), but over HTTP its offset was asked of the server as a range: an I/O
    error (exit 3)."""
    (tmp_path / "cut.npz").write_bytes(_npz_bytes(False)[1:])
    code, _, err = run(capsys, "compress", tmp_path / "cut.npz", tmp_path / "a.jjpg")
    assert code == 1 and "has no local header" in err, err
    with RangeServer(tmp_path) as server:
        code, _, err = run(capsys, "compress", server.url("cut.npz"), tmp_path / "b.jjpg")
    assert code == 1 and "has no local header" in err, err
    assert not [r for r in server.range_headers if r and r.startswith("bytes=-")]


def test_a_safetensors_header_naming_a_tensor_twice_is_refused(tmp_path, capsys):
    """Found by review: json.loads kept the second entry and the first
    tensor was dropped silently."""
    import json
    import struct
    header = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    text = json.dumps(header).replace('"y"', '"x"').encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + np.arange(4, dtype="<f4").tobytes())
    code, _, err = run(capsys, "compress", path, tmp_path / "dup.jjpg")
    assert code == 1 and "'x' twice" in err, err


def test_an_upload_the_store_refuses_is_an_output_error(local, capsys):
    """Found by review: a web server refusing the upload gave an aiohttp
    ClientResponseError traceback; it is exit 3 (an output cannot be
    written), one line."""
    root, _ = local
    with RangeServer(root) as server:   # it serves reads only
        code, _, err = run(capsys, "compress", root / "one.safetensors", server.url("up.jjpg"))
    assert code == 3 and "Traceback" not in err and "up.jjpg" in err, err


def test_bad_web_orbax_keys_and_bare_store_errors_are_one_line_errors(tmp_path):
    """Found by review: a sequence key that is not a whole number raised a
    traceback; a stalled server's FSTimeoutError printed as its bare name."""
    entry = {"key_metadata": [{"key": "abc", "key_type": 1}],
             "value_metadata": {"value_type": "np.ndarray"}}
    with pytest.raises(sources.SourceError, match="not a whole number"):
        sources._web_orbax_records("http://h/item", entry)
    (tmp_path / "f").write_bytes(b"x")
    from jaxjpeg import storage
    source = storage.RangeSource(str(tmp_path / "f"))
    source.name = "http://h/f"

    def stall():
        raise TimeoutError()
    with pytest.raises(OSError, match="reading bytes.*TimeoutError.*http://h/f"):
        source._remote_call("reading bytes [0, 1)", stall)
    source.close()


def test_a_stored_npz_member_loads_as_one_copy(tmp_path):
    """Found by review: a stored (np.savez) member was read, then copied."""
    import tracemalloc
    big = np.arange(2 << 20, dtype=np.int32)   # 8 MiB
    np.savez(tmp_path / "s.npz", big=big)
    with sources.open_source(str(tmp_path / "s.npz")) as source:
        (leaf,) = source.leaves
        tracemalloc.start()
        array = leaf.array()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    np.testing.assert_array_equal(array, big)
    assert peak < 1.3 * big.nbytes, peak


@pytest.mark.parametrize("side", [2**62, 2**61])   # numpy's limit is on bytes
def test_an_empty_tensor_with_an_impossible_side_is_a_damaged_source(tmp_path, capsys, side):
    """Found by review: shape [0, 2**62] failed inside numpy as a usage
    error (exit 2) naming no file; [0, 2**61] of float32 still did."""
    import json
    import struct
    header = json.dumps({"a": {"dtype": "F32", "shape": [0, side],
                               "data_offsets": [0, 0]}}).encode()
    header += b" " * (-len(header) % 8)
    src = tmp_path / "s.safetensors"
    src.write_bytes(struct.pack("<Q", len(header)) + header)
    code, _, err = run(capsys, "compress", src, tmp_path / "o.jjpg")
    assert code == 1 and "s.safetensors" in err and "impossible shape" in err, err


def test_ctrl_c_while_a_remote_read_stalls_exits_at_once(tmp_path):
    """Found by review: a Ctrl-C while the server stalled a ranged read
    waited for it (aiohttp's 300 s timeout) and then exited 3 with the
    read's timeout error; it is exit 130 at once."""
    import signal
    import subprocess
    import sys
    import time
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.npz", **{f"w{i}": rng.standard_normal((256, 256)).astype(np.float32)
                                    for i in range(4)})
    with RangeServer(tmp_path) as server:
        server.stall_from = 65536   # a tensor's read stalls; the zip directory's do not
        proc = subprocess.Popen([sys.executable, "-m", "jaxjpeg.cli", "compress",
                                 server.url("m.npz"), str(tmp_path / "o.jjpg")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while server.stalled == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.stalled > 0, "no tensor was read"
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err)
    assert not (tmp_path / "o.jjpg").exists()
