// The torch-free core of the lowbit CPU engine: ISA selection, planned matmul calls on prepared weights, and a
// Llama-layout decoder (one-token step and prompt prefill) on raw pointers.
//
// Two front ends drive it: binding.cpp (the torch extension: tensors own the memory, torch's thread count) and
// capi.cpp (a plain C ABI for lowbit.runtime, which runs without torch). Neither owns any arithmetic: every output
// is computed here or in the kernel tables, so both compute the same bits. Not included by the per-ISA kernel
// files (it defines inline code; see lowbit_kernels.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "lowbit_kernels.h"
#include "work_pool.h"

namespace lowbit {

// --- instruction sets ---------------------------------------------------------------------------------------
bool cpu_supports(const std::string& isa);
// Kernel tables this build has and this CPU can run, best last.
std::vector<const KernelTable*> usable_tables();
// The selected kernels; atomic because set_isa may run while another thread computes.
std::atomic<const KernelTable*>& current_table();
std::vector<std::string> available_isas();
// Select an ISA by name; false (nothing changed) when this CPU/build lacks it.
bool select_isa(const std::string& name);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// --- one matmul call ----------------------------------------------------------------------------------------
// One matmul call, planned: the weight tiles, where x's quantized codes go, and the split of the work into
// units. run() drives it on the work pool (the quantization, then the units); the decoder drives the same
// two pieces from its one parallel region per token (Decoder::step), so both compute every output with the
// same instructions in the same order.
struct MatmulCall {
  const KernelTable* kt;
  const float* x;
  int64_t M, K, KB, G, gb, ab, ldq, rg;
  int8_t* xq;
  float* a;
  int32_t* isum;
  float* gsum;
  float zero_const;
  bool u8, has_static;
  ActStatic st;
  Tiles tiles;
  Acts acts;
  const float* bias;
  float* y;
  bool small;
  int64_t row_grain, unit_tiles, unit_rows, row_units, units, grain;

  // Quantize rows [m0, m1) of x.
  void quantize(int64_t m0, int64_t m1) const;
  // Work units [u0, u1) of the product (after every row is quantized).
  void compute_units(int64_t u0, int64_t u1) const;
};

// Quantize x, then the matmul, on the work pool.
void run(const MatmulCall& c, int threads);

// A prepared weight (see lowbit_kernels.h) on memory someone else owns, validated once by init(): the per-call
// path only checks the input.
struct PreparedWeight {
  const uint8_t* w = nullptr;        // tiles [T, KB, 32 * cb]
  const uint16_t* scales = nullptr;  // fp16 [T, G, 8]
  const uint8_t* zeros = nullptr;    // [T, G, 8] or nullptr (symmetric)
  const uint16_t* mins = nullptr;    // fp16 [T, G, 8] group minima (offset storage) or nullptr
  const float* bias = nullptr;       // [N] or nullptr
  float zero_const = 0.0f;
  int64_t cb = 0;
  bool full_byte = false;
  int64_t N = 0, K = 0, KB = 0, T = 0, G = 1, gb = 0, ab = 0;

  // Fill and validate: w_bytes / scales_t / scales_g / scales_r are the sizes of the tile and scale buffers
  // (zeros and mins are shaped like scales; at most one of them). "" when valid, else the error (one line).
  std::string init(const uint8_t* w, int64_t w_bytes, const uint16_t* scales, int64_t scales_t, int64_t scales_g,
                   int64_t scales_r, const uint8_t* zeros, const float* bias, double zero_const, int64_t cb,
                   bool full_byte, int64_t N, int64_t K, int64_t gb, int64_t ab, const uint16_t* mins = nullptr);

