"""init_parallel / detect_launch / verify_checkpoint without a launcher (one process, fast).

The multi-rank runs (mpirun, torchrun) are in test_parallel.py and test_parallel_cli.py.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "mpi_scripts"))
import parallel_common as pc  # noqa: E402

from encdec_core.checkpoint import load_model  # noqa: E402
from encdec_core.errors import ConfigError, EncDecError  # noqa: E402
from encdec_core.parallel import ParallelContext  # noqa: E402
from encdec_core.parallel import launch  # noqa: E402
from encdec_core.parallel.launch import (LaunchError, agree, detect_launch, init_parallel, is_rank0,  # noqa: E402
                                         shutdown, verify_checkpoint)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
               "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
               "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMI_SIZE")


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for v in LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)
    yield
    shutdown()


@pytest.fixture(scope="module")
def t5_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("par-unit")
    pc.prepare(root, mappings=((1, 1), (2, 1)), other=False, only=("t5",))
    return root


# ---------------------------------------------------------------------------- launcher detection
def test_detect_launch_variants():
    assert detect_launch({}) == launch.LaunchInfo("none", 0, 1, 0, 1)
    t = detect_launch({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "LOCAL_RANK": "1",
                       "LOCAL_WORLD_SIZE": "2"})
    assert (t.launcher, t.rank, t.world_size, t.local_rank, t.local_world_size) == ("torchrun", 3, 4, 1, 2)
    o = detect_launch({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (o.launcher, o.rank, o.world_size, o.local_rank) == ("mpi", 1, 2, 1)
    p = detect_launch({"PMI_RANK": "2", "PMI_SIZE": "4"})
    assert (p.launcher, p.rank, p.world_size, p.local_rank) == ("mpi", 2, 4, 2)
    with pytest.raises(LaunchError, match="OMPI_COMM_WORLD_RANK = 'x'"):
        detect_launch({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="rank 5, world size 2"):
        detect_launch({"PMI_RANK": "5", "PMI_SIZE": "2"})


def test_rank_mapping_is_trtllm():
    """rank = pp_rank * tp + tp_rank: tp groups are consecutive ranks, pp groups stride by tp."""
    tp, pp = 2, 3
    seen = set()
    for r in range(tp * pp):
        ctx = ParallelContext(tp_size=tp, pp_size=pp, rank=r,
                              pp_ranks=tuple(p * tp + r % tp for p in range(pp)))
        assert ctx.rank == ctx.pp_rank * tp + ctx.tp_rank
        assert ctx.tp_ranks == tuple(range(ctx.pp_rank * tp, ctx.pp_rank * tp + tp))
        assert ctx.pp_ranks[ctx.pp_rank] == r
        seen.add((ctx.tp_rank, ctx.pp_rank))
    assert len(seen) == tp * pp
    assert [list(ParallelContext(pp_size=3, rank=s).layer_range(7)) for s in range(3)] == \
        [[0, 1, 2], [3, 4], [5, 6]]


# ---------------------------------------------------------------------------- init without a launcher
def test_single_process_needs_no_torch_distributed():
    ctx = init_parallel(1, 1, "cpu")
    assert ctx.world_size == 1 and not ctx.distributed and ctx.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    assert is_rank0()
    assert init_parallel(1, 1, "cpu") is ctx  # idempotent
    with pytest.raises(LaunchError, match="already ran"):
        init_parallel(1, 1, "cpu", force_collectives=True)


def test_world_mismatch_without_launcher():
    with pytest.raises(LaunchError) as ei:
        init_parallel(2, 2, "cpu")
    msg = str(ei.value)
    assert "1 rank(s)" in msg and "tp_size 2 x pp_size 2 = 4" in msg and "mpirun -n 4" in msg
    assert "torchrun --nproc-per-node 4" in msg


def test_world_mismatch_under_a_launcher():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "3"}
    with pytest.raises(LaunchError, match=r"3 rank\(s\) \(mpirun\).*= 2 rank\(s\); launch with mpirun -n 2"):
        init_parallel(2, 1, "cpu", env=env)


@pytest.mark.parametrize("tp,pp", [(0, 1), (1, -2), (1.5, 1), (True, 1)])
def test_bad_sizes(tp, pp):
    with pytest.raises(ConfigError, match="expected a positive integer"):
        init_parallel(tp, pp)


def test_bad_timeout_env(monkeypatch):
    monkeypatch.setenv("ENCDEC_DIST_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="ENCDEC_DIST_TIMEOUT = 'soon'"):
        init_parallel(1, 1)
    with pytest.raises(ConfigError, match="positive number of seconds"):
        launch.dist_timeout(0)


def test_bad_device():
    with pytest.raises(ConfigError, match="device = 'tpu'"):
        init_parallel(1, 1, "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LaunchError, match="CUDA is not available"):
            init_parallel(1, 1, "cuda")


def test_forced_collectives_world1_match_single_rank(t5_ckpts):
    """A process group of one rank whose hooks really call all_reduce / all_gather / broadcast
    (the path a single GPU runs with NCCL) gives exactly the single-rank results."""
    ref = pc.run_all(load_model(t5_ckpts / pc.ckpt_name("t5", 1, 1)))
    calls = []
    real = torch.distributed.all_reduce

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    ctx = init_parallel(1, 1, "cpu", force_collectives=True, timeout=60)
    try:
        assert ctx.distributed and torch.distributed.is_initialized()
        assert torch.distributed.get_backend() == "gloo"
        torch.distributed.all_reduce = counting
        try:
            model = launch.load_parallel_model(t5_ckpts / pc.ckpt_name("t5", 1, 1), ctx)
            got = pc.run_all(model)
        finally:
            torch.distributed.all_reduce = real
    finally:
        shutdown()
    assert not torch.distributed.is_initialized()
    assert calls, "forced collectives never reached torch.distributed"
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


# ---------------------------------------------------------------------------- checkpoint checks (one rank)
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_verify_checkpoint_single_rank(t5_ckpts, tmp_path):
    ck = t5_ckpts / pc.ckpt_name("t5", 1, 1)
    meta = verify_checkpoint(ck, ParallelContext())
    assert meta["mapping"]["tp_size"] == 1 and set(meta["shard_checksums"]) == {"0"}
    # the tp=2 checkpoint on a one-rank context
    with pytest.raises(LaunchError, match=r"sharded for tp=2 pp=1 \(world 2\) but this launch runs tp=1 pp=1"):
        verify_checkpoint(t5_ckpts / pc.ckpt_name("t5", 2, 1), ParallelContext())
    # rank 1's own checks of the tp=2 checkpoint (what it contributes to the all_gather)
    ctx1 = ParallelContext(tp_size=2, rank=1)

    def verify_rank1(d):
        return launch._check_local_shard(d, ctx1, None, True)

    assert verify_rank1(t5_ckpts / pc.ckpt_name("t5", 2, 1))["mapping"]["tp_size"] == 2
    bad = _copy(t5_ckpts / pc.ckpt_name("t5", 2, 1), tmp_path / "swapped")
    shutil.copy2(bad / "rank0.safetensors", bad / "rank1.safetensors")
    with pytest.raises(LaunchError, match="written for rank 0, not rank 1"):
        verify_rank1(bad)
    (bad / "rank1.safetensors").unlink()
    with pytest.raises(LaunchError, match="shard for rank 1 is missing"):
        verify_rank1(bad)
    (bad / "rank1.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LaunchError, match="not a valid safetensors file"):
        verify_rank1(bad)


def test_verify_checkpoint_detects_a_changed_shard(t5_ckpts, tmp_path):
    """Same tensor names and header, other values (another conversion): only the checksum tells."""
    from safetensors.torch import load_file, save_file

    ck = _copy(t5_ckpts / pc.ckpt_name("t5", 1, 1), tmp_path / "changed")
    t = load_file(str(ck / "rank0.safetensors"))
    t["shared.weight"] = t["shared.weight"] * 1.5
    save_file(t, str(ck / "rank0.safetensors"), metadata={"rank": "0"})
    with pytest.raises(LaunchError, match="sha256 .* does not match .*another conversion"):
        verify_checkpoint(ck, ParallelContext())
    verify_checkpoint(ck, ParallelContext(), checksums=False)  # the explicit opt-out
    meta = json.loads((ck / "config.json").read_text())
    meta["mapping"] = "two"
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="field 'mapping' = 'two'"):
        verify_checkpoint(ck, ParallelContext())


def test_agree_single_process_passes_through():
    assert agree(None, lambda: 3) == 3
    assert agree(ParallelContext(), lambda: 4) == 4
    with pytest.raises(EncDecError, match="boom"):
        agree(ParallelContext(), lambda: (_ for _ in ()).throw(EncDecError("boom")))


def test_status_roundtrip():
    t = launch._encode_status(False, "é" * 2000, None)
    ok, msg = launch._decode_status(t)
    assert not ok and msg.startswith("é") and len(msg.encode()) <= launch._STATUS_BYTES
    assert launch._decode_status(launch._encode_status(True, "", None)) == (True, "")


def test_init_for_dir(t5_ckpts):
    """The helper commands use: None for a one-rank checkpoint, a clear error for a sharded one run alone."""
    assert launch.init_for_dir(t5_ckpts / pc.ckpt_name("t5", 1, 1)) is None
    with pytest.raises(LaunchError, match=r"needs tp_size 2 x pp_size 1 = 2 rank\(s\); launch 2 ranks: `mpirun -n 2"):
        launch.init_for_dir(t5_ckpts / pc.ckpt_name("t5", 2, 1))
