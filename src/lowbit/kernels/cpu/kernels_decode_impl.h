// The small float ops of one decode step (lowbit_kernels.h: DecodeOps), written once and compiled per ISA.
//
// Included by kernels_avx2.cpp and kernels_avx512vnni.cpp inside their target regions, after
// kernels_simd_impl.h (same namespace). Plain 8-lane ymm code (AVX2 + FMA): at one token these ops touch a
// few KB, so what they cost is the call, not the lanes -- through ATen each was a dispatched op with its own
// allocation (and scaled_dot_product_attention a parallel region), ~1 ms per SmolLM2 token in total.
//
// exp is a polynomial (Cephes' expf: range reduction by ln 2 in two parts, degree-5 minimax on [-ln2/2, ln2/2],
// relative error < 2e-7); softmax subtracts the row maximum first, as torch does.

#ifndef LOWBIT_ISA_NS
#error "kernels_decode_impl.h needs LOWBIT_ISA_NS (include it after kernels_simd_impl.h)"
#endif

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

#define LB_INLINE inline __attribute__((always_inline))

LB_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) in float32 lanes of D (FloatVec8 / FloatVec16 below): the clamp to float's range, n = round(x log2 e),
// r = x - n ln 2 in two steps, a degree-6 polynomial, then p * 2^n (D::ldexp2). One body for both widths, so
// every lane computes the same operations at either width.
template <class D>
LB_INLINE typename D::V exp_poly(typename D::V x) {
  x = D::min(D::max(x, D::set1(-87.33654f)), D::set1(88.72283f));
  const typename D::V n = D::round(D::mul(x, D::set1(1.44269504088896341f)));
  typename D::V r = D::fnma(n, D::set1(0.693359375f), x);
  r = D::fnma(n, D::set1(-2.12194440e-4f), r);
  typename D::V p = D::set1(1.9875691500e-4f);
  p = D::fma(p, r, D::set1(1.3981999507e-3f));
  p = D::fma(p, r, D::set1(8.3334519073e-3f));
  p = D::fma(p, r, D::set1(4.1665795894e-2f));
  p = D::fma(p, r, D::set1(1.6666665459e-1f));
  p = D::fma(p, r, D::set1(5.0000001201e-1f));
  p = D::fma(p, D::mul(r, r), D::add(r, D::set1(1.0f)));
  return D::ldexp2(p, n);
}

// Elements [0, n) as whole vectors plus a masked tail (the tail lanes read / write nothing past n).
LB_INLINE __m256i tail_mask(int64_t left) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))), idx);
}

LB_INLINE __m256 load_n(const float* p, int64_t left) {
  return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(left));
}

LB_INLINE void store_n(float* p, __m256 v, int64_t left) {
  if (left >= 8) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, tail_mask(left), v);
  }
}

