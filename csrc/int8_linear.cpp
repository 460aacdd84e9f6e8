// int8_linear and requantize kernels. Semantics: torchmerge/ops/intlinear.py (the references define them).
//   acc[m, n] = Σ_k x[m, k] · w[n, k]   (int32, exact for K ≤ 132104 with |w| ≤ 127)
//   out[m, n] = sat(((acc + bias[n]) · mult[n] + 2^(shift[n]-1)) >> shift[n])   (round half up)
// Accumulation paths: oneDNN (at::_int_mm, VNNI/AMX) for large M, else our own VNNI / AVX2 / scalar tiles.
#include "common.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

namespace torchmerge {
namespace {

constexpr int64_t kMaxK = (int64_t(1) << 31) / (127 * 128);  // 132104, see intlinear.MAX_K
constexpr int kTile = 4;  // 4 rows of x × 4 rows of w per register tile

// Row pointers clamp to the last valid row so edge tiles run the same code; only valid results are stored.
inline void tile_rows(const int8_t* base, int64_t first, int64_t count, int64_t K, const int8_t* rows[kTile]) {
  for (int i = 0; i < kTile; ++i) rows[i] = base + std::min(first + i, count - 1) * K;
}

inline void store_tile(const int32_t v[kTile][kTile], int32_t* acc, int64_t m0, int64_t n0, int64_t M, int64_t N) {
  for (int i = 0; i < kTile && m0 + i < M; ++i)
    for (int j = 0; j < kTile && n0 + j < N; ++j) acc[(m0 + i) * N + n0 + j] = v[i][j];
}

void gemm_scalar(const int8_t* x, const int8_t* w, int32_t* acc, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n_begin; n < n_end; ++n) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += int32_t(x[m * K + k]) * int32_t(w[n * K + k]);
        acc[m * N + n] = s;
      }
  });
}

__attribute__((target("avx2,fma"))) inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// AVX2: sign-extend 16 int8 to int16 and pmaddwd (exact; pmaddubsw would saturate).
// (Lambdas do not inherit target attributes, so each ISA body is a range function called from parallel_for.)
__attribute__((target("avx2,fma"))) void gemm_avx2_range(const int8_t* x, const int8_t* w, int32_t* acc, int64_t M,
                                                           int64_t N, int64_t K, int64_t nb_begin, int64_t nb_end) {
  const int64_t k_main = K / 16 * 16;
  {
    for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
      const int64_t n0 = nb * kTile;
      const int8_t* wr[kTile];
      tile_rows(w, n0, N, K, wr);
      for (int64_t m0 = 0; m0 < M; m0 += 2) {  // 2×4 tile: 8 accumulators fit the 16 ymm registers
        const int8_t* xr[2] = {x + m0 * K, x + std::min(m0 + 1, M - 1) * K};
        __m256i a[2][kTile];
        for (auto& row : a)
          for (auto& v : row) v = _mm256_setzero_si256();
        for (int64_t k = 0; k < k_main; k += 16) {
          __m256i xv[2], wv[kTile];
          for (int i = 0; i < 2; ++i) xv[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(xr[i] + k)));
          for (int j = 0; j < kTile; ++j) wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wr[j] + k)));
          for (int i = 0; i < 2; ++i)
            for (int j = 0; j < kTile; ++j) a[i][j] = _mm256_add_epi32(a[i][j], _mm256_madd_epi16(xv[i], wv[j]));
        }
        int32_t v[kTile][kTile] = {};
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < kTile; ++j) {
            int32_t s = hsum256(a[i][j]);
            for (int64_t k = k_main; k < K; ++k) s += int32_t(xr[i][k]) * int32_t(wr[j][k]);
            v[i][j] = s;
          }
        for (int i = 0; i < 2 && m0 + i < M; ++i)
          for (int j = 0; j < kTile && n0 + j < N; ++j) acc[(m0 + i) * N + n0 + j] = v[i][j];
      }
    }
  }
}

