#include <gtest/gtest.h>
#include <poll.h>

#include <map>
#include <random>
#include <set>
#include <unordered_set>

#include "fastllm/engine.h"
#include "fastllm/fake_executor.h"

using namespace fastllm;

namespace {

constexpr int32_t kVocab = 1000;
constexpr int32_t kEos = 7;

// Checks the invariants of every plan the engine produces, then runs the fake model.
class CheckingExecutor : public Executor {
 public:
  CheckingExecutor(const EngineConfig& c, bool verify_kv = true)
      : config_(c),
        fake_({c.cache.num_gpu_blocks, c.cache.num_cpu_blocks, c.cache.block_size, kVocab,
               verify_kv}) {}

  StepResult execute(const BatchPlan& plan) override {
    EXPECT_LE(plan.num_tokens, config_.scheduler.max_num_batched_tokens);
    EXPECT_LE(plan.num_seqs, config_.scheduler.max_num_seqs);
    EXPECT_EQ(plan.query_start_loc.back(), plan.num_tokens);
    std::unordered_set<int64_t> slots(plan.slot_mapping.begin(), plan.slot_mapping.end());
    EXPECT_EQ(static_cast<int32_t>(slots.size()), plan.num_tokens) << "a slot written twice";
    max_tokens_seen = std::max(max_tokens_seen, plan.num_tokens);
    if (plan.max_query_len > 1 && plan.num_seqs > 0) ++num_prefill_steps;
    for (int32_t b : plan.block_tables) {
      if (b != BlockPool::kNullBlock) device_blocks_seen.insert(b);
    }
    for (size_t i = 0; i + 1 < plan.block_ops.copy.size(); i += 2) {
      device_blocks_seen.insert(plan.block_ops.copy[i + 1]);
    }
    for (size_t i = 0; i + 1 < plan.block_ops.swap_in.size(); i += 2) {
      device_blocks_seen.insert(plan.block_ops.swap_in[i + 1]);
    }
    num_copies += plan.block_ops.copy.size() / 2;
    num_swap_outs += plan.block_ops.swap_out.size() / 2;
    num_swap_ins += plan.block_ops.swap_in.size() / 2;
    if (fail_when_request_present.size()) {
      for (const auto& id : plan.request_ids) {
        if (id == fail_when_request_present) throw std::runtime_error("boom");
      }
    }
    return fake_.execute(plan);
  }

  EngineConfig config_;
  FakeExecutor fake_;
  int32_t max_tokens_seen = 0;
  int64_t num_prefill_steps = 0;
  int64_t num_copies = 0, num_swap_outs = 0, num_swap_ins = 0;
  std::set<int32_t> device_blocks_seen;  // every device block a plan read or wrote
  std::string fail_when_request_present;
};

EngineConfig make_config(int32_t num_blocks, int32_t block_size = 16, int32_t budget = 512,
                         bool chunked = true, bool prefix = true) {
  EngineConfig c;
  c.cache.num_gpu_blocks = num_blocks;
  c.cache.block_size = block_size;
  c.cache.enable_prefix_caching = prefix;
  c.scheduler.max_num_batched_tokens = budget;
  c.scheduler.max_num_seqs = 64;
  c.scheduler.max_model_len = 256;
  c.scheduler.enable_chunked_prefill = chunked;
  c.eos_token_ids = {kEos};
  c.vocab_size = kVocab;
  return c;
}

std::vector<int32_t> random_prompt(std::mt19937& rng, int len) {
  std::uniform_int_distribution<int32_t> tok(10, kVocab - 1);
  std::vector<int32_t> p(len);
  for (auto& t : p) t = tok(rng);
  return p;
}

struct Outcome {
  std::map<std::string, std::vector<int32_t>> tokens;
  std::map<std::string, FinishReason> reasons;
  std::map<std::string, int32_t> cached;
};

// Steps the engine until every request finished; collects outputs.
Outcome drain(Engine& engine, int max_steps = 100000) {
  Outcome run;
  for (int i = 0; i < max_steps && engine.has_unfinished_requests(); ++i) {
    for (RequestOutput& o : engine.step()) {
      auto& t = run.tokens[o.request_id];
      t.insert(t.end(), o.new_token_ids.begin(), o.new_token_ids.end());
      if (o.finished) {
        EXPECT_EQ(run.reasons.count(o.request_id), 0u) << "finished twice: " << o.request_id;
        run.reasons[o.request_id] = o.finish_reason;
        run.cached[o.request_id] = o.num_cached_tokens;
      }
    }
  }
  EXPECT_FALSE(engine.has_unfinished_requests()) << "engine did not drain";
  return run;
}

struct Workload {
  std::vector<std::string> ids;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<int32_t> max_tokens;
};

Workload make_workload(int n, uint32_t seed, int min_len = 5, int max_len = 120,
                       const std::vector<int32_t>& shared_prefix = {}) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> len(min_len, max_len), out(1, 64);
  Workload w;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> p = shared_prefix;
    auto tail = random_prompt(rng, len(rng));
    p.insert(p.end(), tail.begin(), tail.end());
    w.ids.push_back("req-" + std::to_string(i));
    w.prompts.push_back(p);
    w.max_tokens.push_back(out(rng));
  }
  return w;
}

