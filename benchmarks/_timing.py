"""Shared timing helpers for the benchmark scripts."""

from __future__ import annotations

import time

import jax


def best_of(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs (results are blocked on)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best
