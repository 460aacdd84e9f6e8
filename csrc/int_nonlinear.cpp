// Integer-only non-linear kernels (I-ViT arXiv 2207.01405, I-BERT arXiv 2101.01321).
// Semantics are defined by the references in torchmerge/ops/intnonlinear.py; every step below mirrors one
// line there (int64 arithmetic, floor division, arithmetic shifts), so results are bit-identical.
#include "int_nonlinear_scalar.h"
#include "int_nonlinear_simd.h"

#include <vector>

namespace torchmerge {
namespace {

template <typename Fn>
void with_int_type(at::ScalarType t, Fn fn) {
  switch (t) {
    case at::kChar: fn(int8_t(0)); break;
    case at::kShort: fn(int16_t(0)); break;
    default: fn(int32_t(0)); break;
  }
}

int64_t row_grain(int64_t d, int64_t work = 16384) { return std::max<int64_t>(1, work / std::max<int64_t>(d, 1)); }

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
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kInt));
  int32_t* op = out.data_ptr<int32_t>();
  with_int_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* ip = xc.data_ptr<T>();
    at::parallel_for(0, xc.numel(), 16384, [&](int64_t b, int64_t e) {
      if constexpr (sizeof(T) <= 2) {
        if (vec_level() == 2 && k.shift) return i_exp_zmm(ip, op, b, e, &k);
      }
      TM_DISPATCH(i_exp_body, ip, op, b, e, &k);
    });
  });
  return out;
}

at::Tensor shiftmax_cpu(const at::Tensor& x, double scale, int64_t out_bits, std::string method) {
  check_int(x, "shiftmax", {at::kChar, at::kShort, at::kInt}, kAnyInt);
  check_scale(scale, "shiftmax", std::ldexp(1.0, -20));
  const ExpConsts k = exp_consts(scale, parse_method(method, "shiftmax"));
  TORCH_CHECK_VALUE(out_bits >= 2 && out_bits <= 16, "shiftmax: out_bits must be an int in [2, 16]; got ", out_bits);
  const at::Tensor xc = x.contiguous();
  const at::ScalarType ot = out_bits <= 8 ? at::kChar : at::kShort;
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(ot));
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  if (rows == 0) return out;
  const bool zmm = vec_level() == 2 && k.shift && -k.x0 < (int64_t(1) << 16) && x.scalar_type() != at::kInt;
  with_int_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* ip = xc.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(d), [&](int64_t b, int64_t e) {
      std::vector<int64_t> buf(d);  // one scratch row per chunk: e stays in L1/L2 between the two passes
      if (zmm) {
        if constexpr (sizeof(T) <= 2) {
          int32_t* eb = reinterpret_cast<int32_t*>(buf.data());
          if (ot == at::kChar) shiftmax_zmm(ip, out.data_ptr<int8_t>(), d, b, e, &k, out_bits, eb);
          else shiftmax_zmm(ip, out.data_ptr<int16_t>(), d, b, e, &k, out_bits, eb);
          return;
        }
      }
      if (ot == at::kChar) {
        int8_t* op = out.data_ptr<int8_t>();
        TM_DISPATCH(shiftmax_body, ip, op, d, b, e, &k, out_bits, buf.data());
      } else {
        int16_t* op = out.data_ptr<int16_t>();
        TM_DISPATCH(shiftmax_body, ip, op, d, b, e, &k, out_bits, buf.data());
      }
    });
  });
  return out;
}

at::Tensor shift_gelu_cpu(const at::Tensor& x, double scale, int64_t sigmoid_bits, bool published) {
  check_int(x, "shift_gelu", {at::kChar, at::kShort}, "torch.int8 or torch.int16");
  check_scale(scale, "shift_gelu", std::ldexp(1.0, -14));
  TORCH_CHECK_VALUE(sigmoid_bits >= 2 && sigmoid_bits <= 16, "shift_gelu: sigmoid_bits must be an int in [2, 16]; got ",
                    sigmoid_bits);
  const int64_t x0 = int64_t(std::floor((published ? -1.0 : -16.0) / (scale * 1.702)));
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kInt));
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  if (rows == 0) return out;
  with_int_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* ip = xc.data_ptr<T>();
    if (published)
      at::parallel_for(0, rows, row_grain(d), [&](int64_t b, int64_t e) {
        if (vec_level() == 2) shift_gelu_pub_zmm(ip, op, d, b, e, x0, sigmoid_bits);
        else TM_DISPATCH(shift_gelu_pub_body, ip, op, d, b, e, x0, sigmoid_bits);
      });
    else
      at::parallel_for(0, xc.numel(), 16384, [&](int64_t b, int64_t e) {
        if (vec_level() == 2) shift_gelu_zmm(ip, op, b, e, x0, sigmoid_bits);
        else if (vec_level() == 1) shift_gelu_body_avx2(ip, op, b, e, x0, sigmoid_bits);
        else shift_gelu_body_scalar(ip, op, b, e, x0, sigmoid_bits);
      });
  });
  return out;
}

at::Tensor i_gelu_cpu(const at::Tensor& x, double scale) {
  check_int(x, "i_gelu", {at::kChar, at::kShort, at::kInt}, kAnyInt);
  check_scale(scale, "i_gelu");
  const double s = scale / std::sqrt(2.0);
  const int64_t b = int64_t(std::floor(kErfB / s)), c = int64_t(std::floor(1.0 / kErfA / (s * s)));
  const double sig_scale = -(s * s) * kErfA * 16384.0;
  const GeluConsts g{b, c, int64_t(std::floor(1.0 / sig_scale))};
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kInt));
  int32_t* op = out.data_ptr<int32_t>();
  with_int_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* ip = xc.data_ptr<T>();
    at::parallel_for(0, xc.numel(), 16384, [&](int64_t bb, int64_t e) { TM_DISPATCH(i_gelu_body, ip, op, bb, e, &g); });
  });
  return out;
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
  std::vector<int64_t> rnd(sh.size());
  for (size_t i = 0; i < sh.size(); ++i) rnd[i] = sh[i] ? int64_t(1) << (sh[i] - 1) : 0;
  const LnParams p{mult.data(), sh.data(), rnd.data(), bs.data(), out_dtype == at::kShort ? 32767 : 127};
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  const int64_t rows = D ? x.numel() / D : 0;
  if (rows == 0) return out;
  with_int_type(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* ip = xc.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(D), [&](int64_t b, int64_t e) {
      if (vec_level() == 2) {
        if constexpr (sizeof(T) <= 2) {
          if (out_dtype == at::kChar) i_layernorm_zmm(ip, out.data_ptr<int8_t>(), D, b, e, &p);
          else i_layernorm_zmm(ip, out.data_ptr<int16_t>(), D, b, e, &p);
          return;
        }
      }
      if (out_dtype == at::kChar) {
        int8_t* o = out.data_ptr<int8_t>();
        TM_DISPATCH(i_layernorm_body, ip, o, D, b, e, &p);
      } else {
        int16_t* o = out.data_ptr<int16_t>();
        TM_DISPATCH(i_layernorm_body, ip, o, D, b, e, &p);
      }
    });
  });
  return out;
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
