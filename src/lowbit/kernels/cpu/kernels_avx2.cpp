// AVX2 + FMA instantiation of kernels_simd_impl.h (maddubs/madd dot products).
//
// The target pragma scopes the wide instructions to this file, so the extension builds with the default
// (portable) compiler flags and binding.cpp only calls in here after checking the CPU at run time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "lowbit_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#define LOWBIT_ISA_NS avx2
#define LOWBIT_USE_VNNI 0
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
const KernelTable* avx2_kernels() {
  static const KernelTable table{"avx2", 2 * avx2::kGemmPairs, avx2::kGemmMB, avx2::gemm_scratch_bytes, avx2::quantize, avx2::gemm_small, avx2::gemm_large, avx2::dwconv, /*u8_rows=*/false,
                                 avx2::rms_norm, avx2::silu_mul, avx2::attend,
                                 avx2::prefill_attend, avx2::dwconv_q, avx2::dw_quantize,
                                 avx2::gemv_f32, avx2::dense_f32};
  return &table;
}
}  // namespace lowbit

#else
namespace lowbit {
const KernelTable* avx2_kernels() { return nullptr; }
}  // namespace lowbit
#endif
