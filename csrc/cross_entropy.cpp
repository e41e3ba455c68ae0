// Fused softmax cross-entropy on the CPU: the loss and its gradient with respect to the logits
// in one pass over each row (see kernels/ops/cross_entropy.py for the API).
//
// For row x (C logits), target t, class weights w (all ones without weight), smoothing eps and
// the reduction's scale s (1/denominator for "mean", 1 otherwise):
//   lse   = log sum_c exp(x_c) = max + log_sum,  log_sum = log sum_c exp(x_c - max)
//   loss  = (1-eps) w_t (lse - x_t) + eps/C sum_c w_c (lse - x_c)
//   dx_j  = s [ p_j ((1-eps) w_t + eps/C W) - eps/C w_j - (1-eps) w_t [j == t] ],  p_j = exp(x_j - lse), W = sum_c w_c
// lse - x is formed as log_sum - (x - max), as log_softmax does, never from lse itself.
// An ignored row has loss 0 and gradient 0 * p (NaN where p is NaN), as in PyTorch.
//
// A row that fits in kBlock vectors is loaded once into registers: max, exp, sum, dx. A longer
// row streams in blocks of kBlock vectors through an online softmax (per lane a running max m and
// sum of exp(x - m), rescaled once per block); it stores exp(x - m) into dx as it goes and
// remembers m per block, so the second pass over the row (in cache) only multiplies each block by
// exp((m - max) - log_sum): one exp per logit in all. The smoothing sum is accumulated in the first pass too,
// so dx may be the logits themselves. Rows are split across threads; everything within a row is
// SIMD, exp included (a polynomial, below).
#include "common.h"
#include "entry_points.h"

#include <sys/mman.h>

#include <cmath>
#include <limits>
#include <vector>

namespace kernels {
namespace {

// ---------------------------------------------------------------------------------------
// Vectorised exp for x <= 0 (every caller passes x - max or x - lse): exp(x) = 2^n exp(r) with
// n = round(x / ln 2) and r = x - n ln 2 (|r| <= ln2/2; ln 2 split in two so that n ln2_hi is
// exact), exp(r) by a polynomial. Adding round_shift = 1.5 * 2^mantissa_bits + bias to x / ln 2
// rounds it to an integer and leaves n + bias in the low bits, which a shift moves into the
// exponent field: 2^n without a conversion. Below the smallest normal result it returns 0 (where
// std::exp would give a subnormal); -inf gives 0 and NaN stays NaN.
template <class T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  using Int = int32_t;
  static constexpr int mantissa_bits = 23;
  static constexpr float min_x = -87.3365447505f;            // log(smallest normal float)
  static constexpr float round_shift = 12582912.0f + 127.0f;  // 1.5 * 2^23 + exponent bias
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  // Cephes expf: 1 + r + r^2 (c2 + c3 r + ...), about 1 ulp; highest degree first.
  static constexpr int degree = 7;
  static constexpr float poly[degree + 1] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                                             1.6666665459e-1f, 5.0000001201e-1f, 1.0f, 1.0f};
};

template <>
struct ExpConstants<double> {
  using Int = int64_t;
  static constexpr int mantissa_bits = 52;
  static constexpr double min_x = -708.3964185322641;
  static constexpr double round_shift = 6755399441055744.0 + 1023.0;  // 1.5 * 2^52 + exponent bias
  static constexpr double ln2_hi = 0.693145751953125, ln2_lo = 1.42860682030941723212e-6;
  // Taylor series to degree 13: truncation error below 2e-17 for |r| <= ln2/2.
  static constexpr int degree = 13;
  static constexpr double poly[degree + 1] = {
      1.0 / 6227020800, 1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320, 1.0 / 5040,
      1.0 / 720,        1.0 / 120,       1.0 / 24,       1.0 / 6,       1.0 / 2,      1.0,         1.0};
};

template <class T, int VB>
KERNELS_INLINE Vec<T, VB> vexp(Vec<T, VB> x) {
  using K = ExpConstants<T>;
  using V = Vec<T, VB>;
  using VI = Vec<typename K::Int, VB>;
  const V shifted = x * T(1.4426950408889634) + K::round_shift;
  const V n = shifted - K::round_shift;
  const V r = (x - n * K::ln2_hi) - n * K::ln2_lo;
  V p = vsplat<T, VB>(K::poly[0]);
  for (int k = 1; k <= K::degree; ++k) p = p * r + K::poly[k];
  const V two_to_n = (V)((VI)shifted << K::mantissa_bits);
  return x < K::min_x ? V{} : p * two_to_n;
}

