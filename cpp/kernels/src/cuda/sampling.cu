// CUDA batched sampling: one thread block per row, the same steps and arithmetic as the CPU
// sampler (see sampling.h). Thresholds are found by bitwise search over float bit patterns
// (32 block-wide counting passes), which yields exactly the CPU's selection values.
#include <cstdint>

// The portability header comes first: it defines the HIP/CUDA qualifiers the shared headers use.
#include "fastllm/kernels/cuda_compat.cuh"
// clang-format off
#include "../sampling_common.h"
// clang-format on
#include "fastllm/kernels/sampling.h"

namespace fastllm::kernels {
namespace {

using namespace gpu;

constexpr int kThreads = 512;

// Order-preserving map of floats to unsigned keys.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct ArgMax {
  float value;
  int32_t index;
};

// Larger value wins; ties go to the lower index (index -1 = empty).
__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

__device__ ArgMax block_argmax(ArgMax v, float* value_scratch, int32_t* index_scratch) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    ArgMax other{shfl_xor(v.value, o), shfl_xor(v.index, o)};
    v = better(v, other);
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    value_scratch[threadIdx.x >> 5] = v.value;
    index_scratch[threadIdx.x >> 5] = v.index;
  }
  __syncthreads();
  ArgMax result{-INFINITY, -1};
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w)
    result = better(result, ArgMax{value_scratch[w], index_scratch[w]});
  return result;
}

