"""The decode kernels' thread pool (csrc/thread_pool.*): every task of every job runs exactly once, whatever the
thread count, with concurrent callers and after a fork; and the kernels on it (small_gemm, paged decode attention)
give the same bits at any thread count and spin setting."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading

import pytest
import torch

from driftscope.kernels._dispatch import cpp_status

pytestmark = pytest.mark.skipif(not cpp_status("cpu"), reason="driftscope._C is not built")


def _counts(n: int, threads: int, jobs: int) -> torch.Tensor:
    from driftscope import _C

    c = torch.zeros(n, dtype=torch.int64)
    _C.pool_count(c.data_ptr(), n, threads, jobs)
    return c


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
def test_every_task_runs_exactly_once(n, threads):
    c = _counts(n, threads, 300)
    assert torch.equal(c, torch.full((n,), 300)), f"task run counts {c.unique().tolist()}, expected 300 each"


def test_concurrent_callers_each_get_every_task_once():
    # the kernels release the GIL: a second Python thread's job runs inline while the pool is busy
    results: dict[int, torch.Tensor] = {}

    def caller(k: int) -> None:
        results[k] = _counts(50 + k, 2, 400)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3], "a caller did not finish"
    for k, c in results.items():
        assert torch.equal(c, torch.full((50 + k,), 400)), f"caller {k}: counts {c.unique().tolist()}"


def _child(q) -> None:
    c = _counts(33, 2, 100)
    q.put(bool(torch.equal(c, torch.full((33,), 100))))


def test_a_forked_child_has_a_working_pool():
    assert torch.equal(_counts(16, 2, 10), torch.full((16,), 10))  # the parent's workers exist now
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(timeout=60)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive, "the forked child hung in the pool (its parent's workers do not exist there)"
    assert p.exitcode == 0 and q.get(timeout=5), "the forked child's pool ran a task a wrong number of times"


BITS = r"""
import sys, torch
from driftscope.kernels.linear import linear
from driftscope.kernels.paged_attention import paged_decode_attention
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
outs = []
for M, N, K in [(16, 960, 576), (16, 3072, 576), (5, 1001, 64), (12, 49, 130)]:
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    outs.append(linear(x, w))
B, Hq, Hkv, D, bs, blocks = 7, 6, 2, 64, 16, 80
q = torch.randn(B, Hq, D, generator=g)
kc, vc = torch.randn(blocks * bs, Hkv, D, generator=g), torch.randn(blocks * bs, Hkv, D, generator=g)
ctx = torch.tensor([1, 17, 40, 64, 100, 5, 160], dtype=torch.int32)
tables = torch.randperm(blocks, generator=g)[: B * 10].view(B, 10).int()
lmax = int(ctx.max()); p = torch.arange(lmax)
pc = torch.minimum(p[None, :], (ctx.long() - 1)[:, None])
gather = tables.long().gather(1, pc // bs) * bs + pc % bs
outs.append(paged_decode_attention(q, kc, vc, gather, p[None, :] < ctx[:, None], tables, ctx, bs, D ** -0.5, None))
torch.save(outs, sys.argv[2])
"""


def test_decode_kernels_give_the_same_bits_at_any_thread_count(tmp_path):
    # fresh processes: the pool is built once per process, with the spin bound from the environment
    runs = []
    for threads, spin in [(1, "200"), (2, "200"), (3, "0"), (2, "0")]:
        out = tmp_path / f"t{threads}-s{spin}.pt"
        env = {**os.environ, "DRIFTSCOPE_SPIN_US": spin}
        subprocess.run([sys.executable, "-c", BITS, str(threads), str(out)], env=env, check=True, timeout=300)
        runs.append(((threads, spin), torch.load(out)))
    (k0, ref), *rest = runs
    for k, outs in rest:
        for i, (a, b) in enumerate(zip(ref, outs)):
            assert torch.equal(a, b), f"output {i} differs between (threads, spin) {k0} and {k}"
