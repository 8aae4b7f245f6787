// fastllm._C.models: the native model loop and the CPU executor (cpp/models) over numpy/torch CPU
// arrays. Objects keep a reference to every array they were given, so the weights and caches
// they point into live as long as they do.
//
//   weights = CpuModelWeights(hidden_size=..., ..., lm_head=(rows, type, None))
//   weights.add_layer(...)                       once per layer
//   executor = CpuExecutor(weights, block_size=16, num_blocks=..., kv_cache_dtype="float16")
//   executor.set_logits_hook(hook)               a LogitsHook subclass (guided decoding)
//   Engine(config, executor)                     steps run without the GIL
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/trampoline.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "array_args.h"
#include "fastllm/models/cpu_executor.h"
#include "fastllm/models/llama_decoder.h"
#include "fastllm/models/logits_hook.h"

namespace nb = nanobind;
namespace k = fastllm::kernels;
namespace fm = fastllm::models;
using namespace fastllm::bindings;  // NOLINT: the argument checks
using fastllm::BatchPlan;

namespace {

constexpr const char* kDecoder = "CpuDecoder";
constexpr const char* kWeights = "CpuModelWeights";

template <typename T>
T* cpu_array(const Array& a, const char* op, const char* name, int64_t expected_numel = -1) {
  T* data = typed<T>(a, false, op, name);
  check_arg(expected_numel < 0 || numel(a) == expected_numel,
            where(op, name) + " has " + std::to_string(numel(a)) + " elements, expected " +
                std::to_string(expected_numel));
  return data;
}

k::DType cache_dtype_of(const std::string& name, const char* op) {
  if (name == "float32") return k::DType::kFloat32;
  if (name == "float16") return k::DType::kFloat16;
  if (name == "bfloat16") return k::DType::kBFloat16;
  if (name == "float8_e4m3fn") return k::DType::kFloat8E4M3;
  if (name == "float8_e5m2") return k::DType::kFloat8E5M2;
  throw k::KernelArgumentError(
      where(op, "cache_dtype must be float32, float16, bfloat16, float8_e4m3fn or float8_e5m2"));
}

// cache_dtype_of's inverse (torch's dtype names).
const char* cache_dtype_name(k::DType dtype) {
  switch (dtype) {
    case k::DType::kFloat8E4M3:
      return "float8_e4m3fn";
    case k::DType::kFloat8E5M2:
      return "float8_e5m2";
    default:
      return k::dtype_name(dtype);
  }
}

// The model sizes, final norm and RoPE table both bindings take.
fm::DecoderShape decoder_shape(const char* op, int64_t hidden, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t intermediate,
                               float rms_eps, const Array& final_norm, const Array& rope_cache,
                               bool rope_neox, float attn_scale, int32_t sliding_window) {
  fm::DecoderShape s;
  s.hidden = hidden;
  s.num_heads = num_heads;
  s.num_kv_heads = num_kv_heads;
  s.head_dim = head_dim;
  s.intermediate = intermediate;
  s.rms_eps = rms_eps;
  s.final_norm = cpu_array<float>(final_norm, op, "final_norm", hidden);
  check_arg(rope_cache.ndim() == 2, where(op, "rope_cache must be [max_position, rotary_dim]"));
  s.rope_cache = cpu_array<float>(rope_cache, op, "rope_cache");
  s.max_position = static_cast<int64_t>(rope_cache.shape(0));
  s.rotary_dim = static_cast<int64_t>(rope_cache.shape(1));
  s.rope_neox = rope_neox;
  s.attn_scale = attn_scale;
  s.sliding_window = sliding_window;
  return s;
}

// (weight uint8 [n, row_bytes], ggml type id, bias float32 [n] or None); the arrays go to keep.
fm::QuantLinearRef linear(const nb::handle& spec_obj, const char* op, const char* name,
                          std::vector<Array>& keep) {
  const auto spec = nb::cast<nb::tuple>(spec_obj);
  check_arg(nb::len(spec) == 3, where(op, name) + " must be (weight, type, bias)");
  const auto weight = nb::cast<Array>(spec[0]);
  fm::QuantLinearRef ref;
  ref.type = static_cast<k::QuantType>(nb::cast<int32_t>(spec[1]));
  const int64_t values = k::quant_block_values(ref.type);
  check_arg(values > 0, where(op, name) + " has an unknown quantization type");
  check_arg(weight.ndim() == 2, where(op, name) + " weight must be [out_features, row_bytes]");
  ref.weight = cpu_array<uint8_t>(weight, op, name);
  ref.n = static_cast<int64_t>(weight.shape(0));
  ref.k = static_cast<int64_t>(weight.shape(1)) / k::quant_block_bytes(ref.type) * values;
  check_arg(
      ref.k / values * k::quant_block_bytes(ref.type) == static_cast<int64_t>(weight.shape(1)),
      where(op, name) + " rows are not whole blocks");
  keep.push_back(weight);
  if (!spec[2].is_none()) {
    const auto bias = nb::cast<Array>(spec[2]);
    ref.bias = cpu_array<float>(bias, op, name, ref.n);
    keep.push_back(bias);
  }
  return ref;
}

// The optional parts of a layer: moe = (router linear, gate_up uint8 rows, gate_up type, down
// uint8 rows, down type, intermediate, top_k, renormalize) or None; q_norm / k_norm float32
// [head_dim] or None.
struct LayerExtras {
  nb::object moe;
  nb::object q_norm;
  nb::object k_norm;
};

fm::MoeRef moe_weights(const char* op, const fm::DecoderShape& s, const nb::handle& spec_obj,
                       std::vector<Array>& keep) {
  const auto spec = nb::cast<nb::tuple>(spec_obj);
  check_arg(nb::len(spec) == 8, where(op,
                                      "moe must be (router, gate_up, gate_up_type, down, "
                                      "down_type, intermediate, top_k, renormalize)"));
  fm::MoeRef moe;
  moe.router = linear(spec[0], op, "router", keep);
  moe.num_experts = moe.router.n;
  moe.intermediate = nb::cast<int64_t>(spec[5]);
  moe.top_k = nb::cast<int64_t>(spec[6]);
  moe.renormalize = nb::cast<bool>(spec[7]);
  const struct {
    int index;
    int64_t rows, k;
    const char* name;
  } parts[] = {{1, 2 * moe.intermediate, s.hidden, "experts' gate_up"},
               {3, s.hidden, moe.intermediate, "experts' down"}};
  for (const auto& part : parts) {
    const auto rows = nb::cast<Array>(spec[part.index]);
    const auto type = static_cast<k::QuantType>(nb::cast<int32_t>(spec[part.index + 1]));
    const int64_t values = k::quant_block_values(type);
    check_arg(values > 0 && part.k > 0 && part.k % values == 0,
              where(op, part.name) + " has an unknown type or rows of partial blocks");
    check_arg(
        numel(rows) == moe.num_experts * part.rows * (part.k / values) * k::quant_block_bytes(type),
        where(op, part.name) + " must hold num_experts (router rows) experts");
    const void* data = cpu_array<uint8_t>(rows, op, part.name);
    if (part.index == 1) {
      moe.gate_up = data;
      moe.gate_up_type = type;
    } else {
      moe.down = data;
      moe.down_type = type;
    }
    keep.push_back(rows);
  }
  return moe;
}

fm::DecoderLayerRef layer_weights(const char* op, const fm::DecoderShape& s,
                                  const Array& input_norm, const Array& post_attention_norm,
                                  const nb::tuple& qkv, const nb::tuple& o_proj,
                                  const nb::object& gate_up, const nb::object& down,
                                  const LayerExtras& extras, std::vector<Array>& keep) {
  fm::DecoderLayerRef layer;
  layer.input_norm = cpu_array<float>(input_norm, op, "input_norm", s.hidden);
  layer.post_attention_norm =
      cpu_array<float>(post_attention_norm, op, "post_attention_norm", s.hidden);
  layer.qkv = linear(qkv, op, "qkv_proj", keep);
  layer.o_proj = linear(o_proj, op, "o_proj", keep);
  if (extras.moe.is_none()) {
    check_arg(!gate_up.is_none() && !down.is_none(),
              where(op, "a dense layer needs gate_up and down"));
    layer.gate_up = linear(gate_up, op, "gate_up_proj", keep);
    layer.down = linear(down, op, "down_proj", keep);
  } else {
    layer.moe = moe_weights(op, s, extras.moe, keep);
  }
  check_arg(extras.q_norm.is_none() == extras.k_norm.is_none(),
            where(op, "q_norm and k_norm come together"));
  if (!extras.q_norm.is_none()) {
    const auto q = nb::cast<Array>(extras.q_norm), k_arr = nb::cast<Array>(extras.k_norm);
    layer.q_norm = cpu_array<float>(q, op, "q_norm", s.head_dim);
    layer.k_norm = cpu_array<float>(k_arr, op, "k_norm", s.head_dim);
    keep.insert(keep.end(), {q, k_arr});
  }
  keep.insert(keep.end(), {input_norm, post_attention_norm});
  return layer;
}

// The decoder over caller-owned KV caches (the torch executor's).
class PyCpuDecoder {
 public:
  PyCpuDecoder(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               int64_t intermediate, float rms_eps, const Array& final_norm,
               const Array& rope_cache, bool rope_neox, float attn_scale, int32_t sliding_window,
               int64_t block_size, int64_t num_blocks, const std::string& cache_dtype) {
    fm::DecoderShape s =
        decoder_shape(kDecoder, hidden, num_heads, num_kv_heads, head_dim, intermediate, rms_eps,
                      final_norm, rope_cache, rope_neox, attn_scale, sliding_window);
    s.block_size = block_size;
    s.num_blocks = num_blocks;
    s.cache_dtype = cache_dtype_of(cache_dtype, kDecoder);
    decoder_ = std::make_unique<fm::CpuDecoder>(s);
    keep_ = {final_norm, rope_cache};
  }

