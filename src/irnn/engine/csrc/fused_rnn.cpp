// Fused CPU recurrence for one Elman RNN layer (ReLU or tanh), forward and backward through time.
//
//   h_t = act(x_t W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T),  h_{-1} = 0
//
// Why this exists: for batch 16 and hidden 100 one time step is a [16,100]x[100,100] product,
// about 3 us of arithmetic, so nn.RNN (and any loop of ATen ops) spends most of its time in op
// dispatch. Here the whole time loop is plain C++ over raw pointers:
//   - each step's recurrent product is a register-blocked micro-kernel written with GCC/Clang
//     vector extensions; bias, input projection and nonlinearity are fused into its epilogue
//     (wide inputs, I > 8, are instead projected by one GEMM over all steps before the loop);
//   - ReLU zeros are skipped: a k where a whole block of rows of h (or dz) is 0 costs nothing;
//   - the backward loop runs the same kernel on dz_{t+1} W_hh and fuses act'(h_t);
//   - it also adds dz_t^T h_{t-1} into dW_hh at each step while both are in L1, for the units whose dz_t
//     is nonzero in some row (ReLU skipping again): 25-35% less backward time than one
//     [H, B*T] x [B*T, H] GEMM after the loop, which remains for tiny H and very large stacks;
//     db and dW_ih (I <= 8) are summed by a vector loop afterwards.
// Rows of the batch are independent through time, so each model's rows are split into a fixed number of
// groups (chosen from the shapes alone, never from the thread count) and threads take whole (model, group)
// work items; there is no synchronisation inside the time loop.
//
// The kernel is compiled three times (AVX-512, AVX2+FMA, baseline x86-64/other) through target
// attributes and picked at run time, so one build runs on any x86-64 and no -march=native is
// needed. Each output element is summed in the same order whatever the blocking or the thread
// count, so results are bitwise reproducible on a given machine for any thread count: dW_hh adds up one
// partial sum per group in a fixed order, and every ATen GEMM that reduces over batch rows (MKL splits
// long reductions across threads) runs single-threaded on one model at a time (serial_blas). A stacked
// model gets bitwise what it gets alone. No -ffast-math.
//
// Layouts (N = stacked models), all batch first like x:
//   x [N,B,T,I], w_ih [N,H,I], w_hh [N,H,H], b_* [N,H]; out, dz [N,B,T,H] contiguous.
//
// Only the ATen headers it needs and torch/library.h (not torch/extension.h): half the first compile.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define IRNN_X86 1
#include <xmmintrin.h>
#else
#define IRNN_X86 0
#endif

// MKL's vector tanh, the function behind torch.tanh on float in torch's MKL builds (at::vml::vtanh calls
// vmsTanh with these flags); libtorch_cpu exports it. Weak: a torch without it leaves it null, and the
// engine then calls ATen's tanh_ instead (same numbers, plus ~1-2 us of dispatch per call).
extern "C" void vmsTanh(int n, const float* a, float* r, long long mode) __attribute__((weak));
constexpr long long kVmlHa = 0x2, kVmlFtzdazOff = 0x140000, kVmlErrmodeIgnore = 0x100;

#define IRNN_INLINE inline __attribute__((always_inline))

namespace {

enum Isa : int64_t { kAuto = 0, kGeneric = 1, kAvx2 = 2, kAvx512 = 3 };

template <typename T> struct IntOf;
template <> struct IntOf<float> { using type = int32_t; };
template <> struct IntOf<double> { using type = int64_t; };

// A vector of VB bytes of T. The compiler maps it onto zmm/ymm/xmm registers (or splits it) according
// to the target of the function it is inlined into.
template <typename T, int VB>
struct Simd {
  typedef T vec __attribute__((vector_size(VB)));
  typedef typename IntOf<T>::type ivec __attribute__((vector_size(VB)));
  static constexpr int L = VB / (int)sizeof(T);

  static IRNN_INLINE vec zero() { return vec{}; }
  // GCC 12 expands a {s, s, ...} constructor inside a target("avx512f") function as 16 masked inserts;
  // a shuffle of lane 0 becomes one broadcast, folded into the FMA as a {1toL} memory operand.
  static IRNN_INLINE vec splat(T s) {
#if defined(__clang__)
    return s - vec{};  // exact for every s (0 + s would turn -0 into +0), so it folds to a broadcast
#else
    return __builtin_shuffle(vec{s}, ivec{});
#endif
  }
  static IRNN_INLINE vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof(vec));
    return v;
  }
  static IRNN_INLINE void store(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
  // relu(z) = z < 0 ? 0 : z; NaN passes through like torch.relu.
  static IRNN_INLINE vec relu(vec z) { return (vec)((ivec)z & ~(ivec)(z < zero())); }
  // relu'(z) from h = relu(z): 0 where h <= 0, the convention of threshold_backward (z = 0 -> 0).
  static IRNN_INLINE vec relu_grad(vec g, vec h) { return (vec)((ivec)g & ~(ivec)(h <= zero())); }
};

template <typename T> IRNN_INLINE T relu_s(T z) { return z < T(0) ? T(0) : z; }
template <typename T> IRNN_INLINE T relu_grad_s(T g, T h) { return h <= T(0) ? T(0) : g; }
template <typename T> IRNN_INLINE T tanh_grad_s(T g, T h) { return g * (T(1) - h * h); }

// Asks for the rows [R, H] at p (row stride ld) to be brought into cache: the next step's rows of the
// batch-major arrays sit a row stride (T*H) apart, too many streams for the hardware prefetcher.
template <typename T>
IRNN_INLINE void prefetch_rows(const T* p, int64_t R, int64_t ld, int64_t H, bool write) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < H; j += kLine) {
      if (write)
        __builtin_prefetch(p + r * ld + j, 1, 3);
      else
        __builtin_prefetch(p + r * ld + j, 0, 3);
    }
}

// The micro-kernel: for r < RB and c < CB,
//   C_r[c*L ...] = (Accumulate ? C_r[c*L ...] : 0) + sum_k A_r[k * ks] * M[k*ldm + c*L ...]
// over the k in idx[0..nk) (Indexed) or 0..nk-1, in that order. A_r, C_r: row r's pointers (A at k = 0, C
// and M at the tile's first column). RB x CB vector accumulators stay in registers; each k loads CB
// vectors of M and broadcasts RB scalars of A.
template <typename T, int VB, int RB, int CB, bool Indexed, bool Accumulate>
IRNN_INLINE void tile(const T* const* A, int64_t ks, const int32_t* idx, int64_t nk, const T* M, int64_t ldm,
                      T* const* C) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  vec acc[RB][CB];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) acc[r][c] = Accumulate ? S::load(C[r] + c * S::L) : S::zero();
  for (int64_t i = 0; i < nk; ++i) {
    const int64_t k = Indexed ? idx[i] : i;
    const T* m = M + k * ldm;
    vec w[CB];
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) w[c] = S::load(m + c * S::L);
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      const vec a = S::splat(A[r][k * ks]);
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c) acc[r][c] += a * w[c];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) S::store(C[r] + c * S::L, acc[r][c]);
}

// C[r*ldc + j0 ...] = sum_{k in idx} A[r*lda + k] * M[k*ldm + j0 ...]: RB contiguous rows, the k listed.
template <typename T, int VB, int RB, int CB>
IRNN_INLINE void gemm_tile(const T* A, int64_t lda, const int32_t* idx, int64_t nk, const T* M, int64_t ldm, T* C,
                           int64_t ldc, int64_t j0) {
  const T* a[RB];
  T* c[RB];
  for (int r = 0; r < RB; ++r) a[r] = A + r * lda, c[r] = C + r * ldc + j0;
  tile<T, VB, RB, CB, true, false>(a, 1, idx, nk, M + j0, ldm, c);
}

// C[u*ldc + j0 ...] += sum_{k < nk} A[k*lda + u] * M[k*ldm + j0 ...] for the RB units u = units[r]: a rank-nk
// update of RB scattered rows of C (dW_hh += dz_t^T h_{t-1}, k over batch rows).
template <typename T, int VB, int RB, int CB>
IRNN_INLINE void rank_update(const T* A, int64_t lda, const int32_t* units, int64_t nk, const T* M, int64_t ldm,
                             T* C, int64_t ldc, int64_t j0) {
  const T* a[RB];
  T* c[RB];
  for (int r = 0; r < RB; ++r) a[r] = A + units[r], c[r] = C + units[r] * ldc + j0;
  tile<T, VB, RB, CB, false, true>(a, lda, nullptr, nk, M + j0, ldm, c);
}

// rank_update over all nu units, RBMAX at a time and then 4, 2, 1, for the CB vectors from j0.
template <typename T, int VB, int RBMAX, int CB>
IRNN_INLINE void rank_update_units(const T* A, int64_t lda, const int32_t* units, int64_t nu, const T* M, int64_t ldm,
                                   int64_t nk, T* C, int64_t ldc, int64_t j0) {
  int64_t u = 0;
  for (; u + RBMAX <= nu; u += RBMAX) rank_update<T, VB, RBMAX, CB>(A, lda, units + u, nk, M, ldm, C, ldc, j0);
  if constexpr (RBMAX > 4) if (nu - u >= 4) { rank_update<T, VB, 4, CB>(A, lda, units + u, nk, M, ldm, C, ldc, j0); u += 4; }
  if constexpr (RBMAX > 2) if (nu - u >= 2) { rank_update<T, VB, 2, CB>(A, lda, units + u, nk, M, ldm, C, ldc, j0); u += 2; }
  if (nu - u >= 1) rank_update<T, VB, 1, CB>(A, lda, units + u, nk, M, ldm, C, ldc, j0);
}

// C[units, :ldc] += A[:R, units]^T M[:R, :ldc]; ldc is a multiple of L. M's rows are read a whole ldc wide,
// which may run past a row of width < ldc into the memory after it (the caller guarantees it exists).
template <typename T, int VB, int RBMAX, int CBMAX>
IRNN_INLINE void rank_update_rows(const T* A, int64_t lda, const int32_t* units, int64_t nu, const T* M, int64_t ldm,
                                  int64_t R, T* C, int64_t ldc) {
  constexpr int L = Simd<T, VB>::L;
  const int64_t nvec = ldc / L;
  int64_t c = 0;
  for (; c + CBMAX <= nvec; c += CBMAX)
    rank_update_units<T, VB, RBMAX, CBMAX>(A, lda, units, nu, M, ldm, R, C, ldc, c * L);
  if constexpr (CBMAX > 2) {
    if (nvec - c >= 2) { rank_update_units<T, VB, RBMAX, 2>(A, lda, units, nu, M, ldm, R, C, ldc, c * L); c += 2; }
  }
  if constexpr (CBMAX > 1) {
    if (nvec - c >= 1) { rank_update_units<T, VB, RBMAX, 1>(A, lda, units, nu, M, ldm, R, C, ldc, c * L); c += 1; }
  }
}

// C[r, :W] = bias[:W] (or 0) + sum_k A[r, k] M[k, :W] for rows r0 <= r < r1, k in order. Each row gets
// its numbers from the same code whatever rows the caller hands it together. A BLAS does not promise that:
// which rows fall in its edge tiles follows the thread count, and on some CPUs those tiles round
// differently (seen on AMD: 1e-7 between 1 and 3 threads for [B*T, 12] x [12, H]).
template <typename T>
IRNN_INLINE void rows_gemm_impl(const T* __restrict A, int64_t lda, int64_t K, const T* __restrict M, int64_t ldm,
                                const T* __restrict bias, int64_t W, T* __restrict C, int64_t ldc, int64_t r0,
                                int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict c = C + r * ldc;
    const T* a = A + r * lda;
    for (int64_t j = 0; j < W; ++j) c[j] = bias ? bias[j] : T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T s = a[k];
      const T* __restrict m = M + k * ldm;
      for (int64_t j = 0; j < W; ++j) c[j] += s * m[j];
    }
  }
}

// Rows [r, r + size) of A and the k at which at least one of them is nonzero.
//
// Skipping the k where a whole row block of A is zero is exact, not an approximation: the accumulators
// start at +0 and round-to-nearest never makes a sum -0, so adding a product 0 * w (w finite) never
// changes them. ReLU states, and the dz of the backward pass (masked by relu'), are often zero in whole
// units: about 40% of an IRNN's at initialisation. (The one difference: a k whose weights hold inf/NaN
// is skipped where nn.RNN would produce NaN from 0 * inf.)
struct RowBlock {
  int64_t r, size, nk;
  int32_t* idx;
};

// blk.idx[0..blk.nk) = the k < K where some row of the block has A[r, k] != 0 (+-0 count as zero).
// The rows' bit patterns are OR-ed a vector at a time, sign bits cleared; flags is scratch of K ints.
template <typename T, int VB>
IRNN_INLINE void active_k(const T* A, int64_t lda, int64_t K, RowBlock& blk, typename IntOf<T>::type* flags) {
  using S = Simd<T, VB>;
  using I = typename IntOf<T>::type;
  using ivec = typename S::ivec;
  constexpr I magnitude = std::numeric_limits<I>::max();  // every bit but the sign
  const T* a = A + blk.r * lda;
  int64_t k = 0;
  for (; k + S::L <= K; k += S::L) {
    ivec m = ivec{};
    for (int64_t r = 0; r < blk.size; ++r) {
      ivec v;
      std::memcpy(&v, a + r * lda + k, sizeof(v));
      m |= v;
    }
    m &= magnitude;
    std::memcpy(flags + k, &m, sizeof(m));
  }
  for (; k < K; ++k) {
    I m = 0;
    for (int64_t r = 0; r < blk.size; ++r) {
      I v;
      std::memcpy(&v, a + r * lda + k, sizeof(v));
      m |= v;
    }
    flags[k] = m & magnitude;
  }
  int64_t n = 0;
  for (k = 0; k < K; ++k) {
    blk.idx[n] = (int32_t)k;
    n += flags[k] != 0;
  }
  blk.nk = n;
}

// Row blocks of RBMAX rows, then one each of 4, 2, 1 for the remainder; at most R / RBMAX + 3 blocks.
template <int RBMAX>
IRNN_INLINE int64_t row_blocks(int64_t R, int64_t K, int32_t* idx, RowBlock* blocks) {
  int64_t n = 0, r = 0;
  auto add = [&](int64_t size) {
    blocks[n] = RowBlock{r, size, 0, idx + n * K};
    n += 1;
    r += size;
  };
  while (r + RBMAX <= R) add(RBMAX);
  for (int64_t size = 4; size >= 1; size /= 2)
    if (size < RBMAX && R - r >= size) add(size);
  return n;
}

template <typename T, int VB, int RBMAX, int CB>
IRNN_INLINE void col_block(const T* A, int64_t lda, const RowBlock* blocks, int64_t nblocks, const T* M, int64_t ldm,
                           T* C, int64_t j0) {
  for (int64_t b = 0; b < nblocks; ++b) {
    const RowBlock& blk = blocks[b];
    const T* a = A + blk.r * lda;
    T* c = C + blk.r * ldm;
    if (blk.size == RBMAX) gemm_tile<T, VB, RBMAX, CB>(a, lda, blk.idx, blk.nk, M, ldm, c, ldm, j0);
    if constexpr (RBMAX > 4) if (blk.size == 4) gemm_tile<T, VB, 4, CB>(a, lda, blk.idx, blk.nk, M, ldm, c, ldm, j0);
    if constexpr (RBMAX > 2) if (blk.size == 2) gemm_tile<T, VB, 2, CB>(a, lda, blk.idx, blk.nk, M, ldm, c, ldm, j0);
    if constexpr (RBMAX > 1) if (blk.size == 1) gemm_tile<T, VB, 1, CB>(a, lda, blk.idx, blk.nk, M, ldm, c, ldm, j0);
  }
}

