// CpuExecutor on a tiny random Llama (one layer, Q8_0 linears): block ops move the KV cache the
// attention reads, the logits hook runs only for watched requests, and bad sizes are rejected.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "fastllm/models/cpu_executor.h"

using namespace fastllm;
using namespace fastllm::models;

namespace {

constexpr int64_t kHidden = 64, kHeadDim = 64, kInter = 64, kVocab = 16, kMaxPos = 64;
constexpr int32_t kBlockSize = 8;

// Q8_0 rows: per 32 values an fp16 scale (2^-5) and 32 random int8 values.
std::vector<uint8_t> q8_rows(int64_t n, int64_t k, std::mt19937& rng) {
  std::vector<uint8_t> rows(static_cast<size_t>(n * k / 32 * 34));
  std::uniform_int_distribution<int> value(-127, 127);
  for (size_t b = 0; b < rows.size(); b += 34) {
    rows[b] = 0x00;
    rows[b + 1] = 0x28;  // fp16 0x2800 = 2^-5, little-endian
    for (size_t i = 0; i < 32; ++i) rows[b + 2 + i] = static_cast<uint8_t>(value(rng));
  }
  return rows;
}

// A one-layer model whose arrays live as long as the fixture.
struct TinyModel {
  std::mt19937 rng{1234};
  std::vector<float> ones = std::vector<float>(kHidden, 1.0f);
  std::vector<float> rope = std::vector<float>(kMaxPos * kHeadDim);
  std::vector<float> embed = std::vector<float>(kVocab * kHidden);
  std::vector<uint8_t> qkv = q8_rows(3 * kHeadDim, kHidden, rng);
  std::vector<uint8_t> o_proj = q8_rows(kHidden, kHeadDim, rng);
  std::vector<uint8_t> gate_up = q8_rows(2 * kInter, kHidden, rng);
  std::vector<uint8_t> down = q8_rows(kHidden, kInter, rng);
  std::vector<uint8_t> lm_head = q8_rows(kVocab, kHidden, rng);

  TinyModel() {
    const int64_t half = kHeadDim / 2;
    for (int64_t p = 0; p < kMaxPos; ++p) {
      for (int64_t i = 0; i < half; ++i) {
        const double angle = p * std::pow(10000.0, -2.0 * i / kHeadDim);
        rope[p * kHeadDim + i] = static_cast<float>(std::cos(angle));
        rope[p * kHeadDim + half + i] = static_cast<float>(std::sin(angle));
      }
    }
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& x : embed) x = normal(rng);
  }

  static QuantLinearRef linear(const std::vector<uint8_t>& rows, int64_t n, int64_t k) {
    QuantLinearRef ref;
    ref.weight = rows.data();
    ref.n = n;
    ref.k = k;
    ref.type = QuantType::kQ8_0;
    return ref;
  }

  CpuModelWeights weights() const {
    CpuModelWeights w;
    w.shape.hidden = kHidden;
    w.shape.num_heads = 1;
    w.shape.num_kv_heads = 1;
    w.shape.head_dim = kHeadDim;
    w.shape.intermediate = kInter;
    w.shape.final_norm = ones.data();
    w.shape.rope_cache = rope.data();
    w.shape.rotary_dim = kHeadDim;
    w.shape.max_position = kMaxPos;
    w.shape.attn_scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
    DecoderLayerRef layer;
    layer.input_norm = ones.data();
    layer.post_attention_norm = ones.data();
    layer.qkv = linear(qkv, 3 * kHeadDim, kHidden);
    layer.o_proj = linear(o_proj, kHidden, kHeadDim);
    layer.gate_up = linear(gate_up, 2 * kInter, kHidden);
    layer.down = linear(down, kHidden, kInter);
    w.layers.push_back(layer);
    w.embed_table = embed.data();
    w.vocab = kVocab;
    w.lm_head = linear(lm_head, kVocab, kHidden);
    return w;
  }
};

struct Seq {
  std::string request_id;
  std::vector<int32_t> tokens;  // this step's tokens
  int32_t start = 0;            // position of the first
  int32_t block = 0;            // the one block of the sequence (positions < kBlockSize)
};

// A greedy step over sequences that each fit in one block, sampling every sequence's last row
// with logprobs.
BatchPlan plan_of(const std::vector<Seq>& seqs) {
  BatchPlan p;
  p.block_size = kBlockSize;
  p.num_seqs = static_cast<int32_t>(seqs.size());
  p.max_blocks_per_seq = 1;
  p.query_start_loc.push_back(0);
  for (size_t s = 0; s < seqs.size(); ++s) {
    const Seq& q = seqs[s];
    for (size_t i = 0; i < q.tokens.size(); ++i) {
      const int32_t pos = q.start + static_cast<int32_t>(i);
      p.token_ids.push_back(q.tokens[i]);
      p.positions.push_back(pos);
      p.slot_mapping.push_back(static_cast<int64_t>(q.block) * kBlockSize + pos);
    }
    p.num_tokens += static_cast<int32_t>(q.tokens.size());
    p.query_start_loc.push_back(p.num_tokens);
    const int32_t context = q.start + static_cast<int32_t>(q.tokens.size());
    p.context_lens.push_back(context);
    p.max_context_len = std::max(p.max_context_len, context);
    p.max_query_len = std::max(p.max_query_len, static_cast<int32_t>(q.tokens.size()));
    p.num_computed_tokens.push_back(q.start);
    p.block_tables.push_back(q.block);
    p.request_ids.push_back(q.request_id);
    p.num_prompt_tokens.push_back(context);
    p.prompt_logprobs.push_back(-1);
    p.prompt_next_token.push_back(-1);
    p.sample_token_indices.push_back(p.num_tokens - 1);
    p.sample_seq_indices.push_back(static_cast<int32_t>(s));
    p.temperature.push_back(0.0f);
    p.top_p.push_back(1.0f);
    p.top_k.push_back(0);
    p.min_p.push_back(0.0f);
    p.presence_penalty.push_back(0.0f);
    p.frequency_penalty.push_back(0.0f);
    p.repetition_penalty.push_back(1.0f);
    p.seeds.push_back(-1);
    p.output_positions.push_back(0);
    p.num_logprobs.push_back(1);
    p.suppress_stop_tokens.push_back(0);
  }
  p.num_samples = p.num_seqs;
  return p;
}

