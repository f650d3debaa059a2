"""Plugin machinery: pluggy markers, hook specifications and the plugin manager.

Families and adapters are found through the entry-point group ``encdec``. Hooks return plain
records (``Family``, ``Adapter``); pluggy only finds and calls them. Nothing on the per-token path
goes through pluggy.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Iterable

import pluggy

PROJECT = "encdec"
ENTRY_POINT_GROUP = "encdec"
DISABLE_AUTOLOAD_ENV = "ENCDEC_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_ENV = "ENCDEC_PLUGINS"  # comma-separated entry-point names allowed to load

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class EncDecSpecs:
    """Hook specifications. Every hook returns records; none is called per token."""

    @hookspec
    def encdec_families(self) -> Iterable["object"]:
        """Return an iterable of ``encdec_core.family.Family`` records."""

    @hookspec
    def encdec_adapters(self) -> Iterable["object"]:
        """Return an iterable of ``encdec_core.family.AdapterKind`` records."""

    @hookspec
    def encdec_register_commands(self, subparsers) -> None:
        """Add sub-commands to the ``encdec`` CLI (argparse subparsers)."""


@dataclass(frozen=True)
class Origin:
    """Where a record came from: a distribution (name, version) and the plugin module."""

    distribution: str
    version: str
    module: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} ({self.module})"


@dataclass(frozen=True)
class LoadFailure:
    entry_point: str
    distribution: str
    error: str


def autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def allowed_names() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None or not raw.strip():
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


class PluginManager:
    """Wraps pluggy's manager and remembers each plugin's origin and each load failure."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(EncDecSpecs)
        self.origins: dict[int, Origin] = {}
        self.failures: list[LoadFailure] = []
        self._entry_points_loaded = False

    def register(self, plugin, origin: Origin | None = None, name: str | None = None) -> None:
        if self.pm.is_registered(plugin):
            return  # the same module twice (by hand and by its entry point): one registration
        if origin is None:
            mod = getattr(plugin, "__name__", type(plugin).__name__)
            origin = Origin("<registered>", "", mod)
        self.pm.register(plugin, name=name)
        self.origins[id(plugin)] = origin

    def origin_of(self, plugin) -> Origin:
        return self.origins.get(id(plugin), Origin("<unknown>", "", repr(plugin)))

    def load_entry_points(self) -> None:
        if self._entry_points_loaded or autoload_disabled():
            self._entry_points_loaded = True
            return
        self._entry_points_loaded = True
        allow = allowed_names()
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if allow is not None and ep.name not in allow:
                continue
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "<unknown>"
            dist_ver = dist.version if dist is not None else ""
            if self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin is reported and skipped
                msg = f"{type(exc).__name__}: {exc}"
                self.failures.append(LoadFailure(ep.name, dist_name, msg))
                if os.environ.get("ENCDEC_DEBUG"):
                    traceback.print_exc()
                print(
                    f"encdec: warning: plugin '{ep.name}' from {dist_name} failed to load and was skipped: {msg}",
                    file=sys.stderr,
                )
                continue
            self.register(plugin, Origin(dist_name, dist_ver, ep.value), name=ep.name)

    def call_collect(self, hook_name: str):
        """Call a hook and yield (record, origin) with each implementation's origin."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            result = impl.function()
            if result is None:
                continue
            origin = self.origin_of(impl.plugin)
            for record in result:
                yield record, origin

    def plugins(self):
        return [(name, self.origin_of(p)) for name, p in self.pm.list_name_plugin()]
