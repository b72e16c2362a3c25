"""The array operations the search and the engine are written over, for numpy.

The search (`search.py`), the logits processors and the engine's cache pool are written once
against this small interface; `NumpyOps` runs them on the host for the ONNX Runtime executor, and
`vedrt.gpu.ops.TorchOps` runs the same code on a torch device (where the executor's tensors live).
Each operation is the one transformers 4.57 uses or its exact numpy equivalent, float32
arithmetic included, so the chosen tokens and scores match `generate()`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Rows up to this long are ranked by one stable sort (beam candidates: 2 x beams x top_k).
SMALL_TOPK = 256
_ROWS = np.arange(4096)  # row indices for take_along, sliced instead of made every call
_ROWS.flags.writeable = False


class NumpyOps:
    """Host arrays; see the module docstring. Arrays are plain `np.ndarray`s."""

    name = "numpy"
    float32 = np.float32
    int64 = np.int64
    int32 = np.int32
    bool_ = np.bool_
    # `topk` of a row already sorted best first returns it unchanged (ties keep their order), so
    # the beam search may skip ranking candidates that came out of a top-k and were not masked
    sorted_topk_is_identity = True

    # -- creation and conversion ----------------------------------------------------------
    def asarray(self, value: Any, dtype: Any = None) -> np.ndarray:
        return np.asarray(value, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def full(self, shape: tuple[int, ...], value: Any, dtype: Any) -> np.ndarray:
        return np.full(shape, value, dtype=dtype)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def arange(self, n: int) -> np.ndarray:
        return np.arange(n)

    def copy(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def astype(self, x: np.ndarray, dtype: Any) -> np.ndarray:
        return x.astype(dtype)

    def scalar(self, value: float) -> Any:
        """A float32 constant, so `array / scalar` is float32 arithmetic like torch's."""
        return np.float32(value)

    # -- reductions and selections --------------------------------------------------------
    def topk(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row-wise top k, best first; ties go to the lower index."""
        n = x.shape[-1]
        if n <= SMALL_TOPK:  # the search's candidates: one sort beats a partition and two sorts
            idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
            return self.take_along(x, idx, axis=-1), idx
        if k < n:
            idx = np.sort(np.argpartition(-x, k - 1, axis=-1)[:, :k], axis=-1)
        else:
            idx = np.broadcast_to(np.arange(n), x.shape).copy()
        vals = self.take_along(x, idx, axis=-1)
        order = np.argsort(-vals, axis=-1, kind="stable")
        return self.take_along(vals, order, axis=-1), self.take_along(idx, order, axis=-1)

    def kth_largest(self, x: np.ndarray, k: int) -> np.ndarray:
        """[rows, 1]: each row's k-th largest value."""
        return -np.partition(-x, k - 1, axis=-1)[:, k - 1 : k]

    def argsort(self, x: np.ndarray) -> np.ndarray:
        return np.argsort(x, axis=-1, kind="stable")

    def take_along(self, x: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
        if x.ndim == 2 and axis in (1, -1) and x.shape[0] <= len(_ROWS):
            return x[_ROWS[: x.shape[0], None], idx]  # the search's case: ~3x faster
        return np.take_along_axis(x, idx, axis=axis)

    def put_along(self, x: np.ndarray, idx: np.ndarray, values: np.ndarray, axis: int) -> None:
        np.put_along_axis(x, idx, values, axis=axis)

    def argmax(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(x, axis=-1)

    def first_true(self, x: np.ndarray) -> np.ndarray:
        """Each row's index of its first true value along the last axis; its length if none."""
        return np.where(x.any(axis=-1), x.argmax(axis=-1), x.shape[-1])

    def min(self, x: np.ndarray, axis: int) -> np.ndarray:
        return x.min(axis=axis, keepdims=True)

    def finite_rows(self, x: np.ndarray) -> np.ndarray:
        """Per row of `[rows, n]`, on the host: are all its values finite?"""
        return np.isfinite(x).all(axis=1)

    # the array methods, not np.any / np.all: their dispatch costs more than a small reduction
    def any(self, x: np.ndarray, axis: int | None = None) -> Any:
        return x.any() if axis is None else x.any(axis=axis, keepdims=True)

    def all(self, x: np.ndarray, axis: int | None = None) -> Any:
        return x.all() if axis is None else x.all(axis=axis, keepdims=True)

    def cumsum(self, x: np.ndarray) -> np.ndarray:
        return np.cumsum(x, axis=-1)

    def concat(self, arrays: list[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(arrays, axis=axis)

    def where(self, cond: np.ndarray, a: Any, b: Any) -> np.ndarray:
        return np.where(cond, a, b)

    def isin(self, x: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
        if len(values) <= 4:  # EOS ids: a few comparisons beat np.isin's set machinery
            found = np.zeros(x.shape, dtype=bool)
            for value in values:
                found |= x == value
            return found
        return np.isin(x, values)

    def all_equal(self, x: np.ndarray, row: tuple[int, ...]) -> np.ndarray:
        """[rows]: which rows of x equal `row`."""
        return np.all(x == np.asarray(row, dtype=x.dtype), axis=1)

    # -- float math -----------------------------------------------------------------------
    def softmax(self, x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def log_softmax(self, x: np.ndarray) -> np.ndarray:
        shifted = x - x.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    def float_logits(self, logits: np.ndarray) -> np.ndarray:
        """The step's logits as float32 scores the processors may change in place."""
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)


NUMPY = NumpyOps()


def gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Adding Gumbel noise then taking the top k samples k tokens without replacement.

    Drawn with numpy's generator on every backend, so a seed means the same samples anywhere.
    """
    u = np.maximum(rng.random(shape), np.finfo(np.float64).tiny)
    return (-np.log(-np.log(u))).astype(np.float32)