// Float lanes (FloatVec) of the prefill attention, silu * up and the float GEMV: ymm (AVX2) or, in the AVX-512
// build, zmm, which doubles the FMAs and exps per instruction (Zen 5, Sapphire Rapids: full-width 512-bit units).
struct FloatVec8 {
  using V = __m256;
  static constexpr int L = 8;
  static LB_INLINE V zero() { return _mm256_setzero_ps(); }
  static LB_INLINE V set1(float v) { return _mm256_set1_ps(v); }
  static LB_INLINE V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static LB_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static LB_INLINE V load_n(const float* p, int64_t left) { return lowbit::LOWBIT_ISA_NS::load_n(p, left); }
  static LB_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static LB_INLINE void store_n(float* p, V v, int64_t left) { lowbit::LOWBIT_ISA_NS::store_n(p, v, left); }
  static LB_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static LB_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static LB_INLINE V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static LB_INLINE V div(V a, V b) { return _mm256_div_ps(a, b); }
  static LB_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static LB_INLINE V max(V a, V b) { return _mm256_max_ps(a, b); }
  static LB_INLINE V min(V a, V b) { return _mm256_min_ps(a, b); }
  static LB_INLINE V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static LB_INLINE V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n, n integral in [-126, 128]: 2^128 would overflow the exponent, so scaled in two halves
  static LB_INLINE V ldexp2(V p, V n) {
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, _mm256_set1_epi32(127)), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  }
  static LB_INLINE V exp(V x) { return exp_poly<FloatVec8>(x); }
  // lanes [left, L) -> fill (left < L)
  static LB_INLINE V keep_n(V v, int64_t left, float fill) {
    return _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(tail_mask(left)));
  }
  static LB_INLINE float hsum(V v) { return lowbit::LOWBIT_ISA_NS::hsum(v); }
  static LB_INLINE float hmax(V v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
};
#if LOWBIT_USE_VNNI
struct FloatVec16 {
  using V = __m512;
  static constexpr int L = 16;
  static LB_INLINE __mmask16 mask(int64_t left) {
    return static_cast<__mmask16>(left >= 16 ? 0xffff : left <= 0 ? 0 : (1u << left) - 1u);
  }
  static LB_INLINE V zero() { return _mm512_setzero_ps(); }
  static LB_INLINE V set1(float v) { return _mm512_set1_ps(v); }
  static LB_INLINE V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static LB_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static LB_INLINE V load_n(const float* p, int64_t left) {
    return left >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask(left), p);
  }
  static LB_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static LB_INLINE void store_n(float* p, V v, int64_t left) {
    if (left >= 16) {
      _mm512_storeu_ps(p, v);
    } else {
      _mm512_mask_storeu_ps(p, mask(left), v);
    }
  }
  static LB_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static LB_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static LB_INLINE V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static LB_INLINE V div(V a, V b) { return _mm512_div_ps(a, b); }
  static LB_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  static LB_INLINE V max(V a, V b) { return _mm512_max_ps(a, b); }
  static LB_INLINE V min(V a, V b) { return _mm512_min_ps(a, b); }
  static LB_INLINE V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static LB_INLINE V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static LB_INLINE V ldexp2(V p, V n) {  // as FloatVec8's
    const __m512i ni = _mm512_cvtps_epi32(n);
    const __m512i h1 = _mm512_srai_epi32(ni, 1), h2 = _mm512_sub_epi32(ni, h1);
    const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h1, _mm512_set1_epi32(127)), 23));
    const __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h2, _mm512_set1_epi32(127)), 23));
    return _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
  }
  static LB_INLINE V exp(V x) { return exp_poly<FloatVec16>(x); }
  static LB_INLINE V keep_n(V v, int64_t left, float fill) {
    return _mm512_mask_blend_ps(mask(left), _mm512_set1_ps(fill), v);
  }
  static LB_INLINE float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static LB_INLINE float hmax(V v) { return _mm512_reduce_max_ps(v); }
};
using FloatVec = FloatVec16;
#else
using FloatVec = FloatVec8;
#endif

// y = x * rsqrt(mean(x^2) + eps) * w over rows [r0, r1) of D values (LlamaRMSNorm; y may be x).
void rms_norm(const float* x, const float* w, int64_t D, float eps, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= D; i += 16) {
      const __m256 a = _mm256_loadu_ps(xr + i), b = _mm256_loadu_ps(xr + i + 8);
      s0 = _mm256_fmadd_ps(a, a, s0);
      s1 = _mm256_fmadd_ps(b, b, s1);
    }
    for (; i < D; i += 8) {
      const __m256 a = load_n(xr + i, D - i);
      s0 = _mm256_fmadd_ps(a, a, s0);
    }
    const float inv = 1.0f / std::sqrt(hsum(_mm256_add_ps(s0, s1)) / static_cast<float>(D) + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i < D; i += 8) {
      store_n(yr + i, _mm256_mul_ps(_mm256_mul_ps(load_n(xr + i, D - i), vinv), load_n(w + i, D - i)), D - i);
    }
  }
}