void gemm_avx2(const int8_t* x, const int8_t* w, int32_t* acc, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, (N + kTile - 1) / kTile, 4,
                   [&](int64_t b, int64_t e) { gemm_avx2_range(x, w, acc, M, N, K, b, e); });
}

// AVX-512 VNNI: vpdpbusd multiplies u8 × s8, so x is offset to u8 (x + 128) and 128·Σ_k w[n, k]
// is subtracted afterwards. The int32 sums wrap, but wrap-around cancels exactly (mod 2^32 arithmetic)
// because the true result fits int32.
// Σ_k w[n, k] via vpdpbusd(1, w); computed per weight tile so the tile is already in L1 for the GEMM.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) int32_t weight_sum_vnni(const int8_t* wrow, int64_t K,
                                                                                        __mmask64 tail_mask) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(wrow + k));
  if (K % 64) s = _mm512_dpbusd_epi32(s, ones, _mm512_maskz_loadu_epi8(tail_mask, wrow + k));
  return _mm512_reduce_add_epi32(s);
}

// Rows [m_begin, m_end) of x against weight tiles [nb_begin, nb_end).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void gemm_vnni_range(
    const uint8_t* xu, const int8_t* w, int32_t* acc, int64_t M, int64_t N, int64_t K, int64_t m_begin, int64_t m_end,
    int64_t nb_begin, int64_t nb_end) {
  const int64_t k_tail = K % 64;
  const __mmask64 tail_mask = k_tail ? (~__mmask64(0)) >> (64 - k_tail) : __mmask64(0);
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int64_t n0 = nb * kTile;
    const int8_t* wr[kTile];
    tile_rows(w, n0, N, K, wr);
    int32_t ws[kTile];
    for (int j = 0; j < kTile; ++j) ws[j] = weight_sum_vnni(wr[j], K, tail_mask);
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kTile) {
      const int8_t* xr[kTile];
      tile_rows(reinterpret_cast<const int8_t*>(xu), m0, M, K, xr);
      __m512i a[kTile][kTile];
      for (auto& row : a)
        for (auto& v : row) v = _mm512_setzero_si512();
      int64_t k = 0;
      for (; k + 64 <= K; k += 64) {
        __m512i xv[kTile], wv[kTile];
        for (int i = 0; i < kTile; ++i) xv[i] = _mm512_loadu_si512(xr[i] + k);
        for (int j = 0; j < kTile; ++j) wv[j] = _mm512_loadu_si512(wr[j] + k);
        for (int i = 0; i < kTile; ++i)
          for (int j = 0; j < kTile; ++j) a[i][j] = _mm512_dpbusd_epi32(a[i][j], xv[i], wv[j]);
      }
      if (k_tail) {
        __m512i xv[kTile], wv[kTile];
        for (int i = 0; i < kTile; ++i) xv[i] = _mm512_maskz_loadu_epi8(tail_mask, xr[i] + k);
        for (int j = 0; j < kTile; ++j) wv[j] = _mm512_maskz_loadu_epi8(tail_mask, wr[j] + k);
        for (int i = 0; i < kTile; ++i)
          for (int j = 0; j < kTile; ++j) a[i][j] = _mm512_dpbusd_epi32(a[i][j], xv[i], wv[j]);
      }
      int32_t v[kTile][kTile];
      for (int i = 0; i < kTile; ++i)
        for (int j = 0; j < kTile; ++j) {
          v[i][j] = int32_t(uint32_t(_mm512_reduce_add_epi32(a[i][j])) - (uint32_t(ws[j]) << 7));
        }
      store_tile(v, acc, m0, n0, M, N);
    }
  }
}

