#include "fastllm/fake_executor.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "fastllm/errors.h"
#include "mix.h"

namespace fastllm {

using detail::mix64;

FakeExecutor::FakeExecutor(const FakeExecutorConfig& config)
    : config_(config),
      device_(static_cast<size_t>(config.num_gpu_blocks) * config.block_size),
      host_(static_cast<size_t>(config.num_cpu_blocks) * config.block_size) {
  if (config.vocab_size < 2) throw ConfigError("FakeExecutor: vocab_size must be at least 2");
}

int32_t FakeExecutor::next_token(const int32_t* context, int32_t length, int32_t vocab_size,
                                 int64_t seed, const int32_t* banned, int32_t num_banned,
                                 int32_t child, int32_t lora_id) {
  uint64_t h = seed >= 0    ? mix64(static_cast<uint64_t>(seed) ^ 0xa0761d6478bd642full)
               : child == 0 ? 0x1234
                            : mix64(static_cast<uint64_t>(child) ^ 0xe7037ed1a0b428dbull);
  if (lora_id != 0) h = mix64(h ^ (static_cast<uint64_t>(lora_id) << 20));  // another "model"
  for (int32_t i = 0; i < length; ++i) {
    h = mix64(h ^ static_cast<uint32_t>(context[i]) ^ (static_cast<uint64_t>(i) << 32));
  }
  auto token = static_cast<int32_t>(h % static_cast<uint64_t>(vocab_size));
  // Masked tokens (EOS before min_tokens) are skipped, as a sampler would never pick them.
  for (int32_t tries = 0;
       tries < vocab_size && std::find(banned, banned + num_banned, token) != banned + num_banned;
       ++tries) {
    token = (token + 1) % vocab_size;
  }
  return token;
}

std::vector<int32_t> FakeExecutor::reference_generate(const std::vector<int32_t>& prompt,
                                                      int32_t max_tokens, int32_t vocab_size,
                                                      const std::vector<int32_t>& eos_token_ids,
                                                      int32_t min_tokens, int64_t seed,
                                                      int32_t child, int32_t lora_id) {
  std::vector<int32_t> seq = prompt;
  for (int32_t out = 0; out < max_tokens; ++out) {
    const bool suppress = out < min_tokens;
    const int32_t token =
        next_token(seq.data(), static_cast<int32_t>(seq.size()), vocab_size, seed,
                   suppress ? eos_token_ids.data() : nullptr,
                   suppress ? static_cast<int32_t>(eos_token_ids.size()) : 0, child, lora_id);
    seq.push_back(token);
    if (std::find(eos_token_ids.begin(), eos_token_ids.end(), token) != eos_token_ids.end()) break;
  }
  return {seq.begin() + static_cast<std::ptrdiff_t>(prompt.size()), seq.end()};
}

void FakeExecutor::copy_blocks(std::vector<Slot>& from, std::vector<Slot>& to,
                               const std::vector<int32_t>& pairs) {
  const size_t bs = config_.block_size;
  for (size_t i = 0; i + 1 < pairs.size(); i += 2) {
    const size_t src = static_cast<size_t>(pairs[i]) * bs;
    const size_t dst = static_cast<size_t>(pairs[i + 1]) * bs;
    if (src + bs > from.size() || dst + bs > to.size()) {
      throw EngineError("FakeExecutor: block op out of range (" + std::to_string(pairs[i]) +
                        " -> " + std::to_string(pairs[i + 1]) + ")");
    }
    std::copy(from.begin() + src, from.begin() + src + bs, to.begin() + dst);
  }
}

StepResult FakeExecutor::execute(const BatchPlan& plan) {
  ++num_steps_;
  num_tokens_processed_ += plan.num_tokens;
  max_batch_tokens_seen_ = std::max(max_batch_tokens_seen_, plan.num_tokens);

  copy_blocks(device_, host_, plan.block_ops.swap_out);
  copy_blocks(host_, device_, plan.block_ops.swap_in);
  copy_blocks(device_, device_, plan.block_ops.copy);

  for (int32_t s = 0; s < plan.num_seqs; ++s) {
    const int32_t lora = plan.lora_ids.empty() ? 0 : plan.lora_ids[s];
    for (int32_t i = plan.query_start_loc[s]; i < plan.query_start_loc[s + 1]; ++i) {
      const int64_t slot = plan.slot_mapping[i];
      if (slot < config_.block_size || slot >= static_cast<int64_t>(device_.size())) {
        throw EngineError("FakeExecutor: slot " + std::to_string(slot) + " out of range");
      }
      device_[slot] = {plan.token_ids[i], plan.positions[i], lora};
    }
  }

  StepResult result;
  result.sampled_token_ids.reserve(plan.num_samples);
  bool any_logprobs = false;
  for (int32_t r = 0; r < plan.num_samples; ++r) {
    const int32_t seq = plan.sample_seq_indices[r];
    const int32_t lora = plan.lora_ids.empty() ? 0 : plan.lora_ids[seq];
    // The row's context ends at its token (a verify row of speculative decoding ends before the
    // sequence's last draft).
    const int32_t ctx = plan.positions[plan.sample_token_indices[r]] + 1;
    // Tokens with a -inf bias (EOS/stop ids below min_tokens) can never be sampled.
    banned_.clear();
    for (int32_t i = plan.bias_offsets[r]; i < plan.bias_offsets[r + 1]; ++i) {
      if (std::isinf(plan.bias_values[i]) && plan.bias_values[i] < 0) {
        banned_.push_back(plan.bias_token_ids[i]);
      }
    }
    const int32_t* banned = banned_.data();
    const auto num_banned = static_cast<int32_t>(banned_.size());
    int32_t token;
    if (config_.verify_kv) {
      context_.clear();
      const int32_t* table =
          plan.block_tables.data() + static_cast<size_t>(seq) * plan.max_blocks_per_seq;
      for (int32_t pos = 0; pos < ctx; ++pos) {
        const Slot& s =
            device_[static_cast<size_t>(table[pos / config_.block_size]) * config_.block_size +
                    pos % config_.block_size];
        if (s.position != pos) {
          throw EngineError("FakeExecutor: KV corruption in request " + plan.request_ids[seq] +
                            ": position " + std::to_string(pos) + " holds position " +
                            std::to_string(s.position));
        }
        if (s.lora != lora) {
          throw EngineError("FakeExecutor: request " + plan.request_ids[seq] + " (adapter " +
                            std::to_string(lora) + ") reads KV written under adapter " +
                            std::to_string(s.lora) + " at position " + std::to_string(pos));
        }
        context_.push_back(s.token);
      }
      token = next_token(context_.data(), ctx, config_.vocab_size, plan.seeds[r], banned,
                         num_banned, plan.sample_child_indices[r], lora);
    } else {
      const int32_t last[2] = {plan.token_ids[plan.sample_token_indices[r]], ctx};
      token = next_token(last, 2, config_.vocab_size, plan.seeds[r], banned, num_banned,
                         plan.sample_child_indices[r], lora);
    }
    if (config_.disagree_every > 0 &&
        (static_cast<uint32_t>(ctx) * 2654435761u >> 7) % config_.disagree_every == 0) {
      token = (token + 1) % config_.vocab_size;
    }
    result.sampled_token_ids.push_back(token);
    any_logprobs = any_logprobs || plan.num_logprobs[r] >= 0;
  }
  if (plan.any_prompt_logprobs) {
    // Stand-in prompt logprobs: row at position p scores the prompt token at p + 1 with
    // -(token % 10) / 10, and its top-K lists that token and the ones after it.
    int32_t k = 0;
    for (int32_t s = 0; s < plan.num_seqs; ++s) k = std::max(k, plan.prompt_logprobs[s]);
    result.num_prompt_top_logprobs = k;
    for (int32_t s = 0; s < plan.num_seqs; ++s) {
      if (plan.prompt_logprobs[s] < 0) continue;
      for (int32_t t = plan.query_start_loc[s]; t < plan.query_start_loc[s + 1]; ++t) {
        const int32_t pos = plan.positions[t];
        if (pos + 1 >= plan.num_prompt_tokens[s]) break;
        const int32_t target =
            t + 1 < plan.query_start_loc[s + 1] ? plan.token_ids[t + 1] : plan.prompt_next_token[s];
        result.prompt_seq_indices.push_back(s);
        result.prompt_token_logprobs.push_back(-static_cast<float>(target % 10) / 10.0f);
        for (int32_t j = 0; j < k; ++j) {
          result.prompt_top_token_ids.push_back((target + j) % config_.vocab_size);
          result.prompt_top_logprobs.push_back(-static_cast<float>(j));
        }
      }
    }
  }
  if (any_logprobs) {
    // Stand-in values that let tests follow logprobs through the engine: the sampled token's
    // logprob is -(token % 10) / 10, and top-K lists token, token+1, ... with falling values.
    int32_t k = 0;
    for (int32_t r = 0; r < plan.num_samples; ++r) k = std::max(k, plan.num_logprobs[r]);
    result.num_top_logprobs = k;
    for (int32_t r = 0; r < plan.num_samples; ++r) {
      const int32_t token = result.sampled_token_ids[r];
      result.sampled_logprobs.push_back(-static_cast<float>(token % 10) / 10.0f);
      for (int32_t j = 0; j < k; ++j) {
        result.top_token_ids.push_back((token + j) % config_.vocab_size);
        result.top_logprobs.push_back(-static_cast<float>(j));
      }
    }
  }
  return result;
}

}  // namespace fastllm
