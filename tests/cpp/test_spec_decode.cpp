// Speculative decoding in the engine (spec_decode.h): proposals, verification, rollback.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <random>

#include "fastllm/engine.h"
#include "fastllm/fake_executor.h"

using namespace fastllm;

namespace {

constexpr int32_t kVocab = 1000;
constexpr int32_t kEos = 7;

EngineConfig make_config(int32_t num_blocks, int32_t budget = 512) {
  EngineConfig c;
  c.cache.num_gpu_blocks = num_blocks;
  c.cache.block_size = 16;
  c.scheduler.max_num_batched_tokens = budget;
  c.scheduler.max_num_seqs = 64;
  c.scheduler.max_model_len = 256;
  c.eos_token_ids = {kEos};
  c.vocab_size = kVocab;
  return c;
}

// The draft: the fake model itself (disagree_every 0) or one that is wrong now and then.
std::shared_ptr<FakeExecutor> draft_model(EngineConfig& c, int32_t k, int32_t blocks,
                                          int32_t disagree_every) {
  c.speculative.method = SpecMethod::kDraftModel;
  c.speculative.num_speculative_tokens = k;
  c.speculative.draft_cache.num_gpu_blocks = blocks;
  c.speculative.draft_cache.block_size = c.cache.block_size;
  return std::make_shared<FakeExecutor>(
      FakeExecutorConfig{blocks, 0, c.cache.block_size, kVocab, true, disagree_every});
}

struct SpecRun {
  std::map<std::string, std::vector<int32_t>> tokens;
  std::map<std::string, std::vector<float>> logprobs;
  std::map<std::string, FinishReason> reasons;
  EngineStats stats;
  int64_t target_steps = 0;
};

struct Job {
  std::string id;
  std::vector<int32_t> prompt;
  SamplingParams params;
};

std::vector<Job> jobs(int n, uint32_t seed, bool repetitive = false) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> tok(10, kVocab - 1);
  std::uniform_int_distribution<int> len(5, 90), out(1, 60);
  std::vector<Job> js;
  for (int i = 0; i < n; ++i) {
    Job j;
    j.id = "r" + std::to_string(i);
    const int l = len(rng);
    for (int t = 0; t < l; ++t) j.prompt.push_back(tok(rng));
    if (repetitive) {
      // A phrase repeated: the n-gram lookup finds its continuation.
      const std::vector<int32_t> phrase(j.prompt.begin(), j.prompt.begin() + std::min(l, 6));
      for (int rep = 0; rep < 3; ++rep)
        j.prompt.insert(j.prompt.end(), phrase.begin(), phrase.end());
    }
    j.params.max_tokens = out(rng);
    js.push_back(j);
  }
  return js;
}

SpecRun run(const EngineConfig& c, const std::vector<Job>& js, std::shared_ptr<Executor> draft) {
  auto target = std::make_shared<FakeExecutor>(FakeExecutorConfig{
      c.cache.num_gpu_blocks, c.cache.num_cpu_blocks, c.cache.block_size, kVocab, true, 0});
  Engine engine(c, target, std::move(draft));
  for (const Job& j : js) engine.add_request(j.id, j.prompt, j.params);
  SpecRun r;
  for (int i = 0; i < 100000 && engine.has_unfinished_requests(); ++i) {
    for (RequestOutput& o : engine.step()) {
      const std::string key = o.request_id + "/" + std::to_string(o.seq_index);
      auto& t = r.tokens[key];
      t.insert(t.end(), o.new_token_ids.begin(), o.new_token_ids.end());
      auto& lp = r.logprobs[key];
      lp.insert(lp.end(), o.new_logprobs.begin(), o.new_logprobs.end());
      if (o.finished) {
        EXPECT_EQ(r.reasons.count(key), 0u) << "finished twice: " << key;
        r.reasons[key] = o.finish_reason;
      }
    }
  }
  EXPECT_FALSE(engine.has_unfinished_requests());
  r.stats = engine.stats();
  r.target_steps = target->num_steps();
  EXPECT_EQ(r.stats.num_free_blocks, r.stats.num_total_blocks) << "blocks leaked";
  return r;
}

