// Torch binding of the lowbit CPU kernels: ISA selection at run time, activation quantization, threading.
//
// Built by lowbit/kernels/fast.py with torch.utils.cpp_extension.load. Threads: torch's intra-op count
// (torch.set_num_threads), claiming chunks dynamically on torch's OpenMP team (work_pool.h).
// The weight layout is prepared in Python (fast.py: prepare); see lowbit_kernels.h.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "lowbit_kernels.h"
#include "work_pool.h"

#ifndef LOWBIT_CHUNKS_PER_THREAD
#define LOWBIT_CHUNKS_PER_THREAD 16
#endif

namespace {

using lowbit::KernelTable;

bool cpu_supports(const std::string& isa) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == "avx2") return avx2;
  if (isa == "avx512vnni") {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
  }
#endif
  return isa == "scalar";
}

// Kernel tables this build has and this CPU can run, best last.
std::vector<const KernelTable*> usable_tables() {
  std::vector<const KernelTable*> out{lowbit::scalar_kernels()};
  // Check the CPU before asking for a table: never touch wide code on a CPU without it.
  if (cpu_supports("avx2") && lowbit::avx2_kernels() != nullptr) out.push_back(lowbit::avx2_kernels());
  if (cpu_supports("avx512vnni") && lowbit::avx512vnni_kernels() != nullptr) {
    out.push_back(lowbit::avx512vnni_kernels());
  }
  return out;
}

// The selected kernels; atomic because set_isa may run while another thread computes.
std::atomic<const KernelTable*>& current_table() {
  static std::atomic<const KernelTable*> table{usable_tables().back()};
  return table;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const KernelTable* t : usable_tables()) names.emplace_back(t->name);
  return names;
}

std::string get_isa() { return current_table().load()->name; }

void set_isa(const std::string& name) {
  for (const KernelTable* t : usable_tables()) {
    if (name == t->name) {
      current_table().store(t);
      return;
    }
  }
  TORCH_CHECK(false, "lowbit kernels: ISA '", name, "' is not available on this CPU/build; available: ",
              c10::Join(", ", available_isas()));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row stride of row-major int8 activations (the fused path): padded off multiples of 1 KB, since rows a
// multiple of 4 KB apart share L1 sets (a kernel reading several rows at once was measured 25% slower at
// K = 4096 without the pad).
int64_t act_row_stride(int64_t KB) {
  const int64_t row = KB * lowbit::kBlock;
  return row % 1024 == 0 ? row + 64 : row;
}

// Rows per activation row group (Acts::rg): the panel GEMM's row block, row-major (1) for the fused path.
int64_t act_row_group(const KernelTable* kt, int64_t M) {
  return M <= lowbit::kSmallMaxM ? 1 : std::max(1, kt->large_rows);
}

// Bytes between row groups of the int8 activations.
int64_t act_group_stride(int64_t KB, int64_t rg) { return rg == 1 ? act_row_stride(KB) : rg * KB * lowbit::kBlock; }

// One matmul call, planned: the weight tiles, where x's quantized codes go, and the split of the work into
// units. run() drives it on the work pool (the quantization, then the units); the decoder stack drives the same
// two pieces from its one parallel region per token (DecoderStack::step), so both compute every output with the
// same instructions in the same order.
struct MatmulCall {
  const KernelTable* kt;
  const float* x;
  int64_t M, K, KB, G, gb, ab, ldq, rg;
  int8_t* xq;
  float* a;
  int32_t* isum;
  float* gsum;
  float zero_const;
  bool u8, has_static;
  lowbit::ActStatic st;
  lowbit::Tiles tiles;
  lowbit::Acts acts;
  const float* bias;
  float* y;
  bool small;
  int64_t row_grain, unit_tiles, unit_rows, row_units, units, grain;

  // Quantize rows [m0, m1) of x.
  void quantize(int64_t m0, int64_t m1) const {
    kt->quantize(x, K, K, KB, ab, m0, m1, xq, ldq, rg, a, isum, u8, has_static ? &st : nullptr);
    // Per-group sums of the dequantized activations, for the zero-point term (times the constant zero
    // point of symmetric formats, so the kernels need no zero-point data for them).
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int64_t kb = g * gb; kb < std::min(KB, (g + 1) * gb); ++kb) {
          s += a[m * KB + kb] * static_cast<float>(isum[m * KB + kb]);
        }
        gsum[m * G + g] = s * zero_const;
      }
    }
  }

  // Work units [u0, u1) of the product (after every row is quantized).
  void compute_units(int64_t u0, int64_t u1) const {
    const int64_t T = tiles.T;
    if (small) {
      kt->gemm_small(tiles, acts, bias, y, unit_tiles * u0, std::min(T, unit_tiles * u1));
      return;
    }
    // Room for the unpacked weight panel and the row buffer; per thread, reused across calls, 64-byte aligned.
    const size_t need = static_cast<size_t>(kt->large_scratch(KB)) + 64;
    thread_local std::vector<uint8_t> scratch;
    if (scratch.size() < need) scratch.resize(need);
    uint8_t* sp64 = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) / 64 * 64);
    for (int64_t u = u0; u < u1; ++u) {  // unit u: tile group u / row_units, row chunk u % row_units
      const int64_t tg = u / row_units, rc = u % row_units;
      kt->gemm_large(tiles, acts, bias, y, unit_tiles * tg, std::min(T, unit_tiles * (tg + 1)), unit_rows * rc,
                     std::min(M, unit_rows * (rc + 1)), sp64);
    }
  }
};

