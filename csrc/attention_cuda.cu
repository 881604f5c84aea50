// Variable-length (packed) attention, CUDA kernels: forward and backward.
//
// A plain, correct kernel set (the fast GPU path is the Triton kernels,
// flipkern/triton_kernels/attention.py): one warp per (row, head). The lanes of
// a warp split the head dim (Dh <= 256: up to 8 values per lane), dot products
// are warp reductions, and every accumulation is in at::opmath_type (float, or
// double for double inputs).
//   forward   warp per query row i: online softmax over keys [0, key_end(i+1)),
//             writes out and lse = m + log(l) (no [L, L] matrix anywhere)
//   delta     warp per row: delta = rowsum(dO * O)
//   dq        warp per query row i over keys [0, key_end(i+1)):
//             dS = P * (dO v_j - delta), dq = scale * sum dS k_j
//   dk, dv    warp per key row j over queries [query_begin(j), L):
//             dv = sum P dO_i, dk = scale * sum dS q_i
// Each output row has one writer: no atomics. Grid: (B * ceil(max_seqlen /
// rows per block), H); a warp whose row is past its sequence's end has nothing
// to do. Index math: attention_index.h (shared with the CPU kernel); host-side
// checks: attention_checks.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10 stream/guard headers only: ATen/cuda/CUDAContext.h would also pull in the cuBLAS
// and cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "attention_checks.h"
#include "attention_index.h"

namespace flipkern {
namespace {

constexpr const char* kFwd = "varlen_attention";
constexpr const char* kBwd = "varlen_attention_backward";
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // rows per thread block
constexpr int kMaxPerLane = 8;     // Dh <= 32 * 8
constexpr int64_t kMaxHeadDim = kWarp * kMaxPerLane;

// Row t, head h of a [total, H, Dh] tensor with unit stride along Dh.
struct Rows {
  int64_t st, sh;
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// This lane's values of one row: elements lane, lane + 32, ... (< Dh), in acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ p, int Dh, int lane, acc_t (&r)[kMaxPerLane]) {
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + c * kWarp;
    r[c] = d < Dh ? static_cast<acc_t>(p[d]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dot_row(const acc_t (&a)[kMaxPerLane], const scalar_t* __restrict__ p, int Dh,
                                         int lane) {
  acc_t s = 0;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + c * kWarp;
    if (d < Dh) s += a[c] * static_cast<acc_t>(p[d]);
  }
  return warp_sum(s);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void axpy_row(acc_t (&y)[kMaxPerLane], acc_t a, const scalar_t* __restrict__ p, int Dh,
                                         int lane) {
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + c * kWarp;
    if (d < Dh) y[c] += a * static_cast<acc_t>(p[d]);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ p, const acc_t (&r)[kMaxPerLane], acc_t mul, int Dh,
                                          int lane) {
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + c * kWarp;
    if (d < Dh) p[d] = static_cast<scalar_t>(r[c] * mul);
  }
}

// The (sequence start, length, row within the sequence) of this warp; false when the
// warp's row is past its sequence's end.
__device__ __forceinline__ bool warp_row(const int32_t* __restrict__ cu, int64_t blocks_per_seq, int64_t& start,
                                         int64_t& L, int64_t& i) {
  int64_t b, r0;
  split_block(blockIdx.x, blocks_per_seq, kWarpsPerBlock, b, r0);
  start = cu[b];
  L = cu[b + 1] - start;
  i = r0 + threadIdx.x / kWarp;
  return i < L;
}

template <typename scalar_t>
__global__ void fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                           const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                           at::opmath_type<scalar_t>* __restrict__ lse, const int32_t* __restrict__ cu,
                           int64_t blocks_per_seq, int Dh, Rows sq, Rows sk, Rows sv, Rows so, int64_t total,
                           bool causal, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t start, L, i;
  if (!warp_row(cu, blocks_per_seq, start, L, i)) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t h = blockIdx.y;
  acc_t qr[kMaxPerLane], acc[kMaxPerLane];
  load_row(q + (start + i) * sq.st + h * sq.sh, Dh, lane, qr);
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) acc[c] = 0;
  // Online softmax: m the running max of the scores, l the sum of exp(s - m).
  acc_t m = -INFINITY, l = 0;
  const int64_t jend = key_end(i + 1, L, causal);  // >= 1: every row sees key 0
  for (int64_t j = 0; j < jend; ++j) {
    const acc_t s = dot_row(qr, k + (start + j) * sk.st + h * sk.sh, Dh, lane) * scale;
    const acc_t m_new = s > m ? s : m;
    const acc_t alpha = exp(m - m_new), p = exp(s - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) acc[c] *= alpha;
    axpy_row(acc, p, v + (start + j) * sv.st + h * sv.sh, Dh, lane);
    m = m_new;
  }
  store_row(out + (start + i) * so.st + h * so.sh, acc, acc_t(1) / l, Dh, lane);
  if (lane == 0) lse[h * total + start + i] = m + log(l);
}

template <typename scalar_t>
__global__ void delta_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ o,
                             at::opmath_type<scalar_t>* __restrict__ delta, const int32_t* __restrict__ cu,
                             int64_t blocks_per_seq, int Dh, Rows sg, Rows so, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t start, L, i;
  if (!warp_row(cu, blocks_per_seq, start, L, i)) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t h = blockIdx.y;
  acc_t gr[kMaxPerLane];
  load_row(g + (start + i) * sg.st + h * sg.sh, Dh, lane, gr);
  const acc_t d = dot_row(gr, o + (start + i) * so.st + h * so.sh, Dh, lane);
  if (lane == 0) delta[h * total + start + i] = d;
}

