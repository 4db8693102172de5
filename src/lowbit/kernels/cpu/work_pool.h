// Parallel loops for the lowbit kernels: chunks claimed dynamically.
//
// The range is cut into small chunks that threads claim one at a time (an atomic counter), so a thread that
// starts late or is preempted simply takes fewer chunks -- unlike at::parallel_for's static split, where
// its share waits for it (on a busy machine a 50-microsecond matmul then stalls for a scheduler slice).
// Threads: by default the team of torch's OpenMP runtime (the extension is built with -fopenmp and shares
// torch's libgomp), so no second set of threads competes with torch's own OpenMP workers, which keep
// spinning after every torch op: measured on an MLP block (LayerNorm, fc1, GELU, fc2), a separate spinning
// pool was 30-45% slower. Without OpenMP (or with -DLOWBIT_OMP_POOL=0) a small own pool with the same
// claiming is used instead; there the caller never waits for a worker that has not started.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

namespace lowbit {

// Calls body(begin, end) over [0, n) in chunks of `grain` items, on up to `threads` threads (the calling one
// included), and returns when all chunks are done. body must not throw. Concurrent callers are safe (the own
// pool runs a call inline when it is busy); after fork() the child starts afresh.
void parallel_chunks(int64_t n, int64_t grain, int threads, const std::function<void(int64_t, int64_t)>& body);

// Runs body() once on each of up to `threads` threads (the calling one included) and returns when every run has
// returned: one parallel region for work that the runs share out among themselves (TokenPhases below). A
// thread that starts late may find the work done; its run must then return without waiting for anyone.
void parallel_team(int threads, const std::function<void()>& body);

// A fixed sequence of phases run inside parallel_team by every thread, each thread calling run() for phase 0, 1,
// 2, ... in the same order (one TokenPhases::Cursor per thread). A phase is a range [0, n) in chunks of `grain`
// that threads claim from a counter; a thread with nothing left to claim waits only until every claimed chunk is
// done, never for a thread that has not arrived (a preempted or late thread just claims nothing), then goes on to
// the next phase. A serial step is a phase of one chunk. What a phase writes is visible to every later phase
// (release on a finished chunk, acquire on the wait).
class TokenPhases {
 public:
  // Room for `count` phases, all unclaimed. Call while no thread runs them.
  void reset(int64_t count) {
    if (static_cast<int64_t>(size_) < 2 * count) {
      counters_.reset(new std::atomic<int64_t>[2 * count]);
      size_ = static_cast<size_t>(2 * count);
    }
    for (size_t i = 0; i < size_; ++i) counters_[i].store(0, std::memory_order_relaxed);
    count_ = count;
  }

  class Cursor {
   public:
    explicit Cursor(TokenPhases& phases) : phases_(phases) {}
    template <class F>
    void run(int64_t n, int64_t grain, F&& body) {
      if (p_ >= phases_.count_) __builtin_trap();  // more phases than reset() made room for: a bug
      std::atomic<int64_t>& next = phases_.counters_[2 * p_];
      std::atomic<int64_t>& done = phases_.counters_[2 * p_ + 1];
      ++p_;
      const int64_t nchunks = n <= 0 ? 0 : (n + grain - 1) / grain;
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < nchunks;) {
        body(i * grain, std::min(n, (i + 1) * grain));
        done.fetch_add(1, std::memory_order_release);
      }
      while (done.load(std::memory_order_acquire) < nchunks) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
    }
    // One chunk, run by whichever thread claims it.
    template <class F>
    void serial(F&& body) {
      run(1, 1, [&](int64_t, int64_t) { body(); });
    }

   private:
    TokenPhases& phases_;
    int64_t p_ = 0;
  };

 private:
  std::unique_ptr<std::atomic<int64_t>[]> counters_;
  size_t size_ = 0;
  int64_t count_ = 0;
};

// Chunks run by calling threads (OpenMP: thread 0) and by the other threads since the last call (then
// reset): shows whether the other threads take part (for tests and tuning).
struct PoolStats {
  int64_t caller_chunks, worker_chunks;
};
PoolStats take_pool_stats();

}  // namespace lowbit