// ---------------------------------------------------------------------------------------
enum class Reduction { none, sum, mean };
// Reduction's names, in its order: kernels/reference/cross_entropy.py's REDUCTIONS (a test
// compares them through _C.cross_entropy_reductions).
constexpr const char* kReductionNames[] = {"none", "sum", "mean"};

Reduction parse_reduction(const std::string& name) {
  for (int r = 0; r < 3; ++r)
    if (name == kReductionNames[r]) return Reduction(r);
  throw std::invalid_argument("kernels._C.cross_entropy: unknown reduction " + name);
}

// Calls f(std::integral_constant<Reduction, r>{}) so the reduction is a compile-time constant inside.
template <class F>
void dispatch_reduction(Reduction r, F&& f) {
  switch (r) {
    case Reduction::none: return f(std::integral_constant<Reduction, Reduction::none>{});
    case Reduction::sum: return f(std::integral_constant<Reduction, Reduction::sum>{});
    case Reduction::mean: return f(std::integral_constant<Reduction, Reduction::mean>{});
  }
}

enum Smoothing { kNoSmoothing, kUniform, kWeighted };  // which smoothing sum a row accumulates

constexpr int kBlock = 8;  // vectors per block: a row of up to kBlock vectors stays in registers

template <class T>
struct Problem {
  const T* logits;        // (N, C), contiguous
  const int64_t* target;  // (N,), every entry ignore_index or in [0, C)
  const T* weight;        // (C,) or nullptr
  T* grad;                // (N, C) when the gradient is wanted (may be logits: in place), else nullptr
  T* row_loss;            // (N,)
  int64_t C;
  int64_t ignore_index;
  T smoothing;   // label_smoothing
  T grad_scale;  // 1 / denominator for "mean", 1 otherwise
  T weight_sum;  // sum_c w_c (C without weight)
};

// What a row needs besides its logits: dx = p p_coef - w w_coef, less t_coef at the target.
template <class T>
struct RowCoefficients {
  T p_coef, w_coef;
};

// log sum_c exp(x_c) = max + log_sum, kept apart: the loss and p are formed from x - max (as
// log_softmax does), so that their error does not grow with |max| (at logits near 1e6, max + log_sum
// rounds to a multiple of 0.0625). max is 0 for a row of -inf logits (then log_sum = -inf).
template <class T>
struct LogSumExp {
  T max, log_sum;
};

// Adds w (ref - v) and w over the first n lanes of a vector of logits to the smoothing sums.
template <int VB, Smoothing kSmooth, class T>
KERNELS_INLINE void add_smoothing(Vec<T, VB>& sum, Vec<T, VB>& weights, Vec<T, VB> v, Vec<T, VB> ref,
                                  const T* weight, int64_t n) {
  using V = Vec<T, VB>;
  using VI = Vec<typename ExpConstants<T>::Int, VB>;
  if (kSmooth == kNoSmoothing || n <= 0) return;
  V w = kSmooth == kWeighted ? vload_upto<T, VB>(weight, n, 0) : vsplat<T, VB>(1);
  V term = w * (ref - v);
  if (n < lanes<T, VB>) {  // lanes past the row hold -inf logits: leave them out
    VI lane;
    for (int l = 0; l < lanes<T, VB>; ++l) lane[l] = l;
    term = lane < typename ExpConstants<T>::Int(n) ? term : V{};
    w = lane < typename ExpConstants<T>::Int(n) ? w : V{};
  }
  sum += term;
  weights += w;
}

