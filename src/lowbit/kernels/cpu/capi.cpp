// A plain C ABI over the torch-free core (engine.h), for lowbit.runtime (numpy + ctypes, no torch).
//
// Built by lowbit/runtime/native.py into a shared library of its own (engine + kernels + work pool + repack +
// this file). Conventions: handles are opaque pointers; functions returning int give 0 on success and -1 on
// failure, with the reason (one line) in lowbit_last_error() of the calling thread; no C++ exception crosses the
// boundary. Memory passed in (tiles, scales, norms, caches, tables) stays owned by the caller and must outlive
// the handles that point into it. Threads: the team size set by lowbit_set_threads (OpenMP's, or the own pool's).
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine.h"

namespace {

thread_local std::string g_error;

int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
#endif
}

std::atomic<int>& threads() {
  static std::atomic<int> n{default_threads()};
  return n;
}

int fail(const std::string& message) {
  g_error = message;
  return -1;
}

// Runs body (returning "" or an error), turning exceptions (allocation) into the error line.
template <class F>
int guarded(F&& body) {
  try {
    const std::string err = body();
    return err.empty() ? 0 : fail(err);
  } catch (const std::exception& e) {
    return fail(std::string("lowbit: ") + e.what());
  }
}

// A new T set up by init(T&) (returning "" or the error): the handle, or nullptr with the error.
template <class T, class F>
void* created(F&& init) {
  try {
    auto p = std::make_unique<T>();
    const std::string err = init(*p);
    if (!err.empty()) {
      fail(err);
      return nullptr;
    }
    return p.release();
  } catch (const std::exception& e) {
    fail(std::string("lowbit: ") + e.what());
    return nullptr;
  }
}

}  // namespace

