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

}  // namespace flipkern
