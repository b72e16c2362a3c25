"""`GpuGenerator`: the runtime's `Generator` with the search loop moved onto the device.

Everything user-facing (option resolution, input checks, preprocessing, detokenising, `caption`)
is the CPU runtime's, inherited unchanged, so a GPU backend accepts and returns exactly what the
CPU one does. Only `generate` differs: it runs `vedrt.gpu.search` on the executor's device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..runtime.errors import InputError
from ..runtime.generator import Generator
from ..runtime.manifest import Manifest
from ..runtime.search import GenerateOutput
from . import search
from .executor import DeviceExecutor


class GpuGenerator(Generator):
    """Greedy and beam search on a device executor (TensorRT, ONNX Runtime CUDA or torch)."""

    def __init__(self, manifest: Manifest, executor: DeviceExecutor, backend: str):
        super().__init__(manifest, executor)
        self.backend = backend

    @property
    def device(self) -> torch.device:
        return self.executor.device

    def generate(self, pixel_values: np.ndarray, **options: Any) -> np.ndarray | GenerateOutput:
        """Token ids exactly as transformers' `generate()` gives on the same device (see
        `Generator.generate`); sampling stays on the CPU runtime."""
        o = self.options(**options)
        if o.do_sample:
            raise InputError(
                f"do_sample=True is not supported by backend={self.backend!r} (the device loop does "
                "greedy and beam search); sample with the CPU runtime: load(path)"
            )
        pixel_values = self.check_pixel_values(pixel_values)
        batch = pixel_values.shape[0]
        check = getattr(self.executor, "check_limits", None)
        if check is not None:  # engines built for bounded shapes say so before anything runs
            check(batch, o.num_beams, o.max_new)
        with torch.no_grad():
            cross = self.executor.encode(pixel_values)
            if o.num_beams > 1:
                out = search.beam_search(self.executor, cross, batch, o)
            else:
                out = search.greedy(self.executor, cross, batch, o)
        return out if o.return_dict else out.sequences
