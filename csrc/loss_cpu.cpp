// Contrastive losses (CLIP softmax, SigLIP sigmoid), CPU kernels: forward and
// backward without the logits matrix. Chunk math, statistic merges and the loss
// assembly: loss_chunks.h (shared with the CUDA kernel).
//
// A pass is S = scale * A @ B^T over rows A [r, D] (local samples of one tower)
// and columns B [N, D] (all samples of the other). It is cut into tiles of
// chunk x chunk; threads take row chunks (at::parallel_for), each walks the
// column chunks: one at::mm per tile (BLAS, single-threaded inside the parallel
// region), then ATen's vectorized elementwise ops on the tile, which stays in
// cache. Only per-row statistics survive a tile.
//   forward  softmax: running logsumexp of every row (and, when the matrix is
//            square -- one process, both directions share it -- of every column);
//            sigmoid: the sum of softplus over the tile.
//   backward recomputes each tile, turns it into dLoss/dS = G in place, and
//            accumulates dA += scale * G @ B (rows owned by this task) and
//            dB += scale * G^T @ A (a per-task [N, D] accumulator, tasks capped so
//            that these stay under ~1 GiB together, summed in task
//            order at the end: deterministic, no atomics), plus sum(G * A B^T) for
//            the scale gradient and sum(G) for the bias gradient.
// float16/bfloat16 features are computed in float32, float64 in float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "loss_chunks.h"
#include "no_autocast.h"