// C[R, ldm] = A[R, :K] @ M[:K, :ldm]; ldm is a multiple of L and M's padding columns are zero.
// Column blocks outermost, so a [K, CB*L] panel of M stays in L1 while all row blocks use it.
// idx: workspace of (R / RBMAX + 3) * K ints; blocks: of R / RBMAX + 3; flags: of K.
template <typename T, int VB, int RBMAX, int CBMAX>
IRNN_INLINE void gemm_rows(const T* A, int64_t lda, int64_t K, const T* M, int64_t ldm, T* C, int64_t R,
                           int32_t* idx, RowBlock* blocks, typename IntOf<T>::type* flags) {
  constexpr int L = Simd<T, VB>::L;
  const int64_t nblocks = row_blocks<RBMAX>(R, K, idx, blocks);
  for (int64_t b = 0; b < nblocks; ++b) active_k<T, VB>(A, lda, K, blocks[b], flags);
  const int64_t nvec = ldm / L;
  int64_t c = 0;
  for (; c + CBMAX <= nvec; c += CBMAX) col_block<T, VB, RBMAX, CBMAX>(A, lda, blocks, nblocks, M, ldm, C, c * L);
  if constexpr (CBMAX > 2) {
    if (nvec - c >= 2) { col_block<T, VB, RBMAX, 2>(A, lda, blocks, nblocks, M, ldm, C, c * L); c += 2; }
  }
  if constexpr (CBMAX > 1) {
    if (nvec - c >= 1) { col_block<T, VB, RBMAX, 1>(A, lda, blocks, nblocks, M, ldm, C, c * L); c += 1; }
  }
}

template <typename T>
struct FwdArgs {
  // The input term of z_t: either precomputed, xp = x W_ih^T + b_ih + b_hh ([N,B,T,H], row stride H) ...
  const T* xp;
  // ... or, for narrow inputs (xp == null), computed in the epilogue from x [N,B,T,I] (contiguous),
  // wi = W_ih^T [N,I,HP] and bias = b_ih + b_hh [N,HP], both zero-padded.
  const T* x; const T* wi; const T* bias; int64_t I;
  T* out;        // [N,B,T,H], contiguous
  const T* wt;   // [N,H,HP]: W_hh^T, zero-padded columns
  int64_t B, T_, H, HP;
  bool relu;
  // tanh of a step's rows in place: [rows, H] at p with row stride `stride`. A call to ATen's vectorised
  // (SLEEF) tanh, the one nn.RNN uses; elementwise libm tanh is ~5x slower, and there is no vector tanh
  // without -ffast-math.
  void (*tanh_rows)(T* p, int64_t rows, int64_t stride, int64_t H);
};

template <typename T>
struct BwdArgs {
  const T* g; int64_t g_n, g_b, g_t;  // dL/dout [N,B,T,H] strides (last one 1) ...
  bool g_last;                        // ... or, if set, dL/dh_{T-1} only ([N,B,H]; g_t unused): a model
                                      // that reads only the last state gets no all-zero [N,B,T,H] gradient
  const T* h;                         // out [N,B,T,H], contiguous
  T* dz;                              // [N,B,T,H] result: dL/dz_t
  const T* wp;                        // [N,H,HP]: W_hh, zero-padded columns
  int64_t B, T_, H, HP;
  bool relu;
  // Optional [items, 2, HP]: per work item, the OR of the bit patterns of every dz row it wrote and of
  // every h row it read, which tells the weight-gradient GEMM which units are entirely zero.
  typename IntOf<T>::type* bits;
  // Optional [items, H, HP], zeroed: per work item, dW_hh = sum_t dz_t^T h_{t-1} over its rows, summed
  // inside the time loop while dz_t and h_{t-1} are in L1 (then no GEMM over all steps is needed).
  T* dw;
};

// Per-call scratch of a work item: the step's product [R, HP] (64-byte aligned) and the row blocks.
template <typename T, int RBMAX>
struct StepScratch {
  std::vector<T> prod_buf;
  std::vector<RowBlock> blocks;
  std::vector<int32_t> idx;
  std::vector<typename IntOf<T>::type> flags;
  std::vector<int32_t> units;  // the units of a step's dz that are nonzero in some row
  T* prod;
  StepScratch(int64_t R, int64_t H, int64_t HP)
      : prod_buf(R * HP + 64 / sizeof(T)), blocks(R / RBMAX + 3), idx(blocks.size() * H), flags(H), units(H) {
    const auto p = reinterpret_cast<std::uintptr_t>(prod_buf.data());
    prod = reinterpret_cast<T*>((p + 63) & ~std::uintptr_t(63));
  }
};

template <typename T, int VB, int RBMAX, int CBMAX>
IRNN_INLINE void forward_rows_impl(const FwdArgs<T>& a, int64_t n, int64_t r0, int64_t r1) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  const int64_t R = r1 - r0, H = a.H, HP = a.HP, TH = a.T_ * H, nvec = HP / S::L;
  const T* wt = a.wt + n * H * HP;
  const T* wi = a.xp ? nullptr : a.wi + n * a.I * HP;
  const T* bias = a.xp ? nullptr : a.bias + n * HP;
  StepScratch<T, RBMAX> ws(R, H, HP);
  T* z = ws.prod;  // [R, HP]: h_{t-1} W_hh^T for this step's rows
  for (int64_t t = 0; t < a.T_; ++t) {
    const int64_t row0 = (n * a.B + r0) * a.T_ + t;  // (n, b = r0, t) in [N,B,T,*]
    T* out = a.out + row0 * H;
    if (t + 1 < a.T_) prefetch_rows(out + H, R, TH, H, /*write=*/true);
    // h_{t-1} rows come from out; at t = 0 the state is zero and the product is skipped.
    if (t) gemm_rows<T, VB, RBMAX, CBMAX>(out - H, TH, H, wt, HP, z, R, ws.idx.data(), ws.blocks.data(),
                                          ws.flags.data());
    for (int64_t r = 0; r < R; ++r) {
      const T* zr = z + r * HP;
      T* orow = out + r * TH;
      if (a.xp) {
        const T* xr = a.xp + (row0 + r * a.T_) * H;
        int64_t j = 0;
        for (; j + S::L <= H; j += S::L) {
          vec pre = S::load(xr + j);
          if (t) pre = S::load(zr + j) + pre;
          S::store(orow + j, a.relu ? S::relu(pre) : pre);
        }
        for (; j < H; ++j) {
          const T pre = t ? zr[j] + xr[j] : xr[j];
          orow[j] = a.relu ? relu_s(pre) : pre;
        }
      } else {
        const T* xr = a.x + (row0 + r * a.T_) * a.I;
        for (int64_t v = 0, j = 0; v < nvec; ++v, j += S::L) {
          vec pre = S::load(bias + j);
          for (int64_t i = 0; i < a.I; ++i) pre += S::splat(xr[i]) * S::load(wi + i * HP + j);
          if (t) pre = S::load(zr + j) + pre;
          if (a.relu) pre = S::relu(pre);
          if (j + S::L <= H) {
            S::store(orow + j, pre);
          } else {
            for (int64_t l = 0; l < H - j; ++l) orow[j + l] = pre[l];
          }
        }
      }
    }
    if (!a.relu) a.tanh_rows(out, R, TH, H);
  }
}