CpuExecutorConfig config() {
  CpuExecutorConfig c;
  c.block_size = kBlockSize;
  c.num_blocks = 4;
  c.num_swap_blocks = 2;
  c.cache_dtype = DType::kFloat32;
  return c;
}

const std::vector<int32_t> kPrompt = {3, 1, 4};

}  // namespace

TEST(CpuExecutor, DecodeReadsTheCacheThroughBlockOps) {
  TinyModel model;
  // Reference: prefill into block 1, decode in block 1.
  CpuExecutor reference(model.weights(), config());
  reference.execute(plan_of({{"a", kPrompt, 0, 1}}));
  const StepResult expected = reference.execute(plan_of({{"a", {9}, 3, 1}}));
  ASSERT_EQ(expected.sampled_token_ids.size(), 1u);
  ASSERT_EQ(expected.sampled_logprobs.size(), 1u);
  ASSERT_EQ(expected.num_top_logprobs, 1);

  // Swap block 1 out to host block 0 and back in to block 2, then decode from block 2.
  CpuExecutor swapped(model.weights(), config());
  swapped.execute(plan_of({{"a", kPrompt, 0, 1}}));
  BatchPlan out;
  out.block_ops.swap_out = {1, 0};
  swapped.execute(out);
  BatchPlan in = plan_of({{"a", {9}, 3, 2}});
  in.block_ops.swap_in = {0, 2};
  const StepResult after_swap = swapped.execute(in);
  EXPECT_EQ(after_swap.sampled_token_ids, expected.sampled_token_ids);
  EXPECT_EQ(after_swap.sampled_logprobs, expected.sampled_logprobs);

  // Copy block 2 (the swapped-in prefix plus the decoded token) onto block 3: the same decode
  // step again from block 3 gives the same token; from the untouched block 0 it does not.
  BatchPlan copied = plan_of({{"a", {9}, 3, 3}});
  copied.block_ops.copy = {2, 3};
  const StepResult after_copy = swapped.execute(copied);
  EXPECT_EQ(after_copy.sampled_logprobs, expected.sampled_logprobs);
  const StepResult empty_cache = swapped.execute(plan_of({{"a", {9}, 3, 0}}));
  EXPECT_NE(empty_cache.sampled_logprobs, expected.sampled_logprobs);
}

namespace {

// Allows only token kForced in the rows of watched requests; records what it saw.
class ForcingHook : public LogitsHook {
 public:
  static constexpr int32_t kForced = 5;
  int applies = 0;
  std::vector<int32_t> advanced;

  void apply(const BatchPlan& plan, float* logits, int64_t vocab) override {
    ++applies;
    for (int32_t r = 0; r < plan.num_samples; ++r) {
      if (plan.request_ids[plan.sample_seq_indices[r]] != "guided") continue;
      for (int64_t t = 0; t < vocab; ++t) {
        if (t != kForced) logits[r * vocab + t] = -INFINITY;
      }
    }
  }
  void advance(const BatchPlan& plan, const int32_t* tokens) override {
    advanced.assign(tokens, tokens + plan.num_samples);
  }
};

}  // namespace

TEST(CpuExecutor, LogitsHookRunsOnlyForWatchedRequests) {
  TinyModel model;
  CpuExecutor executor(model.weights(), config());
  auto hook = std::make_shared<ForcingHook>();
  executor.set_logits_hook(hook);
  EXPECT_THROW(executor.set_logits_hook(hook), std::logic_error);
  hook->watch("guided");

  const BatchPlan both = plan_of({{"free", kPrompt, 0, 1}, {"guided", kPrompt, 0, 2}});
  const StepResult r = executor.execute(both);
  EXPECT_EQ(hook->applies, 1);
  ASSERT_EQ(r.sampled_token_ids.size(), 2u);
  EXPECT_EQ(r.sampled_token_ids[1], ForcingHook::kForced);
  EXPECT_EQ(hook->advanced, r.sampled_token_ids);

  // A step without watched rows never calls the hook; neither does one after unwatch.
  executor.execute(plan_of({{"free", {2}, 3, 1}}));
  hook->unwatch("guided");
  executor.execute(plan_of({{"guided", {2}, 3, 2}}));
  EXPECT_EQ(hook->applies, 1);
}

TEST(CpuExecutor, RejectsInconsistentSizes) {
  TinyModel model;
  CpuModelWeights weights = model.weights();
  weights.lm_head.n = kVocab + 1;
  EXPECT_THROW(CpuExecutor(weights, config()), kernels::KernelArgumentError);
  CpuExecutorConfig bad = config();
  bad.cache_dtype = DType::kBFloat16;
  EXPECT_THROW(CpuExecutor(model.weights(), bad), kernels::KernelArgumentError);
  bad = config();
  bad.block_size = 4;  // not a paged-attention block size
  EXPECT_THROW(CpuExecutor(model.weights(), bad), kernels::KernelArgumentError);
  CpuExecutor executor(model.weights(), config());
  BatchPlan plan = plan_of({{"a", {int32_t{kVocab}}, 0, 1}});
  EXPECT_THROW(executor.execute(plan), kernels::KernelArgumentError);
}
