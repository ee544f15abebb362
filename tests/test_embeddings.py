"""Token embeddings and output heads are weighed as no larger than the
largest other leaf (jaxjpeg.embeddings)."""

import warnings

import numpy as np
import pytest

import jaxjpeg
from jaxjpeg import embeddings


@pytest.mark.parametrize("name,table", [
    ("params/wte/embedding", True), ("params/Embed_0/embedding", True),
    ("model.embed_tokens.weight", True), ("bert/embeddings/word_embeddings", True),
    ("lm_head.weight", True), ("params/lm_head/kernel", True), ("output.weight", True),
    ("params/output/kernel", True), ("layer.0.output.weight", False),
    ("params/decoder/logits_dense/kernel", True), ("softmax/logits_ffn/linear/w", True),
    ("params/h/attn/out/kernel", False), ("encoder.layer.0.attention.output.dense.weight", False),
    ("_fc.weight", False), ("params/Dense_0/kernel", False), ("linear_8.w_0", False)])
def test_names(name, table):
    assert embeddings.is_lookup_table(name) == table


def test_weighing_sizes():
    sizes = {"wte/embedding": 2_000_000, "h/kernel": 260_000, "wpe/embedding": 16_000}
    assert embeddings.weighing_sizes(sizes) == {"wte/embedding": 260_000, "h/kernel": 260_000,
                                                "wpe/embedding": 16_000}
    assert embeddings.weighing_sizes({"embedding": 10}) == {"embedding": 10}
    # an untied language model's input table: weighed as a head still
    llama = {"embed_tokens.weight": 4_000_000, "mlp.weight": 1_000_000, "lm_head.weight": 4_000_000,
             "embed_out.weight": 4_000_000}
    assert set(embeddings.weighing_sizes(llama).values()) == {1_000_000}
    # an encoder's (a token-type table or a pooler beside it, no head): its own size
    bert = {"embeddings.word_embeddings.weight": 4_000_000,
            "embeddings.token_type_embeddings.weight": 768,
            "layer.0.output.dense.weight": 1_000_000}
    assert embeddings.weighing_sizes(bert) == bert
    # ... not where it is tied to another leaf, nor beside a masked-LM head
    assert embeddings.weighing_sizes(bert, tied={"embeddings.word_embeddings.weight"})[
        "embeddings.word_embeddings.weight"] == 1_000_000
    mlm = {**bert, "cls.predictions.transform.dense.weight": 1000}
    assert embeddings.weighing_sizes(mlm)["embeddings.word_embeddings.weight"] == 1_000_000
    # ELECTRA's generator, its tied head dropped by save_pretrained (review)
    for head in ("generator_lm_head.bias", "generator_predictions.dense.weight"):
        electra = {**bert, head: 1000}
        assert embeddings.weighing_sizes(electra)["embeddings.word_embeddings.weight"] == 1_000_000
    # ... but its discriminator's per-token head is no masked-LM head (review)
    discriminator = {**bert, "discriminator_predictions.dense.weight": 1000}
    assert embeddings.weighing_sizes(discriminator) == discriminator


@pytest.mark.parametrize("options", [{}, {"target_ratio": 8}])
def test_a_large_embedding_is_coded_as_finely_as_the_kernels(tmp_path, options):
    """Found by review: a GPT-2-like model's tied (8192, 256) embedding, 40%
    of its weights, was coded coarsest by the size weighting (relative error
    0.12 at the default, 0.13 at 8x, the kernels 0.06); its output KL at 8x
    0.0071 (0.0022 weighed as a kernel)."""
    rng = np.random.default_rng(0)
    tree = {"wte": {"embedding": (0.02 * rng.standard_normal((8192, 256))).astype(np.float32)}}
    for i in range(4):
        tree[f"h_{i}"] = {"c_fc": (0.02 * rng.standard_normal((256, 1024))).astype(np.float32),
                          "c_proj": (0.02 * rng.standard_normal((1024, 256))).astype(np.float32)}
    path = tmp_path / "t.jjpg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jaxjpeg.save(path, tree, **options)
    restored = jaxjpeg.restore(path)

    def error(got, want):
        return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    table = error(restored["wte"]["embedding"], tree["wte"]["embedding"])
    kernels = max(error(restored[f"h_{i}"][n], tree[f"h_{i}"][n])
                  for i in range(4) for n in ("c_fc", "c_proj"))
    assert table < 1.15 * kernels, (table, kernels)


def _lm(rng, table_name, head_name=None, vocab=8192, width=256):
    tree = {table_name: (0.02 * rng.standard_normal((vocab, width))).astype(np.float32)}
    for i in range(4):
        tree[f"layers.{i}.up.weight"] = (0.02 * rng.standard_normal((1024, width))).astype(np.float32)
        tree[f"layers.{i}.down.weight"] = (0.02 * rng.standard_normal((width, 1024))).astype(np.float32)
    if head_name:
        tree[head_name] = (0.02 * rng.standard_normal((vocab, width))).astype(np.float32)
    return tree


def _errors(tmp_path, tree, **options):
    path = tmp_path / "t.jjpg"
    jaxjpeg.save(path, tree, **options)
    restored = jaxjpeg.restore(path)
    return {k: float(np.linalg.norm(np.asarray(restored[k], np.float64) - v) / np.linalg.norm(v))
            for k, v in tree.items()}


def test_an_encoders_input_table_is_weighed_by_its_own_size(tmp_path):
    """A BERT-family encoder's token table (a token-type table beside it,
    no head) is weighed by its own size: coarser than the kernels, its bits
    to them (all-MiniLM-L6-v2 at 8x: embeddings' cosine 0.976 -> 0.990);
    an untied language model's input table stays weighed as a head (review:
    a random-init Llama-shaped model's KL at 8x rose by half otherwise)."""
    rng = np.random.default_rng(2)
    encoder = _lm(rng, "embeddings.word_embeddings.weight")
    encoder["embeddings.token_type_embeddings.weight"] = (
        0.02 * rng.standard_normal((2, 256))).astype(np.float32)
    errors = _errors(tmp_path, encoder, target_ratio=8)
    kernels = max(e for k, e in errors.items() if k.startswith("layers."))
    assert errors["embeddings.word_embeddings.weight"] > 1.5 * kernels, errors
    llama = _lm(np.random.default_rng(1), "model.embed_tokens.weight", "lm_head.weight")
    errors = _errors(tmp_path, llama, target_ratio=8)
    kernels = max(e for k, e in errors.items() if k.startswith("layers."))
    assert errors["model.embed_tokens.weight"] < 1.15 * kernels, errors
    assert errors["lm_head.weight"] < 1.15 * kernels, errors
