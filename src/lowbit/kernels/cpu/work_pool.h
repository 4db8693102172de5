// A small work-claiming thread pool for the lowbit kernels.
//
// Why not at::parallel_for (OpenMP): it splits the range statically and ends with a barrier, so a call waits
// for every thread -- on a busy machine one preempted thread stalls the call for a whole scheduler slice
// (milliseconds for a 50-microsecond matmul). Here the range is cut into chunks that the calling thread and
// the workers claim one at a time; the caller only ever waits for chunks another thread has already started,
// so a worker that is not running simply does not take part. Workers spin briefly after a job (back-to-back
// layers find them awake), then sleep on a condition variable.
#pragma once

#include <cstdint>
#include <functional>

namespace lowbit {

// Calls body(begin, end) over [0, n) in chunks of `grain` items, on the calling thread plus up to
// threads - 1 pool workers, and returns when all chunks are done. body must not throw. Concurrent callers are
// safe (a call that finds the pool busy runs inline); after fork() the child starts a fresh pool.
void parallel_chunks(int64_t n, int64_t grain, int threads, const std::function<void(int64_t, int64_t)>& body);

}  // namespace lowbit