// A row of at most kBlock vectors, held in registers. Sets smooth (sum_c w_c (lse - x_c)) and,
// with kGrad, dx.
template <int VB, Smoothing kSmooth, bool kGrad, class T>
KERNELS_INLINE LogSumExp<T> short_row(const Problem<T>& p, const T* x, T* dx, RowCoefficients<T> coef, T& smooth) {
  using V = Vec<T, VB>;
  constexpr int L = lanes<T, VB>;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const int64_t C = p.C;
  const int nvec = int((C + L - 1) / L);
  V v[kBlock];
  V vmax_ = vsplat<T, VB>(ninf);
  for (int j = 0; j < nvec; ++j) {
    v[j] = vload_upto<T, VB>(x + j * L, C - j * L, ninf);
    vmax_ = vmax<T, VB>(vmax_, v[j]);
  }
  const T row_max = hmax<T, VB>(vmax_);
  const V ref = vsplat<T, VB>(row_max == ninf ? T(0) : row_max);
  V sum = {}, smooth_sum = {}, smooth_weights = {};
  for (int j = 0; j < nvec; ++j) {
    add_smoothing<VB, kSmooth, T>(smooth_sum, smooth_weights, v[j], ref, p.weight + j * L, C - j * L);
    v[j] = vexp<T, VB>(v[j] - ref);  // a NaN or +inf logit makes this, the sum and every p NaN
    sum += v[j];
  }
  const T total = hsum<T, VB>(sum);
  const T log_sum = std::log(total);
  if (kSmooth != kNoSmoothing) smooth = hsum<T, VB>(smooth_sum + log_sum * smooth_weights);
  if constexpr (kGrad) {
    const T p_coef = coef.p_coef / total;
    for (int j = 0; j < nvec; ++j) {
      const V w = kSmooth == kWeighted ? vload_upto<T, VB>(p.weight + j * L, C - j * L, 0) : vsplat<T, VB>(1);
      vstore_upto<T, VB>(dx + j * L, v[j] * p_coef - w * coef.w_coef, C - j * L);
    }
  }
  return {ref[0], log_sum};
}

// A longer row, streamed in blocks of kBlock vectors (see the top of the file). block_max holds
// one vector per block. Sets smooth and, with kGrad, dx.
template <int VB, Smoothing kSmooth, bool kGrad, class T>
KERNELS_INLINE LogSumExp<T> long_row(const Problem<T>& p, const T* x, T* dx, RowCoefficients<T> coef, T* block_max,
                                     T& smooth) {
  using V = Vec<T, VB>;
  constexpr int L = lanes<T, VB>;
  constexpr int64_t B = int64_t(kBlock) * L;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const int64_t C = p.C;
  V m = vsplat<T, VB>(ninf), ref = {}, sum = {}, smooth_sum = {}, smooth_weights = {};
  for (int64_t j = 0, b = 0; j < C; j += B, ++b) {
    V v[kBlock];
    V m_new = m;
    for (int k = 0; k < kBlock; ++k) {
      v[k] = vload_upto<T, VB>(x + j + k * L, C - j - k * L, ninf);
      m_new = vmax<T, VB>(m_new, v[k]);
    }
    // A lane that has seen only -inf keeps 0 as its reference: exp(-inf - (-inf)) would be NaN.
    const V ref_new = m_new == ninf ? V{} : m_new;
    sum *= vexp<T, VB>(m - ref_new);
    if (kSmooth != kNoSmoothing) smooth_sum += (ref_new - ref) * smooth_weights;
    m = m_new;
    ref = ref_new;
    for (int k = 0; k < kBlock; ++k) {
      const int64_t n = C - j - k * L;
      add_smoothing<VB, kSmooth, T>(smooth_sum, smooth_weights, v[k], ref, p.weight + j + k * L, n);
      const V e = vexp<T, VB>(v[k] - ref);
      sum += e;
      if constexpr (kGrad) vstore_upto<T, VB>(dx + j + k * L, e, n);
    }
    if constexpr (kGrad) vstore<T, VB>(block_max + b * L, m);
  }
  const T hmax_m = hmax<T, VB>(m);
  const T row_max = hmax_m == ninf ? T(0) : hmax_m;
  const T log_sum = std::log(hsum<T, VB>(sum * vexp<T, VB>(m - row_max)));
  if (kSmooth != kNoSmoothing) smooth = hsum<T, VB>(smooth_sum + ((row_max - ref) + log_sum) * smooth_weights);
  if constexpr (kGrad) {  // dx holds exp(x - m_block): p = that * exp((m_block - max) - log_sum)
    for (int64_t j = 0, b = 0; j < C; j += B, ++b) {
      const V scale = vexp<T, VB>((vload<T, VB>(block_max + b * L) - row_max) - log_sum) * coef.p_coef;
      for (int k = 0; k < kBlock; ++k) {
        const int64_t n = C - j - k * L;
        if (n <= 0) break;
        const V w = kSmooth == kWeighted ? vload_upto<T, VB>(p.weight + j + k * L, n, 0) : vsplat<T, VB>(1);
        vstore_upto<T, VB>(dx + j + k * L, vload_upto<T, VB>(dx + j + k * L, n, 0) * scale - w * coef.w_coef, n);
      }
    }
  }
  return {row_max, log_sum};
}

