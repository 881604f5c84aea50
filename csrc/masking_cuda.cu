// Token dropping, CUDA kernels. Index math: masking_index.h (shared with the CPU
// kernel, which the CPU-only test suite runs). Host-side checks: checks.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10 stream/guard headers only: ATen/cuda/CUDAContext.h would also pull in the cuBLAS
// and cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "masking_index.h"

namespace flipkern {
namespace {

constexpr int kThreads = 256;

// Grid-stride over rows (b, k); the threads of a block stride over D, so reads
// of x and pos_embed rows are coalesced whenever D is the contiguous dimension.
template <typename scalar_t>
__global__ void drop_tokens_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ ids,
                                   const scalar_t* __restrict__ pos, scalar_t* __restrict__ out,
                                   int64_t rows, int64_t K, int64_t N, int64_t D, Strides3 sx,
                                   int64_t sib, int64_t sik, int64_t spn, int64_t spd) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int64_t b, k;
    split_row(r, K, b, k);
    const int64_t n = ids[b * sib + k * sik];
    if (!index_in_range(n, N)) continue;  // the host check rejects this; never read out of bounds
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      opmath_t v = static_cast<opmath_t>(x[offset3(sx, b, n, d)]);
      if (pos != nullptr) v += static_cast<opmath_t>(pos[n * spn + d * spd]);
      out[r * D + d] = static_cast<scalar_t>(v);
    }
  }
}

// One thread per (b, d): it walks the K kept rows of sample b, so repeated
// indices accumulate in order and no atomics are needed.
template <typename scalar_t>
__global__ void drop_tokens_backward_kernel(const scalar_t* __restrict__ grad,
                                            const int64_t* __restrict__ ids, scalar_t* __restrict__ dx,
                                            int64_t B, int64_t K, int64_t N, int64_t D, Strides3 sg,
                                            int64_t sib, int64_t sik) {
  const int64_t total = B * D;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / D, d = i - (i / D) * D;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = ids[b * sib + k * sik];
      if (!index_in_range(n, N)) continue;
      scalar_t* dst = dx + (b * N + n) * D + d;
      *dst = static_cast<scalar_t>(static_cast<float>(*dst) + static_cast<float>(grad[offset3(sg, b, k, d)]));
    }
  }
}

int blocks_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(work, 1), 65535));
}

at::Tensor drop_tokens_cuda(const at::Tensor& x, const at::Tensor& ids,
                            const std::optional<at::Tensor>& pos_embed) {
  check_drop_inputs(x, ids, pos_embed, "drop_tokens");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = ids.size(1);
  auto out = at::empty({B, K, D}, x.options());
  if (out.numel() == 0) return out;
  const bool has_pos = pos_embed.has_value();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "drop_tokens_cuda", [&] {
    drop_tokens_kernel<scalar_t><<<blocks_for(B * K), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
        has_pos ? pos_embed->const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
        B * K, K, N, D, strides3(x), ids.stride(0), ids.stride(1),
        has_pos ? pos_embed->stride(0) : 0, has_pos ? pos_embed->stride(1) : 0);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor drop_tokens_backward_cuda(const at::Tensor& grad, const at::Tensor& ids,
                                     int64_t num_tokens) {
  TORCH_CHECK(grad.dim() == 3, "flipkern.drop_tokens_backward: grad_out must be 3-D, got ",
              grad.dim(), "-D");
  check_same_device(grad, "grad_out", ids, "ids_keep", "drop_tokens_backward");
  check_keep_indices(ids, grad.size(0), num_tokens, "ids_keep", "drop_tokens_backward");
  TORCH_CHECK(ids.size(1) == grad.size(1), "flipkern.drop_tokens_backward: ids_keep has K = ",
              ids.size(1), " but grad_out has ", grad.size(1), " rows");
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2);
  auto dx = at::zeros({B, num_tokens, D}, grad.options());
  if (grad.numel() == 0) return dx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "drop_tokens_bwd_cuda", [&] {
    drop_tokens_backward_kernel<scalar_t><<<blocks_for((B * D + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), dx.mutable_data_ptr<scalar_t>(),
        B, K, num_tokens, D, strides3(grad), ids.stride(0), ids.stride(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(flipkern, CUDA, m) {
  m.impl("drop_tokens", &drop_tokens_cuda);
  m.impl("drop_tokens_backward", &drop_tokens_backward_cuda);
}

}  // namespace flipkern
