// Variable-length (packed) attention, CPU kernels: forward and backward.
//
// Layout (flash-attention varlen convention): q, k, v [total, H, Dh]; int32
// cu_seqlens [B+1]; sequence b owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1 and
// attends only within itself (causal: key j <= query i). The forward keeps the
// per-row logsumexp lse [H, total] of the scaled scores; the backward recomputes
// the probabilities from it (no [L, L] matrix survives a call).
//
// Work split: a task is (sequence, group of heads); the threads pull tasks,
// longest first, from a shared counter (sequence lengths vary a lot, so a
// static split would not balance). Inside a task all heads of the
// group go through ATen's batched matmul at once ([hn, rows, Dh] views of the
// packed tensors, no copies for float32/float64), and the query rows are taken
// in blocks so that the scores held at any time are [hn, BQ, L]: memory per task
// grows with L, not L^2. Softmax, exp and the elementwise backward are ATen's
// vectorized kernels. float16/bfloat16 inputs are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "attention_checks.h"
#include "attention_index.h"
#include "no_autocast.h"

namespace flipkern {
namespace {

constexpr const char* kFwd = "varlen_attention";
constexpr const char* kBwd = "varlen_attention_backward";

// ----------------------------------------------------------------------------- work split

struct Task {
  int64_t start, len, h0, hn;
};

// Tasks of (sequence, head group), longest first.
std::vector<Task> make_tasks(const std::vector<int64_t>& off, int64_t H) {
  const int64_t B = static_cast<int64_t>(off.size()) - 1;
  int64_t nonempty = 0;
  for (int64_t b = 0; b < B; ++b) nonempty += off[b + 1] > off[b];
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // Enough tasks for the threads to balance; whole heads-of-a-sequence otherwise
  // (fewer, larger batched matmuls).
  const int64_t want = 8 * nthreads;
  const int64_t groups = nonempty == 0 ? 1 : std::clamp<int64_t>((want + nonempty - 1) / nonempty, 1, H);
  const int64_t hg = (H + groups - 1) / groups;
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = off[b + 1] - off[b];
    if (L == 0) continue;
    for (int64_t h0 = 0; h0 < H; h0 += hg) tasks.push_back({off[b], L, h0, std::min(hg, H - h0)});
  }
  // Longest-first: with the threads pulling tasks from a shared counter this is the
  // classic LPT schedule, balanced even when the lengths vary a lot or another
  // process holds one of the cores.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.hn * a.len * a.len > b.hn * b.len * b.len; });
  return tasks;
}

template <typename F>
void run_tasks(const std::vector<Task>& tasks, const F& fn) {
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  if (ntasks == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), ntasks);
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    // Worker threads do not inherit the dispatcher's thread-local state: skip
    // autograd explicitly (the inputs may require grad; these are kernel internals).
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t i = next.fetch_add(1); i < ntasks; i = next.fetch_add(1)) fn(tasks[i]);
  });
}

