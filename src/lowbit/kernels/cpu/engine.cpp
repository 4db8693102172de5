// The torch-free core (engine.h): ISA selection, planned matmul calls, the decoder's step and prefill.
#include "engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifndef LOWBIT_CHUNKS_PER_THREAD
#define LOWBIT_CHUNKS_PER_THREAD 16
#endif

namespace lowbit {

// --- instruction sets ---------------------------------------------------------------------------------------
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

std::vector<const KernelTable*> usable_tables() {
  std::vector<const KernelTable*> out{scalar_kernels()};
  // Check the CPU before asking for a table: never touch wide code on a CPU without it.
  if (cpu_supports("avx2") && avx2_kernels() != nullptr) out.push_back(avx2_kernels());
  if (cpu_supports("avx512vnni") && avx512vnni_kernels() != nullptr) out.push_back(avx512vnni_kernels());
  return out;
}

std::atomic<const KernelTable*>& current_table() {
  static std::atomic<const KernelTable*> table{usable_tables().back()};
  return table;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const KernelTable* t : usable_tables()) names.emplace_back(t->name);
  return names;
}

bool select_isa(const std::string& name) {
  for (const KernelTable* t : usable_tables()) {
    if (name == t->name) {
      current_table().store(t);
      return true;
    }
  }
  return false;
}

// --- matmul calls -------------------------------------------------------------------------------------------
namespace {

// Row stride of row-major int8 activations (the fused path): padded off multiples of 1 KB, since rows a
// multiple of 4 KB apart share L1 sets (a kernel reading several rows at once was measured 25% slower at
// K = 4096 without the pad).
int64_t act_row_stride(int64_t KB) {
  const int64_t row = KB * kBlock;
  return row % 1024 == 0 ? row + 64 : row;
}

// Rows per activation row group (Acts::rg): the panel GEMM's row block, row-major (1) for the fused path.
int64_t act_row_group(const KernelTable* kt, int64_t M) { return M <= kSmallMaxM ? 1 : std::max(1, kt->large_rows); }

// Bytes between row groups of the int8 activations.
int64_t act_group_stride(int64_t KB, int64_t rg) { return rg == 1 ? act_row_stride(KB) : rg * KB * kBlock; }

size_t round64(size_t n) { return (n + 63) / 64 * 64; }

MatmulCall plan_call(const KernelTable* kt, const float* xp, int64_t M, int64_t K, int64_t KB, int64_t G, int64_t gb,
                     int64_t ab, int8_t* xqp, float* ap, int32_t* isp, float* gsp, const uint8_t* wp,
                     const uint16_t* sp, const uint8_t* zp, const uint16_t* mp, float zero_const, int64_t cb,
                     bool full_byte, int64_t N, int64_t T, const float* biasp, float* yp, bool clamp, float lo,
                     float hi, const ActStatic* st, int threads) {
  const bool small = M <= kSmallMaxM;
  // Integral constant zero points (symmetric, bits >= 2) go into the integer sums of the SIMD kernels.
  const int32_t zint = zp == nullptr && mp == nullptr && zero_const >= 1.0f && zero_const == static_cast<float>(
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
  const int64_t unit_rows = small ? M : std::min<int64_t>(M, kLargeMChunk);
  const int64_t tile_units = ceil_div(T, unit_tiles), row_units = ceil_div(M, unit_rows);
  const int64_t units = tile_units * row_units;
  const int64_t unit_macs = unit_tiles * kTileRows * KB * kBlock * unit_rows;
  const int64_t min_grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(unit_macs, 1));
  const int64_t grain = std::max(min_grain, units / (LOWBIT_CHUNKS_PER_THREAD * std::max(threads, 1)));
  MatmulCall c{kt, xp, M, K, KB, G, gb, ab, ldq, rg, xqp, ap, isp, gsp, zero_const, u8, st != nullptr,
               st != nullptr ? *st : ActStatic{0.0f, 0.0f, 0.0f, 0.0f},
               Tiles{wp, sp, zp, zint, zp == nullptr && mp == nullptr ? zero_const : 1.0f, static_cast<int>(cb),
                     full_byte, N, T, KB, G, gb, clamp, lo, hi, mp},
               Acts{xqp, ap, isp, gsp, M, KB, G, ldq, ab, rg, u8}, biasp, yp, small, row_grain, unit_tiles,
               unit_rows, row_units, units, grain};
  return c;
}

}  // namespace