MatmulCall plan_call(const KernelTable* kt, const float* xp, int64_t M, int64_t K, int64_t KB, int64_t G, int64_t gb,
                     int64_t ab, int8_t* xqp, float* ap, int32_t* isp, float* gsp, const uint8_t* wp,
                     const uint16_t* sp, const uint8_t* zp, float zero_const, int64_t cb, bool full_byte, int64_t N,
                     int64_t T, const float* biasp, float* yp, bool clamp, float lo, float hi,
                     const lowbit::ActStatic* st, int threads) {
  const bool small = M <= lowbit::kSmallMaxM;
  // Integral constant zero points (symmetric, bits >= 2) go into the integer sums of the SIMD kernels.
  const int32_t zint = zp == nullptr && zero_const >= 1.0f && zero_const == static_cast<float>(
                           static_cast<int32_t>(zero_const)) ? static_cast<int32_t>(zero_const) : 0;
  // Grouped weights with such a zero point and one activation scale per row: unsigned activations for the
  // panel GEMM where the kernels take them (the zero point then costs nothing per row).
  const bool u8 = !small && kt->u8_rows && G > 1 && zint != 0 && ab >= KB;
  const int64_t rg = act_row_group(kt, M), ldq = act_group_stride(KB, rg);
  // Quantization chunks of >= 2^18 inputs (~50 us): a smaller x is quantized by the caller alone, since a
  // parallel region waits for every thread of the team to arrive, and on a busy machine one that is not
  // running costs more than the quantization (measured at 2 threads, M = 197, K = 768: ~10x the call).
  const int64_t row_grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K, 1));
  // Work is split in units (the fused path: two tiles; the panel GEMM: the kernel's tile group x at most
  // kLargeMChunk rows, so that small-N layers with many rows, such as pointwise convolutions, still use every
  // thread), claimed in chunks: about 16 chunks per thread for balance (a late or preempted thread only delays
  // its own chunk), each worth >= ~2^16 MACs. The split never changes which thread order computes an output.
  const int64_t unit_tiles = small ? 2 : std::max(1, kt->large_tiles);
  const int64_t unit_rows = small ? M : std::min<int64_t>(M, lowbit::kLargeMChunk);
  const int64_t tile_units = ceil_div(T, unit_tiles), row_units = ceil_div(M, unit_rows);
  const int64_t units = tile_units * row_units;
  const int64_t unit_macs = unit_tiles * lowbit::kTileRows * KB * lowbit::kBlock * unit_rows;
  const int64_t min_grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(unit_macs, 1));
  const int64_t grain = std::max(min_grain, units / (LOWBIT_CHUNKS_PER_THREAD * std::max(threads, 1)));
  MatmulCall c{kt, xp, M, K, KB, G, gb, ab, ldq, rg, xqp, ap, isp, gsp, zero_const, u8, st != nullptr,
               st != nullptr ? *st : lowbit::ActStatic{0.0f, 0.0f, 0.0f, 0.0f},
               lowbit::Tiles{wp, sp, zp, zint, zp == nullptr ? zero_const : 1.0f, static_cast<int>(cb), full_byte,
                             N, T, KB, G, gb, clamp, lo, hi},
               lowbit::Acts{xqp, ap, isp, gsp, M, KB, G, ldq, ab, rg, u8}, biasp, yp, small, row_grain, unit_tiles,
               unit_rows, row_units, units, grain};
  return c;
}

// Quantize x, then the matmul, on the work pool.
void run(const MatmulCall& c, int threads) {
  lowbit::parallel_chunks(c.M, c.row_grain, threads, [&](int64_t m0, int64_t m1) { c.quantize(m0, m1); });
  lowbit::parallel_chunks(c.units, c.grain, threads, [&](int64_t u0, int64_t u1) { c.compute_units(u0, u1); });
}

size_t round64(size_t n) { return (n + 63) / 64 * 64; }