template <typename scalar_t>
__global__ void dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                          const scalar_t* __restrict__ v, const scalar_t* __restrict__ g,
                          const at::opmath_type<scalar_t>* __restrict__ lse,
                          const at::opmath_type<scalar_t>* __restrict__ delta, scalar_t* __restrict__ dq,
                          const int32_t* __restrict__ cu, int64_t blocks_per_seq, int Dh, Rows sq, Rows sk,
                          Rows sv, Rows sg, Rows sdq, int64_t total, bool causal, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t start, L, i;
  if (!warp_row(cu, blocks_per_seq, start, L, i)) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t h = blockIdx.y;
  acc_t qr[kMaxPerLane], gr[kMaxPerLane], acc[kMaxPerLane];
  load_row(q + (start + i) * sq.st + h * sq.sh, Dh, lane, qr);
  load_row(g + (start + i) * sg.st + h * sg.sh, Dh, lane, gr);
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) acc[c] = 0;
  const acc_t lse_i = lse[h * total + start + i], delta_i = delta[h * total + start + i];
  const int64_t jend = key_end(i + 1, L, causal);
  for (int64_t j = 0; j < jend; ++j) {
    const scalar_t* kj = k + (start + j) * sk.st + h * sk.sh;
    const acc_t p = exp(dot_row(qr, kj, Dh, lane) * scale - lse_i);
    const acc_t dp = dot_row(gr, v + (start + j) * sv.st + h * sv.sh, Dh, lane);
    axpy_row(acc, p * (dp - delta_i), kj, Dh, lane);
  }
  store_row(dq + (start + i) * sdq.st + h * sdq.sh, acc, scale, Dh, lane);
}

template <typename scalar_t>
__global__ void dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                            const scalar_t* __restrict__ v, const scalar_t* __restrict__ g,
                            const at::opmath_type<scalar_t>* __restrict__ lse,
                            const at::opmath_type<scalar_t>* __restrict__ delta, scalar_t* __restrict__ dk,
                            scalar_t* __restrict__ dv, const int32_t* __restrict__ cu, int64_t blocks_per_seq,
                            int Dh, Rows sq, Rows sk, Rows sv, Rows sg, Rows sdk, Rows sdv, int64_t total,
                            bool causal, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t start, L, j;
  if (!warp_row(cu, blocks_per_seq, start, L, j)) return;  // j: this warp's key row
  const int lane = threadIdx.x % kWarp;
  const int64_t h = blockIdx.y;
  acc_t kr[kMaxPerLane], vr[kMaxPerLane], dk_acc[kMaxPerLane], dv_acc[kMaxPerLane];
  load_row(k + (start + j) * sk.st + h * sk.sh, Dh, lane, kr);
  load_row(v + (start + j) * sv.st + h * sv.sh, Dh, lane, vr);
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) dk_acc[c] = dv_acc[c] = 0;
  for (int64_t i = query_begin(j, causal); i < L; ++i) {
    const scalar_t* qi = q + (start + i) * sq.st + h * sq.sh;
    const scalar_t* gi = g + (start + i) * sg.st + h * sg.sh;
    const acc_t p = exp(dot_row(kr, qi, Dh, lane) * scale - lse[h * total + start + i]);
    const acc_t dp = dot_row(vr, gi, Dh, lane);
    axpy_row(dv_acc, p, gi, Dh, lane);
    axpy_row(dk_acc, p * (dp - delta[h * total + start + i]), qi, Dh, lane);
  }
  store_row(dk + (start + j) * sdk.st + h * sdk.sh, dk_acc, scale, Dh, lane);
  store_row(dv + (start + j) * sdv.st + h * sdv.sh, dv_acc, acc_t(1), Dh, lane);
}

