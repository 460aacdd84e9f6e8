// Shared by the lut_linear kernels (lut.cpp: tables, scalar path, op entry; lut_avx512.cpp; lut_avx2.cpp).
// Semantics: torchmerge/ops/lut.py (reference); layout of qweight: torchmerge/ops/lut_pack.py.
#pragma once

#include "common.h"

#include <xmmintrin.h>

#include <vector>

namespace torchmerge {
namespace lut {

constexpr int64_t RB = 64;  // rows per packed block
// Software prefetch distance in the weight stream. At decode sizes the GEMV is DRAM-bound, and the hardware
// prefetchers stop at 4 KiB page edges; 8 KiB ahead measured best among 2-32 KiB (ops_bench, cold).
constexpr int64_t kPrefetchBytes = 8192;

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

// Prefetch `lines` 64-byte lines kPrefetchBytes past `at` (prefetcht0; non-temporal measured no faster).
inline void prefetch_weights(const uint8_t* at, int lines) {
  for (int l = 0; l < lines; ++l) _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchBytes + l * RB), _MM_HINT_T0);
}

// A kernel adds the 64 outputs of block nb for `mt` consecutive activation rows m0.. into y[mt][64].
using BlockFn = void (*)(const Problem&, int64_t nb, int64_t m0, float* y);

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

// ISA kernels, chosen by Problem (bits, int8 tables) and the tier (isa >= Isa::Avx512). AVX-512:
// int8-table kernels take mt = 1..4 rows (returns null for 2/4-bit int8 tables below Avx512Vnni: use the
// AVX2 kernel), fp32-table ones mt = 1.
BlockFn avx512_kernel(const Problem& p, int64_t mt, Isa isa);
BlockFn avx2_kernel(const Problem& p);

}  // namespace lut
}  // namespace torchmerge
