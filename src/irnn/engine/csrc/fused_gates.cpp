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
//   forward, per step:   gx = x_t W_ih^T,  hh = h_{t-1} W_hh^T, then the gates and the cell update;
//   backward, per step:  the gate gradients dA (input side) and dB (recurrent side; equal for the LSTM),
//                        dW_hh^T += h_{t-1}^T dB and dW_ih^T += x_t^T dA while both are in L1,
//                        db += the rows of dA / dB, dx_t = dA W_ih, dh_{t-1} = dB W_hh (+ dh_t * z for the GRU).
// Sigmoid and tanh come from one vectorised exp (Cody-Waite reduction and a Taylor polynomial, ~1 ulp),
// the same code for every lane, so no element depends on where it sits in a vector.
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
// gH = 4H (LSTM) or 3H (GRU); out [N,B,T,H]; saved act [N,B,T,4H] (LSTM: i f g o after their
// nonlinearities; GRU: r z n and hn = h_{t-1} W_hn^T + b_hn); saved cell [N,B,T,H] (LSTM: c_t).
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
#include <xmmintrin.h>
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
    vec v = zero();
    std::memcpy(&v, p, m * sizeof(T));
    return v;
  }
  static IRNN_INLINE void store_n(T* p, vec v, int64_t m) {
    if (m >= L) return store(p, v);
    std::memcpy(p, &v, m * sizeof(T));
  }

  // exp(x) for x clamped to the finite range: x = n ln2 + r, |r| <= ln2/2, e^r by a Taylor polynomial
  // (degree 7 for float, 13 for double: below 1 ulp of truncation error), 2^n through the exponent bits.
  static IRNN_INLINE vec exp(vec x) {
    constexpr bool f32 = std::is_same<T, float>::value;
    const T lo = f32 ? T(-87.3) : T(-708.3), hi = f32 ? T(88.3) : T(709.0);
    const T magic = f32 ? T(12582912.0) : T(6755399441055744.0);  // 1.5 * 2^mantissa: rounds to an integer
    const T ln2_hi = f32 ? T(0.693359375) : T(6.93147180369123816490e-01);
    const T ln2_lo = f32 ? T(-2.12194440e-4) : T(1.90821492927058770002e-10);
    x = x < splat(lo) ? splat(lo) : x;
    x = x > splat(hi) ? splat(hi) : x;
    const vec n = (x * splat(T(1.4426950408889634)) + splat(magic)) - splat(magic);
    vec r = x - n * splat(ln2_hi);
    r = r - n * splat(ln2_lo);
    constexpr int deg = f32 ? 7 : 13;
    T coef[deg + 1];
    coef[0] = 1;
    for (int k = 1; k <= deg; ++k) coef[k] = coef[k - 1] / T(k);
    vec p = splat(coef[deg]);
#pragma GCC unroll 16
    for (int k = deg - 1; k >= 0; --k) p = p * r + splat(coef[k]);
    const ivec e = (__builtin_convertvector(n, ivec) + (f32 ? 127 : 1023)) << (f32 ? 23 : 52);
    return p * (vec)e;
  }
  static IRNN_INLINE vec sigmoid(vec x) { return splat(T(1)) / (splat(T(1)) + exp(-x)); }
  static IRNN_INLINE vec tanh(vec x) { return splat(T(1)) - splat(T(2)) / (splat(T(1)) + exp(x + x)); }
};

// ------------------------------------------------------------------------------------------------
// The micro-kernel: for r < RB, c < CB vectors:
//   C[r*ldc + c*L ...] = (Acc ? C[...] : 0) + sum_{k < K} A[r*lda + k*ks] * M[k*ldm + c*L ...]
// in k order. RB x CB accumulators stay in registers; each k loads CB vectors of M and broadcasts RB
// scalars of A. (lda, ks) let A be row-major (lda = row stride, ks = 1) or read transposed (lda = 1).
template <typename T, int VB, int RB, int CB, bool Acc>
IRNN_INLINE void tile(const T* A, int64_t lda, int64_t ks, int64_t K, const T* M, int64_t ldm, T* C, int64_t ldc) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  vec acc[RB][CB];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) acc[r][c] = Acc ? S::load(C + r * ldc + c * S::L) : S::zero();
  for (int64_t k = 0; k < K; ++k) {
    const T* m = M + k * ldm;
    vec w[CB];
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) w[c] = S::load(m + c * S::L);
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      const vec a = S::splat(A[r * lda + k * ks]);
#pragma GCC unroll 16
      for (int c = 0; c < CB; ++c) acc[r][c] += a * w[c];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) S::store(C + r * ldc + c * S::L, acc[r][c]);
}

