// Portable kernels for the tile layout of lowbit_kernels.h: plain C++ for CPUs without AVX2 (or other
// architectures). Same arithmetic as the SIMD kernels (int32 block dot products, per-block activation scale),
// written for clarity; the compiler's default vectorizer does the rest.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lowbit_kernels.h"

namespace lowbit {
namespace {

// Must match the SIMD quantize bit for bit (see kernels_simd_impl.h): one scale per `ab` 32-blocks.
void quantize(const float* x, int64_t ldx, int64_t K, int64_t KB, int64_t ab, int64_t m0, int64_t m1, int8_t* xq,
              int64_t ldq, int64_t rg, float* a, int32_t* isum, bool u8, const ActStatic* st) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    auto value = [&](int64_t k) { return k < K ? xr[k] : 0.0f; };
    for (int64_t kb0 = 0; kb0 < KB; kb0 += ab) {
      const int64_t kb1 = std::min(KB, kb0 + ab);
      float amax = 0.0f;
      if (st == nullptr) {
        for (int64_t k = kb0 * kBlock; k < kb1 * kBlock; ++k) amax = std::max(amax, std::fabs(value(k)));
      }
      const float inv = st != nullptr ? st->inv : amax > 0.0f ? 127.0f / amax : 0.0f;
      const float lo = st != nullptr ? st->lo : -127.0f, hi = st != nullptr ? st->hi : 127.0f;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        a[m * KB + kb] = st != nullptr ? st->scale : amax / 127.0f;
        int32_t s = 0;
        int8_t* q = xq + (m / rg) * ldq + (kb * rg + m % rg) * kBlock;
        for (int i = 0; i < kBlock; ++i) {
          const float prod = std::min(hi, std::max(lo, value(kb * kBlock + i) * inv));  // static: clamp first
          const int32_t qi = static_cast<int32_t>(std::nearbyint(prod));  // round half to even
          q[i] = static_cast<int8_t>(u8 ? static_cast<uint8_t>(qi + 128) : qi);  // u8: the byte of xq + 128
          s += qi;
        }
        isum[m * KB + kb] = s;
      }
    }
  }
}

// Codes of one (tile, K-block) in unpacked order u[j*32 + r*4 + i] = code[row r][input 4j + i].
void unpack_block(const uint8_t* src, int cb, uint8_t* u) {
  if (cb == 8) {
    std::copy(src, src + 8 * kBlock, u);
    return;
  }
  const int mask = (1 << cb) - 1;
  for (int p = 0; p < cb; ++p) {
    for (int s = 0; s < 8 / cb; ++s) {
      const int j = p + cb * s;
      for (int b = 0; b < 32; ++b) u[j * 32 + b] = static_cast<uint8_t>((src[p * 32 + b] >> (s * cb)) & mask);
    }
  }
}

// Rows [m0, m1) x tiles [t0, t1).
void gemm(const Tiles& w, const Acts& all, const float* bias, float* y, int64_t t0, int64_t t1, int64_t m0,
          int64_t m1) {
  const int64_t KB = w.KB, G = w.G, M = m1 - m0, ldx = all.ldx;
  const Acts x{all.xq + m0 * ldx, all.a + m0 * KB, all.isum + m0 * KB, all.gsum + m0 * G, M, KB, G, ldx, all.ab, 1};
  y += m0 * w.N;
  const bool pc = G == 1;
  uint8_t u[8 * kBlock];
  std::vector<float> out(static_cast<size_t>(M) * kTileRows);
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(out.begin(), out.end(), 0.0f);
    const uint8_t* wt = w.w + t * KB * kBlock * w.cb;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const int64_t g = kb / w.gb;
      float gscale[kTileRows];
      for (int r = 0; r < kTileRows; ++r) gscale[r] = half_to_float(w.scales[(t * G + g) * kTileRows + r]);
      unpack_block(wt + kb * kBlock * w.cb, w.cb, u);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xb = x.xq + m * ldx + kb * kBlock;
        const float ab = x.a[m * KB + kb];
        for (int r = 0; r < kTileRows; ++r) {
          int32_t dot = 0;
          for (int j = 0; j < 8; ++j)
            for (int i = 0; i < 4; ++i) dot += static_cast<int32_t>(u[j * 32 + r * 4 + i]) * xb[4 * j + i];
          out[m * kTileRows + r] += static_cast<float>(dot) * (pc ? ab : gscale[r] * ab);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int r = 0; r < kTileRows; ++r) {
        const int64_t n = t * kTileRows + r;
        if (n >= w.N) break;
        float o = out[m * kTileRows + r];
        if (pc) o *= half_to_float(w.scales[t * kTileRows + r]);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t i = (t * G + g) * kTileRows + r;
          const float zf = w.mins != nullptr ? -half_to_float(w.mins[i])  // offset storage: + m * sum x
                           : half_to_float(w.scales[i]) * (w.zeros != nullptr ? static_cast<float>(w.zeros[i]) : 1.0f);
          o -= zf * x.gsum[m * G + g];
        }
        o += bias != nullptr ? bias[n] : 0.0f;
        y[m * w.N + n] = w.clamp ? std::min(std::max(o, w.lo), w.hi) : o;
      }
    }
  }
}

