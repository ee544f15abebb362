"""Rate control: error bounds met, byte targets hit, monotone behaviour, mapping modes."""

import dataclasses
import math
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import checkpoint_reader, codec, mapping, quantized_vectors, rate, views


def _tensor(kind, shape, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        x = rng.standard_normal(shape)
    elif kind == "laplace":
        x = rng.laplace(size=shape)
    elif kind == "outliers":
        x = rng.standard_normal(shape)
        flat = x.reshape(-1)
        flat[rng.integers(0, flat.size, 5)] = 30.0
    elif kind == "row-scaled":
        x = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape[:-1] + (1,)))
    else:
        raise ValueError(kind)
    return (0.05 * x).astype(np.float32)


# Shapes keep at least 8 blocks per tile (the default restart interval).
CASES = [("gauss", (128, 256)), ("laplace", (3, 3, 32, 64)), ("outliers", (200, 72)),
         ("row-scaled", (64, 512)), ("gauss", (4096,))]


@pytest.mark.parametrize("kind,shape", CASES)
@pytest.mark.parametrize("bound", [0.2, 0.05, 0.01])
def test_error_bound_met(kind, shape, bound):
    x = _tensor(kind, shape)
    enc = rate.encode_for_error(x, bound)
    assert enc.shape == x.shape
    err = rate.relative_error(x, enc)
    assert err <= bound
    assert err > bound / 4  # not wastefully tight


@pytest.mark.parametrize("bits", [8, 12])
def test_error_bound_fixed_bits(bits):
    x = _tensor("gauss", (64, 256), seed=3)
    enc = rate.encode_for_error(x, 0.05, bits=bits)
    assert enc.bits == bits
    assert rate.relative_error(x, enc) <= 0.05


@pytest.mark.parametrize("count,value", [(1, 1e4), (10, 1e30)])
def test_error_bound_holds_for_the_values_not_kept_exactly(tmp_path, count, value):
    """Found by review: the bound was relative to a norm that counted the
    values kept exactly, so one kept 1e4 in a leaf of N(0, 1) let the rest
    restore at relative error 0.998 under error_bound=0.05."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 256)).astype(np.float32)
    far = rng.choice(x.size, count, replace=False)
    x.reshape(-1)[far] = value
    report = jaxjpeg.save(tmp_path / "t.jjpg", {"w": x}, error_bound=0.05)
    assert "kept exactly" in report.leaves[0].note
    restored = np.asarray(jaxjpeg.restore(tmp_path / "t.jjpg")["w"], np.float64).reshape(-1)
    rest = np.ones(x.size, bool)
    rest[far] = False
    coded = x.reshape(-1)[rest].astype(np.float64)
    assert np.linalg.norm(restored[rest] - coded) <= 0.05 * np.linalg.norm(coded)
    np.testing.assert_array_equal(restored[far], x.reshape(-1)[far])


@pytest.mark.parametrize("clip", ["mse", "minmax"])
def test_clip_other_than_common_goes_with_the_table_and_bound_controls(tmp_path, clip):
    """Found by review: byte targets and the default rate plan steps on the
    shared scale; with clip="mse" / "minmax" a file asked for 8x came out
    37% over and the default's 3.9 bits a weight became 6.7. They refuse
    such a clip; the controls that code what they are given keep it."""
    x = _tensor("row-scaled", (64, 512))
    path = tmp_path / "c.jjpg"
    for rate_control in ({}, {"target_ratio": 8}, {"bits_per_weight": 4},
                         {"target_bytes": 20000}, {"relative_step": 0.3}):
        with pytest.raises(ValueError, match=f"clip='{clip}' goes with quant_step"):
            jaxjpeg.save(path, {"x": x}, clip=clip, **rate_control)
    assert not path.exists()
    for rate_control, most in (({"quality": 90}, 0.1), ({"error_bound": 0.05}, 0.05)):
        jaxjpeg.save(path, {"x": x}, clip=clip, **rate_control)
        got = np.asarray(jaxjpeg.restore(path)["x"], np.float64)
        assert np.linalg.norm(got - x) <= most * np.linalg.norm(x), rate_control


@pytest.mark.parametrize("ratio", [12, 16])
def test_a_data_free_target_lets_no_leaf_collapse(tmp_path, ratio):
    """Found by review: weighted by size^0.3, the one large leaf of a tree
    (half its weights) was let go to relative error 0.77 / 0.93 at 12x /
    16x while the small ones kept 0.14 / 0.19."""
    import warnings

    import jaxjpeg
    rng = np.random.default_rng(0)
    tree = {"big": rng.standard_normal((1024, 1024)).astype(np.float32)}
    tree.update({f"s{i:03d}": rng.standard_normal((64, 64)).astype(np.float32)
                 for i in range(256)})
    path = tmp_path / "t.jjpg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = jaxjpeg.save(path, tree, target_ratio=ratio)
    assert report.file_bytes <= 1.02 * 4 * report.weights / ratio
    big = np.asarray(jaxjpeg.restore(path, paths="big")["big"])
    assert np.linalg.norm(big - tree["big"]) < 0.55 * np.linalg.norm(tree["big"])


@pytest.mark.parametrize("shape", [(12, 768), (24, 1024)])
def test_the_default_step_is_relative_to_the_spread_about_the_rows_means(tmp_path, shape):
    """Found by review: scanned LayerNorm scales (1 +- 0.05, one row per
    layer) took a step of 0.28 of their RMS (about 1) and came back
    constant (error 1.00 of their spread, 0.36 bits a weight)."""
    import jaxjpeg
    x = (1 + 0.05 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
    jaxjpeg.save(tmp_path / "s.jjpg", {"scale": x})
    got = np.asarray(jaxjpeg.restore(tmp_path / "s.jjpg")["scale"], np.float64)
    assert np.linalg.norm(got - x) < 0.12 * np.linalg.norm(x - x.mean())


def test_a_byte_target_weighs_a_leaf_by_its_spread_not_its_mean(tmp_path):
    """Values around a large mean (stacked LayerNorm scales, 1 +- 0.05) were
    weighed by their norm, mostly the mean the maps carry for free: at 8x
    beside a kernel they kept 0.23 of their spread as error, the kernel 0.08."""
    import warnings

    import jaxjpeg
    rng = np.random.default_rng(0)
    tree = {"ln": (1 + 0.05 * rng.standard_normal((24, 1024))).astype(np.float32),
            "w": (0.05 * rng.standard_normal((1024, 1024))).astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jaxjpeg.save(tmp_path / "t.jjpg", tree, target_ratio=8)
    got = jaxjpeg.restore(tmp_path / "t.jjpg")
    spread_error = {k: np.linalg.norm(np.asarray(got[k], np.float64) - v)
                    / np.linalg.norm(v - v.mean()) for k, v in tree.items()}
    assert spread_error["ln"] < spread_error["w"] < 0.12, spread_error


def test_tighter_bound_costs_more():
    x = _tensor("laplace", (128, 128), seed=1)
    sizes = [rate.encode_for_error(x, b).nbytes for b in (0.3, 0.1, 0.03, 0.01, 0.003)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_error_bound_rejects_nonsense():
    with pytest.raises(ValueError):
        rate.encode_for_error(_tensor("gauss", (64, 64)), 0.0)


def test_step_monotone():
    x = _tensor("gauss", (128, 128), seed=2)
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    encs = [rate.encode_at_step(x, rms * 2.0 ** -k) for k in range(0, 7)]
    sizes = [e.nbytes for e in encs]
    errs = [rate.relative_error(x, e) for e in encs]
    assert sizes == sorted(sizes)
    assert errs == sorted(errs, reverse=True)
    # Uniform quantization: error ≈ q/√12 of the rms.
    for k, err in enumerate(errs[1:], 1):
        assert err == pytest.approx(2.0 ** -k / math.sqrt(12), rel=0.15)


def _model_like():
    return {"a": _tensor("gauss", (256, 256), 0), "b": _tensor("laplace", (3, 3, 32, 64), 1),
            "c": _tensor("row-scaled", (512, 64), 2), "d": _tensor("outliers", (128, 96), 3)}


@pytest.mark.parametrize("ratio", [4.0, 8.0, 12.0])
def test_target_hit_within_2_percent(ratio):
    tensors = _model_like()
    alloc = rate.allocate_to_target(tensors, ratio=ratio)
    target = sum(t.nbytes for t in tensors.values()) / ratio
    assert abs(alloc.nbytes - target) <= 0.02 * target
    assert alloc.nbytes == sum(e.nbytes for e in alloc.encodings.values())
    for name, enc in alloc.encodings.items():
        assert enc.shape == tensors[name].shape
        assert alloc.squared_errors[name] == pytest.approx(rate.squared_error(tensors[name], enc))


def test_a_large_tensors_miss_does_not_starve_a_small_one_coded_after_it():
    """Found by review: a 418 K-value kernel 3.5% over its predicted bytes
    left the 16 K-value kernel coded after it 43% of its bytes (relative
    error 0.46, 0.02 when coded first). A prediction 15% short stands for
    the miss here: the large tensor settles its coding to leave the small
    one its bytes, and the total stays within 2%."""
    big = rate.prepare_leaf(_tensor("laplace", (128, 3264), 7))
    small = rate.prepare_leaf(_tensor("gauss", (128, 128), 8))
    total = big.size + small.size
    budget = total * 4 // 8   # 8x against float32
    reach = rate.reach_of(budget, total)
    curves = {n: rate.rd_curve(p, None, reach=reach, probe_size=rate.probe_elements(p.size, total))
              for n, p in (("big", big), ("small", small))}
    curves["big"] = dataclasses.replace(curves["big"], nbytes=curves["big"].nbytes * 0.85)
    allocator = rate.BudgetAllocator(curves, budget)
    planned = allocator.planned_bytes(["small"])
    spent = allocator.encode("big", big).nbytes
    got = allocator.encode("small", small).nbytes
    assert got >= 0.75 * planned, (got, planned)
    assert abs(spent + got - budget) <= 0.02 * budget


def test_target_single_tensor_and_bytes():
    x = {"w": _tensor("gauss", (256, 512), 4)}
    for target in (30_000, 55_555, 100_000):
        alloc = rate.allocate_to_target(x, target)
        assert abs(alloc.nbytes - target) <= 0.02 * target


def test_sensitivity_shifts_error():
    tensors = {"a": _tensor("gauss", (256, 256), 5), "b": _tensor("gauss", (256, 256), 6)}
    alloc = rate.allocate_to_target(tensors, ratio=8, sensitivity={"a": 100.0, "b": 1.0})
    assert alloc.squared_errors["a"] < alloc.squared_errors["b"] / 10
    # Equal slope: step ratio ≈ sqrt of the sensitivity ratio.
    assert alloc.steps["b"] / alloc.steps["a"] == pytest.approx(10.0, rel=0.35)


def test_more_bytes_less_error():
    tensors = _model_like()
    errs = [sum(rate.allocate_to_target(tensors, ratio=r).squared_errors.values())
            for r in (16, 8, 4)]
    assert errs[0] > errs[1] > errs[2]


def test_target_infeasible():
    with pytest.raises(ValueError):
        rate.allocate_to_target(_model_like(), 100)
    with pytest.raises(ValueError):
        rate.allocate_to_target(_model_like())


def test_row_weights_favour_heavy_rows():
    x = _tensor("gauss", (128, 256), 7)
    weight = np.ones(128)
    weight[:16] = 100.0
    enc = rate.encode_at_step(x, 0.02, row_weight=weight)
    err = (x - codec.decode_tensor(enc)) ** 2
    assert err[:16].mean() < err[16:].mean() / 10


def test_sensitivity_from_gradients():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    params = {"w": jnp.ones((4, 3)), "b": {"v": jnp.arange(3.0)}}

    def loss(p, batch):
        return jnp.sum(p["w"] * batch[:, None]) + 2 * jnp.sum(p["b"]["v"])

    batches = [jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([3.0, 2.0, 1.0, 0.0])]
    sens = rate.sensitivity_from_gradients(loss, params, batches)
    assert sens["b/v"] == pytest.approx(4.0)
    assert sens["w"] == pytest.approx((1 + 4 + 9 + 16 + 9 + 4 + 1 + 0) / 8)
    rows = rate.sensitivity_from_gradients(loss, params, batches, per_row=True)
    np.testing.assert_allclose(rows["w"], [[5.0], [4.0], [5.0], [8.0]])
    assert rows["b/v"].shape == (1,)
    elements = rate.sensitivity_from_gradients(loss, params, batches, per_element=True)
    assert elements["w"].shape == (4, 3)
    np.testing.assert_allclose(elements["w"][:, 0], [5.0, 4.0, 5.0, 8.0])
    np.testing.assert_allclose(elements["b/v"], [4.0, 4.0, 4.0])
    # save takes them as they are, in the leaves' own layout
    import jaxjpeg, tempfile, os
    with tempfile.TemporaryDirectory() as tmp:
        big = {"w": np.asarray(jax.random.normal(jax.random.PRNGKey(0), (256, 384)))}
        sens = {"w": np.broadcast_to(elements["w"][:1, :1], (256, 384)) + np.arange(384) / 384}
        report = jaxjpeg.save(os.path.join(tmp, "s.jjpg"), big, target_ratio=8, sensitivity=sens)
        assert abs(report.ratio_vs_float32 / 8 - 1) < 0.05


@pytest.mark.parametrize("ratio", [15, 26, 38])
def test_a_small_stack_beside_a_matrix_lands_its_target(tmp_path, ratio):
    """Found by review: a stack found under "layers" and one matrix landed
    4-11% under byte targets of 15-38x: the stack came out over its curve,
    the matrix coded last was over what was left at its coarsest candidate,
    and the first step a quarter octave coarser took 39% fewer bytes. That
    step is now bisected towards the one over."""
    rng = np.random.default_rng(0)
    tree = {"layers": {"k": rng.standard_normal((6, 128, 128)).astype(np.float32)
                       * np.logspace(-2, 0, 6)[:, None, None].astype(np.float32)},
            "x": rng.standard_normal((256, 256)).astype(np.float32)}
    report = jaxjpeg.save(tmp_path / "s.jjpg", tree, target_ratio=ratio)
    assert abs(report.ratio_vs_float32 / ratio - 1) <= 0.02, report.ratio_vs_float32


def test_sensitivity_from_gradients_names_leaves_under_a_prefix(tmp_path):
    """Found by review: differentiating ``variables["params"]`` and saving
    the whole ``variables`` (BatchNorm statistics beside the parameters)
    was refused: the names lacked "params/"."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    kernel = jax.random.normal(jax.random.PRNGKey(1), (64, 64))
    variables = {"params": {"dense": {"kernel": kernel}},
                 "batch_stats": {"bn": {"mean": jnp.zeros(64)}}}

    def loss(params, batch):
        return jnp.sum((batch @ params["dense"]["kernel"]) ** 2)

    batches = [jax.random.normal(jax.random.PRNGKey(2), (8, 64))]
    sens = rate.sensitivity_from_gradients(loss, variables["params"], batches,
                                           prefix="params/")
    assert list(sens) == ["params/dense/kernel"]
    plain = rate.sensitivity_from_gradients(loss, variables["params"], batches)
    assert sens["params/dense/kernel"] == plain["dense/kernel"]
    jaxjpeg.save(tmp_path / "v.jjpg", variables, target_ratio=8, sensitivity=sens)


@pytest.mark.parametrize("clip", mapping.CLIP_MODES)
@pytest.mark.parametrize("bits", [8, 12])
def test_mapping_modes_round_trip(clip, bits):
    view = _tensor("outliers", (64, 128), 8)
    samples, scale, offset = mapping.row_affine(view, bits, clip=clip, step=4.0)
    top = mapping.sample_max(bits)
    assert samples.min() >= 0 and samples.max() <= top
    assert scale.dtype == np.float32 and offset.dtype == np.float32
    back = samples * scale[:, None] + offset[:, None]
    if clip != "mse":  # no clipping: the map is exact up to float32 arithmetic
        np.testing.assert_allclose(back, view, atol=float(np.abs(view).max()) * 1e-5)
    # Scales in float16's normal range are float16-representable (a container may store them so).
    normal = scale >= np.finfo(np.float16).tiny
    assert np.array_equal(scale[normal].astype(np.float16).astype(np.float32), scale[normal])


def test_common_mapping_shares_scale():
    view = _tensor("row-scaled", (32, 64), 9)
    _, scale, _ = mapping.row_affine(view, 12, clip="common")
    assert np.all(scale == scale[0])


def test_mse_clip_matches_exhaustive():
    view = _tensor("outliers", (50, 300), 10).astype(np.float32)
    lo = view.min(axis=1).astype(np.float64)
    hi = view.max(axis=1).astype(np.float64)
    got_lo, got_hi = mapping._mse_range(view, lo, hi, 8, 4.0)
    center = view.mean(axis=1, dtype=np.float64)
    best = []
    for ratio in mapping.CLIP_CANDIDATES:
        c_lo, c_hi = center - ratio * (center - lo), center + ratio * (hi - center)
        clip_err = np.mean((np.clip(view, c_lo[:, None], c_hi[:, None]) - view) ** 2, axis=1)
        best.append(clip_err + ((c_hi - c_lo) / 255) ** 2 * 17 / 12)
    pick = np.argmin(np.array(best), axis=0)
    ratios = np.array(mapping.CLIP_CANDIDATES)[pick]
    np.testing.assert_allclose(got_lo, center - ratios * (center - lo))
    np.testing.assert_allclose(got_hi, center + ratios * (hi - center))


def test_encode_for_error_keeps_the_bits_asked_for_on_its_fallback():
    """Issue 9, defect 13: with bits=8, a bound one shared scale cannot meet
    (rows of very different spread and offset) fell back to per-row ranges
    at 12 bits; the fallback now keeps the bits given."""
    rng = np.random.default_rng(1)
    rows, cols = int(rng.integers(8, 64)), 64
    x = rng.normal(size=(rows, cols)) * np.exp(rng.uniform(-6, 6, size=(rows, 1)))
    x += rng.normal(size=(rows, 1)) * np.exp(rng.uniform(-3, 8))
    x = x.astype(np.float32)
    enc = rate.encode_for_error(x, 0.01, bits=8)
    assert enc.bits == 8 and all(t.bits == 8 for t in enc.tiles)
    assert rate.relative_error(x, enc) <= 0.01
    free = rate.encode_for_error(x, 0.01)  # free to choose: the smaller coding, within the bound
    assert rate.relative_error(x, free) <= 0.01


def test_leaf_name_is_the_checkpoint_path():
    """One naming of leaves: sensitivity keys are the paths save records."""
    import collections
    import jax
    from jaxjpeg.treepaths import leaves_with_paths, path_string
    Pair = collections.namedtuple("Pair", "left right")
    tree = {"a": [np.zeros(2), {"b": np.zeros(3)}], "c": Pair(np.zeros(1), (np.ones(1),))}
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    names = [rate.leaf_name(p) for p in paths]
    assert names == [path_string(r) for r, _ in leaves_with_paths(tree)]
    assert names == ["a/0", "a/1/b", "c/left", "c/right/0"]


