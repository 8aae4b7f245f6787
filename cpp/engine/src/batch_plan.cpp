#include "fastllm/batch_plan.h"

#include <algorithm>
#include <limits>

namespace fastllm {

void BatchPlan::clear() {
  num_seqs = num_tokens = max_query_len = max_context_len = max_blocks_per_seq = 0;
  num_samples = 0;
  token_ids.clear();
  positions.clear();
  slot_mapping.clear();
  query_start_loc.clear();
  context_lens.clear();
  num_computed_tokens.clear();
  block_tables.clear();
  request_ids.clear();
  lora_ids.clear();
  any_lora = false;
  num_prompt_tokens.clear();
  prompt_logprobs.clear();
  prompt_next_token.clear();
  any_prompt_logprobs = false;
  sample_token_indices.clear();
  sample_seq_indices.clear();
  sample_child_indices.clear();
  temperature.clear();
  top_p.clear();
  top_k.clear();
  min_p.clear();
  presence_penalty.clear();
  frequency_penalty.clear();
  repetition_penalty.clear();
  seeds.clear();
  output_positions.clear();
  num_logprobs.clear();
  suppress_stop_tokens.clear();
  penalty_prompt_offsets.clear();
  penalty_prompt_ids.clear();
  penalty_output_offsets.clear();
  penalty_output_ids.clear();
  prompt_logprob_rows.clear();
  prompt_logprob_targets.clear();
  prompt_logprob_seqs.clear();
  num_draft_tokens.clear();
  draft_token_ids.clear();
  typical_acceptance = false;
  typical_threshold = typical_alpha = 0.0f;
  bias_offsets.clear();
  bias_token_ids.clear();
  bias_values.clear();
  allowed_offsets.clear();
  allowed_token_ids.clear();
  block_ops.clear();
}

namespace {

// child: the sequence of req's request that the row draws for; req.seq_index except on the n
// first-token rows of a request that is not forked yet, where child c draws with seed + c.
// drafts: the draft tokens before the row (a verify row j has drafts 0..j-1 ahead of it, which
// count as outputs for its generator position, min_tokens and penalties); draft: the one it
// verifies or -1.
void add_sample_row(BatchPlan& plan, const Request& req, int32_t token_index, int32_t seq_index,
                    int32_t child, const std::vector<int32_t>& eos_token_ids,
                    const int32_t* drafts = nullptr, int32_t num_drafts = 0, int32_t draft = -1) {
  const SamplingParams& p = req.params;
  const int32_t num_outputs = req.num_output_tokens() + num_drafts;
  plan.draft_token_ids.push_back(draft);
  plan.sample_token_indices.push_back(token_index);
  plan.sample_seq_indices.push_back(seq_index);
  plan.sample_child_indices.push_back(child);
  plan.temperature.push_back(p.temperature);
  plan.top_p.push_back(p.top_p);
  plan.top_k.push_back(p.top_k);
  plan.min_p.push_back(p.min_p);
  plan.presence_penalty.push_back(p.presence_penalty);
  plan.frequency_penalty.push_back(p.frequency_penalty);
  plan.repetition_penalty.push_back(p.repetition_penalty);
  plan.seeds.push_back(p.seed < 0 ? p.seed : p.seed + (child - req.seq_index));
  plan.output_positions.push_back(num_outputs);
  plan.num_logprobs.push_back(p.logprobs);

  if (p.uses_penalties()) {
    const auto prompt_end = req.token_ids.begin() + req.num_prompt_tokens;
    plan.penalty_prompt_ids.insert(plan.penalty_prompt_ids.end(), req.token_ids.begin(),
                                   prompt_end);
    plan.penalty_output_ids.insert(plan.penalty_output_ids.end(), prompt_end, req.token_ids.end());
    plan.penalty_output_ids.insert(plan.penalty_output_ids.end(), drafts, drafts + num_drafts);
  }
  plan.penalty_prompt_offsets.push_back(static_cast<int32_t>(plan.penalty_prompt_ids.size()));
  plan.penalty_output_offsets.push_back(static_cast<int32_t>(plan.penalty_output_ids.size()));

  plan.bias_token_ids.insert(plan.bias_token_ids.end(), p.logit_bias_ids.begin(),
                             p.logit_bias_ids.end());
  plan.bias_values.insert(plan.bias_values.end(), p.logit_bias_values.begin(),
                          p.logit_bias_values.end());
  const bool suppress = num_outputs < p.min_tokens;
  plan.suppress_stop_tokens.push_back(suppress ? 1 : 0);
  if (suppress) {
    const float masked = -std::numeric_limits<float>::infinity();
    for (int32_t t : p.stop_token_ids) {
      plan.bias_token_ids.push_back(t);
      plan.bias_values.push_back(masked);
    }
    if (!p.ignore_eos) {
      for (int32_t t : eos_token_ids) {
        plan.bias_token_ids.push_back(t);
        plan.bias_values.push_back(masked);
      }
    }
  }
  plan.bias_offsets.push_back(static_cast<int32_t>(plan.bias_token_ids.size()));
  plan.allowed_token_ids.insert(plan.allowed_token_ids.end(), p.allowed_token_ids.begin(),
                                p.allowed_token_ids.end());
  plan.allowed_offsets.push_back(static_cast<int32_t>(plan.allowed_token_ids.size()));
  ++plan.num_samples;
}

}  // namespace

void build_batch_plan(const SchedulerOutput& out, int32_t block_size,
                      const std::vector<int32_t>& eos_token_ids, int64_t step_id, BatchPlan& plan,
                      int64_t seed) {
  plan.clear();
  plan.step_id = step_id;
  plan.sampling_seed = (static_cast<uint64_t>(seed) * 1000003ULL + static_cast<uint64_t>(step_id)) &
                       0x7FFFFFFFFFFFFFFFULL;
  plan.block_size = block_size;
  plan.num_seqs = static_cast<int32_t>(out.scheduled.size());
  plan.block_ops.swap_out = out.block_ops.swap_out;
  plan.block_ops.swap_in = out.block_ops.swap_in;
  plan.block_ops.copy = out.block_ops.copy;

  int32_t max_blocks = 0;
  for (const ScheduledRequest& s : out.scheduled) {
    max_blocks = std::max(max_blocks, static_cast<int32_t>(s.request->block_ids.size()));
  }
  plan.max_blocks_per_seq = max_blocks;
  plan.block_tables.assign(static_cast<size_t>(plan.num_seqs) * max_blocks, BlockPool::kNullBlock);
  plan.query_start_loc.push_back(0);
  plan.penalty_prompt_offsets.push_back(0);
  plan.penalty_output_offsets.push_back(0);
  plan.bias_offsets.push_back(0);
  plan.allowed_offsets.push_back(0);

  for (int32_t seq = 0; seq < plan.num_seqs; ++seq) {
    const Request& req = *out.scheduled[seq].request;
    const int32_t n = out.scheduled[seq].num_new_tokens;
    const int32_t start = req.num_computed_tokens;
    const int32_t known = req.num_tokens();
    const int32_t num_drafts = std::max(0, start + n - known);
    const int32_t* drafts = req.draft_token_ids.data();
    for (int32_t pos = start; pos < start + n; ++pos) {
      plan.token_ids.push_back(pos < known ? req.token_ids[pos] : drafts[pos - known]);
      plan.positions.push_back(pos);
      plan.slot_mapping.push_back(
          static_cast<int64_t>(req.block_ids[pos / block_size]) * block_size + pos % block_size);
    }
    plan.num_tokens += n;
    plan.query_start_loc.push_back(plan.num_tokens);
    plan.context_lens.push_back(start + n);
    plan.num_computed_tokens.push_back(start);
    plan.max_query_len = std::max(plan.max_query_len, n);
    plan.max_context_len = std::max(plan.max_context_len, start + n);
    std::copy(req.block_ids.begin(), req.block_ids.end(),
              plan.block_tables.begin() + static_cast<size_t>(seq) * max_blocks);
    plan.request_ids.push_back(req.id);
    plan.lora_ids.push_back(req.lora_id);
    plan.any_lora = plan.any_lora || req.lora_id != 0;
    const bool wants_prompt = req.params.prompt_logprobs >= 0 && start < req.num_prompt_tokens;
    plan.num_prompt_tokens.push_back(req.num_prompt_tokens);
    plan.prompt_logprobs.push_back(wants_prompt ? req.params.prompt_logprobs : -1);
    plan.prompt_next_token.push_back(start + n < req.num_prompt_tokens ? req.token_ids[start + n]
                                                                       : -1);
    plan.any_prompt_logprobs = plan.any_prompt_logprobs || wants_prompt;
    if (wants_prompt) {
      // The row at position p scores the prompt token at p + 1 (the prompt's last has none).
      const int32_t first_row = plan.num_tokens - n;
      for (int32_t pos = start; pos < std::min(start + n, req.num_prompt_tokens - 1); ++pos) {
        plan.prompt_logprob_rows.push_back(first_row + pos - start);
        plan.prompt_logprob_targets.push_back(req.token_ids[pos + 1]);
        plan.prompt_logprob_seqs.push_back(seq);
      }
    }
    plan.num_draft_tokens.push_back(num_drafts);
    if (num_drafts > 0) {
      // The last known token, then each draft: row j draws the token after draft j.
      for (int32_t j = 0; j <= num_drafts; ++j) {
        add_sample_row(plan, req, plan.num_tokens - 1 - num_drafts + j, seq, req.seq_index,
                       eos_token_ids, drafts, j, j < num_drafts ? drafts[j] : -1);
      }
    } else if (start + n == req.num_tokens()) {
      // The last known token is computed in this step: its logits give the next token.
      add_sample_row(plan, req, plan.num_tokens - 1, seq, req.seq_index, eos_token_ids);
      // An n > 1 prompt just computed: its children's first tokens come from the same logits.
      for (int32_t c = 1; c < req.num_first_samples(); ++c) {
        add_sample_row(plan, req, plan.num_tokens - 1, seq, c, eos_token_ids);
      }
    }
  }
}

}  // namespace fastllm
