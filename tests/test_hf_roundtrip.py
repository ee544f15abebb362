"""The Hugging Face round trip: a sharded safetensors checkpoint -> ``jaxjpeg
compress`` -> ``jaxjpeg export`` -> safetensors again (names, shapes, dtypes,
``__metadata__``; coded values within the coding's error, raw ones exact),
Orbax items chosen with ``--item``, and the memory compress takes."""

import json
import os
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import checkpoint, cli
from hf_files import write_sharded

safetensors_numpy = pytest.importorskip("safetensors.numpy")
from safetensors import safe_open  # noqa: E402

METADATA = {"format": "pt", "source": "unit test"}


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": (0.02 * rng.standard_normal((1000, 128))).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight":
            (0.05 * rng.standard_normal((512, 128))).astype(ml_dtypes.bfloat16),
        "model.layers.0.input_layernorm.weight": np.ones(128, np.float16),
        "model.layers.1.self_attn.q_proj.weight":
            (0.05 * rng.standard_normal((128, 128))).astype(np.float32),
        "model.rotary.inv_freq_steps": np.arange(7, dtype=np.int64),
        "lm_head.weight": (0.02 * rng.standard_normal((1000, 128))).astype(np.float16),
    }


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _read_exported(paths):
    """{name: array} and the set of __metadata__ dicts of exported files."""
    tensors, metas = {}, []
    for path in paths:
        with safe_open(str(path), framework="numpy") as f:
            metas.append(f.metadata())
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                assert name not in tensors
                tensors[name] = (f.get_tensor(name) if not dtype.startswith("F8") else None)
    return tensors, metas


def _relative_rms(got, want):
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.sqrt(np.sum((got - want) ** 2) / np.sum(want ** 2)))


