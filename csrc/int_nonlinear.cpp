// Integer-only non-linear kernels (I-ViT arXiv 2207.01405, I-BERT arXiv 2101.01321).
// Semantics are defined by the references in torchmerge/ops/intnonlinear.py; every step below mirrors one
// line there (int64 arithmetic, floor division, arithmetic shifts), so results are bit-identical.
#include "common.h"

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

at::Tensor isqrt_cpu(const at::Tensor& x) {
  check_int(x, "isqrt", {at::kInt, at::kLong}, "torch.int32 or torch.int64");
  const std::vector<int64_t> in = as_i64(x);
  for (int64_t v : in) TORCH_CHECK_VALUE(v >= 0, "isqrt: x must be non-negative");
  std::vector<int64_t> out(in.size());
  at::parallel_for(0, int64_t(in.size()), 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = isqrt64(in[i]);
  });
  return at::from_blob(out.data(), x.sizes(), at::kLong).to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
}

const char* kAnyInt = "torch.int8 or torch.int16 or torch.int32";

at::Tensor i_exp_cpu(const at::Tensor& x, double scale, std::string method) {
  check_int(x, "i_exp", {at::kChar, at::kShort, at::kInt}, kAnyInt);
  check_scale(scale, "i_exp");
  const ExpConsts k = exp_consts(scale, parse_method(method, "i_exp"));
  check_exp(scale, k, "i_exp");
  return map_rows(x, at::kInt, [&](const int64_t* in, int64_t* out, int64_t d) {
    for (int64_t i = 0; i < d; ++i) out[i] = exp_core(in[i], k);
  });
}

at::Tensor shiftmax_cpu(const at::Tensor& x, double scale, int64_t out_bits, std::string method) {
  check_int(x, "shiftmax", {at::kChar, at::kShort, at::kInt}, kAnyInt);
  check_scale(scale, "shiftmax", std::ldexp(1.0, -20));
  const ExpConsts k = exp_consts(scale, parse_method(method, "shiftmax"));
  TORCH_CHECK_VALUE(out_bits >= 2 && out_bits <= 16, "shiftmax: out_bits must be an int in [2, 16]; got ", out_bits);
  const int64_t top = (int64_t(1) << (out_bits - 1)) - 1;
  return map_rows(x, out_bits <= 8 ? at::kChar : at::kShort, [&](const int64_t* in, int64_t* out, int64_t d) {
    int64_t m = in[0];
    for (int64_t i = 1; i < d; ++i) m = std::max(m, in[i]);
    int64_t sum = 0;
    for (int64_t i = 0; i < d; ++i) sum += (out[i] = exp_core(in[i] - m, k));
    const int64_t factor = (int64_t(1) << 62) / sum;
    const int64_t half = int64_t(1) << (62 - out_bits);
    for (int64_t i = 0; i < d; ++i) out[i] = std::min((out[i] * factor + half) >> (63 - out_bits), top);
  });
}

// I-ViT int_exp_shift with n = 23; positive x only occurs in the published exp(-x_max) term.
int64_t gelu_exp(int64_t x, int64_t x0, bool published) {
  x = published ? x + (x >> 1) - (x >> 4) : x * 23;
  x = std::max(x, kGeluN * x0);
  const int64_t q = floor_div(x, x0), r = x - x0 * q;
  return ((r - 2 * x0) << std::min<int64_t>(kGeluN - q, 40)) >> 1;
}

at::Tensor shift_gelu_cpu(const at::Tensor& x, double scale, int64_t sigmoid_bits, bool published) {
  check_int(x, "shift_gelu", {at::kChar, at::kShort}, "torch.int8 or torch.int16");
  check_scale(scale, "shift_gelu", std::ldexp(1.0, -14));
  TORCH_CHECK_VALUE(sigmoid_bits >= 2 && sigmoid_bits <= 16, "shift_gelu: sigmoid_bits must be an int in [2, 16]; got ",
                    sigmoid_bits);
  const int64_t x0 = int64_t(std::floor((published ? -1.0 : -16.0) / (scale * 1.702)));
  const int64_t half = int64_t(1) << (62 - sigmoid_bits);
  const int64_t top = (int64_t(1) << (sigmoid_bits - 1)) - 1, cap31 = (int64_t(1) << 31) - 1;
  return map_rows(x, at::kInt, [&](const int64_t* in, int64_t* out, int64_t d) {
    int64_t row_max = in[0];
    for (int64_t i = 1; i < d; ++i) row_max = std::max(row_max, in[i]);
    for (int64_t i = 0; i < d; ++i) {
      const int64_t m = published ? row_max : std::max<int64_t>(in[i], 0);
      const int64_t e = gelu_exp(in[i] - m, x0, published), e_m = gelu_exp(-m, x0, published);
      int64_t sig;
      if (published) sig = (e * (cap31 / std::min(e + e_m, cap31))) >> (32 - sigmoid_bits);
      else sig = (e * ((int64_t(1) << 62) / (e + e_m)) + half) >> (63 - sigmoid_bits);
      out[i] = in[i] * std::min(sig, top);
    }
  });
}

