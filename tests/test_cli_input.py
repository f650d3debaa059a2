"""The CLI's text input and its exits: input files split at "\\n" only, command-line text that is not
UTF-8, SIGTERM unwinding through the atomic outputs, and the text API's option names."""
from __future__ import annotations

import argparse
import os
import signal

import pytest

from encdec_core import cli
from encdec_core.errors import EncDecError


def _args(**kw):
    return argparse.Namespace(**{"input_text": None, "input_file": None, **kw})


@pytest.mark.parametrize("sep", ["\u2028", "\x0c", "\x85", "\x1c", "\x0b", "\r"])
def test_input_file_lines_split_at_newlines_only(tmp_path, sep):
    """str.splitlines splits at these too: the output file would get more lines than the input."""
    f = tmp_path / "in.txt"
    f.write_bytes(f"spell: 12{sep}spell: 7\r\n\nspell: 9\n".encode())
    assert cli._read_inputs(_args(input_file=str(f)), keep_blank=True) == [f"spell: 12{sep}spell: 7", "", "spell: 9"]
    assert cli._read_inputs(_args(input_file=str(f))) == [f"spell: 12{sep}spell: 7", "spell: 9"]
    assert cli.text_lines("a\nb") == ["a", "b"] and cli.text_lines("a\n\n") == ["a", ""] and cli.text_lines("") == []


def test_blank_input_file_is_named(tmp_path):
    f = tmp_path / "blank.txt"
    f.write_text("\n  \n\n")
    with pytest.raises(EncDecError, match=rf"--input-file {f}: no text \(expected one input per line\)"):
        cli._read_inputs(_args(input_file=str(f)))


@pytest.mark.parametrize("argv, flag", [
    (["run", "--input-text", "spell: 5\udcff"], "--input-text"),
    (["run", "--input-text", "ok", "x\udce9y", "--device", "cpu"], "--input-text (value 2)"),
    (["score", "--source-text", "a", "--target-text", "\udcc3"], "--target-text"),
])
def test_command_line_text_that_is_not_utf8_is_refused(capsys, argv, flag):
    """Bytes that are not UTF-8 reach Python as lone surrogates; they failed inside the tokenizer."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"encdec: error: {flag}: not UTF-8 text (byte 0x" in err and "internal error" not in err, err


def test_sigterm_removes_the_half_written_output(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's time limit) unwinds like Ctrl-C: exit 143 and no temporary directory left
    beside the output (it was left, half-written, before)."""
    from encdec_core.fsutil import atomic_dir

    out = tmp_path / "ck"

    def fake_convert(args):
        with atomic_dir(out, "--output-dir") as tmp:
            (tmp / "rank0.safetensors").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(cli, "cmd_convert", fake_convert)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["convert", "--model-dir", str(tmp_path), "--output-dir", str(out)]) == 143
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before  # restored for the embedding program


def test_text_calls_name_their_own_options():
    """generate(output_scores=True), an HF habit, was a TypeError from deep inside."""
    from encdec_core.engine import _text_api_names

    with pytest.raises(EncDecError, match=r"generate: output_scores = True .* with texts use return_scores=True"):
        _text_api_names("generate", {"output_scores": True, "num_beams": 2})
    with pytest.raises(EncDecError, match=r"decoder_prefix = \[5\] .*target_prefix"):
        _text_api_names("generate_stream", {"decoder_prefix": [5]})
    _text_api_names("generate", {"num_beams": 2})


def test_api_text_with_a_lone_surrogate_is_named():
    from encdec_core.engine import _check_texts
    from encdec_core.scoring import check_texts

    with pytest.raises(EncDecError, match=r"generate: texts\[1\]: character 3 is U\+D800, a lone surrogate"):
        _check_texts(["fine", "abc\ud800"])
    with pytest.raises(EncDecError, match=r"score: targets\[0\]: character 0 is U\+DCFF"):
        check_texts(["a"], ["\udcff"])


