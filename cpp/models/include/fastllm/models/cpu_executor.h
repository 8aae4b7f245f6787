// CpuExecutor: the engine's Executor for a Llama-family model with GGUF-encoded weights on the
// CPU. A whole step runs in C++, without Python or the GIL:
//
//   apply block ops               swap out, swap in, copy: on the KV caches it owns
//   hidden = embed(token_ids)     quantized (Q8_0/Q4_0/Q4_1 rows) or float32 token table
//   decoder.forward(hidden)       CpuDecoder (llama_decoder.h), in place
//   prompt logprobs               rows of prompts that asked for them, kPromptLogprobChunk at a
//   time logits = hidden[sample rows] W_out^T hook.apply(logits)            only when a sample
//   row's request is watched (logits_hook.h) sample(logits)                the plan's per-row
//   parameters, as they are hook.advance(tokens)
//
// The sampling inputs are the plan's arrays read in place: the penalty lists, the prompt-logprob
// targets and the step's seed of unseeded rows come in the kernel's form, as the torch executor
// reads them too, so both executors give the same tokens and logprobs.
//
// Memory: the weights are borrowed (the caller keeps them alive for the executor's lifetime).
// The KV caches are owned: anonymous private mappings, so a page becomes resident when the cache
// first writes it, 4 KiB at a time (no huge pages: the cache grows a block at a time).
//
// Threads: construct and set_logits_hook on any thread; execute() on the engine thread only.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "fastllm/executor.h"
#include "fastllm/kernels/sampling.h"
#include "fastllm/models/llama_decoder.h"
#include "fastllm/models/logits_hook.h"

namespace fastllm::models {

// A model's weights as CpuExecutor reads them (pointers borrowed from the caller).
struct CpuModelWeights {
  // Model sizes and the final norm / RoPE table; block_size, num_blocks and cache_dtype are
  // the executor's (CpuExecutorConfig) and ignored here.
  DecoderShape shape;
  // One per layer; key_cache / value_cache are the executor's and ignored here.
  std::vector<DecoderLayerRef> layers;
  const void* embed_table = nullptr;  // [vocab] rows: quantized blocks, or float32 [vocab][hidden]
  bool embed_quantized = false;       // embed_type applies (Q8_0/Q4_0/Q4_1 or their x8 layouts)
  QuantType embed_type = QuantType::kQ8_0;
  int64_t vocab = 0;       // rows of embed_table
  QuantLinearRef lm_head;  // [vocab][hidden] output projection
  // Logits per row that refine_top_logits_cpu recomputes after the output projection's GEMM
  // (0: none), from refine_rows [vocab] rows of refine_type: the output weights' own values
  // when lm_head's layout rounded them (a tied token table beside a 7-bit copy); null:
  // lm_head's rows.
  int64_t lm_head_refine = 0;
  const void* refine_rows = nullptr;
  QuantType refine_type = QuantType::kQ8_0;
};

struct CpuExecutorConfig {
  int64_t block_size = 16;
  int64_t num_blocks = 0;               // KV blocks the engine hands out
  int64_t num_swap_blocks = 0;          // host blocks for swap preemption (0: none)
  DType cache_dtype = DType::kFloat16;  // float32, float16 or a float8 (the layers' scales)
};

// Rows of prompt logprobs scored per output projection: bounds the [rows, vocab] logits.
inline constexpr int64_t kPromptLogprobChunk = 256;

class CpuExecutor : public Executor {
 public:
  // Throws KernelArgumentError for inconsistent weights or sizes.
  CpuExecutor(const CpuModelWeights& weights, const CpuExecutorConfig& config);
  ~CpuExecutor() override;
  CpuExecutor(const CpuExecutor&) = delete;
  CpuExecutor& operator=(const CpuExecutor&) = delete;

  StepResult execute(const BatchPlan& plan) override;

  // Installs the hook (once: a second call throws std::logic_error). It lives as long as the
  // executor.
  void set_logits_hook(std::shared_ptr<LogitsHook> hook);
  bool has_logits_hook() const { return hook_.load(std::memory_order_acquire) != nullptr; }

  // Wall-clock seconds per part of execute() since profiling was turned on (the decoder's own
  // parts: decoder().profile()). total is the whole of execute().
  struct Profile {
    double embed = 0.0;
    double lm_head = 0.0;
    double sampling = 0.0;  // the sample kernel and its inputs
    double prompt_logprobs = 0.0;
    double logits_hook = 0.0;
    double total = 0.0;
  };
  void set_profiling(bool on);
  const Profile& profile() const { return profile_; }
  const CpuDecoder& decoder() const { return *decoder_; }

  // LoRA adapters (kernels/lora.h), by the id the engine's requests name (BatchPlan::lora_ids).
  // modules: [layer][target] (kNumLoraTargets targets per layer), a null a = not targeted; the
  // arrays must stay valid until remove_lora. Thread-safe against execute(); an adapter that a
  // step names but that is not registered fails that step's requests.
  struct LoraModule {
    const void* a = nullptr;  // [rank][in_features]
    const void* b = nullptr;  // B transposed: [rank][out_features]
    int32_t rank = 0;
    float scale = 0.0f;
  };
  // weight_dtype: the modules' A and B, float32 or float16 (the same for every adapter).
  void add_lora(int32_t lora_id, std::vector<LoraModule> modules,
                DType weight_dtype = DType::kFloat32);
  bool remove_lora(int32_t lora_id);
  int32_t num_loras() const;

  const CpuExecutorConfig& config() const { return config_; }
  // Bytes reserved for the KV caches (device and swap), resident only where written.
  int64_t kv_cache_bytes() const;

 private:
  struct Mapping;  // an anonymous mmap region
  void apply_block_ops(const BlockOps& ops);
  void embed(const BatchPlan& plan, float* hidden);
  void output_projection(const float* hidden, const int32_t* rows, int64_t num_rows, float* out);
  void sample_rows(const BatchPlan& plan, float* logits, StepResult& result);
  void score_prompt_logprobs(const BatchPlan& plan, const float* hidden, StepResult& result);
  // The step's DecoderLora (slots in order of first appearance), filling the lora_* buffers.
  void build_lora(const BatchPlan& plan, DecoderLora& out);

  CpuModelWeights weights_;
  CpuExecutorConfig config_;
  int64_t cache_block_bytes_ = 0;
  std::unique_ptr<Mapping> caches_;       // [layer][key, value][num_blocks] blocks
  std::unique_ptr<Mapping> swap_caches_;  // [layer][key, value][num_swap_blocks] blocks
  std::unique_ptr<CpuDecoder> decoder_;
  std::shared_ptr<LogitsHook> hook_owner_;
  std::atomic<LogitsHook*> hook_{nullptr};
  bool profiling_ = false;
  Profile profile_;
  mutable std::mutex lora_mu_;
  std::unordered_map<int32_t, std::vector<LoraModule>> loras_;
  std::vector<int32_t> lora_token_slots_;
  std::vector<const void*> lora_a_, lora_b_;
  DType lora_dtype_ = DType::kFloat32;
  std::vector<int32_t> lora_ranks_;
  std::vector<float> lora_scales_;
  // Step buffers, grown to the largest step seen.
  std::vector<float> hidden_;
  std::vector<float> rows_;
  std::vector<float> logits_;
  std::vector<int32_t> target_offsets_;
  std::vector<int32_t> scratch_tokens_;
};

}  // namespace fastllm::models
