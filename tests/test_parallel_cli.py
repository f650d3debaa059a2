"""`encdec run` multi-rank, end to end: mpirun and torchrun launches equal the single-rank run,
only rank 0 prints, and a launch of the wrong size fails on every rank with one line each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _mpi import MPIRUN, need_mpi

from encdec_core.cli import main

from _cli_helpers import make_t5_dir

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MPI_ARGS = ["--allow-run-as-root", "--oversubscribe"]
TEXTS = ["hello world", "a somewhat longer input sentence"]
RUN_ARGS = ["--input-text", *TEXTS, "--max-output-len", "10", "--num-beams", "3", "--device", "cpu"]


def run_args(root: Path) -> list:
    """Beam search, compared with HF fp32 on every run (so the JSON carries token ids)."""
    return [*RUN_ARGS, "--compare-hf", "--hf-model-dir", str(root / "hf")]

pytestmark = [pytest.mark.mpi]



def _encdec() -> list[str]:
    exe = BIN / "encdec"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "encdec_core.cli"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ENCDEC_DISABLE_PLUGIN_AUTOLOAD"}  # entry points on
    env.update(ENCDEC_DIST_TIMEOUT="90", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _launch(cmd, timeout=300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=_env(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(map(str, cmd))} hung (> {timeout}s):\n{exc.stdout}\n{exc.stderr}")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A tiny T5 (byte tokenizer) converted and built for tp1, tp2 and pp2, plus the single-rank output."""
    from encdec_core import registry
    from conftest import builtin_modules
    import importlib

    root = tmp_path_factory.mktemp("par-cli")
    hf = make_t5_dir(root / "hf")
    registry.reset()
    for m in builtin_modules():
        registry.register_plugin(importlib.import_module(m), name=m)
    try:
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            ck, en = root / f"ck{tp}{pp}", root / f"en{tp}{pp}"
            assert main(["convert", "--model-dir", str(hf), "--output-dir", str(ck), "--tp-size", str(tp),
                         "--pp-size", str(pp), "--quiet"]) == 0
            assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(en), "--max-batch-size", "4",
                         "--max-input-len", "64", "--max-output-len", "16", "--max-beam-width", "4"]) == 0
        assert main(["run", "--engine-dir", str(root / "en11"), *run_args(root), "--output-json",
                     str(root / "single.json")]) == 0
    finally:
        registry.reset()
    return root, json.loads((root / "single.json").read_text())["results"]


def _check(root: Path, r: subprocess.CompletedProcess, out: Path, single) -> None:
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(out.read_text())["results"]
    assert [row["ids"] for row in got] == [row["ids"] for row in single]
    assert got == single and all(row["match"] for row in got)  # and equal to HF fp32
    assert r.stdout.count("Input :") == len(TEXTS), r.stdout  # rank 0 prints, the others do not


@need_mpi
def test_mpirun_encdec_run_tp2_equals_single_rank(engines):
    root, single = engines
    out = root / "mpi-tp2.json"
    r = _launch([MPIRUN, *MPI_ARGS, "-n", "2", *_encdec(), "run", "--engine-dir", root / "en21",
                 *run_args(root), "--output-json", out])
    _check(root, r, out, single)


def test_torchrun_encdec_run_pp2_equals_single_rank(engines):
    root, single = engines
    out = root / "torchrun-pp2.json"
    r = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "encdec_core.cli", "run", "--engine-dir", root / "en12", *run_args(root),
                 "--output-json", out])
    _check(root, r, out, single)


@need_mpi
def test_mpirun_wrong_world_size_fails_on_every_rank(engines):
    root, _ = engines
    r = _launch([MPIRUN, *MPI_ARGS, "-n", "3", *_encdec(), "run", "--engine-dir", root / "en21", *RUN_ARGS],
                timeout=180)
    assert r.returncode != 0
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("encdec: error:")]
    assert len(errs) == 3, r.stderr
    assert all("this launch has 3 rank(s) (mpirun) but the mapping needs tp_size 2 x pp_size 1 = 2" in e
               for e in errs), errs
    assert "Traceback" not in r.stderr + r.stdout


@need_mpi
def test_mpirun_benchmark_preset_tp2_matches_hf(tmp_path):
    """encdec benchmark --preset ... --tp-size 2: each rank builds the preset from one seed (HF's
    initialisation with --compare-hf) and keeps its part; rank 0 compares with HF in the same run."""
    out = tmp_path / "bench.json"
    r = _launch([MPIRUN, *MPI_ARGS, "-n", "2", *_encdec(), "benchmark", "--preset", "t5-small", "--tp-size", "2",
                 "--device", "cpu", "--batch-size", "2", "--input-output-len", "12,6", "--repeats", "1",
                 "--warmup", "0", "--compare-hf", "--json", out, "--quiet"])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["environment"]["tp_size"] == 2 and res["environment"]["pp_size"] == 1
    rows = {row["system"]: row for row in res["rows"]}
    assert rows["encdec"]["tokens_per_s"] > 0 and rows["hf"]["token_match_vs_ours"] == 1.0


def test_benchmark_parallel_options_are_checked(tmp_path, capsys, builtin_registry):
    from encdec_core.cli import main as cli_main

    def fails(*argv) -> str:
        assert cli_main(["benchmark", *argv, "--device", "cpu"]) != 0
        return capsys.readouterr().err

    # an engine's mapping comes from its config.json
    assert "apply to --preset" in fails("--engine-dir", str(tmp_path), "--tp-size", "2")
    # the launch must have tp x pp ranks: a plain process has one
    assert "needs tp_size 2 x pp_size 1 = 2 rank(s)" in fails("--preset", "t5-small", "--tp-size", "2")
