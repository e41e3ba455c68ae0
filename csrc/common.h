// Shared plumbing for the C++ CPU kernels: run-time SIMD dispatch, threading and
// the pybind11 registry through which each op file adds its functions to kernels._C.
//
// Tensors cross from Python as raw addresses (uintptr_t) plus sizes: the Python entry
// points have already checked shapes, dtypes, devices and contiguity, so kernels trust them.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif
#include <pybind11/pybind11.h>

#include <pthread.h>
#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <new>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace kernels {

namespace py = pybind11;

// ---------------------------------------------------------------------------------------
// Binding registry: every csrc/<op>.cpp registers a function that adds its bindings, so the
// module definition (bindings.cpp) never changes when an op is added.
using Registration = std::function<void(py::module_&)>;

inline std::vector<Registration>& registry() {
  static std::vector<Registration> r;
  return r;
}

struct Register {
  explicit Register(Registration f) { registry().push_back(std::move(f)); }
};

// ---------------------------------------------------------------------------------------
// Run-time SIMD dispatch. A kernel body is written once as a template over the vector width
// in bytes (VB) using GCC vector extensions (Vec<T, VB>); KERNELS_MULTIVERSION compiles it
// for AVX-512, AVX2+FMA and baseline x86-64 and calls current_isa()'s: the best one this CPU
// supports, unless set_isa lowered it.
enum class Isa { portable = 0, avx2 = 1, avx512 = 2 };

inline Isa supported_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::portable;
  }();
  return isa;
#else
  return Isa::portable;
#endif
}

// The variant the kernels run: the best this CPU supports, unless lowered with set_isa (how the
// tests run the AVX2 and portable variants on an AVX-512 machine).
inline std::atomic<Isa>& active_isa() {
  static std::atomic<Isa> isa{supported_isa()};
  return isa;
}

inline Isa current_isa() { return active_isa().load(std::memory_order_relaxed); }

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "portable";
  }
}

#define KERNELS_INLINE __attribute__((always_inline)) inline

template <class T, int VB>
using Vec __attribute__((vector_size(VB), aligned(alignof(T)))) = T;

template <class T, int VB>
constexpr int lanes = VB / int(sizeof(T));

// Unaligned vector load/store: tensors are only guaranteed element-aligned.
template <class T, int VB>
KERNELS_INLINE Vec<T, VB> vload(const T* p) {
  Vec<T, VB> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <class T, int VB>
KERNELS_INLINE void vstore(T* p, Vec<T, VB> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

template <class T, int VB>
using ShuffleIndex = Vec<std::conditional_t<sizeof(T) == 8, int64_t, int32_t>, VB>;  // GCC's mask type

// Lane t of the result is lane Lanes::of(t) of a and b side by side (L + i is b's lane i), for a
// class Lanes whose static constexpr `of` gives the indices as compile-time constants: clang's
// __builtin_shufflevector takes them one by one, GCC's __builtin_shuffle as a vector (GCC has the
// former only from version 12, so it keeps the latter).
template <class Lanes, class T, int VB, size_t... t>
KERNELS_INLINE Vec<T, VB> vshuffle(Vec<T, VB> a, Vec<T, VB> b, std::index_sequence<t...>) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, Lanes::of(int(t))...);
#else
  constexpr ShuffleIndex<T, VB> mask{Lanes::of(int(t))...};
  return __builtin_shuffle(a, b, mask);
#endif
}

template <class Lanes, class T, int VB>
KERNELS_INLINE Vec<T, VB> vshuffle(Vec<T, VB> a, Vec<T, VB> b) {
  return vshuffle<Lanes, T, VB>(a, b, std::make_index_sequence<lanes<T, VB>>{});
}

struct LaneZero {
  static constexpr int of(int) { return 0; }
};

// Every lane x, spelled as a shuffle of lane 0 so that it compiles to one broadcast (from
// memory when x was just loaded). `Vec{} + x` would also add +0.0, which the compiler may not
// drop (it turns -0.0 into +0.0): an add and a register broadcast on the FMA ports per splat.
// GCC keeps its one-operand shuffle of the vector literal: through vshuffle it no longer folds
// the broadcast into the FMAs of the outer-product kernels (csrc/linear.cpp).
template <class T, int VB>
KERNELS_INLINE Vec<T, VB> vsplat(T x) {
#if defined(__clang__)
  const Vec<T, VB> v{x};
  return vshuffle<LaneZero, T, VB>(v, v);
#else
  return __builtin_shuffle(Vec<T, VB>{x}, ShuffleIndex<T, VB>{});
#endif
}

