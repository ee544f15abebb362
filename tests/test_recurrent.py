"""Recurrent cells' weights, found by name, are coded finer by the default
save: their error compounds over the time steps (jaxjpeg.recurrent)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxjpeg
from jaxjpeg import recurrent
from jaxjpeg.checkpoint_reader import Checkpoint
from jaxjpeg.treepaths import leaves_with_paths, path_string

TORCH_LSTM = ([f"lstm.weight_{k}_l{i}" for i in range(2) for k in ("ih", "hh")]
              + [f"lstm.bias_{k}_l{i}" for i in range(2) for k in ("ih", "hh")]
              + ["gru.weight_hh_l0_reverse", "cell.weight_ih", "cell.weight_hh", "linear.weight"])


def _paths(tree) -> list[str]:
    return [path_string(k) for k, _ in leaves_with_paths(tree)]


def test_pytorch_recurrent_weights_and_nothing_else():
    found = recurrent.recurrent_leaves(TORCH_LSTM)
    assert found == {n for n in TORCH_LSTM if ".weight_" in n and "linear" not in n}


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.OptimizedLSTMCell, nn.GRUCell, nn.MGUCell,
                                  nn.SimpleCell])
def test_flax_linen_cells_kernels(cell):
    model = nn.Sequential([nn.RNN(cell(8)), nn.Dense(4)])
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 3)))
    names = _paths(params)
    kernels = {n for n in names if n.endswith("kernel") and "/cell/" in n}
    assert kernels and recurrent.recurrent_leaves(names) == kernels   # not the Dense


@pytest.mark.parametrize("cell", [nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.GRUCell,
                                  nnx.SimpleCell])
def test_flax_nnx_cells_kernels(cell):
    state = {"rnn": nnx.to_pure_dict(nnx.state(cell(3, 8, rngs=nnx.Rngs(0)), nnx.Param)),
             "head": {"kernel": np.zeros((8, 4))}}
    names = _paths(state)
    kernels = {n for n in names if n.endswith("kernel") and n.startswith("rnn/")}
    assert kernels and recurrent.recurrent_leaves(names) == kernels


@pytest.mark.parametrize("cell", [nnx.LSTMCell, nnx.GRUCell])
def test_nnx_states_as_they_come_have_their_cells_found(cell):
    """Found by review: nnx.state(model) as it is (paths ending in
    kernel/value) had no cell found, so its kernels were coded 8x coarser."""
    state = nnx.state(cell(3, 8, rngs=nnx.Rngs(0)), nnx.Param)
    names = _paths(state)
    kernels = {n for n in names if "kernel" in n}
    assert kernels and all(n.endswith("/value") for n in kernels), names
    assert recurrent.recurrent_leaves(names) == kernels


def test_lstm_projections_and_conv_lstm_cells_are_recurrent():
    """Found by review: nn.LSTM(proj_size > 0)'s weight_hr (applied every
    step) and flax's ConvLSTMCell (children ih / hh) were not found."""
    assert recurrent.recurrent_leaves(["lstm.weight_hr_l0", "lstm.weight_hh_l0",
                                       "lstm.weight_ih_l0"]) == {
        "lstm.weight_hr_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l0"}
    cell = nn.ConvLSTMCell(features=4, kernel_size=(3, 3))
    carry = cell.initialize_carry(jax.random.PRNGKey(0), (1, 6, 6, 2))
    params = cell.init(jax.random.PRNGKey(0), carry, jnp.zeros((1, 6, 6, 2)))
    names = _paths(params)
    assert recurrent.recurrent_leaves(names) == {n for n in names if n.endswith("kernel")}


def test_keras_recurrent_kernel_and_its_input_kernel():
    names = ["lstm/recurrent_kernel", "lstm/kernel", "lstm/bias", "dense/kernel"]
    assert recurrent.recurrent_leaves(names) == {"lstm/recurrent_kernel", "lstm/kernel"}


def test_lookalike_names_are_not_cells():
    names = ["block/h/kernel", "block/proj/kernel",        # an 'h' without an 'i'
             "attn/hi/kernel", "attn/hf/kernel",          # two gate names, no cell
             "kernel", "conv.weight", "encoder.weight_ih_fc",  # not PyTorch's RNN names
             "hidden/weight_hh_l0x"]
    assert recurrent.recurrent_leaves(names) == set()


def test_joined_and_short_names_with_both_halves():
    """g2p_en keeps its GRUs as ``enc_w_ih`` / ``enc_w_hh`` (found by review:
    coded as any matrix, phonemes 0.877 against 0.963 once found)."""
    names = ["enc_w_ih", "enc_w_hh", "enc_b_ih", "enc_b_hh", "dec_weight_ih_l0",
             "dec_weight_hh_l0", "attn_w_ih", "proj_w_hh_x", "fc_w"]
    assert recurrent.recurrent_leaves(names) == set(names[:2] + names[4:6])   # attn: one half


def test_keras_names_with_tensorflow_output_indices():
    """Keras 2 names an LSTM's weights ``lstm_cell/kernel:0``: its input
    kernel beside ``recurrent_kernel:0`` went unfound."""
    names = ["lstm/lstm_cell/kernel:0", "lstm/lstm_cell/recurrent_kernel:0",
             "lstm/lstm_cell/bias:0", "dense/kernel:0"]
    assert recurrent.recurrent_leaves(names) == set(names[:2])


