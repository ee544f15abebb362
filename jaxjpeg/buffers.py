"""Buffers a model computes by a formula rather than learns, kept exact.

Rotary position embeddings store their frequencies (``inv_freq``) and, in
some models, tables of their cosines and sines (``cos_cached``,
``sin_cached``, vLLM's ``cos_sin_cache``). They are not weights: every
position's angle is ``position * inv_freq``, so a relative error of 2^-10
in a frequency moves position 4095's angle by several radians (found by
review: at 8x ``inv_freq`` took log2 steps, as a second moment would, and
the angles were 3.3 rad off; by default the JPEG-coded cosine tables came
back up to 0.25 off); ALiBi's slopes and tables likewise. Found by the last
name of a leaf's path (parts split at '/' and '.'); a ``Policy(compress=...)``
pattern naming one codes it. An optimizer state's hyperparameters too
(:func:`is_hyperparameter`).
"""

from __future__ import annotations

import re

CONSTANT_BUFFER_NAMES = frozenset({
    "inv_freq", "original_inv_freq", "inv_freq_short", "inv_freq_long",
    "cos_cached", "sin_cached", "_cos_cached", "_sin_cached", "cos_sin_cache",
    "freqs_cis", "freqs_cos", "freqs_sin", "rope_cache", "embed_positions",
    # ALiBi's slopes and the bias tables made of them (found by review: a
    # JPEG-coded table came back 1.7 off)
    "alibi", "alibi_slopes", "alibi_bias", "alibi_mask",
})


# ... and the last two: Meta's LLaMA checkpoints keep rope.freqs (found by review)
CONSTANT_BUFFER_ENDINGS = frozenset({("rope", "freqs"), ("rotary_emb", "freqs")})


def is_constant_buffer(path: str) -> bool:
    """Whether leaf ``path``'s last name (or two) is a formula's buffer's."""
    parts = re.split(r"[/.]", path)
    return parts[-1] in CONSTANT_BUFFER_NAMES or tuple(parts[-2:]) in CONSTANT_BUFFER_ENDINGS


def is_hyperparameter(path: str) -> bool:
    """Whether leaf ``path`` is a hyperparameter an optimizer's state holds:
    optax.inject_hyperparams keeps them under ``hyperparams`` (found by
    review: a vmapped population's learning rates and b2 came back rounded
    to float16's 8 significand bits under a byte target, b2 0.999 as 0.998,
    the next update 36% off)."""
    return "hyperparams" in re.split(r"[/.]", path)[:-1]
