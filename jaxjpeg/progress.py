"""The one progress bar of jaxjpeg (save and the command line)."""

from __future__ import annotations

import sys


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it",
             enabled: bool | None = None):
    """A tqdm bar on stderr, or a silent stand-in with the same interface
    (iteration, ``update``, ``close``). ``enabled=None``: only on an
    interactive terminal (tqdm's ``disable=None``) of process 0."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return _Silent(iterable)
    if enabled is None:
        # The terminal first: jax.process_index() starts jax's backends, which
        # under jax.distributed waits for every process (a save in process 0
        # while the others wait for its file would never return).
        if not sys.stderr.isatty():
            return _Silent(iterable)
        import jax
        disable = None if jax.process_index() == 0 else True
    else:
        disable = not enabled
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                leave=False, disable=disable)


class _Silent:
    def __init__(self, iterable=None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def update(self, n=1):
        pass

    def close(self):
        pass
