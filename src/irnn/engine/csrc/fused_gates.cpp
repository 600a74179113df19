// Fused CPU recurrence for one LSTM or GRU layer (PyTorch's gate order and equations), forward and
// backward through time.
//
//   LSTM (gates i, f, g, o):  [i f g o] = [sig sig tanh sig](x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)
//                             c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)
//   GRU (gates r, z, n):      r, z = sig(x_t W_i{r,z}^T + b_i{r,z} + h_{t-1} W_h{r,z}^T + b_h{r,z})
//                             n = tanh(x_t W_in^T + b_in + r * (h_{t-1} W_hn^T + b_hn))
//                             h_t = (1 - z) * n + z * h_{t-1}
//   with h_{-1} = c_{-1} = 0.
//
// Why this exists: nn.LSTM on the CPU runs a dozen ATen ops per step; at batch 32 and hidden 100 a
// step is ~2.5 MFLOP of dense arithmetic, so the work is a small GEMM per step plus elementwise gates.
// Here the whole time loop is plain C++ over raw pointers with one register-blocked micro-kernel (GCC
// vector extensions) for every product:
//   forward, per step:   [x_t, h_{t-1}] [W_ih; W_hh]^T (inputs wider than kIMax: x_t W_ih^T apart), then
//                        the gates and the cell update in the product's epilogue;
//   backward, per step:  the gate gradients dA (input side) and dB (recurrent side; equal for the LSTM),
//                        dx_t = dA W_ih, dh_{t-1} = dB W_hh (+ dh_t * z for the GRU); every ~64 rows (a
//                        ring of the last steps, still in L1/L2) dW_hh^T += h^T dB, dW_ih^T += x^T dA and
//                        db += the rows of dA / dB.
// The products are near the FMA peak; what a step spends beyond its floor is mostly the gates: sigmoid
// and tanh come from one vectorised exp (Cody-Waite reduction, a degree-7 polynomial, ~1 ulp; vrcp14ps
// and a Newton step for 1/x on AVX-512), the same code for every lane, so no element depends on where it
// sits in a vector.
//
// Reproducibility: the batch rows of each model are cut into fixed groups whose size depends only on B
// (group_rows); each group runs its whole time loop and sums its own partial weight and bias gradients in
// a fixed order; the partials are then added group by group in order. Threads only distribute the groups,
// and no ATen kernel runs inside, so outputs and gradients are bitwise the same for any thread count.
// Worker threads get the caller's flush-to-zero bits (parallel_ftz). No -ffast-math.
//
// Kernels compiled three times (AVX-512, AVX2+FMA, baseline) through target attributes, picked at run time.
//
// Layouts (N = stacked models), batch first: x [N,B,T,I], w_ih [N,gH,I], w_hh [N,gH,H], b_* [N,gH] with
// gH = 4H (LSTM) or 3H (GRU); out [N,B,T,H]. Saved for the backward, time-major: act [N,T,B,4H] (LSTM:
// i f g o after their nonlinearities; GRU: r z n and hn = h_{t-1} W_hn^T + b_hn) and state [N,T,B,SH]
// (LSTM: c_t and h_t; GRU: h_t).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define IRNN_X86 1
#include <immintrin.h>
#else
#define IRNN_X86 0
#endif

#define IRNN_INLINE inline __attribute__((always_inline))

namespace {

enum Isa : int64_t { kAuto = 0, kGeneric = 1, kAvx2 = 2, kAvx512 = 3 };

template <typename T> struct IntOf;
template <> struct IntOf<float> { using type = int32_t; };
template <> struct IntOf<double> { using type = int64_t; };

template <typename T, int VB>
struct Simd {
  typedef T vec __attribute__((vector_size(VB)));
  typedef typename IntOf<T>::type ivec __attribute__((vector_size(VB)));
  static constexpr int L = VB / (int)sizeof(T);

