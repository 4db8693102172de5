// lowbit CPU kernels: the interface shared by the torch binding and the per-ISA kernel files.
//
// This header must stay free of torch (and of anything that defines inline code): it is included by
// translation units compiled for AVX2 / AVX-512, and an inline function instantiated there could be picked by
// the linker for the portable path too and crash a CPU without those instructions.
//
// Repacked weight layout ("tiles"), prepared once by lowbit/kernels/fast.py from docs/PACKED_FORMAT.md:
//   * rows are grouped in tiles of 8 (N padded to a multiple of 8), K is padded to a multiple of 32;
//   * for tile t and K-block kb (32 inputs) the 8x32 codes form 8 "unpacked vectors" j = 0..7 of 32 bytes,
//     byte (r*4 + i) of vector j = code[8t + r][32kb + 4j + i] -- one 32-bit lane per output row, four
//     consecutive inputs per lane, which is what maddubs / vpdpbusd consume against a broadcast activation;
//   * codes are stored with a container width cb in {1, 2, 4, 8} (3-bit codes use cb = 4): the block
//     occupies 32*cb bytes = cb packed vectors p, and unpacked vector j = p + cb*s lives in bits
//     [s*cb, s*cb + cb) of every byte of packed vector p, so one 32-byte load yields 8/cb unpacked vectors
//     with a shift and a mask each;
//   * tiles are contiguous: tile t starts at byte t * KB * 32 * cb.
//   scales: fp16 [T, G, 8] effective scale s of each (row, group), zeros: uint8 [T, G, 8] zero points z
//   (asymmetric formats only), so that W[n, k] = s * (q - z) (binary: s = 2 * s_stored, z = 1/2).
//   Symmetric formats have a constant z, folded into the activation group sums (Acts::gsum) instead.
//   Offset storage (W[n, k] = s * q + m) has fp16 minima m [T, G, 8] (Tiles::mins) instead of zeros.
//
// Activations are quantized per row and per activation block of Acts::ab 32-blocks (symmetric int8 in
// [-127, 127]): x ~= a_b * xq; ab divides the weight group's block count gb (any ab for per-channel weights).
#pragma once

#include <cstdint>