@pytest.mark.parametrize("src_kind", ["index", "folder", "folder_without_index"])
def test_sharded_safetensors_round_trip(tmp_path, capsys, src_kind):
    tensors = _tensors()
    folder = write_sharded(tmp_path / "hf", tensors, index=src_kind != "folder_without_index",
                           metadata=METADATA)
    src = folder / "model.safetensors.index.json" if src_kind == "index" else folder
    ckpt = tmp_path / "model.jjpg"
    code, out, err = run(capsys, "compress", src, ckpt)
    assert code == 0, err
    with jaxjpeg.open(ckpt) as f:
        assert f.metadata == METADATA
        assert sorted(f.keys()) == sorted(tensors)
        coded = {n for n in f.keys() if f.info(n).kind == "jpeg"}
    assert "model.embed_tokens.weight" in coded and "model.rotary.inv_freq_steps" not in coded

    out_dir = tmp_path / "exported"
    code, out, err = run(capsys, "export", ckpt, out_dir, "--max-shard-size", "300KB")
    assert code == 0, err
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(f.startswith("model-") for f in files)
    assert all(os.path.getsize(out_dir / f) <= 300_000 + 4096 or
               len([n for n, s in index["weight_map"].items() if s == f]) == 1 for f in files)
    exported, metas = _read_exported(out_dir / f for f in files)
    assert all(m == METADATA for m in metas)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    restored = jaxjpeg.restore(ckpt)
    assert set(exported) == set(tensors) == set(index["weight_map"])
    for name, want in tensors.items():
        got = exported[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if name in coded:
            assert _relative_rms(got, want) < 0.1, name
            # exactly what restore decodes (the host decoder, same bits)
            np.testing.assert_array_equal(got, np.asarray(restored[name]))
        else:
            np.testing.assert_array_equal(got, want)


def test_export_to_one_file_and_refusals(tmp_path, capsys):
    tensors = _tensors()
    safetensors_numpy.save_file(tensors, str(tmp_path / "one.safetensors"),
                                metadata={"format": "pt"})
    ckpt = tmp_path / "one.jjpg"
    assert run(capsys, "compress", tmp_path / "one.safetensors", ckpt)[0] == 0
    out = tmp_path / "back.safetensors"
    code, _, err = run(capsys, "export", ckpt, out)
    assert code == 0, err
    exported, metas = _read_exported([out])
    assert metas == [{"format": "pt"}] and set(exported) == set(tensors)
    assert not list(tmp_path.glob("*.tmp-*"))
    code, _, err = run(capsys, "export", ckpt, out)          # exists, no --force
    assert code == 2 and "exists" in err and "Traceback" not in err
    assert run(capsys, "export", ckpt, out, "--force")[0] == 0
    code, _, err = run(capsys, "export", ckpt, tmp_path / "x", "--max-shard-size", "lots")
    assert code == 2 and "not a size" in err
    code, _, err = run(capsys, "export", tmp_path / "missing.jjpg", out)
    assert code == 3 and "no such file" in err          # I/O: a missing input
    code, _, err = run(capsys, "compress", tmp_path / "one.safetensors", tmp_path / "i.jjpg",
                       "--item", "params")
    assert code == 2 and "Orbax directories only" in err


def _export_family(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("model"))


def test_export_over_an_export_of_another_shape_leaves_none_of_it(tmp_path, capsys):
    """A directory holding an earlier export with another number of shards:
    refused without --force (its index would still name the old shards: a
    reader of the index got the old weights); replaced whole with it, the old
    index and shards removed."""
    tensors = _tensors()
    safetensors_numpy.save_file(tensors, str(tmp_path / "one.safetensors"))
    ckpt = tmp_path / "one.jjpg"
    assert run(capsys, "compress", tmp_path / "one.safetensors", ckpt)[0] == 0
    out = tmp_path / "exported"
    assert run(capsys, "export", ckpt, out, "--max-shard-size", "300KB")[0] == 0
    sharded = _export_family(out)
    assert len(sharded) > 3 and "model.safetensors.index.json" in sharded

    code, _, err = run(capsys, "export", ckpt, out)                 # one file, no --force
    assert code == 2 and "exists" in err
    assert _export_family(out) == sharded

    assert run(capsys, "export", ckpt, out, "--force")[0] == 0      # one file over shards
    assert _export_family(out) == ["model.safetensors"]
    exported, _ = _read_exported([out / "model.safetensors"])
    assert set(exported) == set(tensors)

    assert run(capsys, "export", ckpt, out, "--force", "--max-shard-size", "300KB")[0] == 0
    assert _export_family(out) == sharded                           # shards over one file
    code, _, err = run(capsys, "export", ckpt, out, "--force", "--max-shard-size", "800KB")
    assert code == 0, err                                           # fewer shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert _export_family(out) == sorted(set(index["weight_map"].values())
                                         | {"model.safetensors.index.json"})
    assert len(_export_family(out)) < len(sharded)
    (out / "other.safetensors").write_bytes(b"not ours")           # another stem: kept
    assert run(capsys, "export", ckpt, out, "--force")[0] == 0
    assert (out / "other.safetensors").read_bytes() == b"not ours"
    assert not list(out.glob("*.tmp-*"))


def test_export_keeps_scalars_and_calls_a_damaged_checkpoint_damaged(tmp_path, capsys):
    """A 0-d leaf (a step counter) was refused ("decoded int32[1], expected
    int32[]"), and a truncated checkpoint exited 2 (usage) where verify and
    inspect exit 1 (damaged)."""
    path = tmp_path / "s.jjpg"
    jaxjpeg.save(path, {"step": np.int32(3), "lr": np.float32(0.5),
                        "w": np.ones((256, 256), np.float32)})
    code, _, err = run(capsys, "export", path, tmp_path / "s.safetensors")
    assert code == 0, err
    exported, _ = _read_exported([tmp_path / "s.safetensors"])
    assert exported["step"].shape == () and int(exported["step"]) == 3
    assert exported["lr"].shape == () and float(exported["lr"]) == 0.5
    truncated = tmp_path / "t.jjpg"
    truncated.write_bytes(path.read_bytes()[:300])
    code, _, err = run(capsys, "export", truncated, tmp_path / "t.safetensors")
    assert code == cli.EXIT_DAMAGED and "Traceback" not in err, err


def test_a_failed_export_removes_the_directories_it_made(tmp_path, capsys):
    """Found by review: exporting a damaged checkpoint to out/deep/ exited 1
    and left out/deep/ behind, empty."""
    path = tmp_path / "d.jjpg"
    jaxjpeg.save(path, {"b": np.arange(4096, dtype=np.float32)})
    with jaxjpeg.checkpoint_reader.Checkpoint(path) as c:
        blob = c.reader._blobs["leaf0/raw"]
    data = bytearray(path.read_bytes())
    data[blob.offset + blob.length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "out" / "deep", tmp_path / "kept" / "new"):
        code, _, err = run(capsys, "export", path, out)
        assert code == cli.EXIT_DAMAGED, err
    assert sorted(os.listdir(tmp_path)) == ["d.jjpg", "kept"]
    assert os.listdir(tmp_path / "kept") == []


