"""``encdec serve`` for a tensor- / pipeline-parallel engine, launched by mpirun or torchrun.

Rank 0 runs the HTTP server and its scheduler, exactly as a one-process server does. Every model call
the scheduler makes (a generate batch, a stream, a score) is first sent to the other ranks (``Leader``),
which make the same call with the same arguments on their part of the model (``follow``), so the
collectives inside the calls meet. A request that fails on rank 0 fails the same way on the others (same
inputs, same checks), and each rank goes on to the next call.

A client that leaves stops its work between batches, or between the steps of a stream. Such a decision
is rank 0's alone, so it is sent to every rank at each point where one is asked
(``cancel.set_agreement``): all ranks stop at the same batch or step.

Messages go over a gloo group of all ranks (also where the model's collectives use NCCL), with no time
limit: a follower waits for the next request as long as the server runs. Rank 0 ends the followers with
a last message when the server stops; if rank 0 dies instead, the launcher ends the job, and a rank
whose launcher is gone (a SIGKILL to mpirun reaches no rank) exits within seconds.
"""
from __future__ import annotations

import datetime
from typing import Callable, Iterator

import torch

from ..errors import EncDecError

# a follower waits between requests as long as the server runs (a process group's default is minutes)
IDLE_TIMEOUT = datetime.timedelta(days=365)
STOP = None  # the message that ends the followers


class Channel:
    """Rank 0 -> every rank: call messages (pickled objects) and stop decisions (one int)."""

    def __init__(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise EncDecError("serving on several ranks needs torch.distributed started (launch with mpirun or "
                              "torchrun, as for encdec run)")
        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        # collective over the world: every rank creates it, at the same point
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def send(self, msg) -> None:
        self.dist.broadcast_object_list([msg], src=0, group=self.group)

    def recv(self):
        box = [None]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree(self, stop: bool) -> bool:
        """Rank 0's ``stop`` on every rank (the others' own is not used)."""
        t = torch.tensor([int(stop)], dtype=torch.int32)
        self.dist.broadcast(t, src=0, group=self.group)
        return bool(t.item())


def _call_kwargs(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != "runner"}  # each rank calls with its own runner


class Leader:
    """Rank 0's engine, as the scheduler sees it: each model call is sent to the other ranks, then made.
    Everything else (limits, config, tokenizer, ...) is the engine's own."""

    def __init__(self, engine, channel: Channel):
        self._engine, self._channel = engine, channel

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, texts, runner=None, **kw):
        self._channel.send(("generate", (texts,), _call_kwargs(kw)))
        return self._engine.generate(texts, runner=runner, **kw)

    def score(self, sources, targets, **kw):
        self._channel.send(("score", (sources, targets), _call_kwargs(kw)))
        return self._engine.score(sources, targets, **kw)

    def generate_stream(self, texts, runner=None, **kw) -> Iterator:
        self._channel.send(("stream", (texts,), _call_kwargs(kw)))
        return _StartedStream(self._engine.generate_stream(texts, runner=runner, **kw))

    def stop_followers(self) -> None:
        self._channel.send(STOP)


class _StartedStream:
    """A stream that runs even if it is closed before its first event: the followers run theirs from
    the message on, and stop only at a step where rank 0's stream stops with them."""

    def __init__(self, inner):
        self.inner, self.started = inner, False

    def __iter__(self):
        return self

    def __next__(self):
        self.started = True
        return next(self.inner)

    def close(self) -> None:
        if not self.started:
            self.started = True
            try:
                next(self.inner)  # starts the work; closing it now stops it at its next step, on every rank
            except (StopIteration, EncDecError):
                pass
        self.inner.close()


def watch_launcher(rank: int, log: Callable[[str], None], interval: float = 2.0) -> None:
    """End this rank once its launcher (mpirun's prterun, torchrun's agent: the parent process) is gone.
    A SIGKILL to the launcher reaches no rank, and a serving rank would run on as an orphan: rank 0
    still listening, the others waiting for rank 0 without a time limit."""
    import os
    import threading
    import time

    parent = os.getppid()

    def run():
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                try:  # the launcher held this rank's stdout / stderr: writing may fail now
                    log(f"rank {rank}: the launcher (pid {parent}) is gone; exiting")
                except Exception:  # noqa: BLE001
                    pass
                os._exit(1)

    threading.Thread(target=run, name="encdec-launcher-watch", daemon=True).start()


def follow(engine, runner, channel: Channel, log: Callable[[str], None]) -> None:
    """A follower's loop: make each call rank 0 announces, until rank 0 says stop."""
    from .. import cancel

    watch_launcher(channel.rank, log)
    cancel.set_agreement(channel.agree)
    try:
        while True:
            msg = channel.recv()
            if msg is STOP:
                return
            kind, args, kw = msg
            try:
                if kind == "generate":
                    engine.generate(*args, runner=runner, **kw)
                elif kind == "stream":
                    for _ in engine.generate_stream(*args, runner=runner, **kw):
                        pass
                elif kind == "score":
                    engine.score(*args, **kw)
                else:
                    raise EncDecError(f"unknown call {kind!r} from rank 0")
            except EncDecError:
                pass  # rank 0 meets the same error with the same inputs and answers its client
            except Exception as exc:  # noqa: BLE001 (rank 0 answers; this rank tells what it saw and goes on)
                log(f"rank {channel.rank}: {kind} failed here: {type(exc).__name__}: {exc}")
    finally:
        cancel.set_agreement(None)


def lead(channel: Channel, log: Callable[[str], None]) -> None:
    """Rank 0's side of the stop agreement (the follower side is set in ``follow``); rank 0 too ends
    with its launcher."""
    from .. import cancel

    watch_launcher(channel.rank, log)
    cancel.set_agreement(channel.agree)