void expect_reference(const std::vector<Job>& js, const SpecRun& r) {
  for (const Job& j : js) {
    EXPECT_EQ(r.tokens.at(j.id + "/0"),
              FakeExecutor::reference_generate(j.prompt, j.params.max_tokens, kVocab, {kEos}))
        << j.id;
  }
}

}  // namespace

TEST(NgramLookup, LongestSuffixFirstMostRecentMatch) {
  std::vector<int32_t> out;
  // Suffix [1 2 3] occurs at 0 (followed by 9) and at 4 (followed by 5 6): the later one wins.
  const std::vector<int32_t> t = {1, 2, 3, 9, 1, 2, 3, 5, 6, 8, 1, 2, 3};
  EXPECT_EQ(ngram_lookup(t.data(), 13, 1, 3, 4, out), 4);
  EXPECT_EQ(out, (std::vector<int32_t>{5, 6, 8, 1}));
  // k caps the drafts; a match near the end gives fewer.
  EXPECT_EQ(ngram_lookup(t.data(), 13, 1, 3, 2, out), 2);
  EXPECT_EQ(out, (std::vector<int32_t>{5, 6}));
  const std::vector<int32_t> near = {4, 5, 6, 4, 5};
  EXPECT_EQ(ngram_lookup(near.data(), 5, 1, 2, 8, out), 3);
  EXPECT_EQ(out, (std::vector<int32_t>{6, 4, 5}));
  // The longest suffix that occurs decides: [8 3] never occurred, [3] did (followed by 7).
  const std::vector<int32_t> shorter = {3, 7, 2, 8, 3};
  EXPECT_EQ(ngram_lookup(shorter.data(), 5, 1, 2, 3, out), 3);
  EXPECT_EQ(out, (std::vector<int32_t>{7, 2, 8}));
  // min_n above every matching length: nothing.
  EXPECT_EQ(ngram_lookup(shorter.data(), 5, 2, 3, 3, out), 0);
  EXPECT_TRUE(out.empty());
}

TEST(SpecDecode, ADraftThatIsAlwaysRightIsAlwaysAccepted) {
  const auto js = jobs(12, 1);
  const SpecRun plain = run(make_config(300), js, nullptr);
  EngineConfig c = make_config(300);
  c.speculative.adaptive = false;
  auto draft = draft_model(c, 4, 300, 0);
  const SpecRun spec = run(c, js, draft);
  EXPECT_EQ(spec.tokens, plain.tokens);
  EXPECT_EQ(spec.reasons, plain.reasons);
  expect_reference(js, spec);
  EXPECT_GT(spec.stats.spec_draft_tokens, 0);
  EXPECT_EQ(spec.stats.spec_accepted_tokens, spec.stats.spec_draft_tokens);
  // Up to five tokens per target step instead of one.
  EXPECT_LT(spec.target_steps * 2, plain.target_steps);
  EXPECT_EQ(spec.stats.num_generated_tokens, plain.stats.num_generated_tokens);
}

TEST(SpecDecode, WrongDraftsNeverChangeTheTokensForAnyK) {
  const auto js = jobs(10, 2);
  const SpecRun plain = run(make_config(300), js, nullptr);
  for (int32_t k : {1, 2, 3, 5, 8}) {
    for (bool adaptive : {false, true}) {
      EngineConfig c = make_config(300);
      c.speculative.adaptive = adaptive;
      auto draft = draft_model(c, k, 300, 3);
      const SpecRun spec = run(c, js, draft);
      EXPECT_EQ(spec.tokens, plain.tokens) << "k=" << k << " adaptive=" << adaptive;
      if (!adaptive) {  // the planner may decline drafts on a noisy timing: count only fixed k
        EXPECT_GT(spec.stats.spec_accepted_tokens, 0);
        EXPECT_LT(spec.stats.spec_accepted_tokens, spec.stats.spec_draft_tokens);
      }
    }
  }
}