  void add_layer(const Array& input_norm, const Array& post_attention_norm, const nb::tuple& qkv,
                 const nb::tuple& o_proj, const nb::object& gate_up, const nb::object& down,
                 const Array& key_cache, const Array& value_cache, const nb::object& moe,
                 const nb::object& q_norm, const nb::object& k_norm, float k_scale, float v_scale) {
    const fm::DecoderShape& s = decoder_->shape();
    std::vector<Array> keep;
    fm::DecoderLayerRef layer =
        layer_weights(kDecoder, s, input_norm, post_attention_norm, qkv, o_proj, gate_up, down,
                      LayerExtras{moe, q_norm, k_norm}, keep);
    layer.k_scale = k_scale;
    layer.v_scale = v_scale;
    const int64_t cache_numel = s.num_blocks * s.block_size * s.num_kv_heads * s.head_dim;
    for (const Array* cache : {&key_cache, &value_cache}) {
      // A uint8 cache holds codes of the decoder's float8 type.
      const auto fp8 = k::is_float8(s.cache_dtype) ? std::optional(s.cache_dtype) : std::nullopt;
      check_arg(float_dtype(*cache, kDecoder, "kv cache", fp8) == s.cache_dtype,
                where(kDecoder, "the KV caches must have the decoder's cache_dtype"));
      check_device(*cache, false, kDecoder, "kv cache");
      check_contiguous(*cache, kDecoder, "kv cache");
      check_arg(numel(*cache) == cache_numel,
                where(kDecoder,
                      "the KV caches must be [num_blocks, block_size, num_kv_heads, "
                      "head_dim]"));
    }
    layer.key_cache = key_cache.data();
    layer.value_cache = value_cache.data();
    decoder_->add_layer(layer);
    keep.insert(keep.end(), {key_cache, value_cache});
    keep_.insert(keep_.end(), keep.begin(), keep.end());
  }

