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

// A B x H x W image batch cut into p x p patches, ids [B, K] indexing the patch grid.
inline void check_patch_grid(int64_t B, int64_t H, int64_t W, int64_t patch_size, const at::Tensor& ids,
                             const char* op) {
  TORCH_CHECK(patch_size >= 1, "flipkern.", op, ": patch_size must be >= 1, got ", patch_size);
  TORCH_CHECK(H % patch_size == 0 && W % patch_size == 0, "flipkern.", op, ": patch_size ", patch_size,
              " does not divide the image size ", H, "x", W);
  check_keep_indices(ids, B, (H / patch_size) * (W / patch_size), "ids_keep", op);
}

// images [B, C, H, W]
inline void check_patch_inputs(const at::Tensor& images, const at::Tensor& ids, int64_t patch_size,
                               const char* op) {
  TORCH_CHECK(images.dim() == 4, "flipkern.", op, ": images must be 4-D [B, C, H, W], got ",
              images.dim(), "-D");
  check_same_device(images, "images", ids, "ids_keep", op);
  check_patch_grid(images.size(0), images.size(2), images.size(3), patch_size, ids, op);
}

// grad_out [B, K, C*p*p] of images shaped image_shape [B, C, H, W].
inline void check_patch_backward_inputs(const at::Tensor& grad, const at::Tensor& ids,
                                        at::IntArrayRef shape, int64_t patch_size, const char* op) {
  TORCH_CHECK(shape.size() == 4, "flipkern.", op, ": image_shape must have 4 sizes, got ", shape.size());
  check_same_device(grad, "grad_out", ids, "ids_keep", op);
  check_patch_grid(shape[0], shape[2], shape[3], patch_size, ids, op);
  const int64_t K = ids.size(1), E = shape[1] * patch_size * patch_size;
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == shape[0] && grad.size(1) == K && grad.size(2) == E,
              "flipkern.", op, ": grad_out must be [", shape[0], ", ", K, ", ", E, "], got ", grad.sizes());
}

// grad_out [B, K, D] of drop_tokens over num_tokens positions.
inline void check_drop_backward_inputs(const at::Tensor& grad, const at::Tensor& ids, int64_t num_tokens,
                                       const char* op) {
  TORCH_CHECK(grad.dim() == 3, "flipkern.", op, ": grad_out must be 3-D, got ", grad.dim(), "-D");
  check_same_device(grad, "grad_out", ids, "ids_keep", op);
  check_keep_indices(ids, grad.size(0), num_tokens, "ids_keep", op);
  TORCH_CHECK(ids.size(1) == grad.size(1), "flipkern.", op, ": ids_keep has K = ", ids.size(1),
              " but grad_out has ", grad.size(1), " rows");
}

inline PatchGeom patch_geom(const at::Tensor& images, int64_t patch_size) {
  return {patch_size, images.size(3) / patch_size, images.stride(0), images.stride(1),
          images.stride(2), images.stride(3)};
}

// The inverse of ids [B, K] (values already checked to lie in [0, num_tokens)):
// int64 [B, num_tokens] holding, at each position, the k that keeps it, or -1.
// A position kept twice would have two owners, so repeated values are an error:
// scattering k over the positions lets one owner win, and the losers no longer
// read their own k back.
inline at::Tensor keep_inverse(const at::Tensor& ids, int64_t num_tokens, const char* op) {
  const int64_t B = ids.size(0), K = ids.size(1);
  auto inv = at::full({B, num_tokens}, -1, ids.options());
  if (ids.numel() == 0) return inv;
  auto k = at::arange(K, ids.options()).expand({B, K});
  inv.scatter_(1, ids, k);
  TORCH_CHECK(inv.gather(1, ids).eq(k).all().item<bool>(), "flipkern.", op,
              ": ids_keep repeats a position within a sample; each kept position must be unique");
  return inv;
}

// x_vis [B, K, D], ids [B, K] unique per sample in [0, num_tokens), fill [D].
inline at::Tensor check_restore_inputs(const at::Tensor& x, const at::Tensor& ids,
                                       int64_t num_tokens, const at::Tensor& fill, const char* op) {
  TORCH_CHECK(x.dim() == 3, "flipkern.", op, ": x_vis must be 3-D [B, K, D], got ", x.dim(), "-D");
  check_same_device(x, "x_vis", ids, "ids_keep", op);
  check_same_device(x, "x_vis", fill, "fill", op);
  TORCH_CHECK(fill.dim() == 1 && fill.size(0) == x.size(2), "flipkern.", op,
              ": fill must be [D] = [", x.size(2), "], got ", fill.sizes());
  TORCH_CHECK(fill.scalar_type() == x.scalar_type(), "flipkern.", op, ": fill dtype ",
              fill.scalar_type(), " differs from x_vis dtype ", x.scalar_type());
  check_keep_indices(ids, x.size(0), num_tokens, "ids_keep", op);
  TORCH_CHECK(ids.size(1) == x.size(1), "flipkern.", op, ": ids_keep has K = ", ids.size(1),
              " but x_vis has ", x.size(1), " rows");
  return keep_inverse(ids, num_tokens, op);
}

}  // namespace flipkern
