// Scalar building blocks of the integer-only kernels: constants and per-element steps that mirror
// torchmerge/ops/intnonlinear.py line by line. Included only by int_nonlinear.cpp.
#pragma once

#include "common.h"

#include <immintrin.h>

#include <cmath>
#include <vector>

namespace torchmerge {
namespace {

constexpr int kFineBits = 4;  // shift-exp keeps x·log2(e) ≈ 23x/16 exactly (units of scale/16)
constexpr int kShiftN = 15, kGeluN = 23, kPolyN = 30, kGeluShift = 14, kLnFracBits = 12;
constexpr double kExpA = 0.35815147, kExpB = 0.96963238;  // I-BERT exp polynomial
constexpr double kErfA = -0.2888, kErfB = -1.769;           // I-BERT erf polynomial
constexpr int64_t kMaxLnDim = int64_t(1) << 16;

int bit_length(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

// floor(sqrt(n)): Newton from 2^ceil(bits/2) down to the fixed point.
int64_t isqrt64(int64_t n) {
  int64_t r = int64_t(1) << ((bit_length(uint64_t(n)) + 1) >> 1);
  while (true) {
    const int64_t next = (r + n / std::max<int64_t>(r, 1)) >> 1;
    if (next >= r) return r;
    r = next;
  }
}

void check_int(const at::Tensor& x, const char* op, std::initializer_list<at::ScalarType> types, const char* names) {
  bool ok = x.dim() >= 1;
  bool in = false;
  for (auto t : types) in = in || x.scalar_type() == t;
  TORCH_CHECK_VALUE(ok && in, op, ": x must be a tensor of dtype ", names, " with ≥1 dim; got ", x.scalar_type());
}

void check_scale(double scale, const char* op, double low = 0.0) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > low, op, ": scale must be a finite float > ", low, "; got ", scale);
}

// Load any int8/16/32/64 tensor as a contiguous int64 copy (the references compute in int64).
std::vector<int64_t> as_i64(const at::Tensor& x) {
  at::Tensor c = x.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

template <typename Fn>
at::Tensor map_rows(const at::Tensor& x, at::ScalarType out_type, Fn fn) {
  const std::vector<int64_t> in = as_i64(x);
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  std::vector<int64_t> out(in.size());
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) fn(in.data() + r * d, out.data() + r * d, d);
  });
  return at::from_blob(out.data(), x.sizes(), at::kLong).to(out_type, /*non_blocking=*/false, /*copy=*/true);
}

struct ExpConsts {
  bool shift;
  int64_t x0, n, b, c;
};

ExpConsts exp_consts(double scale, bool shift) {
  if (shift) return {true, int64_t(std::floor(-16.0 / scale)), kShiftN, 0, 0};
  return {false, int64_t(std::floor(-std::log(2.0) / scale)), kPolyN, int64_t(std::floor(kExpB / kExpA / scale)),
          int64_t(std::floor(1.0 / kExpA / (scale * scale)))};
}

bool parse_method(const std::string& method, const char* op) {
  TORCH_CHECK_VALUE(method == "shift" || method == "poly", op, ": method must be one of ('shift', 'poly'); got '",
                    method, "'");
  return method == "shift";
}

void check_exp(double scale, const ExpConsts& k, const char* op) {
  const int64_t top = k.shift ? (-k.x0) << kShiftN : k.c;
  TORCH_CHECK_VALUE(top < (int64_t(1) << 31), op, ": scale=", scale, " is too small for method='",
                    k.shift ? "shift" : "poly", "': exp(0) would overflow int32");
}

int64_t exp_core(int64_t x, const ExpConsts& k) {
  x = std::min<int64_t>(x, 0);
  if (k.shift) x = x * 23;
  x = std::max(x, k.n * k.x0);
  const int64_t q = floor_div(x, k.x0), r = x - k.x0 * q;
  if (k.shift) return ((r - 2 * k.x0) << (k.n - q)) >> 1;
  return (r * (r + k.b) + k.c) >> q;
}


// I-ViT int_exp_shift with n = 23; positive x only occurs in the published exp(-x_max) term.
int64_t gelu_exp(int64_t x, int64_t x0, bool published) {
  x = published ? x + (x >> 1) - (x >> 4) : x * 23;
  x = std::max(x, kGeluN * x0);
  const int64_t q = floor_div(x, x0), r = x - x0 * q;
  return ((r - 2 * x0) << std::min<int64_t>(kGeluN - q, 40)) >> 1;
}

}  // namespace
}  // namespace torchmerge
