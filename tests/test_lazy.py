"""The lazy reader (jaxjpeg.open) and user metadata (save(..., metadata=))."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import export, format as fmt, layout

rng = np.random.default_rng(10)
TREE = {
    # Rows differ in scale: the coder keeps the framework's view, 2 x 8 tiles of
    # 512 x 192 (a numpy leaf's tiles end at the 8-way splits of its largest axis).
    "dense": (rng.standard_normal((1024, 1536)) * np.exp(rng.standard_normal((1024, 1))))
    .astype(np.float32),
    # A Flax conv whose output channels differ widely in scale: the coder views it
    # as (out, kh*kw*in), a transpose of the framework's order.
    "conv": (rng.standard_normal((3, 3, 64, 96)) * np.exp(1.5 * rng.standard_normal(96)))
    .astype(np.float32),
    # Extreme values above the diagonal of its first 64 x 64 block (a causal
    # mask's): kept exactly in the side list, the rest coded.
    "mask": np.pad(np.triu(np.full((64, 64), -1e38, np.float32), 1), (0, 448))
    + rng.standard_normal((512, 512)).astype(np.float32),
    "bias": rng.standard_normal(96).astype(np.float32),          # raw (1-D)
    "step": np.array(1234, np.int32),                             # raw (integer)
}
METADATA = {"model": "tiny", "epoch": 3, "lr": 1e-3, "tags": ("a", "b"), "ok": True,
            "none": None, "nested": {"layers": [64, 96], "ünïcode": "✓"}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("lazy") / "model.jjpg"
    jaxjpeg.save(path, TREE, metadata=METADATA)
    restored = {k: np.asarray(v) for k, v in jaxjpeg.restore(path).items()}
    return path, restored


def bits(a):
    """An array's bytes, so NaN and -0.0 compare exactly."""
    a = np.asarray(a)
    return a.shape, a.dtype, a.tobytes()


def leaf_index(path, name):
    with jaxjpeg.open(path) as f:
        return f.keys().index(name)


def blob_sizes(path):
    with fmt.ContainerReader(path) as r:
        return {n: r.blob_info(n).length for n in r.blob_names}


@pytest.fixture
def blobs_read(monkeypatch):
    """The names of the blobs read through ContainerReader.read_blob."""
    names = []
    original = fmt.ContainerReader.read_blob

    def logged(self, name, **kwargs):
        names.append(name)
        return original(self, name, **kwargs)
    monkeypatch.setattr(fmt.ContainerReader, "read_blob", logged)
    return names


# ---------------------------------------------------------------- metadata


def test_metadata_round_trips_through_json(saved):
    path, _ = saved
    with jaxjpeg.open(path) as f:
        assert f.metadata == json.loads(json.dumps(METADATA))
        assert f.metadata["tags"] == ["a", "b"]   # tuples come back as lists


def test_no_metadata_reads_as_empty(tmp_path):
    path = tmp_path / "plain.jjpg"
    jaxjpeg.save(path, {"b": np.ones(4, np.float32)})
    with jaxjpeg.open(path) as f:
        assert f.metadata == {}
    with fmt.ContainerReader(path) as r:
        assert layout.USER_METADATA_KEY not in r.metadata


@pytest.mark.parametrize("metadata, error, words", [
    (["not", "a", "dict"], TypeError, "must be a dict"),
    ({1: "int key"}, TypeError, "keys must be str"),
    ({"a": {"deeper": {2: 0}}}, TypeError, "keys must be str"),
    ({"a": np.float32(1.5)}, TypeError, "float32 is not JSON"),
    ({"a": [1, object()]}, TypeError, "metadata['a'][1]"),
    ({"a": b"bytes"}, TypeError, "bytes is not JSON"),
    ({"a": float("nan")}, ValueError, "not finite"),
    ({"a": [1.0, float("inf")]}, ValueError, "not finite"),
    ({"big": "x" * (layout.MAX_USER_METADATA_BYTES + 1)}, ValueError, "bytes of JSON"),
])
def test_bad_metadata_is_refused_before_anything_is_coded(tmp_path, metadata, error, words):
    path = tmp_path / "bad.jjpg"
    coded = []

    def encoder(name, array):
        coded.append(name)
        return jaxjpeg.encode_tensor(array)
    with pytest.raises(error, match=None) as info:
        jaxjpeg.save(path, {"w": np.ones((64, 64), np.float32)}, encoder=encoder,
                     metadata=metadata)
    assert words in str(info.value)
    assert coded == [] and not path.exists() and list(tmp_path.iterdir()) == []


