// Fused Linear + bias + activation on the CPU: y = act(x W^T + b) and its backward.
//
//   forward   z[m,n] = sum_k x[m,k] W[n,k] + b[n],   y = act(z)
//   backward  dz = dy * act'(y)      (relu: y > 0 or NaN, sigmoid: y (1 - y), tanh: 1 - y^2, none: 1)
//             dx = dz W,   dW = dz^T x,   db = sum_m dz[m, :]
//
// x (M, K), W (N, K), y and dy (M, N) are contiguous row-major. Every GEMM here is written
// around a register-tiled micro-kernel over Vec<T, VB> (see common.h), compiled once per ISA:
//
// * forward, dot-product form: x and W are both contiguous along the reduction axis k, so the
//   micro-kernel keeps an MR x NR tile of dot products as vectors over k (no packing of either
//   operand), folds the MR*NR vectors into lanes at the end and applies bias and activation to
//   that vector before it is stored.
// * forward, outer-product form (float on AVX2, for batches of at least K / 8 rows): the fold
//   costs about as much per output whatever K, so where K is small it is cheaper to transpose
//   W into panels of columns once and run the backward's micro-kernel, which broadcasts x's
//   entries (read in place) against vectors of a panel; bias and activation follow in one pass
//   over the panel's outputs, still in L1.
// * dx = dz W and dW = dz^T x: the output rows are contiguous along k like the rows of W and x,
//   so the micro-kernel broadcasts dz entries against rows of W or x (outer-product form). dz is
//   formed from dy and y while the broadcast operand is packed (each thread packs only its own
//   rows or columns of it, s-major), and db is summed during the packing for dW. W or x is read
//   in place, except where its rows alias in L1 or a ragged last tile needs zero padding.
#include "common.h"
#include "entry_points.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

