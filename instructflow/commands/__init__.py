"""CLI subcommands beyond `run`. Each module here defines `register(subparsers)`."""

from __future__ import annotations

import importlib
import pkgutil


def register(sub) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