void gemm_small(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1) {
  gemm(w, x, bias, y, t0, t1, 0, x.M);
}

void gemm_large(const Tiles& w, const Acts& x, const float* bias, float* y, int64_t t0, int64_t t1, int64_t m0,
                int64_t m1, uint8_t*) {
  gemm(w, x, bias, y, t0, t1, m0, m1);
}

int64_t no_scratch(int64_t) { return 0; }

// Depthwise convolution (lowbit_kernels.h: DwConv), tap by tap with bounds checks.
void dwconv(const DwConv& p, int64_t r0, int64_t r1) {
  const int64_t C = p.C;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.OH, oh = r % p.OH;
    for (int64_t ow = 0; ow < p.OW; ++ow) {
      float* yp = p.y + (r * p.OW + ow) * C;
      for (int64_t c = 0; c < C; ++c) yp[c] = p.bias != nullptr ? p.bias[c] : 0.0f;
      for (int kh = 0; kh < p.KH; ++kh) {
        const int64_t ih = oh * p.SH - p.PT + kh;
        if (ih < 0 || ih >= p.H) continue;
        for (int kw = 0; kw < p.KW; ++kw) {
          const int64_t iw = ow * p.SW - p.PL + kw;
          if (iw < 0 || iw >= p.W) continue;
          const float* xp = p.x + ((b * p.H + ih) * p.W + iw) * C;
          const float* wp = p.w + (int64_t{kh} * p.KW + kw) * C;
          for (int64_t c = 0; c < C; ++c) yp[c] += wp[c] * xp[c];
        }
      }
      if (p.clamp) {
        for (int64_t c = 0; c < C; ++c) yp[c] = std::min(std::max(yp[c], p.lo), p.hi);
      }
    }
  }
}

// The int8 depthwise conv (DwConvQ) and its input quantization, plainly (same arithmetic as the SIMD ones:
// each int32 lane is a pair of int16 values, one pmaddwd = lo * lo + hi * hi).
int32_t madd_pair(int32_t x, int32_t w) {
  return static_cast<int32_t>(static_cast<int16_t>(x & 0xffff)) * static_cast<int16_t>(w & 0xffff) +
         static_cast<int32_t>(static_cast<int16_t>((x >> 16) & 0xffff)) * static_cast<int16_t>((w >> 16) & 0xffff);
}

void dwconv_q(const DwConvQ& p, int64_t r0, int64_t r1) {
  const int64_t C = p.C, KP = (p.KW + 1) / 2;
  std::vector<int32_t> acc(static_cast<size_t>(C));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.OH, oh = r % p.OH;
    for (int64_t ow = 0; ow < p.OW; ++ow) {
      std::fill(acc.begin(), acc.end(), 0);
      for (int kh = 0; kh < p.KH; ++kh) {
        const int64_t ih = oh * p.SH - p.PT + kh;
        if (ih < 0 || ih >= p.H) continue;
        for (int64_t t = 0; t < KP; ++t) {
          const int64_t iw = ow * p.SW - p.PL + 2 * t;  // the pair covers input columns iw, iw + 1
          if (iw < -1 || iw >= p.W) continue;
          const int32_t* xp = p.x + ((b * p.H + ih) * (p.W + 1) + iw + 1) * C;
          const int32_t* wp = p.w + (int64_t{kh} * KP + t) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += madd_pair(xp[c], wp[c]);
        }
      }
      float* yp = p.y + (r * p.OW + ow) * C;
      for (int64_t c = 0; c < C; ++c) {
        const float o = static_cast<float>(acc[c]) * p.scale[b * C + c] + (p.bias != nullptr ? p.bias[c] : 0.0f);
        yp[c] = p.clamp ? std::min(std::max(o, p.lo), p.hi) : o;
      }
    }
  }
}

void dw_quantize(const float* x, int64_t H, int64_t W, int64_t C, int32_t* xq, float* a, int64_t b0, int64_t b1) {
  std::vector<float> inv(static_cast<size_t>(C));
  const int64_t P = H * W;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      float mx = 0.0f;
      for (int64_t px = 0; px < P; ++px) mx = std::max(mx, std::fabs(x[(b * P + px) * C + c]));
      a[b * C + c] = mx / 127.0f;
      inv[c] = mx > 0.0f ? 127.0f / mx : 0.0f;
    }
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t c = 0; c < C; ++c) {
        auto code = [&](int64_t j) -> uint32_t {
          if (j < 0 || j >= W) return 0;
          return static_cast<uint32_t>(static_cast<int32_t>(std::nearbyint(x[((b * H + h) * W + j) * C + c] * inv[c])));
        };
        for (int64_t j = 0; j <= W; ++j) {
          xq[((b * H + h) * (W + 1) + j) * C + c] = static_cast<int32_t>((code(j - 1) & 0xffffu) | (code(j) << 16));
        }
      }
    }
  }
}

