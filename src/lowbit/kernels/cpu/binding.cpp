// Torch binding of the lowbit CPU kernels: ISA selection at run time, activation quantization, threading.
//
// Built by lowbit/kernels/fast.py with torch.utils.cpp_extension.load. Only the torch/pybind wrapping lives here:
// tensors own the memory, torch's intra-op count (torch.set_num_threads) gives the threads, and the torch-free
// core (engine.h) computes -- the same core lowbit.runtime drives through capi.cpp without torch.
// The weight layout is prepared in Python (fast.py: prepare); see lowbit_kernels.h.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "engine.h"

namespace {

using lowbit::KernelTable;
using lowbit::ceil_div;
using lowbit::current_table;

std::vector<std::string> available_isas() { return lowbit::available_isas(); }

std::string get_isa() { return current_table().load()->name; }

void set_isa(const std::string& name) {
  TORCH_CHECK(lowbit::select_isa(name), "lowbit kernels: ISA '", name,
              "' is not available on this CPU/build; available: ", c10::Join(", ", lowbit::available_isas()));
}

// y [..., N] from x [..., K] of any float dtype and layout: `compute(x, M, y)` fills M float32 rows; y has x's dtype.
template <class Compute>
torch::Tensor map_rows(const torch::Tensor& x_in, int64_t K, int64_t N, Compute&& compute) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "lowbit linear: x has ", x_in.size(-1),
              " features, the weight expects K=", K);
  TORCH_CHECK(x_in.is_floating_point() && x_in.device().is_cpu(), "lowbit linear: x must be a float CPU tensor");
  torch::Tensor x = x_in.scalar_type() == torch::kFloat ? x_in : x_in.to(torch::kFloat);
  if (!x.is_contiguous()) x = x.contiguous();
  std::vector<int64_t> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
  out_sizes.back() = N;
  auto y = torch::empty(out_sizes, x.options());
  compute(x.data_ptr<float>(), x.numel() / K, y.data_ptr<float>());
  return x_in.scalar_type() == torch::kFloat ? y : y.to(x_in.scalar_type());
}

// A 1x1 conv as rows: x [B, C, H, W] -> y [B, N, H, W] by `rows_fn` on [B, H, W, C]; the rows are read in place and
// y left channels-last when x is channels-last, else y is contiguous; x divided by input_scale [C] first when given.
template <class RowsFn>
torch::Tensor conv1x1_rows(const torch::Tensor& x, const c10::optional<torch::Tensor>& input_scale, RowsFn&& rows_fn) {
  TORCH_CHECK(x.dim() == 4, "lowbit conv1x1: x must be [B, C, H, W]; received ", x.dim(), " dimensions");
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  torch::Tensor rows = x.permute({0, 2, 3, 1});
  if (input_scale.has_value() && input_scale->defined()) rows = rows / input_scale->to(rows.scalar_type());
  torch::Tensor y = rows_fn(rows).permute({0, 3, 1, 2});
  return channels_last ? y : y.contiguous();
}

// A float32 weight on the DenseF32 kernel (lowbit_kernels.h): its transposed copy [K, NP] (N padded to 16 columns)
// and bias [NP]. Float layers (pointwise.py: float 1x1 convs) call it directly; a Prepared weight keeps one for
// its float path on small weights (fast.py: DENSE_MAX_WEIGHTS), used from min_rows rows.
class DenseWeight {
 public:
  DenseWeight() = default;
  DenseWeight(const torch::Tensor& w, const c10::optional<torch::Tensor>& bias, int64_t min_rows)
      : K_(w.dim() == 2 ? w.size(1) : 0), N_(w.dim() == 2 ? w.size(0) : 0), min_rows_(min_rows) {
    TORCH_CHECK(w.is_floating_point() && w.dim() == 2 && w.device().is_cpu() && min_rows >= 0,
                "lowbit dense: the weight must be a float CPU matrix [N, K], min_rows >= 0");
    const int64_t np = (N_ + 15) / 16 * 16;
    wt_ = torch::zeros({K_, np}, torch::kFloat);
    wt_.narrow(1, 0, N_).copy_(w.t());
    bias_ = torch::zeros({np}, torch::kFloat);
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->numel() == N_, "lowbit dense: bias must have N elements");
      bias_.narrow(0, 0, N_).copy_(bias->reshape({N_}));
    }
  }

  bool defined() const { return wt_.defined(); }

  // Whether calls of M rows use it.
  bool at(int64_t M) const { return wt_.defined() && M >= min_rows_; }

  // y [M, N] = x [M, K] . W^T + bias (clamped to [lo, hi] when clamp), rows split over torch's threads.
  void run(const float* x, int64_t M, float* y, bool clamp, float lo, float hi) const {
    const lowbit::KernelTable* kt = current_table().load();
    const lowbit::DenseF32 p{x, wt_.data_ptr<float>(), bias_.data_ptr<float>(), y, K_, N_, K_, N_, wt_.size(1),
                             clamp, lo, hi};
    // ~2 K N flops per row: chunks of at least ~64K MACs, so a parallel region pays for itself
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K_ * N_));
    lowbit::parallel_chunks(M, grain, at::get_num_threads(), [&](int64_t m0, int64_t m1) { kt->dense_f32(p, m0, m1); });
  }

  // y [..., N] = x [..., K] . W^T + bias (clamped), x of any float dtype and layout.
  torch::Tensor forward(const torch::Tensor& x, bool clamp = false, double lo = 0.0, double hi = 0.0) const {
    return map_rows(x, K_, N_, [&](const float* xp, int64_t M, float* yp) {
      run(xp, M, yp, clamp, static_cast<float>(lo), static_cast<float>(hi));
    });
  }

  // The 1x1 conv of this weight (conv1x1_rows), clamped.
  torch::Tensor conv1x1(const torch::Tensor& x, bool clamp, double lo, double hi) const {
    return conv1x1_rows(x, c10::nullopt, [&](const torch::Tensor& rows) { return forward(rows, clamp, lo, hi); });
  }

 private:
  torch::Tensor wt_, bias_;
  int64_t K_ = 0, N_ = 0, min_rows_ = 0;
};

