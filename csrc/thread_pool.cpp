// The decode kernels' thread pool (see thread_pool.h for why).
//
// Protocol. `state_` packs (epoch << 32 | next task). The caller of job e writes the job into slot e & 1, then
// publishes (e, 0); a worker claims task i by a CAS (e, i) -> (e, i + 1) while i < n, so a worker that still holds
// a stale view of an older epoch can never claim a task of another job (epochs only grow, so the CAS fails). The
// slot it reads between its load and its CAS belongs to job e: the slot is rewritten only for job e + 2, which
// cannot start before every task of e + 1 is done. Each finished task adds one to `done_`; the caller returns
// when done_ == n, so no task of job e is running when job e + 1 starts.
// Sleeping: a worker past its spin bound increments `sleepers_` and waits on the condition variable until the
// epoch moves; the caller notifies only when sleepers_ > 0 (both sides seq_cst, so one of them sees the other).
// After fork() the child has no workers: the pool is rebuilt there (the old one is leaked, its threads are gone).
#include "thread_pool.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DRIFTSCOPE_PAUSE() _mm_pause()
#else
#define DRIFTSCOPE_PAUSE() std::this_thread::yield()
#endif

namespace driftscope {
namespace {

using Clock = std::chrono::steady_clock;

// this thread's nanoseconds spent runnable but not running (the second field of /proc/thread-self/schedstat)
bool runqueue_wait_ns(uint64_t* wait) {
  const int fd = ::open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[128];
  const ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  unsigned long long run = 0, w = 0;
  if (std::sscanf(buf, "%llu %llu", &run, &w) != 2) return false;
  *wait = w;
  return true;
}

int read_spin_us() {
  const char* s = std::getenv("DRIFTSCOPE_SPIN_US");
  if (s == nullptr || *s == '\0') return 200;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  return (end != nullptr && *end == '\0' && v >= 0) ? static_cast<int>(std::min<long>(v, 1000000)) : 200;
}

class Pool {
 public:
  Pool() : pid_(getpid()), spin_(std::chrono::microseconds(read_spin_us())) {}
  pid_t pid() const { return pid_; }

  // Called with job_mu held (one job at a time).
  void run(int64_t n, int threads, PoolTask task, void* ctx) {
    grow(threads - 1);
    const uint32_t e = static_cast<uint32_t>(state_.load(std::memory_order_relaxed) >> 32) + 1;
    Slot& s = slots_[e & 1];
    s.task.store(task, std::memory_order_relaxed);
    s.ctx.store(ctx, std::memory_order_relaxed);
    s.n.store(n, std::memory_order_relaxed);
    allowed_.store(threads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    state_.store(static_cast<uint64_t>(e) << 32, std::memory_order_seq_cst);  // publishes the slot
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(sleep_mu_); }
      cv_.notify_all();
    }
    work(e);
    // the tasks workers took: spin briefly, then yield the core (a descheduled worker may share it)
    const auto t0 = Clock::now();
    for (int64_t k = 0; done_.load(std::memory_order_acquire) < n; ++k) {
      DRIFTSCOPE_PAUSE();
      if ((k & 63) == 63 && Clock::now() - t0 > std::chrono::microseconds(50)) std::this_thread::yield();
    }
  }

 private:
  struct Slot {
    std::atomic<PoolTask> task{nullptr};
    std::atomic<void*> ctx{nullptr};
    std::atomic<int64_t> n{0};
  };

  void grow(int workers) {
    while (static_cast<int>(threads_.size()) < workers) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { loop(id); });
      threads_.back().detach();  // the pool lives as long as the process (never destroyed)
    }
  }

  // Claims and runs job e's tasks until none is left.
  void work(uint32_t e) {
    const Slot& s = slots_[e & 1];
    uint64_t st = state_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(st >> 32) != e) return;
      const int64_t i = static_cast<int64_t>(st & 0xffffffffu);
      const int64_t n = s.n.load(std::memory_order_relaxed);
      if (i >= n) return;
      const PoolTask task = s.task.load(std::memory_order_relaxed);
      void* ctx = s.ctx.load(std::memory_order_relaxed);
      if (!state_.compare_exchange_weak(st, st + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      task(ctx, i);
      done_.fetch_add(1, std::memory_order_release);
      st = state_.load(std::memory_order_acquire);
    }
  }

  // Whether this worker waited on a run queue for more than 2% of the wall time since its last look (every 50 ms
  // at most, from /proc/thread-self/schedstat: ns running, ns runnable but waiting): another process shares the
  // cores, so an idle worker must sleep, not spin (a spinning worker uses up its share of the core and is then
  // preempted in the middle of a task, which the caller has to wait for). Thread-local state: one per worker.
  static bool contended(Clock::time_point now) {
    thread_local Clock::time_point last{};
    thread_local uint64_t last_wait = 0;
    thread_local bool busy = false;
    if (now - last < std::chrono::milliseconds(50)) return busy;
    uint64_t wait = 0;
    if (!runqueue_wait_ns(&wait)) {  // no schedstat: spin as configured
      last = now;
      return busy = false;
    }
    const double wall = std::chrono::duration<double, std::nano>(now - last).count();
    busy = last != Clock::time_point{} && static_cast<double>(wait - last_wait) > 0.02 * wall;
    last = now;
    last_wait = wait;
    return busy;
  }

  void loop(int id) {
    uint32_t seen = static_cast<uint32_t>(state_.load(std::memory_order_acquire) >> 32);
    for (;;) {
      uint64_t st = state_.load(std::memory_order_acquire);
      const auto t0 = Clock::now();
      bool spin = !contended(t0);
      for (int64_t k = 0; static_cast<uint32_t>(st >> 32) == seen; ++k) {
        if (spin && (k & 63) == 63 && Clock::now() - t0 > spin_) spin = false;
        if (!spin) {
          std::unique_lock<std::mutex> lk(sleep_mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return static_cast<uint32_t>(state_.load(std::memory_order_seq_cst) >> 32) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
        } else {
          DRIFTSCOPE_PAUSE();
        }
        st = state_.load(std::memory_order_acquire);
      }
      seen = static_cast<uint32_t>(st >> 32);
      if (id < allowed_.load(std::memory_order_relaxed)) work(seen);
    }
  }

  const pid_t pid_;
  const Clock::duration spin_;
  std::atomic<uint64_t> state_{0};
  Slot slots_[2];
  std::atomic<int64_t> done_{0};
  std::atomic<int> allowed_{0};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;  // detached; touched only under job_mu_
};

std::mutex job_mu;  // one job at a time
Pool* pool = nullptr;  // leaked on purpose: detached workers use it until the process ends

}  // namespace

void pool_run(int64_t n, int threads, PoolTask task, void* ctx) {
  if (n <= 0) return;
  std::unique_lock<std::mutex> lk(job_mu, std::try_to_lock);
  if (threads <= 1 || n == 1 || !lk.owns_lock()) {  // nothing to share, or the pool is busy: inline
    for (int64_t i = 0; i < n; ++i) task(ctx, i);
    return;
  }
  if (pool == nullptr || pool->pid() != getpid()) pool = new Pool();  // first use, or the child of a fork
  pool->run(n, threads, task, ctx);
}

int pool_spin_us() { return read_spin_us(); }

}  // namespace driftscope
