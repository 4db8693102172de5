// 256-bit SIMD kernels for the tile layout of lowbit_kernels.h, written once and compiled per ISA.
//
// Included (only) by kernels_avx2.cpp and kernels_avx512vnni.cpp inside a `#pragma GCC target` region,
// after <immintrin.h>, with LOWBIT_ISA_NS (a namespace name) and LOWBIT_USE_VNNI (0 or 1) defined.
// Everything here lives in an ISA-specific namespace so that no symbol compiled with wide instructions can be
// merged with its portable twin by the linker.
//
// The product of one K-block: for each output row (a 32-bit lane) sum_k q[n,k] * xq[k] over 32 inputs, done
// as 8 steps of "4 unsigned weight codes x 4 signed int8 activations" per lane:
//   * AVX-512 VNNI: vpdpbusd accumulates u8 x s8 straight into int32 -- exact for every code width;
//   * AVX2, codes < 16: vpmaddubsw gives int16 pair sums <= 2*15*127 = 3810, so all 8 steps of a block
//     (<= 30480 < 32767) are summed in int16 without saturation, then one vpmaddwd widens to int32;
//   * AVX2, full 8-bit codes: the pair sums of u8 x s8 could saturate int16 (2*255*127), so the codes are
//     re-centred to c = q - 128 (one xor) and multiplied with the sign trick |c| * sign(x, c) (pairs
//     <= 2*128*127 = 32512), widened every step.
// Zero points: symmetric formats with an integral zero point z (Tiles::zint) fold it into the integer block
// sum, sum (q - z) * xq = sum q * xq - z * sum xq (one integer op, off the float pipes that vpdpbusd shares;
// for AVX2 int8 it cancels the re-centring). Otherwise (asymmetric, binary's z = 1/2) the term is applied in
// float once per group through the precomputed activation group sums:
//   y = sum_g s_g * sum_b a_b * (q . xq)_b - sum_g s_g * z_g * gsum_g.
// The int32 block sums are converted to float once per block and scaled by the activation block scale; the
// weight group scale is applied once per group. Scales are stored as fp16 (F16C converts 8 at a time), zero
// points as uint8 (offset storage: fp16 minima m, whose term is the zero-point term with the factor -m).

#ifndef LOWBIT_ISA_NS
#error "kernels_simd_impl.h needs LOWBIT_ISA_NS and LOWBIT_USE_VNNI"
#endif

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

#define LB_INLINE inline __attribute__((always_inline))

// Compile-time loop: f(std::integral_constant<int, I>) for I in [B, E), so shifts and indices are constants.
template <int B, int E, class F>
LB_INLINE void static_for(F&& f) {
  if constexpr (B < E) {
    f(std::integral_constant<int, B>{});
    static_for<B + 1, E>(f);
  }
}

LB_INLINE __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);  // memcpy, not a cast: no aliasing UB, compiles to one vpbroadcastd
  return _mm256_set1_epi32(v);
}

// Unpacked vector s of a packed vector with container width CB (see lowbit_kernels.h).
template <int CB, int S>
LB_INLINE __m256i unpack(__m256i v) {
  if constexpr (CB == 8) {
    return v;
  } else {
    const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << CB) - 1));
    if constexpr (S == 0) {
      return _mm256_and_si256(v, mask);
    } else {
      // 16-bit shift: bits of the neighbouring byte leak in at the top, the mask removes them.
      return _mm256_and_si256(_mm256_srli_epi16(v, S * CB), mask);
    }
  }
}