namespace kernels {
namespace {

enum class Act { none, relu, sigmoid, tanh };

Act parse_activation(const std::string& name) {
  if (name == "none") return Act::none;
  if (name == "relu") return Act::relu;
  if (name == "sigmoid") return Act::sigmoid;
  if (name == "tanh") return Act::tanh;
  throw std::invalid_argument("kernels._C.linear: unknown activation " + name);
}

// Calls f(std::integral_constant<Act, a>{}) so the activation is a compile-time constant inside.
template <class F>
void dispatch_activation(Act a, F&& f) {
  switch (a) {
    case Act::none: return f(std::integral_constant<Act, Act::none>{});
    case Act::relu: return f(std::integral_constant<Act, Act::relu>{});
    case Act::sigmoid: return f(std::integral_constant<Act, Act::sigmoid>{});
    case Act::tanh: return f(std::integral_constant<Act, Act::tanh>{});
  }
}

template <Act A, class T, int VB>
KERNELS_INLINE Vec<T, VB> activate(Vec<T, VB> z) {
  if constexpr (A == Act::relu) {  // torch.relu's rule: NaN and -0.0 pass through
    return z < T(0) ? T(0) : z;
  } else if constexpr (A == Act::sigmoid) {
    for (int i = 0; i < lanes<T, VB>; ++i) z[i] = T(1) / (T(1) + std::exp(-z[i]));
    return z;
  } else if constexpr (A == Act::tanh) {
    for (int i = 0; i < lanes<T, VB>; ++i) z[i] = std::tanh(z[i]);
    return z;
  } else {
    return z;
  }
}

// dz = dy * act'(z), written with the activation's output y as torch's threshold_backward,
// sigmoid_backward and tanh_backward compute it (so a NaN output passes its gradient through
// ReLU); V is T or Vec<T, VB>.
template <Act A, class T, class V>
KERNELS_INLINE V activation_grad(V dy, V y) {
  if constexpr (A == Act::relu) return y <= T(0) ? T(0) : dy;
  else if constexpr (A == Act::sigmoid) return dy * (T(1) - y) * y;
  else if constexpr (A == Act::tanh) return dy * (T(1) - y * y);
  else return dy;
}

// ---------------------------------------------------------------------------------------
// Forward: MR x NR dot products per micro-tile, vectors along k.

template <class T, int VB>
struct ForwardTile {
  // Enough independent accumulators to keep both FMA pipes busy through the FMA latency (8
  // chains), within the vector registers. AVX-512's 32 registers hold 16 accumulators plus the
  // operands. AVX2's 16 hold 12 (3 x 4) plus x's 3 vectors and one of W's at a time: 2 x 4's
  // 8 chains ran at 55 % of the FMA peak and 3 x 4 runs at 80 % (1.24-1.42x at the MLP's
  // shapes, one thread, AMD Zen 5). Without FMA (SSE2) a multiply and an add need
  // temporaries, and 2 x 4 is fastest (3 x 4 ran 0.71-0.95x). The fold works on groups of L
  // accumulators; where MR * NR is not a multiple of L the last group is padded with zeros.
  static constexpr int MR = VB == 64 ? 4 : VB == 32 ? 3 : 2;
  static constexpr int NR = 4;
};

// fold()'s lanes: within each segment of 2S lanes, the first S take a's half (the low one, or
// the high one with HI), the last S b's.
template <int L, int S, bool HI>
struct FoldLanes {
  static constexpr int of(int t) { return (t % (2 * S) < S ? 0 : L) + t / (2 * S) * (2 * S) + t % S + (HI ? S : 0); }
};

// For each segment of 2S lanes: [a_lo + a_hi, b_lo + b_hi] where lo/hi are its S-lane halves.
template <int S, class T, int VB>
KERNELS_INLINE Vec<T, VB> fold(Vec<T, VB> a, Vec<T, VB> b) {
  constexpr int L = lanes<T, VB>;
  return vshuffle<FoldLanes<L, S, false>, T, VB>(a, b) + vshuffle<FoldLanes<L, S, true>, T, VB>(a, b);
}

// v[0..L) -> one vector whose lane j is the horizontal sum of v[j].
template <int H, class T, int VB>
KERNELS_INLINE void fold_all(Vec<T, VB>* v) {
  if constexpr (H >= 1) {
    for (int i = 0; i < H; ++i) v[i] = fold<H, T, VB>(v[i], v[i + H]);
    fold_all<H / 2, T, VB>(v);
  }
}

// y[rows, cols] = act(x[rows] . W[cols] + bias) for one MR x NR tile. Row and column indices
// past the matrix edge are clamped (computed again, never stored), so the kernel reads in bounds.
// `bias` holds the tile's bias in tile order (lane i*NR + j of the flattened tile gets b[n0 + j]).
template <Act A, int VB, class T>
KERNELS_INLINE void forward_tile(const T* x, const T* w, const Vec<T, VB>* bias, T* y, int64_t N, int64_t K,
                                 int64_t m0, int mr, int64_t n0, int nr) {
  using V = Vec<T, VB>;
  constexpr int L = lanes<T, VB>;
  constexpr int MR = ForwardTile<T, VB>::MR, NR = ForwardTile<T, VB>::NR, G = (MR * NR + L - 1) / L;
  const T* xr[MR];
  const T* wr[NR];
  for (int i = 0; i < MR; ++i) xr[i] = x + (m0 + std::min(i, mr - 1)) * K;
  for (int j = 0; j < NR; ++j) wr[j] = w + (n0 + std::min(j, nr - 1)) * K;

  V acc[G * L] = {};
  const int64_t k_full = K / L * L;
  for (int64_t k = 0; k < k_full; k += L) {
    V xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = vload<T, VB>(xr[i] + k);
    for (int j = 0; j < NR; ++j) {
      const V wv = vload<T, VB>(wr[j] + k);
      for (int i = 0; i < MR; ++i) acc[i * NR + j] += xv[i] * wv;
    }
  }
  if (k_full < K) {  // the last K % L entries, zero-padded
    V xv[MR], wv[NR];
    for (int i = 0; i < MR; ++i) xv[i] = vload_upto<T, VB>(xr[i] + k_full, K - k_full, T(0));
    for (int j = 0; j < NR; ++j) wv[j] = vload_upto<T, VB>(wr[j] + k_full, K - k_full, T(0));
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < MR; ++i) acc[i * NR + j] += xv[i] * wv[j];
  }

