"""One BLAS thread while a registration runs.

The registrations run their two views on two threads of their own (numba kernels, which release the GIL). OpenBLAS
threads its matrix products of a few thousand rows besides, and its threads then compete with the other view's:
on 2 cores that doubled a tracking registration's time (real CT, clinic chain: 130 -> 220 ms for the same work).
``threadpoolctl`` (a well-kept library, BSD) limits the BLAS pool for the duration of a call; the limit is process
wide while it lasts and is restored afterwards.
"""

from __future__ import annotations

import functools
import threading

from threadpoolctl import ThreadpoolController

_controller: ThreadpoolController | None = None
_lock = threading.Lock()


def _get_controller() -> ThreadpoolController:
    global _controller
    with _lock:
        if _controller is None:
            _controller = ThreadpoolController()  # inspects the loaded BLAS libraries once (a few ms)
        return _controller


def single_blas_thread(fn):
    """Decorator: run ``fn`` with the BLAS libraries limited to one thread (restored on return or error)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _get_controller().limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper
