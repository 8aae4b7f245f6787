// BatchPlan: everything one step executes, as flat arrays ready for kernels. Built by the engine
// thread from a SchedulerOutput; read by the executor during Executor::execute only (the engine
// reuses the same BatchPlan object, so views into it are valid for that call alone).
//
// Token rows are grouped per sequence: sequence s owns rows [query_start_loc[s],
// query_start_loc[s+1]). Its new tokens sit at positions context_lens[s] - query_len ..
// context_lens[s] - 1 and are written to the cache at slot_mapping (block * block_size + offset)
// before attention reads the cache.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fastllm/kv_cache_manager.h"
#include "fastllm/scheduler.h"

namespace fastllm {

struct BatchPlan {
  int64_t step_id = 0;
  // The random stream of this step's unseeded rows: the engine's seed mixed with step_id (63 bits;
  // seeded rows use their own seed and output position instead).
  uint64_t sampling_seed = 0;
  int32_t block_size = 16;
  int32_t num_seqs = 0;
  int32_t num_tokens = 0;
  int32_t max_query_len = 0;
  int32_t max_context_len = 0;
  int32_t max_blocks_per_seq = 0;  // row width of block_tables

  // Per token row [num_tokens].
  std::vector<int32_t> token_ids;
  std::vector<int32_t> positions;
  std::vector<int64_t> slot_mapping;

  // Per sequence [num_seqs] (query_start_loc has num_seqs + 1 entries).
  std::vector<int32_t> query_start_loc;
  std::vector<int32_t> context_lens;         // cached + new tokens after this step
  std::vector<int32_t> num_computed_tokens;  // tokens already in the cache before this step
  std::vector<int32_t> block_tables;         // [num_seqs * max_blocks_per_seq], padded with block 0
  std::vector<std::string> request_ids;
  std::vector<int32_t> lora_ids;  // [num_seqs]: the sequence's LoRA adapter, 0 = none
  bool any_lora = false;
  // Prompt logprobs: -1, or the top-N count of a sequence whose prompt rows in this step need
  // logprobs. Row t of such a sequence (position p < num_prompt_tokens - 1) scores the prompt
  // token at p + 1: the next row's token, or prompt_next_token for the chunk's last row.
  std::vector<int32_t> num_prompt_tokens;  // [num_seqs]
  std::vector<int32_t> prompt_logprobs;    // [num_seqs]
  std::vector<int32_t> prompt_next_token;  // [num_seqs], -1 when the chunk ends the prompt
  bool any_prompt_logprobs = false;
  // The same, as the rows to score (every executor reads these): per scored position, the token
  // row whose logits score it, the prompt token it scores, and its sequence index.
  std::vector<int32_t> prompt_logprob_rows;
  std::vector<int32_t> prompt_logprob_targets;
  std::vector<int32_t> prompt_logprob_seqs;
  // Speculative decoding (spec_decode.h): per sequence, the draft tokens appended after its last
  // known token in this step (0 without). Such a sequence has 1 + drafts token rows and as many
  // consecutive sample rows, row j scoring the token after draft j.
  std::vector<int32_t> num_draft_tokens;  // [num_seqs]

  // Per sample row [num_samples]: sequences whose last token this step is the end of their known
  // tokens get one next token sampled from the logits of that row. The one exception: a request
  // with n > 1 whose prompt ends in this step gets n rows on its last prompt token, one per child
  // (consecutive, child 0 first, each with the child's seed); see request.h.
  int32_t num_samples = 0;
  std::vector<int32_t> sample_token_indices;  // token row whose logits are sampled
  std::vector<int32_t> sample_seq_indices;    // the sequence it belongs to
  std::vector<int32_t> sample_child_indices;  // the child (RequestOutput::seq_index) it draws for
  std::vector<float> temperature;
  std::vector<float> top_p;
  std::vector<int32_t> top_k;
  std::vector<float> min_p;
  std::vector<float> presence_penalty;
  std::vector<float> frequency_penalty;
  std::vector<float> repetition_penalty;
  std::vector<int64_t> seeds;             // -1 = unseeded
  std::vector<int64_t> output_positions;  // outputs so far: the generator counter of seeded rows
  std::vector<int32_t> num_logprobs;      // -1 = none
  std::vector<uint8_t> suppress_stop_tokens;  // 1 while below min_tokens: EOS/stop ids are masked
  // Token histories for rows that use penalties, as the sampler takes them (two CSR lists over
  // sample rows, empty spans for rows without penalties): the row's prompt tokens, and the
  // output tokens of the row's sequence. Both id lists are empty when no row uses penalties.
  std::vector<int32_t> penalty_prompt_offsets;  // [num_samples + 1]
  std::vector<int32_t> penalty_prompt_ids;
  std::vector<int32_t> penalty_output_offsets;  // [num_samples + 1]
  std::vector<int32_t> penalty_output_ids;
  // Logit bias (CSR over sample rows): the request's logit_bias, plus -inf for its EOS/stop ids
  // while it is below min_tokens.
  std::vector<int32_t> bias_offsets;  // [num_samples + 1]
  std::vector<int32_t> bias_token_ids;
  std::vector<float> bias_values;
  // Allowed token ids (CSR over sample rows; an empty span allows every token).
  std::vector<int32_t> allowed_offsets;  // [num_samples + 1]
  std::vector<int32_t> allowed_token_ids;
  // Per sample row: the draft token the row verifies (the sequence's next draft), or -1 (the
  // bonus row after the last draft, and every row without speculation). The sampler reads it only
  // under typical acceptance (typical_acceptance true, with its threshold and alpha).
  std::vector<int32_t> draft_token_ids;
  bool typical_acceptance = false;
  float typical_threshold = 0.0f;
  float typical_alpha = 0.0f;

  BlockOps block_ops;  // apply before the forward pass

  void clear();
};

// Fills plan from a scheduler decision. eos_token_ids are the model's EOS ids (masked together
// with a request's stop_token_ids while it is below min_tokens).
void build_batch_plan(const SchedulerOutput& out, int32_t block_size,
                      const std::vector<int32_t>& eos_token_ids, int64_t step_id, BatchPlan& plan,
                      int64_t seed = 0);

}  // namespace fastllm
