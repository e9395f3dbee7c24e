"""A steady heap while timing: CPU timings that do not depend on what the process did before.

PyTorch's CPU tensors come from the C allocator. With glibc, a freed block at the top of the heap is returned to the
system once it exceeds the trim threshold, and blocks above the mmap threshold are mapped and unmapped on every
allocation; both thresholds move with what the process has allocated so far. A forward pass then pays page faults for
fresh pages on some calls and not on others, and the bigger model (the larger activations) pays more. Measured on the
MiniLM MNLI teacher at batch 32 x 128 tokens against the 2x and 3x shapes of the README's rows (2-core AMD EPYC, 2
threads; `benchmarks/heap_regime.py`), the same shapes timed 2.17x and 3.33x in a fresh process and 2.08x and 3.04x in
the same process after 12 training steps; with the heap held steady, 2.00x / 2.97x and 2.00x / 2.98x. A speed target
calibrated inside a run and checked in a fresh process would otherwise disagree by up to 10% for no reason of the
model's.

While timing, [`steady_heap`] raises the mmap threshold to glibc's largest dynamic value (32 MiB, what a process
reaches by itself once it freed such a block) and the trim threshold to 1 GiB, so activations are served from pages
already touched, as in a long-running process; on exit the trim threshold goes back to 64 MiB (again glibc's largest
dynamic value), so the process keeps no more free memory than a long-running one would. Elsewhere than glibc, and with
`HF_PRUNE_STEADY_HEAP=0`, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from contextlib import contextmanager

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["MMAP_THRESHOLD", "TRIM_WHILE_TIMING", "TRIM_AFTER", "steady_heap", "heap_regime"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest value its dynamic threshold takes (and the largest
# mallopt accepts)
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_WHILE_TIMING = 1024 * 1024 * 1024
TRIM_AFTER = 2 * MMAP_THRESHOLD  # the trim threshold glibc sets itself with the mmap threshold at its largest

_depth = 0
_libc = None


def _mallopt():
    """glibc's `mallopt`, or None (another C library, or switched off by `HF_PRUNE_STEADY_HEAP=0`)."""
    global _libc
    if os.environ.get("HF_PRUNE_STEADY_HEAP", "1").lower() in ("0", "false", "no"):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    return getattr(_libc, "mallopt", None) if _libc else None


def heap_regime() -> str:
    """How [`steady_heap`] holds the heap on this machine: `"steady"` (glibc, thresholds held while timing) or
    `"as is"`; recorded beside timings."""
    return "steady" if _mallopt() is not None else "as is"


@contextmanager
def steady_heap():
    """Holds the C heap steady for the block (see the module docstring); nested uses hold it until the outermost
    exits."""
    global _depth
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    if _depth == 0:
        if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_WHILE_TIMING)):
            logger.warning("mallopt refused the timing thresholds; timings may depend on the process's history.")
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            mallopt(_M_TRIM_THRESHOLD, TRIM_AFTER)
