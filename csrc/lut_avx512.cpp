// lut_linear kernels for AVX-512 (int8 tables of 2/4-bit weights: AVX512-VNNI).
// Semantics: torchmerge/ops/lut.py (reference); layout of qweight: torchmerge/ops/lut_pack.py.
#include "lut_kernels.h"

#include <immintrin.h>

// GCC 12 false positive inside avx512fintrin.h (_mm512_undefined_* operands of masked intrinsics)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>

namespace torchmerge {
namespace lut {
namespace {

#define TM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

TM_AVX512 inline __m512 param16(const Problem& p, const void* at, int q) {
  return p.half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)at + q))
                : _mm512_loadu_ps(static_cast<const float*>(at) + 16 * q);
}

// y[16q..16q+15] += s·(f·P + c·Sx) with P in 16-lane float vectors.
TM_AVX512 inline void combine512(const Problem& p, int64_t nb, int64_t m, int64_t g, const __m512* P, float f, float* y) {
  const __m512 fv = _mm512_set1_ps(f), sxv = _mm512_set1_ps(p.sx[m * p.ng + g]);
  for (int q = 0; q < 4; ++q) {
    const __m512 s = param16(p, param_at(p, p.scales, g, nb), q);
    const __m512 c = p.zeros ? _mm512_sub_ps(_mm512_set1_ps(p.chalf), param16(p, param_at(p, p.zeros, g, nb), q))
                             : _mm512_set1_ps(p.csym);
    const __m512 t = _mm512_fmadd_ps(fv, P[q], _mm512_mul_ps(c, sxv));
    _mm512_storeu_ps(y + 16 * q, _mm512_fmadd_ps(s, t, _mm512_loadu_ps(y + 16 * q)));
  }
}

// MT activation rows per pass share each weight line (loaded and split into nibbles once).
template <int MT>
TM_AVX512 void block_int8_512(const Problem& p, int64_t nb, int64_t m0, float* y) {
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const int8_t* T[MT];
  for (int r = 0; r < MT; ++r) T[r] = p.tq.data() + (m0 + r) * (p.K / 4) * 16;
  const int64_t cpg = p.G / 8;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < p.ng; ++g) {
    __m512i a32[MT][4];
    for (int r = 0; r < MT; ++r)
      for (int q = 0; q < 4; ++q) a32[r][q] = _mm512_setzero_si512();
    for (int64_t c0 = g * cpg; c0 < (g + 1) * cpg; c0 += 8) {  // int16 holds 8 chunks: 8·254·15 < 2^15
      __m512i A[MT], B[MT];
      for (int r = 0; r < MT; ++r) A[r] = B[r] = _mm512_setzero_si512();
      for (int64_t c = c0; c < std::min(c0 + 8, (g + 1) * cpg); ++c) {
        for (int i = 0; i < p.bits; ++i) {
          prefetch_weights(qb + (c * p.bits + i) * RB, 1);
          const __m512i v = _mm512_loadu_si512(qb + (c * p.bits + i) * RB);
          const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
          const __m512i w = _mm512_set1_epi8(char(1 << i));
          for (int r = 0; r < MT; ++r) {
            const __m512i TA = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(T[r] + 2 * c * 16)));
            const __m512i TB = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(T[r] + (2 * c + 1) * 16)));
            const __m512i L0 = _mm512_shuffle_epi8(TA, lo), L1 = _mm512_shuffle_epi8(TB, hi);
            A[r] = _mm512_add_epi16(A[r], _mm512_maddubs_epi16(w, _mm512_unpacklo_epi8(L0, L1)));
            B[r] = _mm512_add_epi16(B[r], _mm512_maddubs_epi16(w, _mm512_unpackhi_epi8(L0, L1)));
          }
        }
      }
      for (int r = 0; r < MT; ++r) {
        a32[r][0] = _mm512_add_epi32(a32[r][0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(A[r])));
        a32[r][1] = _mm512_add_epi32(a32[r][1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(A[r], 1)));
        a32[r][2] = _mm512_add_epi32(a32[r][2], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(B[r])));
        a32[r][3] = _mm512_add_epi32(a32[r][3], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(B[r], 1)));
      }
    }
    for (int r = 0; r < MT; ++r) {
      __m512 P[4];
      for (int q = 0; q < 4; ++q) P[q] = _mm512_cvtepi32_ps(a32[r][q]);
      combine512(p, nb, m0 + r, g, P, 0.5f * p.ts[(m0 + r) * p.ng + g], y + r * RB);
    }
  }
}