void MatmulCall::quantize(int64_t m0, int64_t m1) const {
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

void MatmulCall::compute_units(int64_t u0, int64_t u1) const {
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

void run(const MatmulCall& c, int threads) {
  parallel_chunks(c.M, c.row_grain, threads, [&](int64_t m0, int64_t m1) { c.quantize(m0, m1); });
  parallel_chunks(c.units, c.grain, threads, [&](int64_t u0, int64_t u1) { c.compute_units(u0, u1); });
}

std::string PreparedWeight::init(const uint8_t* w_in, int64_t w_bytes, const uint16_t* scales_in, int64_t scales_t,
                                 int64_t scales_g, int64_t scales_r, const uint8_t* zeros_in, const float* bias_in,
                                 double zero_const_in, int64_t cb_in, bool full_byte_in, int64_t N_in, int64_t K_in,
                                 int64_t gb_in, int64_t ab_in, const uint16_t* mins_in) {
  if (!(cb_in == 1 || cb_in == 2 || cb_in == 4 || cb_in == 8)) return "lowbit linear: container bits must be 1/2/4/8";
  if (N_in < 0 || K_in < 0) return "lowbit linear: N and K must be >= 0";
  const int64_t kb = ceil_div(K_in, kBlock), t = ceil_div(N_in, kTileRows);
  if (w_in == nullptr || w_bytes != t * kb * kBlock * cb_in) return "lowbit linear: packed tiles do not match N/K/bits";
  if (scales_in == nullptr || scales_t != t || scales_r != kTileRows || scales_g < 1) {
    return "lowbit linear: scales must be float16 [T, G, 8]";
  }
  if (gb_in < 1 || gb_in * (scales_g - 1) >= kb || gb_in * scales_g < kb) {
    return "lowbit linear: group blocks do not tile K";
  }
  if (ab_in < 1 || !(scales_g == 1 || gb_in % ab_in == 0 || ab_in >= kb)) {
    return "lowbit linear: activation blocks must divide the weight groups or span the whole row";
  }
  if (zeros_in != nullptr && mins_in != nullptr) return "lowbit linear: zeros and mins exclude each other";
  w = w_in;
  scales = scales_in;
  zeros = zeros_in;
  mins = mins_in;
  bias = bias_in;
  // zeros / mins hold the zero-point term: the group sums are plain sums of the activations
  zero_const = zeros_in != nullptr || mins_in != nullptr ? 1.0f : static_cast<float>(zero_const_in);
  cb = cb_in;
  full_byte = full_byte_in;
  N = N_in;
  K = K_in;
  KB = kb;
  T = t;
  G = scales_g;
  gb = gb_in;
  ab = std::min(ab_in, kb);  // one block spanning the row: one activation scale per row
  return "";
}

// xq [row groups, group stride] int8 | a [M, KB] float | isum [M, KB] int32 | gsum [M, G] float, 64-byte aligned.
size_t PreparedWeight::act_bytes(const KernelTable* kt, int64_t M) const {
  const int64_t rg = act_row_group(kt, M);
  return round64(static_cast<size_t>(ceil_div(M, rg) * act_group_stride(KB, rg))) +
         2 * round64(static_cast<size_t>(M * KB) * 4) + round64(static_cast<size_t>(M * G) * 4);
}

MatmulCall PreparedWeight::plan(const KernelTable* kt, const float* xp, int64_t M, float* yp, void* act, int threads,
                                bool clamp, float lo, float hi, const ActStatic* st) const {
  const int64_t rg = act_row_group(kt, M);
  const size_t o_a = round64(static_cast<size_t>(ceil_div(M, rg) * act_group_stride(KB, rg)));
  const size_t o_is = o_a + round64(static_cast<size_t>(M * KB) * 4);
  const size_t o_gs = o_is + round64(static_cast<size_t>(M * KB) * 4);
  char* base = static_cast<char*>(act);
  return plan_call(kt, xp, M, K, KB, G, gb, ab, reinterpret_cast<int8_t*>(base), reinterpret_cast<float*>(base + o_a),
                   reinterpret_cast<int32_t*>(base + o_is), reinterpret_cast<float*>(base + o_gs), w, scales, zeros,
                   mins, zero_const, cb, full_byte, N, T, bias, yp, clamp, lo, hi, st, threads);
}

void PreparedWeight::compute(const float* xp, int64_t M, float* yp, int threads, bool clamp, float lo, float hi,
                             const ActStatic* st) const {
  if (M <= 0 || N <= 0) return;
  const KernelTable* kt = current_table().load();
  thread_local std::vector<int64_t> buf;
  const size_t total = act_bytes(kt, M);
  if (buf.size() * 8 < total) buf.resize(total / 8 + 1);
  run(plan(kt, xp, M, yp, buf.data(), threads, clamp, lo, hi, st), threads);
}

void repack_weight(const uint8_t* qweight, int64_t row_bytes, int bits, int64_t N, int64_t K, int cb, uint8_t* out,
                   int threads) {
  parallel_chunks(ceil_div(N, kTileRows), 8, threads,
                  [&](int64_t t0, int64_t t1) { repack_tiles(qweight, row_bytes, bits, N, K, cb, out, t0, t1); });
}

void attend_heads(const DecodeAttention& a, int64_t B, int threads) {
  const KernelTable* kt = current_table().load();
  const int64_t heads = B * a.heads;
  // Each head costs ~4 n hd flops; a parallel region a few microseconds.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, a.n * a.hd));
  parallel_chunks(heads, grain, threads, [&](int64_t h0, int64_t h1) { kt->attend(a, h0, h1); });
}

void prefill_attention(const PrefillAttention& a, int threads) {
  const KernelTable* kt = current_table().load();
  parallel_chunks(a.B * a.kv_heads * ceil_div(a.T, kPrefillRows), 1, threads,
                  [&](int64_t u0, int64_t u1) { kt->prefill_attend(a, u0, u1); });
}

// --- the decoder --------------------------------------------------------------------------------------------
namespace {

// x * cos + swap_halves(x) * sin, elementwise as torch computes it (two products, one sum).
// The two halves as separate loops: each vectorizes (one index expression per loop).
void rope(const float* x, const float* c, const float* s, int64_t hd, float* out) {
  const int64_t half = hd / 2;
  for (int64_t j = 0; j < half; ++j) out[j] = x[j] * c[j] + x[j + half] * s[j];
  for (int64_t j = half; j < hd; ++j) out[j] = x[j] * c[j] + x[j - half] * s[j];
}

}  // namespace

void rope_token(const float* q, const float* k, const float* v, const float* c, const float* s, int64_t H,
                int64_t KV, int64_t hd, float* q_out, float* k_out, float* v_out, int64_t head_stride) {
  for (int64_t n = 0; n < H; ++n) rope(q + n * hd, c, s, hd, q_out + n * hd);
  for (int64_t g = 0; g < KV; ++g) {
    rope(k + g * hd, c, s, hd, k_out + g * head_stride);
    std::memcpy(v_out + g * head_stride, v + g * hd, sizeof(float) * hd);
  }
}

std::string Decoder::init(DecoderWeights w) {
  const size_t L = w.qkv.size();
  if (w.in_norms.size() != L || w.post_norms.size() != L || w.o.size() != L || w.gate_up.size() != L ||
      w.down.size() != L) {
    return "lowbit decoder stack: one of each per layer";
  }
  if (!(w.heads > 0 && w.kv_heads > 0 && w.heads % w.kv_heads == 0 && w.head_dim % 2 == 0)) {
    return "lowbit decoder stack: bad head geometry";
  }
  if (L == 0) return "lowbit decoder stack: no layers";
  const int64_t H = w.heads, KV = w.kv_heads, hd = w.head_dim, D = w.o[0]->N;
  for (size_t i = 0; i < L; ++i) {
    if (!(w.qkv[i]->N == (H + 2 * KV) * hd && w.o[i]->K == H * hd && w.gate_up[i]->N % 2 == 0 &&
          w.down[i]->K * 2 == w.gate_up[i]->N && w.o[i]->N == D && w.down[i]->N == D && w.qkv[i]->K == D &&
          w.gate_up[i]->K == D && w.in_norms[i] != nullptr && w.post_norms[i] != nullptr)) {
      return "lowbit decoder stack: projection shapes do not match the heads";
    }
    if (w.gate_up[i]->N != w.gate_up[0]->N) return "lowbit decoder stack: layers of one MLP width";
  }
  if (w.head != nullptr) {
    if (w.norm == nullptr) return "lowbit decoder stack: a head needs the final norm";
    if (w.head->K != D) return "lowbit decoder stack: the head does not match the hidden size";
  }
  w_ = std::move(w);
  D_ = D;
  F_ = w_.gate_up[0]->N / 2;
  row_ = (H + 2 * KV) * hd;
  return "";
}

// Buffers for `rows` rows: x (normed) [rows, D] | qkv [rows, row] | q [rows, H, hd] | attn [rows, H, hd] |
// gu [rows, 2F] | act [rows, F] | y [rows, D], 64-byte aligned parts.
float* Decoder::buffers(int64_t rows, float** parts) {
  const int64_t hq = w_.heads * w_.head_dim;
  const int64_t sizes[] = {rows * D_, rows * row_, rows * hq, rows * hq, rows * 2 * F_, rows * F_, rows * D_};
  int64_t total = 0;
  for (int64_t n : sizes) total += (n + 15) / 16 * 16;
  // One arena per calling thread, shared by every decoder: a call's buffers only live during the call, and an
  // engine built per request (lean_decode.py builds one per generate) then finds them already mapped instead
  // of faulting in megabytes of fresh pages (a 172-token prefill: 5 MB, ~1.5 ms of page faults).
  thread_local std::vector<float> arena;
  if (static_cast<int64_t>(arena.size()) < total + 16) arena.resize(static_cast<size_t>(total + 16));
  float* cur = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(arena.data()) + 63) / 64 * 64);
  for (int j = 0; j < 7; ++j) {
    parts[j] = cur;
    cur += (sizes[j] + 15) / 16 * 16;
  }
  return parts[0];
}