// A prepared weight (see lowbit_kernels.h), validated once: the per-call path only checks the input.
// `splits` (output widths summing to N) lets several layers that read the same input share one call (the
// fused projections of lowbit/kernels/fusion.py); empty for a single layer.
class Prepared {
 public:
  Prepared(torch::Tensor w, torch::Tensor scales, const c10::optional<torch::Tensor>& zeros, double zero_const,
           const c10::optional<torch::Tensor>& bias, int64_t cb, bool full_byte, int64_t N, int64_t K, int64_t gb,
           int64_t ab, std::vector<int64_t> splits)
      : w_(std::move(w)), scales_(std::move(scales)), zero_const_(static_cast<float>(zero_const)), cb_(cb),
        full_byte_(full_byte), N_(N), K_(K), KB_(ceil_div(K, lowbit::kBlock)), T_(ceil_div(N, lowbit::kTileRows)),
        gb_(gb), ab_(ab), splits_(std::move(splits)) {
    TORCH_CHECK(cb == 1 || cb == 2 || cb == 4 || cb == 8, "lowbit linear: container bits must be 1/2/4/8");
    TORCH_CHECK(w_.scalar_type() == torch::kUInt8 && w_.is_contiguous() &&
                    w_.numel() == T_ * KB_ * lowbit::kBlock * cb,
                "lowbit linear: packed tiles do not match N/K/bits");
    TORCH_CHECK(scales_.scalar_type() == torch::kHalf && scales_.is_contiguous() && scales_.dim() == 3 &&
                    scales_.size(0) == T_ && scales_.size(2) == lowbit::kTileRows,
                "lowbit linear: scales must be float16 [T, G, 8]");
    G_ = scales_.size(1);
    if (zeros.has_value() && zeros->defined()) {
      TORCH_CHECK(zeros->scalar_type() == torch::kUInt8 && zeros->is_contiguous() &&
                      zeros->sizes() == scales_.sizes(),
                  "lowbit linear: zeros must be uint8 shaped like scales");
      zeros_ = *zeros;
      zero_const_ = 1.0f;  // the zero points come from `zeros`
    }
    TORCH_CHECK(gb >= 1 && gb * (G_ - 1) < KB_ && gb * G_ >= KB_, "lowbit linear: group blocks do not tile K");
    TORCH_CHECK(ab >= 1 && (G_ == 1 || gb % ab == 0 || ab >= KB_),
                "lowbit linear: activation blocks must divide the weight groups or span the whole row");
    ab_ = std::min(ab, KB_);  // one block spanning the row: one activation scale per row
    if (bias.has_value() && bias->defined()) {
      bias_ = bias->to(torch::kFloat).contiguous();
      TORCH_CHECK(bias_.numel() == N, "lowbit linear: bias must have N elements");
    }
    int64_t total = 0;
    for (int64_t n : splits_) total += n;
    TORCH_CHECK(splits_.empty() || total == N, "lowbit linear: output splits must sum to N");
  }

  // y [..., N] = x [..., K] . W^T (+ bias), clamped to [lo, hi] when clamp (a fused activation); x of any float
  // dtype and layout, y has x's dtype. act_scale > 0: x is rounded with that static scale to integers in
  // [act_lo, act_hi] (lowbit_kernels.h: ActStatic) instead of per-row / per-block scales computed here.
  torch::Tensor forward(const torch::Tensor& x_in, bool clamp = false, double lo = 0.0, double hi = 0.0,
                        double act_scale = 0.0, double act_lo = -127.0, double act_hi = 127.0) const {
    TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K_, "lowbit linear: x has ", x_in.size(-1),
                " features, the weight expects K=", K_);
    TORCH_CHECK(x_in.is_floating_point() && x_in.device().is_cpu(), "lowbit linear: x must be a float CPU tensor");
    torch::Tensor x = x_in.scalar_type() == torch::kFloat ? x_in : x_in.to(torch::kFloat);
    if (!x.is_contiguous()) x = x.contiguous();
    const int64_t M = x.numel() / K_;
    std::vector<int64_t> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
    out_sizes.back() = N_;
    auto y = torch::empty(out_sizes, x.options());
    TORCH_CHECK(act_scale >= 0.0 && std::isfinite(act_scale) && act_lo >= -127.0 && act_hi <= 127.0 &&
                    act_lo <= 0.0 && act_hi >= 0.0 && act_lo == std::nearbyint(act_lo) && act_hi == std::nearbyint(act_hi),
                "lowbit linear: a static activation scale must be finite and >= 0 with integer limits "
                "-127 <= act_lo <= 0 <= act_hi <= 127");
    compute(x.data_ptr<float>(), M, y.data_ptr<float>(), clamp, lo, hi, act_scale, act_lo, act_hi);
    return x_in.scalar_type() == torch::kFloat ? y : y.to(x_in.scalar_type());
  }

  // y [M, N] = x [M, K] . W^T (+ bias) on raw contiguous float32 rows (the decoder stack's buffers: no tensor
  // is made per call); the arguments after y as in forward().
  void compute(const float* xp, int64_t M, float* yp, bool clamp = false, double lo = 0.0, double hi = 0.0,
               double act_scale = 0.0, double act_lo = -127.0, double act_hi = 127.0) const {
    const float sc = static_cast<float>(act_scale);
    const lowbit::ActStatic st{sc, sc > 0.0f ? 1.0f / sc : 0.0f, static_cast<float>(act_lo),
                               static_cast<float>(act_hi)};
    if (M <= 0 || N_ <= 0) return;
    const KernelTable* kt = current_table().load();
    thread_local std::vector<int64_t> buf;
    const size_t total = act_bytes(kt, M);
    if (buf.size() * 8 < total) buf.resize(total / 8 + 1);
    const int threads = at::get_num_threads();
    run(plan(kt, xp, M, yp, buf.data(), threads, clamp, lo, hi, act_scale > 0.0 ? &st : nullptr), threads);
  }

  // Bytes of the quantized activations of M rows: xq [row groups, group stride] int8 | a [M, KB] float |
  // isum [M, KB] int32 | gsum [M, G] float, 64-byte aligned parts (plan() lays them out in this order).
  size_t act_bytes(const KernelTable* kt, int64_t M) const {
    const int64_t rg = act_row_group(kt, M);
    return round64(static_cast<size_t>(ceil_div(M, rg) * act_group_stride(KB_, rg))) +
           2 * round64(static_cast<size_t>(M * KB_) * 4) + round64(static_cast<size_t>(M * G_) * 4);
  }

  // The call y [M, N] = x [M, K] . W^T (+ bias) with its activations in `act` (act_bytes(kt, M) bytes, 8-byte
  // aligned), split for `threads` threads.
  MatmulCall plan(const KernelTable* kt, const float* xp, int64_t M, float* yp, void* act, int threads,
                  bool clamp = false, double lo = 0.0, double hi = 0.0, const lowbit::ActStatic* st = nullptr) const {
    const int64_t rg = act_row_group(kt, M);
    const size_t o_a = round64(static_cast<size_t>(ceil_div(M, rg) * act_group_stride(KB_, rg)));
    const size_t o_is = o_a + round64(static_cast<size_t>(M * KB_) * 4);
    const size_t o_gs = o_is + round64(static_cast<size_t>(M * KB_) * 4);
    char* base = static_cast<char*>(act);
    return plan_call(kt, xp, M, K_, KB_, G_, gb_, ab_, reinterpret_cast<int8_t*>(base),
                     reinterpret_cast<float*>(base + o_a), reinterpret_cast<int32_t*>(base + o_is),
                     reinterpret_cast<float*>(base + o_gs), w_.data_ptr<uint8_t>(),
                     reinterpret_cast<const uint16_t*>(scales_.data_ptr<at::Half>()),
                     zeros_.defined() ? zeros_.data_ptr<uint8_t>() : nullptr, zero_const_, cb_, full_byte_, N_, T_,
                     bias_.defined() ? bias_.data_ptr<float>() : nullptr, yp, clamp, static_cast<float>(lo),
                     static_cast<float>(hi), st, threads);
  }

  int64_t n() const { return N_; }
  int64_t k() const { return K_; }

  // The outputs of the layers sharing this call: views [..., splits[i]] of one [..., N] result.
  std::vector<torch::Tensor> forward_split(const torch::Tensor& x) const {
    return forward(x).split_with_sizes(splits_, -1);
  }

 private:
  torch::Tensor w_, scales_, zeros_, bias_;
  float zero_const_;
  int64_t cb_;
  bool full_byte_;
  int64_t N_, K_, KB_, T_, G_ = 1, gb_, ab_;
  std::vector<int64_t> splits_;
};

