"""Launched by tests/test_lora.py: mpirun -n 2 python lora_parity.py ROOT OUT.

Run-time LoRA across ranks: for TP = 2 and PP = 2 (parallel_common.MAPPINGS[2]) and every model of
ROOT/lora_models.json, load this rank's shard and its slices of the adapters' factors, and write
parallel_common.lora_run_all's results to OUT/rank{r}.pt (the test compares them with one rank's)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel_common as pc  # noqa: E402

import torch  # noqa: E402

from encdec_core.parallel.launch import detect_launch, init_parallel, load_parallel_model, shutdown  # noqa: E402


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    info = detect_launch()
    names = json.loads((root / "lora_models.json").read_text())
    results = {}
    for tp, pp in pc.MAPPINGS[info.world_size]:
        ctx = init_parallel(tp, pp, "cpu", timeout=90)
        for name in names:
            ckpt = root / f"lora-{pc.ckpt_name(name, tp, pp)}"
            model = load_parallel_model(ckpt, ctx)
            pc.load_lora_bank(model, ckpt)
            results[f"{name}-tp{tp}pp{pp}"] = pc.lora_run_all(model)
        shutdown()
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"results": results}, out / f"rank{info.rank}.pt")


if __name__ == "__main__":
    main()