template <class T, int VB>
KERNELS_INLINE Vec<T, VB> vmax(Vec<T, VB> a, Vec<T, VB> b) {
  return a > b ? a : b;
}

// Horizontal max and sum, halving the vector (GCC turns the halves into extracts).
template <class T, int VB>
KERNELS_INLINE T hmax(Vec<T, VB> v) {
  if constexpr (VB > 16) {
    Vec<T, VB / 2> lo, hi;
    __builtin_memcpy(&lo, &v, VB / 2);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + VB / 2, VB / 2);
    return hmax<T, VB / 2>(lo > hi ? lo : hi);
  } else {
    T m = v[0];
    for (int l = 1; l < lanes<T, VB>; ++l) m = v[l] > m ? v[l] : m;
    return m;
  }
}

template <class T, int VB>
KERNELS_INLINE T hsum(Vec<T, VB> v) {
  if constexpr (VB > 16) {
    Vec<T, VB / 2> lo, hi;
    __builtin_memcpy(&lo, &v, VB / 2);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + VB / 2, VB / 2);
    return hsum<T, VB / 2>(lo + hi);
  } else {
    T s = 0;
    for (int l = 0; l < lanes<T, VB>; ++l) s += v[l];
    return s;
  }
}

// The first n elements at p (all lanes when n >= lanes, none when n <= 0), fill elsewhere;
// nothing past p + n is touched. The lane loops compile to one masked move per lane (AVX-512's
// masked loads and stores, via intrinsics, were measured at only 15 % faster on 10-class rows).
template <class T, int VB>
KERNELS_INLINE Vec<T, VB> vload_upto(const T* p, int64_t n, T fill) {
  constexpr int L = lanes<T, VB>;
  if (n >= L) return vload<T, VB>(p);
  Vec<T, VB> v;
  for (int l = 0; l < L; ++l) v[l] = l < n ? p[l] : fill;
  return v;
}

// Stores the first n lanes of v at p (all when n >= lanes); nothing past p + n is touched.
template <class T, int VB>
KERNELS_INLINE void vstore_upto(T* p, Vec<T, VB> v, int64_t n) {
  constexpr int L = lanes<T, VB>;
  if (n >= L) return vstore<T, VB>(p, v);
  for (int l = 0; l < L; ++l)
    if (l < n) p[l] = v[l];
}

