"""Torch-free generation on ONNX Runtime, token for token what transformers' `generate()` gives.

    from vedrt.runtime import load
    gen = load("export-dir")                 # threads: default 1, at most the cores
    ids = gen.generate(pixel_values, num_beams=4, max_new_tokens=30)
    texts = gen.caption(["cat.jpg"], num_beams=4)
    engine = gen.engine(max_rows=32)        # many requests stepped together

Nothing here imports torch or transformers; ONNX Runtime, PIL and tokenizers load on first use.
"""

from ..errors import InputError, VedrtError
from .engine import Engine, EngineStopped, Handle
from .generator import Generator
from .loader import load
from .options import GenerationOptions
from .search import GenerateOutput

__all__ = [
    "Engine",
    "EngineStopped",
    "GenerateOutput",
    "GenerationOptions",
    "Generator",
    "Handle",
    "InputError",
    "VedrtError",
    "load",
]
