"""kernels/scratch.py: the same memory for the same tag in the same thread, another per thread, none after release."""
from __future__ import annotations

import threading

import torch

from driftscope.kernels import scratch as S


def test_a_tag_reuses_its_memory_grows_on_demand_and_is_released():
    S.release_scratch()
    a = S.scratch("t", (4, 8), torch.float32, "cpu")
    b = S.scratch("t", (2, 3), torch.float32, "cpu")  # smaller: a view of the same buffer
    assert a.shape == (4, 8) and b.shape == (2, 3) and b.is_contiguous() and b.data_ptr() == a.data_ptr()
    assert S.scratch("u", (4, 8), torch.float32, "cpu").data_ptr() != a.data_ptr()  # another tag: its own
    assert S.scratch("t", (4, 8), torch.float64, "cpu").data_ptr() != a.data_ptr()  # another dtype: its own
    c = S.scratch("t", (16, 8), torch.float32, "cpu")  # larger: a new buffer replaces it
    assert c.numel() == 128 and S.scratch("t", (4, 8), torch.float32, "cpu").data_ptr() == c.data_ptr()
    a.fill_(1.0)
    S.release_scratch()
    assert S._buffers == {} and a.sum() == 32  # a tensor still held stays valid


def test_threads_get_their_own_buffers_and_other_devices_plain_tensors():
    S.release_scratch()
    mine = S.scratch("t", (8,), torch.float32, "cpu").data_ptr()
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(S.scratch("t", (8,), torch.float32, "cpu").data_ptr()))
    t.start()
    t.join()
    assert theirs[0] != mine
    meta = S.scratch("t", (8,), torch.float32, "meta")
    assert meta.device.type == "meta" and len(S._buffers) == 2  # not kept
    S.release_scratch()