// One block of CB vector columns over all R rows: RBMAX rows at a time, then 4, 2, 1.
template <typename T, int VB, int RBMAX, int CB, bool Acc>
IRNN_INLINE void col_block(const T* A, int64_t lda, int64_t ks, int64_t R, int64_t K, const T* M, int64_t ldm, T* C,
                           int64_t ldc) {
  int64_t r = 0;
  for (; r + RBMAX <= R; r += RBMAX) tile<T, VB, RBMAX, CB, Acc>(A + r * lda, lda, ks, K, M, ldm, C + r * ldc, ldc);
  if constexpr (RBMAX > 4)
    if (R - r >= 4) { tile<T, VB, 4, CB, Acc>(A + r * lda, lda, ks, K, M, ldm, C + r * ldc, ldc); r += 4; }
  if constexpr (RBMAX > 2)
    if (R - r >= 2) { tile<T, VB, 2, CB, Acc>(A + r * lda, lda, ks, K, M, ldm, C + r * ldc, ldc); r += 2; }
  if constexpr (RBMAX > 1)
    if (R - r >= 1) tile<T, VB, 1, CB, Acc>(A + r * lda, lda, ks, K, M, ldm, C + r * ldc, ldc);
}

// The last nv < CBMAX vector columns.
template <typename T, int VB, int RBMAX, int CB, bool Acc>
IRNN_INLINE void col_tail(int64_t nv, const T* A, int64_t lda, int64_t ks, int64_t R, int64_t K, const T* M,
                          int64_t ldm, T* C, int64_t ldc) {
  if constexpr (CB >= 1) {
    if (nv == CB) return col_block<T, VB, RBMAX, CB, Acc>(A, lda, ks, R, K, M, ldm, C, ldc);
    col_tail<T, VB, RBMAX, CB - 1, Acc>(nv, A, lda, ks, R, K, M, ldm, C, ldc);
  }
}

// C[R, nv*L] (+)= A[R, K] M[K, nv*L]; column blocks outermost so a [K, CB*L] panel of M stays in L1
// while every row block uses it.
template <typename T, int VB, int RBMAX, int CBMAX, bool Acc>
IRNN_INLINE void gemm(const T* A, int64_t lda, int64_t ks, int64_t R, int64_t K, const T* M, int64_t ldm, int64_t nv,
                      T* C, int64_t ldc) {
  constexpr int L = Simd<T, VB>::L;
  int64_t c = 0;
  for (; c + CBMAX <= nv; c += CBMAX) col_block<T, VB, RBMAX, CBMAX, Acc>(A, lda, ks, R, K, M + c * L, ldm, C + c * L, ldc);
  if (c < nv) col_tail<T, VB, RBMAX, CBMAX - 1, Acc>(nv - c, A, lda, ks, R, K, M + c * L, ldm, C + c * L, ldc);
}

// ------------------------------------------------------------------------------------------------
template <typename T>
struct Args {
  int64_t B, T_, I, H, gH;  // gH: the gate width, 4H or 3H
  int64_t GP, HP, IP;       // gH, H, I rounded up to the vector width (row strides of packed/scratch arrays)
  int64_t group;            // rows per group (the last group of a model may be smaller)
  int64_t groups;           // groups per model
  const T* x;               // [N,B,T,I]
  const T* wiT;             // [N,I,GP]   W_ih^T, zero-padded
  const T* whT;             // [N,H,GP]   W_hh^T
  const T* bi;              // [N,GP+L]   b_ih
  const T* bh;              // [N,GP+L]   b_hh
  T* out;                   // [N,B,T,H]
  T* act;                   // [N,B,T,4H] or null (forward without saving)
  T* cell;                  // [N,B,T,H] (LSTM) or null
  // backward only
  const T* g; int64_t g_n, g_b, g_t; bool g_last;  // dL/dout strides, or dL/dh_{T-1} only [N,B,H]
  const T* wh;              // [N,gH,HP]  W_hh
  const T* wi;              // [N,gH,IP]  W_ih
  T* dx;                    // [N,B,T,I] or null
  T* part;                  // [items, PW]: per group dW_hh^T [H,GP], dW_ih^T [I,GP], db_ih [GP], db_hh [GP]
  int64_t PW;
};

