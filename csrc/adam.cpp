// Adam / AdamW step for all the tensors of one parameter group in one call (CPU).
//
// Per element, as torch.optim.Adam computes it (g: gradient, p: parameter, t: the tensor's step
// after the increment):
//   g  = -g                                   if maximize
//   g  = g + wd * p                           Adam with weight decay
//   p  = p * (1 - lr * wd)                    AdamW (decoupled weight decay)
//   m  = lerp(m, g, 1 - beta1)                first moment, with PyTorch's two-sided lerp: from m for
//                                             a weight below 0.5, from g above (with beta1 = 0, m = g exactly)
//   v  = v * beta2 + (1 - beta2) * g * g      second moment
//   v' = max(v', v)                           amsgrad: the running maximum replaces v below
//   p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// The bias corrections are computed in double from each tensor's step, like PyTorch does.
// Subnormals are flushed to zero while the step runs (see walk_table in param_table.h): a first
// moment below ~1e-37 then stops decaying instead of reaching 0 through subnormals; the parameter
// change it causes (lr * m / eps, below 1e-32) is far below any parameter's rounding step.
//
// The group arrives as a table (param_table.h) with the rows of kernels.ops.param_table.ADAM_LAYOUT:
// addresses of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 without amsgrad) and step (a
// float32 scalar the step increments), then numel.
#include <cmath>
#include <vector>

#include "common.h"
#include "entry_points.h"
#include "param_table.h"

