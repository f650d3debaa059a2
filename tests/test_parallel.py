"""Tensor / pipeline parallel runs on gloo, launched by mpirun: equal to the single-rank run.

One module fixture converts tiny T5 (v1.0 and Flan-style) and BART models for tp1pp1, tp2pp1,
tp1pp2 and tp2pp2 and computes the single-rank reference in this process. Each launch runs one
script (tests/mpi_scripts) that checks several things and writes per-rank result files:

    mpirun -n 2: TP=2 and PP=2      mpirun -n 4: TP=2 x PP=2      mpirun -n 2: wrong launches

Bar: fp32 logits max|diff| <= 1e-5; greedy, beam and sampled token ids identical, on every rank.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from _mpi import mpirun, need_mpi
import torch

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "mpi_scripts"
sys.path.insert(0, str(SCRIPTS))
import parallel_common as pc  # noqa: E402

TOL = 1e-5

pytestmark = [pytest.mark.mpi]





@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from encdec_core.checkpoint import load_model

    root = tmp_path_factory.mktemp("parallel")
    names = pc.prepare(root)
    ref = {n: pc.run_all(load_model(root / pc.ckpt_name(n, 1, 1))) for n in names}
    return root, names, ref


def check_ranks(out: Path, world: int, names, ref) -> dict:
    assert pc.have_generation(), "runtime.generation is needed for greedy / beam / sampling parity"
    facts = {}
    for r in range(world):
        data = torch.load(out / f"rank{r}.pt")
        facts[r] = data["facts"]
        for tp, pp in pc.MAPPINGS[world]:
            for name in names:
                got = data["results"][f"{name}-tp{tp}pp{pp}"]
                want = ref[name]
                assert set(want) >= {"tf_logits", "loop_ids", "greedy_ids", "beam_ids", "sample_ids",
                                     *pc.STATIC_KEYS}
                # the static (CUDA graph runner) step serves TP, not PP
                assert set(got) == (set(want) if pp == 1 else set(want) - set(pc.STATIC_KEYS)), set(got)
                for k, v in want.items():
                    if k not in got:
                        continue
                    where = f"rank {r} {name} tp={tp} pp={pp} {k}"
                    assert got[k].shape == v.shape, where
                    if v.is_floating_point():
                        d = (got[k] - v).abs().max().item()
                        assert d <= TOL, f"{where}: max|diff| {d:.3g} > {TOL}"
                    else:
                        assert torch.equal(got[k], v), f"{where}: {got[k].tolist()} != {v.tolist()}"
    return facts


@need_mpi
def test_tp2_and_pp2_match_single_rank(prepared, tmp_path):
    root, names, ref = prepared
    assert {"t5", "flan-t5"} <= set(names)
    r = mpirun(2, sys.executable, SCRIPTS / "parity.py", root, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    facts = check_ranks(tmp_path, 2, names, ref)
    # TP=2: both ranks hold every layer; PP=2: layers split by stage (3 layers -> 2 + 1)
    assert [facts[r]["tp2pp1"]["tp_rank"] for r in (0, 1)] == [0, 1]
    assert facts[1]["tp2pp1"]["t5"]["enc_layers"] == [0, 1, 2]
    assert [facts[r]["tp1pp2"]["pp_rank"] for r in (0, 1)] == [0, 1]
    assert facts[0]["tp1pp2"]["t5"] == {"enc_layers": [0, 1], "dec_layers": [0, 1]}
    assert facts[1]["tp1pp2"]["t5"] == {"enc_layers": [2], "dec_layers": [2]}
    assert facts[0]["tp1pp2"]["launcher"] == "mpi" and facts[0]["tp1pp2"]["backend"] == "gloo"


@need_mpi
def test_tp2xpp2_four_ranks_match_single_rank(prepared, tmp_path):
    root, names, ref = prepared
    r = mpirun(4, sys.executable, SCRIPTS / "parity.py", root, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    facts = check_ranks(tmp_path, 4, names, ref)
    # rank = pp_rank * tp + tp_rank
    got = {r: (f["tp2pp2"]["tp_rank"], f["tp2pp2"]["pp_rank"], f["tp2pp2"]["pp_ranks"], f["tp2pp2"]["tp_ranks"])
           for r, f in facts.items()}
    assert got == {0: (0, 0, [0, 2], [0, 1]), 1: (1, 0, [1, 3], [0, 1]),
                   2: (0, 1, [0, 2], [2, 3]), 3: (1, 1, [1, 3], [2, 3])}


@need_mpi
def test_mpirun_world1_forced_collectives(prepared, tmp_path):
    """mpirun -n 1 through the same code (the single-GPU NCCL check runs this script with --device cuda).
    BART only (CI's time: each model runs twice here); test_parallel_launch checks T5's forced
    collectives in process, the two-rank launches every model."""
    root, names, ref = prepared
    r = mpirun(1, sys.executable, SCRIPTS / "parity.py", root, tmp_path, "--models", "bart")
    assert r.returncode == 0, r.stdout + r.stderr
    check_ranks(tmp_path, 1, ["bart"], ref)
    assert r.stdout.count("ids identical: True") == 1 and "bart: forced collectives" in r.stdout, r.stdout


@need_mpi
def test_wrong_launches_fail_on_every_rank(prepared, tmp_path):
    root, _, ref = prepared
    r = mpirun(2, sys.executable, SCRIPTS / "wrong_launch.py", root, tmp_path, timeout=240)
    log = r.stdout + r.stderr
    assert r.returncode != 0, log  # the last, uncaught case ends the launch
    recs = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    for k, rec in enumerate(recs):
        assert rec["world"].startswith("LaunchError: this launch has 2 rank(s) (mpirun)"), rec["world"]
        assert "= 4 rank(s); launch with mpirun -n 4" in rec["world"]
        assert "sharded for tp=1 pp=2" in rec["mapping"] and "ranks 0, 1:" in rec["mapping"]
        # one broken shard (rank 1's): both ranks raise, naming rank 1 and the file
        assert "failed on 1 of 2 rank(s): rank 1:" in rec["missing"], rec["missing"]
        assert "bad-missing/rank1.safetensors: shard for rank 1 is missing" in rec["missing"]
        assert "bad-foreign/rank1.safetensors: sha256" in rec["foreign"] and "another conversion" in rec["foreign"]
        assert "written for rank 0, not rank 1" in rec["renamed"]
        assert "ranks read different checkpoint configs" in rec["mixed"], rec["mixed"]
        assert rec["ok_ids"] == ref["t5"]["loop_ids"].tolist()  # the group still works afterwards
    assert isinstance(recs[0]["seed"], int) and recs[0]["seed"] == recs[1]["seed"]
    assert recs[0]["given_seed"] == recs[1]["given_seed"] == 5
    # every message is the same on both ranks (except where it names the rank's own checkpoint)
    for case in ("mapping", "missing", "foreign", "renamed"):
        assert recs[0][case] == recs[1][case], case
    assert log.count("shard for rank 1 is missing") >= 2, log  # the uncaught error, on both ranks