// Rows per group: a function of B alone (never of the thread count), so the sums do not depend on it.
// Groups of 8-16 rows: big enough for the per-step weight-gradient updates (K = rows) to be efficient,
// small enough that a batch of 16 or 32 gives two threads a group each.
int64_t group_rows(int64_t B) {
  if (B <= 8) return std::max<int64_t>(B, 1);
  const int64_t half = (B + 1) / 2;
  return std::min<int64_t>(16, std::max<int64_t>(8, (half + 3) / 4 * 4));
}

// Zero-initialised scratch with a vector of slack after it (the epilogue reads whole vectors at gate offsets).
template <typename T>
struct Scratch {
  std::vector<T> buf;
  explicit Scratch(int64_t n) : buf(n + 64, T(0)) {}
  T* p() { return buf.data(); }
};

template <typename T, int VB, int RBMAX, int CBMAX, bool GRU>
IRNN_INLINE void forward_group(const Args<T>& a, int64_t n, int64_t r0, int64_t r1) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  constexpr int L = S::L;
  const int64_t R = r1 - r0, H = a.H, I = a.I, T_ = a.T_, GP = a.GP, HP = a.HP, gH = a.gH;
  const T* wiT = a.wiT + n * I * GP;
  const T* whT = a.whT + n * H * GP;
  const T* bi = a.bi + n * (GP + L);
  const T* bh = a.bh + n * (GP + L);
  Scratch<T> gx_s(R * GP), hh_s(R * GP), hs_s(R * HP), cs_s(R * HP);
  T *gx = gx_s.p(), *hh = hh_s.p(), *hs = hs_s.p(), *cs = cs_s.p();
  const vec one = S::splat(T(1));
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t row0 = (n * a.B + r0) * T_ + t;  // (n, b = r0, t)
    gemm<T, VB, RBMAX, CBMAX, false>(a.x + row0 * I, T_ * I, 1, R, I, wiT, GP, GP / L, gx, GP);
    if (t) gemm<T, VB, RBMAX, CBMAX, false>(hs, HP, 1, R, H, whT, GP, GP / L, hh, GP);
    for (int64_t r = 0; r < R; ++r) {
      const T* gxr = gx + r * GP;
      const T* hhr = hh + r * GP;
      T* hr = hs + r * HP;
      T* cr = cs + r * HP;
      const int64_t row = row0 + r * T_;
      T* orow = a.out + row * H;
      T* arow = a.act ? a.act + row * 4 * H : nullptr;
      for (int64_t j = 0; j < H; j += L) {
        const int64_t m = H - j;
        auto pre = [&](int64_t q) {  // x W_i^T + b_i + h W_h^T + b_h for gate q's units j...
          const int64_t o = q * H + j;
          const vec v = S::load(gxr + o) + S::load(bi + o);
          return t ? v + (S::load(hhr + o) + S::load(bh + o)) : v + S::load(bh + o);
        };
        vec h;
        if constexpr (!GRU) {
          const vec i = S::sigmoid(pre(0)), f = S::sigmoid(pre(1)), g = S::tanh(pre(2)), o = S::sigmoid(pre(3));
          const vec c = f * S::load(cr + j) + i * g;  // cs holds c_{t-1} (zero at t = 0)
          h = o * S::tanh(c);
          S::store(cr + j, c);
          S::store_n(a.cell + row * H + j, c, m);
          if (arow) {
            S::store_n(arow + j, i, m), S::store_n(arow + H + j, f, m);
            S::store_n(arow + 2 * H + j, g, m), S::store_n(arow + 3 * H + j, o, m);
          }
        } else {
          const vec rg = S::sigmoid(pre(0)), z = S::sigmoid(pre(1));
          const int64_t on = 2 * H + j;
          const vec hn = t ? S::load(hhr + on) + S::load(bh + on) : S::load(bh + on);
          const vec nn = S::tanh(S::load(gxr + on) + S::load(bi + on) + rg * hn);
          h = (one - z) * nn + z * S::load(hr + j);  // hs holds h_{t-1} (zero at t = 0)
          if (arow) {
            S::store_n(arow + j, rg, m), S::store_n(arow + H + j, z, m);
            S::store_n(arow + 2 * H + j, nn, m), S::store_n(arow + 3 * H + j, hn, m);
          }
        }
        S::store(hr + j, h);
        S::store_n(orow + j, h, m);
      }
    }
  }
  (void)gH;
}

