// LogitsHook's watch list (see logits_hook.h).
#include "fastllm/models/logits_hook.h"

namespace fastllm::models {

void LogitsHook::watch(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  watched_.insert(request_id);
}

void LogitsHook::unwatch(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  watched_.erase(request_id);
}

bool LogitsHook::wants(const BatchPlan& plan) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (watched_.empty()) return false;
  for (int32_t r = 0; r < plan.num_samples; ++r) {
    const int32_t seq = plan.sample_seq_indices[static_cast<size_t>(r)];
    if (watched_.count(plan.request_ids[static_cast<size_t>(seq)]) != 0) return true;
  }
  return false;
}

}  // namespace fastllm::models
