// Register-blocked GEMM for the compute-bound regime (M > kSmallMaxM), written once and compiled per ISA.
//
// Included after kernels_simd_impl.h (same TU, same namespace, its helpers) by kernels_avx2.cpp and
// kernels_avx512vnni.cpp. The work unit of gemm_large is (a group of kGemmPairs tile pairs = 16 output
// columns each) x (at most kLargeMChunk rows). For each K-chunk (about LOWBIT_GEMM_CHUNK_BLOCKS 32-blocks,
// whole weight groups):
//   1. the chunk's weights are unpacked to one byte per code into a panel in scratch (<= 16 KB: it stays in
//      L1 for all rows), laid out [kb][j][pair][64 bytes]: the 32 bytes of unpacked vector j of tile 2p, then
//      those of tile 2p + 1, so a zmm load (AVX-512) or two ymm loads (AVX2) give 16 columns x 4 inputs, and
//      the pairs of one step are contiguous (separate per-pair streams a multiple of 4 KB apart would share L1
//      sets); the next chunk's packed bytes are prefetched to L2 meanwhile;
//   2. for each block of MB rows, a micro-kernel keeps MB x CV int32 (AVX2 codes < 16: int16 within a block)
//      vector accumulators in registers over up to 8 K-blocks that share an activation scale (and, grouped, a
//      weight group), streaming the panel and broadcasting 4 activations at a time, then converts them once,
//      times the activation scale (and the weight group scale), into a float buffer [rows][cols] in scratch.
//      The activations arrive in row groups of MB rows (Acts::rg, written so by quantize): a row block reads
//      one contiguous stream;
//   3. the step after a row's last K-block writes y directly (per-channel weights: the scale and zero-point
//      term; bias; clamp), so the buffer is never read back in a separate pass. Each case of that float step
//      (first / middle / last blocks of a row, group end with a zero-point term) is its own compiled copy:
//      tests per accumulator there made GCC spill pointers and cost more than the conversions.
// Zero points: grouped symmetric formats with int32 sums start the integer sums at (kOffset - zint) * sum xq
// (exact, no float work per group); per-channel weights apply the term once in the write-out through the
// activation group sums (Acts::gsum), as do asymmetric formats and binary (non-integral z), per group.
// ROW (AVX-512 VNNI, one activation scale per row, grouped symmetric weights): the activations come unsigned
// (Acts::u8, xq + 128) and the panel holds signed q - zint, so vpdpbusd takes (xq + 128) x (q - zint); the
// extra 128 * sum (q - zint) is a constant per output column, accumulated while unpacking (Epilogue::corr) and
// removed in the write-out, and the accumulators start at zero (a free idiom) instead of a per-row integer.
// The AVX2 int8 product is over c = q - 128 (D::kOffset, sign trick): the zero-point factor absorbs it.

#ifndef LOWBIT_ISA_NS
#error "kernels_gemm_impl.h needs LOWBIT_ISA_NS (include it after kernels_simd_impl.h)"
#endif

