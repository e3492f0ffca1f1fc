// y[m, o] = sum_i x[m, i] * w[o, i] for x [M, I] and w [O, I] both bf16 or both fp32, y fp32 [M, O], any M.
//
// Why a kernel: decoding reads every weight once per step, and XLA:CPU's bf16 dot reads them at 1-9 GB/s; this
// one streams them at the memory bandwidth. And batch invariance: every y[m, o] is computed by one fixed sequence
// of fp32 operations on x[m, :] and w[o, :] alone, whatever M is, wherever row m sits among the rows, however the
// work is split between threads. So a request decoded beside 15 others, or prefilled with other prompts or with
// padding, gets bit for bit the products it gets alone (XLA's dot sums in an order that depends on the shape:
// a one-row fp32 dot takes another path than two rows).
//
// The arithmetic, the kernel's contract (`reference.py: matmul_canonical` computes the same in numpy):
//   16 fp32 lanes, one accumulator each, starting at +0. Elements past I count as zeros.
//   bf16: block b holds elements 32b .. 32b+31; lane j takes the pair (32b+2j, 32b+2j+1):
//         acc[j] = (acc[j] + x[odd] * w[odd]) + x[even] * w[even], each sum rounded to fp32 (a product of two
//         bf16 is exact in fp32). That is AVX512-BF16's VDPBF16PS, used where the CPU has it (it also flushes
//         subnormal inputs and sums to zero); elsewhere two FMAs on the halves give the same sums.
//   fp32: block b holds elements 16b .. 16b+15; lane j: acc[j] = fma(x[16b+j], w[16b+j], acc[j]).
//   Then the lanes are added by halves: s8[j] = acc[j] + acc[j+8], s4[j] = s8[j] + s8[j+4],
//   y = (s4[0] + s4[2]) + (s4[1] + s4[3]).
// Built with -ffp-contract=off: the only fused operations are the explicit ones above.
//
// Work: tiles of up to 4 x rows by 4 weight rows share their loads (16 independent accumulators, enough to keep
// the FMA units busy from one row up); tasks of up to 64 x rows by ~32 KiB of weights are handed out to the
// calling thread and XLA's intra-op pool by an atomic counter.
//
// Built at first use by pallas_kernels/matmul/cpu.py with the host compiler (-O3 -march=native); x86 intrinsics
// where the CPU has AVX2/AVX-512, GCC/Clang vector extensions and std::fma elsewhere.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

constexpr int kTileRows = 4;     // x rows per tile
constexpr int kTileCols = 4;     // weight rows per tile
constexpr int64_t kTaskRows = 64;  // x rows per task

template <typename T>
inline T load(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32x16 as_f32(u32x16 bits) {
  f32x16 f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// acc + a * b, rounded once, lane by lane.
inline f32x16 fma16(f32x16 a, f32x16 b, f32x16 acc) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#elif defined(__FMA__)
  __m256 a2[2], b2[2], c2[2];
  std::memcpy(a2, &a, 64);
  std::memcpy(b2, &b, 64);
  std::memcpy(c2, &acc, 64);
  c2[0] = _mm256_fmadd_ps(a2[0], b2[0], c2[0]);
  c2[1] = _mm256_fmadd_ps(a2[1], b2[1], c2[1]);
  std::memcpy(&acc, c2, 64);
  return acc;
#else
  for (int j = 0; j < 16; ++j) acc[j] = std::fma(a[j], b[j], acc[j]);
  return acc;
#endif
}

// The lane sums of up to 16 accumulators at once, in the order of the header (lanes j and j+8, then j and j+4,
// then (0+2) + (1+3)): each level adds two shuffles of a pair of vectors, so 16 sums cost 15 additions. Lane k of
// the result is accumulator k's sum.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t i32x16 __attribute__((vector_size(64)));
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, i32x16{__VA_ARGS__})
#endif

inline f32x16 halves8(f32x16 a, f32x16 b) {  // [a[j] + a[j+8] | b[j] + b[j+8]]
  return SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}

inline f32x16 halves4(f32x16 a, f32x16 b) {  // within each group of 8 lanes: g[j] + g[j+4]
  return SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}