__device__ __forceinline__ float block_count(float v, float* scratch) {
  return block_sum(v, scratch);
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(SamplingParamsBatch p, float* __restrict__ work_x,
                  int32_t* __restrict__ work_aux) {
  __shared__ float scratch[32];
  __shared__ float value_scratch[32];
  __shared__ int32_t index_scratch[32];

  const int64_t row = blockIdx.x;
  const int64_t vocab = p.vocab;
  const float* raw = p.logits + row * p.logits_row_stride;
  float* x = work_x + row * vocab;
  int32_t* aux = work_aux + row * vocab;
  float* aux_f = reinterpret_cast<float*>(aux);
  const RowParams rp = RowParams::load(p, row);

  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    x[v] = raw[v];
    aux[v] = 0;
  }
  __syncthreads();

  // 1. Penalties from per-token counts.
  if (rp.has_penalties()) {
    for (int32_t i = rp.output_begin + threadIdx.x; i < rp.output_end; i += blockDim.x) {
      const int32_t id = p.output_ids[i];
      if (id >= 0 && id < vocab) atomicAdd(&aux[id], 1);
    }
    for (int32_t i = rp.prompt_begin + threadIdx.x; i < rp.prompt_end; i += blockDim.x) {
      const int32_t id = p.prompt_ids[i];
      if (id >= 0 && id < vocab) atomicOr(&aux[id], kPromptFlag);
    }
    __syncthreads();
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      const int32_t count = aux[v];
      if (count != 0) x[v] = apply_penalties(x[v], count, rp);
      aux[v] = 0;
    }
    __syncthreads();
  }
  // 2. Logit bias.
  for (int32_t i = rp.bias_begin + threadIdx.x; i < rp.bias_end; i += blockDim.x) {
    const int32_t id = p.bias_ids[i];
    if (id >= 0 && id < vocab) atomicAdd(&x[id], p.bias_values[i]);
  }
  __syncthreads();
  // 3. Allowed ids.
  if (rp.allowed_end > rp.allowed_begin) {
    for (int32_t i = rp.allowed_begin + threadIdx.x; i < rp.allowed_end; i += blockDim.x) {
      const int32_t id = p.allowed_ids[i];
      if (id >= 0 && id < vocab) aux[id] = 1;
    }
    __syncthreads();
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
      if (aux[v] == 0) x[v] = -INFINITY;
    __syncthreads();
  }

  int32_t token = 0;
  if (rp.greedy()) {
    ArgMax best{-INFINITY, -1};
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
      best = better(best, ArgMax{x[v], static_cast<int32_t>(v)});
    token = block_argmax(best, value_scratch, index_scratch).index;
  } else {
    // 5. Temperature.
    float local_max = -INFINITY;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      x[v] = x[v] / rp.temperature;
      local_max = fmaxf(local_max, x[v]);
    }
    const float m = block_max(local_max, scratch);
    if (m == -INFINITY) {
      ArgMax best{-INFINITY, -1};
      for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
        best = better(best, ArgMax{raw[v], static_cast<int32_t>(v)});
      token = block_argmax(best, value_scratch, index_scratch).index;
    } else {
      // 6. min-p.
      if (rp.min_p > 0.0f) {
        for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
          if (expf(x[v] - m) < rp.min_p) x[v] = -INFINITY;
        __syncthreads();
      }
      // 7. top-k: the largest key K with #{x >= K} >= k is the k-th largest value's key.
      if (rp.top_k > 0) {
        float local = 0.0f;
        for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) local += x[v] != -INFINITY;
        if (block_count(local, scratch) > static_cast<float>(rp.top_k)) {
          uint32_t threshold = 0;
          for (int bit = 31; bit >= 0; --bit) {
            const uint32_t candidate = threshold | (1u << bit);
            float count = 0.0f;
            for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
              count += x[v] != -INFINITY && order_key(x[v]) >= candidate;
            if (block_count(count, scratch) >= static_cast<float>(rp.top_k)) threshold = candidate;
          }
          for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
            if (order_key(x[v]) < threshold) x[v] = -INFINITY;
          __syncthreads();
        }
      }
      // 8. top-p: the largest t with sum{e >= t} >= top_p * sum{e}, e = exp(x - m) >= 0.
      if (rp.top_p < 1.0f) {
        float local = 0.0f;
        for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
          const float e = x[v] == -INFINITY ? 0.0f : expf(x[v] - m);
          aux_f[v] = e;
          local += e;
        }
        const float need = rp.top_p * block_sum(local, scratch);
        uint32_t threshold = 0;
        for (int bit = 30; bit >= 0; --bit) {
          const uint32_t candidate = threshold | (1u << bit);
          const float t = __uint_as_float(candidate);
          float mass = 0.0f;
          for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
            mass += aux_f[v] >= t ? aux_f[v] : 0.0f;
          if (block_sum(mass, scratch) >= need) threshold = candidate;
        }
        const float t = __uint_as_float(threshold);
        for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
          if (x[v] != -INFINITY && aux_f[v] < t) x[v] = -INFINITY;
        __syncthreads();
      }
      const int32_t draft = p.draft_ids != nullptr ? p.draft_ids[row] : -1;
      if (draft >= 0 && draft < vocab) {
        // Typical acceptance (sampling.h): entropy and the draft's probability after step 8.
        float local_z = 0.0f, local_w = 0.0f;
        ArgMax best{-INFINITY, -1};
        for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
          best = better(best, ArgMax{x[v], static_cast<int32_t>(v)});
          if (x[v] == -INFINITY) continue;
          const float e = expf(x[v] - m);
          local_z += e;
          local_w += e * (x[v] - m);
        }
        const float z = block_sum(local_z, scratch);
        const float w = block_sum(local_w, scratch);
        const int32_t argmax = block_argmax(best, value_scratch, index_scratch).index;
        const float entropy = logf(z) - w / z;
        const float p_draft = x[draft] == -INFINITY ? 0.0f : expf(x[draft] - m) / z;
        const float bar = fminf(p.typical_threshold, p.typical_alpha * expf(-entropy));
        token = p_draft > bar ? draft : argmax;
      } else {
        // 9. Exponential race, four tokens per Philox call.
        const SamplingStream stream =
            SamplingStream::make(rp.seed, p.global_seed, rp.generator_offset, row);
        const float floor = m - kRaceMargin;
        ArgMax best{-INFINITY, -1};
        const int64_t groups = (vocab + 3) / 4;
        for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
          bool any = false;
          for (int e = 0; e < 4; ++e) {
            const int64_t v = 4 * g + e;
            any |= v < vocab && x[v] >= floor;
          }
          if (!any) continue;
          const Philox4 bits = stream.block(static_cast<uint32_t>(g));
          for (int e = 0; e < 4; ++e) {
            const int64_t v = 4 * g + e;
            if (v < vocab && x[v] >= floor)
              best = better(best, ArgMax{race_score(x[v], bits.v[e]), static_cast<int32_t>(v)});
          }
        }
        token = block_argmax(best, value_scratch, index_scratch).index;
      }
    }
  }
  if (threadIdx.x == 0) p.sampled[row] = token;

  // Logprobs of the raw logits.
  if (p.sampled_logprob != nullptr || p.sampled_rank != nullptr || p.num_top_logprobs > 0) {
    float local_max = -INFINITY;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) local_max = fmaxf(local_max, raw[v]);
    const float raw_max = block_max(local_max, scratch);
    float local = 0.0f;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) local += expf(raw[v] - raw_max);
    const float lse = raw_max + logf(block_sum(local, scratch));
    const float chosen = raw[token];
    if (p.sampled_rank != nullptr) {
      float greater = 0.0f;
      for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) greater += raw[v] > chosen;
      const float count = block_count(greater, scratch);
      if (threadIdx.x == 0) p.sampled_rank[row] = static_cast<int32_t>(count) + 1;
    }
    if (threadIdx.x == 0 && p.sampled_logprob != nullptr) p.sampled_logprob[row] = chosen - lse;
    // Top-N by repeated arg-max below the previous pick in (value desc, index asc) order.
    ArgMax previous{INFINITY, -1};
    for (int64_t n = 0; n < p.num_top_logprobs; ++n) {
      ArgMax best{-INFINITY, -1};
      for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
        const float value = raw[v];
        const bool after = previous.index < 0 || value < previous.value ||
                           (value == previous.value && v > previous.index);
        if (after) best = better(best, ArgMax{value, static_cast<int32_t>(v)});
      }
      previous = block_argmax(best, value_scratch, index_scratch);
      if (threadIdx.x == 0) {
        p.top_ids[row * p.num_top_logprobs + n] = previous.index;
        p.top_logprobs[row * p.num_top_logprobs + n] = previous.value - lse;
      }
    }
  }
}

}  // namespace

void sample_cuda(const SamplingParamsBatch& p, void* stream) {
  check_sampling_params(p);
  if (p.num_rows == 0) return;
  check_arg(
      p.workspace != nullptr && p.workspace_bytes >= sampling_workspace_bytes(p.num_rows, p.vocab),
      "sample (CUDA): workspace smaller than sampling_workspace_bytes(num_rows, vocab)");
  check_arg(p.vocab < (int64_t(1) << 31), "sample: vocab too large");
  float* work_x = static_cast<float*>(p.workspace);
  int32_t* work_aux = reinterpret_cast<int32_t*>(work_x + p.num_rows * p.vocab);
  sample_kernel<<<static_cast<unsigned>(p.num_rows), kThreads, 0,
                  static_cast<cudaStream_t>(stream)>>>(p, work_x, work_aux);
  check_launch("sample");
}

}  // namespace fastllm::kernels
