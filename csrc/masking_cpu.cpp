// Token dropping, CPU kernels. Index math: masking_index.h (shared with CUDA).
//
// Every kernel here is a gather or scatter of contiguous runs (a token's D values,
// a patch row's p pixels): parallel over output rows, each run a plain copy that
// the compiler turns into vector moves when the run is contiguous in memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "checks.h"
#include "masking_index.h"

namespace flipkern {
namespace {

// dst[0:n] = src[0:n*stride:stride]
template <typename T>
inline void copy_run(T* __restrict__ dst, const T* __restrict__ src, int64_t n, int64_t stride) {
  if (stride == 1) {
    std::copy(src, src + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
  }
}

// The position add is the only arithmetic here; memory-bound only when it runs in
// vector registers. The build targets baseline x86-64 (SSE2), so on GCC/x86-64 the
// add loops are also compiled for AVX2 and AVX-512 and the best one is picked at
// load time (target_clones).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FK_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FK_VECTOR_CLONES
#endif

// out = a + b, one rounding, for the layouts with contiguous rows.
FK_VECTOR_CLONES void add_contiguous(float* __restrict__ out, const float* __restrict__ a,
                                     const float* __restrict__ b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

FK_VECTOR_CLONES void add_contiguous(double* __restrict__ out, const double* __restrict__ a,
                                     const double* __restrict__ b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// bfloat16 as bit operations on the raw values, which the compiler vectorizes
// (c10::BFloat16's conversions it does not): widen by a shift, add in float, round
// to nearest even and map NaN to 0x7FC0 exactly as c10::BFloat16 does, so the result
// is bit-identical to PyTorch's bfloat16 add.
FK_VECTOR_CLONES void add_contiguous_bf16(uint16_t* __restrict__ out, const uint16_t* __restrict__ a,
                                          const uint16_t* __restrict__ b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t ua = static_cast<uint32_t>(a[i]) << 16, ub = static_cast<uint32_t>(b[i]) << 16;
    float fa, fb;
    std::memcpy(&fa, &ua, sizeof(float));
    std::memcpy(&fb, &ub, sizeof(float));
    const float sum = fa + fb;
    uint32_t u;
    std::memcpy(&u, &sum, sizeof(float));
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    out[i] = sum != sum ? static_cast<uint16_t>(0x7FC0) : rounded;
  }
}

inline void add_contiguous(at::BFloat16* out, const at::BFloat16* a, const at::BFloat16* b, int64_t n) {
  static_assert(sizeof(at::BFloat16) == sizeof(uint16_t), "bfloat16 is 16 bits");
  add_contiguous_bf16(reinterpret_cast<uint16_t*>(out), reinterpret_cast<const uint16_t*>(a),
                      reinterpret_cast<const uint16_t*>(b), n);
}

// Any other type or layout: through opmath (float for half), one rounding per add
// (as PyTorch's add and scatter_add). out may be a (an accumulation).
template <typename T>
inline void add_strided(T* out, const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  using opmath_t = at::opmath_type<T>;
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(static_cast<opmath_t>(a[i * sa]) + static_cast<opmath_t>(b[i * sb]));
}

// out[0:n] = a[0:n*sa:sa] + b[0:n*sb:sb]; out does not overlap a or b.
template <typename T>
inline void add_run(T* out, const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, at::BFloat16>) {
    if (sa == 1 && sb == 1) return add_contiguous(out, a, b, n);
  }
  add_strided(out, a, sa, b, sb, n);
}

// Rows of `row_elems` values per parallel task: enough to amortize the scheduling.
inline int64_t grain_for(int64_t row_elems) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1));
}

at::Tensor drop_tokens_cpu(const at::Tensor& x, const at::Tensor& ids,
                           const std::optional<at::Tensor>& pos_embed) {
  check_drop_inputs(x, ids, pos_embed, "drop_tokens");
  const int64_t B = x.size(0), D = x.size(2), K = ids.size(1);
  auto out = at::empty({B, K, D}, x.options());
  if (out.numel() == 0) return out;
  const auto sx = strides3(x);
  const bool has_pos = pos_embed.has_value();
  const int64_t spn = has_pos ? pos_embed->stride(0) : 0, spd = has_pos ? pos_embed->stride(1) : 0;
  auto ids_a = ids.accessor<int64_t, 2>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "drop_tokens_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* pp = has_pos ? pos_embed->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // One task per kept row (b, k): a copy of D values plus the position add.
    at::parallel_for(0, B * K, grain_for(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        int64_t b, k;
        split_row(r, K, b, k);
        const int64_t n = ids_a[b][k];
        const scalar_t* __restrict__ xr = xp + offset3(sx, b, n, 0);
        scalar_t* __restrict__ orow = op + r * D;
        if (pp == nullptr) {
          copy_run(orow, xr, D, sx.d);
          continue;
        }
        add_run(orow, xr, sx.d, pp + n * spn, spd, D);
      }
    });
  });
  return out;
}

