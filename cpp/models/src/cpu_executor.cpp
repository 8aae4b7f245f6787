// CpuExecutor: one engine step on the CPU, embed -> decoder -> logits -> sample (cpu_executor.h).
#include "fastllm/models/cpu_executor.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "fastllm/kernels/cache_ops.h"
#include "fastllm/kernels/lora.h"
#include "fastllm/kernels/quant_gemm.h"

namespace fastllm::models {

using kernels::check_arg;

namespace {

template <typename T>
T* grow(std::vector<T>& buffer, size_t n) {
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// Adds fn's wall time to *part when on.
template <typename Fn>
void timed(bool on, double* part, Fn&& fn) {
  if (!on) return fn();
  const auto start = std::chrono::steady_clock::now();
  fn();
  *part += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The output-id list of a step whose penalised rows have no output yet.
constexpr int32_t kNoTokens = 0;

}  // namespace

// Anonymous private memory: pages become resident when first written (no madvise, so no
// transparent huge pages that would make a block-at-a-time cache resident 2 MiB at a time).
struct CpuExecutor::Mapping {
  void* data = nullptr;
  size_t bytes = 0;
  explicit Mapping(size_t n) : bytes(n) {
    if (n == 0) return;
    data = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
      data = nullptr;
      throw std::bad_alloc();
    }
  }
  ~Mapping() {
    if (data != nullptr) munmap(data, bytes);
  }
  char* at(int64_t offset) const { return static_cast<char*>(data) + offset; }
};

CpuExecutor::CpuExecutor(const CpuModelWeights& weights, const CpuExecutorConfig& config)
    : weights_(weights), config_(config) {
  const DecoderShape& s = weights.shape;
  check_arg(config.block_size == 8 || config.block_size == 16 || config.block_size == 32,
            "CpuExecutor: block_size must be 8, 16 or 32");
  check_arg(config.num_blocks > 0 && config.num_swap_blocks >= 0,
            "CpuExecutor: num_blocks must be positive");
  check_arg(config.cache_dtype == DType::kFloat32 || config.cache_dtype == DType::kFloat16 ||
                kernels::is_float8(config.cache_dtype),
            "CpuExecutor: the KV cache must be float32, float16, float8_e4m3 or float8_e5m2");
  check_arg(weights.embed_table != nullptr && weights.vocab > 0,
            "CpuExecutor: the token embedding table is required");
  check_arg(weights.lm_head.weight != nullptr && weights.lm_head.k == s.hidden &&
                weights.lm_head.n == weights.vocab,
            "CpuExecutor: the output projection must be [vocab, hidden]");
  check_arg(kernels::quant_block_values(weights.lm_head.type) > 0,
            "CpuExecutor: the output projection has an unknown quantization type");
  check_arg(!weights.layers.empty(), "CpuExecutor: the model has no layers");
  check_arg(weights.lm_head_refine >= 0, "CpuExecutor: lm_head_refine must be >= 0");

  DecoderShape shape = s;
  shape.block_size = config.block_size;
  shape.num_blocks = config.num_blocks;
  shape.cache_dtype = config.cache_dtype;
  decoder_ = std::make_unique<CpuDecoder>(shape);

  cache_block_bytes_ = config.block_size * s.num_kv_heads * s.head_dim *
                       static_cast<int64_t>(kernels::dtype_size(config.cache_dtype));
  const auto layers = static_cast<int64_t>(weights.layers.size());
  const int64_t cache_bytes = config.num_blocks * cache_block_bytes_;
  caches_ = std::make_unique<Mapping>(static_cast<size_t>(2 * layers * cache_bytes));
  swap_caches_ = std::make_unique<Mapping>(
      static_cast<size_t>(2 * layers * config.num_swap_blocks * cache_block_bytes_));
  for (int64_t l = 0; l < layers; ++l) {
    DecoderLayerRef layer = weights.layers[static_cast<size_t>(l)];
    layer.key_cache = caches_->at(2 * l * cache_bytes);
    layer.value_cache = caches_->at((2 * l + 1) * cache_bytes);
    decoder_->add_layer(layer);
  }
}

CpuExecutor::~CpuExecutor() = default;

void CpuExecutor::set_logits_hook(std::shared_ptr<LogitsHook> hook) {
  if (hook_owner_ != nullptr) throw std::logic_error("CpuExecutor: the logits hook is already set");
  hook_owner_ = std::move(hook);
  hook_.store(hook_owner_.get(), std::memory_order_release);
}

void CpuExecutor::set_profiling(bool on) {
  profiling_ = on;
  profile_ = Profile();
  decoder_->set_profiling(on);
}

int64_t CpuExecutor::kv_cache_bytes() const {
  return static_cast<int64_t>(caches_->bytes + swap_caches_->bytes);
}

void CpuExecutor::apply_block_ops(const BlockOps& ops) {
  const auto layers = static_cast<int64_t>(weights_.layers.size());
  const int64_t blocks = config_.num_blocks, swap_blocks = config_.num_swap_blocks;
  auto swap = [&](const std::vector<int32_t>& pairs, bool out) {
    if (pairs.empty()) return;
    check_arg(swap_blocks > 0, "CpuExecutor: a swap without swap blocks");
    const std::vector<int64_t> mapping(pairs.begin(), pairs.end());
    const auto num_pairs = static_cast<int64_t>(pairs.size() / 2);
    for (int64_t c = 0; c < 2 * layers; ++c) {
      char* device = caches_->at(c * blocks * cache_block_bytes_);
      char* host = swap_caches_->at(c * swap_blocks * cache_block_bytes_);
      if (out) {
        kernels::swap_blocks_cpu(device, blocks, host, swap_blocks, cache_block_bytes_,
                                 mapping.data(), num_pairs);
      } else {
        kernels::swap_blocks_cpu(host, swap_blocks, device, blocks, cache_block_bytes_,
                                 mapping.data(), num_pairs);
      }
    }
  };
  swap(ops.swap_out, true);
  swap(ops.swap_in, false);
  if (!ops.copy.empty()) {
    for (int64_t c = 0; c < 2 * layers; ++c) {
      kernels::copy_blocks_cpu(caches_->at(c * blocks * cache_block_bytes_), blocks,
                               cache_block_bytes_, ops.copy.data(),
                               static_cast<int64_t>(ops.copy.size() / 2));
    }
  }
}

void CpuExecutor::embed(const BatchPlan& plan, float* hidden) {
  const int64_t dim = weights_.shape.hidden;
  if (weights_.embed_quantized) {
    kernels::embed_quant_rows_cpu(weights_.embed_table, weights_.embed_type, weights_.vocab, dim,
                                  plan.token_ids.data(), plan.num_tokens, hidden);
    return;
  }
  const auto* table = static_cast<const float*>(weights_.embed_table);
  for (int64_t i = 0; i < plan.num_tokens; ++i) {
    const int32_t id = plan.token_ids[static_cast<size_t>(i)];
    check_arg(id >= 0 && id < weights_.vocab,
              "CpuExecutor: token id " + std::to_string(id) + " out of range");
    std::memcpy(hidden + i * dim, table + id * dim, static_cast<size_t>(dim) * sizeof(float));
  }
}

void CpuExecutor::output_projection(const float* hidden, const int32_t* rows, int64_t num_rows,
                                    float* out) {
  const int64_t dim = weights_.shape.hidden;
  float* gathered = grow(rows_, static_cast<size_t>(num_rows * dim));
  for (int64_t i = 0; i < num_rows; ++i) {
    std::memcpy(gathered + i * dim, hidden + static_cast<int64_t>(rows[i]) * dim,
                static_cast<size_t>(dim) * sizeof(float));
  }
  kernels::QuantGemmParams p;
  p.out = out;
  p.input = gathered;
  p.weight = weights_.lm_head.weight;
  p.bias = weights_.lm_head.bias;
  p.m = num_rows;
  p.n = weights_.lm_head.n;
  p.k = dim;
  p.input_stride = dim;
  p.out_stride = p.n;
  p.type = weights_.lm_head.type;
  kernels::quant_gemm_cpu(p);
  if (weights_.lm_head_refine == 0) return;
  kernels::RefineLogitsParams r;
  r.logits = out;
  r.input = gathered;
  r.weight = weights_.refine_rows != nullptr ? weights_.refine_rows : p.weight;
  r.type = weights_.refine_rows != nullptr ? weights_.refine_type : p.type;
  r.bias = p.bias;
  r.m = num_rows;
  r.n = p.n;
  r.k = dim;
  r.logits_stride = p.n;
  r.input_stride = dim;
  r.count = weights_.lm_head_refine;
  kernels::refine_top_logits_cpu(r);
}

StepResult CpuExecutor::execute(const BatchPlan& plan) {
  const auto start = std::chrono::steady_clock::now();
  StepResult result;
  apply_block_ops(plan.block_ops);
  if (plan.num_tokens > 0) {
    const int64_t dim = weights_.shape.hidden;
    float* hidden = grow(hidden_, static_cast<size_t>(plan.num_tokens * dim));
    timed(profiling_, &profile_.embed, [&] { embed(plan, hidden); });
    DecoderBatch batch;
    batch.hidden = hidden;
    batch.positions = plan.positions.data();
    batch.slot_mapping = plan.slot_mapping.data();
    batch.query_start_loc = plan.query_start_loc.data();
    batch.context_lens = plan.context_lens.data();
    batch.block_tables = plan.block_tables.data();
    batch.num_tokens = plan.num_tokens;
    batch.num_seqs = plan.num_seqs;
    batch.max_blocks_per_seq = plan.max_blocks_per_seq;
    batch.max_context_len = plan.max_context_len;
    DecoderLora lora;
    std::unique_lock<std::mutex> lora_lock(lora_mu_, std::defer_lock);
    if (plan.any_lora) {
      lora_lock.lock();  // the adapters' arrays stay registered through the forward pass
      build_lora(plan, lora);
      batch.lora = &lora;
    }
    decoder_->forward(batch);
    if (lora_lock.owns_lock()) lora_lock.unlock();
    if (plan.any_prompt_logprobs) {
      timed(profiling_, &profile_.prompt_logprobs,
            [&] { score_prompt_logprobs(plan, hidden, result); });
    }
    if (plan.num_samples > 0) {
      float* logits = grow(logits_, static_cast<size_t>(plan.num_samples * weights_.vocab));
      timed(profiling_, &profile_.lm_head, [&] {
        output_projection(hidden, plan.sample_token_indices.data(), plan.num_samples, logits);
      });
      sample_rows(plan, logits, result);
    }
  }
  if (profiling_) {
    profile_.total +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return result;
}

void CpuExecutor::sample_rows(const BatchPlan& plan, float* logits, StepResult& result) {
  const int64_t rows = plan.num_samples, vocab = weights_.vocab;
  LogitsHook* hook = hook_.load(std::memory_order_acquire);
  const bool hooked = hook != nullptr && hook->wants(plan);
  if (hooked) timed(profiling_, &profile_.logits_hook, [&] { hook->apply(plan, logits, vocab); });

  int32_t num_top = 0;
  bool want_logprobs = false;
  for (const int32_t n : plan.num_logprobs) {
    num_top = std::max(num_top, n);
    want_logprobs = want_logprobs || n >= 0;
  }
  result.sampled_token_ids.resize(static_cast<size_t>(rows));
  if (want_logprobs) {
    result.sampled_logprobs.resize(static_cast<size_t>(rows));
    result.num_top_logprobs = num_top;
    result.top_token_ids.resize(static_cast<size_t>(rows * num_top));
    result.top_logprobs.resize(static_cast<size_t>(rows * num_top));
  }

  timed(profiling_, &profile_.sampling, [&] {
    kernels::SamplingParamsBatch p;
    p.logits = logits;
    p.num_rows = rows;
    p.vocab = vocab;
    p.logits_row_stride = vocab;
    p.temperature = plan.temperature.data();
    p.top_k = plan.top_k.data();
    p.top_p = plan.top_p.data();
    p.min_p = plan.min_p.data();
    p.seeds = plan.seeds.data();
    p.generator_offsets = plan.output_positions.data();
    p.global_seed = plan.sampling_seed;
    if (!plan.penalty_prompt_ids.empty()) {
      p.repetition_penalty = plan.repetition_penalty.data();
      p.presence_penalty = plan.presence_penalty.data();
      p.frequency_penalty = plan.frequency_penalty.data();
      p.prompt_offsets = plan.penalty_prompt_offsets.data();
      p.prompt_ids = plan.penalty_prompt_ids.data();
      p.output_offsets = plan.penalty_output_offsets.data();
      // No output yet on any row: still a non-null list (a null one reads as "not given").
      p.output_ids = plan.penalty_output_ids.empty() ? &kNoTokens : plan.penalty_output_ids.data();
    }
    if (!plan.bias_token_ids.empty()) {
      p.bias_offsets = plan.bias_offsets.data();
      p.bias_ids = plan.bias_token_ids.data();
      p.bias_values = plan.bias_values.data();
    }
    if (!plan.allowed_token_ids.empty()) {
      p.allowed_offsets = plan.allowed_offsets.data();
      p.allowed_ids = plan.allowed_token_ids.data();
    }
    if (plan.typical_acceptance) {
      p.draft_ids = plan.draft_token_ids.data();
      p.typical_threshold = plan.typical_threshold;
      p.typical_alpha = plan.typical_alpha;
    }
    p.sampled = result.sampled_token_ids.data();
    if (want_logprobs) {
      p.sampled_logprob = result.sampled_logprobs.data();
      p.num_top_logprobs = num_top;
      if (num_top > 0) {
        p.top_logprobs = result.top_logprobs.data();
        p.top_ids = result.top_token_ids.data();
      }
    }
    kernels::sample_cpu(p);
  });
  if (hooked) {
    timed(profiling_, &profile_.logits_hook,
          [&] { hook->advance(plan, result.sampled_token_ids.data()); });
  }
}

void CpuExecutor::add_lora(int32_t lora_id, std::vector<LoraModule> modules, DType weight_dtype) {
  const auto layers = static_cast<int64_t>(weights_.layers.size());
  check_arg(lora_id > 0, "CpuExecutor: LoRA ids must be positive");
  check_arg(static_cast<int64_t>(modules.size()) == layers * kNumLoraTargets,
            "CpuExecutor: a LoRA adapter needs " + std::to_string(kNumLoraTargets) +
                " modules per layer");
  for (const LoraModule& m : modules) {
    check_arg(m.a == nullptr || (m.b != nullptr && m.rank > 0 && m.rank <= kernels::kMaxLoraRank),
              "CpuExecutor: a LoRA module needs both matrices and a rank in [1, " +
                  std::to_string(kernels::kMaxLoraRank) + "]");
  }
  check_arg(weight_dtype == DType::kFloat32 || weight_dtype == DType::kFloat16,
            "CpuExecutor: LoRA weights must be float32 or float16");
  std::lock_guard<std::mutex> lock(lora_mu_);
  // One kernel call covers every adapter of a step, so they share one storage type.
  check_arg(loras_.empty() || weight_dtype == lora_dtype_,
            "CpuExecutor: every LoRA adapter must have the same weight dtype");
  lora_dtype_ = weight_dtype;
  loras_[lora_id] = std::move(modules);
}

bool CpuExecutor::remove_lora(int32_t lora_id) {
  std::lock_guard<std::mutex> lock(lora_mu_);
  return loras_.erase(lora_id) > 0;
}

int32_t CpuExecutor::num_loras() const {
  std::lock_guard<std::mutex> lock(lora_mu_);
  return static_cast<int32_t>(loras_.size());
}

void CpuExecutor::build_lora(const BatchPlan& plan, DecoderLora& out) {
  // Slots: the step's distinct adapters in order of first appearance (on the CPU every loaded
  // adapter is already in host memory; the scheduler bounds how many one step has).
  std::vector<int32_t> ids;
  std::vector<int32_t> slot_of_seq(static_cast<size_t>(plan.num_seqs), -1);
  for (int32_t s = 0; s < plan.num_seqs; ++s) {
    const int32_t id = plan.lora_ids[s];
    if (id == 0) continue;
    auto it = std::find(ids.begin(), ids.end(), id);
    if (it == ids.end()) {
      if (loras_.count(id) == 0) {
        throw std::runtime_error("CpuExecutor: LoRA adapter " + std::to_string(id) +
                                 " is not loaded");
      }
      ids.push_back(id);
      it = ids.end() - 1;
    }
    slot_of_seq[static_cast<size_t>(s)] = static_cast<int32_t>(it - ids.begin());
  }
  lora_token_slots_.assign(static_cast<size_t>(plan.num_tokens), -1);
  for (int32_t s = 0; s < plan.num_seqs; ++s) {
    std::fill(lora_token_slots_.begin() + plan.query_start_loc[s],
              lora_token_slots_.begin() + plan.query_start_loc[s + 1],
              slot_of_seq[static_cast<size_t>(s)]);
  }
  const auto slots = static_cast<int64_t>(ids.size());
  const int64_t entries = static_cast<int64_t>(weights_.layers.size()) * kNumLoraTargets;
  lora_a_.assign(static_cast<size_t>(entries * slots), nullptr);
  lora_b_.assign(lora_a_.size(), nullptr);
  lora_ranks_.assign(lora_a_.size(), 1);
  lora_scales_.assign(lora_a_.size(), 0.0f);
  int64_t max_rank = 1;
  for (int64_t slot = 0; slot < slots; ++slot) {
    const auto& modules = loras_.at(ids[static_cast<size_t>(slot)]);
    for (int64_t e = 0; e < entries; ++e) {
      const LoraModule& m = modules[static_cast<size_t>(e)];
      if (m.a == nullptr) continue;
      const auto at = static_cast<size_t>(e * slots + slot);
      lora_a_[at] = m.a;
      lora_b_[at] = m.b;
      lora_ranks_[at] = m.rank;
      lora_scales_[at] = m.scale;
      max_rank = std::max<int64_t>(max_rank, m.rank);
    }
  }
  out.token_slots = lora_token_slots_.data();
  out.num_slots = slots;
  out.max_rank = max_rank;
  out.weight_dtype = lora_dtype_;
  out.a = lora_a_.data();
  out.b = lora_b_.data();
  out.ranks = lora_ranks_.data();
  out.scales = lora_scales_.data();
}

void CpuExecutor::score_prompt_logprobs(const BatchPlan& plan, const float* hidden,
                                        StepResult& result) {
  // The plan lists the rows to score and their targets (see BatchPlan::prompt_logprob_rows).
  if (plan.prompt_logprob_rows.empty()) return;
  int32_t k = -1;
  for (int32_t s = 0; s < plan.num_seqs; ++s) k = std::max(k, plan.prompt_logprobs[s]);
  const auto total = static_cast<int64_t>(plan.prompt_logprob_rows.size());
  const int64_t vocab = weights_.vocab, top = std::max(k, 0);
  result.prompt_seq_indices = plan.prompt_logprob_seqs;
  result.prompt_token_logprobs.resize(static_cast<size_t>(total));
  result.num_prompt_top_logprobs = static_cast<int32_t>(top);
  result.prompt_top_token_ids.resize(static_cast<size_t>(total * top));
  result.prompt_top_logprobs.resize(static_cast<size_t>(total * top));
  // One allowed token per row, the target: its "sampled" logprob is the target's logprob.
  target_offsets_.resize(static_cast<size_t>(kPromptLogprobChunk + 1));
  for (int64_t start = 0; start < total; start += kPromptLogprobChunk) {
    const int64_t n = std::min(kPromptLogprobChunk, total - start);
    float* logits = grow(logits_, static_cast<size_t>(n * vocab));
    output_projection(hidden, plan.prompt_logprob_rows.data() + start, n, logits);
    for (int64_t i = 0; i <= n; ++i)
      target_offsets_[static_cast<size_t>(i)] = static_cast<int32_t>(i);
    kernels::SamplingParamsBatch p;
    p.logits = logits;
    p.num_rows = n;
    p.vocab = vocab;
    p.logits_row_stride = vocab;
    p.allowed_offsets = target_offsets_.data();
    p.allowed_ids = plan.prompt_logprob_targets.data() + start;
    p.sampled = grow(scratch_tokens_, static_cast<size_t>(n));
    p.sampled_logprob = result.prompt_token_logprobs.data() + start;
    p.num_top_logprobs = top;
    if (top > 0) {
      p.top_logprobs = result.prompt_top_logprobs.data() + start * top;
      p.top_ids = result.prompt_top_token_ids.data() + start * top;
    }
    kernels::sample_cpu(p);
  }
}

}  // namespace fastllm::models