void gemm_vnni(const int8_t* x, const int8_t* w, int32_t* acc, int64_t M, int64_t N, int64_t K) {
  std::vector<uint8_t> xu_buf(size_t(M * K));
  uint8_t* xu = xu_buf.data();
  at::parallel_for(0, M * K, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) xu[i] = uint8_t(x[i]) ^ 0x80;
  });
  // Each weight tile stays in L1 while all x rows stream past it from L2; chunking rows instead
  // (re-streaming W per chunk) measured slower at M = 64..256, K = N = 4096.
  at::parallel_for(0, (N + kTile - 1) / kTile, 4, [&](int64_t b, int64_t e) {
    gemm_vnni_range(xu, w, acc, M, N, K, 0, M, b, e);
  });
}

// oneDNN's s8s8s32 GEMM (VNNI, AMX where present) wins for a single row (its GEMV path) and once M is large
// enough to amortise its packing; our tiles win in between. Median ms, one thread, K = N = 4096, own / oneDNN:
// M=1 0.65/0.39, 4 0.78/11, 16 1.6/11.5, 32 11/12.5, 64 12.4/20, 128 30/30, 256 57/47 (benchmarks/ops_bench.py).
constexpr int64_t kOneDnnMinRows = 96;
bool prefer_onednn(int64_t M) { return M == 1 || M >= kOneDnnMinRows; }

// 0 = auto (by M), 1 = always oneDNN, 2 = always our kernels; set by torchmerge::_set_int8_gemm (benchmarks).
std::atomic<int> g_gemm_backend{0};

std::string set_int8_gemm(std::string backend) {
  static const char* names[] = {"auto", "onednn", "native"};
  int wanted = -1;
  for (int i = 0; i < 3; ++i)
    if (backend == names[i]) wanted = i;
  TORCH_CHECK_VALUE(wanted >= 0, "_set_int8_gemm: backend must be one of 'auto', 'onednn', 'native'; got '", backend, "'");
  return names[g_gemm_backend.exchange(wanted)];
}

at::Tensor accumulate(const at::Tensor& x2d, const at::Tensor& w) {
  const int64_t M = x2d.size(0), K = x2d.size(1), N = w.size(0);
  const Isa isa = active_isa();
  const int backend = g_gemm_backend.load(std::memory_order_relaxed);
  // oneDNN picks its own ISA, so it is only used when AVX-512 is allowed (never under a forced scalar/AVX2 path).
  if (isa >= Isa::Avx512 && (backend == 1 || (backend == 0 && prefer_onednn(M)))) return at::_int_mm(x2d, w.t());
  at::Tensor acc = at::empty({M, N}, x2d.options().dtype(at::kInt));
  if (M == 0 || N == 0) return acc;
  const int8_t* xp = x2d.data_ptr<int8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  int32_t* ap = acc.data_ptr<int32_t>();
  if (K == 0) acc.zero_();
  else if (isa >= Isa::Avx512Vnni) gemm_vnni(xp, wp, ap, M, N, K);
  else if (isa >= Isa::Avx2) gemm_avx2(xp, wp, ap, M, N, K);
  else gemm_scalar(xp, wp, ap, M, N, K);
  return acc;
}

void check_requant(const at::Tensor& mult, const at::Tensor& shift, int64_t channels, const char* op,
                   const char* mult_name = "multiplier", const char* shift_name = "shift") {
  for (const auto* t : {&mult, &shift}) {
    const char* name = t == &mult ? mult_name : shift_name;
    TORCH_CHECK_VALUE(t->scalar_type() == at::kInt, op, ": ", name, " must be torch.int32; got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1 && (t->size(0) == 1 || t->size(0) == channels), op, ": ", name,
                      " must have shape [", channels, "] (per channel) or [1]; got ", t->sizes());
  }
  // a plain loop over the (small) shift vector: torch reductions + .item() cost more than the check is worth
  const at::Tensor sc = shift.contiguous();
  const int32_t* sp = sc.data_ptr<int32_t>();
  for (int64_t i = 0; i < sc.numel(); ++i)
    TORCH_CHECK_VALUE(sp[i] >= 0 && sp[i] <= 62, op, ": ", shift_name, " must be in [0, 62]; got ", sp[i]);
}

