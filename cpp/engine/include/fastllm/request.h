// One generation sequence: its tokens, progress through the KV cache and lifecycle state.
// Owned by the Engine; read and written only on the engine thread.
//
// Parallel sampling (SamplingParams::n = N > 1) is ONE request of N sequences ("children"), all
// with the request's id and told apart by seq_index 0..N-1:
//   - Only sequence 0 exists until its prompt is computed: it is admitted, prefix-cache matched,
//     chunk-prefilled and (recompute-)preempted like any request, but admission also reserves
//     max_num_seqs room for its N - 1 siblings.
//   - The step that computes the prompt's last chunk samples N first tokens from that one logits
//     row (N sample rows with the same sample_token_indices entry; BatchPlan::sample_child_indices
//     says which child each row is for). Sampling them there, rather than recomputing the last
//     prompt token for every child in the next step, costs no extra forward tokens, no extra step
//     of latency, and never writes a shared block.
//   - Right after that step the engine creates sequences 1..N-1: each forks sequence 0's blocks
//     (KVCacheManager::fork: every block shared, ref count + 1, no copy, no prefix lookup) and
//     holds the prompt plus its own first token. The prompt's last, partially filled block stays
//     shared until a sequence writes into it: the writer's allocate_slots then queues a
//     copy-on-write (BlockOps::copy) that the executor applies before the forward pass; the last
//     holder writes in place. Full prompt blocks stay shared for the children's whole life.
//   - From then on every child is a running sequence of its own: it counts against max_num_seqs,
//     may be preempted alone (recompute: its blocks are released and it later recomputes prompt +
//     its own output tokens, usually finding the prompt in the prefix cache; its siblings keep
//     running untouched), and finishes alone (its own stop token, length or EOS).
//   - Seeds: child i of a request with seed s samples with seed s + i (as n separate requests
//     with seeds s, s+1, ... would); unseeded children draw from the executor's unseeded generator,
//     whose streams differ per sample row.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fastllm/block_hash.h"
#include "fastllm/sampling_params.h"

namespace fastllm {

enum class RequestStatus : int32_t {
  kWaiting = 0,  // queued, holds no KV blocks
  kRunning,      // scheduled each step, holds KV blocks
  kPreempted,    // evicted by recompute: back in the waiting queue, blocks freed, progress reset
  kSwapped,  // evicted by swap: back in the waiting queue, its blocks live in the CPU swap space
  kFinishedStopped,
  kFinishedLength,
  kFinishedAborted,
  kFinishedError,
};

enum class FinishReason : int32_t { kNone = 0, kStop, kLength, kAbort, kError };

inline bool is_finished(RequestStatus s) { return s >= RequestStatus::kFinishedStopped; }

FinishReason finish_reason_of(RequestStatus s);
const char* to_string(FinishReason r);
const char* to_string(RequestStatus s);

struct Request {
  std::string id;         // the request's id, shared by all its sequences
  int32_t seq_index = 0;  // which of the request's n sequences this is (0 computes the prompt)
  bool children_forked = false;  // sequence 0 of an n > 1 request: its siblings exist
  uint64_t arrival_index = 0;    // engine-wide admission counter; FCFS and tie-break order
  SamplingParams params;
  uint64_t cache_salt = 0;  // extra prefix-cache key (LoRA id, tenant salt); 0 = none
  int32_t lora_id = 0;      // the LoRA adapter it runs with; 0 = the base model

  std::vector<int32_t> token_ids;  // prompt followed by output tokens
  int32_t num_prompt_tokens = 0;
  int32_t num_computed_tokens = 0;  // tokens whose K/V are in the cache
  int32_t num_cached_tokens = -1;   // prefix-cache hit at first admission; -1 = not admitted yet
  int32_t num_preemptions = 0;
  int32_t stop_token_id = -1;       // the stop token that finished it, if any
  double cumulative_logprob = 0.0;  // sum of the sampled tokens' logprobs (when logprobs >= 0)
  RequestStatus status = RequestStatus::kWaiting;
  std::string error;  // set with kFinishedError

  std::vector<int32_t> block_ids;          // GPU (device) block table, in token order
  std::vector<int32_t> swapped_block_ids;  // CPU swap-space blocks while kSwapped
  std::vector<BlockHash> block_hashes;     // chained hashes of the full blocks of token_ids (lazy)
  int32_t num_registered_blocks = 0;       // leading blocks already offered to the prefix cache
  bool prompt_tail_registered = false;     // the prompt's partial last block is offered too
  // Per registered block: the prefix cache's exact identity of the tokens up to and including it
  // (see KVCacheManager); what a hit's next block must name as its parent.
  std::vector<uint64_t> block_nodes;

  // Speculative decoding (spec_decode.h): this step's proposed tokens (not part of token_ids
  // until accepted), and this sequence's drafts accepted and rejections so far (a verification
  // rejects at most one draft; those after it are never judged), whose ratio steers how many it
  // may propose.
  std::vector<int32_t> draft_token_ids;
  int64_t spec_accepted = 0;
  int64_t spec_rejected = 0;

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  int32_t last_token() const { return token_ids.back(); }
  // Sequences the next sample of this one draws: n while the prompt's children are not forked.
  int32_t num_first_samples() const { return children_forked ? 1 : params.n; }
  // Siblings not created yet, for which max_num_seqs room is held while this one runs.
  int32_t num_pending_children() const { return num_first_samples() - 1; }
};

}  // namespace fastllm
