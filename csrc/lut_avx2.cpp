// lut_linear kernels for AVX2 (+FMA, F16C).
// Semantics: torchmerge/ops/lut.py (reference); layout of qweight: torchmerge/ops/lut_pack.py.
#include "lut_kernels.h"

#include <immintrin.h>

// GCC 12 false positive inside avx512fintrin.h (_mm512_undefined_* operands of masked intrinsics)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>

namespace torchmerge {
namespace lut {
namespace {

#define TM_AVX2 __attribute__((target("avx2,fma,f16c")))

TM_AVX2 inline __m256 param8(const Problem& p, const void* at, int u) {
  return p.half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)at + u))
                : _mm256_loadu_ps(static_cast<const float*>(at) + 8 * u);
}

TM_AVX2 inline void combine256(const Problem& p, int64_t nb, int64_t m, int64_t g, const __m256* P, float f, float* y) {
  const __m256 fv = _mm256_set1_ps(f), sxv = _mm256_set1_ps(p.sx[m * p.ng + g]);
  for (int u = 0; u < 8; ++u) {
    const __m256 s = param8(p, param_at(p, p.scales, g, nb), u);
    const __m256 c = p.zeros ? _mm256_sub_ps(_mm256_set1_ps(p.chalf), param8(p, param_at(p, p.zeros, g, nb), u))
                             : _mm256_set1_ps(p.csym);
    const __m256 t = _mm256_fmadd_ps(fv, P[u], _mm256_mul_ps(c, sxv));
    _mm256_storeu_ps(y + 8 * u, _mm256_fmadd_ps(s, t, _mm256_loadu_ps(y + 8 * u)));
  }
}

TM_AVX2 void block_int8_256(const Problem& p, int64_t nb, int64_t m, float* y) {
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const int8_t* T = p.tq.data() + m * (p.K / 4) * 16;
  const int64_t cpg = p.G / 8;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < p.ng; ++g) {
    __m256i a32[8];
    for (auto& a : a32) a = _mm256_setzero_si256();
    for (int64_t c0 = g * cpg; c0 < (g + 1) * cpg; c0 += 8) {
      __m256i R[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
      for (int64_t c = c0; c < std::min(c0 + 8, (g + 1) * cpg); ++c) {
        const __m256i TA = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(T + 2 * c * 16)));
        const __m256i TB = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(T + (2 * c + 1) * 16)));
        for (int i = 0; i < p.bits; ++i) {
          const __m256i w = _mm256_set1_epi8(char(1 << i));
          prefetch_weights(qb + (c * p.bits + i) * RB, 1);
          for (int h = 0; h < 2; ++h) {  // h=0: rows 0..15 (lo) and 32..47 (hi); h=1: 16..31 and 48..63
            const __m256i v = _mm256_loadu_si256((const __m256i*)(qb + (c * p.bits + i) * RB + 32 * h));
            const __m256i L0 = _mm256_shuffle_epi8(TA, _mm256_and_si256(v, nib));
            const __m256i L1 = _mm256_shuffle_epi8(TB, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib));
            R[h] = _mm256_add_epi16(R[h], _mm256_maddubs_epi16(w, _mm256_unpacklo_epi8(L0, L1)));
            R[2 + h] = _mm256_add_epi16(R[2 + h], _mm256_maddubs_epi16(w, _mm256_unpackhi_epi8(L0, L1)));
          }
        }
      }
      for (int u = 0; u < 4; ++u) {
        a32[2 * u] = _mm256_add_epi32(a32[2 * u], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(R[u])));
        a32[2 * u + 1] = _mm256_add_epi32(a32[2 * u + 1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(R[u], 1)));
      }
    }
    __m256 P[8];
    for (int u = 0; u < 8; ++u) P[u] = _mm256_cvtepi32_ps(a32[u]);
    combine256(p, nb, m, g, P, 0.5f * p.ts[m * p.ng + g], y);
  }
}

// 16-entry fp32 lookup with 8-entry vpermps: both halves, blend on index bit 3 (moved to the sign bit).
TM_AVX2 inline __m256 lookup16(__m256 lo8, __m256 hi8, __m256i idx, __m256i bit3_at_sign) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, idx), _mm256_permutevar8x32_ps(hi8, idx),
                          _mm256_castsi256_ps(bit3_at_sign));
}

TM_AVX2 void block_f32_256(const Problem& p, int64_t nb, int64_t m, float* y) {
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const float* T = p.tables.data() + m * (p.K / 4) * 16;
  const int64_t cpg = p.G / 8;
  for (int64_t g = 0; g < p.ng; ++g) {
    __m256 P[8];
    for (auto& v : P) v = _mm256_setzero_ps();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const float* ta = T + 2 * c * 16;
      const __m256 A0 = _mm256_loadu_ps(ta), A1 = _mm256_loadu_ps(ta + 8);
      const __m256 B0 = _mm256_loadu_ps(ta + 16), B1 = _mm256_loadu_ps(ta + 24);
      for (int i = 0; i < p.bits; ++i) {
        const uint8_t* line = qb + (c * p.bits + i) * RB;
        prefetch_weights(line, 1);
        const __m256 w = _mm256_set1_ps(float(1 << i));
        for (int u = 0; u < 8; ++u) {  // rows 8u..8u+7 at byte positions 16(u%4) + 8(u/4) + 0..7
          const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(line + 16 * (u % 4) + 8 * (u / 4))));
          const __m256 L0 = lookup16(A0, A1, idx, _mm256_slli_epi32(idx, 28));
          const __m256 L1 = lookup16(B0, B1, _mm256_srli_epi32(idx, 4), _mm256_slli_epi32(idx, 24));
          P[u] = _mm256_add_ps(P[u], _mm256_mul_ps(_mm256_add_ps(L0, L1), w));
        }
      }
    }
    combine256(p, nb, m, g, P, 0.5f, y);
  }
}