void check_out_dtype(at::ScalarType dt, const char* op) {
  TORCH_CHECK_VALUE(dt == at::kChar || dt == at::kShort, op, ": out_dtype must be torch.int8 or torch.int16; got ", dt);
}

// out[r, c] = sat(round_shift((v[r, c] + bias[c]) · mult[c], shift[c])), rows in parallel. The body is written
// once over int64 lanes (per-channel multiplier, shift and rounding term expanded to int64 arrays once per call)
// and cloned per ISA so the compiler vectorises it (vpmullq / vpsravq under AVX-512DQ); the baseline clone is the
// scalar path.
#define TM_RQ_INLINE inline __attribute__((always_inline))
template <typename In, typename Out>
TM_RQ_INLINE void requant_body(const In* __restrict v, const int32_t* __restrict bias, const int64_t* __restrict m,
                               const int64_t* __restrict sh, const int64_t* __restrict rnd, Out* __restrict out,
                               int64_t rb, int64_t re, int64_t C) {
  const int64_t lo = std::numeric_limits<Out>::min(), hi = std::numeric_limits<Out>::max();
  for (int64_t r = rb; r < re; ++r) {
    const In* __restrict vr = v + r * C;
    Out* __restrict o = out + r * C;
    if (bias) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = ((int64_t(vr[c]) + int64_t(bias[c])) * m[c] + rnd[c]) >> sh[c];
        o[c] = Out(p < lo ? lo : (p > hi ? hi : p));
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t p = (int64_t(vr[c]) * m[c] + rnd[c]) >> sh[c];
        o[c] = Out(p < lo ? lo : (p > hi ? hi : p));
      }
    }
  }
}
template <typename... A>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void requant_body_avx512(A... a) { requant_body(a...); }
template <typename... A>
__attribute__((target("avx2,fma"))) void requant_body_avx2(A... a) { requant_body(a...); }
template <typename... A>
void requant_body_scalar(A... a) { requant_body(a...); }

// Per-channel dyadic parameters widened to int64 once per call: multiplier, shift and rounding term
// 2^(s-1) (0 for s = 0); a [1] multiplier/shift applies to every channel.
struct Dyadic {
  std::vector<int64_t> m, sh, rnd;
  Dyadic(const at::Tensor& mult, const at::Tensor& shift, int64_t C) : m(C), sh(C), rnd(C) {
    const at::Tensor mc = mult.contiguous(), sc = shift.contiguous();
    const int32_t *mp = mc.data_ptr<int32_t>(), *sp = sc.data_ptr<int32_t>();
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ch = mc.numel() == 1 ? 0 : c;
      m[c] = mp[ch], sh[c] = sp[ch], rnd[c] = sh[c] ? int64_t(1) << (sh[c] - 1) : 0;
    }
  }
};

// The integer activations requantisation reads: int32 accumulators or int8/int16 values (widened in the loop).
bool is_requant_input(at::ScalarType t) { return t == at::kInt || t == at::kShort || t == at::kChar; }

// f(typed data pointer) for an int8/int16/int32 tensor.
template <typename F>
void with_int_data(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kChar: f(t.data_ptr<int8_t>()); break;
    case at::kShort: f(t.data_ptr<int16_t>()); break;
    default: f(t.data_ptr<int32_t>()); break;
  }
}

enum class RqPath { Avx512, Avx2, Scalar };

// Rows of C channels in parallel, each range run as f(path, begin, end) on the widest path the CPU and the
// ISA setting allow (the int64 multiplies vectorise under AVX-512DQ).
template <typename F>
void rq_parallel(int64_t rows, int64_t C, F&& f) {
  static const bool dq = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_supports("avx512dq"));
  }();
  const Isa isa = active_isa();
  const RqPath path = isa >= Isa::Avx512 && dq ? RqPath::Avx512 : isa >= Isa::Avx2 ? RqPath::Avx2 : RqPath::Scalar;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                   [&](int64_t b, int64_t e) { f(path, b, e); });
}

