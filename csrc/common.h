// Shared helpers for all torchmerge CPU kernels: ISA dispatch and the integer rounding primitives.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>
#include <string>

namespace torchmerge {

// Best instruction set a kernel may use. Kernels keep a Scalar path; Avx2 needs avx2+fma;
// Avx512 needs avx512f+bw+vl (VNNI is probed separately with has_avx512_vnni()).
enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Best supported ISA, or the override set with torchmerge::_set_cpu_isa (tests force Scalar with it).
Isa active_isa();
// Whether the CPU has AVX512-VNNI (vpdpbusd); only meaningful when active_isa() == Isa::Avx512.
bool has_avx512_vnni();
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