// Heads of one query token over a KV cache on the current kernels (lowbit_kernels.h: DecodeAttention), on the
// work pool when the heads are worth it (each head costs ~4 n hd flops; a parallel region a few microseconds).
void attend_heads(const lowbit::DecodeAttention& a, int64_t B) {
  const KernelTable* kt = current_table().load();
  const int64_t heads = B * a.heads;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, a.n * a.hd));
  lowbit::parallel_chunks(heads, grain, at::get_num_threads(), [&](int64_t h0, int64_t h1) { kt->attend(a, h0, h1); });
}

// The decode ops for lean_decode.py's Python loop (the native step below runs the same functions, so the two are
// bit-equal). rms_norm: x [..., D] float32 -> y of its shape.
torch::Tensor rms_norm(const torch::Tensor& x_in, const torch::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat && w_in.scalar_type() == torch::kFloat && x_in.dim() >= 1 &&
                  w_in.dim() == 1 && x_in.size(-1) == w_in.size(0), "lowbit rms_norm: float32 x [..., D], w [D]");
  const torch::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  auto y = torch::empty_like(x);
  const int64_t D = x.size(-1), rows = D > 0 ? x.numel() / D : 0;
  if (rows > 0) current_table().load()->rms_norm(x.data_ptr<float>(), w.data_ptr<float>(), D, static_cast<float>(eps),
                                                 y.data_ptr<float>(), 0, rows);
  return y;
}

// silu(gate) * up, float32 of one shape (any layout).
torch::Tensor silu_mul(const torch::Tensor& g_in, const torch::Tensor& u_in) {
  TORCH_CHECK(g_in.scalar_type() == torch::kFloat && u_in.scalar_type() == torch::kFloat &&
                  g_in.sizes() == u_in.sizes(), "lowbit silu_mul: float32 gate and up of one shape");
  const torch::Tensor g = g_in.contiguous(), u = u_in.contiguous();
  auto y = torch::empty_like(g);
  if (g.numel() > 0) current_table().load()->silu_mul(g.data_ptr<float>(), u.data_ptr<float>(), g.numel(), y.data_ptr<float>());
  return y;
}