namespace lowbit {
namespace LOWBIT_ISA_NS {
namespace {

#define LB_INLINE inline __attribute__((always_inline))

constexpr int kPairBytes = 64;  // one unpacked vector j of a tile pair: 16 rows x 4 codes

#if LOWBIT_USE_VNNI
// One zmm = 16 int32 / float lanes = a whole tile pair.
struct GemmVnni {
  using I = __m512i;
  using F = __m512;
  using W = __m512i;
  static constexpr int kVecTiles = 2;  // tiles per vector
  static constexpr int kVecs = 1;      // panel copies per code (DotByte keeps two)
  static constexpr int32_t kOffset = 0;
  static constexpr bool kInt16 = false;  // step() accumulates int32 directly
  static LB_INLINE I zero() { return _mm512_setzero_si512(); }
  static LB_INLINE I start(int32_t z) { return _mm512_set1_epi32(z); }
  static LB_INLINE W load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static LB_INLINE I bcast(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static LB_INLINE void step(I& acc, const W& w, I x) { acc = _mm512_dpbusd_epi32(acc, w, x); }
  // Unsigned activations (Acts::u8) times signed weights q - zint (unpack_panel, ROW).
  static LB_INLINE void step_u8x(I& acc, const W& w, I x) { acc = _mm512_dpbusd_epi32(acc, x, w); }
  static LB_INLINE void pin(I&) {}
  static LB_INLINE F to_float(I acc) { return _mm512_cvtepi32_ps(acc); }
  static LB_INLINE I widen_add(I acc, I) { return acc; }
  // Unpacked vector u of tile half h into the panel vector at p.
  static LB_INLINE void store_half(uint8_t* p, int h, __m256i u) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 32 * h), u);
  }
  static LB_INLINE F fzero() { return _mm512_setzero_ps(); }
  static LB_INLINE F fset1(float v) { return _mm512_set1_ps(v); }
  static LB_INLINE F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static LB_INLINE F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static LB_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static LB_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static LB_INLINE F clamp(F v, float lo, float hi) {
    return _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
  }
  static LB_INLINE F fload(const float* p) { return _mm512_loadu_ps(p); }
  static LB_INLINE void fstore(float* p, F v) { _mm512_storeu_ps(p, v); }
  static LB_INLINE F from_halves(__m256 lo, __m256 hi) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
  }
  static LB_INLINE void store_cols(float* dst, F v, int64_t valid) {
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>(valid >= 16 ? 0xffff : (1u << valid) - 1u), v);
  }
};
template <bool FullByte>
using GemmDot = GemmVnni;
// 6 rows x 3 vectors (48 columns): 18 int32 accumulators + 3 weights + 1 broadcast in the inner loop (of 32
// zmm). Measured on Sapphire Rapids (M = 197, K = 4096, thread CPU time): 4x3 14.0 ms, 8x2 13.8, 6x3 12.7,
// 8x3 14.9, 12x2 15.4; with the float sums in the row buffer 6x4 and 8x3 were no faster than 6x3.
#ifndef LOWBIT_GEMM_MB
#define LOWBIT_GEMM_MB 6
#endif
#ifndef LOWBIT_GEMM_PAIRS
#define LOWBIT_GEMM_PAIRS 3
#endif
#else
// One ymm = 8 lanes = one tile; a pair is two vectors.
struct GemmAvx2Base {
  using I = __m256i;
  using F = __m256;
  static constexpr int kVecTiles = 1;
  static LB_INLINE I zero() { return _mm256_setzero_si256(); }
  static LB_INLINE I start(int32_t z) { return _mm256_set1_epi32(z); }
  static LB_INLINE I bcast(const int8_t* p) { return bcast4(p); }
  static LB_INLINE void pin(I& v) { asm("" : "+x"(v)); }  // see kernels_simd_impl.h: pin
  static LB_INLINE F fzero() { return _mm256_setzero_ps(); }
  static LB_INLINE F fset1(float v) { return _mm256_set1_ps(v); }
  static LB_INLINE F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static LB_INLINE F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static LB_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static LB_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static LB_INLINE F clamp(F v, float lo, float hi) {
    return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
  }
  static LB_INLINE F fload(const float* p) { return _mm256_loadu_ps(p); }
  static LB_INLINE void fstore(float* p, F v) { _mm256_storeu_ps(p, v); }
  static LB_INLINE F from_halves(__m256 lo, __m256) { return lo; }
  static LB_INLINE void store_cols(float* dst, F v, int64_t valid) { store_row(dst, v, valid); }
};
struct GemmSmall : GemmAvx2Base {  // codes < 16: int16 sums within a block (bound in kernels_simd_impl.h)
  using W = __m256i;
  static constexpr int kVecs = 1;
  static constexpr int32_t kOffset = 0;
  static constexpr bool kInt16 = true;  // int16 step sums within one block, widened into int32 per block
  static LB_INLINE W load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static LB_INLINE void step(I& acc, const W& w, I x) { acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x)); }
  static LB_INLINE F to_float(I acc) { return _mm256_cvtepi32_ps(acc); }
  static LB_INLINE I widen_add(I acc, I blk) { return _mm256_add_epi32(acc, _mm256_madd_epi16(blk, _mm256_set1_epi16(1))); }
  static LB_INLINE void store_half(uint8_t* p, int h, __m256i u) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 32 * h), u);
  }
};
struct GemmByte : GemmAvx2Base {  // full 8-bit codes: sign trick on c = q - 128, |c| and c both in the panel
  struct W {
    __m256i mag, sgn;
  };
  static constexpr int kVecs = 2;  // [|c| 64 bytes][c 64 bytes] per pair vector
  static constexpr int32_t kOffset = 128;
  static constexpr bool kInt16 = false;
  static LB_INLINE W load(const uint8_t* p) {
    return W{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kPairBytes))};
  }
  static LB_INLINE void step(I& acc, const W& w, I x) {
    const __m256i p16 = _mm256_maddubs_epi16(w.mag, _mm256_sign_epi8(x, w.sgn));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
  }
  static LB_INLINE F to_float(I acc) { return _mm256_cvtepi32_ps(acc); }
  static LB_INLINE I widen_add(I acc, I) { return acc; }
  static LB_INLINE void store_half(uint8_t* p, int h, __m256i u) {
    const __m256i c = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 32 * h), _mm256_abs_epi8(c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + kPairBytes + 32 * h), c);
  }
};
template <bool FullByte>
using GemmDot = std::conditional_t<FullByte, GemmByte, GemmSmall>;
// 4 rows x 2 vectors (one pair): 8 int32 accumulators (+ 8 int16 block sums for codes < 16, the int32 ones
// then partly on the stack: touched once per block) + 2 weights + broadcast + ones of 16 ymm. Measured on
// Sapphire Rapids (M = 197, K = N = 4096, thread CPU time, int4 g128 / g32): 3x2 35.3 / 43.8 ms, 4x2 34.3 / 41.6.
#ifndef LOWBIT_GEMM_MB
#define LOWBIT_GEMM_MB 4
#endif
#ifndef LOWBIT_GEMM_PAIRS
#define LOWBIT_GEMM_PAIRS 1
#endif
#endif