// 16 rows 16q..16q+15 sit at byte positions p0..p0+7 and p0+16..p0+23, p0 = 32(q%2) + 8(q/2).
TM_AVX512 inline __m512i rows16_512(const uint8_t* line, int q) {
  const uint8_t* b = line + 32 * (q % 2) + 8 * (q / 2);
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)b), _mm_loadl_epi64((const __m128i*)(b + 16))));
}

TM_AVX512 void block_f32_512(const Problem& p, int64_t nb, int64_t m, float* y) {
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const float* T = p.tables.data() + m * (p.K / 4) * 16;
  const int64_t cpg = p.G / 8;
  for (int64_t g = 0; g < p.ng; ++g) {
    __m512 P[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const __m512 TA = _mm512_loadu_ps(T + 2 * c * 16), TB = _mm512_loadu_ps(T + (2 * c + 1) * 16);
      for (int i = 0; i < p.bits; ++i) {
        const uint8_t* line = qb + (c * p.bits + i) * RB;
        prefetch_weights(line, 1);
        const __m512 w = _mm512_set1_ps(float(1 << i));
        for (int q = 0; q < 4; ++q) {
          const __m512i idx = rows16_512(line, q);  // vpermps reads the low 4 index bits
          const __m512 L = _mm512_add_ps(_mm512_permutexvar_ps(idx, TA),
                                         _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), TB));
          P[q] = _mm512_add_ps(P[q], _mm512_mul_ps(L, w));
        }
      }
    }
    combine512(p, nb, m, g, P, 0.5f, y);
  }
}


// ---- b = 2 and b = 4: row-major words (lut_pack docstring); a 32-bit word holds 4 lookups of one row.
// int8 tables: per 64-byte line, byte lookups then vpdpbusd (u8 multipliers 2^i × s8 lookups -> int32
// row sums), exact. b = 4: line l = rows 16l.., low nibbles look up table 2c, high nibbles 2c+1.
// b = 2: line l, low nibbles rows 32l.., high 32l+16..; bytes 0, 1 of a word look up table 2c, bytes 2, 3
// table 2c+1. acc[r][s][q]: activation row r, q = row vector of 16 outputs; b = 4 with MT <= 2 splits the
// low/high lookups into s = 0, 1 (shorter vpdpbusd chains).
#define TM_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define TM_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

template <int MT>
constexpr int word_splits() { return MT <= 2 ? 2 : 1; }

template <int MT>
TM_AVX512 inline void zero_words(__m512i (&acc)[MT][word_splits<MT>()][4]) {
  for (auto& r : acc)
    for (auto& s : r)
      for (auto& q : s) q = _mm512_setzero_si512();
}

template <int MT>
TM_AVX512 inline void finish_words(const Problem& p, int64_t nb, int64_t m0, int64_t g,
                                   __m512i (&acc)[MT][word_splits<MT>()][4], float* y) {
  constexpr int S = word_splits<MT>();
  for (int r = 0; r < MT; ++r) {
    __m512 P[4];
    for (int q = 0; q < 4; ++q) P[q] = _mm512_cvtepi32_ps(S == 2 ? _mm512_add_epi32(acc[r][0][q], acc[r][1][q]) : acc[r][0][q]);
    combine512(p, nb, m0 + r, g, P, 0.5f * p.ts[(m0 + r) * p.ng + g], y + r * RB);
  }
}

