"""How many threads numpy's BLAS/LAPACK (the SVDs) may use, through threadpoolctl.

OpenBLAS starts one thread per core by default. On a busy machine that oversubscribes it: one
1536 x 1536 SVD took 17.3 s with the default threads beside another job on 2 cores, and 1.3 s
with one thread. So the SVD work runs under an explicit limit: the threads asked for, else
half the cores this process may use (at least 1, at most DEFAULT_MAX).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_MAX = 4  # BLAS threads when none are asked for: SVDs of conv weights gain little beyond


def default_blas_threads() -> int:
    """Half the CPUs this process may run on, in [1, DEFAULT_MAX]."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(DEFAULT_MAX, cpus // 2))


@contextmanager
def blas_threads(threads: int | None) -> Iterator[int]:
    """Limit BLAS/LAPACK (OpenBLAS, MKL, BLIS) to `threads` (None: `default_blas_threads()`)
    inside the block; yields the limit. OpenMP pools are left alone (ONNX Runtime has its own)."""
    from threadpoolctl import threadpool_limits

    n = threads if threads else default_blas_threads()
    with threadpool_limits(limits=n, user_api="blas"):
        yield n