namespace flipkern {
namespace {

using loss::Chunks;

constexpr const char* kClip = "clip_loss";
constexpr const char* kSiglip = "siglip_loss";

enum class Kind { Softmax, Sigmoid };

// dst[k] = log(exp(dst[k]) + exp(src[k])), both contiguous [n].
template <typename T>
void merge_lse(at::Tensor& dst, const at::Tensor& src) {
  T* d = dst.data_ptr<T>();
  const at::Tensor s = src.contiguous();
  const T* p = s.const_data_ptr<T>();
  for (int64_t k = 0; k < dst.numel(); ++k) d[k] = loss::log_add_exp(d[k], p[k]);
}

// Runs fn(task_begin, task_end) over the row chunks on the intra-op threads, in at
// most max_tasks tasks.
template <typename Fn>
void for_row_chunks(int64_t n_chunks, const Fn& fn, int64_t max_tasks = INT64_MAX) {
  const int64_t tasks = std::max<int64_t>(1, std::min(max_tasks, n_chunks));
  const int64_t grain = std::max<int64_t>(1, (n_chunks + tasks - 1) / tasks);
  at::parallel_for(0, n_chunks, grain, [&](int64_t t0, int64_t t1) {
    // Worker threads do not inherit the dispatcher's thread-local state: skip
    // autograd explicitly (the inputs may require grad; these are kernel internals).
    at::AutoDispatchBelowADInplaceOrView guard;
    fn(t0, t1);
  });
}

// ----------------------------------------------------------------------------- forward

// Softmax statistics: row_lse [r] of S = s * A @ B^T; col_lse [N] too when defined.
template <typename T>
void softmax_stats(const at::Tensor& A, const at::Tensor& B, double s, int64_t chunk,
                   at::Tensor& row_lse, at::Tensor* col_lse) {
  const Chunks rows{A.size(0), chunk}, cols{B.size(0), chunk};
  const auto neg_inf = -std::numeric_limits<double>::infinity();
  std::vector<at::Tensor> col_part(rows.count());  // per task, at its first chunk
  for_row_chunks(rows.count(), [&](int64_t t0, int64_t t1) {
    at::Tensor cpart = col_lse ? at::full({B.size(0)}, neg_inf, A.options()) : at::Tensor();
    for (int64_t k = t0; k < t1; ++k) {
      const auto a = A.narrow(0, rows.begin(k), rows.length(k));
      at::Tensor rl = at::full({rows.length(k)}, neg_inf, A.options());
      for (int64_t c = 0; c < cols.count(); ++c) {
        const auto S = at::mm(a, B.narrow(0, cols.begin(c), cols.length(c)).t()).mul_(s);
        merge_lse<T>(rl, at::logsumexp(S, {1}));
        if (col_lse) {
          auto cp = cpart.narrow(0, cols.begin(c), cols.length(c));
          merge_lse<T>(cp, at::logsumexp(S, {0}));
        }
      }
      row_lse.narrow(0, rows.begin(k), rows.length(k)).copy_(rl);
    }
    if (col_lse) col_part[t0] = cpart;
  });
  if (col_lse) {
    *col_lse = at::full({B.size(0)}, neg_inf, A.options());
    for (const auto& p : col_part)
      if (p.defined()) merge_lse<T>(*col_lse, p);
  }
}

template <typename T>
constexpr double kSoftplusThreshold = std::is_same_v<T, double> ? 40.0 : 20.0;

// Sigmoid: sum over the pass of softplus(s * A @ B^T + bias) (positives not yet subtracted).
template <typename T>
double softplus_sum(const at::Tensor& A, const at::Tensor& B, double s, double bias, int64_t chunk) {
  const Chunks rows{A.size(0), chunk}, cols{B.size(0), chunk};
  std::vector<double> part(rows.count(), 0.0);
  for_row_chunks(rows.count(), [&](int64_t t0, int64_t t1) {
    for (int64_t k = t0; k < t1; ++k) {
      const auto a = A.narrow(0, rows.begin(k), rows.length(k));
      double acc = 0;
      for (int64_t c = 0; c < cols.count(); ++c) {
        auto X = at::mm(a, B.narrow(0, cols.begin(c), cols.length(c)).t()).mul_(s).add_(bias);
        // softplus returns x above the threshold: exact to the dtype's precision once
        // exp(-threshold) is below its epsilon
        acc += at::softplus(X, 1, kSoftplusThreshold<T>).sum().template item<double>();
      }
      part[k] = acc;
    }
  });
  double total = 0;
  for (double p : part) total += p;  // fixed order: the result does not depend on the thread count
  return total;
}

// ----------------------------------------------------------------------------- backward

struct PassGrad {
  Kind kind;
  double scale, bias;      // bias: sigmoid only
  double coef, pos_coef;   // G = coef * (softmax or sigmoid); positives: G -= pos_coef (GradCoef)
  int64_t offset;          // positive column of row i is offset + i
  at::Tensor row_lse;      // softmax: [r]
  at::Tensor col_lse;      // softmax, square matrix only: [N] (else undefined)
};

// Accumulates dA [r, D] += scale * G @ B and dB [N, D] += scale * G^T @ A for one pass;
// returns (sum G * (A @ B^T), sum G) for the scale and bias gradients.
template <typename T>
std::pair<double, double> pass_backward(const PassGrad& p, const at::Tensor& A,
                                        const at::Tensor& B, int64_t chunk, at::Tensor dA,
                                        at::Tensor& dB) {
  const Chunks rows{A.size(0), chunk}, cols{B.size(0), chunk};
  std::vector<at::Tensor> dB_part(rows.count());
  std::vector<double> ds_part(rows.count(), 0.0), db_part(rows.count(), 0.0);
  // Each task holds a [N, D] accumulator: cap their total at ~1 GiB (or one task), so
  // a many-core machine does not multiply the gradient's memory by its thread count.
  const int64_t acc_bytes = std::max<int64_t>(1, dB.numel() * dB.element_size());
  const int64_t max_tasks = std::max<int64_t>(1, (int64_t(1) << 30) / acc_bytes);
  for_row_chunks(rows.count(), [&](int64_t t0, int64_t t1) {
    at::Tensor dBt = at::zeros_like(dB);
    for (int64_t k = t0; k < t1; ++k) {
      const int64_t r0 = rows.begin(k), nr = rows.length(k);
      const auto a = A.narrow(0, r0, nr);
      auto da = dA.narrow(0, r0, nr);
      const auto lr = p.kind == Kind::Softmax ? p.row_lse.narrow(0, r0, nr).unsqueeze(1) : at::Tensor();
      double ds = 0, db = 0;
      for (int64_t c = 0; c < cols.count(); ++c) {
        const int64_t c0 = cols.begin(c), nc = cols.length(c);
        const auto b = B.narrow(0, c0, nc);
        const auto raw = at::mm(a, b.t());
        at::Tensor G;
        if (p.kind == Kind::Softmax) {
          const auto X = raw * p.scale;
          G = (X - lr).exp_();
          if (p.col_lse.defined()) G.add_((X - p.col_lse.narrow(0, c0, nc).unsqueeze(0)).exp_());
        } else {
          G = (raw * p.scale).add_(p.bias).sigmoid_();
        }
        G.mul_(p.coef);
        int64_t lo, hi;
        loss::positives_in_tile(r0, nr, c0, nc, p.offset, lo, hi);
        if (hi > lo) {
          auto g = G.accessor<T, 2>();
          for (int64_t i = lo; i < hi; ++i)
            g[i - r0][loss::positive_col(i, p.offset) - c0] -= p.pos_coef;
        }
        ds += (G * raw).sum().template item<double>();
        if (p.kind == Kind::Sigmoid) db += G.sum().template item<double>();
        da.addmm_(G, b, 1, p.scale);
        dBt.narrow(0, c0, nc).addmm_(G.t(), a, 1, p.scale);
      }
      ds_part[k] = ds;
      db_part[k] = db;
    }
    dB_part[t0] = dBt;
  }, max_tasks);
  for (const auto& part : dB_part)
    if (part.defined()) dB.add_(part);
  double ds = 0, db = 0;
  for (int64_t k = 0; k < rows.count(); ++k) {
    ds += ds_part[k];
    db += db_part[k];
  }
  return {ds, db};
}

// ----------------------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_loss_forward_cpu(
    const at::Tensor& all_image, const at::Tensor& all_text, const at::Tensor& logit_scale,
    int64_t offset, int64_t local_batch, int64_t chunk_size) {
  const flipkern::NoAutocast no_autocast;
  loss::check_clip(all_image, all_text, logit_scale, offset, local_batch, chunk_size, kClip);
  const auto op = loss::opmath_type(all_image.scalar_type());
  const auto I = all_image.to(op), T = all_text.to(op);
  const int64_t N = I.size(0), b = local_batch;
  const double s = logit_scale.item<double>();
  auto lse_image = at::empty({b}, I.options()), lse_text = at::empty({b}, I.options());
  AT_DISPATCH_FLOATING_TYPES(op, "clip_loss_forward_cpu", [&] {
    if (b == N) {  // one process: the text->image rows are the columns of the same matrix
      softmax_stats<scalar_t>(I, T, s, chunk_size, lse_image, &lse_text);
    } else {
      softmax_stats<scalar_t>(I.narrow(0, offset, b), T, s, chunk_size, lse_image, nullptr);
      softmax_stats<scalar_t>(T.narrow(0, offset, b), I, s, chunk_size, lse_text, nullptr);
    }
  });
  const auto pos = loss::positive_logit_sum(I.narrow(0, offset, b), T.narrow(0, offset, b),
                                            logit_scale.to(op));
  auto value = loss::clip_loss_value(lse_image, lse_text, pos);
  return {value.to(all_image.scalar_type()), lse_image, lse_text};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& all_image, const at::Tensor& all_text,
    const at::Tensor& logit_scale, const at::Tensor& lse_image, const at::Tensor& lse_text,
    int64_t offset, int64_t local_batch, int64_t chunk_size) {
  const flipkern::NoAutocast no_autocast;
  const char* op_name = "clip_loss_backward";
  loss::check_clip(all_image, all_text, logit_scale, offset, local_batch, chunk_size, op_name);
  const auto op = loss::opmath_type(all_image.scalar_type());
  const int64_t b = local_batch;
  loss::check_lse(lse_image, lse_text, b, op, op_name);
  const auto I = all_image.to(op), T = all_text.to(op);
  const int64_t N = I.size(0);
  const double s = logit_scale.item<double>();
  const double g = grad.item<double>();
  auto dI = at::zeros_like(I), dT = at::zeros_like(T);
  double dscale = 0;
  const auto c = loss::clip_coef(b, b == N);
  const double coef = g / c.div, pos_coef = coef * c.pos_mult;
  AT_DISPATCH_FLOATING_TYPES(op, "clip_loss_backward_cpu", [&] {
    if (b == N) {  // one matrix holds both directions: its rows and its columns
      PassGrad p{Kind::Softmax, s, 0.0, coef, pos_coef, 0, lse_image, lse_text};
      dscale = pass_backward<scalar_t>(p, I, T, chunk_size, dI, dT).first;
    } else {
      PassGrad pi{Kind::Softmax, s, 0.0, coef, pos_coef, offset, lse_image, at::Tensor()};
      PassGrad pt{Kind::Softmax, s, 0.0, coef, pos_coef, offset, lse_text, at::Tensor()};
      dscale = pass_backward<scalar_t>(pi, I.narrow(0, offset, b), T, chunk_size,
                                       dI.narrow(0, offset, b), dT).first;
      dscale += pass_backward<scalar_t>(pt, T.narrow(0, offset, b), I, chunk_size,
                                        dT.narrow(0, offset, b), dI).first;
    }
  });
  return {dI.to(all_image.scalar_type()), dT.to(all_text.scalar_type()),
          at::scalar_tensor(dscale, logit_scale.options())};
}

at::Tensor siglip_loss_forward_cpu(const at::Tensor& image, const at::Tensor& all_text,
                               const at::Tensor& logit_scale, const at::Tensor& logit_bias,
                               int64_t offset, int64_t chunk_size) {
  const flipkern::NoAutocast no_autocast;
  loss::check_siglip(image, all_text, logit_scale, logit_bias, offset, chunk_size, kSiglip);
  const auto op = loss::opmath_type(image.scalar_type());
  const auto I = image.to(op), T = all_text.to(op);
  const int64_t b = I.size(0);
  const double s = logit_scale.item<double>(), bias = logit_bias.item<double>();
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(op, "siglip_loss_forward_cpu", [&] {
    total = softplus_sum<scalar_t>(I, T, s, bias, chunk_size);
  });
  // -log sigmoid(x) = softplus(x) - x on the positives, softplus(x) elsewhere.
  const auto pos = loss::positive_logit_sum(I, T.narrow(0, offset, b), logit_scale.to(op)) +
                   logit_bias.to(op) * static_cast<double>(b);
  return ((total - pos) / static_cast<double>(b)).to(image.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& image, const at::Tensor& all_text,
    const at::Tensor& logit_scale, const at::Tensor& logit_bias, int64_t offset,
    int64_t chunk_size) {
  const flipkern::NoAutocast no_autocast;
  loss::check_siglip(image, all_text, logit_scale, logit_bias, offset, chunk_size,
                     "siglip_loss_backward");
  const auto op = loss::opmath_type(image.scalar_type());
  const auto I = image.to(op), T = all_text.to(op);
  const int64_t b = I.size(0);
  const double s = logit_scale.item<double>(), bias = logit_bias.item<double>();
  const double g = grad.item<double>();
  auto dI = at::zeros_like(I), dT = at::zeros_like(T);
  double dscale = 0, dbias = 0;
  const auto c = loss::siglip_coef(b);
  const double coef = g / c.div;
  AT_DISPATCH_FLOATING_TYPES(op, "siglip_loss_backward_cpu", [&] {
    PassGrad p{Kind::Sigmoid, s, bias, coef, coef * c.pos_mult, offset, at::Tensor(), at::Tensor()};
    std::tie(dscale, dbias) = pass_backward<scalar_t>(p, I, T, chunk_size, dI, dT);
  });
  return {dI.to(image.scalar_type()), dT.to(all_text.scalar_type()),
          at::scalar_tensor(dscale, logit_scale.options()),
          at::scalar_tensor(dbias, logit_bias.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flipkern, CPU, m) {
  m.impl("clip_loss_forward", &clip_loss_forward_cpu);
  m.impl("clip_loss_backward", &clip_loss_backward_cpu);
  m.impl("siglip_loss_forward", &siglip_loss_forward_cpu);
  m.impl("siglip_loss_backward", &siglip_loss_backward_cpu);
}

}  // namespace flipkern
