// Per-row sampling arithmetic shared by the CPU and CUDA samplers (host and device code), so both
// apply penalties and score the exponential race with the same float operations.
#pragma once

#include <math.h>

#include <cstdint>

#include "fastllm/kernels/dtype_convert.h"
#include "fastllm/kernels/philox.h"
#include "fastllm/kernels/sampling.h"

namespace fastllm::kernels {

// counts[token] = occurrences in the output | kPromptFlag when the token is in the prompt.
constexpr int32_t kPromptFlag = 1 << 30;
constexpr int32_t kCountMask = kPromptFlag - 1;
// Temperatures below this are greedy (as vLLM's _SAMPLING_EPS).
constexpr float kGreedyTemperature = 1e-5f;
// Gumbel noise -log(-log(u)) for u in [2^-24, 1 - 2^-24] lies in [-2.78, 16.64].
constexpr float kRaceMargin = 20.0f;

struct RowParams {
  float temperature, top_p, min_p, repetition, presence, frequency;
  int32_t top_k;
  int64_t seed, generator_offset;
  int32_t prompt_begin, prompt_end, output_begin, output_end;
  int32_t bias_begin, bias_end, allowed_begin, allowed_end;

  FASTLLM_HOST_DEVICE static RowParams load(const SamplingParamsBatch& p, int64_t r) {
    RowParams rp;
    rp.temperature = p.temperature ? p.temperature[r] : 0.0f;
    rp.top_k = p.top_k ? p.top_k[r] : 0;
    rp.top_p = p.top_p ? p.top_p[r] : 1.0f;
    rp.min_p = p.min_p ? p.min_p[r] : 0.0f;
    rp.repetition = p.repetition_penalty ? p.repetition_penalty[r] : 1.0f;
    rp.presence = p.presence_penalty ? p.presence_penalty[r] : 0.0f;
    rp.frequency = p.frequency_penalty ? p.frequency_penalty[r] : 0.0f;
    rp.seed = p.seeds ? p.seeds[r] : -1;
    rp.generator_offset = p.generator_offsets ? p.generator_offsets[r] : 0;
    rp.prompt_begin = p.prompt_offsets ? p.prompt_offsets[r] : 0;
    rp.prompt_end = p.prompt_offsets ? p.prompt_offsets[r + 1] : 0;
    rp.output_begin = p.output_offsets ? p.output_offsets[r] : 0;
    rp.output_end = p.output_offsets ? p.output_offsets[r + 1] : 0;
    rp.bias_begin = p.bias_offsets ? p.bias_offsets[r] : 0;
    rp.bias_end = p.bias_offsets ? p.bias_offsets[r + 1] : 0;
    rp.allowed_begin = p.allowed_offsets ? p.allowed_offsets[r] : 0;
    rp.allowed_end = p.allowed_offsets ? p.allowed_offsets[r + 1] : 0;
    return rp;
  }

  FASTLLM_HOST_DEVICE bool has_penalties() const {
    return repetition != 1.0f || presence != 0.0f || frequency != 0.0f;
  }
  FASTLLM_HOST_DEVICE bool greedy() const { return temperature < kGreedyTemperature; }
};

// Penalised logit of a token with `count` = output occurrences | kPromptFlag (count != 0).
FASTLLM_HOST_DEVICE float apply_penalties(float x, int32_t count, const RowParams& rp) {
  if (count != 0 && rp.repetition != 1.0f) x = x > 0.0f ? x / rp.repetition : x * rp.repetition;
  const int32_t in_output = count & kCountMask;
  if (in_output > 0) x = x - (rp.frequency * float(in_output) + rp.presence);
  return x;
}

// Exponential-race score of a token with (temperature-scaled) logit x and 32 random bits:
// argmax of x - log(E), E = -log(u) ~ Exp(1), samples softmax(x).
FASTLLM_HOST_DEVICE float race_score(float x, uint32_t bits) {
  const float u = philox_uniform(bits);
  return x - logf(-logf(u));
}

}  // namespace fastllm::kernels
