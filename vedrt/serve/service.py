"""The model behind the endpoints: admission, image decoding or tokenizing, the engine, draining.

HTTP-free so the Starlette app and the Ray Serve replica share it. All methods run on the event
loop's thread; generation runs on the engine's thread and image decoding on a small pool, and the
two meet the loop only through `Handle.add_done_callback` -> `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime.errors import InputError
from ..runtime.handle import EngineStopped
from ..runtime.ops import NUMPY
from ..runtime.search import rows_needed
from . import images, protocol
from .errors import ServeError, bad_request
from .metrics import Metrics
from .options import ServeOptions

# Inputs this small are decoded on the event loop: the hop to the decoding thread and back (two
# thread wake-ups and a future handed across) cost more than decoding them. Scene model, greedy,
# 16 clients, interleaved: 456 -> 474 images/s, p99 62 -> 55 ms. At this size a decode takes well
# under a millisecond, so the loop is never held long; anything larger goes to the thread.
INLINE_PIXELS = 256 * 256  # all of a request's images together
INLINE_CHARS = 16 * 1024  # all of a request's texts together


@dataclass
class Answer:
    """One finished request: captions image-major (num_return_sequences each) and their tokens."""

    captions: list[str]
    tokens: np.ndarray


class Service:
    """One model, one engine; answers caption requests and knows when it may stop."""

    def __init__(self, options: ServeOptions, generator: Any = None, engine: Any = None):
        """`engine`: anything with the Engine interface (the benchmark's baselines), else ours."""
        from ..runtime import load

        self.options = options
        self.name = options.model_name
        self.generator = generator or load(options.model, threads=options.threads)
        self.modality = self.generator.manifest.modality
        self.tensors = protocol.BY_MODALITY[self.modality]
        self.text_tokenizer = None  # strings -> input_ids (text models with tokenizer.json)
        if self.modality == "text":
            self.text_tokenizer = _text_tokenizer(self.generator)
        else:
            _ = self.generator.processor  # load once, not on a decoding thread
        self.has_tokenizer = _loads_tokenizer(self.generator)
        self.engine = engine or self.generator.engine(
            options.max_rows, admit_every=options.admit_every, encode_ahead=options.encode_ahead
        )
        self.pool = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="vedrt-decode")
        self.metrics = Metrics(self)
        self.in_flight = 0  # admitted and not yet answered
        self.preparing = 0  # admitted, images still decoding (not in the engine's queue yet)
        self.draining = False
        self.started = False

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self.options.start_engine:
            self.engine.start()
        self.started = True

    def begin_drain(self) -> None:
        """Readiness false, new requests 503; those already admitted still get answered."""
        self.draining = True

    def drained(self) -> bool:
        return self.draining and self.in_flight == 0

    def close(self) -> None:
        self.draining = True
        self.engine.stop(drain=True)
        self.pool.shutdown(wait=True)

    @property
    def live(self) -> bool:
        """False once the engine's loop has died: only a restart brings the process back."""
        return self.engine.failure is None

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.live

    @property
    def queue_depth(self) -> int:
        return self.preparing + self.engine.pending

    # -- requests ---------------------------------------------------------------------------
    def check_tokenizer(self) -> None:
        if not self.has_tokenizer:
            raise bad_request("this export has no tokenizer: ask for the TOKENS output instead")

    def check_modality(self, modality: str) -> None:
        """/v1/caption is for image models, /v1/generate for text models: say which to use."""
        if modality != self.modality:
            endpoint = "/v1/caption" if self.modality == "image" else "/v1/generate"
            kind = "an image" if self.modality == "image" else "a text"
            raise bad_request(f"{self.name!r} is {kind} model: send its requests to {endpoint}")

    def check_text_tokenizer(self) -> None:
        if self.text_tokenizer is None:
            raise bad_request(
                "this text export has no tokenizer.json: TEXT inputs cannot be tokenized"
            )

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise ServeError(404, f"unknown model {name!r} (this server has {self.name!r})")

    def admit(self) -> None:
        """Refuse at once when draining or when the queue is full, before reading any image."""
        if not self.live:
            raise ServeError(
                503, f"the engine is not running: its loop failed ({self.engine.failure!r})"
            )
        if self.draining:
            raise ServeError(503, "the server is shutting down", {"Retry-After": "1"})
        if self.queue_depth >= self.options.max_queue:
            raise ServeError(
                503,
                f"the queue is full ({self.options.max_queue} requests waiting)",
                {"Retry-After": "1"},
            )

    async def caption(
        self,
        blobs: list[bytes],
        raw_options: dict[str, Any],
        disconnected: Callable[[], Awaitable[Any]] | None = None,
        timeout: float | None = None,
    ) -> Answer:
        """Decode, submit, await: a 400 before the engine, 503 when full, 504 past the deadline."""
        if not blobs:
            raise bad_request("no image in the request")
        self.check_modality("image")
        pixels = images.total_pixels(blobs)
        inline = pixels is not None and pixels <= INLINE_PIXELS
        return await self._run(
            len(blobs), lambda: self._prepare(blobs), raw_options, disconnected, timeout, inline
        )

    async def generate(
        self,
        texts: list[str],
        raw_options: dict[str, Any],
        disconnected: Callable[[], Awaitable[Any]] | None = None,
        timeout: float | None = None,
    ) -> Answer:
        """Tokenize (off the loop), submit the padded batch as one request, await; as `caption`."""
        if not texts:
            raise bad_request("no text in the request")
        self.check_modality("text")
        self.check_text_tokenizer()
        inline = sum(len(text) for text in texts if isinstance(text, str)) <= INLINE_CHARS
        return await self._run(
            len(texts), lambda: self._tokenize(texts), raw_options, disconnected, timeout, inline
        )

    async def _run(
        self,
        count: int,
        prepare: Callable[[], Any],
        raw_options: dict[str, Any],
        disconnected: Callable[[], Awaitable[Any]] | None,
        timeout: float | None,
        inline: bool = False,
    ) -> Answer:
        arrival = time.monotonic()
        deadline = arrival + min(
            timeout or self.options.request_timeout, self.options.request_timeout
        )
        options = images.generation_options(self.generator, raw_options)
        rows = rows_needed(options, count)
        if rows > self.options.max_rows:
            raise bad_request(
                f"the request needs {rows} decoder rows ({count} {self.modality}s x "
                f"{rows // count}), more than this server's --max-rows={self.options.max_rows}"
            )
        self.admit()
        self.in_flight += 1
        try:
            handle = await self._submit(prepare, options, inline, (arrival, deadline))
            (self.metrics.images if self.modality == "image" else self.metrics.texts).inc(count)
            return await self._await(handle, deadline, arrival, disconnected)
        finally:
            self.in_flight -= 1

    async def _submit(
        self, prepare: Callable[[], Any], options: Any, inline: bool, window: tuple[float, float]
    ) -> Any:
        """Decode (`prepare`) on the decoding thread, or `inline` on the event loop for inputs
        small enough that the hop to that thread and back costs more than the work. A request
        whose deadline (`window`: arrival, deadline) passed while it was decoded is not
        submitted: it would be answered late (or not at all, if the engine beat the timer)."""
        loop = asyncio.get_running_loop()
        self.preparing += 1
        try:
            inputs = prepare() if inline else await loop.run_in_executor(self.pool, prepare)
            if time.monotonic() >= window[1]:
                raise _late(*window)
            try:
                if isinstance(inputs, dict):  # a text batch: one request, padded and masked
                    ids, mask = inputs["input_ids"], inputs["attention_mask"]
                    checked = self.generator.check_inputs(ids, mask, options)
                else:
                    checked = self.generator.check_inputs(inputs, None, options)
                return self.engine.submit_resolved(checked, options)
            except InputError as exc:
                raise bad_request(str(exc)) from None
            except EngineStopped as exc:  # its loop failed (logged), or it is shutting down
                raise ServeError(503, f"the engine is not running: {exc}") from None
        finally:
            self.preparing -= 1

    def _prepare(self, blobs: list[bytes]) -> np.ndarray:
        """Worker thread: bytes -> pixel values (PIL decoding and resizing release the GIL)."""
        keep = self.generator.processor.keep_short_side
        limit = self.options.max_pixels
        pictures = [images.open_image(b, i, limit, keep) for i, b in enumerate(blobs)]
        try:
            return self.generator.processor(pictures)
        except InputError as exc:
            raise bad_request(str(exc)) from None

    def _tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Worker thread: strings -> padded input_ids + attention_mask, or a 400 naming the text."""
        for index, text in enumerate(texts):
            if not text.strip():
                raise bad_request(f"text {index}: empty")
        try:
            inputs = self.text_tokenizer(texts)
        except InputError as exc:
            raise bad_request(str(exc)) from None
        limit = self.generator.manifest.encoder.get("max_positions")
        lengths = inputs["attention_mask"].sum(axis=1)
        for index, length in enumerate(lengths.tolist()):
            if length == 0:
                raise bad_request(
                    f"text {index}: no tokens (the tokenizer dropped every character)"
                )
            if limit is not None and length > limit:
                raise bad_request(
                    f"text {index}: {length} tokens, more than the encoder's {limit} positions"
                )
        return inputs

    async def _await(
        self,
        handle: Any,
        deadline: float,
        arrival: float,
        disconnected: Callable[[], Awaitable[Any]] | None,
    ) -> Answer:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def finished(_handle: Any) -> None:  # engine thread
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        handle.add_done_callback(finished)
        waiters: set[asyncio.Future] = {done}
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        if watcher is not None:
            waiters.add(watcher)
        try:
            await asyncio.wait(
                waiters,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when="FIRST_COMPLETED",
            )
        finally:
            if watcher is not None and not watcher.done():
                watcher.cancel()
        # cancelling frees its rows (or queue place) at the next step; False: it finished as
        # the timer fired, and is answered
        if not done.done() and handle.cancel():
            if watcher is not None and watcher.done() and not watcher.cancelled():
                raise ServeError(
                    504,
                    "the client disconnected; the request was cancelled",
                    outcome="disconnected",
                )
            raise _late(arrival, deadline)
        if handle.started_at is not None:
            self.metrics.queue_time.observe(max(0.0, handle.started_at - arrival))
        error = handle.exception(0)
        if error is not None:
            if isinstance(error, InputError):
                raise bad_request(str(error))
            raise ServeError(500, f"generation failed: {type(error).__name__}: {error}")
        sequences = np.asarray(handle.result(0))
        self.metrics.tokens.inc(self._generated_tokens(sequences, handle.options))
        captions = self.generator.decode(sequences) if self.has_tokenizer else []
        return Answer(captions=captions, tokens=sequences)

    def _generated_tokens(self, sequences: np.ndarray, options: Any) -> int:
        """Tokens after the start token, up to and including each row's first end token."""
        generated = sequences[:, 1:]
        if not options.eos_token_id or generated.size == 0:
            return int(generated.size)
        ends = NUMPY.isin(generated, options.eos_token_id)  # a few ==, not np.isin's sort
        lengths = np.where(ends.any(axis=1), ends.argmax(axis=1) + 1, generated.shape[1])
        return int(lengths.sum())


def _text_tokenizer(generator: Any) -> Any:
    """The export's tokenizer.json as `Generator.generate_text` uses it, or None without one."""
    from ..runtime.textinputs import Tokenizer

    try:
        return Tokenizer(generator.manifest.root, generator.manifest)
    except InputError:
        return None


def _loads_tokenizer(generator: Any) -> bool:
    """Exports without tokenizer.json still serve token ids (TOKENS), just not captions."""
    try:
        _ = generator.detokenizer
    except InputError:
        return False
    return True


def _late(arrival: float, deadline: float) -> ServeError:
    return ServeError(504, f"the request took longer than {deadline - arrival:g} s; cancelled")
