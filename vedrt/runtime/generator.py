"""`load()` and `Generator`: the public face of the runtime.

The model (graphs, manifest) is loaded once; options are per call, so one Generator serves greedy,
beam search and sampling alike. The image processor and tokenizer load on first use, so an export
without a tokenizer still generates token ids.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import Manifest
from . import options as opts
from . import search
from .engine import Engine
from .errors import InputError
from .executor import Executor
from .handle import input_batch
from .options import PROMPT_LEN
from .search import GenerateOutput

# The largest pool generate() keeps for its next call. Keeping one saves its allocation and binding
# (scene model, beam 4: 0.17-0.22 ms of an 11.8 ms caption), which only a small model notices;
# a big model's kept pool instead raises the next call's peak memory by about its size (ViT-GPT2,
# 17 MB pool: peak RSS 1,023-1,026 -> 1,033-1,038 MB) for no measurable time.
SPARE_POOL_BYTES = 8 * 1024 * 1024


class Generator:
    """Captions images with one export directory; thread-compatible but not thread-safe per call."""

    def __init__(self, manifest: Manifest, executor: Executor):
        self.manifest = manifest
        self.executor = executor
        self.generation_config = manifest.generation_defaults()
        opts.warn_unsupported(manifest.generation_config)
        self._processor = None
        self._detokenizer = None
        self._tokenizer = None
        # the last generate()'s engine, pool and IO bindings, for the next call of that shape
        self._spare: Engine | None = None
        self._spare_lock = threading.Lock()

    def options(self, **overrides: Any) -> opts.GenerationOptions:
        """The options a `generate(**overrides)` call would use (TypeError for unknown names)."""
        m = self.manifest
        return opts.resolve(self.generation_config, overrides, m.max_positions, m.vocab_size)

    def generate(
        self, inputs: Any, attention_mask: Any = None, **options: Any
    ) -> np.ndarray | GenerateOutput:
        """Token ids exactly as transformers' `model.generate(pixel_values=..., **options)`, or
        for a text model `model.generate(input_ids=..., attention_mask=..., **options)`.

        Returns int64 `[batch * num_return_sequences, length]` (start token included, finished rows
        padded), or a `GenerateOutput` with `return_dict=True`.
        """
        o = self.options(**options)
        return self.generate_resolved(self.check_inputs(inputs, attention_mask, o), o)

    def generate_resolved(
        self, inputs: Any, o: opts.GenerationOptions
    ) -> np.ndarray | GenerateOutput:
        """`generate` for inputs and options already checked (`check_inputs`, `options`): a
        server resolves a request's options once, not once per layer that looks at them."""
        rows = search.rows_needed(o, input_batch(inputs))
        engine = self._engine_for(rows, o.max_length - PROMPT_LEN)
        handle = engine.submit_resolved(inputs, o)
        while not handle.done():
            engine.step()
        result = handle.result()
        self._keep(engine)  # not after a failure: that engine may hold a half-run request
        return result

    def _engine_for(self, rows: int, cache_len: int) -> Engine:
        """The spare engine if the last call had this shape, else a new one.

        Same rows and cache length only: a longer cache would give the step more (masked)
        positions to read, so the same call would cost more than on a fresh engine. A concurrent
        call finds no spare and builds its own."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.max_rows == rows and spare.min_cache_len == cache_len:
            return spare
        return Engine(self, max_rows=rows, cache_len=cache_len)

    def _keep(self, engine: Engine) -> None:
        """Keep a small engine for the next call (see `SPARE_POOL_BYTES`): a new one allocates
        its pool and binds it on its first step."""
        if engine.pool_bytes() <= SPARE_POOL_BYTES:
            with self._spare_lock:
                self._spare = engine

    def engine(
        self, max_rows: int = 32, admit_every: float = 0.0, encode_ahead: bool = False
    ) -> Engine:
        """An engine over this generator: requests stepped together at every decoder step
        (continuous batching); see `vedrt.runtime.engine`."""
        return Engine(self, max_rows, admit_every=admit_every, encode_ahead=encode_ahead)

    def check_inputs(
        self, inputs: Any, attention_mask: Any = None, options: opts.GenerationOptions | None = None
    ) -> Any:
        """Pixel values for an image model; {"input_ids", "attention_mask"} for a text model
        (without a mask, `options`' pad and EOS ids infer it as transformers does)."""
        if self.manifest.modality == "text":
            from .textinputs import check_text_inputs

            o = options if options is not None else self.options()
            return check_text_inputs(
                self.manifest, inputs, attention_mask, o.pad_token_id, o.eos_token_id
            )
        if attention_mask is not None:
            raise InputError("attention_mask is for text models; this export takes images")
        return self.check_pixel_values(inputs)

    def generate_text(self, texts: str | list[str], **options: Any) -> list[str]:
        """Texts in, texts out (num_return_sequences per text, in order): tokenize with the
        export's tokenizer, generate, decode. One string is one text, as in `caption`."""
        if isinstance(texts, str):
            texts = [texts]
        if self.manifest.modality != "text":
            raise InputError("generate_text() is for text models; this export captions images")
        if self._tokenizer is None:
            from .textinputs import Tokenizer

            self._tokenizer = Tokenizer(self.manifest.root, self.manifest)
        inputs = self._tokenizer(list(texts))
        options = {**options, "return_dict": False}
        return self.decode(self.generate(inputs["input_ids"], inputs["attention_mask"], **options))

    def check_pixel_values(self, pixel_values: Any) -> np.ndarray:
        """One clear error for the wrong type, dtype, rank or size, before any graph runs."""
        m = self.manifest
        image = f"{m.num_channels}, {m.image_size[0]}, {m.image_size[1]}"
        expected = f"[batch, {image}]"
        if isinstance(pixel_values, list | tuple):
            if not pixel_values:
                raise InputError(f"pixel_values is empty: pass at least one image {expected}")
            shapes = {np.shape(p) for p in pixel_values}
            if len(shapes) > 1:
                raise InputError(
                    f"pixel_values: the images have different sizes {sorted(shapes)}; "
                    f"every image must be [{image}]"
                )
            if not all(isinstance(p, np.ndarray) for p in pixel_values):
                raise InputError(
                    f"pixel_values must be a float32 numpy array {expected} (or a list of "
                    f"[{image}] ones), got a list of {type(pixel_values[0]).__name__}: "
                    "np.asarray(..., dtype=np.float32) makes one"
                )
            pixel_values = np.stack(pixel_values)
        if not isinstance(pixel_values, np.ndarray):
            raise InputError(
                f"pixel_values must be a numpy array, got {type(pixel_values).__name__}"
            )
        if pixel_values.dtype != np.float32:
            raise InputError(f"pixel_values must be float32, got {pixel_values.dtype}")
        shape = pixel_values.shape
        if len(shape) != 4 or shape[0] < 1 or shape[1:] != (m.num_channels, *m.image_size):
            raise InputError(f"pixel_values has shape {list(shape)}, expected {expected}")
        finite = np.isfinite(pixel_values)
        if not finite.all():  # NaN K/V left in the cache rows would reach the next request too
            bad = int(finite.size - np.count_nonzero(finite))
            raise InputError(f"pixel_values has {bad} non-finite value(s) (NaN or infinity)")
        return np.ascontiguousarray(pixel_values)

    @property
    def processor(self):
        if self._processor is None:
            from .preprocess import ImageProcessor

            channels = self.manifest.num_channels
            if channels not in (None, 3):
                raise InputError(
                    f"this export's encoder takes {channels}-channel images and vedrt's image "
                    "preprocessing makes RGB: pass pixel values made by the checkpoint's own "
                    "processor to generate()"
                )
            self._processor = ImageProcessor.from_file(
                self.manifest.root / "preprocessor_config.json"
            )
        return self._processor

    @property
    def detokenizer(self):
        if self._detokenizer is None:
            from .text import Detokenizer

            self._detokenizer = Detokenizer(self.manifest.root)
        return self._detokenizer

    def preprocess(self, images: list[Any]) -> np.ndarray:
        """Paths, encoded image bytes, binary file objects or PIL images -> pixel values, as the
        checkpoint's image processor makes them."""
        if self.manifest.modality == "text":
            raise InputError(
                "this export is a text model: use generate_text(texts) or "
                "generate(input_ids, attention_mask=...)"
            )
        from .preprocess import load_image

        keep = self.processor.keep_short_side
        return self.processor([load_image(image, keep_short_side=keep) for image in images])

    def decode(self, sequences: np.ndarray) -> list[str]:
        return self.detokenizer.decode(sequences)

    def caption(self, images: Any, **options: Any) -> list[str]:
        """Captions for one image or a list of them (paths, encoded bytes, binary file objects or
        PIL images; num_return_sequences per image, in order)."""
        single = isinstance(images, str | Path | bytes | bytearray | memoryview)
        if single or hasattr(images, "mode") or hasattr(images, "read"):
            images = [images]
        images = list(images)
        if not images:
            return []
        options = {**options, "return_dict": False}
        return self.decode(self.generate(self.preprocess(images), **options))
