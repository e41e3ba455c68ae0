// The C++ entry points that other C++ code composes (csrc/mlp.cpp's training step), declared
// with the signatures that kernels._C binds: the calling convention of kernels/cpu/__init__.py
// (dtype first, tensors as addresses of contiguous data, sizes, options, num_threads).
#pragma once

#include <cstdint>
#include <string>

namespace kernels {

// csrc/linear.cpp
void linear_forward(const std::string& dtype, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, int64_t M,
                    int64_t N, int64_t K, const std::string& activation, int num_threads);
void linear_backward(const std::string& dtype, uintptr_t dy, uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t dx,
                     uintptr_t dw, uintptr_t db, int64_t M, int64_t N, int64_t K, const std::string& activation,
                     int num_threads);

// csrc/adam.cpp, csrc/sgd.cpp: one step over an optimizer's table (param_table.h)
void adam_step(const std::string& dtype, uintptr_t table, int64_t rows, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize, int num_threads);
void sgd_step(const std::string& dtype, uintptr_t table, int64_t rows, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, int num_threads);

// csrc/cross_entropy.cpp
int64_t cross_entropy_forward(const std::string& dtype, uintptr_t logits, uintptr_t target, uintptr_t weight,
                              uintptr_t loss, uintptr_t grad, int64_t N, int64_t C, int64_t ignore_index,
                              double label_smoothing, const std::string& reduction, int num_threads);

}  // namespace kernels