// Query rows per block: scores [hn, BQ, L] stay around a megabyte or less.
int64_t query_block(int64_t hn, int64_t L) {
  constexpr int64_t kBudget = 1 << 18;  // elements
  return std::clamp<int64_t>(kBudget / std::max<int64_t>(1, hn * L), 16, std::max<int64_t>(L, 1));
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The task's rows and heads of a packed [total, H, Dh] tensor as a [hn, len, Dh] view
// (one as_strided: these run per task, where ATen's per-call cost adds up).
at::Tensor heads_view(const at::Tensor& t, const Task& task) {
  return t.as_strided({task.hn, task.len, t.size(2)}, {t.stride(1), t.stride(0), t.stride(2)},
                      t.storage_offset() + task.start * t.stride(0) + task.h0 * t.stride(1));
}

// The task's slice of a [H, total] tensor as [hn, len].
at::Tensor rows_view(const at::Tensor& t, const Task& task) {
  return t.as_strided({task.hn, task.len}, {t.stride(0), t.stride(1)},
                      t.storage_offset() + task.h0 * t.stride(0) + task.start * t.stride(1));
}

// The packed tensor with unit stride along Dh (what the batched matmul wants), in acc dtype.
at::Tensor prepare(const at::Tensor& t, at::ScalarType acc) {
  auto r = t.to(acc);
  return (r.stride(2) == 1 || r.size(2) <= 1) ? r : r.contiguous();
}

// -inf where query row i0 + r does not see key c (causal). S: contiguous [hn, bq, kend]
// scores of query rows i0 .. i0+bq-1 against keys 0 .. kend-1 of a sequence of length L.
template <typename T>
void mask_future(T* s, int64_t hn, int64_t bq, int64_t kend, int64_t i0, int64_t L) {
  for (int64_t h = 0; h < hn; ++h)
    for (int64_t r = 0; r < bq; ++r) {
      T* row = s + (h * bq + r) * kend;
      std::fill(row + key_end(i0 + r + 1, L, /*causal=*/true), row + kend,
                -std::numeric_limits<T>::infinity());
    }
}

// S = scale * Q K^T for query rows i0 .. of a sequence of length L over keys [0, K.size(1)),
// -inf at the keys a causal row does not see.
at::Tensor scores(const at::Tensor& Qb, const at::Tensor& Kb, double scale, bool causal,
                  int64_t i0, int64_t L) {
  auto S = at::empty({Qb.size(0), Qb.size(1), Kb.size(1)}, Qb.options());
  S.baddbmm_(Qb, Kb.transpose(1, 2), /*beta=*/0.0, /*alpha=*/scale);
  if (causal)
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "varlen_attention_mask", [&] {
      mask_future(S.mutable_data_ptr<scalar_t>(), S.size(0), S.size(1), S.size(2), i0, L);
    });
  return S;
}

// ----------------------------------------------------------------------------- forward

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    int64_t max_seqlen, bool causal, double scale) {
  const flipkern::NoAutocast no_autocast;
  check_qkv(q, k, v, kFwd);
  const int64_t total = q.size(0), H = q.size(1), Dh = q.size(2);
  const auto off = check_cu_seqlens(cu_seqlens, total, max_seqlen, q, kFwd);
  const auto acc = acc_type(q.scalar_type());
  auto out = at::empty({total, H, Dh}, q.options().dtype(acc));
  auto lse = at::empty({H, total}, q.options().dtype(acc));
  if (total == 0 || H == 0) return {out.to(q.scalar_type()), lse};
  const auto qa = prepare(q, acc), ka = prepare(k, acc), va = prepare(v, acc);
  run_tasks(make_tasks(off, H), [&](const Task& t) {
    const auto Q = heads_view(qa, t), K = heads_view(ka, t), V = heads_view(va, t);
    const auto O = heads_view(out, t);
    const auto lse_t = rows_view(lse, t);
    const int64_t BQ = query_block(t.hn, t.len);
    for (int64_t i0 = 0; i0 < t.len; i0 += BQ) {
      const int64_t bq = std::min(BQ, t.len - i0), kend = key_end(i0 + bq, t.len, causal);
      auto S = scores(Q.narrow(1, i0, bq), K.narrow(1, 0, kend), scale, causal, i0, t.len);
      auto m = at::amax(S, {-1}, /*keepdim=*/true);
      S.sub_(m).exp_();
      auto l = S.sum(-1, /*keepdim=*/true);
      O.narrow(1, i0, bq).copy_(at::bmm(S, V.narrow(1, 0, kend)).div_(l));
      lse_t.narrow(1, i0, bq).copy_(m.add_(l.log_()).squeeze(-1));
    }
  });
  return {out.to(q.scalar_type()), lse};
}