  void forward(const Array& hidden, const Array& positions, const Array& slot_mapping,
               const Array& query_start_loc, const Array& context_lens, const Array& block_tables,
               int64_t max_context_len) {
    const fm::DecoderShape& s = decoder_->shape();
    fm::DecoderBatch b;
    check_arg(hidden.ndim() == 2 && static_cast<int64_t>(hidden.shape(1)) == s.hidden,
              where(kDecoder, "hidden must be [num_tokens, hidden_size]"));
    b.num_tokens = static_cast<int64_t>(hidden.shape(0));
    b.hidden = cpu_array<float>(hidden, kDecoder, "hidden");
    b.positions = cpu_array<int32_t>(positions, kDecoder, "positions", b.num_tokens);
    b.slot_mapping = cpu_array<int64_t>(slot_mapping, kDecoder, "slot_mapping", b.num_tokens);
    check_arg(query_start_loc.ndim() == 1 && query_start_loc.shape(0) >= 1,
              where(kDecoder, "query_start_loc must be [num_seqs + 1]"));
    b.num_seqs = static_cast<int64_t>(query_start_loc.shape(0)) - 1;
    b.query_start_loc = cpu_array<int32_t>(query_start_loc, kDecoder, "query_start_loc");
    b.context_lens = cpu_array<int32_t>(context_lens, kDecoder, "context_lens", b.num_seqs);
    check_arg(block_tables.ndim() == 2 && static_cast<int64_t>(block_tables.shape(0)) == b.num_seqs,
              where(kDecoder, "block_tables must be [num_seqs, max_blocks_per_seq]"));
    b.block_tables = cpu_array<int32_t>(block_tables, kDecoder, "block_tables");
    b.max_blocks_per_seq = static_cast<int64_t>(block_tables.shape(1));
    b.max_context_len = max_context_len;
    nb::gil_scoped_release release_gil;
    decoder_->forward(b);
  }

