// Index math of the token-dropping kernels, shared by the CPU kernel
// (masking_cpu.cpp) and the CUDA kernel (masking_cuda.cu) so that the tests that
// run the CPU kernel exercise the same arithmetic the GPU runs.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FK_HOST_DEVICE inline
#endif

namespace flipkern {

// Element strides of a 3-D tensor [B, N, D] (any layout).
struct Strides3 {
  int64_t b, n, d;
};

// Row r of a [B, K] index matrix flattened row-major -> (b, k).
FK_HOST_DEVICE void split_row(int64_t r, int64_t K, int64_t& b, int64_t& k) {
  b = r / K;
  k = r - b * K;
}

FK_HOST_DEVICE bool index_in_range(int64_t n, int64_t num_tokens) {
  return n >= 0 && n < num_tokens;
}

// Offset of element (b, n, d) in a strided [B, N, D] tensor.
FK_HOST_DEVICE int64_t offset3(const Strides3& s, int64_t b, int64_t n, int64_t d) {
  return b * s.b + n * s.n + d * s.d;
}

// --- gather_patches: images [B, C, H, W] viewed as a grid of p x p patches ---
// Patch n sits at grid row n / grid_w, column n % grid_w; within a patch, element
// e of the flattened (C, p, p) vector is channel e / (p*p), row (e / p) % p,
// column e % p: the order Conv2d's weight [D, C, p, p] flattens to.
struct PatchGeom {
  int64_t p, grid_w;  // patch size, patches per image row (W / p)
  int64_t sb, sc, sh, sw;  // element strides of the image tensor
};

// Offset of the top-left pixel (channel 0) of patch n of sample b.
FK_HOST_DEVICE int64_t patch_origin(const PatchGeom& g, int64_t b, int64_t n) {
  const int64_t gy = n / g.grid_w, gx = n - (n / g.grid_w) * g.grid_w;
  return b * g.sb + gy * g.p * g.sh + gx * g.p * g.sw;
}

// Offset, from a patch origin, of element e of the flattened (C, p, p) patch.
FK_HOST_DEVICE int64_t patch_element(const PatchGeom& g, int64_t e) {
  const int64_t pp = g.p * g.p;
  const int64_t c = e / pp, r = e - (e / pp) * pp;
  const int64_t i = r / g.p, j = r - (r / g.p) * g.p;
  return c * g.sc + i * g.sh + j * g.sw;
}

}  // namespace flipkern