// A prepared weight (see lowbit_kernels.h): the tensors own the memory, the core's PreparedWeight (validated once)
// computes. `splits` (output widths summing to N) lets several layers that read the same input share one call
// (the fused projections of lowbit/kernels/fusion.py); empty for a single layer.
class Prepared {
 public:
  Prepared(torch::Tensor w, torch::Tensor scales, const c10::optional<torch::Tensor>& zeros, double zero_const,
           const c10::optional<torch::Tensor>& bias, int64_t cb, bool full_byte, int64_t N, int64_t K, int64_t gb,
           int64_t ab, std::vector<int64_t> splits, const c10::optional<torch::Tensor>& mins = c10::nullopt,
           const c10::optional<torch::Tensor>& dense = c10::nullopt, int64_t dense_min_rows = 0)
      : w_(std::move(w)), scales_(std::move(scales)), splits_(std::move(splits)) {
    TORCH_CHECK(w_.scalar_type() == torch::kUInt8 && w_.is_contiguous(), "lowbit linear: packed tiles do not match N/K/bits");
    TORCH_CHECK(scales_.scalar_type() == torch::kHalf && scales_.is_contiguous() && scales_.dim() == 3,
                "lowbit linear: scales must be float16 [T, G, 8]");
    if (zeros.has_value() && zeros->defined()) {
      TORCH_CHECK(zeros->scalar_type() == torch::kUInt8 && zeros->is_contiguous() && zeros->sizes() == scales_.sizes(),
                  "lowbit linear: zeros must be uint8 shaped like scales");
      zeros_ = *zeros;
    }
    if (mins.has_value() && mins->defined()) {  // offset storage's group minima (lowbit_kernels.h: Tiles::mins)
      TORCH_CHECK(mins->scalar_type() == torch::kHalf && mins->is_contiguous() && mins->sizes() == scales_.sizes(),
                  "lowbit linear: mins must be float16 shaped like scales");
      mins_ = *mins;
    }
    if (bias.has_value() && bias->defined()) {
      bias_ = bias->to(torch::kFloat).contiguous();
      TORCH_CHECK(bias_.numel() == N, "lowbit linear: bias must have N elements");
    }
    const std::string err = core_.init(
        w_.data_ptr<uint8_t>(), w_.numel(), reinterpret_cast<const uint16_t*>(scales_.data_ptr<at::Half>()),
        scales_.size(0), scales_.size(1), scales_.size(2), zeros_.defined() ? zeros_.data_ptr<uint8_t>() : nullptr,
        bias_.defined() ? bias_.data_ptr<float>() : nullptr, zero_const, cb, full_byte, N, K, gb, ab,
        mins_.defined() ? reinterpret_cast<const uint16_t*>(mins_.data_ptr<at::Half>()) : nullptr);
    TORCH_CHECK(err.empty(), err);
    if (dense.has_value() && dense->defined()) {  // the dequantized weight [N, K] for the float path (DenseF32)
      TORCH_CHECK(dense->scalar_type() == torch::kFloat && dense->dim() == 2 && dense->size(0) == N &&
                      dense->size(1) == K && dense_min_rows > 0,
                  "lowbit linear: dense must be the float32 weight [N, K], with dense_min_rows > 0");
      dense_ = DenseWeight(*dense, bias_.defined() ? c10::optional<torch::Tensor>(bias_) : c10::nullopt,
                           dense_min_rows);
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
    TORCH_CHECK(act_scale >= 0.0 && std::isfinite(act_scale) && act_lo >= -127.0 && act_hi <= 127.0 &&
                    act_lo <= 0.0 && act_hi >= 0.0 && act_lo == std::nearbyint(act_lo) && act_hi == std::nearbyint(act_hi),
                "lowbit linear: a static activation scale must be finite and >= 0 with integer limits "
                "-127 <= act_lo <= 0 <= act_hi <= 127");
    const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
    return map_rows(x_in, core_.K, core_.N, [&](const float* x, int64_t M, float* y) {
      if (act_scale == 0.0 && dense_.at(M)) return dense_.run(x, M, y, clamp, flo, fhi);
      const float sc = static_cast<float>(act_scale);
      const lowbit::ActStatic st{sc, sc > 0.0f ? 1.0f / sc : 0.0f, static_cast<float>(act_lo),
                                 static_cast<float>(act_hi)};
      core_.compute(x, M, y, at::get_num_threads(), clamp, flo, fhi, act_scale > 0.0 ? &st : nullptr);
    });
  }

  // A 1x1 conv (QuantConv2d1x1's forward in one call, for planned forwards): x [B, C, H, W] -> y [B, N, H, W], the
  // rows [B, H, W, C] read in place and y left channels-last when x is channels-last, else y contiguous; x divided
  // by input_scale [C] first when given.
  torch::Tensor conv1x1(const torch::Tensor& x, const c10::optional<torch::Tensor>& input_scale, bool clamp,
                        double lo, double hi) const {
    return conv1x1_rows(x, input_scale, [&](const torch::Tensor& rows) { return forward(rows, clamp, lo, hi); });
  }

  const lowbit::PreparedWeight& core() const { return core_; }

  // Whether calls of M rows run the float path (dense_f32) rather than the int8 GEMM.
  bool dense_at(int64_t M) const { return dense_.at(M); }

  // The outputs of the layers sharing this call: views [..., splits[i]] of one [..., N] result.
  std::vector<torch::Tensor> forward_split(const torch::Tensor& x) const {
    return forward(x).split_with_sizes(splits_, -1);
  }

 private:
  torch::Tensor w_, scales_, zeros_, bias_, mins_;
  std::vector<int64_t> splits_;
  DenseWeight dense_;  // the float path of small weights (fast.py: DENSE_MAX_WEIGHTS), or undefined
  lowbit::PreparedWeight core_;
};

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
  if (g_in.numel() == 0) return torch::empty(g_in.sizes(), g_in.options());
  // Rows of D values (views of one fused gate/up output have a row stride of 2D: read in place, no copy).
  const int64_t D = g_in.dim() == 0 ? 1 : g_in.size(-1);
  torch::Tensor g = g_in.reshape({-1, D}), u = u_in.reshape({-1, D});
  if (g.stride(1) != 1) g = g.contiguous();
  if (u.stride(1) != 1) u = u.contiguous();
  auto y = torch::empty(g_in.sizes(), g_in.options());
  const KernelTable* kt = current_table().load();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < g.size(0); ++r) {
    kt->silu_mul(g.data_ptr<float>() + r * g.stride(0), u.data_ptr<float>() + r * u.stride(0), D, yp + r * D);
  }
  return y;
}

