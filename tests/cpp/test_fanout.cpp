// Parallel sampling in the engine: one request, one prefill, n sequences forked copy-on-write.
// The FakeExecutor derives every token from the KV it reads back through the block table, so a
// sharing, copy-on-write or preemption error changes the children's tokens (or is reported as
// corruption).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fastllm/engine.h"
#include "fastllm/fake_executor.h"

using namespace fastllm;

namespace {

constexpr int32_t kVocab = 1000;
constexpr int32_t kEos = 7;

// Runs the fake model and records what the plans asked for.
class RecordingExecutor : public Executor {
 public:
  explicit RecordingExecutor(const EngineConfig& c)
      : config_(c),
        fake_({c.cache.num_gpu_blocks, c.cache.num_cpu_blocks, c.cache.block_size, kVocab, true}) {}

  StepResult execute(const BatchPlan& plan) override {
    EXPECT_LE(plan.num_tokens, config_.scheduler.max_num_batched_tokens);
    EXPECT_LE(plan.num_seqs, config_.scheduler.max_num_seqs);
    EXPECT_EQ(plan.sample_child_indices.size(), static_cast<size_t>(plan.num_samples));
    std::set<int64_t> slots(plan.slot_mapping.begin(), plan.slot_mapping.end());
    EXPECT_EQ(static_cast<int32_t>(slots.size()), plan.num_tokens) << "a slot written twice";
    // A block written in this step is held by that sequence alone (copy-on-write happened).
    std::map<int32_t, int32_t> writer;
    for (int32_t s = 0; s < plan.num_seqs; ++s) {
      for (int32_t t = plan.query_start_loc[s]; t < plan.query_start_loc[s + 1]; ++t) {
        const auto block = static_cast<int32_t>(plan.slot_mapping[t] / plan.block_size);
        auto [it, fresh] = writer.emplace(block, s);
        EXPECT_TRUE(fresh || it->second == s) << "block " << block << " written by two sequences";
      }
    }
    if (plan.max_query_len > 1) ++num_prefill_steps;
    num_copies += static_cast<int64_t>(plan.block_ops.copy.size() / 2);
    plans.push_back(plan);
    return fake_.execute(plan);
  }

