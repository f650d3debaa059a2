"""Registry of families and adapter kinds, filled lazily (once) from plugins."""
from __future__ import annotations

import difflib
import sys
import threading
from dataclasses import dataclass

from .errors import EncDecError
from .plugins import Origin, PluginManager


class RegistryError(EncDecError):
    pass


@dataclass(frozen=True)
class Entry:
    record: object
    origin: Origin


class Registry:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every plugin and record (tests re-fill the process-wide registry by hand)."""
        self.manager = PluginManager()
        self._lock = threading.RLock()
        self._loaded = False
        self._families: dict[str, Entry] = {}
        self._keys: dict[str, tuple[str, Origin]] = {}  # lower-case name/alias/arch/model_type -> family name
        self._adapters: dict[str, Entry] = {}

    # ---------------------------------------------------------------- loading
    def register_plugin(self, plugin, origin: Origin | None = None, name: str | None = None) -> None:
        """Register a plugin object/module by hand (tests, embedding applications). A plugin that is
        registered already (e.g. also installed, found through its entry point) is left as it is."""
        with self._lock:
            if self.manager.pm.is_registered(plugin):
                return
            self.manager.register(plugin, origin, name)
            if self._loaded:
                self._collect_from(plugin)

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self.manager.load_entry_points()
            for _, plugin in self.manager.pm.list_name_plugin():
                self._collect_from(plugin)
            self._loaded = True

    def _collect_from(self, plugin) -> None:
        origin = self.manager.origin_of(plugin)
        for hook, add in (("encdec_families", self._add_family), ("encdec_adapters", self._add_adapter)):
            fn = getattr(plugin, hook, None)
            if fn is None:
                continue
            try:
                records = list(fn() or ())
            except Exception as exc:  # a broken hook is reported and its plugin skipped, like a failed import
                from .plugins import LoadFailure

                msg = f"{hook}() raised {type(exc).__name__}: {exc}"
                self.manager.failures.append(LoadFailure(origin.module, origin.distribution, msg))
                print(f"encdec: warning: plugin {origin} skipped: {msg}", file=sys.stderr)
                continue
            for rec in records:
                add(rec, origin)

    def _add_family(self, fam, origin: Origin) -> None:
        keys = [("name", fam.name)]
        keys += [("alias", a) for a in fam.aliases]
        keys += [("architecture", a) for a in fam.architectures]
        for kind, key in keys:
            k = key.lower()
            if k in self._keys and self._keys[k][0] != fam.name:
                other, other_origin = self._keys[k]
                raise RegistryError(
                    f"{kind} '{key}' of family '{fam.name}' from {origin} is already taken by family "
                    f"'{other}' from {other_origin}"
                )
        if fam.name.lower() in self._families:
            prev = self._families[fam.name.lower()]
            raise RegistryError(
                f"family '{fam.name}' from {origin} is already registered by {prev.origin}"
            )
        self._families[fam.name.lower()] = Entry(fam, origin)
        for _, key in keys:
            self._keys[key.lower()] = (fam.name, origin)
        # model types resolve too, but never conflict-check against each other (t5 and umt5 differ)
        for mt in fam.model_types:
            self._keys.setdefault(mt.lower(), (fam.name, origin))

    def _add_adapter(self, ad, origin: Origin) -> None:
        k = ad.name.lower()
        if k in self._adapters:
            raise RegistryError(
                f"adapter '{ad.name}' from {origin} is already registered by {self._adapters[k].origin}"
            )
        self._adapters[k] = Entry(ad, origin)

    # ---------------------------------------------------------------- queries
    def get(self, name: str):
        """A family by name, alias, HF architecture or model_type (case-insensitive)."""
        if not isinstance(name, str):
            raise RegistryError(f"family = {name!r}: expected a family name (str): a name, alias, HF architecture "
                                f"or model_type")
        self._ensure_loaded()
        hit = self._keys.get(name.lower())
        if hit is None:
            known = self.names()
            close = difflib.get_close_matches(name.lower(), list(self._keys), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RegistryError(
                f"unknown family '{name}'; known families: {', '.join(known) or '(none installed)'}{hint}"
            )
        return self._families[hit[0].lower()].record

    def find(self, name: str):
        try:
            return self.get(name)
        except RegistryError:
            return None

    def origin(self, name: str) -> Origin:
        fam = self.get(name)
        return self._families[fam.name.lower()].origin

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(e.record.name for e in self._families.values())

    def families(self) -> list[Entry]:
        self._ensure_loaded()
        return [self._families[k] for k in sorted(self._families)]

    def adapters(self) -> list[Entry]:
        self._ensure_loaded()
        return [self._adapters[k] for k in sorted(self._adapters)]

    def adapter(self, name: str):
        if not isinstance(name, str):
            raise RegistryError(f"adapter kind = {name!r}: expected an adapter kind name (str)")
        self._ensure_loaded()
        e = self._adapters.get(name.lower())
        if e is None:
            raise RegistryError(
                f"unknown adapter kind '{name}'; known: {', '.join(sorted(self._adapters)) or '(none)'}"
            )
        return e.record

    def detect(self, source) -> object:
        """Which family handles a source directory/file (HF config.json or a family's detect())."""
        import os

        from .family import detect_family

        if not isinstance(source, (str, os.PathLike)):
            raise RegistryError(f"source = {source!r}: expected a path (str or Path) to a model directory or file")
        self._ensure_loaded()
        return detect_family(self, source)

    @property
    def failures(self):
        self._ensure_loaded()
        return list(self.manager.failures)


registry = Registry()
