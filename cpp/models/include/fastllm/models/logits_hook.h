// LogitsHook: the one place where code outside the native step (Python's guided decoding) edits
// a step's logits before sampling. The hook names the requests it cares about (watch/unwatch);
// CpuExecutor calls apply()/advance() only for steps in which some sample row belongs to one of
// them, so every other step stays in C++ (and never takes the GIL).
//
// Threads: watch/unwatch from any thread (the front end); wants/apply/advance on the engine
// thread only, inside Executor::execute.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_set>

#include "fastllm/batch_plan.h"

namespace fastllm::models {

class LogitsHook {
 public:
  virtual ~LogitsHook() = default;

  // Rows of request_id are passed to apply()/advance() from the next step on.
  void watch(const std::string& request_id);
  // Stops passing request_id's rows (unknown ids are ignored).
  void unwatch(const std::string& request_id);
  // Whether some sample row of plan belongs to a watched request.
  bool wants(const BatchPlan& plan) const;

  // Edits logits [plan.num_samples][vocab] (float32, row-major) in place before sampling; called
  // only when wants(plan).
  virtual void apply(const BatchPlan& plan, float* logits, int64_t vocab) = 0;
  // The tokens [plan.num_samples] sampled from the logits apply() saw in this step.
  virtual void advance(const BatchPlan& plan, const int32_t* tokens) = 0;

 private:
  mutable std::mutex mutex_;
  std::unordered_set<std::string> watched_;
};

}  // namespace fastllm::models
