// Fused elementwise kernels for streaming merges (torchmerge/ops/merge_kernels.py defines the schemas
// and the reference semantics). Each output element is rounded exactly as the unfused torch ops round
// it, so results stay bit-identical to the reference (and to mergekit): FMA contraction is disabled
// for the whole library (-ffp-contract=off in CMakeLists.txt).
#include "common.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <type_traits>

namespace torchmerge {
namespace {

inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const c10::BFloat16* p, int64_t i) {
  uint16_t h;
  std::memcpy(&h, p + i, 2);
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float load_f(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
// only to instantiate dispatch branches that the dtype checks never take (float64 is refused)
inline float load_f(const double* p, int64_t i) { return static_cast<float>(p[i]); }

// out[i] = e[i] - b[i] and acc[i] = acc[i] + (e[i] - b[i]) * w, each operation rounded to fp32,
// compiled for AVX-512, AVX2 (auto-vectorised) and the baseline ISA.
#define TM_TARGET_CLONES(ATTR, SUFFIX)                                                            \
  template <typename E, typename B>                                                               \
  ATTR void delta_loop_##SUFFIX(float* out, const E* e, const B* b, int64_t s, int64_t t) {       \
    for (int64_t i = s; i < t; ++i) out[i] = load_f(e, i) - load_f(b, i);                         \
  }                                                                                               \
  template <typename E, typename B>                                                               \
  ATTR void axpy_loop_##SUFFIX(float* acc, const E* e, const B* b, float w, int64_t s, int64_t t) { \
    for (int64_t i = s; i < t; ++i) {                                                             \
      float d = load_f(e, i) - load_f(b, i);                                                      \
      d = d * w;                                                                                  \
      acc[i] = acc[i] + d;                                                                        \
    }                                                                                             \
  }                                                                                               \
  template <typename E, typename B>                                                               \
  ATTR void scaled_loop_##SUFFIX(float* out, const E* e, const B* b, float w, int64_t s, int64_t t) { \
    for (int64_t i = s; i < t; ++i) {                                                             \
      float d = load_f(e, i) - load_f(b, i);                                                      \
      d = d * w;                                                                                  \
      out[i] = 0.0f + d; /* a zero-filled accumulator plus the term: keeps +0 for -0 terms */     \
    }                                                                                             \
  }                                                                                               \
  template <typename O, typename B>                                                               \
  ATTR void finish_loop_##SUFFIX(O* out, const B* b, const float* m, float div, bool use_div,     \
                                 float lam, bool use_lam, int64_t s, int64_t t) {                 \
    for (int64_t i = s; i < t; ++i) {                                                             \
      float x = m[i];                                                                             \
      if (use_div) x = x / div;                                                                   \
      if (use_lam) x = x * lam;                                                                   \
      out[i] = static_cast<O>(load_f(b, i) + x); /* c10 casts round to nearest even, as Tensor.to */ \
    }                                                                                             \
  }                                                                                               \
  /* 1 when some element's exponent bits are all ones (NaN/Inf); U is the float's bit pattern */ \
  template <typename U>                                                                           \
  ATTR bool nonfinite_loop_##SUFFIX(const U* p, U exp_mask, int64_t s, int64_t t) {               \
    U any = 0;                                                                                    \
    for (int64_t i = s; i < t; ++i) any |= U((p[i] & exp_mask) == exp_mask);                      \
    return any != 0;                                                                              \
  }
TM_TARGET_CLONES(__attribute__((target("avx512f,avx512bw,avx512vl"))), avx512)
TM_TARGET_CLONES(__attribute__((target("avx2"))), avx2)
TM_TARGET_CLONES(, scalar)
#undef TM_TARGET_CLONES

