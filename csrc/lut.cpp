// T-MAC table-lookup linear (arXiv 2407.00088): torchmerge::lut_linear.
// Semantics: torchmerge/ops/lut.py (reference); layout of qweight: torchmerge/ops/lut_pack.py.
// Tables and int8 table codes are bit-identical to the reference; float sums run in this order:
// per (row m, 64-row block) and group g, P = Σ_chunks Σ_planes 2^i·(lookup_lo + lookup_hi), then
// y += s·(0.5·ts·P + c·Sx) group after group (int8 tables: P is an exact integer sum; vector paths
// fuse the last two steps into FMAs), so results match the reference up to float summation order.
#include "common.h"

#include <immintrin.h>

// GCC 12 false positive inside avx512fintrin.h (_mm512_undefined_* operands of masked intrinsics)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace torchmerge {
namespace {

constexpr int64_t RB = 64;  // rows per packed block
constexpr int64_t kAhead = 64;  // chunks of software prefetch: the weight stream is DRAM-bound at large K

struct Problem {
  int64_t M = 0, K = 0, N = 0, NB = 0, KC = 0, G = 0, ng = 0;
  int bits = 0;
  bool int8 = false;
  const uint8_t* qw = nullptr;
  const void* scales = nullptr;   // [NB, ng, 64] float32 or float16 (half = true)
  const void* zeros = nullptr;    // like scales, or null (symmetric)
  bool half = false;
  float csym = 0.f, chalf = 0.f;  // c = chalf - z (asymmetric) or csym (symmetric)
  std::vector<float> tables;      // [M, K/4, 16] fp32 tables (fp32 mode)
  std::vector<int8_t> tq;         // [M, K/4, 16] int8 tables (int8 mode)
  std::vector<float> ts, sx;      // [M, ng]
};

// Tables for one (row, group): 8 entries with bit 3 set computed in the reference's order, 8 mirrored.
void build_group(Problem& p, const float* x, int64_t m, int64_t g) {
  const int64_t t0 = g * (p.G / 4), nt = p.G / 4;
  float local[16 * 256];
  float* T = p.int8 ? (nt <= 256 ? local : nullptr) : p.tables.data() + (m * (p.K / 4) + t0) * 16;
  std::vector<float> big;
  if (!T) { big.resize(nt * 16); T = big.data(); }
  float amax = 0.f, sum = 0.f;
  for (int64_t t = 0; t < nt; ++t) {
    const float* xs = x + (t0 + t) * 4;
    float* e = T + t * 16;
    for (int idx = 8; idx < 16; ++idx) {
      float v = (idx & 1) ? xs[0] : -xs[0];
      v = (idx & 2) ? v + xs[1] : v - xs[1];
      v = (idx & 4) ? v + xs[2] : v - xs[2];
      v = (idx & 8) ? v + xs[3] : v - xs[3];
      e[idx] = v;
      e[15 - idx] = -v;
      amax = std::max(amax, std::fabs(v));
    }
    for (int j = 0; j < 4; ++j) sum += xs[j];
  }
  p.sx[m * p.ng + g] = sum;
  if (!p.int8) return;
  const float ts = amax == 0.f ? 1.f : amax / 127.0f;
  p.ts[m * p.ng + g] = ts;
  int8_t* q = p.tq.data() + (m * (p.K / 4) + t0) * 16;
  // RNE by the 1.5·2^23 trick (exact for |v| <= 127.5; vectorises, unlike nearbyint)
  for (int64_t e = 0; e < nt * 16; ++e) q[e] = int8_t(int((T[e] / ts + 12582912.0f) - 12582912.0f));
}

// Nibble slot (byte = slot / 2, high nibble iff slot odd) among the bits·64 bytes of one chunk of
// the index of row r, bit-plane i, table half a (lut_pack.nibble_slots).
inline int slot_of(int bits, int r, int i, int a) {
  if (bits == 4) return 2 * (64 * (r / 16) + 4 * (r % 16) + i) + a;
  if (bits == 2) return 2 * (64 * (r / 32) + 4 * (r % 16) + 2 * a + i) + (r / 16) % 2;
  const int pos = 16 * ((r % 32) / 8) + 8 * (r / 32) + r % 8;  // inverse of lut_pack.row_of_position
  return 2 * (64 * i + pos) + a;
}
inline int nibble_at(const uint8_t* chunk, int slot) { return (chunk[slot >> 1] >> (4 * (slot & 1))) & 15; }

// Address of the 64 group parameters of (block nb, group g); element size 2 (float16) or 4 (float32).
inline const void* param_at(const Problem& p, const void* base, int64_t g, int64_t nb) {
  return static_cast<const char*>(base) + (nb * p.ng + g) * RB * (p.half ? 2 : 4);
}
inline float param_scalar(const Problem& p, const void* at, int r) {
  return p.half ? float(static_cast<const c10::Half*>(at)[r]) : static_cast<const float*>(at)[r];
}

// y[r] += s·(f·P[r] + c·Sx) for the 64 rows of a block; P given as float.
inline void combine_scalar(const Problem& p, int64_t nb, int64_t m, int64_t g, const float* P, float f, float* y) {
  const void* s = param_at(p, p.scales, g, nb);
  const float sx = p.sx[m * p.ng + g];
  for (int r = 0; r < RB; ++r) {
    const float c = p.zeros ? p.chalf - param_scalar(p, param_at(p, p.zeros, g, nb), r) : p.csym;
    y[r] += param_scalar(p, s, r) * (f * P[r] + c * sx);
  }
}

void block_scalar(const Problem& p, int64_t nb, int64_t m, float* y) {
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const int64_t cpg = p.G / 8;
  int16_t slot[RB][4][2];
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < p.bits; ++i)
      for (int a = 0; a < 2; ++a) slot[r][i][a] = int16_t(slot_of(p.bits, r, i, a));
  float P[RB];
  for (int64_t g = 0; g < p.ng; ++g) {
    if (p.int8) {
      int32_t acc[RB] = {0};
      const int8_t* T = p.tq.data() + m * (p.K / 4) * 16;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const uint8_t* v = qb + c * p.bits * RB;
        for (int i = 0; i < p.bits; ++i)
          for (int r = 0; r < RB; ++r)
            acc[r] += (T[2 * c * 16 + nibble_at(v, slot[r][i][0])] + T[(2 * c + 1) * 16 + nibble_at(v, slot[r][i][1])]) * (1 << i);
      }
      for (int r = 0; r < RB; ++r) P[r] = float(acc[r]);
      combine_scalar(p, nb, m, g, P, 0.5f * p.ts[m * p.ng + g], y);
    } else {
      std::fill(P, P + RB, 0.f);
      const float* T = p.tables.data() + m * (p.K / 4) * 16;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const uint8_t* v = qb + c * p.bits * RB;
        for (int i = 0; i < p.bits; ++i)
          for (int r = 0; r < RB; ++r)
            P[r] += (T[2 * c * 16 + nibble_at(v, slot[r][i][0])] + T[(2 * c + 1) * 16 + nibble_at(v, slot[r][i][1])]) * float(1 << i);
      }
      combine_scalar(p, nb, m, g, P, 0.5f, y);
    }
  }
}

