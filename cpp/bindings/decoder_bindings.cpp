// fastllm._C.ops.CpuDecoder: the native Llama-family layer loop (fastllm/kernels/decoder_cpu.h)
// over numpy/torch CPU arrays. The decoder keeps a reference to every array it was given, so the
// weights and caches it points into live as long as it does.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "array_args.h"
#include "fastllm/kernels/decoder_cpu.h"

namespace nb = nanobind;
namespace k = fastllm::kernels;
using namespace fastllm::bindings;  // NOLINT: the argument checks

namespace {

constexpr const char* kOp = "CpuDecoder";

template <typename T>
T* cpu_array(const Array& a, const char* name, int64_t expected_numel = -1) {
  T* data = typed<T>(a, false, kOp, name);
  check_arg(expected_numel < 0 || numel(a) == expected_numel,
            where(kOp, name) + " has " + std::to_string(numel(a)) + " elements, expected " +
                std::to_string(expected_numel));
  return data;
}

class PyCpuDecoder {
 public:
  PyCpuDecoder(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               int64_t intermediate, float rms_eps, const Array& final_norm,
               const Array& rope_cache, bool rope_neox, float attn_scale, int32_t sliding_window,
               int64_t block_size, int64_t num_blocks, const std::string& cache_dtype) {
    k::DecoderShape s;
    s.hidden = hidden;
    s.num_heads = num_heads;
    s.num_kv_heads = num_kv_heads;
    s.head_dim = head_dim;
    s.intermediate = intermediate;
    s.rms_eps = rms_eps;
    s.final_norm = cpu_array<float>(final_norm, "final_norm", hidden);
    check_arg(rope_cache.ndim() == 2, where(kOp, "rope_cache must be [max_position, rotary_dim]"));
    s.rope_cache = cpu_array<float>(rope_cache, "rope_cache");
    s.max_position = static_cast<int64_t>(rope_cache.shape(0));
    s.rotary_dim = static_cast<int64_t>(rope_cache.shape(1));
    s.rope_neox = rope_neox;
    s.attn_scale = attn_scale;
    s.sliding_window = sliding_window;
    s.block_size = block_size;
    s.num_blocks = num_blocks;
    if (cache_dtype == "float32") {
      s.cache_dtype = k::DType::kFloat32;
    } else if (cache_dtype == "float16") {
      s.cache_dtype = k::DType::kFloat16;
    } else if (cache_dtype == "bfloat16") {
      s.cache_dtype = k::DType::kBFloat16;
    } else {
      throw k::KernelArgumentError(where(kOp, "cache_dtype must be float32, float16 or bfloat16"));
    }
    decoder_ = std::make_unique<k::CpuDecoder>(s);
    keep_ = {final_norm, rope_cache};
  }

  void add_layer(const Array& input_norm, const Array& post_attention_norm, const nb::tuple& qkv,
                 const nb::tuple& o_proj, const nb::tuple& gate_up, const nb::tuple& down,
                 const Array& key_cache, const Array& value_cache) {
    const k::DecoderShape& s = decoder_->shape();
    k::DecoderLayerRef layer;
    layer.input_norm = cpu_array<float>(input_norm, "input_norm", s.hidden);
    layer.post_attention_norm =
        cpu_array<float>(post_attention_norm, "post_attention_norm", s.hidden);
    layer.qkv = linear(qkv, "qkv_proj");
    layer.o_proj = linear(o_proj, "o_proj");
    layer.gate_up = linear(gate_up, "gate_up_proj");
    layer.down = linear(down, "down_proj");
    const int64_t cache_numel = s.num_blocks * s.block_size * s.num_kv_heads * s.head_dim;
    for (const Array* cache : {&key_cache, &value_cache}) {
      check_arg(float_dtype(*cache, kOp, "kv cache") == s.cache_dtype,
                where(kOp, "the KV caches must have the decoder's cache_dtype"));
      check_device(*cache, false, kOp, "kv cache");
      check_contiguous(*cache, kOp, "kv cache");
      check_arg(numel(*cache) == cache_numel,
                where(kOp,
                      "the KV caches must be [num_blocks, block_size, num_kv_heads, "
                      "head_dim]"));
    }
    layer.key_cache = key_cache.data();
    layer.value_cache = value_cache.data();
    decoder_->add_layer(layer);
    keep_.insert(keep_.end(), {input_norm, post_attention_norm, key_cache, value_cache});
  }

