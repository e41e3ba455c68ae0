// The walk over an optimizer's tensor table that csrc/adam.cpp and csrc/sgd.cpp share.
//
// A table (built by kernels/ops/param_table.py) has one row of int64 fields per tensor of a
// parameter group: addresses of the parameter, its gradient and its state, flags, and last the
// tensor's number of elements. The field order of each optimizer is defined in Python
// (ADAM_LAYOUT, SGD_LAYOUT); each .cpp restates it as an enum and exports the names, which a test
// compares with the Python definition.
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"

namespace kernels {

// Elements per thread below which a step stays on the calling thread.
constexpr int64_t kMinTableWorkPerThread = 1 << 15;

// Calls span(r, begin, end) for elements [begin, end) of row r, for every element of every row of
// a table of `rows` rows of `width` fields (the last: numel). The elements of all the rows are taken
// as one concatenated range split evenly across threads, so a thread's part can cut through
// tensors. Each thread flushes subnormals to zero while it runs (FlushSubnormals): optimizer states
// of parameters whose gradient stays zero decay geometrically into that range, where x86 takes a
// microcode assist per operation (Adam on the MNIST layer: 25 us -> 400 us with every first moment
// subnormal).
template <class Span>
void walk_table(const int64_t* table, int64_t rows, int width, int num_threads, Span&& span) {
  std::vector<int64_t> offsets(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) offsets[r + 1] = offsets[r] + table[r * width + width - 1];
  const int64_t total = offsets[rows];
  parallel_for(total, threads_for(total, num_threads, kMinTableWorkPerThread), [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    int64_t r = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; r < rows && offsets[r] < end; ++r) {
      const int64_t lo = std::max(begin, offsets[r]) - offsets[r];
      const int64_t hi = std::min(end, offsets[r + 1]) - offsets[r];
      if (lo < hi) span(r, lo, hi);
    }
  });
}

// Calls f(std::bool_constant<flags>{}...): run-time options become compile-time constants inside f.
template <class F>
void with_flags(F&& f) {
  f();
}

template <class F, class... Rest>
void with_flags(F&& f, bool first, Rest... rest) {
  if (first)
    with_flags([&](auto... later) { f(std::true_type{}, later...); }, rest...);
  else
    with_flags([&](auto... later) { f(std::false_type{}, later...); }, rest...);
}

}  // namespace kernels
