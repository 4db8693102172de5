// Repacking of the stored bitstream (docs/PACKED_FORMAT.md) into the kernels' tile layout (lowbit_kernels.h).
// Runs once per weight at load time; plain C++ so that it works on every CPU.
#include <cstdint>

#include "lowbit_kernels.h"

namespace lowbit {

namespace {

// Code k of a row: bits [k*bits, k*bits + bits) of the LSB-first bitstream.
inline uint8_t code_at(const uint8_t* row, int64_t row_bytes, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = row[byte];
  if (shift + bits > 8 && byte + 1 < row_bytes) v |= static_cast<uint32_t>(row[byte + 1]) << 8;  // 3-bit straddle
  return static_cast<uint8_t>((v >> shift) & ((1u << bits) - 1u));
}

}  // namespace

void repack_tiles(const uint8_t* qweight, int64_t row_bytes, int bits, int64_t N, int64_t K, int cb,
                  uint8_t* out, int64_t t0, int64_t t1) {
  const int64_t KB = (K + kBlock - 1) / kBlock;
  for (int64_t t = t0; t < t1; ++t) {
    uint8_t* tile = out + t * KB * kBlock * cb;
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t n = t * kTileRows + r;
      if (n >= N) break;
      const uint8_t* row = qweight + n * row_bytes;
      for (int64_t k = 0; k < K; ++k) {
        const int within = static_cast<int>(k % kBlock);
        const int j = within / 4;        // unpacked vector
        const int p = j % cb, s = j / cb;  // packed vector and bit plane holding it
        tile[(k / kBlock) * kBlock * cb + p * 32 + r * 4 + within % 4] |=
            static_cast<uint8_t>(code_at(row, row_bytes, k, bits) << (s * cb));
      }
    }
  }
}

}  // namespace lowbit