// Stores lanes [0, N) of v at p for a compile-time N: whole vectors of halving width (a 6-lane
// store of 8 floats is one of 4 lanes and one of 2), so that v need not go through memory.
template <int N, class T, int VB>
KERNELS_INLINE void vstore_first(T* p, Vec<T, VB> v) {
  constexpr int L = lanes<T, VB>;
  static_assert(0 <= N && N <= L);
  if constexpr (N == L) {
    vstore<T, VB>(p, v);
  } else if constexpr (N > 0) {
    Vec<T, VB / 2> lo, hi;
    __builtin_memcpy(&lo, &v, VB / 2);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + VB / 2, VB / 2);
    if constexpr (N >= L / 2) {
      vstore<T, VB / 2>(p, lo);
      vstore_first<N - L / 2, T, VB / 2>(p + L / 2, hi);
    } else {
      vstore_first<N, T, VB / 2>(p, lo);
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
#define KERNELS_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#define KERNELS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define KERNELS_TARGET_AVX512
#define KERNELS_TARGET_AVX2
#endif

// KERNELS_MULTIVERSION(name, impl): defines `name(args...)` that forwards to `impl<VB>(args...)`
// compiled for current_isa() (64-byte vectors on AVX-512, 32 on AVX2,
// 16 on baseline SSE2). `impl` must be a function template `template <int VB, class... > ...`
// marked KERNELS_INLINE so that its body is compiled inside each target-specific wrapper.
// Split work with parallel_for below and call the multiversioned function once per chunk, not
// the other way round: a lambda inside `impl` is a function of its own, without the target
// attribute (its body would fall back to SSE).
// The ISA wrappers are never inlined: a multiversioned function called from another kernel's
// body stays a function of its own, with its own register allocation.
#define KERNELS_MULTIVERSION(name, impl)                                                             \
  template <class... A>                                                                              \
  KERNELS_TARGET_AVX512 __attribute__((noinline)) static void name##_avx512(A... a) { impl<64>(a...); } \
  template <class... A>                                                                              \
  KERNELS_TARGET_AVX2 __attribute__((noinline)) static void name##_avx2(A... a) { impl<32>(a...); }  \
  template <class... A>                                                                              \
  __attribute__((noinline)) static void name##_portable(A... a) { impl<16>(a...); }                  \
  template <class... A>                                                                              \
  static void name(A... a) {                                                                         \
    switch (::kernels::current_isa()) {                                                              \
      case ::kernels::Isa::avx512: return name##_avx512(a...);                                       \
      case ::kernels::Isa::avx2: return name##_avx2(a...);                                           \
      default: return name##_portable(a...);                                                         \
    }                                                                                                \
  }

// ---------------------------------------------------------------------------------------
// Scratch memory for packed operands, per thread and per slot (a kernel may hold one buffer of
// each slot at a time). It grows to the largest request and is kept, so a kernel called step
// after step neither allocates nor page-faults in the steady state; contents are undefined.
enum class Scratch { panels = 0, block = 1, count = 2 };

template <class T>
T* scratch(Scratch slot, size_t count) {
  struct Buffer {
    std::unique_ptr<std::byte, decltype(&std::free)> data{nullptr, &std::free};
    size_t bytes = 0;
  };
  thread_local Buffer buffers[int(Scratch::count)];
  Buffer& buffer = buffers[int(slot)];
  const size_t bytes = (std::max<size_t>(count, 1) * sizeof(T) + 63) / 64 * 64;
  if (bytes > buffer.bytes) {
    buffer.data.reset(static_cast<std::byte*>(std::aligned_alloc(64, bytes)));
    if (!buffer.data) throw std::bad_alloc();
    buffer.bytes = bytes;
  }
  return reinterpret_cast<T*>(buffer.data.get());
}

// ---------------------------------------------------------------------------------------
// Threads: the Python layer passes torch.get_num_threads(); small work stays on one thread
// because waking a team costs more than it saves.
inline int threads_for(int64_t work, int num_threads, int64_t min_work_per_thread) {
  if (num_threads <= 1 || work < 2 * min_work_per_thread) return 1;
  int64_t t = work / min_work_per_thread;
  return int(t < num_threads ? t : num_threads);
}

// The extension's one pool of worker threads (instead of an OpenMP team), built so that a
// thread the OS has descheduled never holds the others up:
// * The caller takes part. Each chunk has a home thread, which takes it first (the same part of
//   the data lands on the same core call after call), but any thread that has finished its own
//   takes a chunk nobody has started, so the caller waits only for chunks a worker has already
//   started. With
//   the other cores busy (another process, PyTorch's own OpenMP threads spinning after an op),
//   the caller runs the whole job itself at one thread's speed, where a fork-join team waits at
//   its barrier for a member to be scheduled again (the first-run issue: 11x slower on 2 busy
//   cores).
// * An idle worker spins for kSpinNanoseconds (a training step's kernels come microseconds
//   apart), then sleeps on a condition variable, so it never busy-waits against other threads
//   for longer than that. The caller wakes sleepers only when there are any.
// * When a worker still holds its chunk long after the caller has finished its own (it was
//   descheduled mid-chunk: more runnable threads than cores), the next jobs run on the caller
//   alone, with an exponential backoff before the workers are tried again; so on an
//   oversubscribed machine the kernels run at one thread's speed instead of waiting a
//   scheduler time slice per job.
// * One job at a time: a call made while the pool is busy (another Python thread, or a kernel
//   calling parallel_for from inside a chunk) runs on its own thread.
// * A child process forked from this one starts a new, empty pool (the parent's workers do
//   not exist there).
class ThreadPool {
 public:
  using Chunk = void (*)(void* context, int64_t chunk);
  static constexpr int64_t kMaxChunks = 1024;

  static ThreadPool& get() { return *current(); }

  // Calls chunk(context, c) for every c in [0, chunks), on the calling thread and up to
  // threads - 1 workers; returns when all have returned. Chunk c is first offered to thread
  // c (the caller is thread 0, worker w thread w), so a kernel called again and again gives each
  // thread the same part of its data every time, still in that core's caches; a thread that
  // finds its own chunk done or taken goes on to take any chunk nobody has started.
  void run(int64_t chunks, int threads, Chunk chunk, void* context) {
    if (threads <= 1 || chunks <= 1 || chunks > kMaxChunks || !caller_.try_lock())
      return run_inline(chunks, chunk, context);
    std::lock_guard<std::mutex> unlock(caller_, std::adopt_lock);
    if (solo_jobs_ > 0) {
      --solo_jobs_;
      return run_inline(chunks, chunk, context);
    }
    while (workers_ < threads - 1 && workers_ < kMaxChunks - 1) {
      ++workers_;
      std::thread(&ThreadPool::work_loop, this, job_, workers_).detach();
    }
    chunk_ = chunk;
    context_ = context;
    pending_.store(chunks, std::memory_order_relaxed);
    const auto start = std::chrono::steady_clock::now();
    published_.store(++job_ << 16 | uint64_t(chunks), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      wake_.notify_all();
    }
    std::exception_ptr error;
    claim_chunks(job_, 0, &error);
    const auto own_done = std::chrono::steady_clock::now();
    for (int spin = 0; pending_.load(std::memory_order_acquire) != 0; ++spin) {
      if (spin < kCallerSpins)
        pause();
      else
        std::this_thread::yield();  // a worker holding a chunk may be waiting for this core
    }
    // A worker whose chunk ends long after the caller's was descheduled mid-chunk (the cores are
    // oversubscribed): run the next jobs on the caller alone, twice as many each time this
    // happens again before as many on-time jobs, then try the workers again.
    const auto waited = std::chrono::steady_clock::now() - own_done;
    if (waited > 2 * (own_done - start) + std::chrono::nanoseconds(kLateNanoseconds)) {
      backoff_ = std::min(backoff_ ? 2 * backoff_ : kFirstBackoff, kMaxBackoff);
      solo_jobs_ = backoff_;
    } else if (backoff_ > 0) {
      --backoff_;  // slowly: while preemptions keep coming, probing the workers costs a time slice each
    }
    if (error) std::rethrow_exception(error);
  }

 private:
  static constexpr int kCallerSpins = 2000;
  static constexpr int64_t kSpinNanoseconds = 50000;
  static constexpr int64_t kLateNanoseconds = 50000;
  static constexpr int64_t kFirstBackoff = 16, kMaxBackoff = 4096;  // jobs run on the caller alone

  static void run_inline(int64_t chunks, Chunk chunk, void* context) {
    for (int64_t c = 0; c < chunks; ++c) chunk(context, c);
  }

  ThreadPool() = default;

  // Never destroyed: detached workers may still be waiting on it while the process exits.
  static ThreadPool*& current() {
    static ThreadPool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { current() = new ThreadPool; });  // the parent's pool leaks in the child
      return new ThreadPool;
    }();
    return pool;
  }

  // published_ packs the job number (48 bits, never wrapping) and its chunk count (16 bits).
  static uint64_t job_of(uint64_t published) { return published >> 16; }
  static int64_t chunks_of(uint64_t published) { return int64_t(published & 0xffff); }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }

  // Runs every chunk of `job` this thread can claim, its `home` chunk first. claims_[c] holds the
  // number of the last job whose chunk c was claimed, so it is free in `job` while below it and
  // taken by moving it to `job`. A thread still scanning a finished job (its caller has published
  // the next) claims nothing: every chunk of a finished job holds its number or a later one. The
  // caller passes `error`, where the first exception of its chunks is kept (the job's other
  // chunks still run: they may be running on workers already); on a worker an exception
  // terminates, as it would escaping an OpenMP region.
  void claim_chunks(uint64_t job, int64_t home, std::exception_ptr* error = nullptr) {
    const uint64_t published = published_.load(std::memory_order_acquire);
    if (job_of(published) != job) return;
    const int64_t chunks = chunks_of(published);
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t c = (home + i) % chunks;
      uint64_t seen = claims_[c].load(std::memory_order_relaxed);
      while (seen < job && !claims_[c].compare_exchange_weak(seen, job, std::memory_order_acq_rel, std::memory_order_relaxed)) {
      }
      if (seen >= job) continue;
      if (error == nullptr) {
        chunk_(context_, c);
      } else {
        try {
          chunk_(context_, c);
        } catch (...) {
          if (!*error) *error = std::current_exception();
        }
      }
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  void work_loop(uint64_t seen, int64_t home) {
    for (;;) {
      seen = wait_for_job(seen);
      claim_chunks(seen, home);
    }
  }

  // Spins, then sleeps, until a job numbered other than `seen` is published; returns its number.
  uint64_t wait_for_job(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kSpinNanoseconds);
    for (int spin = 1;; ++spin) {
      const uint64_t job = job_of(published_.load(std::memory_order_acquire));
      if (job != seen) return job;
      if (spin % 256 == 0 && std::chrono::steady_clock::now() > until) break;
      pause();
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t job;
    while ((job = job_of(published_.load(std::memory_order_seq_cst))) == seen) wake_.wait(lock);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return job;
  }

  std::mutex caller_;  // held by the thread whose job runs; guards the fields up to published_
  int64_t workers_ = 0;
  int64_t backoff_ = 0, solo_jobs_ = 0;
  uint64_t job_ = 0;
  Chunk chunk_ = nullptr;
  void* context_ = nullptr;
  std::atomic<uint64_t> published_{0};
  std::atomic<int64_t> pending_{0};  // chunks of the current job not yet finished
  std::atomic<uint64_t> claims_[kMaxChunks] = {};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
};