  void forward(const Array& hidden, const Array& positions, const Array& slot_mapping,
               const Array& query_start_loc, const Array& context_lens, const Array& block_tables,
               int64_t max_context_len) {
    const k::DecoderShape& s = decoder_->shape();
    k::DecoderBatch b;
    check_arg(hidden.ndim() == 2 && static_cast<int64_t>(hidden.shape(1)) == s.hidden,
              where(kOp, "hidden must be [num_tokens, hidden_size]"));
    b.num_tokens = static_cast<int64_t>(hidden.shape(0));
    b.hidden = cpu_array<float>(hidden, "hidden");
    b.positions = cpu_array<int32_t>(positions, "positions", b.num_tokens);
    b.slot_mapping = cpu_array<int64_t>(slot_mapping, "slot_mapping", b.num_tokens);
    check_arg(query_start_loc.ndim() == 1 && query_start_loc.shape(0) >= 1,
              where(kOp, "query_start_loc must be [num_seqs + 1]"));
    b.num_seqs = static_cast<int64_t>(query_start_loc.shape(0)) - 1;
    b.query_start_loc = cpu_array<int32_t>(query_start_loc, "query_start_loc");
    b.context_lens = cpu_array<int32_t>(context_lens, "context_lens", b.num_seqs);
    check_arg(block_tables.ndim() == 2 && static_cast<int64_t>(block_tables.shape(0)) == b.num_seqs,
              where(kOp, "block_tables must be [num_seqs, max_blocks_per_seq]"));
    b.block_tables = cpu_array<int32_t>(block_tables, "block_tables");
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
  // (weight uint8 [n, row_bytes], ggml type id, bias float32 [n] or None)
  k::QuantLinearRef linear(const nb::tuple& spec, const char* name) {
    check_arg(nb::len(spec) == 3, where(kOp, name) + " must be (weight, type, bias)");
    const auto weight = nb::cast<Array>(spec[0]);
    k::QuantLinearRef ref;
    ref.type = static_cast<k::QuantType>(nb::cast<int32_t>(spec[1]));
    const int64_t values = k::quant_block_values(ref.type);
    check_arg(values > 0, where(kOp, name) + " has an unknown quantization type");
    check_arg(weight.ndim() == 2, where(kOp, name) + " weight must be [out_features, row_bytes]");
    ref.weight = cpu_array<uint8_t>(weight, name);
    ref.n = static_cast<int64_t>(weight.shape(0));
    ref.k = static_cast<int64_t>(weight.shape(1)) / k::quant_block_bytes(ref.type) * values;
    check_arg(
        ref.k / values * k::quant_block_bytes(ref.type) == static_cast<int64_t>(weight.shape(1)),
        where(kOp, name) + " rows are not whole blocks");
    keep_.push_back(weight);
    if (!spec[2].is_none()) {
      const auto bias = nb::cast<Array>(spec[2]);
      ref.bias = cpu_array<float>(bias, name, ref.n);
      keep_.push_back(bias);
    }
    return ref;
  }

  std::unique_ptr<k::CpuDecoder> decoder_;
  std::vector<Array> keep_;
};

void embed_quant_rows(const Array& out, const Array& table, int32_t type, const Array& ids) {
  const char* op = "embed_quant_rows";
  check_arg(table.ndim() == 2 && out.ndim() == 2, where(op, "table and out must be 2-D"));
  const auto qtype = static_cast<k::QuantType>(type);
  const int64_t dim = static_cast<int64_t>(out.shape(1));
  const int64_t values = k::quant_block_values(qtype);
  check_arg(values == 32 &&
                static_cast<int64_t>(table.shape(1)) == dim / values * k::quant_block_bytes(qtype),
            where(op, "table rows must hold dim values in a 32-value encoding"));
  const int64_t n = numel(ids);
  check_arg(static_cast<int64_t>(out.shape(0)) == n, where(op, "out must have one row per id"));
  const auto* table_data = typed<uint8_t>(table, false, op, "table");
  const auto* id_data = typed<int32_t>(ids, false, op, "ids");
  auto* out_data = typed<float>(out, false, op, "out");
  nb::gil_scoped_release release_gil;
  k::embed_quant_rows_cpu(table_data, qtype, static_cast<int64_t>(table.shape(0)), dim, id_data, n,
                          out_data);
}

}  // namespace

void bind_decoder(nb::module_& m) {
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
           arg("qkv"), arg("o_proj"), arg("gate_up"), arg("down"), arg("key_cache"),
           arg("value_cache"),
           "Appends a layer; each linear is (uint8 weight rows, ggml type id, float32 bias or "
           "None).")
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
  m.def("embed_quant_rows", &embed_quant_rows, arg("out"), arg("table"), arg("type"), arg("ids"),
        "out[i] = the dequantized row ids[i] of a Q8_0/Q4_0/Q4_1 table.");
}