// The packed tensor with unit stride along Dh, which the kernels assume.
at::Tensor unit_last(const at::Tensor& t) { return (t.stride(2) == 1 || t.size(2) <= 1) ? t : t.contiguous(); }

Rows rows(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

at::ScalarType lse_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda_shape(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.size(2) <= kMaxHeadDim, "flipkern.", op, ": the CUDA kernel takes head dims up to ",
              kMaxHeadDim, ", q has Dh = ", q.size(2), " (the triton backend takes up to 256 too)");
  TORCH_CHECK(q.size(1) <= 65535, "flipkern.", op, ": the CUDA kernel takes at most 65535 heads, got ",
              q.size(1));
}

dim3 grid(int64_t B, int64_t blocks_per_seq, int64_t H, const char* op) {
  TORCH_CHECK(B * blocks_per_seq < (int64_t{1} << 31), "flipkern.", op, ": B * ceil(max_seqlen / ",
              kWarpsPerBlock, ") = ", B * blocks_per_seq, " thread blocks is too many for the CUDA kernel grid");
  return dim3(static_cast<unsigned>(B * blocks_per_seq), static_cast<unsigned>(H));
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_seqlens,
    int64_t max_seqlen, bool causal, double scale) {
  check_qkv(q_in, k_in, v_in, kFwd);
  check_cuda_shape(q_in, kFwd);
  const int64_t total = q_in.size(0), H = q_in.size(1), Dh = q_in.size(2);
  check_cu_seqlens_once(cu_seqlens, total, max_seqlen, q_in, kFwd);  // no host copy after the first call
  const int64_t B = cu_seqlens.size(0) - 1;
  c10::cuda::CUDAGuard guard(q_in.device());
  auto out = at::empty({total, H, Dh}, q_in.options());
  auto lse = at::empty({H, total}, q_in.options().dtype(lse_type(q_in.scalar_type())));
  if (total == 0 || H == 0) return {out, lse};
  const auto q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const auto cu = cu_seqlens.contiguous();
  const int64_t bps = ceil_div(max_seqlen, kWarpsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "varlen_attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fwd_kernel<scalar_t><<<grid(B, bps, H, kFwd), kWarp * kWarpsPerBlock, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(), cu.const_data_ptr<int32_t>(), bps,
        static_cast<int>(Dh), rows(q), rows(k), rows(v), rows(out), total, causal, static_cast<acc_t>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    bool causal, double scale) {
  check_qkv(q_in, k_in, v_in, kBwd);
  check_cuda_shape(q_in, kBwd);
  check_bwd_extras(grad_out, q_in, out_in, lse_in, kBwd);
  const int64_t total = q_in.size(0), H = q_in.size(1), Dh = q_in.size(2);
  check_cu_seqlens_once(cu_seqlens, total, max_seqlen, q_in, kBwd);  // no host copy after the first call
  const int64_t B = cu_seqlens.size(0) - 1;
  c10::cuda::CUDAGuard guard(q_in.device());
  // Every row belongs to exactly one sequence (cu_seqlens checked), so every row is written.
  auto dq = at::empty({total, H, Dh}, q_in.options());
  auto dk = at::empty_like(dq);
  auto dv = at::empty_like(dq);
  if (total == 0 || H == 0) return {dq, dk, dv};
  const auto q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const auto g = unit_last(grad_out), o = unit_last(out_in);
  const auto lse = lse_in.to(lse_type(q.scalar_type())).contiguous();
  auto delta = at::empty_like(lse);
  const auto cu = cu_seqlens.contiguous();
  const int64_t bps = ceil_div(max_seqlen, kWarpsPerBlock);
  const int threads = kWarp * kWarpsPerBlock;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "varlen_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int32_t* cup = cu.const_data_ptr<int32_t>();
    const int dh = static_cast<int>(Dh);
    delta_kernel<scalar_t><<<grid(B, bps, H, kBwd), threads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), delta.mutable_data_ptr<acc_t>(), cup, bps, dh,
        rows(g), rows(o), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dq_kernel<scalar_t><<<grid(B, bps, H, kBwd), threads, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        g.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(),
        dq.mutable_data_ptr<scalar_t>(), cup, bps, dh, rows(q), rows(k), rows(v), rows(g), rows(dq), total, causal,
        static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dkdv_kernel<scalar_t><<<grid(B, bps, H, kBwd), threads, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        g.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(),
        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), cup, bps, dh, rows(q), rows(k), rows(v),
        rows(g), rows(dk), rows(dv), total, causal, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(flipkern, CUDA, m) {
  m.impl("varlen_attention_forward", &varlen_attention_forward_cuda);
  m.impl("varlen_attention_backward", &varlen_attention_backward_cuda);
}

}  // namespace flipkern