#if LOWBIT_USE_VNNI
struct DotVnni {
  using W = __m256i;
  using Acc = __m256i;
  static LB_INLINE Acc zero() { return _mm256_setzero_si256(); }
  static LB_INLINE W prep(__m256i u) { return u; }
  static LB_INLINE void step(Acc& acc, const W& w, __m256i x) { acc = _mm256_dpbusd_epi32(acc, w, x); }
  static LB_INLINE Acc combine(Acc a, Acc b) { return _mm256_add_epi32(a, b); }
  static LB_INLINE __m256i finish(Acc acc) { return acc; }
  static constexpr int32_t kOffset = 0;  // finish() returns sum (q - kOffset) * x
};
template <bool FullByte>
using DotFor = DotVnni;
#else
struct DotSmall {  // codes < 16: int16 accumulation within a block (bound in the file comment)
  using W = __m256i;
  using Acc = __m256i;
  static LB_INLINE Acc zero() { return _mm256_setzero_si256(); }
  static LB_INLINE W prep(__m256i u) { return u; }
  static LB_INLINE void step(Acc& acc, const W& w, __m256i x) {
    acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x));
  }
  static LB_INLINE Acc combine(Acc a, Acc b) { return _mm256_add_epi16(a, b); }
  static LB_INLINE __m256i finish(Acc acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
  static constexpr int32_t kOffset = 0;
};
struct DotByte {  // full 8-bit codes: sign trick on c = q - 128
  struct W {
    __m256i mag, sgn;
  };
  using Acc = __m256i;
  static LB_INLINE Acc zero() { return _mm256_setzero_si256(); }
  static LB_INLINE W prep(__m256i u) {
    const __m256i c = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
    return W{_mm256_abs_epi8(c), c};
  }
  static LB_INLINE void step(Acc& acc, const W& w, __m256i x) {
    const __m256i p16 = _mm256_maddubs_epi16(w.mag, _mm256_sign_epi8(x, w.sgn));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
  }
  static LB_INLINE Acc combine(Acc a, Acc b) { return _mm256_add_epi32(a, b); }
  static LB_INLINE __m256i finish(Acc acc) { return acc; }
  static constexpr int32_t kOffset = 128;  // the dot is over c = q - 128
};
template <bool FullByte>
using DotFor = std::conditional_t<FullByte, DotByte, DotSmall>;
#endif

// Register blocking of the fused (M <= kSmallMaxM) path: all M rows x NT tiles of 8 outputs x independent
// accumulators per pair (NACC, so that M*NT*NACC >= 8 chains hide the vpdpbusd latency). The larger-M panel
// GEMM has its own blocking (kernels_gemm_impl.h).
#if LOWBIT_USE_VNNI
#ifndef LOWBIT_SMALL_NT
#define LOWBIT_SMALL_NT 2
#endif
#ifndef LOWBIT_GROUP_ACC
#define LOWBIT_GROUP_ACC 1
#endif
constexpr int small_nt(int) { return LOWBIT_SMALL_NT; }
constexpr int nacc_for(int mb, int nt) { return mb * nt >= 8 ? 1 : 8 / (mb * nt); }
#else
#ifndef LOWBIT_GROUP_ACC
#define LOWBIT_GROUP_ACC 0
#endif
constexpr int small_nt(int mb) { return mb <= 3 ? 2 : 1; }
constexpr int nacc_for(int, int) { return 1; }  // int16 adds have 1-cycle latency: one chain suffices
#endif
constexpr bool kGroupAcc = LOWBIT_GROUP_ACC;
#ifndef LOWBIT_PREFETCH
#define LOWBIT_PREFETCH 1
#endif
constexpr bool kPrefetch = LOWBIT_PREFETCH;  // software prefetch of the next tiles in the fused path

LB_INLINE __m256 load_scales(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The per-group zero-point factor s * z (asymmetric), s (symmetric: z is folded into gsum) or -m (offset
// storage: s * q + m, gsum = sum x).
LB_INLINE __m256 zero_factor(const Tiles& w, __m256 s, int64_t off) {
  if (w.mins != nullptr) return _mm256_sub_ps(_mm256_setzero_ps(), load_scales(w.mins + off));
  if (w.zeros == nullptr) return s;
  int64_t z8;
  std::memcpy(&z8, w.zeros + off, 8);
  return _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(z8))));
}

LB_INLINE void store_row(float* dst, __m256 v, int64_t valid) {
  if (valid >= kTileRows) {
    _mm256_storeu_ps(dst, v);
  } else {
    alignas(32) float tmp[kTileRows];
    _mm256_store_ps(tmp, v);
    for (int64_t i = 0; i < valid; ++i) dst[i] = tmp[i];
  }
}

// Keeps v in a register as an opaque value: stops GCC from re-associating a chain of integer adds into a tree
// whose many live intermediates spill (which it otherwise does for the AVX2 int16 accumulation).
LB_INLINE void pin(__m256i& v) { asm("" : "+x"(v)); }

