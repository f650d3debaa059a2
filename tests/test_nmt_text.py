"""fairseq NMT family: dictionaries, the moses + subword-nmt text pipeline, and the end-to-end CLI
(convert a fairseq folder -> build -> run translates text and matches FSMT token for token)."""
from __future__ import annotations

import json

import pytest

from _nmt_helpers import (CORPUS, build_dictionary, learn_bpe_codes, tiny_fsmt,
                          write_fairseq_folder)
from encdec_core.errors import ConfigError


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("nmt-text")
    codes = learn_bpe_codes(d, CORPUS, num_symbols=60)
    dict_path, n = build_dictionary(d, CORPUS, codes, "en")
    (d / "dict.de.txt").write_text(dict_path.read_text(encoding="utf-8"), encoding="utf-8")  # joined dictionary
    return d, n


def test_dictionary_file_semantics(tmp_path):
    from encdec_nmt.text import Dictionary

    p = tmp_path / "dict.en.txt"
    p.write_text("the 10\nhouse 5\n<unk> 3 #fairseq:overwrite\nend@@ 1\n")
    d = Dictionary.load(p)
    assert d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (d.index("the"), d.index("house"), d.index("end@@")) == (4, 5, 7)
    assert d.index("<unk>") == 6  # an overwrite entry takes the new id, as in fairseq
    assert d.index("never-seen") == 3
    assert d.encode_line("the house  zebra") == [4, 5, 3, 2]
    assert d.string([2, 4, 1, 5, 0, 2]) == "the house"
    d.pad_to_multiple(8)
    assert len(d) == 8  # already a multiple of 8
    d.pad_to_multiple(16)
    assert len(d) == 16 and d.symbols[8] == "madeupword0000" and d.symbols[-1] == "madeupword0007"
    bad = tmp_path / "bad.txt"
    bad.write_text("the 10\nhouse five\n")
    with pytest.raises(ConfigError, match=r"bad\.txt: line 2 .* not an integer"):
        Dictionary.load(bad)
    dup = tmp_path / "dup.txt"
    dup.write_text("the 1\nthe 2\n")
    with pytest.raises(ConfigError, match="duplicate token 'the'"):
        Dictionary.load(dup)


def test_pipeline_encode_decode(assets):
    from encdec_nmt.text import load_tokenizer

    d, n = assets
    assert n % 8 == 0
    lines = (d / "dict.en.txt").read_text(encoding="utf-8").splitlines()
    ids_of = {line.rsplit(" ", 1)[0]: i + 4 for i, line in enumerate(lines)}
    assert any(w.startswith("madeupword") for w in ids_of)
    tok = load_tokenizer(d, None)
    assert (tok.pad_token_id, tok.eos_token_id) == (1, 2)
    text = "The house is wonderful."
    pieces = tok.apply_bpe(tok.tokenize(text)).split()
    assert pieces[-1] == "." and pieces[0].startswith("The")
    ids = tok.encode([text])[0]
    assert ids == [ids_of[p] for p in pieces] + [2]
    assert 3 not in ids
    # a word the corpus never had is split into BPE pieces ending in '@@'
    rare = tok.apply_bpe(tok.tokenize("housecats")).split()
    assert len(rare) > 1 and all(p.endswith("@@") for p in rare[:-1])
    # back: ids (with start/pad/eos around) -> text, BPE joined, moses detokenized
    assert tok.decode([2] + ids[:-1] + [2, 1, 1]) == text
    assert tok.decode(tok.encode(["Houses, cats and dogs are wonderful!"])[0]) == "Houses, cats and dogs are wonderful!"
    # moses escaping and unknown characters
    amp = tok.encode(["cats & dogs"])[0]
    assert 3 in amp  # '&amp;' is not in this dictionary
    assert tok.decode(tok.encode(["the river"])[0]) == "the river"


