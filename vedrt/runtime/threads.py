"""How many ONNX Runtime threads: the measured default, and the one check of a caller's count."""

from __future__ import annotations

import os
from typing import Any

from .errors import InputError
from .options import is_int

# ONNX Runtime intra-op threads when `load()` is given none. Measured (issue #9) on this project's
# 2-core shared machines: median generate() of 16 new tokens, batch 1, interleaved, two runs at
# load averages 9-10 and 6-7 (noisy; ORT default = its own thread count, spinning pool):
#                          1 thread        2 threads       ORT default
#   scene model   greedy   71 / 92 ms      213 / 274 ms    255 / 167 ms
#                 beam 4   148 / 201 ms    430 / 488 ms    469 / 228 ms
#   ViT-base+GPT2 greedy   4.87 / 3.25 s   7.83 / 5.44 s   8.27 / 3.47 s
#                 beam 4   5.54 / 3.97 s   9.91 / 6.93 s   10.43 / 3.87 s
# One thread was the fast one (or within noise of it) for both sizes: extra threads lose their
# time slices to other processes. On a dedicated many-core machine pass threads=N for big models.
DEFAULT_THREADS = 1


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The thread count `load()` uses when given none (see DEFAULT_THREADS)."""
    return min(DEFAULT_THREADS, machine_cores())


def check_threads(threads: Any) -> int | None:
    """`threads`: None (the default), 0 (ONNX Runtime's choice) or 1 .. the machine's cores.

    More threads than cores only make them wait for each other: `--threads 999` took 112 s for a
    caption that takes a tenth of a second with one.
    """
    if threads is None:
        return None
    if not is_int(threads) or threads < 0:
        raise InputError(f"threads must be a non-negative integer, got {threads!r}")
    cores = machine_cores()
    if threads > cores:
        raise InputError(
            f"threads={threads} is more than the {cores} cores this process can use "
            f"(choose 1 to {cores}; 0 lets ONNX Runtime decide)"
        )
    return int(threads)