  static IRNN_INLINE vec zero() { return vec{}; }
  static IRNN_INLINE vec splat(T s) {
#if defined(__clang__)
    return s - vec{};
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
  // The first m lanes (m <= L), the rest zero: the last, partial vector of a row that must not read or
  // write past the row's end.
  static IRNN_INLINE vec load_n(const T* p, int64_t m) {
    if (m >= L) return load(p);
#if IRNN_X86
    if constexpr (VB == 64) {  // a masked load (GCC turns a lane loop into a call to memcpy)
      if constexpr (std::is_same<T, float>::value)
        return __builtin_ia32_loadups512_mask(p, zero(), (unsigned short)((1u << m) - 1));
      else
        return __builtin_ia32_loadupd512_mask(p, zero(), (unsigned char)((1u << m) - 1));
    }
#endif
    vec v = zero();
    std::memcpy(&v, p, m * sizeof(T));
    return v;
  }
  static IRNN_INLINE void store_n(T* p, vec v, int64_t m) {
    if (m >= L) return store(p, v);
#if IRNN_X86
    if constexpr (VB == 64) {
      if constexpr (std::is_same<T, float>::value)
        return __builtin_ia32_storeups512_mask(p, v, (unsigned short)((1u << m) - 1));
      else
        return __builtin_ia32_storeupd512_mask(p, v, (unsigned char)((1u << m) - 1));
    }
#endif
    std::memcpy(p, &v, m * sizeof(T));
  }
  // 1 / d. AVX-512 float: the 14-bit vrcp14ps estimate and one Newton step (within ~1 ulp; a vdivps
  // per sigmoid was a fifth of the forward's time); elsewhere a division.
  static IRNN_INLINE vec recip(vec d) {
#if IRNN_X86
    if constexpr (VB == 64 && std::is_same<T, float>::value) {
      const vec r = (vec)__builtin_ia32_rcp14ps512_mask(d, zero(), (unsigned short)0xFFFF);
      return r + r * (splat(T(1)) - d * r);
    }
#endif
    return splat(T(1)) / d;
  }

  // exp(x) for x clamped to the finite range: x = n ln2 + r, |r| <= ln2/2, e^r by a Taylor polynomial
  // (degree 7 for float, 13 for double: below 1 ulp of truncation error), 2^n through the exponent bits.
  static IRNN_INLINE vec exp(vec x) {
    constexpr bool f32 = std::is_same<T, float>::value;
    const T lo = f32 ? T(-87.3) : T(-708.3), hi = f32 ? T(88.3) : T(709.0);
    const T magic = f32 ? T(12582912.0) : T(6755399441055744.0);  // 1.5 * 2^mantissa: rounds to an integer
    const T ln2_hi = f32 ? T(0.693359375) : T(6.93147180369123816490e-01);
    const T ln2_lo = f32 ? T(-2.12194440e-4) : T(1.90821492927058770002e-10);
#if IRNN_X86
    constexpr bool avx512_f32 = VB == 64 && f32;
    if constexpr (avx512_f32) {  // vmaxps/vminps: one instruction per bound instead of a compare and a blend
      x = __builtin_ia32_maxps512_mask(x, splat(lo), x, (unsigned short)0xFFFF, 4);
      x = __builtin_ia32_minps512_mask(x, splat(hi), x, (unsigned short)0xFFFF, 4);
    }
#else
    constexpr bool avx512_f32 = false;
#endif
    if constexpr (!avx512_f32) {
      x = x < splat(lo) ? splat(lo) : x;
      x = x > splat(hi) ? splat(hi) : x;
    }
    const vec n = (x * splat(T(1.4426950408889634)) + splat(magic)) - splat(magic);
    vec r = x - n * splat(ln2_hi);
    r = r - n * splat(ln2_lo);
    constexpr int deg = f32 ? 7 : 13;
    T coef[deg + 1];
    coef[0] = 1;
    for (int k = 1; k <= deg; ++k) coef[k] = coef[k - 1] / T(k);
    vec p;
    if constexpr (f32) {  // Estrin's scheme: 3 multiply-adds deep instead of Horner's 7 (the gates are latency-bound)
      const vec r2 = r * r, r4 = r2 * r2;
      const vec p01 = splat(coef[0]) + r * splat(coef[1]), p23 = splat(coef[2]) + r * splat(coef[3]);
      const vec p45 = splat(coef[4]) + r * splat(coef[5]), p67 = splat(coef[6]) + r * splat(coef[7]);
      p = (p01 + r2 * p23) + r4 * (p45 + r2 * p67);
    } else {
      p = splat(coef[deg]);
#pragma GCC unroll 16
      for (int k = deg - 1; k >= 0; --k) p = p * r + splat(coef[k]);
    }
#if IRNN_X86
    if constexpr (avx512_f32)  // p * 2^n in one vscalefps
      return __builtin_ia32_scalefps512_mask(p, n, p, (unsigned short)0xFFFF, 4);
#endif
    const ivec e = (__builtin_convertvector(n, ivec) + (f32 ? 127 : 1023)) << (f32 ? 23 : 52);
    return p * (vec)e;
  }
  static IRNN_INLINE vec sigmoid(vec x) { return recip(splat(T(1)) + exp(-x)); }
  static IRNN_INLINE vec tanh(vec x) { return splat(T(1)) - splat(T(2)) * recip(splat(T(1)) + exp(x + x)); }
};

// ------------------------------------------------------------------------------------------------
// The micro-kernel: for r < RB, c < CB vectors:
//   C[r*ldc + c*L ...] = (Acc ? C[...] : 0) + sum_{k < K} A(r, k) * M[k*ldm + c*L ...]
// in k order, with A(r, k) = A[r*lda + k] (row-major A) or, if TR, A[r + k*ks] (A read transposed: the
// rank-K weight-gradient updates, k over batch rows). RB x CB accumulators stay in registers; each k
// loads CB vectors of M and broadcasts RB scalars of A.
template <typename T, int VB, int RB, int CB, bool Acc, bool TR>
IRNN_INLINE void tile(const T* A, int64_t lda, int64_t ks, int64_t K, const T* M, int64_t ldm, T* C, int64_t ldc) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  vec acc[RB][CB];
  const T* a[RB];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r) a[r] = A + r * lda;
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) acc[r][c] = Acc ? S::load(C + r * ldc + c * S::L) : S::zero();
  for (int64_t k = 0; k < K; ++k) {
    const T* m = M + k * ldm;
    const T* p = A + k * ks;
    vec w[CB];
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) w[c] = S::load(m + c * S::L);
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      const vec s = S::splat(TR ? p[r] : a[r][k]);
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c) acc[r][c] += s * w[c];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) S::store(C + r * ldc + c * S::L, acc[r][c]);
}

// One block of CB vector columns over all R rows: RBMAX rows at a time, then 4, 2, 1.
template <typename T, int VB, int RBMAX, int CB, bool Acc, bool TR>
IRNN_INLINE void col_block(const T* A, int64_t lda, int64_t ks, int64_t R, int64_t K, const T* M, int64_t ldm, T* C,
                           int64_t ldc) {
  int64_t r = 0;
  for (; r + RBMAX <= R; r += RBMAX) tile<T, VB, RBMAX, CB, Acc, TR>(A + r * lda, lda, ks, K, M, ldm, C + r * ldc, ldc);
  if constexpr (RBMAX > 4)
    if (R - r >= 4) { tile<T, VB, 4, CB, Acc, TR>(A + r * lda, lda, ks, K, M, ldm, C + r * ldc, ldc); r += 4; }
  if constexpr (RBMAX > 2)
    if (R - r >= 2) { tile<T, VB, 2, CB, Acc, TR>(A + r * lda, lda, ks, K, M, ldm, C + r * ldc, ldc); r += 2; }
  if constexpr (RBMAX > 1)
    if (R - r >= 1) tile<T, VB, 1, CB, Acc, TR>(A + r * lda, lda, ks, K, M, ldm, C + r * ldc, ldc);
}