  int64_t num_layers() const { return decoder_->num_layers(); }
  void set_profiling(bool on) { decoder_->set_profiling(on); }
  nb::dict profile() const {
    const auto& p = decoder_->profile();
    nb::dict out;
    out["gemm"] = p.gemm;
    out["attention"] = p.attention;
    out["norms_rope_act"] = p.norms_rope_act;
    return out;
  }

 private:
  std::unique_ptr<fm::CpuDecoder> decoder_;
  std::vector<Array> keep_;
};

// A model's weights for CpuExecutor, and the arrays they point into.
struct PyCpuModelWeights {
  fm::CpuModelWeights weights;
  std::vector<Array> keep;

  void add_layer(const Array& input_norm, const Array& post_attention_norm, const nb::tuple& qkv,
                 const nb::tuple& o_proj, const nb::object& gate_up, const nb::object& down,
                 const nb::object& moe, const nb::object& q_norm, const nb::object& k_norm,
                 float k_scale, float v_scale) {
    fm::DecoderLayerRef layer =
        layer_weights(kWeights, weights.shape, input_norm, post_attention_norm, qkv, o_proj,
                      gate_up, down, LayerExtras{moe, q_norm, k_norm}, keep);
    layer.k_scale = k_scale;
    layer.v_scale = v_scale;
    weights.layers.push_back(layer);
  }
};

void init_weights(PyCpuModelWeights* self, int64_t hidden, int64_t num_heads, int64_t num_kv_heads,
                  int64_t head_dim, int64_t intermediate, float rms_eps, const Array& final_norm,
                  const Array& rope_cache, bool rope_neox, float attn_scale, int32_t sliding_window,
                  const Array& embed_table, nb::object embed_type, const nb::tuple& lm_head,
                  int64_t lm_head_refine, nb::object refine_rows) {
  new (self) PyCpuModelWeights();
  fm::CpuModelWeights& w = self->weights;
  w.shape = decoder_shape(kWeights, hidden, num_heads, num_kv_heads, head_dim, intermediate,
                          rms_eps, final_norm, rope_cache, rope_neox, attn_scale, sliding_window);
  check_arg(embed_table.ndim() == 2, where(kWeights, "embed_table must be [vocab, row]"));
  w.vocab = static_cast<int64_t>(embed_table.shape(0));
  if (embed_type.is_none()) {
    check_arg(static_cast<int64_t>(embed_table.shape(1)) == hidden,
              where(kWeights, "a float32 embed_table must be [vocab, hidden_size]"));
    w.embed_table = cpu_array<float>(embed_table, kWeights, "embed_table");
  } else {
    w.embed_quantized = true;
    w.embed_type = static_cast<k::QuantType>(nb::cast<int32_t>(embed_type));
    const int64_t values = k::quant_block_values(w.embed_type);
    check_arg(values == 32 && hidden % values == 0 &&
                  static_cast<int64_t>(embed_table.shape(1)) ==
                      hidden / values * k::quant_block_bytes(w.embed_type),
              where(kWeights,
                    "embed_table rows must hold hidden_size values in a 32-value "
                    "encoding"));
    w.embed_table = cpu_array<uint8_t>(embed_table, kWeights, "embed_table");
  }
  w.lm_head = linear(lm_head, kWeights, "lm_head", self->keep);
  check_arg(lm_head_refine >= 0, where(kWeights, "lm_head_refine must be >= 0"));
  w.lm_head_refine = lm_head_refine;
  if (!refine_rows.is_none()) {
    const auto spec = nb::cast<nb::tuple>(refine_rows);
    check_arg(nb::len(spec) == 2, where(kWeights, "refine_rows must be (rows, type)"));
    const auto rows = nb::cast<Array>(spec[0]);
    w.refine_type = static_cast<k::QuantType>(nb::cast<int32_t>(spec[1]));
    const int64_t values = k::quant_block_values(w.refine_type);
    check_arg(values > 0 && hidden % values == 0 && rows.ndim() == 2 &&
                  static_cast<int64_t>(rows.shape(0)) == w.lm_head.n &&
                  static_cast<int64_t>(rows.shape(1)) ==
                      hidden / values * k::quant_block_bytes(w.refine_type),
              where(kWeights, "refine_rows must be the output projection's rows in their type"));
    w.refine_rows = cpu_array<uint8_t>(rows, kWeights, "refine_rows");
    self->keep.push_back(rows);
  }
  self->keep.insert(self->keep.end(), {final_norm, rope_cache, embed_table});
}

void init_executor(fm::CpuExecutor* self, const PyCpuModelWeights& weights, int64_t block_size,
                   int64_t num_blocks, int64_t num_swap_blocks, const std::string& kv_cache_dtype) {
  fm::CpuExecutorConfig config;
  config.block_size = block_size;
  config.num_blocks = num_blocks;
  config.num_swap_blocks = num_swap_blocks;
  config.cache_dtype = cache_dtype_of(kv_cache_dtype, "CpuExecutor");
  new (self) fm::CpuExecutor(weights.weights, config);
}

// Python subclasses implement apply(plan, logits) and advance(plan, tokens); the engine thread
// takes the GIL for those calls only.
class PyLogitsHook : public fm::LogitsHook {
 public:
  NB_TRAMPOLINE(fm::LogitsHook, 2);