// Tables 2c (TA) and 2c+1 (TB) of activation rows m0..m0+MT-1, each broadcast to all four 128-bit lanes.
template <int MT>
TM_AVX512 inline void broadcast_tables(const Problem& p, int64_t m0, int64_t c, __m512i (&TA)[MT], __m512i (&TB)[MT]) {
  for (int r = 0; r < MT; ++r) {
    const int8_t* t = p.tq.data() + ((m0 + r) * (p.K / 4) + 2 * c) * 16;
    TA[r] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)t));
    TB[r] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(t + 16)));
  }
}

// AVX512-VNNI: vpshufb reads 4 index bits within 128-bit lanes, so nibbles are masked first (2 shuffles,
// 2 vpdpbusd and 3 mask/shift ops per line).
template <int MT>
TM_VNNI void block_dp_512(const Problem& p, int64_t nb, int64_t m0, float* y) {
  constexpr int S = word_splits<MT>();
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const int64_t cpg = p.G / 8;
  const bool four = p.bits == 4;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i w = _mm512_set1_epi32(four ? 0x08040201 : 0x02010201);
  const __mmask64 second = 0xCCCCCCCCCCCCCCCCull;  // bytes 2, 3 of every word
  for (int64_t g = 0; g < p.ng; ++g) {
    __m512i acc[MT][S][4];
    zero_words<MT>(acc);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* line = qb + c * p.bits * RB;
      prefetch_weights(line, p.bits);
      __m512i TA[MT], TB[MT];
      broadcast_tables<MT>(p, m0, c, TA, TB);
      if (four) {
        for (int l = 0; l < 4; ++l) {
          const __m512i v = _mm512_loadu_si512(line + l * RB);
          const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
          for (int r = 0; r < MT; ++r) {
            acc[r][0][l] = _mm512_dpbusd_epi32(acc[r][0][l], w, _mm512_shuffle_epi8(TA[r], lo));
            acc[r][S - 1][l] = _mm512_dpbusd_epi32(acc[r][S - 1][l], w, _mm512_shuffle_epi8(TB[r], hi));
          }
        }
      } else {
        for (int l = 0; l < 2; ++l) {
          const __m512i v = _mm512_loadu_si512(line + l * RB);
          const __m512i idx[2] = {_mm512_and_si512(v, nib), _mm512_and_si512(_mm512_srli_epi16(v, 4), nib)};
          for (int h = 0; h < 2; ++h)
            for (int r = 0; r < MT; ++r) {
              const __m512i L = _mm512_mask_shuffle_epi8(_mm512_shuffle_epi8(TA[r], idx[h]), second, TB[r], idx[h]);
              acc[r][0][2 * l + h] = _mm512_dpbusd_epi32(acc[r][0][2 * l + h], w, L);
            }
        }
      }
    }
    finish_words<MT>(p, nb, m0, g, acc, y);
  }
}

