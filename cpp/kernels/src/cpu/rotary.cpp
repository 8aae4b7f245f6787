// CPU rotary embeddings, in place, parallel over tokens.
#include "fastllm/kernels/rotary.h"

#include <string>

#include "parallel.h"
#include "vec.h"

namespace fastllm::kernels {
namespace {

void rotate_heads(char* base, int64_t num_heads, const RotaryParams& p, const float* cos,
                  const float* sin, float* buffer) {
  const auto& ops = cpu::vec_ops();
  const size_t size = dtype_size(p.dtype);
  const int64_t half = p.rotary_dim / 2;
  if (p.is_neox && p.dtype == DType::kFloat32) {  // in place
    for (int64_t h = 0; h < num_heads; ++h)
      ops.rotate_half(reinterpret_cast<float*>(base) + h * p.head_size, cos, sin, half);
    return;
  }
  for (int64_t h = 0; h < num_heads; ++h) {
    char* head = base + h * p.head_size * size;
    ops.load(head, p.dtype, buffer, p.rotary_dim, 1.0f);
    if (p.is_neox) {
      ops.rotate_half(buffer, cos, sin, half);
    } else {
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = buffer[2 * i], x2 = buffer[2 * i + 1];
        buffer[2 * i] = x1 * cos[i] - x2 * sin[i];
        buffer[2 * i + 1] = x2 * cos[i] + x1 * sin[i];
      }
    }
    ops.store(buffer, p.dtype, head, p.rotary_dim, 1.0f);
  }
}

}  // namespace

void check_rotary_params(const RotaryParams& p) {
  check_arg(p.num_tokens >= 0 && p.num_heads > 0 && p.head_size > 0, "rotary_embedding: bad sizes");
  check_arg(p.rotary_dim > 0 && p.rotary_dim % 2 == 0 && p.rotary_dim <= p.head_size,
            "rotary_embedding: rotary_dim must be even and <= head_size");
  check_arg(!is_float8(p.dtype), "rotary_embedding: float8 is not supported");
  check_arg(p.query_token_stride >= p.num_heads * p.head_size,
            "rotary_embedding: query token stride too small");
  check_arg(p.key == nullptr ||
                (p.num_kv_heads > 0 && p.key_token_stride >= p.num_kv_heads * p.head_size),
            "rotary_embedding: key token stride too small");
  check_arg(p.max_position > 0, "rotary_embedding: empty cos/sin cache");
}

void rotary_embedding_cpu(const RotaryParams& p) {
  check_rotary_params(p);
  for (int64_t i = 0; i < p.num_tokens; ++i)
    check_arg(p.positions[i] >= 0 && p.positions[i] < p.max_position,
              "rotary_embedding: position " + std::to_string(p.positions[i]) +
                  " outside the cos/sin cache");
  const size_t size = dtype_size(p.dtype);
  auto run_token = [&](int64_t i) {
    const float* cos = p.cos_sin_cache + p.positions[i] * p.rotary_dim;
    const float* sin = cos + p.rotary_dim / 2;
    float* buffer = cpu::scratch(0, p.rotary_dim);
    rotate_heads(static_cast<char*>(p.query) + i * p.query_token_stride * size, p.num_heads, p, cos,
                 sin, buffer);
    if (p.key != nullptr)
      rotate_heads(static_cast<char*>(p.key) + i * p.key_token_stride * size, p.num_kv_heads, p,
                   cos, sin, buffer);
  };
  if (p.num_tokens * p.num_heads * p.rotary_dim < 32768) {
    for (int64_t i = 0; i < p.num_tokens; ++i) run_token(i);
  } else {
    cpu::parallel_for(p.num_tokens, run_token);
  }
}

}  // namespace fastllm::kernels
