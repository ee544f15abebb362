"""Tied leaves (jaxjpeg.ties): one tensor under two names is stored once.

Found by review: a PyTorch state dict's tied input embedding and output
projection (one tensor, ``tensor.numpy()`` of each the same memory) were
stored twice, and a byte target coded the copies apart: the restored
model's tied weights differed.
"""


import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import checkpoint_reader as ckr, format as fmt
from test_checkpoint_corruption import rewrite


def _tied_tree(seed=0):
    rng = np.random.default_rng(seed)
    embed = (0.02 * rng.normal(size=(2048, 128))).astype(np.float32)
    return {"embed_tokens.weight": embed,
            "layers.0.mlp.weight": (0.02 * rng.normal(size=(512, 128))).astype(np.float32),
            "lm_head.weight": embed}   # a state dict's tied weight: one array, two names


def _version(path) -> int:
    with fmt.ContainerReader(path) as r:
        return r.metadata["version"]


@pytest.mark.parametrize("options", [{}, {"target_ratio": 8}, {"error_bound": 0.01}])
def test_a_tied_weight_is_stored_once_and_restores_equal(tmp_path, options):
    tree = _tied_tree()
    path = tmp_path / "tied.jjpg"
    report = jaxjpeg.save(path, tree, **options)
    # the table under its head's name alone: weighed as a head, as the tied
    # one is (jaxjpeg.embeddings)
    untied = {k: v for k, v in tree.items() if k != "embed_tokens.weight"}
    alone = jaxjpeg.save(tmp_path / "alone.jjpg", untied,
                         **({} if "target_ratio" in options else options))
    head = next(leaf for leaf in report.leaves if leaf.path == "lm_head.weight")
    assert head.stored_bytes == 0 and "stored once with embed_tokens.weight" in head.note
    # the whole tree's target: the one copy takes the bytes both took
    if options.get("target_ratio"):
        assert report.ratio_vs_float32 == pytest.approx(8, rel=0.02)
    else:   # the same codings as a tree without the second name, a record more
        assert abs(report.file_bytes - alone.file_bytes) < 200
    restored = jaxjpeg.restore(path)
    assert np.array_equal(np.asarray(restored["lm_head.weight"]),
                          np.asarray(restored["embed_tokens.weight"]))
    error = np.linalg.norm(np.asarray(restored["lm_head.weight"]) - tree["lm_head.weight"])
    assert error < options.get("error_bound", 0.1) * np.linalg.norm(tree["lm_head.weight"])
    with jaxjpeg.open(path) as f:
        # its bytes are the first's, counted there (review: info() gave both
        # the first's, their sum 1.85x the file)
        info = f.info("lm_head.weight")
        assert info.tied_to == "embed_tokens.weight" and info.stored_bytes == 0
        assert sum(f.info(k).stored_bytes for k in f.keys()) < report.file_bytes
        assert np.array_equal(f.get("lm_head.weight"), np.asarray(restored["lm_head.weight"]))
        assert np.array_equal(f.get_slice("lm_head.weight")[100:200],
                              np.asarray(restored["lm_head.weight"])[100:200])
    only = jaxjpeg.restore(path, target={"lm_head.weight": tree["lm_head.weight"]})
    assert np.array_equal(np.asarray(only["lm_head.weight"]),
                          np.asarray(restored["lm_head.weight"]))
    loaded = jaxjpeg.decode(jaxjpeg.load(path))
    assert np.array_equal(np.asarray(loaded["lm_head.weight"]),
                          np.asarray(restored["lm_head.weight"]))
    assert _version(path) == ckr.TIED_VERSION
    assert _version(tmp_path / "alone.jjpg") == ckr.CHECKPOINT_VERSION   # readable as before