extern "C" {

const char* lowbit_last_error() { return g_error.c_str(); }

// Comma-separated ISAs usable here, best last (a static string).
const char* lowbit_available_isas() {
  static const std::string names = [] {
    std::string out;
    for (const std::string& n : lowbit::available_isas()) out += (out.empty() ? "" : ",") + n;
    return out;
  }();
  return names.c_str();
}

const char* lowbit_get_isa() { return lowbit::current_table().load()->name; }

int lowbit_set_isa(const char* name) {
  if (name == nullptr || !lowbit::select_isa(name)) {
    return fail(std::string("lowbit kernels: ISA '") + (name ? name : "") +
                "' is not available on this CPU/build; available: " + lowbit_available_isas());
  }
  return 0;
}

int lowbit_get_threads() { return threads().load(); }

// The team size of every later call (>= 1).
int lowbit_set_threads(int n) {
  if (n < 1) return fail("lowbit: threads must be >= 1");
  threads().store(n);
#ifdef _OPENMP
  omp_set_num_threads(n);  // the parallel regions of work_pool.cpp take the team size from OpenMP
#endif
  return 0;
}

// Stored bitstream qweight [N, row_bytes] -> tiles [T, KB, 32 * cb] into `out` (zero-filled by the caller).
int lowbit_repack(const uint8_t* qweight, int64_t row_bytes, int bits, int64_t N, int64_t K, int cb, uint8_t* out) {
  return guarded([&]() -> std::string {
    if (!(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8) || cb < bits ||
        !(cb == 1 || cb == 2 || cb == 4 || cb == 8)) {
      return "lowbit repack: bad bits / container bits";
    }
    if (qweight == nullptr || out == nullptr || N < 0 || K < 0 || row_bytes != (K * bits + 7) / 8) {
      return "lowbit repack: qweight must be uint8 [N, ceil(K*bits/8)]";
    }
    lowbit::repack_weight(qweight, row_bytes, bits, N, K, cb, out, threads().load());
    return "";
  });
}

// A prepared weight over caller-owned buffers (lowbit_kernels.h; mins: offset storage's fp16 group minima
// [T, G, 8] or null); nullptr on error.
void* lowbit_weight_new(const uint8_t* w, int64_t w_bytes, const uint16_t* scales, int64_t T, int64_t G,
                        const uint8_t* zeros, const float* bias, double zero_const, int cb, int full_byte, int64_t N,
                        int64_t K, int64_t gb, int64_t ab, const uint16_t* mins) {
  return created<lowbit::PreparedWeight>([&](lowbit::PreparedWeight& p) {
    return p.init(w, w_bytes, scales, T, G, lowbit::kTileRows, zeros, bias, zero_const, cb, full_byte != 0, N, K, gb, ab,
                  mins);
  });
}

void lowbit_weight_free(void* w) { delete static_cast<lowbit::PreparedWeight*>(w); }

// y [M, N] = x [M, K] . W^T (+ bias).
int lowbit_weight_compute(void* w, const float* x, int64_t M, float* y) {
  return guarded([&]() -> std::string {
    if (w == nullptr || x == nullptr || y == nullptr || M < 0) return "lowbit linear: null weight, x or y";
    static_cast<const lowbit::PreparedWeight*>(w)->compute(x, M, y, threads().load());
    return "";
  });
}

// A decoder over L layers of prepared weights (arrays of L handles / norm pointers); head may be nullptr (then
// norm too). nullptr on error.
void* lowbit_decoder_new(int64_t L, void* const* qkv, void* const* o, void* const* gate_up, void* const* down,
                         const float* const* in_norms, const float* const* post_norms, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, double eps, const float* norm, void* head) {
  lowbit::DecoderWeights w;
  w.heads = heads;
  w.kv_heads = kv_heads;
  w.head_dim = head_dim;
  w.eps = eps;
  w.norm = norm;
  w.head = static_cast<const lowbit::PreparedWeight*>(head);
  for (int64_t i = 0; i < L; ++i) {
    for (void* p : {qkv[i], o[i], gate_up[i], down[i]}) {
      if (p == nullptr) {
        fail("lowbit decoder: a null projection");
        return nullptr;
      }
    }
    w.qkv.push_back(static_cast<const lowbit::PreparedWeight*>(qkv[i]));
    w.o.push_back(static_cast<const lowbit::PreparedWeight*>(o[i]));
    w.gate_up.push_back(static_cast<const lowbit::PreparedWeight*>(gate_up[i]));
    w.down.push_back(static_cast<const lowbit::PreparedWeight*>(down[i]));
    w.in_norms.push_back(in_norms[i]);
    w.post_norms.push_back(post_norms[i]);
  }
  return created<lowbit::Decoder>([&](lowbit::Decoder& d) { return d.init(std::move(w)); });
}

void lowbit_decoder_free(void* d) { delete static_cast<lowbit::Decoder*>(d); }

// One token per row (Decoder::step): h [B, D] in place, logits [B, V] (or nullptr), caches [L, B, KV, max_len, hd],
// fill [L], cos / sin [>= pos + 1, hd].
int lowbit_decoder_step(void* d, float* h, int64_t B, float* logits, float* k_cache, float* v_cache, int64_t max_len,
                        const int64_t* fill, const float* cos, const float* sin, int64_t pos) {
  return guarded([&]() -> std::string {
    if (d == nullptr || h == nullptr || k_cache == nullptr || v_cache == nullptr || fill == nullptr ||
        cos == nullptr || sin == nullptr) {
      return "lowbit decoder: a null buffer";
    }
    return static_cast<lowbit::Decoder*>(d)->step(h, B, logits, k_cache, v_cache, max_len, fill, cos, sin, pos,
                                                  threads().load());
  });
}

// The prompt of one row (Decoder::prefill): h [M, D] in place, logits [V] of the last row (or nullptr), caches
// [L, 1, KV, max_len, hd], cos / sin [>= M, hd].
int lowbit_decoder_prefill(void* d, float* h, int64_t M, float* logits, float* k_cache, float* v_cache,
                           int64_t max_len, const float* cos, const float* sin) {
  return guarded([&]() -> std::string {
    if (d == nullptr || h == nullptr || k_cache == nullptr || v_cache == nullptr || cos == nullptr || sin == nullptr) {
      return "lowbit decoder: a null buffer";
    }
    return static_cast<lowbit::Decoder*>(d)->prefill(h, M, logits, k_cache, v_cache, max_len, cos, sin,
                                                     threads().load());
  });
}

}  // extern "C"
