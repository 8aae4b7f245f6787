#include "fastllm/scheduler.h"

#include <algorithm>
#include <string>
#include <utility>

#include "fastllm/errors.h"

namespace fastllm {

void SchedulerOutput::clear() {
  scheduled.clear();
  preempted.clear();
  block_ops.clear();
  num_scheduled_tokens = 0;
}

Scheduler::Scheduler(const SchedulerConfig& config, KVCacheManager& kv) : config_(config), kv_(kv) {
  running_.reserve(config.max_num_seqs);
}

bool Scheduler::ranks_before(const Request* a, const Request* b) const {
  if (config_.policy == SchedulingPolicy::kPriority && a->params.priority != b->params.priority) {
    return a->params.priority < b->params.priority;
  }
  return a->arrival_index < b->arrival_index;
}

void Scheduler::enqueue_waiting(Request* req, bool front) {
  if (config_.policy == SchedulingPolicy::kPriority) {
    auto pos =
        std::upper_bound(waiting_.begin(), waiting_.end(), req,
                         [this](const Request* a, const Request* b) { return ranks_before(a, b); });
    waiting_.insert(pos, req);
  } else if (front) {
    waiting_.push_front(req);
  } else {
    waiting_.push_back(req);
  }
}

void Scheduler::insert_running(Request* req) {
  if (config_.policy == SchedulingPolicy::kPriority) {
    auto pos =
        std::upper_bound(running_.begin(), running_.end(), req,
                         [this](const Request* a, const Request* b) { return ranks_before(a, b); });
    running_.insert(pos, req);
  } else {
    running_.push_back(req);
  }
}

void Scheduler::add_request(Request* req) {
  req->status = RequestStatus::kWaiting;
  enqueue_waiting(req, /*front=*/false);
}

void Scheduler::remove_request(Request* req) {
  if (auto it = std::find(running_.begin(), running_.end(), req); it != running_.end()) {
    running_.erase(it);
    num_reserved_seqs_ -= req->num_pending_children();
  } else if (auto wit = std::find(waiting_.begin(), waiting_.end(), req); wit != waiting_.end()) {
    waiting_.erase(wit);
  }
  kv_.free(*req);
}

void Scheduler::add_children(Request* parent, const std::vector<Request*>& children) {
  auto it = std::find(running_.begin(), running_.end(), parent);
  if (it == running_.end() || parent->children_forked) {
    throw EngineError("add_children: request " + parent->id + " is not a running, unforked parent");
  }
  // Its siblings (there are none yet) and the reserved places become running children.
  num_reserved_seqs_ -= parent->num_pending_children();
  parent->children_forked = true;
  for (Request* child : children) {
    kv_.fork(*parent, *child);
    child->status = RequestStatus::kRunning;
  }
  running_.insert(it + 1, children.begin(), children.end());
}

void Scheduler::preempt(Request* victim) {
  // victim has just left running_.
  num_reserved_seqs_ -= victim->num_pending_children();
  victim->draft_token_ids.clear();
  if (config_.preemption_mode == PreemptionMode::kSwap && kv_.can_swap_out(*victim)) {
    kv_.swap_out(*victim);
    victim->status = RequestStatus::kSwapped;
  } else {
    kv_.free(*victim);
    victim->num_computed_tokens = 0;
    victim->status = RequestStatus::kPreempted;
  }
  ++victim->num_preemptions;
  ++num_preemptions_;
  output_.preempted.push_back(victim);
  enqueue_waiting(victim, /*front=*/true);
}

const SchedulerOutput& Scheduler::schedule() {
  output_.clear();
  kv_.begin_step();
  int32_t budget = config_.max_num_batched_tokens;
  schedule_running(budget);
  // A step that had to preempt is short of blocks: admitting more would only thrash.
  if (output_.preempted.empty()) schedule_waiting(budget);
  std::swap(output_.block_ops, kv_.pending_ops());
  kv_.pending_ops().clear();
  output_.num_scheduled_tokens = config_.max_num_batched_tokens - budget;
  return output_;
}

void Scheduler::schedule_running(int32_t& budget) {
  size_t i = 0;
  while (i < running_.size() && budget > 0) {
    Request* req = running_[i];
    const int32_t known = req->num_tokens() - req->num_computed_tokens;
    auto& drafts = req->draft_token_ids;
    // Drafts ride only on a decode step and only in budget that is left over.
    if (known != 1 || budget <= known) {
      drafts.clear();
    } else if (static_cast<int32_t>(drafts.size()) > budget - known) {
      drafts.resize(static_cast<size_t>(budget - known));
    }
    int32_t n = std::min(known + static_cast<int32_t>(drafts.size()), budget);
    bool fits = false;
    while (true) {
      if (kv_.can_allocate_slots(*req, n)) {
        kv_.allocate_slots(*req, n);
        fits = true;
        break;
      }
      if (!drafts.empty()) {
        // Lookahead slots are taken only when free: never preempt anyone for a draft.
        drafts.clear();
        n = std::min(known, budget);
        continue;
      }
      // Out of blocks: evict the request that ranks last (it has not been scheduled yet, or it
      // is this one).
      Request* victim = running_.back();
      running_.pop_back();
      preempt(victim);
      if (victim == req) break;
    }
    if (!fits) break;
    output_.scheduled.push_back({req, n});
    budget -= n;
    ++i;
  }
}

bool Scheduler::lora_fits(const Request* req) const {
  if (config_.max_loras <= 0 || req->lora_id == 0) return true;
  std::vector<int32_t> ids;
  for (const Request* r : running_) {
    if (r->lora_id == req->lora_id) return true;
    if (r->lora_id != 0 && std::find(ids.begin(), ids.end(), r->lora_id) == ids.end()) {
      ids.push_back(r->lora_id);
    }
  }
  return static_cast<int32_t>(ids.size()) < config_.max_loras;
}

void Scheduler::schedule_waiting(int32_t& budget) {
  size_t pos = 0;  // waiting_[0, pos) are passed over for their adapter this step
  while (pos < waiting_.size() && budget > 0 && num_seqs_held() < config_.max_num_seqs) {
    Request* req = waiting_[pos];
    if (!lora_fits(req)) {
      ++pos;
      continue;
    }
    if (num_seqs_held() + req->num_first_samples() > config_.max_num_seqs) break;
    bool admitted = req->status == RequestStatus::kSwapped ? admit_swapped(req, budget)
                                                           : admit_waiting(req, budget);
    if (!admitted && config_.policy == SchedulingPolicy::kPriority && !running_.empty() &&
        ranks_before(req, running_.back())) {
      // A more urgent request waits for blocks: take them from the least urgent running one,
      // undoing its part of this step, then try again.
      Request* victim = running_.back();
      running_.pop_back();
      auto it = std::find_if(output_.scheduled.begin(), output_.scheduled.end(),
                             [victim](const ScheduledRequest& s) { return s.request == victim; });
      if (it != output_.scheduled.end()) {
        budget += it->num_new_tokens;
        output_.scheduled.erase(it);
      }
      preempt(victim);
      continue;
    }
    if (!admitted) break;
    waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(pos));
    req->status = RequestStatus::kRunning;
    insert_running(req);
    num_reserved_seqs_ += req->num_pending_children();
  }
}

bool Scheduler::admit_waiting(Request* req, int32_t& budget) {
  CachedPrefix prefix = kv_.find_cached_prefix(*req);
  const int32_t remaining = req->num_tokens() - prefix.num_tokens;
  if (!config_.enable_chunked_prefill && remaining > budget) return false;
  const int32_t n = std::min(remaining, budget);
  if (!kv_.can_allocate_slots(*req, n, &prefix)) return false;
  kv_.allocate_slots(*req, n, &prefix);
  if (req->num_cached_tokens < 0) req->num_cached_tokens = prefix.num_tokens;
  output_.scheduled.push_back({req, n});
  budget -= n;
  return true;
}

bool Scheduler::admit_swapped(Request* req, int32_t& budget) {
  const int32_t remaining = req->num_tokens() - req->num_computed_tokens;
  if (!config_.enable_chunked_prefill && remaining > budget) return false;
  const int32_t n = std::min(remaining, budget);
  if (!kv_.can_swap_in(*req, n)) return false;
  kv_.swap_in(*req, n);
  output_.scheduled.push_back({req, n});
  budget -= n;
  return true;
}

}  // namespace fastllm
