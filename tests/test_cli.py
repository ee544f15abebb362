"""The `jaxjpeg` command line: real conversions from Orbax, Flax msgpack and safetensors
files, inspection against the source, verification of intact and damaged files, tile
extraction (opened with Pillow), and clean one-line errors (no traceback; exit 1 for
damaged input, 2 for usage errors, 3 for I/O errors: issue 10)."""

import json
import os
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

import jaxjpeg
from jaxjpeg import cli
from jaxjpeg.format import ContainerReader, ContainerWriter


def _params():
    rng = np.random.default_rng(0)
    return {"params": {
        "Dense_0": {"kernel": (0.05 * rng.standard_normal((256, 600))).astype(np.float32),
                    "bias": np.linspace(-1, 1, 600).astype(np.float32)},
        "Embed_0": {"embedding": rng.standard_normal((300, 64)).astype(ml_dtypes.bfloat16)},
        "Conv_0": {"kernel": (0.1 * rng.standard_normal((3, 3, 16, 32))).astype(np.float32)},
    }}


def _flat(tree):
    return dict(cli._flatten(tree))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same parameters as a Flax msgpack file, a safetensors file, an Orbax
    StandardCheckpointer directory and an Orbax CheckpointManager root."""
    from flax import serialization
    import orbax.checkpoint as ocp
    import safetensors.numpy

    root = tmp_path_factory.mktemp("sources")
    params = _params()
    msgpack = root / "params.msgpack"
    msgpack.write_bytes(serialization.to_bytes(params))
    st = root / "params.safetensors"
    safetensors.numpy.save_file({k.replace("/", "."): v for k, v in _flat(params).items()},
                                str(st))
    std = root / "orbax_std"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(std, params)
    mngr_dir = root / "orbax_mngr"
    with ocp.CheckpointManager(mngr_dir) as mngr:
        for step in (1, 2):
            scaled = {"params": {k: {n: (v * step).astype(v.dtype) for n, v in layer.items()}
                                 for k, layer in params["params"].items()}}
            mngr.save(step, args=ocp.args.StandardSave(scaled))
        mngr.wait_until_finished()
    return {"params": params, "msgpack": msgpack, "safetensors": st, "orbax": std,
            "manager": mngr_dir, "root": root}


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", ["msgpack", "safetensors", "orbax"])
def test_compress_each_format_then_restore(sources, tmp_path, capsys, kind):
    dst = tmp_path / "out.jjpg"
    code, out, err = run(capsys, "compress", sources[kind], dst, "--quant-step", "4")
    assert code == 0, err
    assert re.search(r"ratio\s+\d+\.\d+x vs float32", out) and "compressed" in out
    assert re.search(r"bits/weight \d+\.\d+ \(all-in\)", out)
    restored = _flat(jaxjpeg.restore(dst))
    expected = _flat(sources["params"])
    if kind == "safetensors":  # flat keys, dotted as the file has them
        expected = {k.replace("/", "."): v for k, v in expected.items()}
    assert set(restored) == set(expected)
    for path, want in expected.items():
        got = np.asarray(restored[path])
        assert got.shape == want.shape and got.dtype == want.dtype, path
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        rel = np.sqrt(np.mean((got64 - want64) ** 2) / np.mean(want64 ** 2))
        assert rel < 0.1, (path, rel)
    np.testing.assert_array_equal(np.asarray(restored[next(k for k in expected if "bias" in k)]),
                                  next(v for k, v in expected.items() if "bias" in k))


def test_compress_manager_root_takes_latest_step(sources, tmp_path, capsys):
    dst = tmp_path / "latest.jjpg"
    code, _, err = run(capsys, "compress", sources["manager"], dst, "--quality", "95")
    assert code == 0, err
    bias = np.asarray(jaxjpeg.restore(dst)["params"]["Dense_0"]["bias"])
    np.testing.assert_array_equal(bias, 2 * sources["params"]["params"]["Dense_0"]["bias"])


def test_compress_12_bit_is_more_accurate(sources, tmp_path, capsys):
    errors = {}
    for bits, step in (("8", "4"), ("12", "16")):
        dst = tmp_path / f"b{bits}.jjpg"
        assert run(capsys, "compress", sources["msgpack"], dst, "--bits", bits,
                   "--quant-step", step)[0] == 0
        code, out, _ = run(capsys, "inspect", dst, "--source", sources["msgpack"])
        assert code == 0
        line = next(l for l in out.splitlines() if l.startswith("params/Dense_0/kernel"))
        assert f"jpeg{bits}" in line
        errors[bits] = float(line.split()[-1])
    assert errors["12"] < errors["8"]


def test_inspect_table_and_source_errors(sources, tmp_path, capsys):
    dst = tmp_path / "i.jjpg"
    report = jaxjpeg.save(dst, sources["params"], quant_step=4)
    code, out, err = run(capsys, "inspect", dst, "--source", sources["orbax"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "kind", "view", "raw", "stored",
                                "bits/w", "ratio", "rel_rms"]
    assert lines[-1] == "rate: quant_step=4.0"
    rows = {l.split()[0]: l.split() for l in lines[1:-2]}
    assert set(rows) == {leaf.path for leaf in report.leaves}
    for leaf in report.leaves:
        path, shape, dtype, kind, view, raw, stored, bits, ratio, rel = rows[leaf.path]
        assert shape == "x".join(map(str, leaf.shape)) and dtype == leaf.dtype
        assert kind.startswith(leaf.kind) and int(raw) == leaf.raw_bytes
        assert int(stored) == leaf.stored_bytes
        assert float(bits) == pytest.approx(leaf.bits_per_weight, abs=1e-3)
        assert rel == "0" if leaf.kind == "raw" else 0 < float(rel) < 0.1
        assert (view == "-") == (leaf.kind == "raw")
    assert rows["params/Dense_0/kernel"][3] == "jpeg8" and rows["params/Dense_0/bias"][3] in ("raw", "raw-deflated")
    assert f"{report.ratio:.2f}x vs the stored dtypes" in lines[-2]
    assert f"{report.bits_per_weight:.3f} bits/weight" in lines[-2]
    code, out, _ = run(capsys, "inspect", dst)  # without a source: no error column
    assert code == 0 and "rel_rms" not in out


def test_verify_reads_each_blob_once(sources, tmp_path, capsys, monkeypatch):
    """Review: verify read every blob twice (checksums, then the decode), so a
    remote checkpoint crossed the network twice. Now a leaf's blobs are read
    once, checksummed and decoded from memory."""
    path = tmp_path / "p.jjpg"
    jaxjpeg.save(path, sources["params"], quant_step=4)
    read = []
    real = ContainerReader._pread
    monkeypatch.setattr(ContainerReader, "_pread",
                        lambda self, offset, length, out=None:
                        read.append(length) or real(self, offset, length, out))
    code, out, _ = run(capsys, "verify", path)
    with ContainerReader(path) as r:
        blob_bytes = sum(r.blob_info(n).length for n in r.blob_names)
    assert code == 0 and "OK" in out
    # every blob once, the header and metadata about once more than once
    assert blob_bytes < sum(read) < path.stat().st_size + 4096, (sum(read), blob_bytes)


def test_verify_intact_checksum_damage_and_bad_jpeg(sources, tmp_path, capsys):
    good = tmp_path / "good.jjpg"
    jaxjpeg.save(good, sources["params"], quant_step=4)
    code, out, _ = run(capsys, "verify", good)
    assert code == 0 and "OK" in out

    flipped = tmp_path / "flipped.jjpg"
    flipped.write_bytes(good.read_bytes())
    with ContainerReader(flipped) as r:
        info = r.blob_info("leaf2/tile0.jpg")
    with open(flipped, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x55]))
    code, out, _ = run(capsys, "verify", flipped)
    assert code == 1
    assert "leaf2/tile0.jpg: checksum mismatch" in out and out.count("BAD") == 1

    # Valid checksums over a truncated JPEG: reading the leaf as restore does
    # finds the index no longer fits the tile.
    broken = tmp_path / "broken.jjpg"
    with ContainerReader(good) as r, ContainerWriter(broken, metadata=r.metadata) as w:
        for name in r.blob_names:
            data = bytes(r.read_blob(name))
            w.add_blob(name, data[:200] + b"\xff\xd9" if name == "leaf2/tile0.jpg" else data)
    code, out, _ = run(capsys, "verify", broken)
    assert code == 1 and "BAD params/Dense_0/kernel: " in out and "tile 0 index" in out


def test_extract_tiles_open_in_pillow(sources, tmp_path, capsys):
    ckpt = tmp_path / "e.jjpg"
    jaxjpeg.save(ckpt, sources["params"], quant_step=4, tile_shape=(128, 256))
    outdir = tmp_path / "tiles"
    code, out, err = run(capsys, "extract", ckpt, outdir)
    assert code == 0, err
    files = sorted(os.listdir(outdir))
    with jaxjpeg.checkpoint_reader.Checkpoint(ckpt) as c:
        expected = {f"{leaf.path.replace('/', '.')}.tile{k}.jpg": leaf.tiles[k]
                    for leaf in c.leaves if leaf.kind == "jpeg" for k in range(len(leaf.tiles))}
    assert sorted(expected) == files and len(files) > 3
    for name in files:
        with Image.open(outdir / name) as im:
            im.load()
            _, _, height, width, _ = expected[name]
            assert im.format == "JPEG" and im.mode == "L" and im.size == (width, height)
    only = tmp_path / "only"
    code, _, _ = run(capsys, "extract", ckpt, only, "--leaf", "*/Dense_0/*")
    assert code == 0
    assert sorted(os.listdir(only)) == [f for f in files if f.startswith("params.Dense_0.")]


def test_errors_are_one_line_exit_2(sources, tmp_path, capsys):
    good = tmp_path / "g.jjpg"
    jaxjpeg.save(good, sources["params"], quant_step=4)
    truncated = tmp_path / "t.jjpg"
    truncated.write_bytes(good.read_bytes()[:5000])
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint at all\n" * 10)
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    io, damaged, usage = cli.EXIT_IO, cli.EXIT_DAMAGED, cli.EXIT_USAGE
    cases = [
        (io, "verify", tmp_path / "missing.jjpg"),
        (io, "inspect", tmp_path / "missing.jjpg"),
        (damaged, "inspect", sources["msgpack"]),            # not a jaxjpeg file
        (damaged, "inspect", truncated),
        # ("verify", truncated) exits 1: damage (test_checkpoint_corruption)
        (damaged, "extract", truncated, tmp_path / "x"),
        (usage, "inspect", empty_dir),
        (io, "compress", tmp_path / "missing", tmp_path / "o.jjpg"),
        (damaged, "compress", junk, tmp_path / "o.jjpg"),
        (damaged, "compress", empty_dir, tmp_path / "o.jjpg"),
        (damaged, "compress", good, tmp_path / "o.jjpg"),     # already jaxjpeg
        (usage, "compress", sources["msgpack"], good),      # exists, no --force
        (usage, "extract", good, tmp_path / "x", "--leaf", "no/such/*"),
        (damaged, "inspect", good, "--source", junk),
    ]
    for expected, *argv in cases:
        code, out, err = run(capsys, *argv)
        assert code == expected, (argv, out, err)
        assert err.startswith("jaxjpeg: error: ") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o.jjpg").exists()
    assert run(capsys, "compress", "a", "b", "--quant-step", "3", "--quality", "3")[0] == 2  # usage
    # Defect 7: the quantization step is --quant-step; --step is no longer an option.
    code, _, err = run(capsys, "compress", sources["msgpack"], tmp_path / "s.jjpg", "--step", "4")
    assert code == 2 and "--step" in err and not (tmp_path / "s.jjpg").exists()
    assert run(capsys, "frobnicate")[0] == 2


def test_console_entry_point_subprocess(sources, tmp_path):
    dst = tmp_path / "s.jjpg"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "jaxjpeg.cli", "compress",
                           str(sources["safetensors"]), str(dst)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ratio" in proc.stdout
    assert "it/s" not in proc.stderr and "%|" not in proc.stderr  # no bar when not a tty
    proc = subprocess.run([sys.executable, "-m", "jaxjpeg.cli", "verify", str(tmp_path / "no")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == cli.EXIT_IO and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("no such file or directory")


# ---------------------------------------------------------------- issue 9: hostile sources


def _safetensors_file(path, header, payload=bytes(64)):
    raw = header if isinstance(header, bytes) else __import__("json").dumps(header).encode()
    path.write_bytes(__import__("struct").pack("<Q", len(raw)) + raw + payload)
    return path


def _st_entry(dtype="F32", shape=(4, 4), nbytes=64):
    return {"x": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}}


HOSTILE_SAFETENSORS = {
    "header is a list": b"[]",
    "header is a string": b'"tensors"',
    "100k-deep header": b"[" * 100000 + b"]" * 100000,
    "negative dim": _st_entry(shape=(-4, 4)),
    "65 dims": _st_entry(shape=(1,) * 65 + (16,)),
    "offsets past the end": _st_entry(nbytes=6400),
    "unknown dtype": _st_entry(dtype="F128"),
    "huge shape": _st_entry(shape=(200000, 200000)),
    # found by review: a TypeError traceback (unhashable), and a tensor compressed
    # that safetensors refuses and export could not write back
    "dtype is a list": _st_entry(dtype=["F32"]),
    "dtype is an object": _st_entry(dtype={"x": 1}),
    "3 float4 values in 2 bytes": _st_entry(dtype="F4", shape=(3,), nbytes=2),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_are_one_line_errors(tmp_path, capsys, case):
    """Defect 10: these ended in tracebacks (exit 1)."""
    src = _safetensors_file(tmp_path / "h.safetensors", HOSTILE_SAFETENSORS[case])
    code, out, err = run(capsys, "compress", src, tmp_path / "o.jjpg")
    assert code == cli.EXIT_DAMAGED, (out, err)
    assert err.startswith("jaxjpeg: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(src) in err
    assert not (tmp_path / "o.jjpg").exists()


def test_float8_safetensors_compress_losslessly(tmp_path, capsys):
    """Defect 10: F8_E4M3 was listed as supported but failed; it is stored
    losslessly (float8 leaves are raw leaves) and restores bit-exactly."""
    values = np.arange(16, dtype=np.float32).reshape(4, 4) / 4
    e4m3 = values.astype(ml_dtypes.float8_e4m3fn)
    e5m2 = values.astype(ml_dtypes.float8_e5m2)
    header = {"a": {"dtype": "F8_E4M3", "shape": [4, 4], "data_offsets": [0, 16]},
              "b": {"dtype": "F8_E5M2", "shape": [4, 4], "data_offsets": [16, 32]}}
    src = _safetensors_file(tmp_path / "f8.safetensors", header,
                            e4m3.tobytes() + e5m2.tobytes())
    code, _, err = run(capsys, "compress", src, tmp_path / "o.jjpg")
    assert code == 0, err
    restored = jaxjpeg.restore(tmp_path / "o.jjpg")
    assert restored["a"].dtype == e4m3.dtype and restored["b"].dtype == e5m2.dtype
    assert np.asarray(restored["a"]).tobytes() == e4m3.tobytes()
    assert np.asarray(restored["b"]).tobytes() == e5m2.tobytes()


def test_mx_and_fnuz_safetensors_dtypes_compress_and_export_as_they_were(tmp_path, capsys):
    """Found by review: safetensors' F8_E8M0 (MX formats' scales), F4 (two
    float4_e2m1fn a byte, the first in the low bits, as PyTorch's
    float4_e2m1fn_x2 saves them) and the fnuz float8s were refused as
    dtypes jaxjpeg does not store. Now read, stored exactly and exported
    back byte for byte."""
    rng = np.random.default_rng(0)
    fp4 = rng.integers(0, 16, (4, 6), dtype=np.uint8)   # float4_e2m1fn codes
    fp4_bytes = (fp4.reshape(-1)[0::2] | (fp4.reshape(-1)[1::2] << 4)).tobytes()
    scales = (2.0 ** rng.integers(-8, 8, 12)).astype(ml_dtypes.float8_e8m0fnu)
    fnuz = rng.standard_normal(8).astype(ml_dtypes.float8_e4m3fnuz)
    data = fp4_bytes + scales.tobytes() + fnuz.tobytes()
    header = {"blocks": {"dtype": "F4", "shape": [4, 6], "data_offsets": [0, 12]},
              "scales": {"dtype": "F8_E8M0", "shape": [12], "data_offsets": [12, 24]},
              "w": {"dtype": "F8_E4M3FNUZ", "shape": [8], "data_offsets": [24, 32]}}
    src = _safetensors_file(tmp_path / "mx.safetensors", header, data)
    code, _, err = run(capsys, "compress", src, tmp_path / "o.jjpg")
    assert code == 0, err
    restored = jaxjpeg.restore(tmp_path / "o.jjpg")
    want_fp4 = fp4.view(ml_dtypes.float4_e2m1fn)
    assert restored["blocks"].dtype == want_fp4.dtype
    np.testing.assert_array_equal(np.asarray(restored["blocks"]).view(np.uint8) & 15, fp4)
    assert np.asarray(restored["scales"]).tobytes() == scales.tobytes()
    assert np.asarray(restored["w"]).tobytes() == fnuz.tobytes()
    code, _, err = run(capsys, "export", tmp_path / "o.jjpg", tmp_path / "back.safetensors")
    assert code == 0, err
    back = (tmp_path / "back.safetensors").read_bytes()
    size = int.from_bytes(back[:8], "little")
    entries = json.loads(back[8:8 + size])
    assert {k: (v["dtype"], v["shape"]) for k, v in entries.items()} == {
        k: (v["dtype"], v["shape"]) for k, v in header.items()}
    body = back[8 + size:]
    for k, v in header.items():
        begin, end = entries[k]["data_offsets"]
        assert body[begin:end] == data[slice(*v["data_offsets"])], k
    # an odd count of float4 values fills no whole byte: refused (review: written,
    # and the file refused by safetensors)
    jaxjpeg.save(tmp_path / "odd.jjpg", {"w": fp4.reshape(-1)[:7].view(ml_dtypes.float4_e2m1fn)})
    code, _, err = run(capsys, "export", tmp_path / "odd.jjpg", tmp_path / "odd.safetensors")
    assert code == cli.EXIT_USAGE and "7 float4_e2m1fn values do not fill whole bytes" in err, err
    assert not (tmp_path / "odd.safetensors").exists()


def _msgpack_bytes(obj):
    import msgpack
    return msgpack.packb(obj, use_bin_type=True)


HOSTILE_MSGPACK = {
    "string leaf": lambda: _msgpack_bytes({"w": "not an array"}),
    "bytes leaf": lambda: _msgpack_bytes({"w": b"\x00\x01"}),
    "unknown ext type": lambda: _msgpack_bytes({"w": __import__("msgpack").ExtType(42, b"xx")}),
    "100k-deep": lambda: b"\x91" * 100000 + b"\x01",
    "list of strings": lambda: _msgpack_bytes({"w": ["a", "b"]}),
    # found by review: keys that do not sort (a traceback), and a map naming a
    # key twice, compressed with the first leaf lost
    "keys of mixed kinds": lambda: _msgpack_bytes({"a": 1.0, 1: 2.0}),
    "a key twice": lambda: b"\x82" + _msgpack_bytes("a") + _msgpack_bytes(1.0)
                           + _msgpack_bytes("a") + _msgpack_bytes(2.0),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MSGPACK))
def test_hostile_msgpack_are_one_line_errors(tmp_path, capsys, case):
    src = tmp_path / "h.msgpack"
    src.write_bytes(HOSTILE_MSGPACK[case]())
    for argv in (("compress", src, tmp_path / "o.jjpg"),):
        code, out, err = run(capsys, *argv)
        assert code == cli.EXIT_DAMAGED, (out, err)
        assert err.startswith("jaxjpeg: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o.jjpg").exists()


def test_inspect_against_a_hostile_source_is_one_line(sources, tmp_path, capsys):
    """Defect 8: inspect --source could end in a traceback."""
    ckpt = tmp_path / "c.jjpg"
    jaxjpeg.save(ckpt, sources["params"], quant_step=4)
    src = tmp_path / "h.msgpack"
    src.write_bytes(HOSTILE_MSGPACK["string leaf"]())
    code, _, err = run(capsys, "inspect", ckpt, "--source", src)
    assert code == cli.EXIT_DAMAGED and err.count("\n") == 1 and "not an array" in err


def test_inspect_source_reads_one_source_tensor_at_a_time(tmp_path, capsys):
    """Found by review: inspect --source loaded the whole source first
    (570 MB for a 200 MB safetensors file, against 269 MB to compress it)."""
    import tracemalloc
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {f"w{i}": rng.standard_normal((1024, 1024)).astype(np.float32) for i in range(8)}
    src = tmp_path / "s.safetensors"
    safetensors_numpy.save_file(tensors, str(src))
    ckpt = tmp_path / "s.jjpg"
    assert run(capsys, "compress", src, ckpt)[0] == 0
    tracemalloc.start()
    code, out, err = run(capsys, "inspect", ckpt, "--source", src)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 0, err
    assert all(float(l.split()[-1]) < 0.2 for l in out.splitlines()[1:9]), out
    assert peak < 0.8 * sum(t.nbytes for t in tensors.values()), peak   # was 2.2x


def test_orbax_shape_out_of_proportion_is_refused_before_reading(tmp_path, capsys):
    """Defect 10: a 400-byte Orbax directory declaring [200000, 200000] aborted
    the process with std::bad_alloc; it is refused from the metadata. Run in a
    child process so that an abort fails this test only."""
    import json
    import orbax.checkpoint as ocp
    src = tmp_path / "ob"
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as c:
        c.save(src, args=ocp.args.PyTreeSave({"w": np.zeros((4, 4), np.float32)}))
    zarray = src / "w" / ".zarray"
    meta = json.loads(zarray.read_text())
    meta["shape"] = [200000, 200000]
    zarray.write_text(json.dumps(meta))
    proc = subprocess.run([sys.executable, "-m", "jaxjpeg.cli", "compress", str(src),
                           str(tmp_path / "o.jjpg")], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == cli.EXIT_DAMAGED, proc.stderr[-3000:]
    assert "refused before reading" in proc.stderr and "Traceback" not in proc.stderr


def test_bits_default_lets_jaxjpeg_choose(sources, tmp_path, capsys):
    """Defect 13: --bits defaulted to 8 while the library picks 8 or 12 per
    tensor (relative error 0.143 vs 0.082 on a Student-t tensor)."""
    rng = np.random.default_rng(0)
    heavy = (rng.standard_t(2, size=(256, 256)) * 0.02).astype(np.float32)
    import safetensors.numpy
    src = tmp_path / "t.safetensors"
    safetensors.numpy.save_file({"w": heavy}, str(src))
    assert run(capsys, "compress", src, tmp_path / "cli.jjpg")[0] == 0
    jaxjpeg.save(tmp_path / "lib.jjpg", {"w": heavy})
    cli_w = np.asarray(jaxjpeg.restore(tmp_path / "cli.jjpg")["w"])
    lib_w = np.asarray(jaxjpeg.restore(tmp_path / "lib.jjpg")["w"])
    np.testing.assert_array_equal(cli_w, lib_w)
    with jaxjpeg.checkpoint_reader.Checkpoint(tmp_path / "cli.jjpg") as c:
        assert c.leaves[0].bits == 12


def test_extract_never_overwrites_and_shortens_long_names(tmp_path, capsys):
    """Defect 13: two leaves whose names sanitize alike overwrote each other
    ("wrote 3", 2 files), and a 300-character path failed (file name too long)."""
    rng = np.random.default_rng(0)
    w = lambda: rng.normal(size=(64, 64)).astype(np.float32)  # noqa: E731
    tree = {"q*": w(), "q_.leaf2": w(), "q?": w(), "Q*": w(), "x" * 300: w()}
    ckpt = tmp_path / "e.jjpg"
    jaxjpeg.save(ckpt, tree)
    code, out, err = run(capsys, "extract", ckpt, tmp_path / "t")
    assert code == 0, err
    files = os.listdir(tmp_path / "t")
    assert "wrote 5 JPEG file(s)" in out and len(files) == 5
    assert len({f.lower() for f in files}) == 5
    assert max(len(f) for f in files) < 200
    contents = {(tmp_path / "t" / f).read_bytes() for f in files}
    assert len(contents) == 5


def test_extract_of_a_damaged_tile_leaves_nothing(tmp_path, capsys):
    """A tile failing its checksum after others were written left those
    files and the directory behind (exit 1 all the same)."""
    rng = np.random.default_rng(2)
    ckpt = tmp_path / "d.jjpg"
    jaxjpeg.save(ckpt, {f"w{k}": rng.normal(size=(64, 64)).astype(np.float32) for k in range(4)})
    with jaxjpeg.checkpoint_reader.Checkpoint(ckpt) as c:
        last = max((b for n, b in c.reader._blobs.items() if n.endswith("tile0.jpg")),
                   key=lambda b: b.offset)   # the last tile written
        offset = last.offset + last.length // 2
    data = bytearray(ckpt.read_bytes())
    data[offset] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    out = tmp_path / "tiles"
    code, _, err = run(capsys, "extract", ckpt, out)
    assert code == 1 and "Traceback" not in err, err
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("kept")
    code, _, _ = run(capsys, "extract", ckpt, existing)
    assert code == 1 and os.listdir(existing) == ["mine.txt"]


def test_extract_replaces_files_only_with_force(tmp_path, capsys):
    """Found by review: extracting into a folder replaced same-named files
    without asking (and a later damaged tile then removed them too)."""
    ckpt = tmp_path / "x.jjpg"
    jaxjpeg.save(ckpt, {"w": np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32)})
    out = tmp_path / "tiles"
    assert run(capsys, "extract", ckpt, out)[0] == 0
    (name,) = os.listdir(out)
    (out / name).write_bytes(b"mine")
    code, _, err = run(capsys, "extract", ckpt, out)
    assert code == 2 and "exists" in err and "--force" in err, err
    assert (out / name).read_bytes() == b"mine"
    assert run(capsys, "extract", "--force", ckpt, out)[0] == 0
    assert (out / name).read_bytes()[:2] == b"\xff\xd8"


def test_extract_leaf_by_its_exact_name_with_glob_characters(tmp_path, capsys):
    """``--leaf 'q*'`` names the leaf ``q*`` (as ``info`` lists it), not
    every leaf starting with q; a pattern matching no name is still a glob."""
    rng = np.random.default_rng(1)
    tree = {name: rng.normal(size=(64, 64)).astype(np.float32) for name in ("q*", "qa", "qb")}
    ckpt = tmp_path / "e.jjpg"
    jaxjpeg.save(ckpt, tree)
    code, out, err = run(capsys, "extract", ckpt, tmp_path / "t", "--leaf", "q*")
    assert code == 0, err
    assert "wrote 1 JPEG file(s)" in out
    code, out, err = run(capsys, "extract", ckpt, tmp_path / "u", "--leaf", "q?")
    assert code == 0, err
    assert "wrote 3 JPEG file(s)" in out


@pytest.mark.parametrize("option,value", [("--target-ratio", "8"), ("--bits-per-weight", "4"),
                                          ("--error-bound", "0.05")])
def test_compress_with_rate_targets(sources, tmp_path, capsys, option, value):
    dst = tmp_path / "t.jjpg"
    code, out, err = run(capsys, "compress", sources["msgpack"], dst, option, value)
    assert code == 0, err
    code, out, err = run(capsys, "inspect", dst)
    assert code == 0, err
    key = option[2:].replace("-", "_")
    # The model's one convolution has no BatchNorm before it: byte targets
    # code it with the common-mean prior, which the rate record counts.
    prior = set() if option == "--error-bound" else {"common_mean_prior=1"}
    line = out.splitlines()[-1]
    assert line.startswith("rate: ")
    assert set(line[len("rate: "):].split(", ")) == prior | {f"{key}={float(value)}"}
    if option == "--target-ratio":
        ratio = float(re.search(r"(\d+\.\d+)x vs float32", out).group(1))
        assert abs(ratio / 8 - 1) < 0.05, out


def test_inspect_shows_user_metadata(sources, tmp_path, capsys):
    dst = tmp_path / "m.jjpg"
    jaxjpeg.save(dst, sources["params"], metadata={"step": 1000, "note": "x" * 5000})
    code, out, err = run(capsys, "inspect", dst)
    assert code == 0, err
    line = out.splitlines()[-1]
    assert line.startswith('metadata: {"note": "xxx') and '"step": 1000' not in line
    assert line.endswith(f"... ({len(json.dumps({'note': 'x' * 5000, 'step': 1000}))} characters)")
    jaxjpeg.save(dst, sources["params"], metadata={"step": 7})
    assert run(capsys, "inspect", dst)[1].splitlines()[-1] == 'metadata: {"step": 7}'
    jaxjpeg.save(dst, sources["params"])
    assert "metadata:" not in run(capsys, "inspect", dst)[1]


def test_compress_and_inspect_tell_exact_leaves_from_lossy(tmp_path, capsys):
    """Found by review: exact leaves stored smaller than raw (a 0/1 mask as
    float16, ternary weights as grid codes, a deflated count) were counted
    as "quantized" and inspect showed them as raw-float16 / raw-linear-step,
    the kinds of lossy leaves."""
    rng = np.random.default_rng(0)
    src = tmp_path / "exact.npz"
    np.savez(src, mask=(rng.random((256, 256)) < 0.5).astype(np.float32),
             ternary=rng.integers(-1, 2, (256, 256)).astype(np.float32) * 0.3,   # not float16
             counts=np.repeat(np.arange(64, dtype=np.int32), 1024),
             w=rng.normal(size=(256, 256)).astype(np.float32))
    dst = tmp_path / "out.jjpg"
    code, out, err = run(capsys, "compress", src, dst)
    assert code == 0, err
    assert "(1 JPEG-coded, 0 quantized, 3 exact)" in out, out
    exact_only = tmp_path / "exact_only.npz"
    np.savez(exact_only, counts=np.repeat(np.arange(64, dtype=np.int32), 1024))
    code, out, err = run(capsys, "compress", exact_only, tmp_path / "e.jjpg")
    assert code == 0 and "on coded leaves" not in out, out   # it said "0.00x on coded leaves"
    code, out, err = run(capsys, "compress", "--min-size", "-5", src, tmp_path / "m.jjpg")
    assert code == 2 and "'-5' is below 0" in err, err
    code, out, err = run(capsys, "inspect", dst)
    kinds = {line.split()[0]: line.split()[3] for line in out.splitlines()[1:5]}
    assert kinds.pop("w").startswith("jpeg"), out
    assert kinds == {"mask": "raw-float16(exact)", "ternary": "raw-linear-step(exact)",
                     "counts": "raw-deflated"}, out
    with jaxjpeg.open(dst) as f:
        assert [f.get(k).tobytes() == v.tobytes() for k, v in np.load(src).items()
                if k != "w"] == [True] * 3


def test_compress_counts_quantized_leaves_as_coded(tmp_path, capsys):
    """Found by review: two pruned (sparse, quantized) leaves were printed
    as "0 JPEG-coded, 2 lossless" and "0.00x on JPEG-coded leaves"."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name in ("a", "b"):
        w = rng.normal(size=(256, 256)).astype(np.float32)
        w[np.abs(w) < np.quantile(np.abs(w), 0.9)] = 0
        tensors[name] = w
    src = tmp_path / "pruned.npz"
    np.savez(src, **tensors)
    code, out, err = run(capsys, "compress", src, tmp_path / "out.jjpg")
    assert code == 0, err
    assert "(0 JPEG-coded, 2 quantized, 0 exact)" in out, out
    ratio = float(re.search(r"(\d+\.\d+)x on coded leaves", out).group(1))
    assert ratio > 10, out