// The small float ops of a decode step (lowbit_kernels.h), plainly: same formulas as kernels_decode_impl.h
// (std::exp instead of its polynomial, sums in another order).
void rms_norm(const float* x, const float* w, int64_t D, float eps, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) ss += x[r * D + i] * x[r * D + i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) y[r * D + i] = x[r * D + i] * inv * w[i];
  }
}

void silu_mul(const float* g, const float* u, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

void gemv_f32(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y, int64_t N,
              int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[n * K + k];
      y[m * N + n] = s + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
}

void dense_f32(const DenseF32& p, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t n = 0; n < p.N; ++n) {
      float s = p.bias != nullptr ? p.bias[n] : 0.0f;
      for (int64_t k = 0; k < p.K; ++k) s += p.x[m * p.ldx + k] * p.wt[k * p.NP + n];
      p.y[m * p.ldy + n] = p.clamp ? std::min(std::max(s, p.lo), p.hi) : s;
    }
  }
}

void attend(const DecodeAttention& a, int64_t h0, int64_t h1) {
  std::vector<float> p(static_cast<size_t>(a.n));
  for (int64_t bh = h0; bh < h1; ++bh) {
    const int64_t b = bh / a.heads, g = (bh % a.heads) / (a.heads / a.kv_heads);
    const float* q = a.q + bh * a.hd;
    const float* k = a.k + (b * a.kv_heads + g) * a.kv_stride;
    const float* v = a.v + (b * a.kv_heads + g) * a.kv_stride;
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < a.n; ++j) {
      float s = 0.0f;
      for (int64_t i = 0; i < a.hd; ++i) s += q[i] * k[j * a.hd + i];
      p[j] = s * a.scale;
      mx = std::max(mx, p[j]);
    }
    for (int64_t j = 0; j < a.n; ++j) sum += (p[j] = std::exp(p[j] - mx));
    float* out = a.out + bh * a.hd;
    for (int64_t i = 0; i < a.hd; ++i) {
      float acc = 0.0f;
      for (int64_t j = 0; j < a.n; ++j) acc += p[j] * v[j * a.hd + i];
      out[i] = acc / sum;
    }
  }
}

// Causal prefill attention (PrefillAttention), one query vector at a time.
void prefill_attend(const PrefillAttention& a, int64_t u0, int64_t u1) {
  const int64_t hd = a.hd, rep = a.heads / a.kv_heads, blocks = (a.T + kPrefillRows - 1) / kPrefillRows;
  std::vector<float> p(static_cast<size_t>(a.n));
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t bg = u / blocks, rb = u % blocks, b = bg / a.kv_heads, g = bg % a.kv_heads;
    const float* k = a.k + (b * a.kv_heads + g) * a.kv_stride;
    const float* v = a.v + (b * a.kv_heads + g) * a.kv_stride;
    for (int64_t i = rb * kPrefillRows; i < std::min<int64_t>(a.T, (rb + 1) * kPrefillRows); ++i) {
      const int64_t m = i + a.n - a.T + 1;  // the causal prefix of row i
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        const float* q = a.q + b * a.q_sb + i * a.q_st + h * a.q_sh;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < m; ++j) {
          float s = 0.0f;
          for (int64_t d = 0; d < hd; ++d) s += q[d] * a.scale * k[j * hd + d];
          p[j] = s;
          mx = std::max(mx, s);
        }
        for (int64_t j = 0; j < m; ++j) sum += (p[j] = std::exp(p[j] - mx));
        float* out = a.out + ((b * a.T + i) * a.heads + h) * hd;
        for (int64_t d = 0; d < hd; ++d) {
          float acc = 0.0f;
          for (int64_t j = 0; j < m; ++j) acc += p[j] * v[j * hd + d];
          out[d] = acc / sum;
        }
      }
    }
  }
}

}  // namespace

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  float mag;
  if (exp == 0) {
    mag = std::ldexp(static_cast<float>(man), -24);  // zero / subnormal
  } else if (exp == 31) {
    mag = man == 0 ? INFINITY : NAN;
  } else {
    mag = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -mag : mag;
}

const KernelTable* scalar_kernels() {
  static const KernelTable table{"scalar", 1, 1, no_scratch, quantize, gemm_small, gemm_large, dwconv,
                                 /*u8_rows=*/false, rms_norm, silu_mul, attend, prefill_attend,
                                 dwconv_q, dw_quantize, gemv_f32, dense_f32};
  return &table;
}

}  // namespace lowbit