// col_block for a run-time width cb <= CB.
template <typename T, int VB, int RBMAX, int CB, bool Acc, bool TR>
IRNN_INLINE void col_any(int64_t cb, const T* A, int64_t lda, int64_t ks, int64_t R, int64_t K, const T* M,
                         int64_t ldm, T* C, int64_t ldc) {
  if (cb == CB) return col_block<T, VB, RBMAX, CB, Acc, TR>(A, lda, ks, R, K, M, ldm, C, ldc);
  if constexpr (CB > 1) col_any<T, VB, RBMAX, CB - 1, Acc, TR>(cb, A, lda, ks, R, K, M, ldm, C, ldc);
}

// C[R, nv*L] (+)= A[R, K] M[K, nv*L]. Column blocks outermost, and K cut into chunks whose [kc, CB*L] panel
// of M fits in L1 (~32 KB) while every row block uses it (dh = dB W_hh has K = 4H = 400: a whole panel is
// 100 KB and came from L2 once per row block). The nv vector columns are cut into blocks of near-equal
// width (7 = 4 + 3, not 5 + 2: a narrow block broadcasts as much of A per multiply-add as a wide one).
// Each C element is still summed in k order.
template <typename T, int VB, int RBMAX, int CBMAX, bool Acc, bool TR = false>
IRNN_INLINE void gemm(const T* A, int64_t lda, int64_t ks, int64_t R, int64_t K, const T* M, int64_t ldm, int64_t nv,
                      T* C, int64_t ldc) {
  constexpr int L = Simd<T, VB>::L;
  const int64_t nb = (nv + CBMAX - 1) / CBMAX;
  for (int64_t b = 0, c = 0; b < nb; ++b) {
    const int64_t cb = nv / nb + (b < nv % nb);
    // Equal chunks of at most ~32 KB of panel each (a short last chunk would be all overhead).
    const int64_t kmax = std::max<int64_t>(16, (int64_t(32) << 10) / (cb * VB));
    const int64_t kc = std::max<int64_t>(1, (K + (K + kmax - 1) / kmax - 1) / std::max<int64_t>(1, (K + kmax - 1) / kmax));
    for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kc) {
      const int64_t kn = std::min(kc, K - k0);
      const T* a = A + k0 * (TR ? ks : 1);
      if (Acc || k0 > 0)
        col_any<T, VB, RBMAX, CBMAX, true, TR>(cb, a, lda, ks, R, kn, M + k0 * ldm + c * L, ldm, C + c * L, ldc);
      else
        col_any<T, VB, RBMAX, CBMAX, false, TR>(cb, a, lda, ks, R, kn, M + k0 * ldm + c * L, ldm, C + c * L, ldc);
    }
    c += cb;
  }
}

// ------------------------------------------------------------------------------------------------
template <typename T>
struct Args {
  int64_t B, T_, I, H, gH;  // gH: the gate width, 4H or 3H
  int64_t GP, HP, IP;       // gH, H, I rounded up to the vector width (row strides of packed/scratch arrays)
  int64_t SH;               // width of a saved state row: 2H (LSTM: c, h) or H (GRU: h)
  int64_t group;            // rows per group (the last group of a model may be smaller)
  int64_t groups;           // groups per model
  const T* x;               // [N,B,T,I]
  // Narrow inputs (I <= kIMax) are fused into the recurrent product: its A row is [x_t, h_{t-1}] and its
  // M = wx = [W_ih^T; W_hh^T] (the GRU's n columns of W_ih^T zeroed: x W_in^T stays out of r * (...)).
  // Wide inputs get their own product gx = x_t W_ih^T per step, and wx = W_hh^T.
  int64_t xo;               // I if fused, else 0: where h starts in an A row
  int64_t XP;               // row stride of the A rows
  const T* wiT;             // [N,I,GP]   W_ih^T, zero-padded
  const T* wx;              // [N,xo+H,GP]
  const T* bs;              // [N,GP+L]   b_ih + b_hh (the GRU's n columns: b_hn only)
  const T* bi;              // [N,GP+L]   b_ih
  T* out;                   // [N,B,T,H], or [N,B,H] if out_last
  bool out_last;            // write only the last step's h (a readout of the last state needs no more)
  // Saved for the backward, time-major so that one step of a group is one contiguous block (or null: a
  // forward without gradients): act [N,T,B,4H] and state [N,T,B,SH].
  T* act;
  T* state;
  // backward only
  const T* g; int64_t g_n, g_b, g_t; bool g_last;  // dL/dout strides, or dL/dh_{T-1} only [N,B,H]
  const T* wh;              // [N,gH,HP]  W_hh
  const T* wi;              // [N,gH,IP]  W_ih
  T* dx;                    // [N,B,T,I] or null
  T* part;                  // [items, PW]: per group dW_hh^T [H,GP], dW_ih^T [I,GP], db_ih [GP], db_hh [GP]
  int64_t PW;
};

// Inputs up to this wide are fused into the recurrent product (see Args::xo).
constexpr int64_t kIMax = 8;

// Rows per group: a function of B alone (never of the thread count), so the sums do not depend on it.
// Groups of 8-16 rows: big enough for the kernels' row blocks, small enough that a batch of 16 or 32
// gives two threads a group each.
// (Groups of 16 or 32 rows at B = 16 / 32 measured within noise of these on one thread.)
int64_t group_rows(int64_t B) {
  if (B <= 8) return std::max<int64_t>(B, 1);
  const int64_t half = (B + 1) / 2;
  return std::min<int64_t>(16, std::max<int64_t>(8, (half + 3) / 4 * 4));
}

// The backward adds dW += h^T dB once every ring_steps(R) steps, over that many steps' rows at once
// (K ~ 64): with K = R alone (8-16) loading and storing the [H, gH] accumulators would cost as much as
// the multiply-adds.
int64_t ring_steps(int64_t R) { return std::max<int64_t>(1, (64 + R - 1) / R); }

