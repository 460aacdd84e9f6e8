// torchmerge::topk_mask_like_sort(values, k): mask of the set torch.argsort(values, descending=True)[:k]
// puts first on CPU, i.e. libstdc++ std::sort (introsort, unstable) over (value, index) pairs with
// torch's KeyValueCompDesc (NaN before numbers, NaNs tie with each other, then '>').
// Semantics: torchmerge/ops/topk_mask.py (the reference is that argsort).
//
// Only the partitions on the path holding position k are replayed (expected O(n)): partitions never
// move elements across a cut, the final insertion sort never moves an element past a strictly
// greater one, so positions [0, k) are fixed once a cut lands on k or the range holding k is sorted.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

namespace torchmerge {
namespace {

constexpr int64_t kInsertionThreshold = 16;  // libstdc++ _S_threshold: introsort stops at <= 16 elements

// a goes before b in the descending sort  <=>  order_key(a) > order_key(b).
// NaN → largest key (all NaNs equal), ±0 share a key, otherwise the usual monotone float→uint map.
inline uint32_t order_key(float x) {
  if (std::isnan(x)) return 0xFFFFFFFFu;
  if (x == 0.0f) return 0x80000000u;
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

template <typename Idx>
struct Item {
  uint32_t key;
  Idx idx;
};

struct Before {
  template <typename T>
  bool operator()(const T& a, const T& b) const { return a.key > b.key; }
};

// libstdc++ __move_median_to_first(result=first, a=first+1, b=mid, c=last-1).
template <typename T>
void median_to_first(T* first, T* last) {
  T* a = first + 1;
  T* b = first + (last - first) / 2;
  T* c = last - 1;
  Before before;
  T* m;
  if (before(*a, *b)) {
    m = before(*b, *c) ? b : (before(*a, *c) ? c : a);
  } else {
    m = before(*a, *c) ? a : (before(*b, *c) ? c : b);
  }
  std::swap(*first, *m);
}

// libstdc++ __unguarded_partition(first+1, last, pivot=first); the pivot stays at *first throughout.
// Hoare's loop swaps the i-th element from the left with key <= pivot with the i-th from the right with
// key >= pivot while the former is left of the latter. Blocks of kBlock positions are scanned branch-free
// (BlockQuicksort, Edelkamp & Weiss 2016) and their candidates swapped in that same pairing while the
// unscanned middle is at least a block wide; the scalar loop then resumes from the state the plain loop
// would have after the last swap, so the result is identical.
constexpr int kBlock = 128;

template <typename T>
T* unguarded_partition(T* first, T* last) {
  const uint32_t pivot = first->key;
  T* left_end = first + 1;  // left scan has examined [first+1, left_end)
  T* right_begin = last;    // right scan has examined [right_begin, last)
  T* cand_l[kBlock];
  T* cand_r[kBlock];
  int il = 0, nl = 0, ir = 0, nr = 0;
  T* lo = first + 1;
  T* hi = last;
  while (true) {
    if (il == nl) {
      if (right_begin - left_end < kBlock) break;
      il = nl = 0;
      for (int j = 0; j < kBlock; ++j) {
        cand_l[nl] = left_end + j;
        nl += left_end[j].key <= pivot;
      }
      left_end += kBlock;
    }
    if (ir == nr) {
      if (right_begin - left_end < kBlock) break;
      ir = nr = 0;
      for (int j = 1; j <= kBlock; ++j) {
        cand_r[nr] = right_begin - j;
        nr += (right_begin - j)->key >= pivot;
      }
      right_begin -= kBlock;
    }
    const int m = std::min(nl - il, nr - ir);
    for (int j = 0; j < m; ++j) std::swap(*cand_l[il + j], *cand_r[ir + j]);
    if (m > 0) {
      lo = cand_l[il + m - 1] + 1;
      hi = cand_r[ir + m - 1];
    }
    il += m;
    ir += m;
  }
  while (true) {
    while (lo->key > pivot) ++lo;
    --hi;
    while (pivot > hi->key) --hi;
    if (!(lo < hi)) return lo;
    std::swap(*lo, *hi);
    ++lo;
  }
}

// Stable insertion sort: what the final insertion sort does inside one segment of <= 16 elements.
template <typename T>
void insertion_sort(T* first, T* last) {
  for (T* i = first + 1; i < last; ++i) {
    T v = *i;
    T* j = i;
    while (j > first && v.key > (j - 1)->key) {
      *j = *(j - 1);
      --j;
    }
    *j = v;
  }
}

// The sort key of values[i], or of |values[i]| (what TIES trims on) when kAbs: fabs clears the sign
// bit as torch.abs does, NaN included.
template <bool kAbs>
inline uint32_t key_of(const float* values, int64_t i) {
  return order_key(kAbs ? std::fabs(values[i]) : values[i]);
}

template <typename Idx, bool kAbs>
void mark_first_k(const float* values, int64_t n, int64_t k, bool* out) {
  using T = Item<Idx>;
  std::unique_ptr<T[]> buf(new T[n]);
  T* a = buf.get();
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) a[i] = T{key_of<kAbs>(values, i), static_cast<Idx>(i)};
  });