// One register block: rows [m0, m0+MB) of x against tiles [t0, t0+NT), whose weights start at wbase with a
// byte stride tstride per tile and container width CB. PC: per-channel (G == 1), scale applied at the end.
// All register-block loops are compile-time (static_for) so the accumulator arrays become registers.
// next (or nullptr): the NT tiles computed after these, prefetched while these are computed, an equal share
// per K-block. A decode step streams every weight once from RAM, and the hardware prefetchers restart at
// each 4 KB page (a tile pair at K = 576 spans ~4.6 KB), so without this the GEMV waits on memory latency.
template <class D, int CB, int MB, int NT, int NACC, bool PC>
void tile_kernel(const Tiles& w, const Acts& x, const uint8_t* wbase, int64_t tstride, int64_t t0,
                 int64_t m0, const float* bias, float* y, const uint8_t* next = nullptr) {
  const int64_t KB = w.KB, G = w.G, gb = w.gb, ldx = x.ldx;
  __m256 out[MB][NT];
  static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
    static_for<0, NT>([&](auto t) __attribute__((always_inline)) { out[m][t] = _mm256_setzero_ps(); });
  });
  const int8_t* xrow = x.xq + m0 * ldx;

  for (int64_t g = 0; g < G; ++g) {
    __m256 gscale[NT];
    if constexpr (!PC) {
      static_for<0, NT>([&](auto t) __attribute__((always_inline)) {
        gscale[t] = load_scales(w.scales + ((t0 + t) * G + g) * kTileRows);
      });
    }
    // Grouped weights: block results are summed per group with the activation scale only, and the
    // group scale is applied once per group (one FMA per block instead of a multiply and an FMA).
    __m256 gacc[MB][NT];
    if constexpr (!PC && kGroupAcc) {
      static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
        static_for<0, NT>([&](auto t) __attribute__((always_inline)) { gacc[m][t] = _mm256_setzero_ps(); });
      });
    }
    const int64_t kb1 = std::min(KB, (g + 1) * gb);
    for (int64_t kb = g * gb; kb < kb1; ++kb) {
      typename D::Acc acc[MB][NT][NACC];
      static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
        static_for<0, NT>([&](auto t) __attribute__((always_inline)) {
          static_for<0, NACC>([&](auto i) __attribute__((always_inline)) { acc[m][t][i] = D::zero(); });
        });
      });
      constexpr int kLoads = CB;  // vector loads (groups of unpacked vectors) per block
      if (next != nullptr) {
        constexpr int kShare = NT * kBlock * CB;  // bytes of the next tiles per K-block
        const uint8_t* pf = next + kb * kShare;
        static_for<0, (kShare + 63) / 64>([&](auto l) __attribute__((always_inline)) {
          _mm_prefetch(reinterpret_cast<const char*>(pf + 64 * decltype(l)::value), _MM_HINT_T0);
        });
      }
      const uint8_t* wb = wbase + kb * kBlock * CB;
      const int8_t* xb = xrow + kb * kBlock;
      static_for<0, kLoads>([&](auto pc) __attribute__((always_inline)) {
        constexpr int p = decltype(pc)::value;
        __m256i v[NT];
        static_for<0, NT>([&](auto t) __attribute__((always_inline)) {
          v[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + t * tstride + 32 * p));
        });
        static_for<0, 8 / kLoads>([&](auto sc) __attribute__((always_inline)) {
          constexpr int s = decltype(sc)::value;
          constexpr int j = p + kLoads * s;
          typename D::W u[NT];
          static_for<0, NT>([&](auto t) __attribute__((always_inline)) { u[t] = D::prep(unpack<CB, s>(v[t])); });
          static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
            const __m256i bx = bcast4(xb + m * ldx + 4 * j);
            static_for<0, NT>([&](auto t) __attribute__((always_inline)) {
              D::step(acc[m][t][j % NACC], u[t], bx);
              if constexpr (!LOWBIT_USE_VNNI) pin(acc[m][t][j % NACC]);  // vpdpbusd chains do not re-associate
            });
          });
        });
      });
      static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
        const __m256 ab = _mm256_set1_ps(x.a[(m0 + m) * KB + kb]);
        // finish() gives sum (q - kOffset) * xq; this turns it into sum (q - zint) * xq.
        const int32_t adj = (D::kOffset - w.zint) * x.isum[(m0 + m) * KB + kb];
        static_for<0, NT>([&](auto t) __attribute__((always_inline)) {
          typename D::Acc c = acc[m][t][0];
          static_for<1, NACC>([&](auto i) __attribute__((always_inline)) { c = D::combine(c, acc[m][t][i]); });
          __m256i ci = D::finish(c);
          if (adj != 0) ci = _mm256_add_epi32(ci, _mm256_set1_epi32(adj));
          const __m256 f = _mm256_cvtepi32_ps(ci);
          if constexpr (PC) {
            out[m][t] = _mm256_fmadd_ps(f, ab, out[m][t]);
          } else if constexpr (kGroupAcc) {
            gacc[m][t] = _mm256_fmadd_ps(f, ab, gacc[m][t]);
          } else {
            out[m][t] = _mm256_fmadd_ps(f, _mm256_mul_ps(gscale[t], ab), out[m][t]);
          }
        });
      });
    }
    if constexpr (!PC && kGroupAcc) {
      static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
        static_for<0, NT>([&](auto t) __attribute__((always_inline)) {
          out[m][t] = _mm256_fmadd_ps(gacc[m][t], gscale[t], out[m][t]);
        });
      });
    }
    if (!PC && w.zint == 0) {
      // Float zero-point term of this group, here rather than after the K loop: the dependent FMA chain
      // then overlaps the dot-product work instead of running as a G-long serial chain per output vector.
      static_for<0, NT>([&](auto t) __attribute__((always_inline)) {
        const __m256 zsv = zero_factor(w, gscale[t], ((t0 + t) * G + g) * kTileRows);
        static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
          out[m][t] = _mm256_fnmadd_ps(zsv, _mm256_set1_ps(x.gsum[(m0 + m) * G + g]), out[m][t]);
        });
      });
    }
  }

  static_for<0, NT>([&](auto t) __attribute__((always_inline)) {
    const int64_t n0 = (t0 + t) * kTileRows;
    const int64_t valid = std::min<int64_t>(kTileRows, w.N - n0);
    __m256 bv = _mm256_setzero_ps();
    if (bias != nullptr) {
      alignas(32) float tmp[kTileRows] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; i < valid; ++i) tmp[i] = bias[n0 + i];
      bv = _mm256_load_ps(tmp);
    }
    static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
      __m256 o = out[m][t];
      if constexpr (PC) {  // G == 1: scale and zero-point term once
        const __m256 s = load_scales(w.scales + (t0 + t) * kTileRows);
        o = _mm256_mul_ps(o, s);
        if (w.zint == 0) {
          o = _mm256_fnmadd_ps(zero_factor(w, s, (t0 + t) * kTileRows), _mm256_set1_ps(x.gsum[m0 + m]), o);
        }
      }
      o = _mm256_add_ps(o, bv);
      if (w.clamp) o = _mm256_min_ps(_mm256_max_ps(o, _mm256_set1_ps(w.lo)), _mm256_set1_ps(w.hi));
      store_row(y + (m0 + m) * w.N + n0, o, valid);
    });
  });
}

