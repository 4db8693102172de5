// AVX-512 VNNI instantiation of kernels_simd_impl.h: the same 256-bit kernels with vpdpbusd (u8 x s8 -> int32
// in one instruction, no int16 saturation), for CPUs such as Ice Lake / Sapphire Rapids / Zen 4.
//
// Only 256-bit (ymm, AVX-512VL) forms are used, so the tile layout is shared with the AVX2 path. Building
// with -DLOWBIT_NO_AVX512 (fast.py retries that way if the compiler rejects the target) leaves a stub.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "lowbit_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(LOWBIT_NO_AVX512)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni")
#include <immintrin.h>

#define LOWBIT_ISA_NS avx512vnni
#define LOWBIT_USE_VNNI 1
#include "kernels_simd_impl.h"
#include "kernels_gemm_impl.h"
#include "kernels_dwconv_impl.h"
#include "kernels_dense_impl.h"
#include "kernels_decode_impl.h"
#undef LOWBIT_USE_VNNI
#undef LOWBIT_ISA_NS
#pragma GCC pop_options

// Outside the target region: taking the addresses runs no wide instruction.
namespace lowbit {
const KernelTable* avx512vnni_kernels() {
  static const KernelTable table{"avx512vnni", 2 * avx512vnni::kGemmPairs, avx512vnni::kGemmMB, avx512vnni::gemm_scratch_bytes, avx512vnni::quantize, avx512vnni::gemm_small,
                                 avx512vnni::gemm_large, avx512vnni::dwconv, /*u8_rows=*/true,
                                 avx512vnni::rms_norm, avx512vnni::silu_mul, avx512vnni::attend,
                                 avx512vnni::prefill_attend, avx512vnni::dwconv_q, avx512vnni::dw_quantize,
                                 avx512vnni::gemv_f32, avx512vnni::dense_f32};
  return &table;
}
}  // namespace lowbit

#else
namespace lowbit {
const KernelTable* avx512vnni_kernels() { return nullptr; }
}  // namespace lowbit
#endif