// y = silu(g) * u = g / (1 + exp(-g)) * u over n values.
// Heads [h0, h1) of one query token (DecodeAttention): softmax(q . k_j * scale) over the n cached keys of the
// head's KV group, then the weighted sum of their values.
void attend(const DecodeAttention& a, int64_t h0, int64_t h1) {
  const int64_t hd = a.hd, n = a.n;
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n + 8) buf.resize(static_cast<size_t>(n + 8));
  float* p = buf.data();
  for (int64_t bh = h0; bh < h1; ++bh) {
    const int64_t b = bh / a.heads, h = bh % a.heads, g = h / (a.heads / a.kv_heads);
    const float* q = a.q + bh * hd;
    const float* k = a.k + (b * a.kv_heads + g) * a.kv_stride;
    const float* v = a.v + (b * a.kv_heads + g) * a.kv_stride;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      const float* kj = k + j * hd;
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= hd; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kj + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(kj + i + 8), s1);
      }
      for (; i < hd; i += 8) s0 = _mm256_fmadd_ps(load_n(q + i, hd - i), load_n(kj + i, hd - i), s0);
      p[j] = hsum(_mm256_add_ps(s0, s1)) * a.scale;
      mx = std::max(mx, p[j]);
    }
    __m256 sum = _mm256_setzero_ps();
    const __m256 vmx = _mm256_set1_ps(mx);
    for (int64_t j = 0; j < n; j += 8) {
      const __m256 e = FloatVec8::exp(_mm256_sub_ps(load_n(p + j, n - j), vmx));
      store_n(p + j, e, n - j);
      // masked lanes of the tail load 0, exp(0 - mx) must not count: zero them.
      sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(tail_mask(n - j))));
    }
    const float inv = 1.0f / hsum(sum);
    float* out = a.out + bh * hd;
    for (int64_t i = 0; i < hd; i += 8) {
      const __m256i m = tail_mask(hd - i);
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 2 <= n; j += 2) {
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_maskload_ps(v + j * hd + i, m), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(p[j + 1]), _mm256_maskload_ps(v + (j + 1) * hd + i, m), acc1);
      }
      if (j < n) acc0 = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_maskload_ps(v + j * hd + i, m), acc0);
      _mm256_maskstore_ps(out + i, m, _mm256_mul_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(inv)));
    }
  }
}


// y = silu(g) * u = g / (1 + exp(-g)) * u, n values; the full vector width (each lane computes the same
// operations as at any other width, so the result does not depend on it).
void silu_mul(const float* g, const float* u, int64_t n, float* y) {
  using D = FloatVec;
  const D::V one = D::set1(1.0f);
  for (int64_t i = 0; i < n; i += D::L) {
    const D::V gv = D::load_n(g + i, n - i);
    const D::V e = D::exp(D::sub(D::zero(), gv));
    D::store_n(y + i, D::mul(D::div(gv, D::add(one, e)), D::load_n(u + i, n - i)), n - i);
  }
}

// y[m, n] = bias[n] + x[m] . w[n] for the M rows of x [M, K] and outputs [n0, n1) of a float32 weight w [N, K]
// (y [M, N]): a float layer's few-row product (a float lm_head at decode or on a prefill's last row), bound by
// reading w, so R rows of it stream at once (one contiguous run) and each is read once for all M rows.
template <int M>
void gemv_rows(const float* x, int64_t K, const float* w, const float* bias, float* y, int64_t N, int64_t n0,
               int64_t n1) {
  using D = FloatVec;
  using V = D::V;
  constexpr int L = D::L, R = 4;
  int64_t n = n0;
  auto rows = [&](auto rc) __attribute__((always_inline)) {
    constexpr int RR = decltype(rc)::value;
    V acc[M][RR];
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < RR; ++r) acc[m][r] = D::zero();
    }
    for (int64_t k = 0; k < K; k += L) {
      V wv[RR];
      for (int r = 0; r < RR; ++r) wv[r] = D::load_n(w + (n + r) * K + k, K - k);
      for (int m = 0; m < M; ++m) {
        const V xv = D::load_n(x + m * K + k, K - k);
        for (int r = 0; r < RR; ++r) acc[m][r] = D::fma(wv[r], xv, acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < RR; ++r) y[m * N + n + r] = D::hsum(acc[m][r]) + (bias != nullptr ? bias[n + r] : 0.0f);
    }
  };
  for (; n + R <= n1; n += R) rows(std::integral_constant<int, R>{});
  for (; n < n1; ++n) rows(std::integral_constant<int, 1>{});
}

void gemv_f32(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y, int64_t N,
              int64_t n0, int64_t n1) {
  switch (M) {
    case 1: gemv_rows<1>(x, K, w, bias, y, N, n0, n1); break;
    case 2: gemv_rows<2>(x, K, w, bias, y, N, n0, n1); break;
    case 3: gemv_rows<3>(x, K, w, bias, y, N, n0, n1); break;
    default: gemv_rows<4>(x, K, w, bias, y, N, n0, n1); break;
  }
}

