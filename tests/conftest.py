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

# Without a GPU the Triton kernels run in Triton's interpreter (CPU). The variable must be set
# before triton is first imported, and a process that imported triton so cannot compile GPU
# kernels: set it only where there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The interpreter's int32 overflow sanitizer adds a checked copy of every integer add, sub and
    # mul (pointer offsets included): it doubles the time of the interpreted kernels (decode
    # attention 17 x 4 programs: 2.0 -> 1.0 s) and cannot fire here, where every offset of the tests'
    # tiny tensors is far below 2^31. The kernels' int64 casts for large offsets are still checked
    # by the GPU runs at real sizes.
    try:
        import triton.runtime.interpreter as _interp

        _interp.interpreter_builder.options = _interp.InterpreterOptions(sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):  # no triton, or another interpreter layout
        pass

# tiny models: one thread is faster than two on a 2-core box shared with the test's other processes
torch.set_num_threads(1)

BUILTIN_PLUGINS = ("encdec_t5.plugin", "encdec_bart.plugin", "encdec_nmt.plugin", "encdec_lora.plugin")


def make_registry(*modules: str):
    """A fresh Registry with the named plugin modules registered by hand."""
    from encdec_core.registry import Registry

    reg = Registry()
    for name in modules:
        reg.register_plugin(importlib.import_module(name), name=name)
    return reg


def builtin_modules() -> list[str]:
    mods = []
    for m in BUILTIN_PLUGINS:
        try:
            importlib.import_module(m)
            mods.append(m)
        except ImportError:
            pass
    return mods


def fill_builtin_registry():
    """The process-wide registry, reset and filled by hand with the built-in families that import."""
    from encdec_core import registry

    registry.reset()
    for m in builtin_modules():
        registry.register_plugin(importlib.import_module(m), name=m)
    return registry


@pytest.fixture
def builtin_registry():
    """The process-wide registry with the built-in families, for one test."""
    yield fill_builtin_registry()
    from encdec_core import registry

    registry.reset()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# The product compiles the CPU step with inductor's GEMM autotuning (runner.CPU_COMPILE_OPTIONS).
# Autotuning compiles and times every candidate GEMM of every shape: about 5 s a shape on CI's 2
# cores, 60-80 s of one test on a cold inductor cache. The tests whose subject is those options
# (test_cuda_runner.py::test_cpu_compiled_step_matches_eager, both families) pass them explicitly
# (PRODUCT_CPU_COMPILE_OPTIONS); every other compiled test checks its own feature on the same step
# compiled with freezing and without autotuning.
try:
    from encdec_core.runtime.cuda import runner as _runner_mod

    PRODUCT_CPU_COMPILE_OPTIONS = dict(_runner_mod.CPU_COMPILE_OPTIONS)
except ImportError:  # pragma: no cover - the runner always imports with the core installed
    _runner_mod, PRODUCT_CPU_COMPILE_OPTIONS = None, {}


@pytest.fixture(autouse=True)
def _cpu_compile_without_autotune(monkeypatch):
    if _runner_mod is not None:
        monkeypatch.setattr(_runner_mod, "CPU_COMPILE_OPTIONS",
                            {**PRODUCT_CPU_COMPILE_OPTIONS, "max_autotune": False})
    yield