// TIES sign election, one expert: with wt = τ·w and v = wt (weighted vote) or τ,
//   vote += v (or sign v);  pos_sum += [v>0]·wt;  neg_sum += [v<0]·wt;  pos_div += [v>0]·d;  neg_div += [v<0]·d
// each add rounded to fp32 as the separate torch ops do; `first` replaces "zeros + x" by "0 + x".
#define TM_TIES_CLONES(ATTR, SUFFIX)                                                              \
  template <bool kWeighted, bool kCount, bool kFirst, bool kKeep>                                 \
  ATTR void ties_acc_loop_##SUFFIX(float* __restrict__ vote, float* __restrict__ ps,              \
                                   float* __restrict__ ns, float* __restrict__ pd,                \
                                   float* __restrict__ nd, const float* __restrict__ tau,         \
                                   const uint8_t* __restrict__ keep, float w, float d, int64_t s, int64_t t) { \
    for (int64_t i = s; i < t; ++i) {                                                             \
      const float x = kKeep ? tau[i] * float(keep[i]) : tau[i]; /* τ·[kept]: keep is 0/1 */      \
      const float wt = x * w;                                                                     \
      const float v = kWeighted ? wt : x;                                                         \
      const float sv = kCount ? float((0.0f < v) - (v < 0.0f)) : v;                               \
      const bool pos = v > 0.0f, neg = v < 0.0f;                                                  \
      const float pw = pos ? wt : 0.0f, nw = neg ? wt : 0.0f;                                     \
      const float pdv = pos ? d : 0.0f, ndv = neg ? d : 0.0f;                                     \
      vote[i] = (kFirst ? 0.0f : vote[i]) + sv;                                                   \
      ps[i] = (kFirst ? 0.0f : ps[i]) + pw;                                                       \
      ns[i] = (kFirst ? 0.0f : ns[i]) + nw;                                                       \
      pd[i] = (kFirst ? 0.0f : pd[i]) + pdv;                                                      \
      nd[i] = (kFirst ? 0.0f : nd[i]) + ndv;                                                      \
    }                                                                                             \
  }                                                                                               \
  ATTR void ties_resolve_loop_##SUFFIX(float* __restrict__ out, const float* __restrict__ vote,   \
                                       const float* __restrict__ ps, const float* __restrict__ ns, \
                                       const float* __restrict__ pd, const float* __restrict__ nd, \
                                       bool normalize, int64_t s, int64_t t) {                    \
    for (int64_t i = s; i < t; ++i) {                                                             \
      const bool up = vote[i] >= 0.0f;                                                            \
      float m = up ? ps[i] : ns[i];                                                               \
      if (normalize) {                                                                            \
        float dv = up ? pd[i] : nd[i];                                                            \
        dv = dv == 0.0f ? 1.0f : dv;                                                              \
        m = m / dv;                                                                               \
      }                                                                                           \
      out[i] = m;                                                                                 \
    }                                                                                             \
  }
TM_TIES_CLONES(__attribute__((target("avx512f,avx512bw,avx512vl"))), avx512)
TM_TIES_CLONES(__attribute__((target("avx2"))), avx2)
TM_TIES_CLONES(, scalar)
#undef TM_TIES_CLONES

constexpr int64_t kGrain = 1 << 16;

// Run LOOP_<isa>(ARGS..., s, t) over [0, n) in parallel chunks, with the clone for the active ISA.
#define TM_PARALLEL_ISA(n, LOOP, ...)                                               \
  do {                                                                              \
    const Isa isa_ = active_isa();                                                  \
    at::parallel_for(0, (n), kGrain, [&](int64_t s_, int64_t t_) {                  \
      if (isa_ >= Isa::Avx512) LOOP##_avx512(__VA_ARGS__, s_, t_);                  \
      else if (isa_ == Isa::Avx2) LOOP##_avx2(__VA_ARGS__, s_, t_);                 \
      else LOOP##_scalar(__VA_ARGS__, s_, t_);                                      \
    });                                                                             \
  } while (0)

template <typename E, typename B>
void delta_typed(float* out, const E* e, const B* b, int64_t n) {
  TM_PARALLEL_ISA(n, delta_loop, out, e, b);
}

template <typename E, typename B>
void axpy_typed(float* acc, const E* e, const B* b, float w, int64_t n) {
  TM_PARALLEL_ISA(n, axpy_loop, acc, e, b, w);
}

void check_inputs(const at::Tensor& e, const at::Tensor& b, const char* op) {
  TORCH_CHECK(e.sizes() == b.sizes(), op, ": expert shape ", e.sizes(), " != base shape ", b.sizes());
  auto ok = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
  };
  TORCH_CHECK(ok(e.scalar_type()) && ok(b.scalar_type()), op,
              ": expert and base must be float32, bfloat16 or float16");
}

// Dispatch over the (expert dtype, base dtype) pairs.
template <typename F>
void dispatch_pair(const at::Tensor& e, const at::Tensor& b, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, e.scalar_type(), "merge_e", [&] {
    using E = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, b.scalar_type(), "merge_b", [&] {
      using B = scalar_t;
      if constexpr (std::is_same_v<E, double> || std::is_same_v<B, double>) {
        TORCH_CHECK(false, "float64 inputs are not supported by the fused merge kernels");
      } else {
        f(e.const_data_ptr<E>(), b.const_data_ptr<B>());
      }
    });
  });
}

template <typename E, typename B>
void scaled_typed(float* out, const E* e, const B* b, float w, int64_t n) {
  TM_PARALLEL_ISA(n, scaled_loop, out, e, b, w);
}