@pytest.mark.parametrize("row_weighted", [False, True])
def test_probe_predicts_the_whole_tensors_error(row_weighted):
    """The probe codes its rows with the tensor's own row scales: a probe that
    misses the widest rows must not predict a finer step than the tensor
    gets (it computed its own, narrower scale), and per-row steps from
    importances must show in the prediction (of the coding on the maps
    chosen before it: codec.fit_rows then maps the rows it lost to their
    means, which only lowers the error)."""
    rng = np.random.default_rng(11)
    m = rng.standard_normal((4096, 256)).astype(np.float32)
    m[5] *= 40.0                                   # one wide row sets the common scale
    row_weight = rng.uniform(0.1, 10.0, 4096) if row_weighted else None
    p = codec.prepare(m, row_weight=row_weight)
    curve = rate.rd_curve(p, 12)
    for i in (len(curve.delta) // 3, len(curve.delta) // 2):
        enc = rate.encode_candidate(p, curve, i, {})   # widened between integer steps
        before_fit = codec.decode_tensor(rate._unfitted(enc)).astype(np.float64)
        sse = float(np.sum((before_fit - m) ** 2))
        assert curve.sse[i] == pytest.approx(sse, rel=0.15), (i, curve.delta[i])
        stored = float(np.sum((codec.decode_tensor(enc).astype(np.float64) - m) ** 2))
        assert stored <= sse


def test_every_curve_candidate_is_a_valid_step():
    # Interpolated candidates between a coarse 12-bit point and a finer 8-bit
    # one used to take 8-bit steps past 255, which the encoder refuses.
    c = rate.rd_curve(rate.prepare_leaf(_tensor("gauss", (256, 512), 0)))
    for bits, delta in zip(c.bits, c.delta):
        assert 1 <= delta <= rate.STEP_LIMIT[int(bits)], (bits, delta)


def test_a_leaf_that_barely_matters_gets_its_coarsest_coding(tmp_path):
    tree = {"a": _tensor("gauss", (256, 512), 1), "b": _tensor("gauss", (256, 512), 2)}
    report = jaxjpeg.save(tmp_path / "x.jjpg", tree, target_ratio=8, progress=False,
                          sensitivity={"a": 1e-9, "b": 1.0})
    assert report.file_bytes == pytest.approx(tree["a"].nbytes * 2 / 8, rel=0.02)
    sizes = {leaf.path: leaf.stored_bytes for leaf in report.leaves}
    assert sizes["a"] < sizes["b"] / 4


@pytest.mark.parametrize("options", [{}, {"target_ratio": 8}])
def test_a_sensitivity_naming_no_leaf_is_refused(tmp_path, options):
    # A misspelt path steered nothing, silently.
    tree = {"a": _tensor("gauss", (64, 64), 1)}
    with pytest.raises(ValueError, match="'b', which is not a leaf"):
        jaxjpeg.save(tmp_path / "x.jjpg", tree, progress=False, sensitivity={"b": 1.0},
                     **options)
    assert not (tmp_path / "x.jjpg").exists()


@pytest.mark.parametrize("options", [{}, {"target_ratio": 8}, {"quant_step": 4}])
def test_an_importance_array_of_the_wrong_shape_is_refused_naming_the_leaf(tmp_path, options):
    # Found by review: under the default save numpy's broadcasting error came
    # out, naming neither the leaf nor its shape.
    tree = {"dense": {"kernel": _tensor("gauss", (256, 128), 1)}}
    with pytest.raises(ValueError, match=r"dense/kernel: importance of shape \(256,\) does not "
                                         r"broadcast to the leaf's shape \(256, 128\)"):
        jaxjpeg.save(tmp_path / "x.jjpg", tree, progress=False,
                     sensitivity={"dense/kernel": np.ones(256)}, **options)
    assert not (tmp_path / "x.jjpg").exists()
    jaxjpeg.save(tmp_path / "x.jjpg", tree, progress=False,   # (256, 1) broadcasts
                 sensitivity={"dense/kernel": np.ones((256, 1))}, **options)


def _rms_errors(path, tree) -> dict:
    got = jaxjpeg.restore(path)
    return {k: float(np.sqrt(np.mean((np.asarray(got[k], np.float64) - v) ** 2)))
            for k, v in tree.items()}


def test_the_default_save_follows_sensitivity(tmp_path):
    """The default rate ignored a leaf's sensitivity: it now shares the
    default's bytes as a byte target shares its budget (step ∝ s^-½)."""
    tree = {"a": _tensor("gauss", (256, 512), 1), "b": _tensor("gauss", (256, 512), 2)}
    plain = jaxjpeg.save(tmp_path / "plain.jjpg", tree, progress=False)
    steered = jaxjpeg.save(tmp_path / "steered.jjpg", tree, progress=False,
                           sensitivity={"a": 16.0, "b": 1.0})
    before, after = (_rms_errors(tmp_path / f, tree) for f in ("plain.jjpg", "steered.jjpg"))
    assert before["a"] == pytest.approx(before["b"], rel=0.05)
    # 16x the cost of error: a step 4x finer than b's (about 2x finer and 2x
    # coarser than the default's), the file about the default's size.
    assert after["b"] / after["a"] == pytest.approx(4.0, rel=0.2)
    assert after["a"] < 0.6 * before["a"] and after["b"] > 1.6 * before["b"]
    assert steered.file_bytes == pytest.approx(plain.file_bytes, rel=0.05)


def test_a_common_sensitivity_equalises_the_default_saves_errors(tmp_path):
    # The default weighs each leaf's relative error; one sensitivity for every
    # leaf says their errors cost alike in weight units. Only ratios between
    # leaves steer: any common value (in any units, as from gradients) codes
    # the same file.
    tree = {"a": _tensor("gauss", (256, 512), 3), "b": 3 * _tensor("gauss", (256, 512), 4)}
    jaxjpeg.save(tmp_path / "plain.jjpg", tree, progress=False)
    plain = _rms_errors(tmp_path / "plain.jjpg", tree)
    assert plain["b"] / plain["a"] == pytest.approx(3.0, rel=0.1)
    restored = []
    for value in (1e-7, 5.0):
        jaxjpeg.save(tmp_path / "same.jjpg", tree, progress=False,
                     sensitivity={"a": value, "b": value})
        errors = _rms_errors(tmp_path / "same.jjpg", tree)
        assert errors["b"] / errors["a"] == pytest.approx(1.0, rel=0.1)
        restored.append(jaxjpeg.restore(tmp_path / "same.jjpg"))
    for k in tree:
        np.testing.assert_array_equal(np.asarray(restored[0][k]), np.asarray(restored[1][k]))


def test_a_zero_sensitivity_leaf_is_dropped_by_the_default_save(tmp_path):
    tree = {"a": _tensor("gauss", (256, 512), 5), "b": _tensor("gauss", (256, 512), 6)}
    jaxjpeg.save(tmp_path / "plain.jjpg", tree, progress=False)
    with pytest.warns(UserWarning, match="sensitivity is 0 for 1 leaves"):
        jaxjpeg.save(tmp_path / "zero.jjpg", tree, progress=False,
                     sensitivity={"a": 0.0, "b": 1.0})
    plain, zero = (_rms_errors(tmp_path / f, tree) for f in ("plain.jjpg", "zero.jjpg"))
    assert zero["a"] == pytest.approx(float(np.sqrt(np.mean(tree["a"].astype(np.float64) ** 2))),
                                      rel=0.01)
    assert zero["b"] == pytest.approx(plain["b"], rel=1e-6)


@pytest.mark.parametrize("bound", [0.02, 0.05, 0.1])
def test_error_bound_search_codes_each_leaf_about_twice(monkeypatch, bound):
    # Rows of different scales: 8-bit steps would be rounding-dominated, so
    # the search goes straight to 12 bits; it stops once a step lands within
    # BOUND_SLACK under the budget instead of closing the bracket.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((512, 1024)) * rng.uniform(0.01, 1, (512, 1))).astype(np.float32)
    codings = []
    real = rate.encode_with_step
    monkeypatch.setattr(rate, "encode_with_step", lambda *a, **k: codings.append(a[1:3])
                        or real(*a, **k))
    enc = rate.encode_for_error(rate.prepare_leaf(x), bound)
    err = rate.relative_error(x, enc)
    assert math.sqrt(1 - rate.BOUND_SLACK) * bound * 0.99 <= err <= bound
    assert len(codings) <= 2, codings


def test_a_byte_target_save_is_reproducible(tmp_path):
    tree = {f"w{i}": _tensor(kind, (256, 384), i)
            for i, kind in enumerate(("gauss", "laplace", "row-scaled", "outliers") * 2)}
    for name in ("a", "b"):
        jaxjpeg.save(tmp_path / f"{name}.jjpg", tree, target_ratio=8, progress=False)
    assert (tmp_path / "a.jjpg").read_bytes() == (tmp_path / "b.jjpg").read_bytes()


# ----------------------------------------------------------------------------
# Error sums in blocks
# ----------------------------------------------------------------------------

def _naive_squared_error(x, enc):
    """Decode the whole leaf as restore does (half-precision leaves in their
    own dtype), compare in float64, drop the side list's positions."""
    dtype = x.dtype if x.dtype.itemsize < 4 else np.float32
    original = np.asarray(x, np.float64).reshape(-1)
    with np.errstate(invalid="ignore"):   # inf - inf at kept positions, zeroed below
        diff = original - codec.decode_tensor(enc, dtype).astype(np.float64).reshape(-1)
    if enc.outliers is not None and enc.outliers.count:
        diff[enc.outliers.index] = 0.0
    return float(np.sum(diff * diff))


def _special_leaf():
    x = _tensor("outliers", (200, 72))
    x[3, 5], x[7, 1], x[150, 70] = np.inf, np.nan, 1e35
    return x


@pytest.mark.parametrize("make", [
    lambda: _tensor("laplace", (3, 3, 32, 64)),        # a permuted view
    lambda: _tensor("gauss", (4096,)),
    _special_leaf,                                      # side list with NaN and infinities
    lambda: _tensor("row-scaled", (64, 512)).astype(ml_dtypes.bfloat16),
])
@pytest.mark.parametrize("chunk", [rate.ERROR_CHUNK, 1000, 7])
def test_squared_error_equals_decoding_the_whole_leaf(make, chunk, monkeypatch):
    """Block by block in the decoded view (blocks cut across axes when small)
    equals the restored leaf compared at once."""
    monkeypatch.setattr(rate, "ERROR_CHUNK", chunk)
    x = make()
    p = rate.prepare_leaf(x)
    enc = rate.encode_at_step(p, 0.3 * rate.tensor_rms(p))
    assert rate.squared_error(p, enc) == pytest.approx(_naive_squared_error(x, enc), rel=1e-12)
    assert rate.squared_error(x, enc) == rate.squared_error(p, enc)


@pytest.mark.parametrize("transposed", [False, True])
def test_squared_error_with_column_scales_over_many_tiles(transposed):
    """Tiles decoded natively in place (one per core): column scales, a
    transposed leaf read without a copy, kept values, every tile counted."""
    rng = np.random.default_rng(8)
    x = (0.05 * rng.standard_normal((1100, 600))).astype(np.float32)
    x[17, 3] = 40.0                                  # kept in the side list
    x = x.T if transposed else x
    p = codec.prepare(x, col_weight=np.exp(3 * rng.standard_normal(x.shape[1])),
                      outliers=views.find_outliers(x, views.MatrixView.default(2)))
    assert p.col_scale is not None and p.outliers.count
    enc = rate.encode_with_step(p, 12, 20)
    assert len(enc.tiles) > 1
    assert rate.squared_error(p, enc) == pytest.approx(_naive_squared_error(x, enc), rel=1e-12)


def test_squared_error_refuses_an_array_of_another_shape():
    x = _tensor("gauss", (128, 256))
    enc = rate.encode_at_step(x, 0.01)
    with pytest.raises(ValueError, match="shape"):
        rate.squared_error(x.T, enc)


@pytest.mark.parametrize("shape", [(), (5,), (3, 4, 5), (2, 50), (50, 3), (1, 1, 13)])
@pytest.mark.parametrize("size", [1, 4, 12, 1000])
def test_blocks_cover_every_element_once_within_the_size(shape, size):
    seen = np.zeros(shape, int)
    for block in rate._blocks(shape, size):
        assert seen[block].size <= max(size, 1)
        seen[block] += 1
    assert np.all(seen == 1)


def test_finite_norm2_skips_non_finite_and_excluded_values(monkeypatch):
    monkeypatch.setattr(rate, "ERROR_CHUNK", 1000)
    x = _special_leaf()
    flat = x.reshape(-1).astype(np.float64)
    finite = np.isfinite(flat)
    assert rate.finite_norm2(x) == pytest.approx(float(np.sum(flat[finite] ** 2)), rel=1e-12)
    excluded = np.array([0, 17, 4000, 14399])
    keep = finite.copy()
    keep[excluded] = False
    assert rate.finite_norm2(x, excluded) == pytest.approx(float(np.sum(flat[keep] ** 2)),
                                                            rel=1e-12)


def test_squared_error_holds_one_decoded_copy_of_the_leaf():
    """A tensor that is its view without a copy is compared tile by tile:
    neither a decoded copy of the leaf nor a restored or float64 one."""
    import tracemalloc

    x = _tensor("gauss", (2048, 2048))   # 16 MiB; the blocks are 2 x 2 MiB
    # a permuted view: restoring the tensor's order would copy it
    p = codec.prepare(x, view=views.MatrixView((1, 0), 1))
    enc = rate.encode_at_step(p, 0.01)
    rate.squared_error(x, enc)   # warm up (plans, pools)
    tracemalloc.start()
    try:
        rate.squared_error(x, enc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # one decoded tile (1 MiB), its plan, float64 blocks (2 x 2 MiB): 0.31 leaf
    # measured; a decoded view would be 1 leaf, with a restored copy 2
    assert peak < 0.5 * x.nbytes, peak / x.nbytes


def test_a_tile_decoded_alone_equals_its_part_of_the_whole_decode():
    rng = np.random.default_rng(4)
    x = _tensor("row-scaled", (1100, 1300))
    x[5, 7] = np.inf
    p = rate.prepare_leaf(x, np.exp(2 * rng.standard_normal((1, 1300))))
    enc = rate.encode_at_step(p, 0.2 * rate.tensor_rms(p))
    assert len(enc.tiles) > 4 and enc.col_scale is not None
    whole = codec.run_plan(codec.build_plan([enc], [np.float32]))[0]
    for tile in enc.tiles:
        box = (slice(tile.row0, tile.row0 + tile.height), slice(tile.col0, tile.col0 + tile.width))
        np.testing.assert_array_equal(codec.decode_tile(enc, tile), whole[box])
    assert rate.squared_error(p, enc) == pytest.approx(_naive_squared_error(x, enc), rel=1e-12)


def _probe_cost_by_coding(p, probe, bits, delta):
    """A probe step's (tile bytes, squared error) as encode_tensor codes the
    probe and decode_tensor decodes it: what the native ladder must match."""
    sub = codec.Prepared(probe.matrix.shape, p.dtype, views.MatrixView.default(2),
                         probe.matrix, None, None, None, probe.matrix, shared_map=p.shared_map,
                         scales={bits: p.common_scale(bits)[probe.rows], "stats": probe.stats})
    enc = codec.encode_tensor(sub, bits=bits, quant_step=delta, clip="common")
    diff = codec.decode_tensor(rate._unfitted(enc)).astype(np.float64) - probe.matrix
    if probe.col_scale is not None:
        diff *= probe.col_scale
    entropy = sum(int(t.interval_starts[-1] - t.interval_starts[0]) for t in enc.tiles)
    header = sum(len(t.data) for t in enc.tiles) - entropy
    tiles = len(p.tiles(codec.DEFAULT_TILE_SHAPE))
    return entropy / probe.fraction + tiles * header / len(enc.tiles), float(np.sum(diff * diff))


@pytest.mark.parametrize("shape,column_scales", [((4096, 256), False), ((4096, 256), True),
                                                  ((40, 24), False), ((300, 700), True)])
def test_probe_ladder_costs_match_coding_and_decoding_each_step(shape, column_scales):
    """rd_curve measures every step of a probe in one native call per tile
    (the samples' map does not depend on the step): its bytes must be those
    of the tiles encode_tensor writes, its error within 3% of decoding them
    (8% at the finest 12-bit step, where the decoder's fixed-point IDCT,
    which the measure leaves out, adds most), through column scales."""
    rng = np.random.default_rng(5)
    m = (rng.standard_normal(shape) * np.exp(rng.standard_normal((shape[0], 1)))).astype(np.float32)
    col_weight = np.exp(2 * rng.standard_normal(shape[1])) if column_scales else None
    p = codec.prepare(m, col_weight=col_weight)
    assert (p.col_scale is not None) == column_scales
    probe = rate._probe(p, np.random.default_rng(0))
    steps = [(8, 40), (8, 9), (12, 300), (12, 37), (12, 4), (12, 1)]
    got = rate._probe_costs(p, probe, steps, {})
    for step, (nbytes, sse) in zip(steps, got):
        want_bytes, want_sse = _probe_cost_by_coding(p, probe, *step)
        assert nbytes == want_bytes, step
        assert sse == pytest.approx(want_sse, rel=0.08 if step == (12, 1) else 0.03), step


def _mapped(m, bits):
    """``m``'s common-scale maps to ``bits``-bit samples, as float32 arrays."""
    p = codec.prepare(m)
    _, scale, offset = mapping.row_affine(m, bits, clip="common", scale=p.common_scale(bits),
                                          shared=p.shared_map, with_samples=False)
    return np.asarray(scale, np.float32), np.asarray(offset, np.float32)


def _decoded_costs(m, scale, offset, bits, steps, rdo):
    """(entropy bytes, header bytes, squared error) of each step's file, the
    error summed by the real decoder (tile_squared_error)."""
    out = []
    for step in steps:
        data, starts = jaxjpeg._native.encode_mapped(
            m, scale, offset, codec.quant_table(bits=bits, quant_step=step), bits=bits,
            restart_interval=8, rdo=rdo, with_intervals=True)
        entropy = starts[-1] - starts[0]
        out.append((entropy, len(data) - entropy,
                    jaxjpeg._native.tile_squared_error(data, m, scale, offset)))
    return out


@pytest.mark.parametrize("shape", [(64, 96), (37, 53), (8, 8), (200, 24)])
@pytest.mark.parametrize("bits,steps", [(8, [255, 40, 9, 8]), (12, [4000, 300, 37, 4, 1])])
@pytest.mark.parametrize("rdo", [True, False])
def test_measure_steps_bytes_are_the_files(shape, bits, steps, rdo):
    """measure_steps takes each block's values as the encoder coded them (RDO's
    drops and lowerings included, or plain rounding as error feedback's tiles
    are coded): its bytes must be the file's, edge blocks, blocks with only a
    DC and both sample depths included."""
    rng = np.random.default_rng(sum(shape) + bits)
    m = (rng.standard_normal(shape) * np.exp(rng.standard_normal((shape[0], 1)))).astype(np.float32)
    m[: shape[0] // 4] = 0.25   # constant rows: blocks with only a DC
    scale, offset = _mapped(m, bits)
    entropy, header, _ = jaxjpeg._native.measure_steps(m, scale, offset,
                                                       np.array(steps, np.uint16), bits, 8, rdo=rdo)
    want = _decoded_costs(m, scale, offset, bits, steps, rdo)
    assert list(entropy) == [e for e, _, _ in want]
    assert list(header) == [h for _, h, _ in want]


@pytest.mark.parametrize("shape", [(256, 96), (37, 53), (120, 40)])
@pytest.mark.parametrize("bits,steps", [(8, [40, 9, 8]), (12, [300, 37, 4])])
@pytest.mark.parametrize("rdo", [True, False])
@pytest.mark.parametrize("kind", ["gauss", "laplace", "row-scaled"])
def test_measure_steps_error_is_within_2_percent_of_the_decoders(shape, bits, steps, rdo, kind):
    """measure_steps sums each coding's error from its transform-domain
    error (rate_probe.cc's CodedErrorModel) instead of decoding it: within 2%
    of the real decoder's sum over the same file at the steps rate control
    picks (1.5 to 8 bits/weight here), edge blocks (cut by the tile's edge)
    and 8-row tiles of a wide spread of row scales included."""
    m = _tensor(kind, shape, seed=sum(shape) + bits)
    scale, offset = _mapped(m, bits)
    _, _, sse = jaxjpeg._native.measure_steps(m, scale, offset, np.array(steps, np.uint16), bits,
                                              8, rdo=rdo)
    want = _decoded_costs(m, scale, offset, bits, steps, rdo)
    for step, got, (_, _, error) in zip(steps, sse, want):
        assert got == pytest.approx(error, rel=0.02), step


def test_measure_steps_error_of_weighted_pixels():
    """Row scales and column weights that vary inside a block (importances,
    BatchNorm priors) weigh each pixel's error: the measure carries such
    blocks' errors to their pixels (a float inverse DCT), within 2% of the
    decoder's sum (spreading a block's error evenly over its pixels summed
    2.1x the decoder's on test_probe_predicts_the_whole_tensors_error's
    row-weighted tensor)."""
    rng = np.random.default_rng(3)
    scale = (0.01 * np.exp(rng.uniform(-3, 0, 128))).astype(np.float32)
    offset = (-2048 * scale).astype(np.float32)
    m = (400 * scale[:, None] * rng.standard_normal((128, 256))).astype(np.float32)
    col = np.exp(rng.standard_normal(256)).astype(np.float32)
    steps = [40, 9]
    for columns in (False, True):
        weight = np.ascontiguousarray(np.broadcast_to(col, m.shape)) if columns else None
        _, _, sse = jaxjpeg._native.measure_steps(m, scale, offset, np.array(steps, np.uint16),
                                                  12, 8, weight, True)
        for step, got in zip(steps, sse):
            data = jaxjpeg._native.encode_mapped(
                m, scale, offset, codec.quant_table(bits=12, quant_step=step), bits=12,
                restart_interval=8, rdo=True)
            # Σ ((decoded - m) * col)²: the decoder's output times col against m * col
            want = (jaxjpeg._native.tile_squared_error(data, m * col, scale, offset, col) if columns
                    else jaxjpeg._native.tile_squared_error(data, m, scale, offset))
            assert got == pytest.approx(want, rel=0.02), (step, columns)


def test_measure_steps_dead_rows_cost_no_error():
    """Rows coded as all zeros (a constant row at the middle sample: dead
    channels) decode exactly: the measure adds no rounding noise for them."""
    m = np.zeros((64, 64), np.float32)
    scale, offset = np.full(64, 0.01, np.float32), np.full(64, -2048 * 0.01, np.float32)
    _, _, sse = jaxjpeg._native.measure_steps(m, scale, offset, np.array([1, 9], np.uint16), 12, 8)
    assert list(sse) == [0.0, 0.0]
    assert jaxjpeg._native.tile_squared_error(
        jaxjpeg._native.encode_mapped(m, scale, offset, codec.quant_table(bits=12, quant_step=9),
                                      bits=12, restart_interval=8), m, scale, offset) == 0.0


@pytest.mark.parametrize("case", ["plain", "transposed", "outliers", "columns", "tiles"])
@pytest.mark.parametrize("bits,delta", [(8, 12), (12, 5)])
def test_error_measured_while_coding_is_the_decoders_to_the_last_bit(case, bits, delta):
    """An error-bound search measures each coding as its tiles are coded
    (encode_mapped_with_error) instead of decoding them: the bytes must be
    encode_with_step's and the error exactly squared_error's (the decoder's),
    through transposed views, side lists, column scales and many tiles."""
    rng = np.random.default_rng(7)
    x = (0.05 * rng.standard_normal((96, 136))).astype(np.float32)
    col_weight = None
    if case == "transposed":   # rows of the view are the leaf's last axis
        x *= np.exp(2 * rng.standard_normal(136)).astype(np.float32)
    elif case == "outliers":
        x[rng.integers(0, 96, 6), rng.integers(0, 136, 6)] = 9.0
        x[3, 4] = np.inf
    elif case == "columns":
        col_weight = np.exp(2 * rng.standard_normal(136))
    elif case == "tiles":
        x = (0.05 * rng.standard_normal((600, 560))).astype(np.float32)
    p = (codec.prepare(x, col_weight=col_weight) if case == "columns" else rate.prepare_leaf(x))
    if case == "transposed":
        assert p.view.perm != tuple(range(x.ndim))
    if case == "outliers":
        assert p.outliers is not None and p.outliers.count
    if case == "tiles":
        assert len(p.tiles(codec.DEFAULT_TILE_SHAPE)) > 1
    enc, error = rate.encode_measured(p, bits, delta)
    plain = rate.encode_with_step(p, bits, delta)
    assert [t.data for t in enc.tiles] == [t.data for t in plain.tiles]
    assert error == rate.squared_error(p, plain)


def test_squared_error_of_refuses_error_feedback():
    x = _tensor("gauss", (64, 96))
    cov = rate.InputCovariance(np.eye(96) + 0.5, (1,))
    p = rate.prepare_leaf(x, input_covariance=cov)
    with pytest.raises(ValueError, match="error feedback"):
        codec.encode_tensor(p, bits=12, quant_step=4,
                            squared_error_of=(x, None))
    enc, error = rate.encode_measured(p, 12, 4)   # measured by decoding instead
    assert error == rate.squared_error(p, enc)


def test_measure_steps_refuses_mismatched_arguments():
    m = np.zeros((16, 16), np.float32)
    ones, zeros = np.ones(16, np.float32), np.zeros(16, np.float32)
    steps = np.array([4], np.uint16)
    with pytest.raises(ValueError, match="one value per row"):
        jaxjpeg._native.measure_steps(m, ones[:8], zeros, steps, 8, 8)
    with pytest.raises(ValueError, match="col_weight"):
        jaxjpeg._native.measure_steps(m, ones, zeros, steps, 8, 8, np.ones((16, 8), np.float32))
    with pytest.raises(ValueError, match="1..65535"):
        jaxjpeg._native.measure_steps(m, ones, zeros, np.array([0], np.uint16), 8, 8)
    entropy, header, sse = jaxjpeg._native.measure_steps(m, ones, zeros, steps[:0], 8, 8)
    assert len(entropy) == len(header) == len(sse) == 0


def _choice_by_full_bisection(allocator, name):
    """BudgetAllocator._choose with all 80 bisection rounds (its reference)."""
    names = sorted(allocator.pending)
    table = [allocator._rows[n] for n in names]
    nbytes = allocator._nbytes[table]
    finite = np.isfinite(nbytes)
    nbytes[finite] *= allocator._correction()
    dist = allocator._dist[table]
    left = allocator.budget - allocator.spent
    rows = np.arange(len(names))

    def pick(lam):
        return np.argmin(np.where(finite, dist + lam * nbytes, np.inf), axis=1)

    lo, hi = -60.0, 60.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if float(nbytes[rows, pick(math.exp(mid))].sum()) > left:
            lo = mid
        else:
            hi = mid
    choice = rate.BudgetAllocator._fill(nbytes, dist, pick(math.exp(hi)), left)
    return int(choice[names.index(name)])


@pytest.mark.parametrize("ratio", [3, 6, 12, 30])
def test_allocation_bisects_to_the_same_choices_from_its_shortcuts(ratio):
    """The multiplier's bisection re-chooses only the tensors whose choice
    differs between its ends and starts around the last tensor's multiplier;
    every tensor's choice, as tensors are coded one by one and their sizes
    miss the predictions, must be the one 80 full rounds from exp(±60) give."""
    tensors = {f"t{i}": _tensor(kind, (256, 192), seed=i)
               for i, kind in enumerate(["gauss", "laplace", "outliers", "row-scaled"] * 3)}
    curves = {n: rate.rd_curve(rate.prepare_leaf(x)) for n, x in tensors.items()}
    budget = sum(x.nbytes for x in tensors.values()) // ratio
    sens = {n: 10.0 ** (i % 3 - 1) for i, n in enumerate(tensors)}
    allocator = rate.BudgetAllocator(curves, budget, sensitivity=sens)
    misses = np.random.default_rng(0).uniform(0.9, 1.1, len(tensors))
    for name, miss in zip(tensors, misses):
        k = allocator._choose(name)
        assert k == _choice_by_full_bisection(allocator, name), name
        allocator.pending.discard(name)   # coded: as encode() books it, the size missed
        allocator.spent += int(curves[name].nbytes[k] * miss)
        allocator.predicted_spent += float(curves[name].nbytes[k])


def _odd_curve(rng, length):
    """A curve with what measured ones rarely have: bumps (not convex),
    repeated candidates, equal sizes, flat distortion."""
    nbytes = np.sort(rng.uniform(1e3, 1e5, length))
    sse = np.sort(rng.uniform(0.1, 10.0, length))[::-1] * rng.uniform(0.7, 1.3, length)
    if length > 3:
        nbytes[2] = nbytes[1]                     # equal sizes
        nbytes[-1], sse[-1] = nbytes[-2], sse[-2]  # a repeated candidate
        sse[:2] = sse[0]                           # flat start
    steps = np.arange(length, 0, -1)
    return rate.Curve(np.full(length, 12), steps, steps * 1.0, nbytes, sse)


@pytest.mark.parametrize("window", [3, 4096])
@pytest.mark.parametrize("seed", range(8))
def test_allocation_breakpoints_choose_as_the_bisection_on_odd_curves(seed, window, monkeypatch):
    """_choose takes the crossing from each tensor's convex hull; on curves
    that are not convex, repeat candidates, share sizes, differ in length
    and in sensitivity by decades (one is zero), every choice and multiplier
    must be the bisection's (the allocator without breakpoints, checked
    against 80 full rounds above), as tensors are coded and miss, whether the
    drops from the last crossing are summed in one window or many."""
    monkeypatch.setattr(rate._Breakpoints, "WINDOW", window)
    rng = np.random.default_rng(seed)
    curves = {f"t{i}": _odd_curve(rng, int(rng.integers(1, 40))) for i in range(30)}
    sens = {n: 10.0 ** rng.uniform(-3, 3) for n in curves}
    sens["t0"] = 0.0
    budget = int(sum(np.median(c.nbytes) for c in curves.values()))
    fast = rate.BudgetAllocator(curves, budget, sensitivity=sens)
    bisecting = rate.BudgetAllocator(curves, budget, sensitivity=sens)
    assert fast._breaks is not None
    bisecting._breaks = None
    for name in rng.permutation(list(curves)):
        k = fast._choose(name)
        assert k == bisecting._choose(name), name
        assert fast.slope == pytest.approx(bisecting.slope, rel=1e-9)
        miss = rng.uniform(0.8, 1.2)
        for allocator in (fast, bisecting):
            allocator.pending.discard(name)
            allocator.spent += int(curves[name].nbytes[k] * miss)
            allocator.predicted_spent += float(curves[name].nbytes[k])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bound", [0.015, 0.03, 0.06, 0.12])
def test_error_bound_skips_only_steps_that_miss(seed, bound):
    """The search stops without coding Δ + 1 when the (Δ² + 1) error law
    predicts it over the budget; the step found must then be the largest
    within the bound (Δ + 1, coded here, misses) unless it landed inside
    BOUND_SLACK."""
    x = _tensor("gauss", (256, 512), seed)
    p = rate.prepare_leaf(x)
    enc = rate.encode_for_error(p, bound)
    err = rate.relative_error(x, enc)
    assert err <= bound
    if err < math.sqrt(1 - rate.BOUND_SLACK) * bound:
        delta = int(jaxjpeg._native.inspect(enc.tiles[0].data)["quant_table"][0])
        assert rate.relative_error(x, rate.encode_with_step(p, enc.bits, delta + 1)) > bound


def _one_loud_channel(seed=0):
    """A folded-BatchNorm-like kernel: one output channel 100x the others
    (silero-vad's reparametrised convolutions spread 80x)."""
    w = 0.05 * np.random.default_rng(seed).standard_normal((128, 192))
    w[7] *= 100
    return w.astype(np.float32)


@pytest.mark.parametrize("ratio", [3.2, 3.6])
@pytest.mark.parametrize("transposed", [False, True])
def test_generous_target_is_spent_beyond_the_shared_scales_finest_step(ratio, transposed,
                                                                      tmp_path):
    """With one channel 100x the others, a shared 12-bit scale steps no finer
    than 1/4095 of that channel's range; byte targets stopped there, silently
    missing target_ratio=3.2 by 1.6x and leaving the quiet channels at 5% error."""
    import jaxjpeg

    w = _one_loud_channel()
    w = np.ascontiguousarray(w.T) if transposed else w
    path = tmp_path / "w.jjpg"
    jaxjpeg.save(path, {"w": w}, target_ratio=ratio, progress=False)
    assert w.nbytes / path.stat().st_size == pytest.approx(ratio, rel=0.02)
    restored = np.asarray(jaxjpeg.restore(path)["w"])
    loud = np.arange(w.shape[1 if transposed else 0]) == 7
    quiet = (restored - w)[:, ~loud] if transposed else (restored - w)[~loud]
    reference = w[:, ~loud] if transposed else w[~loud]
    assert np.linalg.norm(quiet) / np.linalg.norm(reference) < 0.01


def test_a_target_beyond_every_finest_coding_stores_leaves_exactly(tmp_path):
    """Found by review: targets under about 3x gave every leaf its finest
    coding (about 11 bits/weight) and a file far under the target; leaves are
    now stored raw, exactly, where the bytes allow."""
    import jaxjpeg

    tree = {"a": _tensor("gauss", (256, 256), 1), "b": _tensor("gauss", (256, 256), 2)}
    report = jaxjpeg.save(tmp_path / "x.jjpg", tree, target_ratio=1.3, progress=False)
    target = 2 * tree["a"].nbytes / 1.3
    assert 0.95 * target < report.file_bytes <= target
    notes = sorted(leaf.note for leaf in report.leaves)
    assert "stored raw, exactly: the byte target has room for it" in notes, notes
    restored = jaxjpeg.restore(tmp_path / "x.jjpg")
    exact = [k for k in tree if np.array_equal(np.asarray(restored[k]), tree[k])]
    assert len(exact) == 1


@pytest.mark.parametrize("ratio", [2.0, 2.5, 2.9])
def test_targets_past_jpegs_finest_coding_take_one_fine_step(ratio, tmp_path):
    """Found by review: between JPEG's finest coding (about 11 bits a value)
    and raw nothing was offered, so trees of few large leaves landed under
    their targets (Magika at 2.4x -17.9%; here 2.87x for targets of 2.0 and
    2.5, 3.01x for 2.9). A one-step coding up to 15.5 bits a value is offered
    beside JPEG's where JPEG's finest leave bytes unspent (FINE_MARGIN)."""
    import jaxjpeg

    tree = {"a": _tensor("gauss", (256, 256), 1), "b": _tensor("gauss", (256, 256), 2)}
    report = jaxjpeg.save(tmp_path / "x.jjpg", tree, target_ratio=ratio, progress=False)
    assert report.ratio_vs_float32 == pytest.approx(ratio, rel=0.04)
    assert all("JPEG's finest codings left" in leaf.note for leaf in report.leaves)
    restored = jaxjpeg.restore(tmp_path / "x.jjpg")
    for k, v in tree.items():
        error = np.linalg.norm(np.asarray(restored[k]) - v) / np.linalg.norm(v)
        assert error < 1e-3, (k, error)


def test_per_row_ranges_only_where_ranges_spread():
    """Curves of tensors whose channels are alike are measured as before.
    (One loud channel in the "auto" view is balanced: its ranges no longer
    spread.)"""
    assert rate.row_range_fallback(rate.prepare_leaf(_tensor("gauss", (256, 256), 0))) is None
    loud = _one_loud_channel()
    assert rate.row_range_fallback(rate.prepare_leaf(loud, view="framework")) is not None
    assert rate.prepare_leaf(loud).balanced
    curve = rate.rd_curve(rate.prepare_leaf(_tensor("gauss", (256, 256), 0)))
    assert curve.row_ranges is None


def test_a_missed_byte_target_is_said(tmp_path, recwarn):
    """Beyond every coded leaf's finest coding a target is missed, and the
    save says so. Between the shared scale's finest coding and per-row
    ranges' coarsest, where no candidate had existed (target_ratio=4 gave
    5.1x with this warning in the framework's view), one fine step now
    lands it; so does the "auto" view, which balances the loud channel."""
    import jaxjpeg

    with pytest.warns(UserWarning, match=r"target_ratio=1.5 asks for 65,536 bytes; the file "
                                         r"has .*every coded leaf at its finest coding"):
        report = jaxjpeg.save(tmp_path / "w.jjpg", {"w": _one_loud_channel()},
                              target_ratio=1.5, view="framework", progress=False)
    assert report.ratio_vs_float32 > 1.5 * 1.02
    for view in ("framework", "auto"):
        recwarn.clear()
        report = jaxjpeg.save(tmp_path / "a.jjpg", {"w": _one_loud_channel()}, target_ratio=4,
                              view=view, progress=False)
        assert report.ratio_vs_float32 == pytest.approx(4, rel=0.02)
        assert not [w for w in recwarn if "target_ratio" in str(w.message)]


def test_a_met_byte_target_says_nothing(tmp_path, recwarn):
    import jaxjpeg

    jaxjpeg.save(tmp_path / "m.jjpg", _model_like(), target_ratio=8, progress=False)
    assert not [w for w in recwarn if "asks for" in str(w.message)]


def test_a_small_leaf_that_misses_its_prediction_does_not_steer_the_rest(tmp_path, recwarn):
    """A leaf of identical rows, coded first (its name sorts first), costs
    twice its predicted bytes (its row maps); the actual / predicted ratio
    of that one leaf used to scale every later prediction: the next kernel
    got 2.7 bits/weight (22% error), the last one 9.2 (0.3%), and the file
    came out 8% under its target."""
    import jaxjpeg

    rng = np.random.default_rng(0)
    row = rng.normal(size=(1, 128)).astype(np.float32)
    tree = {"a_rows": np.ascontiguousarray(np.broadcast_to(row, (256, 128))),
            "b_kernel": rng.normal(size=(64, 128, 3, 3)).astype(np.float32),
            "c_matrix": rng.normal(size=(256, 128)).astype(np.float32)}
    report = jaxjpeg.save(tmp_path / "t.jjpg", tree, target_ratio=8, progress=False)
    assert abs(report.ratio_vs_float32 / 8 - 1) < 0.02
    assert not [w for w in recwarn if "asks for" in str(w.message)]
    got = jaxjpeg.restore(tmp_path / "t.jjpg")
    errors = [np.linalg.norm(np.asarray(got[k]) - tree[k]) / np.linalg.norm(tree[k])
              for k in ("b_kernel", "c_matrix")]
    assert max(errors) < 3 * min(errors)


def test_the_last_tensor_mixes_tiles_of_two_adjacent_steps():
    """Tiles are JPEG streams with their own tables: between two codings of
    one tensor the last tensor of a byte target takes the finer one's tiles
    where they fit, and each tile decodes as in the coding it came from."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1024, 768)).astype(np.float32)
    p = rate.prepare_leaf(x)
    fits, over = (rate.encode_with_step(p, 12, d, tile_shape=(256, 256)) for d in (4, 3))
    assert len(fits.tiles) > 4 and over.nbytes > fits.nbytes
    left = (fits.nbytes + over.nbytes) // 2
    mixed = rate._mixed_tiles(fits, over, left)
    assert fits.nbytes < mixed.nbytes <= left
    got, a, b = (codec.decode_tensor(e) for e in (mixed, fits, over))
    from_over = [t is u for t, u in zip(mixed.tiles, over.tiles)]
    assert 0 < sum(from_over) < len(from_over)
    m = p.view.to_matrix(got)
    for tile, taken in zip(mixed.tiles, from_over):
        box = (slice(tile.row0, tile.row0 + tile.height), slice(tile.col0, tile.col0 + tile.width))
        want = p.view.to_matrix(b if taken else a)[box]
        np.testing.assert_array_equal(m[box], want)


def test_a_large_last_tensor_lands_its_byte_target(tmp_path):
    """A small kernel then a 256 x 1152 matrix (coded last) at 3x: adjacent
    12-bit steps of the matrix are ~5% of the file apart; the file used to
    come out 4-6% under its target."""
    import jaxjpeg

    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(64, 32, 3, 3)).astype(np.float32),
            "z": (rng.normal(size=(256, 1152)) * 0.03).astype(np.float32)}
    report = jaxjpeg.save(tmp_path / "z.jjpg", tree, target_ratio=3, progress=False)
    assert abs(report.ratio_vs_float32 / 3 - 1) < 0.02
    got = jaxjpeg.restore(tmp_path / "z.jjpg")
    assert np.linalg.norm(np.asarray(got["z"]) - tree["z"]) < 0.01 * np.linalg.norm(tree["z"])


@pytest.mark.parametrize("ratio", [3.8, 3.9, 4.1])
def test_a_large_kernel_coded_before_a_small_leaf_lands_between_integer_steps(tmp_path, ratio):
    """One 655 K-value kernel coded before a bias (as Magika's convolution
    before its LayerNorm vectors) at 8-9 bits a weight: its 12-bit steps 2,
    3, 4 are 0.4-0.6 bit a weight apart and the bias cannot take up the
    rest, so the file landed 3-5.6% under its target with a warning."""
    rng = np.random.default_rng(0)
    tree = {"conv": (rng.standard_t(6, (512, 256, 5)) * 0.02).astype(np.float32),
            "zz_bias": rng.standard_normal(512).astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = jaxjpeg.save(tmp_path / "k.jjpg", tree, target_ratio=ratio, progress=False)
    assert abs(report.ratio_vs_float32 / ratio - 1) < 0.02


def test_a_widened_step_codes_between_two_integer_steps():
    """Rows' scales widened by w at integer step Δ: the maps stay
    float16-exact, bytes and error fall between Δ's and Δ+1's, and the
    error is Δ's times w (what _densify predicts)."""
    x = (np.random.default_rng(1).standard_t(5, (512, 512)) * 0.02).astype(np.float32)
    p = codec.prepare(x)
    codings = {w: rate.encode_with_step(p, 12, 2, widen=w) for w in (1.0, 1.3)}
    three = rate.encode_with_step(p, 12, 3)
    wide = codings[1.3]
    assert wide.affine().dtype == np.float16
    assert three.nbytes < wide.nbytes < codings[1.0].nbytes
    errors = {w: rate.squared_error(p, e) for w, e in codings.items()}
    assert errors[1.0] < errors[1.3] < rate.squared_error(p, three)
    assert math.sqrt(errors[1.3] / errors[1.0]) == pytest.approx(1.3, rel=0.03)
    restored = codec.decode_tensor(wide)
    assert np.sqrt(np.mean((restored - x) ** 2)) == pytest.approx(
        math.sqrt(errors[1.3] / x.size), rel=1e-3)
    with pytest.raises(ValueError, match="widen"):
        rate.encode_with_step(p, 12, 2, widen=0.9)


def test_widened_steps_fill_the_finest_integer_steps_gaps():
    """Candidates under 10% apart between 12-bit steps 2 and 4 (integer
    steps: 33-50%), none widened where a coarser candidate errs less (step
    1 widened past ~1.6 errs more than step 2: the decoder's rounding of
    samples grows as much as the step; step Δ widened close to Δ + 1, about
    as much as Δ + 1)."""
    x = (np.random.default_rng(2).standard_t(5, (256, 512)) * 0.02).astype(np.float32)
    p = codec.prepare(x)
    c = rate.rd_curve(p)
    base = rate.base_scale(p, 12)
    fine = c.q <= rate.WIDEN_BELOW * base * (1 + 1e-9)
    assert np.all(c.bits[fine] == 12) and c.q[-1] == base
    assert np.all(np.diff(c.sse[fine]) < 0)
    two = fine & (c.q >= 2 * base * (1 - 1e-9))
    assert (c.q[two][:-1] / c.q[two][1:]).max() < 1.1
    assert np.any((c.q > base) & (c.q < 2 * base))


@pytest.mark.parametrize("axis", [0, 1])
def test_per_row_ranges_keep_the_shards_tile_edges(axis):
    """The fallback's view may be the transpose of the leaf's; its tile cuts
    are then the same shard boundaries, rows and columns swapped. (Not
    balanced: sharded or not, balancing takes the loud row's spread away.)"""
    from jaxjpeg import codec

    x = np.repeat(_one_loud_channel(), 2, axis=1)          # (128, 384)
    half = x.shape[axis] // 2
    regions = [tuple((i * half, (i + 1) * half, 1) if a == axis else (0, n, 1)
                     for a, n in enumerate(x.shape)) for i in range(2)]
    p = rate.prepare_leaf(x, shards=regions, balance=False)
    fallback = rate.row_range_fallback(p)
    assert fallback is not None
    transposed = fallback.view != p.view
    assert fallback.tile_cuts == (p.tile_cuts[::-1] if transposed else p.tile_cuts)
    assert any(fallback.tile_cuts)
    enc = rate.encode_with_step(fallback, 12, 1, clip="minmax")
    decoded = codec.decode_tensor(enc)
    assert np.linalg.norm(decoded - x) / np.linalg.norm(x) < 1e-3


def test_turns_let_names_through_in_order_and_past_skipped_ones():
    """A byte target's leaves code in their storing order: a name waits for
    every name before it to be done (coded, or released after an error)."""
    import threading

    from jaxjpeg.checkpoint import _Turns

    turns = _Turns(["a", "b", "c", "d"])
    passed = []

    def go(name):
        turns.wait(name)
        passed.append(name)
        turns.done(name)

    threads = [threading.Thread(target=go, args=(n,)) for n in ("d", "b")]
    for t in threads:
        t.start()
    turns.done("c")           # released before its turn: b and d still wait for a
    assert passed == []
    go("a")
    for t in threads:
        t.join(timeout=10)
    assert passed == ["a", "b", "d"]


@pytest.mark.parametrize("bits", [None, 8, 12])
@pytest.mark.parametrize("kind", ["gauss", "outliers", "row-scaled", "tiny"])
def test_ladder_steps_are_step_for_over_the_ladder(kind, bits):
    """rd_curve's steps, computed at once, must be step_for's, one by one."""
    x = _tensor(kind if kind != "tiny" else "gauss", (64, 96) if kind != "tiny" else (3, 5))
    if kind == "tiny":
        x = x * 1e-30
    p = rate.prepare_leaf(x)
    rms = rate.tensor_rms(p)
    expected = list(dict.fromkeys(rate.step_for(p, rms * 2.0 ** -k, bits) for k in rate.LADDER))
    assert rate._ladder_steps(p, rms, bits) == expected


def _segment_of(full, cut) -> int:
    """Where ``cut``'s candidates start in ``full``'s, checking that all but
    its finest (interpolated towards a step ``full`` may not end on) match."""
    start = int(np.flatnonzero((full.bits == cut.bits[0]) & (full.delta == cut.delta[0]))[0])
    k = len(cut.nbytes)
    for field in ("bits", "delta", "q", "nbytes", "sse"):
        np.testing.assert_array_equal(getattr(cut, field)[:k - 1],
                                      getattr(full, field)[start:start + k - 1])
    return start


@pytest.mark.parametrize("floor", [False, True])
def test_a_reach_leaves_out_only_the_ends_of_the_ladder(floor):
    """Under a byte target the ladder stops once a step costs LADDER_HEADROOM
    times the reach, and (with floor) starts at the finest step costing under
    LADDER_FLOOR times it: the curve is a run of the full one's candidates."""
    p = rate.prepare_leaf(_tensor("laplace", (256, 512), 7))
    full = rate.rd_curve(p)
    cut = rate.rd_curve(p, reach=3.0, floor=floor)
    assert len(cut.nbytes) < len(full.nbytes)
    assert 8 * cut.nbytes[-1] / p.size > rate.LADDER_HEADROOM * 3.0
    start = _segment_of(full, cut)
    if not floor:
        assert start == 0
        return
    assert start > 0   # the coarsest steps (tile headers, near 0 bits) left out
    assert 8 * cut.nbytes[0] / p.size < rate.LADDER_FLOOR * 3.0
    # the next measured step of the full ladder is at or over the floor: no
    # more than the one step under it is kept
    measured = [i for i in range(start + 1, len(full.nbytes))
                if (full.bits[i], full.delta[i]) in set(rate._ladder_steps(
                    p, rate.reference_rms(p), None))]
    assert 8 * full.nbytes[measured[0]] / p.size >= rate.LADDER_FLOOR * 3.0 or start == 0


@pytest.mark.parametrize("shift", [-20.0, 20.0])
def test_a_wrong_floor_prediction_only_codes_more_steps(monkeypatch, shift):
    """A prediction of too many bits starts the ladder at its start; one of
    too few is extended coarser until a step costs under the floor: either
    way the curve is a run of the full one's, reaching under the floor."""
    p = rate.prepare_leaf(_tensor("row-scaled", (256, 512), 3))
    # bends are measured above the floor only, so they would differ between
    # the two curves; they have their own test
    monkeypatch.setattr(rate, "BEND_BYTES_RATIO", math.inf)
    full = rate.rd_curve(p)
    monkeypatch.setattr(rate, "GAUSSIAN_BITS", rate.GAUSSIAN_BITS + shift)
    cut = rate.rd_curve(p, reach=4.0)
    start = _segment_of(full, cut)
    if shift > 0:   # no step predicted under the floor: the whole coarse end
        assert start == 0
    else:           # every first step predicted under it: extended from the sixth
        steps = rate._ladder_steps(p, rate.reference_rms(p), None)
        assert steps.index((int(cut.bits[0]), int(cut.delta[0]))) < (rate.LADDER_FIRST
                                                                     - rate.LADDER_BATCH)
        assert 8 * cut.nbytes[0] / p.size < rate.LADDER_FLOOR * 4.0 or start == 0


def test_probe_size_follows_the_leafs_share():
    """Leaves with at least PROBE_FULL_SHARE of the weights get the full
    probe; smaller shares a probe ∝ √share, never under MIN_PROBE_ELEMENTS,
    and rd_curve codes that many weights of a large leaf."""
    total = 10**9
    full = int(rate.PROBE_FULL_SHARE * total)
    assert rate.probe_elements(full, total) == rate.PROBE_ELEMENTS
    assert rate.probe_elements(full // 4, total) == rate.PROBE_ELEMENTS // 2
    assert rate.probe_elements(full // 10**6, total) == rate.MIN_PROBE_ELEMENTS
    assert rate.probe_elements(10**6, 10**6) == rate.PROBE_ELEMENTS
    p = codec.prepare(_tensor("gauss", (1024, 512)))
    for elements in (rate.PROBE_ELEMENTS, rate.MIN_PROBE_ELEMENTS):
        probe = rate._probe(p, np.random.default_rng(0), elements)
        assert probe.matrix.size == pytest.approx(elements, rel=0.1)
        assert probe.fraction == probe.matrix.size / p.size


def test_budget_files_do_not_depend_on_the_cores(monkeypatch, tmp_path):
    """Leaves are analysed and prepared on the save's threads under a byte
    target: the same file on one core as on several, whichever leaf
    finishes first."""
    from jaxjpeg import checkpoint

    tree = {f"w{i}": _tensor("row-scaled", (96, 64 + 8 * (i % 5)), seed=i) for i in range(30)}
    files = []
    for workers in (1, 3):
        monkeypatch.setattr(checkpoint, "save_workers", lambda workers=workers: workers)
        path = tmp_path / f"w{workers}.jjpg"
        jaxjpeg.save(path, tree, target_ratio=8, progress=False)
        files.append(path.read_bytes())
    assert files[0] == files[1]


@pytest.mark.parametrize("ratio", [3, 8])
def test_leaves_coded_ahead_of_their_turn_give_the_same_file(monkeypatch, tmp_path, ratio):
    """Under a byte target each leaf is coded in its turn (its choice
    depends on the bytes the leaves before it took); the save's threads code
    the next leaves meanwhile at the last choice's candidates, kept where
    their turn chooses alike (BudgetAllocator.coded_ahead). The file is the
    one a save coding one leaf at a time writes, with most leaves coded
    ahead, and where every coding ahead fails (coded in their turns)."""
    import threading

    from jaxjpeg import checkpoint

    tree = {f"w{i}": _tensor("row-scaled", (96, 64 + 8 * (i % 5)), seed=i) for i in range(30)}
    tree.update({f"thin{i}": _tensor("gauss", (4096, 2), seed=40 + i) for i in range(6)})
    ahead, turn = [], threading.local()
    coded_ahead, encode, encode_candidate = (rate.BudgetAllocator.coded_ahead,
                                             rate.BudgetAllocator.encode, rate.encode_candidate)

    def counted_ahead(self, name, p, room):
        got = coded_ahead(self, name, p, room)
        ahead.append(got is not None)
        return got

    def in_turn(self, name, p, guess=None):
        turn.now = True
        try:
            return encode(self, name, p, guess)
        finally:
            turn.now = False

    def failing_ahead(*args, **kwargs):
        if not getattr(turn, "now", False):
            raise MemoryError("coded ahead")
        return encode_candidate(*args, **kwargs)

    monkeypatch.setattr(rate.BudgetAllocator, "coded_ahead", counted_ahead)
    monkeypatch.setattr(rate.BudgetAllocator, "encode", in_turn)
    files = []
    for workers, fails in ((1, False), (4, False), (4, True)):
        monkeypatch.setattr(checkpoint, "save_workers", lambda workers=workers: workers)
        if fails:
            monkeypatch.setattr(rate, "encode_candidate", failing_ahead)
        ahead.clear()
        path = tmp_path / f"w{workers}{fails}.jjpg"
        jaxjpeg.save(path, tree, target_ratio=ratio, progress=False)
        files.append(path.read_bytes())
        if workers > 1:   # (how many: as the threads meet their turns)
            assert sum(ahead) == 0 if fails else sum(ahead) >= len(tree) // 4, ahead
    assert files[0] == files[1] == files[2]


def test_codings_held_ahead_of_their_turn_take_about_a_leaf(monkeypatch, tmp_path):
    """Threads coding leaves ahead of their turn hold those codings until
    it comes: at most the largest coded leaf's bytes of them, as their
    candidates predict them (found by review: 8 threads held 44 MB more of
    a 232 MB tree of 16-64 MB leaves); the others wait to code in turn."""
    from jaxjpeg import checkpoint

    tree = {f"w{i}": _tensor("row-scaled", (256, 128 + 32 * (i % 4)), seed=i) for i in range(24)}
    largest = max(a.nbytes for a in tree.values())
    held = []
    hold = checkpoint._BudgetEncoder._hold

    def measured(self, name, nbytes):
        ok = hold(self, name, nbytes)
        held.append(sum(self._held.values()))
        assert self.ahead_bytes == largest
        return ok

    monkeypatch.setattr(checkpoint._BudgetEncoder, "_hold", measured)
    monkeypatch.setattr(checkpoint, "save_workers", lambda: 8)
    jaxjpeg.save(tmp_path / "a.jjpg", tree, target_ratio=3, progress=False)
    assert max(held, default=0) <= largest   # (how many code ahead: as threads meet)
    encoder = checkpoint._BudgetEncoder(None, None, ahead_bytes=100)
    assert hold(encoder, "a", 60) and not hold(encoder, "b", 50) and hold(encoder, "c", 40)


@pytest.mark.parametrize("bits,steps", [(8, [20, 9]), (12, [300, 70, 9])])
def test_measure_steps_error_of_samples_at_the_range_ends(bits, steps):
    """Non-negative rows map their zeros to sample 0, and the decoder clamps
    what the coding pushes below it: the measure clamps such blocks' pixels
    as the decoder does (summing their transform-domain error instead
    overstated a PP-OCRv6 detector leaf's error by 14%), within 2%."""
    rng = np.random.default_rng(9)
    m = np.maximum(rng.standard_normal((128, 192)), 0).astype(np.float32) * np.float32(0.02)
    scale, offset = _mapped(m, bits)
    assert np.all(offset == 0)   # zeros at sample 0
    _, _, sse = jaxjpeg._native.measure_steps(m, scale, offset, np.array(steps, np.uint16), bits, 8)
    want = _decoded_costs(m, scale, offset, bits, steps, True)
    for step, got, (_, _, error) in zip(steps, sse, want):
        assert got == pytest.approx(error, rel=0.02), step


@pytest.mark.parametrize("offset", [10.0, 1000.0])
def test_a_byte_target_codes_values_about_a_large_mean_on_their_spread(tmp_path, offset):
    """Found by review: a byte target's ladder ran from the leaf's RMS, its
    mean included: at offset 1000 its finest step was coarser than the
    spread, the leaf came back constant (error 0.996 of its spread) and the
    file 90% under the target."""
    import warnings

    import jaxjpeg
    x = (offset + 1e-3 * np.random.default_rng(0).standard_normal((128, 128))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = jaxjpeg.save(tmp_path / "t.jjpg", {"x": x}, target_ratio=8)
    got = np.asarray(jaxjpeg.restore(tmp_path / "t.jjpg")["x"], np.float64)
    assert np.linalg.norm(got - x) < 0.15 * np.linalg.norm(x - x.astype(np.float64).mean())
    assert abs(report.file_bytes / (4 * x.size / 8) - 1) < 0.05, report.file_bytes


@pytest.mark.parametrize("tree_name, ratio", [("one", 24), ("one", 48), ("mixed", 40)])
def test_byte_targets_at_a_bit_a_weight_and_under_land(tmp_path, tree_name, ratio):
    """Found by review: at 0.5-1.3 bits/weight (24-64x) byte targets missed
    by 9-23%, the file not even monotone in the target: probes interpolated
    across the bend where coefficients stop rounding to zero (up to 1.47x
    the bytes predicted there), and error caps were taken whose predicted
    floor just fit."""
    import warnings

    import jaxjpeg
    rng = np.random.default_rng(1)
    g = lambda *s: rng.normal(size=s).astype(np.float32)   # noqa: E731
    tree = ({"k": g(512, 512)} if tree_name == "one" else
            {"k1": g(256, 256), "k2": g(128, 512) * 0.01, "b": g(256), "s": g(512, 8)})
    weights = sum(v.size for v in tree.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = jaxjpeg.save(tmp_path / "t.jjpg", tree, target_ratio=ratio)
    assert abs(report.file_bytes / (4 * weights / ratio) - 1) < 0.05, report.file_bytes


def test_the_curve_follows_its_bend_at_the_coarsest_steps():
    """Where coefficients stop rounding to zero (0.2-1 bits/weight) the
    curve bends between two ladder steps; interpolated across it, candidates
    cost up to 1.47x the bytes predicted and erred more (found by review)."""
    x = np.random.default_rng(1).normal(size=(512, 512)).astype(np.float32)
    p = codec.prepare(x)
    c = rate.rd_curve(p)
    rel = np.sqrt(c.sse / np.sum(x.astype(np.float64) ** 2))
    checked = 0
    for k in np.flatnonzero((rel > 0.6) & (rel < 0.95))[::3]:
        actual = rate.encode_candidate(p, c, int(k), {}).nbytes
        assert 0.8 < actual / c.nbytes[k] < 1.2, (k, actual, c.nbytes[k], rel[k])
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("mode", [{}, {"per_row": True}, {"per_element": True}])
def test_leaves_no_gradient_reaches_are_weighed_as_the_least_reached(tmp_path, mode):
    """Found by review: an MoE expert the calibration batches never routed
    to had squared gradients 0, so sensitivity 0: save gave it no bytes and
    it restored at relative error 0.998, without a word."""
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    params = {"used": jnp.asarray(rng.standard_normal((256, 256)), jnp.float32),
              "small": jnp.asarray(rng.standard_normal((256, 256)), jnp.float32),
              "expert": jnp.asarray(rng.standard_normal((256, 256)), jnp.float32)}

    def loss(p, batch):   # the expert is never routed to
        return jnp.sum((batch @ p["used"]) ** 2) + 0.3 * jnp.sum((batch @ p["small"]) ** 2)

    batches = [jnp.asarray(rng.standard_normal((4, 256)), jnp.float32) for _ in range(2)]
    with pytest.warns(UserWarning, match="gradients were 0 on every batch for 1 leaves.*'expert'"):
        sens = rate.sensitivity_from_gradients(loss, params, batches, **mode)
    square = {k: float(np.mean(np.square(np.asarray(v, np.float64)))) for k, v in params.items()}
    # per unit of relative squared error, as the least reached leaf
    np.testing.assert_allclose(np.mean(sens["expert"]) * square["expert"],
                               np.mean(sens["small"]) * square["small"], rtol=1e-5)
    assert np.mean(sens["expert"]) > 0
    tree = {k: np.asarray(v) for k, v in params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing left weighed at 0
        jaxjpeg.save(tmp_path / "e.jjpg", tree, sensitivity=sens)
    got = {k: np.asarray(v) for k, v in jaxjpeg.restore(tmp_path / "e.jjpg").items()}
    error = {k: np.linalg.norm(got[k] - tree[k]) / np.linalg.norm(tree[k]) for k in tree}
    assert error["expert"] < 0.5
    assert error["expert"] == pytest.approx(error["small"], rel=0.2)


def test_an_unreached_leaf_louder_than_the_rest_does_not_take_their_bytes(tmp_path):
    """Found by review: an unused (256, 256) kernel of RMS 1, weighed as the
    least reached leaf per unit of squared error, took the bytes of reached
    ones 16x quieter: at 16x a hidden layer restored at relative error 0.994
    (0.505 without the unused kernel). Weighed per unit of relative squared
    error, it takes its share."""
    jnp = jax.numpy
    rng = np.random.default_rng(5)
    params = {"hidden": jnp.asarray(0.06 * rng.standard_normal((256, 256)), jnp.float32),
              "out": jnp.asarray(0.06 * rng.standard_normal((256, 64)), jnp.float32),
              "unused": jnp.asarray(rng.standard_normal((256, 256)), jnp.float32)}

    def loss(p, x):
        return jnp.mean((jax.nn.relu(x @ p["hidden"]) @ p["out"]) ** 2)

    batches = [jnp.asarray(rng.standard_normal((32, 256)), jnp.float32) for _ in range(2)]
    with pytest.warns(UserWarning, match="'unused'"):
        sens = rate.sensitivity_from_gradients(loss, params, batches)
    tree = {k: np.asarray(v) for k, v in params.items()}
    jaxjpeg.save(tmp_path / "u.jjpg", tree, sensitivity=sens, target_ratio=16)
    got = jaxjpeg.restore(tmp_path / "u.jjpg")
    error = {k: np.linalg.norm(np.asarray(got[k]) - tree[k]) / np.linalg.norm(tree[k])
             for k in tree}
    assert error["hidden"] < 0.7, error
    assert error["unused"] < 0.9, error


@pytest.mark.parametrize("scale", [1e20, 1e-21])
@pytest.mark.parametrize("special", [None, np.inf])
def test_an_unreached_leaf_of_extreme_values_is_weighed(scale, special):
    """Found by review: squared in float32, an unused leaf of 1e20 overflowed
    (weight 0: no bytes), one of 1e-21 underflowed; one holding an inf was
    weighed 0 (its mean square inf): its finite values are squared."""
    jnp = jax.numpy
    unused = np.full((8, 64), scale, np.float32)
    if special is not None:
        unused[3, 3] = special
    params = {"w": jnp.full((8, 64), 0.1), "unused": jnp.asarray(unused)}
    with pytest.warns(UserWarning, match="'unused'"):
        sens = rate.sensitivity_from_gradients(lambda p, b: jnp.sum(p["w"] ** 2) * b, params,
                                               [jnp.float32(1.0)])
    relative = sens["unused"] * scale ** 2
    assert relative == pytest.approx(sens["w"] * 0.1 ** 2, rel=3e-3)   # (511 of 512 values)


@pytest.mark.parametrize("mode", [{}, {"per_row": True}])
def test_unreached_leaves_ignore_empty_and_non_finite_leaves(mode):
    """Found by review: a leaf whose gradient was NaN, first in the tree,
    made the least weight NaN (and the unreached leaf with it); an empty
    leaf's mean of nothing was NaN, so a tree of it and an unreached leaf
    was not refused."""
    jnp = jax.numpy
    params = {"a_empty": jnp.zeros((0, 64)), "a_nan": jnp.ones((8, 64)),
              "w": jnp.ones((8, 64)), "z_unused": jnp.ones((8, 64))}

    def loss(p, batch):
        return jnp.sum(p["w"]) * batch + jnp.sum(jnp.sqrt(-p["a_nan"])) + jnp.sum(p["a_empty"])

    with pytest.warns(UserWarning, match="for 1 leaves \\('z_unused'\\)"):
        sens = rate.sensitivity_from_gradients(loss, params, [jnp.float32(1.0)], **mode)
    np.testing.assert_allclose(sens["z_unused"], sens["w"])
    assert np.all(np.asarray(sens["a_empty"]) == 0)
    with pytest.raises(ValueError, match="0 for every leaf"):
        rate.sensitivity_from_gradients(lambda p, b: jnp.sum(p["e"]) * b,
                                        {"e": jnp.zeros((0, 4)), "u": jnp.ones((4, 4))},
                                        [jnp.float32(1.0)], **mode)


@pytest.mark.parametrize("mode", [{}, {"per_row": True}, {"per_element": True}])
def test_tiny_gradients_are_not_taken_for_unreached_leaves(mode):
    """Found by review: float32 gradients under 1e-23 squared to 0, and
    their leaves were weighed as unreached (the least of the others', with
    a warning). Squared over their largest magnitude, they keep their size."""
    jnp = jax.numpy
    params = {"tiny": jnp.ones((8, 64)), "w": jnp.ones((8, 64))}

    def loss(p, batch):
        return jnp.sum(p["w"]) * batch + 1e-26 * jnp.sum(p["tiny"]) * batch

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sens = rate.sensitivity_from_gradients(loss, params, [jnp.float32(1.0),
                                                              jnp.float32(2.0)], **mode)
    np.testing.assert_allclose(sens["w"], 2.5, rtol=1e-6)
    expected = 2.5 * float(jnp.float32(1e-26)) ** 2
    np.testing.assert_allclose(sens["tiny"], expected, rtol=1e-5)


def test_an_empty_leaf_weighed_at_zero_saves_without_warnings(tmp_path):
    """Found by review: save's check of weightless leaves took the mean of
    an empty leaf's importance (numpy's RuntimeWarnings)."""
    tree = {"e": np.zeros((0, 64), np.float32),
            "w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxjpeg.save(tmp_path / "e.jjpg", tree, sensitivity={"e": np.ones((0, 1)), "w": 1.0})


def test_gradients_that_never_depend_on_the_parameters_are_refused():
    jnp = jax.numpy
    with pytest.raises(ValueError, match="0 for every leaf"):
        rate.sensitivity_from_gradients(lambda p, b: jnp.sum(b), {"w": jnp.ones((4, 4))},
                                        [jnp.ones(3)])


@pytest.mark.parametrize("weight", [0.0, np.zeros((64, 1))])
def test_a_sensitivity_of_zero_warns_that_the_leaf_gets_no_bytes(tmp_path, weight):
    """Found by review: a frozen layer given sensitivity 0 restored at
    relative error 0.999 without a word."""
    rng = np.random.default_rng(1)
    tree = {"frozen": rng.standard_normal((64, 128)).astype(np.float32),
            "live": rng.standard_normal((64, 128)).astype(np.float32)}
    with pytest.warns(UserWarning, match="sensitivity is 0 for 1 leaves \\('frozen'\\).*byte "
                                         "targets only the bytes no other leaf takes"):
        jaxjpeg.save(tmp_path / "z.jjpg", tree, sensitivity={"frozen": weight, "live": 1.0})


def test_per_row_gradient_sensitivities_weigh_rows_in_save(tmp_path):
    """Found by review: per_row=True gave a flat [rows] array, which save
    broadcast over the last axis: on a square leaf it weighed columns."""
    import jax.numpy as jnp

    import jaxjpeg
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    weight = jnp.asarray(np.r_[np.full(32, 100.0), np.ones(224)], jnp.float32)[:, None]
    sens = rate.sensitivity_from_gradients(lambda p, b: jnp.sum(p["w"] * weight * b),
                                           {"w": jnp.asarray(w)}, [jnp.ones(256)], per_row=True)
    assert sens["w"].shape == (256, 1)
    jaxjpeg.save(tmp_path / "s.jjpg", {"w": w}, sensitivity=sens, quality=50)
    err = np.asarray(jaxjpeg.restore(tmp_path / "s.jjpg")["w"]) - w
    rms = lambda e: float(np.sqrt(np.mean(e ** 2)))   # noqa: E731
    assert rms(err[:32]) < 0.8 * rms(err[32:]), (rms(err[:32]), rms(err[32:]))
    assert 0.9 < rms(err[:, :32]) / rms(err[:, 32:]) < 1.1


def test_a_byte_target_counts_the_blocks_shard_cuts_pad(tmp_path):
    """Found by review: 8 shards of 50 rows pad each tile to 56 rows (a leaf
    11.5% larger than predicted); a byte target took those bytes from the
    leaves coded after it (one unsharded leaf's error 0.058 -> 0.075)."""
    import warnings

    import jaxjpeg
    from jaxjpeg import checkpoint
    from jaxjpeg.checkpoint_reader import Checkpoint

    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 264)).astype(np.float32)
    c = rng.standard_normal((264, 400)).astype(np.float32)
    regions = tuple(((50 * i, 50 * i + 50, 1), (0, 264, 1)) for i in range(8))
    errors = {}
    for sharded in (False, True):
        leaves = [checkpoint.SourceLeaf.of([["key", "a"]], a, regions if sharded else None),
                  checkpoint.SourceLeaf.of([["key", "c"]], c)]
        path = str(tmp_path / f"{sharded}.jjpg")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint.save_leaves(path, leaves, target_ratio=8)
        with Checkpoint(path) as ckpt:
            assert len(ckpt.leaves[0].tiles) == 8 or not sharded
        got = jaxjpeg.restore(path)
        errors[sharded] = np.linalg.norm(np.asarray(got["c"]) - c) / np.linalg.norm(c)
    assert errors[True] < 1.12 * errors[False], errors   # 1.29x before the fix


def test_many_small_leaves_at_high_ratios_land(tmp_path):
    """Found by review: every tile's padding was counted as a large blob's
    (32 bytes; tiles under fmt.LARGE_BLOB pad 4), so 300 small leaves beside
    a large one landed 3.1% / 6.6% under at 32x / 64x, with a warning that no
    closer coding was found."""
    import warnings

    rng = np.random.default_rng(0)
    tree = {"big": rng.standard_normal((2048, 1024)).astype(np.float32)}
    tree |= {f"t{i}": (rng.standard_normal((64, 64)) * (0.01 + i / 100)).astype(np.float32)
             for i in range(300)}
    raw = sum(a.nbytes for a in tree.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = jaxjpeg.save(tmp_path / "m.jjpg", tree, target_ratio=32)
    assert abs(report.file_bytes / (raw / 32) - 1) < 0.02, report.file_bytes / (raw / 32)


@pytest.mark.parametrize("dtype, ratio", [(np.float32, 1), (ml_dtypes.bfloat16, 2)])
def test_a_target_at_the_raw_size_stores_raw(tmp_path, dtype, ratio):
    """Found by review: target_ratio=1 gave a lossy file 65% under the target
    (the raw file is over it by its container's 0.09%, and exact leaves had
    to fit the budget to the byte)."""
    tree = {"w": np.random.default_rng(1).standard_normal((256, 256)).astype(dtype)}
    report = jaxjpeg.save(tmp_path / "r.jjpg", tree, target_ratio=ratio)
    np.testing.assert_array_equal(np.asarray(jaxjpeg.restore(tmp_path / "r.jjpg")["w"]), tree["w"])
    assert report.file_bytes <= 1.005 * 4 * tree["w"].size / ratio


def test_a_partial_sensitivity_far_from_the_data_free_weights_warns(tmp_path):
    """Found by review: {"b": 1.0} weighed b thousands of times the data-free
    weights the other leaves keep, and they came back at relative errors
    0.62 / 0.92 (0.05 / 0.07 without it), silently."""
    import warnings

    rng = np.random.default_rng(0)
    tree = {k: rng.standard_normal((256, 256)).astype(np.float32) for k in "abc"}
    for sensitivity in ({"b": 1.0}, {"b": np.ones((256, 1))}):
        with pytest.warns(UserWarning, match="names 1 of the 3 coded leaves") as caught:
            jaxjpeg.save(tmp_path / "p.jjpg", tree, target_ratio=8, sensitivity=sensitivity)
        assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxjpeg.save(tmp_path / "f.jjpg", tree, target_ratio=8,
                     sensitivity={"a": 1.0, "b": 2.0, "c": 3.0})
        jaxjpeg.save(tmp_path / "q.jjpg", tree, quality=90, sensitivity={"b": 1.0})


@pytest.mark.parametrize("cheap", ["zeros", "constant", "causal_mask", "tril_1024"])
def test_a_target_beside_a_large_cheap_leaf_lands(tmp_path, cheap):
    """Found by review: beside a leaf stored for next to nothing (a zero or
    constant 512 x 512 leaf, a causal mask of 0 and float32's min) a kernel's
    curve was measured only to 1.5x the file's average bits a value, which
    the cheap leaf's values pulled down: targets landed 24-48% under with
    the kernel 19x worse than saved alone, and the warning called it the
    closest coding the allocation found."""
    rng = np.random.default_rng(12)
    kernels = {f"w{i}": (0.02 * rng.standard_normal((256, 256))).astype(np.float32)
               for i in range(2)}
    big = {"zeros": np.zeros((512, 512), np.float32),
           "constant": np.full((512, 512), 0.3, np.float32),
           "causal_mask": np.where(np.tril(np.ones((512, 512), bool)), 0,
                                   np.finfo(np.float32).min).astype(np.float32),
           # review: a 0/1 float mask read as a second moment was counted from
           # a sample (172 KB) and stored deflated whole (8 KB): 28% under
           "tril_1024": np.tril(np.ones((1024, 1024), np.float32))}[cheap]
    tree = {**kernels, "cheap": big}
    target = 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no "closest coding" warning: it lands
        report = jaxjpeg.save(tmp_path / "t.jjpg", tree, target_bytes=target)
    assert abs(report.file_bytes / target - 1) < 0.02, report.file_bytes
    restored = jaxjpeg.restore(tmp_path / "t.jjpg")
    np.testing.assert_array_equal(np.asarray(restored["cheap"]), big)


def test_an_importance_array_steers_steps_within_its_damping(tmp_path):
    """Review: README promised steps as importance^-1/2; they follow
    (importance + its mean)^-1/2 (rate.IMPORTANCE_DAMPING), so where half
    the rows carry all the importance their steps are at most 3^1/2 finer,
    however large it is. README and save()'s docstring now say so."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    importance = np.ones((256, 1))
    importance[:128] = 1e6
    jaxjpeg.save(tmp_path / "s.jjpg", {"k": w}, sensitivity={"k": importance}, target_ratio=8)
    out = np.asarray(jaxjpeg.restore(tmp_path / "s.jjpg")["k"])
    important = np.sqrt(np.mean((out[:128] - w[:128]) ** 2))
    others = np.sqrt(np.mean((out[128:] - w[128:]) ** 2))
    assert 1.3 < others / important < 1.15 * math.sqrt(3), (important, others)


def test_near_lossless_targets_keep_every_kernel_fine(tmp_path):
    """Review of a version of this session that let the leaves left coded
    step a quarter coarser for one kept exact (to land targets beside a
    constant leaf): at 5x beside a causal mask a kernel came back 0.061 off
    (0.0009 before), at 2x an MLP's kernels 0.0059 (0.0009; its 3x file
    0.0014), and feasible targets were refused. Exact leaves are chosen from
    what the finest codings leave, as before."""
    rng = np.random.default_rng(0)
    params = {f"Dense_{i}": {"kernel": (rng.standard_normal((256, 256)) * 0.05).astype(np.float32),
                             "bias": (rng.standard_normal(256) * 0.01).astype(np.float32)}
              for i in range(6)}
    mask = np.where(np.tril(np.ones((1024, 1024), bool)), 0,
                    np.finfo(np.float32).min).astype(np.float32)

    def worst(tree, ratio):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            jaxjpeg.save(tmp_path / "n.jjpg", tree, target_ratio=ratio)
        back = jaxjpeg.restore(tmp_path / "n.jjpg")["params"]
        return max(np.linalg.norm(np.asarray(back[k]["kernel"]) - v["kernel"])
                   / np.linalg.norm(v["kernel"]) for k, v in params.items())
    assert worst({"params": params, "mask": mask}, 5) < 0.002
    assert worst({"params": params}, 2) <= worst({"params": params}, 3)


def test_a_smooth_leaf_leaves_a_kernel_its_full_curve(tmp_path):
    """Review: beside a large smooth leaf (coded at its finest for fewer bits
    a value than the file's average, yet above 1/8 bit) a kernel's curve
    still stopped short: at 16x and 24x it came back 0.037 off where its
    full curve gives 0.002."""
    rng = np.random.default_rng(0)
    kernel = rng.laplace(0, 0.05, (256, 512)).astype(np.float32)
    x = np.linspace(0, 1, 1536, dtype=np.float32)
    ramp = (np.outer(x, x) + 1e-4 * rng.normal(size=(1536, 1536))).astype(np.float32)
    jaxjpeg.save(tmp_path / "s.jjpg", {"k": kernel, "ramp": ramp}, target_ratio=16)
    back = np.asarray(jaxjpeg.restore(tmp_path / "s.jjpg")["k"])
    assert np.linalg.norm(back - kernel) < 0.01 * np.linalg.norm(kernel)


def test_per_row_range_and_feedback_candidates_are_integer_steps():
    """Found by review: the per-row-range codings (clip="minmax", which
    take no widening) got widened candidates that coded as their integer
    step, and a byte target then landed 24.5% under; error feedback's
    widened step 1 erred more at the layer's output than step 2 for more
    bytes (the decoder's rounding of samples, which feedback cannot shape)."""
    from jaxjpeg import feedback
    rng = np.random.default_rng(1)
    spread = (rng.standard_normal((512, 1024)) * np.logspace(0, 2.5, 512)[:, None]
              * 1e-3).astype(np.float32)
    x = np.maximum(rng.standard_normal((2048, 160)), 0)
    shaped = rate.prepare_leaf((rng.standard_normal((96, 160)) * 0.05).astype(np.float32),
                               input_covariance=feedback.InputCovariance(x.T @ x / len(x), (1,)))
    assert shaped.feedback is not None
    for p, has_row_ranges in ((rate.prepare_leaf(spread), True), (shaped, False)):
        c = rate.rd_curve(p)
        assert (c.row_ranges is not None and c.row_ranges.any()) == has_row_ranges
        base = {b: rate.base_scale(p, b) for b in (8, 12)}
        for k in range(len(c.q)):
            if c.row_ranges is not None and c.row_ranges[k]:
                scale = mapping.row_affine(p.matrix, 12, clip="minmax", with_samples=False)[1]
                base[k] = float(np.exp(np.mean(np.log(scale[scale > 0]))))
                assert c.q[k] == pytest.approx(c.delta[k] * base[k], rel=1e-6), k
            elif p.feedback is not None and c.delta[k] == 1:
                assert c.q[k] == pytest.approx(base[int(c.bits[k])], rel=1e-9), k
    tree = {"kernel": spread, "bias": (rng.standard_normal(1024) * 0.01).astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = jaxjpeg.save(_tmp_file(), tree, target_ratio=3.2, progress=False)
    assert abs(report.ratio_vs_float32 / 3.2 - 1) < 0.02


def _tmp_file():
    import tempfile
    return tempfile.mktemp(suffix=".jjpg")


def test_a_last_tensor_a_hair_over_tries_the_next_coarser_candidate():
    """Found by review: two adjacent candidates a few bytes over what was
    left; the guess then fell back to the middle of 0..180, a step 8x
    coarser than either (24x the error) that was within 0.5% of the budget."""
    c = rate.Curve(np.full(200, 12), np.arange(200, 0, -1), np.linspace(2, 1, 200),
                   np.linspace(1000, 5000, 200), np.linspace(9, 1, 200))
    over = (181, type("Enc", (), {"nbytes": float(c.nbytes[181])})())
    left = float(c.nbytes[180]) + 0.5   # the curve says 180 fits; it did not
    guess = rate.BudgetAllocator._guess_between(c, 0, 180, None, over, left)
    assert guess == 179


def test_a_last_tensor_settles_among_steps_whose_tiles_mix():
    """Found by review: a kernel settled (coded last) between widened
    candidates, whose maps differ, so its tiles could not be mixed with the
    next step's: at 3.8x the file landed 2.0% under, where mixing its
    integer steps had landed it within 1%."""
    rng = np.random.default_rng(0)
    tree = {"dense": (rng.standard_t(6, (2560, 256)) * 0.02).astype(np.float32),
            "zz_bias": rng.standard_normal(512).astype(np.float32)}
    for ratio in (3.6, 3.8, 4.1):
        report = jaxjpeg.save(_tmp_file(), tree, target_ratio=ratio, progress=False)
        assert abs(report.ratio_vs_float32 / ratio - 1) < 0.01, ratio


def test_per_row_sensitivities_of_a_scalar_leaf_are_a_scalar(tmp_path):
    """Found by review: sensitivity_from_gradients(per_row=True) gave a
    learned scalar (a temperature) shape (1,), which save refused."""
    import jax
    import jax.numpy as jnp
    params = {"temp": jnp.float32(1.5), "w": jnp.ones((64, 64), jnp.float32) * 0.1}

    def loss(p, x):
        return jnp.mean((x @ p["w"] * p["temp"]) ** 2)

    batches = [jnp.asarray(np.random.default_rng(i).normal(size=(8, 64)), jnp.float32)
               for i in range(2)]
    sens = rate.sensitivity_from_gradients(loss, params, batches, per_row=True)
    assert np.shape(sens["temp"]) == () and np.shape(sens["w"]) == (64, 1)
    jaxjpeg.save(tmp_path / "s.jjpg", jax.tree_util.tree_map(np.asarray, params),
                 target_ratio=8, sensitivity=sens)


@pytest.mark.parametrize("options", [{}, {"target_ratio": 8}, {"quality": 80}])
def test_a_bad_importance_array_is_refused_for_a_leaf_kept_exact(tmp_path, options):
    """Found by review: a NaN importance array for a bias (kept exact, not
    coded) was accepted under every rate control; a coded leaf's was refused."""
    rng = np.random.default_rng(0)
    tree = {"w": rng.standard_normal((64, 64)).astype(np.float32),
            "bias": rng.standard_normal(64).astype(np.float32)}
    for bad in (np.full(64, np.nan), -np.ones(64)):
        with pytest.raises(ValueError, match="importance must be finite and non-negative"):
            jaxjpeg.save(tmp_path / "b.jjpg", tree, sensitivity={"bias": bad}, **options)
    assert not (tmp_path / "b.jjpg").exists()


def _calibrated_kernel(rows=1024, cols=640, seed=3):
    """A Dense kernel (inputs, outputs) and its inputs' low-rank covariance."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, 96))
    cov = a @ a.T / 96 + 0.05 * np.eye(rows)
    return (rng.standard_normal((rows, cols)) * 0.03).astype(np.float32), cov


@pytest.mark.parametrize("ratio", [3.0, 3.2, 3.4, 3.7])
def test_a_calibrated_kernel_lands_between_its_finest_steps(tmp_path, ratio):
    """Found by review: a kernel coded with error feedback is not widened
    between its 12-bit steps 1 and 2 (17% apart here), and feedback codings'
    tiles were not mixed, so a file of one calibrated kernel and its bias
    landed 14 / 8 / 2.4 / 5.5% under its target with a warning. Its output
    bands now mix (feedback shapes each output's errors on its own)."""
    from jaxjpeg import feedback
    kernel, cov = _calibrated_kernel()
    tree = {"dense": {"kernel": kernel, "bias": np.full(640, 0.01, np.float32)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = jaxjpeg.save(tmp_path / "c.jjpg", tree, target_ratio=ratio, progress=False,
                              input_covariance={"dense/kernel": feedback.InputCovariance(cov, (0,))})
    assert abs(report.ratio_vs_float32 / ratio - 1) < 0.01


def test_feedback_codings_mix_whole_output_bands():
    """Two feedback codings of a kernel mix band by band: every output band
    comes whole from one of them (its tiles' errors were shaped against the
    rounding of the tiles before them along the inputs), and the mix lands
    between the two."""
    from jaxjpeg import feedback
    kernel, cov = _calibrated_kernel(512, 320)
    p = rate.prepare_leaf(kernel, input_covariance=feedback.InputCovariance(cov, (0,)))
    p = dataclasses.replace(p, tile_cuts=((128, 256, 384), ()))   # inputs cut too
    tile_shape = codec.DEFAULT_TILE_SHAPE
    banded = rate._in_bands(p, rate._output_side(p), rate.encode_with_step(p, 12, 2), tile_shape)
    assert len({rate._output_band(banded, cell) for cell in banded.tiles(tile_shape)}) >= 3
    fits, over = (rate.encode_with_step(banded, 12, d) for d in (2, 1))
    left = (fits.nbytes + over.nbytes) // 2
    mixed = rate._mixed_tiles(fits, over, left, banded)
    assert fits.nbytes < mixed.nbytes <= left
    taken = {}
    for tile, f, o in zip(mixed.tiles, fits.tiles, over.tiles):
        assert tile is f or tile is o
        taken.setdefault(rate._output_band(banded, (tile.row0, tile.col0, tile.height,
                                                    tile.width)), set()).add(tile is o)
    assert all(len(sources) == 1 for sources in taken.values())
    assert {True, False} == set().union(*taken.values())


def test_bands_are_cut_only_where_their_tiles_pay():
    """A small leaf keeps its tiles: one more would cost more than
    BAND_COST_SHARE of its bytes in JPEG header and record (_tile_cost)."""
    from jaxjpeg import feedback
    tile_shape = codec.DEFAULT_TILE_SHAPE
    for (rows, cols), cut in (((128, 64), False), ((1024, 640), True)):
        kernel, cov = _calibrated_kernel(rows, cols)
        p = rate.prepare_leaf(kernel, input_covariance=feedback.InputCovariance(cov, (0,)))
        enc = rate.encode_with_step(p, 12, 2)
        assert 150 < rate._tile_cost(enc) < 400
        assert (rate._in_bands(p, rate._output_side(p), enc, tile_shape) is not p) == cut


def test_mixing_takes_the_subset_of_groups_nearest_the_room():
    """Largest gains first left 2.1% of a file unused where a smaller
    group fitted the room exactly."""
    assert sorted(rate._taken_groups([34, 32, 14, 20], 54)) == [0, 3]   # greedy: 34 + 14
    assert sorted(rate._taken_groups([34, 32, 14, 20], 13)) == []
    assert sorted(rate._taken_groups([34, 32, 14, 20], 13, overshoot=1)) == [2]
    assert sorted(rate._taken_groups([34, 32, 14, 20], 66)) == [0, 1]


@pytest.mark.parametrize("ratio", [3.0, 3.2, 3.6, 4.5])
def test_a_conv_fed_by_a_batchnorm_lands_its_byte_target(tmp_path, ratio):
    """The data-free prior codes a BatchNorm-fed convolution with error
    feedback; as the file's dominant leaf it landed 3.9% (3.6x) and 2.3%
    (4.5x) under its target with a warning, its codings not mixed. At 3.0 /
    3.2x it takes one step past JPEG's finest, with its heavy tail's values
    kept aside (a first fix for NaN side lists refused it: -9.7 / -3.6%)."""
    rng = np.random.default_rng(0)
    f = np.float32

    def batchnorm(name, n):
        return {f"{name}.weight": (1 + 0.2 * rng.standard_normal(n)).astype(f),
                f"{name}.bias": (0.1 * rng.standard_normal(n)).astype(f),
                f"{name}.running_mean": (0.1 * rng.standard_normal(n)).astype(f),
                f"{name}.running_var": (0.5 + rng.random(n)).astype(f)}
    tree = {**batchnorm("bn1", 256),
            "conv2.weight": (rng.standard_t(6, (512, 256, 5, 1)) * 0.02).astype(f),
            **batchnorm("bn2", 512)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = jaxjpeg.save(tmp_path / "b.jjpg", tree, target_ratio=ratio, progress=False)
    assert abs(report.ratio_vs_float32 / ratio - 1) < 0.01


@pytest.mark.parametrize("ratio", [3.6, 3.85, 4.06, 4.2])
def test_a_kernel_between_its_shared_scale_and_row_ranges_lands(tmp_path, ratio):
    """Found by review: a kernel whose rows' ranges spread 300x has no coding
    between its shared scale's finest step and per-row ranges at step 4 (20%
    apart, on different row maps, so their tiles did not mix): coded last,
    it landed 4-16% under targets of 3.34-3.98x. Its rows are now cut into
    bands that share out the codings' byte difference, and mixed by them.
    Between its shared scale's steps 2 and 1 (4.06, 4.2x: 2.0 / 2.1% under)
    both codings shrink 8% once cut (each tile's Huffman tables fit its
    rows), and the next pair of candidates is taken."""
    rng = np.random.default_rng(1)
    tree = {"kernel": (rng.standard_normal((512, 1024)) * np.logspace(0, 2.5, 512)[:, None]
                       * 1e-3).astype(np.float32),
            "bias": (rng.standard_normal(1024) * 0.01).astype(np.float32)}
    report = jaxjpeg.save(tmp_path / "r.jjpg", tree, target_ratio=ratio, progress=False)
    assert abs(report.ratio_vs_float32 / ratio - 1) < 0.015
    got = np.asarray(jaxjpeg.restore(tmp_path / "r.jjpg")["kernel"])
    assert np.linalg.norm(got - tree["kernel"]) < 0.01 * np.linalg.norm(tree["kernel"])


def test_block_row_gains_add_up_to_the_tiles_bytes():
    """The byte difference per 8 rows comes from the restart intervals' sizes
    and adds up to the tiles' entropy-coded bytes."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200, 300)) * np.logspace(0, 2, 200)[:, None]).astype(np.float32)
    p = rate.prepare_leaf(x)
    a, b = (rate.encode_with_step(p, 12, d, tile_shape=(64, 128)) for d in (8, 2))
    gains = rate._block_row_gains(a, b)
    assert gains.shape == (25,)

    def coded(enc):
        return sum(int(t.interval_starts[-1] - t.interval_starts[0]) for t in enc.tiles)
    assert gains.sum() == pytest.approx(coded(b) - coded(a))
    assert (gains > 0).all()


@pytest.mark.parametrize("ratio", [3.14, 3.82])
def test_a_dominant_leaf_leaves_no_more_than_the_rest_can_take(tmp_path, ratio):
    """Found by review: a 655 K-value kernel coded before three 64 x 64 ones
    came in under its share by more than they could take at their finest
    codings: the file landed 2.2% (3.14x) and 2.4% (3.82x) under its target.
    Such a tensor is settled as the last one is."""
    rng = np.random.default_rng(1)
    f = np.float32
    tree = {"dense": {"kernel": (rng.standard_normal((1024, 640)) * 0.05).astype(f),
                      "bias": (rng.standard_normal(640) * 0.01).astype(f)},
            "small": {f"k{i}": (rng.standard_normal((64, 64)) * 0.1).astype(f) for i in range(3)},
            "ln": {"scale": (1 + 0.05 * rng.standard_normal(640)).astype(f)}}
    report = jaxjpeg.save(tmp_path / "d.jjpg", tree, target_ratio=ratio, progress=False)
    assert abs(report.ratio_vs_float32 / ratio - 1) < 0.01


def test_feedback_keeps_its_blocks_on_shards_off_the_8_grid():
    """Found by review: a shard edge at 300 cut the tiles of a kernel coded
    with error feedback off the 8 x 8 grid feedback models from the view's
    origin; the outputs past it erred 3.5x more (all in all 2.6x). Its
    edges go to the nearest multiple of 8."""
    from jaxjpeg import feedback
    kernel, cov = _calibrated_kernel(1024, 600, seed=5)
    fb = feedback.InputCovariance(cov, (0,))
    whole = ((0, 1024, 1), (0, 600, 1))
    for split in (((0, 1024, 1), (0, 300, 1)), ((0, 300, 1), (0, 600, 1))):
        other = tuple((b, e, s) if (b, e) != (0, 300) else (300, 1024 if i == 0 else 600, 1)
                      for i, (b, e, s) in enumerate(split))
        p = rate.prepare_leaf(kernel, input_covariance=fb, shards=[split, other])
        assert all(c % 8 == 0 for side in p.tile_cuts for c in side) and any(p.tile_cuts)
        plain = rate.prepare_leaf(kernel, input_covariance=fb, shards=[whole])

        def output_error(prepared):
            e = codec.decode_tensor(rate.encode_with_step(prepared, 12, 14)).astype(np.float64)
            e -= kernel
            return np.einsum("io,ij,jo->", e, cov, e)
        assert output_error(p) < 1.1 * output_error(plain)


def test_a_last_leaf_holding_a_nan_mixes_its_codings(tmp_path):
    """Found by review: two codings of a leaf whose side list holds a NaN
    compared their side lists unequal (NaN != NaN) and never mixed: the file
    landed 2.1% under at 3.7x (within 0.5% before the comparison checked the
    values)."""
    rng = np.random.default_rng(10)
    k = (rng.standard_normal((1152, 256)) * 0.02).astype(np.float32)
    k[5, 7] = np.nan
    tree = {"a": (rng.standard_normal((256, 128)) * 0.05).astype(np.float32), "k": k}
    report = jaxjpeg.save(tmp_path / "n.jjpg", tree, target_ratio=3.7, progress=False)
    assert abs(report.ratio_vs_float32 / 3.7 - 1) < 0.01
    assert np.isnan(np.asarray(jaxjpeg.restore(tmp_path / "n.jjpg")["k"])[5, 7])


@pytest.mark.parametrize("ratio", [3.18, 3.21])
def test_mixing_on_different_maps_counts_the_maps_bytes(tmp_path, ratio):
    """Found by review: a kernel whose rows spread 300x mixes its shared
    scale's coding with per-row ranges' by row bands; the bands were chosen
    by their tiles' bytes alone, every band was taken, the per-row maps (6 KB
    more) put the mix over, and no mix was kept: 3.9% under, where three
    bands landed within 0.1%."""
    rng = np.random.default_rng(10)
    k = (rng.standard_normal((1152, 256)) * 0.02
         * np.exp(rng.uniform(0, np.log(300), 1152))[:, None]).astype(np.float32)
    tree = {"a": (rng.standard_normal((256, 128)) * 0.05).astype(np.float32),
            "b": (rng.standard_normal((128, 64)) * 0.05).astype(np.float32), "k": k}
    report = jaxjpeg.save(tmp_path / "m.jjpg", tree, target_ratio=ratio, progress=False)
    assert abs(report.ratio_vs_float32 / ratio - 1) < 0.01


@pytest.mark.parametrize("ratio", [3.2, 4.0, 5.0])
def test_byte_targets_beside_values_kept_aside(tmp_path, ratio):
    """Found by review: under a fine target a leaf with values kept aside
    (NaN, inf, a 1e30 row) was offered one step for all its values: a NaN
    step crashed the analysis ("cannot convert float NaN to integer"), and
    a 1e30 row left no thin coding at all (AttributeError on None). Its
    special values still restore exactly."""
    rng = np.random.default_rng(3)
    embed = (rng.standard_normal((5000, 256)) * 0.02).astype(np.float32)
    embed[17] = 1e30
    out = (rng.standard_normal((4, 64, 256)) * 0.06).astype(np.float32)
    out[0, 0, :10] = np.nan
    wi = (rng.standard_normal((256, 1024)) * 0.06).astype(np.float32)
    wi[3, 5], wi[100, 7] = np.nan, np.inf
    for tree in ({"embed": embed, "wi": wi}, {"embed": embed, "out": out, "wi": wi}):
        jaxjpeg.save(tmp_path / "s.jjpg", tree, target_ratio=ratio, progress=False)
        got = {k: np.asarray(v) for k, v in jaxjpeg.restore(tmp_path / "s.jjpg").items()}
        assert (got["embed"][17] == 1e30).all() and np.isnan(got["wi"][3, 5])
        assert got["wi"][100, 7] == np.inf and np.isfinite(got["embed"][18:]).all()
        assert "out" not in tree or np.isnan(got["out"][0, 0, :10]).all()


@pytest.mark.parametrize("ratio", [16, 20, 24])
def test_a_last_leaf_over_at_its_coarsest_candidate_codes_coarser(tmp_path, ratio):
    """Found by review: EfficientNet-lite1's classifier, coded last at its
    coarsest candidate, took 10.8% more than predicted and the file came out
    1.6% over at 13.7x, warned of nowhere; here 5.2% over at 20x. A last
    leaf may take steps coarser than its curve's; and the bisection, which
    stopped short of the coarsest candidate, tries it (16x: 1.2% over)."""
    rng = np.random.default_rng(0)
    tree = {f"conv{i}": (rng.standard_normal((256, 256, 1, 1)) * 0.05).astype(np.float32)
            for i in range(8)}
    tree["zz_fc"] = (rng.standard_normal((1000, 1280)) * 0.02).astype(np.float32)
    report = jaxjpeg.save(tmp_path / "c.jjpg", tree, target_ratio=ratio, progress=False)
    assert abs(report.ratio_vs_float32 / ratio - 1) < 0.01


@pytest.mark.parametrize("options", [{}, {"target_ratio": 8}])
def test_a_constant_row_far_from_the_rest_leaves_their_steps_alone(tmp_path, options):
    """Found by review: an embedding with one row of 1e30 (a sentinel,
    restored exactly by its row's offset) got a spread of 1e23 from the
    difference of two sums of 1e62, both rounded: every other row came back
    as 0 (relative error 0.998) at the default rate and under byte targets."""
    rng = np.random.default_rng(3)
    embed = (rng.standard_normal((5000, 256)) * 0.02).astype(np.float32)
    embed[17] = 1e30
    jaxjpeg.save(tmp_path / "e.jjpg", {"embed": embed}, progress=False, **options)
    got = np.asarray(jaxjpeg.restore(tmp_path / "e.jjpg")["embed"])
    rest = np.arange(5000) != 17
    assert (got[17] == 1e30).all()
    assert np.linalg.norm(got[rest] - embed[rest]) < 0.15 * np.linalg.norm(embed[rest])


def _errors_saved(path, w: np.ndarray, loud: np.ndarray, **options):
    """Relative errors of ``w``'s values outside and inside ``loud``, saved
    alone at ``path`` with ``options`` and restored; and the miss of a
    ``target_ratio`` among them (a share of the target, 0 without one)."""
    jaxjpeg.save(path, {"w": w}, progress=False, **options)
    got = np.asarray(jaxjpeg.restore(path)["w"], np.float64)
    w = w.astype(np.float64)
    rest, within = (float(np.linalg.norm(got[m] - w[m]) / np.linalg.norm(w[m]))
                    for m in (~loud, loud))
    target = w.size * 4 / options.get("target_ratio", math.inf)
    return rest, within, (path.stat().st_size - target) / target if target else 0.0


def _kernel_with_loud_input(layout: str, how: str):
    """A (3, 3, 64, 128) kernel (HWIO, or its OIHW transpose) of std 0.05
    whose input channel 0 is ``how``: a constant ("=10") or random ("x100")."""
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((3, 3, 64, 128)) * 0.05).astype(np.float32)
    if how.startswith("="):
        kernel[:, :, 0, :] = float(how[1:])
    else:
        kernel[:, :, 0, :] *= float(how[1:])
    loud = np.zeros(kernel.shape, bool)
    loud[:, :, 0, :] = True
    if layout == "oihw":
        kernel, loud = (np.ascontiguousarray(a.transpose(3, 2, 0, 1)) for a in (kernel, loud))
    return kernel, loud


@pytest.mark.parametrize("layout", ["hwio", "oihw"])
@pytest.mark.parametrize("how, options", [
    ("=10", {}), ("=1e4", {}), ("=1e30", {}), ("x30", {}), ("x100", {}),
    ("x100", {"target_ratio": 6}), ("=1e4", {"target_ratio": 10}),
    ("x100", {"target_ratio": 2.5})])   # fine: a one-step coding beside JPEG
def test_a_conv_kernel_with_one_loud_input_channel_keeps_the_rest(tmp_path, layout, how, options):
    """Found by review: a (3, 3, 64, 128) kernel with one input channel held
    at 10 (1e4) came back at relative error 1.09 (423) outside it: coded
    with the common-mean prior's feedback, one step for the kernel, set by
    that channel, zeroed every other weight (a random channel 100x louder:
    0.67). Its columns are now balanced (priors.loud_column_scales)."""
    kernel, loud = _kernel_with_loud_input(layout, how)
    path = tmp_path / "k.jjpg"
    rest, within, miss = _errors_saved(path, kernel, loud, **options)
    assert rest < 0.2 and within < 0.2 and abs(miss) <= 0.02
    if options.get("target_ratio", 8) > 3:   # JPEG-coded (else on one fine step)
        with checkpoint_reader.Checkpoint(path) as c:
            assert c.leaves[0].col_scale_dtype is not None   # the balance is stored


@pytest.mark.parametrize("shape, axis, count, factor, options", [
    ((512, 256), 0, 8, 100.0, {}), ((512, 256), 0, 8, 30.0, {}), ((512, 256), 1, 8, 100.0, {}),
    ((512, 256), 0, 2, 1e4, {}), ((512, 256), 1, 2, 1e4, {}), ((64, 48, 40), 1, 1, 1e3, {}),
    ((512, 256), 0, 8, 100.0, {"target_ratio": 6}),
    ((512, 256), 1, 16, 100.0, {}), ((512, 256), 0, 40, 100.0, {}),
    ((512, 256), 0, 40, 100.0, {"target_ratio": 8})])
def test_a_matrix_with_a_few_loud_rows_keeps_the_rest(tmp_path, shape, axis, count, factor,
                                                      options):
    """Found in session 39: a (512, 256) matrix whose 8 input rows were 100x
    the others (30x) restored the rest at relative error 0.97 (0.33): one
    step for the leaf, set by those rows; two rows 1e4x louder, only partly
    kept in the side list, 2.08 (as columns: 11.0). The loud axis now goes
    to the columns, which are balanced (views.loud_slices). Beyond 1/32 of
    the slices (16 of 256, 40 of 512) they were not, and the rest restored
    worse than zeros (review, session 46: 1.30 for 5% of 1024 columns); they
    are balanced to 8x the others' RMS, so the more they are, the more of
    the bytes they take."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    loud = np.zeros(shape, bool)
    np.moveaxis(loud, axis, 0)[:count] = True
    w[loud] *= factor
    rest, within, miss = _errors_saved(tmp_path / "w.jjpg", w, loud, **options)
    assert rest < (0.2 if count <= shape[axis] / 32 else 0.25), rest
    assert within < 0.05 and abs(miss) <= 0.02


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_balanced_kernel_with_a_kept_value_keeps_the_rest(tmp_path, dtype):
    """Found by review: a value kept in the side list (a NaN, a far weight)
    was filled with its row's mean in weight units, which the loud channel
    set, before the columns were balanced: 156x the rest of its row, the
    quiet weights restored at relative error 0.93, and a float16 leaf was
    refused on restore ("beyond float16"). Filled in coded units now."""
    kernel, loud = _kernel_with_loud_input("hwio", "=4e3" if dtype == np.float16 else "=1e4")
    kernel[0, 0, 5, 0] = np.nan
    kernel = kernel.astype(dtype)
    path = tmp_path / "k.jjpg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the NaN is said
        jaxjpeg.save(path, {"k": kernel}, progress=False)
    got = np.asarray(jaxjpeg.restore(path)["k"], np.float64)
    rest = ~loud & ~np.isnan(kernel)
    w = kernel.astype(np.float64)
    assert np.isnan(got[0, 0, 5, 0])
    assert np.linalg.norm(got[rest] - w[rest]) < 0.2 * np.linalg.norm(w[rest])


@pytest.mark.parametrize("ratio", [4, 8])
def test_a_thin_balanced_kernel_is_not_swapped_for_one_step(tmp_path, ratio):
    """Found by review: a balanced kernel with a thin view (a PyTorch conv of
    4 outputs) was planned on its JPEG curve, then swapped for a one-step
    coding within its error in weight units: the file landed 15-20% under."""
    head = (np.random.default_rng(3).standard_normal((4, 128, 3, 3)) * 0.05).astype(np.float32)
    head[:, 5] = 10.0
    body = (np.random.default_rng(2).standard_normal((3, 3, 64, 64)) * 0.05).astype(np.float32)
    path = tmp_path / "t.jjpg"
    jaxjpeg.save(path, {"head": head, "body": body}, target_ratio=ratio, progress=False)
    target = (head.nbytes + body.nbytes) / ratio
    assert abs(path.stat().st_size - target) <= 0.02 * target


def _col_scaled(path) -> dict:
    with checkpoint_reader.Checkpoint(path) as c:
        return {leaf.path: leaf.col_scale_dtype is not None for leaf in c.leaves}


def test_what_is_not_balanced(tmp_path):
    """Found by review: a user's sensitivity factor weighed balanced units'
    error; a depthwise kernel's loud centre tap (taps of one channel, one
    input) was balanced and the tap sum held wrong; with most input channels
    near dead, every live one read as loud."""
    rng = np.random.default_rng(4)
    kernel, _ = _kernel_with_loud_input("hwio", "=10")
    depthwise = (rng.standard_normal((3, 3, 1, 8192)) * 0.05).astype(np.float32)
    depthwise[1, 1] = 1.0
    dead = (rng.standard_normal((3, 3, 64, 128)) * 0.05).astype(np.float32)
    dead[:, :, :40] *= 1e-3
    jaxjpeg.save(tmp_path / "a.jjpg", {"k": kernel, "dw": depthwise, "dead": dead},
                 progress=False)
    assert _col_scaled(tmp_path / "a.jjpg") == {"k": True, "dw": False, "dead": False}
    jaxjpeg.save(tmp_path / "b.jjpg", {"k": kernel}, sensitivity={"k": 2.0}, progress=False)
    assert _col_scaled(tmp_path / "b.jjpg") == {"k": False}


def test_balancing_leaves_what_it_would_worsen(tmp_path):
    """Found by review: a pruned matrix with 8 loud rows lost its sparse
    coding (its zeros came back as noise, 12x the bytes at the default
    rate); a (4096, 16) matrix with 64 loud rows paid 2 bytes a row for its
    scales (1 bit a weight); per-row ranges (clip="minmax") fit loud rows
    already, and balanced erred 3.7x more. None of these is balanced."""
    rng = np.random.default_rng(5)
    pruned = (rng.standard_normal((1024, 512)) * 0.05).astype(np.float32)
    pruned[np.abs(pruned) < np.quantile(np.abs(pruned), 0.9)] = 0
    pruned[:8] *= 100
    narrow = (rng.standard_normal((4096, 16)) * 0.05).astype(np.float32)
    narrow[::64] *= 100
    rows = (rng.standard_normal((1024, 256)) * 0.05).astype(np.float32)
    rows[:16] *= 100
    jaxjpeg.save(tmp_path / "a.jjpg", {"pruned": pruned, "narrow": narrow}, progress=False)
    assert _col_scaled(tmp_path / "a.jjpg") == {"pruned": False, "narrow": False}
    got = np.asarray(jaxjpeg.restore(tmp_path / "a.jjpg")["pruned"])
    assert (got[pruned == 0] == 0).all()
    jaxjpeg.save(tmp_path / "b.jjpg", {"rows": rows}, clip="minmax", quality=75, progress=False)
    assert _col_scaled(tmp_path / "b.jjpg") == {"rows": False}


def test_a_balanced_leafs_loud_values_stay_out_of_the_side_list():
    """Found by review: the side list was looked for again in the balanced
    view without the balance, where the loud slices' values stood far from
    their rows: it took most of them (337 of 2048 here; 5,288 of 6,579 in a
    (16, 256, 256) leaf, which was then not balanced at all)."""
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((512, 256)) * 0.05).astype(np.float32)
    w[:8] *= 100
    p = rate.prepare_leaf(w)
    assert p.balanced and (p.outliers is None or p.outliers.count < 100)
    cube = (rng.standard_normal((16, 256, 256)) * 0.05).astype(np.float32)
    cube[:, :2] *= 100
    p = rate.prepare_leaf(cube)
    assert p.balanced and (p.outliers is None or p.outliers.count < 300)


@pytest.mark.parametrize("case", ["mean", "sentinel", "spiked"])
def test_loud_slices_about_a_large_mean_keep_their_rows_offsets(case):
    """Found by review: balanced, loud slices become columns, which have no
    offsets: rows of 50 +- 1.5 coded their spread 125x coarser (error 0.003
    -> 0.38 of it at 8x), sentinel rows of 1e30 beside loud random rows came
    back within 5% instead of exactly, and constant rows whose one spike
    the side list keeps lost their exactness. Such leaves are not balanced."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((512, 256)) * 0.05).astype(np.float32)
    if case == "mean":
        w[:8] = 50 + 1.5 * rng.standard_normal((8, 256))
    elif case == "sentinel":
        w[:4] = 1e30
        w[4:8] *= 100
    else:
        w[:4] = 1000.0
        w[:4, 3] = 1e6
    p = rate.prepare_leaf(w)
    assert not p.balanced


def test_an_error_bound_on_a_balanced_kernel_holds_in_weight_units(tmp_path):
    """A balanced leaf is coded in its own units; an error bound is still
    met in the leaf's (relative to the whole leaf, as documented)."""
    kernel, _ = _kernel_with_loud_input("hwio", "x100")
    jaxjpeg.save(tmp_path / "k.jjpg", {"k": kernel}, progress=False, error_bound=0.02)
    got = np.asarray(jaxjpeg.restore(tmp_path / "k.jjpg")["k"])
    assert np.linalg.norm(got - kernel) <= 0.02 * np.linalg.norm(kernel)


@pytest.mark.parametrize("axis, value", [(3, 10.0), (3, 1e4), (3, 1e30)])
def test_a_conv_kernel_with_one_loud_channel_keeps_the_rest(tmp_path, axis, value):
    """Found by review: a (3, 3, 64, 128) kernel with one output channel held
    at 10, coded with the data-free input-mean feedback, took its step from
    the 10s and restored the rest as 0 (relative error 0.99)."""
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((3, 3, 64, 128)) * 0.05).astype(np.float32)
    loud = np.zeros(kernel.shape, bool)
    np.moveaxis(loud, axis, 0)[0] = True
    kernel[loud] = value
    jaxjpeg.save(tmp_path / "k.jjpg", {"k": kernel}, progress=False)
    got = np.asarray(jaxjpeg.restore(tmp_path / "k.jjpg")["k"])
    assert (got[loud] == value).all()
    rest = ~loud
    assert np.linalg.norm(got[rest] - kernel[rest]) < 0.15 * np.linalg.norm(kernel[rest])


def _kernel_with_loud_outputs(layout: str, count: int, factor: float):
    """A (3, 3, 64, 128) kernel (HWIO, or its OIHW transpose) of std 0.05
    whose first ``count`` output channels are ``factor`` times louder."""
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((3, 3, 64, 128)) * 0.05).astype(np.float32)
    loud = np.zeros(kernel.shape, bool)
    loud[..., :count] = True
    kernel[loud] *= factor
    if layout == "oihw":
        kernel, loud = (np.ascontiguousarray(a.transpose(3, 2, 0, 1)) for a in (kernel, loud))
    return kernel, loud


@pytest.mark.parametrize("layout", ["hwio", "oihw"])
@pytest.mark.parametrize("count, factor, options", [
    (3, 100.0, {}), (1, 1e3, {}), (4, 30.0, {}), (3, 1e3, {"target_ratio": 8}),
    (3, 100.0, {"target_ratio": 6}), (3, 100.0, {"target_ratio": 4}),
    (3, 100.0, {"target_ratio": 2.5})])
def test_a_conv_kernel_with_loud_output_channels_keeps_the_rest(tmp_path, layout, count,
                                                                factor, options):
    """Found in session 39: a (3, 3, 64, 128) kernel whose 3 random output
    channels were 100x (1000x) the others, coded with the common-mean
    prior's feedback on one step set by them, restored its other weights at
    relative error 0.98 (2.78: noise larger than they are), 38x (58x) under
    float32; at target_ratio=8 1000x louder outputs landed at 13.9x, the
    rest at 0.80. Their rows are now balanced (views.loud_row_factors)."""
    kernel, loud = _kernel_with_loud_outputs(layout, count, factor)
    path = tmp_path / "k.jjpg"
    rest, within, miss = _errors_saved(path, kernel, loud, **options)
    assert rest < 0.2 and within < 0.05 and abs(miss) <= 0.02
    if not options:   # about the default save's usual 8x, not far smaller
        assert path.stat().st_size > 0.75 * kernel.nbytes / 8


def test_quiet_outputs_stay_exact_beside_balanced_loud_ones(tmp_path):
    """Found by review (of a first version that coded such a kernel
    transposed, its outputs on columns, which have no offsets): dead and
    constant output channels beside loud ones came back as noise (99% of a
    dead channel's weights non-zero; a BatchNorm of running variance 0
    after them made that 17 RMS). Balanced rows keep their offsets."""
    kernel, loud = _kernel_with_loud_outputs("hwio", 3, 100.0)
    kernel[..., 40:56] = 0.0
    kernel[..., 60:62] = 0.03
    live = ~loud
    live[..., 40:62] = False
    rest, _, _ = _errors_saved(tmp_path / "k.jjpg", kernel, ~live)
    got = np.asarray(jaxjpeg.restore(tmp_path / "k.jjpg")["w"])
    assert (got[..., 40:56] == 0).all() and (got[..., 60:62] == np.float32(0.03)).all()
    assert rest < 0.2


@pytest.mark.parametrize("how", ["=1e4", "50+-1.5"])
def test_loud_outputs_about_a_large_mean_keep_their_offsets(tmp_path, how):
    """A loud output's mean is its row's offset: a constant one stays
    exact, and one of 50 +- 1.5 is balanced by its spread (not by its RMS,
    which would code that spread 125x coarser: found by review of loud
    columns in session 39)."""
    kernel, loud = _kernel_with_loud_outputs("hwio", 3, 1.0)
    rng = np.random.default_rng(8)
    kernel[loud] = 1e4 if how == "=1e4" else 50 + 1.5 * rng.standard_normal(loud.sum())
    rest, _, _ = _errors_saved(tmp_path / "k.jjpg", kernel, loud)
    got = np.asarray(jaxjpeg.restore(tmp_path / "k.jjpg")["w"], np.float64)
    spread = kernel[loud] - kernel[loud].mean()
    assert rest < 0.15
    assert np.linalg.norm(got[loud] - kernel[loud]) <= 0.05 * np.linalg.norm(spread) + 1e-9


def test_a_kernel_balanced_by_its_outputs_restores_alike_everywhere(tmp_path):
    """Balanced rows' factors are in their maps: every path restores the
    same, whole, a slice or inside jit, and both layouts code alike."""
    kernel, loud = _kernel_with_loud_outputs("hwio", 3, 100.0)
    torch_kernel = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    jaxjpeg.save(tmp_path / "a.jjpg", {"k": kernel}, progress=False)
    jaxjpeg.save(tmp_path / "b.jjpg", {"k": torch_kernel}, progress=False)
    assert abs((tmp_path / "a.jjpg").stat().st_size - (tmp_path / "b.jjpg").stat().st_size) < 64
    got = np.asarray(jaxjpeg.restore(tmp_path / "a.jjpg")["k"])
    other = np.asarray(jaxjpeg.restore(tmp_path / "b.jjpg")["k"])
    np.testing.assert_array_equal(got, other.transpose(2, 3, 1, 0))
    with jaxjpeg.open(tmp_path / "a.jjpg") as ckpt:
        np.testing.assert_array_equal(np.asarray(ckpt.get_slice("k", np.s_[1, :, 5:9, :4])),
                                      got[1, :, 5:9, :4])
    jitted = jax.jit(jaxjpeg.decode)(jaxjpeg.load(tmp_path / "a.jjpg"))["k"]
    np.testing.assert_array_equal(np.asarray(jitted), got)


def test_loud_row_factors_read_spread_and_keep_maps_exact():
    """Powers of two (a float16 map stays exact), from each row's spread."""
    rng = np.random.default_rng(9)
    m = (rng.standard_normal((128, 576)) * 0.05).astype(np.float32)
    assert views.loud_row_factors(m) is None
    m[:3] *= 100
    m[5] = 1e4   # constant: its offset codes it
    factors = views.loud_row_factors(m)
    assert list(np.flatnonzero(factors > 1)) == [0, 1, 2]
    assert set(np.log2(factors).tolist()) <= {0.0, 3.0, 4.0}   # 100 / 8 = 12.5 -> 16
    assert views.loud_row_factors(m[:, :32]) is None   # rows sharing one map
    m[6] = 1e30   # constant: its rounded spread is no spread
    assert views.loud_row_factors(m)[6] == 1
    m[7] = 1e6 + 5 * rng.standard_normal(576)   # a spread about a large mean: loud
    assert views.loud_row_factors(m)[7] > 1
    tiny = (rng.standard_normal((128, 576)) * 1e-37).astype(np.float32)
    tiny[0] = rng.standard_normal(576) * 1e30
    assert np.isfinite(views.loud_row_factors(tiny)).all()   # at most 2^100


@pytest.mark.parametrize("case", ["input", "output", "rows"])
def test_balancing_extreme_slices_restores_finite(tmp_path, case):
    """Found in session 40: a slice of 1e29 beside weights of 1e-37 took an
    infinite scale (its excess beyond float32), and restored as inf and NaN
    (a conv kernel's input channel, a matrix's two rows; an output's row
    factor likewise). Scales stop at MAX_EXCESS."""
    rng = np.random.default_rng(10)
    shape = (512, 256) if case == "rows" else (3, 3, 64, 128)
    w = (rng.standard_normal(shape) * 1e-37).astype(np.float32)
    loud = np.zeros(shape, bool)
    loud[{"input": np.s_[:, :, 0], "output": np.s_[..., 0], "rows": np.s_[:2]}[case]] = True
    w[loud] = rng.standard_normal(loud.sum()) * 1e29
    _, within, _ = _errors_saved(tmp_path / "w.jjpg", w, loud)
    assert np.isfinite(np.asarray(jaxjpeg.restore(tmp_path / "w.jjpg")["w"])).all()
    assert within < 0.05


@pytest.mark.parametrize("ratio", [2.5, 3])
def test_balanced_kernels_keep_their_one_fine_step(tmp_path, ratio):
    """Found by review: a balanced kernel's one fine step (a coding beside
    JPEG at fine targets) was refused where its kept values stood more than
    ONE_STEP_RANGE from its RMS in balanced units, though the step codes
    weight units: a tree of two kernels with an input channel 1000x the
    others landed 32.6% (2.5x) and 19.1% (3x) under its target."""
    def kernel(shape, seed):
        k = (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)
        k[:, :, 0] *= 1000
        return k
    tree = {"a": kernel((3, 3, 64, 128), 0), "b": kernel((3, 3, 128, 256), 4)}
    jaxjpeg.save(tmp_path / "t.jjpg", tree, target_ratio=ratio, progress=False)
    target = sum(k.nbytes for k in tree.values()) / ratio
    assert abs((tmp_path / "t.jjpg").stat().st_size - target) <= 0.02 * target



def _rows_balanced(kernel) -> bool:
    """Whether ``kernel`` (alone, under the common-mean prior) gets row factors."""
    from jaxjpeg import priors

    cov = priors.batchnorm_prior({"k": kernel}).covariance("k", kernel.shape)
    return rate.prepare_leaf(kernel, None, "auto", cov).row_factor is not None


def test_outputs_spread_over_decades_or_near_dead_are_not_balanced():
    """Found by review, with up to a quarter of the outputs balanced:
    lognormal output scales (sigma 1.5) were, their default saves 5-29%
    larger, and beside 100 near-dead outputs (x1e-3) the 28 live ones, whose
    error at 8x went 0.0013 -> 0.026. At most 1/32 of the outputs are now;
    and not the tail of a spread (Student-t(2) output scales: 12 of 512
    rows loud made a default save 24% larger; views.LOUD_TAIL)."""
    rng = np.random.default_rng(11)
    kernel = (rng.standard_normal((3, 3, 64, 128)) * 0.05).astype(np.float32)
    spread = kernel * np.exp(1.5 * rng.standard_normal(128)).astype(np.float32)
    dead = kernel.copy()
    dead[..., :100] *= 1e-3
    wide = (rng.standard_normal((3, 3, 64, 512)) * 0.05).astype(np.float32)
    tail = wide * (np.abs(np.random.default_rng(4).standard_t(2, 512)) + 0.1).astype(np.float32)
    assert not _rows_balanced(spread) and not _rows_balanced(dead) and not _rows_balanced(tail)
    few = kernel.copy()
    few[..., :4] *= 100
    assert _rows_balanced(few)


def test_kept_values_do_not_make_a_row_loud(tmp_path):
    """Found by review: the zeros standing in for a row's kept NaNs counted
    in its spread, so an output of 50 +- 0.05 with 6 NaNs read as loud and
    came back at 1.83x its spread's size (8.05x with 20 NaNs)."""
    kernel, loud = _kernel_with_loud_outputs("hwio", 3, 100.0)
    rng = np.random.default_rng(12)
    kernel[..., 30] = 50 + 0.05 * rng.standard_normal((3, 3, 64))
    kernel[0, 0, :20, 30] = np.nan
    path = tmp_path / "k.jjpg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the NaNs are said
        jaxjpeg.save(path, {"k": kernel}, progress=False)
    got = np.asarray(jaxjpeg.restore(path)["k"], np.float64)[..., 30]
    want = kernel[..., 30].astype(np.float64)
    coded = ~np.isnan(want)
    assert np.isnan(got[~coded]).all()
    spread = want[coded] - want[coded].mean()
    assert np.linalg.norm(got[coded] - want[coded]) < 0.3 * np.linalg.norm(spread)


def test_balanced_maps_beyond_float16_save_without_warnings(tmp_path):
    """Found by review: maps of rows balanced by a power of two reach past
    float16 with their low bits clear, and the cast that tests them warned
    of an overflow (under -W error, the save raised)."""
    kernel, _ = _kernel_with_loud_outputs("hwio", 3, 1e6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxjpeg.save(tmp_path / "k.jjpg", {"k": kernel}, progress=False)
    assert np.isfinite(np.asarray(jaxjpeg.restore(tmp_path / "k.jjpg")["k"])).all()


@pytest.mark.parametrize("case", ["kernel", "embedding"])
def test_constant_rows_stay_exact_beside_balanced_columns(tmp_path, case):
    """Found by review: an output channel of 0.03 beside an input channel
    1000x the others came back with errors up to 1.06 (its values in the
    balanced columns, divided by their scales, made the row uneven, and its
    offset could no longer code it). Those values are now kept exactly; an
    embedding's constant row beside loud columns alike."""
    rng = np.random.default_rng(13)
    if case == "kernel":
        w = (rng.standard_normal((128, 64, 3, 3)) * 0.05).astype(np.float32)
        w[:, :1] *= 1000
        rows = [50, 60]
    else:
        w = (rng.standard_normal((2048, 256)) * 0.02).astype(np.float32)
        w[:, :4] *= 100
        rows = [7]
    for r, value in zip(rows, (0.03, -0.5)):
        w[r] = value
    jaxjpeg.save(tmp_path / "w.jjpg", {"w": w}, progress=False)
    got = np.asarray(jaxjpeg.restore(tmp_path / "w.jjpg")["w"])
    for r in rows:
        np.testing.assert_array_equal(got[r], w[r])
    assert _col_scaled(tmp_path / "w.jjpg") == {"w": True}


def test_a_dense_leaf_whose_probe_is_sparse_is_counted_dense(tmp_path):
    """Found by review of session 51: a thin leaf just under half zeros is
    coded dense, but its curve counted the 65,536-value probe's coding,
    sparse where the probe held half zeros: 4x landed at 6.7x. Counted
    dense (as it is coded), within 2%."""
    for seed in range(100):   # a probe of at least half zeros
        rng = np.random.default_rng(seed)
        vector = rng.normal(0, .05, 480000).astype(np.float32)
        vector[rng.permutation(vector.size)[:int(vector.size * .4995)]] = 0
        at = np.random.default_rng(0).choice(vector.size, rate.THIN_PROBE, replace=False)
        if np.count_nonzero(vector[at] == 0) >= rate.THIN_PROBE // 2:
            break
    assert not quantized_vectors.is_sparse(vector) and quantized_vectors.is_sparse(vector[at])
    tree = {"half_zero": vector,
            "w": np.random.default_rng(7).normal(0, .05, (512, 512)).astype(np.float32)}
    report = jaxjpeg.save(tmp_path / "h.jjpg", tree, target_ratio=4, progress=False)
    assert report.ratio_vs_float32 == pytest.approx(4, rel=0.02)


@pytest.mark.parametrize("rate_kw, most", [({"bits_per_weight": 12}, 6.0),
                                           ({"target_ratio": 3}, 40.0),
                                           ({"bits_per_weight": 10}, 100.0)])
def test_a_kernel_whose_rows_spread_keeps_its_fine_step_beside_row_ranges(tmp_path, rate_kw,
                                                                            most):
    """Found by review: where one fine step did not err less than JPEG's
    shared finest coding, its candidates were dropped below the row ranges'
    largest: a kernel whose rows spread 1000x beside a second leaf took
    5.6x the squared error at 12 bits a value (16.1 against 2.9), 1.7x at
    3x; dropped only below the first row range, the gap left at 10 bits
    a value landed it 28% under. Now the step is offered throughout, and a
    last leaf between JPEG and it lands by JPEG's row ranges (squared
    error 3.0 / 16.9 / 48, session start 2.9 / 78 / 152)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((1024, 256)) * 0.05).astype(np.float32)
    w *= np.exp(np.linspace(0, np.log(1000), 1024))[:, None].astype(np.float32)
    tree = {"w": w, "v": (np.random.default_rng(3).standard_normal((256, 256))
                          * 0.05).astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = jaxjpeg.save(tmp_path / "r.jjpg", tree, progress=False, **rate_kw)
    ratio = rate_kw.get("target_ratio") or 32 / rate_kw["bits_per_weight"]
    assert report.ratio_vs_float32 == pytest.approx(ratio, rel=0.02)
    back = jaxjpeg.restore(tmp_path / "r.jjpg")
    sse = sum(float(np.sum((np.asarray(back[n], np.float64) - tree[n]) ** 2)) for n in tree)
    assert sse < most


@pytest.mark.parametrize("ratio", [3.5, 4, 4.5])
def test_a_lone_kernel_whose_rows_spread_lands_on_its_shared_scales_finest_step(tmp_path,
                                                                                 ratio):
    """Found by review: alone in its tree, a kernel whose rows spread 300x
    settled 18% under 4x on its shared scale's step 2: the bisection of its
    candidates stopped at a thin coding past step 1, which it never tried."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((512, 512)) * 0.05).astype(np.float32)
    w *= np.exp(np.linspace(0, np.log(300), 512))[:, None].astype(np.float32)
    report = jaxjpeg.save(tmp_path / "w.jjpg", {"w": w}, target_ratio=ratio, progress=False)
    assert report.ratio_vs_float32 == pytest.approx(ratio, rel=0.02)


def test_a_fine_step_above_the_row_range_mix_is_not_taken(tmp_path):
    """Found by review: between JPEG's shared scale's finest coding and its
    first per-row-range coding, the fine step was taken where the two mixed
    by row bands err less: a kernel whose rows spread 1000x, alone at 3.9x,
    took squared error 686 (its mix, as at the session's start: 637)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((1024, 512)) * 0.05).astype(np.float32)
    w *= np.exp(np.linspace(0, np.log(1000), 1024))[:, None].astype(np.float32)
    report = jaxjpeg.save(tmp_path / "w.jjpg", {"w": w}, target_ratio=3.9, progress=False)
    assert report.ratio_vs_float32 == pytest.approx(3.9, rel=0.02)
    back = np.asarray(jaxjpeg.restore(tmp_path / "w.jjpg")["w"], np.float64)
    assert np.sum((back - w) ** 2) < 660


def _small_transformer(dtype, vocab=2000, d=128, layers=4):
    """A transformer-like tree: embeddings, attention and MLP kernels (t(4)
    values, output channels spread), biases and norm vectors."""
    def kernel(shape, seed, spread=3.0):
        r = np.random.default_rng(seed)
        x = r.standard_t(4, shape) / np.sqrt(2) / np.sqrt(shape[0])
        return (x * np.exp(r.normal(0, np.log(spread) / 2, shape[-1]))).astype(np.float32)
    r = np.random.default_rng(1000)
    tree = {"embed": (r.standard_normal((vocab, d)) * 0.02
                      * np.exp(r.normal(0, 0.5, vocab))[:, None]).astype(np.float32),
            "pos_embed": (r.standard_normal((256, d)) * 0.01).astype(np.float32)}
    for layer in range(layers):
        block = {name: {"kernel": kernel((d, d), 10 * layer + i, 2.0),
                        "bias": (0.01 * r.standard_normal(d)).astype(np.float32)}
                 for i, name in enumerate(["query", "key", "value", "out"])}
        block["mlp_in"] = {"kernel": kernel((d, 4 * d), 10 * layer + 8),
                           "bias": (0.02 * r.standard_normal(4 * d)).astype(np.float32)}
        block["mlp_out"] = {"kernel": kernel((4 * d, d), 10 * layer + 9),
                            "bias": (0.02 * r.standard_normal(d)).astype(np.float32)}
        for norm in ("ln1", "ln2"):
            block[norm] = {"scale": (1 + 0.1 * r.standard_normal(d)).astype(np.float32),
                           "bias": (0.05 * r.standard_normal(d)).astype(np.float32)}
        tree[f"block_{layer}"] = block
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def test_fine_steps_are_all_measured(tmp_path):
    """Found by review: measured half an octave apart past 6 bits a value
    (the quarter octaves between interpolated, within 1% of measuring
    them), the fine step's curves lost the steps whose Rice codes fit best:
    a bfloat16 transformer at 12 bits a value took 1.20x the squared error
    (2.02e-4; every step measured 1.45e-4, the session's start 1.69e-4)."""
    tree = _small_transformer(ml_dtypes.bfloat16)
    jaxjpeg.save(tmp_path / "t.jjpg", tree, bits_per_weight=12, progress=False)
    back = jaxjpeg.restore(tmp_path / "t.jjpg")
    sse = sum(float(np.sum((np.asarray(b, np.float64) - np.asarray(a, np.float64)) ** 2))
              for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back)))
    assert sse < 1.6e-4


def _interpolated_one_point_at_a_time(steps, nbytes, sse):
    """rate._log_interpolated as a loop over the points (its definition)."""
    out = [[steps[0]], [nbytes[0]], [sse[0]]]
    for i in range(1, len(steps)):
        q0, q1 = steps[i - 1], steps[i]
        n = max(1, round(math.log(q0 / q1) / math.log(rate.DENSE_SPACING)))
        if min(nbytes[i - 1], nbytes[i], sse[i - 1], sse[i]) > 0:
            for t in np.arange(1, n) / n:
                out[0].append(q0 * (q1 / q0) ** t)
                out[1].append(nbytes[i - 1] * (nbytes[i] / nbytes[i - 1]) ** t)
                out[2].append(sse[i - 1] * (sse[i] / sse[i - 1]) ** t)
        for values, v in zip(out, (q1, nbytes[i], sse[i])):
            values.append(v)
    return [np.array(v, np.float64) for v in out]


def test_dense_points_are_the_loops_bit_for_bit():
    """A thin curve's points between its measured steps, computed at once:
    the loop's values bit for bit (libm's pow: numpy's vectorized power
    differs in the last bit on CPUs with AVX-512, and with it the files),
    gaps without points where a figure is 0, and a NaN past the first of a
    gap's four figures interpolated as the loop's Python min did (review)."""
    rng = np.random.default_rng(0)
    cases = [(np.array([1.0, 0.5, 0.25]), np.array([100.0, 200.0, 400.0]),
              np.array([1.0, np.nan, 0.25])),
             (np.array([2.0]), np.array([5.0]), np.array([1.0]))]
    for trial in range(200):
        n = int(rng.integers(2, 40))
        steps = (2.0 ** -np.arange(0, n / 4, 0.25)[:n] if trial % 2
                 else np.sort(np.exp2(-rng.uniform(0, 16, n)))[::-1])
        nbytes, sse = np.sort(rng.uniform(1, 1e6, n)), np.sort(rng.uniform(0, 1, n))[::-1]
        if trial % 3 == 0:
            nbytes[rng.integers(0, n)] = 0
        cases.append((steps, nbytes, sse))
    for steps, nbytes, sse in cases:
        with np.errstate(invalid="ignore"):
            got = list(rate._log_interpolated(steps, nbytes, sse))
            want = _interpolated_one_point_at_a_time(steps, nbytes, sse)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
