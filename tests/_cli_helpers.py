"""Tiny HF model folders for CLI / pipeline tests (random weights, fixed seed, no downloads)."""
from __future__ import annotations

from pathlib import Path

import torch


def make_t5_dir(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random T5 with a ByT5 tokenizer (bytes; needs no vocabulary files)."""
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    kw = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=32, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1, feed_forward_proj="relu")
    kw.update(overrides)
    model = T5ForConditionalGeneration(T5Config(**kw)).eval()
    path = Path(path)
    model.save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


def make_t5_engine(tmp: Path, max_batch_size: int, max_output_len: int, max_beam_width: int = 2,
                   max_input_len: int = 32) -> Path:
    """A tiny T5 engine built through the CLI (convert + build) under ``tmp``, with the built-in
    families registered for the duration (a module-scoped fixture's engine)."""
    from conftest import fill_builtin_registry
    from encdec_core.cli import main

    registry = fill_builtin_registry()
    try:
        src = make_t5_dir(Path(tmp) / "hf-t5")
        ck, eng = Path(tmp) / "ckpt", Path(tmp) / "engine"
        assert main(["convert", "--model-dir", str(src), "--output-dir", str(ck), "--quiet"]) == 0
        assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng),
                     "--max-batch-size", str(max_batch_size), "--max-input-len", str(max_input_len),
                     "--max-output-len", str(max_output_len), "--max-beam-width", str(max_beam_width)]) == 0
    finally:
        registry.reset()
    return eng