// Zero-initialised scratch with slack after it (the epilogue reads whole vectors at gate offsets).
template <typename T>
struct Scratch {
  std::vector<T> buf;
  explicit Scratch(int64_t n) : buf(n + 64, T(0)) {}
  T* p() { return buf.data(); }
};

// Asks for `bytes` from p on to be brought into cache (level 3: L1, 2: L2).
template <int Level>
IRNN_INLINE void prefetch_block(const void* p, int64_t bytes, bool write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) {
    if (write)
      __builtin_prefetch(c + o, 1, Level);
    else
      __builtin_prefetch(c + o, 0, Level);
  }
}

template <typename T, int VB, int RBMAX, int CBMAX, bool GRU>
IRNN_INLINE void forward_group(const Args<T>& a, int64_t n, int64_t r0, int64_t r1) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  constexpr int L = S::L;
  const int64_t R = r1 - r0, H = a.H, I = a.I, T_ = a.T_, GP = a.GP, XP = a.XP, xo = a.xo, SH = a.SH;
  const bool fused_x = xo > 0;
  const T* wiT = a.wiT + n * I * GP;
  const T* wx = a.wx + n * (xo + H) * GP;
  const T* bs = a.bs + n * (GP + L);
  const T* bi = a.bi + n * (GP + L);
  // hin [R, XP]: the A rows [x_t, h_{t-1}] (h_{-1} = 0); cs: c_{t-1}; hh: the product; gx: wide inputs' x_t W_ih^T.
  Scratch<T> hin_s(R * XP), cs_s(R * a.HP), hh_s(R * GP), gx_s(fused_x ? 0 : R * GP);
  T *hin = hin_s.p(), *cs = cs_s.p(), *hh = hh_s.p(), *gx = gx_s.p();
  const vec one = S::splat(T(1));
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t row0 = (n * a.B + r0) * T_ + t;   // (n, b = r0, t) in [N,B,T,*]
    const int64_t srow0 = (n * T_ + t) * a.B + r0;  // (n, t, b = r0) in [N,T,B,*]
    if (t + 1 < T_ && !a.out_last)  // the next step's rows of out sit T*H apart: too many streams for the prefetcher
      for (int64_t r = 0; r < R; ++r) prefetch_block<3>(a.out + (row0 + 1 + r * T_) * H, H * sizeof(T), true);
    if (fused_x) {
      for (int64_t r = 0; r < R; ++r) std::copy_n(a.x + (row0 + r * T_) * I, I, hin + r * XP);
    } else {
      gemm<T, VB, RBMAX, CBMAX, false>(a.x + row0 * I, T_ * I, 1, R, I, wiT, GP, GP / L, gx, GP);
    }
    gemm<T, VB, RBMAX, CBMAX, false>(hin, XP, 1, R, t ? xo + H : xo, wx, GP, GP / L, hh, GP);
    for (int64_t r = 0; r < R; ++r) {
      const T* hhr = hh + r * GP;
      const T* gxr = gx + r * GP;
      const T* xr = a.x + (row0 + r * T_) * I;
      T* hr = hin + r * XP + xo;
      T* cr = cs + r * a.HP;
      T* orow = a.out_last ? (t + 1 == T_ ? a.out + (n * a.B + r0 + r) * H : nullptr) : a.out + (row0 + r * T_) * H;
      T* arow = a.act ? a.act + (srow0 + r) * 4 * H : nullptr;
      T* srow = a.act ? a.state + (srow0 + r) * SH : nullptr;
      for (int64_t j = 0; j < H; j += L) {
        const int64_t m = H - j;
        auto pre = [&](int64_t q) {  // x W_i^T + h W_h^T + b_i + b_h for gate q's units j...
          const int64_t o = q * H + j;
          const vec v = S::load(hhr + o) + S::load(bs + o);
          return fused_x ? v : v + S::load(gxr + o);
        };
        vec h;
        if constexpr (!GRU) {
          const vec i = S::sigmoid(pre(0)), f = S::sigmoid(pre(1)), g = S::tanh(pre(2)), o = S::sigmoid(pre(3));
          const vec c = f * S::load(cr + j) + i * g;  // cs holds c_{t-1} (zero at t = 0)
          h = o * S::tanh(c);
          S::store(cr + j, c);
          if (arow) {
            S::store_n(arow + j, i, m), S::store_n(arow + H + j, f, m);
            S::store_n(arow + 2 * H + j, g, m), S::store_n(arow + 3 * H + j, o, m);
            S::store_n(srow + j, c, m), S::store_n(srow + H + j, h, m);
          }
        } else {
          const vec rg = S::sigmoid(pre(0)), z = S::sigmoid(pre(1));
          const int64_t on = 2 * H + j;
          const vec hn = pre(2) - (fused_x ? S::zero() : S::load(gxr + on));  // h W_hn^T + b_hn
          vec xn = S::load(bi + on);  // x W_in^T + b_in
          if (fused_x)
            for (int64_t k = 0; k < I; ++k) xn += S::splat(xr[k]) * S::load(wiT + k * GP + on);
          else
            xn += S::load(gxr + on);
          const vec nn = S::tanh(xn + rg * hn);
          h = (one - z) * nn + z * (t ? S::load(hr + j) : S::zero());  // h_{t-1}
          if (arow) {
            S::store_n(arow + j, rg, m), S::store_n(arow + H + j, z, m);
            S::store_n(arow + 2 * H + j, nn, m), S::store_n(arow + 3 * H + j, hn, m);
            S::store_n(srow + j, h, m);
          }
        }
        S::store(hr + j, h);
        if (orow) S::store_n(orow + j, h, m);
      }
    }
  }
}

