// LoRA in the engine: adapters per request, the prefix cache keyed by adapter, max_loras.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <set>

#include "fastllm/engine.h"
#include "fastllm/fake_executor.h"

using namespace fastllm;

namespace {

constexpr int32_t kVocab = 1000;

// Runs the fake model and records the largest number of distinct adapters in one step.
class AdapterCountingExecutor : public Executor {
 public:
  explicit AdapterCountingExecutor(int32_t blocks) : fake_({blocks, 0, 16, kVocab, true, 0}) {}
  StepResult execute(const BatchPlan& plan) override {
    std::set<int32_t> ids;
    for (int32_t id : plan.lora_ids) {
      if (id != 0) ids.insert(id);
    }
    max_adapters = std::max(max_adapters, static_cast<int32_t>(ids.size()));
    return fake_.execute(plan);
  }
  FakeExecutor fake_;
  int32_t max_adapters = 0;
};

EngineConfig config(int32_t max_loras) {
  EngineConfig c;
  c.cache.num_gpu_blocks = 300;
  c.cache.block_size = 16;
  c.scheduler.max_num_seqs = 64;
  c.scheduler.max_model_len = 256;
  c.scheduler.max_loras = max_loras;
  c.eos_token_ids = {};
  c.vocab_size = kVocab;
  return c;
}

struct Result {
  std::map<std::string, std::vector<int32_t>> tokens;
  std::map<std::string, int32_t> cached;
};

Result drain(Engine& engine) {
  Result r;
  while (engine.has_unfinished_requests()) {
    for (RequestOutput& o : engine.step()) {
      auto& t = r.tokens[o.request_id];
      t.insert(t.end(), o.new_token_ids.begin(), o.new_token_ids.end());
      if (o.finished) r.cached[o.request_id] = o.num_cached_tokens;
    }
  }
  return r;
}

}  // namespace

TEST(Lora, EachRequestRunsItsAdapterAndAdaptersNeverShareKV) {
  auto exec = std::make_shared<AdapterCountingExecutor>(300);
  Engine engine(config(0), exec);
  std::vector<int32_t> prompt;
  for (int32_t i = 0; i < 40; ++i) prompt.push_back(100 + i);  // two and a half blocks
  SamplingParams p;
  p.max_tokens = 12;
  for (int32_t lora : {0, 1, 2, 3})
    engine.add_request("a" + std::to_string(lora), prompt, p, 0, lora);
  Result first = drain(engine);
  for (int32_t lora : {0, 1, 2, 3}) {
    const auto expected = FakeExecutor::reference_generate(prompt, 12, kVocab, {}, 0, -1, 0, lora);
    EXPECT_EQ(first.tokens.at("a" + std::to_string(lora)), expected) << lora;
  }
  EXPECT_NE(first.tokens.at("a1"), first.tokens.at("a2"));
  // Again under adapter 1: its own cached prefix; adapter 4 (new): nothing cached for it. The
  // fake model throws if a request reads KV written under another adapter.
  engine.add_request("b1", prompt, p, 0, 1);
  engine.add_request("b4", prompt, p, 0, 4);
  Result second = drain(engine);
  EXPECT_EQ(second.cached.at("b1"), 39);
  EXPECT_EQ(second.cached.at("b4"), 0);
  EXPECT_EQ(second.tokens.at("b1"), first.tokens.at("a1"));
  EXPECT_EQ(second.tokens.at("b4"),
            FakeExecutor::reference_generate(prompt, 12, kVocab, {}, 0, -1, 0, 4));
  EXPECT_THROW(engine.add_request("bad", prompt, p, 0, -1), InvalidRequestError);
}

TEST(Lora, MaxLorasBoundsTheAdaptersOfAStepWithoutBlockingOthers) {
  auto exec = std::make_shared<AdapterCountingExecutor>(300);
  Engine engine(config(2), exec);
  SamplingParams p;
  p.max_tokens = 20;
  std::map<std::string, std::pair<std::vector<int32_t>, int32_t>> jobs;
  for (int32_t i = 0; i < 16; ++i) {
    const std::string id = "r" + std::to_string(i);
    std::vector<int32_t> prompt = {10 + i, 20 + i, 30 + i};
    const int32_t lora = i % 5;  // adapters 1..4 and the base
    jobs[id] = {prompt, lora};
    engine.add_request(id, prompt, p, 0, lora);
  }
  Result r = drain(engine);
  EXPECT_EQ(exec->max_adapters, 2);
  for (const auto& [id, job] : jobs) {
    EXPECT_EQ(r.tokens.at(id),
              FakeExecutor::reference_generate(job.first, 20, kVocab, {}, 0, -1, 0, job.second))
        << id;
  }
  EngineStats s = engine.stats();
  EXPECT_EQ(s.num_free_blocks, s.num_total_blocks);
}