def test_too_deep_metadata_is_refused(tmp_path):
    deep = {}
    node = deep
    for _ in range(layout.MAX_USER_METADATA_DEPTH + 1):
        node["k"] = {}
        node = node["k"]
    with pytest.raises(ValueError, match="levels deep"):
        jaxjpeg.save(tmp_path / "deep.jjpg", {"b": np.ones(4, np.float32)}, metadata=deep)
    cyclic = {}
    cyclic["self"] = cyclic
    with pytest.raises(ValueError, match="levels deep"):
        jaxjpeg.save(tmp_path / "cyclic.jjpg", {"b": np.ones(4, np.float32)}, metadata=cyclic)


def test_a_file_whose_user_metadata_is_not_an_object_is_refused(saved, tmp_path):
    path, _ = saved
    forged = tmp_path / "forged.jjpg"
    with fmt.ContainerReader(path) as r, fmt.ContainerWriter(forged) as w:
        for name in r.blob_names:
            w.add_blob(name, bytes(r.read_blob(name)))
        w.set_metadata({**r.metadata, layout.USER_METADATA_KEY: ["not", "an", "object"]})
    with pytest.raises(fmt.FormatError, match="user metadata"):
        jaxjpeg.open(forged)


# ---------------------------------------------------------------- keys and info


def test_keys_and_info(saved):
    path, _ = saved
    sizes = blob_sizes(path)
    with jaxjpeg.open(path) as f:
        assert f.keys() == ["bias", "conv", "dense", "mask", "step"]  # the saved order
        assert "conv" in f and "nope" not in f and len(f) == 5 and list(f) == f.keys()
        for i, name in enumerate(f.keys()):
            info = f.info(name)
            array = TREE[name]
            assert (info.name, info.shape, info.dtype) == (name, array.shape, array.dtype)
            own = sum(n for b, n in sizes.items() if b.startswith(f"leaf{i}/"))
            assert info.stored_bytes == own
            assert info.bits_per_weight == pytest.approx(own * 8 / array.size)
            assert info.nbytes == array.nbytes
        for name in ("bias", "step"):
            info = f.info(name)
            assert info.kind == "raw" and info.stored_bytes == TREE[name].nbytes
            assert info.tiles == 0 and info.view is None
        dense, conv, mask = f.info("dense"), f.info("conv"), f.info("mask")
    assert dense.kind == conv.kind == mask.kind == "jpeg"
    assert dense.view == ((0, 1), 1) and dense.tiles == 16
    assert conv.view[0][0] == 3 and conv.view[1] == 1 and conv.tiles == 2  # (96, 576)
    assert mask.kept >= 64 * 63 // 2 and dense.kept == 0
    for info in (dense, conv, mask):
        assert info.sample_bits in (8, 12) and info.restart_interval > 0
        assert info.bits_per_weight < 32


# ---------------------------------------------------------------- get


@pytest.mark.parametrize("name", sorted(TREE))
def test_get_equals_restore_bit_for_bit(saved, name):
    path, restored = saved
    with jaxjpeg.open(path) as f:
        value = f.get(name)
    assert isinstance(value, jax.Array)
    assert bits(value) == bits(restored[name])


def test_get_keeps_the_side_list_exact(saved):
    path, _ = saved
    with jaxjpeg.open(path) as f:
        mask = np.asarray(f.get("mask"))
    upper = np.pad(np.triu(np.ones((64, 64), bool), 1), (0, 448))
    np.testing.assert_array_equal(mask[upper], TREE["mask"][upper])
    assert np.all(mask[upper] == -1e38)


def test_get_dtype_and_device(saved):
    path, _ = saved
    device = jax.local_devices()[0]
    want = jaxjpeg.restore(path, paths=["dense", "step"], dtype=jnp.bfloat16)
    with jaxjpeg.open(path) as f:
        half = f.get("dense", dtype=jnp.bfloat16, device=device)
        step = f.get("step", dtype=jnp.bfloat16)
        on_sharding = f.get("conv", device=jax.sharding.SingleDeviceSharding(device))
    assert half.dtype == jnp.bfloat16 and half.devices() == {device}
    assert bits(half) == bits(want["dense"])
    assert step.dtype == np.int32 and int(step) == 1234   # integers keep their dtype
    assert on_sharding.devices() == {device}


