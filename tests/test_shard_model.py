"""checkpoint.shard_model / rank_tensors: a rank's part of an in-memory model equals the shard that
``convert`` writes for the same mapping; benchmarks/multi_gpu.py's driver on CPU ranks (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encdec_core.benchmark import model_from_preset
from encdec_core.checkpoint import load_rank_tensors, shard_model, write_checkpoint
from encdec_core.errors import ConfigError, EncDecError
from encdec_core.parallel.context import ParallelContext

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_shard_model_equals_the_written_shards(tmp_path, tp, pp, builtin_registry):
    full = model_from_preset("flan-t5-small", seed=3, reg=builtin_registry)
    write_checkpoint(tmp_path / "ck", full.cfg, full.state_dict(), torch.float32, tp=tp, pp=pp)
    for rank in range(tp * pp):
        ctx = ParallelContext(tp_size=tp, pp_size=pp, rank=rank)
        part = shard_model(full, ctx)
        want = load_rank_tensors(tmp_path / "ck", rank)
        got = part.state_dict()
        assert set(got) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k], v), (rank, k)
        assert part.ctx is ctx and not part.training
        assert list(part.decoder.layer_ids) == list(ctx.layer_range(full.cfg.decoder_layers))


def test_shard_model_checks_its_input(builtin_registry):
    full = model_from_preset("flan-t5-small", seed=3, reg=builtin_registry)
    with pytest.raises(ConfigError, match="does not divide"):
        shard_model(full, ParallelContext(tp_size=5, rank=0))  # 6 heads
    part = shard_model(full, ParallelContext(tp_size=2, rank=1))
    with pytest.raises(EncDecError, match="single-rank"):
        shard_model(part, ParallelContext(tp_size=2, rank=0))


def test_first_diff():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from multi_gpu import first_diff, parse_mappings

    a = torch.tensor([[0, 5, 6, 7], [0, 1, 2, 3], [0, 9, 9, 9]])
    b = torch.tensor([[0, 5, 6, 7], [0, 1, 4, 3], [1, 9, 9, 9]])
    assert first_diff(a, b) == [None, 2, 0]
    assert first_diff(a[:, :3], a) == [3, 3, 3]  # a shorter row differs where it ends
    assert parse_mappings("2x1,1x2") == [(1, 1), (2, 1), (1, 2)]
    with pytest.raises(SystemExit):
        parse_mappings("2-1")


def test_multi_gpu_script_on_cpu_ranks(tmp_path):
    """The driver launches torchrun per mapping (gloo on CPU) and compares with the 1x1 run: the
    eager runner under TP and PP, the static (graph runner) step under TP, every rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "parity", "--device", "cpu",
           "--dtype", "float32", "--models", "flan-t5-small", "--mappings", "1x1,2x1,1x2", "--batch", "2",
           "--new", "4", "--beams", "2", "--min-in", "5", "--max-in", "12", "--out", str(tmp_path), "--timeout", "300"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ALL EQUAL" in r.stdout
    res = json.loads((tmp_path / "multi_gpu_parity.json").read_text())
    rows = {(x["tp"], x["pp"], x["rank"]): x for x in res["rows"]}
    assert set(rows) == {(2, 1, 0), (2, 1, 1), (1, 2, 0), (1, 2, 1)}
    for (tp, pp, _), x in rows.items():
        assert x["eager_greedy"] is True and x["eager_beam"] is True
        assert x["tf_logits_maxdiff"] < 1e-4
        if pp == 1:
            assert x["graph_greedy"] is True and x["graph_beam"] is True
        else:
            assert "graph_greedy" not in x


