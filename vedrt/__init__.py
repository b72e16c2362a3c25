"""vedrt: fast, exact inference for encoder-decoder generation models.

`vedrt.load(path, backend=..., device=...)` is `vedrt.runtime.load`, imported on first use so
that `import vedrt` (the CLI, the exporter) stays light.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load":
        from .runtime.loader import load

        return load
    raise AttributeError(f"module 'vedrt' has no attribute {name!r}")