template <typename In, typename Out>
void requant_rows(const In* v, const int32_t* bias, const Dyadic& d, Out* out, int64_t rows, int64_t C) {
  rq_parallel(rows, C, [&](RqPath path, int64_t b, int64_t e) {
    if (path == RqPath::Avx512) requant_body_avx512(v, bias, d.m.data(), d.sh.data(), d.rnd.data(), out, b, e, C);
    else if (path == RqPath::Avx2) requant_body_avx2(v, bias, d.m.data(), d.sh.data(), d.rnd.data(), out, b, e, C);
    else requant_body_scalar(v, bias, d.m.data(), d.sh.data(), d.rnd.data(), out, b, e, C);
  });
}

at::Tensor requant(const at::Tensor& v, const c10::optional<at::Tensor>& bias, const at::Tensor& mult,
                   const at::Tensor& shift, at::ScalarType out_dtype, at::IntArrayRef out_shape) {
  const int64_t C = v.size(-1), rows = C ? v.numel() / C : 0;
  at::Tensor out = at::empty(out_shape, v.options().dtype(out_dtype));
  const int32_t* bp = bias ? bias->data_ptr<int32_t>() : nullptr;
  if (rows == 0) return out;
  const Dyadic d(mult, shift, C);
  auto run = [&](const auto* vp) {
    if (out_dtype == at::kChar) requant_rows(vp, bp, d, out.data_ptr<int8_t>(), rows, C);
    else requant_rows(vp, bp, d, out.data_ptr<int16_t>(), rows, C);
  };
  with_int_data(v, run);  // int8/int16 inputs are widened in the loop: no int32 copy first
  return out;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& multiplier, const at::Tensor& shift, at::ScalarType out_dtype) {
  const char* op = "int8_linear";
  TORCH_CHECK_VALUE(x.scalar_type() == at::kChar && x.dim() >= 1, op, ": x must be a torch.int8 tensor [..., K]; got ",
                    x.scalar_type(), " ", x.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kChar && weight.dim() == 2, op,
                    ": weight must be a 2-D torch.int8 tensor [N, K]; got ", weight.scalar_type(), " ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == K, op, ": x's last dim (", x.size(-1), ") must equal weight's K (", K, ")");
  TORCH_CHECK_VALUE(K <= kMaxK, op, ": K=", K, " is too large: the int32 accumulator holds at most K·127·128 < 2^31, i.e. K ≤ ",
                    kMaxK);
  if (bias)
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kInt && bias->dim() == 1 && bias->size(0) == N, op,
                      ": bias must be None or a torch.int32 tensor of shape [", N, "]; got ", bias->sizes());
  check_requant(multiplier, shift, N, op);
  check_out_dtype(out_dtype, op);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor x2d = x.reshape({-1, K}).contiguous();
  at::Tensor acc = accumulate(x2d, weight.contiguous());
  c10::optional<at::Tensor> b = bias ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  return requant(acc, b, multiplier, shift, out_dtype, out_shape);
}

at::Tensor requantize_cpu(const at::Tensor& x, const at::Tensor& multiplier, const at::Tensor& shift,
                          at::ScalarType out_dtype) {
  const char* op = "requantize";
  TORCH_CHECK_VALUE(is_requant_input(x.scalar_type()) && x.dim() >= 1, op,
                    ": x must be a torch.int32, int16 or int8 tensor [..., C]; got ", x.scalar_type(), " ", x.sizes());
  check_requant(multiplier, shift, x.size(-1), op);
  check_out_dtype(out_dtype, op);
  return requant(x.contiguous(), c10::nullopt, multiplier, shift, out_dtype, x.sizes());
}

