// Contrastive losses (CLIP softmax, SigLIP sigmoid), CUDA kernels: forward and
// backward without the logits matrix. Chunk math, statistic merges, the element
// formulas and the loss assembly: loss_chunks.h (shared with the CPU kernel, which
// the CPU-only test suite runs). On CUDA the Triton kernels are the default; these
// are the C++ backend (use_backend("cuda")).
//
// A pass is S = scale * A @ B^T over rows A [r, D] and columns B [N, D]. Chunks of
// rows run one after the other, each as whole rows of logits [chunk, N] (a buffer of
// chunk x N, see default_chunk_size in flipkern/losses.py):
//   1. raw = A_chunk @ B^T through cuBLAS (at::mm; float16/bfloat16 inputs give a
//      float32 result, so the logits are never rounded to the input precision);
//   2. a fused kernel turns the chunk into statistics (forward: one block per row, an
//      online logsumexp or a softplus sum; for the square one-process CLIP matrix also
//      one thread per column merging the column logsumexp across chunks) or, in the
//      backward, into G' = scale * dLoss/dS in place plus per-row sums of G * raw and G
//      (the scale and bias gradients);
//   3. backward: dA_chunk = G' @ B and dB += G'^T @ A_chunk through cuBLAS.
// scale, bias and the incoming gradient stay on the device: no host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10 stream/guard headers only: ATen/cuda/CUDAContext.h would also pull in the cuBLAS
// and cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "loss_chunks.h"
#include "no_autocast.h"

namespace flipkern {
namespace {

using loss::Chunks;
using loss::OnlineLse;

constexpr int kThreads = 256;
constexpr const char* kClip = "clip_loss";
constexpr const char* kSiglip = "siglip_loss";

enum Kind : int { kSoftmax = 0, kSigmoid = 1 };

// ----------------------------------------------------------------------------- kernels

template <typename T>
__device__ void block_merge(OnlineLse<T>& st, T* sm, T* sl) {
  sm[threadIdx.x] = st.m;
  sl[threadIdx.x] = st.l;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      OnlineLse<T> a{sm[threadIdx.x], sl[threadIdx.x]}, o{sm[threadIdx.x + w], sl[threadIdx.x + w]};
      a.merge(o);
      sm[threadIdx.x] = a.m;
      sl[threadIdx.x] = a.l;
    }
    __syncthreads();
  }
  st = OnlineLse<T>{sm[0], sl[0]};
}

template <typename T>
__device__ T block_sum(T v, T* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  const T out = sh[0];
  __syncthreads();
  return out;
}

// One block per row of the chunk raw [nr, N]: out[i] = logsumexp_j (s * raw_ij) (softmax)
// or sum_j softplus(s * raw_ij + bias) (sigmoid).
template <typename T, int KIND>
__global__ void row_stats_kernel(const T* __restrict__ raw, int64_t N, const T* __restrict__ scale,
                                 const T* __restrict__ bias, T* __restrict__ out) {
  __shared__ T sm[kThreads], sl[kThreads];
  const T s = *scale;
  const T* r = raw + blockIdx.x * N;
  if (KIND == kSoftmax) {
    OnlineLse<T> st;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) st.add(s * r[j]);
    block_merge(st, sm, sl);
    if (threadIdx.x == 0) out[blockIdx.x] = st.value();
  } else {
    const T b = *bias;
    T acc = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) acc += loss::softplus(s * r[j] + b);
    acc = block_sum(acc, sm);
    if (threadIdx.x == 0) out[blockIdx.x] = acc;
  }
}

// One thread per column: merges the chunk's rows of s * raw into the running column
// logsumexp state (col_m, col_l). Chunks run in order, so each column has one writer.
template <typename T>
__global__ void col_stats_kernel(const T* __restrict__ raw, int64_t nr, int64_t N,
                                 const T* __restrict__ scale, T* __restrict__ col_m,
                                 T* __restrict__ col_l) {
  const T s = *scale;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < N;
       j += (int64_t)gridDim.x * blockDim.x) {
    OnlineLse<T> st{col_m[j], col_l[j]};
    for (int64_t i = 0; i < nr; ++i) st.add(s * raw[i * N + j]);  // coalesced across threads
    col_m[j] = st.m;
    col_l[j] = st.l;
  }
}

