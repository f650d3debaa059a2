"""Registry and plugin loading: lookups, conflicts with both origins, unknown names, entry points
(autoload switch, allow-list, broken plugins reported and skipped), provenance.

Entry-point tests put a real ``*.dist-info`` (METADATA + entry_points.txt) and its module on
sys.path, so importlib.metadata finds them exactly as it finds an installed distribution.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import sys
import textwrap

import pytest

from conftest import make_registry
from encdec_core.family import AdapterKind, Family
from encdec_core.plugins import ALLOW_ENV, DISABLE_AUTOLOAD_ENV, Origin, hookimpl
from encdec_core.registry import Registry, RegistryError
from encdec_core.weights import WeightMap


def fam(name, aliases=(), architectures=(), model_types=(), description="test family"):
    return Family(name=name, description=description, config_map=lambda s: None, weight_map=WeightMap([]),
                  aliases=tuple(aliases), architectures=tuple(architectures), model_types=tuple(model_types))


class Plug:
    """A plugin object with the real hook markers."""

    def __init__(self, *families, adapters=()):
        self._families = list(families)
        self._adapters = list(adapters)

    @hookimpl
    def encdec_families(self):
        return self._families

    @hookimpl
    def encdec_adapters(self):
        return self._adapters


A = Origin("dist-a", "1.0", "pkg_a.plugin")
B = Origin("dist-b", "2.5", "pkg_b.plugin")


def reg_with(*plugins):
    reg = Registry()
    for p, origin in plugins:
        reg.register_plugin(p, origin)
    return reg


# ------------------------------------------------------------------------------ lookups
def test_builtin_t5_by_name_alias_architecture_model_type(builtin_registry):
    t5 = builtin_registry.get("t5")
    assert t5.name == "t5"
    for key in ("T5", "flan-t5", "mt5", "ByT5", "umt5", "T5ForConditionalGeneration",
                "MT5ForConditionalGeneration", "UMT5ForConditionalGeneration", "t5-v1.1"):
        assert builtin_registry.get(key) is t5, key
    assert "t5" in builtin_registry.names()
    assert builtin_registry.find("no-such-family") is None


def test_lookup_kinds_and_case():
    f = fam("alpha", aliases=("al", "Alpha-2"), architectures=("AlphaForSeq2Seq",), model_types=("alpha_mt",))
    reg = reg_with((Plug(f), A))
    for key in ("alpha", "ALPHA", "al", "alpha-2", "AlphaForSeq2Seq", "alphaforseq2seq", "alpha_mt"):
        assert reg.get(key) is f
    assert reg.origin("al") == A
    assert [e.record for e in reg.families()] == [f]
    assert reg.families()[0].origin == A


def test_register_after_load_is_seen():
    reg = reg_with((Plug(fam("one")), A))
    assert reg.names() == ["one"]  # loaded now
    reg.register_plugin(Plug(fam("two")), B)
    assert reg.names() == ["one", "two"] and reg.origin("two") == B


def test_hand_registered_origin_defaults():
    reg = make_registry("encdec_t5.plugin")
    o = reg.origin("t5")
    assert o.distribution == "<registered>" and o.module == "encdec_t5.plugin"


# ------------------------------------------------------------------------------ conflicts
@pytest.mark.parametrize("kind,second", [
    ("family", fam("alpha")),
    ("alias", fam("beta", aliases=("AL",))),
    ("alias", fam("beta", aliases=("alpha",))),  # an alias may not take another family's name
    ("architecture", fam("beta", architectures=("AlphaForSeq2Seq",))),
    ("alias", fam("beta", aliases=("alphaforseq2seq",))),
])
def test_duplicate_raises_naming_both_origins(kind, second):
    first = fam("alpha", aliases=("al",), architectures=("AlphaForSeq2Seq",))
    reg = reg_with((Plug(first), A), (Plug(second), B))
    with pytest.raises(RegistryError) as ei:
        reg.names()
    msg = str(ei.value)
    assert str(A) in msg and str(B) in msg, msg
    assert "dist-a 1.0" in msg and "dist-b 2.5" in msg
    assert "alpha" in msg
    if kind != "family":
        assert f"{kind} " in msg and second.name in msg


def test_model_types_may_be_shared_without_conflict():
    a = fam("alpha", model_types=("shared_mt",))
    b = fam("beta", model_types=("shared_mt",))
    reg = reg_with((Plug(a), A), (Plug(b), B))
    assert reg.names() == ["alpha", "beta"]
    assert reg.get("shared_mt") is a  # the first registration keeps it


def test_duplicate_adapter_and_unknown_adapter():
    ad = AdapterKind("lora", "LoRA", detect=lambda p: False, load=lambda *a: None)
    reg = reg_with((Plug(adapters=[ad]), A))
    assert reg.adapter("LoRA") is ad
    with pytest.raises(RegistryError, match=r"unknown adapter kind 'ia3'; known: lora"):
        reg.adapter("ia3")
    with pytest.raises(RegistryError) as ei:
        reg.register_plugin(Plug(adapters=[AdapterKind("LORA", "x", lambda p: False, lambda *a: None)]), B)
    assert "adapter 'LORA' from dist-b 2.5" in str(ei.value) and "dist-a 1.0" in str(ei.value)


# ------------------------------------------------------------------------------ unknown names
def test_unknown_name_lists_known_and_a_close_match(builtin_registry):
    with pytest.raises(RegistryError) as ei:
        builtin_registry.get("flan-t6")
    msg = str(ei.value)
    assert "unknown family 'flan-t6'" in msg
    for name in builtin_registry.names():
        assert name in msg
    assert "did you mean 'flan-t5'?" in msg


def test_unknown_name_without_close_match_and_empty_registry():
    reg = reg_with((Plug(fam("alpha")), A))
    with pytest.raises(RegistryError) as ei:
        reg.get("zzzzzzzz")
    assert "known families: alpha" in str(ei.value) and "did you mean" not in str(ei.value)
    with pytest.raises(RegistryError, match=r"\(none installed\)"):
        Registry().get("t5")  # autoload is off in tests: nothing installed


def test_detect_from_config_json(builtin_registry, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["UMT5ForConditionalGeneration"]}))
    assert builtin_registry.detect(tmp_path).name == "t5"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mt5"}))
    assert builtin_registry.detect(tmp_path).name == "t5"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(Exception) as ei:
        builtin_registry.detect(tmp_path)
    msg = str(ei.value)
    assert "config.json" in msg and "GPT2LMHeadModel" in msg and "--family" in msg and "t5" in msg
    # architectures and model_type naming different families: model_type, as transformers' Auto classes
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BartForConditionalGeneration"],
                                                      "model_type": "t5"}))
    assert builtin_registry.detect(tmp_path).name == "t5"


# ------------------------------------------------------------------------------ entry points
_COUNTER = iter(range(10**6))


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """make_dist(dist, version, {ep_name: module_source}) -> {ep_name: module name}.

    Writes modules and a dist-info on a fresh sys.path entry; the modules are unloaded afterwards.
    """
    created = []

    def make(dist: str, version: str, plugins: dict[str, str]):
        root = tmp_path / f"site{next(_COUNTER)}"
        root.mkdir()
        mods = {}
        eps = ["[encdec]"]
        for ep_name, source in plugins.items():
            mod = f"encdec_testplug_{ep_name.replace('-', '_')}_{next(_COUNTER)}"
            (root / f"{mod}.py").write_text(textwrap.dedent(source))
            eps.append(f"{ep_name} = {mod}")
            mods[ep_name] = mod
            created.append(mod)
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text("\n".join(eps) + "\n")
        monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        return mods

    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    yield make
    for m in created:
        sys.modules.pop(m, None)


FAMILY_PLUGIN = """
    from encdec_core.family import Family
    from encdec_core.plugins import hookimpl
    from encdec_core.weights import WeightMap

    @hookimpl
    def encdec_families():
        return [Family(name="{name}", description="demo", config_map=lambda s: None,
                       weight_map=WeightMap([]), aliases=({aliases}), architectures=({archs}))]
