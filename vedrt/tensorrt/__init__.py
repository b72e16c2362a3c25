"""TensorRT engines for an export directory: `vedrt build` and the executor that runs them.

`tensorrt` (and torch, for device memory) are imported only when an engine is built or loaded,
so this package imports anywhere; `profiles` is pure Python (shapes, cache keys, the index file).
"""
