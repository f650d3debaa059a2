"""Optional oracle: a tiny model trained with real fairseq (the ``fairseq-fixed`` fork, which installs on
Python 3.11) must translate exactly as ``fairseq-interactive`` does (beam 4, moses + subword-nmt).

Slow (fairseq-preprocess, fairseq-train and fairseq-interactive on CPU) and skipped unless fairseq
imports; ``make test`` never needs it. fairseq-fixed under torch >= 2.6 loads checkpoints only with
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (its own loader; encdec loads with weights_only=True).

Checked passing (2 variants, ~90 s) with fairseq-fixed 0.12.3.1 in a separate venv that sees the
project venv through a .pth file. Installing it: a plain ``pip install fairseq-fixed`` pulls a
multi-GB CUDA torch into its build environment (build requires ``torch>=1.10``) and torchaudio at
run time; instead ``pip install wheel cython`` then ``pip install --no-build-isolation --no-deps
fairseq-fixed`` (~15 min of compiling on a busy 2-core box) and ``pip install cffi hydra-core==1.3.2
omegaconf==2.3.0 regex sacrebleu bitarray scikit-learn``; run ``python -m pytest
tests/test_nmt_fairseq_slow.py -m slow`` with that venv's python.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _nmt_helpers import CORPUS, learn_bpe_codes
from conftest import make_registry

pytestmark = pytest.mark.slow

VARIANTS = {
    "post-ln-sinusoidal-shared": ["--share-all-embeddings"],
    "pre-ln-learned-lnemb": ["--share-decoder-input-output-embed", "--encoder-normalize-before",
                             "--decoder-normalize-before", "--encoder-learned-pos", "--decoder-learned-pos",
                             "--layernorm-embedding", "--activation-fn", "gelu"],
}


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else (shutil.which(name) or name)


def _run(args, cwd, stdin=None) -> str:
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, f"{args[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _prepare_data(d: Path) -> Path:
    from sacremoses import MosesTokenizer
    from subword_nmt.apply_bpe import BPE

    src = CORPUS * 4
    tgt = [" ".join(reversed(s.split())) for s in src]  # a learnable "translation"
    codes = learn_bpe_codes(d, src + tgt, num_symbols=80)
    tok = MosesTokenizer(lang="en")
    with open(codes, encoding="utf-8") as f:
        bpe = BPE(f, separator="@@")
    for lang, lines in (("en", src), ("de", tgt)):
        text = "\n".join(bpe.process_line(tok.tokenize(x, aggressive_dash_splits=True, return_str=True, escape=True))
                         for x in lines)
        (d / f"train.{lang}").write_text(text + "\n", encoding="utf-8")
    return codes


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_beam_output_equals_fairseq_interactive(tmp_path, variant):
    pytest.importorskip("fairseq")
    codes = _prepare_data(tmp_path)
    _run([_bin("fairseq-preprocess"), "--source-lang", "en", "--target-lang", "de", "--trainpref", "train",
          "--destdir", "data-bin", "--joined-dictionary", "--workers", "1"], tmp_path)
    _run([_bin("fairseq-train"), "data-bin", "--source-lang", "en", "--target-lang", "de", "--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2",
          "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
          "--decoder-ffn-embed-dim", "48", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
          "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
          "--max-tokens", "2048", "--max-update", "60", "--criterion", "cross_entropy", "--dropout", "0.0",
          "--cpu", "--save-dir", "ckpts", "--no-epoch-checkpoints", "--seed", "1", "--disable-validation",
          "--no-progress-bar", "--num-workers", "0", "--max-source-positions", "64", "--max-target-positions", "64",
          *VARIANTS[variant]], tmp_path)
    inputs = ["The house is wonderful.", "Is the river cold in the winter?", "My friend's house has a red door."]
    out = _run([_bin("fairseq-interactive"), "data-bin", "--path", "ckpts/checkpoint_last.pt", "--source-lang", "en",
                "--target-lang", "de", "--tokenizer", "moses", "--bpe", "subword_nmt", "--bpe-codes", str(codes),
                "--beam", "4", "--nbest", "1", "--cpu", "--buffer-size", "1"], tmp_path, "\n".join(inputs) + "\n")
    fairseq_out = {}
    for line in out.splitlines():
        if line.startswith("D-"):
            head, _score, text = line.split("\t", 2)
            fairseq_out[int(head[2:])] = text
    assert sorted(fairseq_out) == [0, 1, 2], out

    # encdec: the folder a fairseq user holds (model.pt + dict.*.txt + bpecodes)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tmp_path / "ckpts" / "checkpoint_last.pt", model_dir / "model.pt")
    for p in (tmp_path / "data-bin").glob("dict.*.txt"):
        shutil.copy(p, model_dir / p.name)
    shutil.copy(codes, model_dir / "bpecodes")

    import torch

    from encdec_core.convert import load_source_model
    from encdec_core.runtime.generation import GenerationConfig, generate

    reg = make_registry("encdec_nmt.plugin")
    model, src, fam = load_source_model(model_dir, reg=reg)
    assert (src.config.extra["source_lang"], src.config.extra["target_lang"]) == ("en", "de")
    tok = fam.tokenizer(model_dir, src.config)
    gc = GenerationConfig.from_model(model.cfg, src.generation_config, num_beams=4)
    for i, text in enumerate(inputs):  # fairseq-interactive ran one sentence per batch
        ids = torch.tensor([tok.encode([text])[0]])
        res = generate(model, ids, torch.ones_like(ids), gc)
        assert tok.decode(res.tokens(0)) == fairseq_out[i], (variant, text)