  EngineConfig config_;
  FakeExecutor fake_;
  int64_t num_prefill_steps = 0;
  int64_t num_copies = 0;
  std::vector<BatchPlan> plans;
};

EngineConfig make_config(int32_t num_blocks, int32_t budget = 512, int32_t block_size = 16) {
  EngineConfig c;
  c.cache.num_gpu_blocks = num_blocks;
  c.cache.block_size = block_size;
  c.scheduler.max_num_batched_tokens = budget;
  c.scheduler.max_num_seqs = 64;
  c.scheduler.max_model_len = 256;
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

using SeqKey = std::pair<std::string, int32_t>;  // (request id, seq_index)
SeqKey key(const std::string& id, int32_t seq_index) { return {id, seq_index}; }

struct Outcome {
  std::map<SeqKey, std::vector<int32_t>> tokens;
  std::map<SeqKey, FinishReason> reasons;
  std::map<SeqKey, double> cumulative_logprob;
  std::map<SeqKey, double> summed_logprobs;
  std::map<std::string, int32_t> request_finished;  // outputs with request_finished, per id
  std::map<std::string, size_t> prompt_logprobs;    // per id
};

void collect(const std::vector<RequestOutput>& outs, Outcome& run) {
  for (const RequestOutput& o : outs) {
    const SeqKey key{o.request_id, o.seq_index};
    auto& t = run.tokens[key];
    t.insert(t.end(), o.new_token_ids.begin(), o.new_token_ids.end());
    for (float lp : o.new_logprobs) run.summed_logprobs[key] += lp;
    run.cumulative_logprob[key] = o.cumulative_logprob;
    run.prompt_logprobs[o.request_id] += o.prompt_logprobs.size();
    if (!o.prompt_logprobs.empty()) EXPECT_EQ(o.seq_index, 0) << "prompt logprobs on a child";
    if (o.finished) {
      EXPECT_EQ(run.reasons.count(key), 0u)
          << "finished twice: " << o.request_id << "#" << o.seq_index;
      run.reasons[key] = o.finish_reason;
    }
    if (o.request_finished) {
      EXPECT_TRUE(o.finished);
      ++run.request_finished[o.request_id];
    }
  }
}

Outcome drain(Engine& engine, int max_steps = 100000) {
  Outcome run;
  for (int i = 0; i < max_steps && engine.has_unfinished_requests(); ++i)
    collect(engine.step(), run);
  EXPECT_FALSE(engine.has_unfinished_requests()) << "engine did not drain";
  EXPECT_EQ(engine.stats().num_free_blocks, engine.stats().num_total_blocks) << "blocks leaked";
  return run;
}

// What child `child` of a request must produce: a separate request with seed + child (or the
// child's own unseeded stream), ending at EOS, a stop token or max_tokens.
std::vector<int32_t> expected_child(const std::vector<int32_t>& prompt, const SamplingParams& p,
                                    int32_t child) {
  std::vector<int32_t> stops = p.stop_token_ids;
  if (!p.ignore_eos) stops.push_back(kEos);
  return FakeExecutor::reference_generate(prompt, p.max_tokens, kVocab, stops, 0,
                                          p.seed < 0 ? -1 : p.seed + child, child);
}

void expect_children(const Outcome& run, const std::string& id, const std::vector<int32_t>& prompt,
                     const SamplingParams& p) {
  for (int32_t c = 0; c < p.n; ++c) {
    const SeqKey key{id, c};
    ASSERT_EQ(run.tokens.count(key), 1u) << id << "#" << c << " produced nothing";
    const std::vector<int32_t> expected = expected_child(prompt, p, c);
    EXPECT_EQ(run.tokens.at(key), expected) << id << "#" << c;
    ASSERT_EQ(run.reasons.count(key), 1u) << id << "#" << c << " never finished";
    const bool full = static_cast<int32_t>(expected.size()) == p.max_tokens;
    const int32_t last = expected.back();
    const bool stopped =
        (!p.ignore_eos && last == kEos) ||
        std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), last) != p.stop_token_ids.end();
    EXPECT_EQ(run.reasons.at(key), stopped ? FinishReason::kStop
                                   : full  ? FinishReason::kLength
                                           : FinishReason::kNone)
        << id << "#" << c;
  }
  EXPECT_EQ(run.tokens.count({id, p.n}), 0u) << "more than n sequences";
  EXPECT_EQ(run.request_finished.at(id), 1) << id;
}

}  // namespace

TEST(FanOut, OnePrefillThenChildrenShareThePromptAndCopyOnWrite) {
  EngineConfig cfg = make_config(64);
  auto exec = std::make_shared<RecordingExecutor>(cfg);
  Engine engine(cfg, exec);
  const int32_t total = engine.stats().num_total_blocks;
  std::mt19937 rng(1);
  const std::vector<int32_t> prompt = random_prompt(rng, 21);  // one full block + 5 tokens
  SamplingParams p;
  p.n = 4;
  p.seed = 100;
  p.max_tokens = 24;
  p.ignore_eos = true;
  engine.add_request("fan", prompt, p);

  Outcome run;
  collect(engine.step(), run);
  // The prefill step: one sequence of 21 tokens, four sample rows on its last token.
  ASSERT_EQ(exec->plans.size(), 1u);
  const BatchPlan prefill = exec->plans[0];  // a copy: plans grows
  EXPECT_EQ(prefill.num_seqs, 1);
  EXPECT_EQ(prefill.num_tokens, 21);
  ASSERT_EQ(prefill.num_samples, 4);
  for (int32_t r = 0; r < 4; ++r) {
    EXPECT_EQ(prefill.sample_token_indices[r], 20);
    EXPECT_EQ(prefill.sample_child_indices[r], r);
    EXPECT_EQ(prefill.seeds[r], 100 + r);
    EXPECT_EQ(prefill.output_positions[r], 0);
  }
  // Every child reported its first token; the four sequences hold the prompt's two blocks.
  for (int32_t c = 0; c < 4; ++c) EXPECT_EQ(run.tokens[key("fan", c)].size(), 1u);
  EXPECT_EQ(engine.stats().num_running, 4);
  EXPECT_EQ(engine.stats().num_free_blocks, total - 2);

  collect(engine.step(), run);
  // First decode: all four share the full block; the partial block was copied for three of them
  // (the last holder writes in place).
  ASSERT_EQ(exec->plans.size(), 2u);
  const BatchPlan decode = exec->plans[1];
  ASSERT_EQ(decode.num_seqs, 4);
  std::set<int32_t> tails;
  for (int32_t s = 0; s < 4; ++s) {
    EXPECT_EQ(decode.block_tables[s * decode.max_blocks_per_seq],
              prefill.block_tables[0]);  // the full prompt block, shared
    tails.insert(decode.block_tables[s * decode.max_blocks_per_seq + 1]);
    EXPECT_EQ(decode.sample_child_indices[s], s);
  }
  EXPECT_EQ(tails.size(), 4u) << "children write into their own tail blocks";
  EXPECT_EQ(decode.block_ops.copy.size(), 6u);
  EXPECT_EQ(engine.stats().num_free_blocks, total - 5);

  for (int i = 0; i < 1000 && engine.has_unfinished_requests(); ++i) collect(engine.step(), run);
  EXPECT_FALSE(engine.has_unfinished_requests());
  expect_children(run, "fan", prompt, p);
  EXPECT_EQ(exec->num_prefill_steps, 1);
  EXPECT_EQ(exec->num_copies, 3);
  EXPECT_EQ(engine.stats().num_prompt_tokens_computed, 21);  // once, not 4 times
  EXPECT_EQ(engine.stats().num_generated_tokens, 4 * 24);
  EXPECT_EQ(engine.stats().num_free_blocks, total);
  // Children differ from one another (distinct seeds).
  std::set<std::vector<int32_t>> distinct;
  for (int32_t c = 0; c < 4; ++c) distinct.insert(run.tokens[key("fan", c)]);
  EXPECT_EQ(distinct.size(), 4u);
}