// One query token q [B, H, 1, hd] over the first n entries of a cache layer k, v [B, KV, max_len, hd] (float32,
// contiguous): [B, H, 1, hd] (scaled_dot_product_attention with GQA, scale 1/sqrt(hd)).
torch::Tensor decode_attention(const torch::Tensor& q_in, const torch::Tensor& k, const torch::Tensor& v, int64_t n) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1 && k.dim() == 4 && k.sizes() == v.sizes() &&
                  q_in.size(0) == k.size(0) && q_in.size(3) == k.size(3) && k.size(1) > 0 &&
                  q_in.size(1) % k.size(1) == 0 && n >= 1 && n <= k.size(2) && k.is_contiguous() && v.is_contiguous() &&
                  q_in.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat &&
                  v.scalar_type() == torch::kFloat,
              "lowbit decode_attention: float32 q [B, H, 1, hd], contiguous k, v [B, KV, max_len, hd], 1 <= n <= max_len");
  const torch::Tensor q = q_in.contiguous();
  auto out = torch::empty_like(q);
  const int64_t hd = q.size(3);
  const lowbit::DecodeAttention a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                                  q.size(1), k.size(1), hd, n, k.size(2) * hd,
                                  static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)))};
  attend_heads(a, q.size(0));
  return out;
}