at::Tensor i_gelu_cpu(const at::Tensor& x, double scale) {
  check_int(x, "i_gelu", {at::kChar, at::kShort, at::kInt}, kAnyInt);
  check_scale(scale, "i_gelu");
  const double s = scale / std::sqrt(2.0);
  const int64_t b = int64_t(std::floor(kErfB / s)), c = int64_t(std::floor(1.0 / kErfA / (s * s)));
  const double sig_scale = -(s * s) * kErfA * 16384.0;
  const int64_t one = int64_t(std::floor(1.0 / sig_scale));
  const int64_t lo = -(int64_t(1) << 31), hi = (int64_t(1) << 31) - 1;
  return map_rows(x, at::kInt, [&](const int64_t* in, int64_t* out, int64_t d) {
    for (int64_t i = 0; i < d; ++i) {
      const int64_t v = in[i], a = std::min<int64_t>(std::llabs(v), -b);
      const int64_t mag = (-((a + b) * (a + b) + c)) >> kGeluShift;
      const int64_t erf = v > 0 ? mag : (v < 0 ? -mag : 0);
      out[i] = saturate(v * (erf + one), lo, hi);
    }
  });
}

at::Tensor i_layernorm_cpu(const at::Tensor& x, const at::Tensor& multiplier, const at::Tensor& shift,
                           const at::Tensor& bias, at::ScalarType out_dtype) {
  const char* op = "i_layernorm";
  check_int(x, op, {at::kChar, at::kShort}, "torch.int8 or torch.int16");
  const int64_t D = x.size(-1);
  TORCH_CHECK_VALUE(D <= kMaxLnDim, op, ": x's last dim D=", D, " must be ≤ ", kMaxLnDim, " (D·Σx² must fit int64)");
  for (const auto* t : {&multiplier, &shift, &bias}) {
    const char* name = t == &multiplier ? "multiplier" : (t == &shift ? "shift" : "bias");
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) == D, op, ": ", name,
                      " must be a torch.int32 tensor of shape [", D, "]; got ", t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK_VALUE(out_dtype == at::kChar || out_dtype == at::kShort, op,
                    ": out_dtype must be torch.int8 or torch.int16; got ", out_dtype);
  const std::vector<int64_t> mult = as_i64(multiplier), sh = as_i64(shift), bs = as_i64(bias);
  for (int64_t v : sh) TORCH_CHECK_VALUE(v >= 0 && v <= 62, op, ": shift must be in [0, 62]");
  const int64_t q = out_dtype == at::kShort ? 32767 : 127;
  return map_rows(x, out_dtype, [&](const int64_t* in, int64_t* out, int64_t d) {
    int64_t sum = 0, sq = 0;
    for (int64_t i = 0; i < d; ++i) sum += in[i], sq += in[i] * in[i];
    const int64_t v = d * sq - sum * sum;  // D²·var, exact
    const int k = std::max(0, (62 - bit_length(uint64_t(v))) >> 1);
    const int64_t sigma = isqrt64(v << (2 * k));
    for (int64_t i = 0; i < d; ++i) {
      const int64_t y_hat = v > 0 ? floor_div((d * in[i] - sum) * (int64_t(1) << (k + kLnFracBits)), sigma) : 0;
      out[i] = saturate(round_shift(y_hat * mult[i], int(sh[i])) + bs[i], -q - 1, q);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmerge, CPU, m) {
  m.impl("isqrt", &isqrt_cpu);
  m.impl("i_exp", &i_exp_cpu);
  m.impl("shiftmax", &shiftmax_cpu);
  m.impl("shift_gelu", &shift_gelu_cpu);
  m.impl("i_gelu", &i_gelu_cpu);
  m.impl("i_layernorm", &i_layernorm_cpu);
}

}  // namespace torchmerge
