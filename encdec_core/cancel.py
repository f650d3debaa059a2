"""Stopping a long call between its batches: ``encdec serve`` cancels the work of a request whose
client has closed its connection.

``Engine.generate_ids`` and ``Engine.score_ids`` run more requests than the engine's max batch size
in batches; before each batch they call ``check()``, which raises ``Cancelled`` once the callable
given to the innermost ``cancel_when`` block of this thread (a context variable) returns true."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

from .errors import EncDecError


class Cancelled(EncDecError):
    """The call was cancelled before it ended (serve: its client closed the connection)."""


_CHECK: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("encdec_cancel", default=None)


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
    return bool(stop is not None and stop())


def check() -> None:
    if requested():
        raise Cancelled("cancelled before its next batch (serve: the client closed its connection)")