// One decode step (one new token per row) through a stack of Llama-layout decoder layers whose projections are
// all prepared packed weights: the op sequence of lowbit/models/lean_decode.py's `_forward` for T = 1 with the
// same functions (the kernels' rms_norm, decode attention and silu_mul; RoPE and the residual adds in the same
// float operations), on buffers allocated once, so that a token costs one Python call and no tensor per op.
// With a head (the final norm's weight and the prepared lm_head), step returns the logits [B, V].
class DecoderStack {
 public:
  DecoderStack(std::vector<torch::Tensor> in_norms, std::vector<torch::Tensor> post_norms,
               std::vector<py::object> qkv, std::vector<py::object> o, std::vector<py::object> gate_up,
               std::vector<py::object> down, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
               const c10::optional<torch::Tensor>& norm, const py::object& head)
      : in_norms_(std::move(in_norms)), post_norms_(std::move(post_norms)), keep_alive_(),
        H_(heads), KV_(kv_heads), hd_(head_dim), eps_(eps) {
    const size_t L = in_norms_.size();
    TORCH_CHECK(post_norms_.size() == L && qkv.size() == L && o.size() == L && gate_up.size() == L &&
                    down.size() == L, "lowbit decoder stack: one of each per layer");
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim % 2 == 0,
                "lowbit decoder stack: bad head geometry");
    for (size_t i = 0; i < L; ++i) {
      for (auto* list : {&qkv, &o, &gate_up, &down}) keep_alive_.push_back((*list)[i]);
      qkv_.push_back(qkv[i].cast<const Prepared*>());
      o_.push_back(o[i].cast<const Prepared*>());
      gate_up_.push_back(gate_up[i].cast<const Prepared*>());
      down_.push_back(down[i].cast<const Prepared*>());
      TORCH_CHECK(qkv_[i]->n() == (H_ + 2 * KV_) * hd_ && o_[i]->k() == H_ * hd_ && gate_up_[i]->n() % 2 == 0 &&
                      down_[i]->k() * 2 == gate_up_[i]->n() && o_[i]->n() == down_[i]->n() &&
                      qkv_[i]->k() == o_[i]->n() && gate_up_[i]->k() == o_[i]->n() &&
                      in_norms_[i].numel() == o_[i]->n() && post_norms_[i].numel() == o_[i]->n(),
                  "lowbit decoder stack: projection shapes do not match the heads");
      in_norms_[i] = in_norms_[i].to(torch::kFloat).contiguous();
      post_norms_[i] = post_norms_[i].to(torch::kFloat).contiguous();
    }
    if (!head.is_none()) {
      TORCH_CHECK(norm.has_value() && norm->defined(), "lowbit decoder stack: a head needs the final norm");
      keep_alive_.push_back(head);
      head_ = head.cast<const Prepared*>();
      norm_ = norm->to(torch::kFloat).contiguous();
      TORCH_CHECK(L > 0 && head_->k() == o_[0]->n() && norm_.numel() == head_->k(),
                  "lowbit decoder stack: the head does not match the hidden size");
    }
  }

  // h [B, 1, D] float32 at position `pos` -> the hidden state after every layer [B, 1, D], or with a head the
  // logits [B, V] of the final-normed state. Layer i's K/V go to entry fill[i] of k_cache[i] / v_cache[i]
  // ([L, B, KV, max_len, hd], float32, contiguous); cos / sin: [max_len, hd] (sin with the rotate-half sign
  // folded in, as lean_decode.py keeps it). Not for concurrent callers (the buffers are the stack's own).
  torch::Tensor step(const torch::Tensor& h_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const std::vector<int64_t>& fill, const torch::Tensor& cos, const torch::Tensor& sin,
                     int64_t pos) {
    const int64_t L = static_cast<int64_t>(qkv_.size());
    TORCH_CHECK(h_in.dim() == 3 && h_in.size(1) == 1 && h_in.scalar_type() == torch::kFloat && L > 0 &&
                    h_in.size(2) == o_[0]->n(), "lowbit decoder stack: h [B, 1, D] float32");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == torch::kFloat &&
                    v_cache.scalar_type() == torch::kFloat && k_cache.sizes() == v_cache.sizes() &&
                    k_cache.dim() == 5 && k_cache.size(0) == L && k_cache.size(1) == h_in.size(0) &&
                    k_cache.size(2) == KV_ && k_cache.size(4) == hd_,
                "lowbit decoder stack: caches must be float32 [L, B, KV, max_len, hd]");
    TORCH_CHECK(static_cast<int64_t>(fill.size()) == L, "lowbit decoder stack: one fill per layer");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat &&
                    sin.scalar_type() == torch::kFloat && cos.size(-1) == hd_ && sin.sizes() == cos.sizes() &&
                    pos >= 0 && pos < cos.size(0),
                "lowbit decoder stack: cos/sin [max_len, hd] float32 covering pos");
    const int64_t B = h_in.size(0), D = h_in.size(2), max_len = k_cache.size(3), half = hd_ / 2;
    const int64_t F = gate_up_[0]->n() / 2, row = (H_ + 2 * KV_) * hd_;
    for (int64_t i = 0; i < L; ++i) {
      TORCH_CHECK(fill[i] >= 0 && fill[i] < max_len, "lowbit decoder stack: the KV cache is full");
      TORCH_CHECK(gate_up_[i]->n() == 2 * F, "lowbit decoder stack: layers of one MLP width");
    }
    const KernelTable* kt = current_table().load();
    const float* c = cos.data_ptr<float>() + pos * hd_;
    const float* s = sin.data_ptr<float>() + pos * hd_;
    // x * cos + swap_halves(x) * sin, elementwise as torch computes it (two products, one sum).
    auto rope = [&](const float* x, float* out) {
      for (int64_t j = 0; j < hd_; ++j) {
        const float a = x[j] * c[j];
        const float b = x[j < half ? j + half : j - half] * s[j];
        out[j] = a + b;
      }
    };
    // Buffers: x (normed) [B, D] | qkv [B, row] | q [B, H, hd] | attn [B, H, hd] | gu [B, 2F] | act [B, F] | y [B, D].
    const int64_t sizes[] = {B * D, B * row, B * H_ * hd_, B * H_ * hd_, B * 2 * F, B * F, B * D};
    int64_t total = 0;
    for (int64_t n : sizes) total += (n + 15) / 16 * 16;  // 64-byte aligned parts
    if (static_cast<int64_t>(buf_.size()) < total + 16) buf_.resize(static_cast<size_t>(total + 16));
    float* parts[7];
    float* cur = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf_.data()) + 63) / 64 * 64);
    for (int j = 0; j < 7; ++j) {
      parts[j] = cur;
      cur += (sizes[j] + 15) / 16 * 16;
    }
    float *x = parts[0], *qkv = parts[1], *q = parts[2], *attn = parts[3], *gu = parts[4], *act = parts[5], *y = parts[6];
    torch::Tensor h = h_in.contiguous().clone();  // the residual stream, returned
    float* hp = h.data_ptr<float>();
    torch::Tensor logits = head_ == nullptr ? torch::Tensor() : torch::empty({B, head_->n()}, h.options());
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd_)));
    const float eps = static_cast<float>(eps_);
    const int threads = at::get_num_threads();
    // Every matmul of the token planned up front, all reading their activations from one buffer (a call's codes
    // are consumed before the next call quantizes).
    size_t act_total = 0;
    for (int64_t i = 0; i < L; ++i) {
      for (const Prepared* p : {qkv_[i], o_[i], gate_up_[i], down_[i]}) act_total = std::max(act_total, p->act_bytes(kt, B));
    }
    if (head_ != nullptr) act_total = std::max(act_total, head_->act_bytes(kt, B));
    if (act_buf_.size() * 8 < act_total) act_buf_.resize(act_total / 8 + 1);
    plans_.clear();
    for (int64_t i = 0; i < L; ++i) {
      plans_.push_back(qkv_[i]->plan(kt, x, B, qkv, act_buf_.data(), threads));
      plans_.push_back(o_[i]->plan(kt, attn, B, y, act_buf_.data(), threads));
      plans_.push_back(gate_up_[i]->plan(kt, x, B, gu, act_buf_.data(), threads));
      plans_.push_back(down_[i]->plan(kt, act, B, y, act_buf_.data(), threads));
    }
    if (head_ != nullptr) plans_.push_back(head_->plan(kt, x, B, logits.data_ptr<float>(), act_buf_.data(), threads));
    float* k_base = k_cache.data_ptr<float>();
    float* v_base = v_cache.data_ptr<float>();
    const int64_t layer_stride = B * KV_ * max_len * hd_;
    // The whole token in one parallel region (work_pool.h: TokenPhases): per layer four serial steps (the small
    // float ops and each matmul's activation quantization, done by whichever thread claims them) and four
    // matmuls whose tiles the threads share out -- instead of a parallel region per matmul and attention (~150
    // per SmolLM2 token), each of which waits for every thread of the team to arrive.
    phases_.reset(8 * L + 2);
    lowbit::parallel_team(threads, [&] {
      lowbit::TokenPhases::Cursor cur(phases_);
      // One thread takes a matmul whole: the kernels' prefetch of the next tiles stops at a chunk's end.
      auto matmul = [&](const MatmulCall& c) {
        cur.run(c.units, threads > 1 ? c.grain : c.units, [&](int64_t u0, int64_t u1) { c.compute_units(u0, u1); });
      };
      for (int64_t i = 0; i < L; ++i) {
        const MatmulCall* pl = plans_.data() + 4 * i;
        const int64_t f = fill[i];
        float* kc = k_base + i * layer_stride;
        float* vc = v_base + i * layer_stride;
        cur.serial([&] {
          if (i > 0) for (int64_t j = 0; j < B * D; ++j) hp[j] = hp[j] + y[j];  // the previous layer's MLP
          kt->rms_norm(hp, in_norms_[i].data_ptr<float>(), D, eps, x, 0, B);
          pl[0].quantize(0, B);
        });
        matmul(pl[0]);
        cur.serial([&] {
          for (int64_t b = 0; b < B; ++b) {
            const float* src = qkv + b * row;
            for (int64_t n = 0; n < H_; ++n) rope(src + n * hd_, q + (b * H_ + n) * hd_);
            for (int64_t g = 0; g < KV_; ++g) {
              const int64_t off = ((b * KV_ + g) * max_len + f) * hd_;
              rope(src + (H_ + g) * hd_, kc + off);
              std::memcpy(vc + off, src + (H_ + KV_ + g) * hd_, sizeof(float) * hd_);
            }
          }
          // A few microseconds for all heads (~4 n hd flops each): not worth sharing out.
          kt->attend(lowbit::DecodeAttention{q, kc, vc, attn, H_, KV_, hd_, f + 1, max_len * hd_, scale}, 0, B * H_);
          pl[1].quantize(0, B);
        });
        matmul(pl[1]);
        cur.serial([&] {
          for (int64_t j = 0; j < B * D; ++j) hp[j] = hp[j] + y[j];
          kt->rms_norm(hp, post_norms_[i].data_ptr<float>(), D, eps, x, 0, B);
          pl[2].quantize(0, B);
        });
        matmul(pl[2]);
        cur.serial([&] {
          for (int64_t b = 0; b < B; ++b) kt->silu_mul(gu + b * 2 * F, gu + b * 2 * F + F, F, act + b * F);
          pl[3].quantize(0, B);
        });
        matmul(pl[3]);
      }
      cur.serial([&] {
        for (int64_t j = 0; j < B * D; ++j) hp[j] = hp[j] + y[j];
        if (head_ != nullptr) {
          kt->rms_norm(hp, norm_.data_ptr<float>(), D, eps, x, 0, B);
          plans_.back().quantize(0, B);
        }
      });
      if (head_ != nullptr) matmul(plans_.back());
    });
    return head_ == nullptr ? h : logits;
  }

  bool has_head() const { return head_ != nullptr; }

 private:
  std::vector<torch::Tensor> in_norms_, post_norms_;
  std::vector<py::object> keep_alive_;  // the Prepared objects below stay owned by Python
  std::vector<const Prepared*> qkv_, o_, gate_up_, down_;
  const Prepared* head_ = nullptr;
  torch::Tensor norm_;
  std::vector<float> buf_;
  std::vector<int64_t> act_buf_;  // the quantized activations of the step's matmuls (one at a time)
  std::vector<MatmulCall> plans_;
  lowbit::TokenPhases phases_;
  int64_t H_, KV_, hd_;
  double eps_;
};