def test_compress_refuses_to_replace_its_source(tmp_path, capsys):
    """Found by review: ``compress m.safetensors m.safetensors --force``
    replaced the original with its lossy checkpoint; through a symlink too."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    src = tmp_path / "m.safetensors"
    safetensors_numpy.save_file({"w": w}, str(src))
    np.savez(tmp_path / "m.npz", w=w)
    os.symlink(tmp_path / "m.npz", tmp_path / "link.npz")
    before = {p: p.read_bytes() for p in (src, tmp_path / "m.npz")}
    for source, dst in ((src, src), (tmp_path / "link.npz", tmp_path / "m.npz"),
                        (tmp_path / "m.npz", tmp_path / "link.npz"),
                        # as URLs: file://, local://, a cache's chain (review)
                        (src, f"local://{src}"), (f"simplecache::file://{src}", src),
                        (src, f"simplecache::file://{src}")):
        code, _, err = run(capsys, "compress", source, dst, "--force")
        assert code == cli.EXIT_USAGE and "source's file" in err, (code, err)
    assert all(p.read_bytes() == data for p, data in before.items())


def test_compress_refuses_to_replace_its_source_at_a_url(capsys):
    """Found by review: the refusals above held for local paths only:
    ``compress memory://m/s.npz memory://m/s.npz --force`` replaced the npz
    with its lossy checkpoint and exited 0 (gs:// and s3:// alike)."""
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("safetensors")
    import io
    memory = fsspec.filesystem("memory")
    w = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, w=w)
    memory.pipe("/refuse/s.npz", buffer.getvalue())
    from safetensors.numpy import save as safetensors_bytes
    memory.pipe("/refuse/shards/a.safetensors", safetensors_bytes({"w": w}))
    memory.pipe("/refuse/shards/notes.txt", b"kept")
    try:
        for source, dst in (("memory://refuse/s.npz", "memory://refuse/s.npz"),
                            ("memory://refuse/s.npz", "memory:///refuse/s.npz"),
                            ("memory://refuse/shards", "memory://refuse/shards/a.safetensors"),
                            ("memory://refuse/shards", "memory://refuse/shards/notes.txt"),
                            # (review: through a cache's chain, either way)
                            ("memory://refuse/s.npz", "simplecache::memory://refuse/s.npz"),
                            ("simplecache::memory://refuse/s.npz", "memory://refuse/s.npz")):
            code, _, err = run(capsys, "compress", source, dst, "--force")
            assert code == cli.EXIT_USAGE and "source" in err and "choose" in err, (code, err)
        assert memory.cat("/refuse/s.npz") == buffer.getvalue()
        assert memory.cat("/refuse/shards/notes.txt") == b"kept"
        assert memory.cat("/refuse/shards/a.safetensors") == safetensors_bytes({"w": w})
    finally:
        memory.rm("/refuse", recursive=True)


