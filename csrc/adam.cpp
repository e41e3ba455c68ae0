// Adam / AdamW step for all the tensors of one parameter group in one call (CPU).
//
// Per element, as torch.optim.Adam computes it (g: gradient, p: parameter, t: the tensor's step
// after the increment):
//   g  = -g                                   if maximize
//   g  = g + wd * p                           Adam with weight decay
//   p  = p * (1 - lr * wd)                    AdamW (decoupled weight decay)
//   m  = lerp(m, g, 1 - beta1)                first moment
//   v  = v * beta2 + (1 - beta2) * g * g      second moment
//   v' = max(v', v)                           amsgrad: the running maximum replaces v below
//   p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// The bias corrections are computed in double from each tensor's step, like PyTorch does.
//
// Subnormals are flushed to zero (FlushSubnormals). The moments of a parameter whose gradient
// stays zero decay geometrically into the subnormal range, where each step would cost ~15x
// more on x86 (measured: 25 us -> 400 us for the MNIST layer's 100k states); training the MNIST
// MLP puts about 4 % of them there. The only difference it makes: a first moment below ~1e-37
// stops decaying instead of reaching 0 through subnormals, and the parameter change it then
// causes (lr * m / eps, below 1e-32) is far below any parameter's rounding step.
//
// The group arrives as a table of int64 rows (built once per group by kernels/adam.py), one
// row per tensor: addresses of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 without
// amsgrad) and step (a float32 scalar), then numel. The elements of all the tensors are
// treated as one concatenated range split evenly across threads.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace kernels {
namespace {

enum Field { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kStep, kNumel, kFields };

struct Options {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, amsgrad, maximize;
};

// The per-tensor constants of the update, rounded to T once (as PyTorch passes its scalars).
template <class T>
struct Coefficients {
  T lerp_weight, beta2, one_minus_beta2, weight_decay, decay, eps, inv_bias_correction2_sqrt, neg_step_size;
};

template <class T>
Coefficients<T> coefficients(const Options& o, float step) {
  const double bias_correction1 = 1.0 - std::pow(o.beta1, double(step));
  const double bias_correction2 = 1.0 - std::pow(o.beta2, double(step));
  return {T(1.0 - o.beta1), T(o.beta2),      T(1.0 - o.beta2), T(o.weight_decay), T(1.0 - o.lr * o.weight_decay),
          T(o.eps),         T(1.0 / std::sqrt(bias_correction2)), T(-(o.lr / bias_correction1))};
}

template <class T, int VB>
KERNELS_INLINE Vec<T, VB> vsqrt(Vec<T, VB> x) {
  for (int i = 0; i < lanes<T, VB>; ++i) x[i] = std::sqrt(x[i]);
  return x;
}

// One vector of the update; max_exp_avg_sq is read and written only with amsgrad.
template <int VB, class T>
KERNELS_INLINE void update(Vec<T, VB>& p, Vec<T, VB> g, Vec<T, VB>& m, Vec<T, VB>& v, Vec<T, VB>& v_max,
                           const Coefficients<T>& c, const Options& o) {
  using V = Vec<T, VB>;
  if (o.maximize) g = -g;
  if (o.weight_decay != 0) {
    if (o.decoupled)
      p = p * c.decay;
    else
      g = g + p * c.weight_decay;
  }
  m = m + (g - m) * c.lerp_weight;
  v = v * c.beta2 + g * g * c.one_minus_beta2;
  V second = v;
  if (o.amsgrad) second = v_max = vmax<T, VB>(v_max, v);
  const V denom = vsqrt<T, VB>(second) * c.inv_bias_correction2_sqrt + c.eps;
  p = p + c.neg_step_size * m / denom;
}

// Elements [begin, end) of one tensor. The tail shorter than a vector goes through a
// zero-padded vector so that every element takes the same arithmetic.
template <int VB, class T>
KERNELS_INLINE void adam_span(const int64_t* row, int64_t begin, int64_t end, Coefficients<T> c, Options o) {
  using V = Vec<T, VB>;
  constexpr int L = lanes<T, VB>;
  T* param = ptr<T>(row[kParam]);
  const T* grad = ptr<const T>(row[kGrad]);
  T* exp_avg = ptr<T>(row[kExpAvg]);
  T* exp_avg_sq = ptr<T>(row[kExpAvgSq]);
  T* max_exp_avg_sq = ptr<T>(row[kMaxExpAvgSq]);
  V v_max{};
  int64_t i = begin;
  for (; i + L <= end; i += L) {
    V p = vload<T, VB>(param + i), m = vload<T, VB>(exp_avg + i), v = vload<T, VB>(exp_avg_sq + i);
    if (o.amsgrad) v_max = vload<T, VB>(max_exp_avg_sq + i);
    update<VB, T>(p, vload<T, VB>(grad + i), m, v, v_max, c, o);
    vstore<T, VB>(param + i, p);
    vstore<T, VB>(exp_avg + i, m);
    vstore<T, VB>(exp_avg_sq + i, v);
    if (o.amsgrad) vstore<T, VB>(max_exp_avg_sq + i, v_max);
  }
  if (i == end) return;
  const int64_t n = end - i;
  V p = vload_upto<T, VB>(param + i, n, 0), m = vload_upto<T, VB>(exp_avg + i, n, 0);
  V v = vload_upto<T, VB>(exp_avg_sq + i, n, 0);
  if (o.amsgrad) v_max = vload_upto<T, VB>(max_exp_avg_sq + i, n, 0);
  update<VB, T>(p, vload_upto<T, VB>(grad + i, n, 0), m, v, v_max, c, o);
  vstore_upto<T, VB>(param + i, p, n);
  vstore_upto<T, VB>(exp_avg + i, m, n);
  vstore_upto<T, VB>(exp_avg_sq + i, v, n);
  if (o.amsgrad) vstore_upto<T, VB>(max_exp_avg_sq + i, v_max, n);
}
KERNELS_MULTIVERSION(adam_span_simd, adam_span)

// Elements per thread below which the step stays on the calling thread.
constexpr int64_t kMinWorkPerThread = 1 << 15;

template <class T>
void adam_group(const int64_t* table, int64_t rows, const Options& o, int num_threads) {
  // Steps first (each tensor's step is read and written once), then the element range.
  std::vector<Coefficients<T>> coeffs(rows);
  std::vector<int64_t> offsets(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* row = table + r * kFields;
    float* step = ptr<float>(row[kStep]);
    *step += 1.0f;
    coeffs[r] = coefficients<T>(o, *step);
    offsets[r + 1] = offsets[r] + row[kNumel];
  }
  const int64_t total = offsets[rows];
  parallel_for(total, threads_for(total, num_threads, kMinWorkPerThread), [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    int64_t r = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; r < rows && offsets[r] < end; ++r) {
      const int64_t lo = std::max(begin, offsets[r]) - offsets[r];
      const int64_t hi = std::min(end, offsets[r + 1]) - offsets[r];
      if (lo < hi) adam_span_simd(table + r * kFields, lo, hi, coeffs[r], o);
    }
  });
}

void adam_step(const std::string& dtype, uintptr_t table, int64_t rows, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize, int num_threads) {
  const Options o{lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize};
  dispatch_dtype(dtype, [&](auto zero) {
    adam_group<decltype(zero)>(ptr<const int64_t>(table), rows, o, num_threads);
  });
}

static const Register registration([](py::module_& m) {
  m.attr("adam_table_fields") = int(kFields);
  m.def("adam_step", &adam_step, py::call_guard<py::gil_scoped_release>(), "One Adam/AdamW step over a parameter group's tensor table (see csrc/adam.cpp)",
        py::arg("dtype"), py::arg("table"), py::arg("rows"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("num_threads"));
});

}  // namespace
}  // namespace kernels