  // Fold each group of L accumulators into one vector of L dot products, add the bias and
  // apply the activation on that vector, then store the tile's valid rows.
  T out[G * L];
  for (int g = 0; g < G; ++g) {
    fold_all<L / 2, T, VB>(acc + g * L);
    vstore<T, VB>(out + g * L, activate<A, T, VB>(acc[g * L] + bias[g]));
  }
  T* yt = y + m0 * N + n0;
  if (nr == NR) {
    for (int i = 0; i < mr; ++i) std::memcpy(yt + i * N, out + i * NR, NR * sizeof(T));
  } else {
    for (int i = 0; i < mr; ++i)
      for (int j = 0; j < nr; ++j) yt[i * N + j] = out[i * NR + j];
  }
}

// One thread's share of the forward: the tiles of rows [m_begin, m_end) x cols [n_begin, n_end).
// A block of rows of x stays in L2 while a group of NR rows of W stays in L1.
template <int VB, class T, Act A>
KERNELS_INLINE void forward_block_impl(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t K,
                                       int64_t m_begin, int64_t m_end, int64_t n_begin, int64_t n_end,
                                       std::integral_constant<Act, A>) {
  using V = Vec<T, VB>;
  constexpr int L = lanes<T, VB>;
  constexpr int MR = ForwardTile<T, VB>::MR, NR = ForwardTile<T, VB>::NR, G = (MR * NR + L - 1) / L;
  const int64_t mc = std::max<int64_t>(MR, (int64_t(1) << 18) / int64_t(sizeof(T) * std::max<int64_t>(K, 1)) / MR * MR);
  for (int64_t mb = m_begin; mb < m_end; mb += mc) {
    const int64_t me = std::min(m_end, mb + mc);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
      const int nr = int(std::min<int64_t>(NR, n_end - n0));
      V bias[G] = {};
      if (b)
        for (int g = 0; g < G; ++g)
          for (int l = 0; l < L; ++l) bias[g][l] = b[n0 + std::min((g * L + l) % NR, nr - 1)];
      for (int64_t m0 = mb; m0 < me; m0 += MR)
        forward_tile<A, VB, T>(x, w, bias, y, N, K, m0, int(std::min<int64_t>(MR, me - m0)), n0, nr);
    }
  }
}
KERNELS_MULTIVERSION(forward_block, forward_block_impl)

// ---------------------------------------------------------------------------------------
// Backward: C (R x K) = A (R x S) . B (S x K) with B's rows contiguous, for dx (A = dz, B = W)
// and dW (A = dz^T, B = x). The micro-kernel broadcasts MR entries of A against NV vectors of a
// row of B. A is packed per tile of MR rows into s-major panels, A(i, s) at panel[s * MR + i],
// so that a tile's MR entries for one s share a cache line whatever the source's row stride
// (row-major panels of dz put MR rows 4 KiB apart into one L1 set at N = 1024); rows past R are
// zeros. dz is formed from dy and y while it is packed (each thread packs only its own rows or
// columns), and db is summed during the packing for dW. Panels and copied tiles of B live in
// per-thread scratch memory (common.h), so a step allocates nothing.

template <class T, int VB>
struct OuterTile {
  // 24 accumulators of 32 registers with AVX-512, 12 of 16 otherwise.
  static constexpr int MR = VB == 64 ? 8 : 6;
  static constexpr int NV = VB == 64 ? 3 : 2;
};

// Reduction entries per pass over a C tile: the block of B it reads (rows of NV vectors, 24 KiB:
// 128 rows for float with AVX-512, 384 with AVX2) stays in L1 while every tile of A streams past
// it. Fewer passes over C pay where a tile of NV vectors is narrow: with AVX2 at 512x1024x1024
// the backward took 13.0 ms on 2 threads in blocks of 128 rows, 12.1-12.3 in blocks of 256-512.
template <class T, int VB>
constexpr int64_t kReductionBlock = (int64_t(24) << 10) / (OuterTile<T, VB>::NV * VB);

// The lanes of one stage of an L x L transpose held as L row vectors: rows r and r + H
// (r & H == 0) swap their off-diagonal blocks of H lanes (row r takes FIRST's, row r + H the
// other's). The stages H = L/2, ..., 1 together transpose the square.
template <int L, int H, bool FIRST>
struct BlockSwapLanes {
  static constexpr int of(int t) { return FIRST ? (t & H ? L + t - H : t) : (t & H ? L + t : t + H); }
};

template <int H, class T, int VB>
KERNELS_INLINE void transpose_square(Vec<T, VB>* v) {
  if constexpr (H >= 1) {
    constexpr int L = lanes<T, VB>;
    for (int r = 0; r < L; ++r)
      if (!(r & H)) {
        const Vec<T, VB> a = v[r], b = v[r + H];
        v[r] = vshuffle<BlockSwapLanes<L, H, true>, T, VB>(a, b);
        v[r + H] = vshuffle<BlockSwapLanes<L, H, false>, T, VB>(a, b);
      }
    transpose_square<H / 2, T, VB>(v);
  }
}

