// Token dropping, CPU kernels. Index math: masking_index.h (shared with CUDA).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "masking_index.h"

namespace flipkern {
namespace {

at::Tensor drop_tokens_cpu(const at::Tensor& x, const at::Tensor& ids,
                           const std::optional<at::Tensor>& pos_embed) {
  check_drop_inputs(x, ids, pos_embed, "drop_tokens");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = ids.size(1);
  auto out = at::empty({B, K, D}, x.options());
  if (out.numel() == 0) return out;
  const auto sx = strides3(x);
  const bool has_pos = pos_embed.has_value();
  const int64_t spn = has_pos ? pos_embed->stride(0) : 0, spd = has_pos ? pos_embed->stride(1) : 0;
  auto ids_a = ids.accessor<int64_t, 2>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "drop_tokens_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* pp = has_pos ? pos_embed->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // One task per kept row (b, k): a contiguous copy of D values plus the position add.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
    at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        int64_t b, k;
        split_row(r, K, b, k);
        const int64_t n = ids_a[b][k];
        const scalar_t* xr = xp + offset3(sx, b, n, 0);
        scalar_t* orow = op + r * D;
        if (pp != nullptr) {
          const scalar_t* pr = pp + n * spn;
          if (sx.d == 1 && spd == 1) {
            for (int64_t d = 0; d < D; ++d)
              orow[d] = static_cast<scalar_t>(static_cast<opmath_t>(xr[d]) + static_cast<opmath_t>(pr[d]));
          } else {
            for (int64_t d = 0; d < D; ++d)
              orow[d] = static_cast<scalar_t>(static_cast<opmath_t>(xr[d * sx.d]) +
                                              static_cast<opmath_t>(pr[d * spd]));
          }
        } else if (sx.d == 1) {
          std::copy(xr, xr + D, orow);
        } else {
          for (int64_t d = 0; d < D; ++d) orow[d] = xr[d * sx.d];
        }
      }
    });
  });
  return out;
}

at::Tensor drop_tokens_backward_cpu(const at::Tensor& grad, const at::Tensor& ids,
                                    int64_t num_tokens) {
  TORCH_CHECK(grad.dim() == 3, "flipkern.drop_tokens_backward: grad_out must be 3-D, got ",
              grad.dim(), "-D");
  check_same_device(grad, "grad_out", ids, "ids_keep", "drop_tokens_backward");
  check_keep_indices(ids, grad.size(0), num_tokens, "ids_keep", "drop_tokens_backward");
  TORCH_CHECK(ids.size(1) == grad.size(1), "flipkern.drop_tokens_backward: ids_keep has K = ",
              ids.size(1), " but grad_out has ", grad.size(1), " rows");
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2);
  auto dx = at::zeros({B, num_tokens, D}, grad.options());
  if (grad.numel() == 0) return dx;
  const auto sg = strides3(grad);
  auto ids_a = ids.accessor<int64_t, 2>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "drop_tokens_bwd_cpu", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    // One task per sample: its rows are written by one thread only, so repeated
    // indices accumulate without atomics.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* gr = gp + offset3(sg, b, k, 0);
          scalar_t* dr = dp + (b * num_tokens + ids_a[b][k]) * D;
          for (int64_t d = 0; d < D; ++d) dr[d] += gr[d * sg.d];
        }
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(flipkern, CPU, m) {
  m.impl("drop_tokens", &drop_tokens_cpu);
  m.impl("drop_tokens_backward", &drop_tokens_backward_cpu);
}

}  // namespace flipkern