  void apply(const BatchPlan& plan, float* logits, int64_t vocab) override {
    nb::gil_scoped_acquire gil;
    constexpr uint64_t hash = nb::detail::str_hash("apply");
    nb::detail::ticket ticket(nb_trampoline, "apply", hash, true);
    const size_t shape[2] = {static_cast<size_t>(plan.num_samples), static_cast<size_t>(vocab)};
    nb::ndarray<nb::numpy, float, nb::ndim<2>> view(logits, 2, shape, nb::handle());
    // A view without an owner is copied unless cast by reference: the hook edits it in place.
    nb_trampoline.base().attr(ticket.key)(nb::cast(&plan, nb::rv_policy::reference),
                                          nb::cast(view, nb::rv_policy::reference));
  }

  void advance(const BatchPlan& plan, const int32_t* tokens) override {
    nb::gil_scoped_acquire gil;
    constexpr uint64_t hash = nb::detail::str_hash("advance");
    nb::detail::ticket ticket(nb_trampoline, "advance", hash, true);
    const size_t shape[1] = {static_cast<size_t>(plan.num_samples)};
    nb::ndarray<nb::numpy, const int32_t, nb::ndim<1>> view(tokens, 1, shape, nb::handle());
    nb_trampoline.base().attr(ticket.key)(nb::cast(&plan, nb::rv_policy::reference),
                                          nb::cast(view, nb::rv_policy::reference));
  }
};

}  // namespace