#define TM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define TM_AVX2 __attribute__((target("avx2,fma,f16c")))

TM_AVX512 inline __m512 param16(const Problem& p, const void* at, int q) {
  return p.half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)at + q))
                : _mm512_loadu_ps(static_cast<const float*>(at) + 16 * q);
}
TM_AVX2 inline __m256 param8(const Problem& p, const void* at, int u) {
  return p.half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)at + u))
                : _mm256_loadu_ps(static_cast<const float*>(at) + 8 * u);
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
          _mm_prefetch((const char*)(qb + ((c + kAhead) * p.bits + i) * RB), _MM_HINT_T0);
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
        _mm_prefetch((const char*)(line + kAhead * p.bits * RB), _MM_HINT_T0);
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
#define TM_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// int8 tables, AVX512-VNNI: per 64-byte line, 2 byte shuffles and 2 vpdpbusd (u8 multipliers 2^i ×
// s8 lookups -> int32 row sums), exact. b = 4: line l = rows 16l.., low nibbles table 2c, high 2c+1.
// b = 2: line l, low nibbles rows 32l.., high 32l+16..; bytes 2, 3 of a word look up table 2c+1.
template <int MT>
TM_VNNI void block_dp_512(const Problem& p, int64_t nb, int64_t m0, float* y) {
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const int8_t* T[MT];
  for (int r = 0; r < MT; ++r) T[r] = p.tq.data() + (m0 + r) * (p.K / 4) * 16;
  const int64_t cpg = p.G / 8;
  const bool four = p.bits == 4;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i w = _mm512_set1_epi32(four ? 0x08040201 : 0x02010201);
  const __mmask64 second = 0xCCCCCCCCCCCCCCCCull;  // bytes 2, 3 of every word
  constexpr int S = MT <= 2 ? 2 : 1;  // b = 4: separate low/high accumulators shorten the vpdpbusd chains
  for (int64_t g = 0; g < p.ng; ++g) {
    __m512i acc[MT][S][4];
    for (int r = 0; r < MT; ++r)
      for (int s = 0; s < S; ++s)
        for (int q = 0; q < 4; ++q) acc[r][s][q] = _mm512_setzero_si512();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const uint8_t* line = qb + c * p.bits * RB;
      for (int l = 0; l < p.bits; ++l) _mm_prefetch((const char*)(line + kAhead * p.bits * RB + l * RB), _MM_HINT_T0);
      __m512i TA[MT], TB[MT];
      for (int r = 0; r < MT; ++r) {
        TA[r] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(T[r] + 2 * c * 16)));
        TB[r] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(T[r] + (2 * c + 1) * 16)));
      }
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
    for (int r = 0; r < MT; ++r) {
      __m512 P[4];
      for (int q = 0; q < 4; ++q) P[q] = _mm512_cvtepi32_ps(S == 2 ? _mm512_add_epi32(acc[r][0][q], acc[r][S - 1][q]) : acc[r][0][q]);
      combine512(p, nb, m0 + r, g, P, 0.5f * p.ts[(m0 + r) * p.ng + g], y + r * RB);
    }
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
      for (int l = 0; l < p.bits; ++l) _mm_prefetch((const char*)(line + kAhead * p.bits * RB + l * RB), _MM_HINT_T0);
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
          _mm_prefetch((const char*)(qb + ((c + kAhead) * p.bits + i) * RB), _MM_HINT_T0);
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
        _mm_prefetch((const char*)(line + kAhead * p.bits * RB), _MM_HINT_T0);
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
      for (int l = 0; l < p.bits; ++l) _mm_prefetch((const char*)(line + kAhead * p.bits * RB + l * RB), _MM_HINT_T0);
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
      for (int l = 0; l < p.bits; ++l) _mm_prefetch((const char*)(line + kAhead * p.bits * RB + l * RB), _MM_HINT_T0);
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

