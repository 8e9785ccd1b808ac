"""Numba kernels of the anatomy registration. Pure functions: arrays in, arrays out.

They do on one thread what a BLAS call would spread over the machine's cores: at these
sizes (a 6-column Jacobian, a 6-term linear model) OpenBLAS's worker threads cost more in
wake-ups and spinning than they save, and they compete with the DRR threads for 2 cores.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["normal_equations", "linear_model"]


@njit(cache=True, nogil=True)
def normal_equations(jac, r):
    """``(J^T J, J^T r)`` of an ``(m, n)`` Jacobian and an ``(m,)`` residual, float64."""
    m, n = jac.shape
    a = np.zeros((n, n))
    g = np.zeros(n)
    for i in range(m):
        ri = r[i]
        for p in range(n):
            jp = jac[i, p]
            g[p] += jp * ri
            for q in range(p, n):
                a[p, q] += jp * jac[i, q]
    for p in range(n):
        for q in range(p):
            a[p, q] = a[q, p]
    return a, g


@njit(cache=True, nogil=True)
def linear_model(base, slopes, dx):
    """``base + sum_p dx[p] * slopes[p]`` for a ``(rows, cols)`` base and ``(n, rows, cols)`` slopes, float32."""
    out = base.copy()
    n = slopes.shape[0]
    rows, cols = base.shape
    for p in range(n):
        d = np.float32(dx[p])
        for i in range(rows):
            for j in range(cols):
                out[i, j] += d * slopes[p, i, j]
    return out