template <typename T, int VB, int RBMAX, int CBMAX, bool GRU>
IRNN_INLINE void backward_group(const Args<T>& a, int64_t n, int64_t r0, int64_t r1, int64_t item) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  constexpr int L = S::L;
  const int64_t R = r1 - r0, H = a.H, I = a.I, T_ = a.T_, GP = a.GP, HP = a.HP, IP = a.IP, gH = a.gH;
  const T* wh = a.wh + n * gH * HP;
  const T* wi = a.wi + n * gH * IP;
  T* dwh = a.part + item * a.PW;  // [H, GP] dW_hh^T
  T* dwi = dwh + H * GP;          // [I, GP] dW_ih^T
  T* dbi = dwi + I * GP;          // [GP]
  T* dbh = dbi + GP;              // [GP]
  Scratch<T> dA_s(R * GP), dB_s(GRU ? R * GP : 0), carry_s(R * HP), dc_s(R * HP), dx_s(a.dx ? R * IP : 0);
  T *dA = dA_s.p(), *dB = GRU ? dB_s.p() : dA, *carry = carry_s.p(), *dc = dc_s.p(), *dxs = dx_s.p();
  const vec one = S::splat(T(1));
  for (int64_t t = T_ - 1; t >= 0; --t) {
    const int64_t row0 = (n * a.B + r0) * T_ + t;
    const bool last = t == T_ - 1, has_g = last || !a.g_last;
    const T* g = a.g + n * a.g_n + r0 * a.g_b + (a.g_last ? 0 : t * a.g_t);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = row0 + r * T_;
      const T* gr = g + r * a.g_b;
      const T* ar = a.act + row * 4 * H;
      T* cy = carry + r * HP;
      T* dar = dA + r * GP;
      T* dbr = dB + r * GP;
      for (int64_t j = 0; j < H; j += L) {
        const int64_t m = H - j;
        vec dh = last ? S::zero() : S::load(cy + j);  // dL/dh_t through h_{t+1}
        if (has_g) dh += S::load_n(gr + j, m);
        if constexpr (!GRU) {
          const vec i = S::load_n(ar + j, m), f = S::load_n(ar + H + j, m), gg = S::load_n(ar + 2 * H + j, m),
                    o = S::load_n(ar + 3 * H + j, m);
          const vec c = S::load_n(a.cell + row * H + j, m);
          const vec cp = t ? S::load_n(a.cell + (row - 1) * H + j, m) : S::zero();
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
          const vec hp = t ? S::load_n(a.out + (row - 1) * H + j, m) : S::zero();
          const vec dnp = dh * (one - z) * (one - nn * nn);  // dL/d(n's pre-activation)
          const vec dr = dnp * hn * rg * (one - rg);
          const vec dz = dh * (hp - nn) * z * (one - z);
          S::store(cy + j, dh * z);  // dL/dh_{t-1} directly through h_t = ... + z h_{t-1}
          S::store_n(dar + j, dr, m), S::store_n(dar + H + j, dz, m), S::store_n(dar + 2 * H + j, dnp, m);
          S::store_n(dbr + j, dr, m), S::store_n(dbr + H + j, dz, m), S::store_n(dbr + 2 * H + j, dnp * rg, m);
        }
      }
    }
    // Bias gradients: the rows of dA (dB) added in row order.
    for (int64_t v = 0; v < GP; v += L) {
      vec sa = S::load(dbi + v), sb = S::load(dbh + v);
      for (int64_t r = 0; r < R; ++r) {
        sa += S::load(dA + r * GP + v);
        if (GRU) sb += S::load(dB + r * GP + v);
      }
      S::store(dbi + v, sa);
      if (GRU) S::store(dbh + v, sb);
    }
    // dW_ih^T += x_t^T dA, dW_hh^T += h_{t-1}^T dB: rank-R updates, k over this group's rows.
    gemm<T, VB, RBMAX, CBMAX, true>(a.x + row0 * I, 1, T_ * I, I, R, dA, GP, GP / L, dwi, GP);
    if (t) gemm<T, VB, RBMAX, CBMAX, true>(a.out + (row0 - 1) * H, 1, T_ * H, H, R, dB, GP, GP / L, dwh, GP);
    if (a.dx) {
      gemm<T, VB, RBMAX, CBMAX, false>(dA, GP, 1, R, gH, wi, IP, IP / L, dxs, IP);
      for (int64_t r = 0; r < R; ++r) std::copy_n(dxs + r * IP, I, a.dx + (row0 + r * T_) * I);
    }
    // dL/dh_{t-1} through the gates: dB W_hh, onto the GRU's direct term already in carry.
    if (t) gemm<T, VB, RBMAX, CBMAX, GRU>(dB, GP, 1, R, gH, wh, HP, HP / L, carry, HP);
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
  std::vector<T> wiT, whT, bi, bh, wi, wh;
};