at::Tensor merge_scaled_delta(const at::Tensor& expert, const at::Tensor& base, double weight) {
  check_inputs(expert, base, "merge_scaled_delta");
  auto e = expert.contiguous();
  auto b = base.contiguous();
  auto out = at::empty(e.sizes(), e.options().dtype(at::kFloat));
  const float w = static_cast<float>(weight);
  dispatch_pair(e, b, [&](auto* ep, auto* bp) { scaled_typed(out.data_ptr<float>(), ep, bp, w, e.numel()); });
  return out;
}

// out = base + ((mixed / divisor) * lambda), each step optional and rounded to fp32, in one pass.
at::Tensor merge_finish(const at::Tensor& base, const at::Tensor& mixed, std::optional<double> divisor,
                        std::optional<double> lam, std::optional<at::ScalarType> out_dtype) {
  const auto bt = base.scalar_type();
  TORCH_CHECK((bt == at::kFloat || bt == at::kBFloat16 || bt == at::kHalf) && mixed.scalar_type() == at::kFloat &&
                  base.sizes() == mixed.sizes(),
              "merge_finish: base (float32/bfloat16/float16) and mixed (float32) must have one shape");
  const auto odt = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(odt == at::kFloat || odt == at::kBFloat16 || odt == at::kHalf,
              "merge_finish: out_dtype must be float32, bfloat16 or float16");
  auto b = base.contiguous();
  auto m = mixed.contiguous();
  auto out = at::empty(b.sizes(), b.options().dtype(odt));
  const float div = divisor ? static_cast<float>(*divisor) : 1.0f;
  const float l = lam ? static_cast<float>(*lam) : 1.0f;
  const bool use_div = divisor.has_value(), use_lam = lam.has_value();
  const float* mp = m.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, odt, "merge_finish", [&] {
    using O = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bt, "merge_finish_b", [&] {
      using B = scalar_t;
      if constexpr (!std::is_same_v<O, double> && !std::is_same_v<B, double>) {
        O* o = out.data_ptr<O>();
        const B* bp = b.const_data_ptr<B>();
        TM_PARALLEL_ISA(b.numel(), finish_loop, o, bp, mp, div, use_div, l, use_lam);
      }
    });
  });
  return out;
}

// No NaN/Inf in t: the exponent field of every element is not all ones. One read, no temporaries.
bool all_finite(const at::Tensor& t) {
  if (!at::isFloatingType(t.scalar_type()) || t.numel() == 0) return true;
  const auto c = t.contiguous();
  std::atomic<bool> bad{false};
  auto scan = [&](auto* p, auto mask) {
    using U = std::remove_const_t<std::remove_pointer_t<decltype(p)>>;
    const Isa isa = active_isa();
    at::parallel_for(0, c.numel(), kGrain, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e && !bad.load(std::memory_order_relaxed); i += kGrain) {
        const int64_t j = std::min(e, i + kGrain);
        const bool hit = isa >= Isa::Avx512 ? nonfinite_loop_avx512<U>(p, U(mask), i, j)
                       : isa == Isa::Avx2   ? nonfinite_loop_avx2<U>(p, U(mask), i, j)
                                            : nonfinite_loop_scalar<U>(p, U(mask), i, j);
        if (hit) bad.store(true, std::memory_order_relaxed);
      }
    });
  };
  switch (c.scalar_type()) {
    case at::kFloat: scan(static_cast<const uint32_t*>(c.const_data_ptr()), 0x7F800000u); break;
    case at::kDouble: scan(static_cast<const uint64_t*>(c.const_data_ptr()), 0x7FF0000000000000ull); break;
    case at::kBFloat16: scan(static_cast<const uint16_t*>(c.const_data_ptr()), 0x7F80u); break;
    case at::kHalf: scan(static_cast<const uint16_t*>(c.const_data_ptr()), 0x7C00u); break;
    default: return at::isfinite(c).all().item<bool>();  // float8 and other rare types
  }
  return !bad.load();
}

at::Tensor merge_delta(const at::Tensor& expert, const at::Tensor& base) {
  check_inputs(expert, base, "merge_delta");
  auto e = expert.contiguous();
  auto b = base.contiguous();
  auto out = at::empty(e.sizes(), e.options().dtype(at::kFloat));
  dispatch_pair(e, b, [&](auto* ep, auto* bp) { delta_typed(out.data_ptr<float>(), ep, bp, e.numel()); });
  return out;
}

void merge_axpy_delta_(at::Tensor& acc, const at::Tensor& expert, const at::Tensor& base, double weight) {
  check_inputs(expert, base, "merge_axpy_delta_");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && acc.sizes() == expert.sizes(),
              "merge_axpy_delta_: acc must be a contiguous float32 tensor of the expert's shape");
  auto e = expert.contiguous();
  auto b = base.contiguous();
  const float w = static_cast<float>(weight);
  dispatch_pair(e, b, [&](auto* ep, auto* bp) { axpy_typed(acc.data_ptr<float>(), ep, bp, w, e.numel()); });
}