template <typename T, int VB, int RBMAX, int CBMAX>
IRNN_INLINE void backward_rows_impl(const BwdArgs<T>& a, int64_t n, int64_t r0, int64_t r1, int64_t item) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  const int64_t R = r1 - r0, H = a.H, HP = a.HP, TH = a.T_ * H;
  typename IntOf<T>::type* dz_bits = a.bits ? a.bits + item * 2 * HP : nullptr;
  typename IntOf<T>::type* h_bits = a.bits ? dz_bits + HP : nullptr;
  const T* wp = a.wp + n * H * HP;
  StepScratch<T, RBMAX> ws(R, H, HP);
  T* e = ws.prod;  // [R, HP]: dz_{t+1} W_hh for this step's rows
  for (int64_t t = a.T_ - 1; t >= 0; --t) {
    const int64_t row0 = (n * a.B + r0) * a.T_ + t;
    const bool last = t == a.T_ - 1;
    const bool has_g = last || !a.g_last;  // whether dL/dout_t may be nonzero
    const T* g = a.g + n * a.g_n + r0 * a.g_b + (a.g_last ? 0 : t * a.g_t);
    const T* h = a.h + row0 * H;
    T* dz = a.dz + row0 * H;
    if (t > 0) {
      prefetch_rows(h - H, R, TH, H, /*write=*/false);
      if (!a.g_last) prefetch_rows(g - a.g_t, R, a.g_b, H, /*write=*/false);
      prefetch_rows(dz - H, R, TH, H, /*write=*/true);
    }
    // dL/dh_t = dL/dout_t + dz_{t+1} W_hh; nothing flows in from beyond the last step.
    if (!last) gemm_rows<T, VB, RBMAX, CBMAX>(dz + H, TH, H, wp, HP, e, R, ws.idx.data(), ws.blocks.data(),
                                              ws.flags.data());
    for (int64_t r = 0; r < R; ++r) {
      const T* er = e + r * HP;
      const T* gr = g + r * a.g_b;
      const T* hr = h + r * TH;
      T* dr = dz + r * TH;
      int64_t j = 0;
      for (; j + S::L <= H; j += S::L) {
        const vec dh = last ? S::load(gr + j) : has_g ? S::load(er + j) + S::load(gr + j) : S::load(er + j);
        const vec hv = S::load(hr + j);
        const vec d = a.relu ? S::relu_grad(dh, hv) : dh * (S::splat(T(1)) - hv * hv);
        S::store(dr + j, d);
        if (dz_bits) {
          ivec bd, bh;
          std::memcpy(&bd, dz_bits + j, sizeof(bd));
          std::memcpy(&bh, h_bits + j, sizeof(bh));
          bd |= (ivec)d;
          bh |= (ivec)hv;
          std::memcpy(dz_bits + j, &bd, sizeof(bd));
          std::memcpy(h_bits + j, &bh, sizeof(bh));
        }
      }
      for (; j < H; ++j) {
        const T dh = last ? gr[j] : has_g ? er[j] + gr[j] : er[j];
        const T d = relu_grad_s(dh, hr[j]);
        dr[j] = a.relu ? d : tanh_grad_s(dh, hr[j]);
        if (dz_bits) {
          typename IntOf<T>::type bd, bh;
          std::memcpy(&bd, dr + j, sizeof(bd));
          std::memcpy(&bh, hr + j, sizeof(bh));
          dz_bits[j] |= bd;
          h_bits[j] |= bh;
        }
      }
    }
    // dW_hh += dz_t^T h_{t-1} over this item's rows, for the units whose dz_t is not zero in every row.
    if (a.dw && t > 0) {
      RowBlock all{0, R, 0, ws.units.data()};
      active_k<T, VB>(dz, TH, H, all, ws.flags.data());
      rank_update_rows<T, VB, RBMAX, CBMAX>(dz, TH, all.idx, all.nk, h - H, TH, R, a.dw + item * H * HP, HP);
    }
  }
}

// For one model, over its rows (a fixed order, so the sums do not depend on the thread count):
//   db[j] = sum_row dz[row, j],  dwi[i, j] = sum_row x[row, i] dz[row, j]   (dwi only if I <= kIMax).
// db and dwi are [HP] and [I, HP]. A vector of columns at a time, its sums kept in registers over all
// rows, in four interleaved partial sums (one chain of dependent adds would be latency-bound).
constexpr int64_t kIMax = 8;

// The sums for the L columns starting at j; lanes from `keep` on are written out.
template <typename T, int VB, int NI>
IRNN_INLINE void column_sums(const T* dz, const T* x, int64_t rows, int64_t H, int64_t I, int64_t HP, int64_t j,
                             int keep, T* db, T* dwi) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  constexpr int NW = NI > 0 ? NI : 1;
  vec b[4], w[4][NW];
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u) {
    b[u] = S::zero();
#pragma GCC unroll 8
    for (int i = 0; i < NW; ++i) w[u][i] = S::zero();
  }
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const vec v = S::load(dz + (r + u) * H + j);
      b[u] += v;
#pragma GCC unroll 8
      for (int i = 0; i < NI; ++i) w[u][i] += S::splat(x[(r + u) * I + i]) * v;
    }
  }
  for (; r < rows; ++r) {
    const vec v = S::load(dz + r * H + j);
    b[0] += v;
#pragma GCC unroll 8
    for (int i = 0; i < NI; ++i) w[0][i] += S::splat(x[r * I + i]) * v;
  }
  const vec sb = (b[0] + b[1]) + (b[2] + b[3]);
  for (int l = keep; l < S::L; ++l) db[j + l] = sb[l];
#pragma GCC unroll 8
  for (int i = 0; i < NI; ++i) {
    const vec sw = (w[0][i] + w[1][i]) + (w[2][i] + w[3][i]);
    for (int l = keep; l < S::L; ++l) dwi[i * HP + j + l] = sw[l];
  }
}

template <typename T, int VB, int NI>
IRNN_INLINE void input_grads_ni(const T* dz, const T* x, int64_t rows, int64_t H, int64_t HP, int64_t I, T* db,
                                T* dwi) {
  constexpr int L = Simd<T, VB>::L;
  if (H < L) {  // narrower than one vector: plain loops, same order
    for (int64_t j = 0; j < H; ++j) {
      T sb[4] = {0, 0, 0, 0}, sw[4][kIMax] = {};
      for (int64_t r = 0; r < rows; ++r) {
        const int u = (r < rows - rows % 4) ? int(r % 4) : 0;
        const T v = dz[r * H + j];
        sb[u] += v;
        for (int i = 0; i < NI; ++i) sw[u][i] += x[r * I + i] * v;
      }
      db[j] = (sb[0] + sb[1]) + (sb[2] + sb[3]);
      for (int i = 0; i < NI; ++i) dwi[i * HP + j] = (sw[0][i] + sw[1][i]) + (sw[2][i] + sw[3][i]);
    }
    return;
  }
  int64_t j = 0;
  for (; j + L <= H; j += L) column_sums<T, VB, NI>(dz, x, rows, H, I, HP, j, 0, db, dwi);
  // The last columns: a whole vector ending at column H (overlapping the previous one, so no read goes
  // past the row), keeping only its new lanes.
  if (j < H) column_sums<T, VB, NI>(dz, x, rows, H, I, HP, H - L, int(L - (H - j)), db, dwi);
}

template <typename T, int VB>
IRNN_INLINE void input_grads_impl(const T* dz, const T* x, int64_t rows, int64_t H, int64_t HP, int64_t I, T* db,
                                  T* dwi) {
  switch (dwi ? I : 0) {
    case 0: return input_grads_ni<T, VB, 0>(dz, x, rows, H, HP, I, db, dwi);
    case 1: return input_grads_ni<T, VB, 1>(dz, x, rows, H, HP, I, db, dwi);
    case 2: return input_grads_ni<T, VB, 2>(dz, x, rows, H, HP, I, db, dwi);
    case 3: return input_grads_ni<T, VB, 3>(dz, x, rows, H, HP, I, db, dwi);
    case 4: return input_grads_ni<T, VB, 4>(dz, x, rows, H, HP, I, db, dwi);
    case 5: return input_grads_ni<T, VB, 5>(dz, x, rows, H, HP, I, db, dwi);
    case 6: return input_grads_ni<T, VB, 6>(dz, x, rows, H, HP, I, db, dwi);
    case 7: return input_grads_ni<T, VB, 7>(dz, x, rows, H, HP, I, db, dwi);
    default: return input_grads_ni<T, VB, 8>(dz, x, rows, H, HP, I, db, dwi);
  }
}