constexpr int kGemmMB = LOWBIT_GEMM_MB;
constexpr int kGemmPairs = LOWBIT_GEMM_PAIRS;
static_assert(kLargeMChunk % kGemmMB == 0, "row chunks hold whole row blocks");
#ifndef LOWBIT_GEMM_CHUNK_BLOCKS
#define LOWBIT_GEMM_CHUNK_BLOCKS 8
#endif

template <class D>
constexpr int kLanes = 8 * D::kVecTiles;
template <class D>
constexpr int kVecPerPair = 2 / D::kVecTiles;
constexpr int kMaxCV = kGemmPairs * 2;                   // output vectors of a panel (ymm; zmm use half)
constexpr int64_t kRowFloats = int64_t{kGemmPairs} * 16;  // columns of the float buffer
constexpr int kChunkGroups = LOWBIT_GEMM_CHUNK_BLOCKS;    // weight groups in a K-chunk, at most

// Blocks of a K-chunk: whole weight groups, about LOWBIT_GEMM_CHUNK_BLOCKS (so at most kChunkGroups groups).
LB_INLINE int64_t chunk_blocks(int64_t gb, bool pc) {
  return pc ? LOWBIT_GEMM_CHUNK_BLOCKS : gb * std::max<int64_t>(1, LOWBIT_GEMM_CHUNK_BLOCKS / gb);
}

// Panel bytes of one K-chunk (<= max(chunk, KB) blocks) for kGemmPairs pairs, room for the larger (AVX2 int8)
// form. Scratch: the panel, the chunk's group scales and zero-point factors [kChunkGroups][kMaxCV][8 or 16]
// floats, then the float buffer [kLargeMChunk, kRowFloats].
constexpr int64_t gemm_panel_bytes(int64_t KB) {
  return (int64_t{kGemmPairs} * std::max<int64_t>(KB, LOWBIT_GEMM_CHUNK_BLOCKS) * 8 * kPairBytes * 2 + 63) / 64 * 64;
}
constexpr int64_t kGroupTableFloats = int64_t{kChunkGroups} * kRowFloats;

// A per-tile [T, G, 8] fp16 table (the scales, or offset storage's minima) as one vector starting at tile t
// (2 tiles for zmm; a tile past the end reads as 0).
template <class D>
LB_INLINE typename D::F vec_half_table(const Tiles& w, const uint16_t* table, int64_t t, int64_t g) {
  const __m256 lo = load_scales(table + (t * w.G + g) * kTileRows);
  if constexpr (D::kVecTiles == 2) {
    const __m256 hi = t + 1 < w.T ? load_scales(table + ((t + 1) * w.G + g) * kTileRows) : _mm256_setzero_ps();
    return D::from_halves(lo, hi);
  } else {
    return D::from_halves(lo, lo);
  }
}

template <class D>
LB_INLINE typename D::F vec_scales(const Tiles& w, int64_t t, int64_t g) {
  return vec_half_table<D>(w, w.scales, t, g);
}

LB_INLINE __m256 tile_zeros(const Tiles& w, int64_t t, int64_t g, float minus) {
  int64_t z8;
  std::memcpy(&z8, w.zeros + (t * w.G + g) * kTileRows, 8);
  return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(z8))), _mm256_set1_ps(minus));
}

// The zero-point factor f with y -= f * gsum: s * (z - kOffset) (zeros given: gsum = sum a*isum),
// s * (1 - kOffset / zc) (symmetric: gsum already carries the constant zero point zc), or -(m + kOffset * s)
// (offset storage, s * q + m = s * (q - kOffset) + (m + kOffset * s); gsum = sum a*isum).
template <class D>
LB_INLINE typename D::F vec_zero_factor(const Tiles& w, typename D::F s, int64_t t, int64_t g) {
  if (w.mins != nullptr) {
    const typename D::F m = vec_half_table<D>(w, w.mins, t, g);
    return D::fnma(D::fset1(static_cast<float>(D::kOffset)), s, D::mul(m, D::fset1(-1.0f)));
  }
  if (w.zeros == nullptr) {
    return D::mul(s, D::fset1(1.0f - static_cast<float>(D::kOffset) / w.zconst));
  }
  const float off = static_cast<float>(D::kOffset);
  const __m256 lo = tile_zeros(w, t, g, off);
  if constexpr (D::kVecTiles == 2) {
    const __m256 hi = t + 1 < w.T ? tile_zeros(w, t + 1, g, off) : _mm256_setzero_ps();
    return D::mul(s, D::from_halves(lo, hi));
  } else {
    return D::mul(s, D::from_halves(lo, lo));
  }
}

