// A small thread pool for the decode kernels (small_gemm, paged_decode_attention): ~150 short jobs a decode step,
// each ~0.05-0.5 ms, separated by ~50 µs of Python glue.
//
// Why not OpenMP: under OMP_WAIT_POLICY=PASSIVE (the CLI's default, for machines shared with other processes) an
// idle OpenMP worker sleeps in a futex, and every parallel region waits for it to wake: ~58 µs a region on the 2-vCPU
// hosts measured, ~9 ms of a ~76 ms decode step (bench/RESULTS.md). Spinning (ACTIVE) wins ~18% quiet but loses
// 1.6-1.9x once another process shares a core, because a static split waits for a descheduled worker's share.
// This pool does neither: tasks are claimed one at a time from a shared counter, so the caller starts at once and
// does every task no worker has taken (a sleeping or descheduled worker costs nothing but its absence), and an idle
// worker spins for at most `spin_us` (DRIFTSCOPE_SPIN_US, default 200) after its last task, then sleeps. Within one
// decode step the next job arrives while the worker still spins; between steps it sleeps. While the worker's own
// run-queue wait (/proc/thread-self/schedstat, looked at every 50 ms) shows another process on the cores, it does
// not spin at all: spinning there used up its share of the core, and it was then preempted inside tasks the caller
// had to wait for (bench/RESULTS.md).
//
// Results do not depend on the thread count or on which thread runs a task: each task writes its own outputs.
#pragma once
#include <cstdint>
#include <type_traits>

namespace driftscope {

using PoolTask = void (*)(void* ctx, int64_t task);

// Runs task(ctx, i) once for every i in [0, n), on up to `threads` threads (the caller included); returns when all
// are done. Tasks must not throw. Another job already running (a second Python thread) runs this one inline.
void pool_run(int64_t n, int threads, PoolTask task, void* ctx);

// f(i) for i in [0, n) on the pool, `threads` threads at most (see pool_run).
template <class F>
void parallel_tasks(int64_t n, int threads, F&& f) {
  using Fn = std::remove_reference_t<F>;
  pool_run(n, threads, [](void* c, int64_t i) { (*static_cast<Fn*>(c))(i); }, const_cast<void*>(
      static_cast<const void*>(&f)));
}

// The spin bound idle workers use (µs), read once from DRIFTSCOPE_SPIN_US.
int pool_spin_us();

}  // namespace driftscope