// A float32 layer on a few rows: x [..., K] (at most kSmallMaxM rows) . w^T (+ bias) with w [N, K] float32
// contiguous -> [..., N] (KernelTable::gemv_f32, split over N on the work pool).
torch::Tensor gemv_f32(const torch::Tensor& x_in, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat && w.dim() == 2 &&
                  w.is_contiguous() && x_in.dim() >= 1 && x_in.size(-1) == w.size(1),
              "lowbit gemv_f32: float32 x [..., K] and contiguous w [N, K]");
  const int64_t K = w.size(1), N = w.size(0);
  const torch::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= lowbit::kSmallMaxM, "lowbit gemv_f32: at most 4 rows");
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "lowbit gemv_f32: bias must have N elements");
  }
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  auto y = torch::empty(out_shape, x_in.options());
  const KernelTable* kt = current_table().load();
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // chunks of >= ~64 KB of weights: below that a parallel region costs more than the rows
  const int64_t grain = std::max<int64_t>(8, (int64_t{1} << 14) / std::max<int64_t>(1, K));
  lowbit::parallel_chunks(N, grain, at::get_num_threads(), [&](int64_t n0, int64_t n1) {
    kt->gemv_f32(xp, M, K, wp, bp, yp, N, n0, n1);
  });
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
  lowbit::attend_heads(a, q.size(0), at::get_num_threads());
  return out;
}