def test_user_metadata_that_is_not_text_exports_as_json(tmp_path, capsys):
    path = tmp_path / "m.jjpg"
    jaxjpeg.save(path, {"w": np.ones((4, 4), np.float32)},
                 metadata={"name": "tiny", "config": {"layers": 2}, "step": 7})
    assert run(capsys, "export", path, tmp_path / "m.safetensors")[0] == 0
    _, (meta,) = _read_exported([tmp_path / "m.safetensors"])
    assert meta == {"name": "tiny", "config": '{"layers": 2}', "step": "7"}


@pytest.mark.parametrize("problem, words", [
    ("missing_shard", "is missing"),
    ("outside_folder", "not a file name"),
    ("unlisted_tensor", "not in the index"),
    ("duplicate_without_index", "too"),
    ("bad_json", "not a readable safetensors index"),
])
def test_damaged_sharded_sources_are_refused(tmp_path, capsys, problem, words):
    tensors = _tensors()
    folder = write_sharded(tmp_path / "hf", tensors, index=problem != "duplicate_without_index",
                           metadata=METADATA)
    index_path = folder / "model.safetensors.index.json"
    if problem == "duplicate_without_index":
        safetensors_numpy.save_file({"lm_head.weight": tensors["lm_head.weight"]},
                                    str(folder / "extra.safetensors"))
    elif problem == "bad_json":
        index_path.write_text("{not json")
    else:
        index = json.loads(index_path.read_text())
        if problem == "missing_shard":
            os.remove(folder / "model-00002-of-00003.safetensors")
        elif problem == "outside_folder":
            index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
        else:
            del index["weight_map"]["lm_head.weight"]
        index_path.write_text(json.dumps(index))
    code, _, err = run(capsys, "compress", folder, tmp_path / "o.jjpg")
    assert code == 1 and words in err and "Traceback" not in err, (code, err)  # damaged
    assert not (tmp_path / "o.jjpg").exists()


@pytest.fixture(scope="module")
def manager_root(tmp_path_factory):
    """A CheckpointManager step with params and Adam-like moments (Orbax
    items) and the same params as a jaxjpeg item."""
    import orbax.checkpoint as ocp
    from jaxjpeg.orbax import JaxjpegSave

    rng = np.random.default_rng(1)
    params = {"dense": {"kernel": rng.standard_normal((256, 128)).astype(np.float32),
                        "bias": np.zeros(128, np.float32)}}
    moments = {"mu": {"dense": {"kernel": 1e-3 * params["dense"]["kernel"]}},
               "nu": {"dense": {"kernel": 1e-6 * np.abs(params["dense"]["kernel"])}}}
    root = tmp_path_factory.mktemp("manager")
    with ocp.CheckpointManager(root) as mngr:
        mngr.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             opt_state=ocp.args.StandardSave(moments),
                                             compressed=JaxjpegSave(params)))
        mngr.wait_until_finished()
    return root, params, moments


