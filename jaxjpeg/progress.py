"""The one progress bar of jaxjpeg (save and the command line)."""

from __future__ import annotations


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
        import sys
        # Off a terminal there is no bar, and jax is not asked for the
        # process index: under jax.distributed that would start the backend,
        # which waits for every process (a save by process 0 alone would hang).
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