// One-off call (tests, benchmarks): validates the weight, then computes.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                     const c10::optional<torch::Tensor>& zeros, double zero_const,
                     const c10::optional<torch::Tensor>& bias, int64_t cb, bool full_byte, int64_t N, int64_t K,
                     int64_t gb, int64_t ab) {
  return Prepared(w, scales, zeros, zero_const, bias, cb, full_byte, N, K, gb, ab, {}).forward(x);
}

// Stored bitstream qweight [N, ceil(K*bits/8)] -> tiles [T, KB, 32*cb] (see lowbit_kernels.h).
torch::Tensor repack(const torch::Tensor& qweight, int64_t bits, int64_t N, int64_t K, int64_t cb) {
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.dim() == 2 && qweight.size(0) == N &&
                  qweight.size(1) == (K * bits + 7) / 8,
              "lowbit repack: qweight must be uint8 [N, ceil(K*bits/8)]");
  TORCH_CHECK((bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8) && cb >= bits &&
                  (cb == 1 || cb == 2 || cb == 4 || cb == 8),
              "lowbit repack: bad bits / container bits");
  const torch::Tensor q = qweight.contiguous();
  const int64_t T = ceil_div(N, lowbit::kTileRows), KB = ceil_div(K, lowbit::kBlock);
  auto out = torch::zeros({T, KB, lowbit::kBlock * cb}, q.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  lowbit::parallel_chunks(T, 8, at::get_num_threads(), [&](int64_t t0, int64_t t1) {
    lowbit::repack_tiles(qp, q.size(1), static_cast<int>(bits), N, K, static_cast<int>(cb), op, t0, t1);
  });
  return out;
}