// PyTorch's OpenMP team. PyTorch runs its CPU ops on an OpenMP runtime (libgomp in the Linux
// wheels) whose idle threads busy-wait for milliseconds after every parallel op. A kernel called
// between PyTorch's ops (any op called from Python) found the other cores held by those spinning
// threads, so its pool's workers started late and it ran at one thread's speed: a tutorial loop
// whose batch comes from PyTorch's indexing ran our kernels 1.4x slower than without it. Such a
// kernel runs its chunks on that same team instead: a thread spinning for work takes ours at once,
// and nothing spins against anything. The runtime is found among the libraries already loaded
// into the process (kernels imports torch first) and called through GOMP_parallel, the entry point
// compilers emit for `#pragma omp parallel`, which GNU's, LLVM's and Intel's runtimes all export;
// the extension links no OpenMP runtime of its own. Not used in a forked child, where the parent's
// team does not exist (PyTorch's own parallel ops hang there; ours run on a new ThreadPool), nor
// inside an OwnPool scope.
class HostTeam {
 public:
  using Body = void (*)(void*);

  // The team, or nullptr: no OpenMP runtime loaded, turned off (_C.set_openmp_team), a forked child, or
  // an OwnPool scope on this thread.
  static const HostTeam* get() {
    const HostTeam* team = found();
    if (team == nullptr || !enabled().load(std::memory_order_relaxed) || own_pool_depth() > 0) return nullptr;
    return team;
  }
  // The path of the runtime's library ("" when none was found or after a fork).
  static std::string library() {
    const HostTeam* team = found();
    return team ? team->path_ : std::string();
  }
  static std::atomic<bool>& enabled() {
    static std::atomic<bool> on{true};
    return on;
  }
  static int& own_pool_depth() {
    thread_local int depth = 0;
    return depth;
  }
  // Called once when kernels._C loads: from then on a forked child leaves the team alone.
  static void watch_forks() {
    pthread_atfork(nullptr, nullptr, [] { forked().store(true); });
  }