  // Bytes of the quantized activations of M rows (plan() lays them out).
  size_t act_bytes(const KernelTable* kt, int64_t M) const;
  // The call y [M, N] = x [M, K] . W^T (+ bias) with its activations in `act` (act_bytes(kt, M) bytes, 8-byte
  // aligned), split for `threads` threads.
  MatmulCall plan(const KernelTable* kt, const float* xp, int64_t M, float* yp, void* act, int threads,
                  bool clamp = false, float lo = 0.0f, float hi = 0.0f, const ActStatic* st = nullptr) const;
  // y [M, N] = x [M, K] . W^T (+ bias) on contiguous float32 rows, on the current kernels (activation buffer per
  // calling thread); clamp / st as in plan().
  void compute(const float* xp, int64_t M, float* yp, int threads, bool clamp = false, float lo = 0.0f,
               float hi = 0.0f, const ActStatic* st = nullptr) const;
};

// A stored bitstream qweight [N, row_bytes] of `bits`-bit codes -> tiles [T, KB, 32 * cb] in `out` (zero-filled).
void repack_weight(const uint8_t* qweight, int64_t row_bytes, int bits, int64_t N, int64_t K, int cb, uint8_t* out,
                   int threads);

// Heads of one query token over a KV cache on the current kernels, on the work pool when they are worth it.
void attend_heads(const DecodeAttention& a, int64_t B, int threads);

// A prefill's causal attention (lowbit_kernels.h: PrefillAttention) on the current kernels, on the work pool.
void prefill_attention(const PrefillAttention& a, int threads);

// One token's q / k / v rows (H, KV and KV heads of hd values) at the position of cos / sin: its query heads
// RoPE'd (x * cos + swap_halves(x) * sin, sin with the rotate-half sign folded in, two products and one sum per
// value, as torch computes lean_decode.py's formula) into q_out [H, hd], its key heads RoPE'd and its value heads copied to k_out / v_out + g * head_stride
// (the KV-cache entries of head g). What the decoder step, its prefill and the binding's rope_cache share.
void rope_token(const float* q, const float* k, const float* v, const float* c, const float* s, int64_t H,
                int64_t KV, int64_t hd, float* q_out, float* k_out, float* v_out, int64_t head_stride);

// --- the decoder --------------------------------------------------------------------------------------------
// Llama-layout decoder layers whose projections are all prepared weights (q/k/v fused in one call, gate/up in
// one), RMSNorm weights float32 [D]; with a head, the final norm and the packed lm_head. Pointers only: the
// caller keeps everything alive.
struct DecoderWeights {
  std::vector<const float*> in_norms, post_norms;
  std::vector<const PreparedWeight*> qkv, o, gate_up, down;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  double eps = 0.0;
  const float* norm = nullptr;
  const PreparedWeight* head = nullptr;
};

// The op sequence of lowbit/models/lean_decode.py's `_forward` with the kernels' RMSNorm, attention and silu_mul,
// RoPE and the residual adds in the same float operations. KV caches are float32 [L, B, KV, max_len, hd]; cos /
// sin [>= positions, hd] (sin with the rotate-half sign folded in, as lean_decode.py keeps it). Not for
// concurrent callers (the buffers are the decoder's own).
class Decoder {
 public:
  // "" when the shapes fit together, else the error.
  std::string init(DecoderWeights w);

  // One token per row: h [B, D] (the residual stream, updated in place) at position `pos`; layer i's K/V go to
  // entry fill[i]. With a head, logits [B, V] of the final-normed state. "" or the error (nothing computed).
  std::string step(float* h, int64_t B, float* logits, float* k_cache, float* v_cache, int64_t max_len,
                   const int64_t* fill, const float* cos, const float* sin, int64_t pos, int threads);

  // The prompt of one row: h [M, D] (its embeddings; the residual stream, updated) at positions 0..M-1, every
  // layer's K/V written to entries 0..M-1 of a batch-1 cache. The matmuls run on all M rows (the panel GEMM when
  // M > 4), attention is causal (row m over entries 0..m); the last layer's attention, o and MLP run on the last
  // row only (the others only fill the cache), and with a head, logits [V] of that row: lean_decode.py's prefill on
  // the kernels (their prefill attention included), the same ops in the same order. "" or the error.
  std::string prefill(float* h, int64_t M, float* logits, float* k_cache, float* v_cache, int64_t max_len,
                      const float* cos, const float* sin, int threads);

  int64_t layers() const { return static_cast<int64_t>(w_.qkv.size()); }
  int64_t hidden() const { return D_; }
  bool has_head() const { return w_.head != nullptr; }
  int64_t vocab() const { return w_.head == nullptr ? 0 : w_.head->N; }
  int64_t kv_heads() const { return w_.kv_heads; }
  int64_t head_dim() const { return w_.head_dim; }

 private:
  float* buffers(int64_t rows, float** parts);  // a call's temporaries, in the calling thread's arena
  DecoderWeights w_;
  int64_t D_ = 0, F_ = 0, row_ = 0;
  std::vector<int64_t> act_buf_;  // the quantized activations of the matmuls (one at a time)
  std::vector<MatmulCall> plans_;
  TokenPhases phases_;
};

}  // namespace lowbit
