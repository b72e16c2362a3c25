"""What executes the three graphs, apart from the search and the engine that drive them.

One protocol for every backend: encode images once (`encode`), allocate the engine's pool of
cache rows and image slots in the executor's memory (`new_pool`, a `KVPool` over the executor's
`ops`), and run one decoder step over the pool's first `rows` rows (`decode`), writing each row's
new keys/values at its own position. Where the tensors live is the executor's business:
`OrtExecutor` runs the export directory on ONNX Runtime with numpy buffers bound through IO
binding (the pool is read in place); `vedrt.gpu` and `vedrt.tensorrt` provide torch executors.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..manifest import Manifest
from .errors import InputError
from .ops import NUMPY
from .pool import KVPool
from .probe import check_positions

# ONNX Runtime's load-time fusion of a residual Add + LayerNormalization into SkipLayerNormalization,
# whose CPU kernel is 3-8x slower than the two ops (vedrt/export/optimize.py has the figures).
SKIP_LAYER_NORM = ["SkipLayerNormFusion"]
OUTPUTS = "outputs"  # the key of a pool's step outputs among its bindings (`_outputs`)
# Bindings kept per pool: one per (rows, groups, layout) met. A server meets many (1 to max_rows
# rows, groups in or out of slot order); with 16 kept, 1 step in 12 rebound (~0.3 ms each).
MAX_BINDINGS = 256

# The most encoder positions (images x positions per image) one CPU encoder call runs; see
# `OrtExecutor.encode`. Measured flat per image up to ~1,600 (ViT-base 8 images, TrOCR-base 2).
ENCODE_TOKENS = 1600


@dataclass
class Encoded:
    """A batch of images after the encoder and cross_kv graphs, in the executor's memory."""

    cross: list[Any]  # 2 * layers arrays [batch, heads, enc_len, head_dim]: k0, v0, k1, ...
    mask: Any  # [batch, enc_len] int64: which encoder positions are real (all 1 for images)

    @property
    def batch(self) -> int:
        return int(self.cross[0].shape[0])

    @property
    def enc_len(self) -> int:
        return int(self.cross[0].shape[2])


@dataclass
class StepOutput:
    """One decoder step's results for the pool's first rows; valid until the next step."""

    logits: Any  # [rows, vocab], last position of the step
    cross_attn: list[Any] | None  # per layer [rows, heads, 1, enc_len], when asked for
    top_logprobs: Any = None  # [rows, top_k] float32: the best of log_softmax(logits), best first
    top_ids: Any = None  # [rows, top_k] int64: their token ids


class Executor(Protocol):
    """The graph runner the engine drives; see the module docstring."""

    ops: Any  # the array operations of this executor's memory (`NumpyOps`, `TorchOps`)

    def encode(self, inputs: Any) -> Encoded:
        """Run the encoder and cross_kv graphs once per image (or text): pixel values, or a
        text model's {"input_ids", "attention_mask"}."""

    def new_pool(self, rows: int, slots: int, cache_len: int, enc_len: int) -> KVPool:
        """The engine's cache rows and image slots, in this executor's memory."""

    def decode(
        self, pool: KVPool, rows: int, groups: int, want_attentions: bool = False
    ) -> StepOutput:
        """One step over rows [0, rows) of `pool` (inputs already in its step buffers; rows in
        `groups` equal groups reading the K/V `pool.group_inputs(groups)` gives for the layout
        `pool.set_groups` made), new K/V written in place."""

    # An executor that runs its graph synchronously on the host may also say, in a property
    # `last_graph_seconds` (per calling thread, None before any call), how long the latest
    # `decode` on this thread spent inside the graph runtime alone: then the engine's
    # `decode_seconds` leaves out the host work `decode` does around it (binding lookup, the new
    # K/V written into the pool), which is search-side cost, not graph cost.


