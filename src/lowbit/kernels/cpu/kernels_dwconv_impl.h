// Depthwise 2-D convolution over channels-last (NHWC) float32 maps, written once and compiled per ISA.
//
// Included by kernels_avx2.cpp (8-lane ymm) and kernels_avx512vnni.cpp (16-lane zmm) inside their target
// regions, after kernels_simd_impl.h (same namespace, its static_for). See lowbit_kernels.h: DwConv.
//
// Why a kernel of our own: a depthwise conv does ~10 MACs per output and input value, so it is bound by
// moving the map, and at the sizes of a mobile CNN (a 96-px EfficientNet: 3x3 to 48x48, 32 to 1152 channels)
// torch's call is dominated by the padding copy, layout reorders and primitive lookup (lit-fashion's 16 layers:
// 66-173 us each, 13-40 us here; benchmarks/bench_conv_layers.py). Here channels are the vector lanes (NHWC: one pixel's channels are contiguous), each
// output pixel block keeps PX accumulators per channel vector in registers and reads each tap's weight vector
// once for all PX pixels; zero padding is never materialised: the taps outside the image are skipped (per
// output row for kh, per pixel at the left and right edges for kw), so any (asymmetric) padding is free.
// Bias and an output clamp (ReLU / ReLU6) are applied in registers before the one store.
//
// The int8 form (DwConvQ, packed int8 vision towers) runs the same loops on other lanes (traits DwQVec): each
// int32 lane holds a pair of int16 values, the int8 codes of two horizontally adjacent input pixels (written
// once per image by dw_quantize) against the pair of taps (kw, kw + 1) of a channel, so one pmaddwd /
// vpdpwssd does two taps exactly in int32 with no widening in the loop: ceil(KW / 2) instructions per kernel
// row instead of KW FMAs. The write-out converts the sums once and applies the channel's product scale
// a[b, c] * s[c], the bias and the clamp.

#ifndef LOWBIT_ISA_NS
#error "kernels_dwconv_impl.h needs LOWBIT_ISA_NS (include it after kernels_simd_impl.h)"
#endif

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

#define LB_INLINE inline __attribute__((always_inline))

