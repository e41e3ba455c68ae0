// One training step of a plain MLP on the CPU in one call: forward through every layer, the
// mean softmax cross-entropy and its gradient, the backward through every layer into the
// parameters' gradient buffers and, given one, the optimizer's step over its table, composed
// from the linear, cross-entropy and optimizer entry points (entry_points.h) with no Python,
// autograd or allocation between them.
//
// The layers arrive as a flat list of kMlpLayerFields int64 values per layer (built by
// kernels/ops/mlp.py, which restates the field order as MLP_LAYER_FIELDS; a test compares the
// two): addresses of the weight (N, K), bias (N) or 0, their gradients (written, not
// accumulated; 0 for no bias), the layer's output buffer (M, N) and the buffer of the loss's
// gradient with respect to that output (M, N), then K and N. Every hidden layer applies
// `activation`, the last none (its output is the logits).
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "entry_points.h"
#include "param_table.h"

namespace kernels {
namespace {

enum LayerField { kWeight, kBias, kGradWeight, kGradBias, kOutput, kGradOutput, kInFeatures, kOutFeatures, kMlpLayerFields };
const char* const kLayerFieldNames[kMlpLayerFields] = {"weight",      "bias", "grad_weight",  "grad_bias",
                                                       "output",      "grad_output", "in_features", "out_features"};

// Rows of a dataset gathered into a batch, split between the threads: the rows are scattered over
// a dataset far larger than the caches, so every one starts with misses to memory, which two
// cores wait on side by side (27 -> 16 us for 64 MNIST rows; prefetching rows ahead gained nothing
// over the hardware's own prefetch).
constexpr int64_t kMinGatherPerThread = 1 << 14;  // elements

// The target that counts for nothing: F.cross_entropy's default ignore_index, the only one the
// step takes (kernels/cpu/mlp.py's IGNORE_INDEX; exported as mlp_ignore_index, which a test compares).
constexpr int64_t kIgnoreIndex = -100;

template <class T>
void gather_rows(const T* x, const int64_t* target, const int64_t* index, T* x_batch, int64_t* target_batch,
                 int64_t M, int64_t K, int num_threads) {
  parallel_for(M, threads_for(M * K, num_threads, kMinGatherPerThread), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(x_batch + i * K, x + index[i] * K, size_t(K) * sizeof(T));
      target_batch[i] = target[index[i]];
    }
  });
}