Outcome run_workload(const EngineConfig& cfg, const Workload& w,
                     std::shared_ptr<CheckingExecutor>* exec_out = nullptr) {
  auto exec = std::make_shared<CheckingExecutor>(cfg);
  Engine engine(cfg, exec);
  for (size_t i = 0; i < w.ids.size(); ++i) {
    SamplingParams p;
    p.max_tokens = w.max_tokens[i];
    engine.add_request(w.ids[i], w.prompts[i], p);
  }
  Outcome run = drain(engine);
  EngineStats s = engine.stats();
  EXPECT_EQ(s.num_free_blocks, s.num_total_blocks) << "blocks leaked";
  if (exec_out) *exec_out = exec;
  return run;
}

void expect_reference_tokens(const Workload& w, const Outcome& run) {
  for (size_t i = 0; i < w.ids.size(); ++i) {
    auto expected = FakeExecutor::reference_generate(w.prompts[i], w.max_tokens[i], kVocab, {kEos});
    EXPECT_EQ(run.tokens.at(w.ids[i]), expected) << w.ids[i];
  }
}

}  // namespace

TEST(Engine, GeneratesTheReferenceTokens) {
  Workload w = make_workload(12, 1);
  Outcome run = run_workload(make_config(200), w);
  expect_reference_tokens(w, run);
  for (size_t i = 0; i < w.ids.size(); ++i) {
    const auto& t = run.tokens.at(w.ids[i]);
    const bool hit_eos = !t.empty() && t.back() == kEos;
    EXPECT_EQ(run.reasons.at(w.ids[i]), hit_eos ? FinishReason::kStop : FinishReason::kLength);
  }
}

TEST(Engine, TokenBudgetIsNeverExceeded) {
  EngineConfig cfg = make_config(400, 16, /*budget=*/48);
  Workload w = make_workload(20, 2);
  std::shared_ptr<CheckingExecutor> exec;
  Outcome run = run_workload(cfg, w, &exec);
  EXPECT_LE(exec->max_tokens_seen, 48);
  EXPECT_EQ(exec->max_tokens_seen, 48);  // the budget is used up when prompts are long
  expect_reference_tokens(w, run);
}

TEST(Engine, ChunkedPrefillGivesTheSameTokensAsUnchunked) {
  Workload w = make_workload(10, 3, 100, 200);
  EngineConfig unchunked = make_config(400, 16, /*budget=*/256, /*chunked=*/false);
  EngineConfig chunked = make_config(400, 16, /*budget=*/24, /*chunked=*/true);
  std::shared_ptr<CheckingExecutor> exec;
  Outcome a = run_workload(unchunked, w);
  Outcome b = run_workload(chunked, w, &exec);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_LE(exec->max_tokens_seen, 24);
  expect_reference_tokens(w, a);
}

TEST(Engine, UnchunkedRequiresBudgetForMaxModelLen) {
  EngineConfig cfg = make_config(400, 16, /*budget=*/64, /*chunked=*/false);
  EXPECT_THROW(Engine(cfg, std::make_shared<CheckingExecutor>(cfg)), ConfigError);
}

TEST(Engine, PrefixCacheHitsAcrossRequests) {
  std::mt19937 rng(4);
  auto shared = random_prompt(rng, 64);
  Workload w = make_workload(8, 5, 3, 20, shared);
  EngineConfig cfg = make_config(200);
  auto exec = std::make_shared<CheckingExecutor>(cfg);
  Engine engine(cfg, exec);
  SamplingParams p;
  p.max_tokens = 8;
  // The first request fills the cache, the rest arrive afterwards.
  engine.add_request(w.ids[0], w.prompts[0], p);
  Outcome first = drain(engine);
  for (size_t i = 1; i < w.ids.size(); ++i) engine.add_request(w.ids[i], w.prompts[i], p);
  Outcome rest = drain(engine);
  EXPECT_EQ(first.cached.at(w.ids[0]), 0);
  for (size_t i = 1; i < w.ids.size(); ++i) {
    EXPECT_EQ(rest.cached.at(w.ids[i]), 64) << w.ids[i];
    EXPECT_EQ(rest.tokens.at(w.ids[i]),
              FakeExecutor::reference_generate(w.prompts[i], 8, kVocab, {kEos}));
  }
  EngineStats s = engine.stats();
  EXPECT_EQ(s.prefix_hits, 64 * 7);
  EXPECT_EQ(s.num_free_blocks, s.num_total_blocks);
}