// panel[s * ld + i] = dz(i, s) for i < rows (zeros up to MR) and s < S, where dz = dy * act'(y)
// (dy itself for Act::none); dy and y have rows of S. FULL (rows == MR) leaves the row count a
// constant, so that the L vectors of a block stay in registers (a run-time count put them on the
// stack, a third of the packing's time). With MR <= L, whole blocks of L columns are transposed
// in registers; the rest is copied an entry at a time.
template <Act A, int MR, bool FULL, int VB, class T>
KERNELS_INLINE void pack_transposed_tile(const T* dy, const T* y, int64_t S, int rows, T* panel, int64_t ld) {
  using V = Vec<T, VB>;
  constexpr int L = lanes<T, VB>;
  const int n = FULL ? MR : rows;
  int64_t s0 = 0;
  if constexpr (MR <= L) {
    for (; s0 + L <= S; s0 += L) {
      V v[L];
      for (int i = 0; i < L; ++i) {
        const int64_t at = std::min(i, n - 1) * S + s0;  // in bounds; rows past n are zeroed
        const V d = vload<T, VB>(dy + at);
        v[i] = i >= n ? V{} : A == Act::none ? d : activation_grad<A, T>(d, vload<T, VB>(y + at));
      }
      transpose_square<L / 2, T, VB>(v);
      for (int c = 0; c < L; ++c) vstore_first<MR, T, VB>(panel + (s0 + c) * ld, v[c]);
    }
  }
  for (int64_t s = s0; s < S; ++s)
    for (int i = 0; i < MR; ++i)
      panel[s * ld + i] = i < n ? activation_grad<A, T>(dy[i * S + s], A == Act::none ? T(0) : y[i * S + s]) : T(0);
}

// dx's tiles are such panels of dz with ld = MR; the forward's panels of W^T are built from L
// rows of W at a time (Act::none), with ld = the panel's width.
template <Act A, int MR, int VB, class T>
KERNELS_INLINE void pack_transposed(const T* dy, const T* y, int64_t S, int rows, T* panel, int64_t ld = MR) {
  if (rows == MR)
    pack_transposed_tile<A, MR, true, VB>(dy, y, S, rows, panel, ld);
  else
    pack_transposed_tile<A, MR, false, VB>(dy, y, S, rows, panel, ld);
}

// dW's tile: panel[s * MR + i] = dz(s, n0 + i) for s < M and i < rows (zeros up to MR), and
// total[i] += the sum over s; dy, y point at column n0 and have rows of N. FULL (rows == MR,
// the common case) gives the loop a fixed trip count, which the compiler vectorises.
template <Act A, int MR, bool FULL, class T>
KERNELS_INLINE void pack_dz_columns_tile(const T* dy, const T* y, int64_t M, int64_t N, int rows, T* panel,
                                         T* total) {
  for (int64_t s = 0; s < M; ++s) {
    for (int i = 0; i < MR; ++i) {
      const T g = FULL || i < rows ? activation_grad<A, T>(dy[s * N + i], A == Act::none ? T(0) : y[s * N + i]) : T(0);
      panel[s * MR + i] = g;
      total[i] += g;
    }
  }
}

// pack_dz_columns_tile, with the column sums stored into sums[0..rows) when sums is given (the
// bias gradient).
template <Act A, int MR, class T>
KERNELS_INLINE void pack_dz_columns(const T* dy, const T* y, int64_t M, int64_t N, int rows, T* panel, T* sums) {
  T total[MR] = {};
  if (rows == MR)
    pack_dz_columns_tile<A, MR, true>(dy, y, M, N, rows, panel, total);
  else
    pack_dz_columns_tile<A, MR, false>(dy, y, M, N, rows, panel, total);
  if (sums)
    for (int i = 0; i < rows; ++i) sums[i] = total[i];
}