// One instantiation per target; the micro-kernel is inlined into each and compiled for its ISA.
#if IRNN_X86
#define IRNN_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#define IRNN_AVX2 __attribute__((target("avx2,fma")))
// Register blocking of the AVX-512 kernel: RB rows x CB vectors of accumulators (32 zmm registers).
#ifndef IRNN_RB512
#define IRNN_RB512 8
#endif
#ifndef IRNN_CB512
#define IRNN_CB512 3
#endif
template <typename T> IRNN_AVX512 void forward_rows_avx512(const FwdArgs<T>& a, int64_t n, int64_t r0, int64_t r1) {
  forward_rows_impl<T, 64, IRNN_RB512, IRNN_CB512>(a, n, r0, r1);
}
template <typename T> IRNN_AVX512 void backward_rows_avx512(const BwdArgs<T>& a, int64_t n, int64_t r0, int64_t r1,
                                                           int64_t item) {
  backward_rows_impl<T, 64, IRNN_RB512, IRNN_CB512>(a, n, r0, r1, item);
}
template <typename T> IRNN_AVX512 void input_grads_avx512(const T* dz, const T* x, int64_t rows, int64_t H, int64_t HP,
                                                         int64_t I, T* db, T* dwi) {
  input_grads_impl<T, 64>(dz, x, rows, H, HP, I, db, dwi);
}
template <typename T> IRNN_AVX512 void rows_product_avx512(const T* A, int64_t lda, const int32_t* units, int64_t nu,
                                                          const T* M, int64_t ldm, int64_t R, T* C, int64_t ldc) {
  rank_update_rows<T, 64, IRNN_RB512, IRNN_CB512>(A, lda, units, nu, M, ldm, R, C, ldc);
}
template <typename T> IRNN_AVX512 void rows_gemm_avx512(const T* A, int64_t lda, int64_t K, const T* M, int64_t ldm,
                                                       const T* bias, int64_t W, T* C, int64_t ldc, int64_t r0,
                                                       int64_t r1) {
  rows_gemm_impl<T>(A, lda, K, M, ldm, bias, W, C, ldc, r0, r1);
}
template <typename T> IRNN_AVX2 void rows_gemm_avx2(const T* A, int64_t lda, int64_t K, const T* M, int64_t ldm,
                                                   const T* bias, int64_t W, T* C, int64_t ldc, int64_t r0, int64_t r1) {
  rows_gemm_impl<T>(A, lda, K, M, ldm, bias, W, C, ldc, r0, r1);
}
template <typename T> IRNN_AVX2 void forward_rows_avx2(const FwdArgs<T>& a, int64_t n, int64_t r0, int64_t r1) {
  forward_rows_impl<T, 32, 4, 3>(a, n, r0, r1);
}
template <typename T> IRNN_AVX2 void backward_rows_avx2(const BwdArgs<T>& a, int64_t n, int64_t r0, int64_t r1,
                                                       int64_t item) {
  backward_rows_impl<T, 32, 4, 3>(a, n, r0, r1, item);
}
template <typename T> IRNN_AVX2 void rows_product_avx2(const T* A, int64_t lda, const int32_t* units, int64_t nu,
                                                      const T* M, int64_t ldm, int64_t R, T* C, int64_t ldc) {
  rank_update_rows<T, 32, 4, 3>(A, lda, units, nu, M, ldm, R, C, ldc);
}
template <typename T> IRNN_AVX2 void input_grads_avx2(const T* dz, const T* x, int64_t rows, int64_t H, int64_t HP,
                                                     int64_t I, T* db, T* dwi) {
  input_grads_impl<T, 32>(dz, x, rows, H, HP, I, db, dwi);
}
#endif
template <typename T> void forward_rows_generic(const FwdArgs<T>& a, int64_t n, int64_t r0, int64_t r1) {
  forward_rows_impl<T, 16, 4, 3>(a, n, r0, r1);
}
template <typename T> void backward_rows_generic(const BwdArgs<T>& a, int64_t n, int64_t r0, int64_t r1, int64_t item) {
  backward_rows_impl<T, 16, 4, 3>(a, n, r0, r1, item);
}
template <typename T> void rows_gemm_generic(const T* A, int64_t lda, int64_t K, const T* M, int64_t ldm,
                                            const T* bias, int64_t W, T* C, int64_t ldc, int64_t r0, int64_t r1) {
  rows_gemm_impl<T>(A, lda, K, M, ldm, bias, W, C, ldc, r0, r1);
}
template <typename T> void rows_product_generic(const T* A, int64_t lda, const int32_t* units, int64_t nu, const T* M,
                                                int64_t ldm, int64_t R, T* C, int64_t ldc) {
  rank_update_rows<T, 16, 4, 3>(A, lda, units, nu, M, ldm, R, C, ldc);
}
template <typename T> void input_grads_generic(const T* dz, const T* x, int64_t rows, int64_t H, int64_t HP, int64_t I,
                                               T* db, T* dwi) {
  input_grads_impl<T, 16>(dz, x, rows, H, HP, I, db, dwi);
}

Isa detect_isa() {
#if IRNN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kGeneric;
}

Isa resolve_isa(int64_t requested) {
  static const Isa best = detect_isa();
  if (requested == kAuto) return best;
  TORCH_CHECK(requested >= kGeneric && requested <= kAvx512, "fused_rnn: unknown isa ", requested);
  TORCH_CHECK(requested <= best, "fused_rnn: isa ", requested, " is not supported by this CPU (best is ",
              (int64_t)best, ")");
  return static_cast<Isa>(requested);
}

int64_t vector_bytes(Isa isa) { return isa == kAvx512 ? 64 : isa == kAvx2 ? 32 : 16; }

// Runs body(lo, hi) over [begin, end) with ATen's threads. Worker threads get the caller's flush-to-zero /
// denormals-are-zero bits, so torch.set_flush_denormal applies to them too.
template <typename F>
void parallel_ftz(int64_t begin, int64_t end, int64_t grain, const F& body) {
#if IRNN_X86
  const unsigned csr = _mm_getcsr() & 0x8040u;  // FTZ | DAZ
#endif
  at::parallel_for(begin, end, grain, [&](int64_t lo, int64_t hi) {
#if IRNN_X86
    const unsigned saved = _mm_getcsr();
    _mm_setcsr((saved & ~0x8040u) | csr);
#endif
    body(lo, hi);
#if IRNN_X86
    _mm_setcsr(saved);
#endif
  });
}

// Runs body(n, r0, r1, item) over the N x `groups` work items: models x fixed slices of the batch rows.
template <typename F>
void for_rows(int64_t N, int64_t B, int64_t groups, const F& body) {
  const int64_t per = (B + groups - 1) / groups;
  parallel_ftz(0, N * groups, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t n = i / groups, r0 = (i % groups) * per, r1 = std::min(B, r0 + per);
      if (r0 < r1) body(n, r0, r1, i);
    }
  });
}

// Runs fn(n) for each model n < N, models in parallel.
template <typename F>
void for_models(int64_t N, const F& fn) {
  parallel_ftz(0, N, 1, [&](int64_t lo, int64_t hi) {
    at::NoGradGuard no_grad;  // grad mode is per thread: the caller's guard does not reach the workers
    for (int64_t n = lo; n < hi; ++n) fn(n);
  });
}

// C_n[:R, :W] = bias_n + A_n[:R, :K] M_n[:K, :W] for each model n (model strides *_n, rows in parallel):
// rows_gemm_impl, so the numbers do not depend on the thread count (unlike a BLAS call).
template <typename T>
void gemm_rows(Isa isa, int64_t N, int64_t R, int64_t K, int64_t W, const T* A, int64_t a_n, int64_t lda,
               const T* M, int64_t m_n, int64_t ldm, const T* bias, int64_t bias_n, T* C, int64_t c_n, int64_t ldc) {
  auto fn = rows_gemm_generic<T>;
#if IRNN_X86
  if (isa == kAvx512) fn = rows_gemm_avx512<T>;
  if (isa == kAvx2) fn = rows_gemm_avx2<T>;
#endif
  parallel_ftz(0, N * R, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi;) {
      const int64_t n = i / R, r0 = i % R, r1 = std::min(R, r0 + (hi - i));
      fn(A + n * a_n, lda, K, M + n * m_n, ldm, bias ? bias + n * bias_n : nullptr, W, C + n * c_n, ldc, r0, r1);
      i += r1 - r0;
    }
  });
}

// Scratch that lives only inside one call (xp, dz, gathered columns) comes from a per-thread cache, so
// steady-state training does not map, fault in and unmap fresh megabytes on every call (under load
// that cost ~1 ms per training step). Requests above kWorkspaceCap bytes allocate normally.
constexpr size_t kWorkspaceCap = size_t(64) << 20;

at::Tensor workspace(int slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local std::vector<unsigned char> cache[3];
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * options.dtype().itemsize() + 64;
  if (bytes > kWorkspaceCap) return at::empty(sizes, options);
  std::vector<unsigned char>& buf = cache[slot];
  if (buf.size() < bytes) buf.resize(bytes);
  const auto p = reinterpret_cast<std::uintptr_t>(buf.data());
  return at::from_blob(reinterpret_cast<void*>((p + 63) & ~std::uintptr_t(63)), sizes, options);
}