TEST(FanOut, PromptEndingOnABlockBoundaryNeedsNoCopy) {
  EngineConfig cfg = make_config(64);
  auto exec = std::make_shared<RecordingExecutor>(cfg);
  Engine engine(cfg, exec);
  std::mt19937 rng(2);
  const std::vector<int32_t> prompt = random_prompt(rng, 32);
  SamplingParams p;
  p.n = 3;
  p.seed = 5;
  p.max_tokens = 20;
  engine.add_request("aligned", prompt, p);
  Outcome run = drain(engine);
  expect_children(run, "aligned", prompt, p);
  EXPECT_EQ(exec->num_copies, 0);
  EXPECT_EQ(engine.stats().num_prompt_tokens_computed, 32);
}

TEST(FanOut, UnseededChildrenDifferAndFollowTheirOwnStreams) {
  EngineConfig cfg = make_config(64);
  Engine engine(cfg, std::make_shared<RecordingExecutor>(cfg));
  std::mt19937 rng(3);
  const std::vector<int32_t> prompt = random_prompt(rng, 10);
  SamplingParams p;
  p.n = 3;
  p.max_tokens = 12;
  p.ignore_eos = true;
  engine.add_request("u", prompt, p);
  Outcome run = drain(engine);
  expect_children(run, "u", prompt, p);
  EXPECT_NE(run.tokens[key("u", 0)], run.tokens[key("u", 1)]);
  EXPECT_NE(run.tokens[key("u", 1)], run.tokens[key("u", 2)]);
  EXPECT_NE(run.tokens[key("u", 0)], run.tokens[key("u", 2)]);
  // Child 0 of an unseeded request is exactly an n = 1 request.
  EXPECT_EQ(run.tokens[key("u", 0)],
            FakeExecutor::reference_generate(prompt, 12, kVocab, {}, 0, -1, 0));
}

TEST(FanOut, ChildrenFinishOnTheirOwnStopTokens) {
  EngineConfig cfg = make_config(64);
  Engine engine(cfg, std::make_shared<RecordingExecutor>(cfg));
  std::mt19937 rng(4);
  const std::vector<int32_t> prompt = random_prompt(rng, 19);
  SamplingParams p;
  p.n = 4;
  p.seed = 40;
  p.max_tokens = 30;
  p.ignore_eos = true;
  // Child 2's fourth token stops it; the others go on (unless they meet it too).
  p.stop_token_ids = {expected_child(prompt, p, 2)[3]};
  engine.add_request("s", prompt, p);
  Outcome run = drain(engine);
  expect_children(run, "s", prompt, p);
  EXPECT_EQ(run.tokens[key("s", 2)].size(), 4u);
  EXPECT_EQ(run.reasons[key("s", 2)], FinishReason::kStop);
  EXPECT_EQ(run.reasons[key("s", 0)], FinishReason::kLength);
}

