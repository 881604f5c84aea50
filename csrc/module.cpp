// flipkern._C: the op schemas of every flipkern kernel, in one place.
//
// Kernels register per device in their own files (TORCH_LIBRARY_IMPL with CPU in
// *_cpu.cpp, CUDA in *_cuda.cu). Fake (meta) kernels and autograd are registered
// from Python (flipkern/*.py), following pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing flipkern._C only has to run the static registrations below; the
// module itself is empty. (The build-on-first-use path loads the same code
// with torch.ops.load_library and never calls this.)
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(flipkern, m) {
  // --- token dropping (masking_cpu.cpp, masking_cuda.cu) ---
  // x [B, N, D], ids_keep int64 [B, K], pos_embed [N, D] or None -> [B, K, D]
  m.def("drop_tokens(Tensor x, Tensor ids_keep, Tensor? pos_embed) -> Tensor");
  // grad_out [B, K, D] -> grad_x [B, num_tokens, D] (zeros where dropped; duplicates accumulate)
  m.def("drop_tokens_backward(Tensor grad_out, Tensor ids_keep, SymInt num_tokens) -> Tensor");
  // images [B, C, H, W], ids_keep int64 [B, K] into the (H/p) x (W/p) patch grid -> the kept
  // patches [B, K, C*p*p], each flattened in (C, p, p) order (a Conv2d weight's order)
  m.def("gather_patches(Tensor images, Tensor ids_keep, int patch_size) -> Tensor");
  // grad_out [B, K, C*p*p] -> grad_images [B, C, H, W] (zeros where not kept; duplicates accumulate)
  m.def("gather_patches_backward(Tensor grad_out, Tensor ids_keep, SymInt[] image_shape, int patch_size) -> Tensor");
  // x_vis [B, K, D], ids_keep int64 [B, K] (unique per sample), fill [D] -> [B, num_tokens, D]:
  // x_vis[b, k] at position ids_keep[b, k], fill elsewhere. Its backward is drop_tokens + a sum.
  m.def("restore_tokens(Tensor x_vis, Tensor ids_keep, SymInt num_tokens, Tensor fill) -> Tensor");

  // --- variable-length attention (attention_cpu.cpp; on CUDA the Triton kernels run) ---
  // q, k, v [total, H, Dh] packed, cu_seqlens int32 [B+1] -> (out [total, H, Dh],
  // lse [H, total] in float32, float64 for float64 inputs: the per-row logsumexp of
  // the scaled scores, all the backward keeps besides q, k, v and out).
  m.def("varlen_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, "
        "bool causal, float scale) -> (Tensor, Tensor)");
  // -> (grad_q, grad_k, grad_v), each shaped and typed like q.
  m.def("varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens, SymInt max_seqlen, bool causal, float scale) -> (Tensor, Tensor, Tensor)");

  // --- contrastive losses (loss_cpu.cpp, loss_cuda.cu; chunk math in loss_chunks.h) ---
  // CLIP over all_image, all_text [N, D] (all ranks' features, gathered); rows
  // [offset, offset + local_batch) are this rank's samples, positive pairs share a row.
  // logit_scale: 0-d. -> (loss 0-d in the features' dtype, lse_image [local_batch],
  // lse_text [local_batch]: the logsumexp of each local image's row over all texts and of
  // each local text's row over all images, float32 (float64 for float64 features)).
  m.def("clip_loss_forward(Tensor all_image, Tensor all_text, Tensor logit_scale, SymInt offset, "
        "SymInt local_batch, SymInt chunk_size) -> (Tensor, Tensor, Tensor)");
  // grad 0-d -> (grad_all_image [N, D], grad_all_text [N, D], grad_logit_scale 0-d)
  m.def("clip_loss_backward(Tensor grad, Tensor all_image, Tensor all_text, Tensor logit_scale, "
        "Tensor lse_image, Tensor lse_text, SymInt offset, SymInt local_batch, SymInt chunk_size) "
        "-> (Tensor, Tensor, Tensor)");
  // SigLIP: image [b, D] (local) against all_text [N, D]; image i's positive is text
  // offset + i. -> loss 0-d in the features' dtype.
  m.def("siglip_loss_forward(Tensor image, Tensor all_text, Tensor logit_scale, Tensor logit_bias, "
        "SymInt offset, SymInt chunk_size) -> Tensor");
  // -> (grad_image [b, D], grad_all_text [N, D], grad_logit_scale, grad_logit_bias)
  m.def("siglip_loss_backward(Tensor grad, Tensor image, Tensor all_text, Tensor logit_scale, "
        "Tensor logit_bias, SymInt offset, SymInt chunk_size) -> (Tensor, Tensor, Tensor, Tensor)");
}