// AVX512-VBMI: vpermb reads 6 index bits across the whole register, so no nibble masking is needed. b = 4:
// both tables are replicated to 64 bytes and bits 4, 5 of an index (the other nibble) pick a copy; the
// high nibbles are a 16-bit shift away. b = 2: one 64-byte table of quarters [2c, 2c+1, 2c, 2c+1] and
// index (nibble | 0x10 on bytes 2, 3) by one ternary-logic op. Same sums as block_dp_512, bit for bit.
template <int MT>
TM_VBMI void block_vb_512(const Problem& p, int64_t nb, int64_t m0, float* y) {
  constexpr int S = word_splits<MT>();
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const int64_t cpg = p.G / 8;
  const bool four = p.bits == 4;
  const __m512i w = _mm512_set1_epi32(four ? 0x08040201 : 0x02010201);
  const __m512i nib = _mm512_set1_epi8(0x0F), second = _mm512_set1_epi32(0x10100000);
  for (int64_t g = 0; g < p.ng; ++g) {
    __m512i acc[MT][S][4];
    zero_words<MT>(acc);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* line = qb + c * p.bits * RB;
      prefetch_weights(line, p.bits);
      __m512i TA[MT], TB[MT];
      broadcast_tables<MT>(p, m0, c, TA, TB);
      if (!four)
        for (int r = 0; r < MT; ++r) TA[r] = _mm512_mask_blend_epi64(0xCC, TA[r], TB[r]);  // quarters 2c, 2c+1, 2c, 2c+1
      if (four) {
        for (int l = 0; l < 4; ++l) {
          const __m512i v = _mm512_loadu_si512(line + l * RB), hi = _mm512_srli_epi16(v, 4);
          for (int r = 0; r < MT; ++r) {
            acc[r][0][l] = _mm512_dpbusd_epi32(acc[r][0][l], w, _mm512_permutexvar_epi8(v, TA[r]));
            acc[r][S - 1][l] = _mm512_dpbusd_epi32(acc[r][S - 1][l], w, _mm512_permutexvar_epi8(hi, TB[r]));
          }
        }
      } else {
        for (int l = 0; l < 2; ++l) {
          const __m512i v = _mm512_loadu_si512(line + l * RB);
          const __m512i idx[2] = {_mm512_ternarylogic_epi32(v, nib, second, 0xEA),  // (v & nib) | second
                                  _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nib, second, 0xEA)};
          for (int h = 0; h < 2; ++h)
            for (int r = 0; r < MT; ++r)
              acc[r][0][2 * l + h] = _mm512_dpbusd_epi32(acc[r][0][2 * l + h], w, _mm512_permutexvar_epi8(idx[h], TA[r]));
        }
      }
    }
    finish_words<MT>(p, nb, m0, g, acc, y);
  }
}

// fp32 tables: vpermps reads the low 4 bits of each word shifted right by the nibble's bit offset.
TM_AVX512 void block_dpf_512(const Problem& p, int64_t nb, int64_t m, float* y) {
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const float* T = p.tables.data() + m * (p.K / 4) * 16;
  const int64_t cpg = p.G / 8;
  const bool four = p.bits == 4;
  for (int64_t g = 0; g < p.ng; ++g) {
    __m512 P[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const __m512 TA = _mm512_loadu_ps(T + 2 * c * 16), TB = _mm512_loadu_ps(T + (2 * c + 1) * 16);
      const uint8_t* line = qb + c * p.bits * RB;
      prefetch_weights(line, p.bits);
      for (int l = 0; l < p.bits; ++l) {
        const __m512i v = _mm512_loadu_si512(line + l * RB);
        for (int h = 0; h < (four ? 1 : 2); ++h)
          for (int i = 0; i < (four ? 4 : 2); ++i) {
            // b = 4: plane i = byte i, halves = nibbles; b = 2: plane i = byte i (+2 for half 1), rows = nibble h
            const int sa = four ? 8 * i : 8 * i + 4 * h, sb = four ? 8 * i + 4 : 16 + 8 * i + 4 * h;
            const __m512 L = _mm512_add_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, sa), TA),
                                           _mm512_permutexvar_ps(_mm512_srli_epi32(v, sb), TB));
            const int q = four ? l : 2 * l + h;
            P[q] = _mm512_fmadd_ps(L, _mm512_set1_ps(float(1 << i)), P[q]);
          }
      }
    }
    combine512(p, nb, m, g, P, 0.5f, y);
  }
}

}  // namespace

BlockFn avx512_kernel(const Problem& p, int64_t mt, Isa isa) {
  const bool dp = p.bits == 2 || p.bits == 4;  // row-major word layout
  if (!p.int8) return dp ? block_dpf_512 : block_f32_512;
  if (!dp) return mt == 4 ? block_int8_512<4> : mt == 3 ? block_int8_512<3> : mt == 2 ? block_int8_512<2> : block_int8_512<1>;
  if (isa >= Isa::Avx512Vbmi) return mt == 4 ? block_vb_512<4> : mt == 3 ? block_vb_512<3> : mt == 2 ? block_vb_512<2> : block_vb_512<1>;
  if (isa >= Isa::Avx512Vnni) return mt == 4 ? block_dp_512<4> : mt == 3 ? block_dp_512<3> : mt == 2 ? block_dp_512<2> : block_dp_512<1>;
  return nullptr;
}

}  // namespace lut
}  // namespace torchmerge