// Under a test hash where every prompt's block i collides with every other's, prompts that
// differ never read each other's KV (the fake model derives its tokens from the KV it reads
// back, so a shared block would change them), and equal prompts still hit the cache.
TEST(Engine, PrefixHashCollisionsAreMisses) {
  std::mt19937 rng(21);
  const std::vector<int32_t> first = random_prompt(rng, 20);  // 2 blocks of 8 + 4
  std::vector<int32_t> other = random_prompt(rng, 20);
  other[0] = first[0] + 1;                                      // differs from the first block on
  std::vector<int32_t> half(first.begin(), first.begin() + 8);  // first block shared only
  const std::vector<int32_t> rest = random_prompt(rng, 12);
  half.insert(half.end(), rest.begin(), rest.end());
  half[8] = first[8] + 1;
  std::vector<int32_t> tail(first.begin(), first.begin() + 16);  // another 4-token tail
  tail.insert(tail.end(), {first[16] + 1, first[17], first[18], first[19]});
  EngineConfig cfg = make_config(64, /*block_size=*/8);
  cfg.cache.hash_algo = PrefixHashAlgo::kTestWeak;
  auto exec = std::make_shared<CheckingExecutor>(cfg);
  Engine engine(cfg, exec);
  SamplingParams p;
  p.max_tokens = 10;
  engine.add_request("first", first, p);
  Outcome warm = drain(engine);
  EXPECT_EQ(warm.cached.at("first"), 0);
  const std::map<std::string, std::vector<int32_t>> prompts = {
      {"other", other}, {"half", half}, {"tail", tail}, {"again", first}};
  for (const auto& [id, prompt] : prompts) engine.add_request(id, prompt, p);
  Outcome run = drain(engine);
  for (const auto& [id, prompt] : prompts) {
    EXPECT_EQ(run.tokens.at(id), FakeExecutor::reference_generate(prompt, 10, kVocab, {kEos}))
        << id;
  }
  EXPECT_EQ(run.cached.at("other"), 0);
  EXPECT_EQ(run.cached.at("half"), 8);
  EXPECT_EQ(run.cached.at("tail"), 16);
  EXPECT_EQ(run.cached.at("again"), 19);
  EngineStats s = engine.stats();
  EXPECT_GE(s.prefix_hash_collisions, 3);
  EXPECT_EQ(s.prefix_hits, 8 + 16 + 19);
  EXPECT_EQ(s.num_free_blocks, s.num_total_blocks);
}

// A prompt ending inside a block: later requests with that prompt reuse the whole prompt but its
// last token, by copying the tail block, both after the first finished and while it still
// decodes into that block. The checking executor reads every token back through the copies.
TEST(Engine, PromptTailsInPartialBlocksAreReused) {
  std::mt19937 rng(9);
  const std::vector<int32_t> prompt = random_prompt(rng, 11);  // 8 + 3 with blocks of 8
  EngineConfig cfg = make_config(64, /*block_size=*/8);
  auto exec = std::make_shared<CheckingExecutor>(cfg);
  Engine engine(cfg, exec);
  SamplingParams p;
  p.max_tokens = 12;
  const auto reference = FakeExecutor::reference_generate(prompt, 12, kVocab, {kEos});
  engine.add_request("first", prompt, p);
  Outcome first = drain(engine);
  EXPECT_EQ(first.cached.at("first"), 0);
  for (const char* id : {"a", "b", "c"}) engine.add_request(id, prompt, p);
  Outcome later = drain(engine);
  for (const char* id : {"a", "b", "c"}) {
    EXPECT_EQ(later.cached.at(id), 10) << id;
    EXPECT_EQ(later.tokens.at(id), reference) << id;
  }
  // "x" is still decoding into its tail block when "y" copies the prompt part of it.
  const std::vector<int32_t> other = random_prompt(rng, 13);
  engine.add_request("x", other, p);
  std::vector<int32_t> x_tokens;
  for (int i = 0; i < 2; ++i)
    for (const RequestOutput& o : engine.step())
      x_tokens.insert(x_tokens.end(), o.new_token_ids.begin(), o.new_token_ids.end());
  ASSERT_EQ(x_tokens.size(), 2u);
  engine.add_request("y", other, p);
  Outcome both = drain(engine);
  both.tokens["x"].insert(both.tokens["x"].begin(), x_tokens.begin(), x_tokens.end());
  const auto other_reference = FakeExecutor::reference_generate(other, 12, kVocab, {kEos});
  EXPECT_EQ(both.tokens.at("x"), other_reference);
  EXPECT_EQ(both.tokens.at("y"), other_reference);
  EXPECT_EQ(both.cached.at("y"), 12);
  EngineStats s = engine.stats();
  EXPECT_EQ(s.prefix_hits, 3 * 10 + 12);
  EXPECT_EQ(s.num_free_blocks, s.num_total_blocks);
}