template <typename T, int VB, int RBMAX, int CBMAX, bool GRU>
IRNN_INLINE void backward_group(const Args<T>& a, int64_t n, int64_t r0, int64_t r1, int64_t item) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  constexpr int L = S::L;
  const int64_t R = r1 - r0, H = a.H, I = a.I, T_ = a.T_, B = a.B, GP = a.GP, HP = a.HP, IP = a.IP, gH = a.gH;
  const int64_t SH = a.SH, hoff = GRU ? 0 : H;  // h's offset in a state row
  const T* wh = a.wh + n * gH * HP;
  const T* wi = a.wi + n * gH * IP;
  T* dwh = a.part + item * a.PW;  // [H, GP] dW_hh^T
  T* dwi = dwh + H * GP;          // [I, GP] dW_ih^T
  T* dbi = dwi + I * GP;          // [GP]
  T* dbh = dbi + GP;              // [GP]
  // The ring of the last `ring` steps' gate gradients and the inputs they pair with in the weight gradients.
  const int64_t ring = ring_steps(R);
  Scratch<T> dA_s(ring * R * GP), dB_s(GRU ? ring * R * GP : 0), hr_s(ring * R * H), xr_s(ring * R * I);
  Scratch<T> carry_s(R * HP), dc_s(R * HP), dx_s(a.dx ? R * IP : 0);
  T *dAr = dA_s.p(), *dBr = GRU ? dB_s.p() : dAr, *hring = hr_s.p(), *xring = xr_s.p();
  T *carry = carry_s.p(), *dc = dc_s.p(), *dxs = dx_s.p();
  const vec one = S::splat(T(1));
  int64_t filled = 0;  // steps in the ring
  for (int64_t t = T_ - 1; t >= 0; --t) {
    const int64_t row0 = (n * B + r0) * T_ + t;
    const int64_t srow0 = (n * T_ + t) * B + r0;
    const bool last = t == T_ - 1, has_g = last || !a.g_last;
    const T* g = a.g + n * a.g_n + r0 * a.g_b + (a.g_last ? 0 : t * a.g_t);
    // The saved blocks of a step are contiguous (the hardware prefetcher follows them); the output gradient's
    // rows sit T*H apart.
    if (t && !a.g_last)
      for (int64_t r = 0; r < R; ++r) prefetch_block<2>(g - a.g_t + r * a.g_b, H * sizeof(T), false);
    T* dA = dAr + filled * R * GP;
    T* dB = dBr + filled * R * GP;
    for (int64_t r = 0; r < R; ++r) {
      const T* gr = g + r * a.g_b;
      const T* ar = a.act + (srow0 + r) * 4 * H;
      const T* sr = a.state + (srow0 + r) * SH;
      const T* sp = sr - B * SH;  // the state row of step t - 1 (only read if t > 0)
      T* cy = carry + r * HP;
      T* dar = dA + r * GP;
      T* dbr = dB + r * GP;
      for (int64_t j = 0; j < H; j += L) {
        const int64_t m = H - j;
        vec dh = last ? S::zero() : S::load(cy + j);  // dL/dh_t through step t + 1
        if (has_g) dh += S::load_n(gr + j, m);
        if constexpr (!GRU) {
          const vec i = S::load_n(ar + j, m), f = S::load_n(ar + H + j, m), gg = S::load_n(ar + 2 * H + j, m),
                    o = S::load_n(ar + 3 * H + j, m);
          const vec c = S::load_n(sr + j, m);
          const vec cp = t ? S::load_n(sp + j, m) : S::zero();
          const vec tc = S::tanh(c);
          const vec dcv = (last ? S::zero() : S::load(dc + r * HP + j)) + dh * o * (one - tc * tc);
          S::store(dc + r * HP + j, dcv * f);  // dL/dc_{t-1} through c_t
          S::store_n(dar + j, dcv * gg * i * (one - i), m);
          S::store_n(dar + H + j, dcv * cp * f * (one - f), m);
          S::store_n(dar + 2 * H + j, dcv * i * (one - gg * gg), m);
          S::store_n(dar + 3 * H + j, dh * tc * o * (one - o), m);
        } else {
          const vec rg = S::load_n(ar + j, m), z = S::load_n(ar + H + j, m), nn = S::load_n(ar + 2 * H + j, m),
                    hn = S::load_n(ar + 3 * H + j, m);
          const vec hp = t ? S::load_n(sp + j, m) : S::zero();
          const vec dnp = dh * (one - z) * (one - nn * nn);  // dL/d(n's pre-activation)
          const vec dr = dnp * hn * rg * (one - rg);
          const vec dz = dh * (hp - nn) * z * (one - z);
          S::store(cy + j, dh * z);  // dL/dh_{t-1} directly through h_t = ... + z h_{t-1}
          S::store_n(dar + j, dr, m), S::store_n(dar + H + j, dz, m), S::store_n(dar + 2 * H + j, dnp, m);
          S::store_n(dbr + j, dr, m), S::store_n(dbr + H + j, dz, m), S::store_n(dbr + 2 * H + j, dnp * rg, m);
        }
      }
      // This step's h_{t-1} (zero at t = 0) and x_t rows, paired with dB and dA in the weight gradients.
      T* hdst = hring + (filled * R + r) * H;
      if (t)
        std::copy_n(sp + hoff, H, hdst);
      else
        std::fill_n(hdst, H, T(0));
      std::copy_n(a.x + (row0 + r * T_) * I, I, xring + (filled * R + r) * I);
    }
    filled += 1;
    if (a.dx) {
      gemm<T, VB, RBMAX, CBMAX, false>(dA, GP, 1, R, gH, wi, IP, IP / L, dxs, IP);
      for (int64_t r = 0; r < R; ++r) std::copy_n(dxs + r * IP, I, a.dx + (row0 + r * T_) * I);
    }
    // dL/dh_{t-1} through the gates: dB W_hh, onto the GRU's direct term already in carry.
    if (t) gemm<T, VB, RBMAX, CBMAX, GRU>(dB, GP, 1, R, gH, wh, HP, HP / L, carry, HP);
    if (filled == ring || t == 0) {
      // dW_hh^T += h^T dB, dW_ih^T += x^T dA and the bias sums over the ring's rows, in ring order.
      const int64_t K = filled * R;
      gemm<T, VB, RBMAX, CBMAX, true, true>(hring, 1, H, H, K, dBr, GP, GP / L, dwh, GP);
      gemm<T, VB, RBMAX, CBMAX, true, true>(xring, 1, I, I, K, dAr, GP, GP / L, dwi, GP);
      for (int64_t v = 0; v < GP; v += L) {
        vec sa = S::load(dbi + v), sb = S::load(dbh + v);
        for (int64_t k = 0; k < K; ++k) {
          sa += S::load(dAr + k * GP + v);
          if (GRU) sb += S::load(dBr + k * GP + v);
        }
        S::store(dbi + v, sa);
        if (GRU) S::store(dbh + v, sb);
      }
      filled = 0;
    }
  }
  if (!GRU) std::copy_n(dbi, GP, dbh);
}