def test_compress_refuses_to_replace_a_file_of_its_source_directory(sources, tmp_path, capsys):
    """Found by review: ``compress ITEM ITEM/_METADATA --force`` (or one of
    its data files) replaced the Orbax item's own file with the checkpoint,
    and the item no longer read."""
    import shutil
    item = tmp_path / "item"
    shutil.copytree(sources["orbax"], item)
    files = sorted(p for p in item.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    for dst in (item / "_METADATA", files[-1]):
        code, _, err = run(capsys, "compress", item, dst, "--force")
        assert code == cli.EXIT_USAGE and "source directory" in err, (code, err)
    assert all(p.read_bytes() == data for p, data in before.items())
    assert run(capsys, "compress", item, tmp_path / "beside.jjpg")[0] == 0
    # a checkpoint written there before is replaced (review: a rerun was refused)
    assert run(capsys, "compress", item, item / "model.jjpg")[0] == 0
    assert run(capsys, "compress", item, item / "model.jjpg", "--force")[0] == 0


def test_lossless_takes_names_with_glob_characters_as_they_are(tmp_path, capsys):
    """Found by review: "layers[0]/kernel" and "head[*]" kept nothing
    lossless ([...] is a glob class); a pattern matching nothing is said."""
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    np.savez(tmp_path / "s.npz", **{"layers[0]/kernel": w, "head[*]": w, "other": w})
    code, _, err = run(capsys, "compress", tmp_path / "s.npz", tmp_path / "o.jjpg", "--min-size",
                       "0", "--lossless", "layers[0]/kernel", "--lossless", "head[*]",
                       "--lossless", "no/such/*")
    assert code == 0, err
    assert "'no/such/*' matches no leaf" in err and "layers" not in err
    out = dict(cli._flatten(jaxjpeg.restore(tmp_path / "o.jjpg")))
    np.testing.assert_array_equal(np.asarray(out["layers[0]/kernel"]), w)
    np.testing.assert_array_equal(np.asarray(out["head[*]"]), w)
    assert not np.array_equal(np.asarray(out["other"]), w)


def test_inspect_source_counts_kept_non_finite_values_and_imaginary_parts(tmp_path, capsys):
    """Found by review: one kept NaN printed "nan" for its whole leaf (exact
    ones too), and a complex leaf's imaginary part was dropped (0 printed)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    w[3, 5] = np.nan
    b = np.array([1.0, np.inf, -np.inf, np.nan], np.float32)
    jaxjpeg.save(tmp_path / "a.jjpg", {"w": w, "b": b, "c": (b[:1] + 1j).astype(np.complex64)})
    changed_c = np.array([1 + 5j], np.complex64)
    for c, want_c in ((b[:1] + 1j, 0.0), (changed_c, 4 / np.sqrt(26))):   # |4j| / |1 + 5j|
        np.savez(tmp_path / "s.npz", w=w, b=b, c=np.asarray(c, np.complex64))
        code, out, err = run(capsys, "inspect", tmp_path / "a.jjpg", "--source", tmp_path / "s.npz")
        assert code == 0 and "warning" not in err, err
        rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:4]}
        assert rows["b"] == "0" and 0.02 < float(rows["w"]) < 0.2, out
        assert float(rows["c"]) == pytest.approx(want_c, rel=1e-3), out
    b_changed = b.copy()
    b_changed[1] = 7.0
    np.savez(tmp_path / "s.npz", w=w, b=b_changed, c=changed_c)
    code, out, _ = run(capsys, "inspect", tmp_path / "a.jjpg", "--source", tmp_path / "s.npz")
    assert {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:4]}["b"] == "inf"


def test_export_of_a_float64_coded_leaf_and_a_leaf_named_metadata(tmp_path, capsys):
    """Found by review: a float64 leaf Policy(compress=...) codes could not be
    exported ("decoded float32, expected float64"); a leaf named
    __metadata__ was written over the file's metadata (unreadable file)."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    x = np.random.default_rng(0).standard_normal((128, 256))
    jaxjpeg.save(tmp_path / "a.jjpg", {"d": x}, policy=jaxjpeg.Policy(compress=("d",)))
    code, _, err = run(capsys, "export", tmp_path / "a.jjpg", tmp_path / "a.safetensors")
    assert code == 0, err
    got = safetensors_numpy.load_file(str(tmp_path / "a.safetensors"))["d"]
    assert got.dtype == np.float64 and np.linalg.norm(got - x) < 0.2 * np.linalg.norm(x)
    with jaxjpeg.open(tmp_path / "a.jjpg") as f:
        np.testing.assert_array_equal(got.astype(np.float32), np.asarray(f.get("d")))
    jaxjpeg.save(tmp_path / "m.jjpg", {"__metadata__": x[:4], "x": x[:4]}, metadata={"step": 1})
    code, _, err = run(capsys, "export", tmp_path / "m.jjpg", tmp_path / "m.safetensors")
    assert code == cli.EXIT_USAGE and "__metadata__" in err, err
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("shape", ["(-4,)", "(-4, -4)", "(True, 4)"])
def test_npz_members_of_invalid_shapes_are_damaged_input(tmp_path, capsys, shape):
    """Found by review: exit 2 (usage) with numpy's message, no file named."""
    np.savez(tmp_path / "s.npz", x=np.zeros(16, np.float32))
    import zipfile
    with zipfile.ZipFile(tmp_path / "s.npz") as z:
        data = z.read("x.npy")
    header = data[10:10 + int.from_bytes(data[8:10], "little")].replace(b"(16,)", shape.encode())
    header = header.ljust(len(data[10:10 + int.from_bytes(data[8:10], "little")]))
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as z:
        z.writestr("x.npy", data[:10] + header + data[10 + len(header):])
    code, _, err = run(capsys, "compress", tmp_path / "bad.npz", tmp_path / "o.jjpg",
                       "--min-size", "0")
    assert code == cli.EXIT_DAMAGED and "bad.npz: member 'x.npy' has an invalid shape" in err, err


def test_source_metadata_too_large_to_keep_is_dropped_with_a_warning(tmp_path, capsys):
    """Found by review: a safetensors file with 2 MiB of metadata could not
    be compressed at all (reported as damaged)."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    w = np.ones((64, 64), np.float32)
    safetensors_numpy.save_file({"w": w}, str(tmp_path / "s.safetensors"),
                                metadata={"big": "x" * (2 << 20)})
    code, _, err = run(capsys, "compress", tmp_path / "s.safetensors", tmp_path / "o.jjpg")
    assert code == 0 and "its metadata is not kept" in err, err
    with jaxjpeg.open(tmp_path / "o.jjpg") as f:
        assert f.metadata == {}


def test_orbax_sources_of_zeros_and_step_prefixes(tmp_path, capsys):
    """Found by review: a fresh optimizer state (zeros: tensorstore writes no
    chunks) was refused as declaring far more bytes than on disk; a manager
    root saved with a step_prefix ("step_2") was not recognised."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as c:
        c.save(tmp_path / "zeros", {"mu": np.zeros((4096, 4096), np.float32)})
    code, _, err = run(capsys, "compress", tmp_path / "zeros", tmp_path / "z.jjpg")
    assert code == 0, err
    assert not np.any(np.asarray(jaxjpeg.restore(tmp_path / "z.jjpg")["mu"]))
    options = ocp.CheckpointManagerOptions(step_prefix="step")
    with ocp.CheckpointManager(tmp_path / "root", options=options) as m:
        for step in (1, 2):
            m.save(step, args=ocp.args.StandardSave({"w": np.full((8, 8), step, np.float32)}))
        m.wait_until_finished()
    assert sorted(os.listdir(tmp_path / "root")) == ["step_1", "step_2"]
    (tmp_path / "root" / "eval_7").mkdir()   # a folder beside the steps (review: refused)
    code, _, err = run(capsys, "compress", tmp_path / "root", tmp_path / "r.jjpg")
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(jaxjpeg.restore(tmp_path / "r.jjpg")["w"]), 2)


