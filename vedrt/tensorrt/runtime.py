"""`TrtExecutor`: the engines `vedrt build` wrote, run on torch's CUDA stream.

Every tensor is a torch CUDA tensor whose address is handed to TensorRT (`set_tensor_address`),
so the device search loop reads logits and the cache where the engine wrote them. Addresses and
shapes are set only when they change (the cache's two ping-pong buffers, a new batch size): a
steady decoder step is two small copies and one `execute_async_v3`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..gpu.device import finish_step, step_tensors, to_device
from ..gpu.ops import TorchOps
from ..manifest import Manifest
from ..runtime.executor import Encoded, StepOutput
from ..runtime.pool import KVPool
from .profiles import GRAPHS, Limits, read_index


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise InputError(
            "backend='tensorrt' needs the tensorrt package (pip install 'vedrt[tensorrt]')"
        ) from None
    return trt


class _Engine:
    """One deserialized engine, its execution context and what is currently bound to it."""

    def __init__(self, trt, runtime, path: Path):
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise InputError(f"{path.name}: cannot load this engine (rebuild it with vedrt build)")
        self.context = self.engine.create_execution_context()
        self.trt = trt
        self.bound: dict[str, tuple[int, tuple[int, ...]]] = {}

    def bind(self, name: str, tensor: torch.Tensor, is_input: bool) -> None:
        """Set the address (and an input's shape) unless this very tensor is already bound."""
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if self.bound.get(name) == key:
            return
        if is_input and not self.engine.is_shape_inference_io(name):
            self.context.set_input_shape(name, tuple(tensor.shape))
        self.context.set_tensor_address(name, tensor.data_ptr())
        self.bound[name] = key

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        for name, tensor in inputs.items():
            self.bind(name, tensor, True)
        for name, tensor in outputs.items():
            self.bind(name, tensor, False)
        stream = torch.cuda.current_stream().cuda_stream
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")


class TrtExecutor:
    """The device executor over encoder / cross_kv / decoder engines of one precision."""

    def __init__(self, manifest: Manifest, device: str = "cuda", precision: str = "fp16"):
        trt = _import_tensorrt()
        self.m = manifest
        self.device = torch.device(device)
        self.layers = manifest.num_layers
        index = read_index(manifest.root)
        entries = index.get("engines", {}).get(precision)
        if not entries or any(g not in entries for g in GRAPHS):
            raise InputError(
                f"{manifest.root}: no {precision} TensorRT engines "
                f"(build them: vedrt build {manifest.root}{' --fp16' if precision == 'fp16' else ''})"
            )
        if index.get("tensorrt_version") != trt.__version__:
            raise InputError(
                f"engines were built with TensorRT {index.get('tensorrt_version')}, this is "
                f"{trt.__version__}: rebuild with vedrt build"
            )
        self.limits = Limits(**index["limits"][precision])
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self.engines = {
            g: _Engine(trt, runtime, manifest.root / entries[g]["file"]) for g in GRAPHS
        }
        self.ops = TorchOps(self.device)

    def check_limits(self, batch: int, beams: int, max_new: int) -> None:
        """Engines serve bounded shapes: say which bound a request exceeds, before it runs."""
        lim = self.limits
        if batch > lim.max_batch or beams > lim.max_beams or max_new > lim.max_new_tokens:
            raise InputError(
                f"batch={batch}, num_beams={beams}, max_new_tokens={max_new} exceeds the engines' "
                f"limits ({lim.max_batch}, {lim.max_beams}, {lim.max_new_tokens}); rebuild with "
                "vedrt build --max-batch/--max-beams/--max-new-tokens"
            )

    def encode(self, pixel_values: np.ndarray) -> Encoded:
        m = self.m
        pixels = to_device(pixel_values, self.device, torch.float32)
        batch = pixels.shape[0]
        enc = self.engines["encoder"]
        enc.bind("pixel_values", pixels, True)  # sets the input shape, so the output's is known
        states = torch.empty(
            tuple(enc.context.get_tensor_shape("encoder_hidden_states")), device=self.device
        )
        enc.run({"pixel_values": pixels}, {"encoder_hidden_states": states})
        cross = {
            f"cross_{kv}.{i}": torch.empty(
                (batch, m.num_heads, m.enc_len, m.head_dim), device=self.device
            )
            for i in range(self.layers)
            for kv in ("key", "value")
        }
        self.engines["cross_kv"].run({"encoder_hidden_states": states}, cross)
        mask = torch.ones((batch, m.enc_len), dtype=torch.int64, device=self.device)
        return Encoded(list(cross.values()), mask)

    def new_pool(self, rows: int, slots: int, cache_len: int, enc_len: int) -> KVPool:
        lim = self.limits
        if rows > lim.max_batch * lim.max_beams or cache_len > lim.max_new_tokens:
            raise InputError(
                f"an engine of {rows} rows and {cache_len} positions exceeds the TensorRT "
                f"engines' limits ({lim.max_batch * lim.max_beams} rows, {lim.max_new_tokens} "
                "positions); rebuild with vedrt build --max-batch/--max-beams/--max-new-tokens"
            )
        dims = (self.layers, self.m.num_heads, self.m.head_dim)
        return KVPool(self.ops, dims, rows, slots, cache_len, enc_len, torch.float32)

    def decode(
        self, pool: KVPool, rows: int, groups: int, want_attentions: bool = False
    ) -> StepOutput:
        inputs, outputs = step_tensors(
            pool, rows, groups, self.m.vocab_size, self.m.top_k, self.m.gathers_in_graph
        )
        self.engines["decoder"].run(inputs, outputs)
        return finish_step(pool, rows, outputs, want_attentions)


def trt_executor(
    manifest: Manifest, device: str = "cuda", threads: int | None = None, precision: str = "fp16"
) -> TrtExecutor:
    """The loader registry's factory for backend="tensorrt" (engines from `vedrt build`)."""
    from ..gpu import PRECISIONS

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not torch.cuda.is_available():
        raise InputError(f"device={device!r}: no CUDA GPU is visible to torch")
    return TrtExecutor(manifest, device, precision)
