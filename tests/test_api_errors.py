"""Bad input through the Python API (Engine, generate, registry, convert) ends in an EncDecError that
names the argument, the value and what was expected, never in a traceback from inside torch."""
from __future__ import annotations

import pytest
import torch

from _cli_helpers import make_t5_dir
from conftest import make_registry

pytest.importorskip("transformers")

from encdec_core.convert import convert  # noqa: E402
from encdec_core.engine import Engine, build  # noqa: E402
from encdec_core.errors import ConfigError, EncDecError, LimitError  # noqa: E402
from encdec_core.registry import RegistryError  # noqa: E402
from encdec_core.runtime.generation import GenerationConfig, generate  # noqa: E402


@pytest.fixture(scope="module")
def reg():
    return make_registry("encdec_t5.plugin", "encdec_lora.plugin")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, reg):
    tmp = tmp_path_factory.mktemp("apierr")
    src = make_t5_dir(tmp / "hf")
    ck = convert(src, tmp / "ck", reg=reg)
    eng = build(ck, tmp / "eng", max_batch_size=4, max_input_len=32, max_output_len=16, max_beam_width=4)
    return src, eng


@pytest.fixture(scope="module")
def engine(dirs):
    return Engine.load(dirs[1])


def _raises(exc, words, fn, *a, **kw):
    with pytest.raises(exc) as ei:
        fn(*a, **kw)
    msg = str(ei.value)
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("kw, words", [
    (dict(device="gpu"), ["device = 'gpu'", "cpu, cuda"]),
    (dict(device=None), ["device = None"]),
])
def test_load_bad_device(dirs, kw, words):
    _raises(EncDecError, words, Engine.load, dirs[1], **kw)


@pytest.mark.parametrize("dtype", [16, torch.int32, torch.float64])
def test_load_bad_dtype(dirs, dtype):
    _raises(ConfigError, [f"dtype = {dtype!r}", "float16"], Engine.load, dirs[1], dtype=dtype)


def test_load_bad_path():
    _raises(EncDecError, ["engine directory = None", "expected a path"], Engine.load, None)


@pytest.mark.parametrize("texts, words", [
    (None, ["texts = None"]), (b"abc", ["texts = b'abc'"]),
    ([1, 2], ["texts[0] = 1", "generate_ids"]), (["a", None], ["texts[1] = None"]),
])
def test_generate_bad_texts(engine, texts, words):
    _raises(EncDecError, words, engine.generate, texts, max_new_tokens=2)


def test_generate_bad_target_lang_and_tokenizer_dir(engine):
    _raises(EncDecError, ["target language = 5"], engine.generate, ["a"], target_lang=5, max_new_tokens=2)
    _raises(EncDecError, ["code(s) [5]"], engine.generate, ["a"], target_lang=[5], max_new_tokens=2)
    _raises(EncDecError, ["tokenizer_dir = 5"], engine.generate, ["a"], tokenizer_dir=5, max_new_tokens=2)


@pytest.mark.parametrize("ids, words", [
    ([[5, 1.5]], ["input 0, position 1", "1.5", "expected an int"]),
    ([[5], ["a"]], ["input 1, position 0", "'a'"]),
    ([[None]], ["None", "expected an int"]),
    ([[True, 5]], ["True", "expected an int"]),
    ([[[5, 6]]], ["[5, 6]", "expected an int"]),
    ([5, 6], ["input 0 = 5", "list of token ids"]),
    ([[2 ** 70]], [str(2 ** 70), "[0, 384)"]),
    ("abc", ["ids = 'abc'", "use generate"]),
    (torch.tensor([[5.0, 6.0]]), ["expected an int"]),
])
def test_generate_ids_bad_ids(engine, ids, words):
    _raises(EncDecError, words, engine.generate_ids, ids, max_new_tokens=2)


def test_generate_ids_takes_a_tensor(engine):
    want = engine.generate_ids([[5, 6, 1]], max_new_tokens=3).sequences
    assert torch.equal(engine.generate_ids(torch.tensor([[5, 6, 1]]), max_new_tokens=3).sequences, want)


def test_generate_ids_bad_target_lang_ids_and_lora_uids(engine):
    _raises(EncDecError, ["target language ids = 5"], engine.generate_ids, [[5]], target_lang_ids=5,
            max_new_tokens=2)
    for uids in ("ab", 1.0, True):
        _raises(EncDecError, [f"LoRA task uids = {uids!r}"], engine.generate_ids, [[5]], lora_uids=uids,
                max_new_tokens=2)