// The executor maps KV memory lazily, so the blocks a long run touches are its resident memory.
// With few sequences at a time in a large pool, freed blocks are reused before fresh ones and
// cached ones get at most as much room again: the run touches blocks 1..k with k bounded by
// twice the peak working set, not the pool.
TEST(Engine, LongRunTouchesOnlyThePeakWorkingSetOfALargePool) {
  std::mt19937 rng(9);
  auto shared = random_prompt(rng, 32);
  const int n = 300;
  Workload w = make_workload(n, 10, 5, 120, shared);
  EngineConfig cfg = make_config(4001);
  cfg.scheduler.max_num_seqs = 4;
  std::shared_ptr<CheckingExecutor> exec;
  Outcome run = run_workload(cfg, w, &exec);
  expect_reference_tokens(w, run);
  // At most 4 running requests of at most max_model_len tokens hold blocks at any time.
  const int32_t max_working_set = 4 * (cfg.scheduler.max_model_len / cfg.cache.block_size);
  const auto& seen = exec->device_blocks_seen;
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(*seen.begin(), 1);
  EXPECT_EQ(*seen.rbegin(), static_cast<int32_t>(seen.size())) << "fresh blocks skipped";
  EXPECT_LE(*seen.rbegin(), 2 * max_working_set);
  // The prefix cache still works while blocks are recycled this eagerly.
  int hits = 0;
  for (const auto& [id, cached] : run.cached) hits += cached >= 32;
  EXPECT_GT(hits, n / 2);
}

TEST(Engine, TinyPoolForcesRecomputePreemptionWithIdenticalTokens) {
  Workload w = make_workload(16, 6, 20, 100);
  Outcome big = run_workload(make_config(600), w);
  // 17 usable blocks of 16 tokens: enough for one max-length request, far from all of them.
  EngineConfig small = make_config(18);
  Outcome tiny = run_workload(small, w);
  EXPECT_EQ(big.tokens, tiny.tokens);
  expect_reference_tokens(w, tiny);
  // Outcome again to read the preemption counter.
  auto exec = std::make_shared<CheckingExecutor>(small);
  Engine engine(small, exec);
  for (size_t i = 0; i < w.ids.size(); ++i) {
    SamplingParams p;
    p.max_tokens = w.max_tokens[i];
    engine.add_request(w.ids[i], w.prompts[i], p);
  }
  drain(engine);
  EXPECT_GT(engine.stats().num_preemptions, 0);
}

TEST(Engine, TinyPoolForcesSwapPreemptionWithIdenticalTokens) {
  Workload w = make_workload(16, 7, 20, 100);
  Outcome big = run_workload(make_config(600), w);
  EngineConfig small = make_config(18);
  small.cache.num_cpu_blocks = 64;
  small.scheduler.preemption_mode = PreemptionMode::kSwap;
  std::shared_ptr<CheckingExecutor> exec;
  Outcome tiny = run_workload(small, w, &exec);
  EXPECT_EQ(big.tokens, tiny.tokens);
  EXPECT_GT(exec->num_swap_outs, 0);
  EXPECT_GT(exec->num_swap_ins, 0);
}

TEST(Engine, PreemptionWithoutPrefixCachingAndSmallBlocks) {
  Workload w = make_workload(12, 8, 10, 60);
  EngineConfig big = make_config(600, 8, 512, true, false);
  EngineConfig small = make_config(34, 8, 64, true, false);  // 33 blocks * 8 = 264 >= 256
  EXPECT_EQ(run_workload(big, w).tokens, run_workload(small, w).tokens);
}

TEST(Engine, AbortFreesAllBlocks) {
  EngineConfig cfg = make_config(200);
  auto exec = std::make_shared<CheckingExecutor>(cfg);
  Engine engine(cfg, exec);
  std::mt19937 rng(9);
  SamplingParams p;
  p.max_tokens = 200;
  p.ignore_eos = true;
  for (int i = 0; i < 6; ++i)
    engine.add_request("r" + std::to_string(i), random_prompt(rng, 40), p);
  for (int i = 0; i < 5; ++i) engine.step();
  EXPECT_LT(engine.stats().num_free_blocks, engine.stats().num_total_blocks);
  for (int i = 0; i < 6; ++i) EXPECT_TRUE(engine.abort("r" + std::to_string(i)));
  EXPECT_FALSE(engine.abort("nope"));
  auto outs = engine.step();
  int aborted = 0;
  for (auto& o : outs) aborted += o.finished && o.finish_reason == FinishReason::kAbort;
  EXPECT_EQ(aborted, 6);
  EXPECT_FALSE(engine.has_unfinished_requests());
  EXPECT_EQ(engine.stats().num_free_blocks, engine.stats().num_total_blocks);
  EXPECT_EQ(engine.stats().num_running, 0);
}