// ----------------------------------------------------------------------------- backward

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    bool causal, double scale) {
  const flipkern::NoAutocast no_autocast;
  check_qkv(q, k, v, kBwd);
  const int64_t total = q.size(0), H = q.size(1), Dh = q.size(2);
  check_bwd_extras(grad_out, q, out, lse, kBwd);
  const auto off = check_cu_seqlens(cu_seqlens, total, max_seqlen, q, kBwd);
  const auto acc = acc_type(q.scalar_type());
  // Every row belongs to exactly one sequence (cu_seqlens checked), so every row is written.
  auto dq = at::empty({total, H, Dh}, q.options().dtype(acc));
  auto dk = at::empty({total, H, Dh}, q.options().dtype(acc));
  auto dv = at::empty({total, H, Dh}, q.options().dtype(acc));
  const auto dt = q.scalar_type();
  if (total == 0 || H == 0) return {dq.to(dt), dk.to(dt), dv.to(dt)};
  const auto qa = prepare(q, acc), ka = prepare(k, acc), va = prepare(v, acc);
  const auto ga = prepare(grad_out, acc), oa = prepare(out, acc);
  const auto lse_a = lse.to(acc);
  run_tasks(make_tasks(off, H), [&](const Task& t) {
    const auto Q = heads_view(qa, t), K = heads_view(ka, t), V = heads_view(va, t);
    const auto dO = heads_view(ga, t);
    const auto lse_t = rows_view(lse_a, t);
    // delta = rowsum(dO * O): the softmax backward's correction term
    const auto delta_t = (dO * heads_view(oa, t)).sum(-1);
    const int64_t BQ = query_block(t.hn, t.len);
    const bool one_block = BQ >= t.len;
    // dK and dV gather over every query block: accumulate in contiguous buffers
    // (written, not accumulated, by the first product when there is one block).
    auto dK_acc = one_block ? at::empty({t.hn, t.len, Dh}, qa.options()) : at::zeros({t.hn, t.len, Dh}, qa.options());
    auto dV_acc = one_block ? at::empty({t.hn, t.len, Dh}, qa.options()) : at::zeros({t.hn, t.len, Dh}, qa.options());
    const double beta = one_block ? 0.0 : 1.0;
    for (int64_t i0 = 0; i0 < t.len; i0 += BQ) {
      const int64_t bq = std::min(BQ, t.len - i0), kend = key_end(i0 + bq, t.len, causal);
      const auto Qb = Q.narrow(1, i0, bq), dOb = dO.narrow(1, i0, bq);
      const auto Kb = K.narrow(1, 0, kend), Vb = V.narrow(1, 0, kend);
      // P = exp(S - lse): the forward's probabilities, recomputed
      auto P = scores(Qb, Kb, scale, causal, i0, t.len);
      P.sub_(lse_t.narrow(1, i0, bq).unsqueeze(-1)).exp_();
      dV_acc.narrow(1, 0, kend).baddbmm_(P.transpose(1, 2), dOb, beta, 1.0);
      // dS = P * (dO V^T - delta); dQ = scale * dS K; dK += scale * dS^T Q
      auto dS = at::bmm(dOb, Vb.transpose(1, 2));
      dS.sub_(delta_t.narrow(1, i0, bq).unsqueeze(-1)).mul_(P);
      auto dQb = at::empty({t.hn, bq, Dh}, qa.options());
      dQb.baddbmm_(dS, Kb, /*beta=*/0.0, /*alpha=*/scale);
      heads_view(dq, t).narrow(1, i0, bq).copy_(dQb);
      dK_acc.narrow(1, 0, kend).baddbmm_(dS.transpose(1, 2), Qb, beta, scale);
    }
    heads_view(dk, t).copy_(dK_acc);
    heads_view(dv, t).copy_(dV_acc);
  });
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(flipkern, CPU, m) {
  m.impl("varlen_attention_forward", &varlen_attention_forward_cpu);
  m.impl("varlen_attention_backward", &varlen_attention_backward_cpu);
}

}  // namespace flipkern
