"""Stopping a long call between its batches: ``encdec serve`` cancels the work of a request whose
client has closed its connection.

``Engine.generate_ids`` and ``Engine.score_ids`` run more requests than the engine's max batch size
in batches; before each batch they call ``check()``, which raises ``Cancelled`` once the callable
given to the innermost ``cancel_when`` block of this thread (a context variable) returns true.

Under tensor / pipeline parallelism every rank must stop at the same point, or the ranks that go on
wait in a collective forever. ``encdec serve`` on several ranks therefore installs one process-wide
``agreement`` (``set_agreement``): each stop decision (before a batch, and before each step of a
stream) is rank 0's, sent to the other ranks; the ranks make the same calls in the same order, so
they ask at the same points."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

from .errors import EncDecError


class Cancelled(EncDecError):
    """The call was cancelled before it ended (serve: its client closed the connection)."""


_CHECK: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("encdec_cancel", default=None)
# rank 0's decision for every rank: called with this rank's own, returns the one all ranks act on
_AGREE: Callable[[bool], bool] | None = None


def set_agreement(agree: Callable[[bool], bool] | None) -> None:
    """Make every stop decision of this process go through ``agree`` (None: each decides alone)."""
    global _AGREE
    _AGREE = agree


def agreed(stop: bool) -> bool:
    """``stop`` as all ranks decide it: this rank's own, or rank 0's where an agreement is set."""
    return stop if _AGREE is None else bool(_AGREE(bool(stop)))


@contextlib.contextmanager
def cancel_when(stop: Callable[[], bool]):
    """Within the block, batched calls stop before their next batch once ``stop()`` is true."""
    token = _CHECK.set(stop)
    try:
        yield
    finally:
        _CHECK.reset(token)


def requested() -> bool:
    stop = _CHECK.get()
    return agreed(bool(stop is not None and stop()))


def check() -> None:
    if requested():
        raise Cancelled("cancelled before its next batch (serve: the client closed its connection)")


def check_step() -> None:
    """A stream's check before each step (``Engine.generate_stream``: its reader has gone)."""
    if requested():
        raise Cancelled("cancelled before its next step (the stream's reader has gone)")
