"""Ending a command cleanly on Ctrl-C, SIGTERM and SIGHUP: the signals are
raised as interrupts (cleanups run, temporary files go), held where a step
must not be cut in two, and taken once: a second signal does not cut the
cleanup the first one started.
"""

from __future__ import annotations

import contextlib
import signal
import threading

# The signals a command ends on cleanly.
ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                       if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as an interrupt is so that every cleanup a
    Ctrl-C runs runs (found by review: `timeout`, systemd or docker ending a
    compress left its temporary file, exit 143 without a word); the command
    exits 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def interruption(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


# The signal an ending handler raised until the command takes its
# interruption (taken()): raised inside a garbage-collection callback or a
# __del__, an exception is printed and dropped, and the work went on (found
# by a flaky test: jax's gc callback took a SIGTERM, compress wrote its file
# and exited 0).
_pending: list[int] = []


def raise_pending() -> None:
    """Raises again an ending signal whose interruption was dropped; called
    before a step that cannot be undone (a file put in place)."""
    if _pending:
        raise interruption(_pending[0])


def taken() -> None:
    """The command has its interruption: nothing is pending any more."""
    _pending.clear()


def quiet_when_dropped(previous):
    """A sys.unraisablehook that says nothing of a pending interruption
    (raise_pending raises it again; Python printed its traceback), and
    passes anything else to ``previous``."""
    def hook(unraisable):
        if not (_pending and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            previous(unraisable)
    return hook


@contextlib.contextmanager
def held():
    """Ending signals held until the block ends, then each delivered to the
    handler it was held from (found by review: a Ctrl-C while jax imported
    crashed the process from C++, or was swallowed by a garbage-collection
    callback; one between an export's renames left old and new shards
    mixed). Only the main thread can hold signals; elsewhere the block just
    runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = {}

    def hold(signum, _):
        pressed.append(signum)

    try:
        # One at a time, each recorded before it is swapped: a signal already
        # waiting runs its handler inside signal.signal, which may raise, and
        # what was swapped must still be put back (found by review: a
        # raising handler left this one installed, Ctrl-C swallowed for good).
        # Not those whose handler was set outside Python: it could not be put
        # back (found by review: an embedding program's own handler was
        # replaced for good).
        for signum in ENDING_SIGNALS:
            handler = signal.getsignal(signum)
            if handler is not None:
                previous[signum] = handler
                signal.signal(signum, hold)
        yield
    finally:
        raised = _restore(previous)
        # each, repeats too, delivered as the handler held back would have, the
        # later ones also where an earlier one raises (found by review: a
        # caller's own handler was bypassed; one after another was lost)
        try:
            _deliver_all([(signum, previous[signum]) for signum in pressed])
        finally:
            if raised is not None:
                raise raised


def _restore(previous: dict) -> BaseException | None:
    """Every handler of ``previous`` put back, even where a signal arriving
    meanwhile runs a handler that raises (each swap is retried); the first
    such exception, returned."""
    raised = None
    for signum, handler in previous.items():
        while True:
            try:
                signal.signal(signum, handler)
                break
            except BaseException as e:   # a waiting signal's handler ran, and raised
                raised = raised or e
    return raised


def _deliver_all(signals: list) -> None:
    if signals:
        try:
            deliver(*signals[0])
        finally:
            _deliver_all(signals[1:])


def deliver(signum: int, handler) -> None:
    """Signal ``signum`` handled by ``handler`` (as signal.getsignal gives it)."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)
    # SIG_IGN, or None (not set from Python): dropped


def ending_handler(result: list):
    """The command's handler of ENDING_SIGNALS: the first raises its
    interruption; the second is ignored, so that the cleanup the first
    started runs to its end (found by review: a second SIGTERM 3 ms after the
    first left 200 MB of temporary shards); a third ends the process at once
    (a cleanup stalled on a store that stopped answering). Once ``result``
    holds the command's exit status, a signal ends the process with it."""
    import os
    seen = []
    _pending.clear()   # a new command's

    def handle(signum, frame):
        if result:
            os._exit(result[0])
        seen.append(signum)
        if len(seen) == 1:
            _pending.append(signum)
            raise interruption(signum)
        if len(seen) > 2:
            os._exit(128 + seen[0])
    return handle
