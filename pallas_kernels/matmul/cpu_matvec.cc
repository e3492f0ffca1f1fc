// y[m, o] = sum_i x[m, i] * w[o, i] for bf16 or fp32 weights w [O, I], fp32 x [M, I] (M <= 4), fp32 y [M, O].
//
// Why: decoding reads every weight once per step, so it runs at memory bandwidth only if the matrix-vector
// product streams the weights at that speed. XLA:CPU's bf16 dot reaches ~1 GB/s for one row and 7-9 GB/s
// for two, its fp32 one ~90% of the read bandwidth; this loop converts bf16 to fp32 in registers (a 16-bit
// shift) and keeps independent fp32 accumulators, enough to stream the weights at the machine's read bandwidth
// from all cores of XLA's own intra-op thread pool. Accumulation is fp32, as in the XLA path; only the
// summation order differs.
//
// Built at first use by pallas_kernels/matmul/cpu.py with the host compiler (-O3 -march=native); GCC/Clang vector
// extensions, so the same source vectorises for AVX2, AVX-512 and NEON.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

template <typename T>
inline T load(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32x8 as_f32(u32x8 bits) {
  f32x8 f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float sum8(f32x8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Each step reads 16 weights as two fp32 vectors (lo, hi) and multiplies them by 16 entries of x laid out to
// match (xp). For fp32 weights lo/hi are w[i..i+8) and w[i+8..i+16), and xp is x itself. For bf16, 16 weights
// load as 8 32-bit words: word k holds element 2k in its low half and 2k+1 in its high half (little-endian), so
// `word << 16` and `word & 0xffff0000` are the even and odd elements as fp32: two integer ops, no shuffles. x
// is then passed de-interleaved in blocks of 16: xp[16b + k] = x[16b + 2k], xp[16b + 8 + k] = x[16b + 2k + 1]
// (see `deinterleave`). A tail of I % 16 elements is summed in scalar code.
struct Bf16 {
  using T = uint16_t;
  static constexpr bool kDeinterleave = true;
  static void load16(const T* p, f32x8& lo, f32x8& hi) {
    const u32x8 words = load<u32x8>(p);
    lo = as_f32(words << 16);
    hi = as_f32(words & 0xffff0000u);
  }
  static float scalar(T h) { return bf16_to_f32(h); }
};

struct F32 {
  using T = float;
  static constexpr bool kDeinterleave = false;
  static void load16(const T* p, f32x8& lo, f32x8& hi) {
    lo = load<f32x8>(p);
    hi = load<f32x8>(p + 8);
  }
  static float scalar(T f) { return f; }
};

// Output row o for all M input rows. One weight row at a time keeps one sequential stream per thread (several
// rows at once, 2 KiB apart, collide in the L1 sets and lose a third of the bandwidth); U consecutive 16-element
// steps go to separate accumulators so the additions do not wait on each other.
template <typename W, int M>
inline void row(const float* x, const float* xp, const typename W::T* w, float* y, int64_t O, int64_t I,
                int64_t o) {
  constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;
  f32x8 acc[U][M] = {};
  const typename W::T* wo = w + o * I;
  const int64_t full = I - I % 16, unrolled = I - I % (16 * U);
  auto step = [&](f32x8* a, int64_t i) {
    f32x8 lo, hi;
    W::load16(wo + i, lo, hi);
    for (int m = 0; m < M; ++m) a[m] += lo * load<f32x8>(xp + m * I + i) + hi * load<f32x8>(xp + m * I + i + 8);
  };
  for (int64_t i = 0; i < unrolled; i += 16 * U) {
    for (int u = 0; u < U; ++u) step(acc[u], i + 16 * u);
  }
  for (int64_t i = unrolled; i < full; i += 16) step(acc[0], i);
  for (int m = 0; m < M; ++m) {
    f32x8 a = acc[0][m];
    for (int u = 1; u < U; ++u) a += acc[u][m];
    float s = sum8(a);
    for (int64_t i = full; i < I; ++i) s += W::scalar(wo[i]) * x[m * I + i];
    y[m * O + o] = s;
  }
}

void deinterleave(const float* x, float* xp, int64_t M, int64_t I) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b + 16 <= I; b += 16) {
      for (int k = 0; k < 8; ++k) {
        xp[m * I + b + k] = x[m * I + b + 2 * k];
        xp[m * I + b + 8 + k] = x[m * I + b + 2 * k + 1];
      }
    }
  }
}

template <typename W, int M>
void rows(const float* x, const float* xp, const typename W::T* w, float* y, int64_t O, int64_t I, int64_t lo,
          int64_t hi) {
  for (int64_t o = lo; o < hi; ++o) row<W, M>(x, xp, w, y, O, I, o);
}

template <typename W>
void rows_any(int64_t M, const float* x, const float* xp, const typename W::T* w, float* y, int64_t O,
              int64_t I, int64_t lo, int64_t hi) {
  switch (M) {
    case 1: return rows<W, 1>(x, xp, w, y, O, I, lo, hi);
    case 2: return rows<W, 2>(x, xp, w, y, O, I, lo, hi);
    case 3: return rows<W, 3>(x, xp, w, y, O, I, lo, hi);
    default: return rows<W, 4>(x, xp, w, y, O, I, lo, hi);
  }
}

// Work shared between the calling thread and the pool's: chunks of output rows handed out by an atomic counter.
// It lives on the heap and is owned jointly, because a pool task may start only after the caller has returned
// (it then finds no chunk left and exits).
template <typename W>
struct Work {
  int64_t M, O, I, chunk_rows, num_chunks;
  const float* x;
  std::vector<float> deinterleaved;  // x laid out for `row` (bf16 weights only)
  const float* xp;
  const typename W::T* w;
  float* y;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      const int64_t lo = c * chunk_rows, hi = std::min(O, lo + chunk_rows);
      rows_any<W>(M, x, xp, w, y, O, I, lo, hi);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename W, ffi::DataType D>
ffi::Error MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<D> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || xd[0] < 1 || xd[0] > 4) {
    return ffi::Error::InvalidArgument("qwenjax matvec: expects x [M<=4, I] and w [O, I]");
  }
  auto work = std::make_shared<Work<W>>();
  work->M = xd[0];
  work->O = wd[0];
  work->I = wd[1];
  work->x = x.typed_data();
  work->w = reinterpret_cast<const typename W::T*>(w.untyped_data());
  work->y = y->typed_data();
  work->xp = work->x;
  if (W::kDeinterleave) {
    work->deinterleaved.resize(work->M * work->I);
    deinterleave(work->x, work->deinterleaved.data(), work->M, work->I);
    work->xp = work->deinterleaved.data();
  }
  // ~32-64 KiB of weights per chunk: small enough to balance the cores, large enough to amortise the hand-off.
  work->chunk_rows = std::max<int64_t>(8, (int64_t{32} * 1024) / std::max<int64_t>(work->I, 1) / 8 * 8);
  work->num_chunks = (work->O + work->chunk_rows - 1) / work->chunk_rows;

  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->num_chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->num_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QwenjaxBf16Matvec, (MatvecImpl<Bf16, ffi::BF16>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QwenjaxF32Matvec, (MatvecImpl<F32, ffi::F32>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