TEST(Engine, PriorityPolicyServesLowerValuesFirst) {
  EngineConfig cfg = make_config(200);
  cfg.scheduler.policy = SchedulingPolicy::kPriority;
  cfg.scheduler.max_num_seqs = 1;
  auto exec = std::make_shared<CheckingExecutor>(cfg);
  Engine engine(cfg, exec);
  std::mt19937 rng(10);
  std::vector<std::pair<std::string, int>> reqs = {
      {"low", 5}, {"high", -3}, {"mid", 0}, {"mid2", 0}};
  for (auto& [id, prio] : reqs) {
    SamplingParams p;
    p.max_tokens = 3;
    p.ignore_eos = true;
    p.priority = prio;
    engine.add_request(id, random_prompt(rng, 10), p);
  }
  std::vector<std::string> order;
  while (engine.has_unfinished_requests()) {
    for (auto& o : engine.step()) {
      if (o.finished) order.push_back(o.request_id);
    }
  }
  EXPECT_EQ(order, (std::vector<std::string>{"high", "mid", "mid2", "low"}));
}

TEST(Engine, PriorityPreemptsLessUrgentRunningRequest) {
  EngineConfig cfg = make_config(18);  // 17 blocks: room for one long request
  cfg.scheduler.policy = SchedulingPolicy::kPriority;
  auto exec = std::make_shared<CheckingExecutor>(cfg);
  Engine engine(cfg, exec);
  std::mt19937 rng(11);
  SamplingParams slow;
  slow.max_tokens = 100;
  slow.ignore_eos = true;
  slow.priority = 10;
  auto slow_prompt = random_prompt(rng, 150);
  engine.add_request("slow", slow_prompt, slow);
  Outcome run;
  for (int i = 0; i < 3; ++i) {
    for (auto& o : engine.step()) {
      run.tokens[o.request_id].insert(run.tokens[o.request_id].end(), o.new_token_ids.begin(),
                                      o.new_token_ids.end());
    }
  }
  SamplingParams urgent;
  urgent.max_tokens = 4;
  urgent.ignore_eos = true;
  urgent.priority = 0;
  auto urgent_prompt = random_prompt(rng, 150);
  engine.add_request("urgent", urgent_prompt, urgent);
  std::vector<std::string> order;
  while (engine.has_unfinished_requests()) {
    for (auto& o : engine.step()) {
      auto& t = run.tokens[o.request_id];
      t.insert(t.end(), o.new_token_ids.begin(), o.new_token_ids.end());
      if (o.finished) order.push_back(o.request_id);
    }
  }
  EXPECT_EQ(order, (std::vector<std::string>{"urgent", "slow"}));
  EXPECT_GT(engine.stats().num_preemptions, 0);
  EXPECT_EQ(run.tokens["slow"], FakeExecutor::reference_generate(slow_prompt, 100, kVocab, {}));
}

TEST(Engine, StopTokensMinTokensAndIgnoreEos) {
  EngineConfig cfg = make_config(200);
  std::mt19937 rng(12);
  auto prompt = random_prompt(rng, 30);
  auto free_run = FakeExecutor::reference_generate(prompt, 40, kVocab, {});
  // Stop on the 6th generated token.
  {
    Engine engine(cfg, std::make_shared<CheckingExecutor>(cfg));
    SamplingParams p;
    p.max_tokens = 40;
    p.ignore_eos = true;
    p.stop_token_ids = {free_run[5]};
    engine.add_request("s", prompt, p);
    std::vector<int32_t> got;
    int32_t stop_id = -2;
    FinishReason reason = FinishReason::kNone;
    while (engine.has_unfinished_requests()) {
      for (auto& o : engine.step()) {
        got.insert(got.end(), o.new_token_ids.begin(), o.new_token_ids.end());
        if (o.finished) {
          stop_id = o.stop_token_id;
          reason = o.finish_reason;
        }
      }
    }
    auto first = std::find(free_run.begin(), free_run.end(), free_run[5]);
    std::vector<int32_t> expected(free_run.begin(), first + 1);
    EXPECT_EQ(got, expected);
    EXPECT_EQ(reason, FinishReason::kStop);
    EXPECT_EQ(stop_id, free_run[5]);
  }
  // min_tokens masks the stop token: the fake model skips it as a sampler would.
  {
    Engine engine(cfg, std::make_shared<CheckingExecutor>(cfg));
    SamplingParams p;
    p.max_tokens = 40;
    p.min_tokens = 40;
    p.ignore_eos = true;
    p.stop_token_ids = {free_run[0]};
    engine.add_request("m", prompt, p);
    Outcome run = drain(engine);
    EXPECT_EQ(run.tokens["m"].size(), 40u);
    EXPECT_EQ(run.reasons["m"], FinishReason::kLength);
  }
  // EOS: with ignore_eos the request runs to max_tokens even through EOS.
  {
    EngineConfig eos_cfg = cfg;
    eos_cfg.eos_token_ids = {free_run[2]};
    Engine engine(eos_cfg, std::make_shared<CheckingExecutor>(eos_cfg));
    SamplingParams stop_at_eos;
    stop_at_eos.max_tokens = 40;
    engine.add_request("eos", prompt, stop_at_eos);
    SamplingParams ignore = stop_at_eos;
    ignore.ignore_eos = true;
    engine.add_request("ignore", prompt, ignore);
    Outcome run = drain(engine);
    EXPECT_EQ(run.tokens["eos"].back(), free_run[2]);
    EXPECT_EQ(run.reasons["eos"], FinishReason::kStop);
    EXPECT_EQ(run.tokens["ignore"], free_run);
    EXPECT_EQ(run.reasons["ignore"], FinishReason::kLength);
  }
}