  // Calls body(context) on each of `threads` team members (the caller is member 0).
  void run(Body body, void* context, int threads) const { parallel_(body, context, unsigned(threads), 0); }
  int member() const { return thread_num_(); }

 private:
  static const HostTeam* found() {
    static const HostTeam* team = find();
    return forked().load(std::memory_order_relaxed) ? nullptr : team;
  }
  static std::atomic<bool>& forked() {
    static std::atomic<bool> f{false};
    return f;
  }

  static const HostTeam* find() {
#if defined(__linux__)
    std::vector<std::string> candidates;  // loaded libraries named like an OpenMP runtime
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* out) -> int {
          const char* name = info->dlpi_name;
          const char* slash = name ? std::strrchr(name, '/') : nullptr;
          const char* base = slash ? slash + 1 : name;
          if (base != nullptr)
            for (const char* prefix : {"libgomp", "libiomp5", "libomp"})
              if (std::strncmp(base, prefix, std::strlen(prefix)) == 0)
                static_cast<std::vector<std::string>*>(out)->push_back(name);
          return 0;
        },
        &candidates);
    for (const std::string& path : candidates) {
      void* handle = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
      if (handle == nullptr) continue;
      HostTeam team;
      team.path_ = path;
      team.parallel_ = reinterpret_cast<decltype(parallel_)>(dlsym(handle, "GOMP_parallel"));
      team.thread_num_ = reinterpret_cast<decltype(thread_num_)>(dlsym(handle, "omp_get_thread_num"));
      if (team.parallel_ && team.thread_num_)
        return new HostTeam(team);  // never freed: the runtime stays loaded as long as torch is
    }
