// Causal attention with each key's total over the attention rows, in one pass (CPU), for the KV
// methods that score with every query's attention (H2O, HitKV). Built by codegen/cpu.py.
//
// For each (batch row, KV head) and each block of BLOCK queries, the G query heads of the group
// form G * c rows; their logits over the keys the block can see (G * c x stop) stay in L2 while
// they are exponentiated, multiplied by the values and reduced per key. Per key, the total is
// - top_k == 0: the sum of its attention probabilities over every row (H2O's accumulated attention);
// - top_k > 0: the rows in which it is among the top_k probabilities, and above 0 (HitKV's hits).
// The output is softmax(causal(q k^T * scale)) v, 0 for a padding query.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t BLOCK = 16;  // queries per block: G * BLOCK rows of logits stay in L2

float row_max(const float* x, int64_t n) {
  Vec best(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) best = at::vec::maximum(best, Vec::loadu(x + i));
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, best);
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x[i] = exp(x[i] - top) for i < n; returns their sum.
float exp_sum(float* x, int64_t n, float top) {
  Vec acc(0.f), shift(top);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = (Vec::loadu(x + i) - shift).exp_u20();
    e.store(x + i);
    acc = acc + e;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - top);
    s += x[i];
  }
  return s;
}

// dst[i] += w * x[i] for i < n.
void axpy(float* dst, const float* x, int64_t n, float w) {
  Vec vw(w);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(dst + i) + Vec::loadu(x + i) * vw).store(dst + i);
  for (; i < n; ++i) dst[i] += w * x[i];
}

// dst[j] += 1 for the top_k largest x[j] (j < n) whose probability x[j] * inverse is above 0.
void count_hits(float* dst, const float* x, int64_t n, int64_t top_k, float inverse, std::vector<float>& best,
                std::vector<int64_t>& where) {
  const int64_t k = std::min(top_k, n);
  std::fill(best.begin(), best.begin() + k, -1.f);  // probabilities are >= 0: any entry beats -1
  std::fill(where.begin(), where.begin() + k, -1);
  auto offer = [&](int64_t j) {  // insert x[j] into the descending list if it beats the last
    if (!(x[j] > best[k - 1])) return;
    int64_t p = k - 1;
    while (p > 0 && x[j] > best[p - 1]) {
      best[p] = best[p - 1];
      where[p] = where[p - 1];
      --p;
    }
    best[p] = x[j];
    where[p] = j;
  };
  // From the newest key back: attention rows favour recent keys, so the threshold best[k - 1] is
  // high after the first vectors and later ones are skipped whole (left to right, a rising row
  // would insert at nearly every key).
  int64_t j = n;
  for (; j >= Vec::size(); j -= Vec::size()) {
    const int none_above = (1 << Vec::size()) - 1;  // every lane fails "x > best[k - 1]"
    if ((Vec::loadu(x + j - Vec::size()) > Vec(best[k - 1])).zero_mask() == none_above) continue;
    for (int64_t i = j - 1; i >= j - Vec::size(); --i) offer(i);
  }
  for (--j; j >= 0; --j) offer(j);
  for (int64_t p = 0; p < k; ++p)
    if (where[p] >= 0 && best[p] * inverse > 0.f) dst[where[p]] += 1.f;
}

