"""Launched by tests/test_parallel.py with mpirun -n 2: wrong launches must fail on every rank.

Each case runs on every rank; its EncDecError message (or "OK") is recorded in OUT/rank{r}.json.
Cases after init_parallel(2, 1) go through verify_checkpoint, whose status all_gather makes every
rank raise, including ranks whose own shard is fine. The last case is not caught: the launch must
end non-zero on both ranks, without hanging.
"""
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel_common as pc  # noqa: E402

from encdec_core.errors import EncDecError  # noqa: E402
from encdec_core.parallel.launch import detect_launch, init_parallel, load_parallel_model, shutdown  # noqa: E402


def bad_copies(root: Path) -> dict:
    """Rank 0 builds the broken checkpoints once (before any rank reads them)."""
    good = root / pc.ckpt_name("t5", 2, 1)
    other = root / pc.ckpt_name("t5-other", 2, 1)
    dirs = {k: root / f"bad-{k}" for k in ("missing", "foreign", "renamed")}
    for d in dirs.values():
        if not d.exists():
            shutil.copytree(good, d)
    (dirs["missing"] / "rank1.safetensors").unlink(missing_ok=True)
    shutil.copy2(other / "rank1.safetensors", dirs["foreign"] / "rank1.safetensors")
    shutil.copy2(good / "rank0.safetensors", dirs["renamed"] / "rank1.safetensors")
    return dirs


def main(root: Path, out: Path) -> None:
    from mpi4py import MPI

    info = detect_launch()
    rank = info.rank
    if rank == 0:
        dirs = bad_copies(root)
    MPI.COMM_WORLD.Barrier()  # test plumbing only: the broken files exist before anyone reads them
    dirs = {k: root / f"bad-{k}" for k in ("missing", "foreign", "renamed")}
    rec = {}

    def case(name, fn):
        try:
            fn()
            rec[name] = "OK"
        except EncDecError as exc:
            rec[name] = f"{type(exc).__name__}: {exc}"

    case("world", lambda: init_parallel(2, 2, "cpu", timeout=60))  # 2 ranks launched, 4 needed
    ctx = init_parallel(2, 1, "cpu", timeout=60)
    case("mapping", lambda: load_parallel_model(root / pc.ckpt_name("t5", 1, 2), ctx))
    for k, d in dirs.items():
        case(k, lambda d=d: load_parallel_model(d, ctx))
    # every rank's own shard is valid, but the ranks point at different conversions
    mixed = root / pc.ckpt_name("t5" if rank == 0 else "t5-other", 2, 1)
    case("mixed", lambda: load_parallel_model(mixed, ctx))
    # after all that the group still works
    model = load_parallel_model(root / pc.ckpt_name("t5", 2, 1), ctx)
    ids, mask = pc.inputs()
    rec["ok_ids"] = pc.greedy_loop(model, ids, mask)[0].tolist()
    rec["seed"], rec["given_seed"] = ctx.shared_seed(), ctx.shared_seed(5)  # ranks agree on a sampling seed
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(rec, indent=1))
    shutdown()
    ctx = init_parallel(2, 1, "cpu", timeout=60)
    load_parallel_model(dirs["missing"], ctx)  # not caught: both ranks must exit non-zero


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
