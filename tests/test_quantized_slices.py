"""Leaves quantized per channel (jaxjpeg.quantized_slices): stored as their codes.

Found by review: weights fake-quantized to 4 bits per output channel (QAT,
dequantized QDQ exports) were JPEG-coded, a third of their codes moved at
the default save and at 8x, where their information is 4 bits a weight.
"""

import json
import warnings

import ml_dtypes
import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import checkpoint_reader as ckr
from jaxjpeg import cli, quantized_slices
from jaxjpeg import format as fmt

from test_checkpoint_corruption import rewrite


def per_channel(w, axis, levels=16, style="round", zero_point=False, dtype=np.float32):
    """``w`` fake-quantized per slice along ``axis``: ``round(w / s) * s`` as
    JAX code writes it (-0.0 where a small negative rounds to 0), or
    PyTorch's integer codes times the scale ("torch": +0.0); ``zero_point``:
    asymmetric, ``(k - z) * s`` with k in [0, levels); scales and values in
    ``dtype``."""
    others = tuple(a for a in range(w.ndim) if a != axis)
    if zero_point:
        low, high = w.min(axis=others, keepdims=True), w.max(axis=others, keepdims=True)
        s = ((high - low) / (levels - 1)).astype(np.float32)
        z = np.round(-low / s)
        k = np.clip(np.round(w / s) + z, 0, levels - 1)
        return ((k - z).astype(np.int32) * s).astype(np.float32)
    s = (np.max(np.abs(w), axis=others, keepdims=True) / (levels // 2 - 1)).astype(dtype)
    s = s.astype(np.float32)
    k = np.clip(np.round(w / s), -(levels // 2), levels // 2 - 1)
    if style == "torch":
        k = k.astype(np.int32)
    return (k * s).astype(dtype)


def _bits(x):
    return np.asarray(x).view(f"u{np.asarray(x).dtype.itemsize}")


def _rng_weights(shape, scale_axis, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.normal(size=shape[scale_axis]))
    shaped = [1] * len(shape)
    shaped[scale_axis] = -1
    return (rng.standard_normal(shape) * scales.reshape(shaped)).astype(np.float32)


CASES = {
    "flax_dense_out": ((512, 1024), 1, {}),
    "torch_linear_out": ((1024, 512), 0, {"style": "torch"}),
    "torch_conv_out": ((256, 128, 3, 3), 0, {"style": "torch"}),
    "flax_conv_out": ((3, 3, 128, 256), 3, {}),
    "asymmetric": ((512, 768), 0, {"zero_point": True}),
    "ternary_rows": ((256, 512), 0, {"levels": 4}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("options", [{}, {"target_ratio": 8}])
def test_leaves_quantized_per_channel_restore_bit_for_bit(tmp_path, case, options):
    shape, axis, how = CASES[case]
    q = per_channel(_rng_weights(shape, axis), axis, **how)
    path = tmp_path / "q.jjpg"
    report = jaxjpeg.save(path, {"w": q}, **options)
    restored = np.asarray(jaxjpeg.restore(path)["w"])
    np.testing.assert_array_equal(_bits(restored), _bits(q))
    assert q.nbytes / path.stat().st_size > 8.5, path.stat().st_size
    (leaf,) = report.leaves
    assert "quantized per channel" in leaf.note, leaf.note
    with ckr.Checkpoint(str(path)) as c:
        assert c.leaves[0].exact and c.leaves[0].quantized["slice_axis"] == axis
    with jaxjpeg.open(path) as f:
        assert f.info("w").quantized == ("per_slice", axis) and f.info("w").exact


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_leaves_quantized_per_channel(tmp_path, dtype):
    q = per_channel(_rng_weights((256, 512), 0), 0, style="torch", dtype=dtype)
    path = tmp_path / "q.jjpg"
    jaxjpeg.save(path, {"w": q})
    restored = np.asarray(jaxjpeg.restore(path)["w"])
    assert restored.dtype == q.dtype
    np.testing.assert_array_equal(_bits(restored), _bits(q))
    assert q.nbytes / path.stat().st_size > 4


def test_a_byte_target_spends_the_rest_on_the_float_leaves(tmp_path):
    """A QAT layer beside float ones: kept exactly, the target still met."""
    rng = np.random.default_rng(1)
    tree = {"quantized": per_channel(_rng_weights((512, 512), 1), 1),
            "float": rng.standard_normal((512, 512)).astype(np.float32)}
    path = tmp_path / "q.jjpg"
    jaxjpeg.save(path, tree, target_ratio=8)
    restored = jaxjpeg.restore(path)
    np.testing.assert_array_equal(_bits(restored["quantized"]), _bits(tree["quantized"]))
    raw = sum(v.nbytes for v in tree.values())
    assert abs(path.stat().st_size - raw / 8) < 0.02 * raw / 8, path.stat().st_size


@pytest.mark.parametrize("options", [{"target_ratio": 8}, {"bits_per_weight": 4}])
def test_a_target_below_the_codes_codes_the_leaf(tmp_path, options):
    """Found by review: on slices of 64 values the codes take 4.3-4.6 bits a
    weight, and a target of 4 that had been met was refused. A byte target
    keeps such a leaf exact only where its codes fit its share."""
    q = per_channel(_rng_weights((4096, 64), 0), 0)
    path = tmp_path / "q.jjpg"
    jaxjpeg.save(path, {"w": q})
    assert 8 * path.stat().st_size / q.size > 4.2   # exact, at the default save
    report = jaxjpeg.save(path, {"w": q}, **options)
    assert abs(path.stat().st_size / (q.nbytes / 8) - 1) < 0.02
    assert report.leaves[0].kind == "jpeg"


def test_subnormal_values_raise_no_warnings(tmp_path):
    """Found by review: a float leaf with a few subnormal values made the
    detector divide into overflows (RuntimeWarnings; errors under -W error)."""
    w = np.random.default_rng(4).standard_normal((512, 512)).astype(np.float32)
    w[0, :3] = [1e-40, -2e-42, 5e-39]
    q = per_channel(_rng_weights((256, 512), 0), 0)
    q[7] = np.clip(np.arange(512) % 16 - 8, -8, 7) * np.float32(1e-41)   # a subnormal step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantized_slices.find(w) is None
        assert quantized_slices.find(q)[1][7] == np.float32(1e-41)
        jaxjpeg.save(tmp_path / "w.jjpg", {"w": w, "q": q})
    np.testing.assert_array_equal(_bits(jaxjpeg.restore(tmp_path / "w.jjpg")["q"]), _bits(q))


def test_a_float16_mask_of_the_dtypes_minimum_raises_no_warning(tmp_path):
    """Found by review: a float16 causal mask of finfo(float16).min warned
    "overflow encountered in nextafter" (an error under -W error)."""
    lower = np.tril(np.ones((256, 256), bool))
    mask = np.where(lower, 0, np.finfo(np.float16).min).astype(np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxjpeg.save(tmp_path / "m.jjpg", {"mask": mask})
    np.testing.assert_array_equal(jaxjpeg.restore(tmp_path / "m.jjpg")["mask"], mask)


def test_what_is_not_quantized_per_channel():
    rng = np.random.default_rng(2)
    w = _rng_weights((256, 512), 0)
    assert quantized_slices.find(w) is None                       # float weights
    assert quantized_slices.find(w.astype(ml_dtypes.bfloat16)) is None
    assert quantized_slices.find(per_channel(w, 0, levels=256)) is None   # 8 bits: coded
    q = per_channel(w, 0)
    q[100, 7] += 0.37 * np.abs(q[100][q[100] != 0]).min()   # one value off its row's step
    assert quantized_slices.find(q) is None
    assert quantized_slices.find(per_channel(w, 0)[:, :32]) is None   # too few to repeat
    assert quantized_slices.find(per_channel(w, 0)[0]) is None        # a vector
    assert quantized_slices.find(np.zeros((64, 256), np.float32)) is None   # JPEG's DC
    assert quantized_slices.find(np.full((64, 256), 0.5, np.float32)) is None
    nan = per_channel(w, 0)
    nan[3, 3] = np.nan
    assert quantized_slices.find(nan) is None
    found = quantized_slices.find(per_channel(rng.standard_normal((64, 4096)), 1))
    assert found is not None and found[0] == 1 and found[1].shape == (4096,)


def test_zero_slices_and_sparse_codes(tmp_path):
    """A pruned channel (all zeros, step 1) and mostly-zero codes (the
    sparse coding of the codes) restore bit for bit."""
    q = per_channel(_rng_weights((256, 512), 0), 0)
    q[5] = 0
    q[np.random.default_rng(3).random(q.shape) < 0.7] = 0
    path = tmp_path / "q.jjpg"
    jaxjpeg.save(path, {"w": q})
    np.testing.assert_array_equal(_bits(jaxjpeg.restore(path)["w"]), _bits(q))


def _saved(tmp_path):
    q = per_channel(_rng_weights((128, 256), 0), 0)   # holds -0.0: a sign plane
    assert np.signbit(q[q == 0]).any()
    path = str(tmp_path / "q.jjpg")
    jaxjpeg.save(path, {"w": q})
    return path, q


def _leaf(meta):
    return meta["leaves"][0] if "leaves" in meta else meta["tree"]["leaves"][0]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(slice_axis=2), "bad slice axis"),
    (lambda r: r.update(slice_axis="0"), "bad slice axis"),
    (lambda r: r.update(domain="log2"), "per-slice codes on"),
    (lambda r: r.update(step=2.0), "on a step of 2.0"),   # found by review: values doubled
    (lambda r: r.update(zero_sign_bytes=-1), "bad zero sign size"),
    (lambda r: r.update(zero_sign_bytes=r["zero_sign_bytes"] + 1), "holds"),
])
def test_bad_records_are_refused(tmp_path, edit, message):
    path, _ = _saved(tmp_path)

    def edit_meta(meta):
        leaf = _find_record(meta)
        edit(leaf)
    bad = rewrite(path, str(tmp_path / "bad.jjpg"), edit_meta=edit_meta)
    with pytest.raises((fmt.FormatError, ValueError), match=message):
        jaxjpeg.restore(bad)


def _find_record(meta):
    """The leaf record holding ``slice_axis`` (wherever the header nests it)."""
    stack = [meta]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "slice_axis" in node:
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise AssertionError("no per-slice record: " + json.dumps(meta)[:300])


@pytest.mark.parametrize("damage, message", [
    ("nan_step", "not finite and positive"),
    ("truncated", "fewer than its"),
    ("sign_padding", "padding"),
    ("extra_sign_byte", "bytes of signs"),
    ("half_overflow", "beyond float16's range"),   # found by review: restored inf
])
def test_bad_blobs_are_refused(tmp_path, damage, message):
    path, q = _saved(tmp_path)
    if damage == "half_overflow":
        path = str(tmp_path / "half.jjpg")
        q = per_channel(_rng_weights((128, 256), 0), 0, dtype=np.float16)
        jaxjpeg.save(path, {"w": q})
    with ckr.Checkpoint(path) as c:
        signs = c.leaves[0].quantized["zero_sign_bytes"]
        zeros = int(np.count_nonzero(q == 0))

    def edit_blobs(blobs):
        (name,) = [n for n in blobs if n.startswith("leaf0")]
        data = bytearray(blobs[name])
        if damage == "nan_step":
            data[:4] = np.float32(np.nan).tobytes()
        elif damage == "truncated":
            data = data[:100]
        elif damage == "half_overflow":
            data[:4] = np.float32(1e6).tobytes()
        elif damage == "extra_sign_byte":
            data[4 * q.shape[0] + signs:4 * q.shape[0] + signs] = b"\0"
        else:
            assert zeros % 8, "the plane needs padding bits to set"
            data[4 * q.shape[0] + signs - 1] |= 1
        blobs[name] = bytes(data)
    def edit_meta(meta):
        if damage == "extra_sign_byte":
            _find_record(meta)["zero_sign_bytes"] += 1
    bad = rewrite(path, str(tmp_path / "bad.jjpg"), edit_meta=edit_meta, edit_blobs=edit_blobs)
    with pytest.raises((fmt.FormatError, ValueError), match=message):
        jaxjpeg.restore(bad)


def test_inspect_names_the_coding(tmp_path, capsys):
    path, _ = _saved(tmp_path)
    assert cli.main(["inspect", path]) == 0
    assert "raw-step-per-slice(exact)" in capsys.readouterr().out


def test_few_valued_leaves_still_take_the_per_slice_codes(tmp_path):
    """Found by review: ternary weights from round() (holding -0.0, which the
    leaf's one-step grid cannot restore) fell back to deflated planes, 2.65x
    larger, when leaves of few values stopped being offered the per-slice
    codes."""
    rng = np.random.default_rng(5)
    q = (0.01 * np.clip(np.round(rng.standard_normal((1024, 1024))), -1, 1)).astype(np.float32)
    assert np.signbit(q[q == 0]).any()
    path = tmp_path / "t.jjpg"
    jaxjpeg.save(path, {"w": q})
    np.testing.assert_array_equal(_bits(jaxjpeg.restore(path)["w"]), _bits(q))
    assert 8 * path.stat().st_size / q.size < 2.5


def _pruned_then_quantized(shape, seed=0):
    """Half of each row's weights pruned (the smallest), the rest on 4-bit
    steps of the row's largest: in about a fifth of the rows no weight is
    left at ±1 step."""
    w = _rng_weights(shape, 0, seed)
    s = (np.abs(w).max(axis=1, keepdims=True) / 7).astype(np.float32)
    small = np.abs(w) < np.quantile(np.abs(w), 0.5, axis=1, keepdims=True)
    return (np.clip(np.rint(np.where(small, 0, w) / s), -8, 7) * s).astype(np.float32)


@pytest.mark.parametrize("case", ["pruned", "dead_probe_rows", "bfloat16_cast", "float16_cast"])
def test_grids_the_smallest_magnitude_does_not_give(tmp_path, case):
    """Found by review, each coded lossily where its codes are smaller:
    pruned rows whose smallest code is 2 or more (3.06 bits a weight, exact
    2.79), dead channels at the three probed rows (4.06, exact 3.25), and
    half-precision leaves quantized in float32 and then cast, whose values
    are their codes times a float32 step, rounded (4.04, exact 3.44)."""
    if case == "pruned":
        q = _pruned_then_quantized((1024, 1024))
        assert sum(np.abs(r[r != 0]).min() > np.abs(r).max() / 7 * 1.5 for r in q) > 100
    else:
        q = per_channel(_rng_weights((1024, 1024), 0), 0)
        if case == "dead_probe_rows":
            q[[0, 512, 1023]] = 0
        else:
            q = q.astype({"bfloat16_cast": ml_dtypes.bfloat16, "float16_cast": np.float16}[case])
    found = quantized_slices.find(q)
    assert found is not None and found[0] == 0
    path = tmp_path / "q.jjpg"
    report = jaxjpeg.save(path, {"w": q})
    np.testing.assert_array_equal(_bits(jaxjpeg.restore(path)["w"]), _bits(q))
    assert report.leaves[0].bits_per_weight < 3.5, report.leaves[0]


def test_a_leaf_changed_in_place_is_read_again():
    """find() remembers its last leaf in a thread by content, not by object:
    a leaf moved off its grid between two saves is not taken for the old."""
    q = per_channel(_rng_weights((512, 1024), 0), 0)
    assert quantized_slices.find(q) is not None
    q[300, 5] += 0.37 * np.abs(q[300][q[300] != 0]).min()
    assert quantized_slices.find(q) is None
    q[300, 5] = 0
    assert quantized_slices.find(q) is not None


def in_groups(w, axis, group, dtype=np.float32):
    """``w`` quantized as GPTQ / AWQ export it: each run of ``group`` values
    along ``axis`` of each row or column on 4 bits, asymmetric, its scale in
    float16 and an integer zero point, ``(q - z) * s`` computed in ``dtype``."""
    runs = np.moveaxis(w.reshape(quantized_slices._split(w.shape, axis, group)), axis + 1, -1)
    low = np.minimum(runs.min(axis=-1, keepdims=True), 0)
    high = np.maximum(runs.max(axis=-1, keepdims=True), 0)
    s = ((high - low) / 15).astype(np.float16).astype(dtype)
    z = np.clip(np.rint(-low / s.astype(np.float32)), 0, 15)
    q = np.clip(np.rint(runs / s.astype(np.float32)) + z, 0, 15)
    x = ((q - z).astype(dtype) * s).astype(dtype)
    return np.moveaxis(x, -1, axis + 1).reshape(w.shape)


@pytest.mark.parametrize("shape, axis, group, dtype", [
    ((1024, 1024), 1, 128, np.float32),   # PyTorch Linear (O, I), groups of inputs
    ((1024, 512), 0, 64, np.float32),     # Flax Dense (I, O)
    ((512, 1024), 1, 32, np.float16),     # computed in float16
])
def test_leaves_quantized_in_groups_restore_bit_for_bit(tmp_path, capsys, shape, axis, group,
                                                        dtype):
    """Found by review: weights quantized in groups of 32-128 inputs (GPTQ,
    AWQ exports, the commonest low-bit LLM format) were JPEG-coded: at the
    default save 4.07 bits a weight with 4-10% of the codes moved, where
    their codes and steps take 3.8-4.3. They are stored as their codes and
    one float32 step a group."""
    q = in_groups(0.02 * np.random.default_rng(0).standard_normal(shape), axis, group, dtype)
    assert quantized_slices.find(q[:, :shape[1] // 2 + 3]) is None or axis == 0
    found = quantized_slices.find(q)
    assert found is not None and found[0] == axis and found[2] == group
    path = tmp_path / "g.jjpg"
    for options in ({}, {"target_ratio": 6}):   # (at 8x, 4 bits a weight, where they fit)
        report = jaxjpeg.save(path, {"w": q}, **options)
        np.testing.assert_array_equal(_bits(jaxjpeg.restore(path)["w"]), _bits(q))
        bits = 8 * path.stat().st_size / q.size
        assert bits < 4.05 + 16 / group, bits   # the codes (3.7-4.0 bits) and float16 steps
        assert "quantized in groups" in report.leaves[0].note
    with jaxjpeg.open(path) as f:
        assert f.info("w").quantized == ("per_group", axis, group) and f.info("w").exact
    assert cli.main(["inspect", str(path)]) == 0
    assert "raw-step-per-group(exact)" in capsys.readouterr().out


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(group_size=100), "bad group size"),
    (lambda r: r.update(group_size=1), "bad group size"),
    (lambda r: r.update(group_axis=2), "bad group axis"),
    (lambda r: r.pop("group_axis"), "bad group axis"),
    (lambda r: r.update(step_bytes=3), "bad step size"),
    (lambda r: r.update(step_bytes=4), "fewer than its|not finite"),
])
def test_bad_group_records_are_refused(tmp_path, edit, message):
    q = in_groups(0.02 * np.random.default_rng(1).standard_normal((256, 512)), 1, 64)
    path = str(tmp_path / "g.jjpg")
    jaxjpeg.save(path, {"w": q})

    def edit_meta(meta):
        stack = [meta]
        while stack:
            node = stack.pop()
            if isinstance(node, dict) and node.get("stored") == "quantized_groups":
                edit(node)
                return None
            stack.extend(node.values() if isinstance(node, dict) else
                         node if isinstance(node, list) else [])
        raise AssertionError("no grouped record")
    bad = rewrite(path, str(tmp_path / "bad.jjpg"), edit_meta=edit_meta)
    with pytest.raises((fmt.FormatError, ValueError), match=message):
        jaxjpeg.restore(bad)


def test_8_bit_grids_stay_exact_where_a_byte_target_leaves_their_bytes(tmp_path):
    """Found by review: an int8 per-channel leaf at target_ratio=4 (8 bits a
    weight) was JPEG-coded, 13% of its codes moved, where its codes take
    7.4. A default save still codes it (4 bits a weight); a byte target
    keeps it exact where its codes fit its share."""
    q8 = per_channel(_rng_weights((1024, 1024), 0), 0, levels=256)
    tree = {"q": q8, "w": _rng_weights((512, 512), 1, seed=3)}
    raw = sum(v.nbytes for v in tree.values())
    path = tmp_path / "q.jjpg"
    assert jaxjpeg.save(path, tree).leaves[1].kind == "jpeg"
    for ratio, exact in ((4, True), (8, False)):
        report = jaxjpeg.save(path, tree, target_ratio=ratio)
        (leaf,) = [l for l in report.leaves if l.path == "q"]
        assert (leaf.kind == "raw") == exact and abs(path.stat().st_size * ratio / raw - 1) < 0.02
        restored = np.asarray(jaxjpeg.restore(path)["q"])
        assert np.array_equal(_bits(restored), _bits(q8)) == exact
    notes = {l.path: l.note for l in jaxjpeg.save(path, tree, target_ratio=4).leaves}
    assert "at most 256 values" in notes["q"], notes


@pytest.mark.parametrize("shape", [(1024, 512), (768, 768), (512, 256)])
def test_8_bit_grids_of_short_slices_stay_exact_too(tmp_path, shape):
    """Found by review: slices under 1,024 values (4 a level) were never
    searched for an 8-bit grid, so a PyTorch (O, I) int8 Linear of I < 1024
    (BERT-base's 768 x 768) was JPEG-coded at target_ratio=3: every value
    moved, at 10.6 bits a weight where its codes take 7.1."""
    q8 = per_channel(_rng_weights(shape, 0, seed=4), 0, levels=256, style="torch")
    path = tmp_path / "q.jjpg"
    report = jaxjpeg.save(path, {"q": q8}, target_ratio=3)
    assert report.leaves[0].kind == "raw" and "at most 256 values" in report.leaves[0].note
    assert 8 * report.leaves[0].stored_bytes / q8.size < 8.5
    np.testing.assert_array_equal(_bits(jaxjpeg.restore(path)["q"]), _bits(q8))


def test_pruned_grids_whose_smallest_code_is_large():
    """Found by review: rows or groups without a ±1 code took their step as
    their smallest magnitude over the first k within 1/64 (7 for 8), one
    float32 division (an ulp off the scale: no grid found), a row at a time
    in Python (12 s for a 16 MB leaf). The k whose codes lie nearest, over
    all rows at once, then the float32 step inside every value's rounding
    interval."""
    rng = np.random.default_rng(0)
    codes = rng.choice([-7, -6, -5, -4, -3, 3, 4, 5, 6, 7], size=(256, 1024)).astype(np.float32)
    codes[:, 0] = 3   # every row's smallest code 3
    scales = rng.uniform(0.01, 0.02, (256, 1)).astype(np.float32)
    q = codes * scales
    assert np.sum(np.float32(3 * scales[:, 0]) / np.float32(3) != scales[:, 0]) > 10
    found = quantized_slices.find(q)
    assert found is not None
    blob, record = quantized_slices.encode(q, *found)
    np.testing.assert_array_equal(quantized_slices.restore(
        blob, q.shape, quantized_slices.check_record(record, q.shape, "q")), q)
    big = rng.integers(8, 24, size=(2000, 64)).astype(np.float32)   # 16 levels, 8 to 23
    big[:, 0] = 8   # smallest code 8: at 7 the codes lie within 1/64 too
    grid = big * np.float32(0.5) ** rng.integers(4, 8, (2000, 1)).astype(np.float32)
    found = quantized_slices.find(grid)
    assert found is not None and quantized_slices.encode(grid, *found) is not None


def test_sparse_leaves_are_not_taken_for_groups(tmp_path):
    """Found by review: groups holding one nonzero value each fit a grid
    trivially; stored with a float32 step a group they took 3.1x the bytes
    of the sparse coding (1.31 against 0.43 bits a weight)."""
    rng = np.random.default_rng(1)
    w = np.zeros((512, 1024), np.float32)
    w[np.arange(512)[:, None], np.arange(0, 1024, 32)[None, :] + rng.integers(0, 32, (512, 32))] = \
        rng.standard_normal((512, 32))
    assert quantized_slices.find(w) is None
    report = jaxjpeg.save(tmp_path / "s.jjpg", {"w": w})
    assert report.leaves[0].bits_per_weight < 0.6, report.leaves[0]


def test_steps_that_do_not_restore_the_leaf_are_refused():
    """encode checks the codes give every value back (review: a leaf changed
    in place during the search left steps of the old content remembered)."""
    q = per_channel(_rng_weights((256, 512), 0), 0)
    axis, steps = quantized_slices.find(q)
    assert quantized_slices.encode(q, axis, steps) is not None
    assert quantized_slices.encode(q, axis, steps * 2) is None
    calls = []
    key = quantized_slices._content_key

    def key_then_changed(array, *rest):   # another thread doubles it right after the digest
        calls.append(key(array, *rest))
        if len(calls) == 1:
            np.multiply(array, 2, out=array)
        return calls[-1]
    x = per_channel(_rng_weights((256, 512), 1), 0)
    original = x.copy()
    quantized_slices._content_key = key_then_changed
    try:
        quantized_slices.find(x)
    finally:
        quantized_slices._content_key = key
    np.copyto(x, original)
    axis, steps = quantized_slices.find(x)
    assert quantized_slices.encode(x, axis, steps) is not None


def test_a_grid_a_byte_target_has_room_for_is_stored_as_its_codes(tmp_path):
    """Where every coded leaf's finest coding leaves bytes over, a byte
    target stores leaves exactly; one on a grid is counted and stored as its
    codes (7.4 bits a value for int8), where it was counted raw (32) and
    coded lossily instead (found by review: 7.8-15 bits a value, lossy)."""
    tree = {"q4": per_channel(_rng_weights((1024, 1024), 0, seed=2), 0),
            "q8": per_channel(_rng_weights((512, 1024), 0), 0, levels=256),
            "f1": _rng_weights((64, 128), 1, seed=4)}
    path = tmp_path / "q.jjpg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (the file under the target: no leaf takes more)
        report = jaxjpeg.save(path, tree, bits_per_weight=7.4)
    assert path.stat().st_size <= 1.02 * sum(v.size for v in tree.values()) * 7.4 / 8
    np.testing.assert_array_equal(_bits(jaxjpeg.restore(path)["q8"]), _bits(tree["q8"]))
    (leaf,) = [l for l in report.leaves if l.path == "q8"]
    assert leaf.exact and leaf.bits_per_weight < 7.6 and "as its codes" in leaf.note, leaf


def test_non_negative_grids_are_not_taken_for_optimizer_moments(tmp_path):
    """Found by review: unsigned 4-bit codes in groups (all values >= 0) were
    taken for a second moment and stored on log2 steps, 7.0 bits a value,
    every value moved; they are stored as their codes."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(256, 512)).astype(np.float32)
    steps = rng.uniform(0.001, 0.01, (256, 8)).astype(np.float16).astype(np.float32)
    q = codes * np.repeat(steps, 64, axis=1)
    report = jaxjpeg.save(tmp_path / "n.jjpg", {"w": q})
    np.testing.assert_array_equal(_bits(jaxjpeg.restore(tmp_path / "n.jjpg")["w"]), _bits(q))
    assert report.leaves[0].bits_per_weight < 5, report.leaves[0]
    moments = np.abs(rng.standard_normal((256, 512))).astype(np.float32) ** 2   # an Adam nu
    report = jaxjpeg.save(tmp_path / "m.jjpg", {"nu": moments})
    assert "log2" in report.leaves[0].note, report.leaves[0].note


def test_a_non_negative_grid_beside_optimizer_state_keeps_its_codes(tmp_path):
    """Found by review: beside Adam's state, under a byte target, the
    non-negative grid went to the small moments' log2 steps (9 bits a value,
    lossy) where its codes take 4.8."""
    import jax
    import optax
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, size=(256, 512)).astype(np.float32)
    grid = codes * np.repeat(rng.uniform(0.001, 0.01, (256, 8)).astype(np.float16)
                             .astype(np.float32), 64, axis=1)
    params = {"gq": grid, "w": _rng_weights((256, 512), 1, seed=5)}
    opt = optax.adam(1e-3)
    state = opt.init(params)
    for i in range(5):
        grads = jax.tree_util.tree_map(lambda p: np.random.default_rng(i).normal(
            0, 1e-2, p.shape).astype(np.float32), params)
        _, state = opt.update(grads, state, params)
    tree = {"params": params, "opt_state": jax.tree_util.tree_map(np.asarray, state)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = jaxjpeg.save(tmp_path / "a.jjpg", tree, target_ratio=6)
    (leaf,) = [l for l in report.leaves if l.path == "params/gq"]
    assert leaf.exact and leaf.bits_per_weight < 5, leaf


def _float64_scaled(shape, axis, levels=16, seed=0):
    """Weights quantized per slice as numpy does it by default: float64
    weights and scales, codes times scale in float64, then cast to float32
    (no float32 step gives those values back)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * np.exp(rng.normal(size=shape[axis])).reshape(
        [-1 if a == axis else 1 for a in range(len(shape))])
    others = tuple(a for a in range(len(shape)) if a != axis)
    scale = np.abs(w).max(axis=others, keepdims=True) / (levels // 2 - 1)
    return (np.clip(np.round(w / scale), -(levels // 2), levels // 2 - 1) * scale).astype(np.float32)


@pytest.mark.parametrize("shape, axis", [((512, 1024), 0), ((512, 1024), 1),
                                         ((64, 32, 3, 3), 0)])
def test_grids_on_float64_scales_restore_bit_for_bit(tmp_path, shape, axis):
    """Found by review: int4 per-channel weights quantized with float64 scales
    (numpy's default) and cast to float32 were JPEG-coded, every value moved
    (4.05 bits a weight against 3.47 as codes): no float32 step reproduces
    them. Their steps are now float64 (``stored`` of its own, older readers
    refuse it), every value restored bit for bit, at a default save and at 8x."""
    q = _float64_scaled(shape, axis)
    path = tmp_path / "q.jjpg"
    for options in ({}, {"target_ratio": 8}):
        (leaf,) = jaxjpeg.save(path, {"w": q}, **options).leaves
        assert leaf.exact and "quantized per channel" in leaf.note, leaf.note
        assert leaf.bits_per_weight < 4.0
        np.testing.assert_array_equal(_bits(jaxjpeg.restore(path)["w"]), _bits(q))
        with ckr.Checkpoint(str(path)) as c:
            assert c.leaves[0].quantized["step_bytes"] == 8
            assert c.leaves[0].quantized["slice_axis"] == axis


def test_8_bit_grids_on_float64_scales_stay_exact_under_a_byte_target(tmp_path):
    q8 = _float64_scaled((1024, 768), 0, levels=256)
    path = tmp_path / "q.jjpg"
    (leaf,) = jaxjpeg.save(path, {"q": q8}, target_ratio=3).leaves
    assert leaf.exact and leaf.kind == "raw", leaf.note
    np.testing.assert_array_equal(_bits(jaxjpeg.restore(path)["q"]), _bits(q8))


@pytest.mark.parametrize("damage, message", [
    ("nan_step", "not finite and positive"),
    ("negative_step", "not finite and positive"),
    ("truncated", "fewer than its"),
    ("as_float32_steps", None),
])
def test_bad_float64_step_blobs_are_refused(tmp_path, damage, message):
    q = _float64_scaled((128, 256), 0)
    path = str(tmp_path / "q.jjpg")
    jaxjpeg.save(path, {"w": q})

    def edit_blobs(blobs):
        (name,) = [n for n in blobs if n.startswith("leaf0")]
        data = bytearray(blobs[name])
        if damage == "nan_step":
            data[:8] = np.float64(np.nan).tobytes()
        elif damage == "negative_step":
            data[8:16] = np.float64(-1.0).tobytes()
        elif damage == "truncated":
            data = data[:8 * 128 - 1]
        blobs[name] = bytes(data)

    def edit_meta(meta):
        if damage == "as_float32_steps":   # a reader taking 4-byte steps would misread it
            _find_record(meta)["stored"] = quantized_slices.STORED
    bad = rewrite(path, str(tmp_path / "bad.jjpg"), edit_meta=edit_meta, edit_blobs=edit_blobs)
    if message is None:   # as float32 steps the blob is another leaf's: refused or wrong, never
        try:               # silently equal (what an older reader of this file would do)
            restored = np.asarray(jaxjpeg.restore(bad)["w"])
        except (fmt.FormatError, ValueError):
            return
        assert not np.array_equal(_bits(restored), _bits(q))
        return
    with pytest.raises((fmt.FormatError, ValueError), match=message):
        jaxjpeg.restore(bad)


def test_groups_on_float64_scales_restore_bit_for_bit(tmp_path):
    """GPTQ-like groups quantized with float64 scales: float64 steps
    (``step_bytes`` 8, which older readers refuse), exact, 4.5 bits a weight
    against JPEG's lossy 4.1 before."""
    rng = np.random.default_rng(0)
    w = 0.02 * rng.standard_normal((512, 1024))
    runs = w.reshape(512, 8, 128)
    scale = np.abs(runs).max(axis=-1, keepdims=True) / 7
    q = (np.clip(np.round(runs / scale), -8, 7) * scale).astype(np.float32).reshape(512, 1024)
    path = tmp_path / "g.jjpg"
    (leaf,) = jaxjpeg.save(path, {"w": q}).leaves
    assert leaf.exact and "quantized in groups" in leaf.note, leaf.note
    assert leaf.bits_per_weight < 4.6
    np.testing.assert_array_equal(_bits(jaxjpeg.restore(path)["w"]), _bits(q))
    with ckr.Checkpoint(str(path)) as c:
        assert c.leaves[0].quantized["step_bytes"] == 8