// Per output vector of a panel: what the write-out applies (bias; per-channel scale and zero-point factor),
// and where (first column, valid columns).
struct Epilogue {
  alignas(64) float bias[kGemmPairs * 2][16];
  alignas(64) float scale[kGemmPairs * 2][16];
  alignas(64) float zf[kGemmPairs * 2][16];
  alignas(64) float corr[kGemmPairs * 2][16];  // ROW: -128 * sum_g s_g * sum_{k in g} (q - zint), see unpack_panel
  int64_t n0[kGemmPairs * 2], valid[kGemmPairs * 2];
};

// What a row block reads and writes besides the tiles and activations: the chunk panel, its group scales and
// zero-point factors, the float buffer at the block's first row (row stride kRowFloats), the panel's
// epilogue and y.
struct BlockIO {
  const uint8_t* panel;
  const float* gsc;
  const float* gzf;
  float* ob;
  const Epilogue* ep;
  float* y;
};

// Rows [m0, m0+MB) x CV vectors of the chunk panel (K-blocks [c0, c1)); partial sums added into io.ob, and
// after the row's last K-block written to y through the epilogue (per-channel scale and zero-point term, or the
// row's activation scale; bias; clamp), so the buffer is never re-read for the write-out. AB:
// K-blocks whose integer dots are summed before one float conversion (they share an activation scale and,
// grouped, a weight group). ROW (grouped weights, one activation scale per row): the sums are scaled by the
// group scale alone; the write-out applies the row's activation scale.
template <class D, int MB, int CV, bool PC, int AB, bool ROW>
void gemm_block(const Tiles& w, const Acts& x, const BlockIO& io, int64_t m0, int64_t c0, int64_t c1) {
  using F = typename D::F;
  constexpr int L = kLanes<D>, VPP = kVecPerPair<D>;
  constexpr int64_t qbytes = kPairBytes * D::kVecs;       // panel bytes of one pair per unpacked vector j
  constexpr int64_t jbytes = qbytes * kGemmPairs;         // ... of all pairs
  const int64_t KB = w.KB, G = w.G;
  const uint8_t* panel = io.panel;
  const float *gsc = io.gsc, *gzf = io.gzf;
  const Epilogue& ep = *io.ep;
  float* const ob = io.ob;
  float* const y = io.y;
  const float* const xa = x.a;
  // Symmetric formats with an integral zero point (and int32 sums): sum (q - zint) * xq in the integer sums,
  // starting them at (kOffset - zint) * sum xq; otherwise the zero-point term goes through gsum in float.
  const bool zfold = !PC && !ROW && w.zint != 0;
  // The activations come in row groups of kGemmMB rows (Acts::rg), m0 is a group start: block kb of row
  // m0 + m is at xrow + (kb * kGemmMB + m) * 32, one contiguous stream per row block.
  const int8_t* xrow = x.xq + (m0 / kGemmMB) * x.ldx;
  // NB blocks from a0 (NB = AB, or 1 for a tail): their integer dot products summed (one activation scale:
  // AB divides the activation block, whose scale `a` repeats per block), then scaled by the activation and
  // (grouped weights) the group scale into ob. The block loop is compile-time so that the accumulators stay
  // in fixed registers (a runtime loop made GCC rotate and spill them).
  auto run = [&](auto nbc, int64_t a0) __attribute__((always_inline)) {
    constexpr int NB = decltype(nbc)::value;
    typename D::I acc[MB][CV];
    static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
      int32_t z = 0;
      if (zfold) {
        const int32_t* is = x.isum + (m0 + m) * KB + a0;
        static_for<0, NB>([&](auto b) __attribute__((always_inline)) { z += is[decltype(b)::value]; });
        z *= D::kOffset - w.zint;
      }
      const typename D::I z0 = D::start(z);
      static_for<0, CV>([&](auto v) __attribute__((always_inline)) { acc[m][v] = z0; });
    });
    static_for<0, NB>([&](auto bc) __attribute__((always_inline)) {
      const int64_t kb = a0 + decltype(bc)::value;
      const uint8_t* wb = panel + (kb - c0) * 8 * jbytes;
      const int8_t* xb = xrow + kb * kGemmMB * kBlock;
      // int16 step sums (D::kInt16) live for one block, then widen into the int32 sums.
      typename D::I blk[MB][CV];
      if constexpr (D::kInt16) {
        static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
          static_for<0, CV>([&](auto v) __attribute__((always_inline)) { blk[m][v] = D::zero(); });
        });
      }
      auto& sums = [&]() -> auto& { if constexpr (D::kInt16) return blk; else return acc; }();
      static_for<0, 8>([&](auto jc) __attribute__((always_inline)) {
        constexpr int j = decltype(jc)::value;
        typename D::W wv[CV];
        static_for<0, CV>([&](auto vc) __attribute__((always_inline)) {
          constexpr int v = decltype(vc)::value;
          wv[v] = D::load(wb + j * jbytes + (v / VPP) * qbytes + (v % VPP) * 32);
        });
        static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
          const typename D::I bx = D::bcast(xb + m * kBlock + 4 * j);
          static_for<0, CV>([&](auto v) __attribute__((always_inline)) {
            if constexpr (ROW) {
              D::step_u8x(sums[m][v], wv[v], bx);
            } else {
              D::step(sums[m][v], wv[v], bx);
            }
            D::pin(sums[m][v]);
          });
        });
      });
      if constexpr (D::kInt16) {
        static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
          static_for<0, CV>([&](auto v) __attribute__((always_inline)) { acc[m][v] = D::widen_add(acc[m][v], blk[m][v]); });
        });
      }
    });
    const int64_t a1 = a0 + NB, g = a0 / w.gb, gl = g - c0 / w.gb;
    // The float step, one compiled copy per case so that no test runs per accumulator: STAGE bit 1 (the row's
    // first K-blocks) starts ob instead of adding into it, bit 2 (its last) writes y through the epilogue
    // instead of ob; Z: the end of group g with its gsum term (grouped formats without a folded zero point).
    auto convert = [&](auto stage_c, auto z_c) __attribute__((always_inline)) {
      constexpr int STAGE = decltype(stage_c)::value;
      constexpr bool Z = decltype(z_c)::value;
      // The block's group scales and zero-point factors, and the rows' activation scales / group sums as
      // running pointers, loaded before the row loop: per-row index arithmetic here made GCC spill its pointers
      // (to the stack and xmm registers), and that scalar work cost more than the float conversions (perf, a
      // 4-bit g32 prefill on Zen 5).
      F gvv[CV], gzv[CV];
      static_for<0, CV>([&](auto v) __attribute__((always_inline)) {
        if constexpr (!PC) gvv[v] = D::fload(gsc + gl * kRowFloats + v * L);
        if constexpr (Z) gzv[v] = D::fload(gzf + gl * kRowFloats + v * L);
      });
      const float* xam = xa + m0 * KB + a0;
      const float* gsm = Z ? x.gsum + m0 * G + g : nullptr;
      static_for<0, MB>([&](auto m) __attribute__((always_inline)) {
        const int64_t row = m0 + m;
        const F am = D::fset1(ROW ? 0.0f : *xam);
        const F gs = D::fset1(Z ? *gsm : 0.0f);
        xam += KB;
        if constexpr (Z) gsm += G;
        static_for<0, CV>([&](auto v) __attribute__((always_inline)) {
          float* o = ob + m * kRowFloats + v * L;
          const F c = PC ? am : ROW ? gvv[v] : D::mul(am, gvv[v]);
          const F part = D::to_float(acc[m][v]);
          F r = (STAGE & 1) ? D::mul(part, c) : D::fma(part, c, D::fload(o));
          if constexpr (Z) r = D::fnma(gzv[v], gs, r);
          if constexpr (!(STAGE & 2)) {
            D::fstore(o, r);
          } else if (ep.valid[v] > 0) {
            if constexpr (PC) r = D::fnma(D::fload(ep.zf[v]), D::fset1(x.gsum[row]), D::mul(r, D::fload(ep.scale[v])));
            if constexpr (ROW) r = D::mul(D::add(r, D::fload(ep.corr[v])), D::fset1(xa[row * KB]));
            r = D::add(r, D::fload(ep.bias[v]));
            if (w.clamp) r = D::clamp(r, w.lo, w.hi);
            D::store_cols(y + row * w.N + ep.n0[v], r, ep.valid[v]);
          }
        });
      });
    };
    auto stages = [&](auto z_c) __attribute__((always_inline)) {
      if (a1 == KB && a0 == 0) {
        convert(std::integral_constant<int, 3>{}, z_c);
      } else if (a1 == KB) {
        convert(std::integral_constant<int, 2>{}, z_c);
      } else if (a0 == 0) {
        convert(std::integral_constant<int, 1>{}, z_c);
      } else {
        convert(std::integral_constant<int, 0>{}, z_c);
      }
    };
    if constexpr (!PC && !ROW) {
      if (!zfold && (a1 % w.gb == 0 || a1 == KB)) {
        stages(std::true_type{});
        return;
      }
    }
    stages(std::false_type{});
  };
  int64_t kb = c0;
  for (; kb + AB <= c1; kb += AB) run(std::integral_constant<int, AB>{}, kb);
  for (; kb < c1; ++kb) run(std::integral_constant<int, 1>{}, kb);  // a partial last activation block
}

