// Engine: request lifecycle around the scheduler, the KV cache manager and an executor.
//
// Two ways to drive it:
//   - step(): one schedule -> execute -> update iteration on the caller's thread (tests, offline).
//   - start()/stop(): the same loop on a native thread owned by the engine; outputs go to a
//     thread-safe queue and output_fd() becomes readable whenever outputs are waiting (eventfd),
//     so an asyncio loop or a poll() can sleep on it.
// add_request() and abort() may be called from any thread at any time; they validate at once
// (throwing InvalidRequestError) and hand the work to the engine thread through an input queue.
// A failing executor step finishes that step's requests with an error; the loop goes on.
//
// Parallel sampling (SamplingParams::n = N > 1; request.h has the mechanics) — the contract:
//   - One add_request, one id, one prefill: the prompt is computed once (EngineStats counts its
//     prompt tokens once) and N sequences continue from it, copy-on-write on the prompt's blocks.
//     n must not exceed max_num_seqs; the request waits until n places are free.
//   - Every RequestOutput names its sequence: (request_id, seq_index), seq_index in 0..N-1.
//     Sequence 0 reports the prompt logprobs. The step that computes the prompt emits the first
//     token of every child, in seq_index order; after that each child reports only its own new
//     tokens (outputs of one step follow the plan's order, a child's tokens come in order).
//   - Seeds: child i uses seed + i (what N requests with seeds seed, seed+1, ... would give);
//     unseeded children draw independently.
//   - Each child finishes on its own (finished, finish_reason, stop_token_id are per child). The
//     output that finishes the request's last unfinished child has request_finished == true; only
//     then is the id free again. The engine ranks nothing: best_of is the front end's (pass
//     n = best_of, ask for logprobs, rank by cumulative_logprob and keep the best n).
//   - abort(id) aborts every unfinished child (one final kAbort output each) and frees all their
//     blocks. A request aborted or failed before its prompt completed has only sequence 0, whose
//     final output carries request_finished.
// With n = 1 nothing changes: seq_index is 0 and request_finished equals finished.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fastllm/errors.h"
#include "fastllm/executor.h"
#include "fastllm/kv_cache_manager.h"
#include "fastllm/request.h"
#include "fastllm/sampling_params.h"
#include "fastllm/scheduler.h"
#include "fastllm/spec_decode.h"

namespace fastllm {

struct EngineConfig {
  KVCacheConfig cache;
  SchedulerConfig scheduler;
  std::vector<int32_t> eos_token_ids;  // the model's end-of-sequence ids
  int32_t vocab_size = 0;              // > 0: prompt token ids must be below it
  int32_t max_logprobs = 20;           // upper bound of logprobs / prompt_logprobs counts
  int64_t seed = 0;  // unseeded rows sample from a per-step stream of it (BatchPlan::sampling_seed)
  SpeculativeConfig speculative;  // off unless method and num_speculative_tokens are set

  // Throws ConfigError naming the first impossible setting.
  void validate() const;
};

// What one request produced since its previous output. Tokens arrive in order; the last output of
// a request has finished == true.
struct RequestOutput {
  std::string request_id;
  int32_t seq_index = 0;  // which of the request's n sequences produced it
  std::vector<int32_t> new_token_ids;
  std::vector<float> new_logprobs;     // per new token, when logprobs were asked for
  int32_t num_top_logprobs = 0;        // K
  std::vector<int32_t> top_token_ids;  // [new tokens * K]
  std::vector<float> top_logprobs;     // [new tokens * K]
  // Prompt logprobs computed in this step, for prompt positions in order (position 0 has none).
  std::vector<float> prompt_logprobs;
  int32_t num_prompt_top_logprobs = 0;
  std::vector<int32_t> prompt_top_token_ids;  // [prompt_logprobs.size() * K']
  std::vector<float> prompt_top_logprobs;
  bool finished = false;          // this sequence is done
  bool request_finished = false;  // ... and it was the request's last unfinished sequence
  // Sum of this sequence's sampled-token logprobs so far (0 unless logprobs were asked for).
  double cumulative_logprob = 0.0;
  FinishReason finish_reason = FinishReason::kNone;
  int32_t stop_token_id = -1;  // the stop token that ended it (not EOS), or -1
  int32_t num_prompt_tokens = 0;
  int32_t num_output_tokens = 0;  // total so far
  int32_t num_cached_tokens = 0;  // prompt tokens served from the prefix cache
  std::string error;              // with FinishReason::kError
};

struct EngineStats {
  int32_t num_running = 0;
  int32_t num_waiting = 0;
  int32_t num_free_blocks = 0;
  int32_t num_total_blocks = 0;  // usable device blocks
  double kv_usage = 0.0;         // fraction of usable blocks in use
  int64_t prefix_queries = 0;    // tokens looked up in the prefix cache
  int64_t prefix_hits = 0;       // tokens found
  // Prefix-cache lookups whose hash matched a block holding other tokens (used as misses).
  int64_t prefix_hash_collisions = 0;
  int64_t num_preemptions = 0;
  int64_t num_steps = 0;
  int64_t num_generated_tokens = 0;
  int64_t num_prompt_tokens_computed = 0;
  // Speculative decoding: drafts scored by the target, those it accepted, the sequence-steps that
  // verified at least one draft, and seconds spent proposing and in verify steps.
  int64_t spec_draft_tokens = 0;
  int64_t spec_accepted_tokens = 0;
  int64_t spec_verify_steps = 0;
  double spec_draft_seconds = 0.0;
  double spec_verify_seconds = 0.0;
};

class Engine {
 public:
  // draft_executor: the draft model's executor when config.speculative.method is kDraftModel
  // (its KV cache holds config.speculative.draft_cache.num_gpu_blocks blocks); null otherwise.
  Engine(const EngineConfig& config, std::shared_ptr<Executor> executor,
         std::shared_ptr<Executor> draft_executor = nullptr);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const EngineConfig& config() const;

  // Queues a request. Throws InvalidRequestError for an empty prompt, a prompt of max_model_len
  // tokens or more, token ids outside the vocabulary, bad sampling values or an id still in use.
  // lora_id (> 0) runs it with that LoRA adapter (the executor knows the adapter by this id);
  // it is part of the prefix-cache key, so two adapters never share KV.
  void add_request(const std::string& request_id, std::vector<int32_t> prompt_token_ids,
                   const SamplingParams& params, uint64_t cache_salt = 0, int32_t lora_id = 0);
  // Aborts a live request: every unfinished sequence emits a final output with kAbort and all
  // their blocks are freed.
  // Returns false when no live request has this id.
  bool abort(const std::string& request_id);

  // One iteration on the caller's thread; returns this step's outputs. Throws EngineError while
  // the loop thread runs.
  std::vector<RequestOutput> step();
  // True while some request is queued, waiting or running.
  bool has_unfinished_requests() const;

  // Runs the loop on a native thread until stop(). stop() finishes the current step and joins.
  void start();
  void stop();
  bool is_running() const;

  // Readable while outputs are queued (loop-thread mode).
  int output_fd() const;
  // Takes every queued output (never blocks).
  std::vector<RequestOutput> take_outputs();
  // Waits up to timeout_ms for outputs, then takes them (for C++ consumers without a poll loop).
  std::vector<RequestOutput> wait_outputs(int timeout_ms);

  // A snapshot taken after the last step (any thread).
  EngineStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fastllm