// Work units [u0, u1) of a prefill's causal attention (PrefillAttention). Per unit (one KV group, up to
// kPrefillRows query rows, every head of the group): the query vectors, pre-scaled, in Q [nq][hd] (vector
// r * rep + head); K transposed into Kt [hd][nkp] (nkp: keys padded to 2 vectors) so that scores are a
// broadcast-FMA block S = Q Kt (4 queries x 2 vectors of keys); a softmax per query over its own causal prefix
// (keys past it get probability 0); then O = P V by a block of 4 queries x 2 vectors of dims. Blocks run in
// reverse order of rows: the long ones are claimed first.
void prefill_attend(const PrefillAttention& a, int64_t u0, int64_t u1) {
  using D = FloatVec;
  using V = D::V;
  constexpr int L = D::L, W = 2 * L;
  const int64_t hd = a.hd, rep = a.heads / a.kv_heads, blocks = (a.T + kPrefillRows - 1) / kPrefillRows;
  const int64_t shift = a.n - a.T;  // query row i sees keys j < i + shift + 1
  thread_local std::vector<float> qbuf, kbuf, sbuf, inv;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t bg = u / blocks, rb = blocks - 1 - u % blocks, b = bg / a.kv_heads, g = bg % a.kv_heads;
    const int64_t i0 = rb * kPrefillRows, rows = std::min<int64_t>(kPrefillRows, a.T - i0);
    const int64_t nk = i0 + rows + shift, nkp = (nk + W - 1) / W * W, nq = rows * rep;
    if (static_cast<int64_t>(qbuf.size()) < nq * hd) qbuf.resize(static_cast<size_t>(nq * hd));
    if (static_cast<int64_t>(kbuf.size()) < hd * nkp) kbuf.resize(static_cast<size_t>(hd * nkp));
    if (static_cast<int64_t>(sbuf.size()) < nq * nkp) sbuf.resize(static_cast<size_t>(nq * nkp));
    if (static_cast<int64_t>(inv.size()) < nq) inv.resize(static_cast<size_t>(nq));
    float* Q = qbuf.data();
    float* Kt = kbuf.data();
    float* S = sbuf.data();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t hl = 0; hl < rep; ++hl) {
        const float* src = a.q + b * a.q_sb + (i0 + r) * a.q_st + (g * rep + hl) * a.q_sh;
        float* dst = Q + (r * rep + hl) * hd;
        for (int64_t d = 0; d < hd; ++d) dst[d] = src[d] * a.scale;
      }
    }
    const float* k = a.k + (b * a.kv_heads + g) * a.kv_stride;
    const float* v = a.v + (b * a.kv_heads + g) * a.kv_stride;
    for (int64_t j = 0; j < nk; ++j) {
      for (int64_t d = 0; d < hd; ++d) Kt[d * nkp + j] = k[j * hd + d];
    }
    for (int64_t d = 0; d < hd; ++d) std::fill(Kt + d * nkp + nk, Kt + d * nkp + nkp, 0.0f);
    // keys seen by query vector qv: its row's causal prefix
    auto seen = [&](int64_t qv) { return i0 + qv / rep + shift + 1; };
    for (int64_t qv = 0; qv < nq; qv += 4) {
      const int64_t mq = std::min<int64_t>(4, nq - qv), lim = (seen(qv + mq - 1) + W - 1) / W * W;
      const float* q0 = Q + qv * hd;
      const float* q1 = Q + (qv + (mq > 1 ? 1 : 0)) * hd;
      const float* q2 = Q + (qv + (mq > 2 ? 2 : 0)) * hd;
      const float* q3 = Q + (qv + (mq > 3 ? 3 : 0)) * hd;
      for (int64_t j0 = 0; j0 < lim; j0 += W) {
        V c00 = D::zero(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
        const float* kt = Kt + j0;
        for (int64_t d = 0; d < hd; ++d, kt += nkp) {
          const V k0 = D::load(kt), k1 = D::load(kt + L);
          V x = D::bcast(q0 + d);
          c00 = D::fma(x, k0, c00);
          c01 = D::fma(x, k1, c01);
          x = D::bcast(q1 + d);
          c10 = D::fma(x, k0, c10);
          c11 = D::fma(x, k1, c11);
          x = D::bcast(q2 + d);
          c20 = D::fma(x, k0, c20);
          c21 = D::fma(x, k1, c21);
          x = D::bcast(q3 + d);
          c30 = D::fma(x, k0, c30);
          c31 = D::fma(x, k1, c31);
        }
        float* s = S + qv * nkp + j0;
        D::store(s, c00);
        D::store(s + L, c01);
        if (mq > 1) D::store(s + nkp, c10), D::store(s + nkp + L, c11);
        if (mq > 2) D::store(s + 2 * nkp, c20), D::store(s + 2 * nkp + L, c21);
        if (mq > 3) D::store(s + 3 * nkp, c30), D::store(s + 3 * nkp + L, c31);
      }
    }
    for (int64_t qv = 0; qv < nq; ++qv) {
      float* p = S + qv * nkp;
      const int64_t m = seen(qv);
      V vmx = D::set1(-INFINITY);
      int64_t j = 0;
      for (; j + L <= m; j += L) vmx = D::max(vmx, D::load(p + j));
      if (j < m) vmx = D::max(vmx, D::keep_n(D::load_n(p + j, m - j), m - j, -INFINITY));
      const V mx = D::set1(D::hmax(vmx));
      V sum = D::zero();
      for (j = 0; j + L <= m; j += L) {
        const V e = D::exp(D::sub(D::load(p + j), mx));
        D::store(p + j, e);
        sum = D::add(sum, e);
      }
      if (j < m) {  // the tail's masked lanes load 0: exp(0 - mx) must not count
        const V e = D::keep_n(D::exp(D::sub(D::load_n(p + j, m - j), mx)), m - j, 0.0f);
        D::store_n(p + j, e, m - j);
        sum = D::add(sum, e);
      }
      std::fill(p + m, p + nkp, 0.0f);  // past the causal prefix (read by the 4-query block of P V)
      inv[qv] = 1.0f / D::hsum(sum);
    }
    for (int64_t qv = 0; qv < nq; qv += 4) {
      const int64_t mq = std::min<int64_t>(4, nq - qv), lim = seen(qv + mq - 1);
      const float* p0 = S + qv * nkp;
      const float* p1 = S + (qv + (mq > 1 ? 1 : 0)) * nkp;
      const float* p2 = S + (qv + (mq > 2 ? 2 : 0)) * nkp;
      const float* p3 = S + (qv + (mq > 3 ? 3 : 0)) * nkp;
      for (int64_t d0 = 0; d0 < hd; d0 += W) {
        V c00 = D::zero(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
        const float* vj = v + d0;
        const bool full = hd - d0 >= W;
        for (int64_t j = 0; j < lim; ++j, vj += hd) {
          const V v0 = full ? D::load(vj) : D::load_n(vj, hd - d0);
          const V v1 = full ? D::load(vj + L) : D::load_n(vj + L, hd - d0 - L);
          V x = D::bcast(p0 + j);
          c00 = D::fma(x, v0, c00);
          c01 = D::fma(x, v1, c01);
          x = D::bcast(p1 + j);
          c10 = D::fma(x, v0, c10);
          c11 = D::fma(x, v1, c11);
          x = D::bcast(p2 + j);
          c20 = D::fma(x, v0, c20);
          c21 = D::fma(x, v1, c21);
          x = D::bcast(p3 + j);
          c30 = D::fma(x, v0, c30);
          c31 = D::fma(x, v1, c31);
        }
        const V accs[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
        for (int64_t t = 0; t < mq; ++t) {
          const int64_t qi = qv + t, r = qi / rep, hl = qi % rep;
          float* o = a.out + ((b * a.T + i0 + r) * a.heads + g * rep + hl) * hd + d0;
          const V sc = D::set1(inv[qi]);
          D::store_n(o, D::mul(accs[t][0], sc), hd - d0);
          if (hd - d0 > L) D::store_n(o + L, D::mul(accs[t][1], sc), hd - d0 - L);
        }
      }
    }
  }
}

#undef LB_INLINE

}  // namespace
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