// out = sat(sat(rq(a)) + sat(rq(b))), rq(v) = (v·m + 2^(s-1)) >> s per channel c = i % C: the integer
// residual add (I-ViT) in one pass instead of two requantize calls and a widen/add/clamp/narrow.
template <typename A, typename B, typename Out>
TM_RQ_INLINE void add_rq_body(const A* __restrict a, const B* __restrict b, const int64_t* __restrict ma,
                              const int64_t* __restrict sa, const int64_t* __restrict ra, const int64_t* __restrict mb,
                              const int64_t* __restrict sb, const int64_t* __restrict rb, Out* __restrict out,
                              int64_t r0, int64_t r1, int64_t C) {
  const int64_t lo = std::numeric_limits<Out>::min(), hi = std::numeric_limits<Out>::max();
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < C; ++c) {
      int64_t x = (int64_t(a[r * C + c]) * ma[c] + ra[c]) >> sa[c];
      int64_t y = (int64_t(b[r * C + c]) * mb[c] + rb[c]) >> sb[c];
      x = x < lo ? lo : (x > hi ? hi : x);
      y = y < lo ? lo : (y > hi ? hi : y);
      const int64_t z = x + y;
      out[r * C + c] = Out(z < lo ? lo : (z > hi ? hi : z));
    }
}
template <typename... T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void add_rq_avx512(T... t) { add_rq_body(t...); }
template <typename... T>
__attribute__((target("avx2,fma"))) void add_rq_avx2(T... t) { add_rq_body(t...); }
template <typename... T>
void add_rq_scalar(T... t) { add_rq_body(t...); }

at::Tensor add_requantized_cpu(const at::Tensor& a, const at::Tensor& ma, const at::Tensor& sa, const at::Tensor& b,
                               const at::Tensor& mb, const at::Tensor& sb, at::ScalarType out_dtype) {
  const char* op = "add_requantized";
  TORCH_CHECK_VALUE(is_requant_input(a.scalar_type()) && a.dim() >= 1, op, ": a must be a torch.int32, int16 or int8 tensor [..., C]; got ",
                    a.scalar_type(), " ", a.sizes());
  TORCH_CHECK_VALUE(is_requant_input(b.scalar_type()) && b.sizes() == a.sizes(), op,
                    ": b must be a torch.int32, int16 or int8 tensor of a's shape ", a.sizes(), "; got ", b.scalar_type(), " ", b.sizes());
  const int64_t C = a.size(-1), rows = C ? a.numel() / C : 0;
  check_requant(ma, sa, C, op, "ma", "sa");
  check_requant(mb, sb, C, op, "mb", "sb");
  check_out_dtype(out_dtype, op);
  at::Tensor out = at::empty(a.sizes(), a.options().dtype(out_dtype));
  if (rows == 0) return out;
  const Dyadic da(ma, sa, C), db(mb, sb, C);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  auto run = [&](const auto* ap, const auto* bp, auto* op_) {
    rq_parallel(rows, C, [&](RqPath path, int64_t r0, int64_t r1) {
      const int64_t *m1 = da.m.data(), *s1 = da.sh.data(), *q1 = da.rnd.data();
      const int64_t *m2 = db.m.data(), *s2 = db.sh.data(), *q2 = db.rnd.data();
      if (path == RqPath::Avx512) add_rq_avx512(ap, bp, m1, s1, q1, m2, s2, q2, op_, r0, r1, C);
      else if (path == RqPath::Avx2) add_rq_avx2(ap, bp, m1, s1, q1, m2, s2, q2, op_, r0, r1, C);
      else add_rq_scalar(ap, bp, m1, s1, q1, m2, s2, q2, op_, r0, r1, C);
    });
  };
  with_int_data(ac, [&](const auto* ap) {
    with_int_data(bc, [&](const auto* bp) {
      if (out_dtype == at::kChar) run(ap, bp, out.data_ptr<int8_t>());
      else run(ap, bp, out.data_ptr<int16_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmerge, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("requantize", &requantize_cpu);
  m.impl("add_requantized", &add_requantized_cpu);
}

TORCH_LIBRARY_IMPL(torchmerge, CompositeExplicitAutograd, m) {
  m.impl("_set_int8_gemm", &set_int8_gemm);
}

}  // namespace torchmerge
