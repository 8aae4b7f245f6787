// Python bindings of cpp/engine: configs, SamplingParams, Engine, BatchPlan views, outputs and the
// Executor trampoline. Blocking calls release the GIL; the engine thread takes it only inside a
// Python executor's execute().
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <nanobind/trampoline.h>

#include <cstring>
#include <string>

#include "fastllm/engine.h"
#include "fastllm/fake_executor.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace fastllm;

namespace {

// A numpy view of a plan array. Returned with rv_policy::reference_internal, so it keeps the
// plan's Python object alive; the contents are valid during Executor.execute only.
template <typename T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> view1d(const std::vector<T>& v) {
  return nb::ndarray<nb::numpy, T, nb::ndim<1>>(const_cast<T*>(v.data()), {v.size()});
}

// A read-only numpy view of an output's array (reference_internal: the output object stays
// alive while the view does). Reading a std::vector field by value copied it into a new list on
// every access, which made indexing it in a loop quadratic.
template <typename T>
nb::ndarray<nb::numpy, const T, nb::ndim<1>> ro_view(const std::vector<T>& v) {
  return nb::ndarray<nb::numpy, const T, nb::ndim<1>>(v.data(), {v.size()});
}

template <typename T>
nb::ndarray<nb::numpy, T, nb::ndim<2>> view2d(const std::vector<T>& v, size_t cols) {
  const size_t rows = cols == 0 ? 0 : v.size() / cols;
  return nb::ndarray<nb::numpy, T, nb::ndim<2>>(const_cast<T*>(v.data()), {rows, cols});
}

template <typename T>
std::vector<T> to_vector(nb::ndarray<nb::ro, nb::device::cpu> a, const char* what) {
  std::vector<T> out;
  if (!a.is_valid()) return out;
  const size_t n = a.size();
  out.resize(n);
  const nb::dlpack::dtype dt = a.dtype();
  if (a.stride(a.ndim() - 1) != 1 && n > 1) {
    throw nb::value_error((std::string(what) + " must be contiguous").c_str());
  }
  auto copy_from = [&](auto* src) {
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(src[i]);
  };
  if (dt == nb::dtype<int32_t>()) {
    copy_from(static_cast<const int32_t*>(a.data()));
  } else if (dt == nb::dtype<int64_t>()) {
    copy_from(static_cast<const int64_t*>(a.data()));
  } else if (dt == nb::dtype<float>()) {
    copy_from(static_cast<const float*>(a.data()));
  } else if (dt == nb::dtype<double>()) {
    copy_from(static_cast<const double*>(a.data()));
  } else {
    throw nb::value_error((std::string(what) + ": unsupported dtype").c_str());
  }
  return out;
}

class PyExecutor : public Executor {
 public:
  NB_TRAMPOLINE(Executor, 1);

  StepResult execute(const BatchPlan& plan) override {
    nb::gil_scoped_acquire gil;
    constexpr uint64_t hash = nb::detail::str_hash("execute");
    nb::detail::ticket ticket(nb_trampoline, "execute", hash, true);
    nb::object result =
        nb_trampoline.base().attr(ticket.key)(nb::cast(&plan, nb::rv_policy::reference));
    StepResult* step = nullptr;
    if (nb::try_cast<StepResult*>(result, step) && step != nullptr) return *step;
    // Any int array-like (list, numpy, torch CPU tensor) is taken as the sampled token ids.
    StepResult r;
    nb::ndarray<nb::ro, nb::device::cpu> arr;
    if (nb::try_cast(result, arr)) {
      r.sampled_token_ids = to_vector<int32_t>(arr, "sampled_token_ids");
    } else {
      r.sampled_token_ids = nb::cast<std::vector<int32_t>>(result);
    }
    return r;
  }
};

// Joins the loop thread with the GIL released, so a Python executor running on it can finish.
class PyEngine : public Engine {
 public:
  using Engine::Engine;
  ~PyEngine() {
    nb::gil_scoped_release release;
    stop();
  }
};

nb::object finish_reason_or_none(FinishReason r) {
  if (r == FinishReason::kNone) return nb::none();
  return nb::str(to_string(r));
}

}  // namespace

