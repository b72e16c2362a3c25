"""The export directories shipped inside the package (`path("scenes")`: the demo scene captioner).

from vedrt import models
from vedrt.runtime import load
gen = load(models.path("scenes"))
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped models (each a directory with a vedrt.json)."""
    return sorted(p.name for p in ROOT.iterdir() if (p / "vedrt.json").is_file())


def path(name: str = "scenes") -> Path:
    """The export directory of a shipped model, ready for `vedrt.runtime.load`."""
    found = ROOT / name
    if not (found / "vedrt.json").is_file():
        from ..runtime.errors import InputError

        raise InputError(f"no shipped model {name!r} (shipped: {', '.join(names()) or 'none'})")
    return found