// Runtime (rows mb <= MBV, vectors cv <= CVV) -> instantiation.
template <class D, bool PC, bool ROW, int MBV, int CVV>
void gemm_dispatch(const Tiles& w, const Acts& x, const BlockIO& io, int64_t m0, int64_t mb, int64_t cv, int64_t c0,
                   int64_t c1) {
  if (cv < CVV) {
    if constexpr (CVV > kVecPerPair<D>) {
      gemm_dispatch<D, PC, ROW, MBV, CVV - kVecPerPair<D>>(w, x, io, m0, mb, cv, c0, c1);
    }
  } else if (mb < MBV) {
    if constexpr (MBV > 1) gemm_dispatch<D, PC, ROW, MBV - 1, CVV>(w, x, io, m0, mb, cv, c0, c1);
  } else if constexpr (MBV == kGemmMB && CVV == kGemmPairs * kVecPerPair<D>) {
    // Full register blocks sum up to 8 blocks per float conversion where the activation blocks (chunks start at
    // multiples of 8 blocks; one scale per row: any run) and the weight groups allow it. (Only these: each
    // variant is a large unrolled body, and the edge blocks are a small share of the work.)
    const auto fits = [&](int64_t nb) { return (x.ab >= w.KB || x.ab % nb == 0) && (PC || w.gb % nb == 0); };
    if (fits(8)) {
      gemm_block<D, MBV, CVV, PC, 8, ROW>(w, x, io, m0, c0, c1);
    } else if (fits(4)) {
      gemm_block<D, MBV, CVV, PC, 4, ROW>(w, x, io, m0, c0, c1);
    } else if (fits(2)) {
      gemm_block<D, MBV, CVV, PC, 2, ROW>(w, x, io, m0, c0, c1);
    } else {
      gemm_block<D, MBV, CVV, PC, 1, ROW>(w, x, io, m0, c0, c1);
    }
  } else {
    gemm_block<D, MBV, CVV, PC, 1, ROW>(w, x, io, m0, c0, c1);
  }
}