at::Tensor lut_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros, int64_t out_features, int64_t bits,
                          int64_t group_size, bool int8_tables,
                          const std::optional<at::Tensor>& bias) {
  const char* op = "lut_linear";
  const auto xt = x.scalar_type();
  TORCH_CHECK_VALUE((xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf) && x.dim() >= 1, op,
                    ": x must be a float32/bfloat16/float16 tensor [..., K]; got ", xt, " ", x.sizes());
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 4, op, ": bits must be one of (1, 2, 3, 4); got ", bits);
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(group_size > 0 && group_size % 8 == 0 && K % group_size == 0, op,
                    ": group_size must be a positive multiple of 8 that divides K=", K, " (e.g. 32, 64, 128); got ", group_size);
  TORCH_CHECK_VALUE(out_features >= 1, op, ": out_features must be a positive int (N); got ", out_features);
  Problem p;
  p.K = K; p.N = out_features; p.NB = (p.N + RB - 1) / RB; p.KC = K / 8; p.G = group_size; p.ng = K / group_size;
  TORCH_CHECK_VALUE((scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf) && scales.dim() == 3 && scales.size(0) == p.NB &&
                        scales.size(1) == p.ng && scales.size(2) == RB,
                    op, ": scales must be torch.float32 or torch.float16 of shape [ceil(N/64), K/group_size, 64] = [", p.NB, ", ", p.ng,
                    ", 64]; got ", scales.scalar_type(), " ", scales.sizes());
  p.bits = int(bits); p.int8 = int8_tables;
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte && qweight.dim() == 4 && qweight.size(0) == p.NB &&
                        qweight.size(1) == p.KC && qweight.size(2) == bits && qweight.size(3) == RB,
                    op, ": qweight must be torch.uint8 of shape [ceil(N/64), K/8, bits, 64] = [", p.NB, ", ", p.KC, ", ",
                    bits, ", 64]; got ", qweight.scalar_type(), " ", qweight.sizes());
  if (zeros) TORCH_CHECK_VALUE(zeros->scalar_type() == scales.scalar_type() && zeros->sizes() == scales.sizes(), op,
                               ": zeros must be None (symmetric) or a tensor of scales' dtype and shape ", scales.sizes());
  if (bias) TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == p.N, op,
                              ": bias must be None or a torch.float32 tensor [", p.N, "]");
  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  p.M = x2.size(0);
  const at::Tensor qw = qweight.contiguous();
  p.qw = qw.data_ptr<uint8_t>();
  const at::Tensor sc = scales.contiguous(), zc = zeros ? zeros->contiguous() : at::Tensor();
  p.half = sc.scalar_type() == at::kHalf;
  p.scales = sc.data_ptr(); p.zeros = zeros ? zc.data_ptr() : nullptr;
  p.chalf = float((1 << bits) - 1) / 2.f;
  p.csym = bits == 1 ? 0.f : -0.5f;  // (2^b-1)/2 - z_sym
  if (p.int8) { p.tq.resize(p.M * (K / 4) * 16); p.ts.resize(p.M * p.ng); }
  else p.tables.resize(p.M * (K / 4) * 16);
  p.sx.resize(p.M * p.ng);
  const float* xp = x2.data_ptr<float>();
  at::parallel_for(0, p.M * p.ng, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) build_group(p, xp + (t / p.ng) * K, t / p.ng, t % p.ng);
  });
  at::Tensor out = at::empty({p.M, p.N}, x2.options());
  float* po = out.data_ptr<float>();
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  const float* pb = bias ? bias_c.data_ptr<float>() : nullptr;
  const Isa isa = active_isa();
  // A kernel handles `mt` consecutive activation rows (the AVX-512 int8 ones up to 4, the others 1).
  using BlockFn = void (*)(const Problem&, int64_t, int64_t, float*);
  const bool dp = p.bits == 2 || p.bits == 4;  // row-major word layout
  const bool vnni = isa == Isa::Avx512 && has_avx512_vnni();
  const bool tiled = isa == Isa::Avx512 && p.int8 && (!dp || vnni);
  BlockFn one = isa == Isa::Avx512 ? (p.int8 ? (dp ? (vnni ? block_dp_512<1> : block_dp_256) : block_int8_512<1>)
                                             : (dp ? block_dpf_512 : block_f32_512))
              : isa == Isa::Avx2   ? (p.int8 ? (dp ? block_dp_256 : block_int8_256) : (dp ? block_dpf_256 : block_f32_256))
                                   : block_scalar;
  constexpr int64_t MT = 4;
  at::parallel_for(0, p.NB, 1, [&](int64_t b, int64_t e) {
    alignas(64) float y[MT * RB];
    for (int64_t nb = b; nb < e; ++nb)
      for (int64_t m0 = 0; m0 < p.M; m0 += tiled ? MT : 1) {
        const int64_t mt = tiled ? std::min(MT, p.M - m0) : 1;
        std::fill(y, y + mt * RB, 0.f);
        BlockFn fn = !tiled ? one
                   : dp ? (mt == 4 ? block_dp_512<4> : mt == 3 ? block_dp_512<3> : mt == 2 ? block_dp_512<2> : block_dp_512<1>)
                        : (mt == 4 ? block_int8_512<4> : mt == 3 ? block_int8_512<3> : mt == 2 ? block_int8_512<2> : block_int8_512<1>);
        fn(p, nb, m0, y);
        const int64_t rows = std::min(RB, p.N - nb * RB);
        for (int64_t r = 0; r < mt; ++r)
          for (int64_t j = 0; j < rows; ++j)
            po[(m0 + r) * p.N + nb * RB + j] = pb ? y[r * RB + j] + pb[nb * RB + j] : y[r * RB + j];
      }
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(p.N);
  return out.reshape(shape).to(xt);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmerge, CPU, m) { m.impl("lut_linear", &lut_linear_cpu); }

}  // namespace torchmerge
