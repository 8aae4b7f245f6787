#include "fastllm/spec_decode.h"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <string>
#include <unordered_set>

#include "fastllm/errors.h"
#include "fastllm/scheduler.h"

namespace fastllm {

void SpeculativeConfig::validate(int32_t engine_block_size) const {
  const auto fail = [](const std::string& m) { throw ConfigError(m); };
  if (method == SpecMethod::kNone) return;
  if (num_speculative_tokens < 1 || num_speculative_tokens > 64) {
    fail("num_speculative_tokens must be in [1, 64], got " +
         std::to_string(num_speculative_tokens));
  }
  if (method == SpecMethod::kNgram) {
    if (ngram_min < 1 || ngram_max < ngram_min) {
      fail("the n-gram lookup needs 1 <= ngram_prompt_lookup_min <= ngram_prompt_lookup_max, got " +
           std::to_string(ngram_min) + " and " + std::to_string(ngram_max));
    }
  }
  if (disable_by_batch_size < 0) fail("speculative_disable_by_batch_size must be positive");
  if (acceptance == AcceptanceMethod::kTypical &&
      !(typical_threshold > 0.0f && typical_threshold <= 1.0f && typical_alpha >= 0.0f)) {
    fail("typical acceptance needs a posterior threshold in (0, 1] and a non-negative alpha");
  }
  if (max_model_len < 0) fail("speculative_max_model_len must be positive");
  if (method == SpecMethod::kDraftModel) {
    if (draft_cache.block_size != engine_block_size) {
      fail("the draft model's KV blocks must have the engine's block size");
    }
    if (draft_cache.num_gpu_blocks < 2) fail("the draft model's KV cache needs at least 2 blocks");
  }
}

int32_t ngram_lookup(const int32_t* tokens, int32_t length, int32_t min_n, int32_t max_n, int32_t k,
                     std::vector<int32_t>& out) {
  out.clear();
  if (k <= 0) return 0;
  for (int32_t n = std::min(max_n, length - 1); n >= min_n; --n) {
    const int32_t* suffix = tokens + length - n;
    // The most recent earlier occurrence: text that repeats tends to repeat its latest form.
    for (int32_t i = length - n - 1; i >= 0; --i) {
      if (tokens[i] != suffix[0] || !std::equal(suffix, suffix + n, tokens + i)) continue;
      const int32_t from = i + n;
      const int32_t count = std::min(k, length - from);
      out.assign(tokens + from, tokens + from + count);
      return count;
    }
  }
  return 0;
}

void NgramProposer::propose(const std::vector<Request*>& seqs, const std::vector<int32_t>& caps) {
  std::vector<int32_t> found;
  for (size_t i = 0; i < seqs.size(); ++i) {
    Request* req = seqs[i];
    ngram_lookup(req->token_ids.data(), req->num_tokens(), min_n_, max_n_, caps[i], found);
    req->draft_token_ids = found;
  }
}

DraftPlanner::DraftPlanner(int32_t max_rows)
    : seconds_(static_cast<size_t>(std::max(max_rows, 2)) + 1, 0.0) {}

void DraftPlanner::observe_step(int32_t rows, double seconds) {
  if (rows < 1 || rows >= static_cast<int32_t>(seconds_.size()) || !(seconds > 0.0)) return;
  double& t = seconds_[static_cast<size_t>(rows)];
  t = t > 0.0 ? 0.75 * t + 0.25 * seconds : seconds;
}

void DraftPlanner::observe_draft_step(double seconds) {
  if (!(seconds >= 0.0)) return;
  draft_step_seconds_ =
      draft_step_seconds_ > 0.0 ? 0.75 * draft_step_seconds_ + 0.25 * seconds : seconds;
}

double DraftPlanner::step_seconds(int32_t rows) const {
  const auto size = static_cast<int32_t>(seconds_.size());
  if (rows < 1) return 0.0;
  if (rows < size && seconds_[static_cast<size_t>(rows)] > 0.0) {
    return seconds_[static_cast<size_t>(rows)];
  }
  int32_t lo = std::min(rows, size) - 1, hi = rows + 1;
  while (lo >= 1 && !(seconds_[static_cast<size_t>(lo)] > 0.0)) --lo;
  while (hi < size && !(seconds_[static_cast<size_t>(hi)] > 0.0)) ++hi;
  const bool has_lo = lo >= 1, has_hi = hi < size;
  if (has_lo && has_hi) {
    const double tl = seconds_[static_cast<size_t>(lo)], th = seconds_[static_cast<size_t>(hi)];
    return tl + (th - tl) * (rows - lo) / static_cast<double>(hi - lo);
  }
  // Past what was measured: optimistic, so the planner tries a longer step once and learns its
  // real cost. Half the slope of the last two measurements, or a tenth of the average cost per
  // row when there is only one.
  if (has_lo) {
    const double tl = seconds_[static_cast<size_t>(lo)];
    int32_t below = lo - 1;
    while (below >= 1 && !(seconds_[static_cast<size_t>(below)] > 0.0)) --below;
    if (below >= 1) {
      const double slope = (tl - seconds_[static_cast<size_t>(below)]) / (lo - below);
      return tl + 0.5 * std::max(slope, 0.0) * (rows - lo);
    }
    return tl * (1.0 + 0.1 * (rows - lo) / lo);
  }
  if (has_hi) return seconds_[static_cast<size_t>(hi)] * rows / hi;
  return 1.0 + 0.1 * (rows - 1);  // nothing measured yet: relative units
}

std::vector<int32_t> DraftPlanner::plan(int32_t base_rows, const std::vector<double>& acceptance,
                                        const std::vector<int32_t>& caps) {
  struct Candidate {
    double value;
    int32_t seq, depth;
  };
  std::vector<Candidate> candidates;
  for (size_t i = 0; i < caps.size(); ++i) {
    double value = 1.0;
    for (int32_t j = 1; j <= caps[i]; ++j) {
      value *= acceptance[i];
      candidates.push_back({value, static_cast<int32_t>(i), j});
    }
  }
  // Within a sequence values fall with depth, so the best d drafts are a prefix of each one's.
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const Candidate& a, const Candidate& b) { return a.value > b.value; });
  const double base_tokens = std::max<double>(static_cast<double>(acceptance.size()), 1.0);
  double tokens = base_tokens;
  double best_rate = base_tokens / step_seconds(base_rows);
  size_t best = 0;
  int32_t deepest = 0;
  for (size_t d = 1; d <= candidates.size(); ++d) {
    tokens += candidates[d - 1].value;
    deepest = std::max(deepest, candidates[d - 1].depth);
    const double seconds =
        step_seconds(base_rows + static_cast<int32_t>(d)) + deepest * draft_step_seconds_;
    const double rate = tokens / seconds;
    if (rate > best_rate * (1.0 + 1e-9)) {
      best_rate = rate;
      best = d;
    }
  }
  if (++num_plans_ % kExploreEvery == 0 && best < candidates.size()) ++best;
  std::vector<int32_t> counts(caps.size(), 0);
  for (size_t d = 0; d < best; ++d) ++counts[static_cast<size_t>(candidates[d].seq)];
  return counts;
}

