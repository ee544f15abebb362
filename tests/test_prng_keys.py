"""Typed PRNG key arrays in checkpoints: stored as their key data, exactly,
restored as keys (they were refused; Orbax's own checkpointers keep them)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxjpeg
from jaxjpeg import format as fmt
from test_checkpoint_corruption import rewrite


class Net(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(64, 128, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.dense(x))


def _key_data(tree):
    return [np.asarray(jax.random.key_data(k)) for k in jax.tree.leaves(tree)
            if jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)]


def test_nnx_state_with_dropout_rngs_round_trips(tmp_path):
    model = Net(nnx.Rngs(0))
    state = nnx.state(model)
    path = tmp_path / "nnx.jjpg"
    jaxjpeg.save(path, state)

    restored = jaxjpeg.restore(path, target=jax.eval_shape(lambda: state))
    assert [d.tolist() for d in _key_data(restored)] == [d.tolist() for d in _key_data(state)]
    twin = Net(nnx.Rngs(1))
    nnx.update(twin, restored)
    x = jnp.ones((4, 64))
    # the restored key draws the same dropout mask (the kernel is lossy: compare masks)
    assert np.array_equal(np.asarray(model(x)) == 0, np.asarray(twin(x)) == 0)

    plain = jaxjpeg.restore(path)   # no target: keys come back as keys too
    key = plain["drop"]["rngs"]["key"]["value"]
    assert key.dtype == state["drop"]["rngs"]["key"].get_value().dtype and key.shape == ()


@pytest.mark.parametrize("options", [{}, {"target_ratio": 8}, {"error_bound": 0.05}])
def test_keys_beside_batchnorm_are_exact_under_every_rate(tmp_path, options):
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(32, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(64)(x.reshape(x.shape[0], -1))

    variables = CNN().init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)))
    keys = jax.random.split(jax.random.key(7, impl="rbg"), (3, 2))
    tree = {**variables, "rngs": {"dropout": keys, "params": jax.random.key(1)}}
    path = tmp_path / "k.jjpg"
    jaxjpeg.save(path, tree, **options)
    got = jaxjpeg.restore(path)
    assert got["rngs"]["dropout"].dtype == keys.dtype and got["rngs"]["dropout"].shape == (3, 2)
    np.testing.assert_array_equal(jax.random.key_data(got["rngs"]["dropout"]),
                                  jax.random.key_data(keys))
    np.testing.assert_array_equal(jax.random.key_data(got["rngs"]["params"]),
                                  jax.random.key_data(jax.random.key(1)))


@pytest.mark.parametrize("options", [{"target_ratio": 8}, {"bits_per_weight": 3}])
def test_key_data_that_deflates_stays_raw_under_byte_targets(tmp_path, options):
    """Found by review: under a byte target rbg keys and a population's keys
    made from seeds 0..63 (data that deflates) were stored deflated, which
    the key reader does not read: the save succeeded, no restore could."""
    w = np.random.default_rng(0).normal(0, 0.02, (256, 256)).astype(np.float32)
    tree = {"w": w, "rbg": jax.random.key(1, impl="rbg"),
            "population": jax.vmap(jax.random.key)(jnp.arange(64))}
    jaxjpeg.save(tmp_path / "k.jjpg", tree, **options)
    got = jaxjpeg.restore(tmp_path / "k.jjpg")
    for name in ("rbg", "population"):
        np.testing.assert_array_equal(jax.random.key_data(got[name]),
                                      jax.random.key_data(tree[name]), err_msg=name)


def test_every_reader_gives_keys(tmp_path):
    keys = jax.random.split(jax.random.key(5), (3, 4))
    path = tmp_path / "k.jjpg"
    jaxjpeg.save(path, {"w": jnp.ones((64, 64)), "keys": keys})
    want = np.asarray(jax.random.key_data(keys))
    loaded = jaxjpeg.load(path)["keys"]
    assert loaded.dtype == keys.dtype
    np.testing.assert_array_equal(jax.random.key_data(loaded), want)
    with jaxjpeg.open(path) as f:
        assert f.info("keys").prng_impl == "threefry2x32" and f.info("keys").shape == (3, 4, 2)
        np.testing.assert_array_equal(jax.random.key_data(f.get("keys")), want)
        piece = f.get_slice("keys")
        assert piece.shape == (3, 4) and piece.dtype == keys.dtype and len(piece) == 3
        np.testing.assert_array_equal(jax.random.key_data(piece[1:, 2]), want[1:, 2])
        np.testing.assert_array_equal(jax.random.key_data(piece[..., 3]), want[:, 3])
        assert piece.get_dtype() == "U32"   # its key data's, as safetensors names it
        for outside in (3, -4, (0, 4)):   # jax clamps these (found by review)
            with pytest.raises(IndexError):
                piece[outside]
        # steps past int64, as every other leaf takes them (review: a TypeError)
        for index in (np.s_[1:2:2**65, ::-2**64], np.s_[::-1, -1]):
            np.testing.assert_array_equal(jax.random.key_data(piece[index]), want[index])
    only = jaxjpeg.restore(path, paths=["keys"])
    np.testing.assert_array_equal(jax.random.key_data(only["keys"]), want)


def test_targets_ask_for_keys_or_their_data(tmp_path):
    keys = jax.random.split(jax.random.key(5), 3)
    path = tmp_path / "k.jjpg"
    jaxjpeg.save(path, {"keys": keys, "count": np.uint32(4) * np.ones(3, np.uint32)})
    data = jaxjpeg.restore(path, target={"keys": jax.ShapeDtypeStruct((3, 2), jnp.uint32)})
    np.testing.assert_array_equal(data["keys"], jax.random.key_data(keys))   # as data
    placed = jaxjpeg.restore(path, target={
        "keys": jax.sharding.SingleDeviceSharding(jax.devices()[0])})
    assert placed["keys"].dtype == keys.dtype   # a sharding: as saved
    with pytest.raises(ValueError, match="keys: target key<fry>\\[4\\] != saved key<fry>\\[3\\]"):
        jaxjpeg.restore(path, target={"keys": jax.random.split(jax.random.key(0), 4)})
    with pytest.raises(ValueError, match="target key<rbg>\\[3\\] != saved key<fry>\\[3\\]"):
        jaxjpeg.restore(path, target={"keys": jax.random.split(jax.random.key(0, impl="rbg"),
                                                               3)})
    with pytest.raises(ValueError, match="count: the target asks for a PRNG key array"):
        jaxjpeg.restore(path, target={"count": keys})
    # found by review: a float target of the keys' own shape was told "saved shape (3, 2)"
    with pytest.raises(ValueError, match=r"keys: target shape \(3,\) != saved PRNG keys "
                                         r"key<fry>\[3\] \(their data: uint32\[3, 2\]\)"):
        jaxjpeg.restore(path, target={"keys": jax.ShapeDtypeStruct((3,), jnp.float32)})


def _edit_key_record(src, dst, **fields):
    def edit(meta):
        record = next(r for r in meta["leaves"] if r["path"][-1][1] == "keys")
        record.update(fields)
    return rewrite(src, dst, edit_meta=edit)


def test_damaged_key_records_are_refused_clearly(tmp_path):
    src = tmp_path / "k.jjpg"
    jaxjpeg.save(src, {"keys": jax.random.split(jax.random.key(5), 3),
                       "w": np.ones(5, np.float32)})
    for bad in (7, "", "x" * 65):
        with pytest.raises(fmt.FormatError, match="bad PRNG key record"):
            jaxjpeg.restore(_edit_key_record(src, tmp_path / "bad.jjpg", prng_impl=bad))
    with pytest.raises(fmt.FormatError, match="bad PRNG key record"):
        jaxjpeg.restore(_edit_key_record(src, tmp_path / "f.jjpg", dtype="float32"))
    unknown = _edit_key_record(src, tmp_path / "u.jjpg", prng_impl="no-such-rng")
    with pytest.raises(ValueError, match="'keys': its saved PRNG key data \\[3, 2\\] is not a "
                                         "key array of implementation 'no-such-rng' \\(no "
                                         "implementation of that name is registered"):
        jaxjpeg.restore(unknown)
    assert jaxjpeg.open(unknown).info("w").shape == (5,)   # the rest of the file reads
    assert jaxjpeg.restore(unknown, paths=["w"])["w"].shape == (5,)
    from jaxjpeg.orbax import JaxjpegCheckpointHandler
    meta = JaxjpegCheckpointHandler(filename=unknown.name).metadata(tmp_path)
    assert meta["keys"] == jax.ShapeDtypeStruct((3, 2), jnp.uint32)   # as the data it is
    short = _edit_key_record(src, tmp_path / "s.jjpg", prng_impl="rbg")   # rbg keys are 4 words
    with pytest.raises(ValueError, match="is not a key array of implementation 'rbg' \\(its "
                                         "keys hold \\[4\\] words\\)"):
        jaxjpeg.load(short)
    with fmt.ContainerReader(src) as r:   # what is stored: the key data, raw, and the name
        record = next(x for x in json.loads(json.dumps(r.metadata))["leaves"]
                      if x["path"][-1][1] == "keys")
    assert record["prng_impl"] == "threefry2x32" and record["dtype"] == "uint32"
    assert record["kind"] == "raw" and record["shape"] == [3, 2]


def test_orbax_checkpoints_keys_stay_keys_through_the_cli(tmp_path, capsys):
    """Orbax stores a key array as its data and names the implementation in
    its array metadata: ``jaxjpeg compress`` read such a leaf as uint32 data."""
    ocp = pytest.importorskip("orbax.checkpoint")
    from jaxjpeg import cli
    from range_server import RangeServer

    keys = jax.random.split(jax.random.key(2, impl="unsafe_rbg"), (2, 3))
    tree = {"params": {"w": np.ones((64, 64), np.float32)},
            "rngs": {"dropout": keys, "params": jax.random.key(9)}}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "item", tree)
    local, web = tmp_path / "local.jjpg", tmp_path / "web.jjpg"
    assert cli.main(["compress", str(tmp_path / "item"), str(local)]) == 0
    with RangeServer(tmp_path) as server:
        assert cli.main(["compress", server.url("item"), str(web)]) == 0
    assert cli.main(["inspect", str(local)]) == 0
    assert "key:unsafe_rbg" in capsys.readouterr().out   # the shape shown is the data's
    for path in (local, web):
        got = jaxjpeg.restore(path)["rngs"]
        assert got["dropout"].dtype == keys.dtype and got["dropout"].shape == (2, 3)
        np.testing.assert_array_equal(jax.random.key_data(got["dropout"]),
                                      jax.random.key_data(keys))
        assert got["params"].dtype == jax.random.key(0).dtype


def test_keys_no_reader_could_wrap_are_refused_when_saved(tmp_path):
    """Review: a key of a jax.extend.random.define_prng_impl implementation
    was saved under its tag, which no reader resolves: saved, never restored."""
    import jax.extend.random as jer

    def wrapped(d):
        return jax.random.wrap_key_data(d, impl="threefry2x32")
    spec = jer.define_prng_impl(
        key_shape=(2,), seed=lambda s: jax.random.key_data(jax.random.key(s)),
        split=lambda k, shape: jax.random.key_data(jax.random.split(wrapped(k), shape)),
        random_bits=lambda k, bits, shape: jax.random.bits(wrapped(k), shape,
                                                           jnp.dtype(f"uint{bits}")),
        fold_in=lambda k, d: jax.random.key_data(jax.random.fold_in(wrapped(k), d)),
        name="custom_rng", tag="cst")
    with pytest.raises(ValueError, match="'rngs/k'.*not registered with jax by that name"):
        jaxjpeg.save(tmp_path / "c.jjpg", {"rngs": {"k": jax.random.key(1, impl=spec)}})
    assert not (tmp_path / "c.jjpg").exists()


def test_a_damaged_orbax_key_record_is_the_sources_error(tmp_path, capsys):
    """Review: Orbax metadata naming a float leaf a key was written into the
    file as is, and the reader then refused the whole file."""
    ocp = pytest.importorskip("orbax.checkpoint")
    from jaxjpeg import cli

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "item", {"w": np.ones((64, 64), np.float32),
                                       "k": jax.random.key(0)})
    listing = tmp_path / "item" / "array_metadatas" / "process_0"
    meta = json.loads(listing.read_text())
    meta["array_metadatas"].append({"array_metadata": {
        "param_name": "w", "ext_metadata": {"random_key_impl": "threefry2x32"}}})
    listing.write_text(json.dumps(meta))
    assert cli.main(["compress", str(tmp_path / "item"), str(tmp_path / "o.jjpg")]) == 1
    assert "'w': float32[64, 64] is not PRNG key data" in capsys.readouterr().err
    assert not (tmp_path / "o.jjpg").exists()
