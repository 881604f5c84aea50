// Index math of the varlen attention kernels, shared by the CPU kernel
// (attention_cpu.cpp) and the CUDA kernel (attention_cuda.cu), so the CPU tests
// exercise the bounds the GPU uses.
//
// Packed layout: sequence b owns rows cu_seqlens[b] .. cu_seqlens[b+1]-1 of q, k,
// v [total, H, Dh]; positions i (query) and j (key) below count from the
// sequence's first row. Causal: key j is visible to query i iff j <= i.
#pragma once
#include <cstdint>

#include "masking_index.h"  // FK_HOST_DEVICE, Strides3, offset3

namespace flipkern {

// The keys visible to query rows [.., row_end) of a sequence of length L are
// [0, key_end): every key, or under causal masking the keys up to the last row.
FK_HOST_DEVICE int64_t key_end(int64_t row_end, int64_t L, bool causal) {
  return (causal && row_end < L) ? row_end : L;
}

// The first query row that sees key j (the inverse of key_end).
FK_HOST_DEVICE int64_t query_begin(int64_t j, bool causal) { return causal ? j : 0; }

// A grid of B * blocks_per_seq programs, each owning `block` rows of one sequence:
// program pid -> (sequence b, first row r0 of its block).
FK_HOST_DEVICE void split_block(int64_t pid, int64_t blocks_per_seq, int64_t block, int64_t& b,
                                int64_t& r0) {
  b = pid / blocks_per_seq;
  r0 = (pid - b * blocks_per_seq) * block;
}

FK_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace flipkern