// Causal attention of a prefill's queries q [B, H, T, hd] (float32, any strides with contiguous rows of hd) over
// the first n >= T entries of a cache layer k, v [B, KV, max_len, hd] (contiguous): query row i sees keys
// j <= i + n - T (scaled_dot_product_attention with GQA and a causal mask when n == T, none when T == 1).
// Returns [B, T, H * hd]: the o projection's input, no transpose copy.
torch::Tensor prefill_attention(const torch::Tensor& q_in, const torch::Tensor& k, const torch::Tensor& v, int64_t n) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() && q_in.size(0) == k.size(0) &&
                  q_in.size(3) == k.size(3) && k.size(1) > 0 && q_in.size(1) % k.size(1) == 0 &&
                  n >= q_in.size(2) && n <= k.size(2) && k.is_contiguous() && v.is_contiguous() &&
                  q_in.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat &&
                  v.scalar_type() == torch::kFloat,
              "lowbit prefill_attention: float32 q [B, H, T, hd], contiguous k, v [B, KV, max_len, hd], T <= n <= max_len");
  const torch::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), KV = k.size(1);
  auto out = torch::empty({B, T, H * hd}, q.options());
  if (out.numel() == 0) return out;
  const lowbit::PrefillAttention a{q.data_ptr<float>(), q.stride(0), q.stride(2), q.stride(1), k.data_ptr<float>(),
                                   v.data_ptr<float>(), out.data_ptr<float>(), B, T, H, KV, hd, n, k.size(2) * hd,
                                   static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)))};
  lowbit::prefill_attention(a, at::get_num_threads());
  return out;
}

// RoPE of a forward's q and k rows and the KV-cache write (lean_decode.py, float32): q, k, v [B, T, width] (rows of
// heads x hd, any row stride, contiguous in a row: the fused q/k/v call's views), cos / sin [T, hd] (contiguous,
// sin with the rotate-half sign folded in); RoPE'd k and v go to entries fill .. fill + T - 1 of the cache layer
// kc, vc [B, KV, max_len, hd]; the RoPE'd q is returned as [B, H, T, hd] (a view of [B, T, H, hd] memory, the
// layout prefill_attention reads). The transposes, the two RoPE passes and the cache copies as one op.
torch::Tensor rope_cache(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& kc,
                         const torch::Tensor& vc, int64_t fill, int64_t heads) {
  const int64_t KV = kc.dim() == 4 ? kc.size(1) : 0, hd = kc.dim() == 4 ? kc.size(3) : 0;
  const bool f32 = q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat &&
                   v.scalar_type() == torch::kFloat && cos.scalar_type() == torch::kFloat &&
                   sin.scalar_type() == torch::kFloat && kc.scalar_type() == torch::kFloat &&
                   vc.scalar_type() == torch::kFloat;
  TORCH_CHECK(f32 && q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && kc.dim() == 4 && kc.sizes() == vc.sizes() &&
                  kc.is_contiguous() && vc.is_contiguous() && q.size(2) == heads * hd && k.size(2) == KV * hd &&
                  v.size(2) == KV * hd && k.sizes().slice(0, 2) == q.sizes().slice(0, 2) &&
                  v.sizes().slice(0, 2) == q.sizes().slice(0, 2) && kc.size(0) == q.size(0) &&
                  q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && cos.dim() == 2 &&
                  cos.sizes() == sin.sizes() && cos.size(0) == q.size(1) && cos.size(1) == hd && cos.is_contiguous() &&
                  sin.is_contiguous() && fill >= 0 && fill + q.size(1) <= kc.size(2),
              "lowbit rope_cache: float32 q, k, v [B, T, heads * hd] (rows contiguous), cos / sin [T, hd], "
              "caches [B, KV, max_len, hd] with room for T entries after fill");
  const int64_t B = q.size(0), T = q.size(1), H = heads, max_len = kc.size(2);
  auto out = torch::empty({B, T, H, hd}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *op = out.data_ptr<float>(), *kcp = kc.data_ptr<float>(), *vcp = vc.data_ptr<float>();
  lowbit::parallel_chunks(B * T, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, (H + 2 * KV) * hd)),
                          at::get_num_threads(), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T, off = (b * KV * max_len + fill + t) * hd;
      lowbit::rope_token(qp + b * q.stride(0) + t * q.stride(1), kp + b * k.stride(0) + t * k.stride(1),
                         vp + b * v.stride(0) + t * v.stride(1), cp + t * hd, sp + t * hd, H, KV, hd,
                         op + r * H * hd, kcp + off, vcp + off, max_len * hd);
    }
  });
  return out.transpose(1, 2);
}