template <int VB, Smoothing kSmooth, bool kGrad, class T>
KERNELS_INLINE LogSumExp<T> row(const Problem<T>& p, const T* x, T* dx, RowCoefficients<T> coef, T* block_max,
                                T& smooth) {
  return p.C <= kBlock * lanes<T, VB> ? short_row<VB, kSmooth, kGrad>(p, x, dx, coef, smooth)
                                      : long_row<VB, kSmooth, kGrad>(p, x, dx, coef, block_max, smooth);
}

template <int VB, Smoothing kSmooth, bool kGrad, class T>
KERNELS_INLINE void rows(const Problem<T>& p, int64_t begin, int64_t end) {
  constexpr int L = lanes<T, VB>;
  const int64_t C = p.C;
  const T eps = p.smoothing, eps_c = eps / T(C);
  std::vector<T> block_max(kGrad && C > kBlock * L ? size_t((C + kBlock * L - 1) / (kBlock * L) * L) : 0);
  for (int64_t i = begin; i < end; ++i) {
    const T* x = p.logits + i * C;
    T* dx = kGrad ? p.grad + i * C : nullptr;
    const int64_t t = p.target[i];
    T smooth = 0;  // sum_c w_c (lse - x_c)
    if (t == p.ignore_index) {
      p.row_loss[i] = 0;
      // As PyTorch's: 0 * p, which is NaN where p is (a NaN or +inf logit, or all logits -inf).
      if constexpr (kGrad) row<VB, kSmooth, kGrad>(p, x, dx, RowCoefficients<T>{0, 0}, block_max.data(), smooth);
      continue;
    }
    const T x_t = x[t];  // before dx, which may be x, is written
    const T w_t = p.weight ? p.weight[t] : T(1);
    const RowCoefficients<T> coef{p.grad_scale * ((1 - eps) * w_t + eps_c * p.weight_sum), p.grad_scale * eps_c};
    const LogSumExp<T> lse = row<VB, kSmooth, kGrad>(p, x, dx, coef, block_max.data(), smooth);
    if constexpr (kGrad) dx[t] -= p.grad_scale * (1 - eps) * w_t;
    p.row_loss[i] = (1 - eps) * w_t * (lse.log_sum - (x_t - lse.max)) + eps_c * smooth;
  }
}

template <int VB, Smoothing kSmooth, class T>
KERNELS_INLINE void rows_with_or_without_grad(const Problem<T>& p, int64_t begin, int64_t end) {
  if (p.grad) return rows<VB, kSmooth, true>(p, begin, end);
  rows<VB, kSmooth, false>(p, begin, end);
}

template <int VB, class T>
KERNELS_INLINE void cross_entropy_rows_impl(const Problem<T>* p, int64_t begin, int64_t end) {
  if (p->smoothing == 0) return rows_with_or_without_grad<VB, kNoSmoothing>(*p, begin, end);
  if (p->weight) return rows_with_or_without_grad<VB, kWeighted>(*p, begin, end);
  rows_with_or_without_grad<VB, kUniform>(*p, begin, end);
}
KERNELS_MULTIVERSION(cross_entropy_rows, cross_entropy_rows_impl)

// grad[i, :] *= grad_output[i * stride], skipping rows whose factor is 1 (stride 0: one factor).
template <int VB, class T>
KERNELS_INLINE void scale_rows_impl(T* grad, const T* grad_output, int64_t stride, int64_t C, int64_t begin,
                                    int64_t end) {
  constexpr int L = lanes<T, VB>;
  for (int64_t i = begin; i < end; ++i) {
    const T g = grad_output[i * stride];
    if (g == T(1)) continue;
    T* row = grad + i * C;
    for (int64_t j = 0; j < C; j += L) vstore_upto<T, VB>(row + j, vload_upto<T, VB>(row + j, C - j, 0) * g, C - j);
  }
}
KERNELS_MULTIVERSION(scale_rows, scale_rows_impl)

// A fresh gradient buffer is first touched by the kernel: with 4 KiB pages that costs one page
// fault per 4 KiB, which at (4096, 32000) takes longer than the kernel itself. Transparent huge
// pages (what PyTorch's THP_MEM_ALLOC_ENABLE=1 asks for on all its allocations) cut that 512-fold.
constexpr size_t kHugePage = size_t(2) << 20;

void advise_huge_pages(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
  if (bytes < 4 * kHugePage) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHugePage - 1);
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
}

// Rows below this many logits per thread stay on one thread (waking a team costs more).
constexpr int64_t kMinLogitsPerThread = 1 << 14;