class OrtExecutor:
    """Runs encoder.onnx, cross_kv.onnx and decoder.onnx with ONNX Runtime on numpy buffers."""

    ops = NUMPY

    def __init__(self, manifest: Manifest, device: str = "cpu", threads: int | None = None):
        self.m = manifest
        self.layers = manifest.num_layers
        self.device = device
        self.threads = threads
        files = dict(manifest.graph_files)
        lean = manifest.decoder_without_attentions
        if lean is not None:  # the step without attention outputs; see `_attention_session`
            files["decoder"] = lean
        self._timing = threading.local()  # `last_graph_seconds`, per engine thread
        self.sessions = {
            name: _session(path, device, threads, arena=name == "decoder")
            for name, path in files.items()
        }
        self._with_attentions = None if lean is not None else self.sessions["decoder"]
        self._check_decoder_io(self.sessions["decoder"], files["decoder"], attentions=lean is None)
        check_positions(manifest, self.sessions["decoder"])  # vedrt.json vs graph, at load

    def _attention_session(self):
        """The decoder graph with its `cross_attn.{i}` outputs, loaded the first time a step
        wants attentions: every other step runs the graph without them, which is faster (see
        `vedrt.export.optimize.write_lean_decoder`), and most processes never load this one."""
        if self._with_attentions is None:
            path = self.m.graph_files["decoder"]
            session = _session(path, self.device, self.threads)
            self._check_decoder_io(session, path, attentions=True)
            self._with_attentions = session
        return self._with_attentions

    def _check_decoder_io(self, session, path, attentions: bool) -> None:
        have = {i.name for i in session.get_inputs()} | {o.name for o in session.get_outputs()}
        # exports before 2026-12-06 gather each group's cross K/V in the graph, every step
        self.gathers_in_graph = "group_slots" in have
        need = {"input_ids", "past_lengths", "encoder_mask", "logits", "top_ids"}
        for i in range(self.layers):
            need |= {
                f"self_key.{i}",
                f"self_value.{i}",
                f"cross_key.{i}",
                f"cross_value.{i}",
                f"new_key.{i}",
                f"new_value.{i}",
            }
            if attentions:
                need.add(f"cross_attn.{i}")
        missing = sorted(need - have)
        if missing:
            raise InputError(
                f"{path}: not a decoder graph of this vedrt version "
                f"(lacks {', '.join(missing[:4])}); re-export the model with `vedrt export`"
            )

    def encode(self, inputs: Any) -> Encoded:
        """Pixel values [n, C, H, W], or a text model's {"input_ids", "attention_mask"}.

        On the CPU, images go through in calls of at most `ENCODE_TOKENS` encoder positions:
        past that, activations and attention scores outgrow the caches and every image costs
        more (ViT-base, 197 positions: 285 ms an image at batch 8, 364 ms at batch 32; the
        TrOCR-base shape, 577 positions: 893 ms at batch 1, 1,064 ms at batch 16; 2 threads)."""
        if isinstance(inputs, dict):
            return self._encode({name: inputs[name] for name in ("input_ids", "attention_mask")})
        return self.encode_into(inputs, None)

    def encode_into(self, pixel_values: np.ndarray, into: list[np.ndarray] | None) -> Encoded:
        """`encode` for images, the cross K/V written into `into` (2 * layers arrays [n, heads,
        enc_len, head_dim], each C-contiguous: the engine passes its pool's image slots), or into
        new arrays when None. Writing into the slots spares a copy of every image's K/V, and the
        peak memory of holding both (ViT-GPT2: 14.5 MB an image)."""
        per_call = max(1, ENCODE_TOKENS // max(self.m.enc_len, 1))
        if into is None and (self.device != "cpu" or len(pixel_values) <= per_call):
            return self._encode({"pixel_values": pixel_values})
        if into is None:  # the batch's arrays, each call's K/V written into its part of them
            shape = (len(pixel_values), self.m.num_heads, self.m.enc_len, self.m.head_dim)
            into = [np.empty(shape, np.float32) for _ in range(2 * self.layers)]
        masks = []
        for start in range(0, len(pixel_values), per_call):
            chunk = pixel_values[start : start + per_call]
            part = self._encode(
                {"pixel_values": chunk}, [c[start : start + len(chunk)] for c in into]
            )
            masks.append(part.mask)
        return Encoded(into, np.concatenate(masks))

    def _encode(self, feed: dict[str, np.ndarray], into: list[np.ndarray] | None = None) -> Encoded:
        (states,) = self.sessions["encoder"].run(["encoder_hidden_states"], feed)
        names = [f"cross_{kv}.{i}" for i in range(self.layers) for kv in ("key", "value")]
        if into is None:
            arrays = self.sessions["cross_kv"].run(names, {"encoder_hidden_states": states})
        else:  # written in place by address
            io = self.sessions["cross_kv"].io_binding()
            io.bind_cpu_input("encoder_hidden_states", np.ascontiguousarray(states))
            for name, array in zip(names, into, strict=True):
                assert array.flags.c_contiguous and array.dtype == np.float32
                io.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
            self.sessions["cross_kv"].run_with_iobinding(io)
            arrays = into
        mask = feed.get("attention_mask")
        mask = np.ones(states.shape[:2], dtype=np.int64) if mask is None else mask
        return Encoded(arrays, mask)

    def new_pool(self, rows: int, slots: int, cache_len: int, enc_len: int) -> KVPool:
        dims = (self.layers, self.m.num_heads, self.m.head_dim)
        return KVPool(self.ops, dims, rows, slots, cache_len, enc_len, np.float32)

    def _outputs(self, pool: KVPool) -> dict[str, np.ndarray]:
        """The step's outputs for the pool's most rows, made once per pool (and encoder length):
        each binding binds their first rows, so bindings of every row count share them."""
        buffers = pool.bindings.get(OUTPUTS)
        if buffers is None or buffers["cross_attn.0"].shape[-1] != pool.enc_len:
            rows, h, d = pool.rows, self.m.num_heads, self.m.head_dim
            buffers = {
                "logits": np.empty((rows, self.m.vocab_size), np.float32),
                "top_logprobs": np.empty((rows, self.m.top_k), np.float32),
                "top_ids": np.empty((rows, self.m.top_k), np.int64),
                # every layer's new K/V in one array: the pool writes them in one indexed copy
                "new_kv": np.empty((2 * self.layers, rows, h, 1, d), np.float32),
            }
            for i in range(self.layers):  # written only by the graph that declares them
                buffers[f"cross_attn.{i}"] = np.empty((rows, h, 1, pool.enc_len), np.float32)
            pool.bindings[OUTPUTS] = buffers
        return buffers

    def _bind(self, pool: KVPool, rows: int, groups: int, session, key: tuple):
        """Bind the pool's buffers and outputs (once per pool version, sizes and layout)."""
        import onnxruntime as ort

        def value(array: np.ndarray):
            assert array.flags.c_contiguous  # bound by address: read in place, never copied
            return ort.OrtValue.ortvalue_from_numpy(array)

        # bindings of an older version hold its buffers, reallocated since: drop them
        for old in [k for k in pool.bindings if k != OUTPUTS and k[0] != pool.version]:
            del pool.bindings[old]
        if len(pool.bindings) > MAX_BINDINGS:  # sizes met long ago
            buffers = pool.bindings.pop(OUTPUTS, None)
            pool.bindings.clear()
            if buffers is not None:
                pool.bindings[OUTPUTS] = buffers
        io = session.io_binding()
        declared = {o.name for o in session.get_outputs()}
        io.bind_ortvalue_input("input_ids", value(pool.input_ids[:rows]))
        io.bind_ortvalue_input("past_lengths", value(pool.past_lengths[:rows]))
        for name, array in pool.cross_inputs(groups, self.gathers_in_graph).items():
            io.bind_ortvalue_input(name, value(array))
        for i in range(self.layers):
            for j, kv in enumerate(("key", "value")):
                io.bind_ortvalue_input(f"self_{kv}.{i}", value(pool.cache[i, j, :rows]))
        buffers = self._outputs(pool)
        outputs = {name: array[:rows] for name, array in buffers.items() if name != "new_kv"}
        outputs["new_kv"] = new_kv = buffers["new_kv"][:, :rows]  # [2L, rows, ...]: a view
        for i in range(self.layers):  # each layer's rows are contiguous within it
            outputs[f"new_key.{i}"] = new_kv[2 * i]
            outputs[f"new_value.{i}"] = new_kv[2 * i + 1]
        for name, array in outputs.items():
            if name in declared:
                assert array.flags.c_contiguous  # written in place by address
                io.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        pool.bindings[key] = (io, outputs)
        return io, outputs

    @property
    def last_graph_seconds(self) -> float | None:
        """Inside `run_with_iobinding` alone, for this thread's latest `decode` (see `Executor`)."""
        return getattr(self._timing, "seconds", None)

    def decode(
        self, pool: KVPool, rows: int, groups: int, want_attentions: bool = False
    ) -> StepOutput:
        session = self._attention_session() if want_attentions else self.sessions["decoder"]
        key = (pool.version, rows, groups, pool.in_place, want_attentions)
        bound = pool.bindings.get(key)
        io, outputs = bound if bound is not None else self._bind(pool, rows, groups, session, key)
        began = time.perf_counter()
        session.run_with_iobinding(io)
        self._timing.seconds = time.perf_counter() - began
        pool.write_new(outputs["new_kv"], rows)
        attn = [outputs[f"cross_attn.{i}"] for i in range(self.layers)] if want_attentions else None
        return StepOutput(outputs["logits"], attn, outputs["top_logprobs"], outputs["top_ids"])


def ort_executor(manifest: Manifest, device: str = "cpu", threads: int | None = None, **options):
    """The registry's factory for ONNX Runtime on the CPU (see `loader.py`)."""
    from .threads import default_threads

    if options:
        raise TypeError(f"load() got unexpected keyword arguments {sorted(options)}")
    threads = default_threads() if threads is None else threads
    return OrtExecutor(manifest, device=device, threads=threads)


def _session(path, device: str, threads: int | None, arena: bool = True):
    """One graph's session.

    `arena=False` for the graphs run once per admitted batch (encoder, cross K/V): ONNX Runtime's
    CPU arena would keep their largest batch's activations resident for the process's life (20
    MB of ViT-GPT2's fp32 peak RSS at batch 1, and it grows with the batch), and measured here
    they run no slower without it (ViT-base encoder 289 vs 293 ms at batch 1, 2.10 vs 2.09 s at
    batch 8, interleaved). The decoder keeps it: it runs every step on small buffers.

    Every session's threads spin while its graph runs and stop when the run returns
    (`session.force_spinning_stop`). Each session has its own thread pool: one left spinning
    after its run takes the cores from the next graph's (the cross K/V after the encoder: 28 ->
    57 ms, ViT-GPT2, 2 threads; the next request's encoder after the decoder's last step:
    215-222 -> 259-265 ms), while no spinning at all makes each of the encoder's ~300 kernels
    wake its threads (ViT-base encoder 199.6 ms without spinning, 186.5 ms spinning within its
    run; interleaved, 12 repetitions). The decoder's threads, parked through the host's search
    and woken by the next step, cost that step nothing measurable (ViT-GPT2 beam 4, 16 steps:
    350 / 371 / 389 ms against 335 / 381 / 397 spinning on)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(
                "device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available)"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        raise InputError(f"unknown device {device!r} (use 'cpu' or 'cuda')")
    # ONNX Runtime would fuse Add + LayerNormalization back into its slower CPU kernel at load
    disabled = SKIP_LAYER_NORM if device == "cpu" else None
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=providers, disabled_optimizers=disabled
        )
    except Exception as exc:  # ORT raises several types for unreadable models
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: corrupt or unreadable ONNX graph ({first[:200]})") from None