def _parity_results(gap_at_diff: float, tp_logit_shift: float, score_shift: float = 0.0,
                    fp32_offset: float | None = None):
    """Synthetic 1x1 and 2x1 parity results: row 1 of the greedy ids differs from position 2.
    fp32_offset: the one-GPU run also holds fp32 logits, its own bf16 logits minus this offset."""
    ids = torch.tensor([[0, 5, 6, 7], [0, 1, 2, 3]])
    other = torch.tensor([[0, 5, 6, 7], [0, 1, 9, 3]])
    logits = torch.linspace(-4, 4, 2 * 3 * 10).view(2, 3, 10)
    gap = torch.full((2, 3), 0.5)
    gap[1, 1] = gap_at_diff
    ref = {"m": {"tf_logits": logits, "eager_greedy": ids, "eager_greedy_gap": gap, "eager_beam": ids}}
    got = {"m": {"tf_logits": logits + tp_logit_shift, "eager_greedy": other, "eager_beam": other,
                 "eager_greedy_score": torch.zeros(2), "eager_greedy_ref_score": torch.zeros(2),
                 "eager_beam_score": torch.zeros(2), "eager_beam_ref_score": torch.full((2,), score_shift)}}
    if fp32_offset is not None:
        ref["m"].update(tf_logits_fp32=logits - fp32_offset, eager_greedy_fp32=other)
    return {(1, 1): [ref], (2, 1): [got, got]}


@pytest.mark.parametrize("gap,shift,score,dtype,verdict", [
    (0.01, 0.01, 0.0, "bfloat16", "EQUAL EXCEPT AT NEAR-TIES"),  # the greedy flip was a near-tie
    (0.5, 0.01, 0.0, "bfloat16", "FAILED"),  # a clear winner changed: not noise
    (0.01, 0.01, 1.0, "bfloat16", "FAILED"),  # the beam's sequences score far apart
    (0.01, 2.0, 0.0, "bfloat16", "FAILED"),  # logits moved by half their scale: a wrong shard
    (0.01, 0.01, 0.0, "float32", "FAILED"),  # fp32 must be identical
])
def test_parity_verdict(tmp_path, capsys, gap, shift, score, dtype, verdict):
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from multi_gpu import _report

    a = argparse.Namespace(cmd="parity", dtype=dtype, out=str(tmp_path))
    rc = _report(a, _parity_results(gap, shift, score), True)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith(verdict), out
    assert rc == (0 if verdict != "FAILED" else 1)
    res = json.loads((tmp_path / "multi_gpu_parity.json").read_text())
    assert res["ok"] is False and res["rows"][0]["eager_greedy_first_diff"] == [None, 2]
    assert res["near_ties_only"] is (verdict != "FAILED")


@pytest.mark.parametrize("shift,offset,verdict", [
    # fp32 = one GPU's bf16 logits + 1.0 (a chaotic random model); TP's = one GPU's + 2.0, i.e. 1.0
    # from fp32 on the other side: ids changed where the winner was clear, yet TP is as exact as one GPU
    (2.0, -1.0, "AS CLOSE TO FP32 AS ONE GPU"),
    (-2.0, -1.0, "FAILED"),  # TP's logits 3.0 from fp32: further than one GPU's bf16 noise (a wrong shard)
    (2.0, None, "FAILED"),  # no fp32 yardstick: a clear winner changed
])
def test_parity_verdict_against_fp32(tmp_path, capsys, shift, offset, verdict):
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from multi_gpu import _report

    a = argparse.Namespace(cmd="parity", dtype="bfloat16", out=str(tmp_path))
    rc = _report(a, _parity_results(0.5, shift, 0.0, fp32_offset=offset), True)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith(verdict), out
    assert rc == (0 if verdict != "FAILED" else 1)
    res = json.loads((tmp_path / "multi_gpu_parity.json").read_text())
    row = res["rows"][0]
    assert res["noise_only"] is (verdict != "FAILED") and res["near_ties_only"] is False
    if offset is not None:
        assert row["one_gpu_vs_fp32_mean"] == pytest.approx(abs(offset))
        assert row["tf_vs_fp32_mean"] == pytest.approx(abs(shift + offset))
        assert row["one_gpu_greedy_rows_equal_fp32"] == "1/2"


def test_parity_verdict_needs_ranks_that_agree(tmp_path, capsys):
    """A near-tie difference does not excuse two ranks of one launch returning different ids."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from multi_gpu import _report

    res = _parity_results(0.01, 0.01)
    other_rank = {"m": dict(res[(2, 1)][0]["m"])}
    other_rank["m"]["eager_beam"] = torch.tensor([[0, 5, 6, 8], [0, 1, 9, 3]])
    res[(2, 1)] = [res[(2, 1)][0], other_rank]
    a = argparse.Namespace(cmd="parity", dtype="bfloat16", out=str(tmp_path))
    assert _report(a, res, True) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "FAILED"