// One decode step (one new token per row) through a stack of Llama-layout decoder layers whose projections are
// all prepared packed weights: the core's Decoder (engine.h) on the tensors' memory, so that a token costs one
// Python call and no tensor per op. With a head (the final norm's weight and the prepared lm_head), step
// returns the logits [B, V].
class DecoderStack {
 public:
  DecoderStack(std::vector<torch::Tensor> in_norms, std::vector<torch::Tensor> post_norms,
               std::vector<py::object> qkv, std::vector<py::object> o, std::vector<py::object> gate_up,
               std::vector<py::object> down, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
               const c10::optional<torch::Tensor>& norm, const py::object& head)
      : in_norms_(std::move(in_norms)), post_norms_(std::move(post_norms)) {
    const size_t L = in_norms_.size();
    TORCH_CHECK(post_norms_.size() == L && qkv.size() == L && o.size() == L && gate_up.size() == L &&
                    down.size() == L, "lowbit decoder stack: one of each per layer");
    lowbit::DecoderWeights w;
    w.heads = heads;
    w.kv_heads = kv_heads;
    w.head_dim = head_dim;
    w.eps = eps;
    auto core = [&](const py::object& p) {
      keep_alive_.push_back(p);  // the Prepared objects stay owned by Python
      return &p.cast<const Prepared*>()->core();
    };
    for (size_t i = 0; i < L; ++i) {
      w.qkv.push_back(core(qkv[i]));
      w.o.push_back(core(o[i]));
      w.gate_up.push_back(core(gate_up[i]));
      w.down.push_back(core(down[i]));
      in_norms_[i] = in_norms_[i].to(torch::kFloat).contiguous();
      post_norms_[i] = post_norms_[i].to(torch::kFloat).contiguous();
      TORCH_CHECK(in_norms_[i].numel() == w.o[i]->N && post_norms_[i].numel() == w.o[i]->N,
                  "lowbit decoder stack: projection shapes do not match the heads");
      w.in_norms.push_back(in_norms_[i].data_ptr<float>());
      w.post_norms.push_back(post_norms_[i].data_ptr<float>());
    }
    if (!head.is_none()) {
      TORCH_CHECK(norm.has_value() && norm->defined(), "lowbit decoder stack: a head needs the final norm");
      w.head = core(head);
      norm_ = norm->to(torch::kFloat).contiguous();
      TORCH_CHECK(norm_.numel() == w.head->K, "lowbit decoder stack: the head does not match the hidden size");
      w.norm = norm_.data_ptr<float>();
    }
    const std::string err = core_.init(std::move(w));
    TORCH_CHECK(err.empty(), err);
  }

  // A prompt of one row, h [1, M, D] float32 at positions 0..M-1 -> the hidden state of its last position after
  // every layer [1, 1, D], or with a head the logits [1, V] of it (final-normed); entries 0..M-1 of every
  // layer's cache filled. lowbit::Decoder::prefill: lean_decode.py's prefill on the kernels, the same ops in the
  // same order, on the stack's own buffers (no tensor allocated per op). Caches, cos / sin as for step().
  torch::Tensor prefill(const torch::Tensor& h_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                        const torch::Tensor& cos, const torch::Tensor& sin) {
    TORCH_CHECK(h_in.dim() == 3 && h_in.size(0) == 1 && h_in.size(1) >= 1 && h_in.scalar_type() == torch::kFloat &&
                    h_in.size(2) == core_.hidden(), "lowbit decoder stack: prefill h [1, M, D] float32");
    const int64_t M = h_in.size(1);
    check_caches(k_cache, v_cache, 1);
    check_rope(cos, sin, M - 1);
    torch::Tensor h = h_in.contiguous().clone();  // the residual stream
    torch::Tensor logits = core_.has_head() ? torch::empty({1, core_.vocab()}, h.options()) : torch::Tensor();
    const std::string err = core_.prefill(h.data_ptr<float>(), M, core_.has_head() ? logits.data_ptr<float>() : nullptr,
                                          k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), k_cache.size(3),
                                          cos.data_ptr<float>(), sin.data_ptr<float>(), at::get_num_threads());
    TORCH_CHECK(err.empty(), err);
    return core_.has_head() ? logits : h.narrow(1, M - 1, 1);
  }

  // h [B, 1, D] float32 at position `pos` -> the hidden state after every layer [B, 1, D], or with a head the
  // logits [B, V] of the final-normed state. Layer i's K/V go to entry fill[i] of k_cache[i] / v_cache[i]
  // ([L, B, KV, max_len, hd], float32, contiguous); cos / sin: [max_len, hd] (sin with the rotate-half sign
  // folded in, as lean_decode.py keeps it). Not for concurrent callers (the buffers are the stack's own).
  torch::Tensor step(const torch::Tensor& h_in, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const std::vector<int64_t>& fill, const torch::Tensor& cos, const torch::Tensor& sin,
                     int64_t pos) {
    const int64_t L = core_.layers();
    TORCH_CHECK(h_in.dim() == 3 && h_in.size(1) == 1 && h_in.scalar_type() == torch::kFloat &&
                    h_in.size(2) == core_.hidden(), "lowbit decoder stack: h [B, 1, D] float32");
    check_caches(k_cache, v_cache, h_in.size(0));
    TORCH_CHECK(static_cast<int64_t>(fill.size()) == L, "lowbit decoder stack: one fill per layer");
    check_rope(cos, sin, pos);
    const int64_t B = h_in.size(0);
    torch::Tensor h = h_in.contiguous().clone();  // the residual stream, returned
    torch::Tensor logits = core_.has_head() ? torch::empty({B, core_.vocab()}, h.options()) : torch::Tensor();
    const std::string err = core_.step(h.data_ptr<float>(), B, core_.has_head() ? logits.data_ptr<float>() : nullptr,
                                       k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), k_cache.size(3),
                                       fill.data(), cos.data_ptr<float>(), sin.data_ptr<float>(), pos,
                                       at::get_num_threads());
    TORCH_CHECK(err.empty(), err);
    return core_.has_head() ? logits : h;
  }

  bool has_head() const { return core_.has_head(); }

 private:
  void check_caches(const torch::Tensor& k_cache, const torch::Tensor& v_cache, int64_t B) const {
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == torch::kFloat &&
                    v_cache.scalar_type() == torch::kFloat && k_cache.sizes() == v_cache.sizes() &&
                    k_cache.dim() == 5 && k_cache.size(0) == core_.layers() && k_cache.size(1) == B &&
                    k_cache.size(2) == core_.kv_heads() && k_cache.size(4) == core_.head_dim(),
                "lowbit decoder stack: caches must be float32 [L, B, KV, max_len, hd]");
  }
  // cos / sin [max_len, hd] float32 covering position `last`
  void check_rope(const torch::Tensor& cos, const torch::Tensor& sin, int64_t last) const {
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat &&
                    sin.scalar_type() == torch::kFloat && cos.size(-1) == core_.head_dim() && sin.sizes() == cos.sizes() &&
                    last >= 0 && last < cos.size(0),
                "lowbit decoder stack: cos/sin [max_len, hd] float32 covering pos");
  }

  std::vector<torch::Tensor> in_norms_, post_norms_;
  std::vector<py::object> keep_alive_;
  torch::Tensor norm_;
  lowbit::Decoder core_;
};

