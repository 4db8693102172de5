// Depthwise 2-D convolution over channels-last (NHWC) float32 maps, written once and compiled per ISA.
//
// Included by kernels_avx2.cpp (8-lane ymm) and kernels_avx512vnni.cpp (16-lane zmm) inside their target
// regions, after kernels_simd_impl.h (same namespace, its static_for). See lowbit_kernels.h: DwConv.
//
// Why a kernel of our own: a depthwise conv does ~10 MACs per output and input value, so it is bound by
// moving the map, and at the sizes of a mobile CNN (a 96-px EfficientNet: 3x3 to 48x48, 32 to 1152 channels)
// torch's call is dominated by the padding copy, layout reorders and primitive lookup (lit-fashion's 16 layers:
// 66-173 us each, 13-40 us here; benchmarks/bench_depthwise.py). Here channels are the vector lanes (NHWC: one pixel's channels are contiguous), each
// output pixel block keeps PX accumulators per channel vector in registers and reads each tap's weight vector
// once for all PX pixels; zero padding is never materialised: the taps outside the image are skipped (per
// output row for kh, per pixel at the left and right edges for kw), so any (asymmetric) padding is free.
// Bias and an output clamp (ReLU / ReLU6) are applied in registers before the one store.

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
};
#endif

// PX adjacent output pixels of one row x NV channel vectors from channel c (Tail: the last vector is partial).
// xr: input row of the first valid kh at column 0 (channel 0); wk: the weights of that kh ([KH, KW, C]); nkh
// valid kernel rows; iw0: input column of pixel 0's tap kw = 0. KWC > 0 fixes the kernel width at compile time
// (the tap loop unrolls), 0 reads it from p. Guard: taps outside [0, W) are skipped (image edges, PX = 1);
// without it every tap of every pixel is inside (the caller checks).
template <int PX, int NV, bool Tail, int KWC, bool Guard>
LB_INLINE void dw_block(const DwConv& p, const float* xr, const float* wk, int nkh, int64_t iw0, int64_t c,
                        float* yp) {
  using D = DwVec;
  using V = typename D::V;
  const int64_t C = p.C, rowC = p.W * C, sC = p.SW * C;
  const int KW = KWC > 0 ? KWC : p.KW;
  const typename D::Mask m = D::mask(static_cast<int>(C - c - (NV - 1) * D::L));
  auto ld = [&](const float* q, auto vc) __attribute__((always_inline)) {
    return Tail && decltype(vc)::value == NV - 1 ? D::load(q, m) : D::load(q);
  };
  V acc[NV][PX];
  static_for<0, NV>([&](auto v) __attribute__((always_inline)) {
    constexpr int vi = decltype(v)::value;
    const V b = p.bias != nullptr ? ld(p.bias + c + vi * D::L, v) : D::zero();
    static_for<0, PX>([&](auto i) __attribute__((always_inline)) { acc[vi][decltype(i)::value] = b; });
  });
  for (int kh = 0; kh < nkh; ++kh) {
    const float* xk = xr + kh * rowC + iw0 * C + c;
    const float* wr = wk + kh * KW * C + c;
    auto tap = [&](int kw) __attribute__((always_inline)) {
      if (Guard && (iw0 + kw < 0 || iw0 + kw >= p.W)) return;
      static_for<0, NV>([&](auto v) __attribute__((always_inline)) {
        constexpr int vi = decltype(v)::value;
        const V wv = ld(wr + kw * C + vi * D::L, v);
        static_for<0, PX>([&](auto i) __attribute__((always_inline)) {
          constexpr int px = decltype(i)::value;
          acc[vi][px] = D::fma(ld(xk + px * sC + kw * C + vi * D::L, v), wv, acc[vi][px]);
        });
      });
    };
    if constexpr (KWC > 0) {
      static_for<0, KWC>([&](auto kw) __attribute__((always_inline)) { tap(decltype(kw)::value); });
    } else {
      for (int kw = 0; kw < KW; ++kw) tap(kw);
    }
  }
  const V lo = D::set1(p.lo), hi = D::set1(p.hi);
  static_for<0, NV>([&](auto v) __attribute__((always_inline)) {
    constexpr int vi = decltype(v)::value;
    static_for<0, PX>([&](auto i) __attribute__((always_inline)) {
      constexpr int px = decltype(i)::value;
      const V o = p.clamp ? D::clamp(acc[vi][px], lo, hi) : acc[vi][px];
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
template <int NV, bool Tail, int KWC>
LB_INLINE void dw_row(const DwConv& p, const float* xr, const float* wk, int nkh, int64_t ow_lo, int64_t ow_hi,
                      int64_t c, float* yr) {
  constexpr int PX = 4;
  const int64_t C = p.C;
  int64_t ow = 0;
  for (; ow < ow_lo; ++ow) dw_block<1, NV, Tail, KWC, true>(p, xr, wk, nkh, ow * p.SW - p.PL, c, yr + ow * C);
  for (; ow + PX <= ow_hi; ow += PX) {
    dw_block<PX, NV, Tail, KWC, false>(p, xr, wk, nkh, ow * p.SW - p.PL, c, yr + ow * C);
  }
  for (; ow < ow_hi; ++ow) dw_block<1, NV, Tail, KWC, false>(p, xr, wk, nkh, ow * p.SW - p.PL, c, yr + ow * C);
  for (; ow < p.OW; ++ow) dw_block<1, NV, Tail, KWC, true>(p, xr, wk, nkh, ow * p.SW - p.PL, c, yr + ow * C);
}

template <int KWC>
void dwconv_rows(const DwConv& p, int64_t r0, int64_t r1) {
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
    const float* xr = p.x + ((b * H) + (nkh > 0 ? ih + kh0 : 0)) * W * C;
    const float* wk = p.w + int64_t{kh0} * p.KW * C;
    int64_t c = 0;
    for (; c + NV * L <= C; c += NV * L) dw_row<NV, false, KWC>(p, xr, wk, nkh, ow_lo, ow_hi, c, yr);
    for (; c + L <= C; c += L) dw_row<1, false, KWC>(p, xr, wk, nkh, ow_lo, ow_hi, c, yr);
    if (c < C) dw_row<1, true, KWC>(p, xr, wk, nkh, ow_lo, ow_hi, c, yr);
  }
}

void dwconv(const DwConv& p, int64_t r0, int64_t r1) {
  switch (p.KW) {  // the common kernel widths unroll their tap loop
    case 3: dwconv_rows<3>(p, r0, r1); break;
    case 5: dwconv_rows<5>(p, r0, r1); break;
    default: dwconv_rows<0>(p, r0, r1);
  }
}

#undef LB_INLINE

}  // namespace
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
