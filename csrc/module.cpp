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
  m.def("varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, "
        "bool causal, float scale) -> (Tensor, Tensor)");
  // -> (grad_q, grad_k, grad_v), each shaped and typed like q.
  m.def("varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens, SymInt max_seqlen, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}
