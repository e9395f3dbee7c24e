"""The heap held steady while timing: the thresholds set on entry and relaxed on exit (once for nested uses), every
timed forward run inside it, the switch that turns it off, and glibc serving a freed activation-sized block again
from the heap instead of mapping and returning it."""

import ctypes
import platform

import pytest
import torch
from torch import nn

from hf_prune.export.runtime import cpu_info
from hf_prune.models import heap
from hf_prune.models.costs import time_interleaved

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def calls(monkeypatch):
    recorded = []

    def mallopt(param, value):
        recorded.append((param, value))
        return 1

    monkeypatch.setattr(heap, "_mallopt", lambda: mallopt)
    return recorded


def test_thresholds_set_on_entry_and_relaxed_once_on_exit(calls):
    with heap.steady_heap():
        with heap.steady_heap():
            assert calls == [(-3, heap.MMAP_THRESHOLD), (-1, heap.TRIM_WHILE_TIMING)]
        assert len(calls) == 2  # the inner exit keeps the heap steady
    assert calls[2:] == [(-1, heap.TRIM_AFTER)]
    with pytest.raises(RuntimeError):
        with heap.steady_heap():
            raise RuntimeError("a failed timing")
    assert calls[-1] == (-1, heap.TRIM_AFTER) and heap._depth == 0


class _Spy(nn.Module):
    def __init__(self):
        super().__init__()
        self.depths = []

    def forward(self, **inputs):
        self.depths.append(heap._depth)
        return inputs["input_ids"].float().sum()


def test_every_timed_forward_runs_in_a_steady_heap(calls):
    spies = [_Spy(), _Spy()]
    times = time_interleaved(spies, {"input_ids": torch.ones(2, 3, dtype=torch.long)}, repeats=3, warmup=1)
    assert [len(t) for t in times] == [3, 3]
    assert all(d == 1 for spy in spies for d in spy.depths) and len(spies[0].depths) == 4
    assert heap._depth == 0 and calls[-1] == (-1, heap.TRIM_AFTER)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("HF_PRUNE_STEADY_HEAP", "0")
    assert heap._mallopt() is None and heap.heap_regime() == "as is" and cpu_info()["heap"] == "as is"
    with heap.steady_heap():
        assert heap._depth == 0  # nothing held


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_glibc_serves_activations_from_the_heap_while_timing(monkeypatch):
    monkeypatch.delenv("HF_PRUNE_STEADY_HEAP", raising=False)
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc older than 2.33 has no mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    assert heap.heap_regime() == "steady" and cpu_info()["heap"] == "steady"
    size = 20 * 1024 * 1024  # an activation of MiniLM at batch 32 x 128 tokens (25 MB) is of this order
    with heap.steady_heap():
        mapped = libc.mallinfo2().hblkhd
        block = torch.empty(size // 4, dtype=torch.float32)
        block.fill_(1.0)  # pages touched, as a forward pass does
        # below the raised mmap threshold: from the heap, not a mapping of its own
        assert libc.mallinfo2().hblkhd - mapped < size
        del block
        # freed, and kept by the heap for the next forward pass instead of being returned to the system
        assert libc.mallinfo2().fordblks >= size