template <class D, int CB, int MB, bool PC>
void small_rows(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1) {
  constexpr int NT = small_nt(MB);
  constexpr int NACC = nacc_for(MB, NT);
  const int64_t tstride = w.KB * kBlock * CB;
  int64_t t = t0;
  for (; t + NT <= t1; t += NT) {
    tile_kernel<D, CB, MB, NT, NACC, PC>(w, x, w.w + t * tstride, tstride, t, 0, bias, y,
                                         kPrefetch && t + 2 * NT <= t1 ? w.w + (t + NT) * tstride : nullptr);
  }
  for (; t < t1; ++t) {
    tile_kernel<D, CB, MB, 1, nacc_for(MB, 1), PC>(w, x, w.w + t * tstride, tstride, t, 0, bias, y);
  }
}

template <class D, int CB, bool PC>
void small_impl(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1) {
  switch (x.M) {
    case 1: small_rows<D, CB, 1, PC>(w, x, bias, y, t0, t1); break;
    case 2: small_rows<D, CB, 2, PC>(w, x, bias, y, t0, t1); break;
    case 3: small_rows<D, CB, 3, PC>(w, x, bias, y, t0, t1); break;
    default: small_rows<D, CB, 4, PC>(w, x, bias, y, t0, t1); break;
  }
  static_assert(kSmallMaxM == 4, "small_impl handles M = 1..4");
}