TEST(Engine, MaxModelLenEndsGeneration) {
  EngineConfig cfg = make_config(200);
  cfg.scheduler.max_model_len = 64;
  Engine engine(cfg, std::make_shared<CheckingExecutor>(cfg));
  std::mt19937 rng(13);
  SamplingParams p;
  p.max_tokens = -1;
  p.ignore_eos = true;
  engine.add_request("a", random_prompt(rng, 60), p);
  Outcome run = drain(engine);
  EXPECT_EQ(run.tokens["a"].size(), 4u);
  EXPECT_EQ(run.reasons["a"], FinishReason::kLength);
}

TEST(Engine, BadRequestsRaiseClearErrorsAndLeaveTheEngineWorking) {
  EngineConfig cfg = make_config(200);
  Engine engine(cfg, std::make_shared<CheckingExecutor>(cfg));
  SamplingParams ok;
  EXPECT_THROW(engine.add_request("a", {}, ok), InvalidRequestError);
  EXPECT_THROW(engine.add_request("a", std::vector<int32_t>(256, 11), ok), InvalidRequestError);
  EXPECT_THROW(engine.add_request("a", {11, kVocab}, ok), InvalidRequestError);
  EXPECT_THROW(engine.add_request("a", {11, -1}, ok), InvalidRequestError);
  EXPECT_THROW(engine.add_request("", {11}, ok), InvalidRequestError);
  SamplingParams bad = ok;
  bad.max_tokens = 0;
  EXPECT_THROW(engine.add_request("a", {11}, bad), InvalidRequestError);
  bad = ok;
  bad.temperature = -1;
  EXPECT_THROW(engine.add_request("a", {11}, bad), InvalidRequestError);
  bad = ok;
  bad.top_p = 0;
  EXPECT_THROW(engine.add_request("a", {11}, bad), InvalidRequestError);
  bad = ok;
  bad.logprobs = 21;
  EXPECT_THROW(engine.add_request("a", {11}, bad), InvalidRequestError);
  bad = ok;
  bad.min_tokens = 20;
  EXPECT_THROW(engine.add_request("a", {11}, bad), InvalidRequestError);
  try {
    engine.add_request("a", std::vector<int32_t>(300, 11), ok);
    FAIL();
  } catch (const InvalidRequestError& e) {
    EXPECT_NE(std::string(e.what()).find("max_model_len"), std::string::npos);
  }
  engine.add_request("a", {11, 12}, ok);
  try {
    engine.add_request("a", {11, 12}, ok);
    FAIL();
  } catch (const InvalidRequestError& e) {
    EXPECT_NE(std::string(e.what()).find("already in use"), std::string::npos);
  }
  Outcome run = drain(engine);
  EXPECT_EQ(run.tokens["a"], FakeExecutor::reference_generate({11, 12}, 16, kVocab, {kEos}));
  // The id is free again once finished.
  engine.add_request("a", {11, 12}, ok);
  drain(engine);
}

TEST(Engine, KVCacheSmallerThanMaxModelLenIsAConfigError) {
  EngineConfig cfg = make_config(10);  // 9 * 16 = 144 < 256
  EXPECT_THROW(Engine(cfg, std::make_shared<CheckingExecutor>(cfg)), ConfigError);
}

TEST(Engine, ExecutorFailureFailsOnlyTheRequestThatTriggersIt) {
  EngineConfig cfg = make_config(200);
  cfg.scheduler.max_num_seqs = 2;
  auto exec = std::make_shared<CheckingExecutor>(cfg);
  exec->fail_when_request_present = "bad";
  Engine engine(cfg, exec);
  SamplingParams p;
  p.max_tokens = 5;
  p.ignore_eos = true;
  engine.add_request("bad", {20, 21, 22}, p);
  engine.add_request("good", {30, 31}, p);
  engine.add_request("later", {40, 41}, p);  // waits for a free seat: max_num_seqs = 2
  Outcome run = drain(engine);
  EXPECT_EQ(run.reasons["bad"], FinishReason::kError);
  // "good" shared the failing step; run again on its own it keeps its exact tokens.
  EXPECT_EQ(run.reasons["good"], FinishReason::kLength);
  EXPECT_EQ(run.tokens["good"], FakeExecutor::reference_generate({30, 31}, 5, kVocab, {}));
  EXPECT_EQ(run.reasons["later"], FinishReason::kLength);
  EXPECT_EQ(run.tokens["later"], FakeExecutor::reference_generate({40, 41}, 5, kVocab, {}));
  EXPECT_EQ(engine.stats().num_free_blocks, engine.stats().num_total_blocks);
}