def test_a_hard_link_to_the_source_may_be_replaced_and_odd_metadata_is_dropped(tmp_path, capsys):
    """Found by review of the refusal above: a hard link to the source was
    refused (the save's rename replaces the link, not the source); source
    metadata holding a lone surrogate crashed compress with a traceback."""
    import json
    import struct
    w = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    header = json.dumps({"__metadata__": {"note": "\ud800x"}, "w": {
        "dtype": "F32", "shape": [128, 128], "data_offsets": [0, w.nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    src = tmp_path / "s.safetensors"
    src.write_bytes(struct.pack("<Q", len(header)) + header + w.tobytes())
    os.symlink(tmp_path, tmp_path / "again")   # another path to the source's directory
    code, _, err = run(capsys, "compress", src, tmp_path / "again" / "s.safetensors", "--force")
    assert code == cli.EXIT_USAGE and "source's file" in err, err
    os.link(src, tmp_path / "hard.safetensors")
    before = src.read_bytes()
    code, _, err = run(capsys, "compress", src, tmp_path / "hard.safetensors", "--force")
    assert code == 0 and "its metadata is not kept" in err, err
    assert src.read_bytes() == before
    with jaxjpeg.open(tmp_path / "hard.safetensors") as f:
        assert f.metadata == {}


def test_a_manager_root_reads_its_newest_complete_step_of_its_own_naming(tmp_path, capsys):
    """Found by review: an unfinished newest step (no items yet) made the
    root unreadable, or switched to another naming ("backup_5") silently."""
    import orbax.checkpoint as ocp
    root = tmp_path / "root"
    with ocp.CheckpointManager(root) as m:
        for step in (11, 12):
            m.save(step, args=ocp.args.StandardSave({"w": np.full((8, 8), step, np.float32)}))
        m.wait_until_finished()
    (root / "13").mkdir()                                   # unfinished
    with ocp.CheckpointManager(tmp_path / "other", options=ocp.CheckpointManagerOptions(
            step_prefix="backup")) as m:
        m.save(5, args=ocp.args.StandardSave({"w": np.full((8, 8), 5, np.float32)}))
        m.wait_until_finished()
    os.rename(tmp_path / "other" / "backup_5", root / "backup_5")
    code, _, err = run(capsys, "compress", root, tmp_path / "r.jjpg")
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(jaxjpeg.restore(tmp_path / "r.jjpg")["w"]), 12)


@pytest.mark.parametrize("damage", ["not a jpeg", "huge frame"])
def test_extract_refuses_tiles_that_are_not_their_records_jpeg(tmp_path, capsys, damage):
    """Found by review: a tile blob that is no JPEG, or whose frame claims
    65535 x 65535 (valid checksums), was written as a .jpg and extract exited 0."""
    from test_checkpoint_corruption import rewrite

    src = tmp_path / "s.jjpg"
    jaxjpeg.save(src, {"w": np.random.default_rng(0).normal(size=(64, 96)).astype(np.float32)})

    def edit(blobs):
        tile = blobs["leaf0/tile0.jpg"]
        if damage == "not a jpeg":
            blobs["leaf0/tile0.jpg"] = b"not a jpeg at all" * 8
        else:   # the SOF0 frame's height and width fields
            sof = tile.index(b"\xff\xc0")
            blobs["leaf0/tile0.jpg"] = tile[:sof + 5] + b"\xff\xff\xff\xff" + tile[sof + 9:]
    bad = rewrite(src, tmp_path / "bad.jjpg", edit_blobs=edit)
    code, _, err = run(capsys, "extract", bad, tmp_path / "out")
    assert code == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_inspect_names_centered_moments_and_deflated_leaves(tmp_path, capsys):
    """Found by review: a centered moment read as a plain log2 leaf, with no
    word that it restores through another leaf's square."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(64, 64)).astype(np.float32)
    nu = (mu ** 2 + rng.random((64, 64)) * 0.01).astype(np.float32)
    path = tmp_path / "c.jjpg"
    jaxjpeg.save(path, {"opt": {"mu": mu, "nu": nu}, "mask": np.tril(np.ones((256, 256), bool))})
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0
    assert "raw-variance+sq(opt/mu)" in out and "raw-deflated" in out, out


def test_an_empty_tree_has_no_bits_per_weight(tmp_path, capsys):
    """Found by review: an empty tree's 178-byte file was said to hold
    1424 bits a weight (its bytes over max(1, weights))."""
    import math

    import jaxjpeg
    report = jaxjpeg.save(tmp_path / "e.jjpg", {})
    assert math.isnan(report.bits_per_weight)
    assert "no weights" in report.summary() and "1424" not in report.summary()
    assert cli.main(["inspect", str(tmp_path / "e.jjpg")]) == 0
    out = capsys.readouterr().out
    assert "no weights" in out and "bits/weight" not in out


def test_an_output_directory_that_is_a_file_is_said(tmp_path, capsys):
    """Found by review: extract into a file said only "File exists"; export
    to file/x.safetensors said its directory did not exist."""
    ckpt, blocker = tmp_path / "c.jjpg", tmp_path / "ofile"
    jaxjpeg.save(ckpt, {"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)})
    blocker.write_text("")
    assert cli.main(["extract", str(ckpt), str(blocker)]) == cli.EXIT_USAGE
    assert "exists and is not a directory" in capsys.readouterr().err
    assert cli.main(["export", str(ckpt), str(blocker / "x.safetensors")]) == cli.EXIT_IO
    assert "is a file, not a directory" in capsys.readouterr().err
    assert blocker.read_text() == ""
    # found by review: exporting onto a file (the checkpoint itself) was an I/O error (3)
    for out in (blocker, ckpt):
        assert cli.main(["export", "--force", str(ckpt), str(out)]) == cli.EXIT_USAGE
        assert "exists and is not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "" and jaxjpeg.restore(ckpt)["w"].shape == (64, 64)


# ---------------------------------------------------------------- found by review (session 60)


def _npy(array) -> bytes:
    import io
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_an_npz_of_a_zip_version_not_known_is_damaged_input(tmp_path, capsys):
    """Found by review: zipfile's NotImplementedError ("zip file version
    10.0") came out as a traceback."""
    np.savez(tmp_path / "s.npz", a=np.arange(6, dtype=np.float32))
    data = bytearray((tmp_path / "s.npz").read_bytes())
    data[data.rfind(b"PK\x01\x02") + 6] = 100   # the directory's "version needed"
    (tmp_path / "v.npz").write_bytes(bytes(data))
    code, _, err = run(capsys, "compress", tmp_path / "v.npz", tmp_path / "o.jjpg")
    assert code == cli.EXIT_DAMAGED and "v.npz: not a valid npz file" in err, err


def test_npz_members_sharing_bytes_are_refused(tmp_path, capsys):
    """Found by review: a zip's directory may point many members at one
    deflated member, each bounded alone: a 174 KB file declared 125 GiB of
    arrays, each inflating the same 64 MiB."""
    import struct
    import zlib

    raw = _npy(np.zeros(4096, np.float32))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = deflater.compress(raw) + deflater.flush()
    local = struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, 8, 0, 0, zlib.crc32(raw),
                        len(packed), len(raw), 6, 0) + b"w0.npy"
    directory = b"".join(
        struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 0, 20, 0, 0, 8, 0, 0, zlib.crc32(raw),
                    len(packed), len(raw), 6, 0, 0, 0, 0, 0, 0) + f"w{i}.npy".encode()
        for i in range(3))
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 3, 3, len(directory),
                      len(local) + len(packed), 0)
    (tmp_path / "o.npz").write_bytes(local + packed + directory + end)
    code, _, err = run(capsys, "compress", tmp_path / "o.npz", tmp_path / "o.jjpg")
    assert code == cli.EXIT_DAMAGED and "members 'w0.npy' and 'w1.npy' share bytes" in err, err
    assert not (tmp_path / "o.jjpg").exists()