def test_manager_item_is_chosen_and_never_silently_dropped(manager_root, tmp_path, capsys):
    root, params, _ = manager_root
    code, _, err = run(capsys, "compress", root, tmp_path / "all.jjpg")
    assert code == 2 and "'compressed' is already a jaxjpeg checkpoint" in err
    assert "--item" in err and "'opt_state'" in err and "'params'" in err

    code, _, err = run(capsys, "compress", root, tmp_path / "p.jjpg", "--item", "params")
    assert code == 0, err
    # found by review: inspect --source took no --item, and every leaf was
    # "missing" with exit 0
    code, out, err = run(capsys, "inspect", tmp_path / "p.jjpg", "--source", root / "3")
    assert code == 2 and "choose items with --item" in err, err
    code, out, err = run(capsys, "inspect", tmp_path / "p.jjpg", "--source", root / "3",
                         "--item", "opt_state")
    assert code == 2 and "holds none of" in err and "--item" in err, err
    code, out, err = run(capsys, "inspect", tmp_path / "p.jjpg", "--source", root / "3",
                         "--item", "params")
    assert code == 0 and "missing" not in out, out
    code, out, err = run(capsys, "inspect", tmp_path / "p.jjpg", "--item", "params")
    assert code == 2 and "give --source too" in err, err
    restored = jaxjpeg.restore(tmp_path / "p.jjpg")
    assert set(restored) == {"dense"}    # the item's own tree, not under "params"
    np.testing.assert_array_equal(np.asarray(restored["dense"]["bias"]), params["dense"]["bias"])

    code, _, err = run(capsys, "compress", root, tmp_path / "both.jjpg", "--item", "params",
                       "--item", "opt_state", "--lossless", "opt_state/*")
    assert code == 0, err
    with jaxjpeg.open(tmp_path / "both.jjpg") as f:
        kinds = {n: f.info(n).kind for n in f.keys()}
    assert kinds["params/dense/kernel"] == "jpeg"
    assert kinds["opt_state/nu/dense/kernel"] == kinds["opt_state/mu/dense/kernel"] == "raw"

    for argv, words in ((("--item", "nope"), "no Orbax item 'nope'"),
                        (("--item", "compressed"), "already a jaxjpeg checkpoint")):
        code, _, err = run(capsys, "compress", root, tmp_path / "x.jjpg", *argv)
        assert code == 2 and words in err, err
    # found by review: the jaxjpeg item's own folder was "not an Orbax checkpoint
    # directory" (exit 1, as if damaged)
    code, _, err = run(capsys, "compress", root / "3" / "compressed", tmp_path / "x.jjpg")
    assert code == 2 and "already a jaxjpeg checkpoint: nothing to compress" in err, err
    assert "checkpoint.jjpg" in err and "--item" not in err, err


def test_compress_reads_the_source_one_tensor_at_a_time(tmp_path, capsys, monkeypatch):
    """Peak Python-allocated memory of `jaxjpeg compress` on a 48 MB
    safetensors file, measured with tracemalloc: with a 6 MiB window it stays
    under half the file (reading the whole source, as before, took more than
    all of it)."""
    rng = np.random.default_rng(2)
    tensors = {f"layer{i}.weight": (0.05 * rng.standard_normal((1024, 1024))).astype(np.float32)
               for i in range(12)}
    src = tmp_path / "big.safetensors"
    safetensors_numpy.save_file(tensors, str(src))
    total = sum(a.nbytes for a in tensors.values())
    del tensors
    monkeypatch.setattr(checkpoint, "SAVE_WINDOW_BYTES", 6 * 2**20)
    tracemalloc.start()
    try:
        code, _, err = run(capsys, "compress", src, tmp_path / "big.jjpg")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 0, err
    assert peak < total / 2, (peak, total)


def test_export_to_a_url_is_refused(tmp_path, capsys, monkeypatch):
    """Found by review: export to memory://bucket/out made a local folder
    'memory:' and reported the store written."""
    safetensors_numpy.save_file(_tensors(), str(tmp_path / "one.safetensors"))
    ckpt = tmp_path / "one.jjpg"
    assert run(capsys, "compress", tmp_path / "one.safetensors", ckpt)[0] == 0
    monkeypatch.chdir(tmp_path)
    for url in ("memory://bucket/out", "gs://bucket/model.safetensors"):
        code, _, err = run(capsys, "export", ckpt, url)
        assert code == 2 and "not a URL" in err, err
    assert not (tmp_path / "memory:").exists() and not (tmp_path / "gs:").exists()


def test_inspect_source_compares_64_bit_leaves_without_jax_x64(tmp_path, capsys):
    """Found by review: float64 1e300 and uint64 2**63 + 5, kept exactly by
    compress, made inspect --source die with a traceback (the comparison went
    through restore, which refuses them while jax_enable_x64 is off)."""
    tensors = {"w": np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32),
               "big64": np.full((4,), 1e300), "u64": np.array([2**63 + 5, 1], np.uint64)}
    safetensors_numpy.save_file(tensors, str(tmp_path / "s.safetensors"))
    assert run(capsys, "compress", tmp_path / "s.safetensors", tmp_path / "s.jjpg")[0] == 0
    code, out, err = run(capsys, "inspect", tmp_path / "s.jjpg", "--source",
                         tmp_path / "s.safetensors")
    assert code == 0 and "Traceback" not in err and "Warning" not in err, err
    for name in ("big64", "u64"):
        line = next(l for l in out.splitlines() if l.split() and l.split()[0] == name)
        assert line.split()[-1] == "0", line