@pytest.mark.parametrize("kw, words", [
    (dict(length_penalty=float("nan"), num_beams=2), ["length_penalty", "nan", "finite"]),
    (dict(repetition_penalty=float("inf")), ["repetition_penalty", "inf"]),
    (dict(temperature=float("inf"), do_sample=True), ["temperature", "inf"]),
    (dict(seed=2 ** 70, do_sample=True), ["seed", "64-bit integer"]),
    (dict(eos_token_id=-5), ["eos_token_id", "= -5: expected a token id >= 0"]),
])
def test_bad_generation_values(engine, kw, words):
    _raises(ConfigError, words, engine.generate_ids, [[5, 6]], max_new_tokens=2, **kw)


def test_runtime_generate_bad_arguments(engine):
    model = engine.model
    gc = GenerationConfig.from_model(model.cfg, None, max_new_tokens=2)
    ids = torch.tensor([[5, 6, 7], [8, 9, 1]])
    mask = torch.ones_like(ids)
    _raises(EncDecError, ["gc = dict", "GenerationConfig"], generate, model, ids, mask, {"max_new_tokens": 2})
    _raises(EncDecError, ["runner = 'x'"], generate, model, ids, mask, gc, runner="x")
    _raises(EncDecError, ["forced_bos_token_ids = 5"], generate, model, ids, mask, gc, forced_bos_token_ids=5)
    _raises(EncDecError, ["decoder_input_ids has dtype torch.float32"], generate, model, ids, mask, gc,
            decoder_input_ids=torch.tensor([[0.0, 5.0], [0.0, 6.0]]))
    for bad in (2, -1):
        _raises(EncDecError, ["attention_mask contains", str(bad)], generate, model, ids, mask * bad, gc)
    for m in (mask.bool(), mask.float()):  # 0/1 masks of any dtype stay accepted
        assert torch.equal(generate(model, ids, m, gc).sequences, generate(model, ids, mask, gc).sequences)
    _raises(ConfigError, ["generation_config.json", "str 'x'", "expected a JSON object"],
            GenerationConfig.from_model, model.cfg, "x")


def test_registry_non_string_names(reg):
    for name in (None, 5):
        _raises(RegistryError, [f"family = {name!r}", "expected a family name"], reg.get, name)
        assert reg.find(name) is None
    _raises(RegistryError, ["adapter kind = None"], reg.adapter, None)
    _raises(RegistryError, ["source = None", "expected a path"], reg.detect, None)


def test_convert_dtype(dirs, reg, tmp_path):
    src = dirs[0]
    _raises(ConfigError, ["--dtype = torch.int32", "float16"], convert, src, tmp_path / "a", dtype=torch.int32,
            reg=reg)
    _raises(ConfigError, ["--dtype = 'fp8'"], convert, src, tmp_path / "b", dtype="fp8", reg=reg)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    out = convert(src, tmp_path / "c", dtype="float16", reg=reg)  # a dtype name, as Engine.load takes
    import json

    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("ids, words", [
    (torch.tensor([5, 6]), ["input 0 = 5", "list of token ids"]),  # 1-D: was "iteration over a 0-d tensor"
    (5, ["ids = 5", "expected a list of requests"]),  # was "object of type 'int' has no len()"
])
def test_generate_ids_flat_tensor_and_scalar(engine, ids, words):
    _raises(EncDecError, words, engine.generate_ids, ids, max_new_tokens=2)


def test_generate_ids_takes_iterables_and_tensor_prefixes(engine):
    want = engine.generate_ids([[5, 6, 1]], decoder_prefix=[7, 8], max_new_tokens=3).sequences
    assert torch.equal(engine.generate_ids(iter([[5, 6, 1]]), decoder_prefix=[7, 8], max_new_tokens=3).sequences, want)
    for prefix in (torch.tensor([7, 8]), torch.tensor([[7, 8]])):  # were "2 for 1 inputs", "contains tensor(7)"
        assert torch.equal(engine.generate_ids([[5, 6, 1]], decoder_prefix=prefix, max_new_tokens=3).sequences, want)
    tok = engine.tokenizer()
    outs = [[ev.output for ev in engine.stream_ids([[5, 6, 1]], tok, decoder_prefix=p, max_new_tokens=3)
             if ev.finished] for p in ([7, 8], torch.tensor([7, 8]))]  # a tensor: was "Boolean value of Tensor"
    assert outs[0] == outs[1] == [tok.decode(want[0, 1:].tolist())]
    langs = engine.generate_ids([[5, 6, 1]], target_lang_ids=[9], max_new_tokens=3).sequences
    assert torch.equal(engine.generate_ids([[5, 6, 1]], target_lang_ids=torch.tensor([9]),
                                           max_new_tokens=3).sequences, langs)


