// IndRNN's elementwise recurrence (Li et al. 2018), forward and backward through time, over raw pointers.
//
//   h_t = relu(p_t + u * h_{t-1}),  h_{-1} = 0,   p = W x + b precomputed by one matrix product.
//
// Every unit of every sequence is independent, so each (row, unit) runs its own scalar loop over time
// with no reduction across threads; du sums each row's partial in row order afterwards, so the numbers
// are bitwise the same for any thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

namespace {

at::Tensor indrnn_forward(const at::Tensor& pre_in, const at::Tensor& u_in) {
  TORCH_CHECK(pre_in.dim() == 3, "pre must be [B, T, H]");
  TORCH_CHECK(u_in.dim() == 1 && u_in.size(0) == pre_in.size(2), "u must be [H]");
  at::Tensor pre = pre_in.contiguous(), u = u_in.to(pre.scalar_type()).contiguous();
  const int64_t B = pre.size(0), T = pre.size(1), H = pre.size(2);
  at::Tensor out = at::empty_like(pre);
  if (B == 0 || T == 0 || H == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "indrnn_forward", [&] {
    const scalar_t* P = pre.data_ptr<scalar_t>();
    const scalar_t* U = u.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* p = P + b * T * H;
        scalar_t* o = O + b * T * H;
        for (int64_t j = 0; j < H; ++j) o[j] = p[j] > scalar_t(0) ? p[j] : scalar_t(0);  // h_{-1} = 0
        for (int64_t t = 1; t < T; ++t) {  // h_t in place of out, read back as h_{t-1}
          const scalar_t* prev = o + (t - 1) * H;
          for (int64_t j = 0; j < H; ++j) {
            scalar_t v = p[t * H + j] + U[j] * prev[j];
            o[t * H + j] = v > scalar_t(0) ? v : scalar_t(0);
          }
        }
      }
    });
  });
  return out;
}

// grad_out: dL/dh_t from above [B, T, H]; out: the forward's h. Returns dL/dp [B, T, H] and dL/du [H].
std::vector<at::Tensor> indrnn_backward(const at::Tensor& grad_in, const at::Tensor& out_in, const at::Tensor& u_in) {
  at::Tensor grad = grad_in.contiguous(), out = out_in.contiguous(), u = u_in.to(out.scalar_type()).contiguous();
  const int64_t B = out.size(0), T = out.size(1), H = out.size(2);
  at::Tensor dpre = at::empty_like(out);
  at::Tensor du_rows = at::zeros({B, H}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "indrnn_backward", [&] {
    const scalar_t* G = grad.data_ptr<scalar_t>();
    const scalar_t* O = out.data_ptr<scalar_t>();
    const scalar_t* U = u.data_ptr<scalar_t>();
    scalar_t* D = dpre.data_ptr<scalar_t>();
    scalar_t* DU = du_rows.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> carry(H);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(carry.begin(), carry.end(), scalar_t(0));
        scalar_t* du = DU + b * H;
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t at = (b * T + t) * H;
          for (int64_t j = 0; j < H; ++j) {
            scalar_t d = O[at + j] > scalar_t(0) ? G[at + j] + carry[j] : scalar_t(0);
            D[at + j] = d;
            carry[j] = d * U[j];
          }
          if (t > 0)  // du = sum_t d_t * h_{t-1}; h_{-1} = 0 adds nothing
            for (int64_t j = 0; j < H; ++j) du[j] += D[at + j] * O[at - H + j];
        }
      }
    });
  });
  at::Tensor du = at::zeros({H}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "indrnn_du", [&] {
    const scalar_t* DU = du_rows.data_ptr<scalar_t>();
    scalar_t* d = du.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)  // rows in order: the same sum for any thread count
      for (int64_t j = 0; j < H; ++j) d[j] += DU[b * H + j];
  });
  return {dpre, du};
}

}  // namespace

TORCH_LIBRARY(irnn_indrnn, m) {
  m.def("forward(Tensor pre, Tensor u) -> Tensor", &indrnn_forward);
  m.def("backward(Tensor grad_out, Tensor out, Tensor u) -> Tensor[]", &indrnn_backward);
}
