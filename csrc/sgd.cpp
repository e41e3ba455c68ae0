// SGD step (momentum, dampening, Nesterov, weight decay, maximize) for all the tensors of one
// parameter group in one call (CPU).
//
// Per element, as torch.optim.SGD computes it (g: gradient, p: parameter, b: momentum buffer):
//   g = -g                                    if maximize
//   g = g + wd * p                            weight decay
//   b = g                                     momentum, the tensor's first step (torch clones g)
//   b = b * momentum + (1 - dampening) * g    momentum, later steps
//   g = g + momentum * b  if nesterov, else b
//   p = p - lr * g
// Subnormals are flushed to zero while the step runs (param_table.h): a momentum buffer whose
// gradient stays zero decays geometrically into that range.
//
// The group arrives as a table (param_table.h) with the rows of kernels.ops.param_table.SGD_LAYOUT:
// addresses of param, grad and momentum_buffer (0 without momentum), first_step (1 until this
// tensor's first momentum step, which clears it), then numel.
#include "common.h"
#include "entry_points.h"
#include "param_table.h"

namespace kernels {
namespace {

enum Field { kParam, kGrad, kMomentumBuffer, kFirstStep, kNumel, kFields };
const char* const kFieldNames[kFields] = {"param", "grad", "momentum_buffer", "first_step", "numel"};

// The scalars of the update, rounded to T once (as PyTorch passes its scalars).
template <class T>
struct Coefficients {
  T neg_lr, momentum, one_minus_dampening, weight_decay;
};

template <bool WEIGHT_DECAY, bool MOMENTUM, bool NESTEROV, bool MAXIMIZE>
struct Options {
  static constexpr bool weight_decay = WEIGHT_DECAY, momentum = MOMENTUM, nesterov = NESTEROV, maximize = MAXIMIZE;
};

template <int VB, class T, class O>
KERNELS_INLINE void sgd_span(const int64_t* row, int64_t begin, int64_t end, Coefficients<T> c, O) {
  using V = Vec<T, VB>;
  constexpr int L = lanes<T, VB>;
  T* param = ptr<T>(row[kParam]);
  const T* grad = ptr<const T>(row[kGrad]);
  T* buffer = ptr<T>(row[kMomentumBuffer]);
  const bool first = row[kFirstStep] != 0;
  for (int64_t i = begin; i < end; i += L) {
    const int64_t n = end - i;
    V p = vload_upto<T, VB>(param + i, n, 0), g = vload_upto<T, VB>(grad + i, n, 0);
    if constexpr (O::maximize) g = -g;
    if constexpr (O::weight_decay) g = g + p * c.weight_decay;
    if constexpr (O::momentum) {
      V b = first ? g : vload_upto<T, VB>(buffer + i, n, 0) * c.momentum + g * c.one_minus_dampening;
      vstore_upto<T, VB>(buffer + i, b, n);
      g = O::nesterov ? g + b * c.momentum : b;
    }
    vstore_upto<T, VB>(param + i, p + g * c.neg_lr, n);
  }
}
KERNELS_MULTIVERSION(sgd_span_simd, sgd_span)

template <class T, class O>
void sgd_group(int64_t* table, int64_t rows, const Coefficients<T>& c, int num_threads) {
  walk_table<T>(table, rows, kFields, num_threads, [&](int64_t r, int64_t begin, int64_t end) {
    sgd_span_simd(table + r * kFields, begin, end, c, O{});
  });
  if constexpr (O::momentum)
    for (int64_t r = 0; r < rows; ++r) table[r * kFields + kFirstStep] = 0;
}

}  // namespace

void sgd_step(const std::string& dtype, uintptr_t table, int64_t rows, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, int num_threads) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    const Coefficients<T> c{T(-lr), T(momentum), T(1.0 - dampening), T(weight_decay)};
    with_flags(
        [&](auto has_weight_decay, auto has_momentum, auto is_nesterov, auto is_maximize) {
          using O = Options<has_weight_decay, has_momentum, is_nesterov, is_maximize>;
          sgd_group<T, O>(ptr<int64_t>(table), rows, c, num_threads);
        },
        weight_decay != 0, momentum != 0, nesterov, maximize);
  });
}

namespace {

static const Register registration([](py::module_& m) {
  py::tuple fields(size_t{kFields});
  for (int f = 0; f < kFields; ++f) fields[f] = kFieldNames[f];
  m.attr("sgd_table_fields") = fields;
  m.def("sgd_step", &sgd_step, py::call_guard<py::gil_scoped_release>(),
        "One SGD step over a parameter group's tensor table (see csrc/sgd.cpp)", py::arg("dtype"), py::arg("table"),
        py::arg("rows"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"),
        py::arg("nesterov"), py::arg("maximize"), py::arg("num_threads"));
});

}  // namespace
}  // namespace kernels
