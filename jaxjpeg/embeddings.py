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
weight, the feed-forward kernels 4.8 instead of 3.9). Which one a table is
is told by the tree where it can be: a table tied to another leaf
(jaxjpeg.ties) is also a head; beside a head of its own it is an input only
(its own size); GPT-2's ``wte`` with no head beside it is the head. Any other
table with no head beside it may be either (a safetensors file drops a tied
head): it is weighed at the geometric mean of the two sizes, which costs
either case about the square root of its loss (MiniLM at 8x: 0.986).

Found by name, in the layouts frameworks write: a path part naming an
embedding (``embedding``, ``embed_tokens``, ``word_embeddings``,
``tok_embeddings``, ``wte``) or an output head (``lm_head``, ``logits_dense``, a top-level
``output`` kernel as Llama checkpoints name it, ``params/output/kernel``).
"""

from __future__ import annotations

import math
import re
from typing import Collection, Mapping

# MaxText's and T5X's head is logits_dense, PaxML's logits_ffn (found by
# review: missed, the head became "the largest other leaf" and the embedding
# lost its weighing too, both coded 2x coarser)
_HEAD = re.compile(r"(^lm_head$|^logits_dense$|^logits_ffn$)", re.IGNORECASE)
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


def weighing_sizes(sizes: Mapping[str, int], tied: Collection[str] = ()) -> dict[str, int]:
    """The size each coded leaf is weighed by (module docstring): its own,
    but no larger than the largest other leaf's for heads (by name, or
    embeddings in ``tied``: leaves other leaves are tied to), the geometric
    mean of the two for an embedding that may be a head."""
    heads = {name for name in sizes if is_head(name)
             or (is_lookup_table(name) and name in tied)}
    inputs = {name for name in sizes if is_lookup_table(name)} - heads
    if not heads:   # GPT-2's wte is its head
        heads = {name for name in inputs if "wte" in _parts(name)}
        inputs -= heads
    others = max((size for name, size in sizes.items() if name not in heads | inputs),
                 default=0)

    def weighing(name: str, size: int) -> int:
        if others <= 0 or size <= others or (name in inputs and heads):
            return size   # (an input table beside a head of its own: an input only)
        if name in heads:
            return others
        return round(math.sqrt(size * others))   # a head or an input: not told
    return {name: weighing(name, size) for name, size in sizes.items()}


def _parts(name: str) -> list[str]:
    return re.split(r"[/.]", name)
