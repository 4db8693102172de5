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

#include <cstdint>
#include <functional>

namespace lowbit {

// Calls body(begin, end) over [0, n) in chunks of `grain` items, on up to `threads` threads (the calling one
// included), and returns when all chunks are done. body must not throw. Concurrent callers are safe (the own
// pool runs a call inline when it is busy); after fork() the child starts afresh.
void parallel_chunks(int64_t n, int64_t grain, int threads, const std::function<void(int64_t, int64_t)>& body);

// Chunks run by calling threads (OpenMP: thread 0) and by the other threads since the last call (then
// reset): shows whether the other threads take part (for tests and tuning).
struct PoolStats {
  int64_t caller_chunks, worker_chunks;
};
PoolStats take_pool_stats();

}  // namespace lowbit
