// Scheduler: decides, once per step, which requests run and how many tokens each computes.
// Engine-thread only.
//
// One step:
//   1. schedule_running: every running request, in order, gets its next tokens (1 for decode, a
//      chunk for an unfinished prefill; 1 + its drafts under speculative decoding, the drafts
//      dropped first when the budget or the blocks run short) while the token budget lasts.
//      When blocks run out, the last running request (lowest priority under the priority
//      policy) is preempted, by recompute (blocks freed, progress reset) or by swap (blocks
//      copied to the CPU swap space).
//   2. schedule_waiting: only if nothing was preempted in this step, waiting requests are admitted
//      in queue order (FCFS or (priority, arrival)) while budget, max_num_seqs and blocks allow.
//      The queue head blocks the ones behind it: no overtaking. A request with n > 1 whose
//      children are not forked yet needs room for n sequences: it holds n - 1 places of
//      max_num_seqs while it runs, until add_children turns them into running children.
// The result is a SchedulerOutput; BatchPlan turns it into flat arrays.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "fastllm/kv_cache_manager.h"
#include "fastllm/request.h"

namespace fastllm {

enum class SchedulingPolicy : int32_t { kFCFS = 0, kPriority = 1 };
enum class PreemptionMode : int32_t { kRecompute = 0, kSwap = 1 };

struct SchedulerConfig {
  int32_t max_num_batched_tokens = 2048;  // token budget of one step
  int32_t max_num_seqs = 256;             // running requests at most
  int32_t max_model_len = 2048;           // prompt + output tokens at most
  bool enable_chunked_prefill = true;     // split long prompts across steps
  SchedulingPolicy policy = SchedulingPolicy::kFCFS;
  PreemptionMode preemption_mode = PreemptionMode::kRecompute;
  // LoRA: distinct adapters among the running requests at most (0 = no limit). A waiting request
  // whose adapter would exceed it is passed over (the ones behind it may run) until one frees.
  int32_t max_loras = 0;
};

struct ScheduledRequest {
  Request* request;
  int32_t num_new_tokens;  // tokens computed for it in this step
};

struct SchedulerOutput {
  std::vector<ScheduledRequest> scheduled;  // running ones first, then newly admitted
  std::vector<Request*> preempted;          // preempted in this step
  BlockOps block_ops;                       // copies and swaps to apply before the forward pass
  int32_t num_scheduled_tokens = 0;
  void clear();
};

class Scheduler {
 public:
  Scheduler(const SchedulerConfig& config, KVCacheManager& kv);

  const SchedulerConfig& config() const { return config_; }

  // Queues a new request (status kWaiting).
  void add_request(Request* req);
  // Takes a request out of whichever queue holds it and frees its blocks.
  void remove_request(Request* req);
  // Called after the step that sampled the first tokens of parent (a running n > 1 request that
  // just computed its prompt): each child forks parent's blocks copy-on-write and runs right
  // after parent and its earlier siblings. Children hold the prompt and their first token, with
  // num_computed_tokens == parent's; parent's children_forked becomes true.
  void add_children(Request* parent, const std::vector<Request*>& children);

  // Plans one step. The returned reference stays valid until the next call.
  const SchedulerOutput& schedule();

  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  // The running sequences in schedule order (speculative decoding proposes for them).
  const std::vector<Request*>& running() const { return running_; }
  // Running sequences plus the places held for children not forked yet (<= max_num_seqs).
  int32_t num_seqs_held() const { return num_running() + num_reserved_seqs_; }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  bool has_requests() const { return !running_.empty() || !waiting_.empty(); }
  int64_t num_preemptions() const { return num_preemptions_; }

 private:
  void schedule_running(int32_t& budget);
  void schedule_waiting(int32_t& budget);
  bool admit_swapped(Request* req, int32_t& budget);
  bool admit_waiting(Request* req, int32_t& budget);
  void preempt(Request* victim);
  void enqueue_waiting(Request* req, bool front);
  void insert_running(Request* req);
  bool ranks_before(const Request* a, const Request* b) const;

  SchedulerConfig config_;
  KVCacheManager& kv_;
  std::vector<Request*> running_;
  std::deque<Request*> waiting_;
  SchedulerOutput output_;
  int64_t num_preemptions_ = 0;
  int32_t num_reserved_seqs_ = 0;  // sum of num_pending_children() over running_
  // Whether a request with this adapter may join running_ under max_loras.
  bool lora_fits(const Request* req) const;
};

}  // namespace fastllm
