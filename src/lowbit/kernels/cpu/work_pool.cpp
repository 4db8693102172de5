// Dynamic chunk claiming on torch's OpenMP team, or on an own thread pool (see work_pool.h for why).
//
// Own pool protocol: a job is published by writing its fields, then `state` = (epoch << 32 | 0), then `epoch`. Anyone
// claims chunk i by a compare-exchange of state from (epoch, i) to (epoch, i + 1); success proves the job is
// still live (its last chunk is not even claimed), so the body pointer read before the claim is that job's.
// `done` counts finished chunks; the caller returns once it reaches the chunk count.
#include "work_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LOWBIT_OMP_POOL
#define LOWBIT_OMP_POOL 1
#endif

namespace lowbit {
namespace {

using Body = std::function<void(int64_t, int64_t)>;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

constexpr auto kSpinTime = std::chrono::microseconds(100);  // stay awake this long after a job

class Pool {
 public:
  void run(int64_t n, int64_t grain, int threads, const Body& body) {
    const int64_t nchunks = (n + grain - 1) / grain;
    std::unique_lock<std::mutex> call(call_mu_, std::try_to_lock);
    if (threads <= 1 || nchunks <= 1 || !call.owns_lock()) {
      body(0, n);
      return;
    }
    ensure_workers(threads - 1);
    body_.store(&body);
    n_.store(n);
    grain_.store(grain);
    nchunks_.store(nchunks);
    done_.store(0);
    active_workers_.store(threads - 1);
    const uint32_t e = epoch_.load() + 1;
    state_.store(static_cast<uint64_t>(e) << 32);
    epoch_.store(e);  // publish (seq_cst: pairs with the sleepers_ check of the workers)
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lk(sleep_mu_); }  // a worker between its check and wait holds the lock
      cv_.notify_all();
    }
    caller_chunks_.fetch_add(work(e), std::memory_order_relaxed);
    while (done_.load(std::memory_order_acquire) < nchunks) cpu_relax();
  }

  void add_stats(int64_t caller, int64_t worker) {
    caller_chunks_.fetch_add(caller, std::memory_order_relaxed);
    worker_chunks_.fetch_add(worker, std::memory_order_relaxed);
  }

  PoolStats take_stats() {
    return PoolStats{caller_chunks_.exchange(0), worker_chunks_.exchange(0)};
  }

 private:
  // Claim and run chunks of job e until none is left (or the job is no longer e); returns how many.
  int64_t work(uint32_t e) {
    const Body* body = body_.load();
    const int64_t n = n_.load(), grain = grain_.load(), nchunks = nchunks_.load();
    int64_t ran = 0;
    for (;;) {
      uint64_t s = state_.load();
      if ((s >> 32) != e) return ran;
      const int64_t i = static_cast<int64_t>(s & 0xffffffffu);
      if (i >= nchunks) return ran;
      if (!state_.compare_exchange_weak(s, s + 1)) continue;
      (*body)(i * grain, std::min(n, (i + 1) * grain));
      ++ran;
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void worker_loop(int id) {
    uint32_t seen = epoch_.load();
    for (;;) {
      auto idle_since = std::chrono::steady_clock::now();
      uint32_t e;
      int spins = 0;
      while ((e = epoch_.load()) == seen) {
        cpu_relax();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - idle_since > kSpinTime) {
          std::unique_lock<std::mutex> lk(sleep_mu_);
          sleepers_.fetch_add(1);
          cv_.wait(lk, [&] { return epoch_.load() != seen; });
          sleepers_.fetch_sub(1);
          idle_since = std::chrono::steady_clock::now();
        }
      }
      seen = e;
      if (id < active_workers_.load()) {  // threads beyond the caller's request sit this one out
        worker_chunks_.fetch_add(work(e), std::memory_order_relaxed);
      }
    }
  }

  void ensure_workers(int count) {
    while (static_cast<int>(workers_) < count) {
      const int id = static_cast<int>(workers_++);
      std::thread([this, id] { worker_loop(id); }).detach();  // the pool lives until exit (never deleted)
    }
  }

  std::mutex call_mu_;
  std::atomic<uint32_t> epoch_{0};
  std::atomic<uint64_t> state_{0};
  std::atomic<const Body*> body_{nullptr};
  std::atomic<int64_t> n_{0}, grain_{1}, nchunks_{0}, done_{0};
  std::atomic<int> active_workers_{0};
  size_t workers_ = 0;
  std::mutex sleep_mu_;
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};
  std::atomic<int64_t> caller_chunks_{0}, worker_chunks_{0};
};

std::atomic<Pool*> g_pool{nullptr};
std::mutex g_pool_mu;

#if defined(__unix__) || defined(__APPLE__)
// The child of a fork has none of the parent's threads (and maybe a locked mutex): start over, leaking the old.
void forget_pool_in_child() { g_pool.store(nullptr); }
#endif

Pool& pool() {
  Pool* p = g_pool.load();
  if (p != nullptr) return *p;
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (g_pool.load() == nullptr) {
#if defined(__unix__) || defined(__APPLE__)
    static const bool registered = (pthread_atfork(nullptr, nullptr, forget_pool_in_child), true);
    (void)registered;
#endif
    g_pool.store(new Pool());  // never deleted: detached workers reference it until process exit
  }
  return *g_pool.load();
}

}  // namespace

void parallel_chunks(int64_t n, int64_t grain, int threads, const Body& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (threads <= 1 || n <= grain) {
    body(0, n);
    return;
  }
#if defined(_OPENMP) && LOWBIT_OMP_POOL
  // Chunks claimed dynamically by the threads of torch's OpenMP team (no second pool competing with it).
  const int64_t nchunks = (n + grain - 1) / grain;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> by_master{0}, by_others{0};
#pragma omp parallel
  {
    int64_t ran = 0;
    for (int64_t i; (i = next.fetch_add(1)) < nchunks; ++ran) body(i * grain, std::min(n, (i + 1) * grain));
    (omp_get_thread_num() == 0 ? by_master : by_others).fetch_add(ran);
  }
  pool().add_stats(by_master.load(), by_others.load());
#else
  pool().run(n, grain, threads, body);
#endif
}

void parallel_team(int threads, const std::function<void()>& body) {
  if (threads <= 1) {
    body();
    return;
  }
#if defined(_OPENMP) && LOWBIT_OMP_POOL
#pragma omp parallel
  body();
#else
  pool().run(threads, 1, threads, [&](int64_t, int64_t) { body(); });  // a run claimed twice finds the work done
#endif
}

PoolStats take_pool_stats() { return pool().take_stats(); }

}  // namespace lowbit