@pytest.mark.parametrize("members", [("a.npy", "a/b.npy"), ("a/b.npy", "a.npy"),
                                     ("a.npy", "a.npy")])
def test_load_source_refuses_members_taking_one_place(tmp_path, members):
    """Found by review: members "a" and "a/b" gave an IndexError, or "a/b"
    was dropped; a repeated name dropped the first."""
    import warnings
    import zipfile

    from jaxjpeg.sources import SourceError, load_source

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # zipfile on a repeated name
        with zipfile.ZipFile(tmp_path / "n.npz", "w") as z:
            for i, member in enumerate(members):
                z.writestr(member, _npy(np.full(3, float(i), np.float32)))
    with pytest.raises(SourceError, match="is taken twice"):
        load_source(tmp_path / "n.npz")


def test_a_safetensors_index_naming_a_tensor_twice_is_refused(tmp_path, capsys):
    """Found by review: json.loads kept the last shard named, and the first
    was never read."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file({"a": np.full(2, 1, np.float32)}, str(tmp_path / "s1.safetensors"))
    safetensors_numpy.save_file({"a": np.full(2, 2, np.float32), "b": np.zeros(2, np.float32)},
                                str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "a": "s2.safetensors"}}')
    code, _, err = run(capsys, "compress", tmp_path, tmp_path / "o.jjpg")
    assert code == cli.EXIT_DAMAGED and "duplicate key 'a'" in err, err


def test_a_folder_named_as_a_shard_is_damaged_input(tmp_path, capsys):
    """Found by review: an I/O error ("Is a directory", exit 3)."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    (tmp_path / "shards" / "extra.safetensors").mkdir(parents=True)
    safetensors_numpy.save_file({"a": np.ones(4, np.float32)},
                                str(tmp_path / "shards" / "model-00001.safetensors"))
    code, _, err = run(capsys, "compress", tmp_path / "shards", tmp_path / "o.jjpg")
    assert code == cli.EXIT_DAMAGED and "extra.safetensors: not a file" in err, err
