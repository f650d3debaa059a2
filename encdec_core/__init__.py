"""encdec: fast, correct encoder-decoder Transformer inference as a plugin-architecture model zoo."""
from .config import ConfigMap, EncDecConfig
from .errors import EncDecError
from .family import AdapterKind, Family, Source
from .plugins import hookimpl, hookspec
from .registry import registry

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["registry", "Engine", "EncDecConfig", "ConfigMap", "Family", "AdapterKind", "Source", "EncDecError",
           "hookimpl", "hookspec", "__version__"]
