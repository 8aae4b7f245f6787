// One generation request: its tokens, progress through the KV cache and lifecycle state.
// Owned by the Engine; read and written only on the engine thread.
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
  std::string id;
  uint64_t arrival_index = 0;  // engine-wide admission counter; FCFS and tie-break order
  SamplingParams params;
  uint64_t cache_salt = 0;  // extra prefix-cache key (LoRA id, tenant salt); 0 = none

  std::vector<int32_t> token_ids;  // prompt followed by output tokens
  int32_t num_prompt_tokens = 0;
  int32_t num_computed_tokens = 0;  // tokens whose K/V are in the cache
  int32_t num_cached_tokens = -1;   // prefix-cache hit at first admission; -1 = not admitted yet
  int32_t num_preemptions = 0;
  int32_t stop_token_id = -1;  // the stop token that finished it, if any
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

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  int32_t last_token() const { return token_ids.back(); }
};

}  // namespace fastllm