// Returns -1, or the first row whose target is neither ignore_index nor in [0, C) (then nothing
// is written).
template <class T, Reduction R>
int64_t forward(uintptr_t logits, uintptr_t target, uintptr_t weight, uintptr_t loss, uintptr_t grad, int64_t N,
                int64_t C, int64_t ignore_index, double label_smoothing, int num_threads) {
  const int64_t* tgt = ptr<const int64_t>(target);
  const T* w = weight ? ptr<const T>(weight) : nullptr;
  double denominator = 0;  // "mean" divides by the summed weight of the non-ignored targets
  for (int64_t i = 0; i < N; ++i) {
    const int64_t t = tgt[i];
    if (t == ignore_index) continue;
    if (t < 0 || t >= C) return i;
    denominator += w ? double(w[t]) : 1.0;
  }
  double weight_sum = double(C);
  if (w && label_smoothing != 0) {
    weight_sum = 0;
    for (int64_t c = 0; c < C; ++c) weight_sum += w[c];
  }
  if (grad && grad != logits) advise_huge_pages(ptr<T>(grad), size_t(N) * size_t(C) * sizeof(T));
  std::vector<T> row_loss(R == Reduction::none ? 0 : N);
  const Problem<T> p{ptr<const T>(logits),
                     tgt,
                     w,
                     grad ? ptr<T>(grad) : nullptr,
                     R == Reduction::none ? ptr<T>(loss) : row_loss.data(),
                     C,
                     ignore_index,
                     T(label_smoothing),
                     R == Reduction::mean ? T(1.0 / denominator) : T(1),
                     T(weight_sum)};
  parallel_for(N, threads_for(N * C, num_threads, kMinLogitsPerThread),
               [&](int64_t begin, int64_t end) { cross_entropy_rows(&p, begin, end); });
  if constexpr (R != Reduction::none) {
    double total = 0;  // summed in row order: the same result for any thread count
    for (int64_t i = 0; i < N; ++i) total += row_loss[i];
    *ptr<T>(loss) = T(R == Reduction::mean ? total / denominator : total);
  }
  return -1;
}

}  // namespace

int64_t cross_entropy_forward(const std::string& dtype, uintptr_t logits, uintptr_t target, uintptr_t weight,
                              uintptr_t loss, uintptr_t grad, int64_t N, int64_t C, int64_t ignore_index,
                              double label_smoothing, const std::string& reduction, int num_threads) {
  int64_t bad_row = -1;
  dispatch_dtype(dtype, [&](auto zero) {
    dispatch_reduction(parse_reduction(reduction), [&](auto r) {
      bad_row = forward<decltype(zero), decltype(r)::value>(logits, target, weight, loss, grad, N, C, ignore_index,
                                                             label_smoothing, num_threads);
    });
  });
  return bad_row;
}

namespace {

void cross_entropy_backward(const std::string& dtype, uintptr_t grad, uintptr_t grad_output, int64_t stride,
                            int64_t N, int64_t C, int num_threads) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    parallel_for(N, threads_for(N * C, num_threads, kMinLogitsPerThread), [&](int64_t begin, int64_t end) {
      scale_rows(ptr<T>(grad), ptr<const T>(grad_output), stride, C, begin, end);
    });
  });
}

static const Register registration([](py::module_& m) {
  m.def("cross_entropy_forward", &cross_entropy_forward, py::call_guard<py::gil_scoped_release>(),
        "Softmax cross-entropy of (N, C) logits: writes the loss (N values for reduction \"none\", one for "
        "\"sum\" and \"mean\") and, when grad != 0, dloss/dlogits for that reduction. Returns -1, or the first "
        "row whose target is out of range (then nothing is written).",
        py::arg("dtype"), py::arg("logits"), py::arg("target"), py::arg("weight"), py::arg("loss"),
        py::arg("grad"), py::arg("n"), py::arg("c"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("reduction"), py::arg("num_threads"));
  m.def("cross_entropy_backward", &cross_entropy_backward, py::call_guard<py::gil_scoped_release>(),
        "grad[i, :] *= grad_output[i * stride] in place for an (N, C) gradient; rows whose factor is 1 are skipped.",
        py::arg("dtype"), py::arg("grad"), py::arg("grad_output"), py::arg("stride"), py::arg("n"), py::arg("c"),
        py::arg("num_threads"));
  m.attr("cross_entropy_reductions") = py::make_tuple(kReductionNames[0], kReductionNames[1], kReductionNames[2]);
});

}  // namespace
}  // namespace kernels