TEST(FanOut, ChunkedPrefillFansOutOnceAfterTheLastChunk) {
  EngineConfig cfg = make_config(64, /*budget=*/32);
  auto exec = std::make_shared<RecordingExecutor>(cfg);
  Engine engine(cfg, exec);
  std::mt19937 rng(5);
  const std::vector<int32_t> prompt = random_prompt(rng, 100);
  SamplingParams p;
  p.n = 3;
  p.seed = 9;
  p.max_tokens = 10;
  engine.add_request("chunked", prompt, p);
  Outcome run = drain(engine);
  expect_children(run, "chunked", prompt, p);
  EXPECT_EQ(engine.stats().num_prompt_tokens_computed, 100);
  int64_t fan_out_plans = 0;
  for (const BatchPlan& plan : exec->plans) {
    if (plan.num_samples > plan.num_seqs) ++fan_out_plans;
  }
  EXPECT_EQ(fan_out_plans, 1);
}

TEST(FanOut, AbortFreesEveryChild) {
  EngineConfig cfg = make_config(64);
  Engine engine(cfg, std::make_shared<RecordingExecutor>(cfg));
  const int32_t total = engine.stats().num_total_blocks;
  std::mt19937 rng(6);
  SamplingParams p;
  p.n = 4;
  p.max_tokens = 100;
  p.ignore_eos = true;
  engine.add_request("a", random_prompt(rng, 30), p);
  SamplingParams single;
  single.max_tokens = 100;
  single.ignore_eos = true;
  engine.add_request("other", random_prompt(rng, 30), single);
  for (int i = 0; i < 20; ++i) engine.step();
  EXPECT_EQ(engine.stats().num_running, 5);
  EXPECT_TRUE(engine.abort("a"));
  Outcome run;
  collect(engine.step(), run);
  for (int32_t c = 0; c < 4; ++c) EXPECT_EQ(run.reasons[key("a", c)], FinishReason::kAbort) << c;
  EXPECT_EQ(run.request_finished["a"], 1);
  EXPECT_EQ(engine.stats().num_running, 1);
  EXPECT_FALSE(engine.abort("a"));  // the id is free again
  EXPECT_TRUE(engine.abort("other"));
  collect(engine.step(), run);
  EXPECT_FALSE(engine.has_unfinished_requests());
  EXPECT_EQ(engine.stats().num_free_blocks, total);
}

TEST(FanOut, AbortBeforeThePromptCompletesReportsSequenceZeroOnly) {
  EngineConfig cfg = make_config(64, /*budget=*/16);
  Engine engine(cfg, std::make_shared<RecordingExecutor>(cfg));
  const int32_t total = engine.stats().num_total_blocks;
  std::mt19937 rng(7);
  SamplingParams p;
  p.n = 3;
  engine.add_request("early", random_prompt(rng, 60), p);
  engine.step();
  engine.step();
  EXPECT_TRUE(engine.abort("early"));
  auto outs = engine.step();
  ASSERT_EQ(outs.size(), 1u);
  EXPECT_EQ(outs[0].seq_index, 0);
  EXPECT_TRUE(outs[0].finished);
  EXPECT_TRUE(outs[0].request_finished);
  EXPECT_EQ(outs[0].finish_reason, FinishReason::kAbort);
  EXPECT_FALSE(engine.has_unfinished_requests());
  EXPECT_EQ(engine.stats().num_free_blocks, total);
}

TEST(FanOut, MaxTokensOneFinishesEveryChildAtTheFanOutStep) {
  EngineConfig cfg = make_config(64);
  Engine engine(cfg, std::make_shared<RecordingExecutor>(cfg));
  std::mt19937 rng(8);
  const std::vector<int32_t> prompt = random_prompt(rng, 21);
  SamplingParams p;
  p.n = 5;
  p.seed = 1;
  p.max_tokens = 1;
  p.ignore_eos = true;
  engine.add_request("one", prompt, p);
  auto outs = engine.step();
  ASSERT_EQ(outs.size(), 5u);
  for (int32_t c = 0; c < 5; ++c) {
    EXPECT_EQ(outs[c].seq_index, c);  // the fan-out step reports children in seq_index order
    EXPECT_TRUE(outs[c].finished);
    EXPECT_EQ(outs[c].request_finished, c == 4);
    EXPECT_EQ(outs[c].new_token_ids, expected_child(prompt, p, c));
  }
  EXPECT_FALSE(engine.has_unfinished_requests());
  EXPECT_EQ(engine.stats().num_free_blocks, engine.stats().num_total_blocks);
}