TEST(SpecDecode, PreemptionChunkingAndPrefixHitsKeepTheTokens) {
  auto js = jobs(16, 3);
  // A shared prefix for prefix-cache hits.
  for (auto& j : js)
    j.prompt.insert(j.prompt.begin(),
                    {11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28});
  const SpecRun plain = run(make_config(600), js, nullptr);
  for (PreemptionMode mode : {PreemptionMode::kRecompute, PreemptionMode::kSwap}) {
    // 19 usable blocks and a 24-token budget: preemption, chunked prefill, drafts cut short.
    EngineConfig c = make_config(20, 24);
    c.speculative.adaptive = false;  // the planner's choices follow measured times: not counted
    c.scheduler.preemption_mode = mode;
    c.cache.num_cpu_blocks = mode == PreemptionMode::kSwap ? 64 : 0;
    auto draft = draft_model(c, 6, 24, 5);
    const SpecRun spec = run(c, js, draft);
    EXPECT_EQ(spec.tokens, plain.tokens);
    EXPECT_GT(spec.stats.num_preemptions, 0);
    EXPECT_GT(spec.stats.prefix_hits, 0);
    EXPECT_GT(spec.stats.spec_accepted_tokens, 0);
  }
}

TEST(SpecDecode, NgramLookupOnRepetitiveText) {
  const auto js = jobs(10, 4, /*repetitive=*/true);
  const SpecRun plain = run(make_config(300), js, nullptr);
  EngineConfig c = make_config(300);
  c.speculative.method = SpecMethod::kNgram;
  c.speculative.num_speculative_tokens = 3;
  c.speculative.adaptive = false;
  const SpecRun spec = run(c, js, nullptr);
  EXPECT_EQ(spec.tokens, plain.tokens);
  EXPECT_GT(spec.stats.spec_draft_tokens, 0);
  EXPECT_GT(spec.stats.spec_verify_steps, 0);
}

TEST(SpecDecode, StopTokensMaxTokensLogprobsAndParallelSampling) {
  auto js = jobs(8, 5);
  for (size_t i = 0; i < js.size(); ++i) {
    SamplingParams& p = js[i].params;
    p.logprobs = 1;
    if (i % 2 == 0) p.stop_token_ids = {static_cast<int32_t>(100 + i), 500, 501, 502, 503};
    if (i % 3 == 0) {
      p.n = 3;
      p.seed = 40 + static_cast<int64_t>(i);
    }
    if (i == 1) p.min_tokens = std::min(10, p.max_tokens);
  }
  const SpecRun plain = run(make_config(400), js, nullptr);
  EngineConfig c = make_config(400);
  c.speculative.adaptive = false;
  auto draft = draft_model(c, 5, 400, 0);
  const SpecRun spec = run(c, js, draft);
  EXPECT_EQ(spec.tokens, plain.tokens);
  EXPECT_EQ(spec.reasons, plain.reasons);
  EXPECT_EQ(spec.logprobs, plain.logprobs);
  for (const auto& [key, tokens] : spec.tokens) {
    ASSERT_EQ(spec.logprobs.at(key).size(), tokens.size()) << key;
    for (size_t t = 0; t < tokens.size(); ++t)
      EXPECT_FLOAT_EQ(spec.logprobs.at(key)[t], -static_cast<float>(tokens[t] % 10) / 10.0f);
  }
  // The draft proposes the unseeded argmax: seeded children reject most of it.
  EXPECT_GT(spec.stats.spec_accepted_tokens, 0);
  EXPECT_LT(spec.stats.spec_accepted_tokens, spec.stats.spec_draft_tokens);
}

TEST(SpecDecode, DisabledForLargeBatches) {
  const auto js = jobs(6, 6);
  EngineConfig c = make_config(300);
  c.speculative.disable_by_batch_size = 1;  // every step runs at least one sequence
  auto draft = draft_model(c, 4, 300, 0);
  const SpecRun spec = run(c, js, draft);
  expect_reference(js, spec);
  EXPECT_EQ(spec.stats.spec_draft_tokens, 0);
}