void bind_models(nb::module_& m) {
  using nb::arg;
  nb::class_<PyCpuDecoder>(m, "CpuDecoder",
                           "The Llama-family layer loop on the CPU over GGUF-encoded weights.")
      .def(nb::init<int64_t, int64_t, int64_t, int64_t, int64_t, float, const Array&, const Array&,
                    bool, float, int32_t, int64_t, int64_t, const std::string&>(),
           arg("hidden_size"), arg("num_heads"), arg("num_kv_heads"), arg("head_dim"),
           arg("intermediate_size"), arg("rms_eps"), arg("final_norm"), arg("rope_cache"),
           arg("rope_neox"), arg("attn_scale"), arg("sliding_window"), arg("block_size"),
           arg("num_blocks"), arg("cache_dtype"))
      .def("add_layer", &PyCpuDecoder::add_layer, arg("input_norm"), arg("post_attention_norm"),
           arg("qkv"), arg("o_proj"), arg("gate_up").none(), arg("down").none(), arg("key_cache"),
           arg("value_cache"), nb::kw_only(), arg("moe").none() = nb::none(),
           arg("q_norm").none() = nb::none(), arg("k_norm").none() = nb::none(),
           arg("k_scale") = 1.0f, arg("v_scale") = 1.0f,
           "Appends a layer; each linear is (uint8 weight rows, ggml type id, float32 bias or "
           "None). A sparse layer passes moe = (router linear, gate_up rows, gate_up type, down "
           "rows, down type, intermediate, top_k, renormalize) and None for gate_up and down; "
           "q_norm / k_norm: per-head RMSNorm weights (Qwen3); a uint8 cache is float8 e4m3 "
           "storing x / k_scale (x / v_scale).")
      .def("forward", &PyCpuDecoder::forward, arg("hidden"), arg("positions"), arg("slot_mapping"),
           arg("query_start_loc"), arg("context_lens"), arg("block_tables"), arg("max_context_len"),
           "Runs every layer over the step in place: hidden holds the embeddings in and the "
           "final-normed states out.")
      .def_prop_ro("num_layers", &PyCpuDecoder::num_layers)
      .def("set_profiling", &PyCpuDecoder::set_profiling, arg("on"),
           "Turns the per-part timers on (and zeroes them) or off.")
      .def("profile", &PyCpuDecoder::profile,
           "Seconds spent in forward() per part since profiling was turned on: gemm, attention, "
           "norms_rope_act.");

  nb::class_<PyCpuModelWeights>(m, "CpuModelWeights",
                                "A Llama-family model's weights for CpuExecutor (arrays kept "
                                "alive, not copied).")
      .def("__init__", &init_weights, nb::kw_only(), arg("hidden_size"), arg("num_heads"),
           arg("num_kv_heads"), arg("head_dim"), arg("intermediate_size"), arg("rms_eps"),
           arg("final_norm"), arg("rope_cache"), arg("rope_neox"), arg("attn_scale"),
           arg("sliding_window"), arg("embed_table"), arg("embed_type").none(), arg("lm_head"),
           arg("lm_head_refine") = 0, arg("refine_rows").none() = nb::none(),
           "embed_table: uint8 rows of a Q8_0/Q4_0/Q4_1 table (embed_type: its ggml type id) or "
           "float32 [vocab, hidden] (embed_type None); lm_head: (uint8 rows, type id, bias or "
           "None); lm_head_refine: logits per row recomputed without activation rounding after "
           "the output projection (refine_top_logits), from refine_rows ((uint8 rows, type id): "
           "the output weights' own values; None: lm_head's rows).")
      .def("add_layer", &PyCpuModelWeights::add_layer, arg("input_norm"),
           arg("post_attention_norm"), arg("qkv"), arg("o_proj"), arg("gate_up").none(),
           arg("down").none(), nb::kw_only(), arg("moe").none() = nb::none(),
           arg("q_norm").none() = nb::none(), arg("k_norm").none() = nb::none(),
           arg("k_scale") = 1.0f, arg("v_scale") = 1.0f,
           "Appends a layer; each linear is (uint8 weight rows, ggml type id, float32 bias or "
           "None); moe, q_norm, k_norm, k_scale, v_scale as CpuDecoder.add_layer.")
      .def_prop_ro("num_layers",
                   [](const PyCpuModelWeights& w) { return w.weights.layers.size(); });

  nb::class_<fm::LogitsHook, PyLogitsHook>(
      m, "LogitsHook",
      "Subclass and implement apply(plan, logits) (float32 [num_samples, vocab], edit in place) "
      "and advance(plan, tokens) (int32 [num_samples]); called only for steps with a row of a "
      "watched request.")
      .def(nb::init<>())
      .def("watch", &fm::LogitsHook::watch, arg("request_id"),
           nb::call_guard<nb::gil_scoped_release>())
      .def("unwatch", &fm::LogitsHook::unwatch, arg("request_id"),
           nb::call_guard<nb::gil_scoped_release>())
      .def("wants", &fm::LogitsHook::wants, arg("plan"),
           "Whether some sample row of plan belongs to a watched request.");

  nb::class_<fm::CpuExecutor, fastllm::Executor>(
      m, "CpuExecutor",
      "The engine's executor for a Llama-family GGUF model on the CPU: embed, decoder, logits "
      "and sampling in C++ (no GIL in the step); it owns the KV caches.")
      .def("__init__", &init_executor, arg("weights"), nb::kw_only(), arg("block_size"),
           arg("num_blocks"), arg("num_swap_blocks") = 0, arg("kv_cache_dtype") = "float16",
           nb::keep_alive<1, 2>())
      .def("set_logits_hook", &fm::CpuExecutor::set_logits_hook, arg("hook"),
           "Installs the hook (once).")
      .def_prop_ro("has_logits_hook", &fm::CpuExecutor::has_logits_hook)
      .def(
          "add_lora",
          [](fm::CpuExecutor& self, int32_t lora_id, nb::object adapter) {
            // adapter: a fastllm.lora.LoraAdapter; its arrays (float32 or float16, A and B
            // transposed) are read in place and must outlive remove_lora (the LoRA manager keeps
            // the adapter until then).
            using Matrix = nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cpu>;
            const int64_t layers = self.decoder().num_layers();
            nb::list table = nb::cast<nb::list>(adapter.attr("layer_modules")(layers));
            std::vector<fm::CpuExecutor::LoraModule> modules;
            bool any = false, f16 = false;
            for (nb::handle per_layer : table) {
              for (nb::handle m : per_layer) {
                fm::CpuExecutor::LoraModule ref;
                if (!m.is_none()) {
                  auto a = nb::cast<Matrix>(m.attr("a"));
                  // B transposed ([rank, out]): what the kernel reads without a transposition.
                  auto b = nb::cast<Matrix>(m.attr("bt"));
                  const auto is_float = [](const Matrix& x, int bits) {
                    return x.dtype().code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) &&
                           x.dtype().bits == bits;
                  };
                  const bool a16 = is_float(a, 16), b16 = is_float(b, 16);
                  const bool a32 = is_float(a, 32), b32 = is_float(b, 32);
                  if (!((a16 && b16) || (a32 && b32)) || (any && a16 != f16)) {
                    throw nb::value_error("add_lora: A and B must be float32 or float16, alike");
                  }
                  if (b.shape(0) != a.shape(0)) {
                    throw nb::value_error("add_lora: lora_B's columns must equal lora_A's rows");
                  }
                  any = true;
                  f16 = a16;
                  ref.a = a.data();
                  ref.b = b.data();
                  ref.rank = static_cast<int32_t>(a.shape(0));
                  ref.scale = nb::cast<float>(m.attr("scale"));
                }
                modules.push_back(ref);
              }
            }
            self.add_lora(
                lora_id, std::move(modules),
                f16 ? fastllm::kernels::DType::kFloat16 : fastllm::kernels::DType::kFloat32);
          },
          arg("lora_id"), arg("adapter"),
          "Registers a LoRA adapter (fastllm.lora.LoraAdapter) under its id; its arrays are read "
          "in place until remove_lora.")
      .def("remove_lora", &fm::CpuExecutor::remove_lora, arg("lora_id"))
      .def_prop_ro("num_loras", &fm::CpuExecutor::num_loras)
      .def_prop_ro("kv_cache_bytes", &fm::CpuExecutor::kv_cache_bytes)
      .def_prop_ro(
          "kv_cache_dtype",
          [](const fm::CpuExecutor& e) {
            return cache_dtype_name(e.decoder().shape().cache_dtype);
          },
          "The KV cache's element type, as kv_cache_dtype named it.")
      .def_prop_ro("num_layers", [](const fm::CpuExecutor& e) { return e.decoder().num_layers(); })
      .def("set_profiling", &fm::CpuExecutor::set_profiling, arg("on"),
           "Turns the per-part timers on (and zeroes them) or off.")
      .def(
          "profile",
          [](const fm::CpuExecutor& e) {
            const auto& p = e.profile();
            const auto& d = e.decoder().profile();
            nb::dict out;
            out["embed"] = p.embed;
            out["gemm"] = d.gemm;
            out["attention"] = d.attention;
            out["norms_rope_act"] = d.norms_rope_act;
            out["lm_head"] = p.lm_head;
            out["sampling"] = p.sampling;
            out["prompt_logprobs"] = p.prompt_logprobs;
            out["logits_hook"] = p.logits_hook;
            out["total"] = p.total;
            return out;
          },
          "Seconds per part of execute() since profiling was turned on (total: all of it).");
}