@pytest.mark.parametrize("lang", ["a", 5.5, 10 ** 6])
def test_generate_ids_bad_target_lang_id_with_prefix(engine, lang):  # 'a' was a raw ValueError from int()
    _raises(EncDecError, [f"target_lang_ids[0] = {lang!r}", "[0, 384)"], engine.generate_ids, [[5]],
            target_lang_ids=[lang], decoder_prefix=[7], max_new_tokens=2)


def test_score_ids_flat_tensor_and_token_strings(engine):
    _raises(EncDecError, ["source_ids[0] = 5", "list of token ids"], engine.score_ids, torch.tensor([5]),
            torch.tensor([6]))
    _raises(EncDecError, ["token_strings = 5", "callable"], engine.score_ids, [[5]], [[6]], token_strings=5)
    want = engine.score_ids([[5]], [[6]], target_lang_ids=[9])[0].sum
    assert engine.score_ids([[5]], [[6]], target_lang_ids=torch.tensor([9]))[0].sum == want


@pytest.mark.parametrize("n", [5, 10 ** 12, 10 ** 30])  # were a raw allocation / "Overflow when unpacking long"
def test_sampled_return_sequences_within_the_beam_width_limit(engine, n):
    _raises(LimitError, [f"num_return_sequences {n}", "limit 4", "--max-beam-width"], engine.generate, ["ab"],
            do_sample=True, num_return_sequences=n, max_new_tokens=2)


_ALL_BUT_EOS = [t for t in range(384) if t != 1]


@pytest.mark.parametrize("kw, at, opts", [  # each was torch.multinomial's "probability tensor contains inf, nan"
    (dict(suppress_tokens=list(range(384))), 1, "suppress_tokens"),
    (dict(suppress_tokens=list(range(384)), num_beams=2), 1, "suppress_tokens"),
    (dict(suppress_tokens=_ALL_BUT_EOS, min_new_tokens=2), 1, "suppress_tokens, min_new_tokens"),
    # (a forced token in suppress_tokens starved its step too: it is refused up front now, as HF does)
    (dict(suppress_tokens=[t for t in _ALL_BUT_EOS if t not in (5, 6)], no_repeat_ngram_size=1, min_new_tokens=3),
     3, "suppress_tokens, no_repeat_ngram_size, min_new_tokens"),
])
def test_sampling_with_every_token_excluded(engine, kw, at, opts):
    words = [f"generated token {at}", f"options ({opts})", "exclude every token"]
    _raises(ConfigError, words, engine.generate, ["ab", "cd"], do_sample=True, seed=1, max_new_tokens=3, **kw)
    if kw.get("num_beams", 1) == 1:  # streaming hands the same error to the consumer
        _raises(ConfigError, words, lambda: list(engine.generate_stream(["ab"], do_sample=True, max_new_tokens=3,
                                                                         **kw)))


def test_a_streamer_gets_no_tokens_of_the_starved_step(engine):
    """Sampling with a streamer: the step where a row has nothing to draw raises before the streamer
    sees its tokens (it got the starved row's stand-in draw, then the error)."""
    from encdec_core.runtime.generation import generate

    puts = []

    class Rec:
        def put(self, tokens, live):
            puts.append(tokens)

        def end(self):
            puts.append("end")
    gc = engine.generation_config(do_sample=True, seed=1, max_new_tokens=3, min_new_tokens=3, no_repeat_ngram_size=1,
                                  suppress_tokens=[t for t in _ALL_BUT_EOS if t not in (5, 6)])
    with pytest.raises(ConfigError, match="generated token 3"):
        generate(engine.model, torch.tensor([[5, 6, 1], [8, 9, 1]]), None, gc, streamer=Rec())
    assert len(puts) == 2 and "end" not in puts  # tokens 1 and 2; the error ends the stream


def test_sampling_and_greedy_unchanged_where_tokens_remain(engine):
    # one token left: sampling must draw it, as greedy decoding picks it
    kw = dict(suppress_tokens=[t for t in _ALL_BUT_EOS if t != 70], max_new_tokens=3)
    assert engine.generate(["ab"], do_sample=True, seed=1, **kw) == engine.generate(["ab"], **kw)
    assert engine.generate(["ab"], suppress_tokens=list(range(384)), max_new_tokens=2)  # greedy: as HF, no error


