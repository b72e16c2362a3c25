"""The search's array operations on a torch device (see `vedrt.runtime.ops` for the interface).

Each is the torch operation transformers 4.57 itself uses (`torch.topk`, `take_along_dim`,
`log_softmax`), so on the same device the search chooses what `generate()` chooses. Everything
stays on the executor's device; the host learns one boolean per request per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class TorchOps:
    """Tensors on `device`; see the module docstring."""

    name = "torch"
    float32 = torch.float32
    int64 = torch.int64
    int32 = torch.int32
    bool_ = torch.bool
    # torch.topk leaves the order of ties unspecified: the beam search ranks its candidates
    # again, as transformers does, rather than assume a sorted row comes back unchanged
    sorted_topk_is_identity = False

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    # -- creation and conversion ----------------------------------------------------------
    def asarray(self, value: Any, dtype: Any = None) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(device=self.device, dtype=dtype or value.dtype)
        array = np.asarray(value)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.to(device=self.device, dtype=dtype or tensor.dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
        return np.asarray(x)

    def full(self, shape: tuple[int, ...], value: Any, dtype: Any) -> torch.Tensor:
        return torch.full(shape, value, dtype=dtype, device=self.device)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.device)

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def astype(self, x: torch.Tensor, dtype: Any) -> torch.Tensor:
        return x.to(dtype)

    def scalar(self, value: float) -> float:
        """A Python float holding the float32 value: torch divides float32 tensors by it in
        float32, as the numpy ops divide by an np.float32."""
        return float(np.float32(value))

    # -- reductions and selections --------------------------------------------------------
    def topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(x, k=k)

    def kth_largest(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return torch.topk(x, k)[0][..., -1, None]

    def argsort(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, descending=False, stable=True)[1]

    def take_along(self, x: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.take_along_dim(x, idx, dim=axis)

    def put_along(self, x: torch.Tensor, idx: torch.Tensor, values: Any, axis: int) -> None:
        x.scatter_(axis, idx, values)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argmax(x, dim=-1)

    def first_true(self, x: torch.Tensor) -> torch.Tensor:
        first = torch.argmax(x.to(torch.uint8), dim=-1)
        return torch.where(x.any(dim=-1), first, x.shape[-1])

    def min(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.min(x, dim=axis, keepdim=True)[0]

    def finite_rows(self, x: torch.Tensor) -> np.ndarray:
        """Per row of `[rows, n]`, on the host (one small copy back a step)."""
        return torch.isfinite(x).all(dim=1).cpu().numpy()

    def any(self, x: torch.Tensor, axis: int | None = None) -> Any:
        return torch.any(x) if axis is None else torch.any(x, dim=axis, keepdim=True)

    def all(self, x: torch.Tensor, axis: int | None = None) -> Any:
        return torch.all(x) if axis is None else torch.all(x, dim=axis, keepdim=True)

    def cumsum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=-1)

    def concat(self, arrays: list[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(arrays, dim=axis)

    def where(self, cond: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        return torch.where(cond, a, b)

    def isin(self, x: torch.Tensor, values: tuple[int, ...]) -> torch.Tensor:
        if not values:
            return torch.zeros_like(x, dtype=torch.bool)
        return torch.isin(x, torch.tensor(values, dtype=x.dtype, device=x.device))

    def all_equal(self, x: torch.Tensor, row: tuple[int, ...]) -> torch.Tensor:
        return torch.all(x == torch.tensor(row, dtype=x.dtype, device=x.device), dim=1)

    # -- float math -----------------------------------------------------------------------
    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.log_softmax(x, dim=-1)

    def float_logits(self, logits: torch.Tensor) -> torch.Tensor:
        # a copy, as transformers makes: the executor's logits buffer is reused by the next step
        return logits.to(dtype=torch.float32, copy=True)
