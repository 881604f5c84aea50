// Host-side argument checks of the varlen attention ops (CPU and CUDA). They run
// before any kernel and raise RuntimeError naming the op and the argument.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <mutex>
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

// cu_seqlens int32 [B+1] on q's device, max_seqlen >= 0: what can be checked without
// reading the values.
inline void check_cu_seqlens_structure(const at::Tensor& cu, int64_t max_seqlen, const at::Tensor& q,
                                       const char* op) {
  check_same_device(q, "q", cu, "cu_seqlens", op);
  TORCH_CHECK(cu.scalar_type() == at::kInt, "flipkern.", op, ": cu_seqlens must be int32, got ",
              cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, "flipkern.", op,
              ": cu_seqlens must be 1-D [B+1] with B >= 0, got shape ", cu.sizes());
  TORCH_CHECK(max_seqlen >= 0, "flipkern.", op, ": max_seqlen must be >= 0, got ", max_seqlen);
}

// cu_seqlens int32 [B+1] with 0 = cu[0] <= cu[1] <= ... <= cu[B] = total and every
// length <= max_seqlen, so that no kernel reads or writes outside [0, total) nor
// outside a grid sized by max_seqlen. Reads the values on the host (on CUDA: one
// copy and sync; check_cu_seqlens_once avoids repeating it). Returns the offsets as int64.
inline std::vector<int64_t> check_cu_seqlens(const at::Tensor& cu, int64_t total, int64_t max_seqlen,
                                             const at::Tensor& q, const char* op) {
  check_cu_seqlens_structure(cu, max_seqlen, q, op);
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

// The offsets tensors whose values passed check_cu_seqlens, keyed by tensor and version
// (as flipkern/attention.py's _validated does for the Triton path): every layer of a
// model, forward and backward, shares one cu_seqlens, and on CUDA each look at the
// values is a device-to-host copy that stalls the host. An in-place change bumps the
// version, so a changed tensor is checked again; inference tensors have no version
// counter and are always checked. Each entry holds a weak reference to its TensorImpl,
// which keeps that address from being reused by another tensor while it is cached.
class ValidatedOffsets {
 public:
  bool contains(const at::Tensor& cu, int64_t total, int64_t max_seqlen) {
    if (cu.is_inference()) return false;
    std::lock_guard<std::mutex> lock(mu_);
    for (const Entry& e : entries_) {
      if (e.impl._unsafe_get_target() == cu.unsafeGetTensorImpl() && e.version == cu._version() &&
          e.total == total && max_seqlen >= e.longest)
        return true;
    }
    return false;
  }

  void add(const at::Tensor& cu, int64_t total, int64_t longest) {
    if (cu.is_inference()) return;
    std::lock_guard<std::mutex> lock(mu_);
    entries_[next_] = Entry{Weak(cu.getIntrusivePtr()), cu._version(), total, longest};
    next_ = (next_ + 1) % entries_.size();
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Weak impl{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    int64_t version = -1, total = -1, longest = 0;
  };
  std::mutex mu_;
  std::array<Entry, 16> entries_;  // a few models' offsets (vision, text) at once
  size_t next_ = 0;
};

// check_cu_seqlens, reading the values only the first time a (tensor, version) is seen.
inline void check_cu_seqlens_once(const at::Tensor& cu, int64_t total, int64_t max_seqlen,
                                  const at::Tensor& q, const char* op) {
  static ValidatedOffsets validated;
  check_cu_seqlens_structure(cu, max_seqlen, q, op);
  if (validated.contains(cu, total, max_seqlen)) return;
  const auto off = check_cu_seqlens(cu, total, max_seqlen, q, op);
  int64_t longest = 0;
  for (size_t i = 1; i < off.size(); ++i) longest = std::max(longest, off[i] - off[i - 1]);
  validated.add(cu, total, longest);
}

}  // namespace flipkern