// One instantiation per target; the kernels are inlined into each and compiled for its ISA.
#define IRNN_KERNELS(SUFFIX, ATTR, VB, RB, CB)                                                                     \
  template <typename T, bool GRU>                                                                                  \
  ATTR void forward_##SUFFIX(const Args<T>& a, int64_t n, int64_t r0, int64_t r1) {                                \
    forward_group<T, VB, RB, CB, GRU>(a, n, r0, r1);                                                               \
  }                                                                                                                \
  template <typename T, bool GRU>                                                                                  \
  ATTR void backward_##SUFFIX(const Args<T>& a, int64_t n, int64_t r0, int64_t r1, int64_t item) {                 \
    backward_group<T, VB, RB, CB, GRU>(a, n, r0, r1, item);                                                        \
  }

#if IRNN_X86
#ifndef IRNN_GATES_RB512
#define IRNN_GATES_RB512 4
#endif
#ifndef IRNN_GATES_CB512
#define IRNN_GATES_CB512 5
#endif
IRNN_KERNELS(avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))), 64, IRNN_GATES_RB512,
             IRNN_GATES_CB512)
IRNN_KERNELS(avx2, __attribute__((target("avx2,fma"))), 32, 4, 3)
#endif
IRNN_KERNELS(generic, , 16, 4, 3)

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
  TORCH_CHECK(requested >= kGeneric && requested <= kAvx512, "fused_gates: unknown isa ", requested);
  TORCH_CHECK(requested <= best, "fused_gates: isa ", requested, " is not supported by this CPU (best is ",
              (int64_t)best, ")");
  return static_cast<Isa>(requested);
}

int64_t vector_len(Isa isa, int64_t element_size) {
  return (isa == kAvx512 ? 64 : isa == kAvx2 ? 32 : 16) / element_size;
}

// at::parallel_for with the caller's flush-to-zero / denormals-are-zero bits in every worker.
template <typename F>
void parallel_ftz(int64_t begin, int64_t end, const F& body) {
#if IRNN_X86
  const unsigned csr = _mm_getcsr() & 0x8040u;  // FTZ | DAZ
#endif
  at::parallel_for(begin, end, 1, [&](int64_t lo, int64_t hi) {
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

// body(n, r0, r1, item) for every (model, group of rows).
template <typename F>
void for_groups(int64_t N, int64_t B, int64_t group, int64_t groups, const F& body) {
  parallel_ftz(0, N * groups, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t n = i / groups, r0 = (i % groups) * group, r1 = std::min(B, r0 + group);
      body(n, r0, r1, i);
    }
  });
}

// Zero-padded [N, rows, width] copy of src [N, rows, cols], or of src^T if transpose (src [N, cols, rows]),
// plus `slack` zeros per model.
template <typename T>
std::vector<T> pack(const at::Tensor& src, bool transpose, int64_t width, int64_t slack = 0) {
  const int64_t N = src.size(0), rows = src.size(transpose ? 2 : 1), cols = src.size(transpose ? 1 : 2);
  const int64_t s0 = src.stride(0), sr = src.stride(transpose ? 2 : 1), sc = src.stride(transpose ? 1 : 2);
  const T* p = src.data_ptr<T>();
  const int64_t per = rows * width + slack;
  std::vector<T> out(N * per + 64, T(0));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) out[n * per + r * width + c] = p[n * s0 + r * sr + c * sc];
  return out;
}

int64_t round_up(int64_t v, int64_t L) { return (v + L - 1) / L * L; }

at::Tensor stacked(const at::Tensor& t, bool single) { return single ? t.unsqueeze(0) : t; }

