#!/usr/bin/env python
"""`make demo`: convert -> build -> run on the bundled model, printing input, output and whether it is right.

The bundled model (encdec_core/assets/default) is a small byte-level T5 trained by tools/train_tiny.py on
number spelling: `spell: 4721` -> `four thousand seven hundred twenty-one`, `digits: nine hundred five` -> `905`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encdec_core.assets import spell_task  # noqa: E402

BUNDLED = ROOT / "encdec_core" / "assets" / "default"
WORK = ROOT / "out" / "demo"
INPUTS = ["spell: 4721", "spell: 90", "spell: 1215", "digits: nine hundred five",
          "digits: three thousand forty-two", "digits: seventeen"]


def encdec(*args: str) -> None:
    cmd = [sys.executable, "-m", "encdec_core.cli", *args]
    print("$ encdec " + " ".join(a if " " not in a else repr(a) for a in args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    if not (BUNDLED / "config.json").is_file():
        print(f"no bundled model at {BUNDLED}", file=sys.stderr)
        return 1
    ck, eng = WORK / "checkpoint", WORK / "engine"
    encdec("convert", "--model-dir", str(BUNDLED), "--output-dir", str(ck), "--dtype", "float32")
    encdec("build", "--checkpoint-dir", str(ck), "--output-dir", str(eng), "--max-batch-size", "16",
           "--max-input-len", "128", "--max-output-len", "64", "--max-beam-width", "4")
    res_file = WORK / "results.json"
    encdec("run", "--engine-dir", str(eng), "--device", "cpu", "--output-json", str(res_file),
           "--input-text", *INPUTS)
    results = json.loads(res_file.read_text())["results"]
    print("\ninput                              | output                                   | right?")
    ok = 0
    for r in results:
        out = r["output"][0]
        good = spell_task.check(r["input"], out)
        ok += good
        print(f"{r['input']:<34} | {out:<40} | {'yes' if good else 'NO (expected ' + spell_task.answer(r['input']) + ')'}")
    print(f"\n{ok}/{len(results)} correct")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
