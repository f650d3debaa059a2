"""The fused tensor-parallel all-reduce kernel (runtime/cuda/allreduce.py) on real GPUs: every call's
output must equal, bit for bit, ``residual_sum`` of the sum of every rank's partials (regenerated
here from the shared seed), eager and replayed from a CUDA graph, over many calls (the buffers'
parity alternation and the flags' hand-over), for 1..16 rows. Launch: torchrun --nproc-per-node N.
Prints one JSON line per rank (and, with FUSED_AR_OUT set to a folder, writes it to rank{r}.json there:
the launcher interleaves the ranks' stdout, so two lines can arrive as one); exit 1 on any difference or
a timed-out spin."""
import faulthandler
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "families")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from encdec_core.parallel.launch import init_parallel, shutdown  # noqa: E402
from encdec_core.runtime.cuda.allreduce import ResidualAllReduce  # noqa: E402
from encdec_core.runtime.cuda.fused import residual_sum  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2048


def _log(rank, *a):
    if os.environ.get("FUSED_AR_VERBOSE"):
        print(f"[{rank}]", *a, flush=True)


def main() -> int:
    faulthandler.dump_traceback_later(int(os.environ.get("FUSED_AR_DUMP_S", "240")), exit=True)
    ctx = init_parallel(int(os.environ["WORLD_SIZE"]), 1, "cuda")
    dev, rank, world = ctx.device, ctx.tp_rank, ctx.tp_size
    _log(rank, "init", dev)
    ar = ResidualAllReduce(ctx, N, 16)
    _log(rank, "buffers", ar.data_ptrs.tolist(), ar.flag_ptrs.tolist())
    bias = torch.randn(N, generator=torch.Generator().manual_seed(7)).to(dev, torch.bfloat16)
    bad, calls = 0, 0

    def case(i, m, dtype):
        """This rank's partial, the residual and the reference sum of every rank's partials."""
        g = torch.Generator().manual_seed(1000 + i)
        parts = [torch.randn(m, N, generator=g) * 3 for _ in range(world)]
        x = torch.randn(m, N, generator=g).to(dtype)
        return parts[rank].to(dev), x.to(dev), sum(parts[1:], parts[0]).to(dev)  # rank order

    # eager: every row count, both residual dtypes, with and without bias
    for i in range(96):
        m = 1 + i % 16
        dtype = torch.float32 if i % 3 == 0 else torch.bfloat16
        b = bias if i % 2 else None
        p, x, total = case(i, m, dtype)
        same = torch.equal(ar(p, x, b, dtype), residual_sum(x, total, b, None, dtype))
        if i < 3:
            _log(rank, "call", i, "errors", int(ar.errors.item()), "equal", same, "epoch", ar.epoch.tolist())
        calls += 1
        bad += int(not same)
    # a CUDA graph of 5 calls (odd: the parity must carry over between replays), replayed with new inputs
    m = 4
    p_s = torch.zeros(5, m, N, device=dev)
    x_s = torch.zeros(5, m, N, device=dev, dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for k in range(5):
            ar(p_s[k], x_s[k], bias, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    dist.barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [ar(p_s[k], x_s[k], bias, torch.bfloat16) for k in range(5)]
    for rep in range(40):
        refs = []
        for k in range(5):
            p, x, total = case(500 + rep * 5 + k, m, torch.bfloat16)
            p_s[k].copy_(p)
            x_s[k].copy_(x)
            refs.append(residual_sum(x, total, bias, None, torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        calls += 5
        bad += sum(int(not torch.equal(o, r)) for o, r in zip(outs, refs))
    err = int(ar.errors.item())
    line = json.dumps({"rank": rank, "calls": calls, "different": bad, "spin_timeouts": err})
    print(line, flush=True)
    if os.environ.get("FUSED_AR_OUT"):
        with open(os.path.join(os.environ["FUSED_AR_OUT"], f"rank{rank}.json"), "w") as f:
            f.write(line)
    shutdown()
    return 0 if bad == 0 and err == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
