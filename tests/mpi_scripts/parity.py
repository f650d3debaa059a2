"""Launched by tests/test_parallel.py: mpirun -n W python parity.py ROOT OUT [--device cuda] [--models A,B].

For every (tp, pp) with tp * pp == W (parallel_common.MAPPINGS) and every prepared model (or those
named by --models): start the ranks with init_parallel, load this rank's shard (verify + load),
compute teacher-forced logits, a greedy KV-cache loop and greedy / beam / sampling generate. Each
rank writes OUT/rank{r}.pt; the test compares every rank's results with the single-rank reference.

With W == 1 the run uses force_collectives (a process group of one rank whose hooks still call
all_reduce / all_gather / broadcast: the NCCL path on one GPU) and also stores the plain
single-rank results of the same process under "ref" (so a GPU run checks itself).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel_common as pc  # noqa: E402

import torch  # noqa: E402

from encdec_core.checkpoint import load_model  # noqa: E402
from encdec_core.parallel.launch import detect_launch, init_parallel, load_parallel_model, shutdown  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--models", default=None, help="comma-separated subset of ROOT/models.json (default: all)")
    args = ap.parse_args()
    info = detect_launch()
    names = json.loads((args.root / "models.json").read_text())
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"--models: {unknown} not in {args.root / 'models.json'} ({names})")
        names = [n for n in names if n in wanted]
    results, facts = {}, {}
    t0 = time.time()
    force = info.world_size == 1
    for tp, pp in pc.MAPPINGS[info.world_size]:
        ctx = init_parallel(tp, pp, args.device, timeout=args.timeout, force_collectives=force)
        key = f"tp{tp}pp{pp}"
        facts[key] = {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank,
                      "pp_ranks": list(ctx.pp_ranks), "tp_ranks": list(ctx.tp_ranks),
                      "launcher": ctx.extra.get("launcher"), "backend": ctx.extra.get("backend"),
                      "device": str(ctx.device)}
        for name in names:
            model = load_parallel_model(args.root / pc.ckpt_name(name, tp, pp), ctx)
            facts[key][name] = {"enc_layers": model.encoder.layer_ids, "dec_layers": model.decoder.layer_ids}
            results[f"{name}-{key}"] = pc.run_all(model)
            if force:
                single = load_model(args.root / pc.ckpt_name(name, 1, 1), device=ctx.device)
                results[f"{name}-ref"] = pc.run_all(single)
        shutdown()
    facts["seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"results": results, "facts": facts}, args.out / f"rank{info.rank}.pt")
    if force:  # print a verdict for runs without the pytest side (a GPU box)
        for name in names:
            a, b = results[f"{name}-tp1pp1"], results[f"{name}-ref"]
            d = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
            same = all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
            print(f"{name}: forced collectives vs single rank on {ctx.device}: max|dlogits| {d:.3g}, "
                  f"ids identical: {same}", flush=True)


if __name__ == "__main__":
    main()
