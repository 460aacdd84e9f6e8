// Shared helpers for all torchmerge CPU kernels: ISA dispatch and the integer rounding primitives.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>
#include <string>

namespace torchmerge {

// Instruction-set tiers, each including the ones below it. Kernels keep a Scalar path; Avx2 needs
// avx2+fma; Avx512 needs avx512f+bw+vl; Avx512Vnni adds avx512vnni (vpdpbusd, Cascade Lake on);
// Avx512Vbmi adds avx512vbmi as well (vpermb, Ice Lake and Zen 4 on). Compare with >=.
enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3, Avx512Vbmi = 4 };

// Best supported tier, or the one forced with torchmerge::_set_cpu_isa (tests run every tier with it).
Isa active_isa();
const char* isa_name(Isa isa);

// Round half up, then arithmetic shift: floor(v / 2^s + 1/2), s in [0, 62].
inline int64_t round_shift(int64_t v, int s) {
  return s == 0 ? v : (v + (int64_t(1) << (s - 1))) >> s;
}

inline int64_t saturate(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Floor division for a positive divisor (C++ '/' truncates toward zero).
inline int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}

}  // namespace torchmerge
