"""`ServeOptions`, apart from the server itself: `vedrt serve --help` and code that only builds
options need none of the `serve` extra's packages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import images

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "scenes"


@dataclass(frozen=True)
class ServeOptions:
    """How one server runs; the CLI flags of `vedrt serve`, one field each."""

    model: str = str(DEFAULT_MODEL)
    name: str | None = None  # default: the export directory's name
    max_rows: int = 32  # decoder rows the engine steps together
    admit_every: float = 0.0  # seconds between admissions while rows run (0: every step)
    max_queue: int = 64  # requests waiting for rows beyond that; more get 503
    max_body_mb: float = 32.0
    request_timeout: float = 60.0  # seconds from arrival to answer; past it, 504
    threads: int = 1  # ONNX Runtime intra-op threads of the engine (measured: see README)
    encode_ahead: bool = True  # encoder on its own thread while the decoder steps (README)
    decode_threads: int = 1  # image decoding pool
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    start_engine: bool = True  # tests hold the engine to fill the queue deterministically

    @property
    def model_name(self) -> str:
        return self.name or Path(self.model).resolve().name