// c[i, 0..cols) (+)= sum_{s < sc} A(i, s) * b[s * ldb + 0..cols) for i < rows <= MR, where
// cols <= NV * L and b holds NV full vectors per row. A is packed, A(i, s) at a[s * PANEL + i]
// (panels of PANEL >= MR rows), or for PANEL = 0 a row-major matrix, A(i, s) at a[i * lda + s],
// whose rows past `rows` are clamped (computed again, never stored) so that the tile reads in
// bounds.
template <int MR, int NV, int PANEL, class T, int VB>
KERNELS_INLINE void outer_tile(const T* a, int64_t lda, int64_t sc, const T* b, int64_t ldb, T* c,
                               int64_t ldc, int rows, int cols, bool accumulate) {
  using V = Vec<T, VB>;
  constexpr int L = lanes<T, VB>;
  constexpr int64_t step = PANEL ? PANEL : 1;
  const T* ar[MR];
  for (int i = 0; i < MR; ++i) ar[i] = PANEL ? a + i : a + std::min(i, rows - 1) * lda;
  if (accumulate)  // C's tile, evicted since the last pass, arrives while the loop runs
    for (int i = 0; i < MR && i < rows; ++i)
      for (int v = 0; v * L < cols; ++v) __builtin_prefetch(c + i * ldc + v * L, 1);
  V acc[MR][NV] = {};
  for (int64_t s = 0; s < sc; ++s) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload<T, VB>(b + s * ldb + v * L);
    for (int i = 0; i < MR; ++i) {
      const V av = vsplat<T, VB>(ar[i][s * step]);
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
  // The stores index acc with constant bounds only, so that it stays in registers: indexed by the
  // run-time row count, it was spilled to the stack after every tile (the backward ran 1.04-1.35x
  // faster without that spill).
  if (rows == MR && cols == NV * L) {  // a full tile
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) {
        T* cv = c + i * ldc + v * L;
        vstore<T, VB>(cv, accumulate ? vload<T, VB>(cv) + acc[i][v] : acc[i][v]);
      }
    return;
  }
  T part[MR][NV * L];  // a ragged one, through memory
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) vstore<T, VB>(part[i] + v * L, acc[i][v]);
  for (int i = 0; i < MR && i < rows; ++i) {
    T* ci = c + i * ldc;
    for (int v = 0; v < NV; ++v) {
      const int64_t n = cols - v * L;
      const V p = vload<T, VB>(part[i] + v * L);
      vstore_upto<T, VB>(ci + v * L, accumulate ? vload_upto<T, VB>(ci + v * L, n, T(0)) + p : p, n);
    }
  }
}

// outer_tile for a tile of `rows` <= MR rows and nv <= NV vectors per row, chosen at run time: a
// ragged last tile computes its rows rounded up to an even count (the 64-row batch ends on a tile
// of 4 rows of AVX2's 6, a thread's 32 rows on one of 2) and only the vectors it has.
template <int MR, int NV, int PANEL, class T, int VB>
KERNELS_INLINE void outer_tile_fit(int rows, int nv, const T* a, int64_t lda, int64_t sc, const T* b, int64_t ldb,
                                   T* c, int64_t ldc, int cols, bool accumulate) {
  if constexpr (MR > 2)
    if (rows <= MR - 2)
      return outer_tile_fit<MR - 2, NV, PANEL, T, VB>(rows, nv, a, lda, sc, b, ldb, c, ldc, cols, accumulate);
  if constexpr (NV > 1)
    if (nv < NV)
      return outer_tile_fit<MR, NV - 1, PANEL, T, VB>(rows, nv, a, lda, sc, b, ldb, c, ldc, cols, accumulate);
  outer_tile<MR, NV, PANEL, T, VB>(a, lda, sc, b, ldb, c, ldc, rows, cols, accumulate);
}

// Whether rows `stride` bytes apart fall into so few L1 sets (of 64-byte lines, 64 sets) that a
// few hundred of them evict each other: the case for copying a block of B before using it.
inline bool rows_alias_in_l1(int64_t stride) {
  if (stride % 64) return false;  // rows start at shifting offsets within lines
  int64_t a = stride / 64, b = 64;
  while (b) a = std::exchange(b, a % b);  // gcd
  return 64 / a < 16;
}

// Fetches `rows` rows of `bytes` bytes, `stride` bytes apart, into L2 a few cache lines per
// call: spread over the tiles computed from one block of B, it brings in the next block before
// it is copied (the rows of W, 4 KiB apart for K = 1024, defeat the hardware prefetcher).
class RowsPrefetch {
 public:
  RowsPrefetch(const void* base, int64_t rows, int64_t bytes, int64_t stride)
      : base_(static_cast<const char*>(base)), stride_(stride), lines_per_row_((bytes + 63) / 64),
        lines_(rows * lines_per_row_) {}
  void next(int64_t count) {
    for (; count > 0 && line_ < lines_; --count, ++line_) {
      __builtin_prefetch(base_ + column_ * 64, 0, 2);
      if (++column_ == lines_per_row_) {
        column_ = 0;
        base_ += stride_;
      }
    }
  }
  int64_t lines() const { return lines_; }

 private:
  const char* base_;
  int64_t stride_, lines_per_row_, lines_, line_ = 0, column_ = 0;
};