def test_build_and_convert_path_arguments(dirs, reg, tmp_path):  # None: were pathlib TypeErrors naming no argument
    src, eng = dirs
    ck = eng.parent / "ck"
    _raises(EncDecError, ["--checkpoint-dir = None", "expected a path"], build, None, tmp_path / "e")
    _raises(EncDecError, ["--output-dir = None", "expected a path"], build, ck, None)
    _raises(EncDecError, ["--model-dir = None", "expected a path"], convert, None, tmp_path / "c", reg=reg)
    _raises(EncDecError, ["--output-dir = None", "expected a path"], convert, src, None, reg=reg)
    _raises(EncDecError, ["--lora-dir = None", "expected a path"], convert, src, tmp_path / "c", adapters=[None],
            reg=reg)
    _raises(ConfigError, ["adapters = 5", "expected a list of adapter directories"], convert, src, tmp_path / "c",
            adapters=5, reg=reg)
    # one path is one adapter (it was split into characters: "/: no installed adapter plugin reads this")
    _raises(ConfigError, [f"{tmp_path / 'lora'}: adapter directory not found"], convert, src, tmp_path / "c",
            adapters=str(tmp_path / "lora"), reg=reg)
    assert not (tmp_path / "c").exists() and not (tmp_path / "e").exists()


def test_load_bad_ctx(dirs):  # was AttributeError: 'str' object has no attribute 'tp_size'
    _raises(EncDecError, ["ctx = 'x'", "ParallelContext"], Engine.load, dirs[1], ctx="x")


def test_a_shard_changed_after_build_is_refused_at_load(dirs, tmp_path):
    """build hard-links an engine's shards to its checkpoint's: a shard edited in place changed the
    engine too, and load never looked (the outputs were garbage, exit 0). A changed size or mtime
    now costs a checksum at load; an engine merely copied still loads."""
    import shutil

    _, eng = dirs
    ck = tmp_path / "ck"
    shutil.copytree(eng.parent / "ck", ck)
    e2 = build(ck, tmp_path / "eng", max_batch_size=4, max_input_len=32, max_output_len=16, max_beam_width=4)
    copied = tmp_path / "copied"
    shutil.copytree(e2, copied)  # new files, new mtimes, the same bytes
    assert Engine.load(copied).generate(["ab"], max_new_tokens=2)
    shard = ck / "rank0.safetensors"
    with open(shard, "r+b") as f:  # in place: the engine's hard link sees it
        f.seek(shard.stat().st_size - 64)
        f.write(b"\x7f" * 16)
    _raises(EncDecError, [str(e2 / "rank0.safetensors"), "changed since 'encdec build'"], Engine.load, e2)


def test_a_runner_for_limits_too_large_to_allocate_names_them(dirs, tmp_path):
    """An engine built with absurd limits: the graph / compiled runner's preallocation failed inside
    torch ("Overflow when unpacking long long", or the allocator's message with its C++ frames)."""
    from encdec_core.runtime.cuda.runner import CudaGraphRunner

    _, eng = dirs
    big = build(eng.parent / "ck", tmp_path / "big", max_batch_size=10 ** 9, max_input_len=10 ** 9,
                max_output_len=10 ** 9, max_beam_width=10 ** 5)
    _raises(LimitError, [str(big), "batch 1000000000 x beams 100000", "build the engine with smaller limits"],
            CudaGraphRunner.for_engine, Engine.load(big), compile=False)


def test_the_compiled_cpu_runner_without_a_cpp_compiler_is_refused_up_front(engine, monkeypatch):
    """Without a C++ compiler the step fell back to eager with a warning, then the compiled greedy
    selection failed anyway: an internal InductorError after the warning said all was well."""
    from torch._inductor import cpp_builder

    from encdec_core.runtime.cuda.runner import CudaGraphRunner

    def no_compiler():
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, '/x/g++')")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    _raises(EncDecError, ["needs a C++ compiler", "/x/g++", "--runner eager"], CudaGraphRunner.for_engine, engine,
            use_graphs=False)


def test_load_names_a_cuda_device_the_machine_lacks(dirs, monkeypatch):
    """--device cuda:7 on a one-GPU machine was an internal error (CUDA's "invalid device ordinal")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _raises(EncDecError, ["--device cuda:7", "1 CUDA device(s): cuda:0 .. cuda:0"], Engine.load, dirs[1],
            device="cuda:7")