def test_get_checks_its_device_and_a_slice_says_the_dtype_it_gives(saved):
    """Found by review: device=1 failed inside jax (device=0 was taken for
    the default); LeafSlice.dtype said int64 / float64 where indexing gives
    int32 / float32 (x64 off)."""
    path, _ = saved
    with jaxjpeg.open(path) as f:
        for device in (0, 1, "cpu"):
            with pytest.raises(TypeError, match="device must be a jax.Device"):
                f.get("dense", device=device)
            with pytest.raises(TypeError, match="device must be a jax.Device"):
                f.get_slice("dense", device=device)[:2]
        for name, dtype in (("step", None), ("dense", np.float64)):
            piece = f.get_slice(name, dtype=dtype)
            assert piece.dtype == piece[...].dtype, (name, piece.dtype)


def test_get_reads_only_that_leafs_blobs(saved, blobs_read):
    path, _ = saved
    sizes = blob_sizes(path)
    for name in ("conv", "mask", "bias"):
        i = leaf_index(path, name)
        blobs_read.clear()
        with jaxjpeg.open(path) as f:
            stats = jaxjpeg.RestoreStats()
            f.get(name, stats=stats)
        assert sorted(blobs_read) == sorted(b for b in sizes if b.startswith(f"leaf{i}/")), name
        if name != "bias":
            tiles = sum(n for b, n in sizes.items()
                        if b.startswith(f"leaf{i}/tile"))
            assert sum(stats.payload_bytes_per_device.values()) == tiles


# ---------------------------------------------------------------- get_slice


SLICES = [
    ("dense", np.s_[10:20, 100:200]),
    ("dense", np.s_[600:, ::7]),
    ("dense", np.s_[-5]),
    ("dense", np.s_[3, 1000:1100]),
    ("dense", np.s_[::-3, 5:9]),
    ("dense", np.s_[500:530, 380:390]),        # across 4 tiles
    ("dense", np.s_[..., 1535]),
    ("dense", np.s_[5:5]),                     # empty
    ("conv", np.s_[1, :, 10:20, 5:50:3]),
    ("conv", np.s_[..., 7]),
    ("conv", np.s_[:, 2]),
    ("conv", np.s_[2, 1, 63, 95]),
    ("conv", np.s_[::-1, :, :, 90:]),
    ("mask", np.s_[5:60, 30]),
    ("mask", np.s_[40:300:7, 60:70]),
    ("mask", np.s_[...]),
    ("mask", np.s_[:, ::-5]),
    ("bias", np.s_[10:20]),
    ("bias", np.s_[::-2]),
    ("step", np.s_[...]),
    # One position by a step past int64 (an OverflowError with the side list,
    # a TypeError in a moving view's placement):
    ("mask", np.s_[::2**63, 3]),
    ("dense", np.s_[5:9:2**70]),
    ("conv", np.s_[::2**64]),
]


@pytest.mark.parametrize("name, index", SLICES, ids=[f"{n}{i}" for n, i in SLICES])
def test_get_slice_equals_restore_sliced(saved, name, index):
    path, restored = saved
    with jaxjpeg.open(path) as f:
        piece = f.get_slice(name)
        assert piece.shape == TREE[name].shape and piece.dtype == TREE[name].dtype
        assert piece.get_shape() == list(TREE[name].shape)   # as safetensors' slices
        assert piece.get_dtype() == export.SAFETENSORS_DTYPES[TREE[name].dtype.name]
        value = piece[index]
        again = f.get_slice(name, index)
    assert bits(value) == bits(restored[name][index])
    assert bits(again) == bits(value)


def test_get_slice_reads_only_the_tiles_it_touches(saved, blobs_read):
    path, _ = saved
    i = leaf_index(path, "dense")
    tiles = lambda names: {n for n in names if n.startswith(f"leaf{i}/tile")}  # noqa: E731
    with jaxjpeg.open(path) as f:
        info = f.info("dense")
        blobs_read.clear()
        f.get_slice("dense")[10:20, 100:190]   # inside tile (0, 0)
        assert tiles(blobs_read) == {layout.tile_blob(i, 0)}
        assert all(n.startswith(f"leaf{i}/") for n in blobs_read)
        blobs_read.clear()
        f.get_slice("dense")[100:110, :]       # one tile row: 8 of the 16 tiles
        assert len(tiles(blobs_read)) == 8 < info.tiles
        blobs_read.clear()
        stats = jaxjpeg.RestoreStats()
        f.get_slice("dense", np.s_[700:702, 1100], stats=stats)  # tile (1, 5)
        assert tiles(blobs_read) == {layout.tile_blob(i, 13)}
        assert sum(stats.payload_bytes_per_device.values()) == blob_sizes(path)[
            layout.tile_blob(i, 13)]
        blobs_read.clear()
        f.get_slice("dense")[7:7, 3]           # empty: nothing read
        assert blobs_read == []


