"""ONNX Runtime on CUDA with every tensor bound in device memory (IO binding over torch tensors).

The CPU runtime's `OrtExecutor` can use the CUDA provider too, but its numpy buffers cross the
bus at every step. Here the cache, the cross K/V, the step's inputs and outputs all live in torch
CUDA tensors bound by address; ONNX Runtime runs on torch's current stream (`user_compute_stream`)
so no synchronisation is needed between the two, and the search loop stays on the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..manifest import Manifest
from ..runtime.executor import Encoded, StepOutput
from ..runtime.pool import KVPool
from .device import finish_step, step_tensors, to_device
from .ops import TorchOps

_NP = {torch.float32: np.float32, torch.int64: np.int64}


class OrtCudaExecutor:
    """encoder.onnx, cross_kv.onnx and decoder.onnx on the CUDA execution provider."""

    def __init__(self, manifest: Manifest, device: str = "cuda", threads: int | None = None):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(
                "backend='onnxruntime', device='cuda' needs onnxruntime-gpu "
                "(CUDAExecutionProvider is not available)"
            )
        self.m = manifest
        self.device = torch.device(device)
        self.device_id = self.device.index or 0
        self.layers = manifest.num_layers
        stream = torch.cuda.current_stream(self.device).cuda_stream
        cuda = {"device_id": self.device_id, "user_compute_stream": str(stream)}
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        self.sessions = {
            name: ort.InferenceSession(
                str(path),
                sess_options=options,
                providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"],
            )
            for name, path in manifest.graph_files.items()
        }
        self.ops = TorchOps(self.device)

    def _bind(self, io: Any, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        bind = io.bind_output if output else io.bind_input
        bind(name, "cuda", self.device_id, _NP[tensor.dtype], list(tensor.shape), tensor.data_ptr())

    def encode(self, pixel_values: np.ndarray) -> Encoded:
        m = self.m
        pixels = to_device(pixel_values, self.device, torch.float32)
        batch = pixels.shape[0]
        hidden = self.sessions["cross_kv"].get_inputs()[0].shape[-1]  # a number once exported
        states = torch.empty((batch, m.enc_len, hidden), device=self.device)
        self._run("encoder", {"pixel_values": pixels}, {"encoder_hidden_states": states})
        cross = {
            f"cross_{kv}.{i}": torch.empty(
                (batch, m.num_heads, m.enc_len, m.head_dim), device=self.device
            )
            for i in range(self.layers)
            for kv in ("key", "value")
        }
        self._run("cross_kv", {"encoder_hidden_states": states}, cross)
        mask = torch.ones((batch, m.enc_len), dtype=torch.int64, device=self.device)
        return Encoded(list(cross.values()), mask)

    def _run(self, graph: str, inputs: dict, outputs: dict) -> None:
        session = self.sessions[graph]
        io = session.io_binding()
        for name, tensor in inputs.items():
            self._bind(io, name, tensor.contiguous())
        for name, tensor in outputs.items():
            self._bind(io, name, tensor, output=True)
        session.run_with_iobinding(io)

    def new_pool(self, rows: int, slots: int, cache_len: int, enc_len: int) -> KVPool:
        dims = (self.layers, self.m.num_heads, self.m.head_dim)
        return KVPool(self.ops, dims, rows, slots, cache_len, enc_len, torch.float32)

    def decode(
        self, pool: KVPool, rows: int, groups: int, want_attentions: bool = False
    ) -> StepOutput:
        inputs, outputs = step_tensors(
            pool, rows, groups, self.m.vocab_size, self.m.top_k, self.m.gathers_in_graph
        )
        self._run("decoder", inputs, outputs)
        return finish_step(pool, rows, outputs, want_attentions)
