// Chunk and statistic math of the contrastive-loss kernels, shared by the CPU
// kernel (loss_cpu.cpp) and the CUDA kernel (loss_cuda.cu), so the CPU tests run
// the arithmetic the GPU runs: how the logits matrix is cut into chunks, where a
// row's positive pair lies, how two logsumexp partials merge, and the
// per-element loss/gradient formulas.
//
// The logits matrix of one pass is S = scale * A @ B^T, A [rows, D] (this rank's
// samples of one tower), B [N, D] (all ranks' samples of the other tower). Row i
// of A is the sample whose positive pair is column offset + i of S.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#ifndef FK_HOST_DEVICE
#if defined(__CUDACC__)
#define FK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FK_HOST_DEVICE inline
#endif
#endif

namespace flipkern {
namespace loss {

// ----------------------------------------------------------------------------- chunks

// [0, total) cut into pieces of `size` (the last one shorter).
struct Chunks {
  int64_t total, size;
  FK_HOST_DEVICE int64_t count() const { return size > 0 ? (total + size - 1) / size : 0; }
  FK_HOST_DEVICE int64_t begin(int64_t k) const { return k * size; }
  FK_HOST_DEVICE int64_t length(int64_t k) const {
    const int64_t b = begin(k);
    return total - b < size ? total - b : size;
  }
};

// Column of the positive pair of row `row` (a local sample index).
FK_HOST_DEVICE int64_t positive_col(int64_t row, int64_t offset) { return row + offset; }

// The rows [lo, hi) of the tile rows [r0, r0 + nr) x columns [c0, c0 + nc) whose
// positive column falls inside the tile (hi <= lo: none).
FK_HOST_DEVICE void positives_in_tile(int64_t r0, int64_t nr, int64_t c0, int64_t nc, int64_t offset,
                                      int64_t& lo, int64_t& hi) {
  // positive_col(i) = i + offset in [c0, c0 + nc)  <=>  i in [c0 - offset, c0 + nc - offset)
  lo = r0 > c0 - offset ? r0 : c0 - offset;
  hi = r0 + nr < c0 + nc - offset ? r0 + nr : c0 + nc - offset;
}

// ----------------------------------------------------------------------------- statistics

// log(exp(a) + exp(b)) without overflow; -inf is the identity (an empty partial).
template <typename T>
FK_HOST_DEVICE T log_add_exp(T a, T b) {
  const T hi = a > b ? a : b;
  const T lo = a > b ? b : a;
  if (hi == -std::numeric_limits<T>::infinity()) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// Online logsumexp state of one row: running max m and sum l of exp(x - m).
template <typename T>
struct OnlineLse {
  T m = -std::numeric_limits<T>::infinity();
  T l = 0;
  FK_HOST_DEVICE void add(T x) {
    if (x > m) {
      l = l * std::exp(m - x) + T(1);
      m = x;
    } else {
      l += std::exp(x - m);
    }
  }
  FK_HOST_DEVICE void merge(const OnlineLse& o) {
    if (o.m == -std::numeric_limits<T>::infinity()) return;
    if (o.m > m) {
      l = l * std::exp(m - o.m) + o.l;
      m = o.m;
    } else {
      l += o.l * std::exp(o.m - m);
    }
  }
  FK_HOST_DEVICE T value() const { return m + std::log(l); }
};

// ----------------------------------------------------------------------------- element formulas

// log(1 + exp(x)), stable for large |x|: the SigLIP loss of a negative pair is
// softplus(x), of a positive pair softplus(x) - x.
template <typename T>
FK_HOST_DEVICE T softplus(T x) {
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

template <typename T>
FK_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// dLoss/dS of one CLIP logit, before the positive-pair term: coef * (softmax of
// its row [+ softmax of its column when both directions share the matrix]).
template <typename T>
FK_HOST_DEVICE T clip_grad(T s, T lse_row, T lse_col, bool has_col, T coef) {
  T p = std::exp(s - lse_row);
  if (has_col) p += std::exp(s - lse_col);
  return coef * p;
}

// Coefficients of the gradient of one pass: dLoss/dS = coef * (softmax or sigmoid)
// - coef * pos_mult at the positives, coef = (incoming gradient) / div.
// CLIP: loss = (sum_i lse_i2t[i] - S_ii + sum_i lse_t2i[i] - S_ii) / (2b), b local samples:
// div = 2b; on one process both softmaxes share one square matrix, so each positive is in
// both of them (pos_mult 2); across processes each pass holds one direction (pos_mult 1).
// SigLIP: loss = (sum_ij softplus(S_ij + bias) - sum_i (S_ii + bias)) / b: div = b.
struct GradCoef {
  double div, pos_mult;
};
inline GradCoef clip_coef(int64_t b, bool square) { return {2.0 * b, square ? 2.0 : 1.0}; }
inline GradCoef siglip_coef(int64_t b) { return {static_cast<double>(b), 1.0}; }

}  // namespace loss
}  // namespace flipkern

// ----------------------------------------------------------------------------- host side
// Argument checks and the final assembly of the loss, shared by the host code of
// both kernels (ATen ops on whatever device the tensors are on; no device sync).

namespace flipkern {
namespace loss {

// float32 math for float16/bfloat16/float32 features, float64 for float64.
inline at::ScalarType opmath_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_features(const at::Tensor& t, const char* name, const at::Tensor& like,
                           const char* like_name, const char* op) {
  TORCH_CHECK(t.dim() == 2, "flipkern.", op, ": ", name, " must be 2-D [batch, dim], got ", t.dim(),
              "-D");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "flipkern.", op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.size(1) == like.size(1), "flipkern.", op, ": ", name, " has dim ", t.size(1),
              " but ", like_name, " has dim ", like.size(1));
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "flipkern.", op, ": ", name, " dtype ",
              t.scalar_type(), " differs from ", like_name, " dtype ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "flipkern.", op, ": ", name, " is on ", t.device(),
              " but ", like_name, " is on ", like.device());
}

inline void check_scalar(const at::Tensor& t, const char* name, const at::Tensor& like,
                         const char* op) {
  TORCH_CHECK(t.dim() == 0, "flipkern.", op, ": ", name, " must be a 0-d tensor, got shape ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "flipkern.", op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "flipkern.", op, ": ", name, " is on ", t.device(),
              " but the features are on ", like.device());
}

// Rows [offset, offset + local_batch) of an [N, D] gather are this rank's samples.
inline void check_rows(int64_t offset, int64_t local_batch, int64_t N, int64_t chunk_size,
                       const char* op) {
  TORCH_CHECK(local_batch >= 1 && offset >= 0 && offset + local_batch <= N, "flipkern.", op,
              ": local rows [offset, offset + local_batch) = [", offset, ", ", offset + local_batch,
              ") must be a non-empty range inside the ", N, " gathered rows");
  TORCH_CHECK(chunk_size >= 1, "flipkern.", op, ": chunk_size must be >= 1, got ", chunk_size);
}

inline void check_clip(const at::Tensor& all_image, const at::Tensor& all_text,
                       const at::Tensor& scale, int64_t offset, int64_t local_batch,
                       int64_t chunk_size, const char* op) {
  TORCH_CHECK(all_image.dim() == 2, "flipkern.", op, ": all_image must be 2-D [N, dim], got ",
              all_image.dim(), "-D");
  check_features(all_text, "all_text", all_image, "all_image", op);
  TORCH_CHECK(all_text.size(0) == all_image.size(0), "flipkern.", op, ": all_text has ",
              all_text.size(0), " rows but all_image has ", all_image.size(0));
  check_scalar(scale, "logit_scale", all_image, op);
  check_rows(offset, local_batch, all_image.size(0), chunk_size, op);
}

inline void check_siglip(const at::Tensor& image, const at::Tensor& all_text,
                         const at::Tensor& scale, const at::Tensor& bias, int64_t offset,
                         int64_t chunk_size, const char* op) {
  TORCH_CHECK(image.dim() == 2, "flipkern.", op, ": image must be 2-D [batch, dim], got ",
              image.dim(), "-D");
  check_features(all_text, "all_text", image, "image", op);
  check_scalar(scale, "logit_scale", image, op);
  check_scalar(bias, "logit_bias", image, op);
  check_rows(offset, image.size(0), all_text.size(0), chunk_size, op);
}

// The forward's per-row statistics handed to the backward: [local_batch] in the math dtype.
inline void check_lse(const at::Tensor& lse_image, const at::Tensor& lse_text, int64_t local_batch,
                      at::ScalarType acc, const char* op) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lse_image, "lse_image"},
                                {lse_text, "lse_text"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == local_batch && t.scalar_type() == acc, "flipkern.", op,
                ": ", name, " must be [local_batch] = [", local_batch, "] of ", acc, ", got ",
                t.sizes(), " of ", t.scalar_type());
  }
}

// Sum over the local samples of scale * <a_i, b_i>: the logits of the positive pairs.
inline at::Tensor positive_logit_sum(const at::Tensor& a, const at::Tensor& b,
                                     const at::Tensor& scale) {
  return (a * b).sum() * scale;
}

// CLIP: (sum_i lse_i2t[i] + sum_i lse_t2i[i] - 2 sum_i S_ii) / (2b).
inline at::Tensor clip_loss_value(const at::Tensor& lse_image, const at::Tensor& lse_text,
                                  const at::Tensor& positives) {
  const int64_t b = lse_image.size(0);
  return (lse_image.sum() + lse_text.sum() - 2 * positives) / (2.0 * static_cast<double>(b));
}

}  // namespace loss
}  // namespace flipkern