std::string Decoder::step(float* hp, int64_t B, float* logits, float* k_base, float* v_base, int64_t max_len,
                          const int64_t* fill, const float* cos, const float* sin, int64_t pos, int threads) {
  const int64_t L = layers(), H = w_.heads, KV = w_.kv_heads, hd = w_.head_dim, D = D_, F = F_, row = row_;
  for (int64_t i = 0; i < L; ++i) {
    if (fill[i] < 0 || fill[i] >= max_len) return "lowbit decoder stack: the KV cache is full";
  }
  if (B < 1 || pos < 0) return "lowbit decoder stack: bad batch or position";
  const KernelTable* kt = current_table().load();
  const float* c = cos + pos * hd;
  const float* s = sin + pos * hd;
  float* parts[7];
  buffers(B, parts);
  float *x = parts[0], *qkv = parts[1], *q = parts[2], *attn = parts[3], *gu = parts[4], *act = parts[5], *y = parts[6];
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const float eps = static_cast<float>(w_.eps);
  const PreparedWeight* head = logits != nullptr ? w_.head : nullptr;
  // Every matmul of the token planned up front, all reading their activations from one buffer (a call's codes
  // are consumed before the next call quantizes).
  size_t act_total = 0;
  for (int64_t i = 0; i < L; ++i) {
    for (const PreparedWeight* p : {w_.qkv[i], w_.o[i], w_.gate_up[i], w_.down[i]}) {
      act_total = std::max(act_total, p->act_bytes(kt, B));
    }
  }
  if (head != nullptr) act_total = std::max(act_total, head->act_bytes(kt, B));
  if (act_buf_.size() * 8 < act_total) act_buf_.resize(act_total / 8 + 1);
  plans_.clear();
  for (int64_t i = 0; i < L; ++i) {
    plans_.push_back(w_.qkv[i]->plan(kt, x, B, qkv, act_buf_.data(), threads));
    plans_.push_back(w_.o[i]->plan(kt, attn, B, y, act_buf_.data(), threads));
    plans_.push_back(w_.gate_up[i]->plan(kt, x, B, gu, act_buf_.data(), threads));
    plans_.push_back(w_.down[i]->plan(kt, act, B, y, act_buf_.data(), threads));
  }
  if (head != nullptr) plans_.push_back(head->plan(kt, x, B, logits, act_buf_.data(), threads));
  const int64_t layer_stride = B * KV * max_len * hd;
  // The whole token in one parallel region (work_pool.h: TokenPhases): per layer four serial steps (the small
  // float ops and each matmul's activation quantization, done by whichever thread claims them) and four
  // matmuls whose tiles the threads share out -- instead of a parallel region per matmul and attention (~150
  // per SmolLM2 token), each of which waits for every thread of the team to arrive.
  phases_.reset(8 * L + 2);
  parallel_team(threads, [&] {
    TokenPhases::Cursor cur(phases_);
    // One thread takes a matmul whole: the kernels' prefetch of the next tiles stops at a chunk's end.
    auto matmul = [&](const MatmulCall& mc) {
      cur.run(mc.units, threads > 1 ? mc.grain : mc.units, [&](int64_t u0, int64_t u1) { mc.compute_units(u0, u1); });
    };
    for (int64_t i = 0; i < L; ++i) {
      const MatmulCall* pl = plans_.data() + 4 * i;
      const int64_t f = fill[i];
      float* kc = k_base + i * layer_stride;
      float* vc = v_base + i * layer_stride;
      cur.serial([&] {
        if (i > 0) for (int64_t j = 0; j < B * D; ++j) hp[j] = hp[j] + y[j];  // the previous layer's MLP
        kt->rms_norm(hp, w_.in_norms[i], D, eps, x, 0, B);
        pl[0].quantize(0, B);
      });
      matmul(pl[0]);
      cur.serial([&] {
        for (int64_t b = 0; b < B; ++b) {
          const float* src = qkv + b * row;
          const int64_t off = (b * KV * max_len + f) * hd;
          rope_token(src, src + H * hd, src + (H + KV) * hd, c, s, H, KV, hd, q + b * H * hd, kc + off, vc + off,
                     max_len * hd);
        }
        // A few microseconds for all heads (~4 n hd flops each): not worth sharing out.
        kt->attend(DecodeAttention{q, kc, vc, attn, H, KV, hd, f + 1, max_len * hd, scale}, 0, B * H);
        pl[1].quantize(0, B);
      });
      matmul(pl[1]);
      cur.serial([&] {
        for (int64_t j = 0; j < B * D; ++j) hp[j] = hp[j] + y[j];
        kt->rms_norm(hp, w_.post_norms[i], D, eps, x, 0, B);
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
      if (head != nullptr) {
        kt->rms_norm(hp, w_.norm, D, eps, x, 0, B);
        plans_.back().quantize(0, B);
      }
    });
    if (head != nullptr) matmul(plans_.back());
  });
  return "";
}

std::string Decoder::prefill(float* hp, int64_t M, float* logits, float* k_base, float* v_base, int64_t max_len,
                             const float* cos, const float* sin, int threads) {
  const int64_t L = layers(), H = w_.heads, KV = w_.kv_heads, hd = w_.head_dim, D = D_, F = F_, row = row_;
  if (M < 1 || M > max_len) return "lowbit decoder: the prompt must have 1 to max_len positions";
  const KernelTable* kt = current_table().load();
  float* parts[7];
  buffers(M, parts);
  float *x = parts[0], *qkv = parts[1], *q = parts[2], *attn = parts[3], *gu = parts[4], *act = parts[5], *y = parts[6];
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const float eps = static_cast<float>(w_.eps);
  const int64_t layer_stride = KV * max_len * hd;
  for (int64_t i = 0; i < L; ++i) {
    float* kc = k_base + i * layer_stride;
    float* vc = v_base + i * layer_stride;
    kt->rms_norm(hp, w_.in_norms[i], D, eps, x, 0, M);
    w_.qkv[i]->compute(x, M, qkv, threads);
    // RoPE at each row's own position; K/V into cache entries 0..M-1.
    parallel_chunks(M, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, row)), threads, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const float* src = qkv + m * row;
        rope_token(src, src + H * hd, src + (H + KV) * hd, cos + m * hd, sin + m * hd, H, KV, hd, q + m * H * hd,
                   kc + m * hd, vc + m * hd, max_len * hd);
      }
    });
    // The last layer's other rows only fill the cache: its attention, o and MLP run on the last row alone.
    const int64_t r0 = i == L - 1 ? M - 1 : 0, rows = M - r0;
    float* hr = hp + r0 * D;
    // Causal attention over entries 0..M-1 (row m sees 0..m; the trimmed last layer's one row sees them all).
    prefill_attention(PrefillAttention{q + r0 * H * hd, M * H * hd, H * hd, hd, kc, vc, attn, 1, rows, H, KV, hd, M,
                                       max_len * hd, scale}, threads);
    w_.o[i]->compute(attn, rows, y, threads);
    for (int64_t j = 0; j < rows * D; ++j) hr[j] = hr[j] + y[j];
    kt->rms_norm(hr, w_.post_norms[i], D, eps, x, 0, rows);
    w_.gate_up[i]->compute(x, rows, gu, threads);
    for (int64_t m = 0; m < rows; ++m) kt->silu_mul(gu + m * 2 * F, gu + m * 2 * F + F, F, act + m * F);
    w_.down[i]->compute(act, rows, y, threads);
    for (int64_t j = 0; j < rows * D; ++j) hr[j] = hr[j] + y[j];
  }
  if (logits != nullptr && w_.head != nullptr) {
    kt->rms_norm(hp + (M - 1) * D, w_.norm, D, eps, x, 0, 1);
    w_.head->compute(x, 1, logits, threads);
  }
  return "";
}

}  // namespace lowbit
