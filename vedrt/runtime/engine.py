"""The engine: requests stepped together over a pool of decoder rows (continuous batching).

    engine = gen.engine(max_rows=32)
    handle = engine.submit(pixel_values, num_beams=4)   # thread-safe; waits first in, first out
    engine.step()                                        # or engine.start() for a background loop
    handle.result(timeout=None)                          # exactly what gen.generate(...) returns

Every `step()` admits the waiting requests that fit (their images through the encoder and cross
K/V, once, into free image slots), runs ONE decoder step over the active rows of all requests,
each row at its own position, then lets each request's search (`search.py`) advance on its own
rows: processors, top-k, beam bookkeeping, and the reorder of its own cache rows. Requests that
finish leave at once; their rows and slots go to the next ones. Requests with equal options and
no logits processor share one search even when they arrive at different steps (`cohort.py`), so
the host's work per step grows with the option sets, not the requests. With `encode_ahead`, the
background loop has the encoder run on a second thread (`ahead.py`). `Generator.generate()` is
this engine with one request, so the parity tests against transformers test it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from .ahead import EncodeAhead
from .background import BackgroundLoop
from .cohort import NONFINITE
from .cohort import Active as _Active
from .cohort import can_join as _can_join
from .encoding import encode_admitted
from .errors import InputError
from .handle import EngineStopped, Handle, input_batch, owned, run_callbacks
from .options import GenerationOptions, is_int
from .rows import Rows
from .search import new_search, rows_needed

__all__ = ["Engine", "EngineStopped", "Handle"]


class Engine(BackgroundLoop):
    """A pool of `max_rows` decoder rows that requests join and leave at step boundaries."""

    poll_seconds = 0.5  # idle threads wake this often without a notice (a safety net only)

    def __init__(
        self,
        generator: Any,
        max_rows: int = 32,
        cache_len: int | None = None,
        admit_every: float = 0.0,
        encode_ahead: bool = False,
    ):
        """admit_every: seconds between admissions while requests are running (0: every step).
        Requests arriving within one such window are admitted together, and those with equal
        options share one search: fewer searches per step, at the cost of up to that wait.
        encode_ahead: with `start()`, encode waiting requests on a second thread while the
        decoder steps (`ahead.py`), instead of inside the step that admits them."""
        if not is_int(max_rows) or max_rows < 1:
            raise InputError(f"max_rows must be a positive integer, got {max_rows!r}")
        max_rows = int(max_rows)
        self.admit_every = float(admit_every)
        self.encode_ahead = bool(encode_ahead)
        self._ahead: EncodeAhead | None = None
        self._last_admission = 0.0
        self.gen = generator
        self.executor = generator.executor
        self.ops = self.executor.ops
        self.max_rows = max_rows
        self._rows = Rows(self.executor, max_rows, cache_len)
        self._waiting: deque[Handle] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()
        self._due: list | None = None  # callbacks of requests finished in this step (`_finish`)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: BaseException | None = None  # what ended the background loop, if not stop()
        self._drain = True
        self._closed = False
        # counters for metrics and benchmarks: seconds in whole steps and in the decoder graph
        # itself (for ONNX Runtime: inside its run, the host's writes around it excluded)
        self.stats = {
            "steps": 0,
            "row_steps": 0,
            "rows_last_step": 0,
            "tokens": 0,
            "finished": 0,
            "step_seconds": 0.0,
            "decode_seconds": 0.0,
        }

    # -- requests -------------------------------------------------------------------------
    def submit(self, inputs: Any, attention_mask: Any = None, **options: Any) -> Handle:
        """Queue one request: pixel values [n, C, H, W], or for a text model input_ids [n, L]
        (with its attention_mask); the options are `generate()`'s, checked here (InputError)."""
        o = self.gen.options(**options)
        checked = owned(self.gen.check_inputs(inputs, attention_mask, o), inputs, attention_mask)
        return self.submit_resolved(checked, o)

    def submit_resolved(self, inputs: Any, o: GenerationOptions) -> Handle:
        """`submit` for inputs and options already checked (`Generator.check_inputs`)."""
        batch = input_batch(inputs)
        rows = rows_needed(o, batch)
        if rows > self.max_rows:
            kind = "text(s)" if self.gen.manifest.modality == "text" else "image(s)"
            raise InputError(
                f"the request needs {rows} decoder rows ({batch} {kind} x {rows // batch}), "
                f"more than this engine's max_rows={self.max_rows}"
            )
        check = getattr(self.executor, "check_limits", None)
        if check is not None:  # engines built for bounded shapes say so before anything runs
            check(batch, o.num_beams, o.max_new)
        handle = Handle(inputs, o, rows)
        handle.unqueue = self._unqueue
        with self._wake:
            if self._closed:
                why = "" if self.failure is None else f" (its loop failed: {self.failure!r})"
                raise EngineStopped(f"the engine is stopped and accepts no new requests{why}")
            self._waiting.append(handle)
            self._wake.notify_all()  # the loop and the encoder thread both wait on it
        return handle

    @property
    def min_cache_len(self) -> int | None:
        return self._rows.min_cache_len

    def pool_bytes(self) -> int:
        """Bytes of the cache pool's K/V buffers (0 before the first admission)."""
        pool = self._rows.pool
        if pool is None:
            return 0
        buffers = (pool.cache, pool.cross, pool.group_cross)
        return sum(int(b.nbytes) for b in buffers if b is not None)

    @property
    def pending(self) -> int:
        """Requests waiting for rows."""
        with self._lock:
            return len(self._waiting)

    @property
    def pool(self) -> Any:
        return self._rows.pool

    @property
    def _active(self) -> list[_Active]:
        return self._rows.active

    @property
    def active_rows(self) -> int:
        return self._rows.used

    @property
    def active_requests(self) -> int:
        return len(self._active)

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._active

    def _unqueue(self, handle: Handle) -> bool:
        """`Handle.cancel` of a waiting request: out of the queue now (not when it reaches the
        head). False once the engine has taken it (it is then dropped at the next step)."""
        with self._lock:
            try:
                self._waiting.remove(handle)
            except ValueError:
                return False
            self._left_queue([handle])
            return True

    def _finish(self, handle: Handle, result: Any = None, error: Any = None) -> None:
        """Settle a request inside a step; its callbacks run after the step lets go of its
        locks, so that one may use the engine (`pending`, `submit`, even `step`)."""
        handle._finish(result, error, later=self._due)

    # -- one step -------------------------------------------------------------------------
    def step(self) -> list[Handle]:
        """Admit what fits, run one decoder step over every active row, advance each request's
        search; returns the requests that finished on this step (their rows freed)."""
        due: list = []
        try:
            with self._step_lock:
                self._due = due
                try:
                    return self._step()
                finally:
                    self._due = None
        finally:
            run_callbacks(due)

    def _step(self) -> list[Handle]:
        finished = self._drop_cancelled()
        self._admit()
        if not self._active:
            return finished
        began = time.perf_counter()
        try:
            out = self._decode()
        except Exception as exc:  # the step failed for every row in it
            for a in self._active:
                for handle, _ in a.open_members():
                    self._finish(handle, error=exc)
                    finished.append(handle)
            self._rows.release([*self._active])
            return finished
        done = []
        finite = self.ops.finite_rows(out.logits if out.top_ids is None else out.top_logprobs)
        for a in self._active:
            answered, over = self._advance(a, out, finite[a.offset : a.offset + a.rows])
            finished += answered
            if over:
                done.append(a)
            elif answered:  # the others go on: the answered ones' rows leave now
                self._rows.shrink(a, answered)
        self._rows.release(done)
        if finished and self._ahead is not None:  # rows freed: the encoder may be needed
            with self._wake:
                self._wake.notify_all()
        self.stats["step_seconds"] += time.perf_counter() - began
        return finished

    def _drop_cancelled(self) -> list[Handle]:
        dropped = []
        for a in self._active:
            cancelled = [h for h, _ in a.open_members() if h.cancel_requested]
            for handle in cancelled:
                self._finish(handle, error=EngineStopped("the request was cancelled"))
            if cancelled and a.open_members():
                self._rows.shrink(a, cancelled)
            dropped += cancelled
        self._rows.release([a for a in self._active if not a.open_members()])
        return dropped

    def _take_admissible(self) -> list[Handle]:
        """Waiting requests that fit in the free rows, first in, first out (no overtaking)."""
        now = time.monotonic()
        if self._active and now - self._last_admission < self.admit_every:
            return []
        self._last_admission = now
        free = self.max_rows - self.active_rows
        taken = []
        with self._lock:
            while self._waiting:
                head = self._waiting[0]
                if head.cancel_requested or head.done():  # cancelled, or failed to encode
                    self._left_queue([self._waiting.popleft()])
                    self._finish(head, error=EngineStopped("the request was cancelled"))
                    continue
                if head.rows > free or (self._ahead is not None and head.encoded is None):
                    break
                taken.append(self._waiting.popleft())
                free -= head.rows
            self._left_queue(taken)
        return taken

    def _left_queue(self, handles: list[Handle]) -> None:
        if self._ahead is not None:
            self._ahead.admitted(handles)

    def _head_ready(self) -> bool:
        """Is there a waiting request `step()` could act on (under the lock)?"""
        if not self._waiting:
            return False
        head = self._waiting[0]
        return (
            self._ahead is None or head.encoded is not None or head.done() or head.cancel_requested
        )

    def _admit(self) -> None:
        taken = self._take_admissible()
        if not taken:
            return
        try:
            plans = encode_admitted(self.executor, self.gen.manifest, self._rows, taken)
        except Exception as exc:  # these requests could not be encoded or given room
            for h in taken:
                self._finish(h, error=exc)
            return
        try:
            for handles, members, batch, slots in plans:
                search = new_search(self.ops, handles[0].options, batch)
                joined = next((a for a in self._active if _can_join(a, handles[0].options)), None)
                cohort = self._rows.place(members, search, slots, joined)
                if joined is None and isinstance(handles[0].inputs, dict):  # texts: attentions
                    cohort.enc_width = max(h.inputs["input_ids"].shape[1] for h in handles)
                for handle in handles:
                    handle.admitted()
                    handle.encoded = None  # the slots hold its K/V now
        except BaseException as exc:  # a bug: those not placed are in no queue and no cohort
            for handle in taken:
                if handle.started_at is None:
                    self._finish(handle, error=EngineStopped(f"admission failed: {exc!r}"))
            raise

    def _decode(self) -> Any:
        groups = self._rows.layout_groups()
        rows = self.active_rows
        want = any(a.search.collect.want_attentions for a in self._active)
        began = time.perf_counter()
        out = self.executor.decode(self.pool, rows, groups, want)
        graph = getattr(self.executor, "last_graph_seconds", None)  # see `Executor`
        self.stats["decode_seconds"] += time.perf_counter() - began if graph is None else graph
        self.stats["steps"] += 1
        self.stats["row_steps"] += rows
        self.stats["rows_last_step"] = rows
        return out

    def _advance(self, a: _Active, out: Any, finite: Any) -> tuple[list[Handle], bool]:
        """One search step for `a` on its rows: (the requests answered, whether `a` is over).
        A request whose rows came out NaN or infinite (inputs past the model's number range)
        fails, its rows and slots zeroed; the others in `a` go on as if it were not there."""
        start, end = a.offset, a.offset + a.rows
        failed = []
        if not finite.all():
            failed, rows, slots = a.nonfinite(finite)
            for handle in failed:
                self._finish(handle, error=InputError(NONFINITE))
            self.pool.clear([start + r for r in rows], slots)
        attn = None
        if out.cross_attn is not None:  # the pool's encoder width may be a longer request's
            attn = [x[start:end, ..., : a.enc_width] for x in out.cross_attn]
        top = None
        if out.top_ids is not None:
            top = (out.top_logprobs[start:end], out.top_ids[start:end])
        try:
            advance = a.search.step(out.logits[start:end], attn, top)
        except Exception as exc:  # one search's failure is its own requests'
            for handle, _ in a.open_members():
                self._finish(handle, error=exc)
            return a.handles, True
        pool = self.pool
        pool.past_lengths[start:end] += 1
        self.stats["tokens"] += a.rows
        answered, members = failed, a.open_members()
        if advance.done or len(a.members) == 1:
            stopped = [advance.done] * len(members)
        else:
            stopped = a.search.stopped([images for _, images in members])
        for (handle, images), stop in zip(members, stopped, strict=True):
            if stop:
                result = a.search.result(images)
                self._finish(handle, result if handle.options.return_dict else result.sequences)
                self.stats["finished"] += 1
                answered.append(handle)
        if advance.done or not a.open_members():
            return answered, True
        if advance.source_rows is not None:
            self._rows.reorder(a, advance.source_rows, advance.shared)
        pool.input_ids[start:end, 0] = advance.tokens
        return answered, False
