"""TP=2 / PP=2 (and TP=2 x PP=2 on 4) over NCCL against the single-GPU run, on tiny random models.

The multi-GPU form of tests/test_parallel.py: converts the tiny T5 (v1.0, Flan-style) and BART models
of tests/mpi_scripts/parallel_common.py for every mapping, runs the single-rank reference on one
device in this process, launches ``torchrun --nproc-per-node N tests/mpi_scripts/parity.py`` and
compares every rank's teacher-forced logits (fp32, max|diff|), greedy KV-cache loop, greedy, beam
and sampled ids with the reference.

    PYTHONPATH=.:families python benchmarks/multi_gpu_parity.py --nproc 2 [--device cuda] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "mpi_scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_families  # noqa: E402

import parallel_common as pc  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2, choices=sorted(pc.MAPPINGS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tol", type=float, default=1e-4, help="fp32 logits bar (GPU reduction orders differ)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ensure_families()
    from encdec_core.checkpoint import load_model

    work = Path(tempfile.mkdtemp(prefix="encdec-mgpu-"))
    names = pc.prepare(work / "ckpt", other=False)
    ref = {n: pc.run_all(load_model(work / "ckpt" / pc.ckpt_name(n, 1, 1), device=a.device)) for n in names}
    env = dict(os.environ, ENCDEC_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "families"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           str(SCRIPTS / "parity.py"), str(work / "ckpt"), str(work / "out"), "--device", a.device]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    print(r.stdout[-3000:])
    if r.returncode != 0:
        print(r.stderr[-6000:])
        return 1
    rows, ok = [], True
    for rank in range(a.nproc):
        data = torch.load(work / "out" / f"rank{rank}.pt")
        for tp, pp in pc.MAPPINGS[a.nproc]:
            fact = data["facts"][f"tp{tp}pp{pp}"]
            for name in names:
                got, want = data["results"][f"{name}-tp{tp}pp{pp}"], ref[name]
                row = dict(rank=rank, tp=tp, pp=pp, model=name, backend=fact["backend"], device=fact["device"])
                for k, v in want.items():
                    if k not in got and pp > 1 and k in pc.STATIC_KEYS:
                        continue  # the static step serves TP only
                    if v.is_floating_point():
                        row[f"{k}_maxdiff"] = (got[k] - v).abs().max().item()
                        ok &= row[f"{k}_maxdiff"] <= a.tol
                    else:
                        row[f"{k}_equal"] = bool(torch.equal(got[k], v))
                        ok &= row[f"{k}_equal"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(a.out, f"multi_gpu_parity_n{a.nproc}.json"), "w") as f:
        json.dump({"ok": ok, "rows": rows, "gpus": torch.cuda.device_count()}, f, indent=1)
    print("ALL EQUAL" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
