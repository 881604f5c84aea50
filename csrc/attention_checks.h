// Host-side argument checks of the varlen attention ops (CPU and CUDA). They run
// before any kernel and raise RuntimeError naming the op and the argument.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "checks.h"

namespace flipkern {

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.dim() == 3, "flipkern.", op, ": q must be 3-D [total, H, Dh], got ", q.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "flipkern.", op,
              ": q must be a floating tensor, got ", q.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k, "k"}, {v, "v"}}) {
    TORCH_CHECK(t.sizes() == q.sizes(), "flipkern.", op, ": ", name, " has shape ", t.sizes(),
                " but q has shape ", q.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "flipkern.", op, ": ", name, " dtype ",
                t.scalar_type(), " differs from q dtype ", q.scalar_type());
    check_same_device(q, "q", t, name, op);
  }
}

// The backward's extra inputs: grad_out and out like q, lse [H, total].
inline void check_bwd_extras(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                             const at::Tensor& lse, const char* op) {
  const int64_t total = q.size(0), H = q.size(1);
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    TORCH_CHECK(t.sizes() == q.sizes(), "flipkern.", op, ": ", name, " has shape ", t.sizes(),
                " but q has shape ", q.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "flipkern.", op, ": ", name, " dtype ",
                t.scalar_type(), " differs from q dtype ", q.scalar_type());
    check_same_device(q, "q", t, name, op);
  }
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == H && lse.size(1) == total, "flipkern.", op,
              ": lse must be [H, total] = [", H, ", ", total, "], got ", lse.sizes());
  TORCH_CHECK(at::isFloatingType(lse.scalar_type()), "flipkern.", op,
              ": lse must be a floating tensor, got ", lse.scalar_type());
  check_same_device(q, "q", lse, "lse", op);
}

// cu_seqlens int32 [B+1] with 0 = cu[0] <= cu[1] <= ... <= cu[B] = total and every
// length <= max_seqlen, so that no kernel reads or writes outside [0, total) nor
// outside a grid sized by max_seqlen. Reads the values on the host (on CUDA: one
// copy and sync). Returns the offsets as int64.
inline std::vector<int64_t> check_cu_seqlens(const at::Tensor& cu, int64_t total, int64_t max_seqlen,
                                             const at::Tensor& q, const char* op) {
  check_same_device(q, "q", cu, "cu_seqlens", op);
  TORCH_CHECK(cu.scalar_type() == at::kInt, "flipkern.", op, ": cu_seqlens must be int32, got ",
              cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, "flipkern.", op,
              ": cu_seqlens must be 1-D [B+1] with B >= 0, got shape ", cu.sizes());
  TORCH_CHECK(max_seqlen >= 0, "flipkern.", op, ": max_seqlen must be >= 0, got ", max_seqlen);
  const auto c = cu.to(at::kCPU).contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  const int64_t n = c.numel();
  TORCH_CHECK(p[0] == 0, "flipkern.", op, ": cu_seqlens[0] must be 0, got ", p[0]);
  std::vector<int64_t> off(n);
  off[0] = 0;
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(p[i] >= p[i - 1], "flipkern.", op, ": cu_seqlens must be non-decreasing, but "
                "cu_seqlens[", i, "] = ", p[i], " < cu_seqlens[", i - 1, "] = ", p[i - 1]);
    TORCH_CHECK(p[i] - p[i - 1] <= max_seqlen, "flipkern.", op, ": sequence ", i - 1,
                " has length ", p[i] - p[i - 1], " > max_seqlen = ", max_seqlen);
    off[i] = p[i];
  }
  TORCH_CHECK(off[n - 1] == total, "flipkern.", op, ": cu_seqlens[-1] = ", off[n - 1],
              " must equal the number of packed rows of q (", total, ")");
  return off;
}

}  // namespace flipkern