void check_f32(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == like.sizes(),
              "ties kernels: ", what, " must be a contiguous float32 tensor of shape ", like.sizes());
}

void ties_accumulate_(at::Tensor& vote, at::Tensor& pos_sum, at::Tensor& neg_sum, at::Tensor& pos_div,
                      at::Tensor& neg_div, const at::Tensor& tau, double weight, double div_weight,
                      bool weighted_vote, bool count_vote, bool first, const std::optional<at::Tensor>& keep) {
  auto t = tau.contiguous();
  at::Tensor k;
  if (keep) {
    k = keep->contiguous();
    TORCH_CHECK(k.scalar_type() == at::kBool && k.sizes() == t.sizes(), "ties_accumulate_: keep must be a bool mask of tau's shape");
  }
  // bool is one byte holding 0 or 1: read as uint8 so the multiply vectorises
  const uint8_t* kp = keep ? reinterpret_cast<const uint8_t*>(k.const_data_ptr<bool>()) : nullptr;
  TORCH_CHECK(t.scalar_type() == at::kFloat, "ties_accumulate_: tau must be float32");
  check_f32(vote, t, "vote"); check_f32(pos_sum, t, "pos_sum"); check_f32(neg_sum, t, "neg_sum");
  check_f32(pos_div, t, "pos_div"); check_f32(neg_div, t, "neg_div");
  const float w = static_cast<float>(weight), d = static_cast<float>(div_weight);
  float *v = vote.data_ptr<float>(), *ps = pos_sum.data_ptr<float>(), *ns = neg_sum.data_ptr<float>();
  float *pd = pos_div.data_ptr<float>(), *nd = neg_div.data_ptr<float>();
  const float* tp = t.const_data_ptr<float>();
  const Isa isa = active_isa();
  auto run = [&](auto weighted, auto count, auto first, auto has_keep) {
    constexpr bool W = decltype(weighted)::value, C = decltype(count)::value;
    constexpr bool F = decltype(first)::value, K = decltype(has_keep)::value;
    at::parallel_for(0, t.numel(), kGrain, [&](int64_t s, int64_t e) {
      if (isa >= Isa::Avx512) ties_acc_loop_avx512<W, C, F, K>(v, ps, ns, pd, nd, tp, kp, w, d, s, e);
      else if (isa == Isa::Avx2) ties_acc_loop_avx2<W, C, F, K>(v, ps, ns, pd, nd, tp, kp, w, d, s, e);
      else ties_acc_loop_scalar<W, C, F, K>(v, ps, ns, pd, nd, tp, kp, w, d, s, e);
    });
  };
  using T = std::true_type;
  using Fl = std::false_type;
  auto with_keep = [&](auto a, auto b, auto c) { kp ? run(a, b, c, T{}) : run(a, b, c, Fl{}); };
  auto with_first = [&](auto a, auto b) { first ? with_keep(a, b, T{}) : with_keep(a, b, Fl{}); };
  auto with_count = [&](auto a) { count_vote ? with_first(a, T{}) : with_first(a, Fl{}); };
  weighted_vote ? with_count(T{}) : with_count(Fl{});
}

at::Tensor ties_resolve(const at::Tensor& vote, const at::Tensor& pos_sum, const at::Tensor& neg_sum,
                        const at::Tensor& pos_div, const at::Tensor& neg_div, bool normalize) {
  check_f32(vote, vote, "vote"); check_f32(pos_sum, vote, "pos_sum"); check_f32(neg_sum, vote, "neg_sum");
  check_f32(pos_div, vote, "pos_div"); check_f32(neg_div, vote, "neg_div");
  auto out = at::empty_like(vote);
  float* o = out.data_ptr<float>();
  const float *v = vote.const_data_ptr<float>(), *ps = pos_sum.const_data_ptr<float>();
  const float *ns = neg_sum.const_data_ptr<float>(), *pd = pos_div.const_data_ptr<float>();
  const float* nd = neg_div.const_data_ptr<float>();
  TM_PARALLEL_ISA(vote.numel(), ties_resolve_loop, o, v, ps, ns, pd, nd, normalize);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmerge, CPU, m) {
  m.impl("merge_delta", &merge_delta);
  m.impl("merge_axpy_delta_", &merge_axpy_delta_);
  m.impl("merge_scaled_delta", &merge_scaled_delta);
  m.impl("merge_finish", &merge_finish);
  m.impl("all_finite", &all_finite);
  m.impl("ties_accumulate_", &ties_accumulate_);
  m.impl("ties_resolve", &ties_resolve);
}

}  // namespace torchmerge