TEST(SpecDecode, BadConfigurationsAreConfigErrors) {
  auto fake = [] { return std::make_shared<FakeExecutor>(FakeExecutorConfig{50, 0, 16}); };
  EngineConfig c = make_config(50);
  c.speculative.method = SpecMethod::kNgram;
  c.speculative.num_speculative_tokens = 0;
  EXPECT_THROW(Engine(c, fake()), ConfigError);
  c.speculative.num_speculative_tokens = 3;
  c.speculative.ngram_min = 4;
  c.speculative.ngram_max = 2;
  EXPECT_THROW(Engine(c, fake()), ConfigError);
  EngineConfig d = make_config(50);
  auto draft = draft_model(d, 3, 50, 0);
  EXPECT_THROW(Engine(d, fake()), ConfigError);  // the draft model's executor is missing
  d.speculative.draft_cache.block_size = 8;
  EXPECT_THROW(Engine(d, fake(), draft), ConfigError);
  EXPECT_THROW(Engine(make_config(50), fake(), draft), ConfigError);  // a draft, no method
}

TEST(SpecDecode, NoDraftsPastTheSpeculativeLengthLimit) {
  auto js = jobs(6, 7);
  for (auto& j : js) j.prompt.resize(30, 11);  // every prompt 30 tokens
  EngineConfig c = make_config(300);
  c.speculative.max_model_len = 30;
  auto draft = draft_model(c, 4, 300, 0);
  const SpecRun spec = run(c, js, draft);
  expect_reference(js, spec);
  EXPECT_EQ(spec.stats.spec_draft_tokens, 0);
  c.speculative.max_model_len = 40;  // room for drafts up to 40 tokens
  auto draft2 = draft_model(c, 4, 300, 0);
  const SpecRun some = run(c, js, draft2);
  expect_reference(js, some);
  EXPECT_GT(some.stats.spec_draft_tokens, 0);
}

TEST(DraftPlanner, TakesTheRowsThatPayOnTheMeasuredCostCurve) {
  // A CPU-like curve: rows up to 4 cost little more than one, each row after that 1.2 ms.
  DraftPlanner planner;
  for (int32_t r = 1; r <= 16; ++r) {
    const double ms = 5.0 + (r <= 4 ? 0.3 * (r - 1) : 0.9 + 1.2 * (r - 4));
    planner.observe_step(r, ms / 1000.0);
  }
  // One stream at 80 % acceptance: three drafts fill the cheap rows; a fourth costs more than it
  // brings (3.36 tokens in 7.1 ms against 2.95 in 5.9 ms).
  EXPECT_EQ(planner.plan(1, {0.8}, {8}), (std::vector<int32_t>{3}));
  // Eight streams already past the cheap rows: no draft pays at 60 %.
  EXPECT_EQ(planner.plan(8, std::vector<double>(8, 0.6), std::vector<int32_t>(8, 4)),
            std::vector<int32_t>(8, 0));
  // Drafts go to the sequences that accept more, and never past a cap.
  EXPECT_EQ(planner.plan(2, {0.95, 0.1}, {1, 4}), (std::vector<int32_t>{1, 0}));
  // The draft model's own time counts against deeper drafts.
  planner.observe_draft_step(0.004);
  EXPECT_EQ(planner.plan(1, {0.8}, {8}), (std::vector<int32_t>{0}));
}

TEST(DraftPlanner, ExploresRowCountsItHasNotMeasured) {
  DraftPlanner fresh;
  EXPECT_EQ(fresh.plan(1, {0.5}, {4}), (std::vector<int32_t>{2}));
  DraftPlanner one;
  one.observe_step(1, 0.005);
  // Beyond the last measurement the cost is extrapolated optimistically: drafts get tried.
  EXPECT_GT(one.plan(1, {0.5}, {4})[0], 0);
  EXPECT_NEAR(one.step_seconds(3), 0.005 * 1.2, 1e-12);
  one.observe_step(3, 0.009);
  EXPECT_NEAR(one.step_seconds(2), 0.007, 1e-12);  // between measurements: interpolated
  // A row count once measured as expensive is tried again now and then.
  DraftPlanner curve;
  for (int32_t r = 1; r <= 8; ++r) curve.observe_step(r, r <= 3 ? 0.005 : 0.005 * r);
  int explored = 0;
  for (int64_t i = 0; i < 4 * DraftPlanner::kExploreEvery; ++i) {
    const int32_t drafts = curve.plan(1, {0.8}, {6})[0];
    EXPECT_TRUE(drafts == 2 || drafts == 3) << drafts;
    explored += drafts == 3;
  }
  EXPECT_EQ(explored, 4);
}