// One block per row of the chunk: raw [nr, N] -> G' = scale * G in place, G = dLoss/dS;
// part[0][i] = sum_j G_ij raw_ij, part[1][i] = sum_j G_ij.
template <typename T, int KIND>
__global__ void grad_kernel(T* __restrict__ raw, int64_t N, int64_t r0, int64_t offset,
                            const T* __restrict__ row_lse, const T* __restrict__ col_lse,
                            const T* __restrict__ scale, const T* __restrict__ bias,
                            const T* __restrict__ grad, T coef_div, T pos_mult,
                            T* __restrict__ part, int64_t nr) {
  __shared__ T sh[kThreads];
  const T s = *scale;
  const T coef = *grad / coef_div;
  const int64_t i = blockIdx.x;
  const int64_t pos = loss::positive_col(r0 + i, offset);
  T* r = raw + i * N;
  T dot = 0, sum = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const T x = r[j];
    T g = KIND == kSoftmax
              ? loss::clip_grad(s * x, row_lse[i], col_lse ? col_lse[j] : T(0), col_lse != nullptr, coef)
              : coef * loss::sigmoid(s * x + *bias);
    if (j == pos) g -= coef * pos_mult;
    dot += g * x;
    sum += g;
    r[j] = s * g;
  }
  dot = block_sum(dot, sh);
  sum = block_sum(sum, sh);
  if (threadIdx.x == 0) {
    part[i] = dot;
    part[nr + i] = sum;
  }
}

// ----------------------------------------------------------------------------- host side

int grid_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>((work + kThreads - 1) / kThreads, 1), 65535));
}

// a @ b^T-style products in the accumulation dtype: float16/bfloat16 operands give a
// float32 result (cuBLAS accumulates in float32 and never rounds to 16 bits).
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a, b, acc);
}

struct Pass {
  Kind kind;
  at::Tensor A, B;   // inputs in their own dtype: [r, D], [N, D]
  int64_t offset;    // positive column of row i is offset + i
};