#endif
    return nullptr;
  }

  std::string path_;
  void (*parallel_)(Body, void*, unsigned, unsigned) = nullptr;
  int (*thread_num_)() = nullptr;
};

// While alive, parallel_for on this thread runs on the extension's ThreadPool rather than
// PyTorch's team: for MLPStep, whose kernels run back to back inside one call with no PyTorch op
// between them, where the pool's tolerance of a descheduled thread pays (beside a busy process,
// an epoch in 0.35-0.68 s on the pool against 1.05-1.24 s on PyTorch's team, whose fork-join
// waits for every member).
struct OwnPool {
  OwnPool() { ++HostTeam::own_pool_depth(); }
  ~OwnPool() { --HostTeam::own_pool_depth(); }
  OwnPool(const OwnPool&) = delete;
  OwnPool& operator=(const OwnPool&) = delete;
};

// Calls f(begin, end) on contiguous chunks of [0, n), one chunk per thread: on PyTorch's OpenMP
// team where there is one (HostTeam), else on the ThreadPool above. On the team, as on the pool,
// member t takes chunk t first (the same part of the data on the same core, call after call), then
// any chunk nobody has taken, so a member the OS started late finds its chunk done rather than
// holding the others up for its length; the first exception of any chunk is rethrown here once
// all have returned.
template <class F>
void parallel_for(int64_t n, int num_threads, F&& f) {
  const int64_t chunks = std::min({n, int64_t(num_threads), ThreadPool::kMaxChunks});
  if (chunks <= 1) {
    if (n > 0) f(int64_t(0), n);
    return;
  }
  if (const HostTeam* team = HostTeam::get()) {
    struct Job {
      std::remove_reference_t<F>* f;
      int64_t n, chunks;
      const HostTeam* team;
      std::atomic<bool> failed{false};
      std::exception_ptr error;
      std::atomic<bool> taken[ThreadPool::kMaxChunks];  // value-initialized: all false
    } job{&f, n, chunks, team};
    team->run(
        [](void* context) {
          Job& job = *static_cast<Job*>(context);
          const int64_t home = job.team->member();
          for (int64_t i = 0; i < job.chunks; ++i) {
            const int64_t c = (home + i) % job.chunks;
            if (job.taken[c].exchange(true, std::memory_order_acq_rel)) continue;
            try {
              (*job.f)(job.n * c / job.chunks, job.n * (c + 1) / job.chunks);
            } catch (...) {  // an exception must not leave an OpenMP region
              if (!job.failed.exchange(true)) job.error = std::current_exception();
            }
          }
        },
        &job, int(chunks));
    if (job.error) std::rethrow_exception(job.error);
    return;
  }
  auto body = [&](int64_t c) { f(n * c / chunks, n * (c + 1) / chunks); };
  ThreadPool::get().run(chunks, num_threads, [](void* context, int64_t c) { (*static_cast<decltype(body)*>(context))(c); },
                        &body);
}

// While alive, the calling thread treats subnormal inputs as zero and flushes subnormal results
// to zero (x86's MXCSR DAZ and FTZ bits; elsewhere it does nothing). On x86 every vector
// operation that meets a subnormal takes a microcode assist, about 100x its normal cost.
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kDenormalsAreZero | kFlushToZero); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kDenormalsAreZero = 0x0040, kFlushToZero = 0x8000;
  unsigned saved_;
#endif
};

// Calls f(T{}) with T = float or double, from the dtype name the Python layer passes
// (kernels._dispatch.cpp_dtype), so each op binds one function per entry point, not one per dtype.
template <class F>
void dispatch_dtype(const std::string& dtype, F&& f) {
  if (dtype == "float32") return f(float{});
  if (dtype == "float64") return f(double{});
  throw std::invalid_argument("kernels._C: unsupported dtype " + dtype);
}

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace kernels