// Pairs [p0, p0 + np) of the tiles (container width CB), K-blocks [c0, c1) -> one byte per code in the
// chunk panel layout. ROW (VNNI, unsigned activations xq + 128): the codes are stored signed, q - zint, so that
//   sum_k (xq + 128) (q - zint) = sum_k xq (q - zint) + 128 * cs,  cs = sum_k (q - zint) over the group,
// and the second term, scaled by the group scales, is a constant per output column: added into corr (the
// panel's Epilogue::corr, [np][16]) here, once per weight group, instead of a zero-point start per row.
template <class D, int CB, bool ROW>
void unpack_panel(const Tiles& w, int64_t p0, int64_t np, int64_t c0, int64_t c1, uint8_t* panel, float* corr) {
  constexpr int64_t qbytes = kPairBytes * D::kVecs, jbytes = qbytes * kGemmPairs;
  const int64_t KB = w.KB;
  for (int64_t q = 0; q < np; ++q) {
    for (int h = 0; h < 2; ++h) {
      const int64_t t = 2 * (p0 + q) + h;
      uint8_t* dq = panel + q * qbytes;
      if (t >= w.T) {  // odd tile count: the missing half multiplies as zeros, its outputs are never stored
        for (int64_t i = 0; i < (c1 - c0) * 8; ++i) D::store_half(dq + i * jbytes, h, _mm256_setzero_si256());
        continue;
      }
      const uint8_t* src = w.w + t * KB * kBlock * CB;
      [[maybe_unused]] __m256i cs = _mm256_setzero_si256();  // ROW: sum (q - zint) of this group, per output lane
      for (int64_t kb = c0; kb < c1; ++kb) {
        const uint8_t* s = src + kb * kBlock * CB;
        uint8_t* d = dq + (kb - c0) * 8 * jbytes;
        static_for<0, CB>([&](auto pc) __attribute__((always_inline)) {
          constexpr int p = decltype(pc)::value;
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32 * p));
          static_for<0, 8 / CB>([&](auto sc) __attribute__((always_inline)) {
            constexpr int sh = decltype(sc)::value;
            __m256i u = unpack<CB, sh>(v);
#if LOWBIT_USE_VNNI
            if constexpr (ROW) {
              u = _mm256_sub_epi8(u, _mm256_set1_epi8(static_cast<char>(w.zint)));
              cs = _mm256_dpbusd_epi32(cs, _mm256_set1_epi8(1), u);
            }
#endif
            D::store_half(d + (p + CB * sh) * jbytes, h, u);
          });
        });
        if constexpr (ROW) {
          if ((kb + 1) % w.gb == 0 || kb + 1 == KB) {  // end of group kb / gb
            float* c = corr + q * 16 + h * kTileRows;
            const __m256 s8 = load_scales(w.scales + (t * w.G + kb / w.gb) * kTileRows);
            _mm256_storeu_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(cs), s8), _mm256_set1_ps(-128.0f),
                                                _mm256_loadu_ps(c)));
            cs = _mm256_setzero_si256();
          }
        }
      }
    }
  }
}