// Runtime (cb, full_byte, per-channel) -> template instantiation.
template <bool PC>
void dispatch_small_pc(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1) {
  switch (w.cb) {
    case 1: small_impl<DotFor<false>, 1, PC>(w, x, bias, y, t0, t1); break;
    case 2: small_impl<DotFor<false>, 2, PC>(w, x, bias, y, t0, t1); break;
    case 4: small_impl<DotFor<false>, 4, PC>(w, x, bias, y, t0, t1); break;
    default:
      if (w.full_byte) {
        small_impl<DotFor<true>, 8, PC>(w, x, bias, y, t0, t1);
      } else {
        small_impl<DotFor<false>, 8, PC>(w, x, bias, y, t0, t1);
      }
  }
}

void gemm_small(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1) {
  if (w.G == 1) {
    dispatch_small_pc<true>(w, x, bias, y, t0, t1);
  } else {
    dispatch_small_pc<false>(w, x, bias, y, t0, t1);
  }
}

// Per-row symmetric int8 quantization, one scale per `ab` consecutive 32-blocks (an activation block). Must
// match kernels_scalar.cpp bit for bit: a = amax / 127, inv = 127 / amax, q = round-half-even(x * inv) -- all
// single IEEE float operations. a is stored once per 32-block (repeated across the activation block).
void quantize(const float* x, int64_t ldx, int64_t K, int64_t KB, int64_t ab, int64_t m0, int64_t m1, int8_t* xq,
              int64_t ldq, int64_t rg, float* a, int32_t* isum, bool u8, const ActStatic* st) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(u8 ? 0x80 : 0));  // xq + 128 as a byte: xq ^ 0x80
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    // The 32 inputs of block kb (the last, partial one zero padded by masked loads: a copy through a stack
    // buffer cost ~20 ns a row, most of a 16-input 1x1 conv's quantization at 48 x 48 pixels).
    auto load_block = [&](int64_t kb, __m256 v[4]) __attribute__((always_inline)) {
      const float* src = xr + kb * kBlock;
      const int64_t left = K - kb * kBlock;
      for (int i = 0; i < 4; ++i) {
        const int64_t n = left - 8 * i;
        v[i] = n >= 8 ? _mm256_loadu_ps(src + 8 * i)
               : n <= 0 ? _mm256_setzero_ps()
                        : _mm256_maskload_ps(src + 8 * i, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      }
    };
    for (int64_t kb0 = 0; kb0 < KB; kb0 += ab) {
      const int64_t kb1 = std::min(KB, kb0 + ab);
      __m256 mx = _mm256_setzero_ps();
      for (int64_t kb = kb0; st == nullptr && kb < kb1; ++kb) {  // static scale: no maximum pass
        __m256 v[4];
        load_block(kb, v);
        mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                                             _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask))));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      const float inv = st != nullptr ? st->inv : amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m256 vinv = _mm256_set1_ps(inv);
      // Dynamic scales never leave [-127, 127]; a static one can, so it clamps in float (before the int
      // conversion, which would turn an overflow into INT_MIN).
      const __m256 vlo = _mm256_set1_ps(st != nullptr ? st->lo : -127.0f);
      const __m256 vhi = _mm256_set1_ps(st != nullptr ? st->hi : 127.0f);
      const float scale = st != nullptr ? st->scale : amax / 127.0f;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        __m256 v[4];
        load_block(kb, v);
        a[m * KB + kb] = scale;
        __m256i q[4];
        for (int i = 0; i < 4; ++i) {
          q[i] = _mm256_cvtps_epi32(_mm256_min_ps(vhi, _mm256_max_ps(vlo, _mm256_mul_ps(v[i], vinv))));  // nearest-even
        }
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        isum[m * KB + kb] = _mm_cvtsi128_si32(s4);
        // packs work per 128-bit lane; the dword permutation restores k order.
        const __m256i p16a = _mm256_packs_epi32(q[0], q[1]);
        const __m256i p16b = _mm256_packs_epi32(q[2], q[3]);
        const __m256i p8 = _mm256_xor_si256(_mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), perm), flip);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + (m / rg) * ldq + (kb * rg + m % rg) * kBlock), p8);
      }
    }
  }
}

#undef LB_INLINE

}  // namespace
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
