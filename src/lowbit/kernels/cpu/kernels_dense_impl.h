// A float32 GEMM for small packed layers at many rows (lowbit_kernels.h: DenseF32), written once and compiled per
// ISA. Included by kernels_avx2.cpp (8-lane ymm) and kernels_avx512vnni.cpp (16-lane zmm) after
// kernels_dwconv_impl.h (same namespace: its DwVec lane traits and static_for).
//
// Why: a mobile CNN's first 1x1 convs have K = 16..144 inputs and N = 16..144 outputs at thousands of rows
// (lit-fashion at 96 px: M = 2304 / 576). On the int8 path each row is quantized (a max pass, a rounding pass)
// for a dot product of one or two 32-blocks, and every output pays an int32 -> float conversion and a scale:
// 25-32 GMAC/s there, no faster than torch's float conv. Here the dequantized weight (a few KB, exact: the
// packed codes times their scales) stays in L1 as [K, NP] and each row block keeps MR x NV output vectors in
// registers over all of K, broadcasting one input at a time: no activation pass, no conversions, and float
// activations (the layer's own semantics: no int8 rounding error at all).

#ifndef LOWBIT_ISA_NS
#error "kernels_dense_impl.h needs LOWBIT_ISA_NS (include it after kernels_dwconv_impl.h)"
#endif

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

// Registers: MR x NV accumulators + NV weight vectors + one broadcast. zmm (32): 6 x 4 = 24 + 5;
// ymm (16): 4 x 2 = 8 + 3 (4 x 3 spilled under GCC).
#if LOWBIT_USE_VNNI
constexpr int kDenseMR = 6, kDenseNV = 4;
#else
constexpr int kDenseMR = 4, kDenseNV = 2;
#endif

// Rows [m, m + MR) x vectors [v0, v0 + NV) of y; `last` (lanes valid in the block's last vector, 1..L) masks
// the store of the final vector of the row (N not a multiple of L).
template <int MR, int NV>
void dense_block(const DenseF32& p, int64_t m, int64_t v0, int last) {
  using D = DwVec;
  typename D::V acc[MR][NV];
  const int64_t c0 = v0 * D::L;
  static_for<0, NV>([&](auto v) {
    const typename D::V b = p.bias != nullptr ? D::load(p.bias + c0 + v * D::L) : D::zero();
    static_for<0, MR>([&](auto r) { acc[r][v] = b; });
  });
  const float* x = p.x + m * p.ldx;
  const float* w = p.wt + c0;
  for (int64_t k = 0; k < p.K; ++k, w += p.NP) {
    typename D::V wv[NV];
    static_for<0, NV>([&](auto v) { wv[v] = D::load(w + v * D::L); });
    static_for<0, MR>([&](auto r) {
      const typename D::V xb = D::set1(x[r * p.ldx + k]);
      static_for<0, NV>([&](auto v) { acc[r][v] = D::fma(xb, wv[v], acc[r][v]); });
    });
  }
  const typename D::V lo = D::set1(p.lo), hi = D::set1(p.hi);
  const typename D::Mask tail = D::mask(last);
  static_for<0, MR>([&](auto r) {
    float* y = p.y + (m + r) * p.ldy + c0;
    static_for<0, NV>([&](auto v) {
      const typename D::V out = p.clamp ? D::clamp(acc[r][v], lo, hi) : acc[r][v];
      if (v + 1 < NV || last == D::L) {
        D::store(y + v * D::L, out);
      } else {
        D::store(y + v * D::L, out, tail);
      }
    });
  });
}

// All vectors of rows [m, m + MR): full blocks of kDenseNV vectors, then one block of the rest.
template <int MR>
void dense_rows(const DenseF32& p, int64_t m) {
  const int64_t nv = (p.N + DwVec::L - 1) / DwVec::L;
  const int last = static_cast<int>(p.N - (nv - 1) * DwVec::L);
  int64_t v = 0;
  for (; v + kDenseNV <= nv; v += kDenseNV) dense_block<MR, kDenseNV>(p, m, v, v + kDenseNV == nv ? last : DwVec::L);
  const int64_t rest = nv - v;
  if constexpr (kDenseNV > 1) {
    static_for<1, kDenseNV>([&](auto r) {
      if (rest == r) dense_block<MR, r>(p, m, v, last);
    });
  }
}

}  // namespace

void dense_f32(const DenseF32& p, int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + kDenseMR <= m1; m += kDenseMR) dense_rows<kDenseMR>(p, m);
  static_for<1, kDenseMR>([&](auto r) {
    if (m1 - m == r) dense_rows<r>(p, m);
  });
}

}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