"""


def fam_plugin(name, aliases=(), archs=()):
    return FAMILY_PLUGIN.format(name=name, aliases="".join(f"{a!r}, " for a in aliases),
                                archs="".join(f"{a!r}, " for a in archs))


def test_entry_point_family_with_distribution_origin(make_dist, monkeypatch):
    mods = make_dist("demo-family-dist", "4.2.0", {"demo": fam_plugin("demo-fam", aliases=("dfam",))})
    monkeypatch.setenv(ALLOW_ENV, "demo")
    reg = Registry()
    assert reg.names() == ["demo-fam"]
    o = reg.origin("dfam")
    assert (o.distribution, o.version, o.module) == ("demo-family-dist", "4.2.0", mods["demo"])
    assert reg.failures == []


def test_builtin_t5_loads_through_its_entry_point(make_dist, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "t5")
    reg = Registry()
    assert reg.names() == ["t5"]
    o = reg.origin("t5")
    assert (o.distribution, o.version, o.module) == ("encdec", md.version("encdec"), "encdec_t5.plugin")


@pytest.mark.parametrize("when", ["before", "after"])
def test_hand_registering_an_installed_plugin_is_one_registration(make_dist, monkeypatch, when):
    """A plugin registered by hand that is also installed (found again through its entry point), or
    registered twice, is one registration: no pluggy ValueError, no duplicate-family error."""
    monkeypatch.setenv(ALLOW_ENV, "t5")
    mod = importlib.import_module("encdec_t5.plugin")
    reg = Registry()
    if when == "after":
        assert reg.names() == ["t5"]
    reg.register_plugin(mod)
    reg.register_plugin(mod)
    assert reg.names() == ["t5"]


def test_autoload_disabled_loads_nothing(make_dist, monkeypatch):
    make_dist("demo-family-dist", "1.0", {"demo": fam_plugin("demo-fam")})
    for value in ("1", "true", "YES", "on"):
        monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
        reg = Registry()
        assert reg.names() == [] and reg.failures == []
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "0")
    monkeypatch.setenv(ALLOW_ENV, "demo")
    assert Registry().names() == ["demo-fam"]


def test_allow_list_selects_entry_points(make_dist, monkeypatch):
    make_dist("dist-x", "1.0", {"px": fam_plugin("fam-x"), "py": fam_plugin("fam-y")})
    monkeypatch.setenv(ALLOW_ENV, " py , t5 ")
    assert Registry().names() == ["fam-y", "t5"]
    monkeypatch.setenv(ALLOW_ENV, "px")
    assert Registry().names() == ["fam-x"]
    monkeypatch.setenv(ALLOW_ENV, "")  # empty = no allow-list: everything installed loads
    names = Registry().names()
    assert {"fam-x", "fam-y", "t5"} <= set(names)


def test_broken_plugin_is_reported_and_skipped(make_dist, monkeypatch, capsys):
    make_dist("broken-dist", "0.0.1", {
        "broken": "import encdec_no_such_dependency_xyz\n",
        "crash": "raise RuntimeError('boom at import')\n",
        "good": fam_plugin("good-fam"),
    })
    monkeypatch.setenv(ALLOW_ENV, "broken,crash,good")
    reg = Registry()
    assert reg.names() == ["good-fam"]
    fails = {f.entry_point: f for f in reg.failures}
    assert set(fails) == {"broken", "crash"}
    assert fails["broken"].distribution == "broken-dist"
    assert "ModuleNotFoundError" in fails["broken"].error and "encdec_no_such_dependency_xyz" in fails["broken"].error
    assert "RuntimeError: boom at import" in fails["crash"].error
    err = capsys.readouterr().err
    assert "plugin 'broken' from broken-dist failed to load and was skipped" in err
    assert "plugin 'crash' from broken-dist" in err and "Traceback" not in err


def test_conflict_between_installed_distributions_names_both(make_dist, monkeypatch):
    make_dist("t5-clone-dist", "9.9", {"clone": fam_plugin("t5-clone", archs=("T5ForConditionalGeneration",))})
    monkeypatch.setenv(ALLOW_ENV, "t5,clone")
    with pytest.raises(RegistryError) as ei:
        Registry().names()
    msg = str(ei.value)
    assert "T5ForConditionalGeneration" in msg
    assert "t5-clone-dist 9.9" in msg and f"encdec {md.version('encdec')}" in msg


def test_entry_points_are_read_once(make_dist, monkeypatch):
    make_dist("dist-once", "1.0", {"once": fam_plugin("fam-once")})
    monkeypatch.setenv(ALLOW_ENV, "once")
    calls = []
    real = md.entry_points

    def counting(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(md, "entry_points", counting)
    reg = Registry()
    assert calls == []  # lazy: nothing read at construction
    reg.get("fam-once")
    reg.names()
    reg.families()
    reg.find("nothing")
    assert len(calls) == 1


def test_list_families_json_cli_shows_origin(make_dist, monkeypatch):
    """The CLI's list-families --json in a subprocess sees an entry-point family with its origin."""
    import os
    import subprocess

    make_dist("cli-demo-dist", "0.7", {"clidemo": fam_plugin("cli-demo", aliases=("cd",), archs=("CliDemoModel",))})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), ALLOW_ENV: "clidemo,t5"}
    env.pop(DISABLE_AUTOLOAD_ENV, None)
    out = subprocess.run([sys.executable, "-m", "encdec_core.cli", "list-families", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"cli-demo", "t5"}
    r = rows["cli-demo"]
    assert r["aliases"] == ["cd"] and r["architectures"] == ["CliDemoModel"] and r["description"] == "demo"
    assert r["origin"]["distribution"] == "cli-demo-dist" and r["origin"]["version"] == "0.7"


# ------------------------------------------------------------------------------ the third-party example
EXAMPLE = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples" / "third_party_family"


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory):
    """pip-install examples/third_party_family (a copy: building writes into the source tree) into a
    temporary target directory; returns that directory."""
    import shutil
    import subprocess

    work = tmp_path_factory.mktemp("example_src")
    src = work / "third_party_family"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("example_target")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (target / "encdec_example_family" / "plugin.py").is_file()
    return target