// Forward statistics of one pass: per row [r] (lse or softplus sum); the column lse
// [N] too when col_lse is given.
void pass_stats(const Pass& p, const at::Tensor& scale, const at::Tensor& bias, int64_t chunk,
                at::Tensor& row_out, at::Tensor* col_lse) {
  const auto acc = row_out.scalar_type();
  const int64_t N = p.B.size(0);
  const Chunks rows{p.A.size(0), chunk};
  at::Tensor col_m, col_l;
  if (col_lse) {
    col_m = at::full({N}, -std::numeric_limits<double>::infinity(), row_out.options());
    col_l = at::zeros({N}, row_out.options());
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t k = 0; k < rows.count(); ++k) {
    const int64_t r0 = rows.begin(k), nr = rows.length(k);
    const auto raw = mm_acc(p.A.narrow(0, r0, nr), p.B.t(), acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "loss_row_stats_cuda", [&] {
      auto* out = row_out.mutable_data_ptr<scalar_t>() + r0;
      if (p.kind == kSoftmax)
        row_stats_kernel<scalar_t, kSoftmax><<<nr, kThreads, 0, stream>>>(
            raw.const_data_ptr<scalar_t>(), N, scale.const_data_ptr<scalar_t>(),
            bias.const_data_ptr<scalar_t>(), out);
      else
        row_stats_kernel<scalar_t, kSigmoid><<<nr, kThreads, 0, stream>>>(
            raw.const_data_ptr<scalar_t>(), N, scale.const_data_ptr<scalar_t>(),
            bias.const_data_ptr<scalar_t>(), out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (col_lse) {
        col_stats_kernel<scalar_t><<<grid_for(N), kThreads, 0, stream>>>(
            raw.const_data_ptr<scalar_t>(), nr, N, scale.const_data_ptr<scalar_t>(),
            col_m.mutable_data_ptr<scalar_t>(), col_l.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  if (col_lse) *col_lse = col_m + col_l.log();
}

struct PassGrad {
  Pass pass;
  at::Tensor row_lse, col_lse;   // softmax; col_lse only for the square CLIP matrix
  loss::GradCoef coef;           // coef = grad / div; positives get -coef * pos_mult
};

// dA [r, D] += scale * G @ B, dB [N, D] += scale * G^T @ A (both in the accumulation
// dtype); part_sum [2] += (sum G * raw, sum G).
void pass_backward(const PassGrad& pg, const at::Tensor& grad, const at::Tensor& scale,
                   const at::Tensor& bias, int64_t chunk, at::Tensor dA, at::Tensor& dB,
                   at::Tensor& part_sum) {
  const Pass& p = pg.pass;
  const auto acc = dB.scalar_type();
  const int64_t N = p.B.size(0);
  const Chunks rows{p.A.size(0), chunk};
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t k = 0; k < rows.count(); ++k) {
    const int64_t r0 = rows.begin(k), nr = rows.length(k);
    const auto a = p.A.narrow(0, r0, nr);
    auto G = mm_acc(a, p.B.t(), acc);
    auto part = at::empty({2, nr}, G.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "loss_grad_cuda", [&] {
      const scalar_t* lr = pg.row_lse.defined() ? pg.row_lse.const_data_ptr<scalar_t>() + r0 : nullptr;
      const scalar_t* lc = pg.col_lse.defined() ? pg.col_lse.const_data_ptr<scalar_t>() : nullptr;
      if (p.kind == kSoftmax)
        grad_kernel<scalar_t, kSoftmax><<<nr, kThreads, 0, stream>>>(
            G.mutable_data_ptr<scalar_t>(), N, r0, p.offset, lr, lc, scale.const_data_ptr<scalar_t>(),
            bias.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
            static_cast<scalar_t>(pg.coef.div), static_cast<scalar_t>(pg.coef.pos_mult),
            part.mutable_data_ptr<scalar_t>(), nr);
      else
        grad_kernel<scalar_t, kSigmoid><<<nr, kThreads, 0, stream>>>(
            G.mutable_data_ptr<scalar_t>(), N, r0, p.offset, lr, lc, scale.const_data_ptr<scalar_t>(),
            bias.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
            static_cast<scalar_t>(pg.coef.div), static_cast<scalar_t>(pg.coef.pos_mult),
            part.mutable_data_ptr<scalar_t>(), nr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    part_sum.add_(part.sum(1));
    // G' in the input dtype for the products (as flash-attention rounds P), accumulated in acc.
    const auto Gp = G.to(p.A.scalar_type());
    dA.narrow(0, r0, nr).add_(mm_acc(Gp, p.B, acc));
    dB.add_(mm_acc(Gp.t(), a, acc));
  }
}

// ----------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_loss_forward_cuda(
    const at::Tensor& all_image, const at::Tensor& all_text, const at::Tensor& logit_scale,
    int64_t offset, int64_t local_batch, int64_t chunk_size) {
  const flipkern::NoAutocast no_autocast;
  loss::check_clip(all_image, all_text, logit_scale, offset, local_batch, chunk_size, kClip);
  c10::cuda::CUDAGuard guard(all_image.device());
  const auto acc = loss::opmath_type(all_image.scalar_type());
  const int64_t N = all_image.size(0), b = local_batch;
  const auto s = logit_scale.to(acc);
  const auto I_loc = all_image.narrow(0, offset, b), T_loc = all_text.narrow(0, offset, b);
  auto lse_image = at::empty({b}, all_image.options().dtype(acc)), lse_text = at::empty_like(lse_image);
  if (b == N) {  // one process: the text->image rows are the columns of the same matrix
    pass_stats({kSoftmax, all_image, all_text, 0}, s, s, chunk_size, lse_image, &lse_text);
  } else {
    pass_stats({kSoftmax, I_loc, all_text, offset}, s, s, chunk_size, lse_image, nullptr);
    pass_stats({kSoftmax, T_loc, all_image, offset}, s, s, chunk_size, lse_text, nullptr);
  }
  const auto pos = loss::positive_logit_sum(I_loc.to(acc), T_loc.to(acc), s);
  return {loss::clip_loss_value(lse_image, lse_text, pos).to(all_image.scalar_type()), lse_image,
          lse_text};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& all_image, const at::Tensor& all_text,
    const at::Tensor& logit_scale, const at::Tensor& lse_image, const at::Tensor& lse_text,
    int64_t offset, int64_t local_batch, int64_t chunk_size) {
  const flipkern::NoAutocast no_autocast;
  const char* op_name = "clip_loss_backward";
  loss::check_clip(all_image, all_text, logit_scale, offset, local_batch, chunk_size, op_name);
  c10::cuda::CUDAGuard guard(all_image.device());
  const auto acc = loss::opmath_type(all_image.scalar_type());
  const int64_t N = all_image.size(0), b = local_batch;
  loss::check_lse(lse_image, lse_text, b, acc, op_name);
  const auto s = logit_scale.to(acc), g = grad.to(acc);
  auto dI = at::zeros(all_image.sizes(), all_image.options().dtype(acc));
  auto dT = at::zeros_like(dI);
  auto part = at::zeros({2}, dI.options());
  if (b == N) {  // one matrix holds both directions: its rows and its columns
    const PassGrad pg{{kSoftmax, all_image, all_text, 0}, lse_image, lse_text, loss::clip_coef(b, true)};
    pass_backward(pg, g, s, s, chunk_size, dI, dT, part);
  } else {
    const auto c = loss::clip_coef(b, false);
    const PassGrad pi{{kSoftmax, all_image.narrow(0, offset, b), all_text, offset}, lse_image, {}, c};
    const PassGrad pt{{kSoftmax, all_text.narrow(0, offset, b), all_image, offset}, lse_text, {}, c};
    pass_backward(pi, g, s, s, chunk_size, dI.narrow(0, offset, b), dT, part);
    pass_backward(pt, g, s, s, chunk_size, dT.narrow(0, offset, b), dI, part);
  }
  return {dI.to(all_image.scalar_type()), dT.to(all_text.scalar_type()),
          part[0].to(logit_scale.scalar_type())};
}

at::Tensor siglip_loss_forward_cuda(const at::Tensor& image, const at::Tensor& all_text,
                                const at::Tensor& logit_scale, const at::Tensor& logit_bias,
                                int64_t offset, int64_t chunk_size) {
  const flipkern::NoAutocast no_autocast;
  loss::check_siglip(image, all_text, logit_scale, logit_bias, offset, chunk_size, kSiglip);
  c10::cuda::CUDAGuard guard(image.device());
  const auto acc = loss::opmath_type(image.scalar_type());
  const int64_t b = image.size(0);
  const auto s = logit_scale.to(acc), bias = logit_bias.to(acc);
  auto rows = at::empty({b}, image.options().dtype(acc));
  pass_stats({kSigmoid, image, all_text, offset}, s, bias, chunk_size, rows, nullptr);
  // -log sigmoid(x) = softplus(x) - x on the positives, softplus(x) elsewhere.
  const auto pos = loss::positive_logit_sum(image.to(acc), all_text.narrow(0, offset, b).to(acc), s) +
                   bias * static_cast<double>(b);
  return ((rows.sum() - pos) / static_cast<double>(b)).to(image.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& image, const at::Tensor& all_text,
    const at::Tensor& logit_scale, const at::Tensor& logit_bias, int64_t offset,
    int64_t chunk_size) {
  const flipkern::NoAutocast no_autocast;
  loss::check_siglip(image, all_text, logit_scale, logit_bias, offset, chunk_size,
                     "siglip_loss_backward");
  c10::cuda::CUDAGuard guard(image.device());
  const auto acc = loss::opmath_type(image.scalar_type());
  const int64_t b = image.size(0);
  const auto s = logit_scale.to(acc), bias = logit_bias.to(acc), g = grad.to(acc);
  auto dI = at::zeros(image.sizes(), image.options().dtype(acc));
  auto dT = at::zeros(all_text.sizes(), dI.options());
  auto part = at::zeros({2}, dI.options());
  const PassGrad pg{{kSigmoid, image, all_text, offset}, {}, {}, loss::siglip_coef(b)};
  pass_backward(pg, g, s, bias, chunk_size, dI, dT, part);
  return {dI.to(image.scalar_type()), dT.to(all_text.scalar_type()),
          part[0].to(logit_scale.scalar_type()), part[1].to(logit_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flipkern, CUDA, m) {
  m.impl("clip_loss_forward", &clip_loss_forward_cuda);
  m.impl("clip_loss_backward", &clip_loss_backward_cuda);
  m.impl("siglip_loss_forward", &siglip_loss_forward_cuda);
  m.impl("siglip_loss_backward", &siglip_loss_backward_cuda);
}

}  // namespace flipkern
