// T-MAC table-lookup linear (arXiv 2407.00088): torchmerge::lut_linear.
// Semantics: torchmerge/ops/lut.py (reference); layout of qweight: torchmerge/ops/lut_pack.py.
// Tables and int8 table codes are bit-identical to the reference; float sums run in this order:
// per (row m, 64-row block) and group g, P = Σ_chunks Σ_planes 2^i·(lookup_lo + lookup_hi), then
// y += s·(0.5·ts·P + c·Sx) group after group (int8 tables: P is an exact integer sum; vector paths
// fuse the last two steps into FMAs), so results match the reference up to float summation order.
// Kernels: lut_avx512.cpp, lut_avx2.cpp; here the tables, the scalar path and the op entry.
#include "lut_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace torchmerge {
namespace {

using namespace lut;

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

// fp32 tables with many activation rows: dequantise-then-matmul is the op's definition (up to float
// summation order), and an fp32 GEMM beats the lookups there, which re-read every row's tables for each
// 64-row block (MiniLM's 2048 × 1536 -> 384: 59 ms of lookups vs 13 ms of GEMM). Blocks are dequantised
// a few at a time into a buffer of at most kDenseChunkBytes, so memory stays bounded.
constexpr int64_t kDenseRows = 128;
constexpr int64_t kDenseChunkBytes = int64_t(4) << 20;

// w[r][k] = (q − z)·s for the 64 rows of block nb (lut_pack.dequantize_lut_weights, bit for bit).
void dequantize_block(const Problem& p, int64_t nb, float* w) {
  const uint8_t* qb = p.qw + nb * p.KC * p.bits * RB;
  const float zsym = p.chalf - p.csym;  // lut_pack.symmetric_zero, from c = (2^b − 1)/2 − z
  const int64_t cpg = p.G / 8;
  for (int r = 0; r < RB; ++r) {
    int slot[4][2];
    for (int i = 0; i < p.bits; ++i)
      for (int a = 0; a < 2; ++a) slot[i][a] = slot_of(p.bits, r, i, a);
    float* wr = w + r * p.K;
    for (int64_t g = 0; g < p.ng; ++g) {
      const float s = param_scalar(p, param_at(p, p.scales, g, nb), r);
      const float z = p.zeros ? param_scalar(p, param_at(p, p.zeros, g, nb), r) : zsym;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const uint8_t* chunk = qb + c * p.bits * RB;
        for (int a = 0; a < 2; ++a) {
          int nib[4] = {0, 0, 0, 0};
          for (int i = 0; i < p.bits; ++i) nib[i] = nibble_at(chunk, slot[i][a]);
          for (int j = 0; j < 4; ++j) {
            int q = 0;
            for (int i = 0; i < p.bits; ++i) q |= ((nib[i] >> j) & 1) << i;
            wr[8 * c + 4 * a + j] = (float(q) - z) * s;
          }
        }
      }
    }
  }
}

at::Tensor dense_linear(const Problem& p, const at::Tensor& x2, const float* bias) {
  at::Tensor out = at::empty({p.M, p.N}, x2.options());
  const int64_t per_chunk = std::max<int64_t>(1, kDenseChunkBytes / (RB * p.K * 4));  // blocks per chunk
  at::Tensor w = at::empty({std::min(per_chunk, p.NB) * RB, p.K}, x2.options());
  for (int64_t b0 = 0; b0 < p.NB; b0 += per_chunk) {
    const int64_t b1 = std::min(p.NB, b0 + per_chunk);
    float* pw = w.data_ptr<float>();
    at::parallel_for(b0, b1, 1, [&](int64_t s, int64_t e) {
      for (int64_t nb = s; nb < e; ++nb) dequantize_block(p, nb, pw + (nb - b0) * RB * p.K);
    });
    const int64_t rows = std::min(p.N, b1 * RB) - b0 * RB;
    out.narrow(1, b0 * RB, rows).copy_(at::mm(x2, w.narrow(0, 0, rows).t()));
  }
  if (bias) out.add_(at::from_blob(const_cast<float*>(bias), {p.N}, x2.options()));
  return out;
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
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  const float* pb = bias ? bias_c.data_ptr<float>() : nullptr;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(p.N);
  if (!p.int8 && p.M >= kDenseRows) return dense_linear(p, x2, pb).reshape(shape).to(xt);
  if (p.int8) { p.tq.resize(p.M * (K / 4) * 16); p.ts.resize(p.M * p.ng); }
  else p.tables.resize(p.M * (K / 4) * 16);
  p.sx.resize(p.M * p.ng);
  const float* xp = x2.data_ptr<float>();
  at::parallel_for(0, p.M * p.ng, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) build_group(p, xp + (t / p.ng) * K, t / p.ng, t % p.ng);
  });
  at::Tensor out = at::empty({p.M, p.N}, x2.options());
  float* po = out.data_ptr<float>();
  const Isa isa = active_isa();
  // The AVX-512 int8-table kernels handle up to MT activation rows per call, the others one.
  const bool tiled = isa >= Isa::Avx512 && p.int8 && avx512_kernel(p, 1, isa) != nullptr;
  auto kernel = [&](int64_t mt) -> BlockFn {
    if (isa >= Isa::Avx512) {
      const BlockFn fn = avx512_kernel(p, mt, isa);
      return fn ? fn : avx2_kernel(p);
    }
    return isa == Isa::Avx2 ? avx2_kernel(p) : block_scalar;
  };
  constexpr int64_t MT = 4;
  at::parallel_for(0, p.NB, 1, [&](int64_t b, int64_t e) {
    alignas(64) float y[MT * RB];
    for (int64_t nb = b; nb < e; ++nb)
      for (int64_t m0 = 0; m0 < p.M; m0 += tiled ? MT : 1) {
        const int64_t mt = tiled ? std::min(MT, p.M - m0) : 1;
        std::fill(y, y + mt * RB, 0.f);
        kernel(mt)(p, nb, m0, y);
        const int64_t rows = std::min(RB, p.N - nb * RB);
        for (int64_t r = 0; r < mt; ++r)
          for (int64_t j = 0; j < rows; ++j)
            po[(m0 + r) * p.N + nb * RB + j] = pb ? y[r * RB + j] + pb[nb * RB + j] : y[r * RB + j];
      }
  });
  return out.reshape(shape).to(xt);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmerge, CPU, m) { m.impl("lut_linear", &lut_linear_cpu); }

}  // namespace torchmerge