def _env_with(target, **extra):
    import os

    env = {k: v for k, v in os.environ.items() if k not in (DISABLE_AUTOLOAD_ENV, ALLOW_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(target)] + [p for p in sys.path if p])
    env.update(extra)
    return env


def _encdec_cmd() -> list[str]:
    """The installed ``encdec`` console script next to this interpreter (else python -m)."""
    from pathlib import Path

    script = Path(sys.executable).parent / "encdec"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "encdec_core.cli"]


def test_installed_example_family_is_listed_with_its_distribution(example_installed):
    import subprocess

    out = subprocess.run(_encdec_cmd() + ["list-families", "--json"],
                         env=_env_with(example_installed), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert "marian" in rows and "t5" in rows, sorted(rows)
    m = rows["marian"]
    assert m["origin"]["distribution"] == "encdec-example-family"
    assert m["origin"]["version"] == "0.1.0"
    assert m["origin"]["module"] == "encdec_example_family.plugin"
    assert m["aliases"] == ["opus-mt"] and m["architectures"] == ["MarianMTModel"]
    assert "Marian" in m["description"]
    # the built-in families keep their own origin
    assert rows["t5"]["origin"]["distribution"] == "encdec"
    # and the allow-list can leave it out
    out = subprocess.run(_encdec_cmd() + ["list-families", "--json"],
                         env=_env_with(example_installed, **{ALLOW_ENV: "t5"}), capture_output=True, text=True,
                         timeout=120)
    assert [r["name"] for r in json.loads(out.stdout)] == ["t5"]


def _tiny_marian(path, act="swish", scale=True):
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = transformers.MarianConfig(
        vocab_size=50, d_model=18, encoder_layers=2, decoder_layers=3, encoder_attention_heads=3,
        decoder_attention_heads=3, encoder_ffn_dim=24, decoder_ffn_dim=28, max_position_embeddings=40,
        pad_token_id=49, eos_token_id=0, decoder_start_token_id=49, forced_eos_token_id=None,
        activation_function=act, scale_embedding=scale, dropout=0.0, init_std=0.3)
    torch.manual_seed(0)
    m = transformers.MarianMTModel(cfg).eval()
    with torch.no_grad():
        m.final_logits_bias.normal_()
        for n, p in m.named_parameters():
            if "layer_norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    m.save_pretrained(path)
    return transformers.MarianMTModel.from_pretrained(path).eval()


@pytest.mark.parametrize("act,scale", [("swish", True), ("gelu", False)])
def test_example_family_converts_marian_like_hf(example_installed, tmp_path, monkeypatch, act, scale):
    """The example is a real family: logits and generation equal transformers' MarianMTModel."""
    import torch

    from encdec_core import checkpoint
    from encdec_core.convert import convert, load_source_model
    from encdec_core.runtime.generation import GenerationConfig, generate

    transformers = pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(example_installed))
    reg = make_registry("encdec_example_family.plugin")
    ref = _tiny_marian(tmp_path / "src", act, scale)
    ours, src, fam = load_source_model(tmp_path / "src", reg=reg)
    assert fam.name == "marian" and ours.cfg.embedding_scale == (18 ** 0.5 if scale else 1.0)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 49, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 8:], mask[1, 8:] = 49, 0
    dec = torch.randint(1, 49, (2, 9), generator=g)
    dec[:, 0] = 49
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(ids, mask, dec)
    assert (got - want).abs().max().item() <= 1e-4
    # through convert -> load_model as well
    loaded = checkpoint.load_model(convert(tmp_path / "src", tmp_path / "ckpt", reg=reg))
    with torch.no_grad():
        assert (loaded(ids, mask, dec) - want).abs().max().item() <= 1e-4
    hf_gc = transformers.GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.7,
                                          eos_token_id=0, pad_token_id=49, decoder_start_token_id=49)
    with torch.no_grad():
        h = ref.generate(ids, attention_mask=mask, generation_config=hf_gc)
    o = generate(ours, ids, mask, GenerationConfig.from_model(ours.cfg, None, max_new_tokens=8, num_beams=3,
                                                             num_return_sequences=2, length_penalty=0.7))
    assert torch.equal(h, o.sequences)