template <typename T>
Args<T> make_args(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                  const at::Tensor& b_hh, Isa isa, bool backward, Packed<T>& pk) {
  Args<T> a{};
  const int64_t L = vector_len(isa, sizeof(T));
  a.B = x.size(1), a.T_ = x.size(2), a.I = x.size(3), a.H = w_hh.size(2), a.gH = w_hh.size(1);
  a.GP = round_up(a.gH, L), a.HP = round_up(a.H, L), a.IP = round_up(a.I, L);
  a.group = group_rows(a.B), a.groups = (a.B + a.group - 1) / a.group;
  pk.wiT = pack<T>(w_ih, true, a.GP);
  pk.whT = pack<T>(w_hh, true, a.GP);
  pk.bi = pack<T>(b_ih.unsqueeze(1), false, a.GP, L);
  pk.bh = pack<T>(b_hh.unsqueeze(1), false, a.GP, L);
  if (backward) {
    pk.wi = pack<T>(w_ih, false, a.IP);
    pk.wh = pack<T>(w_hh, false, a.HP);
  }
  a.x = x.data_ptr<T>(), a.wiT = pk.wiT.data(), a.whT = pk.whT.data(), a.bi = pk.bi.data(), a.bh = pk.bh.data();
  a.wi = pk.wi.data(), a.wh = pk.wh.data();
  return a;
}

// Returns {out [N,B,T,H], act [N,B,T,4H] (empty unless save), cell [N,B,T,H] (LSTM; else empty)}.
std::vector<at::Tensor> gates_forward(const at::Tensor& x_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                                      const at::Tensor& b_ih_, const at::Tensor& b_hh_, bool gru, bool save,
                                      int64_t isa_req) {
  at::NoGradGuard no_grad;
  const bool single = x_.dim() == 3;
  const at::Tensor x = stacked(x_, single).contiguous(), w_ih = stacked(w_ih_, single),
                   w_hh = stacked(w_hh_, single), b_ih = stacked(b_ih_, single), b_hh = stacked(b_hh_, single);
  check_inputs(x, w_ih, w_hh, b_ih, b_hh, gru ? 3 : 4);
  const Isa isa = resolve_isa(isa_req);
  const int64_t N = x.size(0), B = x.size(1), T_ = x.size(2), H = w_hh.size(2);
  const at::TensorOptions opt = x.options();
  at::Tensor out = at::empty({N, B, T_, H}, opt);
  at::Tensor act = save ? at::empty({N, B, T_, 4 * H}, opt) : at::empty({0}, opt);
  at::Tensor cell = gru ? at::empty({0}, opt) : at::empty({N, B, T_, H}, opt);
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_gates_forward", [&] {
      using T = scalar_t;
      Packed<T> pk;
      Args<T> a = make_args<T>(x, w_ih, w_hh, b_ih, b_hh, isa, false, pk);
      a.out = out.data_ptr<T>();
      a.act = save ? act.data_ptr<T>() : nullptr;
      a.cell = gru ? nullptr : cell.data_ptr<T>();
      auto fn = gru ? forward_generic<T, true> : forward_generic<T, false>;
#if IRNN_X86
      if (isa == kAvx512) fn = gru ? forward_avx512<T, true> : forward_avx512<T, false>;
      if (isa == kAvx2) fn = gru ? forward_avx2<T, true> : forward_avx2<T, false>;
#endif
      for_groups(N, B, a.group, a.groups, [&](int64_t n, int64_t r0, int64_t r1, int64_t) { fn(a, n, r0, r1); });
    });
  }
  if (single) {
    out = out.squeeze(0);
    if (act.numel()) act = act.squeeze(0);
    if (cell.numel()) cell = cell.squeeze(0);
  }
  return {out, act, cell};
}

