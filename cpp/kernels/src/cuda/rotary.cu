// CUDA rotary embeddings: one thread block per token, threads over (head, rotation pair).
#include "fastllm/kernels/cuda_compat.cuh"
#include "fastllm/kernels/rotary.h"

namespace fastllm::kernels {
namespace {

using namespace gpu;

template <typename T>
__device__ void rotate(T* base, int64_t num_heads, int64_t head_size, int64_t half,
                       const float* cos, const float* sin, bool is_neox) {
  for (int64_t idx = threadIdx.x; idx < num_heads * half; idx += blockDim.x) {
    const int64_t h = idx / half, i = idx % half;
    T* head = base + h * head_size;
    const int64_t a = is_neox ? i : 2 * i;
    const int64_t b = is_neox ? i + half : 2 * i + 1;
    const float x1 = to_float(head[a]), x2 = to_float(head[b]);
    head[a] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
    head[b] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

template <typename T>
__global__ void rotary_kernel(const int64_t* __restrict__ positions, T* query, T* key,
                              const float* __restrict__ cos_sin_cache, int64_t num_heads,
                              int64_t num_kv_heads, int64_t head_size, int64_t rotary_dim,
                              int64_t max_position, int64_t q_stride, int64_t k_stride,
                              bool is_neox) {
  const int64_t token = blockIdx.x;
  int64_t pos = positions[token];
  pos = pos < 0 ? 0 : (pos >= max_position ? max_position - 1 : pos);
  const float* cos = cos_sin_cache + pos * rotary_dim;
  const int64_t half = rotary_dim / 2;
  const float* sin = cos + half;
  rotate(query + token * q_stride, num_heads, head_size, half, cos, sin, is_neox);
  if (key != nullptr)
    rotate(key + token * k_stride, num_kv_heads, head_size, half, cos, sin, is_neox);
}

template <typename T>
void launch(const RotaryParams& p, cudaStream_t stream) {
  rotary_kernel<T><<<static_cast<unsigned>(p.num_tokens), 128, 0, stream>>>(
      p.positions, static_cast<T*>(p.query), static_cast<T*>(p.key), p.cos_sin_cache, p.num_heads,
      p.num_kv_heads, p.head_size, p.rotary_dim, p.max_position, p.query_token_stride,
      p.key_token_stride, p.is_neox);
  check_launch("rotary_embedding");
}

}  // namespace

void rotary_embedding_cuda(const RotaryParams& p, void* stream_handle) {
  check_rotary_params(p);
  if (p.num_tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (p.dtype) {
    case DType::kFloat32:
      return launch<float>(p, stream);
    case DType::kFloat16:
      return launch<half_t>(p, stream);
    default:
      return launch<bf16_t>(p, stream);
  }
}

}  // namespace fastllm::kernels
