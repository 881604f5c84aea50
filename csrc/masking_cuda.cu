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
  using opmath_t = at::opmath_type<scalar_t>;  // float for half/bf16, double stays double
  const int64_t total = B * D;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / D, d = i - (i / D) * D;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = ids[b * sib + k * sik];
      if (!index_in_range(n, N)) continue;
      scalar_t* dst = dx + (b * N + n) * D + d;
      *dst = static_cast<scalar_t>(static_cast<opmath_t>(*dst) + static_cast<opmath_t>(grad[offset3(sg, b, k, d)]));
    }
  }
}

// One block per kept patch (b, k); its threads stride over the C*p*p output values,
// so a warp reads runs of p pixels of one image row and writes contiguously.
template <typename scalar_t>
__global__ void gather_patches_kernel(const scalar_t* __restrict__ images, const int64_t* __restrict__ ids,
                                      scalar_t* __restrict__ out, int64_t rows, int64_t K,
                                      int64_t num_patches, int64_t E, PatchGeom g, int64_t sib,
                                      int64_t sik) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int64_t b, k;
    split_row(r, K, b, k);
    const int64_t n = ids[b * sib + k * sik];
    if (!index_in_range(n, num_patches)) continue;
    const scalar_t* src = images + patch_origin(g, b, n);
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) out[r * E + e] = src[patch_element(g, e)];
  }
}

// One thread per (b, e): it walks the K kept patches of sample b, so a repeated
// patch accumulates in order and no atomics are needed (as drop_tokens_backward).
template <typename scalar_t>
__global__ void gather_patches_backward_kernel(const scalar_t* __restrict__ grad,
                                               const int64_t* __restrict__ ids, scalar_t* __restrict__ dimages,
                                               int64_t B, int64_t K, int64_t num_patches, int64_t E,
                                               PatchGeom g, Strides3 sg, int64_t sib, int64_t sik) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t total = B * E;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / E, e = i - (i / E) * E;
    const int64_t within = patch_element(g, e);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = ids[b * sib + k * sik];
      if (!index_in_range(n, num_patches)) continue;
      scalar_t* dst = dimages + patch_origin(g, b, n) + within;
      *dst = static_cast<scalar_t>(static_cast<opmath_t>(*dst) +
                                   static_cast<opmath_t>(grad[offset3(sg, b, k, e)]));
    }
  }
}

// One block per output row (b, n): the kept token that owns it (inv[b, n] = k), else fill.
template <typename scalar_t>
__global__ void restore_tokens_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ inv,
                                      const scalar_t* __restrict__ fill, scalar_t* __restrict__ out,
                                      int64_t rows, int64_t N, int64_t K, int64_t D, Strides3 sx,
                                      int64_t sf) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int64_t b, n;
    split_row(r, N, b, n);
    const int64_t k = inv[r];
    const bool kept = index_in_range(k, K);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
      out[r * D + d] = kept ? x[offset3(sx, b, k, d)] : fill[d * sf];
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
  check_drop_backward_inputs(grad, ids, num_tokens, "drop_tokens_backward");
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2);
  auto dx = at::zeros({B, num_tokens, D}, grad.options());
  if (grad.numel() == 0) return dx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "drop_tokens_backward_cuda", [&] {
    drop_tokens_backward_kernel<scalar_t><<<blocks_for((B * D + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), dx.mutable_data_ptr<scalar_t>(),
        B, K, num_tokens, D, strides3(grad), ids.stride(0), ids.stride(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

at::Tensor gather_patches_cuda(const at::Tensor& images, const at::Tensor& ids, int64_t patch_size) {
  check_patch_inputs(images, ids, patch_size, "gather_patches");
  c10::cuda::CUDAGuard guard(images.device());
  const int64_t B = images.size(0), C = images.size(1), K = ids.size(1), p = patch_size;
  const int64_t E = C * p * p;
  auto out = at::empty({B, K, E}, images.options());
  if (out.numel() == 0) return out;
  const PatchGeom g = patch_geom(images, p);
  const int64_t num_patches = (images.size(2) / p) * g.grid_w;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "gather_patches_cuda", [&] {
    gather_patches_kernel<scalar_t><<<blocks_for(B * K), kThreads, 0, stream>>>(
        images.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(),
        B * K, K, num_patches, E, g, ids.stride(0), ids.stride(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gather_patches_backward_cuda(const at::Tensor& grad, const at::Tensor& ids,
                                        at::IntArrayRef shape, int64_t patch_size) {
  check_patch_backward_inputs(grad, ids, shape, patch_size, "gather_patches_backward");
  c10::cuda::CUDAGuard guard(grad.device());
  auto dimages = at::zeros(shape, grad.options());
  const int64_t B = shape[0], C = shape[1], K = ids.size(1), p = patch_size, E = C * p * p;
  if (grad.numel() == 0) return dimages;
  const PatchGeom g = patch_geom(dimages, p);
  const int64_t num_patches = (shape[2] / p) * g.grid_w;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "gather_patches_backward_cuda", [&] {
    gather_patches_backward_kernel<scalar_t><<<blocks_for((B * E + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(), dimages.mutable_data_ptr<scalar_t>(),
        B, K, num_patches, E, g, strides3(grad), ids.stride(0), ids.stride(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dimages;
}

at::Tensor restore_tokens_cuda(const at::Tensor& x, const at::Tensor& ids, int64_t num_tokens,
                               const at::Tensor& fill) {
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor inv = check_restore_inputs(x, ids, num_tokens, fill, "restore_tokens");
  const int64_t B = x.size(0), K = x.size(1), D = x.size(2), N = num_tokens;
  auto out = at::empty({B, N, D}, x.options());
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "restore_tokens_cuda", [&] {
    restore_tokens_kernel<scalar_t><<<blocks_for(B * N), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), inv.const_data_ptr<int64_t>(), fill.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), B * N, N, K, D, strides3(x), fill.stride(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flipkern, CUDA, m) {
  m.impl("drop_tokens", &drop_tokens_cuda);
  m.impl("drop_tokens_backward", &drop_tokens_backward_cuda);
  m.impl("gather_patches", &gather_patches_cuda);
  m.impl("gather_patches_backward", &gather_patches_backward_cuda);
  m.impl("restore_tokens", &restore_tokens_cuda);
}

}  // namespace flipkern