// Returns {dx or empty, dw_ih, dw_hh, db_ih, db_hh}, shaped like x, w_ih, w_hh, b_ih, b_hh.
std::vector<at::Tensor> gates_backward(const at::Tensor& gout_, const at::Tensor& x_, const at::Tensor& w_ih_,
                                       const at::Tensor& w_hh_, const at::Tensor& b_ih_, const at::Tensor& b_hh_,
                                       const at::Tensor& out_, const at::Tensor& act_, const at::Tensor& cell_,
                                       bool gru, bool need_x, int64_t isa_req) {
  at::NoGradGuard no_grad;
  const bool single = out_.dim() == 3;
  const at::Tensor x = stacked(x_, single).contiguous(), w_ih = stacked(w_ih_, single),
                   w_hh = stacked(w_hh_, single), b_ih = stacked(b_ih_, single), b_hh = stacked(b_hh_, single),
                   out = stacked(out_, single), act = stacked(act_, single);
  check_inputs(x, w_ih, w_hh, b_ih, b_hh, gru ? 3 : 4);
  const Isa isa = resolve_isa(isa_req);
  const int64_t N = out.size(0), B = out.size(1), T_ = out.size(2), H = out.size(3), I = x.size(3);
  TORCH_CHECK(out.is_contiguous() && act.is_contiguous() && act.dim() == 4 && act.size(3) == 4 * H,
              "fused_gates: out and act must be the forward's (saved) results");
  const at::Tensor cell = gru ? cell_ : stacked(cell_, single);
  TORCH_CHECK(gru || (cell.is_contiguous() && cell.sizes() == out.sizes()), "fused_gates: cell must be the forward's");
  const bool g_last = gout_.dim() == out_.dim() - 1;
  std::vector<int64_t> last_shape = out_.sizes().vec();
  last_shape.erase(last_shape.end() - 2);
  TORCH_CHECK(g_last ? gout_.sizes() == at::IntArrayRef(last_shape) : gout_.sizes() == out_.sizes(),
              "fused_gates: grad_out must be ", out_.sizes(), " or ", at::IntArrayRef(last_shape), ", got ",
              gout_.sizes());
  at::Tensor gout = stacked(gout_, single);
  if (gout.scalar_type() != out.scalar_type()) gout = gout.to(out.scalar_type());
  if (gout.stride(-1) != 1) gout = gout.contiguous();
  const at::TensorOptions opt = out.options();
  const int64_t gH = w_hh.size(1);
  at::Tensor dx = need_x ? at::zeros({N, B, T_, I}, opt) : at::empty({0}, opt);
  at::Tensor dw_ih = at::zeros({N, gH, I}, opt), dw_hh = at::zeros({N, gH, H}, opt);
  at::Tensor db_ih = at::zeros({N, gH}, opt), db_hh = at::zeros({N, gH}, opt);
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fused_gates_backward", [&] {
      using T = scalar_t;
      Packed<T> pk;
      Args<T> a = make_args<T>(x, w_ih, w_hh, b_ih, b_hh, isa, true, pk);
      a.out = out.data_ptr<T>(), a.act = act.data_ptr<T>(), a.cell = gru ? nullptr : cell.data_ptr<T>();
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
  m.def("forward(Tensor x, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, bool gru, bool save, int isa) "
        "-> Tensor[]",
        &gates_forward);
  m.def("backward(Tensor grad_out, Tensor x, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, Tensor out, "
        "Tensor act, Tensor cell, bool gru, bool need_x, int isa) -> Tensor[]",
        &gates_backward);
  m.def("best_isa() -> int", &best_isa);
  m.def("group_rows(int batch) -> int", &rows_per_group);
}
