// Argument checks shared by the host side of every kernel. They run before any
// kernel writes and raise RuntimeError (TORCH_CHECK) naming the op and argument.
#pragma once
#include <ATen/ATen.h>

#include "masking_index.h"

namespace flipkern {

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name, const char* op) {
  TORCH_CHECK(a.device() == b.device(), "flipkern.", op, ": ", b_name, " is on ", b.device(),
              " but ", a_name, " is on ", a.device());
}

// ids [B, K] int64 with every value in [0, num_tokens). One reduction (and, on
// CUDA, one host sync) so that no kernel can ever index out of bounds.
inline void check_keep_indices(const at::Tensor& ids, int64_t batch, int64_t num_tokens,
                               const char* name, const char* op) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, "flipkern.", op, ": ", name,
              " must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2, "flipkern.", op, ": ", name, " must be 2-D [B, K], got ",
              ids.dim(), "-D");
  TORCH_CHECK(ids.size(0) == batch, "flipkern.", op, ": ", name, " has batch ", ids.size(0),
              " but the input has batch ", batch);
  if (ids.numel() == 0) return;
  auto mm = at::aminmax(ids);
  const int64_t lo = std::get<0>(mm).item<int64_t>();
  const int64_t hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < num_tokens, "flipkern.", op, ": ", name, " has values in [", lo,
              ", ", hi, "], outside the valid range [0, ", num_tokens, ")");
}

inline Strides3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

inline void check_drop_inputs(const at::Tensor& x, const at::Tensor& ids,
                       const std::optional<at::Tensor>& pos, const char* op) {
  TORCH_CHECK(x.dim() == 3, "flipkern.", op, ": x must be 3-D [B, N, D], got ", x.dim(), "-D");
  check_same_device(x, "x", ids, "ids_keep", op);
  check_keep_indices(ids, x.size(0), x.size(1), "ids_keep", op);
  if (pos.has_value()) {
    TORCH_CHECK(pos->dim() == 2 && pos->size(0) == x.size(1) && pos->size(1) == x.size(2),
                "flipkern.", op, ": pos_embed must be [N, D] = [", x.size(1), ", ", x.size(2),
                "], got ", pos->sizes());
    TORCH_CHECK(pos->scalar_type() == x.scalar_type(), "flipkern.", op,
                ": pos_embed dtype ", pos->scalar_type(), " differs from x dtype ", x.scalar_type());
    check_same_device(x, "x", *pos, "pos_embed", op);
  }
}

}  // namespace flipkern