#if LOWBIT_USE_VNNI
struct DwVec {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int L = 16;
  static LB_INLINE Mask mask(int n) { return static_cast<Mask>(n >= 16 ? 0xffff : (1u << n) - 1u); }
  static LB_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static LB_INLINE V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static LB_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static LB_INLINE void store(float* p, V v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static LB_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static LB_INLINE V set1(float v) { return _mm512_set1_ps(v); }
  static LB_INLINE V zero() { return _mm512_setzero_ps(); }
  static LB_INLINE V clamp(V v, V lo, V hi) { return _mm512_min_ps(_mm512_max_ps(v, lo), hi); }
  // the lane traits dw_block reads (float: the map and taps are float, the accumulators hold the result)
  using X = float;
  using Wt = float;
  using A = V;
  static constexpr bool kInt = false;
  static constexpr int kPad = 0, kStep = 1;  // map columns before pixel 0; input columns per tap step
  static constexpr int taps(int kw) { return kw; }
  static LB_INLINE A load_x(const float* p) { return load(p); }
  static LB_INLINE A load_x(const float* p, Mask m, int) { return load(p, m); }
  static LB_INLINE A load_w(const float* p) { return load(p); }
  static LB_INLINE A load_w(const float* p, Mask m) { return load(p, m); }
  static LB_INLINE A mac(A acc, A x, A w) { return fma(x, w, acc); }
  static LB_INLINE V abs(V v) { return _mm512_abs_ps(v); }
  static LB_INLINE V max(V a, V b) { return _mm512_max_ps(a, b); }
  static LB_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
};
struct DwQVec {  // int8 code pairs x tap pairs (see the top): int32 lanes, vpdpwssd
  using V = __m512;
  using Mask = __mmask16;
  using X = int32_t;
  using Wt = int32_t;
  using A = __m512i;
  static constexpr int L = 16;
  static constexpr bool kInt = true;
  static constexpr int kPad = 1, kStep = 2;
  static constexpr int taps(int kw) { return (kw + 1) / 2; }
  static LB_INLINE A load_x(const int32_t* p) { return _mm512_loadu_si512(p); }
  static LB_INLINE A load_x(const int32_t* p, Mask m, int) { return _mm512_maskz_loadu_epi32(m, p); }
  static LB_INLINE A load_w(const int32_t* p) { return _mm512_loadu_si512(p); }
  static LB_INLINE A load_w(const int32_t* p, Mask m) { return _mm512_maskz_loadu_epi32(m, p); }
  static LB_INLINE A mac(A acc, A x, A w) { return _mm512_dpwssd_epi32(acc, x, w); }
  static LB_INLINE A azero() { return _mm512_setzero_si512(); }
  static LB_INLINE V to_float(A acc) { return _mm512_cvtepi32_ps(acc); }
  static LB_INLINE A cvt(V v) { return _mm512_cvtps_epi32(v); }  // round half to even
  static LB_INLINE A pair(A lo, A hi) {
    return _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi32(0xffff)), _mm512_slli_epi32(hi, 16));
  }
  static LB_INLINE void store(int32_t* p, A v) { _mm512_storeu_si512(p, v); }
};
#else
struct DwVec {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int L = 8;
  static LB_INLINE Mask mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static LB_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static LB_INLINE V load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static LB_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static LB_INLINE void store(float* p, V v, Mask m) { _mm256_maskstore_ps(p, m, v); }
  static LB_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static LB_INLINE V set1(float v) { return _mm256_set1_ps(v); }
  static LB_INLINE V zero() { return _mm256_setzero_ps(); }
  static LB_INLINE V clamp(V v, V lo, V hi) { return _mm256_min_ps(_mm256_max_ps(v, lo), hi); }
  using X = float;
  using Wt = float;
  using A = V;
  static constexpr bool kInt = false;
  static constexpr int kPad = 0, kStep = 1;  // map columns before pixel 0; input columns per tap step
  static constexpr int taps(int kw) { return kw; }
  static LB_INLINE A load_x(const float* p) { return load(p); }
  static LB_INLINE A load_x(const float* p, Mask m, int) { return load(p, m); }
  static LB_INLINE A load_w(const float* p) { return load(p); }
  static LB_INLINE A load_w(const float* p, Mask m) { return load(p, m); }
  static LB_INLINE A mac(A acc, A x, A w) { return fma(x, w, acc); }
  static LB_INLINE V abs(V v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
  static LB_INLINE V max(V a, V b) { return _mm256_max_ps(a, b); }
  static LB_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
};
struct DwQVec {  // int8 code pairs x tap pairs (see the top): int32 lanes, pmaddwd
  using V = __m256;
  using Mask = __m256i;
  using X = int32_t;
  using Wt = int32_t;
  using A = __m256i;
  static constexpr int L = 8;
  static constexpr bool kInt = true;
  static constexpr int kPad = 1, kStep = 2;
  static constexpr int taps(int kw) { return (kw + 1) / 2; }
  static LB_INLINE A load_x(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static LB_INLINE A load_x(const int32_t* p, Mask m, int) { return _mm256_maskload_epi32(p, m); }
  static LB_INLINE A load_w(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static LB_INLINE A load_w(const int32_t* p, Mask m) { return _mm256_maskload_epi32(p, m); }
  static LB_INLINE A mac(A acc, A x, A w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
  static LB_INLINE A azero() { return _mm256_setzero_si256(); }
  static LB_INLINE V to_float(A acc) { return _mm256_cvtepi32_ps(acc); }
  static LB_INLINE A cvt(V v) { return _mm256_cvtps_epi32(v); }
  static LB_INLINE A pair(A lo, A hi) {
    return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(hi, 16));
  }
  static LB_INLINE void store(int32_t* p, A v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};
#endif

// PX adjacent output pixels of one row x NV channel vectors from channel c (Tail: the last vector is partial).
// xr: input row of the first valid kh at column 0 (channel 0); wk: the weights of that kh ([KH, KW, C]); nkh
// valid kernel rows; iw0: input column of pixel 0's tap kw = 0. KWC > 0 fixes the kernel width at compile time
// (the tap loop unrolls), 0 reads it from p. Guard: taps outside [0, W) are skipped (image edges, PX = 1);
// without it every tap of every pixel is inside (the caller checks). Q: the lane traits (DwVec: float; DwQVec:
// int8, then `sc` is the image's product scales [C]).
template <class Q, int PX, int NV, bool Tail, int KWC, bool Guard, class P>
LB_INLINE void dw_block(const P& p, const typename Q::X* xr, const typename Q::Wt* wk, int nkh, int64_t iw0,
                        int64_t c, float* yp, const float* sc) {
  using D = DwVec;
  using V = typename D::V;
  using A = typename Q::A;
  const int64_t C = p.C, rowC = (p.W + Q::kPad) * C, sC = p.SW * C;
  const int KW = Q::taps(KWC > 0 ? KWC : p.KW);  // tap steps of a kernel row
  const int tail_n = static_cast<int>(C - c - (NV - 1) * D::L);
  const typename D::Mask m = D::mask(tail_n);
  auto ldf = [&](const float* q, auto vc) __attribute__((always_inline)) {
    return Tail && decltype(vc)::value == NV - 1 ? D::load(q, m) : D::load(q);
  };
  A acc[NV][PX];
  static_for<0, NV>([&](auto v) __attribute__((always_inline)) {
    constexpr int vi = decltype(v)::value;
    A b;
    if constexpr (Q::kInt) {
      b = Q::azero();
    } else {
      b = p.bias != nullptr ? ldf(p.bias + c + vi * D::L, v) : D::zero();
    }
    static_for<0, PX>([&](auto i) __attribute__((always_inline)) { acc[vi][decltype(i)::value] = b; });
  });
  for (int kh = 0; kh < nkh; ++kh) {
    const typename Q::X* xk = xr + kh * rowC + (iw0 + Q::kPad) * C + c;
    const typename Q::Wt* wr = wk + kh * KW * C + c;
    auto tap = [&](int kw) __attribute__((always_inline)) {
      if (Guard && (iw0 + Q::kStep * kw < -Q::kPad || iw0 + Q::kStep * kw >= p.W)) return;
      static_for<0, NV>([&](auto v) __attribute__((always_inline)) {
        constexpr int vi = decltype(v)::value;
        constexpr bool part = Tail && vi == NV - 1;
        const A wv = part ? Q::load_w(wr + kw * C + vi * D::L, m) : Q::load_w(wr + kw * C + vi * D::L);
        static_for<0, PX>([&](auto i) __attribute__((always_inline)) {
          constexpr int px = decltype(i)::value;
          const typename Q::X* xp = xk + px * sC + Q::kStep * kw * C + vi * D::L;
          acc[vi][px] = Q::mac(acc[vi][px], part ? Q::load_x(xp, m, tail_n) : Q::load_x(xp), wv);
        });
      });
    };
    if constexpr (KWC > 0) {
      static_for<0, Q::taps(KWC)>([&](auto kw) __attribute__((always_inline)) { tap(decltype(kw)::value); });
    } else {
      for (int kw = 0; kw < KW; ++kw) tap(kw);
    }
  }
  const V lo = D::set1(p.lo), hi = D::set1(p.hi);
  static_for<0, NV>([&](auto v) __attribute__((always_inline)) {
    constexpr int vi = decltype(v)::value;
    V s = D::zero(), b = D::zero();
    if constexpr (Q::kInt) {
      s = ldf(sc + c + vi * D::L, v);
      if (p.bias != nullptr) b = ldf(p.bias + c + vi * D::L, v);
    }
    static_for<0, PX>([&](auto i) __attribute__((always_inline)) {
      constexpr int px = decltype(i)::value;
      V o;
      if constexpr (Q::kInt) {
        o = D::fma(Q::to_float(acc[vi][px]), s, b);
      } else {
        o = acc[vi][px];
      }
      if (p.clamp) o = D::clamp(o, lo, hi);
      float* dst = yp + px * C + c + vi * D::L;
      if constexpr (Tail && vi == NV - 1) {
        D::store(dst, o, m);
      } else {
        D::store(dst, o);
      }
    });
  });
}

// One output row, channels [c, c + NV vectors): edge pixels one by one with guarded taps, the interior PX at a
// time. The channel group is the outer loop of a row so that its weights (KH * KW * NV vectors) stay in L1
// across the row's pixels (a 5x5 kernel over 672 channels is 67 KB of weights).
template <class Q, int NV, bool Tail, int KWC, class P>
LB_INLINE void dw_row(const P& p, const typename Q::X* xr, const typename Q::Wt* wk, int nkh, int64_t ow_lo,
                      int64_t ow_hi, int64_t c, float* yr, const float* sc) {
  constexpr int PX = 4;
  const int64_t C = p.C;
  int64_t ow = 0;
  for (; ow < ow_lo; ++ow) dw_block<Q, 1, NV, Tail, KWC, true>(p, xr, wk, nkh, ow * p.SW - p.PL, c, yr + ow * C, sc);
  for (; ow + PX <= ow_hi; ow += PX) {
    dw_block<Q, PX, NV, Tail, KWC, false>(p, xr, wk, nkh, ow * p.SW - p.PL, c, yr + ow * C, sc);
  }
  for (; ow < ow_hi; ++ow) dw_block<Q, 1, NV, Tail, KWC, false>(p, xr, wk, nkh, ow * p.SW - p.PL, c, yr + ow * C, sc);
  for (; ow < p.OW; ++ow) dw_block<Q, 1, NV, Tail, KWC, true>(p, xr, wk, nkh, ow * p.SW - p.PL, c, yr + ow * C, sc);
}

template <class Q, int KWC, class P>
void dwconv_rows(const P& p, int64_t r0, int64_t r1) {
  constexpr int NV = 2;  // channel vectors per step: with PX = 4 pixels, 8 independent FMA chains
  const int64_t C = p.C, H = p.H, W = p.W, L = DwVec::L;
  // Output columns whose taps are all inside the image: ow * SW - PL >= 0 and ow * SW - PL + KW - 1 < W.
  const int64_t ow_lo = std::min<int64_t>(p.OW, (p.PL + p.SW - 1) / p.SW);
  const int64_t ow_hi = std::max<int64_t>(ow_lo, std::min<int64_t>(p.OW, W - p.KW + p.PL >= 0 ? (W - p.KW + p.PL) / p.SW + 1 : 0));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.OH, oh = r % p.OH;
    const int64_t ih = oh * p.SH - p.PT;  // input row of kh = 0
    const int kh0 = static_cast<int>(std::max<int64_t>(0, -ih));
    const int nkh = std::max(0, static_cast<int>(std::min<int64_t>(p.KH, H - ih)) - kh0);
    float* yr = p.y + r * p.OW * C;
    // With nkh = 0 (the kernel wholly in the padding) no tap reads xr: the outputs are the bias.
    const typename Q::X* xr = p.x + ((b * H) + (nkh > 0 ? ih + kh0 : 0)) * (W + Q::kPad) * C;
    const typename Q::Wt* wk = p.w + int64_t{kh0} * Q::taps(p.KW) * C;
    const float* sc = nullptr;
    if constexpr (Q::kInt) sc = p.scale + b * C;
    int64_t c = 0;
    for (; c + NV * L <= C; c += NV * L) dw_row<Q, NV, false, KWC>(p, xr, wk, nkh, ow_lo, ow_hi, c, yr, sc);
    for (; c + L <= C; c += L) dw_row<Q, 1, false, KWC>(p, xr, wk, nkh, ow_lo, ow_hi, c, yr, sc);
    if (c < C) dw_row<Q, 1, true, KWC>(p, xr, wk, nkh, ow_lo, ow_hi, c, yr, sc);
  }
}

template <class Q, class P>
void dwconv_any(const P& p, int64_t r0, int64_t r1) {
  switch (p.KW) {  // the common kernel widths unroll their tap loop
    case 3: dwconv_rows<Q, 3>(p, r0, r1); break;
    case 5: dwconv_rows<Q, 5>(p, r0, r1); break;
    default: dwconv_rows<Q, 0>(p, r0, r1);
  }
}

void dwconv(const DwConv& p, int64_t r0, int64_t r1) { dwconv_any<DwVec>(p, r0, r1); }

void dwconv_q(const DwConvQ& p, int64_t r0, int64_t r1) { dwconv_any<DwQVec>(p, r0, r1); }

// Images [b0, b1) of channels-last maps x [B, H, W, C] to the int8 kernel's input (DwConvQ): a[b, c] = max |x| /
// 127 over the image, codes x * (127 / max) rounded half to even (0 for an all-zero channel), stored as pairs:
// xq [B, H, W + 1, C] int32, entry j of a row = (code of pixel j - 1, code of pixel j), 0 outside the row.
void dw_quantize(const float* x, int64_t H, int64_t W, int64_t C, int32_t* xq, float* a, int64_t b0, int64_t b1) {
  using D = DwVec;
  using Q = DwQVec;
  constexpr int L = D::L;
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < C + L) buf.resize(static_cast<size_t>(C + L));
  float* mx = buf.data();
  const int64_t P = H * W;
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = x + b * P * C;
    // Channel maxima: per channel vector, four independent max chains over the pixels (one chain through
    // memory per pixel was latency-bound: ~3x slower on a 96x96 map).
    int64_t c0 = 0;
    for (; c0 + L <= C; c0 += L) {
      typename D::V m0 = D::zero(), m1 = m0, m2 = m0, m3 = m0;
      const float* xc = xb + c0;
      int64_t px = 0;
      for (; px + 4 <= P; px += 4, xc += 4 * C) {
        m0 = D::max(m0, D::abs(D::load(xc)));
        m1 = D::max(m1, D::abs(D::load(xc + C)));
        m2 = D::max(m2, D::abs(D::load(xc + 2 * C)));
        m3 = D::max(m3, D::abs(D::load(xc + 3 * C)));
      }
      for (; px < P; ++px, xc += C) m0 = D::max(m0, D::abs(D::load(xc)));
      D::store(mx + c0, D::max(D::max(m0, m1), D::max(m2, m3)));
    }
    for (int64_t c = c0; c < C; ++c) {
      float m = 0.0f;
      for (int64_t px = 0; px < P; ++px) m = std::max(m, std::fabs(xb[px * C + c]));
      mx[c] = m;
    }
    for (int64_t c = 0; c < C; ++c) {
      a[b * C + c] = mx[c] / 127.0f;
      mx[c] = mx[c] > 0.0f ? 127.0f / mx[c] : 0.0f;
    }
    for (int64_t h = 0; h < H; ++h) {
      const float* xr = xb + h * W * C;
      int32_t* qr = xq + ((b * H) + h) * (W + 1) * C;
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        const typename D::V inv = D::load(mx + c);
        typename Q::A prev = Q::azero();
        for (int64_t j = 0; j < W; ++j) {
          const typename Q::A cur = Q::cvt(D::mul(D::load(xr + j * C + c), inv));
          Q::store(qr + j * C + c, Q::pair(prev, cur));
          prev = cur;
        }
        Q::store(qr + W * C + c, Q::pair(prev, Q::azero()));
      }
      for (; c < C; ++c) {
        int32_t prev = 0;
        for (int64_t j = 0; j <= W; ++j) {
          const int32_t cur = j < W ? static_cast<int32_t>(std::nearbyint(xr[j * C + c] * mx[c])) : 0;
          qr[j * C + c] = static_cast<int32_t>((static_cast<uint32_t>(prev) & 0xffffu) | (static_cast<uint32_t>(cur) << 16));
          prev = cur;
        }
      }
    }
  }
}

#undef LB_INLINE

}  // namespace
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