def test_equal_values_in_other_memory_are_tied_too(tmp_path):
    tree = _tied_tree()
    tree["lm_head.weight"] = tree["lm_head.weight"].copy()
    tree["other"] = tree["embed_tokens.weight"].copy()
    tree["other"][5, 7] += 1e-3   # one value apart: not tied
    report = jaxjpeg.save(tmp_path / "t.jjpg", tree)
    stored = {leaf.path: leaf.stored_bytes for leaf in report.leaves}
    assert stored["lm_head.weight"] == 0 and stored["other"] > 0
    restored = jaxjpeg.restore(tmp_path / "t.jjpg")
    assert not np.array_equal(np.asarray(restored["other"]),
                              np.asarray(restored["embed_tokens.weight"]))


def test_a_name_that_keeps_its_own_coding_is_not_tied(tmp_path):
    """A lossless pattern or a sensitivity naming one copy: each keeps its
    own (a tie would give the lossless name the other's coding)."""
    tree = _tied_tree()
    path = tmp_path / "t.jjpg"
    report = jaxjpeg.save(path, tree, policy=jaxjpeg.Policy(lossless=("lm_head.weight",)))
    assert all(leaf.stored_bytes > 0 for leaf in report.leaves)
    restored = jaxjpeg.restore(path)
    assert np.array_equal(np.asarray(restored["lm_head.weight"]), tree["lm_head.weight"])
    report = jaxjpeg.save(path, tree, sensitivity={"lm_head.weight": 4.0})
    assert all(leaf.stored_bytes > 0 for leaf in report.leaves)


def test_optimizer_moments_and_small_leaves_are_not_tied(tmp_path):
    """Moments pair by name (a centered second moment is stored against its
    first); small leaves are not worth the comparison."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(256, 64)).astype(np.float32)
    nu = np.square(rng.normal(size=(256, 64))).astype(np.float32) * 1e-4
    tree = {"params": {"w": w, "v": w},
            "opt_state": {"mu": {"w": w * 1e-2, "v": w * 1e-2}, "nu": {"w": nu, "v": nu}},
            "b": np.ones(64, np.float32), "c": np.ones(64, np.float32)}
    report = jaxjpeg.save(tmp_path / "t.jjpg", tree)
    tied = {leaf.path for leaf in report.leaves if leaf.stored_bytes == 0}
    assert tied == {"params/w"}, tied   # tree order: params/v comes first


def _edited(src, dst, **fields):
    def edit(meta):
        meta["leaves"][2].update(fields)
    return rewrite(src, dst, edit_meta=edit)


def test_damaged_tied_records_are_refused_clearly(tmp_path):
    src = tmp_path / "t.jjpg"
    jaxjpeg.save(src, _tied_tree())
    with ckr.Checkpoint(src) as c:
        assert [leaf.tied_to for leaf in c.leaves] == [None, None, 0]
    for bad in (2, 3, -1, "0", 0.0, None, True):
        with pytest.raises(fmt.FormatError, match="bad 'tied_to'"):
            jaxjpeg.restore(_edited(src, tmp_path / "b.jjpg", tied_to=bad))
    with pytest.raises(fmt.FormatError, match="tied to leaf 1 of another shape"):
        jaxjpeg.restore(_edited(src, tmp_path / "s.jjpg", tied_to=1))
    with pytest.raises(fmt.FormatError, match="tied to leaf 0 of another shape or dtype"):
        jaxjpeg.restore(_edited(src, tmp_path / "d.jjpg", dtype="float16"))
    # key data restores as keys only where both records say so (review: a
    # uint32 leaf tied to a key leaf came back as typed keys)
    import jax
    keyed = tmp_path / "k.jjpg"
    jaxjpeg.save(keyed, {"a": jax.random.split(jax.random.key(0), 600),
                         "b": np.zeros((600, 2), np.uint32), "c": np.ones(3, np.float32)})

    def tie_b_to_a(meta):
        meta["leaves"][1].update(kind="tied", tied_to=0)
        for k in ("deflated", "stored", "exact"):
            meta["leaves"][1].pop(k, None)
    with pytest.raises(fmt.FormatError, match="PRNG key implementation"):
        jaxjpeg.restore(rewrite(keyed, tmp_path / "kb.jjpg", edit_meta=tie_b_to_a))
    # a file of a newer checkpoint version: refused by name, not as damage
    def newer(meta):
        meta["version"] = ckr.READABLE_VERSIONS[-1] + 1
    with pytest.raises(fmt.FormatError, match="checkpoint version .* is not supported"):
        jaxjpeg.restore(rewrite(src, tmp_path / "n.jjpg", edit_meta=newer))


def test_a_users_encoder_codes_every_name(tmp_path):
    """Found by review: under encoder= the tied copy was never offered to
    the encoder, which asked for quality 95 on lm_head and 10 on the
    embedding: lm_head came back with the embedding's coding, 13x the error."""
    from jaxjpeg import codec
    tree = _tied_tree()
    calls = []

    def encoder(name, array):
        calls.append(name)
        return codec.encode_tensor(array, quality=95 if "lm_head" in name else 10)

    jaxjpeg.save(tmp_path / "e.jjpg", tree, encoder=encoder)
    assert "lm_head.weight" in calls
    restored = jaxjpeg.restore(tmp_path / "e.jjpg")
    head = np.asarray(restored["lm_head.weight"])
    embed = np.asarray(restored["embed_tokens.weight"])
    original = tree["lm_head.weight"]
    assert np.linalg.norm(head - original) < 0.2 * np.linalg.norm(embed - original)