TEST(Engine, LogprobsFlowFromTheExecutor) {
  EngineConfig cfg = make_config(200);
  Engine engine(cfg, std::make_shared<CheckingExecutor>(cfg));
  SamplingParams p;
  p.max_tokens = 3;
  p.ignore_eos = true;
  p.logprobs = 2;
  engine.add_request("lp", {50, 51}, p);
  SamplingParams none;
  none.max_tokens = 3;
  engine.add_request("none", {60, 61}, none);
  while (engine.has_unfinished_requests()) {
    for (auto& o : engine.step()) {
      if (o.request_id == "lp") {
        ASSERT_EQ(o.new_logprobs.size(), 1u);
        EXPECT_FLOAT_EQ(o.new_logprobs[0], -static_cast<float>(o.new_token_ids[0] % 10) / 10.0f);
        ASSERT_EQ(o.num_top_logprobs, 2);
        EXPECT_EQ(o.top_token_ids[0], o.new_token_ids[0]);
        EXPECT_FLOAT_EQ(o.top_logprobs[1], -1.0f);
      } else {
        EXPECT_TRUE(o.new_logprobs.empty());
      }
    }
  }
}

TEST(Engine, LoopThreadWakesTheOutputFd) {
  EngineConfig cfg = make_config(200);
  Engine engine(cfg, std::make_shared<CheckingExecutor>(cfg));
  engine.start();
  EXPECT_THROW(engine.step(), EngineError);
  std::mt19937 rng(14);
  std::map<std::string, std::vector<int32_t>> prompts;
  SamplingParams p;
  p.max_tokens = 20;
  for (int i = 0; i < 8; ++i) {
    std::string id = "t" + std::to_string(i);
    prompts[id] = random_prompt(rng, 30);
    engine.add_request(id, prompts[id], p);
  }
  Outcome run;
  while (run.reasons.size() < prompts.size()) {
    pollfd pfd{engine.output_fd(), POLLIN, 0};
    ASSERT_EQ(poll(&pfd, 1, 10000), 1) << "no wake-up within 10 s";
    for (auto& o : engine.take_outputs()) {
      auto& t = run.tokens[o.request_id];
      t.insert(t.end(), o.new_token_ids.begin(), o.new_token_ids.end());
      if (o.finished) run.reasons[o.request_id] = o.finish_reason;
    }
  }
  // Nothing queued: the fd is not readable.
  pollfd pfd{engine.output_fd(), POLLIN, 0};
  EXPECT_EQ(poll(&pfd, 1, 50), 0);
  engine.stop();
  for (auto& [id, prompt] : prompts) {
    EXPECT_EQ(run.tokens[id], FakeExecutor::reference_generate(prompt, 20, kVocab, {kEos}));
  }
  EXPECT_EQ(engine.stats().num_free_blocks, engine.stats().num_total_blocks);
}