void check_inputs(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                  const at::Tensor& b_hh, int64_t ngates) {
  for (const at::Tensor* t : {&x, &w_ih, &w_hh, &b_ih, &b_hh}) {
    TORCH_CHECK(t->device().is_cpu(), "fused_gates: CPU tensors only, got ", t->device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "fused_gates: all tensors must share x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fused_gates: float32 or float64 only, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "fused_gates: x must be [B, T, I] or [N, B, T, I], got ", x.sizes());
  const int64_t N = x.size(0), I = x.size(3), H = w_hh.size(-1), gH = ngates * H;
  TORCH_CHECK(w_ih.dim() == 3 && w_ih.size(0) == N && w_ih.size(1) == gH && w_ih.size(2) == I,
              "fused_gates: w_ih must be [N, ", ngates, "H, I] = [", N, ", ", gH, ", ", I, "], got ", w_ih.sizes());
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(0) == N && w_hh.size(1) == gH,
              "fused_gates: w_hh must be [N, ", ngates, "H, H], got ", w_hh.sizes());
  TORCH_CHECK(b_ih.dim() == 2 && b_ih.size(0) == N && b_ih.size(1) == gH, "fused_gates: b_ih must be [N, ", gH,
              "], got ", b_ih.sizes());
  TORCH_CHECK(b_hh.dim() == 2 && b_hh.size(0) == N && b_hh.size(1) == gH, "fused_gates: b_hh must be [N, ", gH,
              "], got ", b_hh.sizes());
}

// The packed weights and sizes shared by forward and backward.
template <typename T>
struct Packed {
  std::vector<T> wiT, wx, bs, bi, wi, wh;
};

template <typename T>
Args<T> make_args(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                  const at::Tensor& b_hh, Isa isa, bool backward, Packed<T>& pk) {
  Args<T> a{};
  const int64_t L = vector_len(isa, sizeof(T));
  a.B = x.size(1), a.T_ = x.size(2), a.I = x.size(3), a.H = w_hh.size(2), a.gH = w_hh.size(1);
  a.GP = round_up(a.gH, L), a.HP = round_up(a.H, L), a.IP = round_up(a.I, L);
  a.SH = a.gH == 3 * a.H ? a.H : 2 * a.H;
  a.group = group_rows(a.B), a.groups = (a.B + a.group - 1) / a.group;
  const bool gru = a.gH == 3 * a.H;
  a.xo = a.I <= kIMax ? a.I : 0;
  a.XP = round_up(a.xo + a.HP, L);
  const int64_t N = x.size(0), GP = a.GP, H = a.H, I = a.I, gH = a.gH, xo = a.xo;
  pk.wiT = pack<T>(w_ih, true, GP);
  const std::vector<T> whT = pack<T>(w_hh, true, GP);
  pk.wx.assign(N * (xo + H) * GP + 64, T(0));
  for (int64_t n = 0; n < N; ++n) {
    T* w = pk.wx.data() + n * (xo + H) * GP;
    for (int64_t i = 0; i < xo; ++i)
      for (int64_t j = 0; j < (gru ? 2 * H : gH); ++j) w[i * GP + j] = pk.wiT[(n * I + i) * GP + j];
    std::copy_n(whT.data() + n * H * GP, H * GP, w + xo * GP);
  }
  pk.bi = pack<T>(b_ih.unsqueeze(1), false, GP, L);
  pk.bs = pack<T>(b_hh.unsqueeze(1), false, GP, L);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < (gru ? 2 * H : gH); ++j) pk.bs[n * (GP + L) + j] += pk.bi[n * (GP + L) + j];
  if (backward) {
    pk.wi = pack<T>(w_ih, false, a.IP);
    pk.wh = pack<T>(w_hh, false, a.HP);
  }
  a.x = x.data_ptr<T>(), a.wiT = pk.wiT.data(), a.wx = pk.wx.data(), a.bs = pk.bs.data(), a.bi = pk.bi.data();
  a.wi = pk.wi.data(), a.wh = pk.wh.data();
  return a;
}

// Returns {out [N,B,T,H] (or [B,T,H] like x; without T if last_only), and if save the stacked act [N,T,B,4H]
// and state [N,T,B,SH] for the backward (else empty)}.
std::vector<at::Tensor> gates_forward(const at::Tensor& x_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                                      const at::Tensor& b_ih_, const at::Tensor& b_hh_, bool gru, bool save,
                                      bool last_only, int64_t isa_req) {
  at::NoGradGuard no_grad;
  const bool single = x_.dim() == 3;
  const at::Tensor x = stacked(x_, single).contiguous(), w_ih = stacked(w_ih_, single),
                   w_hh = stacked(w_hh_, single), b_ih = stacked(b_ih_, single), b_hh = stacked(b_hh_, single);
  check_inputs(x, w_ih, w_hh, b_ih, b_hh, gru ? 3 : 4);
  const Isa isa = resolve_isa(isa_req);
  const int64_t N = x.size(0), B = x.size(1), T_ = x.size(2), H = w_hh.size(2);
  const at::TensorOptions opt = x.options();
  TORCH_CHECK(!last_only || T_ > 0, "fused_gates: last_only needs at least one time step");
  at::Tensor out = last_only ? at::empty({N, B, H}, opt) : at::empty({N, B, T_, H}, opt);
  at::Tensor act = save ? at::empty({N, T_, B, 4 * H}, opt) : at::empty({0}, opt);
  at::Tensor state = save ? at::empty({N, T_, B, (gru ? 1 : 2) * H}, opt) : at::empty({0}, opt);
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_gates_forward", [&] {
      using T = scalar_t;
      Packed<T> pk;
      Args<T> a = make_args<T>(x, w_ih, w_hh, b_ih, b_hh, isa, false, pk);
      a.out = out.data_ptr<T>(), a.out_last = last_only;
      a.act = save ? act.data_ptr<T>() : nullptr;
      a.state = save ? state.data_ptr<T>() : nullptr;
      auto fn = gru ? forward_generic<T, true> : forward_generic<T, false>;
#if IRNN_X86
      if (isa == kAvx512) fn = gru ? forward_avx512<T, true> : forward_avx512<T, false>;
      if (isa == kAvx2) fn = gru ? forward_avx2<T, true> : forward_avx2<T, false>;
#endif
      for_groups(N, B, a.group, a.groups, [&](int64_t n, int64_t r0, int64_t r1, int64_t) { fn(a, n, r0, r1); });
    });
  }
  // act and state stay stacked: only the backward reads them.
  return {single ? out.squeeze(0) : out, act, state};
}