// C (R x K) = A . B, where `panels` holds A packed per MR rows and B (S x K) and C have rows of K
// entries. Blocks of kReductionBlock rows of B outermost, so that the panels' share of A (R x
// kReductionBlock) is read from the caches across the column tiles; each tile of NV vectors of such
// a block is reused by every row tile of A. A tile of B is read in place, or copied first into a
// contiguous buffer where its rows alias in L1 (K entries apart, e.g. K = 1024) and where the
// ragged last tile needs zero padding. Where C is revisited (S > kReductionBlock), the next tile of
// B and each tile of C are prefetched.
template <int VB, class T>
KERNELS_INLINE void gemm_panels(const T* panels, int64_t R, int64_t S, const T* b, int64_t K, T* c) {
  constexpr int L = lanes<T, VB>;
  constexpr int MR = OuterTile<T, VB>::MR, NV = OuterTile<T, VB>::NV, KR = NV * L;
  constexpr int64_t SB = kReductionBlock<T, VB>;
  const bool copy_all = rows_alias_in_l1(K * int64_t(sizeof(T)));
  T* const block = copy_all || K % L ? scratch<T>(Scratch::block, std::min(S, SB) * KR) : nullptr;
  const int64_t row_tiles = (R + MR - 1) / MR;
  int64_t s0 = 0;
  do {  // at least once: an empty reduction (S = 0) stores zeros
    const int64_t sc = std::min(SB, S - s0);
    for (int64_t k0 = 0; k0 < K; k0 += KR) {
      const int cols = int(std::min<int64_t>(KR, K - k0));
      const int nv = (cols + L - 1) / L;
      const T* tile = b + s0 * K + k0;
      int64_t ld = K;
      if (copy_all || cols % L) {
        for (int64_t s = 0; s < sc; ++s) {
          T* row = block + s * nv * L;
          std::memcpy(row, tile + s * K, cols * sizeof(T));
          std::fill(row + cols, row + nv * L, T(0));
        }
        tile = block;
        ld = nv * L;
      }
      const int64_t next_cols = std::max<int64_t>(0, std::min<int64_t>(KR, K - k0 - KR));
      RowsPrefetch next_tile(b + s0 * K + k0 + KR, next_cols ? sc : 0, next_cols * int64_t(sizeof(T)),
                             K * int64_t(sizeof(T)));
      const int64_t lines_per_row_tile = S > SB ? (next_tile.lines() + row_tiles - 1) / row_tiles : 0;
      for (int64_t r0 = 0; r0 < R; r0 += MR, next_tile.next(lines_per_row_tile))
        outer_tile_fit<MR, NV, MR, T, VB>(int(std::min<int64_t>(MR, R - r0)), nv, panels + r0 * S + s0 * MR, 0, sc,
                                          tile, ld, c + r0 * K + k0, K, cols, s0 > 0);
    }
  } while ((s0 += SB) < S);
}

// dx[m_begin, m_end) = dz W: packs those rows of dz in tiles of MR, then the GEMM against W.
template <int VB, class T, Act A>
KERNELS_INLINE void grad_input_impl(const T* dy, const T* y, const T* w, T* dx, int64_t N, int64_t K,
                                    int64_t m_begin, int64_t m_end, std::integral_constant<Act, A>) {
  constexpr int MR = OuterTile<T, VB>::MR;
  const int64_t R = m_end - m_begin;
  T* const panels = scratch<T>(Scratch::panels, (R + MR - 1) / MR * MR * N);
  for (int64_t r0 = 0; r0 < R; r0 += MR) {
    const int64_t at = (m_begin + r0) * N;
    pack_transposed<A, MR, VB>(dy + at, y ? y + at : nullptr, N, int(std::min<int64_t>(MR, R - r0)), panels + r0 * N);
  }
  gemm_panels<VB>(panels, R, N, w, K, dx + m_begin * K);
}
KERNELS_MULTIVERSION(grad_input, grad_input_impl)

// dW[n_begin, n_end) = dz^T x and db[n_begin, n_end) = column sums of dz (either may be null).
template <int VB, class T, Act A>
KERNELS_INLINE void grad_weight_impl(const T* dy, const T* y, const T* x, T* dw, T* db, int64_t M, int64_t N,
                                     int64_t K, int64_t n_begin, int64_t n_end, std::integral_constant<Act, A>) {
  constexpr int MR = OuterTile<T, VB>::MR;
  const int64_t R = n_end - n_begin;
  T* const panels = scratch<T>(Scratch::panels, (R + MR - 1) / MR * MR * M);
  for (int64_t r0 = 0; r0 < R; r0 += MR) {
    const int64_t n0 = n_begin + r0;
    pack_dz_columns<A, MR>(dy + n0, y ? y + n0 : nullptr, M, N, int(std::min<int64_t>(MR, R - r0)), panels + r0 * M,
                           db ? db + n0 : nullptr);
  }
  if (dw) gemm_panels<VB>(panels, R, M, x, K, dw + n_begin * K);
}
KERNELS_MULTIVERSION(grad_weight, grad_weight_impl)

