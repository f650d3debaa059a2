"""The tensor-parallel all-reduce hook: ParallelContext routes small all-reduces to ``fast_allreduce``
(parallel/symm.py on CUDA), the runner's ``tp_allreduce`` option is checked, and on 2 GPUs the
symmetric-memory path gives the single-GPU ids (tests marked gpu; skipped below 2 GPUs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encdec_core.errors import EncDecError
from encdec_core.parallel.context import ParallelContext

ROOT = Path(__file__).resolve().parents[1]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


class _Fake:
    def __init__(self, limit):
        self.limit, self.calls = limit, 0

    def fits(self, x):
        return x.numel() <= self.limit

    def __call__(self, x):
        self.calls += 1
        return x * 2  # a new tensor, as the symmetric-memory op returns


def test_small_all_reduces_go_to_fast_allreduce(monkeypatch):
    import torch.distributed as dist

    fast = _Fake(limit=8)
    ctx = ParallelContext(tp_size=2, rank=0, fast_allreduce=fast)
    x = torch.ones(2, 4)
    y = ctx.all_reduce(x)
    assert fast.calls == 1 and torch.equal(y, x * 2) and torch.equal(x, torch.ones(2, 4))
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: seen.append(t.shape) or t.mul_(3))
    big = torch.ones(3, 4)
    assert torch.equal(ctx.all_reduce(big), torch.full((3, 4), 3.0)) and seen == [(3, 4)] and fast.calls == 1
    # tp 1: no collective at all
    assert ParallelContext(fast_allreduce=fast).all_reduce(x) is x and fast.calls == 1


def test_symm_allreduce_needs_cuda_and_tp():
    from encdec_core.parallel.symm import SymmAllReduce, enable_symm_allreduce

    assert enable_symm_allreduce(ParallelContext()) is False  # tp 1
    assert enable_symm_allreduce(ParallelContext(tp_size=2, device=torch.device("cpu"))) is False
    with pytest.raises(EncDecError, match="needs CUDA"):
        SymmAllReduce(None, "cpu")


def test_runner_checks_tp_allreduce(builtin_registry):
    from encdec_core.benchmark import model_from_preset
    from encdec_core.runtime.cuda import CudaGraphRunner

    model = model_from_preset("flan-t5-small", reg=builtin_registry)
    with pytest.raises(ValueError, match="tp_allreduce"):
        CudaGraphRunner(model, 2, 4, 16, use_graphs=False, compile=False, tp_allreduce="mpi")
    for kind in ("symm", "fused"):  # tp 1: nothing to set up
        r = CudaGraphRunner(model, 2, 4, 16, use_graphs=False, compile=False, tp_allreduce=kind)
        assert r.tp_allreduce == kind and model.ctx.fast_allreduce is None
    r = CudaGraphRunner(model, 2, 4, 16, use_graphs=False, compile=False)  # the default: auto
    assert r.tp_allreduce == "nccl" and model.ctx.fast_allreduce is None


def test_auto_allreduce_needs_cuda_peers(monkeypatch):
    """tp_allreduce="auto" picks symmetric memory only where this rank's GPU maps every other GPU of
    the host; on a CPU (or tp 1) it is NCCL / gloo without a collective."""
    from encdec_core.parallel.symm import choose_tp_allreduce, symm_memory_usable

    assert choose_tp_allreduce(ParallelContext()) == "nccl"
    cpu = ParallelContext(tp_size=2, device=torch.device("cpu"))
    assert choose_tp_allreduce(cpu) == "nccl" and "not CUDA" in symm_memory_usable(cpu)
    ctx = ParallelContext(tp_size=2, device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    why = symm_memory_usable(ctx)
    if why is not None and "torch build" in why:
        pytest.skip(why)
    assert "exceeds this host's 1 GPUs" in why
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: b != 3)
    assert "no peer access to GPU(s) [3]" in symm_memory_usable(ctx)
    assert symm_memory_usable(ctx, [0, 1]) is None  # the group's own GPUs only: 3 does not matter
    assert "no peer access to GPU(s) [3]" in symm_memory_usable(ctx, [3, 0])
    assert "not distinct" in symm_memory_usable(ctx, [0, 0])  # ranks that each see one GPU as 0
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: True)
    assert symm_memory_usable(ctx) is None


def test_fused_allreduce_needs_cuda_and_tp():
    from encdec_core.runtime.cuda.allreduce import ResidualAllReduce

    with pytest.raises(EncDecError, match="needs CUDA and tp >= 2"):
        ResidualAllReduce(ParallelContext(tp_size=2, device=torch.device("cpu")), 64)
    with pytest.raises(EncDecError, match="needs CUDA and tp >= 2"):
        ResidualAllReduce(ParallelContext(device=torch.device("cpu")), 64)


def _multi_gpu(tmp_path, *args) -> dict:
    # (the driver keeps NVLink multicast off for its ranks: multi_gpu.SAFE_ENV)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), *args, "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return json.loads(next(tmp_path.glob("multi_gpu_*.json")).read_text())


@pytest.mark.gpu
@TWO_GPUS
@pytest.mark.parametrize("allreduce,kernels", [("nccl", "auto"), ("symm", "auto"), ("nccl", "triton"),
                                               ("symm", "triton"), ("fused", "triton")])
def test_tp2_graph_runner_fp32_ids_equal_one_gpu(tmp_path, allreduce, kernels):
    """fp32 (reductions differ only in order): TP = 2 eager and graph runner ids equal one GPU's, with
    the compiled step or the Triton step (batch 8: every bucket but the beams' 32 rows)."""
    res = _multi_gpu(tmp_path, "parity", "--models", "flan-t5-small,bart-base", "--mappings", "1x1,2x1",
                     "--dtype", "float32", "--new", "12", "--allreduce", allreduce, "--kernels", kernels)
    assert res["ok"] and {r["tp"] for r in res["rows"]} == {2}
    assert all(r["graph_greedy"] and r["graph_beam"] for r in res["rows"])


@pytest.mark.gpu
@TWO_GPUS
def test_symm_allreduce_sums_in_graphs(tmp_path):
    res = _multi_gpu(tmp_path, "scale", "--model", "flan-t5-small", "--mappings", "2x1", "--batches", "1,8",
                     "--in-len", "64", "--out-len", "16", "--repeats", "1", "--allreduce", "symm")
    comm = res["allreduce_us"]["tp2"]
    assert all(comm[f"{k}_b{b}_sum_ok"] for k in ("nccl", "symm") for b in (1, 8)), comm


@pytest.mark.gpu
@TWO_GPUS
def test_fused_allreduce_kernel_equals_the_sum_of_partials(tmp_path):
    """runtime/cuda/allreduce.py on 2 GPUs: bit-identical to residual_sum of the ranks' summed
    partials, eager (1-16 rows, bf16 / fp32 residual, with and without bias) and from a CUDA graph
    of an odd number of calls replayed 40 times; no spin timed out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from multi_gpu import SAFE_ENV

    import os

    # each rank writes its result to a file: the launcher interleaves the ranks' stdout lines
    env = dict(os.environ, **{k: os.environ.get(k, v) for k, v in SAFE_ENV.items()}, FUSED_AR_OUT=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "mpi_scripts" / "fused_allreduce.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    out = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert r.returncode == 0 and len(out) == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert all(o["different"] == 0 and o["spin_timeouts"] == 0 and o["calls"] == 296 for o in out), out


def test_fused_allreduce_epilogue_at_world_one():
    """The fused all-reduce kernel's own arithmetic (no peer to exchange with: world 1), interpreted on
    the CPU: (partial + bias) added to the residual in fp32 with one rounding, for 1-16 rows and a
    width that is no multiple of the column block; every program's call parity advances. fp32 exact;
    bf16 within one bf16 step (the Triton interpreter truncates where the GPU rounds to nearest; on
    GPUs the kernel is bit-identical: test_fused_allreduce_kernel_equals_the_sum_of_partials)."""
    from encdec_core.runtime.cuda import allreduce as A
    from encdec_core.runtime.cuda.fused import residual_sum

    if not A.HAVE_TRITON:
        pytest.skip("triton is not installed")
    ar = object.__new__(A.ResidualAllReduce)  # the buffers by hand: symmetric memory needs CUDA
    n, rows = 300, 16
    ar.world, ar.rank, ar.n, ar.max_rows = 1, 0, n, rows
    ar.programs = -(-n // A.BLOCK_N)
    data = torch.zeros(2 * rows * n)
    flags = torch.zeros(2 * ar.programs, dtype=torch.int32)
    ar.data_ptrs = torch.tensor([data.data_ptr()], dtype=torch.int64)
    ar.flag_ptrs = torch.tensor([flags.data_ptr()], dtype=torch.int64)
    ar.epoch = torch.zeros(ar.programs, dtype=torch.int32)
    ar.errors = torch.zeros(1, dtype=torch.int32)
    ar.pdl, ar.timeout_ns = False, 10**9
    g = torch.Generator().manual_seed(0)
    calls = 0
    for m in (1, 3, 16):
        for dt in (torch.float32, torch.bfloat16):
            for with_bias in (True, False):
                p = torch.randn(m, n, generator=g) * 3
                x = torch.randn(m, n, generator=g).to(dt)
                b = torch.randn(n, generator=g).to(torch.bfloat16) if with_bias else None
                got, want = ar(p, x, b, dt), residual_sum(x, p, b, None, dt)
                calls += 1
                assert got.dtype == dt and got.shape == (m, n)
                if dt == torch.float32:
                    assert torch.equal(got, want)
                else:
                    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2.0 ** -7)
    assert ar.epoch.tolist() == [calls] * ar.programs and int(ar.errors) == 0
    assert not data.any() and not flags.any()  # nothing pushed or signalled without peers
    with pytest.raises(ValueError, match="partial fp32"):
        ar(torch.zeros(17, n), torch.zeros(17, n), None, torch.float32)  # more rows than the buffers hold


def _choose_on_rank(rank, init_file, verdicts, out_dir):
    import torch.distributed as dist

    from encdec_core.parallel import symm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    seen = []

    def usable(ctx, peers=None):  # this rank's verdict; the exchange is what is under test
        seen.append(list(peers))
        return verdicts[rank]

    symm.symm_memory_usable = usable
    ctx = ParallelContext(tp_size=2, rank=rank, tp_group=dist.group.WORLD, device=torch.device("cuda", 1 - rank))
    choice = symm.choose_tp_allreduce(ctx)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"choice": choice, "peers": seen}))
    dist.destroy_process_group()


@pytest.mark.parametrize("verdicts,want", [((None, None), "fused"), ((None, "no peer access"), "nccl")])
def test_auto_allreduce_ranks_agree(tmp_path, verdicts, want):
    """choose_tp_allreduce's exchange (2 CPU ranks, gloo, devices named cuda:1 / cuda:0): every rank
    checks its peer access to the group's devices in rank order, and one rank that cannot map its
    peers makes every rank take NCCL."""
    import torch.multiprocessing as mp

    mp.spawn(_choose_on_rank, args=(str(tmp_path / "init"), verdicts, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["choice"] for g in got] == [want, want]
    assert [g["peers"] for g in got] == [[[1, 0]], [[1, 0]]]


def test_fused_allreduce_timeout_variable(monkeypatch):
    """ENCDEC_AR_TIMEOUT_S: seconds a program waits for a peer; anything but a positive number is named."""
    from encdec_core.errors import ConfigError
    from encdec_core.runtime.cuda.allreduce import TIMEOUT_S, _timeout_ns

    monkeypatch.delenv("ENCDEC_AR_TIMEOUT_S", raising=False)
    assert _timeout_ns() == int(TIMEOUT_S * 1e9)
    monkeypatch.setenv("ENCDEC_AR_TIMEOUT_S", "2.5")
    assert _timeout_ns() == 2_500_000_000
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv("ENCDEC_AR_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="ENCDEC_AR_TIMEOUT_S"):
            _timeout_ns()