namespace lowbit {

constexpr int kTileRows = 8;   // output rows per tile (8 int32 / float lanes of a 256-bit vector)
constexpr int kBlock = 32;     // inputs per K-block (= activation quantization block)
constexpr int kSmallMaxM = 4;  // M up to this uses the fused-unpack path, above it the panel GEMM
constexpr int kLargeMChunk = 240;  // rows per work unit of the panel GEMM (a multiple of every row block)

struct Tiles {
  const uint8_t* w;       // [T, KB, 32 * cb]
  const uint16_t* scales; // [T, G, 8] fp16 bits
  const uint8_t* zeros;   // [T, G, 8], or nullptr for symmetric formats
  int32_t zint;           // symmetric formats with an integral zero point: it (the fused SIMD kernels fold it
                          // into the integer block sums and skip gsum); 0 otherwise
  float zconst;           // the constant zero point gsum carries (1 when `zeros` holds the zero points)
  int cb;                 // container bits: 1, 2, 4, 8
  bool full_byte;         // codes may use all 8 bits (int8 formats); else codes < 16
  int64_t N, T, KB, G, gb;  // gb: K-blocks per group (KB when G == 1)
  // Output clamp after the bias (a fused ReLU / ReLU6: lowbit/kernels/fuse_act.py), when clamp is set.
  bool clamp = false;
  float lo = 0.0f, hi = 0.0f;
  // Offset storage (lowbit/kernels/offsets.py: w = q * s + m): fp16 [T, G, 8] group minima m, or nullptr. Its
  // group term m * sum x is the zero-point term with the factor -m (zeros == nullptr, zint = 0, zconst = 1), so
  // it costs what an asymmetric format's does and nothing is computed beside the kernel.
  const uint16_t* mins = nullptr;
};

struct Acts {
  const int8_t* xq;       // codes, zero padded from K to KB * 32, in row groups of rg rows (see act_offset)
  const float* a;         // [M, KB] scale of each 32-block (equal within an activation block)
  const int32_t* isum;    // [M, KB] sum of the block's codes
  const float* gsum;      // [M, G]  zc * sum over the group's blocks of a_b * isum_b, zc = the constant
                          //         zero point of symmetric formats (1 when Tiles::zeros holds them)
  int64_t M, KB, G;
  int64_t ldx;            // stride of xq between row groups (rg = 1: rows, >= KB * 32; binding.cpp pads it off
                          // multiples of 1 KB)
  int64_t ab;             // 32-blocks per activation block (the GEMM sums their integer dots before scaling)
  int64_t rg;             // rows per row group: 1 = row-major [M, ldx]; else each group of rg rows is stored
                          // [KB][rg][32] (block kb of row m at (m / rg) * ldx + (kb * rg + m % rg) * 32), so
                          // that the panel GEMM's row block reads one contiguous stream
  bool u8 = false;        // codes stored as xq + 128 (unsigned; KernelTable::u8_rows): the panel GEMM then
                          // multiplies them with signed weights q - zint (see kernels_gemm_impl.h, ROW)
};

// A depthwise 2-D convolution (groups = channels, dilation 1, zero padding) over channels-last float maps:
// y[b, oh, ow, c] = bias[c] + sum_{kh, kw} w[kh, kw, c] * x[b, oh*SH - PT + kh, ow*SW - PL + kw, c], taps outside
// the image reading 0 (so the bottom / right padding is implied by OH / OW), then clamped to [lo, hi] if clamp.
struct DwConv {
  const float* x;     // [B, H, W, C]
  const float* w;     // [KH, KW, C]
  const float* bias;  // [C], or nullptr
  float* y;           // [B, OH, OW, C]
  int64_t B, H, W, C, OH, OW;
  int KH, KW, SH, SW, PT, PL;
  bool clamp;
  float lo, hi;
};

// A float32 GEMM over a small dequantized weight (kernels_dense_impl.h): y[m, n] = bias[n] + sum_k x[m, k] *
// wt[k, n] for rows m of x, then clamped to [lo, hi] if clamp. wt [K, NP] and bias [NP] are zero-padded to NP
// (a multiple of 16) columns; y's rows hold N valid columns.
struct DenseF32 {
  const float* x;     // [M, ldx]
  const float* wt;    // [K, NP]
  const float* bias;  // [NP], or nullptr
  float* y;           // [M, ldy]
  int64_t ldx, ldy, K, N, NP;
  bool clamp;
  float lo, hi;
};

// The int8 form of DwConv (packed int8 towers): the input map quantized per image and channel to int8 codes
// (x ~= a[b, c] * code, KernelTable::dw_quantize) and stored as pairs of horizontally adjacent pixels, xq
// [B, H, W + 1, C] int32: entry j of a row holds (code of pixel j - 1) in the low and (code of pixel j) in the
// high 16 bits, 0 outside the row; taps as pairs (kw = 2t, 2t + 1) the same way, w [KH, ceil(KW / 2), C] (the
// packed weight's codes minus its zero point, |tap| < 2^15; the odd last pair's high half 0). A pmaddwd of the
// two gives both taps' products in int32; y[b, oh, ow, c] = scale[b, c] * sum + bias[c] (scale = a[b, c] * s[c],
// s the channel's weight step), then clamped.
struct DwConvQ {
  const int32_t* x;
  const int32_t* w;
  const float* scale;  // [B, C]
  const float* bias;   // [C], or nullptr
  float* y;
  int64_t B, H, W, C, OH, OW;
  int KH, KW, SH, SW, PT, PL;
  bool clamp;
  float lo, hi;
};

// A precomputed (static) activation scale: x is rounded to clamp(x * inv, lo, hi) with one scale for the whole
// tensor (no per-row maximum pass); lo/hi are integers within [-127, 127] (a4: [-7, 7], an asymmetric grid with
// zero point z: [-z, 2^bits - 1 - z]). Passed as nullptr for the dynamic per-row / per-block quantization.
struct ActStatic {
  float scale;  // a: x ~= a * xq
  float inv;    // 1 / a in float32 (the reference rounds x * inv the same way)
  float lo, hi;
};

// One query token's attention over a KV cache (decode): for row b and head h (kv group g = h / (heads /
// kv_heads)), out[b, h] = softmax_j(q[b, h] . k[b, g, j] * scale) . v[b, g, j] over the first n cached entries.
struct DecodeAttention {
  const float* q;     // [B, heads, hd]
  const float* k;     // [B, kv_heads, kv_stride / hd, hd]: entries j < n of each (b, g) are read
  const float* v;     // like k
  float* out;         // [B, heads, hd]
  int64_t heads, kv_heads, hd, n, kv_stride;
  float scale;
};

// Causal attention of a block of query rows over a KV cache (prefill): query row i (of T) of head h attends the
// keys j <= i + n - T of its KV group g = h / (heads / kv_heads): out[b, i, h] = softmax_j(q[b, i, h] . k[b, g, j]
// * scale) . v[b, g, j]. Work units are (b, g, block of kPrefillRows query rows); one unit computes every head
// of the group on those rows, so each K / V row read serves rows x (heads / kv_heads) query vectors.
constexpr int kPrefillRows = 16;
struct PrefillAttention {
  const float* q;     // q[b, i, h, d] at q + b * q_sb + i * q_st + h * q_sh + d
  int64_t q_sb, q_st, q_sh;
  const float* k;     // [B, kv_heads, kv_stride / hd, hd]: entries j < n of each (b, g) are read
  const float* v;     // like k
  float* out;         // [B, T, heads, hd], contiguous
  int64_t B, T, heads, kv_heads, hd, n, kv_stride;
  float scale;
};  // work units: B * kv_heads * ceil(T / kPrefillRows), unit u = (b * kv_heads + g) * blocks + row block

struct KernelTable {
  const char* name;
  int large_tiles;  // gemm_large works on groups of this many tiles: threads get whole groups
  int large_rows;   // the row-group size (Acts::rg) gemm_large reads; the fused path always reads rg = 1
  // Scratch bytes gemm_large needs (per thread) for KB blocks.
  int64_t (*large_scratch)(int64_t KB);
  // Quantize rows [m0, m1) of x (row stride ldx, K valid columns) into xq (row groups of rg rows, group
  // stride ldq: the Acts layout) / a / isum (row stride KB), one scale per `ab` consecutive 32-blocks
  // (repeated in `a` for each of them); u8: store xq + 128 (isum stays the sum of the signed codes). With `st`,
  // every block takes the static scale st->scale instead (ActStatic).
  void (*quantize)(const float* x, int64_t ldx, int64_t K, int64_t KB, int64_t ab, int64_t m0, int64_t m1,
                   int8_t* xq, int64_t ldq, int64_t rg, float* a, int32_t* isum, bool u8, const ActStatic* st);
  // y[m, n] for all M rows (M <= kSmallMaxM) and tiles [t0, t1), unpacking weights in registers.
  void (*gemm_small)(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1);
  // Rows [m0, m1) (at most kLargeMChunk of them) x tiles [t0, t1) for any M: tiles are unpacked once into
  // `scratch` (large_scratch(KB) bytes), then reused for every block of rows (kernels_gemm_impl.h).
  void (*gemm_large)(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1,
                     int64_t m0, int64_t m1, uint8_t* scratch);
  // Output rows [r0, r1) of the B * OH rows of a depthwise convolution (kernels_dwconv_impl.h).
  void (*dwconv)(const DwConv& p, int64_t r0, int64_t r1);
  // gemm_large takes unsigned activations (Acts::u8) for grouped weights with an integral zero point and one
  // activation scale per row: the zero point then costs nothing per row (kernels_gemm_impl.h, ROW).
  bool u8_rows = false;
  // The small float ops of a decode step (kernels_decode_impl.h; scalar: kernels_scalar.cpp):
  // RMSNorm of rows [r0, r1) of x [*, D] (y may be x); y = silu(g) * u; heads [h0, h1) of B * heads.
  void (*rms_norm)(const float* x, const float* w, int64_t D, float eps, float* y, int64_t r0, int64_t r1) = nullptr;
  void (*silu_mul)(const float* g, const float* u, int64_t n, float* y) = nullptr;
  void (*attend)(const DecodeAttention& a, int64_t h0, int64_t h1) = nullptr;
  // Work units [u0, u1) of a prefill's causal attention (PrefillAttention).
  void (*prefill_attend)(const PrefillAttention& a, int64_t u0, int64_t u1) = nullptr;
  // The int8 depthwise conv (DwConvQ), output rows [r0, r1) of B * OH; and the quantization of its input:
  // images [b0, b1) of x [B, H, W, C] -> xq pairs (round half to even of x * 127 / max), a[b, c] = max |x| / 127.
  void (*dwconv_q)(const DwConvQ& p, int64_t r0, int64_t r1) = nullptr;
  void (*dw_quantize)(const float* x, int64_t H, int64_t W, int64_t C, int32_t* xq, float* a, int64_t b0,
                      int64_t b1) = nullptr;
  // y[m, n] = bias[n] + x[m] . w[n] for the M (<= kSmallMaxM) rows of x [M, K] and outputs [n0, n1) of a float32
  // weight w [N, K] (y [M, N], bias may be nullptr): a float layer at a few rows (e.g. an unquantized lm_head).
  void (*gemv_f32)(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y, int64_t N,
                   int64_t n0, int64_t n1) = nullptr;
  // Rows [m0, m1) of a DenseF32 (all its columns).
  void (*dense_f32)(const DenseF32& p, int64_t m0, int64_t m1) = nullptr;
};

// Repack rows of a docs/PACKED_FORMAT.md bitstream (qweight [N, row_bytes], `bits`-bit codes) into the tile
// layout above with container width cb, for tiles [t0, t1). `out` must be zero-filled (padding stays 0).
void repack_tiles(const uint8_t* qweight, int64_t row_bytes, int bits, int64_t N, int64_t K, int cb,
                  uint8_t* out, int64_t t0, int64_t t1);

// IEEE half (bits) -> float, portable (the SIMD kernels use F16C instead).
float half_to_float(uint16_t h);

const KernelTable* scalar_kernels();
const KernelTable* avx2_kernels();        // nullptr when not compiled in
const KernelTable* avx512vnni_kernels();  // nullptr when not compiled in

}  // namespace lowbit