// Every 64-byte line of [p, p + bytes) (towards L2 by default).
template <_mm_hint kHint = _MM_HINT_T1>
LB_INLINE void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  const char* end = c + bytes;
  for (c = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(c) & ~uintptr_t{63}); c < end; c += 64) {
    _mm_prefetch(c, kHint);
  }
}

constexpr int64_t kOutAhead = 3;  // row blocks between an output line's prefetch and its write

template <class D, int CB, bool PC, bool ROW>
void gemm_impl(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1, int64_t m0,
               int64_t m1, uint8_t* scratch) {
  using F = typename D::F;
  constexpr int L = kLanes<D>, VPP = kVecPerPair<D>, CVMAX = kGemmPairs * VPP;
  const int64_t KB = w.KB;
  const bool zfold = !PC && w.zint != 0;
  const int64_t chunk = chunk_blocks(w.gb, PC);
  uint8_t* panel = scratch;
  float* gsc = reinterpret_cast<float*>(scratch + gemm_panel_bytes(KB));
  float* gzf = gsc + kGroupTableFloats;
  float* ob = gzf + kGroupTableFloats;
  const int64_t p1 = (t1 + 1) / 2;
  for (int64_t p = t0 / 2; p < p1; p += kGemmPairs) {
    const int64_t np = std::min<int64_t>(kGemmPairs, p1 - p);
    const int64_t cv = np * VPP;
    Epilogue ep;
    for (int64_t v = 0; v < cv; ++v) {
      const int64_t t = 2 * p + v * D::kVecTiles;
      ep.n0[v] = t * kTileRows;
      ep.valid[v] = std::min<int64_t>(L, w.N - ep.n0[v]);
      std::fill(ep.bias[v], ep.bias[v] + 16, 0.0f);
      if (bias != nullptr && ep.valid[v] > 0) std::copy(bias + ep.n0[v], bias + ep.n0[v] + ep.valid[v], ep.bias[v]);
      if constexpr (PC) {
        const F s = vec_scales<D>(w, t, 0);
        D::fstore(ep.scale[v], s);
        D::fstore(ep.zf[v], zfold ? D::fzero() : vec_zero_factor<D>(w, s, t, 0));
      }
    }
    for (int64_t mc = m0; mc < m1; mc += kLargeMChunk) {
      const int64_t mc1 = std::min(m1, mc + kLargeMChunk);
      if constexpr (ROW) std::fill(&ep.corr[0][0], &ep.corr[0][0] + sizeof(ep.corr) / sizeof(float), 0.0f);
      // K-chunk outer, row blocks inner: the chunk's panel (<= 16 KB) stays in L1 while every row block
      // streams its activations past it.
      for (int64_t c0 = 0; c0 < KB; c0 += chunk) {
        const int64_t c1 = std::min(KB, c0 + chunk);
        unpack_panel<D, CB, ROW>(w, p, np, c0, c1, panel, ep.corr[0]);
        if constexpr (!PC) {
          for (int64_t g = c0 / w.gb; g * w.gb < c1; ++g) {
            const int64_t gl = g - c0 / w.gb;
            for (int64_t v = 0; v < cv; ++v) {
              const int64_t t = 2 * p + v * D::kVecTiles;
              const F s = vec_scales<D>(w, t, g);
              D::fstore(gsc + gl * kRowFloats + v * L, s);
              if (!zfold) D::fstore(gzf + gl * kRowFloats + v * L, vec_zero_factor<D>(w, s, t, g));
            }
          }
        }
        // The next K-chunk's (or next panel's first) packed weights are prefetched to L2 a slice per row
        // block, so that unpacking it does not wait for memory. The next panel may lie past this call's tiles:
        // a work unit is one panel (KernelTable::large_tiles) and a thread claims units in order, so it is
        // the next unit's, which would otherwise start on cold memory (measured: the four projections of a
        // SmolLM2 layer at M = 172 took 0.68 ms more with their weights out of cache, 30% of their time).
        const bool last = c1 >= KB;
        const int64_t pn = last ? p + kGemmPairs : p, nc0 = last ? 0 : c1;
        const int64_t ntile = std::max<int64_t>(0, std::min<int64_t>(2 * (pn + kGemmPairs), w.T) - 2 * pn);
        if (last && ntile > 0) {  // and the next panel's group tables (scales; zeros or minima): a few lines each
          const int64_t e0 = 2 * pn * w.G * kTileRows, e1 = (2 * pn + ntile) * w.G * kTileRows;  // table entries
          prefetch_range(w.scales + e0, (e1 - e0) * 2);
          if (w.mins != nullptr) prefetch_range(w.mins + e0, (e1 - e0) * 2);
          if (w.zeros != nullptr) prefetch_range(w.zeros + e0, e1 - e0);
        }
        const int64_t tile_lines = (std::min(KB, nc0 + chunk) - nc0) * CB / 2;  // 64-byte lines per tile
        const int64_t lines = ntile * tile_lines, nrb = (mc1 - mc + kGemmMB - 1) / kGemmMB;
        const uint8_t* pf = w.w + (2 * pn * KB + nc0) * kBlock * CB;  // tile 2 * pn, block nc0
        int64_t line = 0, pt = 0, pl = 0;                                 // next line: tile pt, line pl in it
        // The last K-chunk writes y, usually memory the allocator hands back cold, a few lines per row a whole
        // row apart (which the hardware prefetchers do not predict), and a write to a line not in cache waits
        // for it (measured in a SmolLM2 prefill, M = 172: 6 ms of 85 in the projections). So the first chunk
        // fetches the panel's output lines to L2 (<= 240 rows x 3 lines), the row block kOutAhead blocks
        // ahead of the one computing, and they are there when the last chunk writes them.
        const int64_t ycols = std::min<int64_t>(w.N, 2 * (p + np) * kTileRows) - 2 * p * kTileRows;
        const bool first = c0 == 0;
        const auto fetch_out = [&](int64_t r0) {
          for (int64_t r = r0; r < std::min(mc1, r0 + kGemmMB); ++r) prefetch_range(y + r * w.N + 2 * p * kTileRows, ycols * 4);
        };
        if (first) {
          for (int64_t a = 0; a < kOutAhead; ++a) fetch_out(mc + a * kGemmMB);
        }
        for (int64_t mm = mc, rb = 1; mm < mc1; mm += kGemmMB, ++rb) {
          for (const int64_t end = lines * rb / nrb; line < end; ++line) {
            _mm_prefetch(reinterpret_cast<const char*>(pf + pt * KB * kBlock * CB + pl * 64), _MM_HINT_T1);
            if (++pl == tile_lines) pl = 0, ++pt;
          }
          if (first && mm + kOutAhead * kGemmMB < mc1) fetch_out(mm + kOutAhead * kGemmMB);
          const BlockIO io{panel, gsc, gzf, ob + (mm - mc) * kRowFloats, &ep, y};
          gemm_dispatch<D, PC, ROW, kGemmMB, CVMAX>(w, x, io, mm, std::min<int64_t>(kGemmMB, mc1 - mm), cv, c0, c1);
        }
      }
    }
  }
}