  // Invariant: f < k <= l, and every element of [0, f) goes before every element of [f, n).
  int64_t f = 0, l = n;
  bool sorted = false;
  int depth = 2 * (63 - __builtin_clzll(static_cast<unsigned long long>(n)));  // 2·floor(log2 n)
  while (l - f > kInsertionThreshold) {
    if (depth == 0) {
      // libstdc++ falls back to __partial_sort(first, last, last): heap select + sort_heap, which is
      // exactly std::partial_sort with middle == last; the range ends sorted.
      std::partial_sort(a + f, a + l, a + l, Before{});
      sorted = true;
      break;
    }
    --depth;
    median_to_first(a + f, a + l);
    const int64_t cut = unguarded_partition(a + f, a + l) - a;
    if (cut == k) {  // [0, k) is final as a set; later steps only reorder inside it
      l = k;
      break;
    }
    if (k < cut) {
      l = cut;
    } else {
      f = cut;
    }
  }
  if (!sorted && l - f <= kInsertionThreshold) insertion_sort(a + f, a + l);

  // Keys above the smallest key in [0, k) occur only in [0, k); only its equals need the scatter.
  uint32_t kth = a[f].key;
  for (int64_t j = f + 1; j < k; ++j) kth = std::min(kth, a[j].key);
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = key_of<kAbs>(values, i) > kth;
  });
  for (int64_t j = 0; j < k; ++j) {
    if (a[j].key == kth) out[a[j].idx] = true;
  }
}

at::Tensor topk_mask_like_sort_cpu(const at::Tensor& values, int64_t k, bool absolute) {
  const char* op = "topk_mask_like_sort";
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D; got shape ", values.sizes());
  TORCH_CHECK_VALUE(values.scalar_type() == at::kFloat, op, ": values must be a torch.float32 tensor; got ",
                    values.scalar_type());
  const int64_t n = values.numel();
  TORCH_CHECK_VALUE(k >= 0 && k <= n, op, ": k must be in [0, ", n, "] (values.numel()); got ", k);
  auto out = at::empty({n}, values.options().dtype(at::kBool));
  if (k == 0 || k == n) return out.fill_(k == n);
  const at::Tensor v = values.contiguous();
  const float* vp = v.data_ptr<float>();
  bool* op_ = out.data_ptr<bool>();
  const bool small = n <= int64_t(0xFFFFFFFF);
  if (absolute) {
    small ? mark_first_k<uint32_t, true>(vp, n, k, op_) : mark_first_k<int64_t, true>(vp, n, k, op_);
  } else {
    small ? mark_first_k<uint32_t, false>(vp, n, k, op_) : mark_first_k<int64_t, false>(vp, n, k, op_);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmerge, CPU, m) { m.impl("topk_mask_like_sort", &topk_mask_like_sort_cpu); }

}  // namespace torchmerge