def test_export_destinations_that_cannot_be_written_are_said_plainly(tmp_path, capsys):
    """Found by review: a missing folder was reported by the temporary
    file's name, a plain file where a directory was meant as a bare
    '[Errno 17] File exists'."""
    safetensors_numpy.save_file(_tensors(), str(tmp_path / "one.safetensors"))
    ckpt = tmp_path / "one.jjpg"
    assert run(capsys, "compress", tmp_path / "one.safetensors", ckpt)[0] == 0
    code, _, err = run(capsys, "export", ckpt, tmp_path / "nodir" / "m.safetensors")
    assert code == 3 and "does not exist" in err and ".tmp-" not in err, err
    (tmp_path / "plain").write_text("x")
    code, _, err = run(capsys, "export", ckpt, tmp_path / "plain")
    # a usage error, as extract says of the same (found by review in session 45: 3)
    assert code == 2 and "not a directory" in err and "Errno" not in err, err


def test_an_item_that_holds_no_arrays_is_named_as_such(tmp_path, capsys):
    """Found by review: ``--item meta`` on a JsonSave item answered "no Orbax
    item 'meta'" though the step holds it."""
    import orbax.checkpoint as ocp

    root = tmp_path / "ckpt"
    with ocp.CheckpointManager(root) as mngr:
        mngr.save(4, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": np.ones((8, 8), np.float32)}),
            meta=ocp.args.JsonSave({"epoch": 4})))
        mngr.wait_until_finished()
    code, _, err = run(capsys, "compress", root, tmp_path / "x.jjpg", "--item", "meta")
    assert code == 2 and "Orbax item 'meta' holds no arrays" in err, err
    code, _, err = run(capsys, "compress", root / "4", tmp_path / "x.jjpg", "--item", "nope")
    assert code == 2 and "no Orbax item 'nope'" in err, err


def test_an_orbax_root_reached_through_a_symlinks_parent(tmp_path, capsys, monkeypatch):
    """Found by review: ``compress runs/latest/..`` (latest -> store/mgr/5)
    listed the manager's steps where the system finds them, then Orbax,
    normalising the path as text, opened runs/5: "cannot read the Orbax
    checkpoint's metadata" (exit 1, as if damaged)."""
    import orbax.checkpoint as ocp

    w = np.arange(64, dtype=np.float32).reshape(8, 8)
    with ocp.CheckpointManager(tmp_path / "store" / "mgr") as mngr:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": w})))
        mngr.wait_until_finished()
    (tmp_path / "runs").mkdir()
    os.symlink(tmp_path / "store" / "mgr" / "5", tmp_path / "runs" / "latest")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "compress", "runs/latest/..", "o.jjpg", "--lossless", "*")
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(jaxjpeg.restore("o.jjpg")["state"]["w"]), w)


def test_complex64_tensors_round_trip_through_compress_and_export(tmp_path, capsys):
    """Found by review: compress refused a safetensors C64 tensor, and export
    of a checkpoint holding complex64 (saved from an npz) failed, though
    safetensors has that dtype."""
    rng = np.random.default_rng(3)
    tensors = {"w": (rng.standard_normal((64, 64)) + 1j * rng.standard_normal((64, 64)))
               .astype(np.complex64), "b": np.ones(8, np.float32)}
    safetensors_numpy.save_file(tensors, str(tmp_path / "c.safetensors"))
    ckpt = tmp_path / "c.jjpg"
    code, _, err = run(capsys, "compress", tmp_path / "c.safetensors", ckpt)
    assert code == 0, err
    code, _, err = run(capsys, "export", ckpt, tmp_path / "back.safetensors")
    assert code == 0, err
    back = safetensors_numpy.load_file(str(tmp_path / "back.safetensors"))
    assert back["w"].dtype == np.complex64
    np.testing.assert_array_equal(back["w"], tensors["w"])   # complex leaves are stored exactly
