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

LB_INLINE __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.72283f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n: n in [-126, 128] after the clamp; 2^128 would overflow the exponent, so scale in two halves.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
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
void silu_mul(const float* g, const float* u, int64_t n, float* y) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 gv = load_n(g + i, n - i);
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    store_n(y + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), load_n(u + i, n - i)), n - i);
  }
}

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
      const __m256 e = exp_ps(_mm256_sub_ps(load_n(p + j, n - j), vmx));
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

// Work units [u0, u1) of a prefill's causal attention (PrefillAttention). Per unit (one KV group, up to
// kPrefillRows query rows, every head of the group): the query vectors, pre-scaled, in Q [nq][hd] (vector
// r * rep + head); K transposed into Kt [hd][nk16] so that scores are a broadcast-FMA block S = Q Kt (4 queries x
// 16 keys); a softmax per query over its own causal prefix (keys past it get probability 0); then O = P V by a
// block of 4 queries x 16 dims. Blocks run in reverse order of rows: the long ones are claimed first.
void prefill_attend(const PrefillAttention& a, int64_t u0, int64_t u1) {
  const int64_t hd = a.hd, rep = a.heads / a.kv_heads, blocks = (a.T + kPrefillRows - 1) / kPrefillRows;
  const int64_t shift = a.n - a.T;  // query row i sees keys j < i + shift + 1
  thread_local std::vector<float> qbuf, kbuf, sbuf, inv;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t bg = u / blocks, rb = blocks - 1 - u % blocks, b = bg / a.kv_heads, g = bg % a.kv_heads;
    const int64_t i0 = rb * kPrefillRows, rows = std::min<int64_t>(kPrefillRows, a.T - i0);
    const int64_t nk = i0 + rows + shift, nk16 = (nk + 15) / 16 * 16, nq = rows * rep;
    if (static_cast<int64_t>(qbuf.size()) < nq * hd) qbuf.resize(static_cast<size_t>(nq * hd));
    if (static_cast<int64_t>(kbuf.size()) < hd * nk16) kbuf.resize(static_cast<size_t>(hd * nk16));
    if (static_cast<int64_t>(sbuf.size()) < nq * nk16) sbuf.resize(static_cast<size_t>(nq * nk16));
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
      for (int64_t d = 0; d < hd; ++d) Kt[d * nk16 + j] = k[j * hd + d];
    }
    for (int64_t d = 0; d < hd; ++d) std::fill(Kt + d * nk16 + nk, Kt + d * nk16 + nk16, 0.0f);
    // keys seen by query vector qv: its row's causal prefix
    auto seen = [&](int64_t qv) { return i0 + qv / rep + shift + 1; };
    for (int64_t qv = 0; qv < nq; qv += 4) {
      const int64_t mq = std::min<int64_t>(4, nq - qv), lim = (seen(qv + mq - 1) + 15) / 16 * 16;
      const float* q0 = Q + qv * hd;
      const float* q1 = Q + (qv + (mq > 1 ? 1 : 0)) * hd;
      const float* q2 = Q + (qv + (mq > 2 ? 2 : 0)) * hd;
      const float* q3 = Q + (qv + (mq > 3 ? 3 : 0)) * hd;
      for (int64_t j0 = 0; j0 < lim; j0 += 16) {
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
               c31 = c00;
        const float* kt = Kt + j0;
        for (int64_t d = 0; d < hd; ++d, kt += nk16) {
          const __m256 k0 = _mm256_loadu_ps(kt), k1 = _mm256_loadu_ps(kt + 8);
          __m256 x = _mm256_broadcast_ss(q0 + d);
          c00 = _mm256_fmadd_ps(x, k0, c00);
          c01 = _mm256_fmadd_ps(x, k1, c01);
          x = _mm256_broadcast_ss(q1 + d);
          c10 = _mm256_fmadd_ps(x, k0, c10);
          c11 = _mm256_fmadd_ps(x, k1, c11);
          x = _mm256_broadcast_ss(q2 + d);
          c20 = _mm256_fmadd_ps(x, k0, c20);
          c21 = _mm256_fmadd_ps(x, k1, c21);
          x = _mm256_broadcast_ss(q3 + d);
          c30 = _mm256_fmadd_ps(x, k0, c30);
          c31 = _mm256_fmadd_ps(x, k1, c31);
        }
        float* s = S + qv * nk16 + j0;
        _mm256_storeu_ps(s, c00);
        _mm256_storeu_ps(s + 8, c01);
        if (mq > 1) _mm256_storeu_ps(s + nk16, c10), _mm256_storeu_ps(s + nk16 + 8, c11);
        if (mq > 2) _mm256_storeu_ps(s + 2 * nk16, c20), _mm256_storeu_ps(s + 2 * nk16 + 8, c21);
        if (mq > 3) _mm256_storeu_ps(s + 3 * nk16, c30), _mm256_storeu_ps(s + 3 * nk16 + 8, c31);
      }
    }
    for (int64_t qv = 0; qv < nq; ++qv) {
      float* p = S + qv * nk16;
      const int64_t m = seen(qv);
      __m256 vmx = _mm256_set1_ps(-INFINITY);
      for (int64_t j = 0; j < m; j += 8) {
        const __m256 x = load_n(p + j, m - j);
        vmx = _mm256_max_ps(vmx, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, _mm256_castsi256_ps(tail_mask(m - j))));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const __m256 mx = _mm256_set1_ps(_mm_cvtss_f32(h));
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < m; j += 8) {
        const __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(load_n(p + j, m - j), mx)),
                                       _mm256_castsi256_ps(tail_mask(m - j)));
        store_n(p + j, e, m - j);
        sum = _mm256_add_ps(sum, e);
      }
      std::fill(p + m, p + nk16, 0.0f);  // past the causal prefix (read by the 4-query block of P V)
      inv[qv] = 1.0f / hsum(sum);
    }
    for (int64_t qv = 0; qv < nq; qv += 4) {
      const int64_t mq = std::min<int64_t>(4, nq - qv), lim = seen(qv + mq - 1);
      const float* p0 = S + qv * nk16;
      const float* p1 = S + (qv + (mq > 1 ? 1 : 0)) * nk16;
      const float* p2 = S + (qv + (mq > 2 ? 2 : 0)) * nk16;
      const float* p3 = S + (qv + (mq > 3 ? 3 : 0)) * nk16;
      for (int64_t d0 = 0; d0 < hd; d0 += 16) {
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
               c31 = c00;
        const float* vj = v + d0;
        if (hd - d0 >= 16) {
          for (int64_t j = 0; j < lim; ++j, vj += hd) {
            const __m256 v0 = _mm256_loadu_ps(vj), v1 = _mm256_loadu_ps(vj + 8);
            __m256 x = _mm256_broadcast_ss(p0 + j);
            c00 = _mm256_fmadd_ps(x, v0, c00);
            c01 = _mm256_fmadd_ps(x, v1, c01);
            x = _mm256_broadcast_ss(p1 + j);
            c10 = _mm256_fmadd_ps(x, v0, c10);
            c11 = _mm256_fmadd_ps(x, v1, c11);
            x = _mm256_broadcast_ss(p2 + j);
            c20 = _mm256_fmadd_ps(x, v0, c20);
            c21 = _mm256_fmadd_ps(x, v1, c21);
            x = _mm256_broadcast_ss(p3 + j);
            c30 = _mm256_fmadd_ps(x, v0, c30);
            c31 = _mm256_fmadd_ps(x, v1, c31);
          }
        } else {
          for (int64_t j = 0; j < lim; ++j, vj += hd) {
            const __m256 v0 = load_n(vj, hd - d0), v1 = load_n(vj + 8, hd - d0 - 8);
            __m256 x = _mm256_broadcast_ss(p0 + j);
            c00 = _mm256_fmadd_ps(x, v0, c00);
            c01 = _mm256_fmadd_ps(x, v1, c01);
            x = _mm256_broadcast_ss(p1 + j);
            c10 = _mm256_fmadd_ps(x, v0, c10);
            c11 = _mm256_fmadd_ps(x, v1, c11);
            x = _mm256_broadcast_ss(p2 + j);
            c20 = _mm256_fmadd_ps(x, v0, c20);
            c21 = _mm256_fmadd_ps(x, v1, c21);
            x = _mm256_broadcast_ss(p3 + j);
            c30 = _mm256_fmadd_ps(x, v0, c30);
            c31 = _mm256_fmadd_ps(x, v1, c31);
          }
        }
        const __m256 accs[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
        for (int64_t t = 0; t < mq; ++t) {
          const int64_t qi = qv + t, r = qi / rep, hl = qi % rep;
          float* o = a.out + ((b * a.T + i0 + r) * a.heads + g * rep + hl) * hd + d0;
          const __m256 s = _mm256_set1_ps(inv[qi]);
          store_n(o, _mm256_mul_ps(accs[t][0], s), hd - d0);
          if (hd - d0 > 8) store_n(o + 8, _mm256_mul_ps(accs[t][1], s), hd - d0 - 8);
        }
      }
    }
  }
}

#undef LB_INLINE

}  // namespace
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