// Runs `steps` training steps and writes each one's mean loss to loss[s]. Without `index` (0):
// one step on the batch x (M, K0) with int64 targets (M). With `index` (steps x M int64 row
// numbers), step s trains on rows index[s * M, (s + 1) * M) of x (rows rows) and target, gathered
// first into x_batch and target_batch (gather_rows), and several steps need the optimizer's
// `update`, which each step runs before the next one's forward. Returns -1, or the first batch
// row (with index: the first position in it) whose target is out of range, in which case no
// gradient is written and no update runs: every step's targets are checked before the first
// step starts. Raises IndexError for an index out of range.
int64_t mlp_step(const std::string& dtype, uintptr_t x, uintptr_t target, uintptr_t index, int64_t rows,
                 uintptr_t x_batch, uintptr_t target_batch, uintptr_t loss, int64_t M, int64_t steps,
                 const std::vector<int64_t>& layers, const std::string& activation, const Update& update,
                 int num_threads) {
  const OwnPool own_pool;
  if (steps != 1 && (!index || update.op.empty()))
    throw std::invalid_argument("MLPStep: several steps in one call need an index of rows and an optimizer update");
  const int64_t count = int64_t(layers.size()) / kMlpLayerFields;
  auto field = [&](int64_t l, LayerField f) { return layers[l * kMlpLayerFields + f]; };
  const int64_t last = count - 1, classes = field(last, kOutFeatures);
  const int64_t* rows_of = ptr<const int64_t>(index);
  if (index) {
    const int64_t* targets = ptr<const int64_t>(target);
    for (int64_t i = 0; i < steps * M; ++i)
      if (rows_of[i] < 0 || rows_of[i] >= rows)
        throw py::index_error("MLPStep: index[" + std::to_string(i) + "] = " + std::to_string(rows_of[i]) +
                              " is out of range for " + std::to_string(rows) + " rows");
    for (int64_t i = 0; i < steps * M; ++i) {
      const int64_t t = targets[rows_of[i]];
      if (t != kIgnoreIndex && (t < 0 || t >= classes)) return i;
    }
  }
  size_t loss_bytes = 0;
  dispatch_dtype(dtype, [&](auto zero) { loss_bytes = sizeof(zero); });
  auto act = [&](int64_t l) { return l == last ? std::string("none") : activation; };
  for (int64_t s = 0; s < steps; ++s) {
    uintptr_t batch = x, batch_target = target;
    if (index) {
      dispatch_dtype(dtype, [&](auto zero) {
        using T = decltype(zero);
        gather_rows(ptr<const T>(x), ptr<const int64_t>(target), rows_of + s * M, ptr<T>(x_batch),
                    ptr<int64_t>(target_batch), M, field(0, kInFeatures), num_threads);
      });
      batch = x_batch;
      batch_target = target_batch;
    }
    auto input = [&](int64_t l) { return l == 0 ? batch : uintptr_t(field(l - 1, kOutput)); };
    for (int64_t l = 0; l < count; ++l)
      linear_forward(dtype, input(l), field(l, kWeight), field(l, kBias), field(l, kOutput), M,
                     field(l, kOutFeatures), field(l, kInFeatures), act(l), num_threads);
    const int64_t bad_row = cross_entropy_forward(dtype, field(last, kOutput), batch_target, 0, loss + s * loss_bytes,
                                                  field(last, kGradOutput), M, classes, kIgnoreIndex, 0.0, "mean",
                                                  num_threads);
    if (bad_row >= 0) return bad_row;  // only without index (one step): with one, checked above
    for (int64_t l = last; l >= 0; --l)
      linear_backward(dtype, field(l, kGradOutput), l == last ? 0 : field(l, kOutput), input(l), field(l, kWeight),
                      l == 0 ? 0 : field(l - 1, kGradOutput), field(l, kGradWeight), field(l, kGradBias), M,
                      field(l, kOutFeatures), field(l, kInFeatures), act(l), num_threads);
    run_update(dtype, update, num_threads);
  }
  return -1;
}

static const Register registration([](py::module_& m) {
  py::tuple fields(size_t{kMlpLayerFields});
  for (int f = 0; f < kMlpLayerFields; ++f) fields[f] = kLayerFieldNames[f];
  m.attr("mlp_layer_fields") = fields;
  m.attr("mlp_ignore_index") = kIgnoreIndex;
  m.def(
      "mlp_step",
      [](const std::string& dtype, uintptr_t x, uintptr_t target, uintptr_t index, int64_t rows, uintptr_t x_batch,
         uintptr_t target_batch, uintptr_t loss, int64_t M, int64_t steps, const std::vector<int64_t>& layers,
         const std::string& activation, const std::string& update_op, uintptr_t update_table, int64_t update_rows,
         const py::tuple& update_arguments, int num_threads) {
        Update update{update_op, update_table, update_rows, {}, {}};
        if (!update.op.empty()) read_arguments(update, update_arguments);  // a bad update fails before any step
        const py::gil_scoped_release release;
        return mlp_step(dtype, x, target, index, rows, x_batch, target_batch, loss, M, steps, layers, activation,
                        update, num_threads);
      },
      "Forward, mean cross-entropy, backward and optionally an optimizer step of a plain MLP, for `steps` steps, "
      "in one call (see csrc/mlp.cpp); returns -1 or the first row whose target is out of range (then nothing is "
      "written).",
      py::arg("dtype"), py::arg("x"), py::arg("target"), py::arg("index"), py::arg("rows"), py::arg("x_batch"),
      py::arg("target_batch"), py::arg("loss"), py::arg("m"), py::arg("steps"), py::arg("layers"), py::arg("activation"),
      py::arg("update_op"), py::arg("update_table"), py::arg("update_rows"), py::arg("update_arguments"),
      py::arg("num_threads"));
});

}  // namespace
}  // namespace kernels