# An ONNX bidirectional LSTM of hidden size 256 on 80 inputs and a GRU of 128
# on its 512 outputs, as torch's exporter and tf2onnx name them.
ONNX_RNNS = {"onnx::LSTM_460": (2, 2048), "onnx::LSTM_461": (2, 1024, 80),
             "onnx::LSTM_462": (2, 1024, 256), "W0__30": (1, 384, 512),
             "R0__31": (1, 384, 128), "B0__32": (1, 768), "onnx::MatMul_535": (128, 40)}


def test_onnx_recurrent_weights_found_by_their_shapes():
    found = recurrent.recurrent_leaves(ONNX_RNNS, ONNX_RNNS)
    assert found == {"onnx::LSTM_461", "onnx::LSTM_462", "W0__30", "R0__31"}


def test_torch_exported_rnn_and_biasless_cells_found_by_their_node_names():
    """torch names an exported node's weights after it: nn.RNN's (one gate)
    and an LSTM without biases are found by that (review)."""
    rnn = {"onnx::RNN_35": (1, 16, 20), "onnx::RNN_36": (1, 16, 16), "onnx::RNN_37": (1, 32)}
    bare = {"onnx::LSTM_40": (2, 64, 8), "onnx::LSTM_41": (2, 64, 16)}
    assert recurrent.recurrent_leaves(rnn, rnn) == {"onnx::RNN_35", "onnx::RNN_36"}
    assert recurrent.recurrent_leaves(bare, bare) == set(bare)


def test_stacked_layers_are_not_onnx_cells():
    """Found by review: a vmapped twin critic's (2, 256, 256) kernels beside a
    (2, 512) bias, and a scanned 2-layer transformer's, read as ONNX RNN
    cells: default saves 22-25% larger."""
    critic = {"params/Dense_0/kernel": (2, 64, 512), "params/Dense_0/bias": (2, 512),
              "params/Dense_2/kernel": (2, 256, 256), "params/Dense_3/kernel": (2, 256, 256),
              "params/Dense_4/kernel": (2, 768, 256), "params/Dense_4/bias": (2, 1536)}
    scanned = {"layers/query/kernel": (2, 256, 256), "layers/value/kernel": (2, 256, 256),
               "layers/mlp_in/bias": (2, 512), "layers/mlp_in/kernel": (2, 256, 512)}
    lone = {"R0__31": (1, 384, 128), "B0__32": (1, 768)}   # no W beside it
    for shapes in (critic, scanned, lone):
        assert recurrent.recurrent_leaves(shapes, shapes) == set(), shapes


def test_onnx_lookalike_shapes_are_not_cells():
    shapes = {"pos": (1, 1024, 256),            # an R's shape, no bias beside it
              "conv1d": (2, 512, 128), "scale": (2, 512),   # bias of 1x rows, not 2x
              "tokens": (1, 300, 120), "mask": (1, 600)}    # rows not g times columns
    assert recurrent.recurrent_leaves(shapes, shapes) == set()


def _relative_error(restored, original) -> float:
    return float(np.linalg.norm(np.asarray(restored) - original) / np.linalg.norm(original))


def test_default_save_codes_recurrent_weights_finer(tmp_path):
    """Resemblyzer's LSTM lost its function at the default save (cosine 0.50);
    a cell's weights now get the step RECURRENT_STEP_FACTOR times finer: the
    same matrix, named as a recurrent weight, restores 8x more exactly."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((512, 128)) * 0.05).astype(np.float32)
    tree = {"lstm.weight_hh_l0": w, "linear.weight": w.copy()}
    path = tmp_path / "rnn.jjpg"
    jaxjpeg.save(path, tree)
    restored = jaxjpeg.restore(path)
    recurrent_error = _relative_error(restored["lstm.weight_hh_l0"], w)
    other_error = _relative_error(restored["linear.weight"], w)
    assert 6 < other_error / recurrent_error < 10
    with Checkpoint(path) as ckpt:
        assert ckpt.reader.metadata["rate"]["recurrent_leaves"] == 1


def test_default_save_codes_onnx_recurrent_weights_finer(tmp_path):
    """An ONNX LSTM's W and R under an exporter's names were coded as any
    matrix (found by review on a tf2onnx seq2seq model)."""
    rng = np.random.default_rng(5)
    r = (rng.standard_normal((1, 512, 128)) * 0.05).astype(np.float32)
    tree = {"W0__30": (rng.standard_normal((1, 512, 64)) * 0.05).astype(np.float32),
            "R0__31": r, "B0__32": np.zeros((1, 1024), np.float32),
            "other": r.reshape(512, 128).copy()}
    path = tmp_path / "onnx_rnn.jjpg"
    jaxjpeg.save(path, tree)
    restored = jaxjpeg.restore(path)
    ratio = _relative_error(restored["other"], r[0]) / _relative_error(restored["R0__31"], r)
    assert 6 < ratio < 10
    with Checkpoint(path) as ckpt:
        assert ckpt.reader.metadata["rate"]["recurrent_leaves"] == 2


def test_a_sensitivity_for_a_recurrent_leaf_replaces_the_rule(tmp_path):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((512, 128)) * 0.05).astype(np.float32)
    tree = {"lstm.weight_hh_l0": w, "linear.weight": w.copy()}
    path = tmp_path / "rnn.jjpg"
    jaxjpeg.save(path, tree, sensitivity={"lstm.weight_hh_l0": 1.0, "linear.weight": 1.0})
    restored = jaxjpeg.restore(path)
    ratio = (_relative_error(restored["linear.weight"], w)
             / _relative_error(restored["lstm.weight_hh_l0"], w))
    assert 0.8 < ratio < 1.25
    with Checkpoint(path) as ckpt:
        assert "recurrent_leaves" not in ckpt.reader.metadata["rate"]