// ---- draft model ----

struct DraftModelProposer::Shadow {
  Request seq;  // the target's committed tokens, then this step's drafts
  uint64_t arrival_index = 0;
  int64_t last_used = -1;  // proposal round that last used it
};

DraftModelProposer::DraftModelProposer(std::shared_ptr<Executor> executor,
                                       const KVCacheConfig& cache, int32_t max_model_len,
                                       int32_t vocab_size)
    : executor_(std::move(executor)),
      kv_([&] {
        KVCacheConfig c = cache;
        c.enable_prefix_caching = false;
        c.num_cpu_blocks = 0;
        return c;
      }()),
      max_model_len_(max_model_len),
      vocab_size_(vocab_size) {
  if (!executor_) throw ConfigError("the draft model proposer needs an executor");
}

DraftModelProposer::~DraftModelProposer() = default;

DraftModelProposer::Shadow& DraftModelProposer::shadow_for(const Request& req) {
  auto it = shadows_.find(&req);
  if (it != shadows_.end() &&
      (it->second->seq.id != req.id || it->second->seq.seq_index != req.seq_index ||
       it->second->arrival_index != req.arrival_index)) {
    drop(&req);  // a new request at a recycled address
    it = shadows_.end();
  }
  if (it == shadows_.end()) {
    auto sh = std::make_unique<Shadow>();
    sh->seq.id = req.id;
    sh->seq.seq_index = req.seq_index;
    sh->arrival_index = req.arrival_index;
    sh->seq.params = SamplingParams();
    sh->seq.params.temperature = 0.0f;  // the draft proposes its argmax
    sh->seq.params.max_tokens = -1;
    sh->seq.status = RequestStatus::kRunning;
    it = shadows_.emplace(&req, std::move(sh)).first;
  }
  return *it->second;
}

