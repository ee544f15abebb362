"""Token embeddings and output heads, found from their paths.

The default save and data-free byte targets weigh a leaf's relative error by
its size^0.3 (jaxjpeg.checkpoint.LEAF_SIZE_POWER): small layers, which the
CNNs measured are sensitive to, get finer steps, large ones coarser. An
embedding table is read one row per token, and an output head computes each
logit from one row: the error a token sees does not shrink with the
vocabulary, and in a language model these leaves are often the largest (a
GPT-2-like model with a vocabulary of 8192: its tied (8192, 256) embedding,
40% of the weights, took 2.9 bits a weight at 8x where every block kernel
took 4.4-5.1, KL to float32 0.0071). So they are weighed as if no larger than
the largest other coded leaf (quantizers commonly keep them finer too).
Found by name, in the layouts frameworks write: a path part naming an
embedding (``embedding``, ``embed_tokens``, ``word_embeddings``,
``tok_embeddings``, ``wte``) or an output head (``lm_head``, ``logits_dense``, a top-level
``output`` kernel as Llama checkpoints name it, ``params/output/kernel``).
"""

from __future__ import annotations

import re
from typing import Mapping

# MaxText's and T5X's head is logits_dense, PaxML's logits_ffn (found by
# review: missed, the head became "the largest other leaf" and the embedding
# lost its weighing too, both coded 2x coarser)
_PART = re.compile(r"(embed|^wte$|^lm_head$|^logits_dense$|^logits_ffn$)", re.IGNORECASE)


def is_lookup_table(name: str) -> bool:
    """Whether leaf path ``name`` (parts joined with '/' or '.') is a token
    embedding or an output head."""
    parts = re.split(r"[/.]", name)
    if len(parts) <= 3 and parts[-2:] in (["output", "weight"], ["output", "kernel"]):
        return True   # a top-level head: output.weight, params/output/kernel
    return any(_PART.search(part) for part in parts)


def weighing_sizes(sizes: Mapping[str, int]) -> dict[str, int]:
    """The size each coded leaf is weighed by: its own, but no larger than
    the largest other leaf's for embeddings and output heads."""
    tables = {name for name in sizes if is_lookup_table(name)}
    others = max((size for name, size in sizes.items() if name not in tables), default=0)
    return {name: (min(size, others) if name in tables and others > 0 else size)
            for name, size in sizes.items()}