// 19 usable blocks of 16 tokens for 4 children that each grow to 140 tokens (9 blocks): children
// are preempted and recompute their prompt + own tokens; siblings keep running.
void preempt_children(PreemptionMode mode, bool prefix_caching) {
  EngineConfig cfg = make_config(20);
  cfg.cache.enable_prefix_caching = prefix_caching;
  cfg.cache.num_cpu_blocks = mode == PreemptionMode::kSwap ? 40 : 0;
  cfg.scheduler.preemption_mode = mode;
  auto exec = std::make_shared<RecordingExecutor>(cfg);
  Engine engine(cfg, exec);
  std::mt19937 rng(9);
  const std::vector<int32_t> prompt = random_prompt(rng, 40);
  SamplingParams p;
  p.n = 4;
  p.seed = 77;
  p.max_tokens = 100;
  p.ignore_eos = true;
  engine.add_request("big", prompt, p);
  Outcome run = drain(engine);
  expect_children(run, "big", prompt, p);
  EXPECT_GT(engine.stats().num_preemptions, 0);
}

TEST(FanOut, RecomputePreemptionOfChildrenKeepsTheirTokens) {
  preempt_children(PreemptionMode::kRecompute, true);
}
TEST(FanOut, RecomputePreemptionWithoutPrefixCaching) {
  preempt_children(PreemptionMode::kRecompute, false);
}
TEST(FanOut, SwapPreemptionOfChildrenKeepsTheirTokens) {
  preempt_children(PreemptionMode::kSwap, true);
}

TEST(FanOut, ChildrenCountAgainstMaxNumSeqs) {
  EngineConfig cfg = make_config(200);
  cfg.scheduler.max_num_seqs = 4;
  auto exec = std::make_shared<RecordingExecutor>(cfg);
  Engine engine(cfg, exec);
  std::mt19937 rng(10);
  SamplingParams three;
  three.n = 3;
  three.max_tokens = 8;
  three.ignore_eos = true;
  SamplingParams two = three;
  two.n = 2;
  const auto pa = random_prompt(rng, 20), pb = random_prompt(rng, 20);
  engine.add_request("a", pa, three);
  engine.add_request("b", pb, two);
  Outcome run;
  for (int i = 0; i < 1000 && engine.has_unfinished_requests(); ++i) {
    collect(engine.step(), run);
    EXPECT_LE(engine.stats().num_running, 4);
    // b (2 sequences) never runs beside a (3 sequences): 5 > max_num_seqs.
    if (run.tokens.count(key("b", 0))) EXPECT_EQ(run.request_finished.count("a"), 1u);
  }
  expect_children(run, "a", pa, three);
  expect_children(run, "b", pb, two);
  SamplingParams too_many;
  too_many.n = 5;
  EXPECT_THROW(engine.add_request("c", pa, too_many), InvalidRequestError);
}

TEST(FanOut, LogprobsAreTrackedPerChild) {
  EngineConfig cfg = make_config(64);
  Engine engine(cfg, std::make_shared<RecordingExecutor>(cfg));
  std::mt19937 rng(11);
  const std::vector<int32_t> prompt = random_prompt(rng, 12);
  SamplingParams p;
  p.n = 3;
  p.seed = 3;
  p.max_tokens = 6;
  p.ignore_eos = true;
  p.logprobs = 1;
  p.prompt_logprobs = 2;
  engine.add_request("lp", prompt, p);
  Outcome run = drain(engine);
  expect_children(run, "lp", prompt, p);
  for (int32_t c = 0; c < 3; ++c) {
    double sum = 0.0;
    for (int32_t t : expected_child(prompt, p, c)) sum += -static_cast<float>(t % 10) / 10.0f;
    EXPECT_NEAR(run.cumulative_logprob[key("lp", c)], sum, 1e-5) << c;
    EXPECT_NEAR(run.summed_logprobs[key("lp", c)], sum, 1e-5) << c;
  }
  EXPECT_EQ(run.prompt_logprobs["lp"], prompt.size() - 1);  // once, with sequence 0
}