// b = 2 and 4 on AVX2: 32-byte halves u of line l hold 8 words; int16 pairs from vpmaddubsw are summed
// into int32 words by vpmaddwd with ones. Row vector (8 rows): b = 4: 2l + u; b = 2: 4l + 2h + u.
TM_AVX2 void block_dp_256(const Problem& p, int64_t nb, int64_t m, float* y) {
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const int8_t* T = p.tq.data() + m * (p.K / 4) * 16;
  const int64_t cpg = p.G / 8;
  const bool four = p.bits == 4;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i w = _mm256_set1_epi32(four ? 0x08040201 : 0x02010201);
  const __m256i second = _mm256_set1_epi32(int(0xFFFF0000u));  // bytes 2, 3 of every word
  for (int64_t g = 0; g < p.ng; ++g) {
    __m256i a32[8];
    for (auto& a : a32) a = _mm256_setzero_si256();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const __m256i TA = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(T + 2 * c * 16)));
      const __m256i TB = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(T + (2 * c + 1) * 16)));
      const uint8_t* line = qb + c * p.bits * RB;
      prefetch_weights(line, p.bits);
      for (int l = 0; l < p.bits; ++l)
        for (int u = 0; u < 2; ++u) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(line + l * RB + 32 * u));
          const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
          if (four) {
            const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(w, _mm256_shuffle_epi8(TA, lo)),
                                                 _mm256_maddubs_epi16(w, _mm256_shuffle_epi8(TB, hi)));
            a32[2 * l + u] = _mm256_add_epi32(a32[2 * l + u], _mm256_madd_epi16(s16, ones));
          } else {
            const __m256i idx[2] = {lo, hi};
            for (int h = 0; h < 2; ++h) {
              const __m256i L = _mm256_blendv_epi8(_mm256_shuffle_epi8(TA, idx[h]), _mm256_shuffle_epi8(TB, idx[h]), second);
              a32[4 * l + 2 * h + u] = _mm256_add_epi32(a32[4 * l + 2 * h + u], _mm256_madd_epi16(_mm256_maddubs_epi16(w, L), ones));
            }
          }
        }
    }
    __m256 P[8];
    for (int u = 0; u < 8; ++u) P[u] = _mm256_cvtepi32_ps(a32[u]);
    combine256(p, nb, m, g, P, 0.5f * p.ts[m * p.ng + g], y);
  }
}

TM_AVX2 void block_dpf_256(const Problem& p, int64_t nb, int64_t m, float* y) {
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const float* T = p.tables.data() + m * (p.K / 4) * 16;
  const int64_t cpg = p.G / 8;
  const bool four = p.bits == 4;
  for (int64_t g = 0; g < p.ng; ++g) {
    __m256 P[8];
    for (auto& v : P) v = _mm256_setzero_ps();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const float* ta = T + 2 * c * 16;
      const __m256 A0 = _mm256_loadu_ps(ta), A1 = _mm256_loadu_ps(ta + 8);
      const __m256 B0 = _mm256_loadu_ps(ta + 16), B1 = _mm256_loadu_ps(ta + 24);
      const uint8_t* line = qb + c * p.bits * RB;
      prefetch_weights(line, p.bits);
      for (int l = 0; l < p.bits; ++l)
        for (int u = 0; u < 2; ++u) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(line + l * RB + 32 * u));
          for (int h = 0; h < (four ? 1 : 2); ++h)
            for (int i = 0; i < (four ? 4 : 2); ++i) {
              const int sa = four ? 8 * i : 8 * i + 4 * h, sb = four ? 8 * i + 4 : 16 + 8 * i + 4 * h;
              // index bit 3 (word bit s+3) moved to the sign bit selects the upper 8 entries
              const __m256 L = _mm256_add_ps(lookup16(A0, A1, _mm256_srli_epi32(v, sa), _mm256_slli_epi32(v, 28 - sa)),
                                             lookup16(B0, B1, _mm256_srli_epi32(v, sb), _mm256_slli_epi32(v, 28 - sb)));
              const int q = four ? 2 * l + u : 4 * l + 2 * h + u;
              P[q] = _mm256_fmadd_ps(L, _mm256_set1_ps(float(1 << i)), P[q]);
            }
        }
    }
    combine256(p, nb, m, g, P, 0.5f, y);
  }
}

}  // namespace

BlockFn avx2_kernel(const Problem& p) {
  const bool dp = p.bits == 2 || p.bits == 4;  // row-major word layout
  return p.int8 ? (dp ? block_dp_256 : block_int8_256) : (dp ? block_dpf_256 : block_f32_256);
}

}  // namespace lut
}  // namespace torchmerge