at::Tensor drop_tokens_backward_cpu(const at::Tensor& grad, const at::Tensor& ids,
                                    int64_t num_tokens) {
  check_drop_backward_inputs(grad, ids, num_tokens, "drop_tokens_backward");
  const int64_t B = grad.size(0), K = grad.size(1), D = grad.size(2);
  auto dx = at::zeros({B, num_tokens, D}, grad.options());
  if (grad.numel() == 0) return dx;
  const auto sg = strides3(grad);
  auto ids_a = ids.accessor<int64_t, 2>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "drop_tokens_backward_cpu", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    // One task per sample: its rows are written by one thread only, so repeated
    // indices accumulate without atomics.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t k = 0; k < K; ++k) {
          scalar_t* dst = dp + (b * num_tokens + ids_a[b][k]) * D;
          add_strided(dst, dst, 1, gp + offset3(sg, b, k, 0), sg.d, D);
        }
    });
  });
  return dx;
}

at::Tensor gather_patches_cpu(const at::Tensor& images, const at::Tensor& ids, int64_t patch_size) {
  check_patch_inputs(images, ids, patch_size, "gather_patches");
  const int64_t B = images.size(0), C = images.size(1), K = ids.size(1), p = patch_size;
  const int64_t E = C * p * p;
  auto out = at::empty({B, K, E}, images.options());
  if (out.numel() == 0) return out;
  const PatchGeom g = patch_geom(images, p);
  auto ids_a = ids.accessor<int64_t, 2>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "gather_patches_cpu", [&] {
    const scalar_t* ip = images.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // One task per kept patch (b, k): C*p runs of p pixels, each contiguous in the
    // output and (for a contiguous image) in the input.
    at::parallel_for(0, B * K, grain_for(E), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        int64_t b, k;
        split_row(r, K, b, k);
        const scalar_t* src = ip + patch_origin(g, b, ids_a[b][k]);
        scalar_t* dst = op + r * E;
        for (int64_t e = 0; e < E; e += p) copy_run(dst + e, src + patch_element(g, e), p, g.sw);
      }
    });
  });
  return out;
}

at::Tensor gather_patches_backward_cpu(const at::Tensor& grad, const at::Tensor& ids,
                                       at::IntArrayRef shape, int64_t patch_size) {
  check_patch_backward_inputs(grad, ids, shape, patch_size, "gather_patches_backward");
  auto dimages = at::zeros(shape, grad.options());
  const int64_t B = shape[0], C = shape[1], K = ids.size(1), p = patch_size, E = C * p * p;
  if (grad.numel() == 0) return dimages;
  const PatchGeom g = patch_geom(dimages, p);
  const auto sg = strides3(grad);
  auto ids_a = ids.accessor<int64_t, 2>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "gather_patches_backward_cpu", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dp = dimages.mutable_data_ptr<scalar_t>();
    // One task per sample, as in drop_tokens_backward: a repeated patch accumulates
    // in k order, written by one thread only.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t k = 0; k < K; ++k) {
          scalar_t* dst = dp + patch_origin(g, b, ids_a[b][k]);
          const scalar_t* src = gp + offset3(sg, b, k, 0);
          for (int64_t e = 0; e < E; e += p) {
            scalar_t* d = dst + patch_element(g, e);
            add_strided(d, d, 1, src + e * sg.d, sg.d, p);  // dimages is contiguous: sw = 1
          }
        }
      }
    });
  });
  return dimages;
}

at::Tensor restore_tokens_cpu(const at::Tensor& x, const at::Tensor& ids, int64_t num_tokens,
                              const at::Tensor& fill) {
  const at::Tensor inv = check_restore_inputs(x, ids, num_tokens, fill, "restore_tokens");
  const int64_t B = x.size(0), D = x.size(2), N = num_tokens;
  auto out = at::empty({B, N, D}, x.options());
  if (out.numel() == 0) return out;
  const auto sx = strides3(x);
  const int64_t sf = fill.stride(0);
  auto inv_a = inv.accessor<int64_t, 2>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "restore_tokens_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* fp = fill.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // One task per output row (b, n): the kept token that owns it, else fill.
    // Every row is written exactly once.
    at::parallel_for(0, B * N, grain_for(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        int64_t b, n;
        split_row(r, N, b, n);
        const int64_t k = inv_a[b][n];
        if (k >= 0) {
          copy_run(op + r * D, xp + offset3(sx, b, k, 0), D, sx.d);
        } else {
          copy_run(op + r * D, fp, D, sf);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flipkern, CPU, m) {
  m.impl("drop_tokens", &drop_tokens_cpu);
  m.impl("drop_tokens_backward", &drop_tokens_backward_cpu);
  m.impl("gather_patches", &gather_patches_cpu);
  m.impl("gather_patches_backward", &gather_patches_backward_cpu);
  m.impl("restore_tokens", &restore_tokens_cpu);
}

}  // namespace flipkern