def test_a_closed_stdout_ends_quietly(monkeypatch, capsys):
    """`encdec list-families --json | head -1`: the reader leaves, writing fails with EPIPE; that was
    "encdec: error: BrokenPipeError" and exit 2."""
    def listing(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_list_families", listing)
    assert cli.main(["list-families"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, words", [
    (["run", "--input-file", "{d}/in.txt", "--output-file", "{d}/in.txt"],
     "--output-file {d}/in.txt: the same file as --input-file"),
    (["run", "--input-file", "{d}/in.txt", "--output-file", "{d}/o.txt", "--output-json", "{d}/./o.txt"],
     "--output-json {d}/./o.txt: the same file as --output-file {d}/o.txt"),
    (["score", "--source-file", "{d}/in.txt", "--target-file", "{d}/in.txt", "--output-json", "{d}/in.txt"],
     "--output-json {d}/in.txt: the same file as --source-file"),
])
def test_an_output_file_that_is_an_input_or_another_output_is_refused(tmp_path, capsys, argv, words):
    """--output-file equal to --input-file replaced the inputs with the outputs; two outputs on one
    path kept only the last. Refused before any work."""
    (tmp_path / "in.txt").write_text("spell: 5\n")
    rc = cli.main([a.format(d=tmp_path) for a in argv])
    assert rc == 2 and words.format(d=tmp_path) in capsys.readouterr().err
    assert (tmp_path / "in.txt").read_text() == "spell: 5\n"


def test_sampling_options_without_sampling_get_a_note(capsys):
    """--temperature / --top-k / --top-p without --sampling changed nothing, without a word (HF warns)."""
    assert cli.main(["run", "--input-text", "spell: 5", "--temperature", "0.5", "--top-k", "3"]) == 0
    out = capsys.readouterr()
    assert "note: --temperature, --top-k apply to sampling only (add --sampling); this run decodes greedily" in out.err
    assert "Output: five" in out.out
    assert cli.main(["run", "--input-text", "spell: 5", "--temperature", "0.5", "--sampling", "--random-seed", "1"]) == 0
    assert "note" not in capsys.readouterr().err


def test_a_cache_folder_that_cannot_hold_the_bundled_engine_is_named(tmp_path, monkeypatch, capsys):
    """ENCDEC_CACHE on a file was reported as a --output-dir the user never gave."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("ENCDEC_CACHE", str(tmp_path / "afile"))
    assert cli.main(["run", "--input-text", "spell: 5"]) == 2
    assert f"ENCDEC_CACHE {tmp_path / 'afile'}: cannot hold the bundled model's engine" in capsys.readouterr().err


def test_every_command_line_text_runs_an_empty_one_too(tmp_path, capsys):
    """An --input-text "" is translated as Engine.generate([""]) translates it (it was dropped without
    a word); a file's blank lines stay skipped, or kept as empty output lines with --output-file."""
    assert cli._read_inputs(_args(input_text=[""])) == [""]
    assert cli.main(["run", "--input-text", "", "spell: 5", "--output-json", str(tmp_path / "o.json")]) == 0
    import json

    rows = json.loads((tmp_path / "o.json").read_text())["results"]
    assert [r["input"] for r in rows] == ["", "spell: 5"] and rows[1]["output"] == ["five"]
    assert len(rows[0]["input_ids"]) >= 1
    f = tmp_path / "in.txt"
    f.write_text("spell: 7\n\nspell: 9\n")
    capsys.readouterr()
    assert cli.main(["run", "--input-file", str(f), "--output-file", str(tmp_path / "out.txt")]) == 0
    assert (tmp_path / "out.txt").read_text() == "seven\n\nnine\n"


def test_compare_hf_keeps_a_generated_pad_and_cuts_at_the_first_eos():
    """HF's rows are cut as GenerationOutput.tokens cuts ours: a pad the model generated (no EOS: the
    length limit ended the row) is an output token; after the first EOS past the prefix only padding follows."""
    from types import SimpleNamespace

    gc = SimpleNamespace(eos_token_id=[1, 5], pad_token_id=0)
    assert cli._strip([0, 7, 7, 0], gc) == [7, 7, 0]  # no EOS: every token, the generated pad too
    assert cli._strip([0, 7, 1, 0, 0], gc) == [7]
    assert cli._strip([0, 7, 0, 5, 0], gc) == [7, 0]
    assert cli._strip([0, 5, 8, 1, 0], gc, prefix_len=1) == [5, 8]  # an EOS inside the prefix is not the end


def test_encdec_debug_shows_where_a_user_error_was_raised(monkeypatch, tmp_path, capsys):
    """ENCDEC_DEBUG=1: the traceback before the one-line error, for errors of input too (the docs say it
    shows tracebacks; it did for internal errors only); without it, the one line alone."""
    argv = ["run", "--engine-dir", str(tmp_path / "nope"), "--input-text", "x"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("encdec: error: ")
    monkeypatch.setenv("ENCDEC_DEBUG", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("encdec: error: ")


def test_inductor_autotune_tables_are_quiet_unless_debugging(monkeypatch):
    """The compiled CPU runner's max-autotune wrote ~45 lines of timing tables to stderr per run, and
    (torch >= 2.10) "Autotune Choices Stats" JSON blocks through another switch."""
    import torch._inductor.config as ic
    import torch._inductor.select_algorithm as sa

    from encdec_core.runtime.cuda.runner import _quiet_autotune

    monkeypatch.setattr(sa, "PRINT_AUTOTUNE", True)
    monkeypatch.setattr(ic, "max_autotune_report_choices_stats", True, raising=False)
    monkeypatch.setenv("ENCDEC_DEBUG", "1")
    _quiet_autotune()
    assert sa.PRINT_AUTOTUNE is True and ic.max_autotune_report_choices_stats is True
    monkeypatch.delenv("ENCDEC_DEBUG")
    _quiet_autotune()
    assert sa.PRINT_AUTOTUNE is False and ic.max_autotune_report_choices_stats is False