namespace kernels {
namespace {

enum Field { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kStep, kNumel, kFields };
const char* const kFieldNames[kFields] = {"param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step",
                                          "numel"};

struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
};

// The per-tensor constants of the update, rounded to T once (as PyTorch passes its scalars).
template <class T>
struct Coefficients {
  T lerp_coeff, beta2, one_minus_beta2, weight_decay, decay, eps, inv_bias_correction2_sqrt, neg_step_size;
  bool lerp_from_m;  // PyTorch's lerp: m + w (g - m) when |w| < 0.5, else g + (w - 1) (g - m)
};

template <class T>
Coefficients<T> coefficients(const Hyper& h, float step) {
  const double bias_correction1 = 1.0 - std::pow(h.beta1, double(step));
  const double bias_correction2 = 1.0 - std::pow(h.beta2, double(step));
  const T w = T(1.0 - h.beta1);
  const bool from_m = std::abs(w) < T(0.5);
  return {from_m ? w : w - T(1), T(h.beta2), T(1.0 - h.beta2), T(h.weight_decay), T(1.0 - h.lr * h.weight_decay),
          T(h.eps), T(1.0 / std::sqrt(bias_correction2)), T(-(h.lr / bias_correction1)), from_m};
}

// The options as compile-time constants.
template <bool WEIGHT_DECAY, bool DECOUPLED, bool AMSGRAD, bool MAXIMIZE>
struct Options {
  static constexpr bool weight_decay = WEIGHT_DECAY, decoupled = DECOUPLED, amsgrad = AMSGRAD, maximize = MAXIMIZE;
};

template <class T, int VB>
KERNELS_INLINE Vec<T, VB> vsqrt(Vec<T, VB> x) {
  for (int i = 0; i < lanes<T, VB>; ++i) x[i] = std::sqrt(x[i]);
  return x;
}

// One vector of the update; max_exp_avg_sq is read and written only with amsgrad.
template <int VB, class O, class T>
KERNELS_INLINE void update(Vec<T, VB>& p, Vec<T, VB> g, Vec<T, VB>& m, Vec<T, VB>& v, Vec<T, VB>& v_max,
                           const Coefficients<T>& c) {
  using V = Vec<T, VB>;
  if constexpr (O::maximize) g = -g;
  if constexpr (O::weight_decay) {
    if constexpr (O::decoupled)
      p = p * c.decay;
    else
      g = g + p * c.weight_decay;
  }
  m = (c.lerp_from_m ? m : g) + c.lerp_coeff * (g - m);
  v = v * c.beta2 + g * g * c.one_minus_beta2;
  V second = v;
  if constexpr (O::amsgrad) second = v_max = vmax<T, VB>(v_max, v);
  const V denom = vsqrt<T, VB>(second) * c.inv_bias_correction2_sqrt + c.eps;
  p = p + c.neg_step_size * m / denom;
}

// Elements [begin, end) of one tensor. The tail shorter than a vector goes through a
// zero-padded vector so that every element takes the same arithmetic.
template <int VB, class T, class O>
KERNELS_INLINE void adam_span(const int64_t* row, int64_t begin, int64_t end, Coefficients<T> c, O) {
  using V = Vec<T, VB>;
  constexpr int L = lanes<T, VB>;
  T* param = ptr<T>(row[kParam]);
  const T* grad = ptr<const T>(row[kGrad]);
  T* exp_avg = ptr<T>(row[kExpAvg]);
  T* exp_avg_sq = ptr<T>(row[kExpAvgSq]);
  T* max_exp_avg_sq = ptr<T>(row[kMaxExpAvgSq]);
  V v_max{};
  for (int64_t i = begin; i < end; i += L) {
    const int64_t n = end - i;
    V p = vload_upto<T, VB>(param + i, n, 0), m = vload_upto<T, VB>(exp_avg + i, n, 0);
    V v = vload_upto<T, VB>(exp_avg_sq + i, n, 0);
    if constexpr (O::amsgrad) v_max = vload_upto<T, VB>(max_exp_avg_sq + i, n, 0);
    update<VB, O, T>(p, vload_upto<T, VB>(grad + i, n, 0), m, v, v_max, c);
    vstore_upto<T, VB>(param + i, p, n);
    vstore_upto<T, VB>(exp_avg + i, m, n);
    vstore_upto<T, VB>(exp_avg_sq + i, v, n);
    if constexpr (O::amsgrad) vstore_upto<T, VB>(max_exp_avg_sq + i, v_max, n);
  }
}
KERNELS_MULTIVERSION(adam_span_simd, adam_span)

template <class T, class O>
void adam_group(const int64_t* table, int64_t rows, const Hyper& h, int num_threads) {
  // Steps first (each tensor's step is read and written once), then the elements.
  std::vector<Coefficients<T>> coeffs(rows);
  for (int64_t r = 0; r < rows; ++r) {
    float* step = ptr<float>(table[r * kFields + kStep]);
    *step += 1.0f;
    coeffs[r] = coefficients<T>(h, *step);
  }
  walk_table<T>(table, rows, kFields, num_threads, [&](int64_t r, int64_t begin, int64_t end) {
    adam_span_simd(table + r * kFields, begin, end, coeffs[r], O{});
  });
}

}  // namespace

void adam_step(const std::string& dtype, uintptr_t table, int64_t rows, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize, int num_threads) {
  const Hyper h{lr, beta1, beta2, eps, weight_decay};
  dispatch_dtype(dtype, [&](auto zero) {
    with_flags(
        [&](auto has_weight_decay, auto is_decoupled, auto has_amsgrad, auto is_maximize) {
          using O = Options<has_weight_decay, is_decoupled, has_amsgrad, is_maximize>;
          adam_group<decltype(zero), O>(ptr<const int64_t>(table), rows, h, num_threads);
        },
        weight_decay != 0, decoupled, amsgrad, maximize);
  });
}

namespace {

static const Register registration([](py::module_& m) {
  py::tuple fields(size_t{kFields});
  for (int f = 0; f < kFields; ++f) fields[f] = kFieldNames[f];
  m.attr("adam_table_fields") = fields;
  m.def("adam_step", &adam_step, py::call_guard<py::gil_scoped_release>(),
        "One Adam/AdamW step over a parameter group's tensor table (see csrc/adam.cpp)", py::arg("dtype"),
        py::arg("table"), py::arg("rows"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("num_threads"));
});

}  // namespace
}  // namespace kernels