// Many requests with shared prefixes, random aborts from another thread while the native loop
// runs, a pool small enough to preempt: every request ends exactly once, unaborted ones with the
// reference tokens, and no block leaks.
void stress(PreemptionMode mode, uint32_t seed, int32_t speculative_tokens = 0) {
  EngineConfig cfg = make_config(40, 16, 128);
  cfg.scheduler.max_num_seqs = 32;
  cfg.scheduler.preemption_mode = mode;
  cfg.cache.num_cpu_blocks = mode == PreemptionMode::kSwap ? 80 : 0;
  std::shared_ptr<FakeExecutor> draft;
  if (speculative_tokens > 0) {
    // A draft model that is right most of the time, with a cache too small for every sequence.
    cfg.speculative.method = SpecMethod::kDraftModel;
    cfg.speculative.num_speculative_tokens = speculative_tokens;
    cfg.speculative.draft_cache.num_gpu_blocks = 30;
    cfg.speculative.draft_cache.block_size = 16;
    cfg.speculative.adaptive = false;  // fixed k: the counts below must not follow timings
    draft = std::make_shared<FakeExecutor>(FakeExecutorConfig{30, 0, 16, kVocab, true, 4});
  }
  auto exec = std::make_shared<CheckingExecutor>(cfg, /*verify_kv=*/true);
  Engine engine(cfg, exec, draft);
  engine.start();
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> prefixes = {random_prompt(rng, 32), random_prompt(rng, 48), {}};
  std::uniform_int_distribution<int> pick(0, 2), len(1, 60), out(1, 40), coin(0, 9);
  const int n = 1000;
  std::map<std::string, std::pair<std::vector<int32_t>, int>> spec;
  std::set<std::string> abort_sent;
  Outcome run;
  auto collect = [&](std::vector<RequestOutput> outs) {
    for (auto& o : outs) {
      auto& t = run.tokens[o.request_id];
      t.insert(t.end(), o.new_token_ids.begin(), o.new_token_ids.end());
      if (o.finished) {
        ASSERT_EQ(run.reasons.count(o.request_id), 0u);
        run.reasons[o.request_id] = o.finish_reason;
      }
    }
  };
  for (int i = 0; i < n; ++i) {
    std::string id = "s" + std::to_string(i);
    std::vector<int32_t> prompt = prefixes[pick(rng)];
    auto tail = random_prompt(rng, len(rng));
    prompt.insert(prompt.end(), tail.begin(), tail.end());
    const int max_tokens = out(rng);
    spec[id] = {prompt, max_tokens};
    SamplingParams p;
    p.max_tokens = max_tokens;
    engine.add_request(id, prompt, p);
    if (coin(rng) == 0) {
      // Abort a random earlier request (it may already be finished).
      std::string victim = "s" + std::to_string(std::uniform_int_distribution<int>(0, i)(rng));
      if (engine.abort(victim)) abort_sent.insert(victim);
    }
    if (i % 50 == 0) collect(engine.take_outputs());
  }
  for (int spins = 0; run.reasons.size() < spec.size() && spins < 20000; ++spins) {
    collect(engine.wait_outputs(100));
  }
  engine.stop();
  ASSERT_EQ(run.reasons.size(), spec.size());
  int aborted = 0;
  for (auto& [id, reason] : run.reasons) {
    if (reason == FinishReason::kAbort) {
      ++aborted;
      EXPECT_TRUE(abort_sent.count(id)) << id;
      continue;
    }
    auto expected =
        FakeExecutor::reference_generate(spec[id].first, spec[id].second, kVocab, {kEos});
    EXPECT_EQ(run.tokens[id], expected) << id;
  }
  EXPECT_GT(aborted, 0);
  EngineStats s = engine.stats();
  EXPECT_EQ(s.num_free_blocks, s.num_total_blocks) << "leaked blocks";
  EXPECT_EQ(s.num_running + s.num_waiting, 0);
  EXPECT_GT(s.num_preemptions, 0);
  EXPECT_GT(s.prefix_hits, 0);
  if (speculative_tokens > 0) {
    EXPECT_GT(s.spec_accepted_tokens, 0);
    EXPECT_LT(s.spec_accepted_tokens, s.spec_draft_tokens);
  }
}

TEST(EngineStress, ThousandRequestsWithAbortsRecompute) { stress(PreemptionMode::kRecompute, 21); }
TEST(EngineStress, ThousandRequestsWithAbortsSwap) { stress(PreemptionMode::kSwap, 22); }
TEST(EngineStress, ThousandSpeculativeRequestsWithAbortsRecompute) {
  stress(PreemptionMode::kRecompute, 23, 4);
}
TEST(EngineStress, ThousandSpeculativeRequestsWithAbortsSwap) {
  stress(PreemptionMode::kSwap, 24, 3);
}

TEST(Engine, PromptLogprobsCoverEveryPromptPositionAcrossChunks) {
  EngineConfig cfg = make_config(200, 16, /*budget=*/16);
  Engine engine(cfg, std::make_shared<CheckingExecutor>(cfg));
  std::mt19937 rng(15);
  auto prompt = random_prompt(rng, 40);
  SamplingParams p;
  p.max_tokens = 2;
  p.prompt_logprobs = 2;
  engine.add_request("warm", prompt, SamplingParams{});  // fills the prefix cache
  drain(engine);
  engine.add_request("pl", prompt, p);
  std::vector<float> lps;
  std::vector<int32_t> top;
  int32_t cached = -1;
  while (engine.has_unfinished_requests()) {
    for (auto& o : engine.step()) {
      lps.insert(lps.end(), o.prompt_logprobs.begin(), o.prompt_logprobs.end());
      top.insert(top.end(), o.prompt_top_token_ids.begin(), o.prompt_top_token_ids.end());
      if (!o.prompt_logprobs.empty()) EXPECT_EQ(o.num_prompt_top_logprobs, 2);
      if (o.finished) cached = o.num_cached_tokens;
    }
  }
  ASSERT_EQ(lps.size(), 39u);  // positions 1..39 of the prompt
  ASSERT_EQ(top.size(), 78u);
  for (size_t i = 0; i < lps.size(); ++i) {
    EXPECT_FLOAT_EQ(lps[i], -static_cast<float>(prompt[i + 1] % 10) / 10.0f) << i;
    EXPECT_EQ(top[2 * i], prompt[i + 1]);
  }
  EXPECT_EQ(cached, 0);  // prompt logprobs need every prompt position computed
}