// q (B, Hq, T, D), k and v (B, Hkv, T, D), all fp32 contiguous; valid (B, T) bool or None. Writes
// the output (B, Hq, T, D) and the totals (B, Hkv, T), fp32 contiguous, in full.
void attention_totals(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& valid, double scale, double softcap, int64_t top_k,
                      at::Tensor& out, at::Tensor& totals) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat && totals.scalar_type() == at::kFloat,
              "attention_totals: fp32 tensors expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous() &&
                  totals.is_contiguous(), "attention_totals: contiguous tensors expected");
  TORCH_CHECK(top_k >= 0, "attention_totals: top_k must be >= 0, got ", top_k);
  const int64_t batch = q.size(0), hq = q.size(1), length = q.size(2), dim = q.size(3), hkv = k.size(1);
  const int64_t group = hq / hkv;
  TORCH_CHECK(out.sizes() == q.sizes() && totals.sizes() == at::IntArrayRef({batch, hkv, length}),
              "attention_totals: out must be (B, Hq, T, D) and totals (B, Hkv, T)");
  totals.zero_();
  const bool masked = valid.has_value() && valid->defined();
  at::Tensor real = masked ? valid->to(at::kBool).contiguous() : at::Tensor();
  const float neg_inf = -std::numeric_limits<float>::infinity(), cap = static_cast<float>(softcap);

  at::parallel_for(0, batch * hkv, 1, [&](int64_t first, int64_t last) {
    at::Tensor rows_buffer = at::empty({group * BLOCK, dim}, q.options());  // (G * BLOCK, D)
    at::Tensor out_buffer = at::empty({group * BLOCK, dim}, q.options());
    at::Tensor logits_buffer = at::empty({group * BLOCK * length}, q.options());
    std::vector<float> inverse(group * BLOCK), best(std::max<int64_t>(top_k, 1));
    std::vector<int64_t> where(std::max<int64_t>(top_k, 1));
    for (int64_t bh = first; bh < last; ++bh) {
      const int64_t b = bh / hkv, h = bh % hkv;
      const bool* keep = masked ? real.data_ptr<bool>() + b * length : nullptr;
      float* column = totals.data_ptr<float>() + bh * length;
      at::Tensor keys = k.select(0, b).select(0, h);  // (T, D)
      at::Tensor values = v.select(0, b).select(0, h);  // (T, D)
      for (int64_t start = 0; start < length; start += BLOCK) {
        const int64_t stop = std::min(start + BLOCK, length), c = stop - start, n = group * c;
        for (int64_t g = 0; g < group; ++g)  // row g * c + t: head g's query start + t, scaled
          for (int64_t t = 0; t < c; ++t) {
            const float* src = q.data_ptr<float>() + (((b * hq + h * group + g) * length) + start + t) * dim;
            float* dst = rows_buffer.data_ptr<float>() + (g * c + t) * dim;
            for (int64_t d = 0; d < dim; ++d) dst[d] = src[d] * static_cast<float>(scale);
          }
        at::Tensor logits = logits_buffer.narrow(0, 0, n * stop).view({n, stop});
        at::mm_out(logits, rows_buffer.narrow(0, 0, n), keys.narrow(0, 0, stop).t());  // (G * c, stop)
        for (int64_t r = 0; r < n; ++r) {
          const int64_t t = start + r % c, seen = t + 1;  // the row's query position; causal: keys 0..t
          float* x = logits.data_ptr<float>() + r * stop;
          std::fill(x + seen, x + stop, 0.f);
          inverse[r] = 0.f;
          if (keep && !keep[t]) {  // a padding query observes nothing and outputs 0
            std::fill(x, x + seen, 0.f);
            continue;
          }
          if (softcap > 0)
            for (int64_t j = 0; j < seen; ++j) x[j] = std::tanh(x[j] / cap) * cap;
          if (keep)
            for (int64_t j = 0; j < seen; ++j)
              if (!keep[j]) x[j] = neg_inf;
          inverse[r] = 1.f / exp_sum(x, seen, row_max(x, seen));  // x: unnormalized probabilities
          if (top_k == 0)
            axpy(column, x, seen, inverse[r]);
          else
            count_hits(column, x, seen, top_k, inverse[r], best, where);
        }
        at::Tensor block_out = out_buffer.narrow(0, 0, n);
        at::mm_out(block_out, logits, values.narrow(0, 0, stop));  // (G * c, D), unnormalized
        const float* result = out_buffer.data_ptr<float>();
        for (int64_t r = 0; r < n; ++r) {
          const int64_t g = r / c, t = start + r % c;
          float* dst = out.data_ptr<float>() + (((b * hq + h * group + g) * length) + t) * dim;
          for (int64_t d = 0; d < dim; ++d) dst[d] = result[r * dim + d] * inverse[r];
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(compile_sparse_cpu, m) {
  m.def("attention_totals(Tensor q, Tensor k, Tensor v, Tensor? valid, float scale, float softcap, int top_k, "
        "Tensor(a!) out, Tensor(b!) totals) -> ()");
}

TORCH_LIBRARY_IMPL(compile_sparse_cpu, CPU, m) { m.impl("attention_totals", &attention_totals); }