// One-off call (tests, benchmarks): validates the weight, then computes.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                     const c10::optional<torch::Tensor>& zeros, double zero_const,
                     const c10::optional<torch::Tensor>& bias, int64_t cb, bool full_byte, int64_t N, int64_t K,
                     int64_t gb, int64_t ab, const c10::optional<torch::Tensor>& mins) {
  return Prepared(w, scales, zeros, zero_const, bias, cb, full_byte, N, K, gb, ab, {}, mins).forward(x);
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
  lowbit::repack_weight(qp, q.size(1), static_cast<int>(bits), N, K, static_cast<int>(cb), op, at::get_num_threads());
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

// im2col of a float map x [B, C, H, W] (any layout) for a KH x KW conv at stride (sh, sw) with zero padding pt / pl
// before the first row / column (and whatever the output size oh x ow needs after the last): rows [B, OH, OW, K],
// K = C * KH * KW in the weight's own flattening (c, then i, then j), the padding's taps 0. conv_gemm.py multiplies
// them by the flattened weight [N, K]: a spatial conv (a CNN's stem) as one GEMM, without F.pad's copy.
torch::Tensor im2col(const torch::Tensor& x_in, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt,
                     int64_t pl, int64_t oh, int64_t ow) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.is_floating_point() && x_in.device().is_cpu(),
              "lowbit im2col: x must be a float CPU tensor [B, C, H, W]");
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && pt >= 0 && pl >= 0 && oh >= 0 && ow >= 0,
              "lowbit im2col: bad geometry");
  // Read in place through the strides (a preprocessed image is often a view: a grey image expanded to 3 channels)
  const torch::Tensor x = x_in.to(torch::kFloat);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = C * kh * kw;
  const int64_t s_b = x.stride(0), s_c = x.stride(1), s_h = x.stride(2), s_w = x.stride(3);
  auto rows = torch::empty({B, oh, ow, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* xp = x.data_ptr<float>();
  float* rp = rows.data_ptr<float>();
  // One output row (b, r) of ow pixels per unit; ~K * ow copies each.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, K * ow));
  // Output pixels q in [q_lo, q_hi) read no column of the left / right padding: their taps are copied unchecked.
  const int64_t q_lo = std::min(ow, ceil_div(pl, sw));
  const int64_t q_hi = std::max(q_lo, std::min(ow, W - kw + pl >= 0 ? (W - kw + pl) / sw + 1 : 0));
  lowbit::parallel_chunks(B * oh, grain, at::get_num_threads(), [&](int64_t u0, int64_t u1) {
    std::vector<const float*> src(C * kh);  // the input row each (c, i) reads for this output row, or nullptr
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / oh, y0 = (u % oh) * sh - pt;
      bool all_rows = true;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t y = y0 + i;
          src[c * kh + i] = y >= 0 && y < H ? xp + b * s_b + c * s_c + y * s_h : nullptr;
          all_rows = all_rows && src[c * kh + i] != nullptr;
        }
      }
      float* out = rp + u * ow * K;
      for (int64_t q = 0; q < ow; ++q, out += K) {
        const int64_t x0 = q * sw - pl;
        if (all_rows && q >= q_lo && q < q_hi) {  // the common case: contiguous taps, no padding
          if (kw == 3) {  // a stem's 3x3: the row of 3 unrolled (a runtime-length loop of 3 costs more than it moves)
            for (int64_t ci = 0; ci < C * kh; ++ci) {
              const float* in = src[ci] + x0 * s_w;
              out[ci * 3] = in[0];
              out[ci * 3 + 1] = in[s_w];
              out[ci * 3 + 2] = in[2 * s_w];
            }
          } else {
            for (int64_t ci = 0; ci < C * kh; ++ci) {
              const float* in = src[ci] + x0 * s_w;
              for (int64_t j = 0; j < kw; ++j) out[ci * kw + j] = in[j * s_w];
            }
          }
          continue;
        }
        for (int64_t ci = 0; ci < C * kh; ++ci) {
          const float* row = src[ci];
          for (int64_t j = 0; j < kw; ++j) {
            out[ci * kw + j] = row != nullptr && x0 + j >= 0 && x0 + j < W ? row[(x0 + j) * s_w] : 0.0f;
          }
        }
      }
    }
  });
  return rows;
}