template <bool PC, bool ROW>
void gemm_large_pc(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1, int64_t m0,
                   int64_t m1, uint8_t* scratch) {
  switch (w.cb) {
    case 1: gemm_impl<GemmDot<false>, 1, PC, ROW>(w, x, bias, y, t0, t1, m0, m1, scratch); break;
    case 2: gemm_impl<GemmDot<false>, 2, PC, ROW>(w, x, bias, y, t0, t1, m0, m1, scratch); break;
    case 4: gemm_impl<GemmDot<false>, 4, PC, ROW>(w, x, bias, y, t0, t1, m0, m1, scratch); break;
    default:
      if (w.full_byte) {
        gemm_impl<GemmDot<true>, 8, PC, ROW>(w, x, bias, y, t0, t1, m0, m1, scratch);
      } else {
        gemm_impl<GemmDot<false>, 8, PC, ROW>(w, x, bias, y, t0, t1, m0, m1, scratch);
      }
  }
}

void gemm_large(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1, int64_t m0,
                int64_t m1, uint8_t* scratch) {
  if (w.G == 1) {
    gemm_large_pc<true, false>(w, x, bias, y, t0, t1, m0, m1, scratch);
#if LOWBIT_USE_VNNI
  } else if (x.u8) {  // unsigned activations, one scale per row (binding.cpp: grouped, integral zero point)
    gemm_large_pc<false, true>(w, x, bias, y, t0, t1, m0, m1, scratch);
#endif
  } else {
    gemm_large_pc<false, false>(w, x, bias, y, t0, t1, m0, m1, scratch);
  }
}

// Scratch gemm_large needs: the chunk panel, the group tables and the float buffer.
int64_t gemm_scratch_bytes(int64_t KB) {
  return gemm_panel_bytes(KB) + (2 * kGroupTableFloats + int64_t{kLargeMChunk} * kRowFloats) * 4;
}

#undef LB_INLINE

}  // namespace
}  // namespace LOWBIT_ISA_NS
}  // namespace lowbit