void bind_engine(nb::module_& m) {
  nb::exception<EngineError>(m, "EngineError", PyExc_RuntimeError);

  nb::enum_<SchedulingPolicy>(m, "SchedulingPolicy")
      .value("FCFS", SchedulingPolicy::kFCFS)
      .value("PRIORITY", SchedulingPolicy::kPriority);
  nb::enum_<PrefixHashAlgo>(m, "PrefixHashAlgo")
      .value("SHA256", PrefixHashAlgo::kSha256)
      .value("FAST", PrefixHashAlgo::kFast)
      .value("TEST_WEAK", PrefixHashAlgo::kTestWeak);
  nb::enum_<PreemptionMode>(m, "PreemptionMode")
      .value("RECOMPUTE", PreemptionMode::kRecompute)
      .value("SWAP", PreemptionMode::kSwap);
  nb::enum_<SpecMethod>(m, "SpecMethod")
      .value("NONE", SpecMethod::kNone)
      .value("NGRAM", SpecMethod::kNgram)
      .value("DRAFT_MODEL", SpecMethod::kDraftModel);
  nb::enum_<AcceptanceMethod>(m, "AcceptanceMethod")
      .value("REJECTION", AcceptanceMethod::kRejection)
      .value("TYPICAL", AcceptanceMethod::kTypical);

  nb::class_<SamplingParams>(m, "SamplingParams", "Token-level sampling parameters of a request")
      .def(nb::init<>())
      .def_rw("n", &SamplingParams::n)
      .def_rw("max_tokens", &SamplingParams::max_tokens)
      .def_rw("min_tokens", &SamplingParams::min_tokens)
      .def_rw("temperature", &SamplingParams::temperature)
      .def_rw("top_p", &SamplingParams::top_p)
      .def_rw("top_k", &SamplingParams::top_k)
      .def_rw("min_p", &SamplingParams::min_p)
      .def_rw("presence_penalty", &SamplingParams::presence_penalty)
      .def_rw("frequency_penalty", &SamplingParams::frequency_penalty)
      .def_rw("repetition_penalty", &SamplingParams::repetition_penalty)
      .def_rw("seed", &SamplingParams::seed)
      .def_rw("priority", &SamplingParams::priority)
      .def_rw("ignore_eos", &SamplingParams::ignore_eos)
      .def_rw("stop_token_ids", &SamplingParams::stop_token_ids)
      .def_rw("logit_bias_ids", &SamplingParams::logit_bias_ids)
      .def_rw("logit_bias_values", &SamplingParams::logit_bias_values)
      .def_rw("allowed_token_ids", &SamplingParams::allowed_token_ids)
      .def_rw("logprobs", &SamplingParams::logprobs)
      .def_rw("prompt_logprobs", &SamplingParams::prompt_logprobs)
      .def_rw("speculate", &SamplingParams::speculate)
      .def("validate", &SamplingParams::validate, "max_logprobs"_a = 20)
      .def("check_vocab", &SamplingParams::check_vocab, "vocab_size"_a);

  nb::class_<KVCacheConfig>(m, "KVCacheConfig")
      .def(nb::init<>())
      .def_rw("num_gpu_blocks", &KVCacheConfig::num_gpu_blocks)
      .def_rw("num_cpu_blocks", &KVCacheConfig::num_cpu_blocks)
      .def_rw("block_size", &KVCacheConfig::block_size)
      .def_rw("enable_prefix_caching", &KVCacheConfig::enable_prefix_caching)
      .def_rw("min_cached_blocks", &KVCacheConfig::min_cached_blocks)
      .def_rw("hash_algo", &KVCacheConfig::hash_algo);

  nb::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(nb::init<>())
      .def_rw("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_rw("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_rw("max_model_len", &SchedulerConfig::max_model_len)
      .def_rw("enable_chunked_prefill", &SchedulerConfig::enable_chunked_prefill)
      .def_rw("policy", &SchedulerConfig::policy)
      .def_rw("preemption_mode", &SchedulerConfig::preemption_mode)
      .def_rw("max_loras", &SchedulerConfig::max_loras);

  nb::class_<SpeculativeConfig>(m, "SpeculativeConfig",
                                "Speculative decoding (fastllm/spec_decode.h); off by default")
      .def(nb::init<>())
      .def_rw("method", &SpeculativeConfig::method)
      .def_rw("num_speculative_tokens", &SpeculativeConfig::num_speculative_tokens)
      .def_rw("ngram_min", &SpeculativeConfig::ngram_min)
      .def_rw("ngram_max", &SpeculativeConfig::ngram_max)
      .def_rw("disable_by_batch_size", &SpeculativeConfig::disable_by_batch_size)
      .def_rw("acceptance", &SpeculativeConfig::acceptance)
      .def_rw("typical_threshold", &SpeculativeConfig::typical_threshold)
      .def_rw("typical_alpha", &SpeculativeConfig::typical_alpha)
      .def_rw("adaptive", &SpeculativeConfig::adaptive)
      .def_rw("max_model_len", &SpeculativeConfig::max_model_len)
      .def_rw("draft_cache", &SpeculativeConfig::draft_cache);
  m.def(
      "ngram_lookup",
      [](const std::vector<int32_t>& tokens, int32_t min_n, int32_t max_n, int32_t k) {
        std::vector<int32_t> out;
        ngram_lookup(tokens.data(), static_cast<int32_t>(tokens.size()), min_n, max_n, k, out);
        return out;
      },
      "tokens"_a, "min_n"_a, "max_n"_a, "k"_a,
      "The n-gram proposer's drafts after tokens (most recent match of the longest suffix)");

  nb::class_<EngineConfig>(m, "EngineConfig")
      .def(nb::init<>())
      .def_rw("speculative", &EngineConfig::speculative)
      .def_rw("cache", &EngineConfig::cache)
      .def_rw("scheduler", &EngineConfig::scheduler)
      .def_rw("eos_token_ids", &EngineConfig::eos_token_ids)
      .def_rw("vocab_size", &EngineConfig::vocab_size)
      .def_rw("max_logprobs", &EngineConfig::max_logprobs)
      .def_rw("seed", &EngineConfig::seed)
      .def("validate", &EngineConfig::validate);

  constexpr auto ref = nb::rv_policy::reference_internal;
  nb::class_<BatchPlan>(m, "BatchPlan",
                        "One step's work as flat arrays; valid during Executor.execute only")
      .def_ro("step_id", &BatchPlan::step_id)
      .def_ro("sampling_seed", &BatchPlan::sampling_seed)
      .def_ro("block_size", &BatchPlan::block_size)
      .def_ro("num_seqs", &BatchPlan::num_seqs)
      .def_ro("num_tokens", &BatchPlan::num_tokens)
      .def_ro("num_samples", &BatchPlan::num_samples)
      .def_ro("max_query_len", &BatchPlan::max_query_len)
      .def_ro("max_context_len", &BatchPlan::max_context_len)
      .def_ro("max_blocks_per_seq", &BatchPlan::max_blocks_per_seq)
      .def_ro("request_ids", &BatchPlan::request_ids)
      .def_ro("any_prompt_logprobs", &BatchPlan::any_prompt_logprobs)
      .def_ro("any_lora", &BatchPlan::any_lora)
      .def_prop_ro(
          "lora_ids", [](const BatchPlan& p) { return view1d(p.lora_ids); }, ref)
      .def_ro("typical_acceptance", &BatchPlan::typical_acceptance)
      .def_ro("typical_threshold", &BatchPlan::typical_threshold)
      .def_ro("typical_alpha", &BatchPlan::typical_alpha)
      .def_prop_ro(
          "num_draft_tokens", [](const BatchPlan& p) { return view1d(p.num_draft_tokens); }, ref)
      .def_prop_ro(
          "draft_token_ids", [](const BatchPlan& p) { return view1d(p.draft_token_ids); }, ref)
      .def_prop_ro(
          "num_prompt_tokens", [](const BatchPlan& p) { return view1d(p.num_prompt_tokens); }, ref)
      .def_prop_ro(
          "prompt_logprobs", [](const BatchPlan& p) { return view1d(p.prompt_logprobs); }, ref)
      .def_prop_ro(
          "prompt_next_token", [](const BatchPlan& p) { return view1d(p.prompt_next_token); }, ref)
      .def_prop_ro(
          "token_ids", [](const BatchPlan& p) { return view1d(p.token_ids); }, ref)
      .def_prop_ro(
          "positions", [](const BatchPlan& p) { return view1d(p.positions); }, ref)
      .def_prop_ro(
          "slot_mapping", [](const BatchPlan& p) { return view1d(p.slot_mapping); }, ref)
      .def_prop_ro(
          "query_start_loc", [](const BatchPlan& p) { return view1d(p.query_start_loc); }, ref)
      .def_prop_ro(
          "context_lens", [](const BatchPlan& p) { return view1d(p.context_lens); }, ref)
      .def_prop_ro(
          "num_computed_tokens", [](const BatchPlan& p) { return view1d(p.num_computed_tokens); },
          ref)
      .def_prop_ro(
          "block_tables",
          [](const BatchPlan& p) {
            return view2d(p.block_tables, static_cast<size_t>(p.max_blocks_per_seq));
          },
          ref)
      .def_prop_ro(
          "sample_token_indices", [](const BatchPlan& p) { return view1d(p.sample_token_indices); },
          ref)
      .def_prop_ro(
          "sample_seq_indices", [](const BatchPlan& p) { return view1d(p.sample_seq_indices); },
          ref)
      .def_prop_ro(
          "sample_child_indices", [](const BatchPlan& p) { return view1d(p.sample_child_indices); },
          ref,
          "per sample row: the child (RequestOutput.seq_index) it draws for; an n > 1 request's "
          "prefill has n rows on its last prompt token")
      .def_prop_ro(
          "temperature", [](const BatchPlan& p) { return view1d(p.temperature); }, ref)
      .def_prop_ro(
          "top_p", [](const BatchPlan& p) { return view1d(p.top_p); }, ref)
      .def_prop_ro(
          "top_k", [](const BatchPlan& p) { return view1d(p.top_k); }, ref)
      .def_prop_ro(
          "min_p", [](const BatchPlan& p) { return view1d(p.min_p); }, ref)
      .def_prop_ro(
          "presence_penalty", [](const BatchPlan& p) { return view1d(p.presence_penalty); }, ref)
      .def_prop_ro(
          "frequency_penalty", [](const BatchPlan& p) { return view1d(p.frequency_penalty); }, ref)
      .def_prop_ro(
          "repetition_penalty", [](const BatchPlan& p) { return view1d(p.repetition_penalty); },
          ref)
      .def_prop_ro(
          "seeds", [](const BatchPlan& p) { return view1d(p.seeds); }, ref)
      .def_prop_ro(
          "output_positions", [](const BatchPlan& p) { return view1d(p.output_positions); }, ref)
      .def_prop_ro(
          "num_logprobs", [](const BatchPlan& p) { return view1d(p.num_logprobs); }, ref)
      .def_prop_ro(
          "suppress_stop_tokens", [](const BatchPlan& p) { return view1d(p.suppress_stop_tokens); },
          ref)
      .def_prop_ro(
          "penalty_prompt_offsets",
          [](const BatchPlan& p) { return view1d(p.penalty_prompt_offsets); }, ref)
      .def_prop_ro(
          "penalty_prompt_ids", [](const BatchPlan& p) { return view1d(p.penalty_prompt_ids); },
          ref)
      .def_prop_ro(
          "penalty_output_offsets",
          [](const BatchPlan& p) { return view1d(p.penalty_output_offsets); }, ref)
      .def_prop_ro(
          "penalty_output_ids", [](const BatchPlan& p) { return view1d(p.penalty_output_ids); },
          ref)
      .def_prop_ro(
          "prompt_logprob_rows", [](const BatchPlan& p) { return view1d(p.prompt_logprob_rows); },
          ref)
      .def_prop_ro(
          "prompt_logprob_targets",
          [](const BatchPlan& p) { return view1d(p.prompt_logprob_targets); }, ref)
      .def_prop_ro(
          "prompt_logprob_seqs", [](const BatchPlan& p) { return view1d(p.prompt_logprob_seqs); },
          ref)
      .def_prop_ro(
          "bias_offsets", [](const BatchPlan& p) { return view1d(p.bias_offsets); }, ref)
      .def_prop_ro(
          "bias_token_ids", [](const BatchPlan& p) { return view1d(p.bias_token_ids); }, ref)
      .def_prop_ro(
          "bias_values", [](const BatchPlan& p) { return view1d(p.bias_values); }, ref)
      .def_prop_ro(
          "allowed_offsets", [](const BatchPlan& p) { return view1d(p.allowed_offsets); }, ref)
      .def_prop_ro(
          "allowed_token_ids", [](const BatchPlan& p) { return view1d(p.allowed_token_ids); }, ref)
      .def_prop_ro(
          "blocks_to_swap_out", [](const BatchPlan& p) { return view2d(p.block_ops.swap_out, 2); },
          ref)
      .def_prop_ro(
          "blocks_to_swap_in", [](const BatchPlan& p) { return view2d(p.block_ops.swap_in, 2); },
          ref)
      .def_prop_ro(
          "blocks_to_copy", [](const BatchPlan& p) { return view2d(p.block_ops.copy, 2); }, ref);

  nb::class_<StepResult>(m, "StepResult", "What an executor returns for one BatchPlan")
      .def(
          "__init__",
          [](StepResult* self, nb::ndarray<nb::ro, nb::device::cpu> sampled_token_ids,
             nb::ndarray<nb::ro, nb::device::cpu> sampled_logprobs,
             nb::ndarray<nb::ro, nb::device::cpu> top_token_ids,
             nb::ndarray<nb::ro, nb::device::cpu> top_logprobs) {
            new (self) StepResult();
            self->sampled_token_ids = to_vector<int32_t>(sampled_token_ids, "sampled_token_ids");
            self->sampled_logprobs = to_vector<float>(sampled_logprobs, "sampled_logprobs");
            self->top_token_ids = to_vector<int32_t>(top_token_ids, "top_token_ids");
            self->top_logprobs = to_vector<float>(top_logprobs, "top_logprobs");
            if (top_token_ids.is_valid()) {
              if (top_token_ids.ndim() != 2 || top_logprobs.ndim() != 2 ||
                  top_token_ids.shape(0) != top_logprobs.shape(0) ||
                  top_token_ids.shape(1) != top_logprobs.shape(1)) {
                throw nb::value_error("top_token_ids and top_logprobs must be [rows, K] arrays");
              }
              self->num_top_logprobs = static_cast<int32_t>(top_token_ids.shape(1));
            }
          },
          "sampled_token_ids"_a, "sampled_logprobs"_a.none() = nb::none(),
          "top_token_ids"_a.none() = nb::none(), "top_logprobs"_a.none() = nb::none())
      .def(
          "set_prompt_logprobs",
          [](StepResult& self, nb::ndarray<nb::ro, nb::device::cpu> seq_indices,
             nb::ndarray<nb::ro, nb::device::cpu> token_logprobs,
             nb::ndarray<nb::ro, nb::device::cpu> top_token_ids,
             nb::ndarray<nb::ro, nb::device::cpu> top_logprobs) {
            self.prompt_seq_indices = to_vector<int32_t>(seq_indices, "seq_indices");
            self.prompt_token_logprobs = to_vector<float>(token_logprobs, "token_logprobs");
            self.prompt_top_token_ids = to_vector<int32_t>(top_token_ids, "top_token_ids");
            self.prompt_top_logprobs = to_vector<float>(top_logprobs, "top_logprobs");
            if (self.prompt_seq_indices.size() != self.prompt_token_logprobs.size()) {
              throw nb::value_error("seq_indices and token_logprobs differ in length");
            }
            self.num_prompt_top_logprobs = top_token_ids.is_valid() && top_token_ids.ndim() == 2
                                               ? static_cast<int32_t>(top_token_ids.shape(1))
                                               : 0;
          },
          "seq_indices"_a, "token_logprobs"_a, "top_token_ids"_a.none() = nb::none(),
          "top_logprobs"_a.none() = nb::none(),
          "Prompt logprobs of this step: one entry per scored prompt position, in plan order")
      .def_ro("sampled_token_ids", &StepResult::sampled_token_ids)
      .def_ro("sampled_logprobs", &StepResult::sampled_logprobs)
      .def_ro("num_top_logprobs", &StepResult::num_top_logprobs);

  nb::class_<Executor, PyExecutor>(m, "Executor",
                                   "Subclass and implement execute(plan) -> StepResult | ids")
      .def(nb::init<>())
      .def("execute", &Executor::execute, "plan"_a);

  nb::class_<FakeExecutor, Executor>(m, "FakeExecutor",
                                     "Deterministic stand-in model over a simulated KV cache")
      .def(
          "__init__",
          [](FakeExecutor* self, int32_t num_gpu_blocks, int32_t num_cpu_blocks, int32_t block_size,
             int32_t vocab_size, bool verify_kv, int32_t disagree_every) {
            new (self) FakeExecutor({num_gpu_blocks, num_cpu_blocks, block_size, vocab_size,
                                     verify_kv, disagree_every});
          },
          "num_gpu_blocks"_a, "num_cpu_blocks"_a = 0, "block_size"_a = 16, "vocab_size"_a = 1000,
          "verify_kv"_a = true, "disagree_every"_a = 0)
      .def_static("reference_generate", &FakeExecutor::reference_generate, "prompt"_a,
                  "max_tokens"_a, "vocab_size"_a, "eos_token_ids"_a, "min_tokens"_a = 0,
                  "seed"_a = -1, "child"_a = 0, "lora_id"_a = 0)
      .def_prop_ro("num_steps", &FakeExecutor::num_steps);

  nb::class_<RequestOutput>(m, "RequestOutput")
      .def_ro("request_id", &RequestOutput::request_id)
      .def_ro("seq_index", &RequestOutput::seq_index, "which of the request's n sequences")
      // The step's few tokens as a list: what a front end reads from every output of every
      // step (a list of one int costs less than an array view and its conversion).
      .def_ro("new_token_ids", &RequestOutput::new_token_ids)
      .def_prop_ro(
          "new_logprobs", [](const RequestOutput& o) { return ro_view(o.new_logprobs); }, ref)
      .def_ro("num_top_logprobs", &RequestOutput::num_top_logprobs)
      .def_prop_ro(
          "top_token_ids", [](const RequestOutput& o) { return ro_view(o.top_token_ids); }, ref)
      .def_prop_ro(
          "top_logprobs", [](const RequestOutput& o) { return ro_view(o.top_logprobs); }, ref)
      .def_prop_ro(
          "prompt_logprobs", [](const RequestOutput& o) { return ro_view(o.prompt_logprobs); }, ref)
      .def_ro("num_prompt_top_logprobs", &RequestOutput::num_prompt_top_logprobs)
      .def_prop_ro(
          "prompt_top_token_ids",
          [](const RequestOutput& o) { return ro_view(o.prompt_top_token_ids); }, ref)
      .def_prop_ro(
          "prompt_top_logprobs",
          [](const RequestOutput& o) { return ro_view(o.prompt_top_logprobs); }, ref)
      .def_ro("finished", &RequestOutput::finished)
      .def_ro("request_finished", &RequestOutput::request_finished,
              "the request's last unfinished sequence finished with this output")
      .def_ro("cumulative_logprob", &RequestOutput::cumulative_logprob)
      .def_prop_ro("finish_reason",
                   [](const RequestOutput& o) { return finish_reason_or_none(o.finish_reason); })
      .def_ro("stop_token_id", &RequestOutput::stop_token_id)
      .def_ro("num_prompt_tokens", &RequestOutput::num_prompt_tokens)
      .def_ro("num_output_tokens", &RequestOutput::num_output_tokens)
      .def_ro("num_cached_tokens", &RequestOutput::num_cached_tokens)
      .def_ro("error", &RequestOutput::error)
      .def("__repr__", [](const RequestOutput& o) {
        return "RequestOutput(request_id='" + o.request_id +
               "', seq_index=" + std::to_string(o.seq_index) +
               ", new_tokens=" + std::to_string(o.new_token_ids.size()) +
               ", finished=" + (o.finished ? "True" : "False") +
               ", finish_reason=" + to_string(o.finish_reason) + ")";
      });

  nb::class_<EngineStats>(m, "EngineStats")
      .def_ro("num_running", &EngineStats::num_running)
      .def_ro("num_waiting", &EngineStats::num_waiting)
      .def_ro("num_free_blocks", &EngineStats::num_free_blocks)
      .def_ro("num_total_blocks", &EngineStats::num_total_blocks)
      .def_ro("kv_usage", &EngineStats::kv_usage)
      .def_ro("prefix_queries", &EngineStats::prefix_queries)
      .def_ro("prefix_hits", &EngineStats::prefix_hits)
      .def_ro("prefix_hash_collisions", &EngineStats::prefix_hash_collisions)
      .def_ro("num_preemptions", &EngineStats::num_preemptions)
      .def_ro("num_steps", &EngineStats::num_steps)
      .def_ro("num_generated_tokens", &EngineStats::num_generated_tokens)
      .def_ro("num_prompt_tokens_computed", &EngineStats::num_prompt_tokens_computed)
      .def_ro("spec_draft_tokens", &EngineStats::spec_draft_tokens)
      .def_ro("spec_accepted_tokens", &EngineStats::spec_accepted_tokens)
      .def_ro("spec_verify_steps", &EngineStats::spec_verify_steps)
      .def_ro("spec_draft_seconds", &EngineStats::spec_draft_seconds)
      .def_ro("spec_verify_seconds", &EngineStats::spec_verify_seconds);

  using release = nb::call_guard<nb::gil_scoped_release>;
  nb::class_<PyEngine>(m, "Engine", "The native engine: scheduler, KV cache manager and loop")
      .def(nb::init<const EngineConfig&, std::shared_ptr<Executor>, std::shared_ptr<Executor>>(),
           "config"_a, "executor"_a, "draft_executor"_a.none() = nb::none())
      .def("add_request", &Engine::add_request, "request_id"_a, "prompt_token_ids"_a, "params"_a,
           "cache_salt"_a = 0, "lora_id"_a = 0, release())
      .def("abort", &Engine::abort, "request_id"_a, release())
      .def("step", &Engine::step, release())
      .def("has_unfinished_requests", &Engine::has_unfinished_requests)
      .def("start", &Engine::start, release())
      .def("stop", &Engine::stop, release())
      .def_prop_ro("is_running", &Engine::is_running)
      .def_prop_ro("output_fd", &Engine::output_fd)
      .def("take_outputs", &Engine::take_outputs)
      .def("wait_outputs", &Engine::wait_outputs, "timeout_ms"_a, release())
      .def("stats", &Engine::stats)
      .def_prop_ro("config", &Engine::config);
}