// c[0..R) = A . b for A (R x S) read in place (rows lda apart) and one panel b of S rows of
// ldb entries, nv vectors and `cols` valid columns of them. A function of its own (its
// multiversioned wrappers are never inlined), so that the compiler allocates registers for the
// micro-kernel alone: inlined into forward_outer, GCC kept the activation's zero in a register
// throughout and spilled an accumulator to the stack (the forward at 64x128x64 ran at 40 GFLOP/s,
// 76 without the spill).
template <int VB, class T>
KERNELS_INLINE void outer_rows_impl(const T* a, int64_t lda, int64_t R, int64_t S, const T* b, int64_t ldb, T* c,
                                    int64_t ldc, int nv, int cols) {
  constexpr int MR = OuterTile<T, VB>::MR, NV = OuterTile<T, VB>::NV;
  for (int64_t r0 = 0; r0 < R; r0 += MR)
    outer_tile_fit<MR, NV, 0, T, VB>(int(std::min<int64_t>(MR, R - r0)), nv, a + r0 * lda, lda, S, b, ldb,
                                     c + r0 * ldc, ldc, cols, false);
}
KERNELS_MULTIVERSION(outer_rows, outer_rows_impl)

// One thread's share of the forward in outer-product form: columns [n_begin, n_end) of y, one
// panel of NV vectors of them at a time. The panel of W^T (K x NV*L) stays in L1 for K up to a
// few hundred while x streams past it.
template <int VB, class T, Act A>
KERNELS_INLINE void forward_outer_impl(const T* x, const T* w, const T* b, T* y, int64_t M, int64_t N, int64_t K,
                                       int64_t n_begin, int64_t n_end, std::integral_constant<Act, A>) {
  using V = Vec<T, VB>;
  constexpr int L = lanes<T, VB>;
  constexpr int KR = OuterTile<T, VB>::NV * L;
  T* const panel = scratch<T>(Scratch::block, K * KR);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += KR) {
    const int cols = int(std::min<int64_t>(KR, n_end - n0));
    for (int c0 = 0; c0 < cols; c0 += L)
      pack_transposed<Act::none, L, VB>(w + (n0 + c0) * K, static_cast<const T*>(nullptr), K, std::min(L, cols - c0),
                                        panel + c0, KR);
    outer_rows(x, K, M, K, static_cast<const T*>(panel), int64_t(KR), y + n0, N, (cols + L - 1) / L, cols);
    for (int c0 = 0; c0 < cols; c0 += L) {
      const int n = std::min(L, cols - c0);
      const V bias = b ? vload_upto<T, VB>(b + n0 + c0, n, T(0)) : V{};
      for (int64_t m = 0; m < M; ++m) {
        T* at = y + m * N + n0 + c0;
        vstore_upto<T, VB>(at, activate<A, T, VB>(vload_upto<T, VB>(at, n, T(0)) + bias), n);
      }
    }
  }
}
KERNELS_MULTIVERSION(forward_outer, forward_outer_impl)

// ---------------------------------------------------------------------------------------
// Entry points. Each splits its rows (or, for the forward, its columns or the dimension with
// more tiles) into one contiguous range of micro-tiles per thread.

// Rows [begin, end) of thread t of `threads` when `rows` are dealt out in multiples of `granule`.
inline std::pair<int64_t, int64_t> share(int64_t rows, int64_t granule, int t, int threads) {
  const int64_t units = (rows + granule - 1) / granule;
  return {std::min(rows, units * t / threads * granule), std::min(rows, units * (t + 1) / threads * granule)};
}