// Zero-padded [N, rows, HP] copy of src [N, rows, cols] (any strides), optionally transposed (then
// src is [N, cols, rows]); plain loops, as this runs every call and is tiny next to the time loop.
template <typename T>
std::vector<T> pack(const at::Tensor& src, bool transpose, int64_t HP) {
  const int64_t N = src.size(0), rows = src.size(transpose ? 2 : 1), cols = src.size(transpose ? 1 : 2);
  const int64_t s0 = src.stride(0), sr = src.stride(transpose ? 2 : 1), sc = src.stride(transpose ? 1 : 2);
  const T* p = src.data_ptr<T>();
  std::vector<T> out(N * rows * HP + 64 / sizeof(T), T(0));
  T* o = out.data();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) o[(n * rows + r) * HP + c] = p[n * s0 + r * sr + c * sc];
  return out;
}

int64_t padded(int64_t H, Isa isa, int64_t element_size) {
  const int64_t L = vector_bytes(isa) / element_size;
  return (H + L - 1) / L * L;
}

// Single-model calls ([B,T,I], [H,I], ...) are stacked ones with N = 1.
at::Tensor stacked(const at::Tensor& t, bool single) { return single ? t.unsqueeze(0) : t; }

void check_inputs(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                  const at::Tensor& b_hh) {
  for (const at::Tensor* t : {&x, &w_ih, &w_hh, &b_ih, &b_hh}) {
    TORCH_CHECK(t->device().is_cpu(), "fused_rnn: CPU tensors only, got ", t->device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "fused_rnn: all tensors must share x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fused_rnn: float32 or float64 only, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "fused_rnn: x must be [B, T, I] or [N, B, T, I], got ", x.sizes());
  const int64_t N = x.size(0), I = x.size(3), H = w_hh.size(-1);
  TORCH_CHECK(w_ih.dim() == 3 && w_ih.size(0) == N && w_ih.size(1) == H && w_ih.size(2) == I,
              "fused_rnn: w_ih must be [N, H, I] = [", N, ", ", H, ", ", I, "], got ", w_ih.sizes());
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(0) == N && w_hh.size(1) == H,
              "fused_rnn: w_hh must be [N, H, H], got ", w_hh.sizes());
  TORCH_CHECK(b_ih.dim() == 2 && b_ih.size(0) == N && b_ih.size(1) == H, "fused_rnn: b_ih must be [N, H], got ",
              b_ih.sizes());
  TORCH_CHECK(b_hh.dim() == 2 && b_hh.size(0) == N && b_hh.size(1) == H, "fused_rnn: b_hh must be [N, H], got ",
              b_hh.sizes());
}

// Stacks of more models than this skip the unit activity bits (one dense product per model).
constexpr int64_t kCompactMaxModels = 64;

// More than any HP - H (one vector of the widest ISA, 64 bytes, of the smallest type).
constexpr int64_t kOutPad = 16;

// t (contiguous) followed by at least kOutPad readable elements, for kernels that read rows a whole vector
// wide: t itself where its storage has them (fused_forward's states), else a zero-padded copy.
template <typename T>
at::Tensor with_tail(const at::Tensor& t_) {
  const at::Tensor t = t_.contiguous();
  if ((t.storage_offset() + t.numel() + kOutPad) * int64_t(sizeof(T)) <= int64_t(t.storage().nbytes())) return t;
  at::Tensor buf = at::zeros({t.numel() + kOutPad}, t.options());
  buf.narrow(0, 0, t.numel()).copy_(t.reshape(-1));
  return buf.narrow(0, 0, t.numel()).view(t.sizes());
}

template <typename T>
using RowsProduct = void (*)(const T*, int64_t, const int32_t*, int64_t, const T*, int64_t, int64_t, T*, int64_t);

// out[n] [H, W] = A[n][:R]^T M[n][:R, :W] for each model n, summed row by row in order whatever the thread
// count (a BLAS splits such a long reduction, over batch x time, between threads: its bits would follow
// the thread count). A [N, *, lda] and M [N, *, ldm] start at their models' first pair of rows, model
// strides a_n, m_n; M's rows are read WP wide (W rounded up to a vector), so M must be readable that far
// past its last row (with_tail). Units u whose A column is zero in every row (bits [N, 2, HP], first
// half; null: none known) add exact zeros and are skipped: for ReLU networks that is most of them.
template <typename T>
at::Tensor rows_product(RowsProduct<T> fn, int64_t N, const T* A, int64_t a_n, int64_t lda, const T* M, int64_t m_n,
                        int64_t ldm, int64_t R, int64_t H, int64_t W, int64_t WP, const typename IntOf<T>::type* bits,
                        int64_t HP, const at::TensorOptions& opt) {
  using I = typename IntOf<T>::type;
  at::Tensor out = at::zeros({N, H, W}, opt);
  if (R <= 0) return out;
  for_models(N, [&](int64_t n) {
    std::vector<int32_t> units;
    for (int64_t u = 0; u < H; ++u)
      if (!bits || (bits[2 * n * HP + u] & std::numeric_limits<I>::max())) units.push_back((int32_t)u);
    if (units.empty()) return;
    std::vector<T> c(H * WP, T(0));
    fn(A + n * a_n, lda, units.data(), (int64_t)units.size(), M + n * m_n, ldm, R, c.data(), WP);
    T* o = out.data_ptr<T>() + n * H * W;
    for (int64_t u = 0; u < H; ++u) std::copy_n(c.data() + u * WP, W, o + u * W);
  });
  return out;
}

template <typename T>
void tanh_rows(T* p, int64_t rows, int64_t stride, int64_t H) {
  at::from_blob(p, {rows, H}, {stride, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value)).tanh_();
}

// tanh_rows for float without ATen's per-call dispatch (a tensor and an op call per step and row group):
// MKL's vmsTanh on each row as ATen would call it, so the numbers are bitwise torch.tanh's (tested against
// IRNN_FUSED_TANH=aten).
// The rows are gathered into one buffer for a single call: each call costs ~0.1 us of set-up, which at one
// call per row was a fifth of a tanh RNN's step at B=32 (vmsTanh's results are elementwise: tested).
void tanh_rows_mkl(float* p, int64_t rows, int64_t stride, int64_t H) {
  thread_local std::vector<float> buf;
  buf.resize(rows * H);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(buf.data() + r * H, p + r * stride, H * sizeof(float));
  vmsTanh((int)(rows * H), buf.data(), buf.data(), kVmlHa | kVmlFtzdazOff | kVmlErrmodeIgnore);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(p + r * stride, buf.data() + r * H, H * sizeof(float));
}

// The tanh the forward calls: the one ATen's tanh_ would run on this CPU, without its dispatch where
// SLEEF is at hand; IRNN_FUSED_TANH=aten forces the ATen call (the A/B reference of the tests).
// The tanh the forward calls: torch.tanh's own numbers, without ATen's dispatch where MKL's vmsTanh is at
// hand; IRNN_FUSED_TANH=aten forces the ATen call (the A/B reference of the tests and benchmarks).
template <typename T>
auto pick_tanh_rows() -> void (*)(T*, int64_t, int64_t, int64_t) {
  if constexpr (std::is_same_v<T, float>) {
    static const bool aten = [] {
      const char* v = std::getenv("IRNN_FUSED_TANH");
      return v && std::strcmp(v, "aten") == 0;
    }();
    if (!aten && vmsTanh) return &tanh_rows_mkl;
  }
  return &tanh_rows<T>;
}

template <typename T>
void run_forward(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                 const at::Tensor& b_hh, at::Tensor& out, bool relu, int64_t groups, Isa isa) {
  const int64_t N = x.size(0), B = x.size(1), T_ = x.size(2), I = x.size(3), H = w_hh.size(2);
  const int64_t HP = padded(H, isa, sizeof(T));
  const std::vector<T> wt = pack<T>(w_hh, /*transpose=*/true, HP);  // [N, H, HP] = W_hh^T
  std::vector<T> wi, bias;
  at::Tensor xp;
  if (I <= kIMax) {
    wi = pack<T>(w_ih, /*transpose=*/true, HP);  // [N, I, HP] = W_ih^T
    bias.assign(N * HP, T(0));
    const at::Tensor bi = b_ih.contiguous(), bh = b_hh.contiguous();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < H; ++j) bias[n * HP + j] = bi.data_ptr<T>()[n * H + j] + bh.data_ptr<T>()[n * H + j];
  } else {
    xp = workspace(0, {N, B * T_, H}, x.options());
    const at::Tensor bias_sum = at::add(b_ih, b_hh).contiguous(), wit = w_ih.transpose(1, 2).contiguous();
    gemm_rows<T>(isa, N, B * T_, I, H, x.data_ptr<T>(), B * T_ * I, I, wit.data_ptr<T>(), I * H, H,
                 bias_sum.data_ptr<T>(), H, xp.data_ptr<T>(), B * T_ * H, H);
  }
  FwdArgs<T> a{xp.defined() ? xp.data_ptr<T>() : nullptr, x.data_ptr<T>(), wi.data(), bias.data(), I,
               out.data_ptr<T>(), wt.data(), B, T_, H, HP, relu, pick_tanh_rows<T>()};
  auto fn = forward_rows_generic<T>;
#if IRNN_X86
  if (isa == kAvx512) fn = forward_rows_avx512<T>;
  if (isa == kAvx2) fn = forward_rows_avx2<T>;
#endif
  for_rows(N, B, groups, [&](int64_t n, int64_t r0, int64_t r1, int64_t) { fn(a, n, r0, r1); });
}