// Returns {dx or empty, dw_ih, dw_hh, db_ih, db_hh}, shaped like x, w_ih, w_hh, b_ih, b_hh. act, state:
// the forward's saved results (always stacked).
std::vector<at::Tensor> gates_backward(const at::Tensor& gout_, const at::Tensor& x_, const at::Tensor& w_ih_,
                                       const at::Tensor& w_hh_, const at::Tensor& b_ih_, const at::Tensor& b_hh_,
                                       const at::Tensor& act, const at::Tensor& state, bool gru, bool need_x,
                                       int64_t isa_req) {
  at::NoGradGuard no_grad;
  const bool single = x_.dim() == 3;
  const at::Tensor x = stacked(x_, single).contiguous(), w_ih = stacked(w_ih_, single),
                   w_hh = stacked(w_hh_, single), b_ih = stacked(b_ih_, single), b_hh = stacked(b_hh_, single);
  check_inputs(x, w_ih, w_hh, b_ih, b_hh, gru ? 3 : 4);
  const Isa isa = resolve_isa(isa_req);
  const int64_t N = x.size(0), B = x.size(1), T_ = x.size(2), H = w_hh.size(2), I = x.size(3);
  const std::vector<int64_t> saved_shape{N, T_, B, 4 * H}, state_shape{N, T_, B, (gru ? 1 : 2) * H};
  TORCH_CHECK(act.is_contiguous() && act.sizes() == at::IntArrayRef(saved_shape) && state.is_contiguous() &&
                  state.sizes() == at::IntArrayRef(state_shape),
              "fused_gates: act and state must be the forward's saved results");
  // grad_out: dL/dout [N,B,T,H] (or without N), or dL/dh_{T-1} alone (without T).
  std::vector<int64_t> out_shape{B, T_, H}, last_shape{B, H};
  if (!single) out_shape.insert(out_shape.begin(), N), last_shape.insert(last_shape.begin(), N);
  const bool g_last = gout_.sizes() == at::IntArrayRef(last_shape);
  TORCH_CHECK(g_last || gout_.sizes() == at::IntArrayRef(out_shape), "fused_gates: grad_out must be ",
              at::IntArrayRef(out_shape), " or ", at::IntArrayRef(last_shape), ", got ", gout_.sizes());
  at::Tensor gout = stacked(gout_, single);
  if (gout.scalar_type() != x.scalar_type()) gout = gout.to(x.scalar_type());
  if (gout.stride(-1) != 1) gout = gout.contiguous();
  const at::TensorOptions opt = x.options();
  const int64_t gH = w_hh.size(1);
  at::Tensor dx = need_x ? at::zeros({N, B, T_, I}, opt) : at::empty({0}, opt);
  at::Tensor dw_ih = at::zeros({N, gH, I}, opt), dw_hh = at::zeros({N, gH, H}, opt);
  at::Tensor db_ih = at::zeros({N, gH}, opt), db_hh = at::zeros({N, gH}, opt);
  if (N * B * T_ * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_gates_backward", [&] {
      using T = scalar_t;
      Packed<T> pk;
      Args<T> a = make_args<T>(x, w_ih, w_hh, b_ih, b_hh, isa, true, pk);
      a.act = const_cast<T*>(act.data_ptr<T>()), a.state = const_cast<T*>(state.data_ptr<T>());
      a.g = gout.data_ptr<T>(), a.g_n = gout.stride(0), a.g_b = gout.stride(1);
      a.g_t = g_last ? 0 : gout.stride(2), a.g_last = g_last;
      a.dx = need_x ? dx.data_ptr<T>() : nullptr;
      a.PW = (H + I + 2) * a.GP;
      std::vector<T> part(N * a.groups * a.PW + 64, T(0));
      a.part = part.data();
      auto fn = gru ? backward_generic<T, true> : backward_generic<T, false>;
#if IRNN_X86
      if (isa == kAvx512) fn = gru ? backward_avx512<T, true> : backward_avx512<T, false>;
      if (isa == kAvx2) fn = gru ? backward_avx2<T, true> : backward_avx2<T, false>;
#endif
      for_groups(N, B, a.group, a.groups, [&](int64_t n, int64_t r0, int64_t r1, int64_t item) {
        fn(a, n, r0, r1, item);
      });
      // Model n's groups' partials added in group order, then transposed into PyTorch's layouts.
      const int64_t GP = a.GP, PW = a.PW, G = a.groups;
      T *pwh = dw_hh.data_ptr<T>(), *pwi = dw_ih.data_ptr<T>(), *pbi = db_ih.data_ptr<T>(), *pbh = db_hh.data_ptr<T>();
      for (int64_t n = 0; n < N; ++n) {
        const T* p0 = part.data() + n * G * PW;
        auto sum = [&](int64_t off) {
          T v = p0[off];
          for (int64_t g = 1; g < G; ++g) v += p0[g * PW + off];
          return v;
        };
        for (int64_t k = 0; k < H; ++k)
          for (int64_t j = 0; j < gH; ++j) pwh[(n * gH + j) * H + k] = sum(k * GP + j);
        for (int64_t i = 0; i < I; ++i)
          for (int64_t j = 0; j < gH; ++j) pwi[(n * gH + j) * I + i] = sum((H + i) * GP + j);
        for (int64_t j = 0; j < gH; ++j) {
          pbi[n * gH + j] = sum((H + I) * GP + j);
          pbh[n * gH + j] = sum((H + I + 1) * GP + j);
        }
      }
    });
  }
  std::vector<at::Tensor> grads{dx, dw_ih, dw_hh, db_ih, db_hh};
  if (single)
    for (at::Tensor& g : grads)
      if (g.numel() > 0 || g.dim() > 1) g = g.squeeze(0);
  return grads;
}

int64_t best_isa() { return resolve_isa(kAuto); }
int64_t rows_per_group(int64_t B) { return group_rows(B); }

}  // namespace

// Ops under torch.ops.irnn_gates. Tensors a call did not compute come back empty (numel 0).
TORCH_LIBRARY(irnn_gates, m) {
  m.def("forward(Tensor x, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, bool gru, bool save, bool last_only, int isa) "
        "-> Tensor[]",
        &gates_forward);
  m.def("backward(Tensor grad_out, Tensor x, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, "
        "Tensor act, Tensor state, bool gru, bool need_x, int isa) -> Tensor[]",
        &gates_backward);
  m.def("best_isa() -> int", &best_isa);
  m.def("group_rows(int batch) -> int", &rows_per_group);
}
