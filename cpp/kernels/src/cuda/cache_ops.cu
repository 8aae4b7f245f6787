#include "fastllm/kernels/cache_ops.h"

#include <cuda_runtime.h>

namespace fastllm::kernels {
namespace {

// One thread block per pair; threads stride over the block's 16-byte words.
__global__ void copy_blocks_kernel(int4* cache, int64_t words_per_block, const int32_t* src_dst) {
  const int32_t src = src_dst[2 * blockIdx.x];
  const int32_t dst = src_dst[2 * blockIdx.x + 1];
  const int4* from = cache + src * words_per_block;
  int4* to = cache + dst * words_per_block;
  for (int64_t i = threadIdx.x; i < words_per_block; i += blockDim.x) to[i] = from[i];
}

}  // namespace

void copy_blocks_cuda(void* cache, int64_t num_blocks, int64_t block_bytes, const int32_t* src_dst,
                      int64_t num_pairs, void* stream) {
  (void)num_blocks;
  check_arg(block_bytes % 16 == 0, "copy_blocks: block size in bytes must be a multiple of 16");
  if (num_pairs == 0) return;
  copy_blocks_kernel<<<static_cast<unsigned>(num_pairs), 256, 0,
                       static_cast<cudaStream_t>(stream)>>>(static_cast<int4*>(cache),
                                                            block_bytes / 16, src_dst);
}

}  // namespace fastllm::kernels
