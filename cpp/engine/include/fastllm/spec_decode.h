// Speculative decoding: proposers of draft tokens and the per-sequence draft-length policy.
//
// One step with speculation (engine.cpp drives it):
//   1. The proposer fills Request::draft_token_ids for running sequences that are decoding (every
//      known token but the last is in the cache) and allow it (SamplingParams::speculate).
//   2. The scheduler gives such a sequence 1 + k token rows (its last token, then the k drafts)
//      and slots for them; when blocks or the token budget run short it drops drafts before it
//      preempts anyone (the "lookahead slots" are only taken when they are free).
//   3. The executor samples every row as an ordinary sample row: row j draws the token after
//      draft j (output position num_output + j, penalties over the outputs plus drafts 1..j).
//   4. The engine keeps drafts while each equals the token sampled before it, then the first
//      sampled token that differs (or the bonus token after the last draft). Rejected rows' K/V
//      stays in slots past num_computed_tokens and is overwritten later; blocks that hold only
//      rejected positions go back to the pool.
// Why step 4 is exact: proposals are deterministic (n-gram lookup, the draft model's argmax), so
// rejection sampling with q = one-hot(d) accepts d with probability p(d) and otherwise draws from
// p without d, renormalised. Drawing t ~ p and accepting d iff t == d has exactly that law, and a
// greedy row's t is the argmax, so greedy output equals non-speculative output. A seeded row draws
// output position m from (seed, m), as without speculation, so seeded outputs are reproducible and
// equal to non-speculative ones up to the logits' last bits.
// Typical acceptance (AcceptanceMethod::kTypical) instead accepts d when p(d) exceeds
// min(threshold, alpha * exp(-entropy(p))) and otherwise takes p's argmax (the sampler does it,
// given BatchPlan::draft_token_ids); it trades the exact distribution for longer acceptance.
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "fastllm/batch_plan.h"
#include "fastllm/executor.h"
#include "fastllm/kv_cache_manager.h"
#include "fastllm/request.h"

namespace fastllm {

enum class SpecMethod : int32_t { kNone = 0, kNgram = 1, kDraftModel = 2 };
enum class AcceptanceMethod : int32_t { kRejection = 0, kTypical = 1 };

struct SpeculativeConfig {
  SpecMethod method = SpecMethod::kNone;
  int32_t num_speculative_tokens = 0;  // k: drafts per sequence and step at most
  int32_t ngram_min = 1;               // n-gram lookup: suffix lengths tried, longest first
  int32_t ngram_max = 4;
  // No drafts in a step that runs this many sequences or more (0 = never off): at large batches
  // the verify rows cost compute that the batch already saturates.
  int32_t disable_by_batch_size = 0;
  AcceptanceMethod acceptance = AcceptanceMethod::kRejection;
  float typical_threshold = 0.09f;
  float typical_alpha = 0.3f;
  // Drafts per step are planned by expected gain over measured cost (DraftPlanner), so
  // speculation takes the rows that pay on this machine and stands aside when none do. Off:
  // always k drafts when the proposer has them.
  bool adaptive = true;
  int32_t max_model_len = 0;  // no drafts for sequences this long or longer (0 = no limit)
  KVCacheConfig draft_cache;  // draft model: its own KV cache (prefix caching unused)

  bool enabled() const { return method != SpecMethod::kNone && num_speculative_tokens > 0; }
  // Throws ConfigError naming the first impossible setting.
  void validate(int32_t engine_block_size) const;
};

// Drafts after `tokens`: the continuation of the most recent earlier occurrence of the longest
// suffix of length max_n .. min_n that occurs before; at most k tokens (fewer when the match runs
// into the end). Returns the number written to out (0 = no match).
int32_t ngram_lookup(const int32_t* tokens, int32_t length, int32_t min_n, int32_t max_n, int32_t k,
                     std::vector<int32_t>& out);

class Proposer {
 public:
  virtual ~Proposer() = default;
  // Fills draft_token_ids of each sequence with at most caps[i] tokens (possibly none).
  virtual void propose(const std::vector<Request*>& seqs, const std::vector<int32_t>& caps) = 0;
  // The sequence is gone (finished, aborted): forget any state kept for it.
  virtual void release(const Request* req) { (void)req; }
};

class NgramProposer : public Proposer {
 public:
  NgramProposer(int32_t min_n, int32_t max_n) : min_n_(min_n), max_n_(max_n) {}
  void propose(const std::vector<Request*>& seqs, const std::vector<int32_t>& caps) override;

 private:
  int32_t min_n_, max_n_;
};

// A smaller model that shares the target's vocabulary proposes greedily, one token per draft
// step (k steps per target step). It keeps its own KV cache: per target sequence a shadow
// sequence whose cached prefix is rolled back to what the target accepted.
class DraftModelProposer : public Proposer {
 public:
  DraftModelProposer(std::shared_ptr<Executor> executor, const KVCacheConfig& cache,
                     int32_t max_model_len, int32_t vocab_size);
  ~DraftModelProposer() override;
  void propose(const std::vector<Request*>& seqs, const std::vector<int32_t>& caps) override;
  void release(const Request* req) override;
  int64_t num_draft_steps() const { return num_steps_; }

 private:
  struct Shadow;
  Shadow& shadow_for(const Request& req);
  void drop(const Request* req);

  std::shared_ptr<Executor> executor_;
  KVCacheManager kv_;
  int32_t max_model_len_;
  int32_t vocab_size_;
  std::unordered_map<const Request*, std::unique_ptr<Shadow>> shadows_;
  BatchPlan plan_;
  int64_t num_steps_ = 0;
};

// How many drafts each sequence proposes in a step (SpeculativeConfig::adaptive). A draft at depth
// j of a sequence with acceptance rate a is worth a^j tokens (it counts only if every draft before
// it is accepted); a step of R token rows costs t(R), learned from the executor's measured step
// times (an exponential average per row count; rows never seen are extrapolated optimistically,
// so the planner tries them once and then knows). The plan takes the most valuable drafts, as
// many as maximise tokens per second: (decoding rows + value of the drafts) / (t(rows + drafts) +
// the draft model's time). On a CPU whose GEMMs turn compute-bound after a few rows this gives a
// few drafts to a single stream and none to a large batch; on a GPU it gives many.
class DraftPlanner {
 public:
  explicit DraftPlanner(int32_t max_rows = 256);
  // A step of `rows` token rows took `seconds` in the target's executor.
  void observe_step(int32_t rows, double seconds);
  // The draft model took `seconds` for one draft step (0 for proposers that cost nothing).
  void observe_draft_step(double seconds);
  // The estimated seconds of a target step with `rows` token rows.
  double step_seconds(int32_t rows) const;
  // Drafts per sequence: caps[i] at most, given each sequence's acceptance rate, for a step whose
  // other work is base_rows token rows. Every kExploreEvery-th plan takes one draft more than the
  // best, so a row count whose one measurement was unlucky (another process took the core) is
  // measured again rather than avoided for good.
  std::vector<int32_t> plan(int32_t base_rows, const std::vector<double>& acceptance,
                            const std::vector<int32_t>& caps);

  static constexpr int64_t kExploreEvery = 32;

 private:
  std::vector<double> seconds_;  // by row count; 0 = never measured
  double draft_step_seconds_ = 0.0;
  int64_t num_plans_ = 0;
};

}  // namespace fastllm