def test_inspect_names_the_leaf_a_tied_one_reads(tmp_path, capsys):
    from jaxjpeg.cli import main
    path = tmp_path / "t.jjpg"
    jaxjpeg.save(path, _tied_tree())
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("lm_head.weight"))
    assert line.split()[3] == "tied(embed_tokens.weight)" and line.split()[6] == "0", out
    import flax.serialization   # a msgpack is read whole: its copies tie
    (tmp_path / "t.msgpack").write_bytes(flax.serialization.msgpack_serialize(_tied_tree()))
    assert main(["compress", str(tmp_path / "t.msgpack"), str(tmp_path / "m.jjpg")]) == 0
    out = capsys.readouterr().out
    assert "(2 JPEG-coded, 0 quantized, 0 exact, 1 tied to another)" in out, out
    assert main(["export", str(path), str(tmp_path / "t.safetensors")]) == 0
    from safetensors.numpy import load_file
    exported = load_file(tmp_path / "t.safetensors")
    assert np.array_equal(exported["lm_head.weight"], exported["embed_tokens.weight"])


def test_a_tied_leaf_is_decoded_once_and_restored_as_its_own_array(tmp_path):
    """Review: restore read and decoded a tied leaf's blobs once per name.
    Now once (the payload handed to the device counts the embedding once),
    and each name gets its own array: donating one must leave the other."""
    import jax
    tree = _tied_tree()
    path = tmp_path / "tied.jjpg"
    jaxjpeg.save(path, tree)
    # the table under its head's name alone: weighed as a head, as the tied
    # one is (jaxjpeg.embeddings)
    untied = {k: v for k, v in tree.items() if k != "embed_tokens.weight"}
    jaxjpeg.save(tmp_path / "alone.jjpg", untied)
    tied_stats, alone_stats = jaxjpeg.RestoreStats(), jaxjpeg.RestoreStats()
    out = jaxjpeg.restore(path, stats=tied_stats)
    jaxjpeg.restore(tmp_path / "alone.jjpg", stats=alone_stats)
    assert tied_stats.payload_bytes_per_device == alone_stats.payload_bytes_per_device
    np.testing.assert_array_equal(out["lm_head.weight"], out["embed_tokens.weight"])
    assert out["lm_head.weight"] is not out["embed_tokens.weight"]
    jax.jit(lambda x: x + 1, donate_argnums=0)(out["lm_head.weight"]).block_until_ready()
    np.testing.assert_array_equal(np.asarray(out["embed_tokens.weight"]),
                                  np.asarray(jaxjpeg.restore(path)["embed_tokens.weight"]))
    as_float16 = jaxjpeg.restore(path, dtype=np.float16)
    assert as_float16["lm_head.weight"].dtype == np.float16


