"""Token embeddings and output heads, found from their paths.

The default save and data-free byte targets weigh a leaf's relative error by
its size^0.3 (jaxjpeg.checkpoint.LEAF_SIZE_POWER): small layers, which the
CNNs measured are sensitive to, get finer steps, large ones coarser. An
output head computes each logit from one row: the error a logit sees does
not shrink with the vocabulary, and in a language model the head is often
the largest leaf (a GPT-2-like model with a vocabulary of 8192: its tied
(8192, 256) embedding, 40% of the weights, took 2.9 bits a weight at 8x
where every block kernel took 4.4-5.1, KL to float32 0.0071). So a head is
weighed as if no larger than the largest other coded leaf (quantizers
commonly keep heads finer too).

A token embedding only read as the network's input is another matter: on
all-MiniLM-L6-v2 (a pretrained sentence encoder, its (30522, 384) table half
its weights) weighing the table as a head gave 8x embeddings a cosine of
0.976 to float32's; weighed by its own size, 0.990 (the table 3.0 bits a
weight, the feed-forward kernels 4.8 instead of 3.9). But a table is often
a head too, and the tree rarely says so: a safetensors file drops a tied
head, Flax ties through ``Embed.attend``, and on a random-init untied
Llama-shaped model (review) the input table weighed by its own size raised
the logits' KL at 8x by half (0.047 -> 0.070). So only a table of an
encoder, told by a token-type table or a pooler beside it and no head
(BERT's family without its masked-LM head: the MiniLM measured), is weighed
by its own size; every other table as a head.

Found by name, in the layouts frameworks write: a path part naming an
embedding (``embedding``, ``embed_tokens``, ``word_embeddings``,
``tok_embeddings``, ``wte``) or an output head (``lm_head``, ``logits_dense``, a top-level
``output`` kernel as Llama checkpoints name it, ``params/output/kernel``).
"""

from __future__ import annotations

import re
from typing import Collection, Mapping

# MaxText's and T5X's head is logits_dense, PaxML's logits_ffn (found by
# review: missed, the head became "the largest other leaf" and the embedding
# lost its weighing too, both coded 2x coarser)
# GPT-NeoX (Pythia) names its untied head embed_out (found by review)
# ELECTRA's and ConvBERT's masked-LM generator: generator_lm_head (review)
_HEAD = re.compile(r"((^|_)lm_head$|^logits_dense$|^logits_ffn$|^embed_out$)", re.IGNORECASE)
# BERT's family beside its token table: a token-type table or a pooler
_ENCODER_PART = re.compile(r"(^token_type_embeddings$|^pooler$)", re.IGNORECASE)
# ... and no masked-LM head (BERT's cls/predictions, which Flax ties to the
# token table through attend: no leaf of its own)
# (ELECTRA's generator_predictions too; not its discriminator_predictions, a
# per-token binary head: review)
_MLM_PART = re.compile(r"^(generator_)?predictions$", re.IGNORECASE)
_EMBEDDING = re.compile(r"(embed|^wte$)", re.IGNORECASE)


def is_lookup_table(name: str) -> bool:
    """Whether leaf path ``name`` (parts joined with '/' or '.') is a token
    embedding or an output head."""
    return is_head(name) or any(_EMBEDDING.search(part) for part in _parts(name))


def is_head(name: str) -> bool:
    """Whether leaf path ``name`` is an output head by its name."""
    parts = _parts(name)
    if len(parts) <= 3 and parts[-2:] in (["output", "weight"], ["output", "kernel"]):
        return True   # a top-level head: output.weight, params/output/kernel
    return any(_HEAD.search(part) for part in parts)


def weighing_sizes(sizes: Mapping[str, int], tied: Collection[str] = (),
                   names: Collection[str] = ()) -> dict[str, int]:
    """The size each coded leaf is weighed by (module docstring): its own,
    but no larger than the largest other leaf's for heads and token
    embeddings, save an encoder's untied token embedding (``tied``: the
    leaves other leaves are tied to; ``names``: every leaf of the tree,
    coded or not, which tell an encoder)."""
    tables = {name for name in sizes if is_lookup_table(name)}
    others = max((size for name, size in sizes.items() if name not in tables), default=0)
    every = set(sizes) | set(names)
    parts = {part for name in every for part in _parts(name)}
    encoder = (not any(is_head(name) for name in every)
               and any(_ENCODER_PART.search(part) for part in parts)
               and not any(_MLM_PART.search(part) for part in parts))

    def weighing(name: str, size: int) -> int:
        if name not in tables or others <= 0 or size <= others:
            return size
        if encoder and name not in tied and not is_head(name):
            return size   # an encoder's input table (module docstring)
        return others
    return {name: weighing(name, size) for name, size in sizes.items()}


def _parts(name: str) -> list[str]:
    return re.split(r"[/.]", name)