# ---------------------------------------------------------------- errors


def test_unknown_names_are_key_errors(saved):
    path, _ = saved
    with jaxjpeg.open(path) as f:
        for call in (f.get, f.info, f.get_slice):
            with pytest.raises(KeyError, match="no leaf 'params/nope'"):
                call("params/nope")


@pytest.mark.parametrize("index", [
    np.s_[0, 0, 0], np.s_[1024], np.s_[:, -1537], np.s_[::0], np.s_[None],
    np.s_[True], np.s_[[1, 2]], np.s_[np.arange(3)], np.s_[..., ...], np.s_["a"],
    np.s_[1.5],
], ids=str)
def test_bad_indices_are_index_errors(saved, index):
    path, _ = saved
    with jaxjpeg.open(path) as f:
        with pytest.raises(IndexError):
            f.get_slice("dense")[index]
        with pytest.raises(IndexError):
            f.get_slice("bias")[(index,) if not isinstance(index, tuple) else index + (0,)]


def test_a_closed_reader_refuses_reads(saved):
    path, _ = saved
    with jaxjpeg.open(path) as f:
        pass
    with pytest.raises(ValueError):
        f.get("dense")
    assert math.prod(f.info("dense").shape) == TREE["dense"].size  # the header stays known


def test_a_slice_is_refused_only_for_its_own_kept_values(tmp_path):
    """Found by review: get_slice(dtype=bfloat16) of rows 0:10 was refused for
    a kept -finfo.max in row 77; the rows holding it still are."""
    import jax.numpy as jnp

    k = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    k[77, 5] = -np.finfo(np.float32).max
    jaxjpeg.save(tmp_path / "s.jjpg", {"k": k})
    with jaxjpeg.open(tmp_path / "s.jjpg") as f:
        rows = f.get_slice("k", dtype=jnp.bfloat16)[0:10]
        assert rows.dtype == jnp.bfloat16 and rows.shape == (10, 256)
        with pytest.raises(ValueError, match="would become inf"):
            f.get_slice("k", dtype=jnp.bfloat16)[70:80]
        with pytest.raises(ValueError, match="would become inf"):
            f.get("k", dtype=jnp.bfloat16)


def test_integers_that_would_round_as_floats_are_refused(tmp_path):
    """Found by review: "a raw leaf restores its values or raises", but an
    int32 16777217 restored as float32 came back 16777216 (ids, PRNG key
    data asked for as float32); integers a float holds still restore. (get's
    dtype leaves integer leaves theirs.)"""
    import jax.numpy as jnp

    tree = {"ids": np.array([1, 16777217], np.int32), "small": np.arange(-5, 2050, dtype=np.int32),
            "keys": np.array([4294967295, 7], np.uint32),
            "big": np.array([1, 2**53 + 1], np.int64)}   # review: compared as float64, let by
    path = tmp_path / "i.jjpg"
    jaxjpeg.save(path, tree)
    for name, dtype in (("ids", np.float32), ("keys", np.float32), ("small", jnp.float16),
                        ("big", np.float32)):
        with pytest.raises(ValueError, match=f"'{name}'.*would round as"):
            jaxjpeg.restore(path, target={name: jax.ShapeDtypeStruct(tree[name].shape, dtype)})
    fine = jaxjpeg.restore(path, target={"small": jax.ShapeDtypeStruct((2055,), np.float32)})
    np.testing.assert_array_equal(np.asarray(fine["small"]), tree["small"].astype(np.float32))
    assert np.asarray(jaxjpeg.restore(path, paths="ids")["ids"])[1] == 16777217


def test_get_dtype_names_the_saved_dtype(tmp_path):
    """As safetensors' slices: an int64 leaf is "I64" though indexing it
    without x64 gives int32 (found by review)."""
    jaxjpeg.save(tmp_path / "i.jjpg", {"n": np.arange(6, dtype=np.int64)})
    with jaxjpeg.open(tmp_path / "i.jjpg") as f:
        assert f.get_slice("n").get_dtype() == "I64"
