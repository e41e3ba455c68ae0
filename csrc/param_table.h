// The walk over an optimizer's tensor table that csrc/adam.cpp and csrc/sgd.cpp share.
//
// A table (built by kernels/ops/param_table.py) has one row of int64 fields per tensor of a
// parameter group: addresses of the parameter, its gradient and its state, flags, and last the
// tensor's number of elements. The field order of each optimizer is defined in Python
// (ADAM_LAYOUT, SGD_LAYOUT); each .cpp restates it as an enum and exports the names, which a test
// compares with the Python definition.
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"

namespace kernels {

// Elements per thread below which a step stays on the calling thread.
constexpr int64_t kMinTableWorkPerThread = 1 << 15;
// The alignment, relative to a tensor's first element, of the points where threads split it.
constexpr int64_t kSplitBytes = 64;

// Calls span(r, begin, end) for elements [begin, end) of row r, for every element of every row of
// a table of `rows` rows of `width` fields (the last: numel) of T elements. The elements of all the
// rows are taken as one concatenated range split evenly across threads, so a thread's part can cut
// through tensors; it cuts a tensor only at a multiple of kSplitBytes from its start, so that no
// thread's span starts mid cache line. (Cut anywhere, the MNIST MLP's 109,386 parameters split
// at element 54,693 of the first weight, and half the second thread's vectors straddled two cache
// lines: its SGD step took 1.16x as long on 2 threads, Zen 3.) Each thread flushes subnormals to
// zero while it runs (FlushSubnormals): optimizer states of parameters whose gradient stays zero
// decay geometrically into that range, where x86 takes a microcode assist per operation (Adam on
// the MNIST layer: 25 us -> 400 us with every first moment subnormal).
template <class T, class Span>
void walk_table(const int64_t* table, int64_t rows, int width, int num_threads, Span&& span) {
  constexpr int64_t granule = kSplitBytes / sizeof(T);
  // Where each row starts in the concatenated range, its length rounded up to whole granules
  // (splitting in whole granules then cuts each row at a multiple of granule).
  std::vector<int64_t> offsets(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r)
    offsets[r + 1] = offsets[r] + (table[r * width + width - 1] + granule - 1) / granule * granule;
  const int64_t granules = offsets[rows] / granule;
  const int threads = threads_for(offsets[rows], num_threads, kMinTableWorkPerThread);
  parallel_for(granules, threads, [&](int64_t first, int64_t last) {
    const FlushSubnormals flush;
    const int64_t begin = first * granule, end = last * granule;
    int64_t r = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; r < rows && offsets[r] < end; ++r) {
      const int64_t lo = std::max(begin, offsets[r]) - offsets[r];
      const int64_t hi = std::min(end - offsets[r], table[r * width + width - 1]);
      if (lo < hi) span(r, lo, hi);
    }
  });
}

// One optimizer step over a table as C++ code runs it (csrc/mlp.cpp after its backward,
// TableGuard.launch in csrc/param_table.cpp): the op ("adam" or "sgd"; "" for none), the table,
// and the rest of adam_step's or sgd_step's arguments (csrc/entry_points.h), scalars then flags.
struct Update {
  std::string op;
  uintptr_t table = 0;
  int64_t rows = 0;
  std::vector<double> scalars;
  std::vector<bool> flags;
};

// Sets u's scalars and flags from `arguments` (with the GIL held): a tuple of the arguments of
// u.op's step after its table, as Python's backend step takes them (a fused optimizer's
// hyperparameters(group)); a tensor is read as its float. Throws std::invalid_argument for
// another op or another number of arguments, before any step runs.
void read_arguments(Update& u, py::handle arguments);

// Runs u (nothing for op ""), the GIL released by the caller.
void run_update(const std::string& dtype, const Update& u, int num_threads);

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