def test_tokenizer_checks_model_vocab(assets):
    from encdec_core.config import EncDecConfig
    from encdec_nmt.text import load_tokenizer

    d, n = assets
    cfg = EncDecConfig(family="nmt", vocab_size=n + 8, d_model=8, encoder_layers=1, decoder_layers=1,
                       encoder_heads=1, decoder_heads=1, head_dim=8, encoder_ffn_dim=8, decoder_ffn_dim=8,
                       extra={"source_lang": "en", "target_lang": "de"})
    tok = load_tokenizer(d, cfg)
    assert len(tok.tgt_dict) == n + 8  # padded with madeupword entries up to the embedding rows
    small = cfg.replace(vocab_size=n - 8)
    with pytest.raises(ConfigError, match="entries"):
        load_tokenizer(d, small)


def test_convert_build_run_translates(builtin_registry, tmp_path, assets, capsys):
    """`encdec convert --model-dir <fairseq folder>` -> build -> run: text through moses + BPE and back,
    beam 4 token ids equal to FSMT built with the same weights (--compare-hf)."""
    from encdec_core.cli import main

    d, n = assets
    fs = tiny_fsmt(seed=21, src_vocab=n, tgt_vocab=n, tie=True)
    src_dir = write_fairseq_folder(tmp_path / "wmt-tiny", fs, d)
    ck, eng = tmp_path / "ckpt", tmp_path / "engine"
    assert main(["convert", "--model-dir", str(src_dir), "--output-dir", str(ck), "--quiet"]) == 0
    meta = json.loads((ck / "config.json").read_text())
    assert meta["family"] == "nmt" and meta["model"]["shared_embeddings"]
    assert meta["model"]["extra"]["bpe"] == "subword_nmt"
    assert all((ck / f).is_file() for f in ("dict.en.txt", "dict.de.txt", "bpecodes"))
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng), "--max-batch-size", "4",
                 "--max-input-len", "32", "--max-output-len", "16", "--max-beam-width", "4"]) == 0
    out_json = tmp_path / "out.json"
    capsys.readouterr()
    rc = main(["run", "--engine-dir", str(eng), "--input-text", "The house is wonderful.",
               "Is the river cold in the winter?", "--num-beams", "4", "--max-output-len", "10", "--compare-hf",
               "--device", "cpu", "--output-json", str(out_json)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out_json.read_text())["results"]
    assert [r["match"] for r in res] == [True, True]
    assert all(isinstance(r["output"][0], str) and r["output"][0] for r in res)
    # the printed text is the detokenized decode of the ids
    from encdec_nmt.text import load_tokenizer

    from encdec_core.config import EncDecConfig

    cfg = EncDecConfig.from_dict(meta["model"])
    tok = load_tokenizer(ck, cfg)
    assert res[0]["output"][0] == tok.decode(res[0]["ids"][0])
    assert "@@" not in res[0]["output"][0] and len(res[1]["ids"][0]) > 0
    # --tokenizer-dir may be the fairseq folder itself (dictionaries chosen by the checkpoint's languages)
    texts = ["The house is wonderful.", "Is the river cold in the winter?"]
    assert load_tokenizer(src_dir, cfg).encode(texts) == tok.encode(texts)
    assert all(3 not in x for x in tok.encode(texts))


def _fsmt_tokenizer_files(folder):
    """A tiny character-level FSMT tokenizer (vocab-src/tgt.json, merges.txt) saved into ``folder``."""
    import string

    from transformers import FSMTTokenizer

    toks = ["<s>", "<pad>", "</s>", "<unk>", "th", "the</w>"]
    for c in string.ascii_letters + string.digits + ".,!?'":
        toks += [c, c + "</w>"]
    vocab = json.dumps({t: i for i, t in enumerate(toks)})
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab-src.json", "vocab-tgt.json"):
        (folder / name).write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text("t h\nth e</w>\n", encoding="utf-8")
    tok = FSMTTokenizer(langs=["en", "de"], src_vocab_file=str(folder / "vocab-src.json"),
                        tgt_vocab_file=str(folder / "vocab-tgt.json"), merges_file=str(folder / "merges.txt"))
    tok.save_pretrained(folder)
    return len(toks)


def test_fsmt_folder_cli_with_its_tokenizer(builtin_registry, tmp_path, capsys):
    """An FSMT folder (facebook/wmt19 layout) through the same family: convert -> build -> run, the
    FSMT tokenizer files travel with the checkpoint, beam 4 ids equal FSMT's."""
    from encdec_core.cli import main
    from encdec_nmt.text import FSMTTextTokenizer, load_tokenizer

    src_dir = tmp_path / "wmt19-tiny"
    n = _fsmt_tokenizer_files(src_dir)
    tiny_fsmt(seed=4, src_vocab=n, tgt_vocab=n).save_pretrained(src_dir)
    ck, eng = tmp_path / "ckpt", tmp_path / "engine"
    assert main(["convert", "--model-dir", str(src_dir), "--output-dir", str(ck), "--quiet"]) == 0
    assert (ck / "vocab-src.json").is_file() and (ck / "merges.txt").is_file()
    tok = load_tokenizer(ck, None)
    assert isinstance(tok, FSMTTextTokenizer)
    ids = tok.encode(["the cat."])[0]
    assert ids[-1] == 2 and 3 not in ids and ids[0] == 5  # 'the</w>' from the merges
    assert main(["build", "--checkpoint-dir", str(ck), "--output-dir", str(eng), "--max-batch-size", "2",
                 "--max-input-len", "32", "--max-output-len", "8", "--max-beam-width", "4"]) == 0
    capsys.readouterr()
    out_json = tmp_path / "out.json"
    rc = main(["run", "--engine-dir", str(eng), "--input-text", "the cat.", "--num-beams", "4",
               "--max-output-len", "6", "--compare-hf", "--device", "cpu", "--output-json", str(out_json)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out_json.read_text())["results"]
    assert res[0]["match"] and res[0]["output"][0] == tok.decode(res[0]["ids"][0])


def test_convert_refuses_missing_target_dictionary_or_bpecodes(builtin_registry, tmp_path, assets, capsys):
    """fairseq loads dict.<source_lang>.txt, dict.<target_lang>.txt and (subword-nmt BPE) bpecodes from
    the model folder: convert refuses a folder without one, naming the folder and the file, and never
    reads the source dictionary for the target side."""
    import shutil

    from _nmt_helpers import fairseq_state_from_fsmt, fsmt_options, write_fairseq_checkpoint
    from encdec_core.cli import main
    from encdec_nmt.text import load_tokenizer

    d, n = assets
    fs = tiny_fsmt(seed=3, src_vocab=n, tgt_vocab=n, tie=True, enc_layers=1, dec_layers=1)
    good = tmp_path / "good"
    write_fairseq_checkpoint(good / "model.pt", fairseq_state_from_fsmt(fs), fsmt_options(fs, bpe="subword_nmt"))
    for name in ("dict.en.txt", "dict.de.txt", "bpecodes"):
        shutil.copy(d / name, good / name)

    def refused(folder, *words):
        out = tmp_path / f"ck-{folder.name}"
        capsys.readouterr()
        assert main(["convert", "--model-dir", str(folder), "--output-dir", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"{folder}: missing" in err and all(w in err for w in words), err
        assert "Traceback" not in err and not out.exists()

    no_tgt = tmp_path / "no-tgt"
    shutil.copytree(good, no_tgt)
    (no_tgt / "dict.de.txt").unlink()
    refused(no_tgt, "dict.de.txt", "target language 'de'", "found: dict.en.txt")
    no_src = tmp_path / "no-src"
    shutil.copytree(good, no_src)
    (no_src / "dict.en.txt").unlink()
    refused(no_src, "dict.en.txt", "source language 'en'")
    no_codes = tmp_path / "no-codes"
    shutil.copytree(good, no_codes)
    (no_codes / "bpecodes").unlink()
    refused(no_codes, "bpecodes", "bpe='subword_nmt'")
    # the tokenizer (build / run of an older checkpoint) refuses the same folders
    from encdec_core.convert import load_source_model

    cfg = load_source_model(good, reg=builtin_registry)[1].config
    with pytest.raises(ConfigError, match=r"missing dict\.de\.txt"):
        load_tokenizer(no_tgt, cfg)
    with pytest.raises(ConfigError, match=rf"{no_codes}: missing bpecodes"):
        load_tokenizer(no_codes, cfg)
    # the complete folder converts
    assert main(["convert", "--model-dir", str(good), "--output-dir", str(tmp_path / "ck"), "--quiet"]) == 0