// Depthwise convolution (lowbit_kernels.h: DwConv) of x [B, C, H, W] (any float dtype and memory format; a
// channels-last float32 x is read in place) with taps w [KH, KW, C]: y [B, C, OH, OW] float32, channels-last.
torch::Tensor dwconv(const torch::Tensor& x_in, const torch::Tensor& w_in, const c10::optional<torch::Tensor>& bias,
                     int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t oh, int64_t ow, bool clamp, double lo,
                     double hi) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.is_floating_point() && x_in.device().is_cpu(),
              "lowbit dwconv: x must be a float CPU tensor [B, C, H, W]");
  TORCH_CHECK(w_in.dim() == 3 && w_in.size(2) == x_in.size(1), "lowbit dwconv: taps must be [KH, KW, C]");
  TORCH_CHECK(sh >= 1 && sw >= 1 && pt >= 0 && pl >= 0 && oh >= 0 && ow >= 0, "lowbit dwconv: bad geometry");
  const torch::Tensor x = x_in.to(torch::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const torch::Tensor w = w_in.to(torch::kFloat).contiguous();
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(b.numel() == x.size(1), "lowbit dwconv: bias must have C elements");
  }
  const int64_t B = x.size(0), C = x.size(1);
  auto y = torch::empty({B, C, oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const lowbit::DwConv p{x.data_ptr<float>(), w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                         y.data_ptr<float>(), B, x.size(2), x.size(3), C, oh, ow, static_cast<int>(w.size(0)),
                         static_cast<int>(w.size(1)), static_cast<int>(sh), static_cast<int>(sw),
                         static_cast<int>(pt), static_cast<int>(pl), clamp, static_cast<float>(lo),
                         static_cast<float>(hi)};
  const KernelTable* kt = current_table().load();
  // Chunks of output rows worth >= ~2^16 MACs (below that a parallel region costs more than it saves).
  const int64_t row_macs = std::max<int64_t>(1, ow * C * w.size(0) * w.size(1));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / row_macs);
  lowbit::parallel_chunks(B * oh, grain, at::get_num_threads(), [&](int64_t r0, int64_t r1) { kt->dwconv(p, r0, r1); });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit packed low-bit linear kernels (CPU)";
  m.def("linear", &linear, "y = x . W^T (+ bias) for prepared low-bit tiles", py::arg("x"), py::arg("w"),
        py::arg("scales"), py::arg("zeros"), py::arg("zero_const"), py::arg("bias"), py::arg("cb"),
        py::arg("full_byte"), py::arg("N"), py::arg("K"), py::arg("gb"), py::arg("ab"));
  py::class_<Prepared>(m, "Prepared", "a validated prepared weight: call(x) -> y, split(x) -> [y_i]")
      .def(py::init<torch::Tensor, torch::Tensor, const c10::optional<torch::Tensor>&, double,
                    const c10::optional<torch::Tensor>&, int64_t, bool, int64_t, int64_t, int64_t, int64_t,
                    std::vector<int64_t>>(),
           py::arg("w"), py::arg("scales"), py::arg("zeros"), py::arg("zero_const"), py::arg("bias"), py::arg("cb"),
           py::arg("full_byte"), py::arg("N"), py::arg("K"), py::arg("gb"), py::arg("ab"), py::arg("splits"))
      .def("__call__", &Prepared::forward, py::arg("x"), py::arg("clamp") = false, py::arg("lo") = 0.0,
           py::arg("hi") = 0.0, py::arg("act_scale") = 0.0, py::arg("act_lo") = -127.0, py::arg("act_hi") = 127.0)
      .def("split", &Prepared::forward_split, py::arg("x"));
  py::class_<DecoderStack>(m, "DecoderStack", "Llama-layout decoder layers on prepared weights: step(...) -> h")
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<py::object>,
                    std::vector<py::object>, std::vector<py::object>, std::vector<py::object>, int64_t, int64_t,
                    int64_t, double, const c10::optional<torch::Tensor>&, const py::object&>(),
           py::arg("in_norms"), py::arg("post_norms"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("norm") = py::none(), py::arg("head") = py::none())
      .def_property_readonly("has_head", &DecoderStack::has_head)
      .def("step", &DecoderStack::step, py::arg("h"), py::arg("k_cache"), py::arg("v_cache"), py::arg("fill"),
           py::arg("cos"), py::arg("sin"), py::arg("pos"));
  m.def("rms_norm", &rms_norm, "RMSNorm of float32 rows (the decode step's)", py::arg("x"), py::arg("w"),
        py::arg("eps"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up, float32", py::arg("gate"), py::arg("up"));
  m.def("decode_attention", &decode_attention, "one query token over the first n KV-cache entries", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("n"));
  m.def("repack", &repack, "stored bitstream -> kernel tiles", py::arg("qweight"), py::arg("bits"), py::arg("N"),
        py::arg("K"), py::arg("cb"));
  m.def("dwconv", &dwconv, "depthwise conv over channels-last float maps (taps [KH, KW, C])", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("sh"), py::arg("sw"), py::arg("pt"), py::arg("pl"), py::arg("oh"),
        py::arg("ow"), py::arg("clamp"), py::arg("lo"), py::arg("hi"));
  m.def("take_pool_stats", [] {
    const lowbit::PoolStats s = lowbit::take_pool_stats();
    return std::make_pair(s.caller_chunks, s.worker_chunks);
  }, "(caller, worker) chunks since the last call");
  m.def("available_isas", &available_isas, "kernel ISAs usable on this CPU, best last");
  m.def("get_isa", &get_isa, "the ISA the kernels currently use");
  m.def("set_isa", &set_isa, "force an ISA (for tests and benchmarks)");
}