// The int8 depthwise conv (lowbit_kernels.h: DwConvQ) of a float map x [B, C, H, W] (made channels-last):
// quantized per image and channel into pixel pairs, then tap pairs [KH, ceil(KW / 2), C] with steps s [C];
// kw: the kernel width.
torch::Tensor dwconv_int8(const torch::Tensor& x_in, const torch::Tensor& w, int64_t kw, const torch::Tensor& s,
                          const c10::optional<torch::Tensor>& bias, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                          int64_t oh, int64_t ow, bool clamp, double lo, double hi) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == torch::kFloat && w.dim() == 3 &&
                  w.scalar_type() == torch::kInt && w.is_contiguous() && w.size(2) == x_in.size(1) &&
                  kw >= 1 && w.size(1) == (kw + 1) / 2 &&
                  s.scalar_type() == torch::kFloat && s.numel() == x_in.size(1) && sh >= 1 && sw >= 1 && pt >= 0 &&
                  pl >= 0 && oh >= 0 && ow >= 0,
              "lowbit dwconv_int8: float32 x [B, C, H, W], int32 tap pairs [KH, ceil(KW / 2), C], float32 steps [C], geometry");
  const torch::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast), sc = s.contiguous();
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(torch::kFloat).contiguous();
  TORCH_CHECK(!b.defined() || b.numel() == x.size(1), "lowbit dwconv_int8: bias must have C elements");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto y = torch::empty({B, C, oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  auto xq = torch::empty({B, H * (W + 1) * C}, x.options().dtype(torch::kInt));
  auto a = torch::empty({B, C}, x.options());
  const KernelTable* kt = current_table().load();
  const int threads = at::get_num_threads();
  lowbit::parallel_chunks(B, 1, threads, [&](int64_t b0, int64_t b1) {
    kt->dw_quantize(x.data_ptr<float>(), H, W, C, xq.data_ptr<int32_t>(), a.data_ptr<float>(), b0, b1);
  });
  a.mul_(sc);  // the product scale of each (image, channel)
  const lowbit::DwConvQ p{xq.data_ptr<int32_t>(), w.data_ptr<int32_t>(), a.data_ptr<float>(),
                          b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), B, H, W, C, oh, ow,
                          static_cast<int>(w.size(0)), static_cast<int>(kw), static_cast<int>(sh),
                          static_cast<int>(sw), static_cast<int>(pt), static_cast<int>(pl), clamp,
                          static_cast<float>(lo), static_cast<float>(hi)};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, ow * C * w.size(0) * kw));
  lowbit::parallel_chunks(B * oh, grain, threads, [&](int64_t r0, int64_t r1) { kt->dwconv_q(p, r0, r1); });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit packed low-bit linear kernels (CPU)";
  m.def("linear", &linear, "y = x . W^T (+ bias) for prepared low-bit tiles", py::arg("x"), py::arg("w"),
        py::arg("scales"), py::arg("zeros"), py::arg("zero_const"), py::arg("bias"), py::arg("cb"),
        py::arg("full_byte"), py::arg("N"), py::arg("K"), py::arg("gb"), py::arg("ab"), py::arg("mins") = py::none());
  py::class_<Prepared>(m, "Prepared", "a validated prepared weight: call(x) -> y, split(x) -> [y_i]")
      .def(py::init<torch::Tensor, torch::Tensor, const c10::optional<torch::Tensor>&, double,
                    const c10::optional<torch::Tensor>&, int64_t, bool, int64_t, int64_t, int64_t, int64_t,
                    std::vector<int64_t>, const c10::optional<torch::Tensor>&, const c10::optional<torch::Tensor>&,
                    int64_t>(),
           py::arg("w"), py::arg("scales"), py::arg("zeros"), py::arg("zero_const"), py::arg("bias"), py::arg("cb"),
           py::arg("full_byte"), py::arg("N"), py::arg("K"), py::arg("gb"), py::arg("ab"), py::arg("splits"),
           py::arg("mins") = py::none(), py::arg("dense") = py::none(), py::arg("dense_min_rows") = 0)
      .def("__call__", &Prepared::forward, py::arg("x"), py::arg("clamp") = false, py::arg("lo") = 0.0,
           py::arg("hi") = 0.0, py::arg("act_scale") = 0.0, py::arg("act_lo") = -127.0, py::arg("act_hi") = 127.0)
      .def("conv1x1", &Prepared::conv1x1, py::arg("x"), py::arg("input_scale"), py::arg("clamp"), py::arg("lo"),
           py::arg("hi"))
      .def("split", &Prepared::forward_split, py::arg("x"))
      .def("dense_at", &Prepared::dense_at, py::arg("M"));
  py::class_<DenseWeight>(m, "DenseWeight", "a float32 weight on the dense kernel: call(x) -> y, conv1x1(x) -> y")
      .def(py::init<const torch::Tensor&, const c10::optional<torch::Tensor>&, int64_t>(), py::arg("w"),
           py::arg("bias") = py::none(), py::arg("min_rows") = 0)
      .def("__call__", &DenseWeight::forward, py::arg("x"), py::arg("clamp") = false, py::arg("lo") = 0.0,
           py::arg("hi") = 0.0)
      .def("conv1x1", &DenseWeight::conv1x1, py::arg("x"), py::arg("clamp") = false, py::arg("lo") = 0.0,
           py::arg("hi") = 0.0);
  py::class_<DecoderStack>(m, "DecoderStack", "Llama-layout decoder layers on prepared weights: step(...) -> h")
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<py::object>,
                    std::vector<py::object>, std::vector<py::object>, std::vector<py::object>, int64_t, int64_t,
                    int64_t, double, const c10::optional<torch::Tensor>&, const py::object&>(),
           py::arg("in_norms"), py::arg("post_norms"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("norm") = py::none(), py::arg("head") = py::none())
      .def_property_readonly("has_head", &DecoderStack::has_head)
      .def("step", &DecoderStack::step, py::arg("h"), py::arg("k_cache"), py::arg("v_cache"), py::arg("fill"),
           py::arg("cos"), py::arg("sin"), py::arg("pos"))
      .def("prefill", &DecoderStack::prefill, py::arg("h"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cos"),
           py::arg("sin"));
  m.def("rms_norm", &rms_norm, "RMSNorm of float32 rows (the decode step's)", py::arg("x"), py::arg("w"),
        py::arg("eps"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up, float32", py::arg("gate"), py::arg("up"));
  m.def("gemv_f32", &gemv_f32, "a float32 layer on at most 4 rows: x . w^T (+ bias)", py::arg("x"), py::arg("w"),
        py::arg("bias") = py::none());
  m.def("decode_attention", &decode_attention, "one query token over the first n KV-cache entries", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("n"));
  m.def("dwconv_int8", &dwconv_int8, "int8 depthwise conv: per-(image, channel) int8 activations x integer taps",
        py::arg("x"), py::arg("taps"), py::arg("kw"), py::arg("steps"), py::arg("bias"), py::arg("sh"), py::arg("sw"), py::arg("pt"),
        py::arg("pl"), py::arg("oh"), py::arg("ow"), py::arg("clamp"), py::arg("lo"), py::arg("hi"));
  m.def("rope_cache", &rope_cache, "RoPE of q and k rows, k and v into the KV cache; q as [B, H, T, hd]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("kc"), py::arg("vc"),
        py::arg("fill"), py::arg("heads"));
  m.def("prefill_attention", &prefill_attention, "causal attention of a prefill's queries over the KV cache",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("n"));
  m.def("repack", &repack, "stored bitstream -> kernel tiles", py::arg("qweight"), py::arg("bits"), py::arg("N"),
        py::arg("K"), py::arg("cb"));
  m.def("im2col", &im2col, "rows [B, OH, OW, C * KH * KW] of a zero-padded float map, in the weight's order",
        py::arg("x"), py::arg("kh"), py::arg("kw"), py::arg("sh"), py::arg("sw"), py::arg("pt"), py::arg("pl"),
        py::arg("oh"), py::arg("ow"));
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