template <class T>
void forward(uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, int64_t M, int64_t N, int64_t K,
             Act act, int num_threads) {
  if (M == 0 || N == 0) return;
  const int threads = threads_for(M * N * K, num_threads, int64_t(1) << 17);
  // The outer-product form pays for transposing W (about 0.14 ns an entry on Zen 3) by skipping
  // the dot-product tile's fold (about 1.4 ns an output, whatever K): it wins from M >= K / 8 on.
  // One thread, against the dot-product form: 1.36x at 64x128x64, 1.54x at 64x64x64, 1.06x at
  // 512x1024x1024, equal at 64x784x128 (left to the dot-product form); at M = 4, 0.82x. Measured
  // with float on AVX2 only: without FMA (portable) it ran 0.78-0.89x, with double 0.88-1.17x,
  // and AVX-512 (whose 4 x 4 dot-product tile ran at 81 GFLOP/s at 64x128x64 on Zen 5) is not
  // measured yet. Its threads split the columns, each packing its own panels of W, in whole
  // vectors of AVX2.
  constexpr int64_t kOuterGranule = lanes<float, 32>;
  const bool outer = std::is_same_v<T, float> && current_isa() == Isa::avx2 && M * 8 >= K &&
                     N >= kOuterGranule * threads;
  // The dot-product form splits the dimension with more tiles, in multiples of NR (and of MR
  // except AVX2's 3: a thread's rows of the 64-row batch, split when N < M, end on a ragged
  // tile, which costs what splitting at multiples of 12 costs in balance).
  const bool split_n = outer || N >= M;
  const int64_t granule = outer ? kOuterGranule : 4;
  dispatch_activation(act, [&](auto a) {
    parallel_for(threads, threads, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const auto [rb, re] = share(split_n ? N : M, granule, int(t), threads);
        if (outer)
          forward_outer(ptr<const T>(x), ptr<const T>(w), ptr<const T>(b), ptr<T>(y), M, N, K, rb, re, a);
        else if (split_n)
          forward_block(ptr<const T>(x), ptr<const T>(w), ptr<const T>(b), ptr<T>(y), N, K, int64_t(0), M, rb, re, a);
        else
          forward_block(ptr<const T>(x), ptr<const T>(w), ptr<const T>(b), ptr<T>(y), N, K, rb, re, int64_t(0), N, a);
      }
    });
  });
}

template <class T>
void backward(uintptr_t dy, uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t dx, uintptr_t dw, uintptr_t db,
              int64_t M, int64_t N, int64_t K, Act act, int num_threads) {
  constexpr int64_t kGranule = 8;  // the AVX-512 OuterTile MR: each thread's range starts on a tile
  const int64_t work = (dx ? M * N * K : 0) + (dw ? M * N * K : M * N);
  const int threads = threads_for(work, num_threads, int64_t(1) << 17);
  dispatch_activation(act, [&](auto a) {
    parallel_for(threads, threads, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (dx) {
          const auto [mb, me] = share(M, kGranule, int(t), threads);
          grad_input(ptr<const T>(dy), ptr<const T>(y), ptr<const T>(w), ptr<T>(dx), N, K, mb, me, a);
        }
        if (dw || db) {
          const auto [nb, ne] = share(N, kGranule, int(t), threads);
          grad_weight(ptr<const T>(dy), ptr<const T>(y), ptr<const T>(x), ptr<T>(dw), ptr<T>(db), M, N, K, nb, ne, a);
        }
      }
    });
  });
}

static const Register registration([](py::module_& m) {
  m.def("linear_forward", &linear_forward, py::call_guard<py::gil_scoped_release>(),
        "y = act(x W^T + b) for contiguous x (M, K), W (N, K), b (N) or 0, y (M, N).");
  m.def("linear_backward", &linear_backward, py::call_guard<py::gil_scoped_release>(),
        "Gradients of y = act(x W^T + b) from dy (M, N) and y (0 for activation none): dx (M, K), "
        "dW (N, K), db (N), each written when its address is not 0.");
});

}  // namespace

void linear_forward(const std::string& dtype, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, int64_t M,
                    int64_t N, int64_t K, const std::string& activation, int num_threads) {
  const Act act = parse_activation(activation);
  dispatch_dtype(dtype, [&](auto t) { forward<decltype(t)>(x, w, b, y, M, N, K, act, num_threads); });
}

void linear_backward(const std::string& dtype, uintptr_t dy, uintptr_t y, uintptr_t x, uintptr_t w, uintptr_t dx,
                     uintptr_t dw, uintptr_t db, int64_t M, int64_t N, int64_t K, const std::string& activation,
                     int num_threads) {
  const Act act = parse_activation(activation);
  dispatch_dtype(dtype, [&](auto t) { backward<decltype(t)>(dy, y, x, w, dx, dw, db, M, N, K, act, num_threads); });
}

}  // namespace kernels