// out: every hidden state, [B,T,H] or [N,B,T,H] like x, contiguous.
at::Tensor fused_forward(const at::Tensor& x_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                         const at::Tensor& b_ih_, const at::Tensor& b_hh_, bool relu, int64_t groups, int64_t isa_req) {
  at::NoGradGuard no_grad;
  const bool single = x_.dim() == 3;
  const at::Tensor x = stacked(x_, single).contiguous(), w_ih = stacked(w_ih_, single),
                   w_hh = stacked(w_hh_, single), b_ih = stacked(b_ih_, single), b_hh = stacked(b_hh_, single);
  check_inputs(x, w_ih, w_hh, b_ih, b_hh);
  const Isa isa = resolve_isa(isa_req);
  groups = std::max<int64_t>(1, std::min(groups, x.size(1)));
  // kOutPad zeros after the states, so that the backward may read their rows HP wide (with_tail) without
  // copying them.
  const int64_t numel = x.size(0) * x.size(1) * x.size(2) * w_hh.size(2);
  at::Tensor buf = at::empty({numel + kOutPad}, x.options());
  buf.narrow(0, numel, kOutPad).zero_();
  at::Tensor out = buf.narrow(0, 0, numel).view({x.size(0), x.size(1), x.size(2), w_hh.size(2)});
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_rnn_forward",
                               [&] { run_forward<scalar_t>(x, w_ih, w_hh, b_ih, b_hh, out, relu, groups, isa); });
  }
  return single ? out.squeeze(0) : out;
}

// db [N, H] and, if dwp holds them, dW_ih [N, H, I] (else empty) from input_grads' zero-padded
// per-model sums: dbp [N, HP] and dwp [N, I, HP].
template <typename T>
std::pair<at::Tensor, at::Tensor> unpack_input_grads(const std::vector<T>& dbp, const std::vector<T>& dwp, int64_t N,
                                                     int64_t H, int64_t I, int64_t HP, const at::TensorOptions& opt) {
  at::Tensor db = at::empty({N, H}, opt), dw_ih = at::empty({0}, opt);
  T* dbo = db.data_ptr<T>();
  for (int64_t n = 0; n < N; ++n) std::copy_n(dbp.data() + n * HP, H, dbo + n * H);
  if (!dwp.empty()) {
    dw_ih = at::empty({N, H, I}, opt);
    T* o = dw_ih.data_ptr<T>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < H; ++j)
        for (int64_t i = 0; i < I; ++i) o[(n * H + j) * I + i] = dwp[(n * I + i) * HP + j];
  }
  return {db, dw_ih};
}

// In-loop dW_hh (BwdArgs::dw) reads a row of h_{t-1} HP wide: the HP - H values past its end belong to
// the next row, or to the tail after the states (with_tail). Partials take at most this many bytes (one
// [H, HP] per work item); beyond it dW_hh is one product over all rows after the loop (rows_product).
constexpr size_t kInLoopDwBytes = size_t(64) << 20;

// dW_hh [N, H, H] from the work items' partials [N * groups, H, HP]: model n's groups summed in order.
template <typename T>
at::Tensor sum_partials(const T* partials, int64_t N, int64_t groups, int64_t H, int64_t HP,
                        const at::TensorOptions& opt) {
  at::Tensor dw = at::empty({N, H, H}, opt);
  T* o = dw.data_ptr<T>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < H; ++j)
      for (int64_t k = 0; k < H; ++k) {
        T v = partials[((n * groups) * H + j) * HP + k];
        for (int64_t c = 1; c < groups; ++c) v += partials[((n * groups + c) * H + j) * HP + k];
        o[(n * H + j) * H + k] = v;
      }
  return dw;
}

// The backward of a stack of models, one model at a time from its time loop to its dW_hh, while that
// model's dz and states are still in cache (phase by phase over all models, a 16-model step at T=150
// streams ~45 MB through memory and took 1.6x as long per model as a single model's backward).
// For stacks (parallel over models; each model's row groups in order), without dx, and with narrow inputs.
template <typename T, typename Fn, typename Ig>
std::vector<at::Tensor> backward_by_model(const BwdArgs<T>& a, Fn fn, Ig ig, RowsProduct<T> rp, const at::Tensor& x,
                                          bool need_w_ih, int64_t groups) {
  using I_t = typename IntOf<T>::type;
  const int64_t N = x.size(0), B = a.B, T_ = a.T_, H = a.H, HP = a.HP, I = x.size(3);
  const at::TensorOptions opt = x.options();
  const at::Tensor xc = x.contiguous();
  at::Tensor dw_hh = a.dw ? at::Tensor() : at::empty({N, H, H}, opt);
  std::vector<T> dbp(N * HP), dwp(need_w_ih ? N * I * HP : 0);
  const int64_t per = (B + groups - 1) / groups;  // the row groups of for_rows, so the partials are the same
  for_models(N, [&](int64_t n) {
    for (int64_t g = 0; g < groups && g * per < B; ++g) fn(a, n, g * per, std::min(B, (g + 1) * per), n * groups + g);
    T* dzn = a.dz + n * B * T_ * H;
    ig(dzn, xc.data_ptr<T>() + n * B * T_ * I, B * T_, H, HP, I, dbp.data() + n * HP,
       dwp.empty() ? nullptr : dwp.data() + n * I * HP);
    if (a.dw) return;  // dW_hh was summed in the time loop
    I_t* bits_n = a.bits ? a.bits + n * groups * 2 * HP : nullptr;  // model n's unit activity: OR of its groups'
    for (int64_t g = 1; g < groups && bits_n; ++g)
      for (int64_t k = 0; k < 2 * HP; ++k) bits_n[k] |= bits_n[g * 2 * HP + k];
    for (int64_t b = 0; b < B; ++b) std::fill_n(dzn + b * T_ * H, H, T(0));  // see run_backward
    dw_hh.select(0, n).copy_(rows_product<T>(rp, 1, dzn + H, 0, H, a.h + n * B * T_ * H, 0, H, B * T_ - 1, H, H, HP,
                                             bits_n, HP, opt)[0]);
  });
  if (a.dw) dw_hh = sum_partials<T>(a.dw, N, groups, H, HP, opt);
  auto [db, dw_ih] = unpack_input_grads<T>(dbp, dwp, N, H, I, HP, opt);
  return {at::empty({0}, opt), dw_ih, dw_hh, db};
}

