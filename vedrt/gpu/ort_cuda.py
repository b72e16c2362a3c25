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

from ..runtime.errors import InputError
from ..runtime.manifest import Manifest
from .executor import CachePool, DeviceCache, DeviceStep, to_device

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
        self._caches = CachePool(
            self.layers, manifest.num_heads, manifest.head_dim, torch.float32, self.device
        )

    def _bind(self, io: Any, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        bind = io.bind_output if output else io.bind_input
        bind(name, "cuda", self.device_id, _NP[tensor.dtype], list(tensor.shape), tensor.data_ptr())

    def encode(self, pixel_values: np.ndarray) -> list[torch.Tensor]:
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
        return list(cross.values())

    def _run(self, graph: str, inputs: dict, outputs: dict) -> None:
        session = self.sessions[graph]
        io = session.io_binding()
        for name, tensor in inputs.items():
            if isinstance(tensor, np.ndarray):
                io.bind_cpu_input(name, tensor)
            else:
                self._bind(io, name, tensor.contiguous())
        for name, tensor in outputs.items():
            self._bind(io, name, tensor, output=True)
        session.run_with_iobinding(io)

    def new_cache(self, batch_beams: int, cache_len: int) -> DeviceCache:
        return self._caches.get(batch_beams, cache_len)

    def decode(
        self,
        input_ids: torch.Tensor,
        past_length: int,
        cache: DeviceCache,
        cross: list[torch.Tensor],
        want_attentions: bool = False,
    ) -> DeviceStep:
        m = self.m
        new_len = input_ids.shape[1]
        cache.check_room(past_length, new_len)
        n = cache.batch_beams
        new_kv = torch.empty(
            (self.layers, 2, n, m.num_heads, new_len, m.head_dim), device=self.device
        )
        attn = torch.empty((self.layers, n, m.num_heads, new_len, m.enc_len), device=self.device)
        logits = torch.empty((n, m.vocab_size), device=self.device)
        inputs: dict[str, Any] = {
            "input_ids": input_ids.contiguous(),
            "past_length": np.array(past_length, dtype=np.int64),
        }
        outputs = {"logits": logits}
        views = cache.views()
        for i in range(self.layers):
            for j, kv in enumerate(("key", "value")):
                inputs[f"self_{kv}.{i}"] = views[2 * i + j]
                inputs[f"cross_{kv}.{i}"] = cross[2 * i + j]
                outputs[f"new_{kv}.{i}"] = new_kv[i, j]
            outputs[f"cross_attn.{i}"] = attn[i]
        self._run("decoder", inputs, outputs)
        cache.write(new_kv, past_length)
        return DeviceStep(logits, list(attn) if want_attentions else None)

    def reorder(self, cache: DeviceCache, beam_idx: torch.Tensor, length: int) -> None:
        cache.reorder(beam_idx)