TEST(FanOut, SingleSequenceRequestsAreUnchanged) {
  EngineConfig cfg = make_config(64);
  auto exec = std::make_shared<RecordingExecutor>(cfg);
  Engine engine(cfg, exec);
  std::mt19937 rng(12);
  const std::vector<int32_t> prompt = random_prompt(rng, 25);
  SamplingParams p;
  p.max_tokens = 15;
  engine.add_request("solo", prompt, p);
  Outcome run = drain(engine);
  EXPECT_EQ(run.tokens.size(), 1u);
  EXPECT_EQ(run.tokens[key("solo", 0)],
            FakeExecutor::reference_generate(prompt, 15, kVocab, {kEos}));
  EXPECT_EQ(run.request_finished["solo"], 1);
  EXPECT_EQ(exec->num_copies, 0);
  for (const BatchPlan& plan : exec->plans) EXPECT_LE(plan.num_samples, plan.num_seqs);
}

// Many requests with n in 1..4, seeded or not, chunked prefill, a shared system prompt, a small
// pool: every child still gives its reference tokens and every block comes back.
TEST(FanOut, MixedWorkloadUnderPressure) {
  for (PreemptionMode mode : {PreemptionMode::kRecompute, PreemptionMode::kSwap}) {
    EngineConfig cfg = make_config(40, /*budget=*/96);
    cfg.cache.num_cpu_blocks = mode == PreemptionMode::kSwap ? 80 : 0;
    cfg.scheduler.preemption_mode = mode;
    cfg.scheduler.max_num_seqs = 12;
    Engine engine(cfg, std::make_shared<RecordingExecutor>(cfg));
    std::mt19937 rng(13);
    const std::vector<int32_t> system = random_prompt(rng, 20);
    std::uniform_int_distribution<int> len(3, 70), out(1, 60), n(1, 4), coin(0, 1);
    struct Req {
      std::string id;
      std::vector<int32_t> prompt;
      SamplingParams params;
    };
    std::vector<Req> reqs;
    for (int i = 0; i < 24; ++i) {
      Req r;
      r.id = "m" + std::to_string(i);
      r.prompt = coin(rng) ? system : std::vector<int32_t>{};
      const auto tail = random_prompt(rng, len(rng));
      r.prompt.insert(r.prompt.end(), tail.begin(), tail.end());
      r.params.n = n(rng);
      r.params.max_tokens = out(rng);
      r.params.seed = coin(rng) ? 1000 * i : -1;
      engine.add_request(r.id, r.prompt, r.params);
      reqs.push_back(std::move(r));
    }
    Outcome run = drain(engine);
    for (const Req& r : reqs) expect_children(run, r.id, r.prompt, r.params);
    EXPECT_GT(engine.stats().num_preemptions, 0);
  }
}

// Fails chosen steps; the others run the fake model.
class FailingExecutor : public Executor {
 public:
  FailingExecutor(const EngineConfig& c, std::set<int64_t> fail_steps)
      : fake_({c.cache.num_gpu_blocks, 0, c.cache.block_size, kVocab, true}),
        fail_steps_(std::move(fail_steps)) {}
  StepResult execute(const BatchPlan& plan) override {
    if (fail_steps_.count(plan.step_id)) throw std::runtime_error("boom");
    return fake_.execute(plan);
  }
  FakeExecutor fake_;
  std::set<int64_t> fail_steps_;
};

TEST(FanOut, ExecutorFailureFinishesTheStepsSequencesOnce) {
  EngineConfig cfg = make_config(64);
  for (int64_t fail_step : {0, 2}) {  // the fan-out step itself, or a decode step after it
    Engine engine(cfg, std::make_shared<FailingExecutor>(cfg, std::set<int64_t>{fail_step}));
    std::mt19937 rng(14);
    SamplingParams p;
    p.n = 3;
    p.max_tokens = 20;
    p.ignore_eos = true;
    engine.add_request("f", random_prompt(rng, 21), p);
    Outcome run = drain(engine);
    const int32_t expected_sequences = fail_step == 0 ? 1 : 3;
    EXPECT_EQ(static_cast<int32_t>(run.reasons.size()), expected_sequences) << fail_step;
    // A failed step of one sequence fails it; a failed step of several runs each again on its
    // own (with new step ids, which this executor does not fail), so the children finish.
    const FinishReason expected = fail_step == 0 ? FinishReason::kError : FinishReason::kLength;
    for (const auto& [k, reason] : run.reasons) EXPECT_EQ(reason, expected);
    EXPECT_EQ(run.request_finished["f"], 1);
  }
}