def test_extract_writes_a_tied_leafs_tiles_once(tmp_path, capsys):
    """Found by review: extract wrote the tied head's tiles again, byte
    copies of the embedding's ("28 JPEG files" from a file of 22 tiles)."""
    from jaxjpeg.cli import main
    path = tmp_path / "t.jjpg"
    jaxjpeg.save(path, _tied_tree())
    with ckr.Checkpoint(path) as ckpt:
        tiles = sum(len(leaf.tiles) for leaf in ckpt.leaves
                    if leaf.kind == "jpeg" and leaf.tied_to is None)
    assert main(["extract", str(path), str(tmp_path / "all")]) == 0
    assert len(list((tmp_path / "all").iterdir())) == tiles
    assert not any(p.name.startswith("lm_head") for p in (tmp_path / "all").iterdir())
    assert main(["extract", str(path), str(tmp_path / "head"), "--leaf", "lm_head.weight"]) == 0
    assert any(p.name.startswith("lm_head") for p in (tmp_path / "head").iterdir())


def test_extract_keeps_the_leaves_order_with_a_tie(tmp_path):
    """Found by review of the fix above: dropping tied leaves reversed the
    others' order, and the plain file name went to another leaf of the same
    name stem (a/b's tiles written as a.b.leaf0, a.b's as a.b)."""
    from jaxjpeg.cli import main
    rng = np.random.default_rng(0)
    w, x, z = (rng.normal(size=(64, 64)).astype(np.float32) for _ in range(3))
    names = {}
    for label, tree in (("untied", {"a": {"b": w}, "a.b": x, "c": z}),
                        ("tied", {"a": {"b": w}, "a.b": x, "c": w})):
        path = tmp_path / f"{label}.jjpg"
        jaxjpeg.save(path, tree)
        assert main(["extract", str(path), str(tmp_path / label)]) == 0
        names[label] = {p.name: p.read_bytes() for p in (tmp_path / label).iterdir()}
    assert set(names["tied"]) == set(names["untied"]) - {"c.tile0.jpg"}
    assert names["tied"]["a.b.tile0.jpg"] == names["untied"]["a.b.tile0.jpg"]


def test_verify_names_a_tied_leaf_whose_first_is_damaged(tmp_path, capsys):
    """Found by review: verify checks a tied leaf's blobs with its first's
    and said nothing of the tied name when they were damaged (a tile that
    no longer decodes, its checksum valid): restoring it fails too."""
    from jaxjpeg.cli import main
    path = tmp_path / "t.jjpg"
    jaxjpeg.save(path, _tied_tree())

    def garble(blobs):
        name = next(n for n in blobs if n.startswith("leaf0/tile"))
        blobs[name] = blobs[name][:len(blobs[name]) // 2]
    damaged = rewrite(path, tmp_path / "d.jjpg", edit_blobs=garble)
    assert main(["verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert "BAD embed_tokens.weight: " in out, out
    assert "BAD lm_head.weight: tied to embed_tokens.weight, which is damaged" in out, out
    assert main(["verify", str(path)]) == 0


def test_a_hundred_equal_leaves_tie_to_one(tmp_path):
    """Found by review of a cap of 64 ties a leaf (since removed): 100
    LoRA B matrices initialised to zero are one leaf and 99 ties, which a
    file from before the cap held and the capped reader refused as damaged.
    Each restores as its own array (a donated one leaves the others)."""
    tree = {f"layers_{i}": {"lora_B": np.zeros((1024, 16), np.float32),
                            "lora_A": np.full((16, 1024), 0.01 * (i + 1), np.float32)}
            for i in range(100)}
    path = tmp_path / "lora.jjpg"
    jaxjpeg.save(path, tree)
    with ckr.Checkpoint(path) as c:
        tied = [leaf for leaf in c.leaves if leaf.tied_to is not None]
        assert len(tied) == 99 and {leaf.path.split("/")[1] for leaf in tied} == {"lora_B"}
    got = jaxjpeg.restore(path)
    arrays = {id(got[f"layers_{i}"]["lora_B"]) for i in range(100)}
    assert len(arrays) == 100
    for i in range(100):
        assert not np.any(np.asarray(got[f"layers_{i}"]["lora_B"]))