void DraftModelProposer::drop(const Request* req) {
  auto it = shadows_.find(req);
  if (it == shadows_.end()) return;
  kv_.free(it->second->seq);
  shadows_.erase(it);
}

void DraftModelProposer::release(const Request* req) { drop(req); }

void DraftModelProposer::propose(const std::vector<Request*>& seqs,
                                 const std::vector<int32_t>& caps) {
  const int64_t round = num_steps_;
  struct Active {
    Request* req;
    Shadow* sh;
    int32_t want;
  };
  std::vector<Active> active;
  int32_t steps = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    Request* req = seqs[i];
    req->draft_token_ids.clear();
    const int32_t want = std::min(caps[i], max_model_len_ - req->num_tokens());
    if (want <= 0) continue;
    Shadow& sh = shadow_for(*req);
    sh.last_used = round;
    // Roll back to what the target kept: the cache stays valid up to the common prefix.
    const auto& mine = sh.seq.token_ids;
    const auto& target = req->token_ids;
    const size_t common = static_cast<size_t>(
        std::mismatch(mine.begin(), mine.begin() + std::min(mine.size(), target.size()),
                      target.begin())
            .first -
        mine.begin());
    sh.seq.num_computed_tokens = std::min(sh.seq.num_computed_tokens, static_cast<int32_t>(common));
    sh.seq.token_ids = target;
    sh.seq.num_prompt_tokens = req->num_prompt_tokens;
    active.push_back({req, &sh, want});
    steps = std::max(steps, want);
  }
  SchedulerOutput out;
  std::vector<Active*> scheduled;
  try {
    for (int32_t step = 0; step < steps; ++step) {
      out.clear();
      scheduled.clear();
      for (Active& a : active) {
        if (static_cast<int32_t>(a.req->draft_token_ids.size()) >= a.want) continue;
        Request& seq = a.sh->seq;
        const int32_t n = seq.num_tokens() - seq.num_computed_tokens;
        if (!kv_.can_allocate_slots(seq, n)) {
          // Make room from shadows of sequences that are not speculating now.
          std::vector<const Request*> idle;
          for (auto& [key, sh] : shadows_) {
            if (sh->last_used != round) idle.push_back(key);
          }
          for (const Request* key : idle) drop(key);
          if (!kv_.can_allocate_slots(seq, n)) {
            a.want = static_cast<int32_t>(a.req->draft_token_ids.size());
            continue;
          }
        }
        kv_.allocate_slots(seq, n);
        out.scheduled.push_back({&seq, n});
        scheduled.push_back(&a);
      }
      if (out.scheduled.empty()) break;
      std::swap(out.block_ops, kv_.pending_ops());
      kv_.pending_ops().clear();
      build_batch_plan(out, kv_.block_size(), {}, num_steps_++, plan_);
      const StepResult result = executor_->execute(plan_);
      if (static_cast<int32_t>(result.sampled_token_ids.size()) != plan_.num_samples ||
          plan_.num_samples != static_cast<int32_t>(scheduled.size())) {
        throw EngineError("the draft model returned " +
                          std::to_string(result.sampled_token_ids.size()) + " tokens for " +
                          std::to_string(plan_.num_samples) + " rows");
      }
      for (size_t i = 0; i < scheduled.size(); ++i) {
        Active& a = *scheduled[i];
        Request& seq = a.sh->seq;
        seq.num_computed_tokens = seq.num_tokens();
        const int32_t token = result.sampled_token_ids[i];
        if (token < 0 || token >= vocab_size_) {
          a.want = static_cast<int32_t>(a.req->draft_token_ids.size());
          continue;
        }
        seq.token_ids.push_back(token);
        a.req->draft_token_ids.push_back(token);
      }
    }
  } catch (const std::exception& e) {
    // A failing draft model costs its drafts, never a request: forget every shadow (their caches
    // may be half written) and let the step run without speculation.
    std::fprintf(stderr, "fastllm: draft model step failed (%s); this step runs without drafts\n",
                 e.what());
    for (Active& a : active) a.req->draft_token_ids.clear();
    std::vector<const Request*> all;
    for (auto& [key, sh] : shadows_) all.push_back(key);
    for (const Request* key : all) drop(key);
  }
}

}  // namespace fastllm