inline f32x16 halves2(f32x16 a, f32x16 b) {  // within each group of 4 lanes: g[j] + g[j+2]
  return SHUFFLE(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         SHUFFLE(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}

inline f32x16 halves1(f32x16 a, f32x16 b) {  // within each pair of lanes: g[0] + g[1]
  return SHUFFLE(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

template <int N>
inline f32x16 lane_sums(const f32x16* a) {
  static_assert(1 <= N && N <= 16, "at most 16 accumulators");
  constexpr int n1 = (N + 1) / 2, n2 = (n1 + 1) / 2, n3 = (n2 + 1) / 2;
  const f32x16 zero = {};
  f32x16 l1[n1], l2[n2], l3[n3];
  for (int k = 0; k < n1; ++k) l1[k] = halves8(a[2 * k], 2 * k + 1 < N ? a[2 * k + 1] : zero);
  for (int k = 0; k < n2; ++k) l2[k] = halves4(l1[2 * k], 2 * k + 1 < n1 ? l1[2 * k + 1] : zero);
  for (int k = 0; k < n3; ++k) l3[k] = halves2(l2[2 * k], 2 * k + 1 < n2 ? l2[2 * k + 1] : zero);
  return halves1(l3[0], n3 > 1 ? l3[1] : zero);
}

// bf16: a block is 32 elements as 16 32-bit words; word j holds element 2j in its low half, 2j+1 in its high half
// (little-endian), so `word & 0xffff0000` and `word << 16` are the odd and even elements as fp32.
struct Bf16 {
  using T = uint16_t;
  using V = u32x16;
  static constexpr int64_t kBlock = 32;
  static V load_block(const T* p) { return load<V>(p); }
  static f32x16 step(f32x16 acc, V x, V w) {
#if defined(__AVX512BF16__)
    return (f32x16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)x, (__m512bh)w);
#else
    acc = fma16(as_f32(x & 0xffff0000u), as_f32(w & 0xffff0000u), acc);  // odd elements first, as VDPBF16PS
    return fma16(as_f32(x << 16), as_f32(w << 16), acc);
#endif
  }
};

struct F32 {
  using T = float;
  using V = f32x16;
  static constexpr int64_t kBlock = 16;
  static V load_block(const T* p) { return load<V>(p); }
  static f32x16 step(f32x16 acc, V x, V w) { return fma16(x, w, acc); }
};

// The last, partial block of a row, zero-padded.
template <typename W>
inline typename W::V load_tail(const typename W::T* p, int64_t n) {
  typename W::T buf[W::kBlock] = {};
  std::memcpy(buf, p, n * sizeof(typename W::T));
  return W::load_block(buf);
}

// y[r, c] for x rows x .. x + (R-1)*I and weight rows w .. w + (C-1)*I; y's row stride is O.
template <typename W, int R, int C>
void tile(const typename W::T* x, const typename W::T* w, float* y, int64_t I, int64_t O) {
  f32x16 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = f32x16{};
  const int64_t full = I - I % W::kBlock;
  for (int64_t i = 0; i < full; i += W::kBlock) {
    typename W::V xv[R], wv[C];
    for (int r = 0; r < R; ++r) xv[r] = W::load_block(x + r * I + i);
    for (int c = 0; c < C; ++c) wv[c] = W::load_block(w + c * I + i);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = W::step(acc[r][c], xv[r], wv[c]);
  }
  if (full < I) {
    typename W::V xv[R], wv[C];
    for (int r = 0; r < R; ++r) xv[r] = load_tail<W>(x + r * I + full, I - full);
    for (int c = 0; c < C; ++c) wv[c] = load_tail<W>(w + c * I + full, I - full);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = W::step(acc[r][c], xv[r], wv[c]);
  }
  const f32x16 sums = lane_sums<R * C>(&acc[0][0]);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * O + c] = sums[r * C + c];
}

template <typename W, int R>
void tile_cols(int c, const typename W::T* x, const typename W::T* w, float* y, int64_t I, int64_t O) {
  switch (c) {
    case 1: return tile<W, R, 1>(x, w, y, I, O);
    case 2: return tile<W, R, 2>(x, w, y, I, O);
    case 3: return tile<W, R, 3>(x, w, y, I, O);
    default: return tile<W, R, 4>(x, w, y, I, O);
  }
}

template <typename W>
void tile_any(int r, int c, const typename W::T* x, const typename W::T* w, float* y, int64_t I, int64_t O) {
  switch (r) {
    case 1: return tile_cols<W, 1>(c, x, w, y, I, O);
    case 2: return tile_cols<W, 2>(c, x, w, y, I, O);
    case 3: return tile_cols<W, 3>(c, x, w, y, I, O);
    default: return tile_cols<W, 4>(c, x, w, y, I, O);
  }
}

// Work shared between the calling thread and the pool's: tasks (a block of x rows by a chunk of weight rows),
// handed out by an atomic counter, weight chunk by weight chunk. It lives on the heap and is owned jointly,
// because a pool task may start only after the caller has returned (it then finds no task left and exits).
template <typename W>
struct Work {
  int64_t M, O, I, chunk_cols, row_blocks, num_tasks;
  const typename W::T* x;
  const typename W::T* w;
  float* y;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void task(int64_t t) {
    const int64_t m0 = (t % row_blocks) * kTaskRows, m1 = std::min(M, m0 + kTaskRows);
    const int64_t o0 = (t / row_blocks) * chunk_cols, o1 = std::min(O, o0 + chunk_cols);
    for (int64_t o = o0; o < o1; o += kTileCols) {
      const int c = static_cast<int>(std::min<int64_t>(kTileCols, o1 - o));
      for (int64_t m = m0; m < m1; m += kTileRows) {
        const int r = static_cast<int>(std::min<int64_t>(kTileRows, m1 - m));
        tile_any<W>(r, c, x + m * I, w + o * I, y + m * O + o, I, O);
      }
    }
  }

  void run() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < num_tasks;) {
      task(t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename W, ffi::DataType D>
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("qwenjax matmul: expects x [M, I] and w [O, I]");
  }
  if (xd[0] == 0 || wd[0] == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work<W>>();
  work->M = xd[0];
  work->O = wd[0];
  work->I = wd[1];
  work->x = reinterpret_cast<const typename W::T*>(x.untyped_data());
  work->w = reinterpret_cast<const typename W::T*>(w.untyped_data());
  work->y = y->typed_data();
  if (work->I == 0) {
    std::fill(work->y, work->y + work->M * work->O, 0.0f);
    return ffi::Error::Success();
  }
  // ~32 KiB of weights per task: small enough to balance the cores, large enough to amortise the hand-off.
  const int64_t row_bytes = work->I * static_cast<int64_t>(sizeof(typename W::T));
  work->chunk_cols = std::max<int64_t>(kTileCols, (int64_t{32} * 1024) / row_bytes / kTileCols * kTileCols);
  work->row_blocks = (work->M + kTaskRows - 1) / kTaskRows;
  work->num_tasks = work->row_blocks * ((work->O + work->chunk_cols - 1) / work->chunk_cols);

  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->num_tasks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->num_tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QwenjaxBf16Matmul, (MatmulImpl<Bf16, ffi::BF16>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QwenjaxF32Matmul, (MatmulImpl<F32, ffi::F32>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