def test_example_marian_positions_and_refusals(example_installed, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import torch

    monkeypatch.syspath_prepend(str(example_installed))
    plugin = importlib.import_module("encdec_example_family.plugin")
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    for dim in (16, 17):
        want = MarianSinusoidalPositionalEmbedding(30, dim).create_weight()
        assert torch.allclose(plugin.marian_sinusoids(30, dim), want, atol=1e-6)
    base = dict(plugin.MARIAN.presets["opus-mt-en-de"])
    assert plugin.MARIAN.make_config(base).embedding_scale == 512 ** 0.5
    from encdec_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"x/config.json: .*'share_encoder_decoder_embeddings' = false"):
        plugin.MARIAN.make_config({**base, "share_encoder_decoder_embeddings": False}, "x/config.json")
    with pytest.raises(ConfigError, match=r"x/config.json: .*'decoder_vocab_size' = 100"):
        plugin.MARIAN.make_config({**base, "decoder_vocab_size": 100}, "x/config.json")
    with pytest.raises(ConfigError, match=r"x/config.json: .*'encoder_attention_heads' = 7"):
        plugin.MARIAN.make_config({**base, "encoder_attention_heads": 7}, "x/config.json")


def test_plugin_whose_hook_raises_is_reported_and_skipped(capsys):
    import types

    from encdec_core.registry import Registry

    import encdec_t5.plugin as t5plugin

    broken = types.ModuleType("broken_plugin")

    def encdec_families():
        raise RuntimeError("boom")

    from encdec_core.plugins import hookimpl

    broken.encdec_families = hookimpl(encdec_families)
    reg = Registry()
    reg.register_plugin(t5plugin, name="t5")
    reg.register_plugin(broken, name="broken")
    assert reg.names() == ["t5"]
    assert any("boom" in f.error for f in reg.failures)
    assert "boom" in capsys.readouterr().err