template <typename T>
std::vector<at::Tensor> run_backward(const at::Tensor& gout, const at::Tensor& x, const at::Tensor& w_ih,
                                     const at::Tensor& w_hh, const at::Tensor& out_, bool relu, bool need_x,
                                     bool need_w_ih, int64_t groups, Isa isa, bool gemm_dw) {
  using I_t = typename IntOf<T>::type;
  const int64_t N = out_.size(0), B = out_.size(1), T_ = out_.size(2), H = out_.size(3), I = w_ih.size(2);
  const int64_t HP = padded(H, isa, sizeof(T));
  const at::TensorOptions opt = out_.options();
  const at::Tensor out = with_tail<T>(out_);  // its rows are read HP wide
  at::Tensor dz = workspace(0, {N, B, T_, H}, opt);
  const std::vector<T> wp = pack<T>(w_hh, /*transpose=*/false, HP);  // [N, H, HP] = W_hh
  const bool in_loop = !gemm_dw && size_t(N * groups * H * HP) * sizeof(T) <= kInLoopDwBytes;
  at::Tensor partials;
  if (in_loop) partials = workspace(1, {N * groups * H * HP}, opt).zero_();
  const bool compact = !in_loop && N <= kCompactMaxModels;
  std::vector<I_t> bits(compact ? N * groups * 2 * HP : 0, 0);
  const bool g_last = gout.dim() == 3;  // [N,B,H]: the gradient of the last state only
  BwdArgs<T> a{gout.data_ptr<T>(), gout.stride(0), gout.stride(1), g_last ? 0 : gout.stride(2), g_last,
               out.data_ptr<T>(), dz.data_ptr<T>(), wp.data(), B, T_, H, HP, relu, compact ? bits.data() : nullptr,
               in_loop ? partials.data_ptr<T>() : nullptr};
  auto fn = backward_rows_generic<T>;
  auto ig = input_grads_generic<T>;
  RowsProduct<T> rp = rows_product_generic<T>;
#if IRNN_X86
  if (isa == kAvx512) fn = backward_rows_avx512<T>, ig = input_grads_avx512<T>, rp = rows_product_avx512<T>;
  if (isa == kAvx2) fn = backward_rows_avx2<T>, ig = input_grads_avx2<T>, rp = rows_product_avx2<T>;
#endif
  if ((compact || in_loop) && N > 1 && !need_x && I <= kIMax)
    return backward_by_model<T>(a, fn, ig, rp, x, need_w_ih, groups);
  for_rows(N, B, groups, [&](int64_t n, int64_t r0, int64_t r1, int64_t item) { fn(a, n, r0, r1, item); });
  // Merge the work items' unit activity per model (an OR: the same whatever the split).
  for (int64_t n = 0; n < N && compact; ++n)
    for (int64_t c = 1; c < groups; ++c)
      for (int64_t k = 0; k < 2 * HP; ++k) bits[n * groups * 2 * HP + k] |= bits[(n * groups + c) * 2 * HP + k];
  for (int64_t n = 1; n < N && compact; ++n)  // compact to [N, 2, HP]
    std::copy_n(bits.data() + n * groups * 2 * HP, 2 * HP, bits.data() + n * 2 * HP);

  const at::Tensor xc = x.contiguous();
  at::Tensor dx = at::empty({0}, opt);
  const bool small = I <= kIMax;
  std::vector<T> dbp(N * HP), dwp(small && need_w_ih ? N * I * HP : 0);
  for_models(N, [&](int64_t n) {
    ig(dz.data_ptr<T>() + n * B * T_ * H, xc.data_ptr<T>() + n * B * T_ * I, B * T_, H, HP, I, dbp.data() + n * HP,
       dwp.empty() ? nullptr : dwp.data() + n * I * HP);
  });
  auto [db, dw_ih] = unpack_input_grads<T>(dbp, dwp, N, H, I, HP, opt);
  if (need_w_ih && !small) {  // wide inputs: dW_ih = dz^T x over all rows, x's rows read IP wide
    const at::Tensor xt = with_tail<T>(xc);
    dw_ih = rows_product<T>(rp, N, dz.data_ptr<T>(), B * T_ * H, H, xt.data_ptr<T>(), B * T_ * I, I, B * T_, H, I,
                            padded(I, isa, sizeof(T)), nullptr, HP, opt);
  }
  if (need_x) {  // dx = dz W_ih, row by row (gemm_rows: the same numbers on any thread count)
    dx = at::empty({N, B, T_, I}, opt);
    const at::Tensor wi = w_ih.contiguous();
    gemm_rows<T>(isa, N, B * T_, H, I, dz.data_ptr<T>(), B * T_ * H, H, wi.data_ptr<T>(), H * I, I, nullptr, 0,
                 dx.data_ptr<T>(), B * T_ * I, I);
  }
  if (in_loop) return {dx, dw_ih, sum_partials<T>(partials.data_ptr<T>(), N, groups, H, HP, opt), db};
  // Otherwise dW_hh as one product over all flat rows: row i of dz pairs with row i - 1 of out, which is
  // (b, t-1) except at t = 0, where it is the previous sequence's last state; zeroing dz's t = 0 rows (dz is
  // scratch, and db, dw_ih, dx are done) makes those pairs add exact zeros.
  T* dzp = dz.data_ptr<T>();
  for (int64_t nb = 0; nb < N * B; ++nb) std::fill_n(dzp + nb * T_ * H, H, T(0));
  const at::Tensor dw_hh = rows_product<T>(rp, N, dzp + H, B * T_ * H, H, out.data_ptr<T>(), B * T_ * H, H,
                                           B * T_ - 1, H, H, HP, compact ? bits.data() : nullptr, HP, opt);
  return {dx, dw_ih, dw_hh, db};
}

// Returns {dx or empty, dw_ih or empty, dw_hh, db}, shaped like x, w_ih, w_hh, b_ih (db is the gradient
// of both biases). out: the forward's result.
std::vector<at::Tensor> fused_backward(const at::Tensor& gout_, const at::Tensor& x_, const at::Tensor& w_ih_,
                                       const at::Tensor& w_hh_, const at::Tensor& out_, bool relu, bool need_x,
                                       bool need_w_ih, int64_t groups, int64_t isa_req, bool gemm_dw) {
  at::NoGradGuard no_grad;
  const bool single = out_.dim() == 3;
  const at::Tensor x = stacked(x_, single), w_ih = stacked(w_ih_, single), w_hh = stacked(w_hh_, single),
                   out = stacked(out_, single);
  const Isa isa = resolve_isa(isa_req);
  TORCH_CHECK(out.dim() == 4 && out.is_contiguous(), "fused_rnn: out must be the forward's contiguous result");
  // grad_out: dL/dout, shaped like out, or dL/dh_{T-1} alone (out without its time dimension).
  const bool g_last = gout_.dim() == out_.dim() - 1;
  std::vector<int64_t> last_shape = out_.sizes().vec();
  last_shape.erase(last_shape.end() - 2);
  TORCH_CHECK(g_last ? gout_.sizes() == at::IntArrayRef(last_shape) : gout_.sizes() == out_.sizes(),
              "fused_rnn: grad_out must be ", out_.sizes(), " or ", at::IntArrayRef(last_shape), ", got ", gout_.sizes());
  at::Tensor gout = stacked(gout_, single);
  if (gout.scalar_type() != out.scalar_type()) gout = gout.to(out.scalar_type());
  if (gout.stride(-1) != 1) gout = gout.contiguous();  // e.g. the expanded grad of out.sum()
  groups = std::max<int64_t>(1, std::min(groups, out.size(1)));
  std::vector<at::Tensor> grads;
  if (out.numel() == 0) {
    grads = {at::zeros_like(x), at::zeros_like(w_ih), at::zeros_like(w_hh),
             at::zeros({out.size(0), out.size(3)}, out.options())};
  } else {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fused_rnn_backward", [&] {
      grads = run_backward<scalar_t>(gout, x, w_ih, w_hh, out, relu, need_x, need_w_ih, groups, isa, gemm_dw);
    });
  }
  if (single)
    for (at::Tensor& g : grads)
      if (g.numel() > 0 || g.dim() > 1) g = g.squeeze(0);
  return grads;
}

int64_t best_isa() { return resolve_isa(kAuto); }

}  // namespace

// Ops under torch.ops.irnn_fused. Tensors a call did not compute come back empty (numel 0).
TORCH_LIBRARY(irnn_fused, m) {
  m.def("forward(Tensor x, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, bool relu, int groups, int isa) "
        "-> Tensor",
        &fused_forward);
  m.def("backward(Tensor grad_out, Tensor x, Tensor w_ih, Tensor w_hh, Tensor out, bool relu, bool need_x, "
        "bool need_w_ih, int groups, int isa, bool gemm_dw=False) -> Tensor[]",
        &fused_backward);
  m.def("best_isa() -> int", &best_isa);
}
