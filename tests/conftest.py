"""Test setup: plugin autoload is off; tests register exactly the plugins they need.

Helpers here build tiny HF models from config classes with fixed seeds (no hub, no downloads).
"""
from __future__ import annotations

import os

os.environ["ENCDEC_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

BUILTIN_PLUGINS = ("encdec_t5.plugin", "encdec_bart.plugin", "encdec_nmt.plugin")


def make_registry(*modules: str):
    """A fresh Registry with the named plugin modules registered by hand."""
    from encdec_core.registry import Registry

    reg = Registry()
    for name in modules:
        reg.register_plugin(importlib.import_module(name), name=name)
    return reg


@pytest.fixture
def builtin_registry(monkeypatch):
    """The process-wide registry, replaced by one holding the built-in families that import."""
    import encdec_core.registry as regmod

    mods = []
    for m in BUILTIN_PLUGINS:
        try:
            importlib.import_module(m)
            mods.append(m)
        except ImportError:
            pass
    reg = make_registry(*mods)
    monkeypatch.setattr(regmod, "registry", reg)
    import encdec_core

    monkeypatch.setattr(encdec_core, "registry", reg)
    return reg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
